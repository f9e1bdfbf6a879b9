//! The keep-alive and pre-warm policies.
//!
//! - `fixed`: every idle instance is kept `keep_alive_max_ms` after its
//!   last use; nothing is pre-warmed (Lambda's and OpenWhisk's ~10 min).
//! - `hybrid`: the hybrid histogram policy of "Serverless in the Wild"
//!   (Shahrad et al., ATC 2020), per function: an idle-time histogram of
//!   1-minute bins over 4 hours; the pre-warm window is the 5th
//!   percentile of idle times less 10 %, the keep-alive window runs to
//!   the 99th percentile plus 10 %. With a pre-warm window the instance
//!   goes right after each invocation and comes back that much later.
//!   Too few idle times (under [`HYBRID_MIN_SAMPLES`]), too many beyond
//!   4 hours (over half), or a flat histogram (bin counts' coefficient of
//!   variation under [`HYBRID_MIN_CV`]): the fixed keep-alive instead
//!   (the paper fits ARIMA to out-of-bounds idle times; we do not).
//! - `ember`: a detected period (confidence ≥ `min_confidence`, at least
//!   [`ACT_HITS`] on-beat arrivals, still beating) gets instances restored
//!   `lead_ms` before the earliest expected arrival, kept to `grace_ms`
//!   after the latest; after an invocation an instance lingers
//!   `linger_ms`, or longer where keeping is cheaper than the cold starts
//!   the windows miss (the function's own measured miss rate under
//!   periodic plans times `cold_cost_ms`), or a whole period while a call
//!   is owed (fewer calls in the last two periods than its rate says: a
//!   late beat, the rest of a fan-out), unless the next window opens
//!   within `bridge_ms`. Otherwise the keep-alive minimises the idle time
//!   spent plus `cold_cost_ms` per cold start over fine idle-time
//!   histograms — one for the function's last instance (none other idle
//!   or busy), one for the others — capped at `keep_alive_max_ms`; the
//!   last instance of a steady stream (arrivals faster than one per
//!   `cold_cost_ms`) is also kept [`LAST_KEEP_GAPS`] of its recent gaps;
//!   once the stream is quiet ([`QUIET_GAPS`] gaps) only the last
//!   instance stays. Before any reuse the gaps between invocations decide
//!   (the hybrid histogram's minute bins), the cap before any gap. A cold
//!   start early in an episode (or soon after another) restores at once
//!   what the busiest of the last episodes had busy
//!   ([`SURGE_HOLD_MS`]).

use super::detect::{Period, MAX_SKIP, TOLERANCE};
use super::{fine_edge, History, Rank, FINE_BINS, HYBRID_BINS};

/// Idle times the hybrid policy needs before it trusts its histogram.
pub const HYBRID_MIN_SAMPLES: u32 = 10;
/// The hybrid histogram is representative when its bin counts'
/// coefficient of variation reaches this.
pub const HYBRID_MIN_CV: f64 = 2.0;
/// On-beat arrivals a period needs before it is acted on.
pub const ACT_HITS: u32 = 6;
/// Idle times ember's histogram needs before it is used.
pub const EMBER_MIN_SAMPLES: u32 = 4;
/// Instances restored at an episode's cold opening are kept at least
/// this long, ms.
pub const SURGE_HOLD_MS: u64 = 10_000;
/// A periodic function owes a call when the last two periods brought
/// this many fewer than its rate says (a beat missed or late, a fan-out
/// not done).
pub const OWED_CALLS: f64 = 0.5;

/// The last instance of a steady stream is kept this many of its recent
/// gaps (a Poisson stream leaves a gap 10 times its mean once in 22,000).
pub const LAST_KEEP_GAPS: f64 = 10.0;
/// A stream that brought nothing for this many of its recent gaps is
/// quiet: only its last instance is kept from then (a queue consumer's
/// burst is over)...
pub const QUIET_GAPS: f64 = 30.0;
/// ... and not before this, ms.
pub const QUIET_MIN_MS: u64 = 5_000;

/// Which policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// A fixed keep-alive.
    Fixed,
    /// The hybrid histogram policy.
    Hybrid,
    /// Ember's: periods, and a cost-weighed keep-alive.
    Ember,
}

