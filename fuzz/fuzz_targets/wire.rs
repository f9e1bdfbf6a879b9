//! The wire decoders both sides use: what ember-vmm sends the guest (a
//! load, a touch list) and the reader every decoder is built on.
#![no_main]

use ember_abi::function::LoadSpec;
use ember_abi::mailbox::TouchList;
use ember_abi::wire::Reader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = LoadSpec::decode(data);
    if let Ok(ranges) = TouchList::decode(data) {
        for r in ranges {
            let _ = r.first_page.checked_add(u64::from(r.pages));
        }
    }
    if let Ok(ranges) = TouchList::decode_within(data, 1 << 17) {
        for r in ranges {
            assert!(r.first_page + u64::from(r.pages) <= 1 << 17);
        }
    }
    // The reader's primitives in the order the fuzzer's first byte says.
    let (ops, rest) = data.split_at(data.len().min(8));
    let mut r = Reader::new(rest);
    for op in ops {
        let before = r.remaining();
        let ok = match op % 6 {
            0 => r.u32("u32").is_ok(),
            1 => r.u64("u64").is_ok(),
            2 => r.bytes("bytes").is_ok(),
            3 => r.slice(usize::from(*op), "slice").is_ok(),
            4 => r.count("count", 1 + usize::from(*op % 16)).is_ok(),
            _ => r.array::<16>("array").is_ok(),
        };
        assert!(r.remaining() <= before);
        if !ok {
            break;
        }
    }
    let _ = r.end("end");
});
