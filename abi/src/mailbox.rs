//! The host mailbox: a shared-memory region and an `out`-only doorbell port.
//!
//! ```text
//! region (size announced on the command line, page-aligned)
//! +0                  header page: magic, version, area size, request slot, response slot
//! +HEADER_SIZE        request area   (area_size bytes, written by the host)
//! +HEADER_SIZE+area   response area  (area_size bytes, written by the guest)
//! ```
//!
//! The exchange is strictly alternating. The guest writes a message (its
//! payload, kind and length, then — last — the sequence number of the
//! request it answers) into the response slot and area, then writes one
//! byte to the doorbell port with `out`. (Because the sequence number goes
//! last, a host may take the message as soon as the number appears, before
//! the exit; the host likewise writes a request's number last.) The
//! VMM handles that exit; when the message says the guest now waits for work
//! ([`MessageKind::awaits_request`]), the vCPU stays parked in the exit until
//! the host has written the next request into the request slot and area, so
//! an idle guest costs no CPU and every request costs one exit. Because
//! replies travel in memory and the doorbell is `out`-only (no `in` whose
//! result could be lost), a snapshot taken while the vCPU is parked there can
//! resume cleanly once the VMM has completed the pending `out`.

/// Header magic, `EMBX` in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"EMBX");

/// Version of the mailbox protocol described here.
pub const VERSION: u32 = 5;

/// Size of the header page at the start of the region.
pub const HEADER_SIZE: u64 = 4096;

/// Bytes of the header that carry fields (the rest of the page is reserved).
pub const HEADER_BYTES: usize = 96;

/// Bytes of fresh entropy the host gives the guest after a restore.
pub const RESTORE_ENTROPY_BYTES: usize = 32;

/// The doorbell port ember-vmm announces unless told otherwise.
pub const DEFAULT_DOORBELL_PORT: u16 = 0x0ee0;

/// The mailbox size ember-vmm uses unless told otherwise: two areas of just
/// under 8 MiB each, enough for a 6 MiB event or result in one piece.
/// Pages cost nothing until touched.
pub const DEFAULT_SIZE: u64 = 16 << 20;

/// Smallest usable region: the header and one page per area.
pub const MIN_SIZE: u64 = 3 * 4096;

/// Byte offsets of the header fields (all little-endian).
pub mod offsets {
    /// `u32`: [`super::MAGIC`], written by the host at boot.
    pub const MAGIC: usize = 0;
    /// `u32`: [`super::VERSION`], written by the host at boot.
    pub const VERSION: usize = 4;
    /// `u32`: the capacity of each data area, written by the host at boot.
    pub const AREA_SIZE: usize = 8;
    /// `u64`: sequence number of the current request (host → guest).
    pub const REQUEST_SEQ: usize = 16;
    /// `u32`: [`super::RequestKind`] of the current request.
    pub const REQUEST_KIND: usize = 24;
    /// `u32`: bytes of request payload in the request area.
    pub const REQUEST_LEN: usize = 28;
    /// `u64`: the request sequence number this message answers (0 for none).
    pub const RESPONSE_SEQ: usize = 32;
    /// `u32`: [`super::MessageKind`] of the guest's message.
    pub const RESPONSE_KIND: usize = 40;
    /// `u32`: bytes of message payload in the response area.
    pub const RESPONSE_LEN: usize = 44;
    /// `u64`: the restore generation (host → guest): 0 from boot, a new
    /// value after every restore, written by the host before the vCPUs
    /// resume and after the two fields below. A guest that sees it change
    /// reseeds its random generator from the entropy and resets its wall
    /// clock, before it serves the request at hand.
    pub const GENERATION: usize = 48;
    /// `u64`: the host's wall-clock time at the restore, ns since the Unix epoch.
    pub const RESTORE_REALTIME_NS: usize = 56;
    /// [`super::RESTORE_ENTROPY_BYTES`] bytes of fresh entropy.
    pub const RESTORE_ENTROPY: usize = 64;
}

