//! `metaevents`: what rules cost emberd — sampling the metadata and
//! evaluating 1,000 rules over 200 functions' hour of history, CPU time
//! per tick (four a second) — and the latency from the invocation whose
//! error satisfies a rule to the start of its target's invocation,
//! through a real emberd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::metadata::{Gauges, Live, Observation, Store};
use ember_agent::metaevents::{Engine, Rule};
use ember_vmm::api::client::ApiClient;
use serde_json::{json, Value};

use crate::agent::{deploy, Emberd};
use crate::launch::{examples_dir, Binaries};
use crate::stats::{header, Summary};

/// A reactor that traps when its event starts with `t`.
const TRAPS_ON_T: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "ember_handle") (result i32)
    (i32.store8 (i32.const 64) (i32.const 0))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (if (i32.eq (i32.load8_u (i32.const 64)) (i32.const 116)) (then unreachable))
    (i32.const 0)))
"#;

/// This thread's CPU time, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A tiny deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One second of traffic: 10 invocations of each function, some failing.
fn traffic(live: &mut Live, functions: &[String], rng: &mut Rng) {
    let chain: ember_agent::metadata::Chain = Arc::from(Vec::new());
    for f in functions {
        for _ in 0..10 {
            let r = rng.next();
            live.observe(&Observation {
                function: f,
                served: true,
                warm: !r.is_multiple_of(10),
                prewarmed: false,
                error: r.is_multiple_of(20).then_some("trap"),
                throttled: false,
                duration_ms: (r % 50) as f64 / 10.0,
                chain: chain.clone(),
            });
        }
    }
}

fn gauges(functions: &[String], rng: &mut Rng) -> Gauges {
    Gauges {
        functions: functions
            .iter()
            .map(|f| {
                (
                    f.clone(),
                    rng.next() % 3,
                    rng.next() % 5,
                    (rng.next() % 100) as f64 / 10.0,
                )
            })
            .collect(),
        instances: [100, 20, 1],
        prepared: 2,
        claimed_mib: 16_000,
        load1: 0.5,
        mem_available_mib: 20_000,
    }
}

/// `rules` rules over `functions`: five kinds, each function in turn (or,
/// with `each`, every rule over `*`).
fn rules(n: usize, functions: &[String], each: bool) -> Engine {
    let mut engine = Engine::default();
    let kinds = [
        json!({ "series": "errors", "labels": { "kind": "trap" }, "aggregate": "sum", "window_s": 60, "op": ">", "threshold": 1e9 }),
        json!({ "series": "duration_ms", "labels": { "stat": "p99" }, "aggregate": "max", "window_s": 300, "op": ">", "threshold": 1e9 }),
        json!({ "series": "invocations", "labels": {}, "aggregate": "rate", "window_s": 60, "op": "<", "threshold": -1 }),
        json!({ "series": "queued", "labels": {}, "aggregate": "last", "window_s": 10, "op": ">", "threshold": 1e9 }),
        json!({ "series": "concurrency", "labels": {}, "aggregate": "avg", "window_s": 30, "op": ">", "threshold": 1e9 }),
    ];
    for i in 0..n {
        let mut body = kinds[i % kinds.len()].clone();
        let f = if each {
            "*".to_string()
        } else {
            functions[(i / kinds.len()) % functions.len()].clone()
        };
        body["labels"]["function"] = json!(f);
        body["target"] = json!("alert");
        let rule = Rule::parse(&format!("rule-{i}"), &body, |_| true).expect("a valid rule");
        engine.put(rule);
    }
    engine
}

/// CPU per tick (sample + evaluate) over `ticks` ticks of a store holding
/// an hour of 200 functions' history.
fn eval_cost(
    engine: &mut Engine,
    store: &mut Store,
    functions: &[String],
    start_s: i64,
    ticks: usize,
) -> Vec<f64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut samples = Vec::with_capacity(ticks);
    let mut live = Live::default();
    for t in 0..ticks {
        // Four ticks a second; a second's traffic arrives across them.
        let now_ms = (start_s + (t / 4) as i64) * 1000 + (t % 4) as i64 * 250;
        if t % 4 == 0 {
            traffic(&mut live, functions, &mut rng);
        }
        let g = gauges(functions, &mut rng);
        let cpu = thread_cpu_ns();
        store.sample_at(now_ms, &g, &mut live);
        let (wants, _) = engine.evaluate(store, functions, now_ms);
        samples.push((thread_cpu_ns() - cpu) as f64 / 1e3);
        std::hint::black_box(wants);
    }
    samples
}

