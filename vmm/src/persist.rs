//! What a snapshot holds ([`MicrovmState`]) and the checks a state must
//! pass before a restore touches anything.
//!
//! The state file is a [`crate::snapshot`] container around a postcard
//! encoding of [`MicrovmState`]; guest memory lives in memory files
//! ([`crate::snapshot::memory`]). docs/snapshot-format.md describes both.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::SerialDeviceState;
use crate::devices::mailbox::MailboxState;
use crate::snapshot::memory::{self, MemoryLayer, SnapshotId};
use crate::snapshot::{self, SnapshotFileError, STATE_MAGIC};
use crate::vmm_config::machine_config::{MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Full: all of guest memory. Diff: the pages written since the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SnapshotType {
    /// All of guest memory (sparse).
    #[default]
    Full,
    /// A layer over the parent snapshot's memory.
    Diff,
}

/// Everything a snapshot saves besides guest memory's contents.
#[derive(Serialize, Deserialize)]
pub struct MicrovmState {
    /// The ember-vmm version that wrote it (informational: the container
    /// version decides compatibility).
    pub vmm_version: String,
    /// This snapshot's id (also in its memory file's trailer).
    pub id: SnapshotId,
    /// Full or Diff.
    pub snapshot_type: SnapshotType,
    /// vCPUs.
    pub vcpu_count: u8,
    /// Guest memory, MiB.
    pub mem_size_mib: usize,
    /// KVM's supported CPUID on the host that took the snapshot: a host
    /// restores it only if its KVM supports every feature in it (a vCPU's
    /// own CPUID is no guide: some KVMs, ours among them, report the
    /// host's bits there whatever was set).
    pub host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// The memory files guest memory is made of, oldest first; the last is
    /// this snapshot's own.
    pub memory: Vec<MemoryLayer>,
    /// Interrupt controllers and clock.
    pub vm: VmState,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DevicesState,
    /// The host side of the guest's session.
    pub guest: GuestSessionState,
}

/// Every device's state, each through [`crate::snapshot::Persist`].
#[derive(Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialDeviceState,
    /// The i8042.
    pub i8042: I8042State,
    /// The mailbox, if the guest has one.
    pub mailbox: Option<MailboxState>,
}

/// What the VMM knows about the guest's session that guest memory does
/// not say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSessionState {
    /// The next request's sequence number.
    pub next_seq: u64,
    /// The loaded function's time limit, ms (none loaded: `None`).
    pub function_timeout_ms: Option<u64>,
    /// The guest's `ready` payload (a [`ember_abi::mailbox::GuestInfo`]).
    pub guest_info: Option<Vec<u8>>,
    /// The restore generation the guest has seen (0: never restored).
    pub generation: u64,
    /// Requests the guest answered.
    pub requests: u64,
}

/// Why a snapshot cannot be restored here.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum StateError {
    /// {0}
    File(#[from] SnapshotFileError),
    /// snapshot state is inconsistent: {0}
    Inconsistent(String),
}

/// Guest memory sizes ember-vmm accepts, MiB (as machine-config does).
const MEM_MIB: std::ops::RangeInclusive<usize> = MIN_MEM_MIB..=MAX_MEM_MIB;

/// CPUID entries a vCPU may carry (KVM_MAX_CPUID_ENTRIES).
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// MSRs a vCPU state may carry (KVM lists a few hundred at most).
const MAX_MSRS: usize = 2048;

/// Mappings a restore may make: far below the kernel's default
/// vm.max_map_count (65530), and far above what a sane chain of Diffs
/// needs.
pub const MAX_RESTORE_RUNS: usize = 8192;

impl MicrovmState {
    /// Reads and checks the state file at `path`: container (magic,
    /// version, length, checksum), then the state's own consistency.
    pub fn read(path: &Path) -> Result<MicrovmState, StateError> {
        let bytes = snapshot::read_file(path, "snapshot state file")?;
        Self::decode(path, &bytes)
    }

