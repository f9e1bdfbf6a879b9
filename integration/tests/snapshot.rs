//! Snapshots end to end: real guests paused, written to files, and restored
//! into fresh ember-vmm processes (prepared with `--prepare` or not). Without
//! /dev/kvm every test is reported as ignored, never passed.

use std::path::{Path, PathBuf};

use ember_integration::*;
use ember_vmm::api::client::ApiClient;
use ember_vmm::api::parsed_request::FUNCTION_ERROR_HEADER;
use serde_json::json;

fn main() {
    let tests: Vec<Test> = vec![
        ("counter_state_continues_after_restore", counter_continues),
        (
            "diff_after_a_module_load_restores_byte_identical_to_a_full",
            diff_equals_full,
        ),
        (
            "snapshot_taken_in_the_doorbell_exit_resumes_and_answers",
            doorbell_snapshot,
        ),
        (
            "twenty_restores_get_different_random_bytes_and_the_right_time",
            twenty_restores,
        ),
        (
            "corrupt_and_mismatched_snapshots_fail_each_with_its_own_error",
            corrupt_snapshots,
        ),
        (
            "snapshot_with_an_invocation_in_flight_waits_for_it",
            in_flight,
        ),
        ("working_set_is_recorded_then_prefetched", working_set),
        (
            "a_restore_asked_to_touch_has_the_guest_touch_its_working_set_first",
            touch,
        ),
        (
            "hot_regions_are_copied_into_huge_pages_and_keep_the_vm_intact",
            hot_regions,
        ),
        (
            "a_large_module_is_stored_in_whole_regions_and_restores_byte_identical",
            whole_regions,
        ),
        ("diff_needs_tracking_and_a_parent", diff_refusals),
        (
            "diff_chains_restore_and_a_moved_parent_is_named",
            diff_chains,
        ),
        (
            "pause_while_the_guest_prepares_waits_for_idle",
            pause_while_preparing,
        ),
        (
            "rewriting_a_memory_file_leaves_vms_restored_from_it_intact",
            rewrite_in_use,
        ),
        (
            "a_restore_failing_after_memory_was_mapped_answers_500_and_exits",
            late_failure,
        ),
    ];
    run_kvm_tests(tests);
}

/// Guest memory of every VM here, MiB.
const MEM_MIB: usize = 128;

/// Boots a 1-vCPU VM (logging dirty pages when `track`).
fn boot_vm(track: bool) -> Result<(VmmProcess, ApiClient), String> {
    let mut machine = machine_config(1, MEM_MIB);
    machine["track_dirty_pages"] = json!(track);
    boot_machine(
        machine,
        Launch {
            api: true,
            ..Launch::default()
        },
    )
}

fn load(client: &mut ApiClient, module: &Path) -> TestResult {
    expect_status(
        client.put_json("/ember/function", &json!({ "module_path": module })),
        200,
        "PUT /ember/function",
    )?;
    Ok(())
}

/// A snapshot's two files.
#[derive(Clone)]
struct Files {
    state: PathBuf,
    mem: PathBuf,
}

/// Pauses (if running), snapshots into `dir`/`name`.*; returns the files and
/// the response.
fn snapshot(
    client: &mut ApiClient,
    kind: &str,
    dir: &Path,
    name: &str,
) -> Result<(Files, serde_json::Value), String> {
    expect_status(set_vm_state(client, "Paused"), 204, "pause")?;
    let files = Files {
        state: dir.join(format!("{name}.state")),
        mem: dir.join(format!("{name}.mem")),
    };
    let created = expect_status(
        client.put_json(
            "/snapshot/create",
            &json!({
                "snapshot_type": kind,
                "snapshot_path": files.state,
                "mem_file_path": files.mem,
            }),
        ),
        200,
        &format!("{kind} snapshot {name}"),
    )?
    .json();
    Ok((files, created))
}

fn load_body(files: &Files, resume: bool) -> serde_json::Value {
    json!({
        "snapshot_path": files.state,
        "mem_backend": { "backend_type": "File", "backend_path": files.mem },
        "resume_vm": resume,
    })
}

/// A fresh ember-vmm, prepared (`--prepare`) or not.
fn fresh_vmm(prepared: bool) -> Result<(VmmProcess, ApiClient), String> {
    let extra_args = if prepared {
        ["--prepare", "--mem-size-mib", "128", "--vcpus", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        Vec::new()
    };
    let vmm = VmmProcess::start(Launch {
        api: true,
        extra_args,
        ..Launch::default()
    })?;
    let client = vmm.client();
    Ok((vmm, client))
}

/// Restores `files` into a fresh process; returns it and the load response.
fn restore(
    files: &Files,
    prepared: bool,
    resume: bool,
) -> Result<(VmmProcess, ApiClient, serde_json::Value), String> {
    restore_body(prepared, &load_body(files, resume))
}

/// As [`restore`], resumed, with `fields` added to the load request.
fn restore_with(
    files: &Files,
    prepared: bool,
    fields: serde_json::Value,
) -> Result<(VmmProcess, ApiClient, serde_json::Value), String> {
    let mut body = load_body(files, true);
    if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
        body.extend(fields.clone());
    }
    restore_body(prepared, &body)
}

