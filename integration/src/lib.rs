//! Helpers for the end-to-end tests: find the ember-vmm binary and the guest
//! image, run ember-vmm as a child process with its console and log
//! captured, and wait for what it prints — on events (pipe reads), never on
//! sleeps.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ember_vmm::api::client::{ApiClient, ApiResponse};
use libtest_mimic::Arguments;
pub use libtest_mimic::{Failed, Trial};
use serde_json::json;

/// What a KVM test returns.
pub type TestResult = Result<(), Failed>;

/// A named KVM test.
pub type Test = (&'static str, fn() -> TestResult);

/// Runs `tests`, one at a time; without a usable /dev/kvm each is reported
/// as ignored (never passed), under a banner saying why.
pub fn run_kvm_tests(tests: Vec<Test>) -> ! {
    run_tests(tests, Vec::new())
}

/// Runs `tests` as [`run_kvm_tests`] does, and `others` — tests that need
/// no KVM, each marked ignored (by its maker, with its own banner) where
/// what it needs is missing.
pub fn run_tests(tests: Vec<Test>, others: Vec<Trial>) -> ! {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let unavailable = kvm_unavailable();
    if let Some(why) = &unavailable {
        eprintln!();
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("!! KVM TESTS SKIPPED: {why}");
        eprintln!(
            "!! {} tests that boot real microVMs are reported as ignored, NOT passed.",
            tests.len()
        );
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!();
    }
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            Trial::test(name, test)
                .with_kind("kvm")
                .with_ignored_flag(unavailable.is_some())
        })
        .chain(others)
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // What the tests left in their directories goes with them.
    let _ = std::fs::remove_dir_all(scratch_root());
    conclusion.exit()
}

/// A failure with `message`.
pub fn fail(message: impl Into<String>) -> Failed {
    Failed::from(message.into())
}

/// Fails with `message()` unless `condition`.
pub fn check(condition: bool, message: impl FnOnce() -> String) -> TestResult {
    if condition {
        Ok(())
    } else {
        Err(fail(message()))
    }
}

/// `GET path`, expecting 200; its JSON body.
pub fn get_json(client: &mut ApiClient, path: &str) -> Result<serde_json::Value, String> {
    Ok(expect_status(client.get(path), 200, &format!("GET {path}"))?.json())
}

/// `POST /ember/echo` of `payload`, expecting the same bytes back.
pub fn echo_ok(client: &mut ApiClient, payload: &[u8], what: &str) -> TestResult {
    let echo = expect_status(client.post("/ember/echo", payload), 200, what)?;
    check(echo.body == payload, || {
        format!(
            "{what}: echo of {} bytes returned {} bytes",
            payload.len(),
            echo.body.len()
        )
    })
}

/// The VMM still answers after a refused request.
pub fn still_serving(client: &mut ApiClient) -> TestResult {
    let info = expect_status(client.get("/"), 200, "GET / after a refused request")?;
    check(info.json()["app_name"] == "ember-vmm", || {
        format!("GET / answered {}", info.json())
    })
}

/// Waits for ember-vmm to exit and checks its exit code.
pub fn expect_exit(vmm: &mut VmmProcess, expected: i32, meaning: &str) -> TestResult {
    let code = exit_code(vmm.wait_exit()?)?;
    check(code == expected, || {
        format!(
            "exit code {code}, expected {expected} ({meaning})\n{}",
            vmm.transcript()
        )
    })
}

/// Checks that `output` (the console or the log) holds `text`.
pub fn printed(output: &Capture, text: &str, vmm: &VmmProcess) -> TestResult {
    check(output.text().contains(text), || {
        format!("{text:?} was not printed\n{}", vmm.transcript())
    })
}

/// Shuts the guest down (SendCtrlAltDel) and expects a clean exit.
pub fn shutdown(vmm: &mut VmmProcess, client: &mut ApiClient) -> TestResult {
    expect_status(action(client, "SendCtrlAltDel"), 204, "SendCtrlAltDel")?;
    expect_exit(vmm, 0, "clean end")
}

/// How long a test waits for anything a healthy VMM does.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

