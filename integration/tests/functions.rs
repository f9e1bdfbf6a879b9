//! Functions end to end: WebAssembly modules loaded into real microVMs and
//! invoked through ember-vmm's socket. The examples come from
//! `./scripts/examples`; the failure cases are small WAT modules written
//! here. Without /dev/kvm every test is reported as ignored, never passed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ember_abi::mailbox::MessageKind;
use ember_integration::*;
use ember_vmm::api::client::{ApiClient, ApiResponse};
use ember_vmm::api::parsed_request::{FUNCTION_ERROR_HEADER, LOG_HEADER};
use serde_json::json;
use sha2::{Digest, Sha256};

fn main() {
    let tests: Vec<Test> = vec![
        ("echo_returns_the_event", echo),
        ("wordcount_counts", wordcount),
        ("sha256_of_small_and_large_events", sha256),
        ("jsonx_in_c_transforms_json", jsonx),
        (
            "jsonx_invalid_json_is_a_handler_error_with_log",
            jsonx_invalid,
        ),
        ("counter_reactor_keeps_state", counter),
        (
            "counter_reactor_bad_event_is_a_handler_error",
            counter_bad_event,
        ),
        ("datafile_reads_var_task", datafile),
        ("wasi_args_env_clock_random_files", wasi_info),
        (
            "wasi_calls_with_hostile_arguments_get_errnos",
            hostile_arguments,
        ),
        (
            "hostile_guest_answering_with_maximal_garbage_of_every_kind_is_refused",
            hostile_guest_maximal_answers,
        ),
        ("traps_are_reported_and_the_next_invocation_works", traps),
        ("reactor_is_rebuilt_after_a_trap", reactor_trap),
        ("infinite_loop_times_out_not_before_its_limit", timeout),
        (
            "memory_hog_is_out_of_memory_and_runtime_stays_healthy",
            memory_hog,
        ),
        ("proc_exit_nonzero_is_a_handler_error", exit_status),
        ("module_not_wasm_is_a_load_error", not_wasm),
        ("module_with_unknown_import_is_a_load_error", unknown_import),
        ("module_without_entry_point_is_a_load_error", no_entry),
        (
            "event_at_limit_passes_one_byte_over_is_refused",
            event_limit,
        ),
        (
            "invoke_without_function_and_second_load_are_refused",
            misuse,
        ),
        ("command_instances_are_prepared_ahead", prepared_instances),
        (
            "default_memory_limit_is_what_the_vm_leaves_and_the_runtime_survives_it",
            default_memory_limit,
        ),
        (
            "an_answer_for_a_client_that_left_never_reaches_the_next",
            answer_after_client_left,
        ),
        (
            "a_module_compiled_for_cpu_features_the_guest_lacks_is_recompiled",
            recompiled_for_the_guest,
        ),
        ("pipelined_invocations_in_order_watching_memory", || {
            pipelined("100")
        }),
        ("pipelined_invocations_in_order_doorbells_only", || {
            pipelined("0")
        }),
        ("pipelined_invocations_in_order_watching_long", || {
            pipelined("100000")
        }),
    ];
    run_kvm_tests(tests);
}

/// Boots a VM and loads `config` (its `module_path` set to `module`).
fn with_function(
    module: &Path,
    config: serde_json::Value,
) -> Result<(VmmProcess, ApiClient, serde_json::Value), String> {
    with_function_args(module, config, &[])
}

/// As [`with_function`], with ember-vmm arguments.
fn with_function_args(
    module: &Path,
    mut config: serde_json::Value,
    args: &[&str],
) -> Result<(VmmProcess, ApiClient, serde_json::Value), String> {
    let (vmm, mut client) = boot(1, 128, args)?;
    config["module_path"] = json!(module);
    let loaded = expect_status(
        client.put_json("/ember/function", &config),
        200,
        "PUT /ember/function",
    )?
    .json();
    Ok((vmm, client, loaded))
}

/// Expects a failed invocation of `kind` whose message contains `text`;
/// returns the response.
fn invoke_err(
    client: &mut ApiClient,
    event: &[u8],
    kind: &str,
    text: &str,
) -> Result<ApiResponse, String> {
    let response = expect_status(client.post("/ember/invoke", event), 200, "invoke")?;
    let got = response.header(FUNCTION_ERROR_HEADER).unwrap_or("none");
    let body = response.json();
    if got != kind || body["error"]["kind"] != kind {
        return Err(format!(
            "expected a {kind} error, got {got}: {}",
            String::from_utf8_lossy(&response.body)
        ));
    }
    let message = body["error"]["message"].as_str().unwrap_or("");
    if !message.contains(text) {
        return Err(format!(
            "the {kind} message {message:?} does not say {text:?}"
        ));
    }
    Ok(response)
}