/// Sends load request `body` to a fresh process; returns it and the answer.
fn restore_body(
    prepared: bool,
    body: &serde_json::Value,
) -> Result<(VmmProcess, ApiClient, serde_json::Value), String> {
    let (vmm, mut client) = fresh_vmm(prepared)?;
    let loaded = expect_status(
        client.put_json("/snapshot/load", body),
        200,
        "PUT /snapshot/load",
    )
    .map_err(|e| format!("{e}\n{}", vmm.transcript()))?
    .json();
    Ok((vmm, client, loaded))
}

/// Boot → counter → 1, 2, 3 → snapshot → restored copies (one prepared,
/// one not) both go on with 4; each copy has its own state after that.
fn counter_continues() -> TestResult {
    let dir = fresh_dir()?;
    let (mut vmm, mut client) = boot_vm(false)?;
    load(&mut client, &example("counter.wasm")?)?;
    for want in ["1\n", "2\n", "3\n"] {
        same(&invoke_ok(&mut client, b"")?, want.as_bytes())?;
    }
    let (files, _) = snapshot(&mut client, "Full", &dir, "counter")?;
    // The original goes on from where it was.
    expect_status(set_vm_state(&mut client, "Resumed"), 204, "resume")?;
    same(&invoke_ok(&mut client, b"")?, b"4\n")?;
    same(&invoke_ok(&mut client, b"")?, b"5\n")?;
    shutdown(&mut vmm, &mut client)?;

    let (_a, mut a, loaded) = restore(&files, true, true)?;
    check(
        loaded["prepared"] == true && loaded["generation"] == 1,
        || format!("load answered {loaded}"),
    )?;
    let (_b, mut b, loaded) = restore(&files, false, true)?;
    check(loaded["prepared"] == false, || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut a, b"")?, b"4\n")?;
    same(&invoke_ok(&mut b, b"")?, b"4\n")?;
    same(&invoke_ok(&mut a, b"10")?, b"14\n")?;
    same(&invoke_ok(&mut b, b"")?, b"5\n")?;
    let status = get_json(&mut a, "/ember/status")?;
    check(
        status["generation"] == 1 && status["guest"] == "ready",
        || format!("status {status}"),
    )?;
    Ok(())
}

/// Base Full → module load → Diff and Full at the same point. Each is
/// restored paused and written out again as a Full: both hold exactly the
/// guest memory of the Full taken at that point. The Diff's restore then
/// runs the function.
fn diff_equals_full() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(true)?;
    let (_base, _) = snapshot(&mut client, "Full", &dir, "base")?;
    expect_status(set_vm_state(&mut client, "Resumed"), 204, "resume")?;
    load(&mut client, &example("wordcount.wasm")?)?;
    // A Diff that cannot be written loses nothing: the next one still
    // holds every page written since the base (checked below).
    expect_status(set_vm_state(&mut client, "Paused"), 204, "pause")?;
    expect_fault(
        client.put_json(
            "/snapshot/create",
            &json!({
                "snapshot_type": "Diff",
                "snapshot_path": dir.join("missing/diff.state"),
                "mem_file_path": dir.join("missing/diff.mem"),
            }),
        ),
        "missing/diff.mem",
        "Diff into a missing directory",
    )?;
    let (diff, created) = snapshot(&mut client, "Diff", &dir, "diff")?;
    check(
        created["layers"] == 2 && created["memory_runs"].as_u64().unwrap_or(0) >= 1,
        || format!("Diff answered {created}"),
    )?;
    let diff_bytes = std::fs::metadata(&diff.mem)
        .map_err(|e| fail(e.to_string()))?
        .len();
    let (full, _) = snapshot(&mut client, "Full", &dir, "full")?;
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&full.mem)
            .map_err(|e| fail(e.to_string()))?
            .blocks()
            * 512
    };
    check(allocated < 16 << 20, || {
        format!("the Full memory file takes {allocated} bytes on disk: not sparse")
    })?;
    check(diff_bytes < (MEM_MIB as u64) << 20, || {
        format!("the Diff layer is {diff_bytes} bytes, as big as memory")
    })?;

    for (name, files) in [("diff", &diff), ("full", &full)] {
        let (_vmm, mut client, _) = restore(files, true, false)?;
        let (again, _) = snapshot(&mut client, "Full", &dir, &format!("{name}-again"))?;
        let differing = pages_differing(&again.mem, &full.mem)?;
        check(differing == 0, || {
            format!("memory restored from the {name} snapshot differs in {differing} pages")
        })?;
    }
    let (_vmm, mut client, loaded) = restore(&diff, false, true)?;
    check(loaded["memory_runs"].as_u64().unwrap_or(0) >= 2, || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut client, b"one two three")?, b"0 3 13\n")?;
    Ok(())
}

