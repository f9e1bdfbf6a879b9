//! The wasm32-wasip1 function: the event on stdin, the result on stdout.
//! The work is in lib.rs, which ember-bench also builds natively.

use std::io::{self, Read, Write};

fn main() {
    let mut event = Vec::new();
    io::stdin().read_to_end(&mut event).expect("read the event");
    match matmul::handle(&event) {
        Ok(result) => io::stdout().write_all(&result).expect("write the result"),
        Err(why) => {
            eprintln!("matmul: {why}");
            std::process::exit(1);
        }
    }
}
