//! The request loop: one doorbell per request, parked in the exit between
//! (a command function's instance is prepared after the answer, and a
//! request that arrives meanwhile is served without a second exit).

use alloc::vec::Vec;

use core::sync::atomic::{AtomicU8, Ordering};
use ember_abi::function::{GuestStats, InvokeParams, LoadSpec};

use ember_abi::mailbox::{
    GuestInfo, MessageKind, RequestKind, TouchList, Touched, TEST_CRASH_ADDRESS,
};
use ember_abi::{ByteWriter, I8042_COMMAND_PORT, I8042_RESET};
use ember_kernel::io::outb;
use ember_kernel::mailbox::{register_for_crash_reports, Mailbox};

use crate::function::Function;
use crate::heap::CodeArea;

/// Bytes in a guest page.
const PAGE: u64 = 4096;

/// Posts `ready`, then serves requests until told to stop. `memory_end`:
/// where guest memory ends (the e820 map's last range).
pub fn serve(mut mailbox: Mailbox, mut code: CodeArea, info: &GuestInfo, memory_end: u64) -> ! {
    register_for_crash_reports(&mailbox);
    reply(&mut mailbox, MessageKind::Ready, 0, &info.encode());

    let mut function: Option<Function> = None;
    // Test only: the kind to answer the next request with, in a message
    // of random bytes as long as the response area (0: the usual kind).
    let mut maximal_answer: Option<u32> = None;
    let mut generation = mailbox.generation();
    loop {
        // Restored from a snapshot since the last request: other copies of
        // this guest run on from the same state, so reseed and take the
        // time before serving anything.
        let now = mailbox.generation();
        if now != generation {
            generation = now;
            let (realtime_ns, entropy) = mailbox.restore_info();
            crate::rng::reseed(entropy);
            crate::clock::set_wall_clock(realtime_ns);
        }
        let request = mailbox.request();
        let seq = request.seq;
        if u64::from(request.len) > mailbox.layout().area_size {
            error(&mut mailbox, seq, "request longer than the request area");
            continue;
        }
        if let Some(code) = maximal_answer.take() {
            let kind = match code {
                0 => RequestKind::from_u32(request.kind)
                    .and_then(RequestKind::usual_answer)
                    .map_or(0, |k| k as u32),
                code => code,
            };
            let area = mailbox.response_area();
            if !crate::rng::fill(area) {
                area.fill(0xa5);
            }
            let len = area.len() as u32;
            mailbox.post_raw(kind, seq, len);
            continue;
        }
        match RequestKind::from_u32(request.kind) {
            Some(RequestKind::Ping) => mailbox.post(MessageKind::Pong, seq, 0),
            Some(RequestKind::TestMaximalAnswer) => {
                match u32_payload(mailbox.request_payload(request.len)) {
                    Some(code) => {
                        maximal_answer = Some(code);
                        mailbox.post(MessageKind::Pong, seq, 0);
                    }
                    None => error(&mut mailbox, seq, "a maximal answer's kind is 4 bytes"),
                }
            }
            Some(RequestKind::TestConsoleFlood) => {
                match u32_payload(mailbox.request_payload(request.len)) {
                    Some(count) => {
                        // Lines of 63 bytes and a newline, the last cut short.
                        let line = [b'F'; 64];
                        let mut left = count as usize;
                        while left > 0 {
                            let n = left.min(line.len());
                            ember_kernel::console::write_bytes(&line[..n - 1]);
                            ember_kernel::console::write_bytes(b"\n");
                            left -= n;
                        }
                        mailbox.post(MessageKind::Pong, seq, 0);
                    }
                    None => error(&mut mailbox, seq, "a console flood's length is 4 bytes"),
                }
            }
            Some(RequestKind::Echo) => {
                // The payload goes through the heap, as events do.
                let payload: Vec<u8> = mailbox.request_payload(request.len).to_vec();
                reply(&mut mailbox, MessageKind::EchoReply, seq, &payload);
            }
            Some(RequestKind::Load) => {
                let answer = if function.is_some() {
                    Err(alloc::string::String::from(
                        "a function is already loaded in this VM",
                    ))
                } else {
                    match LoadSpec::decode(mailbox.request_payload(request.len)) {
                        Err(e) => Err(alloc::format!("malformed load request: {e}")),
                        Ok(spec) => Function::load(&spec, &mut code),
                    }
                };
                match answer {
                    Ok((loaded, info)) => {
                        function = Some(loaded);
                        reply(&mut mailbox, MessageKind::Loaded, seq, &info.encode());
                    }
                    Err(text) => reply(&mut mailbox, MessageKind::LoadFailed, seq, text.as_bytes()),
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
                // SAFETY: the event lies in the request area, which the
                // host leaves alone until the answer is posted below.
                let len = unsafe { function.invoke(params, event, area) } as u32;
                if function.ready() {
                    mailbox.post(MessageKind::Outcome, seq, len);
                } else {
                    mailbox.post(MessageKind::OutcomePreparing, seq, len);
                    function.finish();
                    // A request that came while preparing is served at
                    // once; otherwise wait for one in the `idle` exit.
                    if mailbox.request().seq == seq {
                        mailbox.post(MessageKind::Idle, seq, 0);
                    }
                }
            }
            Some(RequestKind::Touch) => {
                match touch(mailbox.request_payload(request.len), memory_end) {
                    Ok(touched) => {
                        reply(&mut mailbox, MessageKind::Touched, seq, &touched.encode())
                    }
                    Err(text) => error(&mut mailbox, seq, &text),
                }
            }
            Some(RequestKind::Stats) => {
                let (heap_used, heap_total) = crate::heap::usage();
                let stats = GuestStats {
                    heap_used,
                    heap_total,
                    ..function.as_ref().map(Function::stats).unwrap_or_default()
                };
                reply(&mut mailbox, MessageKind::Stats, seq, &stats.encode());
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
            Some(RequestKind::TestDoorbellLoop) => {
                // Garbage, forever: a kind no one knows, sequence numbers
                // the host never sent, the doorbell rung each time.
                let mut n = seq;
                loop {
                    n = n.wrapping_add(1);
                    mailbox.post_raw(0xdead_beef, n, 0);
                }
            }
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

/// Touches the pages `payload` lists (a [`TouchList`]), so that their
/// first-touch faults are taken now rather than in the next request: a
/// read of every cache line of the page (which also brings it into the
/// CPU's caches: a restored VM's memory is otherwise cold there), and for
/// writing an atomic OR of zero into its first byte, which leaves the byte
/// as it was whoever else writes it. Every range is checked
/// against the end of guest memory before any page is touched.
fn touch(payload: &[u8], memory_end: u64) -> Result<Touched, alloc::string::String> {
    let started = crate::clock::rdtsc();
    let ranges = TouchList::decode_within(payload, memory_end / PAGE)?;
    let mut touched = Touched::default();
    for r in ranges {
        // Page 0 is never touched: a null pointer is not one to dereference.
        for page in r.first_page.max(1)..r.first_page + u64::from(r.pages) {
            let at = (page * PAGE) as usize;
            // Every cache line of the page, into the CPU's caches.
            for line in (0..PAGE as usize).step_by(64) {
                // SAFETY: inside the page, which lies in guest memory.
                unsafe { core::ptr::read_volatile((at + line) as *const u8) };
            }
            if r.write {
                // SAFETY: the page lies in guest memory, identity-mapped
                // and writable (checked above); OR-ing zero changes nothing.
                unsafe { (*(at as *const AtomicU8)).fetch_or(0, Ordering::Relaxed) };
                touched.written += 1;
            } else {
                touched.read += 1;
            }
        }
    }
    touched.ns = crate::clock::ticks_to_ns(crate::clock::rdtsc().wrapping_sub(started));
    Ok(touched)
}

/// Faults on purpose: the address lies above the mapped 4 GiB; the
/// exception handler reports and stops the VM.
pub fn crash() -> ! {
    // SAFETY: the read faults (it is meant to); nothing is read.
    unsafe { core::ptr::read_volatile(TEST_CRASH_ADDRESS as *const u8) };
    unreachable!("reading an unmapped address returned");
}

/// A test request's payload: one little-endian `u32`, nothing else.
fn u32_payload(payload: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(payload).ok().map(u32::from_le_bytes)
}

/// Answers request `seq` with an error message.
fn error(mailbox: &mut Mailbox, seq: u64, text: &str) {
    reply(mailbox, MessageKind::Error, seq, text.as_bytes());
}

/// Posts a message of `kind` carrying `payload` (cut to the response area).
fn reply(mailbox: &mut Mailbox, kind: MessageKind, seq: u64, payload: &[u8]) {
    let area = mailbox.response_area();
    let len = payload.len().min(area.len());
    area[..len].copy_from_slice(&payload[..len]);
    mailbox.post(kind, seq, len as u32);
}