/// Guest pages in which two Full memory files differ (their trailers left
/// out).
fn pages_differing(a: &Path, b: &Path) -> Result<usize, String> {
    let mem_len = MEM_MIB << 20;
    let read_mem = |path: &Path| -> Result<Vec<u8>, String> {
        let mut bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        bytes.truncate(mem_len);
        Ok(bytes)
    };
    let (a, b) = (read_mem(a)?, read_mem(b)?);
    Ok(a.chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count())
}

/// A module whose compiled code fills 2 MiB regions (template: 4.2 MB):
/// the Diff stores those regions whole (docs/snapshot-format.md), the
/// restore maps them as such, and memory and answers are the same as the
/// original VM's.
fn whole_regions() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(true)?;
    snapshot(&mut client, "Full", &dir, "base")?;
    expect_status(set_vm_state(&mut client, "Resumed"), 204, "resume")?;
    load(&mut client, &example("template.wasm")?)?;
    let event = br#"{"title": "T", "products": [{"name": "a <b>", "price": 1.5, "stock": true, "tags": ["x"]}]}"#;
    let want = invoke_ok(&mut client, event)?;
    check(
        String::from_utf8_lossy(&want).contains("<h1>T</h1>"),
        || format!("template rendered {}", String::from_utf8_lossy(&want)),
    )?;
    let (diff, created) = snapshot(&mut client, "Diff", &dir, "diff")?;
    check(
        created["memory_pages"].as_u64().unwrap_or(0) >= 1024,
        || format!("the Diff holds fewer pages than two whole regions: {created}"),
    )?;
    let (full, _) = snapshot(&mut client, "Full", &dir, "full")?;
    let (_restored, mut restored, loaded) = restore(&diff, true, false)?;
    if Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        check(loaded["whole_region_pages"] == 1024, || {
            format!("two whole 2 MiB regions of code should be mapped: load answered {loaded}")
        })?;
    }
    let (again, _) = snapshot(&mut restored, "Full", &dir, "again")?;
    let differing = pages_differing(&again.mem, &full.mem)?;
    check(differing == 0, || {
        format!("memory restored with whole regions differs in {differing} pages")
    })?;
    let (_vmm, mut client, _) = restore(&diff, false, true)?;
    same(&invoke_ok(&mut client, event)?, &want)?;
    Ok(())
}

/// An idle guest waits inside its doorbell exit; a snapshot taken there
/// (the pending `out` completed first) resumes and answers requests, over
/// and over.
fn doorbell_snapshot() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(false)?;
    echo_ok(&mut client, b"before", "echo before the snapshot")?;
    let (files, _) = snapshot(&mut client, "Full", &dir, "idle")?;
    let (vmm, mut client, _) = restore(&files, true, true)?;
    for i in 0..50 {
        echo_ok(
            &mut client,
            format!("after {i}").as_bytes(),
            "echo after restore",
        )?;
    }
    let status = get_json(&mut client, "/ember/status")?;
    check(status["protocol_errors"] == 0, || {
        format!("status {status}\n{}", vmm.transcript())
    })?;
    // Paused, then resumed, a restored VM answers too.
    expect_status(set_vm_state(&mut client, "Paused"), 204, "pause")?;
    expect_status(set_vm_state(&mut client, "Resumed"), 204, "resume")?;
    echo_ok(&mut client, b"again", "echo after pause and resume")
}

/// Writes the wall clock (8 bytes) and 16 random bytes.
const RANDOM_CLOCK: &str = r#"
(module
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get"
    (func $random (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $clock (i32.const 0) (i64.const 1000) (i32.const 0)))
    (drop (call $random (i32.const 8) (i32.const 16)))
    (i32.store (i32.const 64) (i32.const 0))
    (i32.store (i32.const 68) (i32.const 24))
    (drop (call $write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 72)))))
"#;

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// 20 restores of one snapshot: each copy's random bytes are its own, and
/// its wall clock is the host's to within 50 ms.
fn twenty_restores() -> TestResult {
    let dir = fresh_dir()?;
    let module = dir.join("random_clock.wasm");
    let wasm = wat::parse_str(RANDOM_CLOCK).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&module, wasm).map_err(|e| fail(e.to_string()))?;
    let (_vmm, mut client) = boot_vm(false)?;
    load(&mut client, &module)?;
    invoke_ok(&mut client, b"")?;
    let (files, _) = snapshot(&mut client, "Full", &dir, "random")?;
    // Long enough that a clock running on from the snapshot is caught.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        // Every third copy is restored paused and resumed after: the guest
        // hears of the restore when it first runs.
        let paused = i % 3 == 2;
        let (_copy, mut copy, _) = restore(&files, i % 2 == 0, !paused)?;
        if paused {
            expect_status(set_vm_state(&mut copy, "Resumed"), 204, "resume")?;
        }
        let before = unix_ns();
        let out = invoke_ok(&mut copy, b"")?;
        let after = unix_ns();
        check(out.len() == 24, || format!("copy {i} wrote {out:?}"))?;
        let realtime = u64::from_le_bytes(out[..8].try_into().unwrap());
        let slack = 50_000_000;
        check(
            realtime + slack >= before && realtime <= after + slack,
            || format!("copy {i}: guest realtime {realtime}, host between {before} and {after}"),
        )?;
        check(seen.insert(out[8..].to_vec()), || {
            format!("copy {i} returned random bytes another copy returned")
        })?;
    }
    Ok(())
}

