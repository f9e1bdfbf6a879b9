//! `restore`: snapshot create and restore — the performance core.
//!
//! Builds its snapshots first (a booted guest's Full, and per function a
//! Diff layer over it, as emberd's templates are built), then measures:
//! create times and file sizes; restore latency (load request → resumed)
//! in a prepared process and from process start; restore → first response
//! of echo and sha256 with and without working-set prefetch (interleaved,
//! same run); PSS per VM with many copies of one snapshot alive; restores
//! per second, one and two at a time. With `--firecracker PATH`, the same
//! API calls drive Firecracker with the same guest image, side by side.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_vmm::api::client::ApiClient;
use ember_vmm::jail::cgroup::Hierarchy;
use serde_json::{json, Value};

use crate::launch::{examples_dir, Binaries};
use crate::stats::{header, Summary};

/// What `ember-bench restore` is asked to do.
pub struct Options {
    /// Samples per measurement.
    pub runs: usize,
    /// Guest memory, MiB.
    pub mem_mib: usize,
    /// Numbers of live copies to measure PSS with.
    pub copies: Vec<usize>,
    /// A Firecracker binary to compare with.
    pub firecracker: Option<PathBuf>,
}

const PATIENCE: Duration = Duration::from_secs(20);

/// The uid and gid of the bench's jailed VMMs.
const JAIL_ID: u32 = 3_999_000;

/// A command function that writes one byte into every page of 80 MiB of
/// fresh linear memory.
const DIRTY_80_MIB: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (local $at i32)
    (if (i32.eq (memory.grow (i32.const 1280)) (i32.const -1)) (then unreachable))
    (loop $page
      (i32.store8 (local.get $at) (i32.const 1))
      (local.set $at (i32.add (local.get $at) (i32.const 4096)))
      (br_if $page (i32.lt_u (local.get $at) (i32.const 83886080))))))
"#;

/// A VMM process with its output (stdout and stderr) collected.
pub(crate) struct Child {
    child: std::process::Child,
    /// The guest console, when asked for (else /dev/null: nothing has to
    /// drain it).
    console: Option<std::process::ChildStdout>,
    log: std::process::ChildStderr,
    output: Vec<u8>,
    sock: PathBuf,
    spawned_at: Instant,
    /// A jailed VMM's directory and cgroup leaf, removed after it.
    jail: Option<(PathBuf, Hierarchy, PathBuf)>,
}

impl Child {
    /// Starts `binary --api-sock <dir>/<name>.sock args...`, its console
    /// discarded.
    fn spawn(binary: &Path, args: &[&str], dir: &Path, name: &str) -> Result<Child, String> {
        Child::spawn_with(binary, args, dir, name, false)
    }

    /// As [`Child::spawn`], keeping the console to wait on when `console`.
    fn spawn_with(
        binary: &Path,
        args: &[&str],
        dir: &Path,
        name: &str,
        console: bool,
    ) -> Result<Child, String> {
        Child::spawn_at(binary, args, dir.join(format!("{name}.sock")), console)
    }

    /// As [`Child::spawn_with`], the socket at `sock`.
    fn spawn_at(
        binary: &Path,
        args: &[&str],
        sock: PathBuf,
        console: bool,
    ) -> Result<Child, String> {
        let _ = std::fs::remove_file(&sock);
        let spawned_at = Instant::now();
        let mut child = Command::new(binary)
            .arg("--api-sock")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(if console {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(Child {
            console: child.stdout.take(),
            log: child.stderr.take().expect("piped"),
            child,
            output: Vec::new(),
            sock,
            spawned_at,
            jail: None,
        })
    }

    /// Waits until the output contains `needle`; returns when it was read.
    pub(crate) fn wait_for(&mut self, needle: &str) -> Result<Instant, String> {
        let deadline = Instant::now() + PATIENCE;
        let mut searched: usize = 0;
        loop {
            if find(
                &self.output[searched.saturating_sub(needle.len())..],
                needle,
            )
            .is_some()
            {
                return Ok(Instant::now());
            }
            searched = self.output.len();
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no {needle:?} within {PATIENCE:?}:\n{}",
                    String::from_utf8_lossy(&self.output)
                ));
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.log.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.console.as_ref().map_or(-1, |c| c.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            crate::launch::poll_until(&mut fds, deadline)?;
            let mut chunk = [0u8; 4096];
            for (i, fd) in fds.iter().enumerate() {
                if fd.revents == 0 {
                    continue;
                }
                let n = match (i, self.console.as_mut()) {
                    (0, _) => self.log.read(&mut chunk),
                    (_, Some(console)) => console.read(&mut chunk),
                    (_, None) => continue,
                }
                .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err(format!(
                        "the VMM exited before {needle:?}:\n{}",
                        String::from_utf8_lossy(&self.output)
                    ));
                }
                self.output.extend_from_slice(&chunk[..n]);
            }
        }
    }

