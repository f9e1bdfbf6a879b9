//! Devices: the legacy PC devices the guest touches (8250 serial, i8042)
//! and the host mailbox. All are port I/O; there is no MMIO device.

pub mod legacy;
pub mod mailbox;

use std::sync::{Arc, Mutex};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use self::legacy::i8042::I8042;
use self::legacy::serial::SerialDevice;

/// A [`Trigger`] that signals an eventfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What the vCPU loop does after a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Run the guest on.
    Continue,
    /// The guest rang the mailbox doorbell: park the vCPU in this exit and
    /// tell the VMM thread.
    Doorbell,
}

/// The port-I/O devices, shared by the vCPU threads.
#[derive(Clone)]
pub struct PioDevices {
    /// COM1 at 0x3f8.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The i8042 controller at 0x60/0x64 (reset only).
    pub i8042: Arc<Mutex<I8042>>,
    /// The mailbox doorbell port, when the guest has a mailbox.
    pub doorbell_port: Option<u16>,
}

/// First port of COM1.
const SERIAL_BASE: u16 = ember_abi::SERIAL_PORT;
/// Ports of COM1.
const SERIAL_PORTS: std::ops::RangeInclusive<u16> = SERIAL_BASE..=SERIAL_BASE + 7;
/// The i8042 data port (0x60); the command port is 0x64.
const I8042_BASE: u16 = 0x60;

impl PioDevices {
    /// Handles an `out` (or string `outs`) of `data` to `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> PioAction {
        if Some(port) == self.doorbell_port {
            // The guest waits now; let its console catch up.
            lock(&self.serial).flush_console();
            return PioAction::Doorbell;
        }
        if SERIAL_PORTS.contains(&port) {
            let mut serial = lock(&self.serial);
            for &byte in data {
                serial.write((port - SERIAL_BASE) as u8, byte);
            }
        } else if port == I8042_BASE || port == ember_abi::I8042_COMMAND_PORT {
            if let Some(&byte) = data.first() {
                if let Err(e) = lock(&self.i8042).write((port - I8042_BASE) as u8, byte) {
                    log::error!("cannot signal the i8042 reset: {e}");
                }
            }
        }
        // Writes to other ports are ignored, as on a PC with nothing there.
        PioAction::Continue
    }

    /// Handles an `in` from `port`, filling `data`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        if SERIAL_PORTS.contains(&port) {
            let mut serial = lock(&self.serial);
            for byte in data.iter_mut() {
                *byte = serial.read((port - SERIAL_BASE) as u8);
            }
        } else if port == I8042_BASE || port == ember_abi::I8042_COMMAND_PORT {
            let value = lock(&self.i8042).read((port - I8042_BASE) as u8);
            data.fill(value);
        } else {
            // Nothing there: the bus floats high.
            data.fill(0xff);
        }
    }
}

/// Locks a device, recovering it if a thread panicked while holding it
/// (the device state is plain data and stays usable).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