/// The ember-vmm binary: `$EMBER_VMM_BIN`, else the one beside this test's
/// target directory (`cargo build --workspace --bins` puts it there).
fn vmm_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("EMBER_VMM_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the test binary: {e}"))?;
    // target/<profile>/deps/vmm-<hash> → target/<profile>/ember-vmm
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("ember-vmm"))
        .ok_or("unexpected test binary location")?;
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "no ember-vmm binary at {}: run `cargo build --workspace --bins` first, or set EMBER_VMM_BIN \
             (./scripts/test does both)",
            candidate.display()
        ))
    }
}

/// The guest image: `$EMBER_GUEST_IMAGE`, else what `./scripts/guest-image` prints.
pub fn guest_image() -> Result<PathBuf, String> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    built(&IMAGE, "EMBER_GUEST_IMAGE", "scripts/guest-image")
}

/// The example functions: `$EMBER_EXAMPLES_DIR`, else what
/// `./scripts/examples` prints (it builds them).
pub fn examples_dir() -> Result<PathBuf, String> {
    static EXAMPLES: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    built(&EXAMPLES, "EMBER_EXAMPLES_DIR", "scripts/examples")
}

/// `$variable`, else the path `script` prints last — run once per process
/// (the script hashes its sources each time).
fn built(
    cell: &OnceLock<Result<PathBuf, String>>,
    variable: &str,
    script: &str,
) -> Result<PathBuf, String> {
    cell.get_or_init(|| match std::env::var_os(variable) {
        Some(path) => Ok(PathBuf::from(path)),
        None => last_line_of(&repo_root().join(script)),
    })
    .clone()
}

/// Runs a build script and takes the path it prints last.
fn last_line_of(script: &Path) -> Result<PathBuf, String> {
    let output = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed: {}", script.display(), output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim();
    if last.is_empty() {
        return Err(format!("{} printed no path", script.display()));
    }
    Ok(PathBuf::from(last))
}

/// Why KVM tests cannot run here, if they cannot: `/dev/kvm` must open
/// read-write and answer KVM_GET_API_VERSION with 12.
pub fn kvm_unavailable() -> Option<String> {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => return Some(format!("/dev/kvm is not usable: {e}")),
    };
    let version = kvm.get_api_version();
    (version != 12).then(|| {
        format!("/dev/kvm does not speak the KVM API (KVM_GET_API_VERSION gave {version})")
    })
}

/// Holds an exclusive lock so that KVM tests run one at a time, across
/// test processes too: two VMs at once on two cores slow each other down
/// and make failures hard to read. Within a process the lock is shared: a
/// test may hold two VMs (the second must not wait for the first).
struct KvmLock(());

/// The process's lock file (while any [`KvmLock`] lives) and its holders.
static KVM_LOCK: std::sync::Mutex<(Option<File>, usize)> = std::sync::Mutex::new((None, 0));

impl KvmLock {
    /// Waits for the lock.
    fn acquire() -> KvmLock {
        let mut held = KVM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if held.1 == 0 {
            let path = std::env::temp_dir().join("ember-kvm-tests.lock");
            let file = File::create(&path).expect("create the KVM test lock file");
            // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
            let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            assert_eq!(ret, 0, "flock {}", path.display());
            held.0 = Some(file);
        }
        held.1 += 1;
        KvmLock(())
    }
}

impl Drop for KvmLock {
    fn drop(&mut self) {
        let mut held = KVM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        held.1 -= 1;
        if held.1 == 0 {
            // Closing the file releases the lock.
            held.0 = None;
        }
    }
}

/// Output of a child, filled by a reader thread.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    closed: bool,
}

/// A pipe being read into memory, with a condition variable to wait on.
#[derive(Clone, Default)]
pub struct Capture(Arc<(Mutex<Captured>, Condvar)>);