fn log_of(response: &ApiResponse) -> String {
    let encoded = response.header(LOG_HEADER).unwrap_or("");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn echo() -> TestResult {
    let (mut vmm, mut client, loaded) = with_function(&example("echo.wasm")?, json!({}))?;
    check(loaded["model"] == "command", || format!("loaded {loaded}"))?;
    same(
        &invoke_ok(&mut client, b"hello, function")?,
        b"hello, function",
    )?;
    same(&invoke_ok(&mut client, b"")?, b"")?;
    let binary: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    same(&invoke_ok(&mut client, &binary)?, &binary)?;
    shutdown(&mut vmm, &mut client)
}

fn wordcount() -> TestResult {
    let (mut vmm, mut client, _) = with_function(&example("wordcount.wasm")?, json!({}))?;
    same(&invoke_ok(&mut client, b"one two\nthree\n")?, b"2 3 14\n")?;
    same(&invoke_ok(&mut client, b"")?, b"0 0 0\n")?;
    same(
        &invoke_ok(&mut client, b"  spaced   out  words ")?,
        b"0 3 22\n",
    )?;
    shutdown(&mut vmm, &mut client)
}

fn sha256() -> TestResult {
    let (mut vmm, mut client, _) = with_function(&example("sha256.wasm")?, json!({}))?;
    same(
        &invoke_ok(&mut client, b"abc")?,
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n",
    )?;
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let want = format!("{:x}\n", Sha256::digest(&big));
    same(&invoke_ok(&mut client, &big)?, want.as_bytes())?;
    shutdown(&mut vmm, &mut client)
}

fn jsonx() -> TestResult {
    let (mut vmm, mut client, _) = with_function(&example("jsonx.wasm")?, json!({}))?;
    same(
        &invoke_ok(
            &mut client,
            br#"{"name": "ember", "tags": ["a", "b\"c"], "n": -3.5e2, "ok": true, "none": null}"#,
        )?,
        b"{\"name\":\"EMBER\",\"tags\":[\"A\",\"B\\\"C\"],\"n\":-3.5e2,\"ok\":true,\"none\":null,\"fields\":5}\n",
    )?;
    same(&invoke_ok(&mut client, b"[\"x\", {}]")?, b"[\"X\",{}]\n")?;
    shutdown(&mut vmm, &mut client)
}

fn jsonx_invalid() -> TestResult {
    let (mut vmm, mut client, _) = with_function(&example("jsonx.wasm")?, json!({}))?;
    let response = invoke_err(
        &mut client,
        b"{\"unterminated\": ",
        "handler_error",
        "status 1",
    )?;
    let log = log_of(&response);
    check(log.contains("jsonx: invalid JSON"), || {
        format!("log {log:?}")
    })?;
    // The next invocation is served normally.
    same(&invoke_ok(&mut client, b"\"ok\"")?, b"\"OK\"\n")?;
    shutdown(&mut vmm, &mut client)
}

fn counter() -> TestResult {
    let (mut vmm, mut client, loaded) = with_function(&example("counter.wasm")?, json!({}))?;
    check(loaded["model"] == "reactor", || format!("loaded {loaded}"))?;
    for want in ["1\n", "2\n", "3\n"] {
        same(&invoke_ok(&mut client, b"")?, want.as_bytes())?;
    }
    same(&invoke_ok(&mut client, b"10")?, b"13\n")?;
    shutdown(&mut vmm, &mut client)?;

    // _initialize runs once, at load, with the function's environment.
    let (mut vmm, mut client, _) = with_function(
        &example("counter.wasm")?,
        json!({ "env": { "COUNTER_START": "100" } }),
    )?;
    same(&invoke_ok(&mut client, b"")?, b"101\n")?;
    same(&invoke_ok(&mut client, b"")?, b"102\n")?;
    shutdown(&mut vmm, &mut client)
}

fn counter_bad_event() -> TestResult {
    let (mut vmm, mut client, _) = with_function(&example("counter.wasm")?, json!({}))?;
    same(&invoke_ok(&mut client, b"")?, b"1\n")?;
    let response = invoke_err(
        &mut client,
        b"abc",
        "handler_error",
        "ember_handle returned 2",
    )?;
    check(log_of(&response).contains("not a number"), || {
        log_of(&response)
    })?;
    // A handler error is not a failure of the instance: the state stays.
    same(&invoke_ok(&mut client, b"")?, b"2\n")?;
    shutdown(&mut vmm, &mut client)
}

fn datafile() -> TestResult {
    let dir = examples_dir()?;
    let (mut vmm, mut client, _) = with_function(
        &example("datafile.wasm")?,
        json!({ "files": [{ "name": "data.txt", "host_path": dir.join("data.txt") }] }),
    )?;
    same(
        &invoke_ok(&mut client, b"sweet")?,
        b"apple: red, sweet, grows on trees\nbanana: yellow, sweet, grows in bunches\n2 of 5 lines\n",
    )?;
    same(&invoke_ok(&mut client, b"kiwi")?, b"0 of 5 lines\n")?;
    shutdown(&mut vmm, &mut client)
}

/// A command that reports what WASI gives it (written in WAT, so that the
/// test does not depend on a language runtime): argv, environ, the
/// realtime clock, 16 random bytes, and the contents of /var/task/motd.
const WASI_INFO: &str = r#"
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept" (func $sock_accept (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 900) "motd")
  ;; out: write `len` bytes at `ptr` to stdout (iovec at 16)
  (func $out (param $ptr i32) (param $len i32)
    (i32.store (i32.const 16) (local.get $ptr))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))))
  (func (export "_start")
    (local $fd i32)
    ;; argv: sizes at 0/4, pointers at 1000, strings at 2000 (NUL-separated)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1000) (i32.const 2000)))
    (call $out (i32.const 2000) (i32.load (i32.const 4)))
    ;; environ: pointers at 3000, strings at 4000
    (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $environ_get (i32.const 3000) (i32.const 4000)))
    (call $out (i32.const 4000) (i32.load (i32.const 4)))
    ;; realtime (8 bytes), then 16 random bytes, as raw bytes
    (drop (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const 5000)))
    (drop (call $random_get (i32.const 5008) (i32.const 16)))
    (call $out (i32.const 5000) (i32.const 24))
    ;; an unsupported function answers ENOSYS (52), as a byte
    (i32.store8 (i32.const 5100) (call $sock_accept (i32.const 3) (i32.const 0) (i32.const 5104)))
    (call $out (i32.const 5100) (i32.const 1))
    ;; /var/task/motd: open at the preopen (fd 3), read up to 64 bytes
    (drop (call $path_open (i32.const 3) (i32.const 0) (i32.const 900) (i32.const 4)
      (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 6000)))
    (i32.store (i32.const 32) (i32.const 7000))
    (i32.store (i32.const 36) (i32.const 64))
    (drop (call $fd_read (i32.load (i32.const 6000)) (i32.const 32) (i32.const 1) (i32.const 40)))
    (call $out (i32.const 7000) (i32.load (i32.const 40)))
    ;; opening it for writing is not allowed: ENOTCAPABLE (76), as a byte
    (i32.store8 (i32.const 5200) (call $path_open (i32.const 3) (i32.const 0) (i32.const 900) (i32.const 4)
      (i32.const 0) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 6004)))
    (call $out (i32.const 5200) (i32.const 1))))
