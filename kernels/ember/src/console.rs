//! The serial console: the 8250 UART's transmit register at [`SERIAL_PORT`].
//!
//! The VMMs we run on emulate a UART whose transmitter is always ready, so
//! bytes are written without polling the line status register (each poll
//! would cost an exit). Every byte is one exit (~25 µs on our KVM; string
//! I/O is no cheaper there): the console is for the boot marker and crash
//! reports, not for chatter.

use ember_abi::SERIAL_PORT;

use crate::io::outb;

/// Writes `bytes` to the console.
pub fn write_bytes(bytes: &[u8]) {
    for &byte in bytes {
        outb(SERIAL_PORT, byte);
    }
}

/// Writes `text` to the console.
pub fn write_str(text: &str) {
    write_bytes(text.as_bytes());
}
