//! Echo: the event back as the result.

use std::io::{self, Read, Write};

fn main() {
    let mut event = Vec::new();
    io::stdin().read_to_end(&mut event).expect("read the event");
    io::stdout().write_all(&event).expect("write the result");
}
