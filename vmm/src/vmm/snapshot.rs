//! Snapshot create and load on the VMM thread, and `--prepare`.
//!
//! Create (the VM paused, the guest idle in its doorbell exit, no request
//! in flight): vCPU states (each vCPU thread completes its pending `out`
//! and saves), VM state, devices, the memory file (Full: sparse; Diff: the
//! pages KVM logged plus those the VMM wrote, as a layer), then the state
//! file, synced and renamed into place.
//!
//! Load, into a process that has run no VM: the state file is read and
//! checked, the VM built to its shape (or the one `--prepare` built is
//! checked against it), the mailbox compared, the CPUID compared with this
//! host's and the memory files checked (sizes, trailers), all before
//! anything is touched; then memory mapped over the registered slot and
//! dirty logging set, vCPU states (on their threads) while the devices are
//! restored, then VM state (after the vCPUs', as Firecracker orders it),
//! the guest session, the restore block for the guest (generation, wall
//! clock, entropy; written just before the vCPUs first run), the working set
//! populated or its recording begun, and the vCPUs let go (unless the load
//! asks for the VM paused).

use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use ember_abi::mailbox::{GuestInfo, RESTORE_ENTROPY_BYTES};

use super::{GuestState, InstanceState, Vmm};
use crate::builder::{build_microvm_for_restore, BuildOptions};
use crate::devices::legacy::serial::{ConsoleOutput, SerialDevice};
use crate::devices::mailbox::Mailbox;
use crate::devices::EventFdTrigger;
use crate::persist::{
    getrandom_into, random_id, DevicesState, GuestSessionState, MicrovmState, SnapshotType,
    MAX_RESTORE_RUNS,
};
use crate::rpc_interface::{SnapshotCreated, SnapshotLoaded, VmmActionError, VmmData, VmmResponse};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::memory::{
    self, check_layers, map_layers, working_set_path, Backing, MemoryLayer, SnapshotId, WorkingSet,
};
use crate::snapshot::{Persist, WORKING_SET_MAGIC};
use crate::vmm_config::snapshot::{CreateSnapshotParams, LoadSnapshotParams};
use crate::vstate::vcpu::VcpuCommand;
use crate::ExitCode;

/// How long a vCPU thread may take to save or set its state.
const VCPU_STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// A working set to record after the first invocation of a restored VM.
pub(super) struct WorkingSetRecording {
    path: PathBuf,
    snapshot_id: SnapshotId,
    /// Set once the first invocation has been answered.
    pub(super) due: bool,
}

fn create_error(text: impl std::fmt::Display) -> VmmActionError {
    VmmActionError::CreateSnapshot(text.to_string())
}

fn load_error(text: impl std::fmt::Display) -> VmmActionError {
    VmmActionError::LoadSnapshot(text.to_string())
}

/// A guest that said `ready` (its `GuestInfo` saved in the snapshot) must
/// speak this ember-vmm's mailbox protocol: an older guest image takes its
/// modules another way.
pub fn check_guest_protocol(guest_info: Option<&[u8]>) -> Result<(), String> {
    let Some(bytes) = guest_info else {
        return Ok(());
    };
    match GuestInfo::decode(bytes) {
        Some(info) if info.abi_version == ember_abi::mailbox::VERSION => Ok(()),
        found => Err(format!(
            "the snapshot's guest speaks mailbox protocol {}, this ember-vmm {}: take the snapshot again with this guest image",
            found.map_or_else(
                || format!("unknown (a {}-byte `ready`)", bytes.len()),
                |info| info.abi_version.to_string()
            ),
            ember_abi::mailbox::VERSION
        )),
    }
}

/// `path` made absolute against the current directory (a parent layer is
/// found by the path recorded in its child's state).
fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}

/// A Diff's state names its parents by file name in its own directory:
/// each must be there (the same file, e.g. a hard link) and none may share
/// the new layer's name.
fn check_parents_beside(
    parents: &[MemoryLayer],
    snapshot_dir: &Path,
    mem_name: &Path,
) -> Result<(), String> {
    for parent in parents {
        let Some(name) = parent.path.file_name() else {
            return Err(format!(
                "parent layer {} has no file name",
                parent.path.display()
            ));
        };
        if name == mem_name {
            return Err(format!(
                "mem_file_path's name {} is also a parent layer's ({}): a state file names its layers by file name, so they must differ",
                mem_name.display(),
                parent.path.display()
            ));
        }
        let beside = snapshot_dir.join(name);
        if !same_file(&beside, &parent.path) {
            return Err(format!(
                "parent layer {} is not in the snapshot's directory {} (a state file names its layers by file name in its own directory): link it there first (ln {} {})",
                parent.path.display(),
                snapshot_dir.display(),
                parent.path.display(),
                beside.display()
            ));
        }
    }
    Ok(())
}

