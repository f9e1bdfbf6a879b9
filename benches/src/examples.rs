//! The example functions that are real workloads, with the same sources
//! built natively: each example's `handle` is its library, linked here, and
//! its `.wasm` runs that same code in the guest. Shared by ember-bench and
//! the integration tests (which include this file).

/// The same source file the sha256 example is built from.
#[path = "../../examples/sha256/src/digest.rs"]
pub mod sha256_digest;

/// One example.
pub struct Example {
    /// Its name (the crate's).
    pub name: &'static str,
    /// Its module's file name in the examples directory.
    pub wasm: &'static str,
    /// The benchmark's event.
    pub event: fn() -> Vec<u8>,
    /// The native build: the result for an event.
    pub native: fn(&[u8]) -> Result<Vec<u8>, String>,
}

fn sha256_event() -> Vec<u8> {
    (0..1 << 20).map(|i| (i % 251) as u8).collect()
}

fn sha256_native(event: &[u8]) -> Result<Vec<u8>, String> {
    let hex = sha256_digest::hex_digest(event).map_err(|e| e.to_string())?;
    Ok(format!("{hex}\n").into_bytes())
}

/// Every workload example, smallest module first.
pub const EXAMPLES: [Example; 7] = [
    Example {
        name: "matmul",
        wasm: "matmul.wasm",
        event: matmul::sample_event,
        native: matmul::handle,
    },
    Example {
        name: "sha256",
        wasm: "sha256.wasm",
        event: sha256_event,
        native: sha256_native,
    },
    Example {
        name: "aes128ctr",
        wasm: "aes128ctr.wasm",
        event: aes128ctr::sample_event,
        native: aes128ctr::handle,
    },
    Example {
        name: "gzip",
        wasm: "gzip.wasm",
        event: gzip::sample_event,
        native: gzip::handle,
    },
    Example {
        name: "jsonrt",
        wasm: "jsonrt.wasm",
        event: jsonrt::sample_event,
        native: jsonrt::handle,
    },
    Example {
        name: "template",
        wasm: "template.wasm",
        event: template::sample_event,
        native: template::handle,
    },
    Example {
        name: "thumbnail",
        wasm: "thumbnail.wasm",
        event: thumbnail::sample_event,
        native: thumbnail::handle,
    },
];
