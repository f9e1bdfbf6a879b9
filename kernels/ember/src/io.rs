//! Port I/O. Ring 3 may use it too: it runs with IOPL 3.

use core::arch::asm;

/// Writes `value` to I/O port `port`. Each call is one exit to the VMM.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: an `out` only reaches the VMM's device model; it touches no
    // guest memory. The caller runs in ring 0 or in ring 3 with IOPL 3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}
