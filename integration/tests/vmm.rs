//! ember-vmm end to end: real microVMs on /dev/kvm, driven through the
//! control socket. Without /dev/kvm every test here is reported as
//! *ignored* (never passed), with a banner saying why.

use std::time::Duration;

use ember_integration::*;
use ember_vmm::api::parsed_request::ROUND_TRIP_HEADER;
use libtest_mimic::Failed;
use serde_json::json;

fn main() {
    let tests: Vec<Test> = vec![
        ("boot_to_ready_with_one_vcpu", boot_to_ready_with_one_vcpu),
        (
            "a_jailed_vmm_boots_unprivileged_and_sees_only_what_it_was_given",
            jailed_boot,
        ),
        (
            "before_boot_the_api_is_served_under_the_setup_filter",
            seccomp_before_boot,
        ),
        (
            "hostile_guest_ringing_the_doorbell_with_garbage_is_refused_and_costs_no_cpu",
            hostile_guest_doorbell_loop,
        ),
        (
            "a_vcpu_thread_outside_its_filter_ends_the_process_with_a_report",
            seccomp_vcpu,
        ),
        (
            "the_prefetch_thread_outside_its_filter_ends_the_process_with_a_report",
            seccomp_prefetch,
        ),
        (
            "boot_with_two_vcpus_pause_resume",
            boot_with_two_vcpus_pause_resume,
        ),
        (
            "echo_1000_round_trips_up_to_the_mailbox_maximum",
            echo_1000_round_trips,
        ),
        ("pause_and_resume_then_echo", pause_and_resume_then_echo),
        (
            "guest_crash_is_reported_with_its_vector",
            guest_crash_is_reported,
        ),
        (
            "guest_reset_ends_the_vmm_cleanly",
            guest_reset_ends_the_vmm_cleanly,
        ),
        (
            "bad_input_missing_kernel_file",
            bad_input_missing_kernel_file,
        ),
        ("bad_input_kernel_not_elf", bad_input_kernel_not_elf),
        ("bad_input_mem_size_zero_and_above_host", bad_input_mem_size),
        ("bad_input_vcpu_count_zero", bad_input_vcpu_count_zero),
        ("bad_input_malformed_json", bad_input_malformed_json),
        ("bad_input_unknown_path", bad_input_unknown_path),
        (
            "bad_input_instance_start_twice",
            bad_input_instance_start_twice,
        ),
        (
            "bad_input_requests_before_start",
            bad_input_requests_before_start,
        ),
        (
            "bad_input_echo_above_mailbox_maximum",
            bad_input_echo_above_maximum,
        ),
        (
            "hostile_guest_mailbox_length_beyond_region",
            hostile_guest_bad_length,
        ),
        (
            "seccomp_violation_ends_the_process_with_a_report",
            seccomp_violation,
        ),
        (
            "test_commands_are_off_by_default",
            test_commands_off_by_default,
        ),
        (
            "api_serves_many_and_interleaved_connections",
            api_connections,
        ),
        (
            "crash_before_the_mailbox_stops_the_vm",
            crash_before_mailbox,
        ),
        ("console_input_reaches_the_uart", console_input),
        (
            "console_output_stops_at_its_limit_and_the_vm_goes_on",
            console_limit,
        ),
        (
            "hostile_guest_flooding_its_console_is_cut_at_the_cap_and_serves_on",
            console_flood,
        ),
        ("failed_start_can_be_retried", failed_start_can_be_retried),
        (
            "hung_guest_times_out_and_the_vm_is_stopped_with_code_13",
            hung_guest_times_out,
        ),
        ("config_file_boots_without_api_calls", config_file_boot),
        ("bad_config_file_exits_with_code_3", bad_config_file),
        (
            "guest_boots_without_mailbox_as_under_firecracker",
            boots_without_mailbox,
        ),
        ("idle_vm_uses_no_cpu", idle_vm_uses_no_cpu),
        ("ring0_boot_path_is_counted_and_tiny", ring0_boot_path),
    ];
    run_kvm_tests(tests);
}