/// Whether `a` and `b` are the same file (same path, or the same inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

impl Vmm {
    /// `--prepare`: builds a VM of this shape with placeholder memory, its
    /// vCPU threads waiting for state, and installs the VMM thread's
    /// filter, so that a snapshot load has only state to set.
    pub fn prepare(
        &mut self,
        vcpu_count: u8,
        mem_size_mib: usize,
        track_dirty_pages: bool,
    ) -> Result<(), VmmActionError> {
        self.build_for_restore(vcpu_count, mem_size_mib, track_dirty_pages)?;
        self.prepared = true;
        self.prepared_tracking = track_dirty_pages;
        log::info!(
            "prepared for a restore: {vcpu_count} vCPU(s), {mem_size_mib} MiB, {} us after process start",
            self.process_start.elapsed().as_micros()
        );
        Ok(())
    }

    fn build_for_restore(
        &mut self,
        vcpu_count: u8,
        mem_size_mib: usize,
        track_dirty_pages: bool,
    ) -> Result<(), VmmActionError> {
        if self.microvm.is_some() || self.state != InstanceState::NotStarted {
            return Err(VmmActionError::AlreadyStarted);
        }
        let (console, kvm) = self.console_and_kvm()?;
        let options = BuildOptions {
            mailbox: self.options.mailbox,
            seccomp: self.options.seccomp,
            count_ring0: false,
        };
        // Before the VMM thread's filter, which allows no new threads.
        if self.prefetcher.is_none() {
            self.prefetcher = Some(memory::Prefetcher::start(self.options.seccomp).map_err(
                |e| VmmActionError::Internal(format!("cannot start the prefetch thread: {e}")),
            )?);
        }
        let microvm = build_microvm_for_restore(
            vcpu_count,
            mem_size_mib,
            track_dirty_pages,
            &options,
            kvm,
            console,
            &self.reset_evt,
            &self.vcpu_event_sender,
        )?;
        self.microvm = Some(microvm);
        self.resources.machine_config.vcpu_count = vcpu_count;
        self.resources.machine_config.mem_size_mib = mem_size_mib;
        self.resources.machine_config.track_dirty_pages = track_dirty_pages;
        seccomp::apply(ThreadKind::Vmm, "vmm", self.options.seccomp)
            .map_err(|e| VmmActionError::Internal(e.to_string()))
    }

