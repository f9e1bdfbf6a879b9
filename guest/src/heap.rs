//! The runtime's heap: the RAM after the image, up to the next reserved
//! range (ember-vmm reserves the mailbox at the top of RAM) or the mapped
//! limit, managed by talc. Pages cost nothing until first touched, and
//! talc reuses freed memory first, so a fresh instance's linear memory
//! usually lands on pages the guest has already touched.

use spinning_top::RawSpinlock;
use talc::source::Manual;
use talc::TalcLock;

use crate::boot_params::BootParams;

#[global_allocator]
static HEAP: TalcLock<RawSpinlock, Manual> = TalcLock::new(Manual);

extern "C" {
    /// First byte after the image (linker.ld), page-aligned.
    static __ember_image_end: u8;
}

/// The end of the loaded image.
pub fn image_end() -> u64 {
    core::ptr::addr_of!(__ember_image_end) as u64
}

/// Gives the heap the RAM range that holds the image end; returns its size.
pub fn init(boot: &BootParams) -> u64 {
    let start = image_end();
    let Some(ram) = boot
        .e820()
        .iter()
        .find(|e| e.is_ram() && e.addr <= start && start < e.end())
    else {
        return 0;
    };
    let end = ram.end().min(ember_abi::GUEST_MAPPED_LIMIT);
    let size = end.saturating_sub(start);
    // SAFETY: [start, end) is RAM from the e820 map, after the image and
    // below the mapped limit, used by nothing else; init runs once.
    match unsafe { HEAP.lock().claim(start as *mut u8, size as usize) } {
        Some(_) => size,
        None => 0,
    }
}

/// Heap bytes in use and in all.
pub fn usage() -> (u64, u64) {
    let talc = HEAP.lock();
    let counters = talc.counters();
    (
        counters.allocated_bytes as u64,
        counters.claimed_bytes as u64,
    )
}

/// Heap bytes still free (some of it in fragments).
pub fn available() -> u64 {
    let (used, total) = usage();
    total.saturating_sub(used)
}
