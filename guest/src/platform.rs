//! What Wasmtime needs from the platform it runs on, when built without
//! std: one pointer of thread-local storage (the guest runs one thread),
//! a way to make code executable, and the CPU features compiled code may
//! use.
//!
//! Compiled code reaches the guest as a module precompiled on the host
//! (docs/functions.md), written by ember-vmm into the guest's code area;
//! `Module::deserialize_raw` uses it where it lies and asks [`Code`] to
//! make it executable. The guest's page tables map all of RAM present,
//! writable, executable and user-accessible with 2 MiB pages, set once at
//! boot and never changed (changing them is ring-0 work, which is
//! thousands of times slower here; docs/guest-kernel.md), so publishing
//! has nothing to do: the code is already executable where it lies.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicPtr, Ordering};

/// Wasmtime's thread-local slots (0: the runtime's state; 1: used only by
/// the component model's async support, which is not built in).
static TLS: [AtomicPtr<u8>; 2] = [
    AtomicPtr::new(core::ptr::null_mut()),
    AtomicPtr::new(core::ptr::null_mut()),
];

/// Reads thread-local slot `slot`; called by Wasmtime.
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_get(slot: usize) -> *mut u8 {
    TLS.get(slot)
        .map_or(core::ptr::null_mut(), |s| s.load(Ordering::Relaxed))
}

/// Sets thread-local slot `slot`; called by Wasmtime.
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_set(slot: usize, ptr: *mut u8) {
    if let Some(s) = TLS.get(slot) {
        s.store(ptr, Ordering::Relaxed);
    }
}

/// Code memory: already executable (see the module's comment).
struct Code;

impl wasmtime::CustomCodeMemory for Code {
    fn required_alignment(&self) -> usize {
        // No page needs its protection changed, so code need not start on
        // one (the code area starts on a page anyway, and Wasmtime checks
        // each section's alignment from there).
        1
    }

    fn publish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }

    fn unpublish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }
}

/// The engine configuration every module is loaded with. It must agree
/// with the host's (vmm's `compile` module): Wasmtime refuses a module
/// compiled with other settings, naming the one that differs.
pub fn engine_config(memory_reservation_for_growth: u64) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    // No virtual memory and no signal handlers here: linear memory is a
    // heap allocation, every access is bounds-checked by compiled code, and
    // traps are reported by the code that checks (docs/guest-kernel.md).
    config
        .signals_based_traps(false)
        .memory_reservation(0)
        .memory_guard_size(0)
        .memory_init_cow(false)
        // Reserved at instantiation: growth within the limit never moves
        // (and copies) the memory (docs/functions.md, "Memory").
        .memory_reservation_for_growth(memory_reservation_for_growth)
        .max_wasm_stack(MAX_WASM_STACK)
        .with_custom_code_memory(Some(Arc::new(Code)));
    // SAFETY: the host compiles with SSE 4.1, so compiled code never calls
    // the float helpers whose ABI differs from this soft-float target's;
    // no host function takes or returns a float.
    unsafe { config.x86_float_abi_ok(true) };
    // SAFETY: `cpu_feature` answers from cpuid and the kernel's settings.
    unsafe { config.detect_host_feature(cpu_feature) };
    config
}

/// The deepest wasm stack, in bytes. The ring-3 stack is 608 KiB
/// (docs/guest-kernel.md); the rest is for the runtime and the host
/// functions wasm calls at its deepest.
pub const MAX_WASM_STACK: usize = 384 << 10;

/// Whether compiled code may use CPU `feature` here (`None`: a name
/// Wasmtime should not ask about).
///
/// AVX and the features encoded like it (AVX2, FMA, AVX-512) need XSAVE
/// state enabled by the kernel (CR4.OSXSAVE, XCR0), which the Ember kernel
/// does not do: they are reported absent whatever cpuid says, so code
/// compiled for them is refused at load rather than faulting.
pub fn cpu_feature(feature: &str) -> Option<bool> {
    let [leaf1, leaf7, ext1] = cpuid_words();
    Some(match feature {
        "sse3" => leaf1 & (1 << 0) != 0,
        "ssse3" => leaf1 & (1 << 9) != 0,
        "sse4.1" => leaf1 & (1 << 19) != 0,
        "sse4.2" => leaf1 & (1 << 20) != 0,
        "popcnt" => leaf1 & (1 << 23) != 0,
        "bmi1" => leaf7 & (1 << 3) != 0,
        "bmi2" => leaf7 & (1 << 8) != 0,
        "lzcnt" => ext1 & (1 << 5) != 0,
        "cmpxchg16b" => leaf1 & (1 << 13) != 0,
        "avx" | "avx2" | "fma" | "avxvnni" => false,
        name if name.starts_with("avx512") => false,
        _ => return None,
    })
}

/// The CPUID words features are read from (leaf 1 ECX, leaf 7 EBX, leaf
/// 0x8000_0001 ECX), as the guest's `cpuid` reports them; the host
/// compiles for what they name (`GuestInfo::cpuid`).
pub fn cpuid_words() -> [u32; 3] {
    [
        core::arch::x86_64::__cpuid(1).ecx,
        core::arch::x86_64::__cpuid_count(7, 0).ebx,
        core::arch::x86_64::__cpuid(0x8000_0001).ecx,
    ]
}

/// The CPUID words, for error messages.
pub fn cpu_summary() -> alloc::string::String {
    let [leaf1, leaf7, ext1] = cpuid_words();
    alloc::format!("cpuid 1.ecx {leaf1:#x}, 7.ebx {leaf7:#x}, 0x80000001.ecx {ext1:#x}")
}
