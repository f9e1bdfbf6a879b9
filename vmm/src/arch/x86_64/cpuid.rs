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

/// A snapshot's CPUID asks for what this host cannot give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum CpuidMismatch {
    /// the snapshot was taken on a {snapshot} CPU, this host is {host}
    Vendor {
        /// Vendor in the snapshot.
        snapshot: String,
        /// This host's vendor.
        host: String,
    },
    /// the snapshot's vCPUs use CPU features this host lacks: CPUID leaf {leaf:#x}.{subleaf} {register} bits {bits:#010x}
    Features {
        /// Leaf.
        leaf: u32,
        /// Subleaf.
        subleaf: u32,
        /// Register name.
        register: &'static str,
        /// Bits set in the snapshot and missing here.
        bits: u32,
    },
}

/// Feature words checked: (leaf, subleaf, register, bits that KVM changes
/// at run time and are not features: OSXSAVE and APIC in leaf 1, OSPKE in
/// leaf 7).
const FEATURE_WORDS: [(u32, u32, &str, u32); 7] = [
    (0x1, 0, "ecx", 1 << 27),
    (0x1, 0, "edx", 1 << 9),
    (0x7, 0, "ebx", 0),
    (0x7, 0, "ecx", 1 << 4),
    (0x7, 0, "edx", 0),
    (0x8000_0001, 0, "ecx", 0),
    (0x8000_0001, 0, "edx", 0),
];

fn register(entry: &kvm_bindings::kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => entry.eax,
        "ebx" => entry.ebx,
        "ecx" => entry.ecx,
        _ => entry.edx,
    }
}

fn find(
    entries: &[kvm_bindings::kvm_cpuid_entry2],
    leaf: u32,
    subleaf: u32,
) -> Option<&kvm_bindings::kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .or_else(|| entries.iter().find(|e| e.function == leaf))
}

fn vendor(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> String {
    find(entries, 0, 0).map_or_else(String::new, |e| {
        let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Whether a snapshot taken where KVM supported CPUID `saved` can run on
/// this host, whose KVM supports `host`: same vendor, and every feature
/// bit offered there is offered here (the guest may already rely on it).
pub fn check_compatible(
    saved: &[kvm_bindings::kvm_cpuid_entry2],
    host: &CpuId,
) -> Result<(), CpuidMismatch> {
    let host = host.as_slice();
    let (snapshot_vendor, host_vendor) = (vendor(saved), vendor(host));
    if snapshot_vendor != host_vendor {
        return Err(CpuidMismatch::Vendor {
            snapshot: snapshot_vendor,
            host: host_vendor,
        });
    }
    for (leaf, subleaf, name, dynamic) in FEATURE_WORDS {
        let Some(wanted) = find(saved, leaf, subleaf) else {
            continue;
        };
        let have = find(host, leaf, subleaf).map_or(0, |e| register(e, name));
        let bits = register(wanted, name) & !have & !dynamic;
        if bits != 0 {
            return Err(CpuidMismatch::Features {
                leaf,
                subleaf,
                register: name,
                bits,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod compat_tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid(vendor: &[u8; 12], leaf7_ebx: u32) -> Vec<kvm_cpuid_entry2> {
        let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        vec![
            kvm_cpuid_entry2 {
                function: 0,
                ebx: word(0),
                edx: word(4),
                ecx: word(8),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: leaf7_ebx,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn same_or_fewer_features_pass_more_fail_and_vendor_must_match() {
        let host = CpuId::from_entries(&cpuid(b"GenuineIntel", 0b1011)).unwrap();
        assert_eq!(
            check_compatible(&cpuid(b"GenuineIntel", 0b1011), &host),
            Ok(())
        );
        assert_eq!(
            check_compatible(&cpuid(b"GenuineIntel", 0b0001), &host),
            Ok(())
        );
        assert_eq!(
            check_compatible(&cpuid(b"GenuineIntel", 0b0111), &host),
            Err(CpuidMismatch::Features {
                leaf: 7,
                subleaf: 0,
                register: "ebx",
                bits: 0b0100
            })
        );
        assert!(matches!(
            check_compatible(&cpuid(b"AuthenticAMD", 0), &host),
            Err(CpuidMismatch::Vendor { .. })
        ));
    }
}