    /// Waits until the API socket accepts a connection (for a VMM that
    /// does not log when it listens); the client waits at most PATIENCE
    /// for an answer.
    fn wait_socket(&self) -> Result<ApiClient, String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(client) = ApiClient::connect(&self.sock) {
                client
                    .set_timeout(Some(PATIENCE))
                    .map_err(|e| e.to_string())?;
                return Ok(client);
            }
            if Instant::now() >= deadline {
                return Err(format!("{} never accepted", self.sock.display()));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    pub(crate) fn client(&self) -> Result<ApiClient, String> {
        let client = ApiClient::connect(&self.sock)
            .map_err(|e| format!("connect {}: {e}", self.sock.display()))?;
        client
            .set_timeout(Some(PATIENCE))
            .map_err(|e| e.to_string())?;
        Ok(client)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        if let Some((dir, hierarchy, leaf)) = &self.jail {
            ember_vmm::jail::cgroup::remove_leaf(hierarchy, leaf);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn find(haystack: &[u8], needle: &str) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
}

/// Sends a request that must succeed (2xx); returns its JSON (or null) and
/// the client-side time in µs.
pub(crate) fn call(
    client: &mut ApiClient,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<(Value, f64), String> {
    let started = Instant::now();
    let response = match method {
        "PUT" => client.put_json(path, body),
        "PATCH" => client.patch_json(path, body),
        _ => client.get(path),
    }
    .map_err(|e| format!("{method} {path}: {e}"))?;
    let us = started.elapsed().as_secs_f64() * 1e6;
    if !(200..300).contains(&response.status) {
        return Err(format!(
            "{method} {path} answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    let value = if response.body.is_empty() {
        Value::Null
    } else {
        response.json()
    };
    Ok((value, us))
}

fn invoke(client: &mut ApiClient, event: &[u8]) -> Result<(Vec<u8>, f64), String> {
    let started = Instant::now();
    let response = client
        .post("/ember/invoke", event)
        .map_err(|e| e.to_string())?;
    let us = started.elapsed().as_secs_f64() * 1e6;
    if response.status != 200
        || response
            .header(ember_vmm::api::parsed_request::FUNCTION_ERROR_HEADER)
            .is_some()
    {
        return Err(format!(
            "invoke answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    Ok((response.body, us))
}

/// A snapshot's files.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    state: PathBuf,
    mem: PathBuf,
}

impl Snapshot {
    pub(crate) fn at(dir: &Path, name: &str) -> Snapshot {
        Snapshot {
            state: dir.join(format!("{name}.state")),
            mem: dir.join(format!("{name}.mem")),
        }
    }

    pub(crate) fn create_body(&self, kind: &str) -> Value {
        json!({ "snapshot_type": kind, "snapshot_path": self.state, "mem_file_path": self.mem })
    }

    pub(crate) fn load_body(&self, prefetch: bool, track: bool) -> Value {
        json!({
            "snapshot_path": self.state,
            "mem_backend": { "backend_type": "File", "backend_path": self.mem },
            "resume_vm": true,
            "track_dirty_pages": track,
            "ember_prefetch": prefetch,
        })
    }

    fn load_body_sync(&self) -> Value {
        let mut body = self.load_body(true, false);
        body["ember_prefetch_sync"] = json!(true);
        body
    }

    /// Apparent and allocated sizes of the memory and state files.
    pub(crate) fn sizes(&self) -> Value {
        use std::os::unix::fs::MetadataExt;
        let size = |path: &Path| {
            std::fs::metadata(path).map_or(
                json!(null),
                |m| json!({ "apparent_bytes": m.len(), "allocated_bytes": m.blocks() * 512 }),
            )
        };
        json!({ "memory_file": size(&self.mem), "state_file": size(&self.state) })
    }
}

/// ember-vmm's arguments for a VM prepared for this bench's snapshots of
/// `mem` MiB.
fn prepare_args(mem: &str) -> Vec<&str> {
    vec![
        "--prepare",
        "--mem-size-mib",
        mem,
        "--vcpus",
        "1",
        "--log-level",
        "info",
    ]
}

/// The bench's working directory and binaries.
pub(crate) struct Bench<'a> {
    pub(crate) binaries: &'a Binaries,
    pub(crate) dir: PathBuf,
    pub(crate) mem_mib: usize,
    pub(crate) next: std::sync::atomic::AtomicU32,
}

impl Bench<'_> {
    fn name(&self, what: &str) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{what}{n}")
    }

    /// An ember-vmm prepared for this bench's snapshots, once prepared.
    pub(crate) fn prepared(&self, track: bool) -> Result<Child, String> {
        self.prepared_with(track, &[])
    }

    /// As [`Bench::prepared`], with more ember-vmm arguments.
    pub(crate) fn prepared_with(&self, track: bool, extra: &[&str]) -> Result<Child, String> {
        let mem = self.mem_mib.to_string();
        let mut args = prepare_args(&mem);
        if track {
            args.push("--track-dirty-pages");
        }
        args.extend_from_slice(extra);
        let mut child = Child::spawn(&self.binaries.vmm, &args, &self.dir, &self.name("p"))?;
        child.wait_for("prepared for a restore")?;
        Ok(child)
    }

    /// An ember-vmm prepared for this bench's snapshots in a jail as
    /// emberd makes it (uid, namespaces, tmpfs root with the snapshots
    /// read-only and its own directory, cgroup leaf with memory and pids
    /// limits), once prepared.
    pub(crate) fn prepared_jailed(&self) -> Result<Child, String> {
        let mem = self.mem_mib.to_string();
        let mut child = self.spawn_jailed(&prepare_args(&mem), "jp")?;
        child.wait_for("prepared for a restore")?;
        Ok(child)
    }

    /// Spawns a jailed ember-vmm with `args` (see [`Bench::prepared_jailed`]).
    fn spawn_jailed(&self, args: &[&str], what: &str) -> Result<Child, String> {
        let name = self.name(what);
        let hierarchy = Hierarchy::detect(Path::new(ember_vmm::jail::cgroup::CGROUP_ROOT))
            .map_err(|e| e.to_string())?;
        let parent = PathBuf::from("ember-bench");
        hierarchy
            .prepare_parent(&parent)
            .map_err(|e| e.to_string())?;
        let vm_dir = self.dir.join("jail").join(&name);
        let root = self.dir.join(".jail-root");
        for dir in [&vm_dir, &root] {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        std::os::unix::fs::chown(&vm_dir, Some(0), Some(JAIL_ID)).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&vm_dir, std::os::unix::fs::PermissionsExt::from_mode(0o770))
            .map_err(|e| e.to_string())?;
        let leaf = parent.join(&name);
        let (id, memory_max) = (
            JAIL_ID.to_string(),
            ((self.mem_mib as u64 + 64) << 20).to_string(),
        );
        let jail_args = [
            "--jail-root",
            root.to_str().unwrap_or_default(),
            "--jail-uid",
            &id,
            "--jail-gid",
            &id,
            "--jail-ro",
            self.dir.to_str().unwrap_or_default(),
            "--jail-rw",
            vm_dir.to_str().unwrap_or_default(),
            "--cgroup",
            leaf.to_str().unwrap_or_default(),
            "--memory-max",
            &memory_max,
            "--pids-max",
            "32",
        ];
        let all: Vec<&str> = jail_args
            .iter()
            .copied()
            .chain(args.iter().copied())
            .collect();
        let mut child = Child::spawn_at(&self.binaries.vmm, &all, vm_dir.join("api.sock"), false)?;
        child.jail = Some((vm_dir, hierarchy, leaf));
        Ok(child)
    }

    /// Spawns `binary` (not prepared) with `args`, and sends it `load`
    /// as soon as its socket accepts: the child, its client, the load's
    /// answer and the load's time (µs).
    fn restore_fresh(
        &self,
        binary: &Path,
        args: &[&str],
        load: &Value,
    ) -> Result<(Child, ApiClient, Value, f64), String> {
        let child = Child::spawn(binary, args, &self.dir, &self.name("r"))?;
        let mut client = child.wait_socket()?;
        let (loaded, us) = call(&mut client, "PUT", "/snapshot/load", load)?;
        Ok((child, client, loaded, us))
    }

    /// An ember-vmm that is not prepared, once it listens.
    fn fresh(&self) -> Result<Child, String> {
        let mut child = Child::spawn(
            &self.binaries.vmm,
            &["--log-level", "info"],
            &self.dir,
            &self.name("f"),
        )?;
        child.wait_for("API server listening")?;
        Ok(child)
    }

    /// Boots a guest (dirty pages logged) and waits for `ready`.
    pub(crate) fn booted(&self) -> Result<(Child, ApiClient), String> {
        let mut child = self.fresh()?;
        let mut client = child.client()?;
        call(
            &mut client,
            "PUT",
            "/boot-source",
            &json!({ "kernel_image_path": self.binaries.guest_image }),
        )?;
        call(
            &mut client,
            "PUT",
            "/machine-config",
            &json!({ "vcpu_count": 1, "mem_size_mib": self.mem_mib, "track_dirty_pages": true }),
        )?;
        call(
            &mut client,
            "PUT",
            "/actions",
            &json!({ "action_type": "InstanceStart" }),
        )?;
        child.wait_for("guest ready")?;
        Ok((child, client))
    }
}

/// `ember-bench restore`.
pub fn bench_restore(binaries: &Binaries, options: &Options) -> Result<Value, String> {
    if options.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let dir = std::env::temp_dir().join(format!("ember-bench-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let bench = Bench {
        binaries,
        dir: dir.clone(),
        mem_mib: options.mem_mib,
        next: std::sync::atomic::AtomicU32::new(0),
    };
    let result = run(&bench, options);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn summary_row(name: &str, samples: &[f64], unit: &str, decimals: usize) -> Summary {
    let summary = Summary::of(samples);
    println!("{}", summary.row(name, unit, decimals));
    summary
}

fn ms(us: &[f64]) -> Vec<f64> {
    us.iter().map(|us| us / 1000.0).collect()
}

fn run(bench: &Bench, options: &Options) -> Result<Value, String> {
    let runs = options.runs;
    let create_runs = runs.clamp(1, 10);
    let examples = examples_dir()?;
    println!(
        "snapshots of a {} MiB, 1-vCPU guest; {runs} samples per restore figure, {create_runs} per create figure",
        bench.mem_mib
    );

    // --- Create: Full of the booted guest, then per function a Diff over it.
    let base = Snapshot::at(&bench.dir, "base");
    let (mut full_ms, mut full_pages) = (Vec::new(), 0u64);
    {
        let (_vm, mut client) = bench.booted()?;
        call(&mut client, "PATCH", "/vm", &json!({ "state": "Paused" }))?;
        for i in 0..create_runs {
            let target = if i == 0 {
                base.clone()
            } else {
                Snapshot::at(&bench.dir, &format!("base{i}"))
            };
            let (created, _) = call(
                &mut client,
                "PUT",
                "/snapshot/create",
                &target.create_body("Full"),
            )?;
            full_ms.push(created["duration_us"].as_f64().unwrap_or(0.0) / 1000.0);
            full_pages = created["memory_pages"].as_u64().unwrap_or(0);
        }
    }
    // A Full of a guest that wrote most of its memory: the worst case.
    let (mut dirty_ms, mut dirty_nosync_ms) = (Vec::new(), Vec::new());
    let mut dirty_pages = 0u64;
    {
        let module = bench.dir.join("dirty.wasm");
        let wasm = wat::parse_str(DIRTY_80_MIB).map_err(|e| e.to_string())?;
        std::fs::write(&module, wasm).map_err(|e| e.to_string())?;
        let (_vm, mut client) = bench.booted()?;
        call(
            &mut client,
            "PUT",
            "/ember/function",
            &json!({ "module_path": module }),
        )?;
        invoke(&mut client, b"")?;
        call(&mut client, "PATCH", "/vm", &json!({ "state": "Paused" }))?;
        for i in 0..create_runs * 2 {
            // A new file each time, as a snapshot is; removed after.
            // Synced and not, interleaved.
            let target = Snapshot::at(&bench.dir, &format!("dirty{i}"));
            let mut body = target.create_body("Full");
            let sync = i % 2 == 0;
            body["ember_sync"] = json!(sync);
            let (created, _) = call(&mut client, "PUT", "/snapshot/create", &body)?;
            let ms = created["duration_us"].as_f64().unwrap_or(0.0) / 1000.0;
            if sync {
                dirty_ms.push(ms);
            } else {
                dirty_nosync_ms.push(ms);
            }
            dirty_pages = created["memory_pages"].as_u64().unwrap_or(0);
            let _ = std::fs::remove_file(&target.mem);
        }
    }
    let template = |module: &str, name: &str| -> Result<(Snapshot, f64, Value), String> {
        let snapshot = Snapshot::at(&bench.dir, name);
        let child = bench.prepared(true)?;
        let mut client = child.client()?;
        call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &base.load_body(false, true),
        )?;
        call(
            &mut client,
            "PUT",
            "/ember/function",
            &json!({ "module_path": examples.join(module), "timeout_ms": 60000 }),
        )?;
        call(&mut client, "PATCH", "/vm", &json!({ "state": "Paused" }))?;
        let (created, _) = call(
            &mut client,
            "PUT",
            "/snapshot/create",
            &snapshot.create_body("Diff"),
        )?;
        let ms = created["duration_us"].as_f64().unwrap_or(0.0) / 1000.0;
        Ok((snapshot, ms, created))
    };
    let mut diff_ms = Vec::new();
    let mut echo = None;
    for i in 0..create_runs {
        let (snapshot, ms, created) = template("echo.wasm", &format!("echo{i}"))?;
        diff_ms.push(ms);
        if i == 0 {
            echo = Some((snapshot, created));
        }
    }
    let (echo, echo_created) = echo.expect("at least one run");
    let (sha, _, _) = template("sha256.wasm", "sha256")?;
    println!("\ncreate (inside ember-vmm: request → state file synced)");
    println!("{}", header());
    let full_summary = summary_row(
        &format!("Full, booted ({full_pages} pages)"),
        &full_ms,
        "ms",
        2,
    );
    let dirty_summary = summary_row(
        &format!("Full, 80 MiB written ({dirty_pages} p.)"),
        &dirty_ms,
        "ms",
        1,
    );
    let dirty_nosync_summary = summary_row("  the same, not synced", &dirty_nosync_ms, "ms", 1);
    let diff_summary = summary_row(
        &format!(
            "Diff, echo loaded ({} p., {} runs)",
            echo_created["memory_pages"], echo_created["memory_runs"]
        ),
        &diff_ms,
        "ms",
        2,
    );
    let sizes =
        json!({ "base_full": base.sizes(), "echo_diff": echo.sizes(), "sha256_diff": sha.sizes() });
    println!("files: {sizes}");

    // --- Restore latency: load request → resumed.
    let mut prepared_us = Vec::new();
    let mut prepared_inside_us = Vec::new();
    let mut start_us = Vec::new();
    let mut start_inside_us = Vec::new();
    let mut jailed_prepared_us = Vec::new();
    let mut jailed_start_us = Vec::new();
    let mut jailed_start_inside_us = Vec::new();
    for _ in 0..runs {
        // Jailed (as emberd runs them), interleaved with the unjailed runs.
        let child = bench.prepared_jailed()?;
        let mut client = child.client()?;
        let (_, us) = call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &echo.load_body(false, false),
        )?;
        jailed_prepared_us.push(us);
        drop(child);
        let child = bench.spawn_jailed(&["--log-level", "info"], "jr")?;
        let mut client = child.wait_socket()?;
        let (loaded, _) = call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &echo.load_body(false, false),
        )?;
        jailed_start_us.push(child.spawned_at.elapsed().as_secs_f64() * 1e6);
        jailed_start_inside_us.push(loaded["since_process_start_us"].as_f64().unwrap_or(0.0));
        drop(child);

        let child = bench.prepared(false)?;
        let mut client = child.client()?;
        let (loaded, us) = call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &echo.load_body(false, false),
        )?;
        prepared_us.push(us);
        prepared_inside_us.push(loaded["restore_us"].as_f64().unwrap_or(0.0));
        drop(child);

        let (child, _, loaded, _) = bench.restore_fresh(
            &bench.binaries.vmm,
            &["--log-level", "info"],
            &echo.load_body(false, false),
        )?;
        start_us.push(child.spawned_at.elapsed().as_secs_f64() * 1e6);
        start_inside_us.push(loaded["since_process_start_us"].as_f64().unwrap_or(0.0));
    }
    println!(
        "\nrestore (echo template: Full + Diff layer, resume, no prefetch; \
         resumed = vCPUs let go, vCPU 0 parked until the first request)"
    );
    println!("{}", header());
    let prepared_summary = summary_row(
        "prepared: load request → resumed",
        &ms(&prepared_us),
        "ms",
        3,
    );
    let prepared_inside = summary_row("  inside ember-vmm", &ms(&prepared_inside_us), "ms", 3);
    let start_summary = summary_row(
        "process start → resumed (spawn→answer)",
        &ms(&start_us),
        "ms",
        3,
    );
    let start_inside = summary_row(
        "  ember-vmm's own clock (main → ready)",
        &ms(&start_inside_us),
        "ms",
        3,
    );
    let jailed_prepared = summary_row(
        "jailed, prepared: load request → resumed",
        &ms(&jailed_prepared_us),
        "ms",
        3,
    );
    let jailed_start = summary_row(
        "jailed, process start → resumed",
        &ms(&jailed_start_us),
        "ms",
        3,
    );
    let jailed_start_inside = summary_row(
        "  ember-vmm's own clock (main → ready)",
        &ms(&jailed_start_inside_us),
        "ms",
        3,
    );

    // --- Restore → first response, with and without prefetch (A/B).
    let mut first_response = Vec::new();
    for (name, snapshot, event) in [
        ("echo", &echo, vec![b'x'; 64]),
        ("sha256", &sha, vec![b's'; 64 << 10]),
    ] {
        // Record the working set once.
        {
            let mut child = bench.prepared(false)?;
            let mut client = child.client()?;
            call(
                &mut client,
                "PUT",
                "/snapshot/load",
                &snapshot.load_body(true, false),
            )?;
            invoke(&mut client, &event)?;
            child.wait_for("working set recorded")?;
        }
        // Interleaved: no prefetch, prefetch on the helper thread, and
        // prefetch before the load answers.
        let modes = [
            "without prefetch",
            "prefetch (helper thread)",
            "prefetch before answering",
        ];
        let mut totals: Vec<Vec<f64>> = vec![Vec::new(); 3];
        let mut loads: Vec<Vec<f64>> = vec![Vec::new(); 3];
        let mut pages = json!(null);
        for i in 0..runs * modes.len() {
            let mode = i % modes.len();
            let child = bench.prepared(false)?;
            let mut client = child.client()?;
            let body = match mode {
                0 => snapshot.load_body(false, false),
                1 => snapshot.load_body(true, false),
                _ => snapshot.load_body_sync(),
            };
            let started = Instant::now();
            let (loaded, load_us) = call(&mut client, "PUT", "/snapshot/load", &body)?;
            invoke(&mut client, &event)?;
            let total = started.elapsed().as_secs_f64() * 1e6;
            if mode > 0 {
                if !matches!(
                    loaded["working_set"].as_str(),
                    Some("prefetching" | "prefetched")
                ) {
                    return Err(format!("no working set was prefetched: {loaded}"));
                }
                pages = json!({ "read": loaded["prefetched_read_pages"], "write": loaded["prefetched_write_pages"] });
            }
            totals[mode].push(total);
            loads[mode].push(load_us);
        }
        println!("\nrestore → first {name} response (prepared process; working set {pages})");
        println!("{}", header());
        let mut figures = serde_json::Map::new();
        for (mode, label) in modes.iter().enumerate() {
            let total = summary_row(label, &ms(&totals[mode]), "ms", 3);
            let load = summary_row("  of which the load", &ms(&loads[mode]), "ms", 3);
            figures.insert(
                label.to_string(),
                json!({ "total_ms": total, "load_ms": load }),
            );
        }
        first_response.push(json!({
            "function": name,
            "event_bytes": event.len(),
            "working_set_pages": pages,
            "modes": figures,
        }));
    }

    // --- PSS per VM with many live copies of one snapshot.
    let mut pss = Vec::new();
    for &copies in &options.copies {
        let mut children = Vec::with_capacity(copies);
        for _ in 0..copies {
            let (child, mut client, _, _) = bench.restore_fresh(
                &bench.binaries.vmm,
                &["--log-level", "warn"],
                &echo.load_body(false, false),
            )?;
            invoke(&mut client, b"hello")?;
            // Served once the guest has prepared its next instance (a
            // command function does that after answering): the copy is
            // measured at rest.
            call(&mut client, "GET", "/ember/stats", &Value::Null)?;
            children.push(child);
        }
        let files = [base.mem.clone(), echo.mem.clone()];
        let mut totals = Vec::new();
        let mut dirtied = Vec::new();
        let mut beyond = Vec::new();
        for child in &children {
            let (total, guest_private) = pss_of(child.pid(), &files)?;
            totals.push(total as f64 / 1024.0);
            dirtied.push(guest_private as f64 / 1024.0);
            beyond.push((total - guest_private) as f64 / 1024.0);
        }
        drop(children);
        println!("\n{copies} live copies of the echo template (each restored and invoked once)");
        println!("{}", header());
        let t = summary_row("PSS per VM", &totals, "MiB", 2);
        let d = summary_row("  guest pages it dirtied (copied)", &dirtied, "MiB", 2);
        let b = summary_row("  PSS beyond what it dirtied", &beyond, "MiB", 2);
        pss.push(
            json!({ "copies": copies, "pss_mib": t, "dirtied_mib": d, "beyond_dirtied_mib": b }),
        );
    }

    // --- Restores per second.
    let count = runs.max(10);
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        one.push(restores_per_second(bench, &echo, count, 1)?);
        two.push(restores_per_second(bench, &echo, count, 2)?);
    }
    println!(
        "\nrestores per second (process start → resumed, {count} restores a round, 3 rounds alternating)"
    );
    println!("{}", header());
    let sequential = summary_row("one at a time", &one, "/s", 0).p50;
    let parallel = summary_row("two at a time", &two, "/s", 0).p50;

    let firecracker = match &options.firecracker {
        None => {
            println!(
                "\nFirecracker: skipped (give --firecracker PATH to drive it with the same guest and API calls)"
            );
            json!({ "skipped": "no --firecracker PATH given" })
        }
        Some(binary) => firecracker(bench, binary, &base, runs)?,
    };

    Ok(json!({
        "bench": "restore",
        "mem_mib": bench.mem_mib,
        "runs": runs,
        "create": {
            "full_booted_ms": full_summary,
            "full_booted_pages": full_pages,
            "full_80mib_written_ms": dirty_summary,
            "full_80mib_written_pages": dirty_pages,
            "full_80mib_written_not_synced_ms": dirty_nosync_summary,
            "diff_after_echo_load_ms": diff_summary,
            "diff_after_echo_load": echo_created,
        },
        "files": sizes,
        "restore": {
            "prepared_ms": prepared_summary,
            "prepared_inside_ms": prepared_inside,
            "jailed_prepared_ms": jailed_prepared,
            "jailed_start_ms": jailed_start,
            "jailed_start_inside_ms": jailed_start_inside,
            "process_start_ms": start_summary,
            "process_start_inside_ms": start_inside,
        },
        "first_response": first_response,
        "pss": pss,
        "restores_per_second": { "one_at_a_time": sequential, "two_at_a_time": parallel },
        "firecracker": firecracker,
    }))
}

/// PSS of a process, and the pages of its guest memory (mappings of
/// `files`) it copied by writing them — `Anonymous` in smaps: the pages
/// the VM dirtied. (`Private_Clean` is no measure of that: it counts file
/// pages no other process maps.) KiB.
fn pss_of(pid: u32, files: &[PathBuf]) -> Result<(u64, u64), String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("/proc/{pid}/smaps: {e}"))?;
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let (mut total, mut guest_private, mut in_guest) = (0, 0, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            let path = fields.nth(4).unwrap_or("");
            in_guest = names.iter().any(|n| n == path);
            continue;
        }
        let value: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Pss:" => total += value,
            "Anonymous:" if in_guest => guest_private += value,
            _ => {}
        }
    }
    Ok((total, guest_private))
}

