//! Port I/O. Ring 3 may use it too: it runs with IOPL 3.

use core::arch::asm;

/// Writes `value` to I/O port `port`. Each call is one exit to the VMM.
/// Not a memory barrier: use [`doorbell`] where the VMM reads memory the
/// guest wrote before the `out`.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: an `out` only reaches the VMM's device model; it touches no
    // guest memory. The caller runs in ring 0 or in ring 3 with IOPL 3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes `value` to I/O port `port` as a doorbell: the VMM reads (and,
/// before the `out` completes, writes) guest memory, so every memory access
/// before it stays before it, and none after it moves ahead.
#[inline]
pub fn doorbell(port: u16, value: u8) {
    // SAFETY: as `outb`. Without `nomem` the compiler treats the asm as
    // reading and writing any memory, which makes it a compiler barrier;
    // the CPU keeps earlier stores ahead of an `out` (it serialises).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}
