//! The i8042 keyboard controller, only for its reset line: a guest that
//! writes 0xfe to port 0x64 ends the VMM cleanly (exit code 0).

use vmm_sys_util::eventfd::EventFd;

use super::super::EventFdTrigger;

/// vm-superio's i8042, which signals an eventfd on reset.
pub type I8042 = vm_superio::I8042Device<EventFdTrigger>;

/// An i8042 whose reset signals `reset_evt` (watched by the VMM thread).
pub fn new(reset_evt: EventFd) -> I8042 {
    vm_superio::I8042Device::new(EventFdTrigger(reset_evt))
}
