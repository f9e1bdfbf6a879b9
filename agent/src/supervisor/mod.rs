//! Spawning and talking to ember-vmm processes.
//!
//! Each VMM's stderr is forwarded into emberd's log, tagged with the VMM
//! and the instance it serves ([`log`]).
//!
//! Each VMM has a directory of its own, `<state>/vms/<id>/`: its API
//! socket (`api.sock`), its console (`console`), and the snapshot and
//! module files it is given (hard links, [`Vmm::stage_snapshot`]). Jailed
//! (the default, [`Jail`]), that directory is all it may write, and what
//! it reads is linked into it.
//!
//! Every VMM emberd starts has a pidfile in `<state>/vms/` naming its pid,
//! its start time (from /proc/PID/stat) and its executable, and dies with
//! emberd (PR_SET_PDEATHSIG). On start, emberd finds the VMMs a crashed
//! predecessor of the same state dir left behind through those pidfiles —
//! checked against /proc/PID/exe and the start time, never by process name
//! — and kills them.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_vmm::api::client::{ApiClient, ApiResponse};

pub mod log;

use log::{InstanceTag, VmmLog, VmmLogs};

/// Console bytes a VMM may write to `vms/<id>/console` (the guest writes
/// it; past this the VMM drops the rest, so a flooding guest cannot fill
/// the disk).
pub const CONSOLE_LIMIT: u64 = 1 << 20;