/// Geometry of a mailbox region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Size of the whole region in bytes.
    pub size: u64,
    /// Capacity of each data area in bytes: the largest payload either way.
    pub area_size: u64,
}

impl Layout {
    /// The layout of a region of `size` bytes, or `None` when `size` is not a
    /// multiple of 4 KiB, is smaller than [`MIN_SIZE`], or its areas would
    /// not fit a `u32` length.
    pub const fn new(size: u64) -> Option<Layout> {
        if !size.is_multiple_of(4096) || size < MIN_SIZE {
            return None;
        }
        let area_size = ((size - HEADER_SIZE) / 2) & !0xfff;
        if area_size > u32::MAX as u64 {
            return None;
        }
        Some(Layout { size, area_size })
    }

    /// Offset of the request area from the start of the region.
    pub const fn request_offset(&self) -> u64 {
        HEADER_SIZE
    }

    /// Offset of the response area from the start of the region.
    pub const fn response_offset(&self) -> u64 {
        HEADER_SIZE + self.area_size
    }
}

/// What the host asks of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RequestKind {
    /// Answer with [`MessageKind::Pong`].
    Ping = 1,
    /// Answer with [`MessageKind::EchoReply`] carrying the request payload.
    Echo = 2,
    /// Answer with [`MessageKind::ShutdownAck`] and stop.
    Shutdown = 3,
    /// Load a function (payload: [`crate::function::LoadSpec`]; the host
    /// first writes the compiled module at the start of the guest's code
    /// area, [`GuestInfo::code_area`]); answer [`MessageKind::Loaded`] or
    /// [`MessageKind::LoadFailed`].
    Load = 4,
    /// Invoke the loaded function (payload: [`crate::function::InvokeParams`]
    /// then the event); answer [`MessageKind::Outcome`] or
    /// [`MessageKind::OutcomePreparing`].
    Invoke = 5,
    /// Answer [`MessageKind::Stats`].
    Stats = 6,
    /// Test only: fault (a page fault at [`TEST_CRASH_ADDRESS`]).
    TestCrash = 0x100,
    /// Test only: write the i8042 reset command from ring 3.
    TestReset = 0x101,
    /// Test only: answer with a message whose length exceeds the response area.
    TestBadLength = 0x102,
    /// Test only: never answer (spin in ring 3).
    TestHang = 0x103,
}

/// The address the guest touches to fault on [`RequestKind::TestCrash`]:
/// above [`crate::GUEST_MAPPED_LIMIT`], so unmapped, canonical (a page
/// fault, not a general-protection fault) and easy to recognise in CR2.
pub const TEST_CRASH_ADDRESS: u64 = 0x0bad_0000_0000;

impl RequestKind {
    /// The kind with wire code `code`, if any.
    pub const fn from_u32(code: u32) -> Option<RequestKind> {
        Some(match code {
            1 => RequestKind::Ping,
            2 => RequestKind::Echo,
            3 => RequestKind::Shutdown,
            4 => RequestKind::Load,
            5 => RequestKind::Invoke,
            6 => RequestKind::Stats,
            0x100 => RequestKind::TestCrash,
            0x101 => RequestKind::TestReset,
            0x102 => RequestKind::TestBadLength,
            0x103 => RequestKind::TestHang,
            _ => return None,
        })
    }
}