fn boot_to_ready_with_one_vcpu() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    check(vmm.serial.wait_for("EMBER-GUEST-READY\n", PATIENCE), || {
        vmm.transcript()
    })?;
    let info = expect_status(client.get("/"), 200, "GET /")?.json();
    check(info["state"] == "Running", || format!("GET / said {info}"))?;
    let pong = expect_status(client.post("/ember/ping", b""), 200, "ping")?;
    check(pong.json()["round_trip_us"].as_u64().is_some(), || {
        format!("ping said {}", pong.json())
    })?;
    let status = get_json(&mut client, "/ember/status")?;
    check(status["guest"] == "ready", || format!("status {status}"))?;
    check(status["vcpu_count"] == 1, || format!("status {status}"))?;
    let ram = status["guest_ram_bytes"].as_u64().unwrap_or(0);
    // The guest sees 128 MiB less the low-memory hole and the 16 MiB mailbox.
    check((104 << 20..112 << 20).contains(&ram), || {
        format!("guest saw {ram} bytes of RAM")
    })?;
    check(
        status["mailbox"]["max_payload"].as_u64() > Some(1 << 19),
        || format!("status {status}"),
    )?;
    shutdown(&mut vmm, &mut client)
}

fn boot_with_two_vcpus_pause_resume() -> TestResult {
    let (mut vmm, mut client) = boot(2, 256, &[])?;
    let status = get_json(&mut client, "/ember/status")?;
    check(status["vcpu_count"] == 2, || format!("status {status}"))?;
    expect_status(set_vm_state(&mut client, "Paused"), 204, "pause")?;
    let info = expect_status(client.get("/"), 200, "GET /")?.json();
    check(info["state"] == "Paused", || {
        format!("GET / said {info} after pausing")
    })?;
    expect_fault(
        client.post("/ember/ping", b""),
        "paused",
        "ping while paused",
    )?;
    expect_status(set_vm_state(&mut client, "Resumed"), 204, "resume")?;
    let info = expect_status(client.get("/"), 200, "GET /")?.json();
    check(info["state"] == "Running", || {
        format!("GET / said {info} after resuming")
    })?;
    echo_ok(&mut client, b"two vcpus", "echo after resume")?;
    shutdown(&mut vmm, &mut client)
}

fn echo_1000_round_trips() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    let status = get_json(&mut client, "/ember/status")?;
    let max = status["mailbox"]["max_payload"]
        .as_u64()
        .ok_or_else(|| fail(format!("no max_payload in {status}")))?;
    let mut rng = Rng::new(0x0e3b_e2c0_ffee);
    // The edges first, then sizes spread over the whole range.
    let mut sizes = vec![0, 1, 2, 7, 8, 4095, 4096, 4097, max - 1, max];
    while sizes.len() < 1000 {
        let size = match rng.below_or_eq(3) {
            0 => rng.below_or_eq(64),
            1 => rng.below_or_eq(8192),
            _ => rng.below_or_eq(max),
        };
        sizes.push(size);
    }
    for (i, size) in sizes.iter().enumerate() {
        let payload = rng.bytes(*size as usize);
        let response =
            expect_status(client.post("/ember/echo", &payload), 200, "echo").map_err(|e| {
                fail(format!(
                    "echo {i} of {size} bytes: {e}\n{}",
                    vmm.transcript()
                ))
            })?;
        if response.body != payload {
            let first_diff = response.body.iter().zip(&payload).position(|(a, b)| a != b);
            return Err(fail(format!(
                "echo {i} of {size} bytes came back as {} bytes, first difference at {first_diff:?}",
                response.body.len()
            )));
        }
        check(response.header(ROUND_TRIP_HEADER).is_some(), || {
            "no round-trip header".into()
        })?;
    }
    let status = get_json(&mut client, "/ember/status")?;
    check(status["requests"] == 1000, || format!("status {status}"))?;
    check(status["protocol_errors"] == 0, || {
        format!("status {status}")
    })?;
    shutdown(&mut vmm, &mut client)
}

