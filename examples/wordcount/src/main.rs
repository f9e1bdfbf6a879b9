//! Word count: lines, words and bytes of the event, as `wc` prints them.

use std::io::{self, Read};

fn main() {
    let mut event = Vec::new();
    io::stdin().read_to_end(&mut event).expect("read the event");
    let lines = event.iter().filter(|&&b| b == b'\n').count();
    let words = event
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .count();
    println!("{lines} {words} {}", event.len());
}
