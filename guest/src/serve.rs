//! The request loop: one doorbell per request, parked in the exit between.

use alloc::vec::Vec;

use ember_abi::mailbox::{GuestInfo, MessageKind, RequestKind, TEST_CRASH_ADDRESS};
use ember_abi::{ByteWriter, I8042_COMMAND_PORT, I8042_RESET};
use ember_kernel::io::outb;
use ember_kernel::mailbox::{register_for_crash_reports, Mailbox};

/// Posts `ready`, then serves requests until told to stop.
pub fn serve(mut mailbox: Mailbox, info: &GuestInfo) -> ! {
    register_for_crash_reports(&mailbox);
    let encoded = info.encode();
    mailbox.response_area()[..encoded.len()].copy_from_slice(&encoded);
    mailbox.post(MessageKind::Ready, 0, encoded.len() as u32);

    loop {
        let request = mailbox.request();
        let seq = request.seq;
        match RequestKind::from_u32(request.kind) {
            Some(RequestKind::Ping) => mailbox.post(MessageKind::Pong, seq, 0),
            Some(RequestKind::Echo) => {
                if u64::from(request.len) > mailbox.layout().area_size {
                    error(
                        &mut mailbox,
                        seq,
                        "echo request longer than the request area",
                    );
                    continue;
                }
                // The payload goes through the heap, as events will.
                let payload: Vec<u8> = mailbox.request_payload(request.len).to_vec();
                mailbox.response_area()[..payload.len()].copy_from_slice(&payload);
                mailbox.post(MessageKind::EchoReply, seq, payload.len() as u32);
            }
            Some(RequestKind::Shutdown) => {
                mailbox.post(MessageKind::ShutdownAck, seq, 0);
                ember_kernel::park();
            }
            Some(RequestKind::TestCrash) => crash(),
            Some(RequestKind::TestReset) => {
                outb(I8042_COMMAND_PORT, I8042_RESET);
                ember_kernel::park();
            }
            Some(RequestKind::TestBadLength) => {
                mailbox.post_raw(MessageKind::EchoReply as u32, seq, u32::MAX);
            }
            Some(RequestKind::TestHang) => loop {
                core::hint::spin_loop();
            },
            None => {
                let mut text = [0u8; 64];
                let mut w = ByteWriter::new(&mut text);
                w.push_str("unknown request kind ");
                w.push_dec(u64::from(request.kind));
                let len = w.as_bytes().len();
                let text = core::str::from_utf8(&text[..len]).unwrap_or("unknown request kind");
                error(&mut mailbox, seq, text);
            }
        }
    }
}

/// Faults on purpose: the address lies above the mapped 4 GiB; the
/// exception handler reports and stops the VM.
pub fn crash() -> ! {
    // SAFETY: the read faults (it is meant to); nothing is read.
    unsafe { core::ptr::read_volatile(TEST_CRASH_ADDRESS as *const u8) };
    unreachable!("reading an unmapped address returned");
}

/// Answers request `seq` with an error message.
fn error(mailbox: &mut Mailbox, seq: u64, text: &str) {
    let area = mailbox.response_area();
    let len = text.len().min(area.len());
    area[..len].copy_from_slice(&text.as_bytes()[..len]);
    mailbox.post(MessageKind::Error, seq, len as u32);
}