impl Capture {
    fn start(mut source: impl Read + Send + 'static) -> Capture {
        let capture = Capture::default();
        let shared = capture.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = source.read(&mut chunk).unwrap_or(0);
                let (lock, cond) = &*shared.0;
                let mut captured = lock.lock().unwrap();
                if n == 0 {
                    captured.closed = true;
                    cond.notify_all();
                    return;
                }
                captured.bytes.extend_from_slice(&chunk[..n]);
                cond.notify_all();
            }
        });
        capture
    }

    /// Everything captured so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0 .0.lock().unwrap().bytes).into_owned()
    }

    /// Waits until `holds` is true of the output so far, or the pipe
    /// closes, or `timeout` passes; returns whether it came true.
    pub fn wait_until(&self, timeout: Duration, holds: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.0;
        let mut captured = lock.lock().unwrap();
        loop {
            if holds(&String::from_utf8_lossy(&captured.bytes)) {
                return true;
            }
            let now = Instant::now();
            if captured.closed || now >= deadline {
                return false;
            }
            captured = cond.wait_timeout(captured, deadline - now).unwrap().0;
        }
    }

    /// Waits until the output contains `needle`, or the pipe closes, or
    /// `timeout` passes; returns whether it appeared.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.0;
        let mut captured = lock.lock().unwrap();
        loop {
            if String::from_utf8_lossy(&captured.bytes).contains(needle) {
                return true;
            }
            let now = Instant::now();
            if captured.closed || now >= deadline {
                return false;
            }
            captured = cond.wait_timeout(captured, deadline - now).unwrap().0;
        }
    }

    /// Waits until the pipe closes (the process exited); returns whether it did.
    fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.0;
        let mut captured = lock.lock().unwrap();
        while !captured.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            captured = cond.wait_timeout(captured, deadline - now).unwrap().0;
        }
        true
    }
}

/// A running ember-vmm, killed when dropped.
pub struct VmmProcess {
    child: Child,
    /// Its working directory (holds the API socket and files the test made).
    pub dir: PathBuf,
    /// The API socket, when started with one.
    pub api_sock: Option<PathBuf>,
    /// Its stdin, with [`Launch::stdin_pipe`].
    pub stdin: Option<std::process::ChildStdin>,
    /// The guest console (stdout).
    pub serial: Capture,
    /// The log (stderr).
    pub log: Capture,
    _lock: KvmLock,
}

/// How to start ember-vmm.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Serve the API (on `<dir>/api.sock`).
    pub api: bool,
    /// A config file body to boot from at once.
    pub config: Option<serde_json::Value>,
    /// More arguments.
    pub extra_args: Vec<String>,
    /// Give it a pipe as stdin (else /dev/null).
    pub stdin_pipe: bool,
    /// Jail it as emberd does ([`JAIL_ID`] as uid and gid, its directory
    /// read-write, the guest image read-only, no cgroup).
    pub jail: bool,
}

/// The uid and gid of jailed VMMs the tests start themselves.
pub const JAIL_ID: u32 = 3_998_000;