fn pause_and_resume_then_echo() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    for round in 0..3 {
        expect_status(set_vm_state(&mut client, "Paused"), 204, "pause")?;
        // Pausing twice is not an error (as in Firecracker).
        expect_status(set_vm_state(&mut client, "Paused"), 204, "pause again")?;
        expect_status(set_vm_state(&mut client, "Resumed"), 204, "resume")?;
        let payload = format!("round {round}");
        echo_ok(&mut client, payload.as_bytes(), "echo")?;
    }
    shutdown(&mut vmm, &mut client)
}

fn guest_crash_is_reported() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &["--test-commands"])?;
    let response = expect_status(client.post("/ember/test/crash", b""), 200, "test/crash")?.json();
    let crash = &response["crash"];
    check(crash["vector"] == 14, || format!("crash report {response}"))?;
    check(crash["exception"] == "#PF", || {
        format!("crash report {response}")
    })?;
    check(
        crash["cr2"] == ember_abi::mailbox::TEST_CRASH_ADDRESS,
        || format!("crash report {response}"),
    )?;
    check(crash["cs"].as_u64().map(|cs| cs & 3) == Some(3), || {
        format!("crash report {response}")
    })?;
    expect_exit(&mut vmm, 10, "guest crashed")?;
    printed(&vmm.serial, "EMBER-GUEST-CRASH vector=14 (#PF)", &vmm)?;
    printed(&vmm.log, "guest crashed: vector 14 (#PF)", &vmm)
}

fn guest_reset_ends_the_vmm_cleanly() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &["--test-commands"])?;
    let response = expect_status(client.post("/ember/test/reset", b""), 200, "test/reset")?.json();
    check(response["reset"] == true, || {
        format!("reset answered {response}")
    })?;
    expect_exit(&mut vmm, 0, "clean end after a guest reset")?;
    printed(&vmm.log, "reset itself through the i8042", &vmm)
}

fn api_only() -> Result<(VmmProcess, ember_vmm::api::client::ApiClient), Failed> {
    let vmm = VmmProcess::start(Launch {
        api: true,
        ..Launch::default()
    })?;
    let client = vmm.client();
    Ok((vmm, client))
}

fn bad_input_missing_kernel_file() -> TestResult {
    let (vmm, mut client) = api_only()?;
    let missing = vmm.dir.join("no-such-kernel");
    expect_fault(
        client.put_json("/boot-source", &boot_source(&missing)),
        &format!(
            "Cannot open kernel_image_path {}: No such file",
            missing.display()
        ),
        "missing kernel",
    )?;
    expect_fault(
        action(&mut client, "InstanceStart"),
        "no boot source",
        "InstanceStart without a boot source",
    )?;
    still_serving(&mut client)
}

fn bad_input_kernel_not_elf() -> TestResult {
    let (vmm, mut client) = api_only()?;
    let text = vmm.dir.join("not-a-kernel.txt");
    std::fs::write(
        &text,
        "#!/bin/sh\necho this is not a kernel, but it is long enough to have a header\n",
    )
    .map_err(|e| fail(e.to_string()))?;
    expect_fault(
        client.put_json("/boot-source", &boot_source(&text)),
        "is not an ELF kernel: no ELF magic",
        "text file as kernel",
    )?;
    still_serving(&mut client)
}

fn bad_input_mem_size() -> TestResult {
    let (_vmm, mut client) = api_only()?;
    expect_fault(
        client.put_json("/machine-config", &machine_config(1, 0)),
        "mem_size_mib must be at least 32 (got 0)",
        "mem_size_mib 0",
    )?;
    expect_fault(
        client.put_json("/machine-config", &machine_config(1, 64 << 20)),
        "exceeds this host's memory",
        "mem_size_mib above the host",
    )?;
    still_serving(&mut client)?;
    // A good value is still accepted afterwards.
    expect_status(
        client.put_json("/machine-config", &machine_config(1, 64)),
        204,
        "mem_size_mib 64",
    )?;
    let config = expect_status(client.get("/machine-config"), 200, "GET /machine-config")?.json();
    check(config["mem_size_mib"] == 64, || {
        format!("machine config {config}")
    })
}

fn bad_input_vcpu_count_zero() -> TestResult {
    let (_vmm, mut client) = api_only()?;
    expect_fault(
        client.put_json("/machine-config", &machine_config(0, 128)),
        "vcpu_count must be between 1 and 32 (got 0)",
        "vcpu_count 0",
    )?;
    still_serving(&mut client)
}

