//! A snapshot state file: the container (magic, version, length,
//! checksum), the postcard payload, and the state's own checks (shape,
//! layer names and runs, limits). Also the same bytes as a payload behind
//! a valid container, so the fuzzer reaches the checks past the checksum.
#![no_main]

use std::path::Path;

use ember_vmm::persist::MicrovmState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/state");
    let _ = MicrovmState::decode(path, data);
    let wrapped = ember_vmm::snapshot::wrap_payload(ember_vmm::snapshot::STATE_MAGIC, data);
    if let Ok(state) = MicrovmState::decode(path, &wrapped) {
        let _ = state.restore_runs();
        for layer in &state.memory {
            assert!(ember_vmm::snapshot::memory::is_layer_name(&layer.path));
        }
    }
});