impl VmmProcess {
    /// Starts ember-vmm as `launch` says, in a fresh directory, logging at
    /// info level; with an API socket, returns once it listens.
    pub fn start(launch: Launch) -> Result<VmmProcess, String> {
        let lock = KvmLock::acquire();
        let binary = vmm_binary()?;
        let dir = fresh_dir()?;
        let mut command = Command::new(&binary);
        command
            .current_dir(&dir)
            .args(["--log-level", "info", "--id", "integration"])
            .args(&launch.extra_args)
            .stdin(if launch.stdin_pipe {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if launch.jail {
            use std::os::unix::fs::PermissionsExt;
            let root = dir.join(".jail-root");
            std::fs::create_dir(&root).map_err(|e| e.to_string())?;
            std::os::unix::fs::chown(&dir, Some(0), Some(JAIL_ID)).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770))
                .map_err(|e| e.to_string())?;
            let id = JAIL_ID.to_string();
            command
                .arg("--jail-root")
                .arg(&root)
                .args(["--jail-uid", &id, "--jail-gid", &id])
                .arg("--jail-rw")
                .arg(&dir)
                .arg("--jail-ro")
                .arg(guest_image()?);
        }
        let api_sock = launch.api.then(|| dir.join("api.sock"));
        if let Some(sock) = &api_sock {
            command.arg("--api-sock").arg(sock);
        }
        if let Some(config) = &launch.config {
            let path = dir.join("config.json");
            std::fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
            command.arg("--config-file").arg(&path);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stdin = child.stdin.take();
        let serial = Capture::start(child.stdout.take().expect("piped stdout"));
        let log = Capture::start(child.stderr.take().expect("piped stderr"));
        let process = VmmProcess {
            child,
            dir,
            api_sock,
            stdin,
            serial,
            log,
            _lock: lock,
        };
        if process.api_sock.is_some() && !process.log.wait_for("API server listening", PATIENCE) {
            return Err(format!(
                "ember-vmm did not start its API server:\n{}",
                process.log.text()
            ));
        }
        Ok(process)
    }

    /// A new connection to the API socket.
    pub fn client(&self) -> ApiClient {
        let sock = self.api_sock.as_ref().expect("started with an API socket");
        let client =
            ApiClient::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        client
            .set_timeout(Some(PATIENCE))
            .expect("set a read timeout");
        client
    }

    /// Waits for the guest's `ready` (logged by ember-vmm).
    pub fn wait_ready(&self) -> Result<(), String> {
        if self.log.wait_for("guest ready", PATIENCE) {
            Ok(())
        } else {
            Err(format!(
                "the guest did not become ready.\nlog:\n{}\nconsole:\n{}",
                self.log.text(),
                self.serial.text()
            ))
        }
    }

    /// Waits for the process to exit; returns its status.
    fn wait_exit(&mut self) -> Result<ExitStatus, String> {
        if !self.log.wait_closed(PATIENCE) {
            return Err(format!(
                "ember-vmm did not exit.\nlog:\n{}",
                self.log.text()
            ));
        }
        self.child.wait().map_err(|e| e.to_string())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- log ---\n{}\n--- console ---\n{}",
            self.log.text(),
            self.serial.text()
        )
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A binary built beside ember-vmm (`emberd`, `ember`).
pub fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let path = vmm_binary()?.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no {name} at {}: run `cargo build --workspace --bins` first",
            path.display()
        ))
    }
}

/// A running emberd on a state dir, with its log captured.
pub struct Emberd {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its state dir.
    pub state_dir: PathBuf,
    /// Its log (stderr).
    pub log: Capture,
    /// The `--state-dir` it was given (its cgroup parent is named after it).
    agent_state: PathBuf,
    _lock: KvmLock,
}

impl Emberd {
    /// Starts emberd on `state_dir` (its socket inside) with 128 MiB VMs,
    /// one prepared VMM, and `extra` arguments; returns once it listens.
    pub fn start(state_dir: &Path, extra: &[&str]) -> Result<Emberd, String> {
        let socket = state_dir.join("emberd.sock");
        let mut command = Command::new(sibling_binary("emberd")?);
        command
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(state_dir.join("state"))
            .arg("--vmm")
            .arg(vmm_binary()?)
            .arg("--guest-image")
            .arg(guest_image()?)
            .args(["--vm-mem-mib", "128", "--prepared", "1"])
            .args(extra);
        Emberd::spawn(command, socket, state_dir)
    }

    /// Starts emberd as `command` says (its stdio is set here), serving on
    /// `socket`, its files in `state_dir`; returns once it listens.
    pub fn spawn(
        mut command: Command,
        socket: PathBuf,
        state_dir: &Path,
    ) -> Result<Emberd, String> {
        let lock = KvmLock::acquire();
        let agent_state = command
            .get_args()
            .skip_while(|a| *a != "--state-dir")
            .nth(1)
            .map_or_else(|| state_dir.join("state"), PathBuf::from);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start emberd: {e}"))?;
        let log = Capture::start(child.stderr.take().expect("piped stderr"));
        let emberd = Emberd {
            child,
            socket,
            state_dir: state_dir.to_path_buf(),
            log,
            agent_state,
            _lock: lock,
        };
        if !emberd.log.wait_for("emberd listening on", PATIENCE) {
            return Err(format!("emberd did not start:\n{}", emberd.log.text()));
        }
        Ok(emberd)
    }

