//! The runtime's heap: the RAM after the image, up to the next reserved
//! range (ember-vmm reserves the mailbox at the top of RAM) or the mapped
//! limit. Pages cost nothing until first touched.

use linked_list_allocator::LockedHeap;

use crate::boot_params::BootParams;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

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
    if size == 0 {
        return 0;
    }
    // SAFETY: [start, end) is RAM from the e820 map, after the image and
    // below the mapped limit, used by nothing else; init runs once.
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) };
    size
}
