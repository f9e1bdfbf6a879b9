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
    /// Touch guest pages (payload: [`TouchList`]) so that the first request
    /// after a restore does not pay a fault per page; answer
    /// [`MessageKind::Touched`].
    Touch = 7,
    /// Test only: fault (a page fault at [`TEST_CRASH_ADDRESS`]).
    TestCrash = 0x100,
    /// Test only: write the i8042 reset command from ring 3.
    TestReset = 0x101,
    /// Test only: answer with a message whose length exceeds the response area.
    TestBadLength = 0x102,
    /// Test only: never answer (spin in ring 3).
    TestHang = 0x103,
    /// Test only: ring the doorbell over and over, each time with a message
    /// of no known kind and a sequence number the host never sent.
    TestDoorbellLoop = 0x104,
    /// Test only: answer [`MessageKind::Pong`], then answer the next
    /// request, whatever it is, with a message as long as the response
    /// area filled with random bytes, of the kind the payload names (a
    /// little-endian `u32`; 0: the kind that request expects).
    TestMaximalAnswer = 0x105,
    /// Test only: write as many bytes to the console as the payload says
    /// (a little-endian `u32`), then answer [`MessageKind::Pong`].
    TestConsoleFlood = 0x106,
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
            7 => RequestKind::Touch,
            0x100 => RequestKind::TestCrash,
            0x101 => RequestKind::TestReset,
            0x102 => RequestKind::TestBadLength,
            0x103 => RequestKind::TestHang,
            0x104 => RequestKind::TestDoorbellLoop,
            0x105 => RequestKind::TestMaximalAnswer,
            0x106 => RequestKind::TestConsoleFlood,
            _ => return None,
        })
    }

    /// The kind of a successful answer to this request (a load may also
    /// answer `LoadFailed`, an invocation `OutcomePreparing`, any request
    /// `Error`); none for the test requests that break the protocol.
    pub const fn usual_answer(self) -> Option<MessageKind> {
        Some(match self {
            RequestKind::Ping | RequestKind::TestMaximalAnswer | RequestKind::TestConsoleFlood => {
                MessageKind::Pong
            }
            RequestKind::Echo => MessageKind::EchoReply,
            RequestKind::Shutdown => MessageKind::ShutdownAck,
            RequestKind::Load => MessageKind::Loaded,
            RequestKind::Invoke => MessageKind::Outcome,
            RequestKind::Stats => MessageKind::Stats,
            RequestKind::Touch => MessageKind::Touched,
            RequestKind::TestCrash
            | RequestKind::TestReset
            | RequestKind::TestBadLength
            | RequestKind::TestHang
            | RequestKind::TestDoorbellLoop => return None,
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
    /// Answer to [`RequestKind::Touch`]; payload: [`Touched`].
    Touched = 13,
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
            13 => MessageKind::Touched,
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

/// One range of a [`TouchList`]: `pages` guest pages from `first_page`
/// (guest-physical address / 4 KiB), touched for writing if `write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TouchRange {
    /// First guest page.
    pub first_page: u64,
    /// Pages.
    pub pages: u32,
    /// Touch for writing (an atomic OR of 0 into the page's first byte,
    /// which leaves it as it was) instead of reading.
    pub write: bool,
}

/// The payload of [`RequestKind::Touch`]: `u32` count, then per range `u64`
/// first page, `u32` pages, `u32` flags (bit 0: write; others zero).
pub struct TouchList;

impl TouchList {
    /// Bytes of one encoded range.
    pub const RANGE_BYTES: usize = 16;

    /// Encodes `ranges`.
    pub fn encode(ranges: &[TouchRange]) -> alloc::vec::Vec<u8> {
        let mut w = crate::wire::Writer::with_capacity(4 + ranges.len() * Self::RANGE_BYTES);
        w.u32(ranges.len() as u32);
        for r in ranges {
            w.u64(r.first_page).u32(r.pages).u32(u32::from(r.write));
        }
        w.finish()
    }

    /// Decodes a payload whose ranges must all lie below page `pages_end`:
    /// every range, or what is wrong (as [`TouchList::decode`], or the
    /// first range that reaches past the end).
    pub fn decode_within(
        payload: &[u8],
        pages_end: u64,
    ) -> Result<impl Iterator<Item = TouchRange> + Clone + '_, alloc::string::String> {
        let ranges =
            Self::decode(payload).map_err(|e| alloc::format!("malformed touch list: {e}"))?;
        for r in ranges.clone() {
            if r.first_page
                .checked_add(u64::from(r.pages))
                .is_none_or(|end| end > pages_end)
            {
                return Err(alloc::format!(
                    "touch range of {} pages at page {:#x} lies outside guest memory ({pages_end} pages)",
                    r.pages, r.first_page
                ));
            }
        }
        Ok(ranges)
    }

    /// Decodes a payload: every range, or what is wrong with it (a count
    /// the payload does not hold, unknown flags, trailing bytes).
    pub fn decode(
        payload: &[u8],
    ) -> Result<impl Iterator<Item = TouchRange> + Clone + '_, crate::wire::WireError> {
        let mut r = crate::wire::Reader::new(payload);
        let count = r.count("touch ranges", Self::RANGE_BYTES)?;
        let body = r.slice(count * Self::RANGE_BYTES, "touch ranges")?;
        r.end("touch list")?;
        for (i, range) in body.chunks_exact(Self::RANGE_BYTES).enumerate() {
            if read_u32(range, 12).is_some_and(|flags| flags & !1 != 0) {
                return Err(crate::wire::WireError {
                    field: "touch range flags",
                    offset: 4 + i * Self::RANGE_BYTES + 12,
                });
            }
        }
        Ok(body
            .chunks_exact(Self::RANGE_BYTES)
            .map(|range| TouchRange {
                first_page: read_u64(range, 0).unwrap_or(0),
                pages: read_u32(range, 8).unwrap_or(0),
                write: read_u32(range, 12).unwrap_or(0) & 1 == 1,
            }))
    }
}