    /// `PUT /snapshot/create`.
    pub(super) fn create_snapshot(&mut self, params: &CreateSnapshotParams) -> VmmResponse {
        let started = Instant::now();
        let Some(microvm) = &self.microvm else {
            return Err(VmmActionError::NotRunning(self.state.name()));
        };
        if self.state != InstanceState::Paused || self.transition.is_some() {
            return Err(create_error(
                "the microVM is not paused: PATCH /vm {\"state\": \"Paused\"} first",
            ));
        }
        match &self.guest {
            GuestState::Idle if self.pending.is_none() && self.early_messages == 0 => {}
            GuestState::Stopped(how) => {
                return Err(create_error(format!("the guest has stopped ({how})")))
            }
            GuestState::Booting => {
                return Err(create_error(
                    "the guest has not finished booting (no `ready` yet): resume it and wait",
                ))
            }
            other => {
                return Err(create_error(format!(
                    "the guest is busy ({other:?}): resume it and let it answer first"
                )))
            }
        }
        let diff = params.snapshot_type == SnapshotType::Diff;
        if diff && !microvm.vm.dirty_logging() {
            return Err(create_error(
                "a Diff snapshot needs dirty-page tracking: set track_dirty_pages in machine-config (or in the snapshot load request)",
            ));
        }
        if diff && microvm.layers.is_empty() {
            return Err(create_error(
                "a Diff snapshot needs a parent: take a Full snapshot of this VM first (or restore one)",
            ));
        }
        let snapshot_path = absolute(&params.snapshot_path).map_err(create_error)?;
        let mem_path = absolute(&params.mem_file_path).map_err(create_error)?;
        if snapshot_path == mem_path {
            return Err(create_error(
                "snapshot_path and mem_file_path name the same file",
            ));
        }
        let mem_name = mem_path
            .file_name()
            .map(PathBuf::from)
            .ok_or_else(|| create_error("mem_file_path names no file"))?;
        let snapshot_dir = snapshot_path.parent().unwrap_or(Path::new("/"));
        for file in [&mem_path, &snapshot_path] {
            let dir = file.parent().unwrap_or(Path::new("/"));
            if !dir.is_dir() {
                return Err(create_error(format!(
                    "cannot write {}: the directory {} does not exist",
                    file.display(),
                    dir.display()
                )));
            }
        }
        if diff {
            if let Some(parent) = microvm
                .layers
                .iter()
                .find(|l| same_file(&l.path, &mem_path))
            {
                return Err(create_error(format!(
                    "mem_file_path {} is a parent of this Diff (the chain needs it as it is): write the layer elsewhere",
                    parent.path.display()
                )));
            }
            check_parents_beside(&microvm.layers, snapshot_dir, &mem_name).map_err(create_error)?;
        }
        let id = random_id().map_err(|e| create_error(format!("no entropy for an id: {e}")))?;

        // vCPU state first: each thread completes its pending `out`.
        let mut vcpus = Vec::with_capacity(microvm.vcpus.len());
        for vcpu in &microvm.vcpus {
            let (reply, answer) = channel();
            vcpu.send(VcpuCommand::Save {
                msrs: microvm.msr_list.clone(),
                reply,
            });
            let state = answer
                .recv_timeout(VCPU_STATE_TIMEOUT)
                .map_err(|_| create_error(format!("vCPU {} did not save its state", vcpu.index)))?
                .map_err(|e| create_error(format!("vCPU {}: {e}", vcpu.index)))?;
            vcpus.push(*state);
        }
        let vm = microvm.vm.save_state().map_err(create_error)?;
        let devices = DevicesState {
            serial: crate::devices::lock(&microvm.devices.serial).save(),
            i8042: crate::devices::lock(&microvm.devices.i8042).save(),
            mailbox: microvm.mailbox.as_ref().map(Persist::save),
        };

        // Memory: what changed since the last snapshot (the guest's writes
        // from KVM's log, the VMM's from the bitmap), read and cleared now.
        let host = microvm.host_memory();
        let bitmap = microvm.vmm_writes();
        let mut dirty = microvm.vm.take_dirty_log().map_err(create_error)?;
        let vmm_writes = bitmap.get_and_reset();
        dirty.resize(dirty.len().max(vmm_writes.len()), 0);
        for (d, v) in dirty.iter_mut().zip(vmm_writes) {
            *d |= v;
        }
        // Everything from here writes files; on any failure the pages go
        // back into the bitmap, so that the next Diff still has them.
        let outcome = (|| -> Result<_, VmmActionError> {
            let (stats, runs, mem_file) = if diff {
                // Every run is an mmap at each restore: keep the chain's
                // total under the limit a load accepts.
                let parents: usize = microvm.layers.iter().map(MemoryLayer::run_count).sum();
                let budget = MAX_RESTORE_RUNS.saturating_sub(parents);
                // The compiled module's regions whole, for 2 MiB mappings.
                let runs = memory::diff_runs(
                    &dirty,
                    host.len / memory::PAGE,
                    budget,
                    &self.module_regions,
                )
                    .ok_or_else(|| {
                        create_error(format!(
                            "this VM's chain of Diffs already maps {parents} runs, the most a restore takes is {MAX_RESTORE_RUNS}: take a Full snapshot"
                        ))
                    })?;
                let (stats, file) =
                    memory::write_diff(host, &runs, &mem_path, &id, params.ember_sync)
                        .map_err(create_error)?;
                (stats, Some(runs), file)
            } else {
                let (stats, file) =
                    memory::write_full(host, microvm.backing, &mem_path, &id, params.ember_sync)
                        .map_err(create_error)?;
                (stats, None, file)
            };
            let mut live = if diff {
                microvm.layers.clone()
            } else {
                Vec::new()
            };
            live.push(MemoryLayer {
                path: mem_path.clone(),
                id,
                file_len: stats.file_len,
                runs,
            });
            // The state names each layer in its own directory.
            let layers = live
                .iter()
                .map(|layer| MemoryLayer {
                    path: layer
                        .path
                        .file_name()
                        .map(PathBuf::from)
                        .unwrap_or_default(),
                    ..layer.clone()
                })
                .collect();
            let state = MicrovmState {
                vmm_version: crate::VMM_VERSION.to_string(),
                id,
                snapshot_type: params.snapshot_type,
                vcpu_count: microvm.vcpus.len() as u8,
                mem_size_mib: self.resources.machine_config.mem_size_mib,
                host_cpuid: microvm.supported_cpuid.as_slice().to_vec(),
                memory: layers,
                vm,
                vcpus,
                devices,
                guest: GuestSessionState {
                    next_seq: self.next_seq,
                    function_timeout_ms: self.function_timeout_ms,
                    guest_info: self.guest_info.map(|info| info.encode().to_vec()),
                    generation: self.generation,
                    requests: self.requests,
                },
            };
            let bytes = state.encode().map_err(create_error)?;
            let state_file =
                crate::snapshot::write_pending(&snapshot_path, &bytes).map_err(create_error)?;
            // Both written and synced: now under their names, memory first,
            // so that a state file never names a memory file not in place.
            let renamed = |file: crate::snapshot::PendingFile| {
                let path = file.path().to_path_buf();
                file.commit().map_err(|e| {
                    create_error(format!("cannot rename into {}: {e}", path.display()))
                })
            };
            renamed(mem_file)?;
            renamed(state_file)?;
            Ok((state, live, stats, bytes.len()))
        })();
        let (state, live, stats, state_bytes) = match outcome {
            Ok(done) => done,
            Err(e) => {
                for (word_index, word) in dirty.iter().enumerate() {
                    for bit in 0..64 {
                        if word & (1 << bit) != 0 {
                            bitmap.set_bit(word_index * 64 + bit);
                        }
                    }
                }
                return Err(e);
            }
        };
        let restore_runs = state.restore_runs();
        let layer_count = state.memory.len();
        if let Some(microvm) = &mut self.microvm {
            microvm.layers = live;
        }
        self.snapshots_created += 1;
        let created = SnapshotCreated {
            snapshot_type: match params.snapshot_type {
                SnapshotType::Full => "Full",
                SnapshotType::Diff => "Diff",
            },
            duration_us: micros(started),
            memory_pages: stats.pages,
            memory_runs: stats.runs,
            memory_file_bytes: stats.file_len,
            state_bytes: state_bytes as u64,
            layers: layer_count,
            restore_runs,
        };
        log::info!("snapshot created: {created:?}");
        Ok(VmmData::SnapshotCreated(created))
    }

