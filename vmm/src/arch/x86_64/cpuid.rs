//! CPUID: KVM's supported set, with per-vCPU topology filled in.
//!
//! Ember passes the host's KVM-supported CPUID through (no templates): the
//! guest only uses what every x86-64 CPU has. Each vCPU gets its APIC ID,
//! the vCPU count and the hypervisor bit.

use kvm_bindings::CpuId;

/// Leaf 1, ECX bit 31: running under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;

/// Fills in what differs per vCPU in `cpuid` (a copy of the supported set).
pub fn normalize(cpuid: &mut CpuId, vcpu_index: u8, vcpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(vcpu_index) << 24)
                    | (u32::from(vcpu_count) << 16);
                entry.ecx |= HYPERVISOR_BIT;
            }
            // Extended topology: EDX is the x2APIC ID.
            0xb | 0x1f => entry.edx = u32::from(vcpu_index),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn sets_apic_id_and_count() {
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 7,
                ..Default::default()
            },
        ])
        .unwrap();
        normalize(&mut cpuid, 1, 2);
        let entries = cpuid.as_slice();
        assert_eq!(entries[0].ebx, 0x0102_0800);
        assert_ne!(entries[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(entries[1].edx, 1);
    }
}
