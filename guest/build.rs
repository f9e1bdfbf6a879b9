//! Links the guest image with linker.ld (fixed guest-physical layout).
//!
//! The linker script is named by absolute path, and build-script output is
//! cached in the target directory, which checkouts may share
//! (`scripts/guest-image` uses one under `EMBER_CACHE_DIR`). So the path
//! comes from `EMBER_GUEST_DIR` when the script sets it, a variable Cargo
//! watches: building from another checkout runs this again instead of
//! linking with the first checkout's script (or a deleted one).

fn main() {
    println!("cargo:rerun-if-env-changed=EMBER_GUEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    let dir = std::env::var("EMBER_GUEST_DIR")
        .or_else(|_| std::env::var("CARGO_MANIFEST_DIR"))
        .expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rustc-link-arg-bins=--no-pie");
}
