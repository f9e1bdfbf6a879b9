//! `ember-vmm`: arguments, signal handlers, then the VMM thread's event loop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ember_vmm::devices::legacy::serial::{ConsoleSink, DEFAULT_CONSOLE_LIMIT};
use ember_vmm::resources::VmResources;
use ember_vmm::vmm::{Vmm, VmmOptions};
use ember_vmm::{api, jail, logger, seccomp, vstate, ExitCode};
use event_manager::{EventManager, SubscriberOps};

/// A minimal VMM for the Ember guest. Speaks a subset of Firecracker's API
/// on --api-sock; see docs/vmm.md.
#[derive(Debug, Parser)]
#[command(name = "ember-vmm", version)]
struct Args {
    /// Serve the control API on this Unix socket (it must not exist yet).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Boot at once from this JSON file ({"boot-source": ..., "machine-config": ...}).
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Instance id, shown by GET / and in the log.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Write the guest's serial console to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    serial_out: Option<PathBuf>,
    /// Console bytes written at most (a file's earlier contents count);
    /// the rest is dropped after one line saying so.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CONSOLE_LIMIT)]
    serial_out_limit: u64,
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, default_value = "warn", value_parser = parse_level)]
    log_level: log::LevelFilter,
    /// Do not install seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Serve /ember/test/* (crash, reset, bad-length, forbidden-syscall).
    #[arg(long)]
    test_commands: bool,
    /// Do not announce the mailbox: the guest boots as under Firecracker,
    /// prints its marker and parks.
    #[arg(long)]
    no_mailbox: bool,
    /// How long the guest may take to answer a mailbox request.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    mailbox_timeout_ms: u64,
    /// After delivering a request, watch guest memory this long for the
    /// answer before waiting for the doorbell exit (0: do not watch).
    #[arg(long, value_name = "US", default_value_t = 100)]
    mailbox_poll_us: u64,
    /// Cache compiled modules in this directory (created if missing): a
    /// function loaded again skips the compiler.
    #[arg(long, value_name = "DIR")]
    compile_cache: Option<PathBuf>,
    /// Single-step the boot vCPU through ring 0 and log the instruction count.
    #[arg(long)]
    count_ring0: bool,
    /// Build a VM for a snapshot restore now (memory slots, irqchip,
    /// vCPUs, their threads, seccomp) and wait: PUT /snapshot/load then
    /// only sets state. Needs --api-sock.
    #[arg(long, requires = "api_sock", conflicts_with_all = ["config_file", "count_ring0"])]
    prepare: bool,
    /// With --prepare: guest memory of the snapshots to come, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128, requires = "prepare")]
    mem_size_mib: usize,
    /// With --prepare: vCPUs of the snapshots to come.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "prepare")]
    vcpus: u8,
    /// With --prepare: log dirty pages (for Diff snapshots of the restored VM).
    #[arg(long, requires = "prepare")]
    track_dirty_pages: bool,
    #[command(flatten)]
    jail: JailArgs,
}

/// The jail (docs/security.md): without --jail-root, none.
#[derive(Debug, clap::Args)]
struct JailArgs {
    /// Jail the VMM: new namespaces, this empty directory as the mount
    /// point of its tmpfs root, the uid and gid below, no capabilities.
    /// Needs root.
    #[arg(long, value_name = "DIR", requires_all = ["jail_uid", "jail_gid"])]
    jail_root: Option<PathBuf>,
    /// The jailed VMM's uid (not 0).
    #[arg(long, value_name = "UID", requires = "jail_root")]
    jail_uid: Option<u32>,
    /// The jailed VMM's gid (not 0).
    #[arg(long, value_name = "GID", requires = "jail_root")]
    jail_gid: Option<u32>,
    /// A host file or directory visible read-only in the jail, at its own
    /// path (repeatable).
    #[arg(long, value_name = "PATH", requires = "jail_root")]
    jail_ro: Vec<PathBuf>,
    /// A host directory visible read-write in the jail, at its own path
    /// (repeatable).
    #[arg(long, value_name = "DIR", requires = "jail_root")]
    jail_rw: Vec<PathBuf>,
    /// RLIMIT_FSIZE in the jail: the largest file the VMM may write.
    #[arg(long, value_name = "BYTES", requires = "jail_root")]
    jail_max_file_bytes: Option<u64>,
    /// The VM's cgroup leaf, relative to the hierarchy root (made, limited
    /// and joined before the namespaces; removed when the VMM ends).
    #[arg(long, value_name = "NAME", requires = "jail_root")]
    cgroup: Option<PathBuf>,
    /// The leaf's memory limit (memory.max), bytes.
    #[arg(long, value_name = "BYTES", requires = "cgroup")]
    memory_max: Option<u64>,
    /// The leaf's process and thread limit (pids.max).
    #[arg(long, value_name = "N", requires = "cgroup")]
    pids_max: Option<u64>,
    /// The leaf's CPU bandwidth (cpu.max): QUOTA_US/PERIOD_US.
    #[arg(long, value_name = "QUOTA/PERIOD", requires = "cgroup", value_parser = parse_cpu_max)]
    cpu_max: Option<(u64, u64)>,
}