fn bad_input_malformed_json() -> TestResult {
    let (vmm, mut client) = api_only()?;
    let response = client.request(
        "PUT",
        "/machine-config",
        Some(b"{\"vcpu_count\": 1, \"mem_size_mib\": "),
    );
    expect_fault(
        response,
        "Cannot parse the body of PUT /machine-config",
        "truncated JSON",
    )?;
    expect_fault(
        client.put_json(
            "/machine-config",
            &json!({ "vcpu_count": 1, "mem_size_mib": 128, "vcpus": 2 }),
        ),
        "unknown field `vcpus`",
        "unknown field",
    )?;
    still_serving(&mut client)?;
    // Not even HTTP, on a connection of its own: a 400, then that
    // connection is closed and the server goes on.
    let mut spoiled = vmm.client();
    let response = spoiled
        .send_raw(b"\x16\x03\x01 hello\r\n\r\n")
        .map_err(|e| fail(e.to_string()))?;
    check(response.status == 400, || {
        format!("garbage answered {}", response.status)
    })?;
    still_serving(&mut client)
}

fn bad_input_unknown_path() -> TestResult {
    let (_vmm, mut client) = api_only()?;
    expect_fault(
        client.get("/no-such-path"),
        "Invalid request method and/or path: GET /no-such-path",
        "unknown path",
    )?;
    expect_fault(
        client.request("DELETE", "/machine-config", None),
        "Invalid request method and/or path: DELETE /machine-config",
        "wrong method",
    )?;
    still_serving(&mut client)
}

fn bad_input_instance_start_twice() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    expect_fault(
        action(&mut client, "InstanceStart"),
        "already running",
        "second InstanceStart",
    )?;
    expect_fault(
        client.put_json("/machine-config", &machine_config(2, 256)),
        "not supported after starting",
        "machine-config after start",
    )?;
    expect_status(
        client.post("/ember/ping", b""),
        200,
        "ping after the refusals",
    )?;
    shutdown(&mut vmm, &mut client)
}

fn bad_input_requests_before_start() -> TestResult {
    let (_vmm, mut client) = api_only()?;
    expect_fault(
        client.post("/ember/ping", b""),
        "not running",
        "ping before start",
    )?;
    expect_fault(
        action(&mut client, "SendCtrlAltDel"),
        "not running",
        "SendCtrlAltDel before start",
    )?;
    expect_fault(
        set_vm_state(&mut client, "Paused"),
        "not running",
        "pause before start",
    )?;
    still_serving(&mut client)
}

fn bad_input_echo_above_maximum() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    let status = get_json(&mut client, "/ember/status")?;
    let max = status["mailbox"]["max_payload"].as_u64().unwrap_or(0) as usize;
    let too_big = vec![0x42u8; max + 1];
    expect_fault(
        client.post("/ember/echo", &too_big),
        &format!(
            "request payload of {} bytes exceeds the mailbox maximum of {max} bytes",
            max + 1
        ),
        "echo one byte above the maximum",
    )?;
    let fits = vec![0x42u8; max];
    echo_ok(&mut client, &fits, "echo at the maximum")?;
    shutdown(&mut vmm, &mut client)
}

fn hostile_guest_bad_length() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &["--test-commands"])?;
    expect_fault(
        client.post("/ember/test/bad-length", b""),
        "guest wrote mailbox message length 4294967295, beyond the",
        "guest posting a length beyond the region",
    )?;
    for _ in 0..3 {
        echo_ok(&mut client, b"still here", "echo after the bad length")?;
    }
    let status = get_json(&mut client, "/ember/status")?;
    check(status["protocol_errors"] == 1, || {
        format!("status {status}")
    })?;
    shutdown(&mut vmm, &mut client)
}

fn seccomp_violation() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &["--test-commands"])?;
    // The VMM thread calls socket(AF_INET): the process dies, so no answer.
    let answer = client.post("/ember/test/forbidden-syscall", b"");
    check(answer.is_err(), || {
        format!("the forbidden system call was answered: {answer:?}")
    })?;
    expect_exit(&mut vmm, 148, "seccomp violation")?;
    printed(
        &vmm.log,
        "seccomp: thread 'vmm' made system call 41 (socket)",
        &vmm,
    )
}

