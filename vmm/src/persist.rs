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
use crate::snapshot::memory::{MemoryLayer, SnapshotId};
use crate::snapshot::{self, SnapshotFileError, STATE_MAGIC};
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
const MEM_MIB: std::ops::RangeInclusive<usize> = 32..=3072;

impl MicrovmState {
    /// Reads and checks the state file at `path`: container (magic,
    /// version, length, checksum), then the state's own consistency.
    pub fn read(path: &Path) -> Result<MicrovmState, StateError> {
        let bytes = snapshot::read_file(path, "snapshot state file")?;
        let state: MicrovmState =
            snapshot::decode(STATE_MAGIC, "snapshot state file", path, &bytes)?;
        state.check()?;
        Ok(state)
    }

    /// Encodes the state into a container.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotFileError> {
        snapshot::encode(STATE_MAGIC, self)
    }

    fn check(&self) -> Result<(), StateError> {
        let bad = |text: String| Err(StateError::Inconsistent(text));
        if self.vcpu_count == 0 || self.vcpus.len() != usize::from(self.vcpu_count) {
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
        self.memory.iter().map(MemoryLayer::run_count).sum()
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
