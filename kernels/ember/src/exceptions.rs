//! Exception handling: report and stop.
//!
//! Every exception is fatal. The handler (ring 0, emulated on our KVM, so
//! kept to plain integer code) prints one line on the serial console —
//! `EMBER-GUEST-CRASH vector=14 (#PF) error=0x4 rip=… cr2=… rsp=… cs=…` —
//! and stops the VM: it posts a [`CrashReport`] through the mailbox when the
//! runtime has registered one (the host ends the VM on it); without a
//! mailbox it triple-faults, which ends the VM under any VMM. A fault inside
//! the handler triple-faults at once.
//!
//! One #UD is not a crash: the `ud2` at `ember_park_trap`, which ring 3
//! runs to halt the vCPU when it has nothing left to do and no host to wait
//! on. (A software-interrupt gate would be the textbook way, but on our KVM
//! `int n` from ring 3 raises #UD.)

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, Ordering};

use ember_abi::mailbox::CrashReport;
use ember_abi::{exception_name, ByteWriter, CRASH_MARKER};

use crate::{console, crash};

// The entry stubs, pinned at ISR_BASE by the linker script, ISR_STRIDE bytes
// apart: push a zero error code where the CPU pushes none, push the vector,
// join the common path.
global_asm!(
    r#"
    .macro ember_isr_noerr vector
    .balign 16
    push 0
    push \vector
    jmp ember_isr_common
    .endm

    .macro ember_isr_err vector
    .balign 16
    push \vector
    jmp ember_isr_common
    .endm

    .section .ember.isr, "ax"
    .global ember_isr_stubs
ember_isr_stubs:
    ember_isr_noerr 0
    ember_isr_noerr 1
    ember_isr_noerr 2
    ember_isr_noerr 3
    ember_isr_noerr 4
    ember_isr_noerr 5
    ember_isr_noerr 6
    ember_isr_noerr 7
    ember_isr_err 8
    ember_isr_noerr 9
    ember_isr_err 10
    ember_isr_err 11
    ember_isr_err 12
    ember_isr_err 13
    ember_isr_err 14
    ember_isr_noerr 15
    ember_isr_noerr 16
    ember_isr_err 17
    ember_isr_noerr 18
    ember_isr_noerr 19
    ember_isr_noerr 20
    ember_isr_err 21
    ember_isr_noerr 22
    ember_isr_noerr 23
    ember_isr_noerr 24
    ember_isr_noerr 25
    ember_isr_noerr 26
    ember_isr_noerr 27
    ember_isr_noerr 28
    ember_isr_err 29
    ember_isr_err 30
    ember_isr_noerr 31
    .balign 16
    .global ember_isr_stubs_end
ember_isr_stubs_end:

    .section .text.ember_isr_common, "ax"
ember_isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    call ember_exception
    ud2

    .section .text.ember_park, "ax"
    .global ember_park_trap
ember_park_trap:
    ud2
    jmp ember_park_trap
    "#
);

extern "C" {
    /// The `ud2` that parks the vCPU (see the module docs).
    static ember_park_trap: u8;
}

/// The #UD vector.
const VECTOR_UD: u64 = 6;

/// The stack at `ember_exception`: registers pushed by the common path, the
/// vector and error code pushed by the stub, then the CPU's frame.
#[repr(C)]
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Set while an exception is being reported, so that a fault inside the
/// handler halts instead of recursing.
static HANDLING: AtomicBool = AtomicBool::new(false);

/// The common exception handler, called by `ember_isr_common` in ring 0.
#[no_mangle]
extern "C" fn ember_exception(frame: &ExceptionFrame) -> ! {
    if frame.vector == VECTOR_UD && frame.rip == core::ptr::addr_of!(ember_park_trap) as u64 {
        halt_forever();
    }
    if HANDLING.load(Ordering::Relaxed) {
        triple_fault();
    }
    HANDLING.store(true, Ordering::Relaxed);

    let report = CrashReport {
        vector: frame.vector,
        error_code: frame.error_code,
        rip: frame.rip,
        cs: frame.cs,
        rflags: frame.rflags,
        rsp: frame.rsp,
        ss: frame.ss,
        cr2: read_cr2(),
        gprs: [
            frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp, frame.r8,
            frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15,
        ],
    };

    let mut line = [0u8; 192];
    let mut w = ByteWriter::new(&mut line);
    w.push_str(CRASH_MARKER);
    w.push_str(" vector=");
    w.push_dec(report.vector);
    w.push_str(" (");
    w.push_str(exception_name(report.vector));
    w.push_str(") error=");
    w.push_hex(report.error_code);
    w.push_str(" rip=");
    w.push_hex(report.rip);
    w.push_str(" cr2=");
    w.push_hex(report.cr2);
    w.push_str(" rsp=");
    w.push_hex(report.rsp);
    w.push_str(" cs=");
    w.push_hex(report.cs);
    w.push_str("\n");
    console::write_bytes(w.as_bytes());

    if !crash::post_report(&report) {
        triple_fault();
    }
    // The host ends the VM on the report; should it not, stay halted.
    halt_forever()
}

/// Stops the VM the way every VMM notices: an exception that cannot be
/// delivered. With an empty IDT, `ud2` raises #UD, which escalates to #GP,
/// #DF and a triple fault (KVM_EXIT_SHUTDOWN; ember-vmm exit code 11).
fn triple_fault() -> ! {
    let empty_idt = [0u16; 5];
    // SAFETY: ring 0; loads an IDT of limit 0 (10 bytes on our stack) and
    // faults; nothing runs after, so nothing depends on the old IDT.
    unsafe { asm!("lidt [{0}]", "ud2", in(reg) &empty_idt, options(noreturn, nostack)) }
}

/// CR2: the linear address of the last page fault.
fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects; this runs in ring 0.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    cr2
}

/// Halts the vCPU for good (ring 0 only): interrupts off, `hlt` in a loop.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this vCPU; nothing is expected to run after.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Parks the vCPU from ring 3: faults at `ember_park_trap`, whose #UD the
/// handler turns into a silent halt. Never returns. Used when there is no
/// host to wait on.
pub fn park() -> ! {
    // SAFETY: jumps to the trap, which never returns; no memory of ours is touched.
    unsafe { asm!("jmp ember_park_trap", options(noreturn, nomem, nostack)) }
}
