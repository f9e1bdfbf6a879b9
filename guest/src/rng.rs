//! The guest's random numbers: ChaCha20 seeded by the host (`load`), so
//! that functions get cryptographic randomness without a hardware source.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use spinning_top::Spinlock;

static RNG: Spinlock<Option<ChaCha20Rng>> = Spinlock::new(None);

/// Seeds (or reseeds) the generator.
pub fn seed(seed: [u8; 32]) {
    *RNG.lock() = Some(ChaCha20Rng::from_seed(seed));
}

/// Fills `buf` with random bytes; false if the host has not seeded the
/// generator yet.
pub fn fill(buf: &mut [u8]) -> bool {
    match RNG.lock().as_mut() {
        Some(rng) => {
            rng.fill_bytes(buf);
            true
        }
        None => false,
    }
}