/// Truncated, bit-flipped, wrong-version, wrong-size and escaping (a layer
/// named by a path out of the state's directory) snapshots, and a snapshot of
/// another shape than the process was prepared for: each is
/// refused with its own error, and the same process then restores the
/// good snapshot.
fn corrupt_snapshots() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(false)?;
    let (good, _) = snapshot(&mut client, "Full", &dir, "good")?;
    let state = std::fs::read(&good.state).map_err(|e| fail(e.to_string()))?;
    let variant = |name: &str, bytes: &[u8]| -> Result<Files, String> {
        let path = dir.join(format!("{name}.state"));
        std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
        Ok(Files {
            state: path,
            mem: good.mem.clone(),
        })
    };
    let truncated = variant("truncated", &state[..state.len() / 2])?;
    let mut flipped_bytes = state.clone();
    flipped_bytes[state.len() / 2] ^= 0x04;
    let flipped = variant("flipped", &flipped_bytes)?;
    let mut version_bytes = state.clone();
    version_bytes[8] = version_bytes[8].wrapping_add(1);
    let wrong_version = variant("version", &version_bytes)?;
    let not_a_snapshot = variant("garbage", b"this is not a snapshot state file at all")?;
    // Well-formed containers (checksums right) whose memory layer names a
    // path out of the state's directory: refused before any file opens.
    let mut escaping = Vec::new();
    for (i, name) in ["../0/good.mem", "/etc/passwd"].into_iter().enumerate() {
        let mut hostile =
            ember_vmm::persist::MicrovmState::read(&good.state).map_err(|e| fail(e.to_string()))?;
        hostile.memory[0].path = PathBuf::from(name);
        let bytes = hostile.encode().map_err(|e| fail(e.to_string()))?;
        escaping.push(variant(&format!("escaping{i}"), &bytes)?);
    }
    let short_mem = dir.join("short.mem");
    std::fs::copy(&good.mem, &short_mem).map_err(|e| fail(e.to_string()))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&short_mem)
        .map_err(|e| fail(e.to_string()))?;
    file.set_len(64 << 20).map_err(|e| fail(e.to_string()))?;
    let wrong_size = Files {
        state: good.state.clone(),
        mem: short_mem,
    };

    let (vmm, mut client) = fresh_vmm(true)?;
    for (files, text) in [
        (&truncated, "declares a payload"),
        (&flipped, "checksum"),
        (&wrong_version, "format version 3.0"),
        (&not_a_snapshot, "not an Ember snapshot state file"),
        (&wrong_size, "the snapshot expects"),
        (&escaping[0], "never a path out of it"),
        (&escaping[1], "never a path out of it"),
    ] {
        expect_fault(
            client.put_json("/snapshot/load", &load_body(files, true)),
            text,
            &format!("load of {}", files.state.display()),
        )
        .map_err(|e| format!("{e}\n{}", vmm.transcript()))?;
    }
    // Still usable: the good snapshot loads into the same process.
    expect_status(
        client.put_json("/snapshot/load", &load_body(&good, true)),
        200,
        "load of the good snapshot after the refusals",
    )?;
    echo_ok(&mut client, b"fine", "echo after restore")?;
    // A restored process takes no second snapshot.
    expect_fault(
        client.put_json("/snapshot/load", &load_body(&good, true)),
        "fresh process",
        "second load",
    )?;

    // A process that was not prepared builds the VM for the snapshot, and
    // after a refused memory file it still takes the right one.
    let (vmm, mut client) = fresh_vmm(false)?;
    expect_fault(
        client.put_json("/snapshot/load", &load_body(&wrong_size, true)),
        "the snapshot expects",
        "load of a short memory file into a fresh process",
    )
    .map_err(|e| format!("{e}\n{}", vmm.transcript()))?;
    expect_status(
        client.put_json("/snapshot/load", &load_body(&good, true)),
        200,
        "load of the good snapshot into the same fresh process",
    )?;
    echo_ok(&mut client, b"fine", "echo after restore")?;

    // A process prepared for another shape says so.
    let other = VmmProcess::start(Launch {
        api: true,
        extra_args: ["--prepare", "--mem-size-mib", "256", "--vcpus", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Launch::default()
    })?;
    let mut other_client = other.client();
    expect_fault(
        other_client.put_json("/snapshot/load", &load_body(&good, true)),
        "prepared for 1 vCPU(s) and 256 MiB",
        "load into a process prepared for 256 MiB",
    )?;
    Ok(())
}