/// How long a VMM may take to listen, and a request to be answered.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Errors running a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Spawning failed.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VMM exited or never listened.
    #[error("ember-vmm {id} did not start: {why}")]
    NotListening {
        /// Its id.
        id: String,
        /// What happened.
        why: String,
    },
    /// A request failed at the transport level (the VMM died, hung up).
    #[error("ember-vmm {id}: {method} {path}: {source}")]
    Transport {
        /// Its id.
        id: String,
        /// Method.
        method: &'static str,
        /// Path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The VMM refused a request.
    #[error("ember-vmm {id}: {method} {path} answered {status}: {message}")]
    Refused {
        /// Its id.
        id: String,
        /// Method.
        method: &'static str,
        /// Path.
        path: String,
        /// Status.
        status: u16,
        /// Its fault message.
        message: String,
    },
    /// Writing the pidfile failed.
    #[error("cannot write pidfile {path}: {source}")]
    Pidfile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Where VMM processes live: the binary and the run directory, and the
/// thread that starts them.
#[derive(Clone)]
pub struct Supervisor {
    /// The ember-vmm binary.
    pub vmm: PathBuf,
    /// `<state>/vms`: sockets, pidfiles, consoles.
    pub run_dir: PathBuf,
    /// ember-vmm's `--log-level`.
    pub log_level: String,
    /// ember-vmm's `--compile-cache`: `<state>/compiled`, shared by every
    /// VMM, so a module deployed again is not compiled again (read-only to
    /// a jailed VMM: emberd compiles into it).
    pub compile_cache: Option<PathBuf>,
    /// How VMMs are confined; `None`: not at all (`--no-jail`).
    pub jail: Option<Arc<Jail>>,
    spawner: Spawner,
    logs: VmmLogs,
}

/// How emberd jails its VMMs (docs/security.md): each gets a uid and gid
/// of its own from a range, a cgroup leaf under `cgroup_parent`, and sees
/// only its own directory (read-write) and what is bound or linked in.
#[derive(Debug)]
pub struct Jail {
    /// The first uid (and gid) of the range.
    pub first_id: u32,
    /// How many ids the range holds (at most this many VMMs at once).
    pub ids: u32,
    /// The cgroup hierarchy.
    pub hierarchy: ember_vmm::jail::cgroup::Hierarchy,
    /// The leaves' parent, relative to the hierarchy root.
    pub cgroup_parent: PathBuf,
    /// Each leaf's pids.max.
    pub pids_max: u64,
    /// Each leaf's cpu.max (quota, period µs), if any.
    pub cpu_max: Option<(u64, u64)>,
    /// RLIMIT_FSIZE of a VMM: its largest file (a Full snapshot's memory).
    pub max_file_bytes: u64,
    /// The empty directory each VMM mounts its root on.
    pub root_mount: PathBuf,
    /// Whether the host swaps (cgroup v1 then limits memory + swap too).
    pub swap: bool,
    /// The thread that writes cgroup limits beside a restore.
    writer: std::sync::Mutex<std::sync::mpsc::Sender<CgroupWrite>>,
    in_use: std::sync::Mutex<std::collections::BTreeSet<u32>>,
}

impl Jail {
    /// A jail configuration; `run_dir` holds the root mount point.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        first_id: u32,
        ids: u32,
        hierarchy: ember_vmm::jail::cgroup::Hierarchy,
        cgroup_parent: PathBuf,
        pids_max: u64,
        cpu_max: Option<(u64, u64)>,
        max_file_bytes: u64,
        run_dir: &Path,
    ) -> Jail {
        Jail {
            first_id,
            ids,
            hierarchy,
            cgroup_parent,
            pids_max,
            cpu_max,
            max_file_bytes,
            root_mount: run_dir.join(".jail-root"),
            swap: host_swaps(),
            writer: std::sync::Mutex::new(start_cgroup_writer()),
            in_use: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// Removes the cgroup parent of this emberd's VMs, and what empty
    /// leaves it still holds, in every hierarchy (at a stop, or a start
    /// that failed). A leaf whose VMM is still ending keeps it: the next
    /// start on the same state dir reuses it.
    pub fn remove_cgroups(&self) {
        ember_vmm::jail::cgroup::remove_parent(
            &self.hierarchy,
            &self.cgroup_parent,
            std::time::Duration::ZERO,
        );
    }

    fn take_id(&self) -> Option<u32> {
        let mut used = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        let id = (self.first_id..self.first_id.saturating_add(self.ids))
            .find(|id| !used.contains(id))?;
        used.insert(id);
        Some(id)
    }

    fn give_back(&self, id: u32) {
        self.in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// The VMM's leaf directories (one per hierarchy).
    fn leaf_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.hierarchy.dirs(&self.cgroup_parent.join(id))
    }

    /// Removes a VMM's cgroup leaf (after its keeper exited).
    fn remove_leaf(&self, id: &str) {
        ember_vmm::jail::cgroup::remove_leaf(&self.hierarchy, &self.cgroup_parent.join(id));
    }
}

/// What one VMM needs beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// Its cgroup's memory limit, bytes (jailed only).
    pub memory_max: Option<u64>,
    /// Host paths it reads that are not linked into its directory (the
    /// guest image of a base build), bound read-only (jailed only).
    pub read_only: Vec<PathBuf>,
}

/// A request to the spawner thread: the command, and where its child goes.
type SpawnRequest = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// The one thread that forks every VMM. PR_SET_PDEATHSIG fires when the
/// *thread* that forked a child exits, not the process: children forked on
/// tokio's blocking threads (which retire after 10 s idle) would be killed
/// with them. This thread lives as long as emberd.
#[derive(Clone)]
struct Spawner(std::sync::mpsc::Sender<SpawnRequest>);

impl Spawner {
    fn start() -> Spawner {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("ember_spawner".into())
            .spawn(move || {
                while let Ok((mut command, reply)) = rx.recv() {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("a thread to spawn VMMs on");
        Spawner(tx)
    }

    fn spawn(&self, command: Command) -> std::io::Result<Child> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.0
            .send((command, reply))
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
        answer
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
    }
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("vmm", &self.vmm)
            .field("run_dir", &self.run_dir)
            .finish()
    }
}

/// A running ember-vmm and a connection to it. Dropping it kills the
/// process (off the request path: the caller drops it on a blocking
/// thread) and removes its files.
pub struct Vmm {
    /// Its id (also its file names in the run directory).
    pub id: String,
    /// Its log, forwarded into emberd's.
    pub log: Arc<VmmLog>,
    /// Its directory, `<run>/<id>`.
    pub dir: PathBuf,
    child: Child,
    client: ApiClient,
    run_dir: PathBuf,
    /// The jail and the uid it runs as, when jailed.
    jailed: Option<(Arc<Jail>, u32)>,
    /// The snapshot it was restored from, as staged (its working set is
    /// collected from there).
    restored_from: Option<SnapshotPaths>,
}

impl Supervisor {
    /// A supervisor of `vmm` processes with their files in `run_dir`,
    /// logging at `log_level` into emberd's log.
    pub fn new(vmm: PathBuf, run_dir: PathBuf, log_level: &str) -> std::io::Result<Supervisor> {
        Ok(Supervisor {
            vmm,
            run_dir,
            log_level: log_level.to_string(),
            compile_cache: None,
            jail: None,
            spawner: Spawner::start(),
            logs: VmmLogs::start()?,
        })
    }

    /// Spawns `ember-vmm --api-sock <run>/<id>/api.sock --id <id> args...`
    /// (jailed, unless this supervisor has no [`Jail`]) and returns once its
    /// socket accepts.
    pub fn spawn(&self, id: &str, args: &[&str], options: &SpawnOptions) -> Result<Vmm, VmmError> {
        let spawn_error = |source| VmmError::Spawn {
            binary: self.vmm.clone(),
            source,
        };
        let dir = self.run_dir.join(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(spawn_error)?;
        let sock = dir.join("api.sock");
        let jailed = match &self.jail {
            Some(jail) => {
                let Some(uid) = jail.take_id() else {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(spawn_error(std::io::Error::other(format!(
                        "all {} jail ids from {} are in use",
                        jail.ids, jail.first_id
                    ))));
                };
                // Root's, writable by the VMM's group: the VMM creates its
                // socket and console; emberd links files in.
                let owned = std::os::unix::fs::chown(&dir, Some(0), Some(uid)).and_then(|()| {
                    std::fs::set_permissions(
                        &dir,
                        std::os::unix::fs::PermissionsExt::from_mode(0o770),
                    )
                });
                if let Err(e) = owned {
                    jail.give_back(uid);
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(spawn_error(e));
                }
                Some((jail.clone(), uid))
            }
            None => None,
        };
        let give_back = || {
            if let Some((jail, uid)) = &jailed {
                jail.give_back(*uid);
            }
        };
        let (stderr, log) = match self.logs.pipe(id) {
            Ok(pipe) => pipe,
            Err(e) => {
                give_back();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(spawn_error(e));
            }
        };
        let mut command = Command::new(&self.vmm);
        command
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", id, "--log-level", &self.log_level, "--serial-out"])
            .arg(dir.join("console"))
            .arg("--serial-out-limit")
            .arg(CONSOLE_LIMIT.to_string())
            .args(
                self.compile_cache
                    .iter()
                    .flat_map(|dir| [std::ffi::OsStr::new("--compile-cache"), dir.as_os_str()]),
            );
        if let Some((jail, uid)) = &jailed {
            let uid = uid.to_string();
            command
                .arg("--jail-root")
                .arg(&jail.root_mount)
                .args(["--jail-uid", &uid, "--jail-gid", &uid])
                .arg("--jail-rw")
                .arg(&dir)
                .arg("--jail-max-file-bytes")
                .arg(jail.max_file_bytes.to_string())
                .arg("--cgroup")
                .arg(jail.cgroup_parent.join(id))
                .arg("--pids-max")
                .arg(jail.pids_max.to_string());
            for path in self.compile_cache.iter().chain(&options.read_only) {
                command.arg("--jail-ro").arg(path);
            }
            if let Some(bytes) = options.memory_max {
                command.arg("--memory-max").arg(bytes.to_string());
            }
            if let Some((quota, period)) = jail.cpu_max {
                command.arg("--cpu-max").arg(format!("{quota}/{period}"));
            }
        }
        command
            .args(args)
            // Nothing of emberd's environment (NOTIFY_SOCKET, say) is the
            // VMM's business.
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and only calls
        // prctl(2) and getppid(2), which are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // emberd died between the fork and the prctl: no signal
                // will come.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("emberd is gone"));
                }
                Ok(())
            });
        }
        let mut child = match self.spawner.spawn(command) {
            Ok(child) => child,
            Err(source) => {
                give_back();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(spawn_error(source));
            }
        };
        let cleanup = |child: &mut Child| {
            stop(child, jailed.is_some());
            if let Some((jail, _)) = &jailed {
                jail.remove_leaf(id);
            }
            give_back();
            let _ = std::fs::remove_file(self.run_dir.join(format!("{id}.pid")));
            let _ = std::fs::remove_dir_all(&dir);
        };
        log.set_pid(child.id());
        if let Err(e) = write_pidfile(&self.run_dir, id, child.id(), &self.vmm) {
            cleanup(&mut child);
            return Err(e);
        }
        let deadline = Instant::now() + PATIENCE;
        let client = loop {
            if let Ok(client) = ApiClient::connect(&sock) {
                break client;
            }
            if let Ok(Some(status)) = child.try_wait() {
                cleanup(&mut child);
                // It exited: its last lines are in the pipe, or read.
                let tail = log.tail(Duration::from_secs(1));
                return Err(VmmError::NotListening {
                    id: id.into(),
                    why: format!("it exited ({status}): {}", tail.join(" / ")),
                });
            }
            if Instant::now() >= deadline {
                cleanup(&mut child);
                let tail = log.tail(Duration::from_secs(1));
                return Err(VmmError::NotListening {
                    id: id.into(),
                    why: format!(
                        "no socket within {PATIENCE:?}; its last lines: {}",
                        tail.join(" / ")
                    ),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let _ = client.set_timeout(Some(PATIENCE));
        Ok(Vmm {
            id: id.to_string(),
            log,
            dir,
            child,
            client,
            run_dir: self.run_dir.clone(),
            jailed,
            restored_from: None,
        })
    }

    /// Kills the VMMs a previous emberd of this state dir left running:
    /// each pidfile whose process still runs this binary and started when
    /// the pidfile says. Returns how many were killed.
    pub fn reap_stale(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.run_dir) else {
            return 0;
        };
        let mut killed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            if let Some((pid, start)) = read_pidfile(&path) {
                if process_is(pid, start, &self.vmm) {
                    // SAFETY: kill(2) with a pid checked just above to be
                    // our own VMM (executable and start time match).
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    killed += 1;
                }
            }
            let stem = path.with_extension("");
            // `log`, `sock`, `console`: the files of earlier emberd versions.
            for ext in ["pid", "sock", "log", "console"] {
                let _ = std::fs::remove_file(stem.with_extension(ext));
            }
            let _ = std::fs::remove_dir_all(&stem);
        }
        // Directories of VMMs whose pidfile was never written.
        if let Ok(entries) = std::fs::read_dir(&self.run_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if entry.file_type().is_ok_and(|t| t.is_dir()) && name != ".jail-root" {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        killed
    }
}

impl Vmm {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tags this VMM's log lines with the instance it now serves.
    pub fn serve_instance(&self, instance: &str, function: &str, version: u64) {
        self.log.set_instance(InstanceTag {
            instance: Some(instance.to_string()),
            function: function.to_string(),
            version,
        });
    }

    /// Tags this VMM's log lines with the function version whose template
    /// it builds.
    pub fn build_template_of(&self, function: &str, version: u64) {
        self.log.set_instance(InstanceTag {
            instance: None,
            function: function.to_string(),
            version,
        });
    }

    /// Bounds how long a request may wait for its answer.
    pub fn set_timeout(&self, timeout: Duration) {
        let _ = self.client.set_timeout(Some(timeout));
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Why the process ended, waiting up to `patience` for it to end (a
    /// VMM whose socket hung up is usually a moment from its exit).
    pub fn exit_reason(&mut self, patience: Duration) -> Option<String> {
        let deadline = Instant::now() + patience;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(describe_exit(status));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The uid a jailed VMM runs as.
    pub fn jail_uid(&self) -> Option<u32> {
        self.jailed.as_ref().map(|(_, uid)| *uid)
    }

    /// Sets the memory limit of a jailed VMM's cgroup (lowering it from
    /// the prepared VMM's to the function's, for a restore) on a thread of
    /// its own, beside the restore; [`LimitWrite::wait`] says when it is
    /// done. Unjailed: nothing.
    pub fn limit_memory(&self, bytes: u64) -> LimitWrite {
        use ember_vmm::jail::cgroup::Hierarchy;
        let Some((jail, _)) = &self.jailed else {
            return LimitWrite(None);
        };
        let dirs = jail.leaf_dirs(&self.id);
        let bytes = bytes.to_string();
        let files = match &jail.hierarchy {
            Hierarchy::V2(_) => vec![(dirs[0].join("memory.max"), bytes)],
            // Lowering: memory first (memory + swap may not go below it);
            // without swap, memory + swap cannot exceed memory anyway.
            Hierarchy::V1 { .. } if jail.swap => vec![
                (dirs[0].join("memory.limit_in_bytes"), bytes.clone()),
                (dirs[0].join("memory.memsw.limit_in_bytes"), bytes),
            ],
            Hierarchy::V1 { .. } => vec![(dirs[0].join("memory.limit_in_bytes"), bytes)],
        };
        let (done, answer) = std::sync::mpsc::channel();
        let writer = jail.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(std::sync::mpsc::SendError((files, done))) = writer.send((files, done)) {
            // No writer thread: write here.
            let _ = done.send(write_all(&files));
        }
        LimitWrite(Some(answer))
    }

    /// The snapshot `files` as this VMM should be told of them: jailed,
    /// the state, memory and working-set files beside `files.state` are
    /// hard-linked into its directory (the same inodes, made readable);
    /// unjailed, `files` itself.
    pub fn stage_snapshot(&mut self, files: &SnapshotPaths) -> std::io::Result<SnapshotPaths> {
        if self.jailed.is_none() {
            return Ok(files.clone());
        }
        self.restored_from = Some(files.clone());
        let from = files.state.parent().unwrap_or(Path::new("/"));
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            let name = entry.file_name();
            // (Snapshot files are made 0644 when written: no chmod here.)
            if is_snapshot_file(&name) && entry.file_type()?.is_file() {
                link(&entry.path(), &self.dir.join(&name))?;
            }
        }
        Ok(files.moved_to(&self.dir))
    }

    /// The body of `PUT /ember/function` as this VMM should get it:
    /// jailed, the module and files are linked into `fn/` of its
    /// directory and the body names them there.
    pub fn stage_function(&self, body: &serde_json::Value) -> std::io::Result<serde_json::Value> {
        let mut body = body.clone();
        if self.jailed.is_none() {
            return Ok(body);
        }
        let into = self.dir.join("fn");
        std::fs::create_dir_all(&into)?;
        if let Some(module) = body["module_path"].as_str().map(PathBuf::from) {
            let link = into.join("module.wasm");
            link_readable(&module, &link)?;
            body["module_path"] = serde_json::json!(link);
        }
        if let Some(files) = body["files"].as_array_mut() {
            for (i, file) in files.iter_mut().enumerate() {
                if let Some(path) = file["host_path"].as_str().map(PathBuf::from) {
                    let link = into.join(format!("file{i}"));
                    link_readable(&path, &link)?;
                    file["host_path"] = serde_json::json!(link);
                }
            }
        }
        Ok(body)
    }

    /// Where this VMM should write a snapshot bound for `files`: jailed,
    /// its own directory (then [`Vmm::collect_snapshot`]); unjailed,
    /// `files`.
    pub fn snapshot_target(&self, files: &SnapshotPaths) -> SnapshotPaths {
        match &self.jailed {
            Some(_) => files.moved_to(&self.dir),
            None => files.clone(),
        }
    }

    /// Moves a snapshot this VMM wrote at `snapshot_target(files)` to
    /// `files`: owned by root, read-only to others, memory file first and
    /// the state last (a state file names a whole snapshot), the directory
    /// synced.
    pub fn collect_snapshot(&self, files: &SnapshotPaths) -> std::io::Result<()> {
        if self.jailed.is_none() {
            return Ok(());
        }
        let made = files.moved_to(&self.dir);
        for (from, to) in [(&made.mem, &files.mem), (&made.state, &files.state)] {
            take_ownership(from)?;
            std::fs::rename(from, to)?;
        }
        if let Some(dir) = files.state.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Links a working set this VMM recorded (after its first invocation)
    /// for the snapshot it was restored from back beside that snapshot, if
    /// none is there yet. Its contents are the guest's doing: a restore
    /// checks them like any file (they only steer prefetching).
    pub fn collect_working_set(&mut self) {
        let Some(files) = &self.restored_from else {
            return;
        };
        let ws = |state: &Path| {
            let mut path = state.as_os_str().to_owned();
            path.push(".ws");
            PathBuf::from(path)
        };
        let (made, home) = (ws(&files.moved_to(&self.dir).state), ws(&files.state));
        if home.exists() {
            // Nothing to collect, now or later: no more checks on this
            // instance's warm invocations.
            self.restored_from = None;
            return;
        }
        if !made.exists() {
            return;
        }
        // A link (not a rename): the VMM's own name for it stays valid.
        let moved = take_ownership(&made).and_then(|()| std::fs::hard_link(&made, &home));
        if let Err(e) = moved {
            tracing::debug!("working set {} not kept: {e}", made.display());
        }
    }

    /// Sends a request; a non-2xx answer is an error carrying its message.
    pub fn call(
        &mut self,
        method: &'static str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<ApiResponse, VmmError> {
        let response = self.raw(
            method,
            path,
            body.map(|b| b.to_string().into_bytes()).as_deref(),
        )?;
        if !(200..300).contains(&response.status) {
            return Err(VmmError::Refused {
                id: self.id.clone(),
                method,
                path: path.into(),
                status: response.status,
                message: response
                    .fault_message()
                    .unwrap_or_else(|| String::from_utf8_lossy(&response.body).into_owned()),
            });
        }
        Ok(response)
    }

    /// Sends a request and returns whatever it answered.
    pub fn raw(
        &mut self,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<ApiResponse, VmmError> {
        let result = match (method, body) {
            ("GET", _) => self.client.get(path),
            ("POST", body) => self.client.post(path, body.unwrap_or_default()),
            (_, body) => self
                .client
                .request(method, path, Some(body.unwrap_or_default())),
        };
        result.map_err(|source| VmmError::Transport {
            id: self.id.clone(),
            method,
            path: path.into(),
            source,
        })
    }

    /// Waits for the guest's mailbox `ready`.
    pub fn wait_ready(&mut self) -> Result<(), VmmError> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = self.call("GET", "/ember/status", None)?.json();
            match status["guest"].as_str() {
                Some("ready") => return Ok(()),
                Some(s) if s.starts_with("stopped") => {
                    return Err(VmmError::NotListening {
                        id: self.id.clone(),
                        why: format!("the guest {s}"),
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(VmmError::NotListening {
                    id: self.id.clone(),
                    why: "the guest did not become ready".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        stop(&mut self.child, self.jailed.is_some());
        self.collect_working_set();
        if let Some((jail, uid)) = &self.jailed {
            jail.remove_leaf(&self.id);
            jail.give_back(*uid);
        }
        let _ = std::fs::remove_file(self.run_dir.join(format!("{}.pid", self.id)));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Files to write and where to say how it went.
type CgroupWrite = (
    Vec<(PathBuf, String)>,
    std::sync::mpsc::Sender<std::io::Result<()>>,
);

/// A cgroup limit being written ([`Vmm::limit_memory`]).
#[must_use = "wait for the limit before the VM serves"]
pub struct LimitWrite(Option<std::sync::mpsc::Receiver<std::io::Result<()>>>);

impl LimitWrite {
    /// Waits for the write; its error, if any.
    pub fn wait(self) -> std::io::Result<()> {
        match self.0 {
            None => Ok(()),
            Some(answer) => answer
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("the cgroup writer is gone"))),
        }
    }
}

fn write_all(files: &[(PathBuf, String)]) -> std::io::Result<()> {
    for (path, value) in files {
        std::fs::write(path, value)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// The thread that writes cgroup files for restores, so that a write
/// (~70 µs here) runs beside the snapshot load instead of before it.
fn start_cgroup_writer() -> std::sync::mpsc::Sender<CgroupWrite> {
    let (tx, rx) = std::sync::mpsc::channel::<CgroupWrite>();
    let started = std::thread::Builder::new()
        .name("ember_cgroups".into())
        .spawn(move || {
            while let Ok((files, done)) = rx.recv() {
                let _ = done.send(write_all(&files));
            }
        });
    if let Err(e) = started {
        tracing::warn!("no cgroup writer thread ({e}): limits are written in line");
    }
    tx
}

/// Whether /proc/meminfo says the host has swap.
fn host_swaps() -> bool {
    std::fs::read_to_string("/proc/meminfo").is_ok_and(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("SwapTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .is_some_and(|kib| kib > 0)
    })
}

/// Makes the snapshot files (`*.state`, `*.mem`, `*.ws`) under `dir`
/// readable by others, as a jailed VMM needs (files an unjailed emberd
/// wrote under umask 0077 are not). Returns how many it changed.
pub fn make_snapshots_readable(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut changed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => changed += make_snapshots_readable(&path),
            Ok(t) if t.is_file() && is_snapshot_file(&entry.file_name()) => {
                changed += usize::from(make_readable(&path).unwrap_or(false));
            }
            _ => {}
        }
    }
    changed
}

/// Whether `name` is a snapshot's file: its state, memory or working set.
fn is_snapshot_file(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    [".state", ".mem", ".ws"].iter().any(|e| name.ends_with(e))
}

/// Makes `file` readable by others if it is not (a jailed VMM reads it
/// under its own uid); whether it changed it.
fn make_readable(file: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file)?.permissions().mode();
    if mode & 0o004 != 0 {
        return Ok(false);
    }
    std::fs::set_permissions(
        file,
        std::fs::Permissions::from_mode((mode | 0o444) & 0o7755),
    )?;
    Ok(true)
}

/// A snapshot's two files (the shape of `snapshots::SnapshotFiles`).
pub type SnapshotPaths = crate::snapshots::SnapshotFiles;

/// Hard-links `file` at `link` (replacing what is there), making the inode
/// readable by others if it is not: a jailed VMM reads it under its own
/// uid. emberd's state directory itself stays closed to other users.
fn link_readable(file: &Path, at: &Path) -> std::io::Result<()> {
    make_readable(file)?;
    link(file, at)
}

/// Hard-links `file` at `at`, replacing what is there.
fn link(file: &Path, at: &Path) -> std::io::Result<()> {
    let linked = match std::fs::hard_link(file, at) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(at).and_then(|()| std::fs::hard_link(file, at))
        }
        other => other,
    };
    linked.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot link {} to {}: {e}", file.display(), at.display()),
        )
    })
}

/// Makes a file a jailed VMM wrote root's and read-only to others (so
/// that no later VMM given the same uid may change it).
fn take_ownership(file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(file, Some(0), Some(0))?;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644))
}

/// Ends a VMM. A jailed one is asked (SIGTERM to its keeper, which kills
/// the VMM, removes its cgroup leaf and exits), then killed if it has not
/// ended within a second.
fn stop(child: &mut Child, jailed: bool) {
    if jailed {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// What an ember-vmm exit status means (docs/vmm.md, "Exit codes").
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use ember_vmm::ExitCode;
    use std::os::unix::process::ExitStatusExt;
    let Some(code) = status.code() else {
        return match status.signal() {
            Some(signal) => format!("ember-vmm was killed by signal {signal}"),
            None => format!("ember-vmm ended ({status})"),
        };
    };
    let known = [
        (ExitCode::GuestCrashed, "the guest crashed"),
        (ExitCode::GuestTripleFault, "the guest triple-faulted"),
        (ExitCode::KvmError, "KVM stopped the vCPU"),
        (ExitCode::GuestUnresponsive, "the guest stopped answering"),
        (
            ExitCode::MemoryLimit,
            "the VM reached its memory limit (memory.max) and was killed",
        ),
        (
            ExitCode::BadSyscall,
            "ember-vmm made a system call its seccomp filter forbids",
        ),
        (ExitCode::GenericError, "ember-vmm failed"),
    ];
    match known.iter().find(|(c, _)| c.code() == code) {
        Some((_, what)) => format!("{what} (ember-vmm exit code {code})"),
        None if code > 128 => format!("ember-vmm was killed by signal {}", code - 128),
        None => format!("ember-vmm exited with code {code}"),
    }
}
fn write_pidfile(run_dir: &Path, id: &str, pid: u32, exe: &Path) -> Result<(), VmmError> {
    let path = run_dir.join(format!("{id}.pid"));
    let start = start_time(pid).unwrap_or(0);
    let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&path)?;
        writeln!(file, "{pid} {start} {}", exe.display())
    };
    write().map_err(|source| VmmError::Pidfile { path, source })
}

fn read_pidfile(path: &Path) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace();
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// The start time of `pid` in clock ticks since boot (/proc/PID/stat field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` runs `exe` and started at `start`. A jailed VMM's
/// keeper runs as another uid: its /proc/PID/exe needs CAP_SYS_PTRACE to
/// read, which emberd does not keep; its command line (readable by all)
/// names the binary as emberd started it.
fn process_is(pid: u32, start: u64, exe: &Path) -> bool {
    let canonical = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    let runs = match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(running) => running == canonical,
        Err(_) => std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|line| {
            let argv0 = line.split(|b| *b == 0).next().unwrap_or_default();
            std::fs::canonicalize(std::ffi::OsStr::from_bytes(argv0)).is_ok_and(|p| p == canonical)
        }),
    };
    runs && start_time(pid) == Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;

    fn jail(first: u32, ids: u32) -> Jail {
        Jail::new(
            first,
            ids,
            ember_vmm::jail::cgroup::Hierarchy::V2(PathBuf::from("/nonexistent")),
            PathBuf::from("ember/x"),
            32,
            None,
            1 << 30,
            Path::new("/tmp"),
        )
    }

    #[test]
    fn jail_ids_are_handed_out_once_and_taken_back() {
        let jail = jail(3_000_000, 2);
        let a = jail.take_id().unwrap();
        let b = jail.take_id().unwrap();
        assert_ne!(a, b);
        assert!([a, b].iter().all(|id| (3_000_000..3_000_002).contains(id)));
        assert_eq!(jail.take_id(), None, "the range is spent");
        jail.give_back(a);
        assert_eq!(jail.take_id(), Some(a));
        assert_eq!(jail.root_mount, Path::new("/tmp/.jail-root"));
        assert_eq!(
            jail.leaf_dirs("p1"),
            vec![PathBuf::from("/nonexistent/ember/x/p1")]
        );
    }

    #[test]
    fn snapshot_files_are_made_readable_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("ember-readable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("f/v1")).unwrap();
        let files = [
            "f/v1/template.state",
            "f/v1/template.mem",
            "f/v1/template.state.ws",
            "f/v1/module.wasm",
        ];
        for f in files {
            std::fs::write(dir.join(f), b"x").unwrap();
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(make_snapshots_readable(&dir), 3);
        let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("f/v1/template.mem"), 0o644);
        assert_eq!(mode("f/v1/module.wasm"), 0o600, "not a snapshot file");
        assert_eq!(make_snapshots_readable(&dir), 0, "once is enough");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exit_statuses_are_named() {
        let exited = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        assert!(
            describe_exit(exited(14)).contains("memory limit"),
            "{}",
            describe_exit(exited(14))
        );
        assert!(describe_exit(exited(148)).contains("seccomp"));
        assert!(describe_exit(exited(10)).contains("guest crashed"));
        assert_eq!(
            describe_exit(exited(137)),
            "ember-vmm was killed by signal 9"
        );
        assert_eq!(describe_exit(exited(77)), "ember-vmm exited with code 77");
        let signalled = std::process::ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(describe_exit(signalled), "ember-vmm was killed by signal 9");
    }

    #[test]
    fn a_linked_file_is_made_readable_and_ownership_is_taken_back() {
        let dir = std::env::temp_dir().join(format!("ember-stage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("template.mem");
        std::fs::write(&file, b"memory").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("link.mem");
        std::fs::write(&link, b"stale").unwrap();
        link_readable(&file, &link).unwrap();
        assert_eq!(
            std::fs::read(&link).unwrap(),
            b"memory",
            "the stale file is replaced"
        );
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        take_ownership(&file).unwrap();
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let missing = link_readable(&dir.join("none"), &link);
        assert!(missing.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_start_time_is_read_and_a_stranger_is_not_ours() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(start > 0);
        let exe = std::env::current_exe().unwrap();
        assert!(process_is(me, start, &exe));
        assert!(!process_is(me, start + 1, &exe));
        assert!(!process_is(me, start, Path::new("/bin/true")));
    }
}
