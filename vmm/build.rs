//! Compiles the seccomp filters in seccomp/x86_64.json into BPF at build
//! time; src/seccomp.rs embeds the result. A filter that does not compile
//! fails the build, so a broken policy never reaches a binary.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

/// The thread kinds src/seccomp.rs expects, one filter each.
const THREAD_KINDS: [&str; 3] = ["vmm", "vcpu", "prefetch"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let json = manifest.join("seccomp/x86_64.json");
    println!("cargo:rerun-if-changed={}", json.display());

    let file = File::open(&json).unwrap_or_else(|e| panic!("cannot open {}: {e}", json.display()));
    let filters = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("cannot compile {}: {e}", json.display()));

    for kind in THREAD_KINDS {
        let program = filters
            .get(kind)
            .unwrap_or_else(|| panic!("{} has no filter for thread kind {kind:?}", json.display()));
        // Each BPF instruction as 8 little-endian bytes: code u16, jt u8, jf u8, k u32.
        let mut bytes = Vec::with_capacity(program.len() * 8);
        for insn in program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        let path = out.join(format!("seccomp_{kind}.bpf"));
        File::create(&path)
            .and_then(|mut f| f.write_all(&bytes))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
    if filters.len() != THREAD_KINDS.len() {
        panic!(
            "{} defines {} filters; expected exactly {:?}",
            json.display(),
            filters.len(),
            THREAD_KINDS
        );
    }
}
