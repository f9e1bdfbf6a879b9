//! A stateful counter (reactor): the count lives in the instance, so it
//! grows from one invocation to the next in the same VM, like a warm
//! Lambda's globals. `_initialize` runs once, at load, and sets the start
//! from `COUNTER_START` (so the loaded state is what a snapshot captures);
//! each invocation adds the event (a number, 1 if empty) and prints the count.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

/// Called once, when the function is loaded.
#[no_mangle]
pub extern "C" fn _initialize() {
    let start = std::env::var("COUNTER_START")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    COUNT.store(start, Ordering::Relaxed);
}

/// Called once per invocation; returns 0, or non-zero for a bad event.
#[no_mangle]
pub extern "C" fn ember_handle() -> i32 {
    let mut event = String::new();
    if io::stdin().read_to_string(&mut event).is_err() {
        eprintln!("the event is not UTF-8");
        return 1;
    }
    let step = match event.trim() {
        "" => 1,
        text => match text.parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("not a number: {text:?}");
                return 2;
            }
        },
    };
    let count = COUNT.fetch_add(step, Ordering::Relaxed) + step;
    println!("{count}");
    0
}