impl Policy {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fixed => "fixed",
            Policy::Hybrid => "hybrid",
            Policy::Ember => "ember",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Result<Policy, String> {
        match s {
            "fixed" => Ok(Policy::Fixed),
            "hybrid" => Ok(Policy::Hybrid),
            "ember" => Ok(Policy::Ember),
            other => Err(format!(
                "unknown pre-warm policy {other:?} (fixed, hybrid or ember)"
            )),
        }
    }
}

/// The policies' settings.
#[derive(Debug, Clone)]
pub struct PolicyParams {
    /// The fixed keep-alive, and the cap of every other, ms.
    pub keep_alive_max_ms: u64,
    /// A pre-warmed instance is ready this long before the earliest
    /// expected arrival (a restore takes ~4 ms; the rest is margin), ms.
    pub lead_ms: u64,
    /// How long after the latest expected arrival a pre-warmed instance
    /// waits, ms.
    pub grace_ms: u64,
    /// How long an instance of a periodic function lingers after an
    /// invocation (arrivals closer than this are one beat), ms.
    pub linger_ms: u64,
    /// An idle instance whose next window opens within this is kept
    /// rather than reaped and restored again, ms.
    pub bridge_ms: u64,
    /// A period is acted on from this confidence.
    pub min_confidence: f64,
    /// What one cold start is worth in idle instance time, ms.
    pub cold_cost_ms: u64,
}

impl Default for PolicyParams {
    fn default() -> Self {
        PolicyParams {
            keep_alive_max_ms: 600_000,
            lead_ms: 250,
            grace_ms: 1_000,
            linger_ms: super::detect::MERGE_MS,
            bridge_ms: 1_000,
            min_confidence: 0.6,
            cold_cost_ms: 600_000,
        }
    }
}

/// When to have instances ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// From, ms.
    pub from_ms: u64,
    /// Until (exclusive), ms.
    pub until_ms: u64,
    /// Instances wanted ready.
    pub count: u32,
    /// The arrival expected (ms), or the window's start when the policy
    /// expects none in particular.
    pub expected_ms: u64,
}

/// What a policy says for one function now.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// An idle instance is kept this long after its last use, ms.
    pub keep_alive_ms: u64,
    /// The function's last instance (none other idle or busy) is kept
    /// this long instead, ms.
    pub keep_last_ms: u64,
    /// When the stream goes quiet (no arrival for many recent gaps): from
    /// then only the last instance is kept, ms.
    pub quiet_at_ms: Option<u64>,
    /// Instances to have ready, and when.
    pub prewarm: Option<Window>,
    /// An idle instance is also kept when the window opens within this, ms.
    pub bridge_ms: u64,
    /// The period acted on.
    pub period: Option<Period>,
    /// Why: `fixed`, `fallback`, `histogram` or `periodic`.
    pub basis: &'static str,
}

impl Plan {
    /// How long an idle instance is kept: `lone`, the function's only
    /// instance (none other idle or busy), ms.
    pub fn keep_alive(&self, lone: bool) -> u64 {
        if lone {
            self.keep_last_ms
        } else {
            self.keep_alive_ms
        }
    }

    /// Whether an instance idle since `idle_since` (`lone`: the
    /// function's only one) is kept at `now`.
    pub fn keep(&self, idle_since: u64, now: u64, lone: bool) -> bool {
        now.saturating_sub(idle_since) <= self.keep_alive(lone)
            || self
                .prewarm
                .is_some_and(|w| now + self.bridge_ms >= w.from_ms && now < w.until_ms)
    }

    /// How many instances to restore ahead now, with `ready` idle ones
    /// (0 outside the window, or once window `done` was served).
    pub fn to_prewarm(&self, now: u64, ready: u32, done: Option<u64>) -> u32 {
        match self.prewarm {
            Some(w) if w.from_ms <= now && now < w.until_ms && done != Some(w.from_ms) => {
                w.count.saturating_sub(ready)
            }
            _ => 0,
        }
    }
}

fn fixed(params: &PolicyParams, basis: &'static str) -> Plan {
    Plan {
        keep_alive_ms: params.keep_alive_max_ms,
        keep_last_ms: params.keep_alive_max_ms,
        quiet_at_ms: None,
        prewarm: None,
        bridge_ms: 0,
        period: None,
        basis,
    }
}

