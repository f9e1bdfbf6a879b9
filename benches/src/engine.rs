//! `engine`: what the guest's engine settings cost, measured with the same
//! compiler on the host. Each example module runs under Wasmtime on the
//! host, compiled by Cranelift for the guest's CPU features, four ways:
//! guard pages and signal handlers (Wasmtime's default on Linux), explicit
//! bounds checks (the guest's setting: no virtual memory, no signals), and
//! explicit checks plus fuel or plus epoch checks (the two ways compiled
//! code could be interrupted). Native code of the same source runs beside
//! them, in the same run.

use std::time::Instant;

use serde_json::{json, Value};
use wasmtime::{Caller, Config, Engine, Extern, Linker, Module, Store};

use crate::examples::{Example, EXAMPLES};
use crate::launch::examples_dir;
use crate::stats::{header, Summary};

/// One way of compiling and running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    GuardPages,
    Explicit,
    ExplicitFuel,
    ExplicitEpoch,
}

impl Setting {
    const ALL: [Setting; 4] = [
        Setting::GuardPages,
        Setting::Explicit,
        Setting::ExplicitFuel,
        Setting::ExplicitEpoch,
    ];

    fn name(self) -> &'static str {
        match self {
            Setting::GuardPages => "guard pages + signals",
            Setting::Explicit => "explicit checks (guest)",
            Setting::ExplicitFuel => "explicit + fuel",
            Setting::ExplicitEpoch => "explicit + epochs",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Setting::GuardPages => "guard_pages",
            Setting::Explicit => "explicit",
            Setting::ExplicitFuel => "explicit_fuel",
            Setting::ExplicitEpoch => "explicit_epoch",
        }
    }

    fn engine(self) -> Result<Engine, String> {
        let mut config = Config::new();
        // The host's own triple named explicitly: Cranelift then enables
        // only the flags below (the guest's), not everything this CPU has.
        config
            .target("x86_64-unknown-linux-gnu")
            .map_err(|e| e.to_string())?;
        for flag in ember_compile::CpuFeatures::host().names() {
            // SAFETY: the flag is a feature this CPU has (read from cpuid).
            unsafe { config.cranelift_flag_enable(flag) };
        }
        if self != Setting::GuardPages {
            config
                .signals_based_traps(false)
                .memory_reservation(0)
                .memory_guard_size(0)
                .memory_init_cow(false);
        }
        config.consume_fuel(self == Setting::ExplicitFuel);
        config.epoch_interruption(self == Setting::ExplicitEpoch);
        Engine::new(&config).map_err(|e| e.to_string())
    }
}

/// The host state of a run: stdin, stdout.
#[derive(Default)]
struct Io {
    stdin: Vec<u8>,
    at: usize,
    stdout: Vec<u8>,
}

/// Errno values.
const BADF: i32 = 8;