fn parse_cpu_max(text: &str) -> Result<(u64, u64), String> {
    let (quota, period) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not QUOTA_US/PERIOD_US"))?;
    let number = |t: &str| {
        t.parse::<u64>()
            .map_err(|_| format!("{t:?} is not a number"))
    };
    Ok((number(quota)?, number(period)?))
}

/// Enters the jail the arguments describe, if any: the keeper never
/// returns from here, the jailed VMM returns `/dev/kvm`.
fn jail(args: &JailArgs) -> Result<Option<std::os::fd::OwnedFd>, String> {
    let Some(root) = &args.jail_root else {
        return Ok(None);
    };
    let cgroup = match &args.cgroup {
        Some(name) => Some(jail::cgroup::LeafSpec {
            hierarchy: jail::cgroup::Hierarchy::detect(std::path::Path::new(
                jail::cgroup::CGROUP_ROOT,
            ))
            .map_err(|e| e.to_string())?,
            name: name.clone(),
            memory_max: args.memory_max,
            pids_max: args.pids_max,
            cpu_max: args.cpu_max,
        }),
        None => None,
    };
    let spec = jail::Spec {
        root: root.clone(),
        uid: args.jail_uid.unwrap_or(0),
        gid: args.jail_gid.unwrap_or(0),
        read_only: args.jail_ro.clone(),
        read_write: args.jail_rw.clone(),
        cgroup,
        max_file_bytes: args.jail_max_file_bytes,
        max_open_files: jail::DEFAULT_MAX_OPEN_FILES,
    };
    let jailed = jail::enter(&spec).map_err(|e| e.to_string())?;
    Ok(Some(jailed.kvm))
}

fn main() {
    let process_start = Instant::now();
    // One malloc arena for every thread: glibc's per-thread arenas read
    // /proc/sys/vm/overcommit_memory when they first shrink, a file open
    // no seccomp filter here allows; one arena also keeps the footprint small.
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            let code = if e.use_stderr() {
                ExitCode::ArgParsing
            } else {
                ExitCode::Ok
            };
            std::process::exit(code.code());
        }
    };
    logger::init(args.log_level, &args.id, process_start);
    install_panic_hook();
    let kvm = match jail(&args.jail) {
        Ok(kvm) => kvm,
        Err(e) => exit(fail(ExitCode::GenericError, e)),
    };
    if kvm.is_some() {
        log::info!("jailed");
    }
    exit(run(args, kvm, process_start));
}

/// A panic (an ember-vmm bug) is reported and ends the process with exit
/// code 1 on any thread. The default hook would capture a backtrace (which
/// opens files no seccomp filter allows), and `abort` needs system calls
/// that not every filter allows: either would turn the report into a
/// seccomp violation.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = format!(
            "ember-vmm: thread '{}' panicked: {info}; exiting with code {}\n",
            thread.name().unwrap_or("unnamed"),
            ExitCode::GenericError.code()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), message.as_bytes());
        // SAFETY: _exit ends the process at once; nothing runs after it.
        unsafe { libc::_exit(ExitCode::GenericError.code()) };
    }));
}

/// Ends the process without tearing the microVM down: vCPU threads may
/// still be in KVM_RUN, and the kernel reclaims everything faster than
/// destructors would (nor do the seccomp filters allow them to).
fn exit(code: ExitCode) -> ! {
    log::info!("exiting with code {} ({code:?})", code.code());
    std::process::exit(code.code())
}

fn parse_level(text: &str) -> Result<log::LevelFilter, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a log level (error, warn, info, debug, trace, off)"))
}

fn fail(code: ExitCode, message: impl std::fmt::Display) -> ExitCode {
    log::error!("{message}");
    code
}

