//! The Ember guest kernel.
//!
//! A few dozen instructions of ring-0 setup ([`boot`]), then everything runs
//! in ring 3 with IOPL 3: our KVM emulates ring-0 code thousands of times slower than it
//! runs ring-3 code (docs/platform.md). Ring 0 is entered again only to
//! report an exception ([`exceptions`]) or to park the vCPU.
//!
//! No timer, no scheduler, no interrupts, no page-table changes after boot.
//! The runtime (guest/) provides `ember_main(boot_params: u64) -> !`, called
//! in ring 3 with the boot parameters' guest-physical address.
#![no_std]

pub mod boot;
pub mod console;
mod crash;
pub mod exceptions;
pub mod io;
pub mod layout;
pub mod mailbox;

pub use exceptions::park;