/// `ember-bench metaevents`.
pub fn bench_metaevents(binaries: &Binaries, fires: usize, ticks: usize) -> Result<Value, String> {
    // 1. Cost: 200 functions with an hour of history.
    let functions: Vec<String> = (0..200).map(|i| format!("fn-{i:03}")).collect();
    let start_s = 1_000_000;
    let mut store = Store::new(start_s);
    let mut rng = Rng(7);
    let mut live = Live::default();
    let filled = Instant::now();
    for s in 0..3600 {
        traffic(&mut live, &functions, &mut rng);
        store.sample(start_s + s + 1, &gauges(&functions, &mut rng), &mut live);
    }
    let (rings, bytes) = store.footprint();
    println!(
        "metadata of 200 functions, an hour at 1 s: {rings} series rings, {:.1} MiB of values (filled in {:.1} s)",
        bytes as f64 / (1 << 20) as f64,
        filled.elapsed().as_secs_f64()
    );
    let now = start_s + 3601;
    let mut named = rules(1000, &functions, false);
    let named_us = eval_cost(&mut named, &mut store, &functions, now, ticks);
    let mut each = rules(1000, &functions, true);
    let each_us = eval_cost(
        &mut each,
        &mut store,
        &functions,
        now + ticks as i64,
        ticks.min(40),
    );

    // 2. Latency, through emberd.
    let emberd = Emberd::start(binaries)?;
    let mut client = emberd.client()?;
    let resize = emberd.dir.join("resize.wasm");
    std::fs::write(
        &resize,
        wat::parse_str(TRAPS_ON_T).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    deploy(&mut client, "resize", &resize, json!({}))?;
    deploy(
        &mut client,
        "alert",
        &examples_dir()?.join("echo.wasm"),
        json!({}),
    )?;
    let rule = json!({
        "series": "errors", "labels": { "function": "resize" },
        "aggregate": "sum", "window_s": 1, "op": ">", "threshold": 0, "target": "alert",
    });
    let r = client
        .request(
            "PUT",
            "/metaevents/any-error",
            Some(rule.to_string().as_bytes()),
        )
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!(
            "PUT /metaevents: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
    let mut latency_ms = Vec::with_capacity(fires);
    let mut phase = Rng(42);
    for _ in 0..fires {
        wait_ok(&mut client)?;
        let before = newest(&mut client)?;
        // At a random point of the sampler's period.
        std::thread::sleep(Duration::from_micros(phase.next() % 1_000_000));
        let r = client
            .post("/functions/resize/invoke", b"trap")
            .map_err(|e| e.to_string())?;
        let end = now_ms();
        if r.header("x-ember-function-error") != Some("trap") {
            return Err(format!("resize did not trap: {}", r.status));
        }
        let started = target_start(&mut client, &before)?;
        latency_ms.push((started - end) as f64);
    }
    println!("{}", header());
    let named = Summary::of(&named_us);
    let each = Summary::of(&each_us);
    let fire = Summary::of(&latency_ms);
    println!(
        "{}",
        named.row("tick, 1,000 rules on 200 functions", "us CPU", 0)
    );
    println!(
        "{}",
        each.row("tick, 1,000 `*` rules × 200 functions", "us CPU", 0)
    );
    println!("{}", fire.row("error → target invocation start", "ms", 0));
    let per_second_named_ms = named.mean * 4.0 / 1e3;
    let per_second_each_ms = each.mean * 4.0 / 1e3;
    println!("per second (4 ticks): {per_second_named_ms:.2} ms CPU for 1,000 rules on 200 functions; {per_second_each_ms:.1} ms for 1,000 `*` rules (200,000 label sets)");
    Ok(json!({
        "bench": "metaevents",
        "functions": 200,
        "rings": rings,
        "ring_bytes": bytes,
        "tick_us_cpu_1000_rules": named,
        "tick_us_cpu_1000_star_rules": each,
        "per_second_ms_cpu_1000_rules": per_second_named_ms,
        "per_second_ms_cpu_1000_star_rules": per_second_each_ms,
        "fire_latency_ms": fire,
    }))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Waits until the rule is ok again (its window has no error).
fn wait_ok(client: &mut ApiClient) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rule = client
            .get("/metaevents/any-error")
            .map_err(|e| e.to_string())?
            .json();
        if rule["firing"] == 0 && rule["pending"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the rule did not resolve: {rule}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Alert's newest invocation.
fn newest(client: &mut ApiClient) -> Result<Value, String> {
    let list = client
        .get("/invocations?function=alert&limit=1")
        .map_err(|e| e.to_string())?
        .json();
    Ok(list["invocations"][0].clone())
}

/// The start (ms) of the first attempt of alert's first invocation after
/// `before`, once it ran.
fn target_start(client: &mut ApiClient, before: &Value) -> Result<i64, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let newest = newest(client)?;
        if newest["id"] != before["id"] {
            let id = newest["id"].as_str().unwrap_or_default();
            let v = client
                .get(&format!("/invocations/{id}"))
                .map_err(|e| e.to_string())?
                .json();
            if let Some(t) = v["attempts"][0]["started_ms"].as_i64() {
                return Ok(t);
            }
        }
        if Instant::now() > deadline {
            return Err("alert's invocation did not start in 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
