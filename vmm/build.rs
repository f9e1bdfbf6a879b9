//! Compiles the seccomp filters in seccomp/x86_64.json into BPF at build
//! time; src/seccomp.rs embeds the result. A filter that does not compile
//! fails the build, so a broken policy never reaches a binary.
//!
//! `vmm_setup` (the VMM thread's filter from its first API request until
//! the VM is built) is the union of its own rules and every rule of `vmm`,
//! `vcpu` and `prefetch`: the threads it starts inherit it under their own.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

/// The thread kinds src/seccomp.rs expects, one filter each.
const THREAD_KINDS: [&str; 4] = ["vmm", "vcpu", "prefetch", "vmm_setup"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let json = manifest.join("seccomp/x86_64.json");
    println!("cargo:rerun-if-changed={}", json.display());

    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", json.display()));
    let mut policy: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("cannot parse {}: {e}", json.display()));
    let inherited: Vec<serde_json::Value> = ["vmm", "vcpu", "prefetch"]
        .iter()
        .flat_map(|kind| {
            policy[kind]["filter"]
                .as_array()
                .cloned()
                .unwrap_or_else(|| panic!("{} has no {kind} filter", json.display()))
        })
        .collect();
    let setup = policy["vmm_setup"]["filter"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("{} has no vmm_setup filter", json.display()));
    setup.extend(inherited);
    // A syscall allowed whatever its arguments anywhere is allowed so
    // once: seccompiler keeps only the argument rules of a syscall that
    // has both, which would narrow it.
    let unconditional: std::collections::BTreeSet<String> = setup
        .iter()
        .filter(|rule| rule.get("args").is_none())
        .filter_map(|rule| rule["syscall"].as_str().map(str::to_string))
        .collect();
    let mut kept = std::collections::BTreeSet::new();
    setup.retain(|rule| {
        let name = rule["syscall"].as_str().unwrap_or_default().to_string();
        if !unconditional.contains(&name) {
            return true;
        }
        rule.get("args").is_none() && kept.insert(name)
    });
    let merged = serde_json::to_vec(&policy).expect("JSON");
    let filters =
        seccompiler::compile_from_json(merged.as_slice(), seccompiler::TargetArch::x86_64)
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
