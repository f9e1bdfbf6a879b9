//! Pre-warming end to end: a real emberd and real microVMs. A function
//! called on a timer is recognised as periodic and gets an instance
//! restored just before each call, while it idles less than a fixed
//! keep-alive would have it; with `prewarm: off` the same traffic is
//! restored every time. Without /dev/kvm the test is reported as ignored,
//! never passed.

use std::time::{Duration, Instant};

use ember_integration::*;
use serde_json::json;

fn main() {
    let tests: Vec<Test> = vec![(
        "a_function_called_every_2_s_is_prewarmed_and_idles_less_than_a_fixed_keep_alive",
        every_two_seconds,
    )];
    run_kvm_tests(tests);
}

/// Calls made, 2 s apart.
const CALLS: u32 = 20;
/// The period, ms.
const PERIOD_MS: u64 = 2_000;
/// Calls the detector may take to learn the period.
const LEARNING: usize = 5;

/// One call: when it started and ended (from the run's start), and how
/// its instance was found.
struct Call {
    start: Duration,
    end: Duration,
    how: String,
}

/// Calls `function` every 2 s, 20 times, from `t0` + `offset_ms`.
fn every_two_s(
    emberd: &Emberd,
    function: &str,
    t0: Instant,
    offset_ms: u64,
) -> Result<Vec<Call>, String> {
    let mut client = emberd.client();
    let mut calls = Vec::new();
    for i in 0..CALLS as u64 {
        let at = t0 + Duration::from_millis(offset_ms + i * PERIOD_MS);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let start = t0.elapsed();
        let response = expect_status(invoke(&mut client, function, b"tick", &[]), 200, function)?;
        let end = t0.elapsed();
        if let Some(kind) = response.header("x-ember-function-error") {
            return Err(format!("{function} failed: {kind}"));
        }
        let how = response
            .header("x-ember-start")
            .unwrap_or("none")
            .to_string();
        calls.push(Call { start, end, how });
    }
    Ok(calls)
}

/// How each call found its instance.
fn hows(calls: &[Call]) -> Vec<&str> {
    calls.iter().map(|c| c.how.as_str()).collect()
}

/// What a fixed keep-alive of `keep_s` would have idled over `calls`:
/// after each call, until the next or `keep_s`, and `keep_s` after the
/// last.
fn fixed_idle_s(calls: &[Call], keep_s: f64) -> f64 {
    let mut idle = 0.0;
    for pair in calls.windows(2) {
        idle += (pair[1].start.as_secs_f64() - pair[0].end.as_secs_f64()).clamp(0.0, keep_s);
    }
    idle + keep_s
}

