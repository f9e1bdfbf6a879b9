//! `emberd`: the Ember host agent (docs/agent.md, docs/api.yaml).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use ember_agent::events::EventSettings;
use ember_agent::host::{Agent, AgentConfig};
use ember_agent::logging::LogFormat;
use ember_agent::metaevents::TriggerSettings;
use sd_notify::NotifyState;

/// The Ember host agent: functions, template snapshots, warm pools and
/// affinity routing, served as HTTP + JSON on a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "emberd", version)]
struct Args {
    /// The API socket, mode 0600 (default: $RUNTIME_DIRECTORY/ember.sock
    /// under systemd, else /run/ember/ember.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where functions, snapshots and VM files live (default:
    /// $STATE_DIRECTORY under systemd, else /var/lib/ember).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A JSON file that may set any of the options (the command line wins).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The ember-vmm binary (default: the one beside emberd).
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// The guest image (default: $EMBER_GUEST_IMAGE, else the installed
    /// one, ../share/ember/ember-guest from emberd's directory, else what
    /// ./scripts/guest-image prints in a source tree).
    #[arg(long, value_name = "PATH")]
    guest_image: Option<PathBuf>,
    /// Guest memory of every VM, MiB (untouched memory costs nothing).
    #[arg(long, value_name = "MIB")]
    vm_mem_mib: Option<usize>,
    /// Prepared ember-vmm processes kept ready for restores.
    #[arg(long, value_name = "N")]
    prepared: Option<usize>,
    /// Memory all instances may claim, MiB (default: half the host's).
    #[arg(long, value_name = "MIB")]
    memory_budget_mib: Option<u64>,
    /// How idle instances are kept and restored ahead of predicted
    /// arrivals: fixed, hybrid or ember (default ember; docs/prewarm.md).
    #[arg(long, value_name = "POLICY", value_parser = ["fixed", "hybrid", "ember"])]
    prewarm_policy: Option<String>,
    /// Log lines as `text` or `json` (one object per line). The level
    /// comes from $EMBER_LOG (default info).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// What ember-vmm logs (error, warn, info, debug); its lines go into
    /// emberd's log, tagged with the VMM and its instance.
    #[arg(long, value_name = "LEVEL")]
    vmm_log_level: Option<String>,
    /// Run every VMM unconfined: no namespaces, no uid of its own, no
    /// cgroup (development only; emberd warns at start). Without it,
    /// emberd refuses to start where it cannot jail (docs/security.md).
    #[arg(long)]
    no_jail: bool,
    /// The uids (and gids) jailed VMMs run as: FIRST:COUNT, one per VMM
    /// (default 3000000:65536).
    #[arg(long, value_name = "FIRST:COUNT")]
    jail_ids: Option<String>,
    /// Each VM's CPU bandwidth, as a cgroup's cpu.max: QUOTA_US/PERIOD_US
    /// (default: unlimited).
    #[arg(long, value_name = "QUOTA/PERIOD")]
    vm_cpu_max: Option<String>,
    /// What each VM may use beyond its function's memory_mib, MiB: the
    /// cgroup's memory limit and the budget's claim are their sum
    /// (default 64).
    #[arg(long, value_name = "MIB")]
    vmm_overhead_mib: Option<u64>,
}

/// The config file: the same options.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    vmm: Option<PathBuf>,
    guest_image: Option<PathBuf>,
    vm_mem_mib: Option<usize>,
    prepared: Option<usize>,
    memory_budget_mib: Option<u64>,
    prewarm_policy: Option<String>,
    log_format: Option<LogFormat>,
    vmm_log_level: Option<String>,
    no_jail: Option<bool>,
    jail_ids: Option<String>,
    vm_cpu_max: Option<String>,
    vmm_overhead_mib: Option<u64>,
    // Async invocations and the journal (config file only).
    max_queued_events: Option<u64>,
    journal_max_records: Option<u64>,
    journal_max_bytes: Option<u64>,
    results_max_bytes: Option<u64>,
    replay_rate_per_s: Option<u32>,
    crash_threshold: Option<u32>,
    crash_window_s: Option<u64>,
    on_error_rate_per_s: Option<u32>,
    // Metaevents (config file only).
    max_metaevent_depth: Option<u32>,
    metaevents_per_s: Option<u32>,
}

/// The levels ember-vmm's `--log-level` takes.
const VMM_LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

