//! Snapshots emberd keeps: one base snapshot of the booted guest, and per
//! function version a template (the base restored, the module loaded and
//! initialised, a Diff layer over the base).
//!
//! The base lives in `<state>/snapshots/base-<key>/`, where the key hashes
//! the guest image, the snapshot format version, the guest memory size and
//! this host's KVM CPUID: a different image, format or host never reuses
//! it. A base or template that is missing, fails the checks a VMM's load
//! makes (emberd runs them on the base at start and on a template before
//! its first use) or is of another key is rebuilt, never used; so is a
//! template a restore refuses.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::supervisor::{SpawnOptions, Supervisor, Vmm, VmmError};

/// Errors building snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A VMM failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// A snapshot's two files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The state file.
    pub state: PathBuf,
    /// The memory file (the newest layer).
    pub mem: PathBuf,
}

/// A restore for a waiting request copies a 2 MiB region into a huge page
/// when the template's first invocation touched at least this many of its
/// pages (docs/vmm.md, "Hot regions"; measured in docs/BENCHMARKS.md).
pub const HOT_REGION_PAGES: u64 = 256;

/// … and a restore ahead of traffic (pre-warming), from this many.
pub const HOT_REGION_PAGES_AHEAD: u64 = 128;

impl SnapshotFiles {
    /// `dir/name.state` and `dir/name.mem`.
    pub fn in_dir(dir: &Path, name: &str) -> SnapshotFiles {
        SnapshotFiles {
            state: dir.join(format!("{name}.state")),
            mem: dir.join(format!("{name}.mem")),
        }
    }

    /// The same file names in `dir`.
    pub fn moved_to(&self, dir: &Path) -> SnapshotFiles {
        let name = |p: &Path| dir.join(p.file_name().unwrap_or_default());
        SnapshotFiles {
            state: name(&self.state),
            mem: name(&self.mem),
        }
    }

    /// Whether both files exist.
    pub fn exist(&self) -> bool {
        self.state.is_file() && self.mem.is_file()
    }

    /// The body of `PUT /snapshot/load`; `touch`: the VM is restored ahead
    /// of its requests, and its guest touches the template's working set
    /// before the first (`ember_touch`, docs/vmm.md). A VM that does not
    /// log dirty pages gets the regions its first invocation touches most
    /// in huge pages of its own (`ember_hot_region_pages`): at least 256
    /// pages touched for a restore a request waits on (where the copy must
    /// cost less than the faults it saves), 128 for one ahead (where it
    /// only has to make the touch and what it leaves cheaper).
    pub fn load_body(&self, track_dirty_pages: bool, touch: bool) -> serde_json::Value {
        let hot_region_pages = match (track_dirty_pages, touch) {
            (true, _) => 0,
            (false, true) => HOT_REGION_PAGES_AHEAD,
            (false, false) => HOT_REGION_PAGES,
        };
        json!({
            "snapshot_path": self.state,
            "mem_backend": { "backend_type": "File", "backend_path": self.mem },
            "resume_vm": true,
            "track_dirty_pages": track_dirty_pages,
            "ember_touch": touch,
            "ember_hot_region_pages": hot_region_pages,
        })
    }

    /// The body of `PUT /snapshot/create`.
    pub fn create_body(&self, kind: &str) -> serde_json::Value {
        json!({ "snapshot_type": kind, "snapshot_path": self.state, "mem_file_path": self.mem })
    }
}

/// One stage of building a snapshot and how long it took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stage {
    /// What was done.
    pub stage: &'static str,
    /// How long, µs.
    pub us: u64,
}

/// Stages, timed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stages(pub Vec<Stage>);

impl Stages {
    fn time<T>(&mut self, stage: &'static str, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.0.push(Stage {
            stage,
            us: started.elapsed().as_micros() as u64,
        });
        out
    }
}