/// The WASI preview 1 calls the examples make, minimally: stdin, stdout,
/// stderr, no arguments or environment, no preopened directory, zero
/// time, a zero random stream. Anything else traps if called.
fn wasi(linker: &mut Linker<Io>, module: &Module) -> Result<(), String> {
    fn memory(c: &mut Caller<'_, Io>) -> wasmtime::Memory {
        match c.get_export("memory") {
            Some(Extern::Memory(m)) => m,
            _ => panic!("the module exports no memory"),
        }
    }
    let m = "wasi_snapshot_preview1";
    let e = |e: wasmtime::Error| e.to_string();
    linker
        .func_wrap(
            m,
            "fd_read",
            |mut c: Caller<'_, Io>, fd: i32, iovs: u32, n: u32, nread: u32| -> i32 {
                if fd != 0 {
                    return BADF;
                }
                let mem = memory(&mut c);
                let (data, io) = mem.data_and_store_mut(&mut c);
                let mut total = 0u32;
                for i in 0..n {
                    let at = (iovs + 8 * i) as usize;
                    let buf = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                    let len = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
                    let take = len.min(io.stdin.len() - io.at);
                    data[buf..buf + take].copy_from_slice(&io.stdin[io.at..io.at + take]);
                    io.at += take;
                    total += take as u32;
                }
                data[nread as usize..nread as usize + 4].copy_from_slice(&total.to_le_bytes());
                0
            },
        )
        .map_err(e)?;
    linker
        .func_wrap(
            m,
            "fd_write",
            |mut c: Caller<'_, Io>, fd: i32, iovs: u32, n: u32, nwritten: u32| -> i32 {
                let mem = memory(&mut c);
                let (data, io) = mem.data_and_store_mut(&mut c);
                let mut total = 0u32;
                for i in 0..n {
                    let at = (iovs + 8 * i) as usize;
                    let buf = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                    let len = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
                    if fd == 1 {
                        io.stdout.extend_from_slice(&data[buf..buf + len]);
                    }
                    total += len as u32;
                }
                data[nwritten as usize..nwritten as usize + 4]
                    .copy_from_slice(&total.to_le_bytes());
                0
            },
        )
        .map_err(e)?;
    let zero_sizes = |mut c: Caller<'_, Io>, count: u32, size: u32| -> i32 {
        let mem = memory(&mut c);
        let data = mem.data_mut(&mut c);
        data[count as usize..count as usize + 4].fill(0);
        data[size as usize..size as usize + 4].fill(0);
        0
    };
    linker
        .func_wrap(m, "environ_sizes_get", zero_sizes)
        .map_err(e)?;
    linker
        .func_wrap(m, "args_sizes_get", zero_sizes)
        .map_err(e)?;
    linker
        .func_wrap(m, "environ_get", |_: u32, _: u32| -> i32 { 0 })
        .map_err(e)?;
    linker
        .func_wrap(m, "args_get", |_: u32, _: u32| -> i32 { 0 })
        .map_err(e)?;
    linker
        .func_wrap(
            m,
            "random_get",
            |mut c: Caller<'_, Io>, buf: u32, len: u32| -> i32 {
                let mem = memory(&mut c);
                mem.data_mut(&mut c)[buf as usize..(buf + len) as usize].fill(0);
                0
            },
        )
        .map_err(e)?;
    linker
        .func_wrap(
            m,
            "clock_time_get",
            |mut c: Caller<'_, Io>, _id: u32, _precision: u64, at: u32| -> i32 {
                let mem = memory(&mut c);
                mem.data_mut(&mut c)[at as usize..at as usize + 8].fill(0);
                0
            },
        )
        .map_err(e)?;
    linker
        .func_wrap(m, "fd_prestat_get", |_: i32, _: u32| -> i32 { BADF })
        .map_err(e)?;
    linker
        .func_wrap(m, "fd_close", |_: i32| -> i32 { 0 })
        .map_err(e)?;
    linker
        .func_wrap(m, "proc_exit", |code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!("proc_exit({code})")))
        })
        .map_err(e)?;
    linker.define_unknown_imports_as_traps(module).map_err(e)?;
    Ok(())
}

/// Runs the command `module` once on `event`: the result and the time of
/// `_start` alone (instantiation excluded), µs.
fn run_once(
    engine: &Engine,
    linker: &Linker<Io>,
    module: &Module,
    setting: Setting,
    event: &[u8],
) -> Result<(Vec<u8>, f64), String> {
    let mut store = Store::new(
        engine,
        Io {
            stdin: event.to_vec(),
            ..Io::default()
        },
    );
    match setting {
        Setting::ExplicitFuel => store.set_fuel(u64::MAX).map_err(|e| e.to_string())?,
        Setting::ExplicitEpoch => store.set_epoch_deadline(u64::MAX),
        _ => {}
    }
    let instance = linker
        .instantiate(&mut store, module)
        .map_err(|e| format!("{e:#}"))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(|e| e.to_string())?;
    let began = Instant::now();
    start.call(&mut store, ()).map_err(|e| format!("{e:#}"))?;
    let us = began.elapsed().as_secs_f64() * 1e6;
    Ok((std::mem::take(&mut store.data_mut().stdout), us))
}

