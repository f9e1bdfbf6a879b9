//! Spawning and talking to ember-vmm processes.
//!
//! Each VMM's stderr is forwarded into emberd's log, tagged with the VMM
//! and the instance it serves ([`log`]).
//!
//! Every VMM emberd starts has a pidfile in `<state>/vms/` naming its pid,
//! its start time (from /proc/PID/stat) and its executable, and dies with
//! emberd (PR_SET_PDEATHSIG). On start, emberd finds the VMMs a crashed
//! predecessor of the same state dir left behind through those pidfiles —
//! checked against /proc/PID/exe and the start time, never by process name
//! — and kills them.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_vmm::api::client::{ApiClient, ApiResponse};

pub mod log;

use log::{InstanceTag, VmmLog, VmmLogs};

/// Console bytes a VMM may write to `vms/<id>.console` (the guest writes
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
    /// VMM, so a module deployed again is not compiled again.
    pub compile_cache: Option<PathBuf>,
    spawner: Spawner,
    logs: VmmLogs,
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
    child: Child,
    client: ApiClient,
    run_dir: PathBuf,
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
            spawner: Spawner::start(),
            logs: VmmLogs::start()?,
        })
    }

    /// Spawns `ember-vmm --api-sock <run>/<id>.sock --id <id> args...` and
    /// returns once its socket accepts.
    pub fn spawn(&self, id: &str, args: &[&str]) -> Result<Vmm, VmmError> {
        let sock = self.run_dir.join(format!("{id}.sock"));
        let _ = std::fs::remove_file(&sock);
        let (stderr, log) = self.logs.pipe(id).map_err(|source| VmmError::Spawn {
            binary: self.vmm.clone(),
            source,
        })?;
        let mut command = Command::new(&self.vmm);
        command
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", id, "--log-level", &self.log_level, "--serial-out"])
            .arg(self.run_dir.join(format!("{id}.console")))
            .arg("--serial-out-limit")
            .arg(CONSOLE_LIMIT.to_string())
            .args(
                self.compile_cache
                    .iter()
                    .flat_map(|dir| [std::ffi::OsStr::new("--compile-cache"), dir.as_os_str()]),
            )
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
        let mut child = self
            .spawner
            .spawn(command)
            .map_err(|source| VmmError::Spawn {
                binary: self.vmm.clone(),
                source,
            })?;
        let cleanup = |child: &mut Child| {
            let _ = child.kill();
            let _ = child.wait();
            for ext in ["pid", "sock", "console"] {
                let _ = std::fs::remove_file(self.run_dir.join(format!("{id}.{ext}")));
            }
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
            child,
            client,
            run_dir: self.run_dir.clone(),
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
            // `log`: the files of emberd versions that logged VMMs to files.
            for ext in ["pid", "sock", "log", "console"] {
                let _ = std::fs::remove_file(stem.with_extension(ext));
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
        let _ = self.child.kill();
        let _ = self.child.wait();
        for ext in ["pid", "sock", "console"] {
            let _ = std::fs::remove_file(self.run_dir.join(format!("{}.{ext}", self.id)));
        }
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

/// Whether `pid` runs `exe` and started at `start`.
fn process_is(pid: u32, start: u64, exe: &Path) -> bool {
    let running = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    running.is_some_and(|r| r == exe) && start_time(pid) == Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

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
