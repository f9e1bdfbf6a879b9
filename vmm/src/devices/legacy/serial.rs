//! COM1: vm-superio's 8250 UART, writing the guest's console to stdout or
//! a file (`--serial-out`). The guest never enables UART interrupts; the
//! interrupt line is still wired (IRQ 4 through an irqfd) as on a PC.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::devices::EventFdTrigger;

/// Where the guest's console goes, and how much of it: past `limit`
/// bytes (counted over the process's life, from the file's length when it
/// was opened) the output is dropped, after one line saying so. The guest
/// writes its console; a guest that floods it must not fill the host's
/// disk.
pub struct ConsoleSink {
    target: ConsoleTarget,
    limit: u64,
    counts: Arc<ConsoleCounts>,
}

/// The output itself.
enum ConsoleTarget {
    Stdout,
    File(File),
}

/// Shared by every handle on one console.
#[derive(Default)]
struct ConsoleCounts {
    written: AtomicU64,
    dropped: AtomicU64,
}

/// Console bytes a VMM writes by default before it drops the rest.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 4 << 20;

impl ConsoleSink {
    /// The VMM's standard output, `limit` bytes at most.
    pub fn stdout(limit: u64) -> Self {
        ConsoleSink {
            target: ConsoleTarget::Stdout,
            limit,
            counts: Arc::default(),
        }
    }

    /// `file` (opened for appending), up to `limit` bytes long.
    pub fn file(file: File, limit: u64) -> Self {
        let counts = ConsoleCounts::default();
        counts
            .written
            .store(file.metadata().map_or(0, |m| m.len()), Ordering::Relaxed);
        ConsoleSink {
            target: ConsoleTarget::File(file),
            limit,
            counts: Arc::new(counts),
        }
    }

    /// Another handle on the same output (sharing its count).
    pub fn try_clone(&self) -> io::Result<ConsoleSink> {
        Ok(ConsoleSink {
            target: match &self.target {
                ConsoleTarget::Stdout => ConsoleTarget::Stdout,
                ConsoleTarget::File(file) => ConsoleTarget::File(file.try_clone()?),
            },
            limit: self.limit,
            counts: self.counts.clone(),
        })
    }

    /// Bytes dropped past the limit.
    pub fn dropped_bytes(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.target {
            ConsoleTarget::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            ConsoleTarget::File(file) => file.write_all(bytes),
        }
    }

    /// Writes what fits under the limit, drops the rest (saying so once).
    fn write_capped(&mut self, bytes: &[u8]) -> io::Result<()> {
        let written = self.counts.written.load(Ordering::Relaxed);
        let room = self.limit.saturating_sub(written);
        let take = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.counts
            .written
            .fetch_add(take as u64, Ordering::Relaxed);
        let result = if take > 0 {
            self.write_all(&bytes[..take])
        } else {
            Ok(())
        };
        if take < bytes.len() {
            let dropped_before = self
                .counts
                .dropped
                .fetch_add((bytes.len() - take) as u64, Ordering::Relaxed);
            if dropped_before == 0 {
                let note = format!(
                    "\n[ember-vmm: the console reached its limit of {} bytes; the rest is dropped]\n",
                    self.limit
                );
                self.write_all(note.as_bytes())?;
            }
        }
        result
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
        let result = self.sink.write_capped(&self.pending);
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

/// The UART's registers and receive FIFO, and the console counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// Why a serial state could not be restored.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SerialRestoreError {
    /// the saved UART receive FIFO holds {0} bytes, more than a UART has
    FifoTooLong(usize),
}

impl<'a> crate::snapshot::Persist<'a> for SerialDevice {
    type State = SerialDeviceState;
    /// The interrupt line and the console, which are not in the file.
    type ConstructorArgs = (EventFdTrigger, ConsoleOutput);
    type Error = SerialRestoreError;

    fn save(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(
        (interrupt, output): (EventFdTrigger, ConsoleOutput),
        state: &SerialDeviceState,
    ) -> Result<Self, SerialRestoreError> {
        let uart_state = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&uart_state, interrupt, NoEvents, output)
            .map_err(|_| SerialRestoreError::FifoTooLong(state.in_buffer.len()))?;
        Ok(SerialDevice {
            uart,
            lost_bytes: 0,
            input_bytes: 0,
            dropped_input_bytes: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Persist;
    use vmm_sys_util::eventfd::EventFd;

    fn device() -> SerialDevice {
        SerialDevice::new(
            EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            ConsoleOutput::new(ConsoleSink::file(
                std::fs::File::create("/dev/null").unwrap(),
                DEFAULT_CONSOLE_LIMIT,
            )),
        )
    }

    #[test]
    fn serial_state_round_trips_through_postcard() {
        let mut uart = device();
        uart.write(3, 0x83); // DLAB on
        uart.write(0, 0x0c); // divisor low
        uart.write(3, 0x03); // 8N1, DLAB off
        uart.write(7, 0x5a); // scratch
        uart.receive(b"hi");
        let state = uart.save();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let decoded: SerialDeviceState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);
        let args = (
            EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            ConsoleOutput::new(ConsoleSink::file(
                std::fs::File::create("/dev/null").unwrap(),
                DEFAULT_CONSOLE_LIMIT,
            )),
        );
        let mut restored = SerialDevice::restore(args, &decoded).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored.read(7), 0x5a);
        assert_eq!(restored.read(0), b'h');
        let mut too_long = state.clone();
        too_long.in_buffer = vec![0; 65];
        let args = (
            EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            ConsoleOutput::new(ConsoleSink::file(
                std::fs::File::create("/dev/null").unwrap(),
                DEFAULT_CONSOLE_LIMIT,
            )),
        );
        assert!(SerialDevice::restore(args, &too_long).is_err());
    }

    #[test]
    fn console_output_stops_at_its_limit_with_one_note_and_counts_the_rest() {
        let dir = std::env::temp_dir().join(format!("ember-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console");
        std::fs::write(&path, b"earlier\n").unwrap();
        let open = || {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap()
        };
        // The file's 8 bytes count: 24 more fit under a limit of 32.
        let sink = ConsoleSink::file(open(), 32);
        let mut first = ConsoleOutput::new(sink.try_clone().unwrap());
        first.write_all(b"0123456789\n").unwrap();
        assert_eq!(sink.dropped_bytes(), 0);
        // A second handle (a VM built again) shares the count.
        let mut second = ConsoleOutput::new(sink.try_clone().unwrap());
        second.write_all(b"abcdefghijklmnopqrstuvwxyz\n").unwrap();
        assert_eq!(sink.dropped_bytes(), 27 - 13);
        for _ in 0..1000 {
            second.write_all(b"flood\n").unwrap();
        }
        first.flush_pending().unwrap();
        assert_eq!(sink.dropped_bytes(), 27 - 13 + 6000);
        let text = std::fs::read_to_string(&path).unwrap();
        let note =
            "\n[ember-vmm: the console reached its limit of 32 bytes; the rest is dropped]\n";
        assert_eq!(text, format!("earlier\n0123456789\nabcdefghijklm{note}"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