/// What the guest posts to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MessageKind {
    /// The runtime is up; payload: [`GuestInfo`]. The guest then waits for a request.
    Ready = 1,
    /// Answer to [`RequestKind::Ping`]; no payload.
    Pong = 2,
    /// Answer to [`RequestKind::Echo`]; payload: the request payload.
    EchoReply = 3,
    /// Answer to [`RequestKind::Shutdown`]; the guest stops.
    ShutdownAck = 4,
    /// A request could not be served; payload: UTF-8 text naming why.
    Error = 5,
    /// The guest took an exception; payload: [`CrashReport`]. The guest stops.
    Crash = 6,
    /// The function is loaded and initialised; payload:
    /// [`crate::function::LoadedInfo`].
    Loaded = 7,
    /// The function could not be loaded; payload: UTF-8 text naming why.
    LoadFailed = 8,
    /// An invocation's outcome; payload: [`crate::function::Outcome`]. The
    /// guest then waits.
    Outcome = 9,
    /// An invocation's outcome, as [`MessageKind::Outcome`], but the guest
    /// goes on to prepare the next instance: the host resumes it at once.
    /// When done, the guest serves a request the host posted meanwhile
    /// without exiting, or else posts [`MessageKind::Idle`] and waits.
    OutcomePreparing = 10,
    /// The guest finished its work after an outcome and waits.
    Idle = 11,
    /// Counters; payload: [`crate::function::GuestStats`].
    Stats = 12,
}

impl MessageKind {
    /// The kind with wire code `code`, if any.
    pub const fn from_u32(code: u32) -> Option<MessageKind> {
        Some(match code {
            1 => MessageKind::Ready,
            2 => MessageKind::Pong,
            3 => MessageKind::EchoReply,
            4 => MessageKind::ShutdownAck,
            5 => MessageKind::Error,
            6 => MessageKind::Crash,
            7 => MessageKind::Loaded,
            8 => MessageKind::LoadFailed,
            9 => MessageKind::Outcome,
            10 => MessageKind::OutcomePreparing,
            11 => MessageKind::Idle,
            12 => MessageKind::Stats,
            _ => return None,
        })
    }

    /// After posting this message, the guest waits in the doorbell exit for
    /// the next request.
    pub const fn awaits_request(self) -> bool {
        !matches!(
            self,
            MessageKind::OutcomePreparing | MessageKind::ShutdownAck | MessageKind::Crash
        )
    }

    /// After posting this message, the guest has stopped for good.
    pub const fn is_terminal(self) -> bool {
        matches!(self, MessageKind::ShutdownAck | MessageKind::Crash)
    }
}

/// Reads a little-endian `u64` at `at`; `None` if `bytes` is too short.
fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(8)?)?;
    let mut le = [0u8; 8];
    le.copy_from_slice(raw);
    Some(u64::from_le_bytes(le))
}

/// Reads a little-endian `u32` at `at`; `None` if `bytes` is too short.
fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    let mut le = [0u8; 4];
    le.copy_from_slice(raw);
    Some(u32::from_le_bytes(le))
}

/// One direction's slot of the header, as read from memory (not validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    /// Sequence number.
    pub seq: u64,
    /// Raw kind code.
    pub kind: u32,
    /// Raw payload length.
    pub len: u32,
}

impl Slot {
    /// Decodes the response slot from a copy of the header bytes.
    pub fn response_from_header(header: &[u8; HEADER_BYTES]) -> Slot {
        Slot::decode(header, offsets::RESPONSE_SEQ)
    }

    /// Decodes the request slot from a copy of the header bytes.
    pub fn request_from_header(header: &[u8; HEADER_BYTES]) -> Slot {
        Slot::decode(header, offsets::REQUEST_SEQ)
    }

    fn decode(header: &[u8; HEADER_BYTES], at: usize) -> Slot {
        Slot {
            seq: read_u64(header, at).unwrap_or(0),
            kind: read_u32(header, at + 8).unwrap_or(0),
            len: read_u32(header, at + 12).unwrap_or(0),
        }
    }

    /// Encodes the slot as the 16 bytes stored at its offset.
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..12].copy_from_slice(&self.kind.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }
}