/// A snapshot asked for while an invocation runs waits for it (requests
/// are served in order): the invocation's answer is whole, and the
/// snapshot restores to a VM that serves.
fn in_flight() -> TestResult {
    let dir = fresh_dir()?;
    let (vmm, mut client) = boot_vm(false)?;
    let module = dir.join("busy.wasm");
    std::fs::write(
        &module,
        wat::parse_str(BUSY).map_err(|e| fail(e.to_string()))?,
    )
    .map_err(|e| fail(e.to_string()))?;
    load(&mut client, &module)?;
    // Not paused: refused, with what to do.
    expect_fault(
        client.put_json(
            "/snapshot/create",
            &json!({ "snapshot_path": dir.join("x.state"), "mem_file_path": dir.join("x.mem") }),
        ),
        "not paused",
        "snapshot of a running VM",
    )?;
    let mut runner = vmm.client();
    let worker = std::thread::spawn(move || invoke_ok(&mut runner, b"busy"));
    // Give the invocation time to be delivered (it computes for ~0.5 s).
    std::thread::sleep(std::time::Duration::from_millis(50));
    check(!worker.is_finished(), || {
        "the invocation ended before the pause: nothing was in flight".into()
    })?;
    let (files, _) = snapshot(&mut client, "Full", &dir, "inflight")?;
    // The pause waited for the answer (requests are served one at a time):
    // the VMM had counted it before it paused. Had the pause gone first,
    // the invocation would have been refused (the VM paused).
    let status = get_json(&mut client, "/ember/status")?;
    check(status["requests"] == 2, || {
        format!("answers counted when paused: {status}")
    })?;
    let result = worker
        .join()
        .map_err(|_| fail("the invoking thread panicked"))??;
    same(&result, b"done")?;
    let (_copy, mut copy, _) = restore(&files, true, true)?;
    same(&invoke_ok(&mut copy, b"quick")?, b"ok")
}

/// A command that computes for about half a second when the event starts
/// with `b` (a billion additions), then prints "done"; otherwise "ok".
const BUSY: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "done")
  (data (i32.const 104) "ok")
  (func (export "_start")
    (local $i i64)
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 1))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
    (i32.store (i32.const 0) (i32.const 104))
    (i32.store (i32.const 4) (i32.const 2))
    (if (i32.eq (i32.load8_u (i32.const 64)) (i32.const 98))
      (then
        (loop $l
          (local.set $i (i64.add (local.get $i) (i64.const 1)))
          (br_if $l (i64.lt_u (local.get $i) (i64.const 1000000000))))
        (i32.store (i32.const 0) (i32.const 100))
        (i32.store (i32.const 4) (i32.const 4))))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#;

/// The first restore records the pages the first invocation touched
/// beside the snapshot; later restores populate them and still answer.
fn working_set() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(false)?;
    load(&mut client, &example("echo.wasm")?)?;
    let (files, _) = snapshot(&mut client, "Full", &dir, "ws")?;
    let ws = PathBuf::from(format!("{}.ws", files.state.display()));

    let (vmm, mut first, loaded) = restore(&files, true, true)?;
    check(loaded["working_set"] == "recording", || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut first, b"hello")?, b"hello")?;
    // Recorded after the answer went out: wait for the log line.
    check(vmm.log.wait_for("working set recorded", PATIENCE), || {
        format!("no working set recorded\n{}", vmm.transcript())
    })?;
    check(ws.is_file(), || format!("{} was not written", ws.display()))?;

    // Populated by the helper thread while the load is answered...
    let (vmm, mut second, loaded) = restore(&files, true, true)?;
    check(
        loaded["working_set"] == "prefetching"
            && loaded["prefetched_read_pages"].as_u64().unwrap_or(0) > 0
            && loaded["prefetched_write_pages"].as_u64().unwrap_or(0) > 0,
        || format!("load answered {loaded}"),
    )?;
    same(&invoke_ok(&mut second, b"again")?, b"again")?;
    check(vmm.log.wait_for("working set populated", PATIENCE), || {
        format!("the helper thread did not populate\n{}", vmm.transcript())
    })?;
    // ... or before it, when asked: then the read set is mapped shared
    // with the file and only the write set was copied.
    let (sync_vmm, mut sync, loaded) =
        restore_with(&files, false, json!({ "ember_prefetch_sync": true }))?;
    check(loaded["working_set"] == "prefetched", || {
        format!("load answered {loaded}")
    })?;
    let read = loaded["prefetched_read_pages"].as_u64().unwrap_or(0);
    let written = loaded["prefetched_write_pages"].as_u64().unwrap_or(0);
    let (rss_kib, copied_kib) = guest_memory_kib(sync_vmm.pid(), &files.mem)?;
    check(rss_kib >= (read + written) * 4, || {
        format!("{rss_kib} KiB of guest memory mapped after populating {read} + {written} pages")
    })?;
    // The restore block and nothing else beyond the write set.
    check(copied_kib <= (written + 4) * 4, || {
        format!("{copied_kib} KiB of guest memory copied, for a write set of {written} pages")
    })?;
    same(&invoke_ok(&mut sync, b"sync")?, b"sync")?;

    // Turned off, it neither populates nor records.
    let (_vmm, mut third, loaded) = restore_with(&files, true, json!({ "ember_prefetch": false }))?;
    check(loaded["working_set"] == "off", || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut third, b"x")?, b"x")
}

