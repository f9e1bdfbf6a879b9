//! emberd end to end: functions deployed and invoked through its socket,
//! on real microVMs restored from template snapshots. Without /dev/kvm
//! every test is reported as ignored, never passed.

use std::path::Path;

use ember_integration::*;

#[path = "../../benches/src/examples.rs"]
#[allow(dead_code)]
mod examples;
use ember_vmm::api::client::{ApiClient, ApiResponse};
use serde_json::json;

fn main() {
    let tests: Vec<Test> = vec![
        ("every_example_deploys_and_invokes", every_example),
        (
            "every_workload_example_answers_as_its_native_build",
            workload_examples,
        ),
        ("affinity_keys_stick_to_their_instances", affinity),
        (
            "a_killed_instance_sends_its_key_elsewhere_as_a_miss",
            killed_instance,
        ),
        ("a_redeploy_serves_the_new_version", redeploy),
        ("concurrent_invocations_use_several_instances", concurrent),
        ("a_timeout_recycles_the_instance", timeout_recycles),
        ("a_restart_keeps_functions_and_snapshots", restart),
        (
            "kill_9_of_a_vmm_mid_invocation_is_a_crash_and_emberd_serves_on",
            kill_mid_invocation,
        ),
        ("bad_inputs_get_their_own_4xx", bad_inputs),
        (
            "a_second_emberd_on_the_same_state_dir_is_refused",
            second_daemon,
        ),
        ("a_full_host_answers_429_with_retry_after", host_full),
        (
            "beyond_256_invocations_in_emberd_the_rest_get_429_at_once",
            admission_limit,
        ),
        ("the_ember_cli_deploys_invokes_lists_and_removes", cli),
        (
            "idle_instances_make_room_and_expire_after_their_keep_alive",
            eviction_and_keep_alive,
        ),
        ("a_corrupt_template_is_rebuilt_not_used", corrupt_template),
        (
            "sigterm_lets_the_invocation_in_flight_finish",
            drain_on_sigterm,
        ),
        (
            "instances_outlive_the_threads_that_restored_them",
            instances_outlive_threads,
        ),
        (
            "vmms_die_with_a_killed_emberd_and_its_successor_serves",
            emberd_killed,
        ),
        (
            "json_logs_tie_invocations_instances_and_vmm_lines_together",
            json_logs,
        ),
        (
            "a_vmm_that_cannot_start_is_reported_in_its_own_words",
            vmm_cannot_start,
        ),
        (
            "an_upgraded_guest_image_rebuilds_the_snapshots_and_keeps_the_functions",
            upgraded_image,
        ),
        (
            "every_vmm_is_jailed_unprivileged_and_in_a_cgroup_of_its_own",
            jailed,
        ),
        (
            "a_vm_past_its_memory_limit_is_killed_and_reported_as_a_crash",
            memory_limit_kill,
        ),
        ("no_jail_runs_vmms_unconfined_and_says_so", no_jail),
    ];
    run_kvm_tests(tests);
}

fn started() -> Result<Emberd, String> {
    Emberd::start(&fresh_dir()?, &[])
}

/// A fresh emberd with example `module` deployed as `name`.
fn with_function(
    name: &str,
    module: &str,
    config: serde_json::Value,
) -> Result<(Emberd, ApiClient), String> {
    with_function_args(&[], name, module, config)
}

/// As [`with_function`], emberd started with `args`.
fn with_function_args(
    args: &[&str],
    name: &str,
    module: &str,
    config: serde_json::Value,
) -> Result<(Emberd, ApiClient), String> {
    let emberd = Emberd::start(&fresh_dir()?, args)?;
    let mut client = emberd.client();
    deploy(&mut client, name, &example(module)?, config, &[])?;
    Ok((emberd, client))
}

/// A successful invocation: its result and response.
fn invoke_ok_via(
    client: &mut ApiClient,
    name: &str,
    event: &[u8],
    headers: &[(&str, &str)],
) -> Result<ApiResponse, String> {
    let response = expect_status(invoke(client, name, event, headers), 200, "invoke")?;
    if let Some(kind) = response.header("x-ember-function-error") {
        return Err(format!(
            "{name} failed ({kind}): {}",
            String::from_utf8_lossy(&response.body)
        ));
    }
    Ok(response)
}