"#;

/// Boots a VM and loads the module `wat` describes, with `config`.
fn with_wat(
    name: &str,
    wat: &str,
    config: serde_json::Value,
) -> Result<(VmmProcess, ApiClient, serde_json::Value), String> {
    let module = write_wat(&fresh_dir()?, name, wat)?;
    with_function(&module, config)
}

fn write_wat(dir: &Path, name: &str, wat: &str) -> Result<PathBuf, String> {
    let bytes = wat::parse_str(wat).map_err(|e| format!("{name}: {e}"))?;
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    Ok(path)
}

fn wasi_info() -> TestResult {
    let dir = fresh_dir()?;
    let module = write_wat(&dir, "info", WASI_INFO)?;
    std::fs::write(dir.join("motd"), b"welcome to /var/task").map_err(|e| fail(e.to_string()))?;
    let (mut vmm, mut client, _) = with_function(
        &module,
        json!({
            "args": ["--verbose", "x"],
            "env": { "GREETING": "hi", "EMPTY": "" },
            "files": [{ "name": "motd", "host_path": dir.join("motd") }],
        }),
    )?;
    let now = |()| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let before = now(());
    let first = invoke_ok(&mut client, b"")?;
    let after = now(());
    let argv = b"function\0--verbose\0x\0";
    let environ = b"EMPTY=\0GREETING=hi\0";
    check(first.starts_with(argv), || format!("argv in {first:?}"))?;
    let rest = &first[argv.len()..];
    check(rest.starts_with(environ), || format!("environ in {rest:?}"))?;
    let rest = &rest[environ.len()..];
    check(rest.len() == 24 + 1 + 20 + 1, || {
        format!("{} bytes after environ: {rest:?}", rest.len())
    })?;
    let realtime = u64::from_le_bytes(rest[..8].try_into().unwrap());
    // The guest's wall clock agrees with the host's to within 50 ms.
    let slack = 50_000_000;
    check(
        realtime + slack >= before && realtime <= after + slack,
        || format!("guest realtime {realtime}, host between {before} and {after}"),
    )?;
    check(rest[24] == 52, || {
        format!("sock_accept answered errno {}", rest[24])
    })?;
    same(&rest[25..45], b"welcome to /var/task")?;
    check(rest[45] == 76, || {
        format!(
            "opening /var/task/motd for writing answered errno {}",
            rest[45]
        )
    })?;
    // Random bytes differ from one invocation to the next.
    let second = invoke_ok(&mut client, b"")?;
    let random =
        |out: &[u8]| out[argv.len() + environ.len() + 8..argv.len() + environ.len() + 24].to_vec();
    check(random(&first) != random(&second), || {
        "the same random bytes twice".into()
    })?;
    check(random(&first) != vec![0; 16], || {
        "random bytes are all zero".into()
    })?;
    shutdown(&mut vmm, &mut client)
}

