//! Starting ember-vmm and timing what it prints.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use ember_vmm::api::client::ApiClient;
use serde_json::json;

/// Where ember-vmm and the guest image are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The ember-vmm binary.
    pub vmm: PathBuf,
    /// The guest image.
    pub guest_image: PathBuf,
}

impl Binaries {
    /// `vmm` or the ember-vmm beside this executable; `image` or
    /// `$EMBER_GUEST_IMAGE` or what `./scripts/guest-image` prints.
    pub fn find(vmm: Option<PathBuf>, image: Option<PathBuf>) -> Result<Binaries, String> {
        let vmm = match vmm {
            Some(path) => path,
            None => std::env::current_exe()
                .map_err(|e| e.to_string())?
                .with_file_name("ember-vmm"),
        };
        if !vmm.is_file() {
            return Err(format!(
                "no ember-vmm at {} (build it with `cargo build --release --workspace`, or pass --vmm)",
                vmm.display()
            ));
        }
        let guest_image =
            match image.or_else(|| std::env::var_os("EMBER_GUEST_IMAGE").map(PathBuf::from)) {
                Some(path) => path,
                None => script_output("guest-image")?,
            };
        if !guest_image.is_file() {
            return Err(format!("no guest image at {}", guest_image.display()));
        }
        Ok(Binaries { vmm, guest_image })
    }
}

/// The directory of the built example functions: `$EMBER_EXAMPLES_DIR`,
/// else what `./scripts/examples` prints (it builds them if need be).
pub fn examples_dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("EMBER_EXAMPLES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => script_output("examples")?,
    };
    if !dir.is_dir() {
        return Err(format!("no example functions at {}", dir.display()));
    }
    Ok(dir)
}

/// Runs `scripts/<name>` and returns the path on its last line.
fn script_output(name: &str) -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name);
    let output = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed: {}", script.display(), output.status));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(PathBuf::from(
        text.lines().last().unwrap_or_default().trim(),
    ))
}

/// A running ember-vmm booted from a config file, with its pipes.
pub struct Launched {
    child: Child,
    stdout: ChildStdout,
    stderr: ChildStderr,
    /// When the process was spawned.
    pub spawned_at: Instant,
    dir: PathBuf,
    /// Its control socket.
    pub api_sock: PathBuf,
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    console: Vec<u8>,
    log: Vec<u8>,
}

/// When the guest's milestones appeared, measured from spawn.
#[derive(Debug, Clone, Copy)]
pub struct Milestones {
    /// `EMBER-GUEST-READY` on the console.
    pub marker: Duration,
    /// The mailbox `ready` (ember-vmm logs it the moment it arrives).
    pub ready: Duration,
}

impl Launched {
    /// Spawns ember-vmm booting `binaries.guest_image` at once
    /// (`--config-file`), with an API socket for the shutdown.
    /// With `pin`, every thread of the VMM runs on that one CPU.
    pub fn boot(
        binaries: &Binaries,
        vcpus: u8,
        mem_mib: u64,
        extra: &[&str],
        pin: Option<usize>,
    ) -> Result<Launched, String> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ember-bench-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let config = json!({
            "boot-source": { "kernel_image_path": binaries.guest_image },
            "machine-config": { "vcpu_count": vcpus, "mem_size_mib": mem_mib },
        });
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, config.to_string()).map_err(|e| e.to_string())?;
        let api_sock = dir.join("api.sock");

        let mut command = Command::new(&binaries.vmm);
        if let Some(cpu) = pin {
            pin_to_cpu(&mut command, cpu);
        }
        let spawned_at = Instant::now();
        let mut child = command
            .arg("--config-file")
            .arg(&config_path)
            .arg("--api-sock")
            .arg(&api_sock)
            .args(["--log-level", "info"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binaries.vmm.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        Ok(Launched {
            child,
            stdout,
            stderr,
            spawned_at,
            dir,
            api_sock,
            mem_bytes: mem_mib << 20,
            console: Vec::new(),
            log: Vec::new(),
        })
    }

    /// Waits for the console marker and the logged `ready`, timestamping
    /// each pipe read as it returns (poll(2) on both pipes: no sleeping).
    pub fn wait_milestones(&mut self, timeout: Duration) -> Result<Milestones, String> {
        let deadline = self.spawned_at + timeout;
        let (mut marker, mut ready) = (None, None);
        loop {
            if let (Some(marker), Some(ready)) = (marker, ready) {
                return Ok(Milestones { marker, ready });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no marker/ready within {timeout:?}\nlog:\n{}\nconsole:\n{}",
                    String::from_utf8_lossy(&self.log),
                    String::from_utf8_lossy(&self.console)
                ));
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.stdout.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stderr.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            poll_until(&mut fds, deadline)?;
            if fds[0].revents != 0 {
                let at = read_some(&mut self.stdout, &mut self.console, &self.log)?;
                if marker.is_none() && contains(&self.console, ember_abi::READY_MARKER) {
                    marker = Some(at - self.spawned_at);
                }
            }
            if fds[1].revents != 0 {
                let at = read_some(&mut self.stderr, &mut self.log, &[])?;
                if ready.is_none() && contains(&self.log, "guest ready") {
                    ready = Some(at - self.spawned_at);
                }
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connection to the control socket.
    pub fn client(&self) -> Result<ApiClient, String> {
        ApiClient::connect(&self.api_sock)
            .map_err(|e| format!("connect {}: {e}", self.api_sock.display()))
    }

    /// Shuts the guest down through the API and waits for the process.
    pub fn shutdown(mut self) -> Result<(), String> {
        let mut client = self.client()?;
        let response = client
            .put_json("/actions", &json!({ "action_type": "SendCtrlAltDel" }))
            .map_err(|e| e.to_string())?;
        if response.status != 204 {
            return Err(format!("SendCtrlAltDel answered {}", response.status));
        }
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("ember-vmm exited with {status}"));
        }
        Ok(())
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (poll(2)) until one of `fds` is readable or `deadline` passes;
/// a negative fd is ignored.
pub fn poll_until(fds: &mut [libc::pollfd], deadline: Instant) -> Result<(), String> {
    let wait_ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis()
        .min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the
    // length passed.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
    if ret < 0 {
        return Err(format!("poll: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes the child run on `cpu` only (inherited by all its threads).
fn pin_to_cpu(command: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls
    // sched_setaffinity(2), which is async-signal-safe, on a local set.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads what `pipe` has into `into`; returns when the read returned.
/// End of file means ember-vmm exited (`log` says why).
fn read_some(pipe: &mut impl Read, into: &mut Vec<u8>, log: &[u8]) -> Result<Instant, String> {
    let mut chunk = [0u8; 4096];
    let n = pipe.read(&mut chunk).map_err(|e| e.to_string())?;
    let at = Instant::now();
    if n == 0 {
        let log = if log.is_empty() { &into[..] } else { log };
        return Err(format!(
            "ember-vmm exited\n{}",
            String::from_utf8_lossy(log)
        ));
    }
    into.extend_from_slice(&chunk[..n]);
    Ok(at)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