/// Waits until `n` instances are busy (serving); returns them.
fn busy_instances(client: &mut ApiClient, n: usize) -> Result<serde_json::Value, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let instances = get_json(client, "/instances")?;
        let busy = instances
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["state"] == "busy")
            .count();
        if busy >= n {
            return Ok(instances);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("never {n} busy instances: {instances}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Every example function, deployed and invoked with an exact answer.
fn every_example() -> TestResult {
    let emberd = started()?;
    let mut client = emberd.client();
    let data = std::fs::read(example("data.txt")?).map_err(|e| fail(e.to_string()))?;
    type Case<'a> = (&'a str, Vec<(String, Vec<u8>)>, &'a [u8], &'a [u8]);
    let cases: Vec<Case> = vec![
        ("echo", vec![], b"hello", b"hello"),
        ("wordcount", vec![], b"one two three", b"0 3 13\n"),
        ("counter", vec![], b"", b"1\n"),
        (
            "sha256",
            vec![],
            b"abc",
            b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n",
        ),
        (
            "jsonx",
            vec![],
            br#"{"b":1,"a":[true,null]}"#,
            br#"{"a":[true,null],"b":1}"#,
        ),
        ("datafile", vec![("data.txt".to_string(), data)], b"", b""),
    ];
    for (name, files, event, want) in cases {
        let deployed = deploy(
            &mut client,
            name,
            &example(&format!("{name}.wasm"))?,
            json!({}),
            &files,
        )?;
        check(deployed["version"] == 1, || format!("deployed {deployed}"))?;
        let response = invoke_ok_via(&mut client, name, event, &[])?;
        check(response.header("x-ember-start") == Some("restored"), || {
            format!("{name}: first start {:?}", response.header("x-ember-start"))
        })?;
        if name == "datafile" {
            check(response.body.ends_with(b"5 of 5 lines\n"), || {
                format!(
                    "datafile answered {:?}",
                    String::from_utf8_lossy(&response.body)
                )
            })?;
        } else if name == "jsonx" {
            check(!response.body.is_empty(), || {
                "jsonx answered nothing".into()
            })?;
        } else {
            same(&response.body, want)?;
        }
        let again = invoke_ok_via(&mut client, name, event, &[])?;
        check(again.header("x-ember-start") == Some("warm"), || {
            format!("{name}: second start {:?}", again.header("x-ember-start"))
        })?;
    }
    let list = get_json(&mut client, "/functions")?;
    check(list.as_array().map_or(0, Vec::len) == 6, || {
        format!("functions: {list}")
    })?;
    Ok(())
}

/// The workload examples (AES, JSON, a template, gzip, a matrix multiply,
/// a thumbnail, SHA-256), deployed and invoked through emberd: restored,
/// then warm, each answer byte for byte the native build's.
fn workload_examples() -> TestResult {
    let emberd = started()?;
    let mut client = emberd.client();
    for ex in &examples::EXAMPLES {
        let event = (ex.event)();
        let want = (ex.native)(&event).map_err(fail)?;
        deploy(
            &mut client,
            ex.name,
            &example(ex.wasm)?,
            json!({ "memory_mib": 64, "timeout_ms": 60000 }),
            &[],
        )?;
        for start in ["restored", "warm"] {
            let response = invoke_ok_via(&mut client, ex.name, &event, &[])?;
            check(response.header("x-ember-start") == Some(start), || {
                format!("{}: start {:?}", ex.name, response.header("x-ember-start"))
            })?;
            check(response.body == want, || {
                format!(
                    "{}: {} bytes from the guest, {} from the native build; they differ",
                    ex.name,
                    response.body.len(),
                    want.len()
                )
            })?;
        }
    }
    Ok(())
}

/// 20 invocations with key A land on one instance, key B on another.
fn affinity() -> TestResult {
    let (_emberd, mut client) = with_function("echo", "echo.wasm", json!({}))?;
    let mut seen = std::collections::HashMap::<&str, std::collections::HashSet<String>>::new();
    for i in 0..20 {
        for key in ["A", "B"] {
            let response = invoke_ok_via(&mut client, "echo", b"x", &[("X-Ember-Affinity", key)])?;
            let expected = if i == 0 { "new" } else { "hit" };
            check(
                response.header("x-ember-affinity") == Some(expected),
                || {
                    format!(
                        "key {key}, request {i}: affinity {:?}",
                        response.header("x-ember-affinity")
                    )
                },
            )?;
            seen.entry(key).or_default().insert(
                response
                    .header("x-ember-instance")
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    check(
        seen["A"].len() == 1 && seen["B"].len() == 1 && seen["A"] != seen["B"],
        || format!("instances per key: {seen:?}"),
    )?;
    // An instance named by the caller serves.
    let a = seen["A"].iter().next().cloned().unwrap_or_default();
    let response = invoke_ok_via(&mut client, "echo", b"x", &[("X-Ember-Instance", &a)])?;
    check(
        response.header("x-ember-instance") == Some(a.as_str()),
        || {
            format!(
                "asked for {a}, got {:?}",
                response.header("x-ember-instance")
            )
        },
    )?;
    Ok(())
}

fn instance_of(response: &ApiResponse) -> String {
    response
        .header("x-ember-instance")
        .unwrap_or_default()
        .to_string()
}

/// Deleting the instance a key is bound to sends the key's next request
/// elsewhere, with `X-Ember-Affinity: miss`; then it sticks there.
fn killed_instance() -> TestResult {
    let (_emberd, mut client) = with_function("echo", "echo.wasm", json!({}))?;
    let first = instance_of(&invoke_ok_via(
        &mut client,
        "echo",
        b"x",
        &[("X-Ember-Affinity", "A")],
    )?);
    let deleted = client
        .request("DELETE", &format!("/instances/{first}"), None)
        .map_err(|e| fail(e.to_string()))?;
    expect_status(Ok(deleted), 204, "DELETE /instances")?;
    let response = invoke_ok_via(&mut client, "echo", b"x", &[("X-Ember-Affinity", "A")])?;
    check(
        response.header("x-ember-affinity") == Some("miss") && instance_of(&response) != first,
        || format!("after deleting {first}: {:?}", response.headers),
    )?;
    let second = instance_of(&response);
    let response = invoke_ok_via(&mut client, "echo", b"x", &[("X-Ember-Affinity", "A")])?;
    check(
        response.header("x-ember-affinity") == Some("hit") && instance_of(&response) == second,
        || format!("then: {:?}", response.headers),
    )?;
    // The same when its VMM is killed rather than deleted.
    let instances = get_json(&mut client, "/instances")?;
    let pid = instances
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["id"] == second.as_str())
        .and_then(|i| i["pid"].as_i64())
        .unwrap_or(0) as i32;
    check(pid > 0, || format!("instances: {instances}"))?;
    // SAFETY: kill(2) of the VMM process emberd reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let response = invoke_ok_via(&mut client, "echo", b"x", &[("X-Ember-Affinity", "A")])?;
    check(
        response.header("x-ember-affinity") == Some("miss") && instance_of(&response) != second,
        || format!("after kill -9 of {second}: {:?}", response.headers),
    )?;
    Ok(())
}

/// A redeploy makes the next invocation run the new version.
fn redeploy() -> TestResult {
    let (_emberd, mut client) = with_function("f", "echo.wasm", json!({}))?;
    same(
        &invoke_ok_via(&mut client, "f", b"one two", &[])?.body,
        b"one two",
    )?;
    let deployed = deploy(
        &mut client,
        "f",
        &example("wordcount.wasm")?,
        json!({}),
        &[],
    )?;
    check(deployed["version"] == 2, || format!("deployed {deployed}"))?;
    let response = invoke_ok_via(&mut client, "f", b"one two", &[])?;
    same(&response.body, b"0 2 7\n")?;
    check(response.header("x-ember-version") == Some("2"), || {
        format!("version {:?}", response.header("x-ember-version"))
    })?;
    let instances = get_json(&mut client, "/instances")?;
    check(
        instances
            .as_array()
            .into_iter()
            .flatten()
            .all(|i| i["version"] == 2),
        || format!("old instances still there: {instances}"),
    )?;
    Ok(())
}

/// 10 concurrent invocations of one function all succeed, on several
/// instances.
fn concurrent() -> TestResult {
    // sha256 of 1 MiB takes ~85 ms: long enough to overlap.
    let (emberd, _client) = with_function_args(
        &["--memory-budget-mib", "4096"],
        "sha",
        "sha256.wasm",
        json!({ "max_concurrency": 10 }),
    )?;
    let event = vec![7u8; 1 << 20];
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let mut client = emberd.client();
            let event = event.clone();
            std::thread::spawn(move || {
                invoke_ok_via(&mut client, "sha", &event, &[]).map(|r| (instance_of(&r), r.body))
            })
        })
        .collect();
    let mut instances = std::collections::HashSet::new();
    let mut bodies = std::collections::HashSet::new();
    for worker in workers {
        let (instance, body) = worker.join().map_err(|_| fail("a worker panicked"))??;
        instances.insert(instance);
        bodies.insert(body);
    }
    check(instances.len() > 1 && bodies.len() == 1, || {
        format!(
            "{} instances, {} distinct results",
            instances.len(),
            bodies.len()
        )
    })?;
    Ok(())
}

const SPIN: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $forever (br $forever))))
"#;