/// Payload of [`MessageKind::Ready`]: what the guest found at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestInfo {
    /// The mailbox protocol version the guest speaks ([`VERSION`]).
    pub abi_version: u32,
    /// Usable RAM the guest found in the e820 map, in bytes.
    pub ram_bytes: u64,
    /// Bytes of that RAM the runtime gave to its heap.
    pub heap_bytes: u64,
    /// End of the guest image (first byte after it), guest-physical.
    pub image_end: u64,
    /// The CPU the guest sees, as its CPUID instruction reports it (which
    /// on some KVMs is not the table the VMM set): leaf 1 ECX, leaf 7
    /// (subleaf 0) EBX, leaf 0x8000_0001 ECX. The host compiles functions
    /// for these features.
    pub cpuid: [u32; 3],
    /// Where the host writes a compiled module before it sends `load`:
    /// guest-physical, page-aligned, reserved by the guest's heap at boot
    /// (untouched until then), so the guest runs the code where the host
    /// put it, without copying it out of the request area.
    pub code_area: u64,
    /// Bytes of the code area: the largest compiled module this guest takes.
    pub code_area_bytes: u64,
}

impl GuestInfo {
    /// Encoded size in bytes.
    pub const SIZE: usize = 64;

    /// Encodes the info as little-endian fields.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0..4].copy_from_slice(&self.abi_version.to_le_bytes());
        out[8..16].copy_from_slice(&self.ram_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.heap_bytes.to_le_bytes());
        out[24..32].copy_from_slice(&self.image_end.to_le_bytes());
        for (i, word) in self.cpuid.iter().enumerate() {
            out[32 + 4 * i..36 + 4 * i].copy_from_slice(&word.to_le_bytes());
        }
        out[48..56].copy_from_slice(&self.code_area.to_le_bytes());
        out[56..64].copy_from_slice(&self.code_area_bytes.to_le_bytes());
        out
    }

    /// Decodes the info; `None` unless `bytes` is exactly [`Self::SIZE`] long.
    pub fn decode(bytes: &[u8]) -> Option<GuestInfo> {
        if bytes.len() != Self::SIZE {
            return None;
        }
        Some(GuestInfo {
            abi_version: read_u32(bytes, 0)?,
            ram_bytes: read_u64(bytes, 8)?,
            heap_bytes: read_u64(bytes, 16)?,
            image_end: read_u64(bytes, 24)?,
            cpuid: [
                read_u32(bytes, 32)?,
                read_u32(bytes, 36)?,
                read_u32(bytes, 40)?,
            ],
            code_area: read_u64(bytes, 48)?,
            code_area_bytes: read_u64(bytes, 56)?,
        })
    }
}

/// Payload of [`MessageKind::Crash`]: the exception and the interrupted state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CrashReport {
    /// Exception vector (14 for a page fault).
    pub vector: u64,
    /// The error code the CPU pushed, or 0.
    pub error_code: u64,
    /// Where the exception happened.
    pub rip: u64,
    /// Code segment at the exception (its low two bits are the privilege level).
    pub cs: u64,
    /// RFLAGS at the exception.
    pub rflags: u64,
    /// Stack pointer at the exception.
    pub rsp: u64,
    /// Stack segment at the exception.
    pub ss: u64,
    /// CR2: the faulting address of a page fault.
    pub cr2: u64,
    /// General-purpose registers: rax, rbx, rcx, rdx, rsi, rdi, rbp, r8–r15.
    pub gprs: [u64; 15],
}

impl CrashReport {
    /// Encoded size in bytes.
    pub const SIZE: usize = 23 * 8;

