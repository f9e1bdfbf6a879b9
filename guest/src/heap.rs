//! The runtime's heap: the RAM after the image, up to the next reserved
//! range (ember-vmm reserves the mailbox at the top of RAM) or the mapped
//! limit, managed by talc. Pages cost nothing until first touched, and
//! talc reuses freed memory first, so a fresh instance's linear memory
//! usually lands on pages the guest has already touched.

use core::alloc::Layout;
use core::ptr::NonNull;

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

/// Where the host writes a compiled module before a `load`: whole 2 MiB
/// regions of the heap, reserved at boot and not touched until then (so
/// they cost nothing), announced in `ready` (docs/guest-kernel.md, "Memory
/// map"). The guest runs the module where it lies: nothing is copied, and
/// only the pages the runtime reads or executes are ever touched in the
/// guest. The regions that hold module bytes are kept whole, so nothing
/// else is ever written into them: the host stores them whole in the
/// template and maps each as one 2 MiB page (docs/snapshot-format.md, "Whole regions").
pub struct CodeArea {
    start: NonNull<u8>,
    /// The allocation's size (whole pages); shrinks once a module is in.
    len: usize,
    /// Its size as reserved and announced.
    reserved: usize,
}

/// The code area's alignment and the unit it is kept in: a 2 MiB page of
/// the guest's page tables (and of the host's, when the host maps it so).
const REGION: usize = 2 << 20;

impl CodeArea {
    /// Reserves `bytes` (rounded up to whole 2 MiB regions), 2 MiB-aligned.
    pub fn reserve(bytes: u64) -> Option<CodeArea> {
        let len = usize::try_from(bytes)
            .ok()?
            .checked_next_multiple_of(REGION)?;
        let layout = Layout::from_size_align(len.max(REGION), REGION).ok()?;
        // SAFETY: the layout's size is nonzero.
        let start = NonNull::new(unsafe { alloc::alloc::alloc(layout) })?;
        Some(CodeArea {
            start,
            len: layout.size(),
            reserved: layout.size(),
        })
    }

    /// The area's guest-physical address (the guest maps RAM at its
    /// physical addresses).
    pub fn gpa(&self) -> u64 {
        self.start.as_ptr() as u64
    }

    /// The area's size in bytes, as announced.
    pub fn size(&self) -> usize {
        self.reserved
    }

    /// The first `len` bytes, where the host wrote a module; `None` if the
    /// area is smaller.
    pub fn module(&self, len: u64) -> Option<NonNull<[u8]>> {
        let len = usize::try_from(len).ok().filter(|&l| l <= self.reserved)?;
        Some(NonNull::slice_from_raw_parts(self.start, len))
    }

    /// Bytes that [`CodeArea::keep`] would give back to the heap.
    pub fn spare(&self, module_len: u64) -> u64 {
        let keep = usize::try_from(module_len)
            .ok()
            .and_then(|len| len.checked_next_multiple_of(REGION))
            .unwrap_or(usize::MAX)
            .max(REGION);
        self.len.saturating_sub(keep) as u64
    }

    /// Makes the area whole again after a failed load gave its spare pages
    /// back (and freed everything made since): `false` if the heap has
    /// put something else there meanwhile.
    pub fn regrow(&mut self) -> bool {
        if self.len == self.reserved {
            return true;
        }
        // SAFETY: `start` was allocated by this heap and is now `len` bytes
        // long with 2 MiB alignment; `reserved` is larger.
        let grown = unsafe {
            let layout = Layout::from_size_align_unchecked(self.len, REGION);
            HEAP.lock()
                .try_grow_in_place(self.start.as_ptr(), layout, self.reserved)
        };
        if grown {
            self.len = self.reserved;
        }
        grown
    }

    /// Keeps the 2 MiB regions that hold the first `module_len` bytes and
    /// gives the rest back to the heap, in place (the module stays where it
    /// is).
    pub fn keep(&mut self, module_len: u64) {
        let spare = self.spare(module_len) as usize;
        if spare == 0 {
            return;
        }
        let new_len = self.len - spare;
        // SAFETY: `start` was allocated by this heap with this layout
        // (size `len`, 2 MiB alignment); `new_len` is nonzero and smaller.
        // Talc shrinks in place: nothing moves.
        unsafe {
            let layout = Layout::from_size_align_unchecked(self.len, REGION);
            HEAP.lock().shrink(self.start.as_ptr(), layout, new_len);
        }
        self.len = new_len;
    }
}