fn every_two_seconds() -> TestResult {
    let dir = fresh_dir()?;
    // The VMMs' info lines (their touches) reach emberd's log.
    let emberd = Emberd::start(&dir, &["--vmm-log-level", "info"])?;
    let mut client = emberd.client();
    let echo = example("echo.wasm")?;
    deploy(
        &mut client,
        "timer",
        &echo,
        json!({ "keep_alive_s": 1 }),
        &[],
    )?;
    deploy(
        &mut client,
        "manual",
        &echo,
        json!({ "keep_alive_s": 1, "prewarm": "off" }),
        &[],
    )?;
    let t0 = Instant::now();
    // Both at once, a second apart, on connections of their own.
    let (timer, manual) = std::thread::scope(|s| {
        let timer = s.spawn(|| every_two_s(&emberd, "timer", t0, 0));
        let manual = s.spawn(|| every_two_s(&emberd, "manual", t0, 1_000));
        (timer.join(), manual.join())
    });
    let timer = timer.map_err(|_| fail("the timer thread panicked"))??;
    let manual = manual.map_err(|_| fail("the manual thread panicked"))??;
    eprintln!("timer:  {:?}", hows(&timer));
    eprintln!("manual: {:?}", hows(&manual));

    // After the first few calls, at least 80 % found an instance ready.
    let later = &timer[LEARNING..];
    let ready = later
        .iter()
        .filter(|c| c.how == "prewarmed" || c.how == "warm")
        .count();
    check(ready * 10 >= later.len() * 8, || {
        format!(
            "{ready} of {} calls after the first {LEARNING} found an instance ready: {:?}",
            later.len(),
            hows(&timer)
        )
    })?;
    check(later.iter().any(|c| c.how == "prewarmed"), || {
        format!(
            "no call was served by a pre-warmed instance: {:?}",
            hows(&timer)
        )
    })?;
    // `prewarm: off`: the keep-alive of 1 s alone, so every call restores.
    check(manual.iter().all(|c| c.how == "restored"), || {
        format!("prewarm off: {:?}", hows(&manual))
    })?;

    // What emberd says of the function: the period it found, its plan.
    let state = get_json(&mut client, "/functions/timer")?["prewarm_state"].clone();
    eprintln!("{state:#}");
    let period = &state["periods"][0];
    check(
        (period["period_s"].as_f64().unwrap_or(0.0) - 2.0).abs() < 0.1
            && period["confidence"].as_f64().unwrap_or(0.0) >= 0.6,
        || format!("period: {state}"),
    )?;
    check(
        state["policy"] == "ember" && state["prewarm"] == "auto",
        || format!("policy: {state}"),
    )?;
    check(state["plan"]["basis"] == "periodic", || {
        format!("plan: {state}")
    })?;
    let off = get_json(&mut client, "/functions/manual")?["prewarm_state"].clone();
    check(
        off["policy"] == "fixed" && off["prewarms_used"] == 0,
        || format!("manual: {off}"),
    )?;

    // Idle time: let the last instances go (1 s at most), then compare
    // with a fixed keep-alive of 10 s over the same calls.
    std::thread::sleep(Duration::from_millis(1_500));
    let state = get_json(&mut client, "/functions/timer")?["prewarm_state"].clone();
    let idle = state["idle_instance_s"].as_f64().unwrap_or(f64::MAX);
    let fixed = fixed_idle_s(&timer, 10.0);
    eprintln!(
        "idle instance-seconds: ember {idle:.2}, a fixed 10 s keep-alive {fixed:.2}; pre-warms used {} unused {}",
        state["prewarms_used"], state["prewarms_unused"]
    );
    check(idle < fixed, || {
        format!("idle {idle:.2} s is not below a fixed 10 s keep-alive's {fixed:.2} s: {state}")
    })?;
    let used = state["prewarms_used"].as_u64().unwrap_or(0);
    check(
        used >= 1 && state["predicted"].as_u64().unwrap_or(0) >= used,
        || format!("counters: {state}"),
    )?;
    // Instances restored ahead had their guests touch the working set
    // before serving; the restores for waiting calls (all of `manual`'s)
    // did not. (A pre-warm for the next beat may still be idle, counted
    // neither used nor unused: the lines are told apart by function.)
    let log = emberd.log.text();
    let touches: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("working set touched by the guest"))
        .collect();
    let of = |name: &str| touches.iter().filter(|l| l.contains(name)).count() as u64;
    check(of("timer") >= used && of("manual") == 0, || {
        format!(
            "{} touches logged for `timer` ({used} pre-warms used), {} for `manual`:\n{}",
            of("timer"),
            of("manual"),
            touches.join("\n")
        )
    })?;
    // The counters reach /metrics too.
    let metrics = expect_status(client.request("GET", "/metrics", None), 200, "metrics")?;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let line = format!("ember_prewarms_total{{function=\"timer\",outcome=\"used\"}} {used}");
    check(text.contains(&line), || format!("no `{line}` in /metrics"))?;
    check(
        text.contains("ember_starts_total{start=\"prewarmed\"}"),
        || "no prewarmed starts in /metrics".into(),
    )?;
    Ok(())
}
