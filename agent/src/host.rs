//! The agent's state and its operations: deploy, invoke, list, remove;
//! the base snapshot, the prepared-VMM pool, instances, and the reaper.
//! Everything that talks to a VMM runs on a blocking thread.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ember_vmm::snapshot::memory::{self, SnapshotId};
use serde_json::json;
use tokio::sync::Notify;

use crate::functions::{random_u64, FunctionConfig, FunctionError, FunctionStore, FunctionVersion};
use crate::pool::{Affinity, Instance, Pools, Route, Start, AFFINITY_WAIT};
use crate::snapshots::{self, SnapshotError, SnapshotFiles, TemplateSpec};
use crate::supervisor::{LimitWrite, SpawnOptions, Supervisor, Vmm, VmmError};

/// The largest event, as in Lambda (and ember-vmm).
pub const MAX_EVENT_BYTES: usize = ember_abi::function::MAX_EVENT_BYTES;

/// How long an invocation waits for an instance when its function is at
/// its limit before it gets a 429.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Settings of the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The ember-vmm binary.
    pub vmm: PathBuf,
    /// The guest image.
    pub guest_image: PathBuf,
    /// Guest memory of every VM (the base snapshot's), MiB.
    pub base_mem_mib: usize,
    /// Prepared ember-vmm processes kept ready.
    pub prepared: usize,
    /// Memory the instances may claim in all, MiB (each claims its
    /// function's memory_mib, or 128, plus `vmm_overhead_mib`).
    pub memory_budget_mib: u64,
    /// What each VM uses beyond its function's memory, MiB: added to the
    /// claim and, jailed, to the cgroup's memory limit.
    pub vmm_overhead_mib: u64,
    /// How VMMs are confined (`None`: `--no-jail`).
    pub jail: Option<JailSettings>,
    /// ember-vmm's log level (its lines are forwarded into emberd's log).
    pub vmm_log_level: String,
    /// Async invocations, the journal, control actions.
    pub events: crate::events::EventSettings,
    /// Metaevents.
    pub triggers: crate::metaevents::TriggerSettings,
    /// The keep-alive and pre-warm policy of functions with `prewarm: auto`.
    pub prewarm_policy: crate::predict::Policy,
}

/// How emberd jails its VMMs (docs/security.md).
#[derive(Debug, Clone)]
pub struct JailSettings {
    /// The first uid (and gid) jailed VMMs run as.
    pub first_id: u32,
    /// How many ids from the first (the most VMMs at once).
    pub ids: u32,
    /// Each VM's pids.max.
    pub pids_max: u64,
    /// Each VM's cpu.max (quota, period µs), if any.
    pub cpu_max: Option<(u64, u64)>,
}

/// Threads and processes a jailed VMM may have: its keeper, the VMM
/// thread, vCPUs, the prefetcher and two start-up helpers, with room.
pub const VMM_PIDS_MAX: u64 = 32;

/// An error the API reports: status, kind, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Machine-readable kind.
    pub kind: &'static str,
    /// What went wrong.
    pub message: String,
    /// Seconds to wait, for a 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error of `status` and `kind`.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 429 `too_many_requests`, to be retried after a second.
    pub fn too_many(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(429, "too_many_requests", message)
        }
    }
}

impl From<FunctionError> for ApiError {
    fn from(e: FunctionError) -> Self {
        match e {
            FunctionError::NotFound(_) => ApiError::new(404, "not_found", e.to_string()),
            FunctionError::BadName(_) | FunctionError::BadFileName(_) => {
                ApiError::new(400, "bad_request", e.to_string())
            }
            FunctionError::Io { .. } => ApiError::new(500, "internal", e.to_string()),
        }
    }
}

impl From<SnapshotError> for ApiError {
    fn from(e: SnapshotError) -> Self {
        match &e {
            // The VMM refused the module: the deploy's fault.
            SnapshotError::Vmm(VmmError::Refused { path, message, .. })
                if path == "/ember/function" =>
            {
                ApiError::new(400, "invalid_function", message.clone())
            }
            _ => ApiError::new(500, "internal", e.to_string()),
        }
    }
}

impl From<VmmError> for ApiError {
    fn from(e: VmmError) -> Self {
        ApiError::new(500, "internal", e.to_string())
    }
}

/// Counters for `GET /metrics`.
#[derive(Default)]
pub struct Metrics {
    /// Invocations answered.
    pub invocations: AtomicU64,
    /// Warm starts.
    pub warm: AtomicU64,
    /// Restored starts.
    pub restored: AtomicU64,
    /// Starts on an instance restored ahead of the arrival.
    pub prewarmed: AtomicU64,
    /// Function errors by kind.
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Invocation latency histogram (µs upper bounds → count).
    pub latency: Mutex<Histogram>,
    /// Restore latency histogram.
    pub restore_latency: Mutex<Histogram>,
}

