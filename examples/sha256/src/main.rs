//! SHA-256 of the event, in hexadecimal.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

fn main() {
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 64 * 1024];
    let mut stdin = io::stdin().lock();
    loop {
        let n = stdin.read(&mut buf).expect("read the event");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    println!("{hex}");
}
