//! The request loop: one doorbell per request, parked in the exit between
//! (a command function's instance is prepared after the answer, and a
//! request that arrives meanwhile is served without a second exit).

use alloc::vec::Vec;

use ember_abi::function::{InvokeParams, LoadSpec};
use ember_abi::mailbox::{GuestInfo, MessageKind, RequestKind, TEST_CRASH_ADDRESS};
use ember_abi::{ByteWriter, I8042_COMMAND_PORT, I8042_RESET};
use ember_kernel::io::outb;
use ember_kernel::mailbox::{register_for_crash_reports, Mailbox};

use crate::function::Function;

/// Posts `ready`, then serves requests until told to stop.
pub fn serve(mut mailbox: Mailbox, info: &GuestInfo) -> ! {
    register_for_crash_reports(&mailbox);
    let encoded = info.encode();
    mailbox.response_area()[..encoded.len()].copy_from_slice(&encoded);
    mailbox.post(MessageKind::Ready, 0, encoded.len() as u32);

    let mut function: Option<Function> = None;
    loop {
        let request = mailbox.request();
        let seq = request.seq;
        if u64::from(request.len) > mailbox.layout().area_size {
            error(&mut mailbox, seq, "request longer than the request area");
            continue;
        }
        match RequestKind::from_u32(request.kind) {
            Some(RequestKind::Ping) => mailbox.post(MessageKind::Pong, seq, 0),
            Some(RequestKind::Echo) => {
                // The payload goes through the heap, as events do.
                let payload: Vec<u8> = mailbox.request_payload(request.len).to_vec();
                mailbox.response_area()[..payload.len()].copy_from_slice(&payload);
                mailbox.post(MessageKind::EchoReply, seq, payload.len() as u32);
            }
            Some(RequestKind::Load) => {
                let (payload, area) = mailbox.areas(request.len);
                let answer = match (&function, LoadSpec::decode(payload)) {
                    (Some(_), _) => Err(alloc::string::String::from(
                        "a function is already loaded in this VM",
                    )),
                    (None, Err(e)) => Err(alloc::format!("malformed load request: {e}")),
                    (None, Ok(spec)) => Function::load(&spec),
                };
                match answer {
                    Ok((loaded, info)) => {
                        let encoded = info.encode();
                        area[..encoded.len()].copy_from_slice(&encoded);
                        function = Some(loaded);
                        mailbox.post(MessageKind::Loaded, seq, encoded.len() as u32);
                    }
                    Err(text) => {
                        let len = text.len().min(area.len());
                        area[..len].copy_from_slice(&text.as_bytes()[..len]);
                        mailbox.post(MessageKind::LoadFailed, seq, len as u32);
                    }
                }
            }
            Some(RequestKind::Invoke) => {
                let Some(function) = function.as_mut() else {
                    error(&mut mailbox, seq, "no function is loaded");
                    continue;
                };
                let (payload, area) = mailbox.areas(request.len);
                let Ok((params, event)) = InvokeParams::split(payload) else {
                    error(&mut mailbox, seq, "malformed invoke request");
                    continue;
                };
                let invoked = function.invoke(params, event, area);
                if invoked.prepare {
                    mailbox.post(MessageKind::OutcomePreparing, seq, invoked.len as u32);
                    function.finish();
                    // A request that came while preparing is served at
                    // once; otherwise wait for one in the `idle` exit.
                    if mailbox.request().seq == seq {
                        mailbox.post(MessageKind::Idle, seq, 0);
                    }
                } else {
                    mailbox.post(MessageKind::Outcome, seq, invoked.len as u32);
                }
            }
            Some(RequestKind::Stats) => {
                let stats = function
                    .as_ref()
                    .map(Function::stats)
                    .unwrap_or_else(|| {
                        let (used, total) = crate::heap::usage();
                        ember_abi::function::GuestStats {
                            heap_used: used,
                            heap_total: total,
                            ..Default::default()
                        }
                    })
                    .encode();
                mailbox.response_area()[..stats.len()].copy_from_slice(&stats);
                mailbox.post(MessageKind::Stats, seq, stats.len() as u32);
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
