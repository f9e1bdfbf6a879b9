//! `PUT /snapshot/create` and `PUT /snapshot/load`: Firecracker's bodies,
//! plus `ember_prefetch` on load.

use std::path::PathBuf;

use serde::Deserialize;

use crate::persist::SnapshotType;

/// The body of `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    /// `Full` (default) or `Diff`.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the state file goes.
    pub snapshot_path: PathBuf,
    /// Where the memory file (Full) or layer (Diff) goes.
    pub mem_file_path: PathBuf,
    /// Sync the memory file to disk before answering (default true): a
    /// snapshot that exists is then whole after a host crash. Without it
    /// the memory file is left to the page cache, as Firecracker does —
    /// faster for large dirty memory, not crash-safe.
    #[serde(default = "yes")]
    pub ember_sync: bool,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// Only `File` (ember-vmm has no userfaultfd backend).
    pub backend_type: String,
    /// The snapshot's memory file (its newest layer, for a Diff).
    pub backend_path: PathBuf,
}

/// The body of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSnapshotParams {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// Where the memory comes from.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Firecracker's older form of `mem_backend` (a File backend).
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// Run the guest once restored (default: stay paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// Log dirty pages from now on, for Diff snapshots of this VM.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker's older name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Use the snapshot's recorded working set (populate it before the
    /// vCPUs run), or record one on the first invocation if there is none
    /// yet (default true).
    #[serde(default = "yes")]
    pub ember_prefetch: bool,
    /// Populate the working set before answering (for measurements; by
    /// default a helper thread populates it while the answer goes out and
    /// the guest starts).
    #[serde(default)]
    pub ember_prefetch_sync: bool,
    /// With a recorded working set and `resume_vm`: once the load is
    /// answered, ask the guest to touch the working set's pages, so that
    /// the first invocation does not take a fault per page. For a VM
    /// restored ahead of its requests: requests that come meanwhile wait
    /// for the touch, which costs more than the faults it saves (default
    /// false).
    #[serde(default)]
    pub ember_touch: bool,
    /// With a recorded working set and no dirty-page tracking: each 2 MiB
    /// region in which the first invocation touched at least this many
    /// pages is copied into an anonymous huge page before the vCPUs run
    /// (docs/vmm.md, "Hot regions"; at most 8 regions). 0, the default:
    /// none.
    #[serde(default)]
    pub ember_hot_region_pages: u64,
}

fn yes() -> bool {
    true
}

impl LoadSnapshotParams {
    /// The memory file named by the request, if any (`None`: the one the
    /// state file names), or why the request is refused.
    pub fn memory_path(&self) -> Result<Option<PathBuf>, String> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err("give mem_backend or mem_file_path, not both".into()),
            (Some(backend), None) if backend.backend_type != "File" => Err(format!(
                "mem_backend.backend_type {:?} is not supported: ember-vmm restores from a File",
                backend.backend_type
            )),
            (Some(backend), None) => Ok(Some(backend.backend_path.clone())),
            (None, path) => Ok(path.clone()),
        }
    }

    /// Whether dirty pages are to be logged.
    pub fn dirty_tracking(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_bodies_parse() {
        let create: CreateSnapshotParams = serde_json::from_str(
            r#"{"snapshot_type": "Diff", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        )
        .unwrap();
        assert_eq!(create.snapshot_type, SnapshotType::Diff);
        assert!(create.ember_sync);
        let create: CreateSnapshotParams =
            serde_json::from_str(r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#).unwrap();
        assert_eq!(create.snapshot_type, SnapshotType::Full);
        assert!(serde_json::from_str::<CreateSnapshotParams>(
            r#"{"snapshot_type": "Half", "snapshot_path": "/s", "mem_file_path": "/m"}"#
        )
        .is_err());

        let load: LoadSnapshotParams = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#,
        )
        .unwrap();
        assert_eq!(load.memory_path(), Ok(Some(PathBuf::from("/m"))));
        assert!(load.resume_vm && load.ember_prefetch && !load.dirty_tracking());
        let uffd: LoadSnapshotParams = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
        )
        .unwrap();
        assert!(uffd.memory_path().unwrap_err().contains("Uffd"));
        let old: LoadSnapshotParams = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#,
        )
        .unwrap();
        assert_eq!(old.memory_path(), Ok(Some(PathBuf::from("/m"))));
        assert!(old.dirty_tracking());
    }
}
