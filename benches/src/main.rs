//! `ember-bench`: the Ember benchmark suite.
//!
//! Every command prints p50/p99/min/max over many runs and, with `--json`,
//! writes the samples' summaries as JSON. Run it on an idle machine: it
//! warns when the load average says otherwise. docs/BENCHMARKS.md records
//! the figures and the commands that made them.
//!
//! Two commands need no VM: `gen-trace` writes a synthetic invocation
//! trace ([`trace`]) and `sim` replays a trace against the keep-alive and
//! pre-warm policies ([`sim`]).

mod agent;
mod engine;
mod examples;
mod functions;
mod launch;
mod metaevents;
mod procfs;
mod restore;
mod sim;
mod stats;
mod trace;
mod workloads;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ember_vmm::api::parsed_request::ROUND_TRIP_HEADER;
use serde_json::json;

use crate::launch::{Binaries, Launched};
use crate::stats::{header, Summary};

#[derive(Debug, Parser)]
#[command(name = "ember-bench", version, about = "The Ember benchmark suite")]
struct Args {
    /// The ember-vmm binary (default: the one beside ember-bench).
    #[arg(long, global = true, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// The guest image (default: $EMBER_GUEST_IMAGE, else ./scripts/guest-image).
    #[arg(long, global = true, value_name = "PATH")]
    guest_image: Option<PathBuf>,
    /// Run every thread of ember-vmm on this CPU (`echo` measures both
    /// unpinned and pinned, in the same run).
    #[arg(long, global = true, value_name = "CPU")]
    pin: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Cold boots: process start → console marker and → mailbox `ready`;
    /// the VMM's RSS and PSS without guest memory.
    Boot {
        /// Boots to run.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// vCPUs per VM.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 128)]
        mem_mib: u64,
    },
    /// Mailbox echo round trips (host → guest → host) through the control socket.
    Echo {
        /// Round trips per payload size.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Payload sizes in bytes, or `max` for the mailbox maximum (repeatable).
        #[arg(long = "size", default_values = ["0", "1024", "65536", "max"])]
        sizes: Vec<String>,
    },
    /// Warm invocations of a function (default: the echo example) through
    /// the control socket, back to back and spaced apart.
    InvokeVmm {
        /// Invocations per spacing.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// The .wasm to load (default: echo.wasm from the examples).
        #[arg(long, value_name = "PATH")]
        module: Option<PathBuf>,
        /// Event size in bytes.
        #[arg(long, default_value_t = 64)]
        event_bytes: usize,
        /// Pause before each invocation, µs; 0 is back to back (repeatable).
        #[arg(long = "gap-us", default_values = ["0", "1000"])]
        gaps_us: Vec<u64>,
        /// ember-vmm's `--mailbox-poll-us`, one VM per value (repeatable).
        #[arg(long = "mailbox-poll-us", default_values = ["100"])]
        polls_us: Vec<u64>,
    },
    /// SHA-256 of an event in the guest (examples/sha256)
    /// against the same source compiled natively.
    Sha256 {
        /// Invocations (and native runs).
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Input size in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        bytes: usize,
    },
    /// The ring-0 instructions of the guest's boot path, counted by
    /// single-stepping (deterministic: one boot suffices).
    Ring0,
    /// Invocations through emberd: warm, restored, 4 clients; deploy time.
    Invoke {
        /// Warm invocations.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Restored invocations.
        #[arg(long, default_value_t = 50)]
        restores: usize,
        /// Seconds of the 4-client throughput run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Milliseconds between a restored instance's delete and the next
        /// restore in the jailed/--no-jail A/B (its teardown's time).
        #[arg(long, default_value_t = 30)]
        gap_ms: u64,
    },
    /// Async invocations through emberd: durable accepts/s and latency (8
    /// clients), accept → result recorded, recovery of a queue after kill -9.
    Async {
        /// Seconds of each 8-client accept run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Events timed from accept to result.
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Events queued when emberd is killed for the recovery figure.
        #[arg(long, default_value_t = 10_000)]
        backlog: u64,
    },
    /// Metaevents: CPU to sample the metadata and evaluate 1,000 rules
    /// over 200 functions' hour of history; error → target start latency.
    Metaevents {
        /// Fires timed through emberd.
        #[arg(long, default_value_t = 40)]
        fires: usize,
        /// Ticks (a quarter second each) timed in-process.
        #[arg(long, default_value_t = 400)]
        ticks: usize,
    },
    /// Snapshot create and restore: create times, file sizes, restore
    /// latency (prepared and from process start), restore → first response
    /// with and without prefetch, PSS with many copies, restores/s.
    Restore {
        /// Samples per restore figure.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 128)]
        mem_mib: usize,
        /// Live copies to measure PSS with (repeatable).
        #[arg(long = "copies", default_values = ["1", "10", "50"])]
        copies: Vec<usize>,
        /// A Firecracker binary to drive with the same guest and calls.
        #[arg(long, value_name = "PATH")]
        firecracker: Option<PathBuf>,
    },
    /// The workload examples under Wasmtime on the host with the guest's
    /// compiler settings: guard pages vs explicit bounds checks, and the
    /// cost of fuel and of epoch checks; native code beside them.
    Engine {
        /// Runs per example and setting.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// The workload examples in the guest: native vs guest (warm), restore
    /// → first response vs warm, pages the first invocation touches, the
    /// template's Diff, compile and deploy times (through emberd).
    Functions {
        /// Warm invocations (and native runs) per example.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Restores per example.
        #[arg(long, default_value_t = 20)]
        restores: usize,
        /// Only these examples (repeatable; default: all).
        #[arg(long = "example")]
        only: Vec<String>,
        /// Deploys of the largest example, each with an empty compile
        /// cache and then again with the module compiled.
        #[arg(long, default_value_t = 5)]
        deploys: usize,
    },
    /// Writes a synthetic invocation trace in the Azure Functions 2019
    /// schema (per-minute counts): timers, diurnal HTTP, bursty queue
    /// consumers and rare functions.
    #[command(after_help = trace::MIX_HELP)]
    GenTrace {
        /// Functions (rows).
        #[arg(long, default_value_t = 1_000)]
        functions: usize,
        /// Minutes (count columns).
        #[arg(long, default_value_t = 1_440)]
        minutes: usize,
        /// The seed: the same seed writes the same trace.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The CSV to write (default: stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Replays an invocation trace (Azure Functions 2019 schema) against
    /// the keep-alive and pre-warm policies: cold starts, idle memory-time,
    /// pre-warms, per policy and per trigger.
    Sim {
        /// The trace: HashOwner, HashApp, HashFunction, an optional Trigger, 1..N.
        #[arg(long, value_name = "FILE")]
        trace: PathBuf,
        /// function_durations_percentiles: `Average` (ms) by HashFunction
        /// (default 1000 ms).
        #[arg(long, value_name = "FILE")]
        durations: Option<PathBuf>,
        /// app_memory_percentiles: `AverageAllocatedMb` by HashApp
        /// (default 128 MiB).
        #[arg(long, value_name = "FILE")]
        memory: Option<PathBuf>,
        /// fixed, hybrid, ember or all.
        #[arg(long, default_value = "all")]
        policy: String,
        /// The fixed keep-alive, and the other policies' cap, seconds.
        #[arg(long, default_value_t = 600.0)]
        keep_alive_s: f64,
        /// What a cold start (a restore) adds to an invocation, ms.
        #[arg(long, default_value_t = 3.9)]
        cold_start_ms: f64,
        /// The seed of the arrivals' placement inside each minute.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulation threads (0: one per CPU).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

fn main() {
    let args = Args::parse();
    let load = procfs::load_average();
    if load > 0.8 {
        eprintln!(
            "warning: load average {load:.2}: the machine is not idle, and the figures will show it \
             (a build beside a benchmark turns a 0.4 ms VM setup into 10 ms)"
        );
    }
    let result = match &args.command {
        Bench::GenTrace {
            functions,
            minutes,
            seed,
            out,
        } => trace::command(*functions, *minutes, *seed, out.as_deref()),
        Bench::Sim {
            trace,
            durations,
            memory,
            policy,
            keep_alive_s,
            cold_start_ms,
            seed,
            threads,
        } => sim::command(&sim::Options {
            trace: trace.clone(),
            durations: durations.clone(),
            memory: memory.clone(),
            policy: policy.clone(),
            keep_alive_s: *keep_alive_s,
            cold_start_ms: *cold_start_ms,
            seed: *seed,
            threads: *threads,
        }),
        Bench::Engine { runs } => engine::bench_engine(*runs),
        _ => Binaries::find(args.vmm.clone(), args.guest_image.clone())
            .and_then(|binaries| run_vm_bench(&binaries, &args)),
    };
    let mut report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("ember-bench: {e}");
            std::process::exit(1);
        }
    };
    report["load_average_at_start"] = json!(load);
    report["host"] = json!({ "kernel": kernel_release(), "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()) });
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).expect("JSON of plain data");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("ember-bench: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
        let note = format!("results written to {}", path.display());
        match args.command {
            // Its stdout may be the CSV.
            Bench::GenTrace { .. } => eprintln!("{note}"),
            _ => println!("{note}"),
        }
    }
}

/// Runs one of the commands that drive VMs.
fn run_vm_bench(binaries: &Binaries, args: &Args) -> Result<serde_json::Value, String> {
    match args.command {
        Bench::Boot {
            runs,
            vcpus,
            mem_mib,
        } => bench_boot(binaries, runs, vcpus, mem_mib, args.pin),
        Bench::Echo { count, ref sizes } => bench_echo(binaries, count, sizes, args.pin),
        Bench::InvokeVmm {
            count,
            ref module,
            event_bytes,
            ref gaps_us,
            ref polls_us,
        } => functions::bench_invoke(
            binaries,
            count,
            module.clone(),
            event_bytes,
            gaps_us,
            polls_us,
            args.pin,
        ),
        Bench::Sha256 { runs, bytes } => functions::bench_sha256(binaries, runs, bytes, args.pin),
        Bench::Functions {
            runs,
            restores,
            ref only,
            deploys,
        } => workloads::bench_functions(binaries, runs, restores, only, deploys),
        Bench::Ring0 => bench_ring0(binaries),
        Bench::Invoke {
            count,
            restores,
            seconds,
            gap_ms,
        } => agent::bench_invoke(binaries, count, restores, seconds, gap_ms),
        Bench::Async {
            seconds,
            count,
            backlog,
        } => agent::bench_async(binaries, seconds, count, backlog),
        Bench::Metaevents { fires, ticks } => metaevents::bench_metaevents(binaries, fires, ticks),
        Bench::Restore {
            runs,
            mem_mib,
            ref copies,
            ref firecracker,
        } => restore::bench_restore(
            binaries,
            &restore::Options {
                runs,
                mem_mib,
                copies: copies.clone(),
                firecracker: firecracker.clone(),
            },
        ),
        Bench::GenTrace { .. } | Bench::Sim { .. } | Bench::Engine { .. } => {
            unreachable!("run without a VM")
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench_boot(
    binaries: &Binaries,
    runs: usize,
    vcpus: u8,
    mem_mib: u64,
    pin: Option<usize>,
) -> Result<serde_json::Value, String> {
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    println!(
        "cold boot: {runs} runs, {vcpus} vCPU(s), {mem_mib} MiB, {}",
        binaries.vmm.display()
    );
    let mut samples: [Vec<f64>; 7] = Default::default();
    for _ in 0..runs {
        let mut vm = Launched::boot(binaries, vcpus, mem_mib, &[], pin)?;
        let milestones = vm.wait_milestones(Duration::from_secs(10))?;
        let footprint =
            procfs::footprint(vm.pid(), vm.mem_bytes).map_err(|e| format!("smaps: {e}"))?;
        // The VMM's own clock splits the time: exec, setup, build + guest.
        let status = vm
            .client()?
            .get("/ember/status")
            .map_err(|e| e.to_string())?
            .json();
        let after = |key: &str| status[key].as_f64().unwrap_or(f64::NAN) / 1e3;
        let (main_to_ready, start_to_ready) = (
            after("ready_after_process_start_us"),
            after("ready_after_instance_start_us"),
        );
        vm.shutdown()?;
        let ready = ms(milestones.ready);
        let values = [
            ms(milestones.marker),
            ready,
            ready - main_to_ready,
            main_to_ready - start_to_ready,
            start_to_ready,
            footprint.rss_kib as f64 / 1024.0,
            footprint.pss_kib as f64 / 1024.0,
        ];
        for (samples, value) in samples.iter_mut().zip(values) {
            samples.push(value);
        }
    }
    let rows = [
        (
            "start_to_marker_ms",
            "process start → console marker",
            "ms",
            3,
        ),
        (
            "start_to_ready_ms",
            "process start → mailbox ready",
            "ms",
            3,
        ),
        ("spawn_to_main_ms", "  of which spawn → VMM main", "ms", 3),
        (
            "main_to_instance_start_ms",
            "  of which main → InstanceStart",
            "ms",
            3,
        ),
        (
            "instance_start_to_ready_ms",
            "  of which InstanceStart → ready",
            "ms",
            3,
        ),
        ("rss_mib", "VMM RSS without guest memory", "MiB", 2),
        ("pss_mib", "VMM PSS without guest memory", "MiB", 2),
    ];
    let mut report = json!({
        "bench": "boot",
        "runs": runs,
        "vcpus": vcpus,
        "mem_mib": mem_mib,
        "pinned_to_cpu": pin,
    });
    println!("{}", header());
    for ((key, name, unit, decimals), samples) in rows.iter().zip(&samples) {
        let summary = Summary::of(samples);
        println!("{}", summary.row(name, unit, *decimals));
        report[*key] = json!(summary);
    }
    Ok(report)
}

fn bench_echo(
    binaries: &Binaries,
    count: usize,
    sizes: &[String],
    pin: Option<usize>,
) -> Result<serde_json::Value, String> {
    if count == 0 {
        return Err("--count must be at least 1".into());
    }
    // A: the scheduler places the VMM's threads; B (with --pin): all on one CPU.
    let mut placements = vec![None];
    placements.extend(pin.map(Some));
    let mut results = Vec::new();
    for placement in placements {
        let label = match placement {
            None => "threads unpinned".to_string(),
            Some(cpu) => format!("all threads on CPU {cpu}"),
        };
        println!("mailbox echo: {count} round trips per size, 1 vCPU, {label}");
        println!("{}", header());
        for row in echo_sizes(binaries, count, sizes, placement)? {
            results.push(json!({ "pinned_to_cpu": placement, "result": row }));
        }
    }
    Ok(json!({ "bench": "echo", "count": count, "results": results }))
}

/// Echo round trips of each size in one VM placed as `pin` says.
fn echo_sizes(
    binaries: &Binaries,
    count: usize,
    sizes: &[String],
    pin: Option<usize>,
) -> Result<Vec<serde_json::Value>, String> {
    let mut vm = Launched::boot(binaries, 1, 128, &[], pin)?;
    vm.wait_milestones(Duration::from_secs(10))?;
    let mut client = vm.client()?;
    let max = client
        .get("/ember/status")
        .map_err(|e| e.to_string())?
        .json()["mailbox"]["max_payload"]
        .as_u64()
        .ok_or("no mailbox in /ember/status")? as usize;
    let mut results = Vec::new();
    for size in sizes {
        let size = match size.as_str() {
            "max" => max,
            number => number
                .parse::<usize>()
                .map_err(|_| format!("--size {number:?} is neither a number nor `max`"))?,
        };
        if size > max {
            return Err(format!(
                "--size {size} exceeds the mailbox maximum of {max} bytes"
            ));
        }
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let (mut client_us, mut vmm_us) = (Vec::with_capacity(count), Vec::with_capacity(count));
        // Warm up: first touches of the guest's pages are not the steady state.
        for _ in 0..(count / 10).clamp(1, 100) {
            client
                .post("/ember/echo", &payload)
                .map_err(|e| e.to_string())?;
        }
        for _ in 0..count {
            let start = Instant::now();
            let response = client
                .post("/ember/echo", &payload)
                .map_err(|e| e.to_string())?;
            client_us.push(start.elapsed().as_secs_f64() * 1e6);
            if response.status != 200 || response.body != payload {
                return Err(format!(
                    "echo of {size} bytes answered {} with {} bytes",
                    response.status,
                    response.body.len()
                ));
            }
            let inside: f64 = response
                .header(ROUND_TRIP_HEADER)
                .and_then(|v| v.parse().ok())
                .ok_or("no round-trip header")?;
            vmm_us.push(inside);
        }
        let through_api = Summary::of(&client_us);
        let inside_vmm = Summary::of(&vmm_us);
        println!(
            "{}",
            through_api.row(&format!("{size} B, client → socket → guest"), "us", 1)
        );
        println!(
            "{}",
            inside_vmm.row(&format!("{size} B, inside ember-vmm"), "us", 1)
        );
        results.push(
            json!({ "size": size, "through_api_us": through_api, "inside_vmm_us": inside_vmm }),
        );
    }
    drop(client);
    vm.shutdown()?;
    Ok(results)
}

fn bench_ring0(binaries: &Binaries) -> Result<serde_json::Value, String> {
    let mut vm = Launched::boot(binaries, 1, 128, &["--count-ring0"], None)?;
    vm.wait_milestones(Duration::from_secs(10))?;
    let status = vm
        .client()?
        .get("/ember/status")
        .map_err(|e| e.to_string())?
        .json();
    let count = status["ring0_instructions"]
        .as_u64()
        .ok_or_else(|| format!("no ring-0 count in {status}"))?;
    println!("ring-0 instructions from guest entry to the first ring-3 instruction: {count}");
    vm.shutdown()?;
    Ok(json!({ "bench": "ring0", "boot_path_instructions": count }))
}
