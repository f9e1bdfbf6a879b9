//! `functions`: the workload examples in the guest.
//!
//! Per example, in one run: the native build's time; the function's own
//! time in a warm guest (its clock, the `X-Ember-Duration-Us` header) and
//! the ratio; restore → first response against a warm response in the
//! same restored VM, five ways interleaved (without the working set,
//! populated on the host, touched by the guest before the request, the
//! hot regions copied into huge pages, both), split into the guest's part
//! outside the function and ember-vmm's with the client;
//! the pages the first invocation touches (its recorded working set); the
//! template's Diff; the time ember-vmm takes to compile the module, fresh
//! and from its cache. Then deploys of the largest example through emberd,
//! with an empty compile cache and with the module already compiled.

use std::time::Instant;

use ember_vmm::api::client::ApiClient;
use ember_vmm::api::parsed_request::{DURATION_HEADER, FUNCTION_ERROR_HEADER, ROUND_TRIP_HEADER};
use serde_json::{json, Value};

use crate::engine::native_times;
use crate::examples::{Example, EXAMPLES};
use crate::launch::{examples_dir, Binaries};
use crate::restore::{call, Bench, Snapshot};
use crate::stats::{header, Summary};

/// One invocation as the client saw it.
struct Answer {
    body: Vec<u8>,
    /// Client round trip, µs.
    client_us: f64,
    /// The function's own time (guest clock), µs.
    function_us: f64,
    /// ember-vmm's time from writing the request into the mailbox to
    /// taking the answer, µs.
    round_trip_us: f64,
}

