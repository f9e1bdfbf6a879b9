//! Reads its bundled data file, /var/task/data.txt, and prints the lines
//! that contain the event (all of them for an empty event), then a count.

use std::io::{self, Read};

fn main() {
    let mut needle = String::new();
    io::stdin()
        .read_to_string(&mut needle)
        .expect("read the event");
    let needle = needle.trim();
    let data = std::fs::read_to_string("/var/task/data.txt").expect("read /var/task/data.txt");
    let mut matches = 0;
    for line in data.lines().filter(|line| line.contains(needle)) {
        println!("{line}");
        matches += 1;
    }
    println!("{matches} of {} lines", data.lines().count());
}