    /// Checks and decodes a state file's bytes, as [`MicrovmState::read`]
    /// does (`path` names the file in errors). Fuzzed
    /// (fuzz/fuzz_targets/snapshot_state.rs).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<MicrovmState, StateError> {
        let state: MicrovmState =
            snapshot::decode(STATE_MAGIC, "snapshot state file", path, bytes)?;
        state.check()?;
        Ok(state)
    }

    /// Encodes the state into a container.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotFileError> {
        snapshot::encode(STATE_MAGIC, self)
    }

    fn check(&self) -> Result<(), StateError> {
        let bad = |text: String| Err(StateError::Inconsistent(text));
        if self.vcpu_count == 0
            || self.vcpu_count > MAX_VCPUS
            || self.vcpus.len() != usize::from(self.vcpu_count)
        {
            return bad(format!(
                "{} vCPU states for a VM of {} vCPUs",
                self.vcpus.len(),
                self.vcpu_count
            ));
        }
        if !MEM_MIB.contains(&self.mem_size_mib) {
            return bad(format!(
                "guest memory of {} MiB (ember-vmm runs {} to {} MiB)",
                self.mem_size_mib,
                MEM_MIB.start(),
                MEM_MIB.end()
            ));
        }
        match self.memory.first() {
            Some(first) if first.runs.is_none() => {}
            _ => return bad("its memory does not start with a Full memory file".into()),
        }
        if let Some(layer) = self
            .memory
            .iter()
            .find(|layer| !memory::is_layer_name(&layer.path))
        {
            return bad(format!(
                "it names a memory layer {:?}: a layer is named by a file name in the state file's directory, never a path out of it",
                layer.path
            ));
        }
        if self.memory.iter().skip(1).any(|layer| layer.runs.is_none()) {
            return bad("a Full memory file is layered over another".into());
        }
        if self.restore_runs() > MAX_RESTORE_RUNS {
            return bad(format!(
                "its memory is {} mappings, over the limit of {MAX_RESTORE_RUNS}: take a Full snapshot",
                self.restore_runs()
            ));
        }
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            if vcpu.cpuid.len() > MAX_CPUID_ENTRIES || vcpu.msrs.len() > MAX_MSRS {
                return bad(format!(
                    "vCPU {index} carries {} CPUID entries and {} MSRs (at most {MAX_CPUID_ENTRIES} and {MAX_MSRS})",
                    vcpu.cpuid.len(),
                    vcpu.msrs.len()
                ));
            }
        }
        if let Some(mailbox) = &self.devices.mailbox {
            let mem = (self.mem_size_mib as u64) << 20;
            if mailbox
                .gpa
                .checked_add(mailbox.size)
                .is_none_or(|end| end > mem)
            {
                return bad(format!(
                    "its mailbox at {:#x} (+{:#x}) lies outside {} MiB of memory",
                    mailbox.gpa, mailbox.size, self.mem_size_mib
                ));
            }
        }
        Ok(())
    }

    /// Mapped runs a restore of this snapshot makes.
    pub fn restore_runs(&self) -> usize {
        self.memory
            .iter()
            .fold(0usize, |n, layer| n.saturating_add(layer.run_count()))
    }
}

/// 16 bytes from the kernel's generator.
pub fn random_id() -> std::io::Result<SnapshotId> {
    let mut id = [0u8; 16];
    getrandom_into(&mut id)?;
    Ok(id)
}

