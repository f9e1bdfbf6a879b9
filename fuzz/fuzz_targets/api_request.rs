//! ember-vmm's API: bytes from the socket through the HTTP parser (a
//! stream of requests, fed in pieces) and each request into an action.
#![no_main]

use ember_vmm::api::http::{has_request, parse_request, request_len, Parsed};
use ember_vmm::api::parsed_request::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says how the stream arrives: in pieces of 1..=256.
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece) + 1;
    let mut input = Vec::new();
    let mut continue_sent = false;
    for chunk in stream.chunks(piece) {
        input.extend_from_slice(chunk);
        loop {
            let _ = request_len(&input);
            let ready = has_request(&input, continue_sent);
            let before = input.len();
            match parse_request(&mut input, continue_sent) {
                Parsed::Incomplete => {
                    assert!(!ready);
                    break;
                }
                Parsed::ExpectsContinue => {
                    continue_sent = true;
                    break;
                }
                Parsed::Request(request) => {
                    assert!(input.len() < before);
                    continue_sent = false;
                    let _ = parse(request);
                }
                Parsed::Invalid(response) => {
                    let _ = response.encode(true);
                    return;
                }
            }
        }
    }
});
