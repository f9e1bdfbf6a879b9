//! `invoke`: invocations through emberd's socket — warm and restored, one
//! client and four, and the time to deploy a function to a ready template.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_vmm::api::client::{ApiClient, ApiResponse};
use serde_json::{json, Value};

use crate::launch::{examples_dir, Binaries};
use crate::stats::{header, Summary};

/// A running emberd on a temporary state dir.
pub(crate) struct Emberd {
    child: std::process::Child,
    socket: PathBuf,
    pub(crate) dir: PathBuf,
    /// Removes its directory when dropped.
    owns_dir: bool,
}

impl Drop for Emberd {
    fn drop(&mut self) {
        // Not once it was reaped (kill_9): its pid may be another's now.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, not yet reaped: SIGTERM, so
            // it stops its VMs.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = self.child.wait();
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Emberd {
    pub(crate) fn start(binaries: &Binaries) -> Result<Emberd, String> {
        Emberd::start_with(binaries, &[])
    }

    /// Starts emberd with `args` on a fresh directory (removed when it stops).
    pub(crate) fn start_with(binaries: &Binaries, args: &[&str]) -> Result<Emberd, String> {
        let dir = std::env::temp_dir().join(format!("ember-bench-emberd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut emberd = Emberd::start_in_with(binaries, &dir, args)?;
        emberd.owns_dir = true;
        Ok(emberd)
    }

    /// Starts emberd on `dir` (kept when it stops).
    fn start_in(binaries: &Binaries, dir: &Path) -> Result<Emberd, String> {
        Emberd::start_in_with(binaries, dir, &[])
    }

    fn start_in_with(binaries: &Binaries, dir: &Path, args: &[&str]) -> Result<Emberd, String> {
        let emberd = binaries.vmm.with_file_name("emberd");
        let dir = dir.to_path_buf();
        let socket = dir.join("emberd.sock");
        let child = Command::new(&emberd)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--vmm")
            .arg(&binaries.vmm)
            .arg("--guest-image")
            .arg(&binaries.guest_image)
            .args(args)
            .env("EMBER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", emberd.display()))?;
        let emberd = Emberd {
            child,
            socket,
            dir,
            owns_dir: false,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ApiClient::connect(&emberd.socket).is_err() {
            if Instant::now() > deadline {
                return Err("emberd did not listen".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(emberd)
    }

    /// SIGKILL: no chance to finish anything (its directory is kept).
    fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.owns_dir = false;
    }

    pub(crate) fn client(&self) -> Result<ApiClient, String> {
        let client = ApiClient::connect(&self.socket).map_err(|e| e.to_string())?;
        client
            .set_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(client)
    }
}

pub(crate) fn deploy(
    client: &mut ApiClient,
    name: &str,
    module: &Path,
    config: Value,
) -> Result<f64, String> {
    deploy_answer(client, name, module, config).map(|(us, _)| us)
}

/// A deploy's time (µs, as the client saw it) and emberd's answer (its
/// stages and the guest's load figures).
pub(crate) fn deploy_answer(
    client: &mut ApiClient,
    name: &str,
    module: &Path,
    config: Value,
) -> Result<(f64, Value), String> {
    let module = std::fs::read(module).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let response = ember_agent::client::deploy(client, name, &config, &module, &[])
        .map_err(|e| e.to_string())?;
    let us = started.elapsed().as_secs_f64() * 1e6;
    if response.status != 200 {
        return Err(format!(
            "deploy answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    let answer = serde_json::from_slice(&response.body).map_err(|e| e.to_string())?;
    Ok((us, answer))
}

fn invoke(client: &mut ApiClient, name: &str, event: &[u8]) -> Result<(ApiResponse, f64), String> {
    let started = Instant::now();
    let response = client
        .post(&format!("/functions/{name}/invoke"), event)
        .map_err(|e| e.to_string())?;
    let us = started.elapsed().as_secs_f64() * 1e6;
    if response.status != 200 || response.header("x-ember-function-error").is_some() {
        return Err(format!(
            "invoke answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    Ok((response, us))
}

fn prepared_ready(client: &mut ApiClient, want: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = client.get("/health").map_err(|e| e.to_string())?.json();
        if health["prepared_vmms"].as_u64().unwrap_or(0) >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the prepared pool did not refill".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One invocation of `echo` on a fresh instance, once the prepared pool
/// is full; the instance is deleted after. Its time, µs.
fn restored_once(client: &mut ApiClient) -> Result<f64, String> {
    prepared_ready(client, 2)?;
    let (response, us) = invoke(client, "echo", b"restore me")?;
    if response.header("x-ember-start") != Some("restored") {
        return Err(format!("expected a restore: {:?}", response.headers));
    }
    let id = response
        .header("x-ember-instance")
        .unwrap_or_default()
        .to_string();
    client
        .request("DELETE", &format!("/instances/{id}"), None)
        .map_err(|e| e.to_string())?;
    Ok(us)
}

/// `ember-bench invoke`.
pub fn bench_invoke(
    binaries: &Binaries,
    count: usize,
    restores: usize,
    seconds: u64,
    gap_ms: u64,
) -> Result<Value, String> {
    let examples = examples_dir()?;
    let echo = examples.join("echo.wasm");
    let emberd = Emberd::start(binaries)?;
    let mut client = emberd.client()?;
    println!("through emberd's socket (1-vCPU VMs of 512 MiB, 2 prepared ember-vmm processes)");

    // Deploys: each a new version, its template built from the base.
    let mut deploy_us = Vec::new();
    for i in 0..10 {
        deploy_us.push(deploy(&mut client, &format!("d{i}"), &echo, json!({}))?);
    }
    deploy(&mut client, "echo", &echo, json!({ "max_concurrency": 64 }))?;

    // Restored: each invocation on a fresh instance (the one before is
    // deleted, and the prepared pool refilled, off the clock).
    let mut restored_us = Vec::new();
    for _ in 0..restores {
        restored_us.push(restored_once(&mut client)?);
    }

    // Jailed (the default, as above) against --no-jail: two emberds side
    // by side, restored invocations alternating between them (A B A B,
    // `restores` each), each timed once both prepared pools are full.
    drop(client);
    drop(emberd);
    let pair = [
        Emberd::start_with(binaries, &[])?,
        Emberd::start_with(binaries, &["--no-jail"])?,
    ];
    let mut clients = Vec::new();
    for emberd in &pair {
        let mut client = emberd.client()?;
        deploy(&mut client, "echo", &echo, json!({}))?;
        clients.push(client);
    }
    let mut by_jail: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..restores * 2 {
        let i = round % 2;
        let other = &mut clients[1 - i];
        prepared_ready(other, 2)?;
        by_jail[i].push(restored_once(&mut clients[i])? / 1000.0);
        // The instance's teardown (off the request path, heavier jailed:
        // a keeper, a cgroup leaf, namespaces) ends before the next
        // restore is timed.
        std::thread::sleep(Duration::from_millis(gap_ms));
    }
    drop(clients);
    drop(pair);
    let emberd = Emberd::start(binaries)?;
    let mut client = emberd.client()?;
    deploy(&mut client, "echo", &echo, json!({ "max_concurrency": 64 }))?;

    // Warm: one client, back to back.
    let event = vec![b'w'; 64];
    for _ in 0..200 {
        invoke(&mut client, "echo", &event)?;
    }
    let mut warm_us = Vec::with_capacity(count);
    for _ in 0..count {
        let (response, us) = invoke(&mut client, "echo", &event)?;
        if response.body != event {
            return Err("echo answered something else".into());
        }
        warm_us.push(us);
    }

    // Throughput: 4 clients, each its own connection (and instance).
    let clients = 4;
    let socket = emberd.socket.clone();
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let mut client = ApiClient::connect(&socket).map_err(|e| e.to_string())?;
                let mut done = 0;
                while Instant::now() < until {
                    invoke(&mut client, "echo", b"t")?;
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let started = Instant::now();
    let mut total = 0;
    for worker in workers {
        total += worker
            .join()
            .map_err(|_| "a client panicked".to_string())??;
    }
    let throughput = total as f64 / started.elapsed().as_secs_f64().max(seconds as f64);

    println!("{}", header());
    let d = Summary::of(&deploy_us.iter().map(|us| us / 1000.0).collect::<Vec<_>>());
    println!("{}", d.row("deploy → template ready", "ms", 1));
    let r = Summary::of(&restored_us.iter().map(|us| us / 1000.0).collect::<Vec<_>>());
    println!("{}", r.row("invoke, restored (prepared VMM)", "ms", 3));
    let jailed = Summary::of(&by_jail[0]);
    println!("{}", jailed.row("  A/B: restored, jailed", "ms", 3));
    let unjailed = Summary::of(&by_jail[1]);
    println!("{}", unjailed.row("  A/B: restored, --no-jail", "ms", 3));
    let w = Summary::of(&warm_us);
    println!("{}", w.row("invoke, warm", "us", 1));
    println!("throughput, {clients} clients, warm: {throughput:.0} invocations/s");
    Ok(json!({
        "bench": "invoke",
        "deploy_ms": d,
        "restored_ms": r,
        "restored_jailed_ms": jailed,
        "restored_no_jail_ms": unjailed,
        "jail_ab_gap_ms": gap_ms,
        "warm_us": w,
        "throughput_4_clients_per_s": throughput,
    }))
}

/// Accepts `event` for `name` asynchronously; its id.
fn accept(client: &mut ApiClient, name: &str, event: &[u8]) -> Result<String, String> {
    let response =
        ember_agent::client::invoke_async(client, name, event, &[]).map_err(|e| e.to_string())?;
    if response.status != 202 {
        return Err(format!(
            "async invoke answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    Ok(response.json()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// `clients` clients accept 64-byte events for `name` for `seconds`;
/// returns accepts/s and every accept's latency, µs.
fn accept_run(
    socket: &Path,
    name: &str,
    clients: usize,
    seconds: f64,
) -> Result<(f64, Vec<f64>), String> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_path_buf();
            let name = name.to_string();
            std::thread::spawn(move || -> Result<Vec<f64>, String> {
                let mut client = ApiClient::connect(&socket).map_err(|e| e.to_string())?;
                let mut latencies = Vec::new();
                let event = [b'a'; 64];
                while Instant::now() < until {
                    let at = Instant::now();
                    accept(&mut client, &name, &event)?;
                    latencies.push(at.elapsed().as_secs_f64() * 1e6);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(
            worker
                .join()
                .map_err(|_| "a client panicked".to_string())??,
        );
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, all))
}

/// Open async events of `name` (queued, retrying, running).
fn queued(client: &mut ApiClient, name: &str) -> Result<u64, String> {
    let f = client
        .get(&format!("/functions/{name}"))
        .map_err(|e| e.to_string())?
        .json();
    Ok(f["queued"].as_u64().unwrap_or(0))
}

const SPIN: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $forever (br $forever))))
"#;

/// `ember-bench async`: durable accepts/s and their latency (8 clients);
/// accept → result recorded for a warm echo; recovery of a queue of
/// `backlog` events after a kill -9.
pub fn bench_async(
    binaries: &Binaries,
    seconds: f64,
    count: usize,
    backlog: u64,
) -> Result<Value, String> {
    let echo = examples_dir()?.join("echo.wasm");
    let emberd = Emberd::start(binaries)?;
    let mut client = emberd.client()?;
    println!("async invocations through emberd's socket; every 202 after an fsync of its event");
    // A function whose one delivery never ends: accepts alone, no
    // deliveries beside them.
    let spin = emberd.dir.join("spin.wasm");
    let module = wat::parse_str(SPIN).map_err(|e| e.to_string())?;
    std::fs::write(&spin, module).map_err(|e| e.to_string())?;
    let queue_only =
        json!({ "max_concurrency": 1, "timeout_ms": 900_000, "max_queued": 1_000_000 });
    deploy(&mut client, "held", &spin, queue_only)?;
    deploy(
        &mut client,
        "echo",
        &echo,
        json!({ "max_concurrency": 4, "max_queued": 1_000_000 }),
    )?;
    let clients = 8;
    let (held_rate, held_us) = accept_run(&emberd.socket, "held", clients, seconds)?;
    let (echo_rate, echo_us) = accept_run(&emberd.socket, "echo", clients, seconds)?;
    // Let the echo backlog drain before the latency run.
    let deadline = Instant::now() + Duration::from_secs(300);
    while queued(&mut client, "echo")? > 0 {
        if Instant::now() > deadline {
            return Err("the echo backlog did not drain in 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // Accept → result recorded: one event at a time, its result waited
    // for (GET /invocations/{id}?wait_ms: answered once it is final).
    let mut poller = emberd.client()?;
    let mut to_result_us = Vec::with_capacity(count);
    for i in 0..count + 20 {
        let started = Instant::now();
        let id = accept(&mut client, "echo", b"to the result")?;
        let v = poller
            .get(&format!("/invocations/{id}?wait_ms=10000"))
            .map_err(|e| e.to_string())?
            .json();
        if v["state"] != "succeeded" {
            return Err(format!("the event did not succeed in 10 s: {v}"));
        }
        if i >= 20 {
            to_result_us.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let dir = emberd.dir.clone();
    drop(poller);
    drop(client);

    // Recovery: `backlog` events queued for echo (one delivery at a time),
    // emberd killed with SIGKILL, started again: the time from its start
    // to its first delivered event.
    let mut client = emberd.client()?;
    deploy(
        &mut client,
        "slow",
        &echo,
        json!({ "max_concurrency": 1, "max_queued": 1_000_000 }),
    )?;
    while queued(&mut client, "slow")? < backlog {
        accept_run(&emberd.socket, "slow", clients, 0.5)?;
    }
    let queued_at_kill = queued(&mut client, "slow")?;
    drop(client);
    emberd.kill_9();
    let started = Instant::now();
    let restarted = Emberd::start_in(binaries, &dir);
    let listening_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut restarted = restarted?;
    restarted.owns_dir = true;
    let mut client = restarted.client()?;
    let first_ms = loop {
        let metrics = client.get("/metrics").map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        let succeeded = text
            .lines()
            .find_map(|l| l.strip_prefix("ember_async_succeeded_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if succeeded > 0 {
            break started.elapsed().as_secs_f64() * 1e3;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("no event delivered within 60 s of the restart".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    };

    println!("{}", header());
    let held = Summary::of(&held_us);
    println!("{}", held.row("accept, 8 clients, no deliveries", "us", 0));
    let echoed = Summary::of(&echo_us);
    println!(
        "{}",
        echoed.row("accept, 8 clients, echo delivering", "us", 0)
    );
    let to_result = Summary::of(&to_result_us);
    println!(
        "{}",
        to_result.row("accept → result recorded (echo)", "us", 0)
    );
    println!("accepted/s, 8 clients, no deliveries beside: {held_rate:.0}");
    println!("accepted/s, 8 clients, echo delivering beside: {echo_rate:.0}");
    println!(
        "recovery with {queued_at_kill} events queued: listening after {listening_ms:.0} ms, first event delivered {first_ms:.0} ms after start"
    );
    Ok(json!({
        "bench": "async",
        "accepted_per_s_no_deliveries": held_rate,
        "accepted_per_s_echo_delivering": echo_rate,
        "accept_us_no_deliveries": held,
        "accept_us_echo_delivering": echoed,
        "accept_to_result_us": to_result,
        "recovery_queued": queued_at_kill,
        "recovery_listening_ms": listening_ms,
        "recovery_first_delivery_ms": first_ms,
    }))
}
