//! Async invocations and the failure journal end to end: a real emberd,
//! real microVMs, a real SQLite journal; emberd killed with SIGKILL, state
//! dirs made read-only or full. Without /dev/kvm every test is reported as
//! ignored, never passed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use ember_integration::*;
use ember_vmm::api::client::ApiClient;
use serde_json::{json, Value};

fn main() {
    let tests: Vec<Test> = vec![
        (
            "an_async_event_is_accepted_on_disk_and_delivered",
            accepted_and_delivered,
        ),
        (
            "a_reactor_failing_twice_succeeds_on_its_third_attempt",
            third_attempt,
        ),
        (
            "a_trapping_function_is_journaled_with_its_attempts_its_destination_and_its_control_told",
            journaled_with_destination,
        ),
        (
            "a_fixed_redeploy_and_journal_replay_succeed_and_mark_the_record",
            replay_after_fix,
        ),
        (
            "a_retry_past_the_maximum_age_is_journaled_as_expired",
            expired,
        ),
        (
            "three_crashes_in_a_minute_rebuild_the_template",
            crash_loop_rebuilds,
        ),
        (
            "a_template_refused_whose_rebuild_fails_marks_the_version_broken_and_events_wait",
            broken_version,
        ),
        (
            "kill_9_storm_loses_nothing_accepted_and_runs_nothing_refused",
            kill_storm,
        ),
        (
            "a_read_only_state_dir_answers_503_and_keeps_what_was_accepted",
            read_only_state_dir,
        ),
        ("a_full_disk_answers_503", full_disk),
        (
            "a_corrupt_journal_stops_emberd_with_a_message_naming_it",
            corrupt_journal,
        ),
    ];
    run_kvm_tests(tests);
}

const EVENT: (&str, &str) = ("X-Ember-Invocation-Type", "Event");

/// A reactor whose first two calls fail (handler_error), then succeed.
const FAILS_TWICE: &str = r#"
(module
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (func (export "ember_handle") (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (result i32) (i32.le_s (global.get $calls) (i32.const 2))
      (then (i32.const 1))
      (else (i32.const 0)))))
"#;

/// A command that always traps.
const TRAPS: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "_start") unreachable))
"#;

/// Accepts `event` for `name` asynchronously; its id.
fn accept(client: &mut ApiClient, name: &str, event: &[u8]) -> Result<String, String> {
    let response = expect_status(
        ember_agent::client::invoke_async(client, name, event, &[]),
        202,
        "async invoke",
    )?;
    let id = response.json()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if response.header("x-ember-invocation-id") != Some(id.as_str()) || id.len() != 32 {
        return Err(format!(
            "a 202 without its id: {:?} {}",
            response.headers,
            response.json()
        ));
    }
    Ok(id)
}

/// Waits until invocation `id` is final; returns it.
fn final_state(client: &mut ApiClient, id: &str, within: Duration) -> Result<Value, String> {
    let deadline = Instant::now() + within;
    loop {
        // Answered as soon as it is final (or after 2 s).
        let v = get_json(client, &format!("/invocations/{id}?wait_ms=2000"))?;
        if v["state"] == "succeeded" || v["state"] == "failed" {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("invocation {id} not final in {within:?}: {v}"));
        }
    }
}

