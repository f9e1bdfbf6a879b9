//! An invocation's outcome as the guest writes it: every length checked
//! against the payload, the parts inside it.
#![no_main]

use ember_abi::function::Outcome;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(outcome) = Outcome::decode(data) {
        let body = match outcome.result {
            Ok(body) => body,
            Err((_, message)) => message,
        };
        assert!(body.len() + outcome.log.len() <= data.len());
    }
});
