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
    /// The thread that populates a restored VM's working set.
    Prefetch,
    /// The VMM thread from before its first API request until the VM is
    /// built (the union of the others and what building needs; the `vmm`
    /// filter then narrows it).
    VmmSetup,
}

impl ThreadKind {
    /// The filter's name in the JSON policy.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Prefetch => "prefetch",
            ThreadKind::VmmSetup => "vmm_setup",
        }
    }

    fn bpf_bytes(self) -> &'static [u8] {
        match self {
            ThreadKind::Vmm => include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vmm.bpf")),
            ThreadKind::Vcpu => include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vcpu.bpf")),
            ThreadKind::Prefetch => {
                include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_prefetch.bpf"))
            }
            ThreadKind::VmmSetup => {
                include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vmm_setup.bpf"))
            }
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
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Vcpu,
            ThreadKind::Prefetch,
            ThreadKind::VmmSetup,
        ] {
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

    /// The KVM ioctl numbers written into the policy, recomputed from the
    /// structures' sizes in kvm-bindings.
    #[test]
    fn kvm_ioctl_numbers_in_the_policy_match_the_structs() {
        use kvm_bindings::*;
        use std::mem::size_of;
        const NONE: u64 = 0;
        const W: u64 = 1;
        const R: u64 = 2;
        const RW: u64 = 3;
        let ioc =
            |dir: u64, nr: u64, size: usize| (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr;
        let expected = [
            ("KVM_RUN", ioc(NONE, 0x80, 0)),
            ("KVM_GET_REGS", ioc(R, 0x81, size_of::<kvm_regs>())),
            ("KVM_SET_REGS", ioc(W, 0x82, size_of::<kvm_regs>())),
            ("KVM_GET_SREGS", ioc(R, 0x83, size_of::<kvm_sregs>())),
            ("KVM_SET_SREGS", ioc(W, 0x84, size_of::<kvm_sregs>())),
            ("KVM_GET_MSRS", ioc(RW, 0x88, size_of::<kvm_msrs>())),
            ("KVM_SET_MSRS", ioc(W, 0x89, size_of::<kvm_msrs>())),
            ("KVM_GET_LAPIC", ioc(R, 0x8e, size_of::<kvm_lapic_state>())),
            ("KVM_SET_LAPIC", ioc(W, 0x8f, size_of::<kvm_lapic_state>())),
            ("KVM_SET_CPUID2", ioc(W, 0x90, size_of::<kvm_cpuid2>())),
            ("KVM_GET_CPUID2", ioc(RW, 0x91, size_of::<kvm_cpuid2>())),
            ("KVM_GET_MP_STATE", ioc(R, 0x98, size_of::<kvm_mp_state>())),
            ("KVM_SET_MP_STATE", ioc(W, 0x99, size_of::<kvm_mp_state>())),
            (
                "KVM_SET_GUEST_DEBUG",
                ioc(W, 0x9b, size_of::<kvm_guest_debug>()),
            ),
            (
                "KVM_GET_VCPU_EVENTS",
                ioc(R, 0x9f, size_of::<kvm_vcpu_events>()),
            ),
            (
                "KVM_SET_VCPU_EVENTS",
                ioc(W, 0xa0, size_of::<kvm_vcpu_events>()),
            ),
            (
                "KVM_GET_DEBUGREGS",
                ioc(R, 0xa1, size_of::<kvm_debugregs>()),
            ),
            (
                "KVM_SET_DEBUGREGS",
                ioc(W, 0xa2, size_of::<kvm_debugregs>()),
            ),
            ("KVM_GET_XSAVE", ioc(R, 0xa4, size_of::<kvm_xsave>())),
            ("KVM_SET_XSAVE", ioc(W, 0xa5, size_of::<kvm_xsave>())),
            ("KVM_GET_XCRS", ioc(R, 0xa6, size_of::<kvm_xcrs>())),
            ("KVM_SET_XCRS", ioc(W, 0xa7, size_of::<kvm_xcrs>())),
            ("KVM_SET_TSC_KHZ", ioc(NONE, 0xa2, 0)),
            ("KVM_GET_TSC_KHZ", ioc(NONE, 0xa3, 0)),
            ("KVM_GET_IRQCHIP", ioc(RW, 0x62, size_of::<kvm_irqchip>())),
            ("KVM_SET_IRQCHIP", ioc(R, 0x63, size_of::<kvm_irqchip>())),
            (
                "KVM_GET_DIRTY_LOG",
                ioc(W, 0x42, size_of::<kvm_dirty_log>()),
            ),
            (
                "KVM_SET_USER_MEMORY_REGION",
                ioc(W, 0x46, size_of::<kvm_userspace_memory_region>()),
            ),
            ("KVM_SET_CLOCK", ioc(W, 0x7b, size_of::<kvm_clock_data>())),
            ("KVM_GET_CLOCK", ioc(R, 0x7c, size_of::<kvm_clock_data>())),
        ];
        let policy: serde_json::Value =
            serde_json::from_str(include_str!("../seccomp/x86_64.json")).unwrap();
        let mut seen = 0;
        for kind in ["vmm", "vcpu"] {
            for rule in policy[kind]["filter"].as_array().unwrap() {
                if rule["syscall"] != "ioctl" {
                    continue;
                }
                let arg = &rule["args"][0];
                let name = arg["comment"].as_str().unwrap();
                if let Some((_, value)) = expected.iter().find(|(n, _)| *n == name) {
                    assert_eq!(arg["val"].as_u64().unwrap(), *value, "{kind}: {name}");
                    seen += 1;
                }
            }
        }
        assert_eq!(
            seen,
            expected.len(),
            "every KVM ioctl named above is in the policy once"
        );
    }

    /// Runs `call` in a child process under `kind`'s filter: whether the
    /// child was killed by SIGSYS (the filter refused the call).
    fn refused(kind: ThreadKind, call: fn() -> i64) -> bool {
        let filter = kind.filter();
        // SAFETY: the child only installs the prepared filter, makes the
        // call and _exits; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if seccompiler::apply_filter(&filter).is_err() {
                    libc::_exit(2);
                }
                call();
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            if libc::WIFEXITED(status) {
                assert_eq!(libc::WEXITSTATUS(status), 0, "the filter did not install");
                false
            } else {
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
            }
        }
    }

    fn mmap_with(prot: i32) -> i64 {
        // SAFETY: an anonymous mapping nobody uses (the child exits).
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as i64
        }
    }

    #[test]
    fn no_filter_lets_a_thread_map_executable_memory() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Vcpu,
            ThreadKind::Prefetch,
            ThreadKind::VmmSetup,
        ] {
            assert!(
                !refused(kind, || mmap_with(libc::PROT_READ | libc::PROT_WRITE)),
                "{}: a plain mapping was refused",
                kind.name()
            );
            assert!(
                refused(kind, || mmap_with(libc::PROT_READ | libc::PROT_EXEC)),
                "{}: an executable mapping was allowed",
                kind.name()
            );
        }
        assert!(refused(ThreadKind::VmmSetup, || {
            // SAFETY: mprotect of no page of ours fails or is refused.
            unsafe { libc::mprotect(std::ptr::null_mut(), 0, libc::PROT_EXEC) as i64 }
        }));
    }

    #[test]
    fn madvise_is_limited_to_the_advice_the_vmm_gives() {
        fn advise(advice: i32) -> i64 {
            // SAFETY: advice on no memory, which fails or is refused.
            unsafe { libc::madvise(std::ptr::null_mut(), 0, advice) as i64 }
        }
        assert!(!refused(ThreadKind::Vmm, || advise(
            libc::MADV_POPULATE_READ
        )));
        assert!(refused(ThreadKind::Vmm, || advise(libc::MADV_DONTFORK)));
        assert!(refused(ThreadKind::Vcpu, || advise(libc::MADV_DONTNEED)));
    }

    #[test]
    fn filters_differ_per_thread_kind() {
        assert_ne!(ThreadKind::Vmm.bpf_bytes(), ThreadKind::Vcpu.bpf_bytes());
        assert_ne!(
            ThreadKind::Vcpu.bpf_bytes(),
            ThreadKind::Prefetch.bpf_bytes()
        );
    }
}
