//! AES-128 in CTR mode over the event (the RustCrypto `aes` and `ctr`
//! crates, their portable code: no AES-NI in WebAssembly), with a fixed key
//! and nonce. The result is the ciphertext, as long as the event.

use aes::cipher::{KeyIvInit, StreamCipher};

type Aes128Ctr = ctr::Ctr128BE<aes::Aes128>;

/// The key (the FIPS-197 example key).
const KEY: [u8; 16] = [
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c,
];

/// The initial counter block.
const NONCE: [u8; 16] = [
    0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff,
];

/// Encrypts `event`.
pub fn handle(event: &[u8]) -> Result<Vec<u8>, String> {
    let mut data = event.to_vec();
    let mut cipher = Aes128Ctr::new(&KEY.into(), &NONCE.into());
    cipher.apply_keystream(&mut data);
    Ok(data)
}

/// The benchmark's event: 64 KiB.
pub fn sample_event() -> Vec<u8> {
    (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn nist_sp800_38a_ctr_vector() {
        // SP 800-38A F.5.1, first block.
        let plain = [
            0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93,
            0x17, 0x2a,
        ];
        let want = [
            0x87, 0x4d, 0x61, 0x91, 0xb6, 0x20, 0xe3, 0x26, 0x1b, 0xef, 0x68, 0x64, 0x99, 0x0d,
            0xb6, 0xce,
        ];
        assert_eq!(super::handle(&plain).unwrap(), want);
    }
}