/// A fresh emberd with [`SPIN`] deployed as `spin` with `config`.
fn with_spin(config: serde_json::Value) -> Result<(Emberd, ApiClient), Failed> {
    let (_, emberd, client) = with_wat("spin", SPIN, config)?;
    Ok((emberd, client))
}

/// A function that times out is answered with `timeout`, and its
/// instance is destroyed: the next invocation restores a new one.
fn timeout_recycles() -> TestResult {
    let (_emberd, mut client) = with_spin(json!({ "timeout_ms": 200 }))?;
    let response = expect_status(invoke(&mut client, "spin", b"", &[]), 200, "invoke")?;
    check(
        response.header("x-ember-function-error") == Some("timeout"),
        || format!("expected a timeout: {:?}", response.headers),
    )?;
    let first = instance_of(&response);
    let instances = get_json(&mut client, "/instances")?;
    check(instances.as_array().is_some_and(Vec::is_empty), || {
        format!("the timed-out instance is still listed: {instances}")
    })?;
    let response = expect_status(invoke(&mut client, "spin", b"", &[]), 200, "invoke")?;
    check(
        instance_of(&response) != first && response.header("x-ember-start") == Some("restored"),
        || format!("after a timeout: {:?}", response.headers),
    )?;
    Ok(())
}

/// Deploys the counter example on `emberd`, checks its first answer, then
/// stops emberd with SIGTERM, which must end it with exit code 0.
fn deploy_counter_and_stop(emberd: Emberd) -> TestResult {
    let mut client = emberd.client();
    deploy(
        &mut client,
        "counter",
        &example("counter.wasm")?,
        json!({}),
        &[],
    )?;
    same(
        &invoke_ok_via(&mut client, "counter", b"", &[])?.body,
        b"1\n",
    )?;
    drop(client);
    let code = emberd.terminate()?;
    check(code == 0, || {
        format!("emberd exited with {code} on SIGTERM")
    })
}

/// SIGTERM, then a new emberd on the same state dir: the functions are
/// there, the base snapshot is not rebuilt, invocations work.
fn restart() -> TestResult {
    let dir = fresh_dir()?;
    let emberd = Emberd::start(&dir, &[])?;
    deploy_counter_and_stop(emberd)?;
    let emberd = Emberd::start(&dir, &[])?;
    check(
        !emberd.log.text().contains("building the base snapshot"),
        || format!("the base snapshot was rebuilt:\n{}", emberd.log.text()),
    )?;
    let mut client = emberd.client();
    let list = get_json(&mut client, "/functions")?;
    check(list[0]["name"] == "counter", || {
        format!("functions: {list}")
    })?;
    // A fresh instance from the template: the counter starts over.
    same(
        &invoke_ok_via(&mut client, "counter", b"", &[])?.body,
        b"1\n",
    )?;
    Ok(())
}

/// kill -9 of the VMM serving an invocation: the caller gets a `crash`
/// error; emberd serves the next request on a new instance.
fn kill_mid_invocation() -> TestResult {
    let (emberd, mut client) = with_function("sha", "sha256.wasm", json!({ "timeout_ms": 60000 }))?;
    invoke_ok_via(&mut client, "sha", b"warm", &[])?;
    let instances = get_json(&mut client, "/instances")?;
    let pid = instances[0]["pid"].as_u64().unwrap_or(0) as i32;
    check(pid > 0, || format!("instances: {instances}"))?;
    let mut runner = emberd.client();
    let worker = std::thread::spawn(move || invoke(&mut runner, "sha", &vec![1u8; 6 << 20], &[]));
    busy_instances(&mut client, 1)?;
    // SAFETY: kill(2) of the VMM process emberd reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let response = worker.join().map_err(|_| fail("the worker panicked"))??;
    check(
        response.status == 200 && response.header("x-ember-function-error") == Some("crash"),
        || format!("after kill -9: {} {:?}", response.status, response.headers),
    )?;
    same(
        &invoke_ok_via(&mut client, "sha", b"abc", &[])?.body,
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n",
    )?;
    let health = get_json(&mut client, "/health")?;
    check(health["status"] == "ok", || format!("health {health}"))?;
    Ok(())
}