/// The hybrid policy's windows from its histogram: (pre-warm, keep-alive
/// end) after an invocation's end, ms; `None` when it falls back.
pub fn hybrid_windows(bins: &[u32; HYBRID_BINS], oob: u32, total: u32) -> Option<(u64, u64)> {
    if total < HYBRID_MIN_SAMPLES || oob * 2 > total {
        return None;
    }
    let n = HYBRID_BINS as f64;
    let mean = bins.iter().map(|&c| c as f64).sum::<f64>() / n;
    let var = bins.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / n;
    if mean == 0.0 || var.sqrt() / mean < HYBRID_MIN_CV {
        return None;
    }
    // Percentiles over the in-bounds idle times, by bin.
    let inside: u32 = bins.iter().sum();
    let percentile = |q: f64| {
        let rank = (q * inside as f64).ceil().max(1.0) as u32;
        let mut seen = 0;
        for (i, &c) in bins.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return i;
            }
        }
        HYBRID_BINS - 1
    };
    // The head bin's start, the tail bin's end.
    let head = (percentile(0.05) as f64 * 60_000.0 * 0.9) as u64;
    let tail = ((percentile(0.99) + 1) as f64 * 60_000.0 * 1.1) as u64;
    Some((head, tail))
}

fn hybrid(h: &History, params: &PolicyParams) -> Plan {
    let (bins, oob, total) = h.hybrid_histogram();
    let Some((head, tail)) = hybrid_windows(bins, oob, total) else {
        return fixed(params, "fallback");
    };
    if head == 0 {
        return Plan {
            keep_alive_ms: tail,
            keep_last_ms: tail,
            quiet_at_ms: None,
            prewarm: None,
            bridge_ms: 0,
            period: None,
            basis: "histogram",
        };
    }
    // Unloaded after each invocation; loaded again `head` after its end,
    // kept to `tail`.
    let prewarm = match (h.in_flight(), h.last_end()) {
        (0, Some(end)) => Some(Window {
            from_ms: end + head,
            until_ms: end + tail,
            count: 1,
            expected_ms: end + head,
        }),
        _ => None,
    };
    Plan {
        keep_alive_ms: 0,
        keep_last_ms: 0,
        quiet_at_ms: None,
        prewarm,
        bridge_ms: 0,
        period: None,
        basis: "histogram",
    }
}

/// The keep-alive that minimises idle time plus `cold_cost_ms` per cold
/// start over a fine histogram, at most `max_ms`.
pub fn cost_keep_alive(bins: &[u32; FINE_BINS], oob: u32, cold_cost_ms: u64, max_ms: u64) -> u64 {
    binned_cost_keep_alive(bins, fine_edge, oob, cold_cost_ms, max_ms)
}

/// [`cost_keep_alive`] over bins whose upper edges `edge` gives.
fn binned_cost_keep_alive(
    bins: &[u32],
    edge: impl Fn(usize) -> u64,
    oob: u32,
    cold_cost_ms: u64,
    max_ms: u64,
) -> u64 {
    // Candidates: 0, each bin's upper edge below the cap, the cap.
    let mut candidates: Vec<u64> = vec![0];
    candidates.extend((0..bins.len()).map(&edge).filter(|&e| e < max_ms));
    candidates.push(max_ms);
    // An idle time in bin i is taken as its upper edge (the worst case).
    let idle_of = |i: usize| edge(i) as f64;
    let mut best = (f64::INFINITY, 0);
    for &k in &candidates {
        let mut cost = oob as f64 * (k as f64 + cold_cost_ms as f64);
        for (i, &c) in bins.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let idle = idle_of(i);
            cost += c as f64
                * if idle <= k as f64 {
                    idle
                } else {
                    k as f64 + cold_cost_ms as f64
                };
        }
        if cost < best.0 {
            best = (cost, k);
        }
    }
    best.1
}