/// What identifies a base snapshot: the guest image, the snapshot format,
/// the memory size and this host's CPUID (hex SHA-256, 16 digits).
pub fn base_key(image: &Path, mem_mib: usize) -> Result<String, SnapshotError> {
    let bytes = std::fs::read(image).map_err(|source| SnapshotError::Io {
        what: format!("cannot read the guest image {}", image.display()),
        source,
    })?;
    let mut hash = Sha256::new();
    hash.update(&bytes);
    hash.update(ember_vmm::snapshot::FORMAT_MAJOR.to_le_bytes());
    hash.update(ember_vmm::snapshot::FORMAT_MINOR.to_le_bytes());
    hash.update((mem_mib as u64).to_le_bytes());
    hash.update(host_cpuid_digest());
    let digest = hash.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// A digest of the CPU features KVM supports on this host (empty without
/// KVM): the vendor and the feature leaves only — other leaves carry the
/// APIC ID of whichever host CPU asked, and would make the key differ from
/// one start to the next.
fn host_cpuid_digest() -> Vec<u8> {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        return Vec::new();
    };
    let Ok(cpuid) = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) else {
        return Vec::new();
    };
    let mut hash = Sha256::new();
    for e in cpuid.as_slice() {
        let words = match e.function {
            0x0 | 0x7 | 0xd | 0x8000_0001 | 0x8000_0008 => [e.eax, e.ebx, e.ecx, e.edx],
            // Leaf 1: EAX (family, model) and the feature words; EBX holds
            // the APIC ID.
            0x1 => [e.eax, 0, e.ecx, e.edx],
            _ => continue,
        };
        hash.update(e.function.to_le_bytes());
        hash.update(e.index.to_le_bytes());
        for word in words {
            hash.update(word.to_le_bytes());
        }
    }
    hash.finalize().to_vec()
}

/// Boots the guest image in a fresh VMM (dirty pages logged, so that
/// templates can be Diffs over it) and takes the base Full snapshot.
pub fn build_base(
    supervisor: &Supervisor,
    image: &Path,
    mem_mib: usize,
    files: &SnapshotFiles,
    memory_max: u64,
) -> Result<Stages, SnapshotError> {
    let mut stages = Stages::default();
    let options = SpawnOptions {
        memory_max: Some(memory_max),
        read_only: vec![image.to_path_buf()],
    };
    let mut vmm: Vmm = stages.time("start ember-vmm", || {
        supervisor.spawn("base-build", &[], &options)
    })?;
    let target = vmm.snapshot_target(files);
    stages.time("boot the guest", || -> Result<(), VmmError> {
        vmm.call(
            "PUT",
            "/boot-source",
            Some(&json!({ "kernel_image_path": image })),
        )?;
        vmm.call(
            "PUT",
            "/machine-config",
            Some(&json!({ "vcpu_count": 1, "mem_size_mib": mem_mib, "track_dirty_pages": true })),
        )?;
        vmm.call(
            "PUT",
            "/actions",
            Some(&json!({ "action_type": "InstanceStart" })),
        )?;
        vmm.wait_ready()
    })?;
    stages.time(
        "snapshot the booted guest (Full)",
        || -> Result<(), VmmError> {
            vmm.call("PATCH", "/vm", Some(&json!({ "state": "Paused" })))?;
            vmm.call("PUT", "/snapshot/create", Some(&target.create_body("Full")))?;
            Ok(())
        },
    )?;
    vmm.collect_snapshot(files).map_err(io_error(format!(
        "cannot move the base snapshot into {}",
        files.state.display()
    )))?;
    Ok(stages)
}

/// What a template is made from: the module and its settings.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    /// The body of `PUT /ember/function` (module path, files, env, args,
    /// memory and time limits).
    pub function: serde_json::Value,
    /// The compiled-module cache the VMMs share: emberd compiles the
    /// module into it first, on every CPU (ember-vmm compiles on one).
    pub compile_cache: Option<std::path::PathBuf>,
}

/// Compiles the module of `spec` into the cache for the CPU the restored
/// guest in `vmm` reports, with a thread per CPU; ember-vmm then finds it
/// there. Best effort: on any failure ember-vmm compiles it itself (and
/// names the problem if the module is bad).
fn precompile(vmm: &mut Vmm, spec: &TemplateSpec) {
    let Some(cache) = &spec.compile_cache else {
        return;
    };
    let features = match vmm.call("GET", "/ember/status", None) {
        Ok(status) => status.json()["guest_cpu_features"]
            .as_str()
            .map(str::to_string),
        Err(e) => {
            tracing::warn!("cannot ask the guest's CPU features: {e}");
            None
        }
    };
    let Some(features) = features else {
        return;
    };
    let Some(path) = spec.function["module_path"].as_str() else {
        return;
    };
    if let Err(e) = std::fs::create_dir_all(cache) {
        tracing::warn!("cannot create {}: {e}", cache.display());
        return;
    }
    let compiled = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|wasm| {
            let compiler = ember_compile::Compiler::for_line(&features, Some(cache.clone()), true)
                .map_err(|e| e.to_string())?;
            // Compiled before: ember-vmm reads (and checks) it.
            if compiler.is_cached(&wasm) {
                return Ok(None);
            }
            compiler.compile(&wasm).map(Some).map_err(|e| e.to_string())
        });
    match compiled {
        Ok(Some(c)) => tracing::info!(
            "module compiled for {features} ({:?}) in {} ms",
            c.source,
            c.elapsed.as_millis()
        ),
        Ok(None) => tracing::info!("module compiled before, for {features}"),
        Err(e) => tracing::info!("emberd did not compile the module ({e}); ember-vmm will"),
    }
}