fn api_connections() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    // Connections come and go; descriptor numbers get reused.
    for i in 0..200 {
        let mut once = vmm.client();
        let answer = expect_status(once.get("/"), 200, &format!("GET / on connection {i}"))?;
        check(answer.json()["state"] == "Running", || {
            format!("GET / said {}", answer.json())
        })?;
    }
    // Several open at once, used in turn, keep-alive.
    let mut others: Vec<_> = (0..4).map(|_| vmm.client()).collect();
    for round in 0..10 {
        for (i, other) in others.iter_mut().enumerate() {
            let payload = format!("connection {i} round {round}");
            echo_ok(other, payload.as_bytes(), "echo")?;
        }
    }
    drop(others);
    shutdown(&mut vmm, &mut client)
}

fn console_input() -> TestResult {
    use std::io::Write;
    let (mut vmm, mut client) = boot_with(
        1,
        128,
        Launch {
            api: true,
            stdin_pipe: true,
            ..Launch::default()
        },
    )?;
    let mut stdin = vmm.stdin.take().ok_or_else(|| fail("no stdin pipe"))?;
    stdin
        .write_all(b"hello\n")
        .map_err(|e| fail(e.to_string()))?;
    drop(stdin);
    // The VMM thread forwards stdin to the UART's receive FIFO as it comes;
    // the status request is served after the input event on the same loop
    // only if the input arrived first, so ask until it shows (bounded).
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let status = get_json(&mut client, "/ember/status")?;
        if status["console_input_bytes"] == 6 {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(fail(format!("console input never arrived: {status}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    shutdown(&mut vmm, &mut client)
}

/// A console capped at 8 bytes: the guest's boot line is cut there, one
/// note follows, the rest is counted as dropped, and the VM still answers.
fn console_limit() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &["--serial-out-limit", "8"])?;
    echo_ok(&mut client, b"after the cap", "echo")?;
    let status = get_json(&mut client, "/ember/status")?;
    let dropped = status["console_dropped_bytes"].as_u64().unwrap_or(0);
    check(dropped >= "EMBER-GUEST-READY\n".len() as u64 - 8, || {
        format!("status {status}")
    })?;
    let note =
        "EMBER-GU\n[ember-vmm: the console reached its limit of 8 bytes; the rest is dropped]\n";
    check(vmm.serial.wait_for(note, PATIENCE), || {
        format!("console: {:?}", vmm.serial.text())
    })?;
    check(vmm.serial.text() == note, || {
        format!("console: {:?}", vmm.serial.text())
    })?;
    shutdown(&mut vmm, &mut client)
}

/// A guest that writes 32 KiB to a console capped at 4 KiB (emberd caps
/// at 1 MiB; the same code, a smaller figure to keep the test short: each
/// byte is an exit): what reaches the host stops at the cap plus one note,
/// the rest is counted as dropped, and the VM answers on.
fn console_flood() -> TestResult {
    const CAP: usize = 4096;
    const FLOOD: usize = 32 << 10;
    let (mut vmm, mut client) = boot(
        1,
        128,
        &["--test-commands", "--serial-out-limit", &CAP.to_string()],
    )?;
    expect_status(
        client.post("/ember/test/console-flood", FLOOD.to_string().as_bytes()),
        200,
        "console flood",
    )?;
    echo_ok(&mut client, b"after the flood", "echo")?;
    let status = get_json(&mut client, "/ember/status")?;
    let dropped = status["console_dropped_bytes"].as_u64().unwrap_or(0) as usize;
    check(dropped >= FLOOD - CAP, || format!("status {status}"))?;
    let note = "[ember-vmm: the console reached its limit of 4096 bytes; the rest is dropped]\n";
    check(vmm.serial.wait_for(note, PATIENCE), || {
        format!("console: {} bytes", vmm.serial.text().len())
    })?;
    let console = vmm.serial.text();
    check(console.len() == CAP + 1 + note.len(), || {
        format!("{} bytes reached the console (cap {CAP})", console.len())
    })?;
    check(console.contains("FFFFFFFF"), || "the flood".to_string())?;
    shutdown(&mut vmm, &mut client)
}

fn crash_before_mailbox() -> TestResult {
    let image = guest_image()?;
    let mut vmm = VmmProcess::start(Launch {
        api: false,
        config: Some(json!({
            "boot-source": { "kernel_image_path": image, "boot_args": ember_abi::CMDLINE_TEST_CRASH_AT_BOOT },
            "machine-config": machine_config(1, 64),
        })),
        ..Launch::default()
    })?;
    // No mailbox yet to report to: the handler prints and triple-faults,
    // which stops the VM under any VMM.
    expect_exit(&mut vmm, 11, "triple fault")?;
    printed(&vmm.serial, "EMBER-GUEST-CRASH vector=14 (#PF)", &vmm)?;
    printed(&vmm.log, "triple-faulted", &vmm)
}

fn failed_start_can_be_retried() -> TestResult {
    let image = guest_image()?;
    let (vmm, mut client) = api_only()?;
    // A valid ELF header and nothing after it: accepted by PUT /boot-source,
    // refused when loaded.
    let header = std::fs::read(&image).map_err(|e| fail(e.to_string()))?[..64].to_vec();
    let truncated = vmm.dir.join("truncated-kernel");
    std::fs::write(&truncated, header).map_err(|e| fail(e.to_string()))?;
    expect_status(
        client.put_json("/boot-source", &boot_source(&truncated)),
        204,
        "boot-source",
    )?;
    expect_fault(
        action(&mut client, "InstanceStart"),
        "cannot load the guest image",
        "InstanceStart with a truncated image",
    )?;
    // Fix the configuration and try again, in the same process.
    expect_status(
        client.put_json("/boot-source", &boot_source(&image)),
        204,
        "boot-source",
    )?;
    expect_status(
        action(&mut client, "InstanceStart"),
        204,
        "InstanceStart after the failure",
    )?;
    vmm.wait_ready()?;
    expect_status(client.post("/ember/ping", b""), 200, "ping")?;
    let mut vmm = vmm;
    shutdown(&mut vmm, &mut client)
}

fn hung_guest_times_out() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &["--test-commands", "--mailbox-timeout-ms", "300"])?;
    let started = std::time::Instant::now();
    let response = expect_status(client.post("/ember/test/hang", b""), 504, "test/hang")?;
    let waited = started.elapsed();
    let message = response.fault_message().unwrap_or_default();
    check(message.contains("did not answer within 30"), || {
        message.clone()
    })?;
    check(waited >= Duration::from_millis(300), || {
        format!("answered after {waited:?}")
    })?;
    // A guest that does not answer is never reused: the VM is stopped and
    // ember-vmm exits with its own code, for the agent to see.
    expect_exit(&mut vmm, 13, "the guest was unresponsive")?;
    printed(&vmm.log, "stopping the VM", &vmm)
}