/// The payload of [`MessageKind::Touched`]: pages read and written, and the
/// guest's time for them (ns), three `u64`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Touched {
    /// Pages touched for reading.
    pub read: u64,
    /// Pages touched for writing.
    pub written: u64,
    /// The guest's time from the request to the answer, ns.
    pub ns: u64,
}

impl Touched {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// Encodes it.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0..8].copy_from_slice(&self.read.to_le_bytes());
        out[8..16].copy_from_slice(&self.written.to_le_bytes());
        out[16..24].copy_from_slice(&self.ns.to_le_bytes());
        out
    }

    /// Decodes it; `None` unless exactly [`Touched::SIZE`] bytes.
    pub fn decode(bytes: &[u8]) -> Option<Touched> {
        if bytes.len() != Self::SIZE {
            return None;
        }
        Some(Touched {
            read: read_u64(bytes, 0)?,
            written: read_u64(bytes, 8)?,
            ns: read_u64(bytes, 16)?,
        })
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
    fn touch_list_round_trips_and_refuses_what_it_cannot_hold() {
        let ranges = [
            TouchRange {
                first_page: 0x100,
                pages: 3,
                write: false,
            },
            TouchRange {
                first_page: u64::MAX,
                pages: u32::MAX,
                write: true,
            },
        ];
        let bytes = TouchList::encode(&ranges);
        assert_eq!(bytes.len(), 4 + 2 * TouchList::RANGE_BYTES);
        let back: alloc::vec::Vec<TouchRange> = TouchList::decode(&bytes).unwrap().collect();
        assert_eq!(back, ranges);
        assert_eq!(
            TouchList::decode(&TouchList::encode(&[])).unwrap().count(),
            0
        );
        // A count the payload does not hold, a byte too many, unknown flags.
        assert!(TouchList::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(TouchList::decode(&long).is_err());
        let mut flags = bytes.clone();
        flags[4 + 12] = 2;
        let e = TouchList::decode(&flags).err().unwrap();
        assert_eq!((e.field, e.offset), ("touch range flags", 16));
        assert!(TouchList::decode(&[]).is_err());
    }

    #[test]
    fn touch_list_within_refuses_ranges_past_the_end() {
        let at = |first_page, pages| {
            TouchList::encode(&[TouchRange {
                first_page,
                pages,
                write: true,
            }])
        };
        assert_eq!(TouchList::decode_within(&at(0, 16), 16).unwrap().count(), 1);
        let e = TouchList::decode_within(&at(10, 7), 16).err().unwrap();
        assert!(
            e.contains("7 pages at page 0xa lies outside guest memory (16 pages)"),
            "{e}"
        );
        assert!(TouchList::decode_within(&at(u64::MAX, 1), u64::MAX).is_err());
        let e = TouchList::decode_within(&[1, 0, 0, 0], 16).err().unwrap();
        assert!(e.starts_with("malformed touch list"), "{e}");
    }

    #[test]
    fn touched_round_trips_and_wants_its_exact_size() {
        let t = Touched {
            read: 1,
            written: 2,
            ns: 3,
        };
        assert_eq!(Touched::decode(&t.encode()), Some(t));
        assert_eq!(Touched::decode(&t.encode()[..23]), None);
        assert_eq!(Touched::decode(&[0; 25]), None);
        assert!(MessageKind::Touched.awaits_request());
    }

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
            RequestKind::Touch,
            RequestKind::TestCrash,
            RequestKind::TestReset,
            RequestKind::TestBadLength,
            RequestKind::TestHang,
            RequestKind::TestDoorbellLoop,
            RequestKind::TestMaximalAnswer,
            RequestKind::TestConsoleFlood,
        ] {
            assert_eq!(RequestKind::from_u32(kind as u32), Some(kind));
        }
        assert_eq!(
            RequestKind::Invoke.usual_answer(),
            Some(MessageKind::Outcome)
        );
        assert_eq!(RequestKind::TestHang.usual_answer(), None);
        for code in 1..=13 {
            assert_eq!(MessageKind::from_u32(code).unwrap() as u32, code);
        }
        assert_eq!(MessageKind::from_u32(0), None);
        assert_eq!(MessageKind::from_u32(14), None);
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