/// Unknown function 404, invalid wasm 400, event over 6 MiB 413,
/// malformed config JSON 400, unknown instance 404 — each with its kind.
fn bad_inputs() -> TestResult {
    let emberd = started()?;
    let mut client = emberd.client();
    let response = invoke(&mut client, "nope", b"x", &[])?;
    expect_error(&response, 404, "not_found", "unknown function")?;
    let deploy_raw = |client: &mut ApiClient, name: &str, module: &[u8]| {
        ember_agent::client::deploy(client, name, &json!({}), module, &[])
    };
    let response = deploy_raw(&mut client, "bad", b"not wasm")?;
    expect_error(&response, 400, "invalid_function", "invalid wasm")?;
    // Valid wasm the guest refuses (no entry point): also a 400.
    let empty = wat::parse_str("(module)").map_err(|e| fail(e.to_string()))?;
    let response = deploy_raw(&mut client, "empty", &empty)?;
    expect_error(&response, 400, "invalid_function", "module without entry")?;
    let parts = [
        ember_agent::client::Part {
            name: "config",
            file_name: None,
            content_type: "application/json",
            bytes: b"{not json",
        },
        ember_agent::client::Part {
            name: "module",
            file_name: Some("m.wasm"),
            content_type: "application/wasm",
            bytes: b"\0asm\x01\0\0\0",
        },
    ];
    let (content_type, body) = ember_agent::client::multipart(&parts);
    let response = client.request_with_headers(
        "PUT",
        "/functions/x",
        &[("Content-Type", &content_type)],
        Some(&body),
    )?;
    expect_error(&response, 400, "bad_request", "malformed config")?;
    deploy(&mut client, "echo", &example("echo.wasm")?, json!({}), &[])?;
    let response = invoke(&mut client, "echo", &vec![0u8; (6 << 20) + 1], &[])?;
    expect_error(&response, 413, "payload_too_large", "an event over 6 MiB")?;
    let response = invoke(
        &mut client,
        "echo",
        b"x",
        &[("X-Ember-Instance", "echo-999")],
    )?;
    expect_error(&response, 404, "not_found", "an unknown instance")?;
    let response = client.request("DELETE", "/instances/echo-999", None)?;
    expect_error(&response, 404, "not_found", "DELETE of an unknown instance")?;
    let list = get_json(&mut client, "/functions")?;
    check(list.as_array().map_or(0, Vec::len) == 1, || {
        format!("failed deploys left functions behind: {list}")
    })?;
    Ok(())
}

/// Two daemons never share a state dir; the socket is 0600.
fn second_daemon() -> TestResult {
    let dir = fresh_dir()?;
    let first = Emberd::start(&dir, &[])?;
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&first.socket)
            .map_err(|e| fail(e.to_string()))?
            .permissions()
            .mode()
            & 0o777
    };
    check(mode == 0o600, || format!("the socket's mode is {mode:o}"))?;
    let second = std::process::Command::new(sibling_binary("emberd")?)
        .arg("--socket")
        .arg(dir.join("other.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--guest-image")
        .arg(guest_image()?)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    let stderr = String::from_utf8_lossy(&second.stderr);
    check(
        !second.status.success() && stderr.contains("another emberd uses the state dir"),
        || format!("second emberd: {:?} {stderr}", second.status),
    )?;
    Ok(())
}

/// 300 invocations at once of a function with one instance, kept busy
/// (it spins into its 3 s time limit): 256 are admitted (one serving, the
/// rest waiting for it), and the others get a 429 with Retry-After at
/// once, before they take a thread.
fn admission_limit() -> TestResult {
    let (emberd, mut client) = with_spin(json!({ "timeout_ms": 3000, "max_concurrency": 1 }))?;
    let mut runner = emberd.client();
    let busy = std::thread::spawn(move || invoke(&mut runner, "spin", b"", &[]));
    busy_instances(&mut client, 1)?;
    let socket = emberd.socket.clone();
    let started = std::time::Instant::now();
    let callers: Vec<_> = (0..300)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(
                move || -> std::io::Result<(ApiResponse, std::time::Duration)> {
                    let mut c = ApiClient::connect(&socket)?;
                    c.set_timeout(Some(PATIENCE))?;
                    let response = invoke(&mut c, "spin", b"", &[])?;
                    Ok((response, started.elapsed()))
                },
            )
        })
        .collect();
    let mut refused = 0;
    for caller in callers {
        let (response, after) = caller.join().map_err(|_| fail("a caller panicked"))??;
        match response.status {
            200 => {}
            429 if String::from_utf8_lossy(&response.body)
                .contains("invocations are already in emberd") =>
            {
                check(response.header("retry-after").is_some(), || {
                    format!("a 429 without Retry-After: {:?}", response.headers)
                })?;
                check(after < std::time::Duration::from_secs(2), || {
                    format!("an admission 429 came after {after:?}")
                })?;
                refused += 1;
            }
            // Waited its 5 s for a busy instance.
            429 => {}
            other => {
                return Err(fail(format!(
                    "status {other}: {}",
                    String::from_utf8_lossy(&response.body)
                )))
            }
        }
    }
    let response = busy
        .join()
        .map_err(|_| fail("the busy caller panicked"))??;
    check(
        response.status == 200 && response.header("x-ember-function-error") == Some("timeout"),
        || format!("the busy one: {} {:?}", response.status, response.headers),
    )?;
    // 300 callers + the busy one, 256 admitted.
    check(refused >= 300 + 1 - 256, || {
        format!("{refused} callers were refused admission; expected at least 45")
    })
}

/// The host's memory budget spent (one instance of a function claiming
/// 100 MiB of 150, busy): a request that needs another instance gets a
/// 429 with Retry-After, at once.
fn host_full() -> TestResult {
    // Two invocations that stay busy until their time limit (3 s), so that
    // both are certainly busy at once however long each restore takes.
    let dir = fresh_dir()?;
    let module = wat_module(&dir, "spin", SPIN)?;
    let emberd = Emberd::start(&dir, &["--memory-budget-mib", "300"])?;
    let mut client = emberd.client();
    deploy(
        &mut client,
        "spin",
        &module,
        json!({ "memory_mib": 64, "timeout_ms": 3000 }),
        &[],
    )?;
    // memory_mib 64 claims 64 + the VMM's 64: two instances fit 300, a
    // third does not.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let mut c = emberd.client();
            std::thread::spawn(move || invoke(&mut c, "spin", b"x", &[]))
        })
        .collect();
    busy_instances(&mut client, 2)?;
    let started = std::time::Instant::now();
    let response = invoke(&mut client, "spin", b"x", &[])?;
    check(
        response.status == 429
            && error_kind(&response) == "too_many_requests"
            && response.header("retry-after").is_some(),
        || {
            format!(
                "third concurrent: {} {:?}",
                response.status, response.headers
            )
        },
    )?;
    check(
        started.elapsed() < std::time::Duration::from_secs(1),
        || format!("the 429 took {:?}", started.elapsed()),
    )?;
    for worker in workers {
        let response = worker.join().map_err(|_| fail("a worker panicked"))??;
        check(response.status == 200, || {
            format!("a busy one: {}", response.status)
        })?;
    }
    Ok(())
}

