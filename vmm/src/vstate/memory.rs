//! Guest memory: one anonymous private mapping from guest-physical 0, at a
//! 2 MiB-aligned host address (so that a 2 MiB guest page can be one 2 MiB
//! host page: the compiled module's regions of a template are mapped so,
//! docs/snapshot-format.md, "Whole regions").
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
        /// What mmap reported.
        source: std::io::Error,
    },
    /// Cannot use {1} bytes of guest memory: {0}
    Region(String, usize),
}

/// The alignment of guest memory in the VMM's address space.
const ALIGN: usize = 2 << 20;

/// Protection and flags of [`map_aligned`]'s mappings.
const PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Maps `size` bytes of anonymous private memory (read, write, no swap
/// reserved) at a 2 MiB-aligned address, and returns the address: guest
/// memory, and the huge pages a restore copies hot regions into.
pub fn map_aligned(size: usize) -> std::io::Result<usize> {
    let padded = size
        .checked_add(ALIGN)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), padded, PROT, FLAGS, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = (raw as usize).next_multiple_of(ALIGN);
    let (head, tail) = (start - raw as usize, raw as usize + padded - (start + size));
    // SAFETY: the slack before and after the aligned part is ours and
    // unused; unmapping it cannot fail in a way that matters (it stays
    // mapped and unused).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    Ok(start)
}

/// Maps `size` bytes of guest memory at guest-physical 0 (untouched pages
/// cost nothing), 2 MiB-aligned, and names the mapping. The mapping lives
/// as long as the process (one VM per process): it is never unmapped.
pub fn create_guest_memory(size: usize) -> Result<GuestMemoryMmap, MemoryError> {
    use vm_memory::bitmap::NewBitmap;
    use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
    let start = map_aligned(size).map_err(|source| MemoryError::Map { size, source })?;
    // SAFETY: [start, start+size) is a mapping of ours with these
    // protections and flags, and it is never unmapped.
    let region = unsafe {
        MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_raw_mmap_pointer(start as *mut u8)
            .with_mmap_prot(PROT)
            .with_mmap_flags(FLAGS)
            .build()
    }
    .map_err(|e| MemoryError::Region(e.to_string(), size))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| MemoryError::Region("it wraps the guest address space".into(), size))?;
    let mem = GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| MemoryError::Region(e.to_string(), size))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryRegion};

    #[test]
    fn guest_memory_is_2_mib_aligned_whatever_its_size() {
        for mib in [1usize, 3, 129] {
            let mem = create_guest_memory(mib << 20).unwrap();
            let region = mem.iter().next().unwrap();
            assert_eq!(region.len() as usize, mib << 20);
            assert!(
                (region.as_ptr() as usize).is_multiple_of(ALIGN),
                "{mib} MiB unaligned"
            );
            let last = GuestAddress(((mib << 20) - 8) as u64);
            mem.write_obj(0x1234_5678u64, last).unwrap();
            assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1234_5678);
            assert!(mem
                .write_obj(1u64, GuestAddress((mib << 20) as u64))
                .is_err());
        }
    }
}
