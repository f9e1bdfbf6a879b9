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
    /// Opens `/dev/kvm` and checks it.
    pub fn new() -> Result<KvmContext, KvmError> {
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
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        Ok(KvmContext {
            kvm,
            supported_cpuid,
        })
    }
}