/// kill -9 of emberd: its VMMs die with it (PR_SET_PDEATHSIG); a new
/// emberd on the same state dir takes the lock, cleans up, and serves.
fn emberd_killed() -> TestResult {
    let dir = fresh_dir()?;
    let emberd = Emberd::start(&dir, &[])?;
    let mut client = emberd.client();
    deploy(&mut client, "echo", &example("echo.wasm")?, json!({}), &[])?;
    invoke_ok_via(&mut client, "echo", b"x", &[])?;
    let pid = get_json(&mut client, "/instances")?[0]["pid"]
        .as_u64()
        .unwrap_or(0);
    check(pid > 0, || "no instance pid".into())?;
    drop(client);
    drop(emberd); // SIGKILL
    let gone = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    check(gone, || format!("ember-vmm {pid} outlived its emberd"))?;
    let emberd = Emberd::start(&dir, &[])?;
    let mut client = emberd.client();
    same(
        &invoke_ok_via(&mut client, "echo", b"again", &[])?.body,
        b"again",
    )?;
    let leftovers: Vec<String> = std::fs::read_dir(dir.join("state/vms"))
        .map_err(|e| fail(e.to_string()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pid"))
        .collect();
    // The new daemon's own VMMs only: its prepared one and the instance.
    check(leftovers.len() <= 3, || format!("pidfiles: {leftovers:?}"))?;
    Ok(())
}

/// Instances restored on many threads at once outlive those threads
/// (tokio retires idle blocking threads after 10 s; a VMM's death signal
/// must not follow the thread that forked it): 12 s later every instance
/// is alive and serves warm. `prewarm: off`: the pre-warm policy would
/// rightly let the burst's extra instances go once traffic is quiet for
/// 5 s (when the burst happened to reuse instances enough to learn from).
fn instances_outlive_threads() -> TestResult {
    let (emberd, mut client) = with_function_args(
        &["--memory-budget-mib", "4096"],
        "sha",
        "sha256.wasm",
        json!({ "max_concurrency": 12, "prewarm": "off" }),
    )?;
    let workers: Vec<_> = (0..12)
        .map(|_| {
            let mut client = emberd.client();
            std::thread::spawn(move || invoke_ok_via(&mut client, "sha", &vec![1u8; 1 << 20], &[]))
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| fail("a worker panicked"))??;
    }
    let before = get_json(&mut client, "/instances")?;
    let pids: Vec<i64> = before
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["pid"].as_i64())
        .collect();
    check(pids.len() >= 2, || format!("instances: {before}"))?;
    std::thread::sleep(std::time::Duration::from_secs(12));
    for pid in &pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        check(!stat.is_empty() && !stat.contains(") Z "), || {
            format!("ember-vmm {pid} died after 12 s:\n{}", emberd.log.text())
        })?;
    }
    let response = invoke_ok_via(&mut client, "sha", b"abc", &[])?;
    check(response.header("x-ember-start") == Some("warm"), || {
        format!("after 12 s: {:?}", response.headers)
    })?;
    Ok(())
}