/// `ember_touch`: once the load is answered the guest touches the
/// recorded working set (the write set for writing unless the VM logs
/// dirty pages), and a request sent meanwhile waits for it and is
/// answered; with no working set there is nothing to touch.
fn touch() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(false)?;
    load(&mut client, &example("echo.wasm")?)?;
    let (files, _) = snapshot(&mut client, "Full", &dir, "touch")?;
    let touching_load = |track: bool| {
        restore_with(
            &files,
            true,
            json!({ "ember_touch": true, "track_dirty_pages": track }),
        )
    };

    // No working set yet: nothing to touch; this restore records one.
    let (vmm, mut first, loaded) = touching_load(false)?;
    check(loaded["touch_pages"] == 0, || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut first, b"one")?, b"one")?;
    check(vmm.log.wait_for("working set recorded", PATIENCE), || {
        format!("no working set recorded\n{}", vmm.transcript())
    })?;
    let status = expect_status(first.get("/ember/status"), 200, "status")?.json();
    check(status["touch"].is_null(), || format!("status {status}"))?;

    for track in [false, true] {
        let (vmm, mut client, loaded) = touching_load(track)?;
        let asked = loaded["touch_pages"].as_u64().unwrap_or(0);
        let (read, written) = (
            loaded["prefetched_read_pages"].as_u64().unwrap_or(0),
            loaded["prefetched_write_pages"].as_u64().unwrap_or(0),
        );
        check(asked > 0 && asked == read + written, || {
            format!("load answered {loaded}")
        })?;
        // Sent at once: it waits for the touch, then is served.
        let answer = invoke_ok(&mut client, b"two")?;
        check(answer == b"two", || {
            format!("answered {answer:?}\n{}", vmm.transcript())
        })?;
        let status = expect_status(client.get("/ember/status"), 200, "status")?.json();
        let touch = &status["touch"];
        let (touched_read, touched_written) = (
            touch["read_pages"].as_u64().unwrap_or(0),
            touch["written_pages"].as_u64().unwrap_or(0),
        );
        // Page 0 is never touched; the rest of the list is.
        check(
            touched_read + touched_written + 1 >= asked && touched_read + touched_written <= asked,
            || format!("asked to touch {asked} pages, status {status}"),
        )?;
        let want_written = if track { 0 } else { written };
        check(touched_written == want_written, || {
            format!("{touched_written} pages touched for writing, want {want_written} (tracking {track}); status {status}")
        })?;
        check(status["protocol_errors"] == 0, || {
            format!("status {status}")
        })?;
    }
    Ok(())
}

/// `ember_hot_region_pages`: with a recorded working set, the regions in
/// which the first invocation touched that many pages are copied into anonymous huge pages
/// before the guest runs (prepared or not); the VM answers as before, a
/// Full snapshot of it restores with the same state, and a VM that logs
/// dirty pages gets none.
fn hot_regions() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(false)?;
    load(&mut client, &example("counter.wasm")?)?;
    same(&invoke_ok(&mut client, b"")?, b"1\n")?;
    let (files, _) = snapshot(&mut client, "Full", &dir, "hot")?;
    let hot_load = |prepared: bool, track: bool| {
        restore_with(
            &files,
            prepared,
            json!({ "ember_hot_region_pages": 64, "track_dirty_pages": track }),
        )
    };

    // No working set yet: nothing to copy; this restore records one.
    let (vmm, mut first, loaded) = hot_load(true, false)?;
    check(loaded["hot_regions"] == 0, || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut first, b"")?, b"2\n")?;
    check(vmm.log.wait_for("working set recorded", PATIENCE), || {
        format!("no working set recorded\n{}", vmm.transcript())
    })?;

    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"));
    for prepared in [true, false] {
        let (vmm, mut client, loaded) = hot_load(prepared, false)?;
        let hot = loaded["hot_regions"].as_u64().unwrap_or(0);
        check(hot > 0, || format!("load answered {loaded}"))?;
        for want in [b"2\n", b"3\n", b"4\n"] {
            same(&invoke_ok(&mut client, b"")?, want)?;
        }
        if thp {
            let huge = anon_huge_kib(vmm.pid())?;
            check(huge >= 2048, || {
                format!("{huge} KiB in anonymous huge pages after {hot} hot regions")
            })?;
        }
        // The copies are guest memory like any other: a Full snapshot of
        // this VM restores with its state (the counter at 4).
        if prepared {
            let (again, _) = snapshot(&mut client, "Full", &dir, "hot-again")?;
            let (_vmm, mut restored, _) = restore_with(&again, false, json!({}))?;
            same(&invoke_ok(&mut restored, b"")?, b"5\n")?;
        }
    }
    // No region has more pages than a region holds.
    let (_vmm, mut none, loaded) =
        restore_with(&files, true, json!({ "ember_hot_region_pages": 513 }))?;
    check(loaded["hot_regions"] == 0, || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut none, b"")?, b"2\n")?;
    // A VM that logs dirty pages keeps every page mapped from the files
    // (its next Diff is made from the log).
    let (_vmm, mut tracked, loaded) = hot_load(true, true)?;
    check(loaded["hot_regions"] == 0, || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut tracked, b"")?, b"2\n")
}

