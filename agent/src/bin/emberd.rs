//! `emberd`: the Ember host agent (docs/agent.md, docs/api.yaml).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use ember_agent::host::{Agent, AgentConfig};

/// The Ember host agent: functions, template snapshots, warm pools and
/// affinity routing, served as HTTP + JSON on a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "emberd", version)]
struct Args {
    /// The API socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where functions, snapshots and VM files live.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A JSON file that may set any of the options (the command line wins).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The ember-vmm binary (default: the one beside emberd).
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// The guest image (default: $EMBER_GUEST_IMAGE, else what
    /// ./scripts/guest-image prints).
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
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("emberd: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let file: ConfigFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => ConfigFile::default(),
    };
    let socket = args
        .socket
        .or(file.socket)
        .unwrap_or_else(|| PathBuf::from("/run/ember/ember.sock"));
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from("/var/lib/ember"));
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
            None => guest_image_from_script()?,
        },
    };
    if !guest_image.is_file() {
        return Err(format!("no guest image at {}", guest_image.display()));
    }
    let config = AgentConfig {
        state_dir,
        vmm,
        guest_image,
        base_mem_mib: args.vm_mem_mib.or(file.vm_mem_mib).unwrap_or(512),
        prepared: args.prepared.or(file.prepared).unwrap_or(2),
        memory_budget_mib: args
            .memory_budget_mib
            .or(file.memory_budget_mib)
            .unwrap_or_else(|| host_memory_mib() / 2),
    };
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
    let agent = tokio::task::spawn_blocking(move || Agent::start(config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.message)?;
    let listener = bind(&socket)?;
    tracing::info!("emberd listening on {}", socket.display());

    // The reaper (idle instances past their keep-alive, old versions) and
    // the prepared pool's refill: every second, and whenever a prepared
    // VMM was taken.
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
            let _ = tokio::task::spawn_blocking(move || {
                agent.reap(false);
                agent.refill_prepared();
            })
            .await;
        }
    });

    let shutdown_agent = agent.clone();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: draining invocations in flight");
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

fn guest_image_from_script() -> Result<PathBuf, String> {
    let candidates = [
        PathBuf::from("./scripts/guest-image"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-image"),
    ];
    let script = candidates
        .iter()
        .find(|p| p.is_file())
        .ok_or("no guest image: give --guest-image or EMBER_GUEST_IMAGE")?;
    let output = std::process::Command::new(script)
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
