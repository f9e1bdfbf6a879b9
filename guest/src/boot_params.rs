//! The Linux boot parameters ("zero page") the VMM passed in RSI: the e820
//! memory map and the command line. Read once at start: the stack later
//! grows over them (see kernels/ember/src/layout.rs).

use core::ptr;

/// Offset of `e820_entries` (u8) in `struct boot_params`.
const E820_ENTRIES: u64 = 0x1e8;
/// Offset of `e820_table` (128 entries of 20 bytes).
const E820_TABLE: u64 = 0x2d0;
/// Most entries the zero page holds.
const E820_MAX: usize = 128;
/// Offset of `hdr.cmd_line_ptr` (u32).
const CMD_LINE_PTR: u64 = 0x228;
/// Offset of `ext_cmd_line_ptr` (u32, bits 63:32 of the command line address).
const EXT_CMD_LINE_PTR: u64 = 0x0c8;
/// Offset of `hdr.cmdline_size` (u32).
const CMDLINE_SIZE: u64 = 0x238;
/// Longest command line read, whatever the header says.
const CMDLINE_MAX: u64 = 64 * 1024;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;

/// One e820 range.
#[derive(Debug, Clone, Copy, Default)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// 1 = RAM; anything else is reserved.
    pub kind: u32,
}

impl E820Entry {
    /// Whether the range is usable RAM.
    pub fn is_ram(&self) -> bool {
        self.kind == E820_RAM
    }

    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// What the runtime keeps from the boot parameters.
pub struct BootParams {
    e820: [E820Entry; E820_MAX],
    e820_len: usize,
    cmdline: &'static [u8],
}

impl BootParams {
    /// Reads the zero page at guest-physical `addr`.
    ///
    /// # Safety
    /// `addr` must be the boot parameters the VMM passed in RSI, and the
    /// command line they point to must stay untouched while the returned
    /// value is used.
    pub unsafe fn read(addr: u64) -> BootParams {
        // SAFETY: the caller guarantees the zero page is at `addr`; all
        // offsets below lie inside its 4 KiB, and memory below 4 GiB is
        // identity-mapped.
        unsafe {
            let e820_len =
                (ptr::read_volatile((addr + E820_ENTRIES) as *const u8) as usize).min(E820_MAX);
            let mut e820 = [E820Entry::default(); E820_MAX];
            for (i, entry) in e820.iter_mut().take(e820_len).enumerate() {
                let at = addr + E820_TABLE + 20 * i as u64;
                *entry = E820Entry {
                    addr: ptr::read_unaligned(at as *const u64),
                    size: ptr::read_unaligned((at + 8) as *const u64),
                    kind: ptr::read_unaligned((at + 16) as *const u32),
                };
            }
            let low = u64::from(ptr::read_volatile((addr + CMD_LINE_PTR) as *const u32));
            let high = u64::from(ptr::read_volatile((addr + EXT_CMD_LINE_PTR) as *const u32));
            let cmdline_ptr = low | (high << 32);
            let size = u64::from(ptr::read_volatile((addr + CMDLINE_SIZE) as *const u32));
            let max = if size == 0 {
                CMDLINE_MAX
            } else {
                size.min(CMDLINE_MAX)
            };
            let cmdline = if cmdline_ptr == 0
                || cmdline_ptr.saturating_add(max) > ember_abi::GUEST_MAPPED_LIMIT
            {
                &[][..]
            } else {
                let all = core::slice::from_raw_parts(cmdline_ptr as *const u8, max as usize);
                let len = all.iter().position(|&b| b == 0).unwrap_or(all.len());
                &all[..len]
            };
            BootParams {
                e820,
                e820_len,
                cmdline,
            }
        }
    }

    /// The e820 map.
    pub fn e820(&self) -> &[E820Entry] {
        &self.e820[..self.e820_len]
    }

    /// The kernel command line (without its NUL).
    pub fn cmdline(&self) -> &'static [u8] {
        self.cmdline
    }

    /// The end of guest memory as the e820 map describes it (RAM and
    /// reserved ranges, the mailbox among them), below the mapped limit.
    pub fn memory_end(&self) -> u64 {
        self.e820()
            .iter()
            .map(|e| e.end().min(ember_abi::GUEST_MAPPED_LIMIT))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of usable RAM below the mapped limit.
    pub fn ram_bytes(&self) -> u64 {
        self.e820()
            .iter()
            .filter(|e| e.is_ram())
            .map(|e| {
                e.end()
                    .min(ember_abi::GUEST_MAPPED_LIMIT)
                    .saturating_sub(e.addr)
            })
            .sum()
    }
}