/// KiB of a process's memory in anonymous transparent huge pages.
fn anon_huge_kib(pid: u32) -> Result<u64, String> {
    let rollup =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).map_err(|e| e.to_string())?;
    Ok(rollup
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0))
}

/// Resident and copied (written, so private) KiB of a VMM's mappings of
/// `mem_file`, from its smaps.
fn guest_memory_kib(pid: u32, mem_file: &Path) -> Result<(u64, u64), String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| e.to_string())?;
    let name = mem_file.display().to_string();
    let (mut rss, mut anon, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            inside = fields.nth(4) == Some(name.as_str());
            continue;
        }
        let value: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" if inside => rss += value,
            "Anonymous:" if inside => anon += value,
            _ => {}
        }
    }
    Ok((rss, anon))
}

/// A Diff needs dirty-page tracking and a parent snapshot; each refusal
/// says which.
fn diff_refusals() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(false)?;
    expect_status(set_vm_state(&mut client, "Paused"), 204, "pause")?;
    expect_fault(
        client.put_json(
            "/snapshot/create",
            &json!({ "snapshot_type": "Diff", "snapshot_path": dir.join("a.state"), "mem_file_path": dir.join("a.mem") }),
        ),
        "dirty-page tracking",
        "Diff without tracking",
    )?;
    let (_vmm, mut client) = boot_vm(true)?;
    expect_status(set_vm_state(&mut client, "Paused"), 204, "pause")?;
    expect_fault(
        client.put_json(
            "/snapshot/create",
            &json!({ "snapshot_type": "Diff", "snapshot_path": dir.join("b.state"), "mem_file_path": dir.join("b.mem") }),
        ),
        "needs a parent",
        "Diff without a parent",
    )?;
    Ok(())
}

/// Full → Diff → Diff (of a VM restored with tracking) restores with all
/// three layers; the newest layer may move (the load names it), a parent
/// may not, and a Diff may not be written over its own parent.
fn diff_chains() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(true)?;
    let (_base, _) = snapshot(&mut client, "Full", &dir, "base")?;
    expect_status(set_vm_state(&mut client, "Resumed"), 204, "resume")?;
    load(&mut client, &example("counter.wasm")?)?;
    same(&invoke_ok(&mut client, b"")?, b"1\n")?;
    let (first, _) = snapshot(&mut client, "Diff", &dir, "first")?;

    // Restored with tracking, it takes a Diff over its own chain.
    let (_a, mut a) = fresh_vmm(false)?;
    let mut body = load_body(&first, true);
    body["track_dirty_pages"] = json!(true);
    expect_status(
        a.put_json("/snapshot/load", &body),
        200,
        "load with tracking",
    )?;
    same(&invoke_ok(&mut a, b"")?, b"2\n")?;
    expect_status(set_vm_state(&mut a, "Paused"), 204, "pause")?;
    expect_fault(
        a.put_json(
            "/snapshot/create",
            &json!({ "snapshot_type": "Diff", "snapshot_path": dir.join("x.state"), "mem_file_path": first.mem }),
        ),
        "is a parent of this Diff",
        "Diff over its own parent's file",
    )?;
    let (second, created) = snapshot(&mut a, "Diff", &dir, "second")?;
    check(created["layers"] == 3, || {
        format!("Diff answered {created}")
    })?;

    // A process prepared with --track-dirty-pages logs them even when the
    // load does not ask.
    let tracked = VmmProcess::start(Launch {
        api: true,
        extra_args: [
            "--prepare",
            "--mem-size-mib",
            "128",
            "--vcpus",
            "1",
            "--track-dirty-pages",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..Launch::default()
    })?;
    let mut t = tracked.client();
    expect_status(
        t.put_json("/snapshot/load", &load_body(&first, true)),
        200,
        "load into a process prepared with tracking",
    )?;
    same(&invoke_ok(&mut t, b"")?, b"2\n")?;
    let (_, created) = snapshot(&mut t, "Diff", &dir, "tracked")?;
    check(created["layers"] == 3, || {
        format!("Diff answered {created}")
    })?;

    // The newest layer moved: the load names it.
    let moved = Files {
        state: second.state.clone(),
        mem: dir.join("moved.mem"),
    };
    std::fs::rename(&second.mem, &moved.mem).map_err(|e| fail(e.to_string()))?;
    let (_b, mut b, loaded) = restore(&moved, true, true)?;
    check(loaded["memory_runs"].as_u64().unwrap_or(0) >= 3, || {
        format!("load answered {loaded}")
    })?;
    same(&invoke_ok(&mut b, b"")?, b"3\n")?;

    // A parent moved: named, and the process takes another load.
    let parent = dir.join("first.mem");
    let hidden = dir.join("first.hidden");
    std::fs::rename(&parent, &hidden).map_err(|e| fail(e.to_string()))?;
    let (_c, mut c) = fresh_vmm(true)?;
    expect_fault(
        c.put_json("/snapshot/load", &load_body(&moved, true)),
        "first.mem",
        "load with a parent layer missing",
    )?;
    std::fs::rename(&hidden, &parent).map_err(|e| fail(e.to_string()))?;
    expect_status(
        c.put_json("/snapshot/load", &load_body(&moved, true)),
        200,
        "load once the parent is back",
    )?;
    same(&invoke_ok(&mut c, b"")?, b"3\n")?;
    Ok(())
}

