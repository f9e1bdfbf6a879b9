//! The function's work. ember-bench compiles this same file natively to
//! compare the guest's interpreter with the host's CPU.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// SHA-256 of everything `input` yields, in lowercase hexadecimal.
pub fn hex_digest(mut input: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
