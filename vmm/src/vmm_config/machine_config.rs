//! `PUT /machine-config`: vCPUs and memory.

use serde::{Deserialize, Serialize};

/// Most vCPUs a microVM may have.
pub const MAX_VCPUS: u8 = 32;

/// Smallest guest memory: the image at 1 MiB, a heap, and the 16 MiB
/// mailbox at the top.
pub const MIN_MEM_MIB: usize = 32;

/// Largest guest memory: RAM is one range from 0 and stops below the 32-bit
/// MMIO hole (the IOAPIC at 0xfec00000, the LAPIC at 0xfee00000, and room
/// for devices), which also keeps it inside the 4 GiB the guest maps.
pub const MAX_MEM_MIB: usize = 3072;

/// The body of `PUT /machine-config` and `GET /machine-config`, as
/// Firecracker defines it. Optional fields Ember does not implement are
/// accepted only with their neutral value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (1–32). vCPU 0 runs the guest; the others stay
    /// parked (not started by the guest).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading: only `false`.
    #[serde(default)]
    pub smt: bool,
    /// Track dirty pages (for Diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// CPU template: only `"None"` (Ember passes KVM's supported CPUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages: only `"None"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    /// Firecracker's default: 1 vCPU, 128 MiB.
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// Why a machine configuration was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum MachineConfigError {
    /// vcpu_count must be between 1 and {max} (got {got})
    VcpuCount {
        /// What was asked.
        got: u8,
        /// The limit.
        max: u8,
    },
    /// mem_size_mib must be at least {min} (got {got})
    MemTooSmall {
        /// What was asked.
        got: usize,
        /// The limit.
        min: usize,
    },
    /// mem_size_mib {got} exceeds this host's memory ({host} MiB)
    MemAboveHost {
        /// What was asked.
        got: usize,
        /// The host's total memory.
        host: usize,
    },
    /// mem_size_mib {got} exceeds ember-vmm's maximum of {max} MiB (guest RAM ends below the 32-bit MMIO hole)
    MemAboveMax {
        /// What was asked.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// smt is not supported: each vCPU is a separate core
    SmtUnsupported,
    /// cpu_template {0:?} is not supported: ember-vmm passes KVM's supported CPUID
    CpuTemplateUnsupported(String),
    /// huge_pages {0:?} is not supported
    HugePagesUnsupported(String),
}

impl MachineConfig {
    /// Checks the configuration against the limits and this host's memory
    /// (`host_mem_mib`).
    pub fn validate(&self, host_mem_mib: usize) -> Result<(), MachineConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(MachineConfigError::VcpuCount {
                got: self.vcpu_count,
                max: MAX_VCPUS,
            });
        }
        if self.mem_size_mib < MIN_MEM_MIB {
            return Err(MachineConfigError::MemTooSmall {
                got: self.mem_size_mib,
                min: MIN_MEM_MIB,
            });
        }
        if self.mem_size_mib > host_mem_mib {
            return Err(MachineConfigError::MemAboveHost {
                got: self.mem_size_mib,
                host: host_mem_mib,
            });
        }
        if self.mem_size_mib > MAX_MEM_MIB {
            return Err(MachineConfigError::MemAboveMax {
                got: self.mem_size_mib,
                max: MAX_MEM_MIB,
            });
        }
        if self.smt {
            return Err(MachineConfigError::SmtUnsupported);
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => {}
            Some(other) => return Err(MachineConfigError::CpuTemplateUnsupported(other.into())),
        }
        match self.huge_pages.as_deref() {
            None | Some("None") => {}
            Some(other) => return Err(MachineConfigError::HugePagesUnsupported(other.into())),
        }
        Ok(())
    }
}

/// This host's total memory in MiB.
pub fn host_memory_mib() -> std::io::Result<usize> {
    // SAFETY: sysinfo only fills the struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let bytes = (info.totalram as u128) * u128::from(info.mem_unit.max(1));
    Ok((bytes >> 20) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vcpus: u8, mib: usize) -> MachineConfig {
        MachineConfig {
            vcpu_count: vcpus,
            mem_size_mib: mib,
            ..MachineConfig::default()
        }
    }

    #[test]
    fn accepts_sane_configs() {
        assert_eq!(MachineConfig::default().validate(1024), Ok(()));
        assert_eq!(config(2, 512).validate(24_000), Ok(()));
        assert_eq!(config(MAX_VCPUS, MAX_MEM_MIB).validate(1 << 20), Ok(()));
    }

    #[test]
    fn refuses_each_bad_field_by_name() {
        assert_eq!(
            config(0, 128).validate(1024).unwrap_err().to_string(),
            "vcpu_count must be between 1 and 32 (got 0)"
        );
        assert_eq!(
            config(1, 0).validate(1024).unwrap_err().to_string(),
            "mem_size_mib must be at least 32 (got 0)"
        );
        assert_eq!(
            config(1, 2048).validate(1024).unwrap_err().to_string(),
            "mem_size_mib 2048 exceeds this host's memory (1024 MiB)"
        );
        assert!(matches!(
            config(1, 8192).validate(1 << 20),
            Err(MachineConfigError::MemAboveMax { .. })
        ));
        let mut smt = config(1, 128);
        smt.smt = true;
        assert_eq!(smt.validate(1024), Err(MachineConfigError::SmtUnsupported));
        let mut template = config(1, 128);
        template.cpu_template = Some("T2".into());
        assert!(template.validate(1024).is_err());
        template.cpu_template = Some("None".into());
        assert_eq!(template.validate(1024), Ok(()));
    }

    #[test]
    fn parses_firecracker_json() {
        let parsed: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#)
                .unwrap();
        assert_eq!(parsed, config(2, 256));
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 1}"#).is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 1, "mem_size_mib": 1, "x": 1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 300, "mem_size_mib": 128}"#
        )
        .is_err());
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_mib().unwrap() > 0);
    }
}
