//! The Ember guest runtime: everything the guest does after ring-0 setup,
//! in ring 3 (IOPL 3). It prints the ready marker on the console, then
//! serves the host mailbox: it loads and invokes functions (WebAssembly on
//! Wasmtime, precompiled on the host, with WASI preview 1;
//! docs/functions.md).
#![no_std]
#![no_main]

extern crate alloc;

mod boot_params;
mod clock;
mod function;
mod heap;
mod platform;
mod rng;
mod serve;
mod wasi;

use core::fmt::Write;

use ember_abi::mailbox::{GuestInfo, VERSION};
use ember_abi::READY_MARKER;
use ember_kernel::console;
use ember_kernel::mailbox::Mailbox;

use crate::boot_params::BootParams;

/// Entered from `ember_ring3_entry` (kernels/ember) in ring 3.
#[no_mangle]
extern "C" fn ember_main(boot_params: u64) -> ! {
    clock::init();
    // SAFETY: the kernel passes on RSI from the VMM, the boot parameters;
    // nothing has touched low memory yet.
    let boot = unsafe { BootParams::read(boot_params) };
    let mailbox_param = ember_abi::parse_mailbox_param(boot.cmdline());
    let heap_bytes = heap::init(&boot);

    console::write_str(READY_MARKER);
    console::write_str("\n");

    if has_word(boot.cmdline(), ember_abi::CMDLINE_TEST_CRASH_AT_BOOT) {
        serve::crash();
    }

    let param = match mailbox_param {
        Some(Ok(param)) => param,
        Some(Err(problem)) => stop(problem),
        None => stop("no ember.mailbox on the command line (not ember-vmm)"),
    };
    // SAFETY: the VMM announced the region on the command line and reserves
    // it in the e820 map; `open` checks its bounds and header.
    let mailbox = match unsafe { Mailbox::open(param) } {
        Ok(mailbox) => mailbox,
        Err(problem) => stop(problem),
    };
    // As large as the request area, which bounds a load's size anyway.
    let Some(code) = heap::CodeArea::reserve(mailbox.layout().area_size) else {
        stop("no room in the heap for the code area");
    };
    let info = GuestInfo {
        abi_version: VERSION,
        ram_bytes: boot.ram_bytes(),
        heap_bytes,
        image_end: heap::image_end(),
        cpuid: platform::cpuid_words(),
        code_area: code.gpa(),
        code_area_bytes: code.size() as u64,
    };
    serve::serve(mailbox, code, &info, boot.memory_end())
}

/// Whether `word` appears as a whole word in the command line.
fn has_word(cmdline: &[u8], word: &str) -> bool {
    cmdline
        .split(|&b| b == b' ' || b == b'\t' || b == b'\n')
        .any(|w| w == word.as_bytes())
}

/// Says why on the console and parks the vCPU.
fn stop(why: &str) -> ! {
    console::write_str("ember: ");
    console::write_str(why);
    console::write_str("; parking\n");
    ember_kernel::park()
}

/// Writes formatted text to the console.
struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        console::write_str(s);
        Ok(())
    }
}

/// A runtime panic is a crash: say what on the console, then fault so that
/// the exception handler reports it to the host (vector 6, #UD).
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Console, "EMBER-GUEST-PANIC {info}");
    loop {
        // SAFETY: ud2 raises #UD, handled (and reported) by the kernel.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
}