/// Restores the base into `vmm` (prepared for the base's shape, with
/// dirty logging), loads the function, and takes the template Diff.
pub fn build_template(
    vmm: &mut Vmm,
    base: &SnapshotFiles,
    spec: &TemplateSpec,
    files: &SnapshotFiles,
) -> Result<(Stages, serde_json::Value), SnapshotError> {
    let mut stages = Stages::default();
    let staged = vmm.stage_snapshot(base).map_err(io_error(format!(
        "cannot give {} the base snapshot",
        vmm.id
    )))?;
    stages.time("restore the base snapshot", || {
        vmm.call(
            "PUT",
            "/snapshot/load",
            Some(&staged.load_body(true, false)),
        )
    })?;
    stages.time("compile the module (or find it compiled)", || {
        precompile(vmm, spec)
    });
    let function = vmm
        .stage_function(&spec.function)
        .map_err(io_error(format!("cannot give {} the module", vmm.id)))?;
    let loaded = stages.time("load and initialise the module", || {
        vmm.call("PUT", "/ember/function", Some(&function))
    })?;
    // The template's state names its parent by file name in its own
    // directory: the base's memory file is linked there (the same inode,
    // no copy; it also keeps the template whole if the base is removed).
    link_beside(&base.mem, &files.state)?;
    stages.time(
        "snapshot the template (Diff)",
        || -> Result<(), VmmError> {
            vmm.call("PATCH", "/vm", Some(&json!({ "state": "Paused" })))?;
            let target = vmm.snapshot_target(files);
            vmm.call("PUT", "/snapshot/create", Some(&target.create_body("Diff")))?;
            Ok(())
        },
    )?;
    vmm.collect_snapshot(files).map_err(io_error(format!(
        "cannot move the template into {}",
        files.state.display()
    )))?;
    Ok((stages, loaded.json()))
}

/// Hard-links `file` into the directory of `beside`, under its own name
/// (replacing another file of that name; nothing to do if it is there).
pub fn link_beside(file: &Path, beside: &Path) -> Result<PathBuf, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let io = |what: String| move |source| SnapshotError::Io { what, source };
    let name = file.file_name().unwrap_or_default();
    let link = beside.parent().unwrap_or(Path::new(".")).join(name);
    let target = std::fs::metadata(file).map_err(io(format!("cannot read {}", file.display())))?;
    if let Ok(there) = std::fs::symlink_metadata(&link) {
        if there.dev() == target.dev() && there.ino() == target.ino() {
            return Ok(link);
        }
        std::fs::remove_file(&link).map_err(io(format!("cannot replace {}", link.display())))?;
    }
    std::fs::hard_link(file, &link).map_err(io(format!(
        "cannot link {} to {} (the state directory must be one file system)",
        file.display(),
        link.display()
    )))?;
    Ok(link)
}

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_beside_links_once_and_replaces_a_stale_file() {
        let dir = std::env::temp_dir().join(format!("ember-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("base")).unwrap();
        std::fs::create_dir_all(dir.join("v1")).unwrap();
        let base = dir.join("base/base.mem");
        std::fs::write(&base, b"base").unwrap();
        let state = dir.join("v1/template.state");
        let link = link_beside(&base, &state).unwrap();
        assert_eq!(link, dir.join("v1/base.mem"));
        assert_eq!(std::fs::read(&link).unwrap(), b"base");
        // Again: kept.
        assert_eq!(link_beside(&base, &state).unwrap(), link);
        // A stale file of that name (an older base) is replaced.
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, b"old").unwrap();
        link_beside(&base, &state).unwrap();
        assert_eq!(std::fs::read(&link).unwrap(), b"base");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The digest is the same on every host CPU (the base snapshot's key
    /// must not change with the CPU emberd started on).
    #[test]
    fn cpuid_digest_is_the_same_on_every_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let on_cpu = |cpu: usize| {
            // SAFETY: sched_setaffinity(2) on this thread with a local set.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            host_cpuid_digest()
        };
        let first = std::thread::spawn(move || on_cpu(0)).join().unwrap();
        for cpu in 1..cpus {
            assert_eq!(
                std::thread::spawn(move || on_cpu(cpu)).join().unwrap(),
                first,
                "CPU {cpu}"
            );
        }
    }
}