    /// `PUT /snapshot/load`.
    pub(super) fn load_snapshot(&mut self, params: &LoadSnapshotParams) -> VmmResponse {
        let started = Instant::now();
        if self.state != InstanceState::NotStarted || (self.microvm.is_some() && !self.prepared) {
            return Err(load_error(
                "this ember-vmm already runs a microVM: a snapshot loads into a fresh process (or one started with --prepare)",
            ));
        }
        let top_path = params.memory_path().map_err(load_error)?;
        let state = MicrovmState::read(&params.snapshot_path).map_err(load_error)?;
        // Layers are named in the state file's directory; the newest may
        // be named by the request.
        let state_path = absolute(&params.snapshot_path).map_err(load_error)?;
        let top_path = match top_path {
            Some(top) => Some(absolute(&top).map_err(load_error)?),
            None => None,
        };
        let state_dir = state_path.parent().unwrap_or(Path::new("/"));
        let memory_layers = memory::resolve_layers(&state.memory, state_dir, top_path.as_deref());
        let was_prepared = self.prepared;
        if self.microvm.is_none() {
            // Not prepared: build the VM to the snapshot's shape now. If a
            // later check fails, this process stays prepared for it.
            self.build_for_restore(
                state.vcpu_count,
                state.mem_size_mib,
                params.dirty_tracking(),
            )?;
            self.prepared = true;
        }
        // `--prepare --track-dirty-pages` or the request: either turns it
        // on (recorded in the configuration once the restore succeeded).
        let tracking = params.dirty_tracking() || self.prepared_tracking;
        let Some(microvm) = &mut self.microvm else {
            return Err(VmmActionError::Internal("no VM after building one".into()));
        };
        let machine = &self.resources.machine_config;
        if usize::from(state.vcpu_count) != microvm.vcpus.len()
            || state.mem_size_mib != machine.mem_size_mib
        {
            return Err(load_error(format!(
                "the snapshot is of a VM with {} vCPU(s) and {} MiB; this ember-vmm was prepared for {} vCPU(s) and {} MiB",
                state.vcpu_count,
                state.mem_size_mib,
                microvm.vcpus.len(),
                machine.mem_size_mib
            )));
        }
        match (&state.devices.mailbox, &microvm.mailbox) {
            (Some(saved), Some(here))
                if saved.gpa == here.gpa()
                    && saved.size == here.layout().size
                    && saved.port == here.port() => {}
            (None, None) => {}
            _ => {
                return Err(load_error(
                    "the snapshot's mailbox differs from this ember-vmm's (--no-mailbox on one side only?)",
                ))
            }
        }
        check_guest_protocol(state.guest.guest_info.as_deref()).map_err(load_error)?;
        crate::arch::x86_64::cpuid::check_compatible(&state.host_cpuid, &microvm.supported_cpuid)
            .map_err(load_error)?;
        let host = microvm.host_memory();
        let layers = check_layers(&memory_layers, host.len).map_err(load_error)?;
        let ws_path = working_set_path(&state_path);
        let working_set = if params.ember_prefetch {
            read_working_set(&ws_path, &state.id, host.len / memory::PAGE)
        } else {
            None
        };
        let whole = whole_runs(&state.memory);
        let hot_regions = match &working_set {
            Some(set) if params.ember_hot_region_pages > 0 && !tracking => {
                set.hot_regions(host, &whole, params.ember_hot_region_pages, HOT_REGIONS_MAX)
            }
            _ => Vec::new(),
        };

        // Checked: from here on, a failure leaves a VM half restored, and
        // the process ends after answering.
        let result = (|| -> Result<_, String> {
            let mapped = map_layers(host, &layers).map_err(|e| e.to_string())?;
            let hot_started = Instant::now();
            let mut hot = 0;
            for &region in &hot_regions {
                // A failed copy only costs speed: the region stays mapped
                // from the files.
                match memory::make_anonymous(host, &layers, region) {
                    Ok(()) => hot += 1,
                    Err(e) => log::warn!("region {region} stays mapped from the files: {e}"),
                }
            }
            drop(layers);
            microvm
                .vm
                .set_dirty_logging(tracking)
                .map_err(|e| e.to_string())?;
            let _ = microvm.vm.take_dirty_log();
            microvm.vmm_writes().reset();
            Ok((mapped, hot, micros(hot_started)))
        })();
        let (mapped, hot_regions, hot_us) = match result {
            Ok(done) => done,
            Err(e) => return Err(self.restore_failed(e)),
        };
        // vCPUs restored paused, whatever was asked: nothing runs before
        // the VM state, the devices and the restore block are in place.
        let mut replies = Vec::with_capacity(state.vcpus.len());
        let mut vcpu_states = state.vcpus.into_iter();
        if let Some(microvm) = &self.microvm {
            for vcpu in &microvm.vcpus {
                let Some(vcpu_state) = vcpu_states.next() else {
                    break;
                };
                let (reply, answer) = channel();
                vcpu.send(VcpuCommand::Restore {
                    state: Box::new(vcpu_state),
                    reply,
                });
                replies.push((vcpu.index, answer));
            }
        }
        // Devices while the vCPU threads set their state.
        if let Err(e) = self.restore_devices(&state.devices) {
            return Err(self.restore_failed(e));
        }
        for (index, answer) in replies {
            match answer.recv_timeout(VCPU_STATE_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.restore_failed(format!("vCPU {index}: {e}"))),
                Err(_) => {
                    return Err(self.restore_failed(format!("vCPU {index} did not set its state")))
                }
            }
        }
        // VM state after the vCPUs' (LAPICs, TSC), as Firecracker orders it.
        let vm_restored = self.microvm.as_ref().map(|m| m.vm.restore_state(&state.vm));
        if let Some(Err(e)) = vm_restored {
            return Err(self.restore_failed(e.to_string()));
        }
        // The guest's session, and what it needs to know it was restored.
        let session = state.guest;
        self.generation = session.generation + 1;
        // Written when the vCPUs first run, so that a VM restored paused
        // (and perhaps snapshotted again) still has the snapshot's memory.
        self.restore_block_due = true;
        if params.resume_vm {
            if let Err(e) = self.write_restore_block() {
                return Err(self.restore_failed(e));
            }
        }
        self.next_seq = session.next_seq.max(1);
        self.function_timeout_ms = session.function_timeout_ms;
        self.requests = session.requests;
        self.guest_info = session.guest_info.as_deref().and_then(GuestInfo::decode);

