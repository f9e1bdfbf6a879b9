#![no_std]
extern crate alloc;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicPtr, Ordering};
use wasmtime::{Config, CustomCodeMemory, Engine, Instance, Module, Store};

static TLS: [AtomicPtr<u8>; 2] = [
    AtomicPtr::new(core::ptr::null_mut()),
    AtomicPtr::new(core::ptr::null_mut()),
];

#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_get(slot: usize) -> *mut u8 {
    TLS[slot].load(Ordering::Relaxed)
}
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_set(slot: usize, ptr: *mut u8) {
    TLS[slot].store(ptr, Ordering::Relaxed)
}

/// Code memory published by `protect(ptr, len, executable)`.
pub struct Code(pub fn(*const u8, usize, bool) -> bool);

impl CustomCodeMemory for Code {
    fn required_alignment(&self) -> usize {
        1
    }
    fn publish_executable(&self, ptr: *const u8, len: usize) -> wasmtime::Result<()> {
        if (self.0)(ptr, len, true) {
            Ok(())
        } else {
            Err(wasmtime::format_err!("publish failed"))
        }
    }
    fn unpublish_executable(&self, ptr: *const u8, len: usize) -> wasmtime::Result<()> {
        if (self.0)(ptr, len, false) {
            Ok(())
        } else {
            Err(wasmtime::format_err!("unpublish failed"))
        }
    }
}

/// Runs a precompiled module's `run` export.
pub fn run(
    precompiled: &[u8],
    protect: fn(*const u8, usize, bool) -> bool,
) -> Result<i32, wasmtime::Error> {
    run_export(precompiled, protect, "run")
}

/// Runs export `name`.
pub fn run_export(
    precompiled: &[u8],
    protect: fn(*const u8, usize, bool) -> bool,
    name: &str,
) -> Result<i32, wasmtime::Error> {
    let mut config = Config::new();
    config.signals_based_traps(false);
    config.memory_reservation(0);
    config.memory_guard_size(0);
    config.memory_reservation_for_growth(1 << 20);
    config.memory_init_cow(false);
    // SAFETY: the code runs with SSE, as compiled.
    unsafe { config.x86_float_abi_ok(true) };
    config.with_custom_code_memory(Some(Arc::new(Code(protect))));
    // SAFETY: cpuid answers for the CPU this runs on.
    unsafe { config.detect_host_feature(detect) };
    let engine = Engine::new(&config)?;
    let module = unsafe { Module::deserialize(&engine, precompiled)? };
    let mut store = Store::new(&engine, ());
    let instance = Instance::new(&mut store, &module, &[])?;
    let f = instance.get_typed_func::<(), i32>(&mut store, name)?;
    f.call(&mut store, ())
}

/// A CPU feature by cpuid (the SSE levels and a few more).
fn detect(feature: &str) -> Option<bool> {
    let l1 = unsafe { core::arch::x86_64::__cpuid(1) };
    let l7 = unsafe { core::arch::x86_64::__cpuid_count(7, 0) };
    Some(match feature {
        "sse3" => l1.ecx & (1 << 0) != 0,
        "ssse3" => l1.ecx & (1 << 9) != 0,
        "sse4.1" => l1.ecx & (1 << 19) != 0,
        "sse4.2" => l1.ecx & (1 << 20) != 0,
        "popcnt" => l1.ecx & (1 << 23) != 0,
        "fma" => l1.ecx & (1 << 12) != 0,
        "avx" => l1.ecx & (1 << 28) != 0,
        "avx2" => l7.ebx & (1 << 5) != 0,
        "bmi1" => l7.ebx & (1 << 3) != 0,
        "bmi2" => l7.ebx & (1 << 8) != 0,
        "lzcnt" => false,
        _ => return None,
    })
}