fn invoke(client: &mut ApiClient, event: &[u8]) -> Result<Answer, String> {
    let started = Instant::now();
    let response = client
        .post("/ember/invoke", event)
        .map_err(|e| e.to_string())?;
    let client_us = started.elapsed().as_secs_f64() * 1e6;
    if response.status != 200 || response.header(FUNCTION_ERROR_HEADER).is_some() {
        return Err(format!(
            "invoke answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    let function_us = response
        .header(DURATION_HEADER)
        .and_then(|v| v.parse().ok())
        .ok_or("no duration header")?;
    let round_trip_us = response
        .header(ROUND_TRIP_HEADER)
        .and_then(|v| v.parse().ok())
        .ok_or("no round-trip header")?;
    Ok(Answer {
        body: response.body,
        client_us,
        function_us,
        round_trip_us,
    })
}

fn row(name: &str, samples: &[f64], unit: &str, decimals: usize) -> Summary {
    let s = Summary::of(samples);
    println!("{}", s.row(name, unit, decimals));
    s
}

/// `ember-bench functions`.
pub fn bench_functions(
    binaries: &Binaries,
    runs: usize,
    restores: usize,
    only: &[String],
    deploy_runs: usize,
) -> Result<Value, String> {
    if runs < 20 || restores == 0 || deploy_runs == 0 {
        return Err("--runs must be at least 20, --restores and --deploys at least 1".into());
    }
    let dir = std::env::temp_dir().join(format!("ember-bench-functions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let bench = Bench {
        binaries,
        dir: dir.clone(),
        mem_mib: 256,
        next: std::sync::atomic::AtomicU32::new(0),
    };
    let result = run(&bench, runs, restores, only, deploy_runs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(
    bench: &Bench,
    runs: usize,
    restores: usize,
    only: &[String],
    deploy_runs: usize,
) -> Result<Value, String> {
    let examples = examples_dir()?;
    let cache = bench.dir.join("compiled");
    let cache_arg = cache.to_string_lossy().into_owned();
    println!(
        "{} MiB, 1-vCPU guests; {runs} warm runs, {restores} restores per example",
        bench.mem_mib
    );
    let base = Snapshot::at(&bench.dir, "base");
    {
        let (_vm, mut client) = bench.booted()?;
        call(&mut client, "PATCH", "/vm", &json!({ "state": "Paused" }))?;
        call(
            &mut client,
            "PUT",
            "/snapshot/create",
            &base.create_body("Full"),
        )?;
    }
    let mut out = Vec::new();
    let mut table = Vec::new();
    for example in EXAMPLES
        .iter()
        .filter(|e| only.is_empty() || only.iter().any(|o| o == e.name))
    {
        let figures = one(bench, example, &examples, &base, &cache_arg, runs, restores)?;
        table.push((example.name, figures.clone()));
        out.push(figures);
    }
    println!(
        "\nsummary (medians; first − warm in ms, by how the VM was restored; \
         R+: the restore's own time added, for a request that waits on it)"
    );
    let columns = [
        ("none", "without prefetch", false),
        ("prefetch", "with prefetch", false),
        ("R+prefetch", "with prefetch", true),
        ("hot", "hot regions", false),
        ("R+hot", "hot regions", true),
        ("ahead", "touched ahead", false),
        ("hot+ahead", "hot regions, touched ahead", false),
    ];
    print!(
        "{:<10} {:>9} {:>9} {:>6} {:>9}",
        "example", "native us", "guest us", "ratio", "warm us"
    );
    for (title, _, _) in &columns {
        print!(" {title:>10}");
    }
    println!(" {:>6} {:>8} {:>8}", "pages", "compile", "cached");
    for (name, f) in &table {
        print!(
            "{:<10} {:>9.0} {:>9.0} {:>6.2} {:>9.0}",
            name,
            f["native_us"]["p50"].as_f64().unwrap_or(0.0),
            f["guest_function_us"]["p50"].as_f64().unwrap_or(0.0),
            f["guest_vs_native_p50"].as_f64().unwrap_or(0.0),
            f["warm_client_us"]["p50"].as_f64().unwrap_or(0.0),
        );
        for (_, way, with_restore) in &columns {
            let key = if *with_restore {
                "restore_plus_first_minus_warm_ms"
            } else {
                "first_minus_warm_ms"
            };
            print!(" {:>10.2}", f[key][way]["p50"].as_f64().unwrap_or(0.0));
        }
        println!(
            " {:>6} {:>6.0}ms {:>6.1}ms",
            f["first_invocation_pages"]["total"],
            f["compile_ms"].as_f64().unwrap_or(0.0),
            f["compile_cached_ms"].as_f64().unwrap_or(0.0),
        );
    }
    let deploys = deploys(bench.binaries, &examples, deploy_runs)?;
    Ok(json!({
        "bench": "functions",
        "runs": runs,
        "restores": restores,
        "examples": out,
        "deploy": deploys,
    }))
}

/// Deploys of the largest example through emberd: with an empty compile
/// cache (compiled by emberd on every CPU while the template's VM restores
/// the base), and again with the module already compiled.
fn deploys(binaries: &Binaries, examples: &std::path::Path, runs: usize) -> Result<Value, String> {
    let largest = EXAMPLES
        .iter()
        .max_by_key(|e| std::fs::metadata(examples.join(e.wasm)).map_or(0, |m| m.len()))
        .ok_or("no examples")?;
    let module = examples.join(largest.wasm);
    let emberd = crate::agent::Emberd::start(binaries)?;
    let mut client = emberd.client()?;
    let cache = emberd.dir.join("state").join("compiled");
    let config = json!({ "memory_mib": 64, "timeout_ms": 60000 });
    // The first deploy of all also warms emberd up (its prepared VMMs).
    crate::agent::deploy(
        &mut client,
        "warmup",
        &examples.join("echo.wasm"),
        json!({}),
    )?;
    let (mut fresh, mut cached) = (Vec::new(), Vec::new());
    // The cached deploys' stages, as emberd times them.
    let mut stages: Vec<(String, Vec<f64>)> = Vec::new();
    // What ember-vmm's answer says of the load, beneath the stages: its
    // field, its key and its label.
    const LOAD_FIELDS: [(&str, &str, &str); 3] = [
        (
            "compile_us",
            "ember-vmm reads the compiled module",
            "  of which ember-vmm reads the compiled module",
        ),
        (
            "load_us",
            "the guest's own load",
            "  of which the guest's own load",
        ),
        (
            "load_module_us",
            "the guest checks the module",
            "    of which checking the module",
        ),
    ];
    let mut load_times: [Vec<f64>; 3] = Default::default();
    for i in 0..runs {
        // Emptied, not removed: ember-vmm may not create it again.
        for entry in std::fs::read_dir(&cache).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            std::fs::remove_file(&path).map_err(|e| e.to_string())?;
        }
        let name = format!("{}{i}", largest.name);
        fresh.push(crate::agent::deploy(&mut client, &name, &module, config.clone())? / 1000.0);
        // A new version of the same module: compiled already.
        let (us, answer) =
            crate::agent::deploy_answer(&mut client, &name, &module, config.clone())?;
        cached.push(us / 1000.0);
        for stage in answer["stages"].as_array().into_iter().flatten() {
            let (Some(what), Some(us)) = (stage["stage"].as_str(), stage["us"].as_f64()) else {
                continue;
            };
            match stages.iter_mut().find(|(w, _)| w == what) {
                Some((_, times)) => times.push(us / 1000.0),
                None => stages.push((what.to_string(), vec![us / 1000.0])),
            }
        }
        for ((field, _, _), times) in LOAD_FIELDS.iter().zip(&mut load_times) {
            if let Some(us) = answer["function"][field].as_f64() {
                times.push(us / 1e3);
            }
        }
    }
    println!(
        "
deploy of {} ({} KB) through emberd: request → template ready",
        largest.name,
        std::fs::metadata(&module).map_or(0, |m| m.len()) / 1000
    );
    println!("{}", header());
    let fresh = row("compile cache empty", &fresh, "ms", 1);
    let cached = row("module compiled before", &cached, "ms", 1);
    let mut stage_rows = serde_json::Map::new();
    for (what, times) in &stages {
        stage_rows.insert(
            what.clone(),
            json!(row(&format!("  {what}"), times, "ms", 1)),
        );
    }
    for ((_, key, label), times) in LOAD_FIELDS.iter().zip(&load_times) {
        if !times.is_empty() {
            stage_rows.insert(key.to_string(), json!(row(label, times, "ms", 1)));
        }
    }
    Ok(json!({
        "example": largest.name,
        "fresh_ms": fresh,
        "cached_ms": cached,
        "cached_stages_ms": stage_rows,
    }))
}

/// Every figure of one example.
fn one(
    bench: &Bench,
    example: &Example,
    examples: &std::path::Path,
    base: &Snapshot,
    cache: &str,
    runs: usize,
    restores: usize,
) -> Result<Value, String> {
    let event = (example.event)();
    let want = (example.native)(&event)?;
    let native = native_times(example, &event, runs)?;
    let module = examples.join(example.wasm);
    let function = json!({ "module_path": module, "timeout_ms": 60000, "memory_mib": 128 });

    // The template: the base restored, the function loaded (compiled now:
    // the cache is empty for this module), a Diff.
    let template = Snapshot::at(&bench.dir, example.name);
    let (loaded, created) = {
        let child = bench.prepared_with(true, &["--compile-cache", cache])?;
        let mut client = child.client()?;
        call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &base.load_body(false, true),
        )?;
        let (loaded, _) = call(&mut client, "PUT", "/ember/function", &function)?;
        call(&mut client, "PATCH", "/vm", &json!({ "state": "Paused" }))?;
        let (created, _) = call(
            &mut client,
            "PUT",
            "/snapshot/create",
            &template.create_body("Diff"),
        )?;
        (loaded, created)
    };
    if loaded["compiled"] != "compiler" {
        return Err(format!("the first load was not compiled: {loaded}"));
    }
    // The same module again: from the cache.
    let cached = {
        let child = bench.prepared_with(false, &["--compile-cache", cache])?;
        let mut client = child.client()?;
        call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &base.load_body(false, false),
        )?;
        call(&mut client, "PUT", "/ember/function", &function)?.0
    };
    if cached["compiled"] != "cache" {
        return Err(format!("the second load did not use the cache: {cached}"));
    }

    // The working set of the first invocation, recorded once.
    let pages = {
        let mut child = bench.prepared(false)?;
        let mut client = child.client()?;
        call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &template.load_body(true, false),
        )?;
        invoke(&mut client, &event)?;
        child.wait_for("working set recorded")?;
        drop(client);
        let child = bench.prepared(false)?;
        let mut client = child.client()?;
        let (loaded, _) = call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &template.load_body(true, false),
        )?;
        let (read, write) = (
            loaded["prefetched_read_pages"].as_u64().unwrap_or(0),
            loaded["prefetched_write_pages"].as_u64().unwrap_or(0),
        );
        // The compiled code's regions: mapped whole at restore, and after
        // the first invocation how much of the VMM's memory the host still
        // maps in 2 MiB pages of files (the proof that they are).
        invoke(&mut client, &event)?;
        let pmd_kib = crate::procfs::file_pmd_mapped_kib(child.pid()).unwrap_or(0);
        json!({
            "read": read,
            "write": write,
            "total": read + write,
            "whole_region_pages": loaded["whole_region_pages"],
            "file_pmd_mapped_kib_after_first": pmd_kib,
        })
    };

    // Restore → first response, then warm responses in the same VM, five
    // ways, interleaved: without the working set; with it populated on the
    // host only; with the guest touching it too before the request (a VM
    // restored ahead of its request, as emberd's pre-warming does); with
    // the hot regions copied into huge pages at the restore (emberd's
    // restores for a waiting request); both (emberd's pre-warming).
    // (label, prefetch, touch, wait for the touch, hot regions). A touch
    // sent right before the request is left out: it measured 3–6 ms worse
    // than none (docs/BENCHMARKS.md).
    let ways = [
        ("without prefetch", false, false, false, false),
        ("with prefetch", true, false, false, false),
        ("touched ahead", true, true, true, false),
        ("hot regions", true, false, false, true),
        ("hot regions, touched ahead", true, true, true, true),
    ];
    let modes: Vec<&str> = ways.iter().map(|w| w.0).collect();
    let mut first: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut first_fn: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut load: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut delta_ms: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut total_ms: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // first − warm, split: in the guest outside the function (the mailbox
    // round trip less the function's time) and in ember-vmm and the
    // client around it (the client's time less the round trip).
    let mut guest_ms: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut host_ms: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut touch_us = Vec::new();
    let mut hot_regions: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut hot_us: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut touch_pages = Vec::new();
    let mut warm_client = Vec::new();
    let mut warm_fn = Vec::new();
    for i in 0..restores * modes.len() {
        let mode = i % modes.len();
        let child = bench.prepared(false)?;
        let mut client = child.client()?;
        let (_, prefetch, touch, ahead, hot) = ways[mode];
        let mut body = template.load_body(prefetch, false);
        body["ember_touch"] = json!(touch);
        // What emberd asks for.
        body["ember_hot_region_pages"] = json!(match (hot, ahead) {
            (false, _) => 0,
            (true, true) => ember_agent::snapshots::HOT_REGION_PAGES_AHEAD,
            (true, false) => ember_agent::snapshots::HOT_REGION_PAGES,
        });
        let (loaded, load_us) = call(&mut client, "PUT", "/snapshot/load", &body)?;
        if hot {
            hot_regions[mode].push(loaded["hot_regions"].as_f64().unwrap_or(0.0));
            hot_us[mode].push(loaded["hot_us"].as_f64().unwrap_or(0.0));
        }
        if touch && loaded["touch_pages"].as_u64().unwrap_or(0) == 0 {
            return Err(format!(
                "{}: the restore asked for no touch: {loaded}",
                example.name
            ));
        }
        if ahead {
            // Requests wait for the touch: the status comes after it.
            let (status, _) = call(&mut client, "GET", "/ember/status", &json!(null))?;
            let touched = &status["touch"];
            if touched.is_null() {
                return Err(format!(
                    "{}: the guest did not touch: {status}",
                    example.name
                ));
            }
            touch_us.push(touched["round_trip_us"].as_f64().unwrap_or(0.0));
            touch_pages.push(
                touched["read_pages"].as_f64().unwrap_or(0.0)
                    + touched["written_pages"].as_f64().unwrap_or(0.0),
            );
        }
        let a = invoke(&mut client, &event)?;
        if a.body != want {
            return Err(format!(
                "{}: the guest's result differs from the native build's",
                example.name
            ));
        }
        // Warm, in the same VM: the third of three (the first ones may
        // still meet pages the first did not touch).
        let mut w = invoke(&mut client, &event)?;
        for _ in 0..2 {
            w = invoke(&mut client, &event)?;
        }
        load[mode].push(load_us);
        first[mode].push(a.client_us);
        first_fn[mode].push(a.function_us);
        delta_ms[mode].push((a.client_us - w.client_us) / 1000.0);
        total_ms[mode].push((load_us + a.client_us - w.client_us) / 1000.0);
        let outside = |x: &Answer| x.round_trip_us - x.function_us;
        let around = |x: &Answer| x.client_us - x.round_trip_us;
        guest_ms[mode].push((outside(&a) - outside(&w)) / 1000.0);
        host_ms[mode].push((around(&a) - around(&w)) / 1000.0);
        warm_client.push(w.client_us);
    }
    // Warm: many invocations in one restored VM.
    {
        let child = bench.prepared(false)?;
        let mut client = child.client()?;
        call(
            &mut client,
            "PUT",
            "/snapshot/load",
            &template.load_body(false, false),
        )?;
        for i in 0..runs + 3 {
            let a = invoke(&mut client, &event)?;
            if a.body != want {
                return Err(format!(
                    "{}: the guest's result differs from the native build's",
                    example.name
                ));
            }
            if i >= 3 {
                warm_fn.push(a.function_us);
            }
        }
    }

    println!(
        "\n{} ({} bytes in, {} out; module {} KB, compiled {} KB)",
        example.name,
        event.len(),
        want.len(),
        std::fs::metadata(&module).map_or(0, |m| m.len()) / 1000,
        loaded["compiled_bytes"].as_u64().unwrap_or(0) / 1000,
    );
    println!("{}", header());
    let native = row("native (same source)", &native, "us", 0);
    let guest = row("guest, the function's own time", &warm_fn, "us", 0);
    let warm = row("warm response (client)", &warm_client, "us", 0);
    let mut first_json = serde_json::Map::new();
    let mut first_fn_json = serde_json::Map::new();
    let mut load_json = serde_json::Map::new();
    let mut delta_json = serde_json::Map::new();
    let mut delta_p50 = serde_json::Map::new();
    let mut total_json = serde_json::Map::new();
    let mut split_json = serde_json::Map::new();
    for (m, label) in modes.iter().enumerate() {
        let f = row(&format!("first response, {label}"), &first[m], "us", 0);
        let ff = row("  the function's own time", &first_fn[m], "us", 0);
        let l = row("  restore (load request)", &load[m], "us", 0);
        let d = row("  first − warm, same VM", &delta_ms[m], "ms", 2);
        let t = row("  restore + first − warm", &total_ms[m], "ms", 2);
        let g = row(
            "    in the guest, outside the function",
            &guest_ms[m],
            "ms",
            2,
        );
        let h = row("    in ember-vmm and the client", &host_ms[m], "ms", 2);
        split_json.insert(
            label.to_string(),
            json!({ "guest_outside_function_ms": g, "host_ms": h }),
        );
        total_json.insert(label.to_string(), json!(t));
        first_json.insert(label.to_string(), json!(f));
        first_fn_json.insert(label.to_string(), json!(ff));
        load_json.insert(label.to_string(), json!(l));
        delta_p50.insert(label.to_string(), json!(d.p50));
        delta_json.insert(label.to_string(), json!(d));
    }
    let touch = row(
        "the guest's touch, ahead (answer → answer)",
        &touch_us,
        "us",
        0,
    );
    let touched_pages = row("  pages it touched", &touch_pages, "pages", 0);
    // The regions copied into huge pages, per way that asked for them.
    let mut hot_json = serde_json::Map::new();
    for (m, label) in modes.iter().enumerate() {
        if hot_regions[m].is_empty() {
            continue;
        }
        let regions = row(
            &format!("regions copied into huge pages, {label}"),
            &hot_regions[m],
            "regions",
            0,
        );
        let us = row("  time copying them", &hot_us[m], "us", 0);
        hot_json.insert(label.to_string(), json!({ "regions": regions, "us": us }));
    }
    let ratio = guest.p50 / native.p50;
    println!(
        "guest / native {ratio:.2}x; first invocation touches {} pages outside the {} pages of \
         code mapped whole ({} KiB still in 2 MiB host pages after it); template Diff {} pages; \
         compile {:.1} ms, from the cache {:.1} ms; guest load {} us",
        pages["total"],
        pages["whole_region_pages"],
        pages["file_pmd_mapped_kib_after_first"],
        created["memory_pages"],
        loaded["compile_us"].as_f64().unwrap_or(0.0) / 1000.0,
        cached["compile_us"].as_f64().unwrap_or(0.0) / 1000.0,
        loaded["load_us"],
    );
    Ok(json!({
        "example": example.name,
        "event_bytes": event.len(),
        "result_bytes": want.len(),
        "module_bytes": std::fs::metadata(&module).map_or(0, |m| m.len()),
        "compiled_bytes": loaded["compiled_bytes"],
        "native_us": native,
        "guest_function_us": guest,
        "guest_vs_native_p50": ratio,
        "warm_client_us": warm,
        "first_client_us": first_json,
        "first_function_us": first_fn_json,
        "restore_load_us": load_json,
        "first_minus_warm_ms": delta_json,
        "first_minus_warm_ms_p50": delta_p50,
        "restore_plus_first_minus_warm_ms": total_json,
        "first_minus_warm_split": split_json,
        "touch_us": touch,
        "touch_pages": touched_pages,
        "hot_regions": hot_json,
        "first_invocation_pages": pages,
        "template_diff": { "pages": created["memory_pages"], "runs": created["memory_runs"], "duration_us": created["duration_us"], "files": template.sizes() },
        "compile_ms": loaded["compile_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "compile_cached_ms": cached["compile_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "guest_load_us": loaded["load_us"],
    }))
}
