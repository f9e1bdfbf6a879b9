//! The guest's random numbers: ChaCha20 seeded by the host (`load`), so
//! that functions get cryptographic randomness without a hardware source.
//! After a restore the host gives fresh entropy ([`reseed`]): copies of one
//! snapshot never share a stream.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use spinning_top::Spinlock;

static RNG: Spinlock<Option<ChaCha20Rng>> = Spinlock::new(None);

/// Seeds (or reseeds) the generator.
pub fn seed(seed: [u8; 32]) {
    *RNG.lock() = Some(ChaCha20Rng::from_seed(seed));
}

/// Reseeds after a restore: the new key is the host's fresh entropy mixed
/// (XOR) with the old stream's next output, so the result is no weaker
/// than either.
pub fn reseed(entropy: [u8; 32]) {
    let mut rng = RNG.lock();
    let mut seed = entropy;
    if let Some(old) = rng.as_mut() {
        let mut mix = [0u8; 32];
        old.fill_bytes(&mut mix);
        for (s, m) in seed.iter_mut().zip(mix) {
            *s ^= m;
        }
    }
    *rng = Some(ChaCha20Rng::from_seed(seed));
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
