//! The host side of the mailbox (layout and protocol in [`ember_abi::mailbox`]).
//!
//! Everything the guest writes is hostile: a message is read by copying the
//! header once, checking the copy (known kind, length within the response
//! area), then copying exactly that many payload bytes. Nothing is read
//! through a pointer into guest memory, and nothing beyond the region.

use crate::vstate::memory::GuestMemoryMmap;
use ember_abi::mailbox::{
    offsets, Layout, MessageKind, RequestKind, Slot, HEADER_BYTES, MAGIC, RESTORE_ENTROPY_BYTES,
    VERSION,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// A message the guest posted, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMessage {
    /// The request it answers (0 for none).
    pub seq: u64,
    /// What it is.
    pub kind: MessageKind,
    /// Its payload, copied out of guest memory.
    pub payload: Vec<u8>,
}

/// A message the host refused to take from the guest.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ProtocolError {
    /// guest wrote mailbox message length {len}, beyond the {area} bytes of the response area; message rejected
    LengthBeyondArea {
        /// The length field.
        len: u32,
        /// The response area's capacity.
        area: u64,
    },
    /// guest wrote unknown mailbox message kind {0}; message rejected
    UnknownKind(u32),
    /// cannot read the mailbox from guest memory: {0}
    Memory(GuestMemoryError),
    /// {0}
    Unexpected(String),
}