fn test_commands_off_by_default() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &[])?;
    for path in ["/ember/test/crash", "/ember/test/forbidden-syscall"] {
        expect_fault(client.post(path, b""), "--test-commands", path)?;
    }
    shutdown(&mut vmm, &mut client)
}

fn config_file_boot() -> TestResult {
    let image = guest_image()?;
    let mut vmm = VmmProcess::start(Launch {
        api: true,
        config: Some(json!({
            "boot-source": boot_source(&image),
            "machine-config": machine_config(1, 64),
        })),
        ..Launch::default()
    })?;
    vmm.wait_ready()?;
    check(vmm.serial.wait_for("EMBER-GUEST-READY", PATIENCE), || {
        vmm.transcript()
    })?;
    let mut client = vmm.client();
    let config = expect_status(client.get("/machine-config"), 200, "GET /machine-config")?.json();
    check(config["mem_size_mib"] == 64, || {
        format!("machine config {config}")
    })?;
    shutdown(&mut vmm, &mut client)
}

fn bad_config_file() -> TestResult {
    let mut vmm = VmmProcess::start(Launch {
        api: false,
        config: Some(json!({
            "boot-source": { "kernel_image_path": "/nonexistent/vmlinux" },
            "machine-config": machine_config(1, 64),
        })),
        ..Launch::default()
    })?;
    expect_exit(&mut vmm, 3, "bad configuration")?;
    printed(&vmm.log, "/nonexistent/vmlinux", &vmm)
}

