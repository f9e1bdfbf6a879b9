//! The Ember guest ABI, shared by the host (ember-vmm) and the guest (kernels/ember + guest/).
//!
//! Three things cross the boundary between the VMM and the Ember guest:
//!
//! - the boot command line, where the VMM announces the mailbox with
//!   [`CMDLINE_MAILBOX`] (`ember.mailbox=<gpa>,<size>,<port>`);
//! - the mailbox: a shared-memory region (a [`mailbox::Header`] page, a request
//!   area written by the host and a response area written by the guest) and an
//!   `out`-only doorbell I/O port;
//! - the console: the 8250 UART at [`SERIAL_PORT`], where the guest prints
//!   [`READY_MARKER`] and crash reports.
//!
//! Everything here is plain data with explicit little-endian encodings: the
//! host decodes what the guest wrote as hostile input, so nothing is read
//! through a pointer cast. docs/guest-abi.md describes the same ABI in prose.
#![no_std]

extern crate alloc;

pub mod function;
pub mod mailbox;
pub mod wire;

/// The I/O port of the 8250 UART the guest prints its console on (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;

/// The i8042 command port; writing [`I8042_RESET`] to it asks the VMM to reset the VM.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// The i8042 "pulse reset line" command.
pub const I8042_RESET: u8 = 0xfe;

/// Printed by the guest runtime on the console once it runs in ring 3.
pub const READY_MARKER: &str = "EMBER-GUEST-READY";

/// Starts the console line the guest's exception handler prints.
pub const CRASH_MARKER: &str = "EMBER-GUEST-CRASH";

/// Command-line key that announces the mailbox: `ember.mailbox=<gpa>,<size>,<port>`,
/// each number in hexadecimal with a `0x` prefix.
pub const CMDLINE_MAILBOX: &str = "ember.mailbox";

/// Test only: with this word on the command line the guest faults right
/// after printing its marker, before it opens the mailbox.
pub const CMDLINE_TEST_CRASH_AT_BOOT: &str = "ember.test_crash_at_boot";

/// The guest maps guest-physical memory below this address (identity-mapped
/// with 2 MiB pages, page tables built into the image). RAM and the mailbox
/// must lie below it to be usable by the guest.
pub const GUEST_MAPPED_LIMIT: u64 = 4 << 30;

/// The mnemonic of an x86 exception vector (`#PF` for 14), or `"?"`.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        _ => "?",
    }
}

/// Formats the `ember.mailbox=` command-line parameter for a mailbox at `gpa`
/// of `size` bytes with its doorbell on `port`, into `buf`; returns the text.
pub fn format_mailbox_param(buf: &mut [u8; 80], gpa: u64, size: u64, port: u16) -> &str {
    let mut w = ByteWriter::new(&mut buf[..]);
    w.push_str(CMDLINE_MAILBOX);
    w.push_str("=");
    w.push_hex(gpa);
    w.push_str(",");
    w.push_hex(size);
    w.push_str(",");
    w.push_hex(u64::from(port));
    let len = w.len;
    // Only ASCII was written.
    core::str::from_utf8(&buf[..len]).unwrap_or("")
}

/// A mailbox announced on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxParam {
    /// Guest-physical address of the region (page-aligned).
    pub gpa: u64,
    /// Size of the region in bytes.
    pub size: u64,
    /// The doorbell I/O port.
    pub port: u16,
}