/// The `ember` CLI against a real emberd: the socket from `--socket`
/// (after the command) or `EMBER_SOCKET`, tables and JSON, exit codes.
fn cli() -> TestResult {
    let emberd = started()?;
    let ember = sibling_binary("ember")?;
    let run = |args: &[&str], stdin: &[u8]| -> Result<std::process::Output, String> {
        use std::io::Write;
        let mut child = std::process::Command::new(&ember)
            .args(args)
            .env("EMBER_SOCKET", &emberd.socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(stdin)
            .map_err(|e| e.to_string())?;
        child.wait_with_output().map_err(|e| e.to_string())
    };
    let wc = example("wordcount.wasm")?;
    let out = run(
        &[
            "deploy",
            "wc",
            wc.to_str().unwrap_or_default(),
            "--timeout",
            "2s",
            "--env",
            "A=b",
        ],
        b"",
    )?;
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    check(
        out.status.success() && text.contains("wc version 1 ready"),
        || format!("deploy: {text}"),
    )?;
    let out = run(&["invoke", "wc"], b"one two three")?;
    check(out.status.success() && out.stdout == b"0 3 13\n", || {
        format!(
            "invoke from stdin: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let socket = emberd.socket.to_str().unwrap_or_default().to_string();
    let out = run(
        &[
            "invoke",
            "wc",
            "--data",
            "x y",
            "--affinity",
            "k",
            "--json",
            "--socket",
            &socket,
        ],
        b"",
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    check(
        out.status.success() && json["result"] == "0 2 3\n" && json["affinity"] == "new",
        || format!("invoke --json: {}", String::from_utf8_lossy(&out.stdout)),
    )?;
    let out = run(&["ls"], b"")?;
    check(String::from_utf8_lossy(&out.stdout).contains("wc"), || {
        "ls lists no wc".into()
    })?;
    let out = run(&["--json", "instances"], b"")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    check(json.as_array().map_or(0, Vec::len) >= 1, || {
        format!("instances: {json}")
    })?;
    let out = run(&["invoke", "nope", "--data", "x"], b"")?;
    check(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not_found"),
        || format!("unknown function: {}", String::from_utf8_lossy(&out.stderr)),
    )?;
    let out = run(&["rm", "wc"], b"")?;
    check(out.status.success(), || "rm failed".into())?;
    let out = run(&["completions", "bash"], b"")?;
    check(
        String::from_utf8_lossy(&out.stdout).contains("_ember"),
        || "no completions".into(),
    )?;
    Ok(())
}

/// With the host's memory budget spent by an idle instance of one
/// function, a restore of another evicts it; an idle instance past its
/// function's keep-alive is reaped.
fn eviction_and_keep_alive() -> TestResult {
    let (_emberd, mut client) = with_function_args(
        // a claims 64 + 64 (the VMM's overhead), b 80 + 64: not both.
        &["--memory-budget-mib", "250"],
        "a",
        "echo.wasm",
        json!({ "memory_mib": 64 }),
    )?;
    deploy(
        &mut client,
        "b",
        &example("echo.wasm")?,
        json!({ "memory_mib": 80, "keep_alive_s": 1 }),
        &[],
    )?;
    let a = instance_of(&invoke_ok_via(&mut client, "a", b"x", &[])?);
    let b = invoke_ok_via(&mut client, "b", b"y", &[])?;
    check(b.header("x-ember-start") == Some("restored"), || {
        format!("b: {:?}", b.headers)
    })?;
    let instances = get_json(&mut client, "/instances")?;
    check(
        instances
            .as_array()
            .is_some_and(|l| l.len() == 1 && l[0]["function"] == "b"),
        || format!("{a} was not evicted for b: {instances}"),
    )?;
    // b's keep-alive is 1 s; the reaper runs every second.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let instances = get_json(&mut client, "/instances")?;
    check(instances.as_array().is_some_and(Vec::is_empty), || {
        format!("an instance outlived its keep-alive: {instances}")
    })?;
    Ok(())
}

/// A template damaged on disk is found at the next start (the load's own
/// checks), rebuilt, and the function serves.
fn corrupt_template() -> TestResult {
    let dir = fresh_dir()?;
    let emberd = Emberd::start(&dir, &[])?;
    let mut client = emberd.client();
    deploy(
        &mut client,
        "wc",
        &example("wordcount.wasm")?,
        json!({}),
        &[],
    )?;
    drop(client);
    emberd.terminate()?;
    let state = dir.join("state/functions/wc/v1/template.state");
    let mut bytes = std::fs::read(&state).map_err(|e| fail(e.to_string()))?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&state, bytes).map_err(|e| fail(e.to_string()))?;
    let emberd = Emberd::start(&dir, &[])?;
    let mut client = emberd.client();
    same(
        &invoke_ok_via(&mut client, "wc", b"a b", &[])?.body,
        b"0 2 3\n",
    )?;
    check(emberd.log.text().contains("rebuilding"), || {
        format!("no rebuild logged:\n{}", emberd.log.text())
    })?;
    Ok(())
}

/// SIGTERM while an invocation runs: it finishes and is answered, new
/// work is refused meanwhile, and emberd exits 0.
fn drain_on_sigterm() -> TestResult {
    let (emberd, mut client) = with_function("sha", "sha256.wasm", json!({ "timeout_ms": 60000 }))?;
    invoke_ok_via(&mut client, "sha", b"warm", &[])?;
    let event = vec![5u8; 4 << 20];
    let mut runner = emberd.client();
    let worker = std::thread::spawn(move || invoke(&mut runner, "sha", &event, &[]));
    busy_instances(&mut client, 1)?;
    emberd.signal_term();
    let response = worker.join().map_err(|_| fail("the worker panicked"))??;
    check(
        response.status == 200 && response.header("x-ember-function-error").is_none(),
        || {
            format!(
                "the invocation in flight: {} {:?}",
                response.status, response.headers
            )
        },
    )?;
    same(&response.body[response.body.len() - 1..], b"\n")?;
    let code = emberd.terminate()?;
    check(code == 0, || format!("emberd exited with {code}"))?;
    Ok(())
}

/// With `--log-format json` every line emberd writes is one JSON object.
/// An invocation's id (`X-Ember-Invocation-Id`, on errors too) is in the
/// lines about it, with its function, version and instance; the lines
/// ember-vmm wrote while restoring that instance are in emberd's log too,
/// tagged with the instance and the VMM id that `GET /instances` names.
fn json_logs() -> TestResult {
    let (emberd, mut client) = with_function_args(
        &["--log-format", "json", "--vmm-log-level", "info"],
        "echo",
        "echo.wasm",
        json!({}),
    )?;
    let response = invoke_ok_via(&mut client, "echo", b"hi", &[])?;
    let id = response
        .header("x-ember-invocation-id")
        .ok_or_else(|| fail(format!("no invocation id: {:?}", response.headers)))?
        .to_string();
    check(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        || format!("invocation id {id:?}"),
    )?;
    let instance = instance_of(&response);
    let instances = get_json(&mut client, "/instances")?;
    let vmm = instances
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["id"] == instance.as_str())
        .and_then(|i| i["vmm"].as_str())
        .ok_or_else(|| fail(format!("no vmm for {instance} in {instances}")))?
        .to_string();
    // Refused requests are invocations too: an id of their own.
    let missing = invoke(&mut client, "nope", b"", &[])?;
    let other = missing.header("x-ember-invocation-id").unwrap_or_default();
    check(
        missing.status == 404 && other.len() == 32 && other != id,
        || format!("404: {} {:?}", missing.status, missing.headers),
    )?;
    // The restore's own line (the template build logged one too, untagged).
    let tagged = format!("\"instance\":\"{instance}\"");
    let restored_line = |text: &str| {
        text.lines()
            .any(|l| l.contains("snapshot loaded") && l.contains(&tagged))
    };
    check(emberd.log.wait_until(PATIENCE, restored_line), || {
        format!(
            "ember-vmm's restore line never came:\n{}",
            emberd.log.text()
        )
    })?;

    let text = emberd.log.text();
    // Whole lines only: the capture may end inside one.
    let whole = &text[..text.rfind('\n').map_or(0, |at| at + 1)];
    let mut lines = Vec::new();
    for line in whole.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| fail(format!("not a JSON line ({e}): {line}")))?;
        check(
            value["timestamp"].is_string() && value["level"].is_string(),
            || format!("no timestamp or level: {line}"),
        )?;
        lines.push(value);
    }
    let restored = lines.iter().find(|l| {
        l["invocation"] == id.as_str()
            && l["function"] == "echo"
            && l["instance"] == instance.as_str()
            && l["version"] == 1
            && l["vmm"] == vmm.as_str()
    });
    check(restored.is_some(), || {
        format!("no line of invocation {id} naming echo v1, {instance} and {vmm}:\n{text}")
    })?;
    let forwarded = lines.iter().find(|l| {
        l["target"] == "ember_vmm"
            && l["vmm"] == vmm.as_str()
            && l["instance"] == instance.as_str()
            && l["function"] == "echo"
            && l["pid"].is_u64()
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("snapshot loaded"))
    });
    check(forwarded.is_some(), || {
        format!("no ember-vmm line of {vmm} tagged {instance}:\n{text}")
    })
}