/// `ember-bench engine`.
pub fn bench_engine(runs: usize) -> Result<Value, String> {
    let runs = runs.max(5);
    let dir = examples_dir()?;
    println!(
        "each example under Wasmtime on the host (Cranelift, the guest's CPU features), {runs} runs; native: the same source"
    );
    let mut out = Vec::new();
    for example in &EXAMPLES {
        let event = (example.event)();
        let want = (example.native)(&event)?;
        let wasm = std::fs::read(dir.join(example.wasm)).map_err(|e| e.to_string())?;
        let native = Summary::of(&native_times(example, &event, runs)?);
        println!("\n{} ({} bytes in)", example.name, event.len());
        println!("{}", header());
        println!("{}", native.row("native", "us", 0));
        let mut figures = serde_json::Map::new();
        figures.insert("native_us".into(), json!(native));
        let mut explicit_p50 = 0.0;
        // Interleaved: one run of each setting in turn.
        let engines = Setting::ALL
            .iter()
            .map(|s| {
                let engine = s.engine()?;
                let module = Module::new(&engine, &wasm).map_err(|e| e.to_string())?;
                let mut linker = Linker::new(&engine);
                wasi(&mut linker, &module)?;
                Ok((*s, engine, module, linker))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut times = vec![Vec::with_capacity(runs); engines.len()];
        for _ in 0..runs + 1 {
            for (i, (setting, engine, module, linker)) in engines.iter().enumerate() {
                let (result, us) = run_once(engine, linker, module, *setting, &event)?;
                if result != want {
                    return Err(format!(
                        "{} under {}: the result differs from the native build's",
                        example.name,
                        setting.name()
                    ));
                }
                times[i].push(us);
            }
        }
        for (i, (setting, ..)) in engines.iter().enumerate() {
            // The first run of each warms caches; dropped.
            let s = Summary::of(&times[i][1..]);
            if *setting == Setting::Explicit {
                explicit_p50 = s.p50;
            }
            println!("{}", s.row(setting.name(), "us", 0));
            figures.insert(format!("{}_us", setting.key()), json!(s));
        }
        let ratios: serde_json::Map<String, Value> = engines
            .iter()
            .enumerate()
            .map(|(i, (setting, ..))| {
                let p50 = Summary::of(&times[i][1..]).p50;
                (
                    setting.key().to_string(),
                    json!({ "vs_native": p50 / native.p50, "vs_guest": p50 / explicit_p50 }),
                )
            })
            .collect();
        for (key, r) in &ratios {
            println!(
                "  {key}: {:.2}x native, {:.2}x the guest's setting",
                r["vs_native"].as_f64().unwrap_or(0.0),
                r["vs_guest"].as_f64().unwrap_or(0.0)
            );
        }
        figures.insert("ratios_p50".into(), Value::Object(ratios));
        out.push(
            json!({ "example": example.name, "event_bytes": event.len(), "figures": figures }),
        );
    }
    Ok(json!({ "bench": "engine", "runs": runs, "examples": out }))
}

/// Times of the native build of `example` on `event`, µs.
pub fn native_times(example: &Example, event: &[u8], runs: usize) -> Result<Vec<f64>, String> {
    let mut times = Vec::with_capacity(runs);
    // One run first to warm caches, dropped.
    for i in 0..runs + 1 {
        let began = Instant::now();
        let out = (example.native)(std::hint::black_box(event))?;
        let us = began.elapsed().as_secs_f64() * 1e6;
        std::hint::black_box(out);
        if i > 0 {
            times.push(us);
        }
    }
    Ok(times)
}