fn boots_without_mailbox() -> TestResult {
    // As under Firecracker: only the boot protocol, no ember.* parameters.
    let image = guest_image()?;
    let vmm = VmmProcess::start(Launch {
        api: true,
        config: Some(json!({
            "boot-source": { "kernel_image_path": image, "boot_args": "console=ttyS0 reboot=k panic=1 pci=off" },
            "machine-config": machine_config(1, 128),
        })),
        extra_args: vec!["--no-mailbox".into()],
        ..Launch::default()
    })?;
    check(vmm.serial.wait_for("EMBER-GUEST-READY\n", PATIENCE), || {
        vmm.transcript()
    })?;
    check(
        vmm.serial
            .wait_for("no ember.mailbox on the command line", PATIENCE),
        || vmm.transcript(),
    )?;
    let mut client = vmm.client();
    expect_fault(
        client.post("/ember/ping", b""),
        "--no-mailbox",
        "ping without a mailbox",
    )?;
    // The guest parked itself: halted, no CPU, the process still serving.
    let before = cpu_ticks(vmm.pid())?;
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks(vmm.pid())? - before;
    check(used <= 5, || {
        format!("a parked guest used {used} ticks of CPU in 0.5 s")
    })?;
    still_serving(&mut client)
}

fn idle_vm_uses_no_cpu() -> TestResult {
    let (mut vmm, mut client) = boot(2, 128, &[])?;
    expect_status(client.post("/ember/ping", b""), 200, "ping")?;
    let before = cpu_ticks(vmm.pid())?;
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(vmm.pid())? - before;
    // A busy-waiting vCPU would use ~100 ticks per second.
    check(used <= 5, || {
        format!("an idle VM used {used} ticks of CPU in 1 s")
    })?;
    shutdown(&mut vmm, &mut client)
}

fn ring0_boot_path() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &["--count-ring0"])?;
    let status = get_json(&mut client, "/ember/status")?;
    let count = status["ring0_instructions"]
        .as_u64()
        .ok_or_else(|| fail(format!("no ring-0 count in {status}\n{}", vmm.transcript())))?;
    eprintln!("ring-0 boot path: {count} instructions");
    printed(&vmm.log, "instructions from entry to ring 3\n", &vmm)?;
    // docs/guest-kernel.md: the boot path is straight-line code of ~30
    // instructions; a loop sneaking in would show up as hundreds.
    check((10..=64).contains(&count), || {
        format!("the ring-0 boot path ran {count} instructions")
    })?;
    shutdown(&mut vmm, &mut client)
}

/// `--jail-root`: the VMM runs as the jail's uid under a keeper, cannot
/// open a host file it was not given (/etc/passwd is not there, though it
/// is on the host), boots the image it was given, and ends cleanly.
fn jailed_boot() -> TestResult {
    let launch = Launch {
        api: true,
        jail: true,
        ..Launch::default()
    };
    let mut vmm = VmmProcess::start(launch)?;
    let mut client = vmm.client();
    let refused = client
        .request(
            "PUT",
            "/boot-source",
            Some(
                json!({ "kernel_image_path": "/etc/passwd" })
                    .to_string()
                    .as_bytes(),
            ),
        )
        .map_err(|e| e.to_string())?;
    let message = refused.fault_message().unwrap_or_default();
    check(
        refused.status == 400 && message.contains("No such file"),
        || {
            format!(
                "booting /etc/passwd in the jail: {} {message}",
                refused.status
            )
        },
    )?;
    let image = guest_image()?;
    expect_status(
        client.request(
            "PUT",
            "/boot-source",
            Some(boot_source(&image).to_string().as_bytes()),
        ),
        204,
        "boot-source",
    )?;
    expect_status(
        client.request(
            "PUT",
            "/machine-config",
            Some(machine_config(1, 128).to_string().as_bytes()),
        ),
        204,
        "machine-config",
    )?;
    expect_status(action(&mut client, "InstanceStart"), 204, "InstanceStart")?;
    check(vmm.serial.wait_for("EMBER-GUEST-READY\n", PATIENCE), || {
        vmm.transcript()
    })?;
    let keeper = vmm.pid();
    let children = std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children"))
        .unwrap_or_default();
    let inner: u32 = children
        .trim()
        .parse()
        .map_err(|_| format!("the keeper's children: {children:?}"))?;
    for pid in [keeper, inner] {
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or_default();
        check(
            uid.split_whitespace()
                .skip(1)
                .all(|u| u == JAIL_ID.to_string()),
            || format!("process {pid}: {uid}"),
        )?;
    }
    shutdown(&mut vmm, &mut client)
}