/// An ember-vmm that dies at start (here a stand-in that says why and
/// exits 3): emberd's error carries what it said, and emberd exits 1.
fn vmm_cannot_start() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let dir = fresh_dir()?;
    let fake = dir.join("ember-vmm");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'ember-vmm[x]     0.100ms ERROR no KVM here, sorry' >&2\nexit 3\n",
    )
    .map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| fail(e.to_string()))?;
    let output = std::process::Command::new(sibling_binary("emberd")?)
        .arg("--socket")
        .arg(dir.join("emberd.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--vmm")
        .arg(&fake)
        .arg("--guest-image")
        .arg(guest_image()?)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    check(output.status.code() == Some(1), || {
        format!("emberd: {}\n{stderr}", output.status)
    })?;
    check(
        stderr.contains("did not start: it exited")
            && stderr.contains("exit status: 3")
            && stderr.contains("no KVM here, sorry"),
        || format!("emberd did not say why the VMM failed:\n{stderr}"),
    )?;
    // The cgroup parent its jails would have used went with it.
    use ember_vmm::jail::cgroup::{Hierarchy, CGROUP_ROOT};
    if let Ok(hierarchy @ Hierarchy::V1 { .. }) = Hierarchy::detect(Path::new(CGROUP_ROOT)) {
        let tag = ember_agent::host::state_dir_tag(&dir.join("state"));
        for parent in hierarchy.dirs(&Path::new("ember").join(tag)) {
            check(!parent.exists(), || {
                format!("a failed start left {}", parent.display())
            })?;
        }
    }
    Ok(())
}

/// emberd on `dir` (as [`Emberd::start`] does) with another guest image.
fn start_with_image(dir: &Path, image: &Path) -> Result<Emberd, String> {
    let socket = dir.join("emberd.sock");
    let mut command = std::process::Command::new(sibling_binary("emberd")?);
    command
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--vmm")
        .arg(sibling_binary("ember-vmm")?)
        .arg("--guest-image")
        .arg(image)
        .args(["--vm-mem-mib", "128", "--prepared", "1"]);
    Emberd::spawn(command, socket, dir)
}