        // The working set: populate it if recorded, else record it.
        let mut loaded = SnapshotLoaded {
            restore_us: 0,
            since_process_start_us: 0,
            prepared: was_prepared,
            memory_runs: mapped.runs,
            whole_region_pages: mapped.whole_pages,
            working_set: "off",
            prefetched_read_pages: 0,
            prefetched_write_pages: 0,
            prefetch_us: 0,
            touch_pages: 0,
            hot_regions,
            hot_us,
            generation: self.generation,
        };
        if params.ember_prefetch {
            match working_set {
                Some(set) => {
                    if params.ember_touch && params.resume_vm {
                        // A VM that logs dirty pages only reads: a write
                        // would put the page in its next Diff.
                        let ranges = set.touch_ranges(&whole, !tracking);
                        loaded.touch_pages = ranges.iter().map(|r| u64::from(r.pages)).sum();
                        self.touch_due = Some(ember_abi::mailbox::TouchList::encode(&ranges));
                    }
                    let (read, write) = set.counts();
                    loaded.prefetched_read_pages = read;
                    loaded.prefetched_write_pages = write;
                    let helper = self
                        .prefetcher
                        .as_ref()
                        .filter(|_| !params.ember_prefetch_sync);
                    match helper {
                        Some(prefetcher) if prefetcher.submit(host, set.clone()) => {
                            loaded.working_set = "prefetching";
                        }
                        _ => {
                            let prefetch_started = Instant::now();
                            set.prefetch(host);
                            loaded.prefetch_us = micros(prefetch_started);
                            loaded.working_set = "prefetched";
                        }
                    }
                }
                None => {
                    loaded.working_set = "recording";
                    self.working_set = Some(WorkingSetRecording {
                        path: ws_path,
                        snapshot_id: state.id,
                        due: false,
                    });
                }
            }
        }
        if let Some(microvm) = &mut self.microvm {
            microvm.layers = memory_layers;
            microvm.backing = Backing::Files;
        }
        let now = Instant::now();
        self.started_at = Some(started);
        self.ready_at = Some(now);
        self.guest = GuestState::Idle;
        self.prepared = false;
        self.resources.machine_config.track_dirty_pages = tracking;
        self.state = InstanceState::Paused;
        if params.resume_vm {
            if let Some(microvm) = &self.microvm {
                for vcpu in &microvm.vcpus {
                    vcpu.send(VcpuCommand::Resume);
                }
                // Their acks come later; no transition waits for them.
                self.unclaimed_acks += microvm.vcpus.len();
            }
            self.state = InstanceState::Running;
        }
        loaded.restore_us = micros(started);
        loaded.since_process_start_us = (now - self.process_start).as_micros() as u64;
        log::info!("snapshot loaded: {loaded:?}");
        Ok(VmmData::SnapshotLoaded(loaded))
    }

    /// Tells a restored guest so in its mailbox: a new generation, the
    /// wall-clock time and fresh entropy. Before its vCPUs first run.
    pub(super) fn write_restore_block(&mut self) -> Result<(), String> {
        if !self.restore_block_due {
            return Ok(());
        }
        let mut entropy = [0u8; RESTORE_ENTROPY_BYTES];
        getrandom_into(&mut entropy).map_err(|e| format!("no entropy for the guest: {e}"))?;
        let realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        if let Some(mailbox) = self.microvm.as_ref().and_then(|m| m.mailbox.as_ref()) {
            mailbox
                .write_restore_block(self.generation, realtime_ns, &entropy)
                .map_err(|e| format!("cannot write the restore block: {e}"))?;
        }
        self.restore_block_due = false;
        Ok(())
    }

    /// Serial, i8042 and mailbox from their saved states.
    fn restore_devices(&mut self, devices: &DevicesState) -> Result<(), String> {
        let Some(microvm) = &mut self.microvm else {
            return Err("no VM".into());
        };
        let console = self
            .console
            .try_clone()
            .map(ConsoleOutput::new)
            .map_err(|e| format!("cannot reopen the console: {e}"))?;
        let irq = microvm
            .serial_irq
            .try_clone()
            .map_err(|e| format!("cannot share the serial interrupt: {e}"))?;
        let serial = SerialDevice::restore((EventFdTrigger(irq), console), &devices.serial)
            .map_err(|e| e.to_string())?;
        *crate::devices::lock(&microvm.devices.serial) = serial;
        let reset = self
            .reset_evt
            .try_clone()
            .map_err(|e| format!("cannot share the reset line: {e}"))?;
        let Ok(i8042) =
            <crate::devices::legacy::i8042::I8042 as Persist>::restore(reset, &devices.i8042);
        *crate::devices::lock(&microvm.devices.i8042) = i8042;
        if let Some(saved) = &devices.mailbox {
            microvm.mailbox =
                Some(Mailbox::restore(microvm.mem.clone(), saved).map_err(|e| e.to_string())?);
        }
        Ok(())
    }

    /// A restore failed after it began to change the VM: answer, then exit.
    fn restore_failed(&mut self, what: String) -> VmmActionError {
        log::error!("restore failed after guest state was changed: {what}");
        self.guest = GuestState::Stopped(format!("restore failed: {what}"));
        self.exit_code.get_or_insert(ExitCode::GenericError);
        VmmActionError::RestoreFailed(what)
    }

    /// After the first invocation of a restored VM: records which pages it
    /// touched, beside the snapshot.
    pub(super) fn record_working_set(&mut self) {
        if !self.working_set.as_ref().is_some_and(|r| r.due) {
            return;
        }
        let (Some(recording), Some(microvm)) = (self.working_set.take(), &self.microvm) else {
            return;
        };
        let started = Instant::now();
        let whole = whole_runs(&microvm.layers);
        let set = match WorkingSet::record(microvm.host_memory(), recording.snapshot_id, &whole) {
            Ok(set) => set,
            Err(e) => return log::warn!("cannot record the working set: {e}"),
        };
        let (read, written) = set.counts();
        let saved = crate::snapshot::encode(WORKING_SET_MAGIC, &set)
            .and_then(|bytes| crate::snapshot::write_file_atomic(&recording.path, &bytes));
        match saved {
            Ok(()) => log::info!(
                "working set recorded in {}: {read} pages read, {written} written ({} us)",
                recording.path.display(),
                started.elapsed().as_micros()
            ),
            Err(e) => log::warn!("cannot save the working set: {e}"),
        }
    }
}

