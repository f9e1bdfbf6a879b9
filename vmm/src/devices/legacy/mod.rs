//! Legacy PC devices, wrapping vm-superio.

pub mod i8042;
pub mod serial;
