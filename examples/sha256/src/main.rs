//! SHA-256 of the event, in hexadecimal.

mod digest;

fn main() {
    let hex = digest::hex_digest(std::io::stdin().lock()).expect("read the event");
    println!("{hex}");
}