    /// A new connection.
    pub fn client(&self) -> ApiClient {
        let client = ApiClient::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket.display()));
        client
            .set_timeout(Some(PATIENCE))
            .expect("set a read timeout");
        client
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn signal_term(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }

    /// SIGTERM, and waits for the exit; returns its exit code.
    pub fn terminate(mut self) -> Result<i32, String> {
        self.signal_term();
        let status = self.child.wait().map_err(|e| e.to_string())?;
        exit_code(status)
    }
}

impl Drop for Emberd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Killed, emberd cannot remove its VMs' cgroups; its VMMs die with
        // it (a parent-death signal), and then their leaves can go.
        ember_agent::host::remove_vm_cgroups(&self.agent_state, Duration::from_secs(2));
    }
}

/// Where this test process keeps its directories; removed when the tests end.
fn scratch_root() -> PathBuf {
    std::env::temp_dir().join(format!("ember-it-{}", std::process::id()))
}

/// A new empty directory for a test's files, removed when the tests end.
pub fn fresh_dir() -> Result<PathBuf, String> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = scratch_root().join(n.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// The body of `PUT /boot-source` for the guest image.
pub fn boot_source(image: &Path) -> serde_json::Value {
    json!({ "kernel_image_path": image.to_str().expect("UTF-8 path") })
}

/// The body of `PUT /machine-config`.
pub fn machine_config(vcpus: u8, mem_mib: usize) -> serde_json::Value {
    json!({ "vcpu_count": vcpus, "mem_size_mib": mem_mib })
}

/// `PUT /actions` with `action_type` (InstanceStart, SendCtrlAltDel).
pub fn action(client: &mut ApiClient, action_type: &str) -> std::io::Result<ApiResponse> {
    client.put_json("/actions", &json!({ "action_type": action_type }))
}

/// `PATCH /vm` to `state` ("Paused" or "Resumed").
pub fn set_vm_state(client: &mut ApiClient, state: &str) -> std::io::Result<ApiResponse> {
    client.patch_json("/vm", &json!({ "state": state }))
}

/// Starts ember-vmm with an API socket, configures it with the guest image,
/// `vcpus` and `mem_mib`, sends InstanceStart and waits for `ready`.
pub fn boot(
    vcpus: u8,
    mem_mib: usize,
    extra_args: &[&str],
) -> Result<(VmmProcess, ApiClient), String> {
    boot_with(
        vcpus,
        mem_mib,
        Launch {
            api: true,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            ..Launch::default()
        },
    )
}

/// As [`boot`], starting ember-vmm as `launch` says.
pub fn boot_with(
    vcpus: u8,
    mem_mib: usize,
    launch: Launch,
) -> Result<(VmmProcess, ApiClient), String> {
    boot_machine(machine_config(vcpus, mem_mib), launch)
}

/// As [`boot`], with `machine` as the body of `PUT /machine-config`.
pub fn boot_machine(
    machine: serde_json::Value,
    launch: Launch,
) -> Result<(VmmProcess, ApiClient), String> {
    let image = guest_image()?;
    let vmm = VmmProcess::start(launch)?;
    let mut client = vmm.client();
    expect_status(
        client.put_json("/boot-source", &boot_source(&image)),
        204,
        "PUT /boot-source",
    )?;
    expect_status(
        client.put_json("/machine-config", &machine),
        204,
        "PUT /machine-config",
    )?;
    expect_status(action(&mut client, "InstanceStart"), 204, "InstanceStart")?;
    vmm.wait_ready()?;
    Ok((vmm, client))
}

/// The built example function `name` (e.g. `echo.wasm`).
pub fn example(name: &str) -> Result<PathBuf, String> {
    let path = examples_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("example {} is missing", path.display()))
    }
}

/// Expects a successful invocation (with its duration header); returns
/// its result.
pub fn invoke_ok(client: &mut ApiClient, event: &[u8]) -> Result<Vec<u8>, String> {
    use ember_vmm::api::parsed_request::{DURATION_HEADER, FUNCTION_ERROR_HEADER};
    let response = expect_status(client.post("/ember/invoke", event), 200, "invoke")?;
    if let Some(kind) = response.header(FUNCTION_ERROR_HEADER) {
        return Err(format!(
            "the invocation failed ({kind}): {}",
            String::from_utf8_lossy(&response.body)
        ));
    }
    if response
        .header(DURATION_HEADER)
        .and_then(|v| v.parse::<u64>().ok())
        .is_none()
    {
        return Err("no duration header".into());
    }
    Ok(response.body)
}