/// Errors setting up the mailbox or posting a request.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MailboxError {
    /// mailbox of {0} bytes is not a valid size (a multiple of 4 KiB, at least 12 KiB)
    BadSize(u64),
    /// request payload of {len} bytes exceeds the mailbox maximum of {max} bytes
    PayloadTooLarge {
        /// The payload length.
        len: usize,
        /// The request area's capacity.
        max: u64,
    },
    /// cannot write the mailbox in guest memory: {0}
    Memory(#[from] GuestMemoryError),
    /// compiled module of {len} bytes does not fit the guest's code area of {area} bytes
    ModuleTooLarge {
        /// The module's length.
        len: usize,
        /// The code area's size, as the guest announced it.
        area: u64,
    },
    /// the guest announced a code area at {gpa:#x} of {bytes} bytes, which {problem}; module not written
    BadCodeArea {
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        bytes: u64,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// Where the mailbox is: all a snapshot needs (its contents are in guest
/// memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MailboxState {
    /// Guest-physical address of the region.
    pub gpa: u64,
    /// Its size.
    pub size: u64,
    /// The doorbell port.
    pub port: u16,
}

impl<'a> crate::snapshot::Persist<'a> for Mailbox {
    type State = MailboxState;
    /// Guest memory.
    type ConstructorArgs = GuestMemoryMmap;
    type Error = MailboxError;

    fn save(&self) -> MailboxState {
        MailboxState {
            gpa: self.gpa,
            size: self.layout.size,
            port: self.port,
        }
    }

    fn restore(mem: GuestMemoryMmap, state: &MailboxState) -> Result<Self, MailboxError> {
        Mailbox::new(mem, state.gpa, state.size, state.port)
    }
}

/// The mailbox region in guest memory and its doorbell port.
#[derive(Debug)]
pub struct Mailbox {
    mem: GuestMemoryMmap,
    gpa: u64,
    layout: Layout,
    port: u16,
}

impl Mailbox {
    /// A mailbox of `size` bytes at `gpa` in `mem`, with its doorbell on `port`.
    pub fn new(
        mem: GuestMemoryMmap,
        gpa: u64,
        size: u64,
        port: u16,
    ) -> Result<Mailbox, MailboxError> {
        let layout = Layout::new(size).ok_or(MailboxError::BadSize(size))?;
        Ok(Mailbox {
            mem,
            gpa,
            layout,
            port,
        })
    }

    /// Guest-physical address of the region.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// The doorbell port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The region's geometry.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The largest payload either way.
    pub fn max_payload(&self) -> u64 {
        self.layout.area_size
    }

    /// Writes a compiled module at the start of the code area the guest
    /// announced in `ready` (`gpa`, `bytes`), before a `load`. The guest
    /// chose the area, so it is checked like any guest input: whole pages,
    /// inside guest RAM, apart from the mailbox.
    pub fn write_module(&self, gpa: u64, bytes: u64, module: &[u8]) -> Result<(), MailboxError> {
        let bad = |problem| MailboxError::BadCodeArea {
            gpa,
            bytes,
            problem,
        };
        if !gpa.is_multiple_of(4096) || !bytes.is_multiple_of(4096) || bytes == 0 {
            return Err(bad("is not whole pages"));
        }
        let Some(end) = gpa.checked_add(bytes) else {
            return Err(bad("wraps around the address space"));
        };
        if gpa < self.gpa + self.layout.size && self.gpa < end {
            return Err(bad("overlaps the mailbox"));
        }
        if !GuestMemoryBackend::check_range(&self.mem, GuestAddress(gpa), bytes as usize) {
            return Err(bad("is not all guest RAM"));
        }
        if module.len() as u64 > bytes {
            return Err(MailboxError::ModuleTooLarge {
                len: module.len(),
                area: bytes,
            });
        }
        self.mem.write_slice(module, GuestAddress(gpa))?;
        Ok(())
    }

    /// The command-line parameter that announces this mailbox to the guest.
    pub fn cmdline_param(&self) -> String {
        let mut buf = [0u8; 80];
        ember_abi::format_mailbox_param(&mut buf, self.gpa, self.layout.size, self.port).to_string()
    }

    /// Writes the header the guest checks at boot: magic, version, area size,
    /// empty slots.
    pub fn init_header(&self) -> Result<(), GuestMemoryError> {
        let mut header = [0u8; HEADER_BYTES];
        header[offsets::MAGIC..offsets::MAGIC + 4].copy_from_slice(&MAGIC.to_le_bytes());
        header[offsets::VERSION..offsets::VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
        header[offsets::AREA_SIZE..offsets::AREA_SIZE + 4]
            .copy_from_slice(&(self.layout.area_size as u32).to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(self.gpa))
    }

    /// Tells the guest it was restored: generation `generation`, the host's
    /// wall-clock time and fresh entropy, generation last. Call before the
    /// vCPUs resume.
    pub fn write_restore_block(
        &self,
        generation: u64,
        realtime_ns: u64,
        entropy: &[u8; RESTORE_ENTROPY_BYTES],
    ) -> Result<(), GuestMemoryError> {
        let mut block = [0u8; 8 + RESTORE_ENTROPY_BYTES];
        block[..8].copy_from_slice(&realtime_ns.to_le_bytes());
        block[8..].copy_from_slice(entropy);
        self.mem.write_slice(
            &block,
            GuestAddress(self.gpa + offsets::RESTORE_REALTIME_NS as u64),
        )?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem.write_obj(
            generation.to_le(),
            GuestAddress(self.gpa + offsets::GENERATION as u64),
        )
    }

    /// Posts request `seq` of `kind` with a payload made of `parts`, one
    /// after the other (so a caller need not join them). The sequence number
    /// goes last: a guest that looks before it exits (after preparing an
    /// instance) sees either the whole request or none. Call only while the
    /// guest waits in its doorbell exit or is preparing (not reading the
    /// request area).
    pub fn write_request(
        &self,
        seq: u64,
        kind: RequestKind,
        parts: &[&[u8]],
    ) -> Result<(), MailboxError> {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        if len as u64 > self.layout.area_size {
            return Err(MailboxError::PayloadTooLarge {
                len,
                max: self.layout.area_size,
            });
        }
        let mut at = self.gpa + self.layout.request_offset();
        for part in parts {
            self.mem.write_slice(part, GuestAddress(at))?;
            at += part.len() as u64;
        }
        let slot = Slot {
            seq,
            kind: kind as u32,
            len: len as u32,
        };
        self.mem.write_slice(
            &slot.encode()[8..],
            GuestAddress(self.gpa + offsets::REQUEST_KIND as u64),
        )?;
        self.mem.store(
            seq,
            GuestAddress(self.gpa + offsets::REQUEST_SEQ as u64),
            std::sync::atomic::Ordering::Release,
        )?;
        Ok(())
    }

    /// The sequence number of the guest's latest message. The guest writes
    /// it last, so once it changes the rest of the message is in place.
    pub fn response_seq(&self) -> Result<u64, ProtocolError> {
        self.mem
            .load::<u64>(
                GuestAddress(self.gpa + offsets::RESPONSE_SEQ as u64),
                std::sync::atomic::Ordering::Acquire,
            )
            .map_err(ProtocolError::Memory)
    }

    /// The kind of the guest's latest message, unchecked.
    pub fn response_kind(&self) -> Result<u32, ProtocolError> {
        self.mem
            .load::<u32>(
                GuestAddress(self.gpa + offsets::RESPONSE_KIND as u64),
                std::sync::atomic::Ordering::Acquire,
            )
            .map_err(ProtocolError::Memory)
    }

    /// Reads and checks the message the guest posted before ringing the doorbell.
    pub fn read_message(&self) -> Result<GuestMessage, ProtocolError> {
        let mut header = [0u8; HEADER_BYTES];
        self.mem
            .read_slice(&mut header, GuestAddress(self.gpa))
            .map_err(ProtocolError::Memory)?;
        let slot = Slot::response_from_header(&header);
        let kind = MessageKind::from_u32(slot.kind).ok_or(ProtocolError::UnknownKind(slot.kind))?;
        if u64::from(slot.len) > self.layout.area_size {
            return Err(ProtocolError::LengthBeyondArea {
                len: slot.len,
                area: self.layout.area_size,
            });
        }
        let mut payload = vec![0u8; slot.len as usize];
        self.mem
            .read_slice(
                &mut payload,
                GuestAddress(self.gpa + self.layout.response_offset()),
            )
            .map_err(ProtocolError::Memory)?;
        Ok(GuestMessage {
            seq: slot.seq,
            kind,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_abi::mailbox::DEFAULT_SIZE;

    const GPA: u64 = 6 << 20;

    fn mailbox() -> (Mailbox, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let mailbox = Mailbox::new(mem.clone(), GPA, DEFAULT_SIZE, 0xee0).unwrap();
        mailbox.init_header().unwrap();
        (mailbox, mem)
    }

    /// Plays the guest: writes a response slot and payload.
    fn guest_posts(mem: &GuestMemoryMmap, mailbox: &Mailbox, slot: Slot, payload: &[u8]) {
        mem.write_slice(
            payload,
            GuestAddress(GPA + mailbox.layout().response_offset()),
        )
        .unwrap();
        mem.write_slice(
            &slot.encode(),
            GuestAddress(GPA + offsets::RESPONSE_SEQ as u64),
        )
        .unwrap();
    }

    #[test]
    fn header_is_what_the_guest_checks() {
        let (mailbox, mem) = mailbox();
        let magic: u32 = mem.read_obj(GuestAddress(GPA)).unwrap();
        let version: u32 = mem.read_obj(GuestAddress(GPA + 4)).unwrap();
        let area: u32 = mem.read_obj(GuestAddress(GPA + 8)).unwrap();
        assert_eq!(
            (magic, version, u64::from(area)),
            (MAGIC, VERSION, mailbox.max_payload())
        );
        assert_eq!(
            mailbox.cmdline_param(),
            "ember.mailbox=0x600000,0x1000000,0xee0"
        );
    }

    #[test]
    fn request_lands_in_the_request_area() {
        let (mailbox, mem) = mailbox();
        mailbox
            .write_request(7, RequestKind::Echo, &[b"hel", b"lo"])
            .unwrap();
        let mut header = [0u8; HEADER_BYTES];
        mem.read_slice(&mut header, GuestAddress(GPA)).unwrap();
        assert_eq!(
            Slot::request_from_header(&header),
            Slot {
                seq: 7,
                kind: 2,
                len: 5
            }
        );
        let mut payload = [0u8; 5];
        mem.read_slice(&mut payload, GuestAddress(GPA + 4096))
            .unwrap();
        assert_eq!(&payload, b"hello");
    }

    #[test]
    fn oversized_request_is_refused_before_writing() {
        let (mailbox, _mem) = mailbox();
        let too_big = vec![0u8; mailbox.max_payload() as usize + 1];
        let err = mailbox
            .write_request(1, RequestKind::Echo, &[&too_big])
            .unwrap_err();
        assert!(
            err.to_string().contains("exceeds the mailbox maximum"),
            "{err}"
        );
        let fits = vec![0xa5u8; mailbox.max_payload() as usize];
        mailbox
            .write_request(1, RequestKind::Echo, &[&fits[..1], &fits[1..]])
            .unwrap();
    }

    #[test]
    fn well_formed_message_is_copied_out() {
        let (mailbox, mem) = mailbox();
        guest_posts(
            &mem,
            &mailbox,
            Slot {
                seq: 3,
                kind: MessageKind::EchoReply as u32,
                len: 4,
            },
            b"abcd",
        );
        let msg = mailbox.read_message().unwrap();
        assert_eq!(
            msg,
            GuestMessage {
                seq: 3,
                kind: MessageKind::EchoReply,
                payload: b"abcd".to_vec()
            }
        );

        let full = vec![0x5au8; mailbox.max_payload() as usize];
        guest_posts(
            &mem,
            &mailbox,
            Slot {
                seq: 4,
                kind: MessageKind::EchoReply as u32,
                len: full.len() as u32,
            },
            &full,
        );
        assert_eq!(mailbox.read_message().unwrap().payload, full);
    }

    #[test]
    fn hostile_lengths_are_rejected() {
        let (mailbox, mem) = mailbox();
        for len in [
            mailbox.max_payload() as u32 + 1,
            DEFAULT_SIZE as u32,
            u32::MAX,
        ] {
            guest_posts(
                &mem,
                &mailbox,
                Slot {
                    seq: 1,
                    kind: MessageKind::EchoReply as u32,
                    len,
                },
                &[],
            );
            let err = mailbox.read_message().unwrap_err();
            assert!(
                matches!(err, ProtocolError::LengthBeyondArea { .. }),
                "{err}"
            );
            assert!(err.to_string().contains(&len.to_string()), "{err}");
        }
    }

    #[test]
    fn unknown_kinds_are_rejected() {
        let (mailbox, mem) = mailbox();
        for kind in [0, 14, 0x100, u32::MAX] {
            guest_posts(
                &mem,
                &mailbox,
                Slot {
                    seq: 1,
                    kind,
                    len: 0,
                },
                &[],
            );
            assert!(
                matches!(mailbox.read_message(), Err(ProtocolError::UnknownKind(k)) if k == kind)
            );
        }
    }

    #[test]
    fn a_module_goes_where_the_guest_said_and_only_there() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let mailbox = Mailbox::new(mem.clone(), 16 << 20, DEFAULT_SIZE, 0xee0).unwrap();
        let module = vec![0xc3u8; 10_000];
        mailbox.write_module(2 << 20, 16 << 10, &module).unwrap();
        let mut back = vec![0u8; module.len() + 1];
        mem.read_slice(&mut back, GuestAddress(2 << 20)).unwrap();
        assert_eq!(&back[..module.len()], &module[..]);
        assert_eq!(back[module.len()], 0, "wrote past the module");

        let problem = |gpa, bytes| match mailbox.write_module(gpa, bytes, &module) {
            Err(MailboxError::BadCodeArea { problem, .. }) => problem,
            other => panic!("code area {gpa:#x}+{bytes:#x} gave {other:?}"),
        };
        assert_eq!(problem((2 << 20) + 1, 16 << 10), "is not whole pages");
        assert_eq!(problem(2 << 20, 0), "is not whole pages");
        assert_eq!(problem(!4095, 8192), "wraps around the address space");
        assert_eq!(problem((16 << 20) - 4096, 8192), "overlaps the mailbox");
        assert_eq!(problem(28 << 20, 8 << 20), "overlaps the mailbox");
        mailbox.write_module(32 << 20, 16 << 10, &module).unwrap();
        assert_eq!(problem(64 << 20, 16 << 10), "is not all guest RAM");
        assert_eq!(problem((64 << 20) - 4096, 16 << 10), "is not all guest RAM");
        assert!(matches!(
            mailbox.write_module(2 << 20, 8192, &module),
            Err(MailboxError::ModuleTooLarge {
                len: 10_000,
                area: 8192
            })
        ));
    }

    #[test]
    fn region_beyond_memory_is_an_error_not_a_read() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        // The response area would lie past the end of guest memory.
        let mailbox = Mailbox::new(mem, (8 << 20) - 8192, DEFAULT_SIZE, 0xee0).unwrap();
        assert!(matches!(
            mailbox.read_message(),
            Err(ProtocolError::Memory(_)) | Err(ProtocolError::UnknownKind(_))
        ));
    }

    #[test]
    fn mailbox_state_round_trips() {
        use crate::snapshot::Persist;
        let (mailbox, mem) = mailbox();
        let state = mailbox.save();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let decoded: MailboxState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);
        let restored = Mailbox::restore(mem, &decoded).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored.layout(), mailbox.layout());
        let bad = MailboxState {
            size: 4097,
            ..state
        };
        assert!(Mailbox::restore(restored.mem.clone(), &bad).is_err());
    }

    #[test]
    fn restore_block_is_written_generation_last() {
        let (mailbox, mem) = mailbox();
        mailbox
            .write_restore_block(3, 1_700_000_000, &[9; 32])
            .unwrap();
        let at = |offset: usize| mailbox.gpa() + offset as u64;
        let generation: u64 = mem.read_obj(GuestAddress(at(offsets::GENERATION))).unwrap();
        let realtime: u64 = mem
            .read_obj(GuestAddress(at(offsets::RESTORE_REALTIME_NS)))
            .unwrap();
        let mut entropy = [0u8; RESTORE_ENTROPY_BYTES];
        mem.read_slice(&mut entropy, GuestAddress(at(offsets::RESTORE_ENTROPY)))
            .unwrap();
        assert_eq!((generation, realtime, entropy), (3, 1_700_000_000, [9; 32]));
    }
}