/// At most this many regions (16 MiB) are copied per VM: each costs its
/// 2 MiB of private memory (docs/vmm.md, "Hot regions").
const HOT_REGIONS_MAX: usize = 8;

/// The runs of `layers` stored as whole 2 MiB regions.
fn whole_runs(layers: &[MemoryLayer]) -> Vec<memory::Run> {
    layers
        .iter()
        .flat_map(|layer| layer.runs.iter().flatten())
        .filter(|run| memory::is_whole(run))
        .copied()
        .collect()
}

/// The working set beside a snapshot, if there is one for this snapshot
/// (and it fits guest memory of `mem_pages` pages).
fn read_working_set(path: &Path, id: &SnapshotId, mem_pages: u64) -> Option<WorkingSet> {
    let bytes = crate::snapshot::read_file(path, "working-set file").ok()?;
    match WorkingSet::decode(path, &bytes, mem_pages) {
        Ok(set) if &set.snapshot_id == id => Some(set),
        Ok(_) => {
            log::info!(
                "{} is from another snapshot; recording anew",
                path.display()
            );
            None
        }
        Err(e) => {
            log::warn!("ignoring the working set: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_of_another_protocol_is_refused_by_name() {
        let mut info = GuestInfo {
            abi_version: ember_abi::mailbox::VERSION,
            code_area: 2 << 20,
            code_area_bytes: 8 << 20,
            ..GuestInfo::default()
        };
        assert_eq!(check_guest_protocol(None), Ok(()));
        assert_eq!(check_guest_protocol(Some(&info.encode())), Ok(()));
        info.abi_version -= 1;
        let older = check_guest_protocol(Some(&info.encode())).unwrap_err();
        assert!(
            older.contains(&format!("protocol {}", ember_abi::mailbox::VERSION - 1)),
            "{older}"
        );
        // Version 4's `ready` was 48 bytes long.
        let short = check_guest_protocol(Some(&[0u8; 48])).unwrap_err();
        assert!(short.contains("48-byte"), "{short}");
    }
}