/// Arguments a runtime must not trust: far too many poll subscriptions
/// (the runtime would allocate for each), a record that does not fit in
/// memory, an iovec array larger than memory. Each gets an errno (28
/// EINVAL, 21 EFAULT, 21), printed as three bytes.
const HOSTILE_ARGS: &str = r#"
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fdstat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store8 (i32.const 100) (call $poll (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const 0)))
    (i32.store8 (i32.const 101) (call $fdstat (i32.const 1) (i32.const 0xfffffff8)))
    (i32.store8 (i32.const 102) (call $write (i32.const 1) (i32.const 0) (i32.const 0x10000000) (i32.const 16)))
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 3))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))
"#;

fn hostile_arguments() -> TestResult {
    let (mut vmm, mut client, _) = with_wat("hostile", HOSTILE_ARGS, json!({}))?;
    same(&invoke_ok(&mut client, b"")?, &[28, 21, 21])?;
    shutdown(&mut vmm, &mut client)
}

/// A command whose behaviour the event's first byte picks: `u`nreachable,
/// `d`ivision by zero, `o`ut-of-bounds load, `s`pin forever, `h`og memory,
/// `e`xit with status 3, `r`ecurse without end, write a `b`ig result
/// (7 MiB), sleep ten seconds in `poll_oneoff` (`z`); anything else prints
/// "ok".
const FAULTS: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "ok")
  (func (export "_start")
    (local $c i32)
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 64))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
    (local.set $c (i32.load8_u (i32.const 64)))
    (if (i32.eq (local.get $c) (i32.const 117)) (then unreachable))
    (if (i32.eq (local.get $c) (i32.const 100))
      (then (drop (i32.div_s (i32.const 1) (i32.load8_u (i32.const 1000))))))
    (if (i32.eq (local.get $c) (i32.const 111))
      (then (drop (i32.load (i32.const 0x7ffffff0)))))
    (if (i32.eq (local.get $c) (i32.const 115))
      (then (loop $spin (br $spin))))
    (if (i32.eq (local.get $c) (i32.const 122))
      (then
        ;; One relative monotonic-clock subscription of 10 s.
        (i64.store (i32.const 1024) (i64.const 0))
        (i32.store8 (i32.const 1032) (i32.const 0))
        (i32.store (i32.const 1040) (i32.const 1))
        (i64.store (i32.const 1048) (i64.const 10000000000))
        (i64.store (i32.const 1056) (i64.const 0))
        (i32.store16 (i32.const 1064) (i32.const 0))
        (drop (call $poll (i32.const 1024) (i32.const 1100) (i32.const 1) (i32.const 1200)))))
    (if (i32.eq (local.get $c) (i32.const 104))
      (then
        (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        unreachable))
    (if (i32.eq (local.get $c) (i32.const 101)) (then (call $proc_exit (i32.const 3))))
    (if (i32.eq (local.get $c) (i32.const 114)) (then (call $recurse)))
    (if (i32.eq (local.get $c) (i32.const 98))
      (then
        (drop (memory.grow (i32.const 112)))
        (i32.store (i32.const 32) (i32.const 65536))
        (i32.store (i32.const 36) (i32.const 0x700000))
        (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 48)))
        (return)))
    (i32.store (i32.const 32) (i32.const 200))
    (i32.store (i32.const 36) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 48))))
  (func $recurse (call $recurse)))
"#;

/// A VM with [`FAULTS`] loaded with `config`.
fn faults(config: serde_json::Value) -> Result<(VmmProcess, ApiClient, serde_json::Value), String> {
    with_wat("faults", FAULTS, config)
}

/// With no `memory_mib` a function may use all the memory the VM leaves;
/// using all of it, recursing without end or writing too much still gets
/// a named error, and the runtime — with its own reserve — serves on.
fn default_memory_limit() -> TestResult {
    let (mut vmm, mut client, loaded) = faults(json!({}))?;
    let limit = loaded["memory_limit_mib"].as_u64().unwrap_or(0);
    // A 128 MiB VM: 16 MiB of mailbox, the runtime, a 16 MiB reserve.
    check((64..112).contains(&limit), || format!("loaded {loaded}"))?;
    for _ in 0..2 {
        let text = format!("memory limit of {limit} MiB");
        invoke_err(&mut client, b"hog", "out_of_memory", &text)?;
        same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    }
    invoke_err(&mut client, b"recurse", "trap", "stack")?;
    invoke_err(
        &mut client,
        b"big",
        "handler_error",
        "more than 6291456 bytes",
    )?;
    same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    shutdown(&mut vmm, &mut client)
}

