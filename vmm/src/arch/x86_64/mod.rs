//! x86-64: the guest-physical layout, the Linux 64-bit boot protocol
//! (boot parameters, long-mode entry state) and CPUID.

pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod regs;