    /// Encodes the report as little-endian `u64`s in field order.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let head = [
            self.vector,
            self.error_code,
            self.rip,
            self.cs,
            self.rflags,
            self.rsp,
            self.ss,
            self.cr2,
        ];
        for (i, value) in head.iter().chain(self.gprs.iter()).enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    /// Decodes a report; `None` unless `bytes` is exactly [`Self::SIZE`] long.
    pub fn decode(bytes: &[u8]) -> Option<CrashReport> {
        if bytes.len() != Self::SIZE {
            return None;
        }
        let word = |i: usize| read_u64(bytes, i * 8);
        let mut gprs = [0u64; 15];
        for (i, gpr) in gprs.iter_mut().enumerate() {
            *gpr = word(8 + i)?;
        }
        Some(CrashReport {
            vector: word(0)?,
            error_code: word(1)?,
            rip: word(2)?,
            cs: word(3)?,
            rflags: word(4)?,
            rsp: word(5)?,
            ss: word(6)?,
            cr2: word(7)?,
            gprs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_default_region() {
        let layout = Layout::new(DEFAULT_SIZE).unwrap();
        assert_eq!(layout.area_size, 8 * 1024 * 1024 - 4096);
        assert!(layout.area_size as usize >= crate::function::MAX_EVENT_BYTES + 4096);
        assert_eq!(layout.request_offset(), 4096);
        assert_eq!(layout.response_offset(), 4096 + layout.area_size);
        assert!(layout.response_offset() + layout.area_size <= layout.size);
    }

    #[test]
    fn layout_rejects_bad_sizes() {
        assert_eq!(Layout::new(0), None);
        assert_eq!(Layout::new(2 * 4096), None);
        assert_eq!(Layout::new(MIN_SIZE + 1), None);
        assert_eq!(Layout::new(1 << 40), None);
        assert!(Layout::new(MIN_SIZE).is_some());
    }

    #[test]
    fn kinds_round_trip() {
        for kind in [
            RequestKind::Ping,
            RequestKind::Echo,
            RequestKind::Shutdown,
            RequestKind::Load,
            RequestKind::Invoke,
            RequestKind::Stats,
            RequestKind::TestCrash,
            RequestKind::TestReset,
            RequestKind::TestBadLength,
            RequestKind::TestHang,
        ] {
            assert_eq!(RequestKind::from_u32(kind as u32), Some(kind));
        }
        for code in 1..=12 {
            assert_eq!(MessageKind::from_u32(code).unwrap() as u32, code);
        }
        assert_eq!(MessageKind::from_u32(0), None);
        assert_eq!(MessageKind::from_u32(13), None);
        assert!(!MessageKind::OutcomePreparing.awaits_request());
        assert!(MessageKind::Outcome.awaits_request());
        assert!(!MessageKind::Crash.awaits_request());
        assert_eq!(RequestKind::from_u32(0), None);
    }

    #[test]
    fn slot_round_trips() {
        let slot = Slot {
            seq: 0x1122_3344_5566_7788,
            kind: 3,
            len: 0xffff_ffff,
        };
        let mut header = [0u8; HEADER_BYTES];
        header[offsets::RESPONSE_SEQ..offsets::RESPONSE_SEQ + 16].copy_from_slice(&slot.encode());
        assert_eq!(Slot::response_from_header(&header), slot);
        assert_eq!(Slot::request_from_header(&header), Slot::default());
    }

    #[test]
    fn crash_report_round_trips() {
        let mut report = CrashReport {
            vector: 14,
            error_code: 2,
            rip: 0x10_2345,
            cs: 0x23,
            rflags: 0x3002,
            rsp: 0x9_7f00,
            ss: 0x1b,
            cr2: TEST_CRASH_ADDRESS,
            gprs: [0; 15],
        };
        for (i, gpr) in report.gprs.iter_mut().enumerate() {
            *gpr = i as u64 * 0x0101_0101;
        }
        assert_eq!(CrashReport::decode(&report.encode()), Some(report));
        assert_eq!(CrashReport::decode(&report.encode()[1..]), None);
        assert_eq!(CrashReport::decode(&[0u8; CrashReport::SIZE + 1]), None);
    }

    #[test]
    fn guest_info_round_trips() {
        let info = GuestInfo {
            abi_version: VERSION,
            ram_bytes: 126 << 20,
            heap_bytes: 100 << 20,
            image_end: 0x12_3000,
            cpuid: [1, 2, 3],
            code_area: 0x20_0000,
            code_area_bytes: 8 << 20,
        };
        assert_eq!(GuestInfo::decode(&info.encode()), Some(info));
        assert_eq!(GuestInfo::decode(&[]), None);
    }
}