fn main() {
    let args = Args::parse();
    let file = match read_config(args.config.as_deref()) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("emberd: {e}");
            std::process::exit(1);
        }
    };
    let (filter, bad_filter) = match tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG") {
        Ok(filter) => (filter, None),
        Err(e) => (
            tracing_subscriber::EnvFilter::new("info"),
            std::env::var_os("EMBER_LOG").map(|_| e),
        ),
    };
    let log = ember_agent::logging::init(
        args.log_format.or(file.log_format).unwrap_or_default(),
        filter,
    );
    if let Some(e) = bad_filter {
        tracing::warn!("EMBER_LOG is not a log filter ({e}); logging at info");
    }
    if let Err(e) = run(args, file) {
        tracing::error!("{e}");
        let _ = sd_notify::notify(&[NotifyState::Status(&format!("failed: {e}"))]);
        // Written out before the exit, which runs no destructors.
        drop(log);
        std::process::exit(1);
    }
}

/// The async and journal settings of the config file, checked.
fn event_settings(file: &ConfigFile) -> Result<EventSettings, String> {
    let d = EventSettings::default();
    let s = EventSettings {
        max_queued_events: file.max_queued_events.unwrap_or(d.max_queued_events),
        journal_max_records: file.journal_max_records.unwrap_or(d.journal_max_records),
        journal_max_bytes: file.journal_max_bytes.unwrap_or(d.journal_max_bytes),
        results_max_bytes: file.results_max_bytes.unwrap_or(d.results_max_bytes),
        replay_rate_per_s: file.replay_rate_per_s.unwrap_or(d.replay_rate_per_s),
        crash_threshold: file.crash_threshold.unwrap_or(d.crash_threshold),
        crash_window_s: file.crash_window_s.unwrap_or(d.crash_window_s),
        on_error_rate_per_s: file.on_error_rate_per_s.unwrap_or(d.on_error_rate_per_s),
    };
    for (name, value) in [
        ("max_queued_events", s.max_queued_events),
        ("journal_max_records", s.journal_max_records),
        ("journal_max_bytes", s.journal_max_bytes),
        ("replay_rate_per_s", s.replay_rate_per_s.into()),
        ("crash_threshold", s.crash_threshold.into()),
        ("crash_window_s", s.crash_window_s),
        ("on_error_rate_per_s", s.on_error_rate_per_s.into()),
    ] {
        if value == 0 {
            return Err(format!("{name} must be at least 1"));
        }
    }
    Ok(s)
}

/// The metaevent settings of the config file, checked.
fn trigger_settings(file: &ConfigFile) -> Result<TriggerSettings, String> {
    let d = TriggerSettings::default();
    let s = TriggerSettings {
        max_metaevent_depth: file.max_metaevent_depth.unwrap_or(d.max_metaevent_depth),
        metaevents_per_s: file.metaevents_per_s.unwrap_or(d.metaevents_per_s),
    };
    if s.max_metaevent_depth == 0 || s.metaevents_per_s == 0 {
        return Err("max_metaevent_depth and metaevents_per_s must be at least 1".into());
    }
    Ok(s)
}