/// Finds and parses `ember.mailbox=<gpa>,<size>,<port>` in a kernel command line.
///
/// Returns `None` when the key is absent; `Some(Err(..))` when it is present
/// but malformed (the text says what is wrong).
pub fn parse_mailbox_param(cmdline: &[u8]) -> Option<Result<MailboxParam, &'static str>> {
    let value = cmdline
        .split(|&b| b == b' ' || b == b'\n' || b == b'\t' || b == 0)
        .find_map(|word| {
            word.strip_prefix(CMDLINE_MAILBOX.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })?;
    let mut parts = value.split(|&b| b == b',');
    let mut next = |what: &'static str| -> Result<u64, &'static str> {
        parts.next().and_then(parse_u64).ok_or(what)
    };
    let parsed = (|| {
        let gpa = next("ember.mailbox: bad guest-physical address")?;
        let size = next("ember.mailbox: bad size")?;
        let port = next("ember.mailbox: bad doorbell port")?;
        let port = u16::try_from(port).map_err(|_| "ember.mailbox: port above 0xffff")?;
        if !gpa.is_multiple_of(4096) {
            return Err("ember.mailbox: address not page-aligned");
        }
        Ok(MailboxParam { gpa, size, port })
    })();
    Some(parsed)
}

/// Parses a decimal or `0x`-prefixed hexadecimal number.
fn parse_u64(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(radix)?;
        acc.checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))
    })
}

/// A fixed buffer that text is appended to, silently truncated when full.
pub struct ByteWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> ByteWriter<'a> {
    /// A writer filling `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Self {
        ByteWriter { buf, len: 0 }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Appends a string.
    pub fn push_str(&mut self, s: &str) {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    /// Appends `value` as `0x`-prefixed lowercase hexadecimal without leading zeros.
    pub fn push_hex(&mut self, value: u64) {
        let mut digits = [0u8; 18];
        digits[0] = b'0';
        digits[1] = b'x';
        let count = (((64 - value.leading_zeros()) as usize).div_ceil(4)).max(1);
        for i in 0..count {
            let nibble = (value >> (4 * (count - 1 - i))) & 0xf;
            digits[2 + i] = b"0123456789abcdef"[nibble as usize];
        }
        // The digits are ASCII.
        self.push_str(core::str::from_utf8(&digits[..2 + count]).unwrap_or(""));
    }

    /// Appends `value` in decimal.
    pub fn push_dec(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        // The digits are ASCII.
        self.push_str(core::str::from_utf8(&digits[i..]).unwrap_or(""));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_param_round_trips() {
        let mut buf = [0u8; 80];
        let text = format_mailbox_param(&mut buf, 0x7e00000, 0x200000, 0xee0);
        assert_eq!(text, "ember.mailbox=0x7e00000,0x200000,0xee0");
        let cmdline = b"console=ttyS0 ember.mailbox=0x7e00000,0x200000,0xee0 quiet\0";
        assert_eq!(
            parse_mailbox_param(cmdline),
            Some(Ok(MailboxParam {
                gpa: 0x7e00000,
                size: 0x200000,
                port: 0xee0
            }))
        );
    }

    #[test]
    fn mailbox_param_absent_or_malformed() {
        assert_eq!(parse_mailbox_param(b"reboot=k panic=1"), None);
        assert!(matches!(
            parse_mailbox_param(b"ember.mailbox=0x1000,0x2000"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_mailbox_param(b"ember.mailbox=0x1001,0x2000,0xee0"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_mailbox_param(b"ember.mailbox=0x1000,0x2000,0x10000"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_mailbox_param(b"ember.mailbox=0xzz,0x2000,0xee0"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_mailbox_param(b"ember.mailbox=0xffffffffffffffffff,1,1"),
            Some(Err(_))
        ));
    }

    #[test]
    fn writer_formats_numbers() {
        let mut buf = [0u8; 64];
        let mut w = ByteWriter::new(&mut buf);
        w.push_hex(0);
        w.push_str(" ");
        w.push_hex(0xdead_0000_0000);
        w.push_str(" ");
        w.push_dec(0);
        w.push_str(" ");
        w.push_dec(18_446_744_073_709_551_615);
        assert_eq!(
            w.as_bytes(),
            b"0x0 0xdead00000000 0 18446744073709551615".as_slice()
        );
    }

    #[test]
    fn writer_truncates() {
        let mut buf = [0u8; 4];
        let mut w = ByteWriter::new(&mut buf);
        w.push_str("abcdef");
        assert_eq!(w.as_bytes(), b"abcd");
    }
}