/// Sends a forbidden-syscall test command and checks the process dies
/// with code 148 naming `thread` and socket(2).
fn forbidden(vmm: &mut VmmProcess, path: &str, thread: &str) -> TestResult {
    let mut client = vmm.client();
    // Asked of another thread, the command may be answered before the
    // process dies; asked of the VMM thread, it never is.
    let _ = client.post(path, b"");
    expect_exit(vmm, 148, "seccomp violation")?;
    let report = format!("seccomp: thread '{thread}' made system call 41 (socket)");
    printed(&vmm.log.clone(), &report, vmm)
}

/// The VMM thread's `vmm_setup` filter is in place before its first API
/// request: a forbidden call then ends the process as after boot.
fn seccomp_before_boot() -> TestResult {
    let mut vmm = VmmProcess::start(Launch {
        api: true,
        extra_args: vec!["--test-commands".into()],
        ..Launch::default()
    })?;
    forbidden(&mut vmm, "/ember/test/forbidden-syscall", "vmm")
}

/// A vCPU thread (paused, so it takes the command at once) makes a call
/// its filter forbids.
fn seccomp_vcpu() -> TestResult {
    let (mut vmm, mut client) = boot(1, 128, &["--test-commands"])?;
    expect_status(set_vm_state(&mut client, "Paused"), 204, "pause")?;
    forbidden(&mut vmm, "/ember/test/forbidden-syscall/vcpu", "vcpu0")
}

/// The prefetch thread of a prepared VMM makes a call its filter forbids.
fn seccomp_prefetch() -> TestResult {
    let mut vmm = VmmProcess::start(Launch {
        api: true,
        extra_args: ["--test-commands", "--prepare", "--mem-size-mib", "128"]
            .map(String::from)
            .to_vec(),
        ..Launch::default()
    })?;
    forbidden(
        &mut vmm,
        "/ember/test/forbidden-syscall/prefetch",
        "prefetch",
    )
}

/// A guest that rings the doorbell over and over, each time with a message
/// of no known kind and a sequence number the host never sent: every one
/// is refused (the caller gets an error naming it), the VMM keeps serving
/// its API, and it does not spin — the vCPU waits in its exit until the
/// next request, which meets the next piece of garbage.
fn hostile_guest_doorbell_loop() -> TestResult {
    let (vmm, mut client) = boot(1, 128, &["--test-commands"])?;
    let first = client
        .post("/ember/test/doorbell-loop", b"")
        .map_err(|e| e.to_string())?;
    check(!(200..300).contains(&first.status), || {
        format!(
            "the garbage was answered {} {:?}",
            first.status,
            first.fault_message()
        )
    })?;
    for i in 0..3 {
        let answer = client.post("/ember/ping", b"").map_err(|e| e.to_string())?;
        check(!(200..300).contains(&answer.status), || {
            format!("ping {i} after the garbage: {}", answer.status)
        })?;
    }
    let status = get_json(&mut client, "/ember/status")?;
    check(status["protocol_errors"].as_u64() >= Some(4), || {
        format!("status {status}")
    })?;
    let before = cpu_ticks(vmm.pid())?;
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(vmm.pid())? - before;
    check(used <= 5, || {
        format!("a VM whose guest rings with garbage used {used} ticks of CPU in 1 s")
    })?;
    let info = expect_status(client.get("/"), 200, "GET / after the garbage")?.json();
    check(info["state"] == "Running", || format!("GET / said {info}"))
}
