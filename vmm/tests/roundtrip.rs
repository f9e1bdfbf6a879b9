//! Property tests: every wire format the host and the guest exchange, and
//! the snapshot container, decode to exactly what was encoded; and a
//! decoder given any bytes answers (Ok or an error) without panicking.
//! (Coverage-guided fuzzing of the same decoders: fuzz/, ./scripts/fuzz.)

use std::path::Path;

use ember_abi::function::{
    write_outcome, ErrorKind, GuestStats, InvokeParams, LoadSpec, LoadedInfo, Model, Outcome,
    OutcomeHeader,
};
use ember_abi::mailbox::{CrashReport, GuestInfo, TouchList, TouchRange, Touched};
use ember_vmm::snapshot::memory::{PageRange, WorkingSet};
use proptest::collection::vec;
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

proptest! {
    #[test]
    fn load_specs_round_trip(
        memory_limit: u64, tsc_khz: u64, seed: [u8; 32], module_len: u64,
        name in bytes(40),
        args in vec(bytes(20), 0..5),
        env in vec(bytes(20), 0..5),
        files in vec((bytes(20), bytes(64)), 0..4),
    ) {
        let spec = LoadSpec {
            module_len,
            files: files.iter().map(|(n, c)| (n.as_slice(), c.as_slice())).collect(),
            args: args.iter().map(Vec::as_slice).collect(),
            env: env.iter().map(Vec::as_slice).collect(),
            name: &name,
            memory_limit,
            seed,
            tsc_khz,
        };
        let encoded = spec.encode();
        prop_assert_eq!(encoded.len(), spec.encoded_len());
        prop_assert_eq!(LoadSpec::decode(&encoded), Ok(spec.clone()));
        // Every strict prefix is refused.
        let cut = encoded.len() / 2;
        prop_assert!(LoadSpec::decode(&encoded[..cut]).is_err());
    }

    #[test]
    fn outcomes_round_trip(
        status in 0u32..=5, exit_code: i32, log_dropped: u64, duration_ns: u64, fuel: u64,
        body in bytes(300), log in bytes(100),
    ) {
        let header = OutcomeHeader { status, exit_code, log_dropped, duration_ns, fuel, ..Default::default() };
        let mut area = vec![0u8; OutcomeHeader::SIZE + body.len() + log.len()];
        let len = write_outcome(&mut area, header, &body, &log).expect("fits");
        let outcome = Outcome::decode(&area[..len]).expect("decodes");
        prop_assert_eq!(outcome.header.duration_ns, duration_ns);
        prop_assert_eq!(outcome.header.exit_code, exit_code);
        prop_assert_eq!(outcome.log, &log[..]);
        match outcome.result {
            Ok(b) => { prop_assert_eq!(status, 0); prop_assert_eq!(b, &body[..]); }
            Err((kind, b)) => {
                prop_assert_eq!(kind as u32, status);
                prop_assert_eq!(Some(kind), ErrorKind::from_u32(status));
                prop_assert_eq!(b, &body[..]);
            }
        }
        // One byte short, or one too many: refused.
        prop_assert!(Outcome::decode(&area[..len - 1]).is_err());
        let mut longer = area[..len].to_vec();
        longer.push(0);
        prop_assert!(Outcome::decode(&longer).is_err());
    }

    #[test]
    fn fixed_messages_round_trip(
        a: u64, b: u64, c: u64, d: u64, e: u64, reactor: bool,
        cpuid: [u32; 3], gprs: [u64; 15], errors: [u64; 4], abi_version: u32,
    ) {
        let info = GuestInfo { abi_version, ram_bytes: a, heap_bytes: b, image_end: c, cpuid, code_area: d, code_area_bytes: e };
        prop_assert_eq!(GuestInfo::decode(&info.encode()), Some(info));
        let crash = CrashReport { vector: a, error_code: b, rip: c, cs: d, rflags: e, rsp: a ^ b, ss: b ^ c, cr2: c ^ d, gprs };
        prop_assert_eq!(CrashReport::decode(&crash.encode()), Some(crash));
        let touched = Touched { read: a, written: b, ns: c };
        prop_assert_eq!(Touched::decode(&touched.encode()), Some(touched));
        let loaded = LoadedInfo {
            model: if reactor { Model::Reactor } else { Model::Command },
            memory_bytes: a, memory_limit: b, load_ns: c, module_ns: d,
        };
        prop_assert_eq!(LoadedInfo::decode(&loaded.encode()), Ok(loaded));
        let stats = GuestStats { invocations: a, errors, heap_used: b, heap_total: c, instances_prepared: d, prepare_ns: e };
        prop_assert_eq!(GuestStats::decode(&stats.encode()), Ok(stats));
        let params = InvokeParams { timeout_ms: a, realtime_ns: b };
        let mut payload = params.encode().to_vec();
        payload.extend_from_slice(b"event");
        prop_assert_eq!(InvokeParams::split(&payload), Ok((params, &b"event"[..])));
    }

    #[test]
    fn touch_lists_round_trip(ranges in vec((any::<u64>(), any::<u32>(), any::<bool>()), 0..50)) {
        let ranges: Vec<TouchRange> = ranges
            .into_iter()
            .map(|(first_page, pages, write)| TouchRange { first_page, pages, write })
            .collect();
        let encoded = TouchList::encode(&ranges);
        let decoded: Vec<TouchRange> = TouchList::decode(&encoded).expect("decodes").collect();
        prop_assert_eq!(&decoded, &ranges);
        let end = ranges.iter().map(|r| r.first_page.checked_add(u64::from(r.pages))).try_fold(0u64, |m, e| e.map(|e| m.max(e)));
        match end {
            Some(end) => prop_assert!(TouchList::decode_within(&encoded, end).is_ok()),
            None => prop_assert!(TouchList::decode_within(&encoded, u64::MAX).is_err()),
        }
    }

    #[test]
    fn containers_round_trip_and_any_flip_is_caught(
        read in vec((0u64..1000, 1u64..24), 0..20),
        written in vec((0u64..1000, 1u64..24), 0..20),
        id: [u8; 16], flip in any::<prop::sample::Index>(), bit in 0u8..8,
    ) {
        let range = |(start, pages)| PageRange { start, pages };
        let set = WorkingSet {
            snapshot_id: id,
            read: read.into_iter().map(range).collect(),
            written: written.into_iter().map(range).collect(),
        };
        let bytes = ember_vmm::snapshot::encode(ember_vmm::snapshot::WORKING_SET_MAGIC, &set).unwrap();
        let path = Path::new("t.ws");
        let decoded = WorkingSet::decode(path, &bytes, 1024).expect("decodes");
        prop_assert_eq!(decoded.counts(), set.counts());
        prop_assert_eq!(decoded.snapshot_id, id);
        let mut damaged = bytes.clone();
        damaged[flip.index(bytes.len())] ^= 1 << bit;
        prop_assert!(WorkingSet::decode(path, &damaged, 1024).is_err());
    }

    #[test]
    fn decoders_take_any_bytes(data in bytes(512)) {
        let _ = LoadSpec::decode(&data);
        let _ = Outcome::decode(&data);
        let _ = LoadedInfo::decode(&data);
        let _ = GuestStats::decode(&data);
        let _ = GuestInfo::decode(&data);
        let _ = CrashReport::decode(&data);
        let _ = TouchList::decode(&data).map(|r| r.count());
        let _ = ember_vmm::persist::MicrovmState::decode(Path::new("s"), &data);
        let wrapped = ember_vmm::snapshot::wrap_payload(ember_vmm::snapshot::STATE_MAGIC, &data);
        let _ = ember_vmm::persist::MicrovmState::decode(Path::new("s"), &wrapped);
        let _ = WorkingSet::decode(Path::new("w"), &ember_vmm::snapshot::wrap_payload(ember_vmm::snapshot::WORKING_SET_MAGIC, &data), 1 << 17);
    }
}