/// An upgrade that brings another guest image (here: the same image with
/// bytes appended, which changes its hash and nothing else): the functions
/// stay, the base snapshot of the old image is replaced by one of the new,
/// and each template — a layer over the old base — is rebuilt on first
/// use, never restored onto the new base.
fn upgraded_image() -> TestResult {
    let dir = fresh_dir()?;
    let old_image = guest_image()?;
    let emberd = start_with_image(&dir, &old_image)?;
    deploy_counter_and_stop(emberd)?;
    let bases = |dir: &Path| -> Result<Vec<String>, Failed> {
        let snapshots = dir.join("state/snapshots");
        Ok(std::fs::read_dir(&snapshots)
            .map_err(|e| fail(format!("{}: {e}", snapshots.display())))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    };
    let before = bases(&dir)?;

    let mut bytes = std::fs::read(&old_image).map_err(|e| fail(e.to_string()))?;
    bytes.extend_from_slice(b"a newer build");
    let new_image = dir.join("ember-guest-new");
    std::fs::write(&new_image, bytes).map_err(|e| fail(e.to_string()))?;
    let emberd = start_with_image(&dir, &new_image)?;
    check(
        emberd.log.text().contains("building the base snapshot"),
        || format!("no new base for the new image:\n{}", emberd.log.text()),
    )?;
    let after = bases(&dir)?;
    check(
        after.len() == 1 && before.len() == 1 && after != before,
        || format!("bases before {before:?}, after {after:?}"),
    )?;
    let mut client = emberd.client();
    let list = get_json(&mut client, "/functions")?;
    check(
        list[0]["name"] == "counter" && list[0]["version"] == 1,
        || format!("functions: {list}"),
    )?;
    same(
        &invoke_ok_via(&mut client, "counter", b"", &[])?.body,
        b"1\n",
    )?;
    same(
        &invoke_ok_via(&mut client, "counter", b"", &[])?.body,
        b"2\n",
    )?;
    check(
        emberd
            .log
            .text()
            .contains("template of counter v1 is missing or corrupt: rebuilding"),
        || format!("the template was not rebuilt:\n{}", emberd.log.text()),
    )
}

/// A `/proc/PID/status` field.
fn status_field(pid: u32, field: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// The children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The pids of every ember-vmm process on the host.
fn vmm_processes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "ember-vmm")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every VMM emberd runs (prepared ones and instances): its keeper and
/// the VMM itself run as a uid and gid of their own (not root), with no
/// capability, no_new_privs; the VMM in namespaces of its own, seeing a
/// root with nothing but its directory and what is bound in, in a cgroup
/// leaf whose memory limit is the function's memory plus the overhead.
fn jailed() -> TestResult {
    let (emberd, mut client) = with_function("echo", "echo.wasm", json!({ "memory_mib": 32 }))?;
    same(
        &invoke_ok_via(&mut client, "echo", b"jailed", &[])?.body,
        b"jailed",
    )?;
    let instances = get_json(&mut client, "/instances")?;
    let keeper = instances[0]["pid"].as_u64().unwrap_or(0) as u32;
    check(keeper > 0, || format!("instances: {instances}"))?;
    let vmm = children(keeper);
    check(vmm.len() == 1, || {
        format!("the keeper {keeper} has children {vmm:?}")
    })?;
    let vmm = vmm[0];
    let mut uids = std::collections::BTreeSet::new();
    for pid in [keeper, vmm] {
        let uid = status_field(pid, "Uid:")?;
        let gid = status_field(pid, "Gid:")?;
        check(
            uid.split_whitespace()
                .all(|u| u != "0" && u.parse::<u32>().is_ok_and(|u| u >= 3_000_000)),
            || format!("process {pid} runs as uids {uid}"),
        )?;
        check(gid.split_whitespace().all(|g| g != "0"), || {
            format!("process {pid} runs as gids {gid}")
        })?;
        uids.insert(uid);
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            let value = status_field(pid, caps)?;
            check(u64::from_str_radix(&value, 16) == Ok(0), || {
                format!("process {pid} has {caps} {value}")
            })?;
        }
        check(status_field(pid, "NoNewPrivs:")? == "1", || {
            format!("process {pid} lacks no_new_privs")
        })?;
    }
    check(uids.len() == 1, || {
        format!("keeper and VMM differ: {uids:?}")
    })?;
    // Namespaces of its own.
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).map_err(|e| e.to_string())?;
        let theirs =
            std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).map_err(|e| e.to_string())?;
        check(ours != theirs, || {
            format!("the VMM shares our {ns} namespace")
        })?;
    }
    check(
        status_field(vmm, "NSpid:")?.split_whitespace().last() == Some("1"),
        || "the VMM is not PID 1 of its namespace".into(),
    )?;
    // Its root holds no /etc, /dev, /proc, /home; the state dir shows only
    // its own VMM directory.
    let root = format!("/proc/{vmm}/root");
    for hidden in ["etc", "dev", "proc", "home", "usr", "bin"] {
        check(!Path::new(&format!("{root}/{hidden}")).exists(), || {
            format!("the jail shows /{hidden}")
        })?;
    }
    let vms = emberd.state_dir.join("state/vms");
    let seen: Vec<String> = std::fs::read_dir(format!("{root}{}", vms.display()))
        .map_err(|e| format!("the jail's view of {}: {e}", vms.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    check(seen.len() == 1, || {
        format!("the jail sees {seen:?} in {}", vms.display())
    })?;
    check(
        !Path::new(&format!(
            "{root}{}",
            emberd.state_dir.join("state/journal.db").display()
        ))
        .exists(),
        || "the jail sees the journal".into(),
    )?;
    // Its cgroup leaf and limits.
    let cgroup =
        std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).map_err(|e| e.to_string())?;
    let memory_leaf = cgroup
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            (controllers.split(',').any(|c| c == "memory") || controllers.is_empty())
                .then(|| path.to_string())
        })
        .ok_or_else(|| format!("no memory cgroup in {cgroup}"))?;
    check(memory_leaf.contains("ember"), || {
        format!("the VMM's memory cgroup is {memory_leaf}")
    })?;
    let v1 = Path::new("/sys/fs/cgroup/memory").join(memory_leaf.trim_start_matches('/'));
    let limit_file = if v1.join("memory.limit_in_bytes").exists() {
        v1.join("memory.limit_in_bytes")
    } else {
        Path::new("/sys/fs/cgroup")
            .join(memory_leaf.trim_start_matches('/'))
            .join("memory.max")
    };
    let limit = std::fs::read_to_string(&limit_file)
        .map_err(|e| format!("{}: {e}", limit_file.display()))?;
    check(limit.trim() == ((32u64 + 64) << 20).to_string(), || {
        format!("{}: {limit} (want (32 + 64) MiB)", limit_file.display())
    })?;
    // No ember-vmm on the host runs as root (this emberd's, or others').
    for pid in vmm_processes() {
        let uid = status_field(pid, "Uid:")?;
        let ours = pid == keeper
            || pid == vmm
            || std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("--jail-root"));
        if ours {
            check(!uid.starts_with("0\t") && !uid.starts_with("0 "), || {
                format!("ember-vmm {pid} runs as root")
            })?;
        }
    }
    Ok(())
}

/// A VM whose memory outgrows its cgroup's limit (here the VMM's overhead
/// is set to 1 MiB, so a 6 MiB event is too much) is killed by the
/// kernel; emberd reports the invocation as a crash naming the limit, and
/// serves on.
fn memory_limit_kill() -> TestResult {
    let (_emberd, mut client) = with_function_args(
        &["--vmm-overhead-mib", "1"],
        "echo",
        "echo.wasm",
        json!({ "memory_mib": 8 }),
    )?;
    let response = invoke(&mut client, "echo", &vec![7u8; 6 << 20], &[])?;
    let body = String::from_utf8_lossy(&response.body).into_owned();
    check(
        response.header("x-ember-function-error") == Some("crash") && body.contains("memory limit"),
        || {
            format!(
                "over the limit: {} {:?} {body}",
                response.status, response.headers
            )
        },
    )?;
    same(
        &invoke_ok_via(&mut client, "echo", b"small", &[])?.body,
        b"small",
    )?;
    let health = get_json(&mut client, "/health")?;
    check(health["status"] == "ok", || format!("health {health}"))?;
    Ok(())
}

/// `--no-jail`: the VMMs run as emberd's user, and emberd's log says so.
fn no_jail() -> TestResult {
    let (emberd, mut client) = with_function_args(&["--no-jail"], "echo", "echo.wasm", json!({}))?;
    invoke_ok_via(&mut client, "echo", b"x", &[])?;
    check(
        emberd
            .log
            .text()
            .contains("--no-jail: every ember-vmm runs unconfined"),
        || "no warning in the log".into(),
    )?;
    let instances = get_json(&mut client, "/instances")?;
    let pid = instances[0]["pid"].as_u64().unwrap_or(0) as u32;
    let uid = status_field(pid, "Uid:")?;
    let me = status_field(std::process::id(), "Uid:")?;
    check(uid == me, || {
        format!("unjailed VMM {pid} runs as {uid}, emberd's user is {me}")
    })?;
    check(children(pid).is_empty(), || {
        "an unjailed VMM has a child".into()
    })?;
    Ok(())
}
