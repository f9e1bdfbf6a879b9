//! The KVM handle and what it tells about this host.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Errors opening KVM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KvmError {
    /// Cannot open /dev/kvm: {0}
    Open(kvm_ioctls::Error),
    /// KVM API version {0} is not the stable version 12
    ApiVersion(i32),
    /// KVM lacks a capability ember-vmm needs: {0:?}
    MissingCap(Cap),
    /// Cannot read KVM's supported CPUID: {0}
    SupportedCpuid(kvm_ioctls::Error),
    /// The thread reading KVM's supported CPUID panicked
    CpuidThread,
}

/// `/dev/kvm` and the host facts read from it once.
pub struct KvmContext {
    /// The open `/dev/kvm`.
    pub kvm: Kvm,
    /// KVM_GET_SUPPORTED_CPUID: the CPUID every vCPU starts from.
    pub supported_cpuid: CpuId,
}

/// Capabilities ember-vmm relies on.
const REQUIRED_CAPS: [Cap; 4] = [
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::ImmediateExit,
    Cap::Irqfd,
];

impl KvmContext {
    /// Opens `/dev/kvm`, checks it, and takes the supported CPUID from
    /// `cpuid` (started earlier, see [`CpuidPrefetch`]).
    pub fn new(cpuid: CpuidPrefetch) -> Result<KvmContext, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(version));
        }
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(cap));
            }
        }
        let supported_cpuid = cpuid.wait()?;
        Ok(KvmContext {
            kvm,
            supported_cpuid,
        })
    }
}

/// KVM_GET_SUPPORTED_CPUID, read on a helper thread.
///
/// On our nested KVM every CPUID the host kernel executes traps to the
/// outer hypervisor, and the ioctl takes 0.3–0.5 ms — more than creating
/// the VM. Started at process start, it overlaps everything before the
/// first KVM_SET_CPUID2. The thread ends before any guest code runs (the
/// builder waits for it), so it needs no seccomp filter of its own.
pub struct CpuidPrefetch(Option<std::thread::JoinHandle<Result<CpuId, KvmError>>>);

impl CpuidPrefetch {
    /// Starts reading the supported CPUID (or, if no thread can be
    /// started, leaves it to [`CpuidPrefetch::wait`]).
    pub fn start() -> CpuidPrefetch {
        let thread = std::thread::Builder::new()
            .name("ember_cpuid".into())
            .spawn(read_supported_cpuid);
        CpuidPrefetch(thread.ok())
    }

    /// The supported CPUID, once read.
    pub fn wait(self) -> Result<CpuId, KvmError> {
        match self.0 {
            Some(thread) => thread.join().unwrap_or(Err(KvmError::CpuidThread)),
            None => read_supported_cpuid(),
        }
    }
}

fn read_supported_cpuid() -> Result<CpuId, KvmError> {
    Kvm::new()
        .map_err(KvmError::Open)?
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::SupportedCpuid)
}