/// The period to act on at `now`, and its next window.
fn acted_period(h: &mut History, now: u64, params: &PolicyParams) -> Option<(Period, Window)> {
    let mut best: Option<(Period, Window)> = None;
    let latest = h.last_arrival();
    for p in h.periods(now) {
        // The detection may be a few beats old (it runs every few
        // arrivals): a later arrival on the grid is a later beat.
        let period = p.period_ms.max(1) as i64;
        let on_grid = |t: u64| {
            let d = (t as i64 - p.last_beat_ms as i64).rem_euclid(period);
            d.min(period - d) as f64 <= TOLERANCE * period as f64
        };
        let last_beat = latest
            .filter(|&t| t > p.last_beat_ms && on_grid(t))
            .unwrap_or(p.last_beat_ms);
        let alive =
            now.saturating_sub(last_beat) as f64 <= (MAX_SKIP as f64 + 0.5) * p.period_ms as f64;
        if p.confidence < params.min_confidence || p.hits < ACT_HITS || !alive {
            continue;
        }
        let next = p.next_after(now, params.grace_ms);
        let w = Window {
            from_ms: next.saturating_sub(p.spread_ms + params.lead_ms),
            until_ms: next + p.spread_ms + params.grace_ms,
            count: p.burst.max(1),
            expected_ms: next,
        };
        if best.as_ref().is_none_or(|(_, b)| w.from_ms < b.from_ms) {
            best = Some((*p, w));
        }
    }
    best
}

/// The instances to restore at once after a cold start at `at` that may
/// surge ([`History::surge`]): as many as the busiest of the last episodes
/// had busy, less those busy now, held [`SURGE_HOLD_MS`].
fn surge(h: &History, now: u64) -> Option<Window> {
    let (at, peak) = h.surge()?;
    let want = peak.saturating_sub(h.in_flight());
    (now < at + SURGE_HOLD_MS && peak > 1 && want > 0).then_some(Window {
        from_ms: at,
        until_ms: at + SURGE_HOLD_MS,
        count: want,
        expected_ms: at,
    })
}

/// Calls a periodic function owes at `now`: its calls per period (over
/// the ring) times two, less the calls of the last two periods (from a
/// spread after the beat before last, so that beat's own call is out).
fn owed(h: &History, period: &Period, now: u64) -> f64 {
    let p = period.period_ms;
    let Some(rate) = h.calls_per(p) else {
        return 0.0;
    };
    let since = now.saturating_sub((2 * p).saturating_sub(period.spread_ms));
    2.0 * rate - h.arrivals_after(since) as f64
}

fn ember(h: &mut History, now: u64, params: &PolicyParams) -> Plan {
    let max = params.keep_alive_max_ms;
    let acted = acted_period(h, now, params);
    h.set_periodic(acted.is_some());
    if let Some((period, window)) = acted {
        // Lingers at least `linger_ms`; longer where the weighed
        // keep-alive says keeping is cheaper than a cold start that only
        // a missed window causes (the function's own share of cold
        // starts under periodic plans); a period long
        // while a call is owed (a late beat comes off the beat, the rest
        // of a fan-out after its first).
        let (keep_alive_ms, keep_last_ms) = if owed(h, &period, now) >= OWED_CALLS {
            (period.period_ms, period.period_ms)
        } else {
            let cold = (params.cold_cost_ms as f64 * h.periodic_miss()) as u64;
            let mut weighed = |rank| {
                h.cost_keep_alive(rank, cold, max, EMBER_MIN_SAMPLES)
                    .map_or(params.linger_ms, |k| k.max(params.linger_ms))
            };
            (weighed(Rank::Other), weighed(Rank::Last))
        };
        return Plan {
            keep_alive_ms: keep_alive_ms.min(max),
            keep_last_ms: keep_last_ms.min(max),
            quiet_at_ms: None,
            prewarm: Some(window),
            bridge_ms: params.bridge_ms,
            period: Some(period),
            basis: "periodic",
        };
    }
    let surge = surge(h, now);
    if h.fine_samples() < EMBER_MIN_SAMPLES {
        // Too few reuses to learn from: the gaps between invocations (the
        // hybrid histogram's minute bins) decide, the cap before any.
        let (bins, oob, total) = h.hybrid_histogram();
        let keep = if total == 0 {
            max
        } else {
            let minute = |i: usize| (i as u64 + 1) * 60_000;
            binned_cost_keep_alive(bins, minute, oob, params.cold_cost_ms, max)
        };
        return Plan {
            keep_alive_ms: keep,
            keep_last_ms: keep,
            prewarm: surge,
            ..fixed(params, "fallback")
        };
    }
    // Each rank by its own histogram (by the other's while it has too
    // few idle times); the last instance of a steady stream also while
    // arrivals come faster than one per cold cost (for a Poisson stream
    // keeping is then cheaper at any idle time).
    let cost = params.cold_cost_ms;
    let last = h.cost_keep_alive(Rank::Last, cost, max, EMBER_MIN_SAMPLES);
    let other = h.cost_keep_alive(Rank::Other, cost, max, EMBER_MIN_SAMPLES);
    let rate = h.recent_rate();
    let steady = match rate {
        Some(per_ms) if per_ms * cost as f64 >= 1.0 => ((LAST_KEEP_GAPS / per_ms) as u64).min(max),
        _ => 0,
    };
    let keep_last_ms = last.or(other).unwrap_or(max).max(steady);
    let keep_alive_ms = other.or(last).unwrap_or(max);
    let quiet_at_ms = match (rate, h.last_arrival()) {
        (Some(per_ms), Some(last)) => Some(last + ((QUIET_GAPS / per_ms) as u64).max(QUIET_MIN_MS)),
        _ => None,
    };
    let quiet = quiet_at_ms.is_some_and(|q| now >= q);
    Plan {
        keep_alive_ms: if quiet { 0 } else { keep_alive_ms },
        keep_last_ms,
        quiet_at_ms: quiet_at_ms.filter(|&q| q > now),
        prewarm: surge,
        bridge_ms: 0,
        period: None,
        basis: "histogram",
    }
}

