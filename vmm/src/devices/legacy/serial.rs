//! COM1: vm-superio's 8250 UART, writing the guest's console to stdout or
//! a file (`--serial-out`). The guest never enables UART interrupts; the
//! interrupt line is still wired (IRQ 4 through an irqfd) as on a PC.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::devices::{lock, EventFdTrigger};

/// Where the guest's console goes.
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout(io::Stdout),
    /// A file (`--serial-out`).
    File(File),
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOutput::Stdout(out) => out.write(buf),
            ConsoleOutput::File(file) => file.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleOutput::Stdout(out) => out.flush(),
            ConsoleOutput::File(file) => file.flush(),
        }
    }
}

/// The UART and where it writes.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleOutput>,
    /// Bytes the output refused (a closed stdout, a full disk).
    pub lost_bytes: u64,
}

impl SerialDevice {
    /// A UART raising `interrupt` and writing to `output`.
    pub fn new(interrupt: EventFdTrigger, output: ConsoleOutput) -> Self {
        SerialDevice {
            uart: Serial::new(interrupt, output),
            lost_bytes: 0,
        }
    }

    /// A guest write to register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        if self.uart.write(offset, value).is_err() {
            // The guest must not stall on a broken console; count and go on.
            self.lost_bytes += 1;
        }
    }

    /// A guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }
}

/// Bytes the console lost so far (for `GET /ember/status`).
pub fn lost_bytes(serial: &std::sync::Mutex<SerialDevice>) -> u64 {
    lock(serial).lost_bytes
}