/// Restores (process start → resumed) per second, `parallel` at a time.
fn restores_per_second(
    bench: &Bench,
    snapshot: &Snapshot,
    count: usize,
    parallel: usize,
) -> Result<f64, String> {
    let started = Instant::now();
    let results: Vec<Result<Vec<Child>, String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<Child>, String> {
                    let mut alive = Vec::new();
                    for _ in 0..count / parallel {
                        let (child, _, _, _) = bench.restore_fresh(
                            &bench.binaries.vmm,
                            &["--log-level", "warn"],
                            &snapshot.load_body(false, false),
                        )?;
                        // Teardown stays off the measured path.
                        alive.push(child);
                    }
                    Ok(alive)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("a worker panicked".into())))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut done = 0;
    for result in results {
        done += result?.len();
    }
    Ok(done as f64 / elapsed)
}

/// The same calls against Firecracker, side by side with ember-vmm: boot
/// the same guest image, Full snapshot (timed by the client for both),
/// then restores into fresh processes, the two interleaved. ember-vmm
/// restores its booted guest's Full (`base`), like for like.
fn firecracker(
    bench: &Bench,
    binary: &Path,
    base: &Snapshot,
    runs: usize,
) -> Result<Value, String> {
    let fc_snapshot = Snapshot::at(&bench.dir, "firecracker");
    let ember_copy = Snapshot::at(&bench.dir, "ember-full");
    let (mut fc_create, mut ember_create) = (Vec::new(), Vec::new());
    // Firecracker boots the guest without a mailbox: it prints its marker
    // on the console and parks. ember-vmm (also when given as the
    // "Firecracker" binary, to try this path) is snapshotted once the
    // guest's mailbox is up.
    let boot = |binary: &Path, name: &str| -> Result<(Child, ApiClient), String> {
        let ember = binary.file_name().is_some_and(|n| n == "ember-vmm");
        let args: &[&str] = if ember { &["--log-level", "info"] } else { &[] };
        let mut child = Child::spawn_with(binary, args, &bench.dir, name, true)?;
        let mut client = child.wait_socket()?;
        call(
            &mut client,
            "PUT",
            "/boot-source",
            &json!({ "kernel_image_path": bench.binaries.guest_image }),
        )?;
        call(
            &mut client,
            "PUT",
            "/machine-config",
            &json!({ "vcpu_count": 1, "mem_size_mib": bench.mem_mib }),
        )?;
        call(
            &mut client,
            "PUT",
            "/actions",
            &json!({ "action_type": "InstanceStart" }),
        )?;
        child.wait_for(ember_abi::READY_MARKER)?;
        if ember {
            child.wait_for("guest ready")?;
        }
        call(&mut client, "PATCH", "/vm", &json!({ "state": "Paused" }))?;
        Ok((child, client))
    };
    {
        let (_fc, mut fc) = boot(binary, &bench.name("fc"))?;
        let (_em, mut em) = boot(&bench.binaries.vmm, &bench.name("em"))?;
        for _ in 0..3 {
            for (client, snapshot, times) in [
                (&mut fc, &fc_snapshot, &mut fc_create),
                (&mut em, &ember_copy, &mut ember_create),
            ] {
                let body = snapshot.create_body("Full");
                let (_, us) = call(client, "PUT", "/snapshot/create", &body)?;
                times.push(us / 1000.0);
            }
        }
    }
    let load_body = |snapshot: &Snapshot| {
        json!({
            "snapshot_path": snapshot.state,
            "mem_backend": { "backend_type": "File", "backend_path": snapshot.mem },
            "resume_vm": true,
        })
    };
    let restore = |binary: &Path, snapshot: &Snapshot| -> Result<(f64, f64), String> {
        let (child, _, _, us) = bench.restore_fresh(binary, &[], &load_body(snapshot))?;
        Ok((us, child.spawned_at.elapsed().as_secs_f64() * 1e6))
    };
    let (mut fc_load, mut fc_start, mut em_load, mut em_start) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (load, start) = restore(binary, &fc_snapshot)?;
        fc_load.push(load);
        fc_start.push(start);
        let (load, start) = restore(&bench.binaries.vmm, base)?;
        em_load.push(load);
        em_start.push(start);
    }
    println!(
        "\nFirecracker ({}) and ember-vmm side by side: same guest image, same API calls, \
         interleaved; both from a fresh process (ember-vmm not prepared)",
        binary.display()
    );
    println!("{}", header());
    let fc_c = summary_row("Firecracker: Full create (client)", &fc_create, "ms", 1);
    let em_c = summary_row("ember-vmm:   Full create (client)", &ember_create, "ms", 1);
    let fc_l = summary_row("Firecracker: PUT /snapshot/load", &ms(&fc_load), "ms", 3);
    let em_l = summary_row("ember-vmm:   PUT /snapshot/load", &ms(&em_load), "ms", 3);
    let fc_s = summary_row(
        "Firecracker: process start → resumed",
        &ms(&fc_start),
        "ms",
        3,
    );
    let em_s = summary_row(
        "ember-vmm:   process start → resumed",
        &ms(&em_start),
        "ms",
        3,
    );
    // Its version, not its path: the JSON is kept in the repository.
    let version = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    Ok(json!({
        "version": version,
        "firecracker": { "full_create_ms": fc_c, "load_ms": fc_l, "process_start_ms": fc_s, "files": fc_snapshot.sizes() },
        "ember_vmm": { "full_create_ms": em_c, "load_ms": em_l, "process_start_ms": em_s, "files": ember_copy.sizes() },
    }))
}
