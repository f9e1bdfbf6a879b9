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

/// The i8042 keeps no state worth saving (vm-superio's device holds only
/// its reset line); it still goes through [`crate::snapshot::Persist`] like
/// every device, so that a future state has its place in the format.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {}

impl<'a> crate::snapshot::Persist<'a> for I8042 {
    type State = I8042State;
    /// The reset line (watched by the VMM thread).
    type ConstructorArgs = EventFd;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(reset_evt: EventFd, _: &I8042State) -> Result<Self, std::convert::Infallible> {
        Ok(new(reset_evt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Persist;

    #[test]
    fn i8042_state_round_trips() {
        let device = new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let state = device.save();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let decoded: I8042State = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = I8042::restore(reset.try_clone().unwrap(), &decoded).unwrap();
        // The restored device drives the reset line it was given.
        restored.write(4, 0xfe).unwrap();
        assert_eq!(reset.read().unwrap(), 1);
    }
}
