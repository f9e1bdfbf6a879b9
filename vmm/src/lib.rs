//! ember-vmm: a minimal virtual machine monitor on KVM for the Ember guest.
//!
//! One process runs one microVM. Three kinds of thread, each under its own
//! seccomp filter: the VMM thread (this crate's [`vmm::Vmm`], an
//! event-manager epoll loop that owns the VM, the host side of the mailbox
//! and the Firecracker-compatible control socket, [`api`]), one thread per
//! vCPU ([`vstate::vcpu`]) and, for a restore, the thread that populates
//! the working set ([`snapshot::memory::Prefetcher`]). Two short-lived
//! helpers (reading the supported CPUID, loading the guest image) end
//! before any guest code runs and need none.
//!
//! How a process ends is its exit code ([`ExitCode`], docs/vmm.md).
#![deny(missing_docs)]

pub mod api;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod files;
pub mod jail;
pub mod logger;
pub mod persist;
pub mod resources;
pub mod rpc_interface;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;
pub mod vmm_config;
pub mod vstate;

/// The version reported by `GET /` and `--version`.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How an ember-vmm process ended. The numbers are stable (docs/vmm.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// The guest shut down (mailbox `shutdown`) or reset itself (i8042).
    Ok = 0,
    /// ember-vmm failed on its own: it could not set up, or an internal error.
    GenericError = 1,
    /// The command line was malformed.
    ArgParsing = 2,
    /// `--config-file` could not be read, parsed or applied.
    BadConfiguration = 3,
    /// The guest took an exception and reported it (crash report in the log).
    GuestCrashed = 10,
    /// The guest triple-faulted: the vCPU shut down without a report.
    GuestTripleFault = 11,
    /// KVM failed or stopped the vCPU (internal error, failed entry, unexpected exit).
    KvmError = 12,
    /// The guest did not answer a request within its deadline; the VM was
    /// stopped (it is never reused).
    GuestUnresponsive = 13,
    /// The kernel killed the VMM at its cgroup's memory limit (the
    /// jail's keeper reports it: docs/security.md).
    MemoryLimit = 14,
    /// A thread made a system call outside its seccomp filter.
    BadSyscall = 148,
}

impl ExitCode {
    /// The numeric process exit code.
    pub fn code(self) -> i32 {
        self as i32
    }
}
