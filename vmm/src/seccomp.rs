//! Seccomp: one filter per thread kind, compiled at build time.
//!
//! The policy is data: vmm/seccomp/x86_64.json, one section per thread kind,
//! a comment on every rule. build.rs compiles it with seccompiler and this
//! module embeds the BPF. Each thread installs its own filter before it does
//! its real work: the vCPU threads before their first KVM_RUN, the VMM
//! thread (which also serves the control socket) once the microVM is built
//! and before any vCPU runs guest code.
//!
//! A system call outside the filter raises SIGSYS; [`install_sigsys_handler`]
//! reports which thread made which call on stderr and ends the process with
//! [`ExitCode::BadSyscall`] (148, as Firecracker does).

use std::cell::Cell;

use seccompiler::{sock_filter, BpfProgram};

use crate::ExitCode;

/// The kinds of thread in an ember-vmm process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM thread: the event loop that owns the VM.
    Vmm,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// The filter's name in the JSON policy.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
        }
    }

    fn bpf_bytes(self) -> &'static [u8] {
        match self {
            ThreadKind::Vmm => include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vmm.bpf")),
            ThreadKind::Vcpu => include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vcpu.bpf")),
        }
    }

    /// The compiled filter for this kind of thread.
    pub fn filter(self) -> BpfProgram {
        self.bpf_bytes()
            .chunks_exact(8)
            .map(|insn| sock_filter {
                code: u16::from_le_bytes([insn[0], insn[1]]),
                jt: insn[2],
                jf: insn[3],
                k: u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]),
            })
            .collect()
    }
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SeccompError {
    /// Cannot install the {kind} seccomp filter: {source}
    Install {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler reported.
        source: seccompiler::Error,
    },
}

thread_local! {
    /// What the SIGSYS handler calls this thread.
    static THREAD_NAME: Cell<&'static str> = const { Cell::new("main") };
}

/// Names the calling thread for reports, and installs `kind`'s filter on it
/// unless `enabled` is false (`--no-seccomp`).
pub fn apply(kind: ThreadKind, label: &'static str, enabled: bool) -> Result<(), SeccompError> {
    THREAD_NAME.with(|name| name.set(label));
    if !enabled {
        return Ok(());
    }
    seccompiler::apply_filter(&kind.filter()).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })
}

/// Names the calling thread for reports without filtering it.
pub fn set_thread_label(label: &'static str) {
    THREAD_NAME.with(|name| name.set(label));
}

/// Installs the SIGSYS handler that turns a filtered system call into a
/// report and exit code 148. Call once, early in `main`.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler has
    // the SA_SIGINFO signature and only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = sigsys_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in `siginfo_t` for SIGSYS on x86_64
/// (`si_signo, si_errno, si_code, pad`, then `_call_addr`, `_syscall`).
const SI_SYSCALL_OFFSET: usize = 24;
/// Offset of `si_call_addr`.
const SI_CALL_ADDR_OFFSET: usize = 16;

extern "C" fn sigsys_handler(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; the fields are
    // read at their documented offsets.
    let (syscall, call_addr) = unsafe {
        let base = info as *const u8;
        (
            std::ptr::read_unaligned(base.add(SI_SYSCALL_OFFSET) as *const i32),
            std::ptr::read_unaligned(base.add(SI_CALL_ADDR_OFFSET) as *const u64),
        )
    };
    let thread = THREAD_NAME.with(|name| name.get());
    let mut buf = [0u8; 256];
    let mut w = ember_abi::ByteWriter::new(&mut buf);
    w.push_str("ember-vmm: seccomp: thread '");
    w.push_str(thread);
    w.push_str("' made system call ");
    w.push_dec(syscall as u64);
    w.push_str(" (");
    w.push_str(syscall_name(syscall));
    w.push_str(") at ");
    w.push_hex(call_addr);
    w.push_str(", which its filter does not allow; exiting with code 148\n");
    let bytes = w.as_bytes();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(ExitCode::BadSyscall.code());
    }
}

/// Names of the system calls a report is likely to show.
fn syscall_name(nr: i32) -> &'static str {
    match i64::from(nr) {
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_execve => "execve",
        libc::SYS_fork => "fork",
        libc::SYS_clone => "clone",
        libc::SYS_clone3 => "clone3",
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_mount => "mount",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_kill => "kill",
        libc::SYS_getpid => "getpid",
        libc::SYS_getrandom => "getrandom",
        libc::SYS_epoll_create1 => "epoll_create1",
        _ => "not named here; see ausyscall",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_is_embedded_and_well_formed() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
            let bytes = kind.bpf_bytes();
            assert_eq!(
                bytes.len() % 8,
                0,
                "{} filter is not whole instructions",
                kind.name()
            );
            let program = kind.filter();
            assert!(
                program.len() > 10,
                "{} filter is implausibly short",
                kind.name()
            );
            // A classic BPF program ends in a return.
            let last = program.last().unwrap();
            assert_eq!(
                last.code & 0x07,
                0x06,
                "{} filter does not end in BPF_RET",
                kind.name()
            );
        }
    }

    #[test]
    fn filters_differ_per_thread_kind() {
        assert_ne!(ThreadKind::Vmm.bpf_bytes(), ThreadKind::Vcpu.bpf_bytes());
    }
}