/// A latency histogram with fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Bucket upper bounds, seconds.
    pub bounds: Vec<f64>,
    /// Counts per bucket (cumulative when rendered).
    pub counts: Vec<u64>,
    /// Sum of observations, seconds.
    pub sum: f64,
    /// Observations.
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        Histogram {
            counts: vec![0; bounds.len()],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// The agent.
pub struct Agent {
    /// Its settings.
    pub config: AgentConfig,
    pub(crate) supervisor: Supervisor,
    /// The functions.
    pub store: FunctionStore,
    /// The base snapshot.
    pub base: SnapshotFiles,
    /// The base snapshot's id: a template whose first layer is not this
    /// one was built on another base (another guest image) and is rebuilt.
    base_id: SnapshotId,
    /// Instances and affinity.
    pub pools: Mutex<Pools>,
    prepared: Mutex<Vec<Vmm>>,
    next_vmm: AtomicU64,
    /// Signalled whenever an instance becomes idle or goes away.
    pub changed: Notify,
    /// Signalled when a prepared VMM was taken: the pool wants a refill.
    pub refill_wanted: Notify,
    /// Counters.
    pub metrics: Metrics,
    /// Invocations in flight.
    pub in_flight: AtomicU64,
    /// Draining for shutdown: new invocations are refused.
    pub draining: AtomicBool,
    deploying: Mutex<()>,
    /// The current version of every function (the store's, in memory:
    /// invocations do not read the disk).
    current: Mutex<HashMap<String, Arc<FunctionVersion>>>,
    /// Templates checked since start (checked once, not per restore).
    pub(crate) validated: Mutex<HashSet<(String, u64)>>,
    /// One template check or build at a time.
    templates: Mutex<()>,
    /// Invocations waiting for an instance.
    queued: Arc<AtomicU64>,
    /// Invocation ids: a random part drawn at start, then a counter.
    invocation_ids: (u64, AtomicU64),
    /// Async invocations and the failure journal.
    pub events: crate::events::Events,
    /// The metadata store and the metaevent rules.
    pub triggers: crate::metaevents::Triggers,
    /// The schedules.
    pub schedules: crate::schedules::Schedules,
    /// Arrival histories and the pre-warm policy's plans.
    pub prewarm: crate::prewarm::Prewarm,
    /// Itself, for control actions that run on threads of their own.
    pub(crate) me: Weak<Agent>,
    /// Versions (their deploy ids) whose template cannot be rebuilt.
    pub(crate) broken: Mutex<HashSet<u64>>,
    /// Template rebuilds per version since start (0: the deploy's).
    pub(crate) generations: Mutex<HashMap<(String, u64), u64>>,
}

/// A served invocation, for the API to turn into a response.
pub struct Served {
    /// The VMM's answer.
    pub response: ember_vmm::api::client::ApiResponse,
    /// The instance.
    pub instance: String,
    /// The version.
    pub version: u64,
    /// Warm or restored.
    pub start: Start,
    /// Affinity, when asked for.
    pub affinity: Option<Affinity>,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ApiError {
    move |e| ApiError::new(500, "internal", format!("{what}: {e}"))
}

impl Agent {
    /// Opens the state directory, cleans up after a crashed predecessor,
    /// and makes sure the base snapshot exists (building it if need be).
    pub fn start(config: AgentConfig) -> Result<Arc<Agent>, ApiError> {
        let run_dir = config.state_dir.join("vms");
        let snap_dir = config.state_dir.join("snapshots");
        for dir in [&run_dir, &snap_dir] {
            std::fs::create_dir_all(dir)
                .map_err(io_err(format!("cannot create {}", dir.display())))?;
        }
        let mut supervisor =
            Supervisor::new(config.vmm.clone(), run_dir.clone(), &config.vmm_log_level)
                .map_err(io_err("cannot start the VMM log thread".into()))?;
        let compile_cache = config.state_dir.join("compiled");
        std::fs::create_dir_all(&compile_cache)
            .map_err(io_err(format!("cannot create {}", compile_cache.display())))?;
        supervisor.compile_cache = Some(compile_cache);
        let stale = supervisor.reap_stale();
        match &config.jail {
            Some(settings) => {
                // Snapshots an unjailed emberd wrote (umask 0077): a
                // jailed VMM reads them under its own uid.
                let changed = ["snapshots", "functions"]
                    .iter()
                    .map(|d| crate::supervisor::make_snapshots_readable(&config.state_dir.join(d)))
                    .sum::<usize>();
                if changed > 0 {
                    tracing::info!("made {changed} snapshot files readable to jailed VMMs");
                }
                supervisor.jail = Some(Arc::new(
                    make_jail(&config, settings, &run_dir).map_err(|e| {
                        ApiError::new(
                            500,
                            "cannot_jail",
                            format!("emberd cannot jail its VMMs: {e}. Fix that, or start emberd with --no-jail to run every VMM unconfined (development only)"),
                        )
                    })?,
                ));
            }
            None => tracing::warn!(
                "--no-jail: every ember-vmm runs unconfined, as emberd's user, with no cgroup: a guest that escapes into its VMM gets the host. Development only (docs/security.md)"
            ),
        }
        // A start that fails from here on (a VMM that cannot start, a
        // journal that cannot be used) removes the cgroup parent it made.
        let mut undo_cgroups = RemoveCgroupsOnDrop(supervisor.jail.clone());
        if stale > 0 {
            tracing::warn!("killed {stale} ember-vmm processes a previous emberd left running");
        }
        // The journal first: one that cannot be used stops emberd before
        // anything else is touched.
        let journal = crate::journal::Journal::open(&config.state_dir.join("journal.db"))
            .map_err(|e| ApiError::new(500, "journal_unusable", e))?;
        let triggers = crate::metaevents::Triggers::open(&journal, config.triggers.clone())
            .map_err(|e| ApiError::new(500, "journal_unusable", e))?;
        let schedules = crate::schedules::Schedules::open(&journal)
            .map_err(|e| ApiError::new(500, "journal_unusable", e))?;
        let events = crate::events::Events::open(journal, config.events.clone())
            .map_err(|e| ApiError::new(500, "journal_unusable", e))?;
        let store = FunctionStore::open(config.state_dir.join("functions"))?;
        let cleaned = store.clean();
        if cleaned > 0 {
            tracing::warn!("removed {cleaned} versions that interrupted deploys left behind");
        }
        let key = snapshots::base_key(&config.guest_image, config.base_mem_mib)?;
        let base_dir = snap_dir.join(format!("base-{key}"));
        std::fs::create_dir_all(&base_dir)
            .map_err(io_err(format!("cannot create {}", base_dir.display())))?;
        let base = SnapshotFiles::in_dir(&base_dir, "base");
        // Temporary files of a base build that was interrupted.
        if let Ok(entries) = std::fs::read_dir(&base_dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().contains(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if !valid_snapshot(&base, config.base_mem_mib, None) {
            tracing::info!("building the base snapshot in {}", base_dir.display());
            let stages = snapshots::build_base(
                &supervisor,
                &config.guest_image,
                config.base_mem_mib,
                &base,
                mib_bytes(config.base_mem_mib as u64 + config.vmm_overhead_mib),
            )?;
            tracing::info!("base snapshot built: {:?}", stages.0);
        }
        let base_id = ember_vmm::persist::MicrovmState::read(&base.state)
            .map_err(|e| {
                ApiError::new(
                    500,
                    "base_snapshot_unusable",
                    format!(
                        "the base snapshot {} is unusable: {e}",
                        base.state.display()
                    ),
                )
            })?
            .id;
        // Bases of other keys (another image, format or host) are stale.
        if let Ok(entries) = std::fs::read_dir(&snap_dir) {
            for entry in entries.flatten() {
                if entry.path() != base_dir {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let prewarm = crate::prewarm::Prewarm::new(config.prewarm_policy);
        let agent = Arc::new_cyclic(|me| Agent {
            me: me.clone(),
            prewarm,
            events,
            triggers,
            schedules,
            broken: Mutex::new(HashSet::new()),
            generations: Mutex::new(HashMap::new()),
            config,
            supervisor,
            store,
            base,
            base_id,
            pools: Mutex::new(Pools::default()),
            prepared: Mutex::new(Vec::new()),
            next_vmm: AtomicU64::new(0),
            changed: Notify::new(),
            refill_wanted: Notify::new(),
            metrics: Metrics::default(),
            in_flight: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            deploying: Mutex::new(()),
            current: Mutex::new(HashMap::new()),
            validated: Mutex::new(HashSet::new()),
            templates: Mutex::new(()),
            queued: Arc::new(AtomicU64::new(0)),
            invocation_ids: (random_u64(), AtomicU64::new(0)),
        });
        {
            let mut current = lock(&agent.current);
            for v in agent.store.list() {
                current.insert(v.name.clone(), Arc::new(v));
            }
        }
        agent.refill_prepared();
        undo_cgroups.0 = None;
        Ok(agent)
    }

    /// A new invocation id: 32 hex digits, unique across emberd's restarts
    /// (a random half drawn at start, a counter).
    pub fn new_invocation_id(&self) -> String {
        let (boot, next) = &self.invocation_ids;
        format!(
            "{boot:016x}{:016x}",
            next.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    fn vmm_id(&self, what: &str) -> String {
        format!("{what}{}", self.next_vmm.fetch_add(1, Ordering::Relaxed))
    }

    /// A prepared ember-vmm of the base's shape (from the pool, else new).
    fn take_prepared(&self) -> Result<Vmm, VmmError> {
        self.refill_wanted.notify_one();
        loop {
            let ready = lock(&self.prepared).pop();
            match ready {
                Some(mut vmm) => {
                    if !vmm.exited() {
                        return Ok(vmm);
                    }
                }
                None => return self.spawn_prepared(),
            }
        }
    }

    fn spawn_prepared(&self) -> Result<Vmm, VmmError> {
        let mem = self.config.base_mem_mib.to_string();
        // Until it is given a function: room for any (lowered at the
        // restore, [`Agent::stage_for`]).
        let options = SpawnOptions {
            memory_max: Some(mib_bytes(
                self.config.base_mem_mib as u64 + self.config.vmm_overhead_mib,
            )),
            read_only: Vec::new(),
        };
        self.supervisor.spawn(
            &self.vmm_id("p"),
            &["--prepare", "--mem-size-mib", &mem, "--vcpus", "1"],
            &options,
        )
    }

    /// The memory an instance of `v` may use, MiB: its function's
    /// `memory_mib` (else [`DEFAULT_MEMORY_MIB`]) and the VMM's overhead.
    /// What the budget counts and, jailed, the cgroup enforces.
    pub fn instance_memory_mib(&self, v: &FunctionVersion) -> u64 {
        self.function_memory_mib(v) + self.config.vmm_overhead_mib
    }

    /// The linear memory limit of `v`: its `memory_mib`, else 128 MiB or
    /// half the VM's memory, whichever is less (the runtime, the module
    /// and the mailbox need the rest).
    pub fn function_memory_mib(&self, v: &FunctionVersion) -> u64 {
        v.config
            .memory_mib
            .unwrap_or(DEFAULT_MEMORY_MIB.min(self.config.base_mem_mib as u64 / 2))
    }

    /// Readies `vmm` to be restored from `files` for `v`: its memory limit
    /// lowered to the function's, the files linked into its directory.
    /// Returns the files as the VMM is to be told of them.
    fn stage_for(
        &self,
        vmm: &mut Vmm,
        v: &FunctionVersion,
        files: &SnapshotFiles,
    ) -> Result<(SnapshotFiles, LimitWrite), ApiError> {
        let limit = vmm.limit_memory(mib_bytes(self.instance_memory_mib(v)));
        let staged = vmm
            .stage_snapshot(files)
            .map_err(io_err(format!("cannot give {} its snapshot", vmm.id)))?;
        Ok((staged, limit))
    }

    /// Tops the prepared pool up (blocking; call on a blocking thread).
    pub fn refill_prepared(&self) {
        while lock(&self.prepared).len() < self.config.prepared {
            match self.spawn_prepared() {
                Ok(vmm) => lock(&self.prepared).push(vmm),
                Err(e) => {
                    tracing::error!("cannot prepare an ember-vmm: {e}");
                    return;
                }
            }
        }
    }

    /// Deploys a new version: stores it, builds its template, makes it
    /// current. Returns its description and the stages' times.
    pub fn deploy(
        &self,
        name: &str,
        config: FunctionConfig,
        module: &[u8],
        files: &[(String, Vec<u8>)],
    ) -> Result<serde_json::Value, ApiError> {
        let _one_at_a_time = lock(&self.deploying);
        let started = Instant::now();
        config
            .check()
            .map_err(|e| ApiError::new(400, "bad_request", e))?;
        if let Some(mib) = config.memory_mib {
            if mib as usize >= self.config.base_mem_mib {
                return Err(ApiError::new(
                    400,
                    "bad_request",
                    format!(
                        "memory_mib {mib} does not fit this host's VMs of {} MiB (the runtime and mailbox need room too)",
                        self.config.base_mem_mib
                    ),
                ));
            }
        }
        let version = self
            .store
            .add_version(name, config.clone(), module, files)?;
        let result = self.build_template(&version);
        match result {
            Ok((stages, loaded)) => {
                self.store.set_current(name, version.version)?;
                tracing::info!(
                    function = name,
                    version = version.version,
                    "deployed in {:.1} ms",
                    started.elapsed().as_secs_f64() * 1e3
                );
                lock(&self.validated).insert((name.to_string(), version.version));
                lock(&self.current).insert(name.to_string(), Arc::new(version.clone()));
                // Idle instances of older versions go now; busy ones after
                // their invocation.
                self.reap(false);
                Ok(json!({
                    "name": name,
                    "version": version.version,
                    "function": loaded,
                    "stages": stages.0,
                    "total_us": started.elapsed().as_micros() as u64,
                }))
            }
            Err(e) => {
                // The message may quote the guest: escaped and cut as the
                // VMMs' own lines are.
                tracing::warn!(
                    function = name,
                    version = version.version,
                    "deploy refused: {}",
                    crate::supervisor::log::sanitize(e.message.as_bytes())
                );
                self.store.discard(name, version.version);
                Err(e)
            }
        }
    }

    /// Admits an invocation (in the async handler, before it takes a
    /// blocking thread), or refuses it with a 429.
    pub fn admit(&self) -> Result<Queued, ApiError> {
        Queued::enter(&self.queued)
    }

    /// The current version of `name`.
    pub fn current(&self, name: &str) -> Result<Arc<FunctionVersion>, ApiError> {
        lock(&self.current)
            .get(name)
            .cloned()
            .ok_or_else(|| FunctionError::NotFound(name.into()).into())
    }

    /// Every function's current version, by name.
    pub fn functions(&self) -> Vec<FunctionVersion> {
        let mut list: Vec<FunctionVersion> = lock(&self.current)
            .values()
            .map(|v| (**v).clone())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn function_body(&self, v: &FunctionVersion) -> serde_json::Value {
        let files: Vec<serde_json::Value> = v
            .files
            .iter()
            .map(|f| json!({ "name": f, "host_path": self.store.file_path(&v.name, v.version, f) }))
            .collect();
        let mut body = json!({
            "module_path": self.store.module_path(&v.name, v.version),
            "files": files,
            "args": v.config.args,
            "env": v.config.env,
            "timeout_ms": v.config.timeout_ms,
        });
        body["memory_mib"] = json!(self.function_memory_mib(v));
        body
    }

    fn build_template(
        &self,
        v: &FunctionVersion,
    ) -> Result<(snapshots::Stages, serde_json::Value), ApiError> {
        let mut vmm = self.take_prepared()?;
        vmm.build_template_of(&v.name, v.version);
        let spec = TemplateSpec {
            function: self.function_body(v),
            compile_cache: self.supervisor.compile_cache.clone(),
        };
        let files = self.store.template(&v.name, v.version);
        let built = snapshots::build_template(&mut vmm, &self.base, &spec, &files);
        drop(vmm);
        match built {
            Err(SnapshotError::Vmm(VmmError::Refused {
                ref path,
                ref message,
                ..
            })) if path == "/snapshot/load" => {
                // The base snapshot itself is refused: rebuild it, once.
                self.rebuild_base(v, message)?;
                let mut vmm = self.take_prepared()?;
                vmm.build_template_of(&v.name, v.version);
                let built = snapshots::build_template(&mut vmm, &self.base, &spec, &files);
                drop(vmm);
                Ok(built?)
            }
            built => Ok(built?),
        }
    }

    /// The template of the current version of `function`, rebuilt if it
    /// is missing or corrupt (or, with `rebuild`, in any case: a restore
    /// refused it).
    pub(crate) fn template(
        &self,
        v: &FunctionVersion,
        rebuild: bool,
    ) -> Result<SnapshotFiles, ApiError> {
        let files = self.store.template(&v.name, v.version);
        let key = (v.name.clone(), v.version);
        if lock(&self.validated).contains(&key) {
            return Ok(files);
        }
        // One check or rebuild at a time; another may have done it.
        let _one = lock(&self.templates);
        if lock(&self.validated).contains(&key) {
            return Ok(files);
        }
        if rebuild {
            self.build_template(v)?;
        } else if !valid_snapshot(&files, self.config.base_mem_mib, Some(&self.base_id)) {
            tracing::warn!(
                "template of {} v{} is missing or corrupt: rebuilding",
                v.name,
                v.version
            );
            self.build_template(v)?;
        }
        lock(&self.validated).insert(key);
        Ok(files)
    }

    /// Serves one invocation (blocking; call on a blocking thread).
    pub fn invoke(
        &self,
        name: &str,
        event: &[u8],
        instance: Option<&str>,
        key: Option<&str>,
    ) -> Result<Served, ApiError> {
        let shutting_down = || ApiError::new(503, "shutting_down", "emberd is shutting down");
        if self.draining.load(Ordering::Relaxed) {
            return Err(shutting_down());
        }
        if event.len() > MAX_EVENT_BYTES {
            return Err(ApiError::new(
                413,
                "payload_too_large",
                format!(
                    "the event is {} bytes; the limit is {MAX_EVENT_BYTES}",
                    event.len()
                ),
            ));
        }
        let mut v: Arc<FunctionVersion>;
        // An arrival of a function that exists; its end is recorded when
        // this drops, whatever the outcome.
        self.current(name)?;
        let _arrival = self.prewarm.arrived(name);
        let deadline = Instant::now() + QUEUE_WAIT;
        let mut affinity_deadline: Option<Instant> = None;
        let mut waited = false;
        let (id, mut vmm, start, affinity, idled) = loop {
            if self.draining.load(Ordering::Relaxed) {
                return Err(shutting_down());
            }
            // A deploy or delete while this request waited: route for what
            // is current now.
            v = self.current(name)?;
            if self.is_broken(&v) {
                return Err(ApiError::new(
                    503,
                    "broken",
                    format!(
                        "{name} v{} is broken: its template failed to restore and could not be rebuilt; deploy a new version",
                        v.version
                    ),
                ));
            }
            let max = v.config.max_concurrency as usize;
            let mut idle_died = false;
            // Decided under the lock; a Notified made there sees every
            // change after the decision.
            let (step, notified, dead) = {
                let mut pools = lock(&self.pools);
                let notified = self.changed.notified();
                match pools.route(name, v.uid, max, instance, key, waited) {
                    Route::Instance { id, affinity } => {
                        match pools.instances.get_mut(&id).and_then(|i| i.vmm.take()) {
                            Some(mut vmm) => {
                                if vmm.exited() {
                                    // Its VMM died while idle: forget it,
                                    // route again (a key bound to it misses);
                                    // dropped once the lock is released.
                                    let mut gone = pools.remove(&id);
                                    if let Some(instance) = gone.as_mut() {
                                        instance.vmm = Some(vmm);
                                    }
                                    idle_died = true;
                                    (Step::Again, notified, Some(gone.into_iter().collect()))
                                } else {
                                    if let Some(key) = key {
                                        pools.bind(name, key, &id);
                                    }
                                    let lone = pools
                                        .instances
                                        .values()
                                        .filter(|i| i.function == name)
                                        .count()
                                        == 1;
                                    let (start, idled) = match pools.instances.get_mut(&id) {
                                        Some(i) => {
                                            let start = if std::mem::take(&mut i.prewarmed) {
                                                Start::Prewarmed
                                            } else {
                                                Start::Warm
                                            };
                                            (start, Some((i.last_used.elapsed(), lone)))
                                        }
                                        None => (Start::Warm, None),
                                    };
                                    break (id, vmm, start, affinity, idled);
                                }
                            }
                            None => (Step::Again, notified, None),
                        }
                    }
                    Route::Restore { affinity } => {
                        let need = self.instance_memory_mib(&v);
                        let budget = self.config.memory_budget_mib;
                        let mut claimed: u64 = pools.instances.values().map(|i| i.memory_mib).sum();
                        // Over budget: idle instances (of any function)
                        // make room, least recently used first.
                        let mut evicted = Vec::new();
                        while claimed + need > budget {
                            let lru = pools
                                .instances
                                .values()
                                .filter(|i| i.vmm.is_some())
                                .min_by_key(|i| i.last_used)
                                .map(|i| i.id.clone());
                            let Some(lru) = lru else { break };
                            if let Some(gone) = pools.remove(&lru) {
                                claimed -= gone.memory_mib;
                                evicted.push(gone);
                            }
                        }
                        if claimed + need > budget {
                            drop(pools);
                            drop(evicted);
                            return Err(ApiError::too_many(format!(
                                "the host's memory budget ({budget} MiB) is spent by busy instances; retry"
                            )));
                        }
                        if !evicted.is_empty() {
                            tracing::info!(
                                "evicted {} idle instances to make room for {name}",
                                evicted.len()
                            );
                        }
                        // Counted from now on, so that concurrent restores
                        // respect the limits too.
                        let id = pools.new_id(name);
                        let generation = self.template_generation(&v);
                        pools.instances.insert(
                            id.clone(),
                            Instance::restoring(
                                &id,
                                name,
                                (v.version, v.uid),
                                need,
                                generation,
                                false,
                            ),
                        );
                        if let Some(key) = key {
                            pools.bind(name, key, &id);
                        }
                        (Step::Restore { id, affinity }, notified, Some(evicted))
                    }
                    Route::NoSuchInstance(message) => {
                        return Err(ApiError::new(404, "not_found", message))
                    }
                    Route::Wait => (Step::Wait, notified, None),
                    Route::Full => (Step::Full, notified, None),
                }
            };
            drop(dead);
            if idle_died {
                self.crash_detected(&v, None, "an idle instance's ember-vmm exited");
            }
            match step {
                Step::Again => {}
                Step::Restore { id, affinity } => match self.restore(&id, &v, false) {
                    Ok(vmm) => {
                        if let Some(i) = lock(&self.pools).instances.get_mut(&id) {
                            i.restoring = false;
                            i.vmm_id = Some(vmm.id.clone());
                        }
                        break (id, vmm, Start::Restored, affinity, None);
                    }
                    Err(e) => {
                        lock(&self.pools).remove(&id);
                        self.changed.notify_waiters();
                        return Err(e);
                    }
                },
                Step::Wait => {
                    let until = *affinity_deadline.get_or_insert(Instant::now() + AFFINITY_WAIT);
                    match until.checked_duration_since(Instant::now()) {
                        Some(left) if !left.is_zero() => wait_for(notified, left),
                        _ => waited = true,
                    }
                }
                Step::Full => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => wait_for(notified, left),
                    _ => {
                        return Err(ApiError::too_many(format!(
                            "{name} is at its limit of {} busy instances; retry",
                            v.config.max_concurrency
                        )))
                    }
                },
            }
        };
        match idled {
            Some((idle, lone)) => self
                .prewarm
                .taken(name, idle, start == Start::Prewarmed, lone),
            None => self.prewarm.cold(name),
        }
        let span = tracing::Span::current();
        span.record("instance", id.as_str());
        span.record("version", v.version);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = vmm.raw("POST", "/ember/invoke", Some(event));
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let counter = match start {
            Start::Warm => &self.metrics.warm,
            Start::Restored => &self.metrics.restored,
            Start::Prewarmed => &self.metrics.prewarmed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut crashed = None;
        let (response, keep) = match result {
            Ok(response) => {
                let error = response
                    .header(ember_vmm::api::parsed_request::FUNCTION_ERROR_HEADER)
                    .map(str::to_string);
                // A timed-out or crashed instance is never reused.
                let keep = response.status == 200
                    && !matches!(error.as_deref(), Some("timeout" | "crash"))
                    && !vmm.exited();
                if error.as_deref() == Some("crash") {
                    crashed = Some("the instance crashed while serving".to_string());
                }
                match error.as_deref() {
                    Some(kind) if !keep => tracing::warn!(
                        kind,
                        "function error; the instance is destroyed, never reused"
                    ),
                    Some(kind) => tracing::info!(kind, "function error"),
                    None if !keep => tracing::warn!(
                        status = response.status,
                        "ember-vmm answered {}; the instance is destroyed",
                        response.status
                    ),
                    None => tracing::debug!("served"),
                }
                (response, keep)
            }
            Err(e) => {
                // Why the VMM ended, if it did (a kill at its memory limit, say).
                let why = vmm
                    .exit_reason(Duration::from_millis(200))
                    .map_or_else(|| e.to_string(), |reason| format!("{reason} ({e})"));
                tracing::warn!("the instance stopped while serving: {why}; it is destroyed");
                let message = format!("the instance stopped while serving: {why}");
                crashed = Some(message.clone());
                let body = json!({ "error": { "kind": "crash", "message": message } });
                let response = ember_vmm::api::client::ApiResponse {
                    status: 200,
                    headers: vec![(
                        ember_vmm::api::parsed_request::FUNCTION_ERROR_HEADER.to_ascii_lowercase(),
                        "crash".into(),
                    )],
                    body: body.to_string().into_bytes(),
                };
                (response, false)
            }
        };
        // A working set the instance recorded (after its first answer)
        // goes beside its template: jailed, the VMM wrote it in its own
        // directory. Two stats when there is nothing to do.
        vmm.collect_working_set();
        self.finish(&id, vmm, keep);
        if let Some(message) = crashed {
            self.crash_detected(&v, Some(&id), &message);
        }
        Ok(Served {
            response,
            instance: id,
            version: v.version,
            start,
            affinity,
        })
    }

    /// Restores instance `id` of `v` from its template into a prepared VMM.
    /// A template ember-vmm refuses twice is rebuilt (a control action);
    /// one whose rebuild fails marks the version broken. `ahead`: no
    /// request waits for it (pre-warming), so its guest touches the
    /// template's working set before serving, and its first invocation
    /// runs nearly as fast as a warm one.
    fn restore(&self, id: &str, v: &FunctionVersion, ahead: bool) -> Result<Vmm, ApiError> {
        let mut started = None;
        let mut refusals = 0;
        let mut other_failures = 0;
        let vmm = loop {
            let template = self.template(v, false)?;
            // From the first load request (a template check is not a restore).
            started.get_or_insert_with(Instant::now);
            let mut vmm = self.take_prepared()?;
            // Tagged before the load: what ember-vmm says of it is the instance's.
            vmm.serve_instance(id, &v.name, v.version);
            let (staged, limit) = self.stage_for(&mut vmm, v, &template)?;
            let e = match vmm.call(
                "PUT",
                "/snapshot/load",
                Some(&staged.load_body(false, ahead)),
            ) {
                // The function's memory limit, written beside the load,
                // holds before the VM serves (written, or the VM goes).
                Ok(_) => match limit.wait() {
                    Ok(()) => break vmm,
                    Err(e) => {
                        return Err(io_err(format!("cannot set the memory limit of {}", vmm.id))(e))
                    }
                },
                Err(e) => e,
            };
            drop(vmm);
            if !matches!(e, VmmError::Refused { .. }) {
                // The VMM died or did not answer: another one, once.
                other_failures += 1;
                tracing::warn!(
                    "restoring {} v{} failed ({e}); retrying in another VMM",
                    v.name,
                    v.version
                );
                if other_failures > 1 {
                    return Err(e.into());
                }
                continue;
            }
            refusals += 1;
            tracing::warn!(
                "ember-vmm refused the template of {} v{} ({e})",
                v.name,
                v.version
            );
            // Once: maybe this VMM's doing. Twice: rebuild. Refused after
            // the rebuild too: give up.
            match refusals {
                1 => {}
                2 => self.rebuild_refused_template(v, &e)?,
                _ => return Err(e.into()),
            }
        };
        let started = started.unwrap_or_else(Instant::now);
        lock(&self.metrics.restore_latency).observe(started.elapsed().as_secs_f64());
        lock(&self.triggers.live).restored(started.elapsed().as_secs_f64() * 1e3);
        tracing::info!(
            instance = id,
            version = v.version,
            vmm = %vmm.id,
            pid = vmm.pid(),
            "restored into ember-vmm {} in {} us",
            vmm.id,
            started.elapsed().as_micros()
        );
        // Set once for the instance's life: ember-vmm answers an invocation
        // by the time limit plus its grace (and a reactor's rebuild
        // allowance); wait that long, and a margin.
        vmm.set_timeout(
            Duration::from_millis(v.config.timeout_ms) + Duration::from_secs(12 + 2 + 5),
        );
        Ok(vmm)
    }

    /// Puts an instance back after an invocation, or destroys it (it
    /// failed, was deleted meanwhile, or its function was redeployed).
    fn finish(&self, id: &str, vmm: Vmm, keep: bool) {
        let doomed = {
            let mut pools = lock(&self.pools);
            let current = pools
                .instances
                .get(id)
                .and_then(|i| lock(&self.current).get(&i.function).map(|v| v.uid));
            match pools.instances.get_mut(id) {
                Some(instance) if keep && current == Some(instance.uid) => {
                    instance.vmm = Some(vmm);
                    instance.last_used = Instant::now();
                    instance.served += 1;
                    None
                }
                _ => {
                    pools.remove(id);
                    Some(vmm)
                }
            }
        };
        drop(doomed);
        self.changed.notify_waiters();
    }

    /// Removes idle instances the pre-warm policy lets go (never later
    /// than their function's `keep_alive_s`), of an old version, or all
    /// idle ones with `all`; returns how many.
    pub fn reap(&self, all: bool) -> usize {
        let now = Instant::now();
        let current = lock(&self.current).clone();
        let plans = self.plans(&current, self.prewarm.ms(now));
        self.reap_planned(all, now, &current, &plans)
    }

    /// Every current function's plan at `now_ms` (the fixed keep-alive
    /// for `prewarm: off`).
    fn plans(
        &self,
        current: &HashMap<String, Arc<FunctionVersion>>,
        now_ms: u64,
    ) -> HashMap<String, crate::predict::Plan> {
        current
            .iter()
            .map(|(name, v)| {
                let auto = v.config.prewarm == crate::functions::Prewarm::Auto;
                let plan = self.prewarm.plan(name, v.config.keep_alive_s, auto, now_ms);
                (name.clone(), plan)
            })
            .collect()
    }

    /// [`Agent::reap`] with the plans made at `now`.
    fn reap_planned(
        &self,
        all: bool,
        now: Instant,
        current: &HashMap<String, Arc<FunctionVersion>>,
        plans: &HashMap<String, crate::predict::Plan>,
    ) -> usize {
        let now_ms = self.prewarm.ms(now);
        let doomed: Vec<(Instance, bool)> = {
            let mut pools = lock(&self.pools);
            // Instances per function (busy, idle and restoring): the last
            // one may be kept longer or shorter than the others.
            let mut left: HashMap<String, usize> = HashMap::new();
            for i in pools.instances.values() {
                *left.entry(i.function.clone()).or_default() += 1;
            }
            // The oldest idle first, as the policy's monotone keeping
            // reaps them.
            let mut idle: Vec<&Instance> = pools
                .instances
                .values()
                .filter(|i| i.vmm.is_some())
                .collect();
            idle.sort_by_key(|i| i.last_used);
            let mut ids: Vec<(String, bool)> = Vec::new();
            for i in idle {
                let count = left.entry(i.function.clone()).or_default();
                let lone = *count == 1;
                let keep = current
                    .get(&i.function)
                    .filter(|v| v.uid == i.uid)
                    .is_some_and(|v| {
                        let cap = Duration::from_secs(v.config.keep_alive_s);
                        now.saturating_duration_since(i.last_used) <= cap
                            && plans
                                .get(&i.function)
                                .is_none_or(|p| p.keep(self.prewarm.ms(i.last_used), now_ms, lone))
                    });
                if all || !keep {
                    *count -= 1;
                    ids.push((i.id.clone(), lone));
                }
            }
            ids.iter()
                .filter_map(|(id, lone)| Some((pools.remove(id)?, *lone)))
                .collect()
        };
        let n = doomed.len();
        for (i, lone) in &doomed {
            let idle = now.saturating_duration_since(i.last_used);
            tracing::debug!(
                "reaped instance {} of {} (idle {idle:?}{})",
                i.id,
                i.function,
                if *lone { ", its last" } else { "" }
            );
            self.prewarm.reaped(&i.function, idle, i.prewarmed, *lone);
        }
        drop(doomed);
        if n > 0 {
            self.changed.notify_waiters();
        }
        n
    }

    /// Restores instances ahead of the arrivals the pre-warm policy
    /// expects, then reaps what it lets go (blocking: call on a blocking
    /// thread, a few times a second).
    pub fn prewarm_tick(&self) {
        if self.draining.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let now_ms = self.prewarm.ms(now);
        let current = lock(&self.current).clone();
        let plans = self.plans(&current, now_ms);
        for (name, v) in &current {
            let Some(plan) = plans.get(name).filter(|p| p.prewarm.is_some()) else {
                continue;
            };
            if self.is_broken(v) {
                continue;
            }
            // Idle instances, and those being restored, of this version.
            let ready = lock(&self.pools)
                .instances
                .values()
                .filter(|i| i.function == v.name && i.uid == v.uid)
                .filter(|i| i.vmm.is_some() || i.restoring)
                .count();
            let n = self.prewarm.take_prewarm(name, plan, now_ms, ready as u32);
            for _ in 0..n {
                self.prewarm_one(v);
            }
        }
        self.reap_planned(false, now, &current, &plans);
    }

    /// Restores one instance of `v` ahead of an expected arrival, if the
    /// function's instance limit and the memory budget leave room (a
    /// guess never evicts another instance).
    fn prewarm_one(&self, v: &Arc<FunctionVersion>) {
        let need = self.instance_memory_mib(v);
        let id = {
            let mut pools = lock(&self.pools);
            let count = pools
                .instances
                .values()
                .filter(|i| i.function == v.name && i.uid == v.uid)
                .count();
            let claimed: u64 = pools.instances.values().map(|i| i.memory_mib).sum();
            if count >= v.config.max_concurrency as usize
                || claimed + need > self.config.memory_budget_mib
            {
                tracing::debug!(function = %v.name, "no room to pre-warm an instance");
                return;
            }
            let id = pools.new_id(&v.name);
            let generation = self.template_generation(v);
            pools.instances.insert(
                id.clone(),
                Instance::restoring(&id, &v.name, (v.version, v.uid), need, generation, true),
            );
            id
        };
        match self.restore(&id, v, true) {
            Ok(vmm) => {
                tracing::debug!(function = %v.name, instance = %id, "pre-warmed");
                let mut pools = lock(&self.pools);
                match pools.instances.get_mut(&id) {
                    Some(i) => {
                        i.restoring = false;
                        i.vmm_id = Some(vmm.id.clone());
                        i.vmm = Some(vmm);
                        i.last_used = Instant::now();
                    }
                    // Deleted meanwhile: the VMM goes once unlocked.
                    None => {
                        drop(pools);
                        drop(vmm);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(function = %v.name, "pre-warming an instance failed: {}", e.message);
                lock(&self.pools).remove(&id);
            }
        }
        self.changed.notify_waiters();
    }

    /// Removes instance `id` (killing its VMM if idle; a busy one is
    /// destroyed when its invocation ends).
    pub fn delete_instance(&self, id: &str) -> Result<(), ApiError> {
        let removed = lock(&self.pools).remove(id);
        match removed {
            Some(instance) => {
                drop(instance);
                self.changed.notify_waiters();
                Ok(())
            }
            None => Err(ApiError::new(404, "not_found", format!("no instance {id}"))),
        }
    }

    /// Deletes a function, its versions and its instances.
    pub fn delete_function(&self, name: &str) -> Result<(), ApiError> {
        let _not_while_deploying = lock(&self.deploying);
        self.store.delete(name)?;
        lock(&self.current).remove(name);
        lock(&self.validated).retain(|(function, _)| function != name);
        self.prewarm.forget(name);
        let doomed: Vec<Instance> = {
            let mut pools = lock(&self.pools);
            let ids: Vec<String> = pools
                .instances
                .values()
                .filter(|i| i.function == name)
                .map(|i| i.id.clone())
                .collect();
            ids.iter().filter_map(|id| pools.remove(id)).collect()
        };
        drop(doomed);
        self.changed.notify_waiters();
        Ok(())
    }

    /// The instances, for `GET /instances`.
    pub fn instances(&self) -> serde_json::Value {
        let pools = lock(&self.pools);
        let now = Instant::now();
        let mut list: Vec<serde_json::Value> = pools
            .instances
            .values()
            .map(|i| {
                let keys: Vec<&str> = pools
                    .affinity
                    .iter()
                    .filter(|(_, id)| **id == i.id)
                    .map(|((_, k), _)| k.as_str())
                    .collect();
                json!({
                    "id": i.id,
                    "function": i.function,
                    "version": i.version,
                    "state": if i.vmm.is_some() { "idle" } else if i.restoring { "restoring" } else { "busy" },
                    "prewarmed": i.prewarmed,
                    "pid": i.vmm.as_ref().map(Vmm::pid),
                    "vmm": i.vmm_id,
                    "invocations": i.served,
                    "idle_s": now.duration_since(i.last_used).as_secs(),
                    "age_s": now.duration_since(i.created).as_secs(),
                    "affinity_keys": keys,
                    "template_generation": i.template_generation,
                })
            })
            .collect();
        list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        json!(list)
    }

    /// Stops every VM (shutdown).
    pub fn stop_all(&self) {
        let all: Vec<Instance> = {
            let mut pools = lock(&self.pools);
            let ids: Vec<String> = pools.instances.keys().cloned().collect();
            ids.iter().filter_map(|id| pools.remove(id)).collect()
        };
        drop(all);
        lock(&self.prepared).clear();
        // The cgroup parent of this state dir's VMs, once they are gone.
        if let Some(jail) = &self.supervisor.jail {
            jail.remove_cgroups();
        }
    }

    /// Prepared VMMs ready.
    pub fn prepared_count(&self) -> usize {
        lock(&self.prepared).len()
    }
}

/// What the invoke loop does next, once the pools are unlocked.
enum Step {
    /// Route again at once.
    Again,
    /// Restore into the placeholder instance `id`.
    Restore {
        id: String,
        affinity: Option<Affinity>,
    },
    /// Wait for the busy instance asked for.
    Wait,
    /// Wait for any instance of the function to be idle.
    Full,
}

/// A function's memory when it sets no `memory_mib`, MiB: its linear
/// memory's limit in the guest (less in VMs under 256 MiB:
/// [`Agent::function_memory_mib`]).
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// What a VMM and its guest use beyond the function's linear memory, MiB:
/// the guest kernel, runtime and compiled module, the VMM's own heap and
/// the pages a restore copies (measured: docs/security.md, "Memory").
pub const VMM_OVERHEAD_MIB: u64 = 64;

fn mib_bytes(mib: u64) -> u64 {
    mib << 20
}

/// Eight hex digits naming a state directory (its canonical path's
/// SHA-256): the VMs' cgroup parent is `ember/<tag>` on cgroup v1.
pub fn state_dir_tag(state_dir: &Path) -> String {
    use sha2::Digest;
    let state = std::fs::canonicalize(state_dir).unwrap_or(state_dir.to_path_buf());
    let digest = sha2::Sha256::digest(state.as_os_str().as_encoded_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes the cgroup leaves and parent the VMs of `state_dir` used on a
/// cgroup v1 host, once their processes are gone (waiting up to `patience`
/// for them to go): for whoever killed an emberd that could not clean up
/// (a restarted emberd also sweeps them). Returns whether all went.
pub fn remove_vm_cgroups(state_dir: &Path, patience: Duration) -> bool {
    use ember_vmm::jail::cgroup::{remove_parent, Hierarchy, CGROUP_ROOT};
    let Ok(hierarchy @ Hierarchy::V1 { .. }) = Hierarchy::detect(Path::new(CGROUP_ROOT)) else {
        return true;
    };
    let parent = PathBuf::from("ember").join(state_dir_tag(state_dir));
    remove_parent(&hierarchy, &parent, patience)
}

/// Removes a jail's cgroups when dropped, unless emptied first: what a
/// start that fails half-way leaves.
struct RemoveCgroupsOnDrop(Option<Arc<crate::supervisor::Jail>>);

impl Drop for RemoveCgroupsOnDrop {
    fn drop(&mut self) {
        if let Some(jail) = self.0.take() {
            jail.remove_cgroups();
        }
    }
}

/// Checks that this host can jail VMMs and readies what every jail uses:
/// the cgroup parent (`ember/<digest of the state dir>`, its stale leaves
/// removed), the root's mount point. Says exactly what is missing.
fn make_jail(
    config: &AgentConfig,
    settings: &JailSettings,
    run_dir: &Path,
) -> Result<crate::supervisor::Jail, String> {
    use ember_vmm::jail::cgroup::{Hierarchy, CGROUP_ROOT};
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("jailing needs root (namespaces, a uid per VM, cgroups)".into());
    }
    if !Path::new("/proc/self/ns/pid").exists() {
        return Err("this kernel has no namespaces (/proc/self/ns/pid is missing)".into());
    }
    let hierarchy = Hierarchy::detect(Path::new(CGROUP_ROOT)).map_err(|e| e.to_string())?;
    let tag = state_dir_tag(&config.state_dir);
    let parent = match &hierarchy {
        Hierarchy::V1 { .. } => PathBuf::from("ember").join(tag),
        Hierarchy::V2(root) => {
            // A delegated subtree: emberd's own cgroup. Processes may not
            // sit beside child cgroups with controllers: emberd moves into
            // a leaf of its own first.
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
                })
                .ok_or("cannot read emberd's cgroup v2 path from /proc/self/cgroup")?;
            let own = PathBuf::from(own.trim_start_matches('/'));
            let leaf = root.join(&own).join("emberd");
            std::fs::create_dir_all(&leaf)
                .and_then(|()| {
                    std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
                })
                .map_err(|e| {
                    format!(
                        "cannot move emberd into {} ({e}): is its cgroup delegated (Delegate=yes)?",
                        leaf.display()
                    )
                })?;
            own.join(format!("vms-{tag}"))
        }
    };
    hierarchy
        .prepare_parent(&parent)
        .map_err(|e| e.to_string())?;
    let jail = crate::supervisor::Jail::new(
        settings.first_id,
        settings.ids,
        hierarchy,
        parent,
        settings.pids_max,
        settings.cpu_max,
        mib_bytes(config.base_mem_mib as u64 + 64),
        run_dir,
    );
    std::fs::create_dir_all(&jail.root_mount)
        .map_err(|e| format!("cannot create {}: {e}", jail.root_mount.display()))?;
    Ok(jail)
}

/// Invocations admitted at once (serving or waiting for an instance),
/// well below tokio's 512 blocking threads; more get a 429 before they
/// take a thread.
pub const MAX_QUEUED: u64 = 256;

/// An invocation admitted (counted while it lives). It owns its count, so
/// that it can move onto the blocking thread that serves the invocation and
/// keep counting it after a client that hung up has dropped the handler.
pub struct Queued(Arc<AtomicU64>);

impl Queued {
    fn enter(count: &Arc<AtomicU64>) -> Result<Queued, ApiError> {
        if count.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            count.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::too_many(format!(
                "{MAX_QUEUED} invocations are already in emberd; retry"
            )));
        }
        Ok(Queued(count.clone()))
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits (on a blocking thread) until `notified` fires or `at_most` passed.
fn wait_for(notified: tokio::sync::futures::Notified<'_>, at_most: Duration) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            let _ = handle.block_on(async { tokio::time::timeout(at_most, notified).await });
        }
        Err(_) => std::thread::sleep(at_most.min(Duration::from_millis(10))),
    }
}

/// Whether a snapshot's files exist and pass the checks a load makes
/// before touching anything (container, consistency, memory files), and,
/// given `base`, whether its first memory layer is that snapshot's.
fn valid_snapshot(files: &SnapshotFiles, mem_mib: usize, base: Option<&SnapshotId>) -> bool {
    if !files.exist() {
        return false;
    }
    match ember_vmm::persist::MicrovmState::read(&files.state) {
        Ok(state) => {
            let dir = files.state.parent().unwrap_or(Path::new("."));
            let layers = memory::resolve_layers(&state.memory, dir, Some(&files.mem));
            state.mem_size_mib == mem_mib
                && base.is_none_or(|id| layers.first().is_some_and(|l| l.id == *id))
                && memory::check_layers(&layers, (mem_mib as u64) << 20).is_ok()
        }
        Err(e) => {
            tracing::warn!("snapshot {} is unusable: {e}", files.state.display());
            false
        }
    }
}

/// Locks, recovering from a poisoned lock (the data stays usable).
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_refuses_beyond_the_limit_and_frees_on_drop() {
        let count = Arc::new(AtomicU64::new(0));
        let admitted: Vec<Queued> = (0..MAX_QUEUED)
            .map(|_| Queued::enter(&count).expect("below the limit"))
            .collect();
        let refused = Queued::enter(&count).err().expect("at the limit");
        assert_eq!((refused.status, refused.retry_after), (429, Some(1)));
        assert_eq!(count.load(Ordering::Relaxed), MAX_QUEUED);
        drop(admitted);
        assert_eq!(count.load(Ordering::Relaxed), 0);
        assert!(Queued::enter(&count).is_ok());
    }
}