/// Fails unless `got` is `want`, showing both as text.
pub fn same(got: &[u8], want: &[u8]) -> TestResult {
    check(got == want, || {
        format!(
            "got {:?}, want {:?}",
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(want)
        )
    })
}

/// Checks a response's status; returns the response.
pub fn expect_status(
    response: std::io::Result<ApiResponse>,
    status: u16,
    what: &str,
) -> Result<ApiResponse, String> {
    let response = response.map_err(|e| format!("{what}: {e}"))?;
    if response.status != status {
        return Err(format!(
            "{what}: expected {status}, got {} with body {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    Ok(response)
}

/// Checks that a response is a 400 whose `fault_message` contains `text`.
pub fn expect_fault(
    response: std::io::Result<ApiResponse>,
    text: &str,
    what: &str,
) -> Result<(), String> {
    let response = expect_status(response, 400, what)?;
    let message = response.fault_message().ok_or_else(|| {
        format!(
            "{what}: no fault_message in {}",
            String::from_utf8_lossy(&response.body)
        )
    })?;
    if !message.contains(text) {
        return Err(format!(
            "{what}: fault_message {message:?} does not name {text:?}"
        ));
    }
    Ok(())
}

/// The exit code of a finished process (or a description of its signal).
fn exit_code(status: ExitStatus) -> Result<i32, String> {
    status
        .code()
        .ok_or_else(|| format!("ember-vmm ended by a signal: {status:?}"))
}

/// CPU time (user + system) a process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall.
    let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields
        .get(11)
        .and_then(|f| f.parse().ok())
        .ok_or("no utime")?;
    let stime: u64 = fields
        .get(12)
        .and_then(|f| f.parse().ok())
        .ok_or("no stime")?;
    Ok(utime + stime)
}

/// A small deterministic pseudo-random generator (xorshift64*) for payloads.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (non-zero).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..=max`.
    pub fn below_or_eq(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            self.next_u64()
        } else {
            self.next_u64() % (max + 1)
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// `PUT /functions/{name}`, expecting 200; its JSON.
pub fn deploy(
    client: &mut ApiClient,
    name: &str,
    module: &Path,
    config: serde_json::Value,
    files: &[(String, Vec<u8>)],
) -> Result<serde_json::Value, String> {
    let module = std::fs::read(module).map_err(|e| e.to_string())?;
    let response = ember_agent::client::deploy(client, name, &config, &module, files);
    Ok(expect_status(response, 200, &format!("deploy {name}"))?.json())
}

/// `POST /functions/{name}/invoke`.
pub fn invoke(
    client: &mut ApiClient,
    name: &str,
    event: &[u8],
    headers: &[(&str, &str)],
) -> std::io::Result<ApiResponse> {
    ember_agent::client::invoke(client, name, event, headers)
}

/// The WebAssembly of `wat` as `<dir>/<name>.wasm`.
pub fn wat_module(dir: &Path, name: &str, wat: &str) -> Result<PathBuf, String> {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_str(wat).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    Ok(path)
}

/// A fresh emberd with `wat` deployed as `name` with `config`; its
/// directory too.
pub fn with_wat(
    name: &str,
    wat: &str,
    config: serde_json::Value,
) -> Result<(PathBuf, Emberd, ApiClient), String> {
    let dir = fresh_dir()?;
    let module = wat_module(&dir, name, wat)?;
    let emberd = Emberd::start(&dir, &[])?;
    let mut client = emberd.client();
    deploy(&mut client, name, &module, config, &[])?;
    Ok((dir, emberd, client))
}

/// Fails unless `response` is `status` with error `kind`.
pub fn expect_error(response: &ApiResponse, status: u16, kind: &str, what: &str) -> TestResult {
    check(
        response.status == status && error_kind(response) == kind,
        || {
            format!(
                "{what}: expected {status} {kind}, got {} {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            )
        },
    )
}

/// The kind of an error answer.
pub fn error_kind(response: &ApiResponse) -> String {
    response.json()["error"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
