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
struct Emberd {
    child: std::process::Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Drop for Emberd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child: SIGTERM, so it stops its VMs.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Emberd {
    fn start(binaries: &Binaries) -> Result<Emberd, String> {
        let emberd = binaries.vmm.with_file_name("emberd");
        let dir = std::env::temp_dir().join(format!("ember-bench-emberd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
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
            .env("EMBER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", emberd.display()))?;
        let emberd = Emberd { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ApiClient::connect(&emberd.socket).is_err() {
            if Instant::now() > deadline {
                return Err("emberd did not listen".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(emberd)
    }

    fn client(&self) -> Result<ApiClient, String> {
        let client = ApiClient::connect(&self.socket).map_err(|e| e.to_string())?;
        client
            .set_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(client)
    }
}

fn deploy(client: &mut ApiClient, name: &str, module: &Path, config: Value) -> Result<f64, String> {
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
    Ok(us)
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

/// `ember-bench invoke`.
pub fn bench_invoke(
    binaries: &Binaries,
    count: usize,
    restores: usize,
    seconds: u64,
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
        prepared_ready(&mut client, 2)?;
        let (response, us) = invoke(&mut client, "echo", b"restore me")?;
        if response.header("x-ember-start") != Some("restored") {
            return Err(format!("expected a restore: {:?}", response.headers));
        }
        restored_us.push(us);
        let id = response
            .header("x-ember-instance")
            .unwrap_or_default()
            .to_string();
        client
            .request("DELETE", &format!("/instances/{id}"), None)
            .map_err(|e| e.to_string())?;
    }

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
    let w = Summary::of(&warm_us);
    println!("{}", w.row("invoke, warm", "us", 1));
    println!("throughput, {clients} clients, warm: {throughput:.0} invocations/s");
    Ok(json!({
        "bench": "invoke",
        "deploy_ms": d,
        "restored_ms": r,
        "warm_us": w,
        "throughput_4_clients_per_s": throughput,
    }))
}