fn traps() -> TestResult {
    let (mut vmm, mut client, _) = faults(json!({ "timeout_ms": 3000, "memory_mib": 16 }))?;
    for (event, text) in [
        (&b"unreachable"[..], "unreachable"),
        (b"div", "divide by zero"),
        (b"oob", "out of bounds"),
    ] {
        invoke_err(&mut client, event, "trap", text)?;
        // The next invocation in the same VM works.
        same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    }
    let stats = get_json(&mut client, "/ember/stats")?;
    check(
        stats["errors"]["trap"] == 3 && stats["invocations"] == 6,
        || format!("stats {stats}"),
    )?;
    shutdown(&mut vmm, &mut client)
}

/// A reactor that counts (one digit) and traps on `u`.
const REACTOR_TRAP: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (func (export "_initialize") (global.set $count (i32.const 0)))
  (func (export "ember_handle")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 16))
    (i32.store8 (i32.const 64) (i32.const 0))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
    (if (i32.eq (i32.load8_u (i32.const 64)) (i32.const 117)) (then unreachable))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store8 (i32.const 100) (i32.add (i32.const 48) (global.get $count)))
    (i32.store (i32.const 32) (i32.const 100))
    (i32.store (i32.const 36) (i32.const 1))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 48)))))
"#;

fn reactor_trap() -> TestResult {
    let (mut vmm, mut client, loaded) = with_wat("reactor", REACTOR_TRAP, json!({}))?;
    check(loaded["model"] == "reactor", || format!("loaded {loaded}"))?;
    same(&invoke_ok(&mut client, b"a")?, b"1")?;
    same(&invoke_ok(&mut client, b"a")?, b"2")?;
    invoke_err(&mut client, b"u", "trap", "unreachable")?;
    // The instance was rebuilt (and _initialize run again): a fresh count.
    same(&invoke_ok(&mut client, b"a")?, b"1")?;
    shutdown(&mut vmm, &mut client)
}

/// Time limits: a function waiting in a host call is stopped by the guest,
/// which serves on; one computing without end is stopped by ember-vmm,
/// which ends the VM (exit code 13). Neither before its limit.
fn timeout() -> TestResult {
    let (mut vmm, mut client, _) = faults(json!({ "timeout_ms": 1000, "memory_mib": 16 }))?;
    for (event, text) in [(&b"zzz"[..], "1000 ms"), (b"spin", "limit of 1000 ms")] {
        let started = Instant::now();
        invoke_err(&mut client, event, "timeout", text)?;
        let waited = started.elapsed();
        check(waited >= Duration::from_millis(1000), || {
            format!("timed out after only {waited:?}")
        })?;
        check(waited < Duration::from_millis(2500), || {
            format!("timed out only after {waited:?}")
        })?;
        if event == b"zzz" {
            same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
        }
    }
    expect_exit(&mut vmm, 13, "the VM stopped by the backstop")
}

fn memory_hog() -> TestResult {
    let (mut vmm, mut client, _) = faults(json!({ "timeout_ms": 3000, "memory_mib": 8 }))?;
    invoke_err(
        &mut client,
        b"hog",
        "out_of_memory",
        "memory limit of 8 MiB",
    )?;
    // The runtime stays healthy: the next invocations work, and the hog's
    // memory was given back.
    for _ in 0..3 {
        same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    }
    invoke_err(
        &mut client,
        b"hog",
        "out_of_memory",
        "memory limit of 8 MiB",
    )?;
    same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    shutdown(&mut vmm, &mut client)
}

fn exit_status() -> TestResult {
    let (mut vmm, mut client, _) = faults(json!({ "timeout_ms": 3000, "memory_mib": 16 }))?;
    invoke_err(
        &mut client,
        b"exit",
        "handler_error",
        "exited with status 3",
    )?;
    same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    shutdown(&mut vmm, &mut client)
}

fn load_error(module_bytes: &[u8], text: &str) -> TestResult {
    let dir = fresh_dir()?;
    let module = dir.join("module.wasm");
    std::fs::write(&module, module_bytes).map_err(|e| fail(e.to_string()))?;
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    expect_fault(
        client.put_json(
            "/ember/function",
            &json!({ "module_path": module, "memory_mib": 16 }),
        ),
        text,
        "load",
    )?;
    // The VMM (and the guest) keep serving.
    expect_status(
        client.post("/ember/ping", b""),
        200,
        "ping after a load error",
    )?;
    shutdown(&mut vmm, &mut client)
}

fn not_wasm() -> TestResult {
    load_error(
        b"#!/bin/sh\necho not a module\n",
        "the module is not valid WebAssembly",
    )
}

fn unknown_import() -> TestResult {
    let bytes = wat::parse_str(
        r#"(module (import "env" "magic" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .map_err(|e| fail(e.to_string()))?;
    load_error(&bytes, "imports env.magic")
}

fn no_entry() -> TestResult {
    let bytes = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "main")))"#)
        .map_err(|e| fail(e.to_string()))?;
    load_error(
        &bytes,
        "exports neither _start (a command) nor ember_handle (a reactor)",
    )
}

