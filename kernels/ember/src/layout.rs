//! Where the kernel keeps its few things, guest-physical (identity-mapped).
//!
//! The image is linked at [`IMAGE_BASE`] (1 MiB, where a Linux-protocol
//! loader puts a vmlinux). Two pieces sit at fixed addresses because their
//! addresses are split across descriptor fields, which a linker relocation
//! cannot express: the exception entry stubs (referenced by the IDT) and the
//! TSS (referenced by its GDT descriptor). guest/linker.ld places them and
//! asserts the addresses below.
//!
//! The stacks live in low memory, which the e820 map of every Linux-protocol
//! VMM reports as RAM ([0, 0x9fc00)): the boot parameters and the command
//! line the VMM left there are read once at start and never needed again.
//! The ring-3 stack grows down from [`RING3_STACK_TOP`]; an overflow past 0
//! wraps to an unmapped address and faults (reported like any exception).

/// Where the image is linked and loaded (1 MiB).
pub const IMAGE_BASE: u64 = 0x10_0000;

/// The 32 exception entry stubs, [`ISR_STRIDE`] bytes each.
pub const ISR_BASE: u64 = 0x10_1000;

/// Size of each exception entry stub.
pub const ISR_STRIDE: u64 = 16;

/// Number of IDT entries: the 32 exception vectors. (No software-interrupt
/// gate: on our KVM `int n` from ring 3 raises #UD instead.)
pub const IDT_ENTRIES: u64 = 32;

/// The 64-bit TSS (104 bytes), followed by its I/O permission bitmap.
pub const TSS_BASE: u64 = 0x10_2000;

/// The I/O permission bitmap after the TSS: one bit per port, 65,536 ports.
pub const IO_BITMAP_BYTES: u64 = 65_536 / 8;

/// Top of the ring-0 stack the CPU switches to on an exception from ring 3 (TSS.RSP0).
pub const RING0_STACK_TOP: u64 = 0x9_c000;

/// Top of the stack for NMI, double fault and machine check (TSS.IST1).
pub const IST1_STACK_TOP: u64 = 0x9_f000;

/// Top of the ring-3 stack; it grows down through the consumed boot data.
pub const RING3_STACK_TOP: u64 = 0x9_8000;

/// GDT selector of the 64-bit kernel code segment.
pub const KERNEL_CS: u16 = 0x08;

/// GDT selector of the kernel data segment.
pub const KERNEL_DS: u16 = 0x10;

/// GDT selector of the user data segment, with RPL 3.
pub const USER_DS: u16 = 0x18 | 3;

/// GDT selector of the 64-bit user code segment, with RPL 3.
pub const USER_CS: u16 = 0x20 | 3;

/// GDT selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x28;

/// RFLAGS on entry to ring 3: IOPL 3 (port I/O allowed; our KVM also asks
/// the TSS's I/O bitmap, which allows every port), interrupts off.
pub const RING3_RFLAGS: u64 = 0x3002;

/// The low 64 bits of the TSS descriptor: base [`TSS_BASE`], page-granular
/// limit 0xfffff (G=1, as Firecracker sets it; the limit must cover the I/O
/// bitmap after the TSS: a byte-granular 104-byte TSS has none, and on our
/// KVM ring 3's first `out` then faults), type 0x9 (available 64-bit TSS),
/// present.
pub const TSS_DESCRIPTOR_LOW: u64 = 0xffff
    | ((TSS_BASE & 0xff_ffff) << 16)
    | (0x89 << 40)
    | (0xf << 48)
    | (1 << 55)
    | (((TSS_BASE >> 24) & 0xff) << 56);

/// The high 64 bits of the TSS descriptor: base bits 63:32.
pub const TSS_DESCRIPTOR_HIGH: u64 = TSS_BASE >> 32;

/// The address of exception stub `vector`.
pub const fn isr_address(vector: u64) -> u64 {
    ISR_BASE + vector * ISR_STRIDE
}