fn run(args: Args, kvm: Option<std::os::fd::OwnedFd>, process_start: Instant) -> ExitCode {
    if args.api_sock.is_none() && args.config_file.is_none() {
        return fail(
            ExitCode::ArgParsing,
            "give --api-sock, --config-file, or both",
        );
    }
    let jailed = kvm.is_some();
    // Before anything else: creating the VM and reading the supported
    // CPUID take the better part of a millisecond, and neither depends on
    // the configuration (see vstate::kvm).
    let kvm = match vstate::kvm::KvmContext::open(kvm) {
        Ok(kvm) => kvm,
        Err(e) => return fail(ExitCode::GenericError, e),
    };
    seccomp::set_thread_label("vmm");
    if let Err(e) = seccomp::install_sigsys_handler() {
        return fail(
            ExitCode::GenericError,
            format!("cannot install the SIGSYS handler: {e}"),
        );
    }
    if let Err(e) = vstate::vcpu::register_kick_handler() {
        return fail(
            ExitCode::GenericError,
            format!("cannot install the vCPU kick handler: {e}"),
        );
    }

    let console = match &args.serial_out {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => ConsoleSink::file(file, args.serial_out_limit),
            Err(e) => {
                return fail(
                    ExitCode::GenericError,
                    format!("cannot open --serial-out {}: {e}", path.display()),
                )
            }
        },
        None => ConsoleSink::stdout(args.serial_out_limit),
    };

    let resources = match &args.config_file {
        Some(path) => match VmResources::from_config_file(path) {
            Ok(resources) => resources,
            Err(e) => return fail(ExitCode::BadConfiguration, e),
        },
        None => VmResources::default(),
    };

    let api = match &args.api_sock {
        Some(path) => match api::bind(path) {
            Ok(server) => {
                // Jailed, the socket is the jail uid's: whoever started the
                // jail connects without CAP_DAC_OVERRIDE. Only it and the
                // jail reach the directory the socket is in.
                if jailed {
                    use std::os::unix::fs::PermissionsExt;
                    if let Err(e) =
                        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                    {
                        return fail(
                            ExitCode::GenericError,
                            format!(
                                "cannot open the API socket {} to its starter: {e}",
                                path.display()
                            ),
                        );
                    }
                }
                log::info!("API server listening on {}", path.display());
                Some(server)
            }
            Err(e) => {
                return fail(
                    ExitCode::GenericError,
                    format!("cannot bind the API socket {}: {e}", path.display()),
                )
            }
        },
        None => None,
    };

    if let Err(e) = ember_vmm::vmm_config::function::set_compile_cache(args.compile_cache.clone()) {
        return fail(
            ExitCode::ArgParsing,
            format!("cannot create the compile cache directory: {e}"),
        );
    }
    let options = VmmOptions {
        id: args.id.clone(),
        seccomp: !args.no_seccomp,
        test_commands: args.test_commands,
        mailbox: !args.no_mailbox,
        mailbox_timeout: Duration::from_millis(args.mailbox_timeout_ms),
        mailbox_poll: Duration::from_micros(args.mailbox_poll_us),
        count_ring0: args.count_ring0,
    };
    let vmm = match Vmm::new(options, process_start, resources, console, kvm, api) {
        Ok(vmm) => Arc::new(Mutex::new(vmm)),
        Err(e) => return fail(ExitCode::GenericError, e),
    };
    // The event loop exists before the microVM starts: starting installs
    // the VMM thread's seccomp filter, which does not allow creating it.
    let mut manager = match EventManager::<Arc<Mutex<Vmm>>>::new() {
        Ok(manager) => manager,
        Err(e) => {
            return fail(
                ExitCode::GenericError,
                format!("cannot create the event loop: {e:?}"),
            )
        }
    };
    manager.add_subscriber(vmm.clone());
    // Before the first API request is read: what serving the API and
    // building the VM need, no more; building the VM narrows it to the
    // `vmm` filter (docs/vmm.md, "Threads").
    if let Err(e) = seccomp::apply(seccomp::ThreadKind::VmmSetup, "vmm", !args.no_seccomp) {
        return fail(ExitCode::GenericError, e);
    }
    if args.prepare {
        let shape = ember_vmm::vmm_config::machine_config::MachineConfig {
            vcpu_count: args.vcpus,
            mem_size_mib: args.mem_size_mib,
            ..Default::default()
        };
        if let Err(e) = shape.validate(usize::MAX) {
            return fail(ExitCode::ArgParsing, e);
        }
        if let Err(e) = lock(&vmm).prepare(args.vcpus, args.mem_size_mib, args.track_dirty_pages) {
            return fail(ExitCode::GenericError, format!("cannot prepare: {e}"));
        }
    }
    if args.config_file.is_some() {
        if let Err(e) = lock(&vmm).start_microvm() {
            return fail(ExitCode::BadConfiguration, e);
        }
    }
    let code = loop {
        if let Err(e) = manager.run() {
            break fail(
                ExitCode::GenericError,
                format!("the event loop failed: {e:?}"),
            );
        }
        if let Some(code) = lock(&vmm).exit_code() {
            break code;
        }
    };
    lock(&vmm).stop_api();
    exit(code)
}

fn lock(vmm: &Mutex<Vmm>) -> std::sync::MutexGuard<'_, Vmm> {
    vmm.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
