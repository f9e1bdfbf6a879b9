//! gzip of the event at the default level (`flate2` on `miniz_oxide`).

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;

/// Compresses `event`.
pub fn handle(event: &[u8]) -> Result<Vec<u8>, String> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(event.len() / 2), Compression::default());
    encoder.write_all(event).map_err(|e| e.to_string())?;
    encoder.finish().map_err(|e| e.to_string())
}

/// The benchmark's event: 1 MiB of text-like bytes (words from a small
/// vocabulary, chosen by a fixed pseudo-random sequence).
pub fn sample_event() -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the", "function", "snapshot", "restore", "guest", "memory", "page", "request", "event",
        "result", "timer", "warm", "cold", "start", "agent", "journal",
    ];
    let mut out = Vec::with_capacity(1 << 20);
    let mut x: u32 = 12345;
    while out.len() < 1 << 20 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        out.extend_from_slice(WORDS[(x >> 16) as usize % WORDS.len()].as_bytes());
        out.push(if x.is_multiple_of(13) { b'\n' } else { b' ' });
    }
    out.truncate(1 << 20);
    out
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    #[test]
    fn decompresses_to_the_input() {
        let input = super::sample_event();
        let packed = super::handle(&input).unwrap();
        assert!(packed.len() < input.len() / 2);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, input);
    }
}
