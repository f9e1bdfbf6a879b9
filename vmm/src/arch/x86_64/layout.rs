//! Guest-physical addresses ember-vmm uses at boot. The low-memory
//! addresses are Firecracker's, so a guest sees the same boot state under
//! either VMM.

/// The boot GDT (null, code, data, TSS).
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// The boot parameters ("zero page"), passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT and one PD identity-mapping the first 1 GiB.
pub const PML4_START: u64 = 0x9000;
/// See [`PML4_START`].
pub const PDPTE_START: u64 = 0xa000;
/// See [`PML4_START`].
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of the low RAM range in the e820 map (where the EBDA would start).
pub const EBDA_START: u64 = 0x9fc00;
/// Where high memory, and the kernel, start (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
