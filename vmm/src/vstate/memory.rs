//! Guest memory: one anonymous private mapping from guest-physical 0.
//!
//! The mapping is named `ember-guest-ram` (PR_SET_VMA_ANON_NAME) so that
//! /proc/PID/smaps shows it apart from the VMM's own memory; ember-bench
//! reports the VMM's footprint without it.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory as ember-vmm maps it. Every write the VMM itself makes
/// (boot structures, mailbox requests, a module's bytes) marks its pages in
/// the region's bitmap: KVM's dirty log sees only the guest's writes, and a
/// Diff snapshot needs both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The name guest memory carries in /proc/PID/maps: `[anon:ember-guest-ram]`.
pub const GUEST_RAM_NAME: &str = "ember-guest-ram";

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MemoryError {
    /// Cannot map {size} bytes of guest memory: {source}
    Map {
        /// The size asked for.
        size: usize,
        /// What vm-memory reported.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `size` bytes of guest memory at guest-physical 0 (untouched pages
/// cost nothing) and names the mapping.
pub fn create_guest_memory(size: usize) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|source| MemoryError::Map { size, source })?;
    for region in mem.iter() {
        name_mapping(region.as_ptr() as usize, region.len() as usize);
    }
    Ok(mem)
}

/// Names an anonymous mapping; kernels without CONFIG_ANON_VMA_NAME refuse,
/// which only costs the name.
fn name_mapping(addr: usize, len: usize) {
    const PR_SET_VMA: libc::c_int = 0x53564d41;
    const PR_SET_VMA_ANON_NAME: libc::c_ulong = 0;
    let name = c"ember-guest-ram";
    // SAFETY: prctl(PR_SET_VMA) only labels the mapping [addr, addr+len),
    // which we own; the name outlives the call (the kernel copies it).
    let ret = unsafe { libc::prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, addr, len, name.as_ptr()) };
    if ret != 0 {
        log::debug!(
            "cannot name guest memory mapping: {}",
            std::io::Error::last_os_error()
        );
    }
}