fn event_limit() -> TestResult {
    let (mut vmm, mut client, _) =
        with_function(&example("echo.wasm")?, json!({ "memory_mib": 64 }))?;
    let limit = ember_abi::function::MAX_EVENT_BYTES;
    let at_limit: Vec<u8> = (0..limit).map(|i| (i % 253) as u8).collect();
    same(&invoke_ok(&mut client, &at_limit)?, &at_limit)?;
    let mut over = at_limit;
    over.push(0);
    expect_fault(
        client.post("/ember/invoke", &over),
        &format!(
            "The event of {} bytes exceeds the limit of {limit} bytes",
            limit + 1
        ),
        "an event one byte over the limit",
    )?;
    same(&invoke_ok(&mut client, b"still fine")?, b"still fine")?;
    shutdown(&mut vmm, &mut client)
}

fn misuse() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    expect_fault(
        client.post("/ember/invoke", b"x"),
        "No function is loaded",
        "invoke before load",
    )?;
    expect_fault(
        client.put_json(
            "/ember/function",
            &json!({ "module_path": "/nonexistent.wasm" }),
        ),
        "Cannot read module_path /nonexistent.wasm",
        "missing module",
    )?;
    let echo = example("echo.wasm")?;
    expect_fault(
        client.put_json(
            "/ember/function",
            &json!({ "module_path": echo, "memory_mib": 4096 }),
        ),
        "does not fit in this VM",
        "memory limit above the guest's heap",
    )?;
    // A load that fails after the module was checked (its `_initialize`
    // traps) has given the code area's spare pages back and taken them
    // again: the next, larger module is written over the whole area.
    let init_traps = write_wat(
        &fresh_dir()?,
        "init-traps",
        r#"(module (memory (export "memory") 1)
             (func (export "_initialize") unreachable)
             (func (export "ember_handle")))"#,
    )?;
    expect_fault(
        client.put_json("/ember/function", &json!({ "module_path": init_traps })),
        "_initialize failed",
        "a module whose _initialize traps",
    )?;
    expect_status(
        client.put_json(
            "/ember/function",
            &json!({ "module_path": echo, "memory_mib": 16 }),
        ),
        200,
        "load",
    )?;
    expect_fault(
        client.put_json(
            "/ember/function",
            &json!({ "module_path": echo, "memory_mib": 16 }),
        ),
        "already loaded",
        "second load",
    )?;
    same(&invoke_ok(&mut client, b"x")?, b"x")?;
    shutdown(&mut vmm, &mut client)
}

fn prepared_instances() -> TestResult {
    let (mut vmm, mut client, _) = with_function(&example("echo.wasm")?, json!({}))?;
    for i in 0..5 {
        same(
            &invoke_ok(&mut client, format!("{i}").as_bytes())?,
            format!("{i}").as_bytes(),
        )?;
    }
    let stats = get_json(&mut client, "/ember/stats")?;
    // One at load, one after each invocation: each invocation found one ready.
    check(
        stats["instances_prepared"] == 6 && stats["invocations"] == 5,
        || format!("stats {stats}"),
    )?;
    shutdown(&mut vmm, &mut client)
}

/// Many invocations written at once: each is delivered the moment the
/// previous is answered — while the guest still prepares its next
/// instance — and every answer comes back whole and in order, whether
/// ember-vmm takes answers from guest memory (`--mailbox-poll-us`) or
/// from the doorbell exits only.
fn pipelined(poll_us: &str) -> TestResult {
    let (mut vmm, mut client, _) = with_function_args(
        &example("echo.wasm")?,
        json!({}),
        &["--mailbox-poll-us", poll_us],
    )?;
    const COUNT: usize = 200;
    let mut raw = Vec::new();
    for i in 0..COUNT {
        let event = format!("event {i} {}", "x".repeat(i));
        raw.extend_from_slice(
            format!(
                "POST /ember/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{event}",
                event.len()
            )
            .as_bytes(),
        );
    }
    let first = client.send_raw(&raw).map_err(|e| e.to_string())?;
    let mut responses = vec![first];
    for _ in 1..COUNT {
        responses.push(client.read_response().map_err(|e| e.to_string())?);
    }
    for (i, response) in responses.iter().enumerate() {
        let want = format!("event {i} {}", "x".repeat(i));
        check(
            response.status == 200
                && response.header(FUNCTION_ERROR_HEADER).is_none()
                && response.body == want.as_bytes(),
            || {
                format!(
                    "invocation {i}: {} {:?}",
                    response.status,
                    String::from_utf8_lossy(&response.body)
                )
            },
        )?;
    }
    let stats = get_json(&mut client, "/ember/stats")?;
    check(
        stats["invocations"] == COUNT && stats["instances_prepared"] == COUNT + 1,
        || format!("stats {stats}"),
    )?;
    let status = get_json(&mut client, "/ember/status")?;
    let counter = |name: &str| {
        status[name]
            .as_u64()
            .ok_or_else(|| format!("no {name} in {status}"))
    };
    let early = counter("answers_from_memory")?;
    let while_preparing = counter("delivered_while_preparing")?;
    check(
        status["protocol_errors"] == 0
            && status["guest"] == "ready"
            // Watching memory takes answers from it; doorbells alone never.
            && (early > 0) == (poll_us != "0")
            // Pipelined: nearly every next request finds the guest preparing.
            && while_preparing >= COUNT as u64 / 2,
        || format!("status {status}"),
    )?;
    shutdown(&mut vmm, &mut client)
}