fn read_config(path: Option<&Path>) -> Result<ConfigFile, String> {
    let Some(path) = path else {
        return Ok(ConfigFile::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The first directory of a systemd `*_DIRECTORY` variable (it lists one
/// per configured directory, separated by colons).
fn systemd_directory(variable: &str) -> Option<PathBuf> {
    let value = std::env::var_os(variable)?;
    let first = value.to_str()?.split(':').next()?;
    (!first.is_empty()).then(|| PathBuf::from(first))
}

fn run(args: Args, file: ConfigFile) -> Result<(), String> {
    let events = event_settings(&file)?;
    let triggers = trigger_settings(&file)?;
    let socket = args
        .socket
        .or(file.socket)
        .or_else(|| systemd_directory("RUNTIME_DIRECTORY").map(|d| d.join("ember.sock")))
        .unwrap_or_else(|| PathBuf::from("/run/ember/ember.sock"));
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .or_else(|| systemd_directory("STATE_DIRECTORY"))
        .unwrap_or_else(|| PathBuf::from("/var/lib/ember"));
    let vmm_log_level = args
        .vmm_log_level
        .or(file.vmm_log_level)
        .unwrap_or_else(|| "warn".into());
    if !VMM_LOG_LEVELS.contains(&vmm_log_level.as_str()) {
        return Err(format!(
            "--vmm-log-level {vmm_log_level:?}: give one of {}",
            VMM_LOG_LEVELS.join(", ")
        ));
    }
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
    let _lock = lock_state_dir(&state_dir)?;
    let vmm = match args.vmm.or(file.vmm) {
        Some(path) => path,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("ember-vmm"),
    };
    if !vmm.is_file() {
        return Err(format!("no ember-vmm at {} (give --vmm)", vmm.display()));
    }
    let guest_image = match args.guest_image.or(file.guest_image) {
        Some(path) => path,
        None => match std::env::var_os("EMBER_GUEST_IMAGE") {
            Some(path) => PathBuf::from(path),
            None => match installed_guest_image() {
                Some(path) => path,
                None => guest_image_from_script()?,
            },
        },
    };
    if !guest_image.is_file() {
        return Err(format!("no guest image at {}", guest_image.display()));
    }
    let prewarm_policy = ember_agent::predict::Policy::parse(
        args.prewarm_policy
            .or(file.prewarm_policy)
            .as_deref()
            .unwrap_or("ember"),
    )?;
    let jail = if args.no_jail || file.no_jail == Some(true) {
        None
    } else {
        let ids = args.jail_ids.or(file.jail_ids);
        let (first_id, ids) = match ids.as_deref() {
            None => (3_000_000, 65_536),
            Some(text) => text
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
                .filter(|&(first, count)| {
                    first > 0 && count > 0 && first.checked_add(count).is_some()
                })
                .ok_or_else(|| format!("--jail-ids {text:?} is not FIRST:COUNT (FIRST > 0)"))?,
        };
        let cpu_max = match args.vm_cpu_max.or(file.vm_cpu_max) {
            None => None,
            Some(text) => Some(
                text.split_once('/')
                    .and_then(|(q, p)| Some((q.parse::<u64>().ok()?, p.parse::<u64>().ok()?)))
                    .ok_or_else(|| format!("--vm-cpu-max {text:?} is not QUOTA_US/PERIOD_US"))?,
            ),
        };
        Some(ember_agent::host::JailSettings {
            first_id,
            ids,
            pids_max: ember_agent::host::VMM_PIDS_MAX,
            cpu_max,
        })
    };
    let config = AgentConfig {
        vmm_overhead_mib: args
            .vmm_overhead_mib
            .or(file.vmm_overhead_mib)
            .unwrap_or(ember_agent::host::VMM_OVERHEAD_MIB),
        jail,
        prewarm_policy,
        state_dir,
        vmm,
        guest_image,
        base_mem_mib: args.vm_mem_mib.or(file.vm_mem_mib).unwrap_or(512),
        prepared: args.prepared.or(file.prepared).unwrap_or(2),
        memory_budget_mib: args
            .memory_budget_mib
            .or(file.memory_budget_mib)
            .unwrap_or_else(|| host_memory_mib() / 2),
        vmm_log_level,
        events,
        triggers,
    };
    tracing::info!(
        state_dir = %config.state_dir.display(),
        vmm = %config.vmm.display(),
        guest_image = %config.guest_image.display(),
        "emberd {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = runtime.block_on(serve(config, socket));
    // Invocations whose clients left may still run on blocking threads;
    // their VMMs die with emberd.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(config: AgentConfig, socket: PathBuf) -> Result<(), String> {
    let _ = sd_notify::notify(&[NotifyState::Status(
        "starting: checking the state dir and the base snapshot",
    )]);
    let agent = tokio::task::spawn_blocking(move || Agent::start(config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.message)?;
    let listener = bind(&socket)?;
    ember_agent::events::start(agent.clone());
    ember_agent::metaevents::start(agent.clone());
    ember_agent::schedules::start(agent.clone());
    // Before READY=1: a stop that follows it at once must drain, not kill.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    tracing::info!("emberd listening on {}", socket.display());
    // The socket accepts from here on (connections queue until served).
    let status = format!("serving on {}", socket.display());
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    if let Some(period) = sd_notify::watchdog_enabled() {
        start_watchdog(agent.clone(), period);
    }

    // The prepared pool's refill: every second, and whenever a prepared
    // VMM was taken (the planner below reaps).
    let reaper = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = reaper.refill_wanted.notified() => {
                    // Not on top of the restore that took it: spawning a
                    // process beside it would slow the restore down.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            if reaper.draining.load(Ordering::Relaxed) {
                return;
            }
            let agent = reaper.clone();
            let _ = tokio::task::spawn_blocking(move || agent.refill_prepared()).await;
        }
    });

    // The pre-warm policy: restores ahead of predicted arrivals, and
    // reaps what it lets go, ten times a second.
    let planner = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if planner.draining.load(Ordering::Relaxed) {
                return;
            }
            let agent = planner.clone();
            let _ = tokio::task::spawn_blocking(move || agent.prewarm_tick()).await;
        }
    });

    let shutdown_agent = agent.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: draining invocations in flight");
        let _ = sd_notify::notify(&[
            NotifyState::Stopping,
            NotifyState::Status("draining invocations in flight"),
        ]);
        shutdown_agent.draining.store(true, Ordering::Relaxed);
        // A client that never finishes its request must not hold the
        // shutdown forever: a plain thread (not a task the runtime could
        // drop or starve) ends the process; the VMMs die with it.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(35));
            eprintln!("emberd: shutdown took 35 s; exiting without waiting further");
            std::process::exit(1);
        });
    };
    axum::serve(listener, ember_agent::api::router(agent.clone()))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| e.to_string())?;
    // Requests still in flight finished with the server; stop every VM.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while agent.in_flight.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::spawn_blocking(move || agent.stop_all())
        .await
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(())
}

