//! The KVM handle, the VM file descriptor, and what KVM tells about this host.
//!
//! Nothing here depends on the machine configuration, so ember-vmm does it
//! at process start ([`KvmContext::open`]) rather than on InstanceStart:
//! KVM_CREATE_VM takes 0.25–0.5 ms on our nested KVM and
//! KVM_GET_SUPPORTED_CPUID 0.3–0.9 ms (every CPUID the host kernel runs traps
//! to the outer hypervisor). The CPUID is read on a helper thread so that
//! the two overlap each other and the rest of start-up.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};

/// Errors opening KVM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KvmError {
    /// Cannot open /dev/kvm: {0}
    Open(kvm_ioctls::Error),
    /// /dev/kvm answered KVM_GET_API_VERSION with {0}, not the stable version 12 (is it a KVM device?)
    ApiVersion(i32),
    /// KVM lacks a capability ember-vmm needs: {0:?}
    MissingCap(Cap),
    /// Cannot create the VM: {0}
    CreateVm(kvm_ioctls::Error),
    /// Cannot read KVM's supported CPUID: {0}
    SupportedCpuid(kvm_ioctls::Error),
    /// The thread reading KVM's supported CPUID panicked
    CpuidThread,
}

/// Capabilities ember-vmm relies on.
const REQUIRED_CAPS: [Cap; 4] = [
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::ImmediateExit,
    Cap::Irqfd,
];

/// `/dev/kvm`, a fresh VM (no memory, no irqchip, no vCPUs yet), and the
/// supported CPUID on its way.
pub struct KvmContext {
    /// The open `/dev/kvm`.
    pub kvm: Kvm,
    vm_fd: VmFd,
    cpuid: CpuidPrefetch,
}

impl KvmContext {
    /// Starts reading the supported CPUID on a helper thread, opens
    /// `/dev/kvm` (or takes it open: a jailed VMM cannot reach it), checks
    /// it and creates the VM.
    pub fn open(opened: Option<std::os::fd::OwnedFd>) -> Result<KvmContext, KvmError> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let kvm = match opened {
            // SAFETY: an open /dev/kvm whose ownership passes to Kvm.
            Some(fd) => unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) },
            None => Kvm::new().map_err(KvmError::Open)?,
        };
        let cpuid = CpuidPrefetch::start(&kvm);
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(version));
        }
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(cap));
            }
        }
        let vm_fd = kvm.create_vm().map_err(KvmError::CreateVm)?;
        Ok(KvmContext { kvm, vm_fd, cpuid })
    }

    /// Another descriptor of `/dev/kvm`, for a context made later (after a
    /// failed start: a jailed VMM cannot open `/dev/kvm` again, nor may its
    /// seccomp filter open anything read-write).
    pub fn dup_kvm(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) of an open descriptor.
        let fd = unsafe { libc::fcntl(self.kvm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        // SAFETY: a fresh descriptor owned from here.
        (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// The VM, and the supported CPUID once read (this waits for the helper).
    pub fn into_parts(self) -> Result<(Kvm, VmFd, CpuId), KvmError> {
        let cpuid = self.cpuid.wait(&self.kvm)?;
        Ok((self.kvm, self.vm_fd, cpuid))
    }
}

/// KVM_GET_SUPPORTED_CPUID, read on a helper thread. The thread ends before
/// any guest code runs (the builder waits for it), so it needs no seccomp
/// filter of its own.
struct CpuidPrefetch(Option<std::thread::JoinHandle<Result<CpuId, KvmError>>>);

impl CpuidPrefetch {
    /// Starts reading on a descriptor of its own (or, if none can be had
    /// or no thread started, leaves it to `wait`).
    fn start(kvm: &Kvm) -> CpuidPrefetch {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: dup(2) of an open descriptor; the copy is owned by the
        // thread's Kvm.
        let fd = unsafe { libc::fcntl(kvm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return CpuidPrefetch(None);
        }
        // SAFETY: a fresh descriptor of /dev/kvm.
        let own = unsafe { Kvm::from_raw_fd(fd) };
        let thread = std::thread::Builder::new()
            .name("ember_cpuid".into())
            .spawn(move || read_supported_cpuid(&own));
        CpuidPrefetch(thread.ok())
    }

    /// The supported CPUID, once read.
    fn wait(self, kvm: &Kvm) -> Result<CpuId, KvmError> {
        match self.0 {
            Some(thread) => thread.join().unwrap_or(Err(KvmError::CpuidThread)),
            None => read_supported_cpuid(kvm),
        }
    }
}

fn read_supported_cpuid(kvm: &Kvm) -> Result<CpuId, KvmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::SupportedCpuid)
}
