//! A working-set file beside a snapshot: decoded and checked against a
//! 512 MiB guest, then turned into what a restore uses (counts, the touch
//! list).
#![no_main]

use std::path::Path;

use ember_vmm::snapshot::memory::WorkingSet;
use libfuzzer_sys::fuzz_target;

const MEM_PAGES: u64 = (512 << 20) / 4096;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/state.ws");
    for bytes in [
        data.to_vec(),
        ember_vmm::snapshot::wrap_payload(ember_vmm::snapshot::WORKING_SET_MAGIC, data),
    ] {
        if let Ok(set) = WorkingSet::decode(path, &bytes, MEM_PAGES) {
            let (read, written) = set.counts();
            assert!(read.saturating_add(written) <= MEM_PAGES * MEM_PAGES);
            for r in set.touch_ranges(&[], true) {
                assert!(r.first_page + u64::from(r.pages) <= MEM_PAGES);
            }
        }
    }
});