/// Tells systemd's watchdog emberd is alive, twice per period, as long as
/// the async runtime ticks and the agent's locks can be taken: a task on
/// the runtime sends a tick, a thread of its own (not the blocking pool,
/// which a flood of slow invocations may fill) takes the locks and pings.
/// A hung or deadlocked emberd stops pinging and is restarted.
fn start_watchdog(agent: std::sync::Arc<Agent>, period: Duration) {
    let every = (period / 2).max(Duration::from_millis(100));
    let (tick, ticks) = std::sync::mpsc::sync_channel::<()>(1);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        loop {
            interval.tick().await;
            let _ = tick.try_send(());
        }
    });
    let spawned = std::thread::Builder::new()
        .name("ember_watchdog".into())
        .spawn(move || {
            while ticks.recv().is_ok() {
                let _ = ember_agent::host::lock(&agent.pools).instances.len();
                let _ = agent.prepared_count();
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the watchdog thread ({e}): systemd will restart emberd");
    }
}

/// Binds the socket (mode 0600). A leftover socket nobody listens on is
/// replaced; one somebody listens on is an error.
fn bind(socket: &Path) -> Result<tokio::net::UnixListener, String> {
    if let Some(dir) = socket.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", socket.display()));
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(format!("another daemon listens on {}", socket.display()));
        }
        std::fs::remove_file(socket)
            .map_err(|e| format!("cannot remove {}: {e}", socket.display()))?;
    }
    // Created 0600 from the start: no window in which others can connect.
    // SAFETY: umask(2) only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(socket);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| format!("cannot bind {}: {e}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", socket.display()))?;
    Ok(listener)
}

/// An exclusive lock on `<state>/emberd.lock`, held for the process's life:
/// two daemons never share a state dir.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = state_dir.join("emberd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "another emberd uses the state dir {} (it holds {})",
            state_dir.display(),
            path.display()
        ));
    }
    Ok(file)
}

/// The guest image `scripts/install` put beside the binaries:
/// `<prefix>/share/ember/ember-guest` for `<prefix>/bin/emberd`.
fn installed_guest_image() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let image = exe.parent()?.parent()?.join("share/ember/ember-guest");
    image.is_file().then_some(image)
}

/// In a source tree only — emberd run from cargo's target directory
/// (`…/debug/emberd`, `…/release/emberd`) — the image the tree's
/// `scripts/guest-image` builds. Never a script found from the current
/// directory.
fn guest_image_from_script() -> Result<PathBuf, String> {
    let none =
        "no guest image: give --guest-image or EMBER_GUEST_IMAGE, or install one (scripts/install)";
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    if !matches!(profile_dir, Some("debug" | "release")) {
        return Err(none.into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-image");
    if !script.is_file() {
        return Err(none.into());
    }
    let output = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed", script.display()));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(PathBuf::from(
        text.lines().last().unwrap_or_default().trim(),
    ))
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(4096, |kib| kib / 1024)
}
