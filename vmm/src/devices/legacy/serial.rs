//! COM1: vm-superio's 8250 UART, writing the guest's console to stdout or
//! a file (`--serial-out`). The guest never enables UART interrupts; the
//! interrupt line is still wired (IRQ 4 through an irqfd) as on a PC.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::devices::EventFdTrigger;

/// Where the guest's console goes.
pub enum ConsoleSink {
    /// The VMM's standard output.
    Stdout(io::Stdout),
    /// A file (`--serial-out`).
    File(File),
}

impl ConsoleSink {
    /// Another handle on the same output.
    pub fn try_clone(&self) -> io::Result<ConsoleSink> {
        Ok(match self {
            ConsoleSink::Stdout(_) => ConsoleSink::Stdout(io::stdout()),
            ConsoleSink::File(file) => ConsoleSink::File(file.try_clone()?),
        })
    }
}

/// The console output, written a line at a time.
///
/// The UART hands over one byte per guest `out` and flushes after each;
/// each byte costs the guest an exit anyway, but a write(2) per byte would
/// add ~10 µs more to each. Bytes are kept until a newline, 4 KiB, or an
/// explicit [`ConsoleOutput::flush_pending`] (the VMM calls it when the
/// guest rings the mailbox doorbell or stops).
pub struct ConsoleOutput {
    sink: ConsoleSink,
    pending: Vec<u8>,
}

/// Bytes buffered before a write even without a newline.
const CONSOLE_BUFFER: usize = 4096;

impl ConsoleOutput {
    /// Console output to `sink`.
    pub fn new(sink: ConsoleSink) -> Self {
        ConsoleOutput {
            sink,
            pending: Vec::with_capacity(256),
        }
    }

    /// Writes out whatever is buffered.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = match &mut self.sink {
            ConsoleSink::Stdout(out) => out.write_all(&self.pending).and_then(|()| out.flush()),
            ConsoleSink::File(file) => file.write_all(&self.pending),
        };
        self.pending.clear();
        result
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.pending.len() >= CONSOLE_BUFFER {
            self.flush_pending()?;
        }
        Ok(buf.len())
    }

    /// Does nothing: the UART flushes after every byte; lines are written
    /// whole instead (see the type's docs).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART and where it writes.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleOutput>,
    /// Bytes the output refused (a closed stdout, a full disk).
    pub lost_bytes: u64,
    /// Bytes of console input the guest was given.
    pub input_bytes: u64,
    /// Bytes of console input dropped because the receive FIFO was full.
    pub dropped_input_bytes: u64,
}

impl SerialDevice {
    /// A UART raising `interrupt` and writing to `output`.
    pub fn new(interrupt: EventFdTrigger, output: ConsoleOutput) -> Self {
        SerialDevice {
            uart: Serial::new(interrupt, output),
            lost_bytes: 0,
            input_bytes: 0,
            dropped_input_bytes: 0,
        }
    }

    /// A guest write to register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        if self.uart.write(offset, value).is_err() {
            // The guest must not stall on a broken console; count and go on.
            self.lost_bytes += 1;
        }
    }

    /// Console input for the guest: into the receive FIFO (64 bytes), as
    /// much as fits; the rest is dropped, as a UART does.
    pub fn receive(&mut self, bytes: &[u8]) {
        let taken = self.uart.enqueue_raw_bytes(bytes).unwrap_or(0);
        self.input_bytes += taken as u64;
        self.dropped_input_bytes += (bytes.len() - taken) as u64;
    }

    /// Writes out a partial console line.
    pub fn flush_console(&mut self) {
        if self.uart.writer_mut().flush_pending().is_err() {
            self.lost_bytes += 1;
        }
    }

    /// A guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }
}
