//! The boot parameters ("zero page") of the Linux x86-64 boot protocol:
//! the e820 memory map and where the command line is.

use crate::vstate::memory::GuestMemoryMmap;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Range {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map of a guest with `mem_size` bytes of RAM from address 0, of
/// which `[reserved_start, mem_size)` (the mailbox) is reserved, if given.
pub fn e820_map(mem_size: u64, reserved_start: Option<u64>) -> Vec<E820Range> {
    let ram_end = reserved_start.unwrap_or(mem_size);
    let mut map = vec![
        E820Range {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Range {
            addr: HIMEM_START,
            size: ram_end - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if let Some(start) = reserved_start {
        map.push(E820Range {
            addr: start,
            size: mem_size - start,
            kind: E820_RESERVED,
        });
    }
    map
}

/// Writes the zero page at [`ZERO_PAGE_START`]: the e820 map, and the
/// command line at [`CMDLINE_START`] of `cmdline_size` bytes (with its NUL).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    e820: &[E820Range],
    cmdline_size: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    for (slot, range) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = range.addr;
        slot.size = range.size;
        slot.r#type = range.kind;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_mailbox_at_the_top() {
        let mem = 128 << 20;
        let mailbox = mem - (2 << 20);
        let map = e820_map(mem, Some(mailbox));
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Range {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].addr, 0x10_0000);
        assert_eq!(map[1].addr + map[1].size, mailbox);
        assert_eq!(
            map[2],
            E820Range {
                addr: mailbox,
                size: 2 << 20,
                kind: E820_RESERVED
            }
        );
    }

    #[test]
    fn zero_page_holds_map_and_cmdline() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let map = e820_map(16 << 20, None);
        write_boot_params(&mem, &map, 42).unwrap();
        let read: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(read.e820_entries, 2);
        assert_eq!({ read.e820_table[1].size }, (16 << 20) - 0x10_0000);
        assert_eq!({ read.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ read.hdr.cmdline_size }, 42);
        // The offsets the guest reads (guest/src/boot_params.rs).
        let mut raw = [0u8; 4096];
        mem.read_slice(&mut raw, GuestAddress(ZERO_PAGE_START))
            .unwrap();
        assert_eq!(raw[0x1e8], 2);
        assert_eq!(
            u32::from_le_bytes(raw[0x228..0x22c].try_into().unwrap()),
            0x20000
        );
        assert_eq!(
            u32::from_le_bytes(raw[0x238..0x23c].try_into().unwrap()),
            42
        );
        let second = 0x2d0 + 20;
        assert_eq!(
            u64::from_le_bytes(raw[second..second + 8].try_into().unwrap()),
            0x10_0000
        );
    }
}