/// Waits until `path` lists at least `n` items under `key`; returns them.
fn wait_list(
    client: &mut ApiClient,
    path: &str,
    key: &str,
    n: usize,
) -> Result<Vec<Value>, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = get_json(client, path)?;
        let items = list[key].as_array().cloned().unwrap_or_default();
        if items.len() >= n {
            return Ok(items);
        }
        if Instant::now() > deadline {
            return Err(format!("{path}: fewer than {n} {key}: {list}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The basics: 202 with the id once on disk; delivered; the result kept;
/// idempotency keys; the invocation type, unknown functions, bad keys.
fn accepted_and_delivered() -> TestResult {
    let emberd = Emberd::start(&fresh_dir()?, &[])?;
    let mut client = emberd.client();
    deploy(&mut client, "echo", &example("echo.wasm")?, json!({}), &[])?;
    let id = accept(&mut client, "echo", b"hello async")?;
    let v = final_state(&mut client, &id, Duration::from_secs(20))?;
    check(
        v["state"] == "succeeded" && v["result"] == "hello async",
        || format!("{v}"),
    )?;
    let attempts = v["attempts"].as_array().cloned().unwrap_or_default();
    check(
        attempts.len() == 1
            && attempts[0]["outcome"] == "succeeded"
            && attempts[0]["instance"].is_string()
            && (attempts[0]["start"] == "warm" || attempts[0]["start"] == "restored"),
        || format!("attempts: {v}"),
    )?;

    // The same key and bytes: the first id, 200, nothing new.
    let key = ("X-Ember-Idempotency-Key", "order-17");
    let first = expect_status(
        invoke(&mut client, "echo", b"once", &[EVENT, key]),
        202,
        "keyed",
    )?;
    let again = expect_status(
        invoke(&mut client, "echo", b"once", &[EVENT, key]),
        200,
        "repeat",
    )?;
    check(first.json()["id"] == again.json()["id"], || {
        format!("{} vs {}", first.json(), again.json())
    })?;
    let conflict =
        invoke(&mut client, "echo", b"other", &[EVENT, key]).map_err(|e| e.to_string())?;
    expect_error(
        &conflict,
        409,
        "idempotency_conflict",
        "a key reused with other bytes",
    )?;
    let listed = get_json(&mut client, "/invocations?function=echo")?;
    let n = listed["invocations"].as_array().map_or(0, Vec::len);
    check(n == 2, || format!("2 events expected: {listed}"))?;

    let unknown = invoke(&mut client, "nope", b"x", &[EVENT]).map_err(|e| e.to_string())?;
    expect_error(&unknown, 404, "not_found", "unknown function")?;
    let bad = invoke(
        &mut client,
        "echo",
        b"x",
        &[("X-Ember-Invocation-Type", "Later")],
    )
    .map_err(|e| e.to_string())?;
    expect_error(&bad, 400, "bad_request", "invalid invocation type")?;
    let routed = invoke(
        &mut client,
        "echo",
        b"x",
        &[EVENT, ("X-Ember-Instance", "i-1")],
    )
    .map_err(|e| e.to_string())?;
    expect_error(
        &routed,
        400,
        "bad_request",
        "an instance asked for by an event",
    )?;
    let malformed = invoke(
        &mut client,
        "echo",
        b"x",
        &[("X-Ember-Idempotency-Key", "")],
    )
    .map_err(|e| e.to_string())?;
    expect_error(&malformed, 400, "bad_request", "an empty idempotency key")?;
    let sync = invoke(
        &mut client,
        "echo",
        b"sync",
        &[("X-Ember-Invocation-Type", "RequestResponse")],
    )
    .map_err(|e| e.to_string())?;
    check(sync.status == 200 && sync.body == b"sync", || {
        format!("{}", sync.status)
    })?;
    let missing = client.get("/invocations/0123").map_err(|e| e.to_string())?;
    expect_error(&missing, 404, "not_found", "unknown invocation")?;
    let bad_query = client.get("/journal?limit=0").map_err(|e| e.to_string())?;
    expect_error(&bad_query, 400, "bad_request", "limit 0")?;

    let metrics =
        String::from_utf8_lossy(&expect_status(client.get("/metrics"), 200, "metrics")?.body)
            .into_owned();
    for line in [
        "ember_async_accepted_total 2",
        "ember_async_succeeded_total ",
        "ember_async_queue_depth",
        "ember_journal_purged_total 0",
    ] {
        check(metrics.contains(line), || {
            format!("/metrics lacks {line:?}:\n{metrics}")
        })?;
    }
    Ok(())
}

/// max_concurrency 1: every attempt reaches the same instance, whose
/// counter fails the first two.
fn third_attempt() -> TestResult {
    let (_dir, _emberd, mut client) = with_wat(
        "twice",
        FAILS_TWICE,
        json!({ "max_concurrency": 1, "retry_base_ms": 20 }),
    )?;
    let id = accept(&mut client, "twice", b"")?;
    let v = final_state(&mut client, &id, Duration::from_secs(20))?;
    let attempts = v["attempts"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = attempts
        .iter()
        .map(|a| a["error"]["kind"].as_str().unwrap_or("-"))
        .collect();
    check(
        v["state"] == "succeeded" && kinds == ["handler_error", "handler_error", "-"],
        || format!("{v}"),
    )?;
    let instances: Vec<&Value> = attempts.iter().map(|a| &a["instance"]).collect();
    check(instances.iter().all(|i| *i == instances[0]), || {
        format!("not one instance: {instances:?}")
    })?;
    let metrics = String::from_utf8_lossy(&expect_status(client.get("/metrics"), 200, "m")?.body)
        .into_owned();
    check(metrics.contains("ember_async_retries_total 2"), || {
        metrics.clone()
    })?;
    Ok(())
}

/// An always-trapping function: 3 attempts, then the journal (with the
/// event's bytes), its on_failure destination gets the documented record,
/// its on_error control each error; a failed sync invocation is
/// journaled too.
fn journaled_with_destination() -> TestResult {
    let (_dir, _emberd, mut client) = with_wat(
        "traps",
        TRAPS,
        json!({ "retry_base_ms": 10, "on_failure": "dlq", "on_error": "ctl", "journal_sync_failures": true }),
    )?;
    let echo = example("echo.wasm")?;
    deploy(&mut client, "dlq", &echo, json!({}), &[])?;
    deploy(&mut client, "ctl", &echo, json!({}), &[])?;
    let event = b"\x00\xffbinary event";
    let id = accept(&mut client, "traps", event)?;
    let v = final_state(&mut client, &id, Duration::from_secs(20))?;
    let attempts = v["attempts"].as_array().map_or(0, Vec::len);
    check(
        v["state"] == "failed" && attempts == 3 && v["error"]["kind"] == "trap",
        || format!("{v}"),
    )?;
    let record_id = v["journal_id"].as_str().unwrap_or_default().to_string();
    let record = get_json(&mut client, &format!("/journal/{record_id}"))?;
    check(
        record["kind"] == "retries_exhausted"
            && record["function"] == "traps"
            && record["version"] == 1
            && record["invocation_id"] == id.as_str()
            && record["attempts"].as_array().map_or(0, Vec::len) == 3
            && record["error"]["kind"] == "trap",
        || format!("record: {record}"),
    )?;
    let bytes = expect_status(
        client.get(&format!("/journal/{record_id}/event")),
        200,
        "event",
    )?;
    same(&bytes.body, event)?;

    // The destination got the record as JSON (echo answers it back).
    let dest_id = v["destination_id"].as_str().unwrap_or_default().to_string();
    let dest = final_state(&mut client, &dest_id, Duration::from_secs(20))?;
    let body: Value = serde_json::from_str(dest["result"].as_str().unwrap_or("null"))
        .map_err(|e| format!("destination result is not JSON ({e}): {dest}"))?;
    use base64::Engine;
    check(
        dest["origin"] == "destination"
            && body["source_id"] == id.as_str()
            && body["function"] == "traps"
            && body["version"] == 1
            && body["condition"] == "retries_exhausted"
            && body["error"]["kind"] == "trap"
            && body["attempts"].as_array().map_or(0, Vec::len) == 3
            && body["event_base64"]
                == base64::engine::general_purpose::STANDARD
                    .encode(event)
                    .as_str()
            && body["timestamps"]["accepted_ms"].is_i64()
            && body["timestamps"]["failed_ms"].is_i64(),
        || format!("destination record: {body}"),
    )?;

    // A failed sync invocation: journaled with its bytes.
    let sync = expect_status(
        invoke(&mut client, "traps", b"sync bytes", &[]),
        200,
        "sync",
    )?;
    check(
        sync.header("x-ember-function-error") == Some("trap"),
        || format!("{:?}", sync.headers),
    )?;
    let sync_id = sync
        .header("x-ember-invocation-id")
        .unwrap_or_default()
        .to_string();
    let records = wait_list(&mut client, "/journal?kind=sync_failure", "records", 1)?;
    check(records[0]["invocation_id"] == sync_id.as_str(), || {
        format!("{records:?}")
    })?;
    let sync_record = records[0]["id"].as_str().unwrap_or_default().to_string();
    same(
        &expect_status(
            client.get(&format!("/journal/{sync_record}/event")),
            200,
            "e",
        )?
        .body,
        b"sync bytes",
    )?;

    // on_error: one record per detected error (3 async attempts, 1 sync).
    let got = wait_list(
        &mut client,
        "/invocations?function=ctl&state=succeeded",
        "invocations",
        4,
    )?;
    let mut kinds = Vec::new();
    for item in &got {
        let inv = get_json(
            &mut client,
            &format!("/invocations/{}", item["id"].as_str().unwrap_or("")),
        )?;
        let body: Value = serde_json::from_str(inv["result"].as_str().unwrap_or("null"))
            .map_err(|e| format!("on_error result is not JSON ({e}): {inv}"))?;
        check(
            inv["origin"] == "on_error"
                && body["kind"] == "error"
                && body["function"] == "traps"
                && body["invocation_id"].is_string(),
            || format!("on_error record: {body}"),
        )?;
        kinds.push(body["error"]["kind"].as_str().unwrap_or("").to_string());
    }
    check(kinds.iter().all(|k| k == "trap"), || format!("{kinds:?}"))?;

    // Filters and paging.
    let page = get_json(&mut client, "/journal?function=traps&limit=1")?;
    let next = page["next_cursor"].as_str().unwrap_or_default().to_string();
    let page2 = get_json(
        &mut client,
        &format!("/journal?function=traps&limit=1&cursor={next}"),
    )?;
    check(
        page["records"][0]["kind"] == "sync_failure"
            && page2["records"][0]["kind"] == "retries_exhausted",
        || format!("pages: {page} {page2}"),
    )?;
    // A delete.
    let deleted = client
        .request("DELETE", &format!("/journal/{sync_record}"), None)
        .map_err(|e| e.to_string())?;
    check(deleted.status == 204, || {
        format!("delete {}", deleted.status)
    })?;
    let gone = client
        .get(&format!("/journal/{sync_record}"))
        .map_err(|e| e.to_string())?;
    expect_error(&gone, 404, "not_found", "a deleted record")?;
    Ok(())
}

/// A failing function, redeployed fixed: `ember journal replay` makes a
/// new invocation that succeeds; the record is marked replayed, and kept.
fn replay_after_fix() -> TestResult {
    let (_dir, emberd, mut client) = with_wat("f", TRAPS, json!({ "max_retries": 0 }))?;
    let first = accept(&mut client, "f", b"first")?;
    let second = accept(&mut client, "f", b"second")?;
    let a = final_state(&mut client, &first, Duration::from_secs(20))?;
    final_state(&mut client, &second, Duration::from_secs(20))?;
    deploy(&mut client, "f", &example("echo.wasm")?, json!({}), &[])?;

    let ember = sibling_binary("ember")?;
    let record = a["journal_id"].as_str().unwrap_or_default().to_string();
    let out = std::process::Command::new(&ember)
        .arg("--socket")
        .arg(&emberd.socket)
        .args(["journal", "replay", &record])
        .output()
        .map_err(|e| e.to_string())?;
    check(out.status.success(), || {
        String::from_utf8_lossy(&out.stderr).into_owned()
    })?;
    let new_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let v = final_state(&mut client, &new_id, Duration::from_secs(20))?;
    check(
        v["state"] == "succeeded"
            && v["result"] == "first"
            && v["version"] == 2
            && v["source_id"] == record.as_str(),
        || format!("replayed: {v}"),
    )?;
    let marked = get_json(&mut client, &format!("/journal/{record}"))?;
    check(marked["replayed_as"] == new_id.as_str(), || {
        format!("{marked}")
    })?;

    // Bulk: the other record, once (the replayed one is not replayed again).
    let bulk = expect_status(
        client.request("POST", "/journal/replay?function=f", None),
        200,
        "bulk",
    )?
    .json();
    check(bulk["queued"] == 1, || format!("bulk replay: {bulk}"))?;
    let id = bulk["ids"][0].as_str().unwrap_or_default().to_string();
    let v = final_state(&mut client, &id, Duration::from_secs(20))?;
    check(v["result"] == "second", || format!("{v}"))?;
    let again = expect_status(
        client.request("POST", "/journal/replay?function=f", None),
        200,
        "bulk",
    )?
    .json();
    check(again["queued"] == 0, || format!("replayed twice: {again}"))?;

    // The CLI lists the records.
    let out = std::process::Command::new(&ember)
        .arg("--socket")
        .arg(&emberd.socket)
        .args(["journal", "ls", "--function", "f"])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    check(
        out.status.success() && text.contains(&record) && text.contains(&new_id),
        || format!("ember journal ls: {text}"),
    )?;
    Ok(())
}

/// A retry that would come after max_event_age_s ends the event as
/// `expired` at once (backoff ceilings of an hour against an age of 60 s).
fn expired() -> TestResult {
    let (_dir, _emberd, mut client) = with_wat(
        "old",
        TRAPS,
        json!({ "max_event_age_s": 60, "retry_base_ms": 3_600_000, "max_retries": 10 }),
    )?;
    let id = accept(&mut client, "old", b"x")?;
    let v = final_state(&mut client, &id, Duration::from_secs(60))?;
    let record = get_json(
        &mut client,
        &format!("/journal/{}", v["journal_id"].as_str().unwrap_or("")),
    )?;
    check(
        v["state"] == "failed" && record["kind"] == "expired" && record["error"]["kind"] == "trap",
        || format!("{v} {record}"),
    )?;
    Ok(())
}

/// The VMMs of a version's instances die three times within a minute: its
/// template is rebuilt (a control_action record says what was detected
/// and done) and the next restore uses the new template; the function's
/// on_error control is told.
fn crash_loop_rebuilds() -> TestResult {
    let emberd = Emberd::start(&fresh_dir()?, &[])?;
    let mut client = emberd.client();
    deploy(&mut client, "ctl", &example("echo.wasm")?, json!({}), &[])?;
    deploy(
        &mut client,
        "echo",
        &example("echo.wasm")?,
        json!({ "on_error": "ctl" }),
        &[],
    )?;
    for _ in 0..3 {
        expect_status(invoke(&mut client, "echo", b"x", &[]), 200, "invoke")?;
        let instances = get_json(&mut client, "/instances")?;
        let echo = of_function(&instances, "echo");
        check(echo["template_generation"] == 0, || format!("{instances}"))?;
        let pid = echo["pid"].as_i64().unwrap_or(0) as i32;
        check(pid > 0, || format!("{instances}"))?;
        // SAFETY: kill(2) of the VMM process emberd reported.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // Gone (a zombie until emberd reaps it).
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The next invocation finds it dead: a crash.
        expect_status(
            invoke(&mut client, "echo", b"y", &[]),
            200,
            "invoke after kill",
        )?;
        // Keep only the fresh instance out of the next round's way.
        for i in get_json(&mut client, "/instances")?
            .as_array()
            .into_iter()
            .flatten()
        {
            let _ = client.request(
                "DELETE",
                &format!("/instances/{}", i["id"].as_str().unwrap_or("")),
                None,
            );
        }
    }
    let records = wait_list(&mut client, "/journal?kind=control_action", "records", 1)?;
    let r = &records[0];
    check(
        r["function"] == "echo"
            && r["detail"]["detected"]["condition"] == "crash_loop"
            && r["detail"]["done"]["action"] == "template_rebuilt"
            && r["detail"]["done"]["template_generation"] == 1,
        || format!("control action: {r}"),
    )?;
    let f = get_json(&mut client, "/functions/echo")?;
    check(f["template_generation"] == 1, || format!("{f}"))?;
    let served = expect_status(invoke(&mut client, "echo", b"z", &[]), 200, "after")?;
    check(
        served.body == b"z" && served.header("x-ember-start") == Some("restored"),
        || format!("{:?}", served.headers),
    )?;
    let instances = get_json(&mut client, "/instances")?;
    check(
        of_function(&instances, "echo")["template_generation"] == 1,
        || format!("{instances}"),
    )?;
    let metrics = String::from_utf8_lossy(&expect_status(client.get("/metrics"), 200, "m")?.body)
        .into_owned();
    check(metrics.contains("ember_control_actions_total 1"), || {
        metrics.clone()
    })?;
    // Each detected error (a crash found while serving) and the control
    // action went to ctl; the control action's record is among them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let told = get_json(&mut client, "/invocations?function=ctl")?;
        let mut found = None;
        for t in told["invocations"].as_array().into_iter().flatten() {
            let v = final_state(
                &mut client,
                t["id"].as_str().unwrap_or(""),
                Duration::from_secs(20),
            )?;
            let body: Value = serde_json::from_str(v["result"].as_str().unwrap_or("null"))
                .map_err(|e| format!("the control's event is not JSON ({e}): {v}"))?;
            if body["kind"] == "control_action" {
                found = Some(body);
            }
        }
        match found {
            Some(body) => break body,
            None if Instant::now() > deadline => {
                return Err(fail(format!("ctl never got the control action: {told}")))
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    check(
        body["function"] == "echo"
            && body["journal_id"] == r["id"]
            && body["detail"]["done"]["action"] == "template_rebuilt",
        || format!("on_error got: {body}"),
    )?;
    Ok(())
}

/// A template ember-vmm refuses (corrupted under a running emberd) whose
/// rebuild fails too (its module is gone): the version is marked broken —
/// a control action — invocations answer 503 `broken`, an async event
/// waits, and a deploy lets it through.
fn broken_version() -> TestResult {
    let dir = fresh_dir()?;
    let emberd = Emberd::start(&dir, &[])?;
    let mut client = emberd.client();
    deploy(&mut client, "echo", &example("echo.wasm")?, json!({}), &[])?;
    let v1 = dir.join("state/functions/echo/v1");
    let state = v1.join("template.state");
    let mut bytes = std::fs::read(&state).map_err(|e| e.to_string())?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&state, bytes).map_err(|e| e.to_string())?;
    std::fs::remove_file(v1.join("module.wasm")).map_err(|e| e.to_string())?;
    let r = invoke(&mut client, "echo", b"x", &[]).map_err(|e| e.to_string())?;
    expect_error(
        &r,
        503,
        "broken",
        "a version whose template cannot be rebuilt",
    )?;
    let records = wait_list(&mut client, "/journal?kind=control_action", "records", 1)?;
    check(
        records[0]["detail"]["detected"]["condition"] == "template_refused"
            && records[0]["detail"]["done"]["action"] == "version_marked_broken",
        || format!("{records:?}"),
    )?;
    let f = get_json(&mut client, "/functions/echo")?;
    check(f["broken"] == true, || format!("{f}"))?;
    let id = accept(&mut client, "echo", b"waits for a deploy")?;
    std::thread::sleep(Duration::from_millis(1500));
    let waiting = get_json(&mut client, &format!("/invocations/{id}"))?;
    check(
        waiting["state"] == "queued" && waiting["attempts"].as_array().is_some_and(Vec::is_empty),
        || format!("an event of a broken version: {waiting}"),
    )?;
    deploy(&mut client, "echo", &example("echo.wasm")?, json!({}), &[])?;
    let v = final_state(&mut client, &id, Duration::from_secs(20))?;
    check(
        v["state"] == "succeeded" && v["version"] == 2 && v["result"] == "waits for a deploy",
        || format!("{v}"),
    )?;
    Ok(())
}

/// The instance of `function` in a `GET /instances` answer (null if none).
fn of_function<'a>(instances: &'a Value, function: &str) -> &'a Value {
    instances
        .as_array()
        .and_then(|list| list.iter().find(|i| i["function"] == function))
        .unwrap_or(&Value::Null)
}

/// 2,000 async events from 4 clients while emberd is SIGKILLed 20 times
/// at random moments. A client whose answer was lost sends again with
/// the same idempotency key. Afterwards every event the clients were
/// answered for is succeeded exactly once, with its own bytes, and no
/// other event exists.
fn kill_storm() -> TestResult {
    const EVENTS: usize = 2000;
    const CLIENTS: usize = 4;
    const KILLS: usize = 20;
    let dir = fresh_dir()?;
    let mut emberd = Emberd::start(&dir, &[])?;
    deploy(
        &mut emberd.client(),
        "echo",
        &example("echo.wasm")?,
        json!({}),
        &[],
    )?;
    let socket = emberd.socket.clone();
    // seq → id, as the clients were answered.
    let answered = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<usize, String>::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let socket = socket.clone();
            let answered = answered.clone();
            let done = done.clone();
            std::thread::spawn(move || -> Result<(usize, usize), String> {
                let mut refused = 0;
                let mut unanswered = 0;
                let mut seq = c;
                let mut client: Option<ApiClient> = None;
                while seq < EVENTS {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(format!("client {c} stopped at {seq}"));
                    }
                    let conn = match client.as_mut() {
                        Some(conn) => conn,
                        None => match ApiClient::connect(&socket) {
                            Ok(conn) => {
                                let _ = conn.set_timeout(Some(Duration::from_secs(10)));
                                client.insert(conn)
                            }
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        },
                    };
                    let key = format!("seq-{seq}");
                    let body = format!("event {seq}");
                    let headers = [EVENT, ("X-Ember-Idempotency-Key", key.as_str())];
                    match invoke(conn, "echo", body.as_bytes(), &headers) {
                        Ok(r) if r.status == 202 || r.status == 200 => {
                            let id = r.json()["id"].as_str().unwrap_or_default().to_string();
                            let mut map = answered.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some(earlier) = map.insert(seq, id.clone()) {
                                if earlier != id {
                                    return Err(format!("seq {seq}: two ids {earlier} {id}"));
                                }
                            }
                            seq += CLIENTS;
                        }
                        Ok(r) => {
                            // 429 / 503: not accepted; send again.
                            refused += 1;
                            if r.status != 429 && r.status != 503 {
                                return Err(format!(
                                    "seq {seq}: {} {}",
                                    r.status,
                                    String::from_utf8_lossy(&r.body)
                                ));
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => {
                            // No answer (emberd died): unknown, send again
                            // with the same key.
                            unanswered += 1;
                            client = None;
                        }
                    }
                }
                Ok((refused, unanswered))
            })
        })
        .collect();
    let mut rng = Rng::new(0x5eed_4b11);
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(50 + rng.below_or_eq(300)));
        let pid = emberd.pid();
        drop(emberd); // SIGKILL, then wait.
        emberd = Emberd::start(&dir, &[])
            .map_err(|e| format!("restart {kill} after killing {pid}: {e}"))?;
    }
    let (mut refused, mut unanswered) = (0, 0);
    for client in clients {
        let (r, u) = client.join().map_err(|_| fail("a client panicked"))??;
        refused += r;
        unanswered += u;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = answered.lock().unwrap_or_else(|e| e.into_inner()).clone();
    check(answered.len() == EVENTS, || {
        format!("{} answered", answered.len())
    })?;

    // Everything final: every event of the store, paged.
    let mut client = emberd.client();
    let deadline = Instant::now() + Duration::from_secs(120);
    let all = loop {
        let mut all = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = get_json(
                &mut client,
                &format!("/invocations?function=echo&limit=1000{cursor}"),
            )?;
            all.extend(page["invocations"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => break,
            }
        }
        if all
            .iter()
            .all(|e| e["state"] == "succeeded" || e["state"] == "failed")
        {
            break all;
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "not final after 120 s: {:?}",
                all.iter()
                    .filter(|e| e["state"] != "succeeded")
                    .take(5)
                    .collect::<Vec<_>>()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let by_id: HashMap<&str, &Value> = all
        .iter()
        .map(|e| (e["id"].as_str().unwrap_or(""), e))
        .collect();
    check(all.len() == EVENTS && by_id.len() == EVENTS, || {
        format!(
            "{} events in the store for {EVENTS} answered (no event without a 202)",
            all.len()
        )
    })?;
    let journal = get_json(&mut client, "/journal?function=echo&limit=10000")?;
    let records = journal["records"].as_array().cloned().unwrap_or_default();
    let mut interrupted = 0;
    for (seq, id) in &answered {
        let e = by_id.get(id.as_str()).ok_or_else(|| {
            fail(format!(
                "seq {seq}: id {id} was answered 202 but is not in the store"
            ))
        })?;
        let journaled = records
            .iter()
            .filter(|r| r["invocation_id"] == id.as_str())
            .count();
        let ok = e["state"] == "succeeded";
        check(ok != (journaled == 1) && journaled <= 1, || {
            format!("seq {seq} ({id}): {e}, {journaled} journal records")
        })?;
        interrupted += e["interrupted"].as_i64().unwrap_or(0);
    }
    // The results are the events' own bytes (a sample: each costs a call).
    for (seq, id) in answered.iter().step_by(97) {
        let v = get_json(&mut client, &format!("/invocations/{id}"))?;
        if v["state"] == "succeeded" {
            check(v["result"] == format!("event {seq}").as_str(), || {
                format!("{v}")
            })?;
        }
    }
    eprintln!(
        "kill storm: {EVENTS} events, {KILLS} SIGKILLs, {unanswered} sends unanswered and resent with their key, {refused} refusals resent, {interrupted} interrupted attempts, {} journaled",
        records.len()
    );
    Ok(())
}

/// The state dir made immutable under a running emberd: async invokes get
/// 503 naming the reason, nothing is accepted; once writable again, what
/// was accepted before is delivered.
fn read_only_state_dir() -> TestResult {
    let dir = fresh_dir()?;
    let emberd = Emberd::start(&dir, &[])?;
    let mut client = emberd.client();
    deploy(&mut client, "f", &example("echo.wasm")?, json!({}), &[])?;
    let state = dir.join("state");
    let before = accept(&mut client, "f", b"before")?;
    final_state(&mut client, &before, Duration::from_secs(20))?;
    let files: Vec<String> = ["", "/journal.db", "/journal.db-wal", "/journal.db-shm"]
        .iter()
        .map(|f| format!("{}{f}", state.display()))
        .filter(|f| Path::new(f).exists())
        .collect();
    let chattr = |flag: &str| -> TestResult {
        let status = std::process::Command::new("chattr")
            .arg(flag)
            .args(&files)
            .status()
            .map_err(|e| fail(format!("cannot run chattr: {e}")))?;
        check(status.success(), || {
            format!("chattr {flag} {files:?} failed (root and ext4 needed)")
        })
    };
    chattr("+i")?;
    let result = (|| -> TestResult {
        for _ in 0..3 {
            let r = invoke(&mut client, "f", b"refused", &[EVENT]).map_err(|e| e.to_string())?;
            expect_error(&r, 503, "journal_unavailable", "an immutable state dir")?;
            let message = r.json()["error"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string();
            check(
                message.contains("I/O") || message.contains("read-only"),
                || message.clone(),
            )?;
        }
        Ok(())
    })();
    chattr("-i")?;
    result?;
    let after = accept(&mut client, "f", b"after")?;
    let v = final_state(&mut client, &after, Duration::from_secs(20))?;
    check(v["result"] == "after", || format!("{v}"))?;
    let earlier = get_json(&mut client, &format!("/invocations/{before}"))?;
    check(earlier["result"] == "before", || format!("{earlier}"))?;
    let listed = get_json(&mut client, "/invocations?function=f")?;
    check(
        listed["invocations"].as_array().map_or(0, Vec::len) == 2,
        || format!("a refused event was kept: {listed}"),
    )?;
    Ok(())
}

/// A state dir on a small tmpfs, filled up: 503, never 202 for an event
/// that is not on disk; once there is room, everything accepted is there.
fn full_disk() -> TestResult {
    let dir = fresh_dir()?;
    let mount = dir.join("small");
    std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "ember-test"])
        .arg(&mount)
        .status()
        .map_err(|e| e.to_string())?;
    check(status.success(), || {
        "cannot mount a tmpfs (root needed)".into()
    })?;
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let emberd = Emberd::start(&mount, &[])?;
    let mut client = emberd.client();
    deploy(
        &mut client,
        "f",
        &example("echo.wasm")?,
        json!({ "max_queued": 1000000 }),
        &[],
    )?;
    let filler = mount.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let mut accepted = Vec::new();
    let event = vec![b'e'; 256 << 10];
    let mut refused = None;
    for _ in 0..400 {
        let r = invoke(&mut client, "f", &event, &[EVENT]).map_err(|e| e.to_string())?;
        match r.status {
            202 => accepted.push(r.json()["id"].as_str().unwrap_or_default().to_string()),
            _ => {
                refused = Some(r);
                break;
            }
        }
    }
    let r = refused.ok_or_else(|| fail("400 events of 256 KiB accepted on a full 64 MiB tmpfs"))?;
    expect_error(&r, 503, "journal_unavailable", "a full disk")?;
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    check(message.contains("full") || message.contains("I/O"), || {
        message.clone()
    })?;
    std::fs::remove_file(&filler).map_err(|e| e.to_string())?;
    let after = accept(&mut client, "f", b"after")?;
    final_state(&mut client, &after, Duration::from_secs(30))?;
    for id in &accepted {
        let v = final_state(&mut client, id, Duration::from_secs(60))?;
        check(v["state"] == "succeeded", || format!("{v}"))?;
    }
    Ok(())
}

/// A journal.db that is not a database: emberd refuses to start, naming
/// the file and how to recover, and leaves it as it was.
fn corrupt_journal() -> TestResult {
    let dir = fresh_dir()?;
    let emberd = Emberd::start(&dir, &[])?;
    let mut client = emberd.client();
    deploy(&mut client, "f", &example("echo.wasm")?, json!({}), &[])?;
    accept(&mut client, "f", b"x")?;
    drop(client);
    emberd.terminate()?;
    let db = dir.join("state/journal.db");
    let garbage = vec![0x5au8; 64 << 10];
    std::fs::write(&db, &garbage).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(dir.join("state/journal.db-wal"));
    let e = match Emberd::start(&dir, &[]) {
        Ok(_) => return Err(fail("emberd started on a corrupt journal")),
        Err(e) => e,
    };
    check(
        e.contains(&db.display().to_string())
            && e.contains("To recover")
            && e.contains("never starts empty"),
        || format!("the refusal: {e}"),
    )?;
    same(&std::fs::read(&db).map_err(|e| e.to_string())?, &garbage)?;
    Ok(())
}
