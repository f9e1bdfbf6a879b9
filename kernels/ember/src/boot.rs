//! The ring-0 boot path and the tables it loads.
//!
//! On our KVM every ring-0 instruction is emulated (~1–2 µs each), so the
//! boot path builds nothing at run time: the GDT, TSS, IDT and page tables
//! are data in the image, complete at link time. `_start` only loads them
//! and drops to ring 3 — about 30 straight-line instructions, counted on the
//! host with `ember-bench ring0` (docs/guest-kernel.md).
//!
//! Entry follows the Linux x86-64 boot protocol, as Firecracker and ember-vmm
//! implement it for an ELF vmlinux: 64-bit mode, paging on with the low
//! memory identity-mapped, interrupts off, RSI = the boot parameters ("zero
//! page"). Nothing else from the VMM is assumed — not even a stack: the
//! first instruction loads our own.

use core::arch::global_asm;

use crate::layout::*;

// _start: ring-0 setup, then iretq into ring 3 at ember_ring3_entry.
global_asm!(
    r#"
    .section .ember.boot, "ax"
    .global _start
    .code64
_start:
    mov rsp, {ring0_stack}
    lgdt [rip + ember_gdt_descriptor]
    mov ax, {kernel_ds}
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea rax, [rip + 2f]
    push {kernel_cs}
    push rax
    retfq
2:
    mov ax, {tss_selector}
    ltr ax
    lidt [rip + ember_idt_descriptor]
    lea rax, [rip + ember_pml4]
    mov cr3, rax
    mov rax, cr4
    or rax, 0x600
    mov cr4, rax
    mov rax, cr0
    and rax, -0x60000005
    or rax, 0x10022
    mov cr0, rax
    mov rdi, rsi
    push {user_ds}
    push {ring3_stack}
    push {ring3_rflags}
    push {user_cs}
    lea rax, [rip + ember_ring3_entry]
    push rax
    iretq
    "#,
    kernel_ds = const KERNEL_DS,
    kernel_cs = const KERNEL_CS,
    tss_selector = const TSS_SELECTOR,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    ring3_stack = const RING3_STACK_TOP,
    ring3_rflags = const RING3_RFLAGS,
    ring0_stack = const RING0_STACK_TOP,
);
// CR4 |= OSFXSR | OSXMMEXCPT (SSE usable in ring 3; no XSAVE in ring 0).
// CR0 &= ~(CD | NW | EM); CR0 |= MP | NE | WP.