/// A client that pipelines a large echo (whose response it never reads)
/// and an invocation, then hangs up: the next connection (which the kernel
/// likely gives the same descriptor number) gets its own answers, never
/// the orphaned ones.
fn answer_after_client_left() -> TestResult {
    let (mut vmm, mut client, _) = faults(json!({ "timeout_ms": 1000, "memory_mib": 16 }))?;
    {
        let mut gone = vmm.client();
        let mut raw =
            b"POST /ember/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n".to_vec();
        raw.resize(raw.len() + (1 << 20), b'e');
        // Spins until its 1 s limit, if it ever runs.
        raw.extend_from_slice(
            b"POST /ember/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nspin",
        );
        gone.send_raw_no_wait(&raw).map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut next = vmm.client();
    let status = expect_status(next.get("/ember/status"), 200, "status after")?;
    check(
        status.header(FUNCTION_ERROR_HEADER).is_none() && status.json()["guest"].is_string(),
        || {
            format!(
                "the next client got {:?}",
                String::from_utf8_lossy(&status.body)
            )
        },
    )?;
    same(&invoke_ok(&mut next, b"fine")?, b"ok")?;
    drop(next);
    shutdown(&mut vmm, &mut client)
}

/// The compile cache holds modules compiled for the guest's CPU. An entry
/// compiled for a feature the guest lacks (AVX, which the Ember kernel
/// does not enable) is never run: under its own features' name it is not
/// even looked up; planted under this guest's name (a stale or copied
/// cache) the guest's Wasmtime refuses it, and ember-vmm compiles the
/// module anew and loads that.
fn recompiled_for_the_guest() -> TestResult {
    let dir = fresh_dir()?;
    let cache = dir.join("compiled");
    let cache_arg = cache.to_string_lossy().into_owned();
    let module = write_wat(&dir, "faults", FAULTS)?;
    let wasm = std::fs::read(&module).map_err(|e| fail(e.to_string()))?;
    let args = ["--compile-cache", cache_arg.as_str()];
    let load = || -> Result<(VmmProcess, ApiClient, serde_json::Value), String> {
        with_function_args(&module, json!({ "memory_mib": 16 }), &args)
    };
    let entries = || -> Result<Vec<PathBuf>, String> {
        Ok(std::fs::read_dir(&cache)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect())
    };

    // First load: compiled; second: from the cache.
    let (mut vmm, mut client, loaded) = load()?;
    check(loaded["compiled"] == "compiler", || format!("{loaded}"))?;
    shutdown(&mut vmm, &mut client)?;
    let (mut vmm, mut client, loaded) = load()?;
    check(loaded["compiled"] == "cache", || format!("{loaded}"))?;
    same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    shutdown(&mut vmm, &mut client)?;
    let files = entries()?;
    check(files.len() == 1, || format!("cache entries {files:?}"))?;
    let entry = &files[0];
    let guest = ember_compile::cache_features(&std::fs::read(entry).map_err(|e| e.to_string())?)
        .ok_or("the cache entry has no features line")?;

    // The same module compiled with AVX besides the guest's features.
    let mut names: Vec<String> = guest.names().to_vec();
    names.push("has_avx".into());
    let with_avx = ember_compile::CpuFeatures::from_names(names);
    let avx = ember_compile::Compiler::new(with_avx.clone(), None)
        .and_then(|c| c.compile(&wasm))
        .map_err(|e| e.to_string())?;

    // Honestly labelled: the host sees the entry is not for this guest.
    std::fs::write(entry, ember_compile::encode_cache(&with_avx, &avx.bytes))
        .map_err(|e| e.to_string())?;
    let (mut vmm, mut client, loaded) = load()?;
    check(loaded["compiled"] == "compiler", || format!("{loaded}"))?;
    same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    shutdown(&mut vmm, &mut client)?;

    // Mislabelled as this guest's: the guest refuses it; compiled anew.
    std::fs::write(entry, ember_compile::encode_cache(&guest, &avx.bytes))
        .map_err(|e| e.to_string())?;
    let (mut vmm, mut client, loaded) = load()?;
    check(loaded["compiled"] == "compiler", || format!("{loaded}"))?;
    same(&invoke_ok(&mut client, b"fine")?, b"ok")?;
    check(
        vmm.transcript().contains("refused the cached compilation"),
        || format!("no refusal in the log:\n{}", vmm.transcript()),
    )?;
    shutdown(&mut vmm, &mut client)?;
    // And the cache was repaired.
    let (mut vmm, mut client, loaded) = load()?;
    check(loaded["compiled"] == "cache", || format!("{loaded}"))?;
    shutdown(&mut vmm, &mut client)
}

/// Arms the guest's test mode: it answers the next request with random
/// bytes filling its whole response area, in a message of kind `code`
/// (0: the kind that request expects).
fn arm_maximal_answer(client: &mut ApiClient, code: u32) -> TestResult {
    expect_status(
        client.post("/ember/test/maximal-answer", code.to_string().as_bytes()),
        200,
        "arming a maximal answer",
    )
    .map(drop)
    .map_err(Failed::from)
}

/// The fault message of a refused answer; an error if it was not refused.
fn refused(response: Result<ApiResponse, std::io::Error>, what: &str) -> Result<String, Failed> {
    let response = response.map_err(|e| format!("{what}: {e}"))?;
    check(!(200..300).contains(&response.status), || {
        format!(
            "{what}: a maximal garbage answer was accepted: {}",
            response.status
        )
    })?;
    Ok(response.fault_message().unwrap_or_default().to_string())
}

/// A guest that answers with the most bytes its response area holds, all
/// random: in the kind each request expects (stats, an outcome, a load),
/// and in every message kind there is (and one there is not) as the
/// answer to a ping. Each is refused with an error naming it — or, for an
/// echo, whose reply may be any bytes, returned whole, and for a pong,
/// whose payload is not read, answered — a text the guest
/// wrote is cut to 4 KiB, the VMM serves on after each, and a crash report
/// of garbage ends the VM as a crash whose report is unreadable.
fn hostile_guest_maximal_answers() -> TestResult {
    let (mut vmm, mut client, _) =
        with_function_args(&example("echo.wasm")?, json!({}), &["--test-commands"])?;

    // Each request, answered in its own kind, with garbage.
    arm_maximal_answer(&mut client, 0)?;
    let echoed = expect_status(client.post("/ember/echo", b"x"), 200, "echo")?;
    check(echoed.body.len() >= 1 << 20, || {
        format!(
            "an echo answered with the whole area returned {} bytes",
            echoed.body.len()
        )
    })?;
    arm_maximal_answer(&mut client, 0)?;
    let text = refused(client.get("/ember/stats"), "stats")?;
    check(text.contains("stats are malformed"), || {
        format!("stats: {text}")
    })?;
    arm_maximal_answer(&mut client, 0)?;
    let text = refused(client.post("/ember/invoke", b"event"), "invoke")?;
    check(text.contains("outcome is malformed"), || {
        format!("invoke: {text}")
    })?;
    let fine = expect_status(client.post("/ember/invoke", b"again"), 200, "invoke after")?;
    check(fine.body == b"again", || "the next invocation".to_string())?;

    // Every kind of message (and an unknown one) as the answer to a ping;
    // a plain ping after each is answered.
    for code in (1..=13u32)
        .filter(|&c| c != MessageKind::Crash as u32)
        .chain([0xdead])
    {
        arm_maximal_answer(&mut client, code)?;
        let what = format!("a ping answered with kind {code}");
        if code == MessageKind::Pong as u32 {
            // The kind a ping expects: its payload is never read.
            expect_status(client.post("/ember/ping", b""), 200, &what)?;
            continue;
        }
        let text = refused(client.post("/ember/ping", b""), &what)?;
        check(text.len() < 16 << 10, || {
            format!("{what}: an error of {} bytes reached the API", text.len())
        })?;
        if code == MessageKind::Error as u32 {
            check(text.contains("more bytes cut"), || {
                format!("{what}: {text:.200}")
            })?;
        }
        expect_status(
            client.post("/ember/ping", b""),
            200,
            &format!("ping after {what}"),
        )?;
    }
    let status = get_json(&mut client, "/ember/status")?;
    check(status["protocol_errors"].as_u64() >= Some(11), || {
        format!("status {status}")
    })?;
    let fine = expect_status(
        client.post("/ember/invoke", b"still"),
        200,
        "invoke at the end",
    )?;
    check(fine.body == b"still", || "the last invocation".to_string())?;

    // A crash report of garbage: the guest has stopped; the VM ends as a crash.
    arm_maximal_answer(&mut client, MessageKind::Crash as u32)?;
    let text = refused(client.post("/ember/ping", b""), "a garbage crash report")?;
    check(text.contains("unreadable"), || format!("crash: {text}"))?;
    expect_exit(&mut vmm, 10, "a guest whose crash report is garbage")
}
