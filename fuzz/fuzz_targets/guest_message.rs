//! What a hostile guest writes into the mailbox: the header slot and the
//! response area, read by ember-vmm's mailbox reader, then the payload
//! through every decoder the host applies to a guest message.
#![no_main]

use ember_abi::function::{GuestStats, LoadedInfo, Outcome};
use ember_abi::mailbox::{CrashReport, GuestInfo, Touched, HEADER_BYTES, MIN_SIZE};
use ember_vmm::devices::mailbox::Mailbox;
use ember_vmm::vstate::memory::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const GPA: u64 = 0x1000;
const SIZE: u64 = 4 * MIN_SIZE;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (GPA + SIZE) as usize)])
        .expect("guest memory");
    let mailbox = Mailbox::new(mem.clone(), GPA, SIZE, 0xee0).expect("mailbox");
    mailbox.init_header().expect("header");
    // The guest owns the header's response slot and the response area.
    let (header, payload) = data.split_at(data.len().min(HEADER_BYTES));
    mem.write_slice(header, GuestAddress(GPA))
        .expect("header write");
    let area = mailbox.layout().response_offset();
    let room = (SIZE - area) as usize;
    mem.write_slice(
        &payload[..payload.len().min(room)],
        GuestAddress(GPA + area),
    )
    .expect("payload write");
    let _ = mailbox.response_seq();
    let _ = mailbox.response_kind();
    if let Ok(message) = mailbox.read_message() {
        assert!(message.payload.len() as u64 <= mailbox.max_payload());
        decode_all(&message.payload);
    }
    decode_all(payload);
});

fn decode_all(payload: &[u8]) {
    if let Ok(outcome) = Outcome::decode(payload) {
        let _ = outcome.header.duration_ns;
    }
    let _ = LoadedInfo::decode(payload);
    let _ = GuestStats::decode(payload);
    let _ = GuestInfo::decode(payload);
    let _ = CrashReport::decode(payload);
    let _ = Touched::decode(payload);
    let _ = ember_vmm::vmm::check_guest_protocol(Some(payload));
}
