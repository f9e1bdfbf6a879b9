//! Time from the TSC, at native speed in ring 3.
//!
//! The host gives the TSC frequency at load and its wall-clock time with
//! every invocation; the guest has no timer. Monotonic time counts from the
//! guest's first reading; wall-clock time is the host's last stamp plus the
//! TSC ticks since it arrived.

use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
static WALL_NS: AtomicU64 = AtomicU64::new(0);
static TSC_AT_WALL: AtomicU64 = AtomicU64::new(0);

/// The time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter; it is allowed in ring 3 here
    // (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Starts the monotonic clock (at boot).
pub fn init() {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
}

/// Sets the TSC frequency the host measured.
pub fn set_frequency(khz: u64) {
    TSC_KHZ.store(khz, Ordering::Relaxed);
}

/// Takes the host's wall-clock time, stamped now.
pub fn set_wall_clock(realtime_ns: u64) {
    TSC_AT_WALL.store(rdtsc(), Ordering::Relaxed);
    WALL_NS.store(realtime_ns, Ordering::Relaxed);
}

/// TSC ticks as nanoseconds (0 while the frequency is unknown).
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let khz = TSC_KHZ.load(Ordering::Relaxed);
    if khz == 0 {
        return 0;
    }
    ((ticks as u128 * 1_000_000) / khz as u128) as u64
}

/// Nanoseconds as TSC ticks (`u64::MAX` while the frequency is unknown).
pub fn ns_to_ticks(ns: u64) -> u64 {
    let khz = TSC_KHZ.load(Ordering::Relaxed);
    if khz == 0 {
        return u64::MAX;
    }
    ((ns as u128 * khz as u128) / 1_000_000).min(u64::MAX as u128) as u64
}

/// The TSC reading `ms` milliseconds after `from` (saturating).
pub fn deadline_after_ms(from: u64, ms: u64) -> u64 {
    from.saturating_add(ns_to_ticks(ms.saturating_mul(1_000_000)))
}

/// Now on WASI clock `id` (0 realtime; 1 monotonic, and 2, 3 the process
/// and thread CPU clocks, which are monotonic time: the function owns its
/// vCPU while it runs), or `None` for an unknown clock.
pub fn now_ns(id: u32) -> Option<u64> {
    match id {
        0 => Some(realtime_ns()),
        1..=3 => Some(monotonic_ns()),
        _ => None,
    }
}

/// Nanoseconds since boot.
pub fn monotonic_ns() -> u64 {
    ticks_to_ns(rdtsc().wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed)))
}

/// Nanoseconds since the Unix epoch.
pub fn realtime_ns() -> u64 {
    let since = rdtsc().wrapping_sub(TSC_AT_WALL.load(Ordering::Relaxed));
    WALL_NS
        .load(Ordering::Relaxed)
        .saturating_add(ticks_to_ns(since))
}