/// Fills `buf` from getrandom(2).
pub fn getrandom_into(buf: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: getrandom(2) fills the buffer we own, of the length we pass.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got != buf.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::serial::SerialDeviceState;
    use crate::snapshot::memory::Run;
    use std::path::PathBuf;

    fn vcpu() -> VcpuState {
        VcpuState {
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x8000_0001,
                ..Default::default()
            }],
            tsc_khz: Some(2_000_000),
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rip: 0x1234,
                rax: 7,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            vcpu_events: Default::default(),
            started: true,
            parked: true,
        }
    }

    fn state() -> MicrovmState {
        MicrovmState {
            vmm_version: "test".into(),
            id: [7; 16],
            snapshot_type: SnapshotType::Diff,
            vcpu_count: 1,
            mem_size_mib: 128,
            host_cpuid: vec![Default::default()],
            memory: vec![
                MemoryLayer {
                    path: PathBuf::from("base.mem"),
                    id: [1; 16],
                    file_len: (128 << 20) + 4096,
                    runs: None,
                },
                MemoryLayer {
                    path: PathBuf::from("diff.mem"),
                    id: [7; 16],
                    file_len: 3 * 4096,
                    runs: Some(vec![Run {
                        guest_page: 5,
                        file_page: 0,
                        pages: 2,
                    }]),
                },
            ],
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                clock: kvm_bindings::kvm_clock_data {
                    clock: 42,
                    ..Default::default()
                },
            },
            vcpus: vec![vcpu()],
            devices: DevicesState {
                serial: SerialDeviceState {
                    baud_divisor_low: 12,
                    baud_divisor_high: 0,
                    interrupt_enable: 0,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    in_buffer: vec![1, 2],
                },
                i8042: I8042State {},
                mailbox: Some(MailboxState {
                    gpa: 112 << 20,
                    size: 16 << 20,
                    port: 0xee0,
                }),
            },
            guest: GuestSessionState {
                next_seq: 9,
                function_timeout_ms: Some(3000),
                guest_info: Some(vec![1, 2, 3]),
                generation: 2,
                requests: 8,
            },
        }
    }

    /// save → encode → decode → compare, through the container.
    #[test]
    fn microvm_state_round_trips() {
        let original = state();
        let bytes = original.encode().unwrap();
        let decoded: MicrovmState =
            snapshot::decode(STATE_MAGIC, "state", Path::new("s"), &bytes).unwrap();
        decoded.check().unwrap();
        assert_eq!(decoded.id, original.id);
        assert_eq!(decoded.memory, original.memory);
        assert_eq!(decoded.guest, original.guest);
        assert_eq!(decoded.devices.serial, original.devices.serial);
        assert_eq!(decoded.devices.mailbox, original.devices.mailbox);
        assert_eq!(decoded.vm.clock.clock, 42);
        let (v, w) = (&decoded.vcpus[0], &original.vcpus[0]);
        assert_eq!(v.regs.rip, w.regs.rip);
        assert_eq!(v.regs.rax, w.regs.rax);
        assert_eq!(v.msrs[0].data, 99);
        assert_eq!(v.cpuid[0].ecx, 0x8000_0001);
        assert_eq!(v.tsc_khz, w.tsc_khz);
        assert!(v.parked && v.started);
        assert_eq!(decoded.restore_runs(), 2);
    }

    #[test]
    fn inconsistent_states_are_refused_with_the_reason() {
        let refused = |change: fn(&mut MicrovmState), text: &str| {
            let mut s = state();
            change(&mut s);
            let err = s.check().unwrap_err().to_string();
            assert!(err.contains(text), "{err:?} should name {text:?}");
        };
        refused(|s| s.vcpu_count = 2, "vCPU states");
        refused(|s| s.vcpu_count = 0, "vCPU states");
        refused(|s| s.mem_size_mib = 16, "16 MiB");
        refused(
            |s| s.memory.remove(0).runs.map_or((), drop),
            "Full memory file",
        );
        refused(
            |s| s.memory[1].runs = None,
            "a Full memory file is layered over another",
        );
        // A layer is a file name in the state's own directory: a hostile
        // state cannot make the VMM open (and map) a file elsewhere.
        for name in ["/etc/shadow", "../base.mem", "..", ".", "a/b.mem", ""] {
            let mut s = state();
            s.memory[0].path = PathBuf::from(name);
            let err = s.check().unwrap_err().to_string();
            assert!(err.contains("never a path out of it"), "{name}: {err}");
        }
        refused(
            |s| {
                s.memory[1].runs = Some(vec![
                    Run {
                        guest_page: 0,
                        file_page: 0,
                        pages: 1
                    };
                    MAX_RESTORE_RUNS + 1
                ])
            },
            "mappings",
        );
        refused(
            |s| s.devices.mailbox.as_mut().unwrap().gpa = 127 << 20,
            "outside",
        );
        refused(
            |s| s.vcpus[0].cpuid = vec![Default::default(); MAX_CPUID_ENTRIES + 1],
            "CPUID entries",
        );
    }
}