/// A reactor whose `_initialize` takes a while (~100 ms of wasm) and whose
/// handler traps: after each trap the guest rebuilds the instance, running
/// `_initialize` again, after it has answered.
const SLOW_REBUILD: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "_initialize")
    (local $i i32)
    (loop $spin
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $spin (i32.lt_u (local.get $i) (i32.const 300000000)))))
  (func (export "ember_handle") (result i32) unreachable))
"#;

/// A guest prepares its next instance after it answers (here: a reactor
/// rebuilt after a trap); a pause asked for meanwhile waits until it is
/// idle, and the snapshot restores to a VM that serves.
fn pause_while_preparing() -> TestResult {
    let dir = fresh_dir()?;
    let module = dir.join("slow_rebuild.wasm");
    let wasm = wat::parse_str(SLOW_REBUILD).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&module, wasm).map_err(|e| fail(e.to_string()))?;
    let (_vmm, mut client) = boot_vm(false)?;
    load(&mut client, &module)?;
    let trapped = |client: &mut ApiClient| -> TestResult {
        let response = expect_status(client.post("/ember/invoke", b""), 200, "invoke")?;
        check(
            response.header(FUNCTION_ERROR_HEADER) == Some("trap"),
            || {
                format!(
                    "expected a trap: {}",
                    String::from_utf8_lossy(&response.body)
                )
            },
        )
    };
    trapped(&mut client)?;
    // The guest now runs `_initialize` again: the pause waits for it.
    let (files, _) = snapshot(&mut client, "Full", &dir, "preparing")?;
    let status = get_json(&mut client, "/ember/status")?;
    check(status["pauses_deferred"] == 1, || {
        format!("the pause did not wait for the rebuild: {status}")
    })?;
    let (_copy, mut copy, _) = restore(&files, true, true)?;
    trapped(&mut copy)?;
    trapped(&mut copy)?;
    Ok(())
}

/// A Full written to the path a live VM was restored from replaces the
/// file, not its contents: the restored VM keeps its memory.
fn rewrite_in_use() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(false)?;
    load(&mut client, &example("counter.wasm")?)?;
    same(&invoke_ok(&mut client, b"")?, b"1\n")?;
    let (files, _) = snapshot(&mut client, "Full", &dir, "shared")?;
    let (copy_vmm, mut copy, _) = restore(&files, true, true)?;
    same(&invoke_ok(&mut copy, b"")?, b"2\n")?;
    // The original moves on and writes its snapshot over the same files.
    expect_status(set_vm_state(&mut client, "Resumed"), 204, "resume")?;
    same(&invoke_ok(&mut client, b"100")?, b"101\n")?;
    snapshot(&mut client, "Full", &dir, "shared")?;
    // A new file took the name; the copy maps the old one, now unlinked.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", copy_vmm.pid()))
        .map_err(|e| fail(e.to_string()))?;
    let old_mapping = format!("{} (deleted)", files.mem.display());
    check(maps.contains(&old_mapping), || {
        format!("the copy does not map the replaced file:\n{maps}")
    })?;
    // The copy still runs on its own memory (the counter, the runtime).
    same(&invoke_ok(&mut copy, b"")?, b"3\n")?;
    same(&invoke_ok(&mut copy, b"")?, b"4\n")?;
    // And the new snapshot holds the original's state.
    let (_again, mut again, _) = restore(&files, true, true)?;
    same(&invoke_ok(&mut again, b"")?, b"102\n")?;
    Ok(())
}

/// A state that passes every check but that KVM refuses part of (long
/// mode without PAE, which KVM_SET_SREGS refuses) fails
/// after guest memory was mapped: the caller gets a 500 naming the problem
/// and ember-vmm exits with code 1 — a half-restored VM is never served.
fn late_failure() -> TestResult {
    let dir = fresh_dir()?;
    let (_vmm, mut client) = boot_vm(false)?;
    let (good, _) = snapshot(&mut client, "Full", &dir, "good")?;
    let mut state =
        ember_vmm::persist::MicrovmState::read(&good.state).map_err(|e| fail(e.to_string()))?;
    state.vcpus[0].sregs.cr4 &= !(1 << 5);
    let bad = Files {
        state: dir.join("bad.state"),
        mem: good.mem.clone(),
    };
    let bytes = state.encode().map_err(|e| fail(e.to_string()))?;
    std::fs::write(&bad.state, bytes).map_err(|e| fail(e.to_string()))?;

    let (mut vmm, mut client) = fresh_vmm(true)?;
    let response = expect_status(
        client.put_json("/snapshot/load", &load_body(&bad, true)),
        500,
        "load of a state KVM refuses",
    )?;
    let message = response.fault_message().unwrap_or_default();
    check(
        message.contains("KVM_SET_SREGS") && message.contains("exiting"),
        || format!("fault_message {message:?}"),
    )?;
    expect_exit(&mut vmm, 1, "a restore that failed after changing the VM")
}
