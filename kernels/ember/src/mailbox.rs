//! The guest side of the host mailbox (layout in [`ember_abi::mailbox`]).
//!
//! The host writes the request area only while the guest is not reading
//! it — parked in the doorbell exit, on its way there after posting an
//! answer, or preparing its next instance — and reads the response area
//! once the guest has posted (it may look before the doorbell exit). Both
//! sides write their slot's sequence number last, so a new number means a
//! whole message. The doorbell ([`crate::io::doorbell`]) is a compiler
//! barrier: no access to the areas moves across it.

use core::ptr;
use core::sync::atomic::{AtomicU64, Ordering};

use ember_abi::mailbox::{
    offsets, Layout, MessageKind, Slot, MAGIC, RESTORE_ENTROPY_BYTES, VERSION,
};
use ember_abi::MailboxParam;

use crate::io::doorbell;

/// A mailbox region announced on the command line and checked against the
/// header the host wrote.
#[derive(Debug, Clone, Copy)]
pub struct Mailbox {
    base: u64,
    layout: Layout,
    port: u16,
}

impl Mailbox {
    /// Checks the region the host announced: a valid layout below the mapped
    /// limit, and a header with the expected magic, version and area size.
    ///
    /// # Safety
    /// `param` must describe guest memory that is identity-mapped and set
    /// aside for the mailbox (the VMM reserves it in the e820 map).
    pub unsafe fn open(param: MailboxParam) -> Result<Mailbox, &'static str> {
        let layout = Layout::new(param.size).ok_or("mailbox size is not a valid layout")?;
        let end = param
            .gpa
            .checked_add(param.size)
            .ok_or("mailbox wraps around")?;
        if end > ember_abi::GUEST_MAPPED_LIMIT {
            return Err("mailbox lies above the mapped 4 GiB");
        }
        let mailbox = Mailbox {
            base: param.gpa,
            layout,
            port: param.port,
        };
        if mailbox.read_u32(offsets::MAGIC) != MAGIC {
            return Err("mailbox header has the wrong magic");
        }
        if mailbox.read_u32(offsets::VERSION) != VERSION {
            return Err("mailbox protocol version differs from this guest's");
        }
        if u64::from(mailbox.read_u32(offsets::AREA_SIZE)) != layout.area_size {
            return Err("mailbox header's area size disagrees with the command line");
        }
        Ok(mailbox)
    }

    /// The region's geometry.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The request the host posted (lengths not yet checked).
    pub fn request(&self) -> Slot {
        // The host writes the sequence number last: read it first.
        let seq = self.read_u64(offsets::REQUEST_SEQ);
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        Slot {
            seq,
            kind: self.read_u32(offsets::REQUEST_KIND),
            len: self.read_u32(offsets::REQUEST_LEN),
        }
    }

    /// The restore generation the host wrote (0 until the first restore).
    pub fn generation(&self) -> u64 {
        let generation = self.read_u64(offsets::GENERATION);
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        generation
    }

    /// What the host wrote with the current generation: its wall-clock
    /// time (ns since the Unix epoch) and fresh entropy.
    pub fn restore_info(&self) -> (u64, [u8; RESTORE_ENTROPY_BYTES]) {
        let mut entropy = [0u8; RESTORE_ENTROPY_BYTES];
        for (i, chunk) in entropy.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(
                &self
                    .read_u64(offsets::RESTORE_ENTROPY + 8 * i)
                    .to_le_bytes(),
            );
        }
        (self.read_u64(offsets::RESTORE_REALTIME_NS), entropy)
    }

    /// The first `len` bytes of the request area, clamped to its capacity.
    pub fn request_payload(&self, len: u32) -> &[u8] {
        let len = (len as u64).min(self.layout.area_size) as usize;
        // SAFETY: the request area lies inside the region checked by `open`;
        // the host does not write it until the guest has answered (posted),
        // and the returned borrow of `self` cannot outlive a `post` (which
        // takes `&mut self`).
        unsafe {
            core::slice::from_raw_parts(
                (self.base + self.layout.request_offset()) as *const u8,
                len,
            )
        }
    }

    /// The first `len` bytes of the request area (clamped) and the whole
    /// response area, together: they do not overlap.
    pub fn areas(&mut self, len: u32) -> (&[u8], &mut [u8]) {
        let len = (len as u64).min(self.layout.area_size) as usize;
        // SAFETY: the two areas are disjoint parts of the region checked by
        // `open`; the host does not touch either until the guest posts,
        // which needs `&mut self` (so both borrows end first).
        unsafe {
            (
                core::slice::from_raw_parts(
                    (self.base + self.layout.request_offset()) as *const u8,
                    len,
                ),
                core::slice::from_raw_parts_mut(
                    (self.base + self.layout.response_offset()) as *mut u8,
                    self.layout.area_size as usize,
                ),
            )
        }
    }

    /// The whole response area, for the guest to write a message into.
    pub fn response_area(&mut self) -> &mut [u8] {
        // SAFETY: the response area lies inside the region checked by `open`
        // and is written only by the guest; the host reads it after a doorbell.
        unsafe {
            core::slice::from_raw_parts_mut(
                (self.base + self.layout.response_offset()) as *mut u8,
                self.layout.area_size as usize,
            )
        }
    }

    /// Posts a message of `len` bytes (already in the response area) and
    /// rings the doorbell. When the kind awaits a request, this returns once
    /// the host has posted one.
    pub fn post(&mut self, kind: MessageKind, seq: u64, len: u32) {
        self.post_raw(kind as u32, seq, len);
    }

    /// Posts a message without checking `len` against the area: the test
    /// command `bad-length` uses it to play a hostile guest.
    pub fn post_raw(&mut self, kind: u32, seq: u64, len: u32) {
        self.write_u32(offsets::RESPONSE_KIND, kind);
        self.write_u32(offsets::RESPONSE_LEN, len);
        // The sequence number goes last, after the payload and the other
        // fields: the host may take the message as soon as it sees it,
        // before the doorbell exit (x86 keeps stores in order; the fence
        // keeps the compiler from sinking the payload's stores below it).
        core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
        self.write_u64(offsets::RESPONSE_SEQ, seq);
        doorbell(self.port, 1);
    }

    fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: header fields lie in the first page of the checked region
        // and are naturally aligned (offsets in ember_abi::mailbox::offsets).
        unsafe { ptr::read_volatile((self.base + offset as u64) as *const u32) }
    }

    fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read_u32`.
        unsafe { ptr::read_volatile((self.base + offset as u64) as *const u64) }
    }

    fn write_u32(&mut self, offset: usize, value: u32) {
        // SAFETY: as in `read_u32`; the response slot is the guest's to write.
        unsafe { ptr::write_volatile((self.base + offset as u64) as *mut u32, value) }
    }

    fn write_u64(&mut self, offset: usize, value: u64) {
        // SAFETY: as in `write_u32`.
        unsafe { ptr::write_volatile((self.base + offset as u64) as *mut u64, value) }
    }
}

/// The mailbox the exception handler reports crashes to (0: none yet).
static CRASH_MAILBOX_BASE: AtomicU64 = AtomicU64::new(0);
static CRASH_MAILBOX_SIZE: AtomicU64 = AtomicU64::new(0);
static CRASH_MAILBOX_PORT: AtomicU64 = AtomicU64::new(0);

/// Lets the exception handler report crashes through `mailbox`.
pub fn register_for_crash_reports(mailbox: &Mailbox) {
    CRASH_MAILBOX_SIZE.store(mailbox.layout.size, Ordering::Relaxed);
    CRASH_MAILBOX_PORT.store(u64::from(mailbox.port), Ordering::Relaxed);
    CRASH_MAILBOX_BASE.store(mailbox.base, Ordering::Relaxed);
}

/// The mailbox registered for crash reports, if any.
pub(crate) fn crash_mailbox() -> Option<Mailbox> {
    let base = CRASH_MAILBOX_BASE.load(Ordering::Relaxed);
    if base == 0 {
        return None;
    }
    Some(Mailbox {
        base,
        layout: Layout::new(CRASH_MAILBOX_SIZE.load(Ordering::Relaxed))?,
        port: CRASH_MAILBOX_PORT.load(Ordering::Relaxed) as u16,
    })
}