/// What `policy` says for the function of history `h` at `now`.
pub fn plan(h: &mut History, policy: Policy, now: u64, params: &PolicyParams) -> Plan {
    match policy {
        Policy::Fixed => fixed(params, "fixed"),
        Policy::Hybrid => hybrid(h, params),
        Policy::Ember => ember(h, now, params),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::Rank;

    /// A history of `n` calls `period_ms` apart from 0, each 200 ms long.
    fn timer(period_ms: u64, n: u64) -> History {
        let mut h = History::default();
        for i in 0..n {
            h.arrived(i * period_ms);
            h.finished(i * period_ms + 200);
        }
        h
    }

    #[test]
    fn the_hybrid_windows_match_a_hand_computed_example() {
        // 100 idle times: 10 of 2 min (bin 2), 85 of 5 min (bin 5), 4 of
        // 9 min (bin 9), 1 of 30 min (bin 30). p5 → rank 5 → bin 2;
        // p99 → rank 99 → bin 9. Pre-warm = 2 min × 0.9 = 108 s;
        // keep-alive end = (9 + 1) min × 1.1 = 660 s.
        let mut bins = [0u32; HYBRID_BINS];
        bins[2] = 10;
        bins[5] = 85;
        bins[9] = 4;
        bins[30] = 1;
        assert_eq!(hybrid_windows(&bins, 0, 100), Some((108_000, 660_000)));
        // The same through a history: after an invocation ending at t,
        // nothing is kept, and one instance is wanted from t + 108 s to
        // t + 660 s.
        let mut h = History::default();
        let mut t = 0;
        for (minutes, n) in [(2u64, 10), (5, 85), (9, 4), (30, 1)] {
            for _ in 0..n {
                h.arrived(t);
                h.finished(t + 1_000);
                t += 1_000 + minutes * 60_000 + 30_000;
            }
        }
        h.arrived(t);
        h.finished(t + 1_000);
        let end = t + 1_000;
        let plan = plan(&mut h, Policy::Hybrid, end, &PolicyParams::default());
        assert_eq!(plan.keep_alive_ms, 0);
        assert_eq!(
            plan.prewarm.map(|w| (w.from_ms - end, w.until_ms - end)),
            Some((108_000, 660_000))
        );
        assert!(!plan.keep(end, end + 1, true));
        assert_eq!(plan.to_prewarm(end + 108_000, 0, None), 1);
        assert_eq!(plan.to_prewarm(end + 107_999, 0, None), 0);
        assert_eq!(plan.to_prewarm(end + 108_000, 0, Some(end + 108_000)), 0);
    }

    #[test]
    fn the_hybrid_policy_falls_back_without_a_representative_histogram() {
        let mut bins = [0u32; HYBRID_BINS];
        // Too few.
        bins[3] = 9;
        assert_eq!(hybrid_windows(&bins, 0, 9), None);
        // Mostly beyond 4 hours.
        assert_eq!(hybrid_windows(&bins, 10, 19), None);
        // Flat: one idle time in every bin.
        let flat = [1u32; HYBRID_BINS];
        assert_eq!(hybrid_windows(&flat, 0, HYBRID_BINS as u32), None);
        // A 0 head: keep for the tail, no pre-warm.
        bins[0] = 100;
        let (head, tail) = hybrid_windows(&bins, 0, 109).unwrap();
        assert_eq!((head, tail), (0, 4 * 60_000 * 11 / 10));
    }

    #[test]
    fn the_cost_keep_alive_covers_short_gaps_and_skips_hopeless_ones() {
        let mut bins = [0u32; FINE_BINS];
        let b = |ms| super::super::fine_bin(ms).unwrap();
        // A bursty consumer: 500 gaps of ~1 s inside bursts, 10 of an hour.
        bins[b(1_000)] = 500;
        bins[b(3_600_000)] = 10;
        let k = cost_keep_alive(&bins, 0, 600_000, 600_000);
        assert!((1_000..=1_300).contains(&k), "{k}");
        // Gaps of 2 min, and the cold start worth 10 min: keep them.
        let mut bins = [0u32; FINE_BINS];
        bins[b(120_000)] = 20;
        let k = cost_keep_alive(&bins, 0, 600_000, 600_000);
        assert!((120_000..=150_000).contains(&k), "{k}");
        // Gaps of 3 hours with a 10-min cap: nothing is kept.
        let mut bins = [0u32; FINE_BINS];
        bins[b(3 * 3_600_000)] = 20;
        assert_eq!(cost_keep_alive(&bins, 0, 600_000, 600_000), 0);
        // A cheap cold start: gaps of 2 min are not worth keeping for.
        let mut bins = [0u32; FINE_BINS];
        bins[b(120_000)] = 20;
        assert_eq!(cost_keep_alive(&bins, 0, 60_000, 600_000), 0);
    }

    #[test]
    fn ember_prewarms_a_periodic_function_just_before_its_beat() {
        let params = PolicyParams::default();
        let mut h = timer(300_000, 10);
        let now = 9 * 300_000 + 200;
        let plan = plan(&mut h, Policy::Ember, now, &params);
        assert_eq!(plan.basis, "periodic");
        let w = plan.prewarm.unwrap();
        assert_eq!(w.expected_ms, 10 * 300_000);
        assert_eq!(w.from_ms, 10 * 300_000 - 6_000 - params.lead_ms);
        assert_eq!(w.until_ms, 10 * 300_000 + 6_000 + params.grace_ms);
        // The instance that just served lingers half a second, then goes.
        assert!(plan.keep(now, now + 500, true));
        assert!(!plan.keep(now, now + 501, true));
        // It is kept again from just before the window (if it were still
        // there), and one is restored in the window.
        assert!(plan.keep(now, w.from_ms - params.bridge_ms, true));
        assert_eq!(plan.to_prewarm(w.from_ms, 0, None), 1);
        assert_eq!(plan.to_prewarm(w.from_ms, 1, None), 0);
        assert_eq!(plan.to_prewarm(w.until_ms, 0, None), 0);
    }

    #[test]
    fn ember_stops_predicting_a_timer_that_stopped() {
        let params = PolicyParams::default();
        let mut h = timer(60_000, 10);
        let quiet = 9 * 60_000 + 5 * 60_000;
        let plan = plan(&mut h, Policy::Ember, quiet, &params);
        assert_ne!(plan.basis, "periodic");
        assert_eq!(plan.prewarm, None);
    }

    #[test]
    fn ember_surges_to_the_last_episodes_peak_after_clustered_or_early_cold_starts() {
        let params = PolicyParams::default();
        let mut h = History::default();
        // An episode with 6 running at once.
        for i in 0..6 {
            h.arrived(1_000 + i);
        }
        for i in 0..6 {
            h.finished(2_000 + i);
        }
        // An hour later the next opens cold: what the last one had busy
        // is restored at once, less the one running, held a while.
        let t = 3_600_000;
        h.arrived(t);
        h.cold(t);
        let p = plan(&mut h, Policy::Ember, t + 1, &params);
        let w = p.prewarm.unwrap();
        assert_eq!((w.from_ms, w.until_ms, w.count), (t, t + SURGE_HOLD_MS, 5));
        assert_eq!(p.to_prewarm(t + 1, 0, None), 5);
        assert_eq!(
            plan(&mut h, Policy::Ember, t + SURGE_HOLD_MS, &params).prewarm,
            None
        );
        // Late in a long episode, a lone cold start does not surge; a
        // second one within the cluster time does.
        let mut at = t;
        for gap in [7_000u64, 31_000, 12_000, 44_000, 3_000, 25_000]
            .iter()
            .cycle()
        {
            if at >= t + super::super::SURGE_YOUNG_MS + 60_000 {
                break;
            }
            h.finished(at + 1_000);
            at += gap;
            h.arrived(at);
        }
        h.cold(at);
        let p = plan(&mut h, Policy::Ember, at + 1, &params);
        assert_ne!(p.basis, "periodic");
        assert_eq!(p.prewarm, None, "{p:?}");
        h.arrived(at + 5_000);
        h.cold(at + 5_000);
        let w = plan(&mut h, Policy::Ember, at + 5_001, &params)
            .prewarm
            .unwrap();
        assert_eq!((w.from_ms, w.count), (at + 5_000, 4));
    }

    #[test]
    fn ember_keeps_only_the_last_instance_once_a_burst_is_over() {
        let params = PolicyParams::default();
        let mut h = History::default();
        // Reuses after a tenth of a second, of the last instance and of
        // the others; arrivals ten a second.
        for _ in 0..10 {
            h.reused(100, Rank::Last);
            h.reused(100, Rank::Other);
        }
        for i in 0..20u64 {
            h.arrived(i * 100);
            h.finished(i * 100 + 50);
        }
        let last = 1_900;
        let p = plan(&mut h, Policy::Ember, last + 1_000, &params);
        assert_eq!(p.basis, "histogram");
        assert!(p.keep_alive_ms > 0, "{p:?}");
        // Quiet after 30 gaps, and not before QUIET_MIN_MS.
        assert_eq!(p.quiet_at_ms, Some(last + QUIET_MIN_MS));
        let p = plan(&mut h, Policy::Ember, last + QUIET_MIN_MS, &params);
        assert_eq!((p.keep_alive_ms, p.quiet_at_ms), (0, None));
        assert!(!p.keep(last + 1, last + QUIET_MIN_MS, false));
        // The last instance keeps its own keep-alive (here ten gaps of a
        // steady stream: one second).
        assert_eq!(p.keep_last_ms, 1_000);
    }

    #[test]
    fn ember_keeps_the_last_instance_of_a_steady_stream_while_it_pays() {
        let params = PolicyParams::default();
        // Gaps the last instance could not bridge (beyond the cap): its
        // histogram alone would keep nothing.
        let history = || {
            let mut h = History::default();
            for _ in 0..10 {
                h.reused(3_600_000, Rank::Last);
            }
            h
        };
        // Arrivals about a minute apart (not periodic): a cold start
        // costs ten minutes of idling, so the last instance is kept ten
        // gaps, capped.
        let gaps = [
            40_000u64, 75_000, 52_000, 90_000, 33_000, 61_000, 70_000, 45_000,
        ];
        let mut h = history();
        let mut t = 0;
        for g in gaps {
            t += g;
            h.arrived(t);
            h.finished(t + 100);
        }
        let p = plan(&mut h, Policy::Ember, t + 200, &params);
        assert_eq!(p.basis, "histogram");
        assert_eq!(p.keep_last_ms, params.keep_alive_max_ms);
        assert!(p.keep(t + 100, t + 500_000, true));
        // One every twenty minutes: not worth it.
        let mut h = history();
        let mut t = 0;
        for g in gaps {
            t += g * 20;
            h.arrived(t);
            h.finished(t + 100);
        }
        let p = plan(&mut h, Policy::Ember, t + 200, &params);
        assert_eq!(p.keep_last_ms, 0);
    }

    #[test]
    fn a_periodic_function_owing_a_call_keeps_its_instance_a_period() {
        let params = PolicyParams::default();
        let mut h = timer(60_000, 10);
        // Just after beat 9: nothing owed, it lingers.
        let p = plan(&mut h, Policy::Ember, 9 * 60_000 + 1_000, &params);
        assert_eq!(p.basis, "periodic");
        assert!(p.keep_alive_ms < 60_000, "{p:?}");
        // Beat 10 did not come: a call is owed (late, or lost), and an
        // instance idle now is kept a period for it.
        let p = plan(&mut h, Policy::Ember, 10 * 60_000 + 10_000, &params);
        assert_eq!(p.basis, "periodic");
        assert_eq!(p.keep_alive_ms, p.period.unwrap().period_ms);
    }

    #[test]
    fn ember_learns_from_its_own_periodic_misses() {
        let mut h = History::default();
        // A prior of 1 in 10.
        assert!((h.periodic_miss() - 0.1).abs() < 1e-9);
        h.set_periodic(true);
        for i in 0..30u64 {
            h.arrived(i * 1_000);
            if i % 10 == 0 {
                h.cold(i * 1_000);
            }
            h.finished(i * 1_000 + 10);
        }
        assert!((h.periodic_miss() - 4.0 / 40.0).abs() < 1e-9);
        // Cold starts under other plans do not count.
        h.set_periodic(false);
        h.arrived(40_000);
        h.cold(40_000);
        assert!((h.periodic_miss() - 4.0 / 40.0).abs() < 1e-9);
    }

    #[test]
    fn before_reuses_ember_keeps_by_the_gaps_it_has_seen() {
        let params = PolicyParams::default();
        let mut h = History::default();
        // Nothing seen: the cap.
        h.arrived(0);
        h.finished(100);
        assert_eq!(
            plan(&mut h, Policy::Ember, 100, &params).keep_alive_ms,
            600_000
        );
        // A gap of two hours: nothing kept.
        h.arrived(7_200_100);
        h.finished(7_200_200);
        let p = plan(&mut h, Policy::Ember, 7_200_200, &params);
        assert_eq!((p.basis, p.keep_alive_ms), ("fallback", 0));
        // Gaps of three minutes (in the 3–4 minute bin): kept for them.
        let mut h = History::default();
        for i in 0..4u64 {
            h.arrived(i * 200_000);
            h.finished(i * 200_000 + 100);
        }
        let p = plan(&mut h, Policy::Ember, 600_100, &params);
        assert_eq!((p.basis, p.keep_alive_ms), ("fallback", 240_000));
    }

    #[test]
    fn a_short_period_stays_acted_on_between_its_beats() {
        // A 2 s timer (its calls a few ms late) planned every 100 ms: the
        // detection cached a few beats back must not make it look stopped.
        let params = PolicyParams {
            keep_alive_max_ms: 1_000,
            cold_cost_ms: 1_000,
            ..PolicyParams::default()
        };
        let mut h = History::default();
        let late = [3u64, 17, 9, 30, 5, 12, 44, 8, 2, 21];
        let mut last = 0;
        for i in 0..20u64 {
            last = 100_000 + i * 2_000 + late[i as usize % 10];
            h.arrived(last);
            h.finished(last + 30);
            plan(&mut h, Policy::Ember, last + 1, &params);
        }
        for dt in (0..3_000).step_by(100) {
            let p = plan(&mut h, Policy::Ember, last + dt, &params);
            assert_eq!(p.basis, "periodic", "{dt} ms after the last call: {p:?}");
        }
    }

    #[test]
    fn fixed_keeps_for_the_keep_alive_and_never_prewarms() {
        let params = PolicyParams::default();
        let mut h = History::default();
        let plan = plan(&mut h, Policy::Fixed, 0, &params);
        assert!(plan.keep(0, 600_000, true) && !plan.keep(0, 600_001, true));
        assert_eq!(plan.to_prewarm(0, 0, None), 0);
        assert_eq!(Policy::parse("ember"), Ok(Policy::Ember));
        assert!(Policy::parse("lru").unwrap_err().contains("lru"));
    }
}