// The first ring-3 instructions: zero .bss (ring 3 runs at native speed;
// the loader is not trusted to have done it), then the runtime's main.
global_asm!(
    r#"
    .section .text.ember_ring3_entry, "ax"
    .global ember_ring3_entry
ember_ring3_entry:
    mov r12, rdi
    lea rdi, [rip + __ember_bss_start]
    lea rcx, [rip + __ember_bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    mov rdi, r12
    call ember_main
    ud2
    "#
);

// GDT: null, kernel code, kernel data, user data, user code, TSS (16 bytes).
// It must be writable: the CPU sets accessed and busy bits in it.
global_asm!(
    r#"
    .section .data.ember_gdt, "aw"
    .balign 16
ember_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .quad {tss_low}
    .quad {tss_high}
ember_gdt_end:
    .balign 8
ember_gdt_descriptor:
    .word ember_gdt_end - ember_gdt - 1
    .quad ember_gdt
    "#,
    tss_low = const TSS_DESCRIPTOR_LOW,
    tss_high = const TSS_DESCRIPTOR_HIGH,
);

// The TSS, pinned at TSS_BASE by the linker script: RSP0 for exceptions from
// ring 3, IST1 for NMI / #DF / #MC, then an I/O permission bitmap with every
// port allowed (all bits clear, and the 0xff byte the CPU may read past the
// last one). IOPL 3 alone is not enough here: our KVM checks ring-3 port
// I/O against the bitmap whatever the IOPL (tools/probes/ring3_exception
// shows `out` from ring 3 faulting with IOPL 3 and no bitmap; a bitmap of
// all ones stops this guest at its first console write). Without its own
// bitmap the TSS would borrow whatever bytes follow it.
global_asm!(
    r#"
    .section .ember.tss, "aw"
    .global ember_tss
ember_tss:
    .long 0
    .quad {rsp0}
    .quad 0
    .quad 0
    .quad 0
    .quad {ist1}
    .quad 0, 0, 0, 0, 0, 0
    .quad 0
    .word 0
    .word 104
    .fill {io_bitmap_bytes}, 1, 0
    .byte 0xff
    "#,
    io_bitmap_bytes = const IO_BITMAP_BYTES,
    rsp0 = const RING0_STACK_TOP,
    ist1 = const IST1_STACK_TOP,
);

// The IDT: the 32 exception vectors (interrupt gates, DPL 0; NMI, #DF and
// #MC on IST1).
global_asm!(
    r#"
    .macro ember_idt_entry vector, ist, type
    .word ({isr_base} + \vector * {stride}) & 0xffff
    .word {kernel_cs}
    .byte \ist
    .byte \type
    .word (({isr_base} + \vector * {stride}) >> 16) & 0xffff
    .long ({isr_base} + \vector * {stride}) >> 32
    .long 0
    .endm

    .section .data.ember_idt, "aw"
    .balign 16
ember_idt:
    ember_idt_entry 0, 0, 0x8e
    ember_idt_entry 1, 0, 0x8e
    ember_idt_entry 2, 1, 0x8e
    ember_idt_entry 3, 0, 0x8e
    ember_idt_entry 4, 0, 0x8e
    ember_idt_entry 5, 0, 0x8e
    ember_idt_entry 6, 0, 0x8e
    ember_idt_entry 7, 0, 0x8e
    ember_idt_entry 8, 1, 0x8e
    ember_idt_entry 9, 0, 0x8e
    ember_idt_entry 10, 0, 0x8e
    ember_idt_entry 11, 0, 0x8e
    ember_idt_entry 12, 0, 0x8e
    ember_idt_entry 13, 0, 0x8e
    ember_idt_entry 14, 0, 0x8e
    ember_idt_entry 15, 0, 0x8e
    ember_idt_entry 16, 0, 0x8e
    ember_idt_entry 17, 0, 0x8e
    ember_idt_entry 18, 1, 0x8e
    ember_idt_entry 19, 0, 0x8e
    ember_idt_entry 20, 0, 0x8e
    ember_idt_entry 21, 0, 0x8e
    ember_idt_entry 22, 0, 0x8e
    ember_idt_entry 23, 0, 0x8e
    ember_idt_entry 24, 0, 0x8e
    ember_idt_entry 25, 0, 0x8e
    ember_idt_entry 26, 0, 0x8e
    ember_idt_entry 27, 0, 0x8e
    ember_idt_entry 28, 0, 0x8e
    ember_idt_entry 29, 0, 0x8e
    ember_idt_entry 30, 0, 0x8e
    ember_idt_entry 31, 0, 0x8e
ember_idt_end:
    .balign 8
ember_idt_descriptor:
    .word ember_idt_end - ember_idt - 1
    .quad ember_idt
    "#,
    isr_base = const ISR_BASE,
    stride = const ISR_STRIDE,
    kernel_cs = const KERNEL_CS,
);

// Page tables: the first 4 GiB identity-mapped with 2 MiB pages, present,
// writable, user-accessible (ring 3 runs everything; the VM is the
// isolation boundary, and the wasm sandbox inside it). Never changed.
global_asm!(
    r#"
    .section .data.ember_page_tables, "aw"
    .balign 4096
    .global ember_pml4
ember_pml4:
    .quad ember_pdpt + 0x7
    .fill 511, 8, 0
ember_pdpt:
    .quad ember_pd + 0x0000 + 0x7
    .quad ember_pd + 0x1000 + 0x7
    .quad ember_pd + 0x2000 + 0x7
    .quad ember_pd + 0x3000 + 0x7
    .fill 508, 8, 0
ember_pd:
    .set ember_pd_address, 0
    .rept 2048
    .quad ember_pd_address + 0x87
    .set ember_pd_address, ember_pd_address + 0x200000
    .endr
    "#
);
