//! Benchmarks of functions in the guest: warm invocations through the
//! control socket, and SHA-256 in the guest against native code.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_vmm::api::client::ApiClient;
use ember_vmm::api::parsed_request::{DURATION_HEADER, FUNCTION_ERROR_HEADER, ROUND_TRIP_HEADER};
use serde_json::json;

use crate::launch::{examples_dir, Binaries, Launched};
use crate::stats::{header, Summary};

use crate::examples::sha256_digest;

/// Boots a VM and loads `module` into it.
fn vm_with_function(
    binaries: &Binaries,
    module: &Path,
    timeout_ms: u64,
    vmm_args: &[&str],
    pin: Option<usize>,
) -> Result<(Launched, ApiClient, serde_json::Value), String> {
    let mut vm = Launched::boot(binaries, 1, 128, vmm_args, pin)?;
    vm.wait_milestones(Duration::from_secs(10))?;
    let mut client = vm.client()?;
    let response = client
        .put_json(
            "/ember/function",
            &json!({ "module_path": module, "memory_mib": 64, "timeout_ms": timeout_ms }),
        )
        .map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!(
            "loading {} answered {}: {}",
            module.display(),
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    let loaded = response.json();
    Ok((vm, client, loaded))
}

/// One invocation's result and the times ember-vmm reported.
struct Invoked {
    body: Vec<u8>,
    client_us: f64,
    round_trip_us: f64,
    duration_us: f64,
}

fn invoke(client: &mut ApiClient, event: &[u8]) -> Result<Invoked, String> {
    let start = Instant::now();
    let response = client
        .post("/ember/invoke", event)
        .map_err(|e| e.to_string())?;
    let client_us = start.elapsed().as_secs_f64() * 1e6;
    if response.status != 200 {
        return Err(format!(
            "invoke answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    if let Some(kind) = response.header(FUNCTION_ERROR_HEADER) {
        return Err(format!(
            "the function failed ({kind}): {}",
            String::from_utf8_lossy(&response.body)
        ));
    }
    let number = |name: &str| -> Result<f64, String> {
        response
            .header(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {name} header"))
    };
    Ok(Invoked {
        client_us,
        round_trip_us: number(ROUND_TRIP_HEADER)?,
        duration_us: number(DURATION_HEADER)?,
        body: response.body,
    })
}

/// `invoke-vmm`: warm invocations of `module` (default: the echo example)
/// with an event of `event_bytes`, back to back and spaced by each gap, in
/// one VM per `--mailbox-poll-us` value (A/B in the same run).
#[allow(clippy::too_many_arguments)]
pub fn bench_invoke(
    binaries: &Binaries,
    count: usize,
    module: Option<PathBuf>,
    event_bytes: usize,
    gaps_us: &[u64],
    polls_us: &[u64],
    pin: Option<usize>,
) -> Result<serde_json::Value, String> {
    if count == 0 {
        return Err("--count must be at least 1".into());
    }
    let module = match module {
        Some(module) => module,
        None => examples_dir()?.join("echo.wasm"),
    };
    let event: Vec<u8> = (0..event_bytes).map(|i| b'a' + (i % 26) as u8).collect();
    let echo = module.file_name().is_some_and(|n| n == "echo.wasm");
    let placement = pin.map_or("threads unpinned".to_string(), |cpu| {
        format!("all threads on CPU {cpu}")
    });
    let mut results = Vec::new();
    let mut model = serde_json::Value::Null;
    for &poll_us in polls_us {
        let poll_arg = poll_us.to_string();
        let (vm, mut client, loaded) = vm_with_function(
            binaries,
            &module,
            3000,
            &["--mailbox-poll-us", &poll_arg],
            pin,
        )?;
        model = loaded["model"].clone();
        println!(
            "warm invocations of {} ({} model), {event_bytes}-byte event, {count} per gap, \
             {placement}, --mailbox-poll-us {poll_us}",
            module.display(),
            model.as_str().unwrap_or("?"),
        );
        // Warm up: the first invocations touch the guest's pages for the first time.
        for _ in 0..(count / 10).clamp(1, 200) {
            invoke(&mut client, &event)?;
        }
        for &gap_us in gaps_us {
            let (mut client_us, mut round_trip_us, mut duration_us) = (
                Vec::with_capacity(count),
                Vec::with_capacity(count),
                Vec::with_capacity(count),
            );
            for _ in 0..count {
                if gap_us > 0 {
                    std::thread::sleep(Duration::from_micros(gap_us));
                }
                let invoked = invoke(&mut client, &event)?;
                if echo && invoked.body != event {
                    return Err(format!(
                        "echo answered {} bytes, not the {event_bytes}-byte event",
                        invoked.body.len()
                    ));
                }
                client_us.push(invoked.client_us);
                round_trip_us.push(invoked.round_trip_us);
                duration_us.push(invoked.duration_us);
            }
            let spacing = match gap_us {
                0 => "back to back".to_string(),
                us => format!("{us} us apart"),
            };
            println!("{spacing}:");
            println!("{}", header());
            let rows = [
                ("client → socket → guest → client", &client_us),
                ("  inside ember-vmm (mailbox round trip)", &round_trip_us),
                ("  inside the function (guest clock)", &duration_us),
            ];
            let summaries: Vec<Summary> = rows.iter().map(|(_, s)| Summary::of(s)).collect();
            for ((name, _), summary) in rows.iter().zip(&summaries) {
                println!("{}", summary.row(name, "us", 1));
            }
            results.push(json!({
                "mailbox_poll_us": poll_us,
                "gap_us": gap_us,
                "through_api_us": summaries[0],
                "inside_vmm_us": summaries[1],
                "function_us": summaries[2],
            }));
        }
        let stats = client
            .get("/ember/stats")
            .map_err(|e| e.to_string())?
            .json();
        let prepared = stats["instances_prepared"].as_f64().unwrap_or(0.0);
        if prepared > 0.0 {
            let us = stats["prepare_us_total"].as_f64().unwrap_or(0.0) / prepared;
            println!(
                "the guest prepared {prepared} fresh instances after replying, {us:.1} us each on average"
            );
        }
        drop(client);
        vm.shutdown()?;
    }
    Ok(json!({
        "bench": "invoke-vmm",
        "module": module,
        "model": model,
        "event_bytes": event_bytes,
        "count": count,
        "pinned_to_cpu": pin,
        "results": results,
    }))
}

/// `sha256`: the sha256 example over `bytes` of input in the guest (its
/// own clock) against the same source compiled natively, in one run.
pub fn bench_sha256(
    binaries: &Binaries,
    runs: usize,
    bytes: usize,
    pin: Option<usize>,
) -> Result<serde_json::Value, String> {
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let event: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let want = sha256_digest::hex_digest(&event[..]).map_err(|e| e.to_string())? + "\n";

    // B: native, the same source, the same portable SHA-256 code path.
    let mut native_us = Vec::with_capacity(runs);
    for _ in 0..runs.max(10) {
        let start = Instant::now();
        let hex = sha256_digest::hex_digest(std::hint::black_box(&event[..]))
            .map_err(|e| e.to_string())?;
        native_us.push(start.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(hex);
    }

    // A: in the guest.
    let module = examples_dir()?.join("sha256.wasm");
    let (vm, mut client, _) = vm_with_function(binaries, &module, 60_000, &[], pin)?;
    invoke(&mut client, &event)?;
    let mut guest_us = Vec::with_capacity(runs);
    let mut through_api_us = Vec::with_capacity(runs);
    for _ in 0..runs {
        let invoked = invoke(&mut client, &event)?;
        if invoked.body != want.as_bytes() {
            return Err(format!(
                "the guest's digest {:?} is not {want:?}",
                String::from_utf8_lossy(&invoked.body)
            ));
        }
        guest_us.push(invoked.duration_us);
        through_api_us.push(invoked.client_us);
    }
    drop(client);
    vm.shutdown()?;

    let (guest, api, native) = (
        Summary::of(&guest_us),
        Summary::of(&through_api_us),
        Summary::of(&native_us),
    );
    println!("SHA-256 of {bytes} bytes: examples/sha256 in the guest vs the same source native");
    println!("{}", header());
    println!("{}", guest.row("guest, inside the function", "us", 0));
    println!("{}", api.row("guest, client → socket → client", "us", 0));
    println!("{}", native.row("native on the host", "us", 0));
    let ratio = guest.p50 / native.p50;
    println!(
        "guest / native (medians): {ratio:.1}x; guest throughput {:.1} MB/s, native {:.1} MB/s",
        bytes as f64 / guest.p50,
        bytes as f64 / native.p50
    );
    Ok(json!({
        "bench": "sha256",
        "bytes": bytes,
        "runs": runs,
        "guest_function_us": guest,
        "guest_through_api_us": api,
        "native_us": native,
        "ratio_p50": ratio,
    }))
}
