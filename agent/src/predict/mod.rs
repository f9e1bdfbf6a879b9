//! Arrival prediction: per function, a bounded history of arrivals and
//! idle times, periodicity detection ([`detect`]), and the keep-alive and
//! pre-warm policies ([`policy`]) that emberd's pool and `ember-bench sim`
//! both run. Pure code: times are milliseconds on any monotonic clock the
//! caller chooses, and nothing here does I/O (docs/prewarm.md).

pub mod detect;
pub mod policy;

pub use detect::Period;
pub use policy::{Plan, Policy, PolicyParams, Window};

/// Recent arrivals kept per function.
pub const RING: usize = 64;

/// The hybrid policy's idle-time histogram: 1-minute bins over 4 hours.
pub const HYBRID_BINS: usize = 240;

/// Ember's idle-time histogram: log-spaced bins from [`FINE_FIRST_MS`],
/// each [`FINE_GROWTH`] times the previous (the last ends near 9.6 h).
pub const FINE_BINS: usize = 64;
/// The first fine bin's upper edge, ms.
pub const FINE_FIRST_MS: f64 = 100.0;
/// The ratio between consecutive fine bin edges.
pub const FINE_GROWTH: f64 = 1.22;

/// Histograms are halved when they hold this many idle times, so that
/// the recent past weighs more than the distant one.
pub const AGE_AT: u32 = 4_096;

/// An arrival this long after the last end, with nothing running, opens
/// a new *episode* (a burst of a queue consumer, a morning of HTTP
/// traffic), ms.
pub const EPISODE_GAP_MS: u64 = 60_000;

/// A cold start this soon after another one lets the policy restore what
/// the last episodes needed ([`History::surge`]), ms.
pub const COLD_CLUSTER_MS: u64 = 10_000;

/// Any cold start this soon after an episode opened does too (a queue
/// consumer's burst ramps up in its first minutes), ms.
pub const SURGE_YOUNG_MS: u64 = 300_000;

/// Episodes whose peak concurrency is remembered.
pub const EPISODES: usize = 4;

/// New arrivals after which the detection is run again (sooner while a
/// function is young, or after [`REDETECT_MS`]).
const REDETECT_EVERY: u64 = 8;
/// The detection is run again on an arrival this long after the last run.
const REDETECT_MS: u64 = 30_000;
/// ... and not sooner than this, however many arrivals came (a periodic
/// beat is at least a second apart; a burst need not be scanned on every
/// eighth call).
const REDETECT_MIN_MS: u64 = 5_000;

/// Which of a function's instances an idle time is about: its last
/// one (no other idle or busy: needed by the next arrival), or one of
/// several (needed when that many run at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rank {
    /// The function's only instance.
    Last = 0,
    /// One of several.
    Other = 1,
}

impl Rank {
    /// `Last` when `lone`, else `Other`.
    pub fn of(lone: bool) -> Rank {
        if lone {
            Rank::Last
        } else {
            Rank::Other
        }
    }
}

/// A fine histogram of idle times before instances were needed again: a
/// reuse gives its idle time, a reap later missed by a cold start the
/// time from idling to that start, a reap never missed a sample beyond
/// the histogram.
#[derive(Debug, Clone)]
struct Fine {
    bins: [u32; FINE_BINS],
    oob: u32,
    total: u32,
    /// Idle times recorded since start (the histogram's version).
    idles: u64,
    /// The last cost keep-alive: (idles, cold cost, cap, keep-alive).
    cache: Option<(u64, u64, u64, u64)>,
}

impl Default for Fine {
    fn default() -> Self {
        Fine {
            bins: [0; FINE_BINS],
            oob: 0,
            total: 0,
            idles: 0,
            cache: None,
        }
    }
}

impl Fine {
    /// A sample (`None`: beyond the histogram); halved at [`AGE_AT`].
    fn add(&mut self, idle_ms: Option<u64>) {
        self.idles += 1;
        match idle_ms.and_then(fine_bin) {
            Some(i) => self.bins[i] += 1,
            None => self.oob += 1,
        }
        self.total += 1;
        if self.total >= AGE_AT {
            for b in &mut self.bins {
                *b /= 2;
            }
            self.oob /= 2;
            self.total = self.bins.iter().sum::<u32>() + self.oob;
        }
    }

    /// [`policy::cost_keep_alive`], computed again once the samples grew
    /// by a sixteenth (at once while there are few).
    fn keep_alive(&mut self, cold_cost_ms: u64, max_ms: u64) -> u64 {
        match self.cache {
            Some((idles, cold, max, k))
                if self.idles - idles <= self.total as u64 / 16
                    && cold == cold_cost_ms
                    && max == max_ms =>
            {
                k
            }
            _ => {
                let k = policy::cost_keep_alive(&self.bins, self.oob, cold_cost_ms, max_ms);
                self.cache = Some((self.idles, cold_cost_ms, max_ms, k));
                k
            }
        }
    }
}

/// One function's arrival history: 64 recent arrivals (512 B), the
/// hybrid histogram (960 B), two fine histograms (2 × 256 B), 16 pending
/// reaps (384 B), the last episodes' peak concurrency and the cached
/// detection: under 3 KiB per function, whatever its traffic.
#[derive(Debug, Clone)]
pub struct History {
    ring: [u64; RING],
    len: usize,
    next: usize,
    /// Arrivals seen in all.
    pub arrivals: u64,
    in_flight: u32,
    last_end: Option<u64>,
    hybrid: [u32; HYBRID_BINS],
    hybrid_oob: u32,
    hybrid_total: u32,
    /// Fine histograms, by [`Rank`]: the last instance's idle times, the
    /// others'.
    fine: [Fine; 2],
    detected: Vec<Period>,
    detected_at: Option<(u64, u64)>,
    /// Instances reaped and not yet missed: (when, idle until then,
    /// which).
    reaped: std::collections::VecDeque<(u64, u64, Rank)>,
    /// The current episode's peak concurrency, and when it opened.
    episode_peak: u32,
    episode_at: Option<u64>,
    /// The last cold start.
    last_cold: Option<u64>,
    /// The last [`EPISODES`] episodes' peaks (0: none yet).
    peaks: [u32; EPISODES],
    /// The last cold start that may restore a surge (early in its episode,
    /// or soon after another).
    surge_at: Option<u64>,
    /// Whether the plan in force is a periodic one (set by the policy).
    periodic: bool,
    /// Arrivals and cold starts under periodic plans (halved at
    /// [`MISS_WINDOW`] arrivals).
    periodic_arrivals: u32,
    periodic_colds: u32,
}

/// Arrivals under periodic plans over which their cold starts are
/// counted (older ones weigh half, then a quarter, ...).
pub const MISS_WINDOW: u32 = 256;

/// Reaps remembered for [`History::cold`]; older ones count as never
/// missed (beyond the fine histogram).
const PENDING_REAPS: usize = 16;

impl Default for History {
    fn default() -> Self {
        History {
            ring: [0; RING],
            len: 0,
            next: 0,
            arrivals: 0,
            in_flight: 0,
            last_end: None,
            hybrid: [0; HYBRID_BINS],
            hybrid_oob: 0,
            hybrid_total: 0,
            fine: Default::default(),
            detected: Vec::new(),
            detected_at: None,
            reaped: std::collections::VecDeque::new(),
            episode_peak: 0,
            peaks: [0; EPISODES],
            surge_at: None,
            episode_at: None,
            last_cold: None,
            periodic: false,
            periodic_arrivals: 0,
            periodic_colds: 0,
        }
    }
}

/// The fine bin of an idle time (`None`: beyond the last).
pub fn fine_bin(idle_ms: u64) -> Option<usize> {
    let x = idle_ms as f64 / FINE_FIRST_MS;
    if x < 1.0 {
        return Some(0);
    }
    let i = (x.ln() / FINE_GROWTH.ln()).floor() as usize + 1;
    (i < FINE_BINS).then_some(i)
}

/// The upper edge of fine bin `i`, ms.
pub fn fine_edge(i: usize) -> u64 {
    (FINE_FIRST_MS * FINE_GROWTH.powi(i as i32)).ceil() as u64
}

impl History {
    /// An invocation arrived at `now`. The idle time before it (from the
    /// last invocation's end, when none was running) goes into the
    /// histograms.
    pub fn arrived(&mut self, now: u64) {
        if self.in_flight == 0 {
            if let Some(end) = self.last_end {
                self.hybrid_idle(now.saturating_sub(end));
            }
        }
        let quiet = self
            .last_end
            .is_none_or(|end| now.saturating_sub(end) > EPISODE_GAP_MS);
        if self.in_flight == 0 && quiet {
            self.episode_at = Some(now);
            if self.episode_peak > 0 {
                self.peaks.rotate_right(1);
                self.peaks[0] = self.episode_peak;
            }
            self.episode_peak = 0;
        }
        self.in_flight += 1;
        self.episode_peak = self.episode_peak.max(self.in_flight);
        // Out-of-order clocks are clamped: the ring stays ascending.
        let last = self.last_arrival().unwrap_or(0);
        self.ring[self.next] = now.max(last);
        self.next = (self.next + 1) % RING;
        self.len = (self.len + 1).min(RING);
        self.arrivals += 1;
        if self.periodic {
            self.periodic_arrivals += 1;
            if self.periodic_arrivals >= MISS_WINDOW {
                self.periodic_arrivals /= 2;
                self.periodic_colds /= 2;
            }
        }
    }

    /// An invocation ended at `now`.
    pub fn finished(&mut self, now: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.last_end = Some(self.last_end.map_or(now, |e| e.max(now)));
    }

    /// Which instance an arrival at this point (already
    /// [`arrived`](History::arrived)) needed: the last one when it runs
    /// alone.
    fn arrival_rank(&self) -> Rank {
        Rank::of(self.in_flight <= 1)
    }

    /// An idle instance (kept after an invocation, not restored ahead)
    /// served again after `idle_ms`: one sample of how long an instance
    /// of its rank must be kept to be used.
    pub fn reused(&mut self, idle_ms: u64, rank: Rank) {
        self.fine[rank as usize].add(Some(idle_ms));
    }

    /// An idle instance of `rank` was reaped at `now` after `idle_ms`.
    pub fn reaped(&mut self, now: u64, idle_ms: u64, rank: Rank) {
        self.reaped.push_back((now, idle_ms, rank));
        if self.reaped.len() > PENDING_REAPS {
            if let Some((_, _, rank)) = self.reaped.pop_front() {
                self.fine[rank as usize].add(None);
            }
        }
    }

    /// An arrival at `now` (already [`arrived`](History::arrived)) found
    /// no idle instance: the last instance of its rank reaped would have
    /// needed its idle time until now (one sample).
    /// The policy may then restore at once what the busiest of the last
    /// episodes needed ([`History::surge`]).
    pub fn cold(&mut self, now: u64) {
        if self.periodic {
            self.periodic_colds += 1;
        }
        self.missed_reap(now);
        let cluster = self
            .last_cold
            .is_some_and(|c| now.saturating_sub(c) <= COLD_CLUSTER_MS);
        let young = self
            .episode_at
            .is_some_and(|e| now.saturating_sub(e) <= SURGE_YOUNG_MS);
        if young || cluster {
            self.surge_at = Some(now);
        }
        self.last_cold = Some(now);
    }

    /// An instance restored ahead served an arrival at `now`: the last
    /// instance reaped, had it been kept, would have served it instead
    /// (one sample, as for a cold start).
    pub fn prewarm_used(&mut self, now: u64) {
        self.missed_reap(now);
    }

    fn missed_reap(&mut self, now: u64) {
        let rank = self.arrival_rank();
        if let Some(i) = self.reaped.iter().rposition(|r| r.2 == rank) {
            if let Some((at, idle, _)) = self.reaped.remove(i) {
                self.fine[rank as usize].add(Some(idle + now.saturating_sub(at)));
            }
        }
    }

    /// The plan in force is periodic (or not): arrivals and cold starts
    /// under periodic plans are counted for [`History::periodic_miss`].
    pub fn set_periodic(&mut self, periodic: bool) {
        self.periodic = periodic;
    }

    /// The share of arrivals under periodic plans that started cold: 1 in
    /// 10 before any (a prior worth 10 arrivals).
    pub fn periodic_miss(&self) -> f64 {
        (self.periodic_colds as f64 + 1.0) / (self.periodic_arrivals as f64 + 10.0)
    }

    /// The last cold start, and the most instances any of the
    /// last [`EPISODES`] episodes had busy at once.
    pub fn surge(&self) -> Option<(u64, u32)> {
        let peak = self.peaks.iter().copied().fold(self.episode_peak, u32::max);
        self.surge_at.map(|at| (at, peak))
    }

    /// The `i`-th most recent arrival (0: the last), if the ring has it.
    fn back(&self, i: usize) -> Option<u64> {
        (i < self.len).then(|| self.ring[(self.next + 2 * RING - 1 - i) % RING])
    }

    /// Arrivals per ms over the last 8 (`None` under 8).
    pub fn recent_rate(&self) -> Option<f64> {
        let (first, last) = (self.back(7)?, self.back(0)?);
        Some(7.0 / (last - first).max(1) as f64)
    }

    /// Arrivals in the ring after `since`.
    pub fn arrivals_after(&self, since: u64) -> u32 {
        (0..self.len)
            .take_while(|&i| self.back(i) > Some(since))
            .count() as u32
    }

    /// Calls per `period_ms` over the ring's span (`None` under 2).
    pub fn calls_per(&self, period_ms: u64) -> Option<f64> {
        let (first, last) = (self.back(self.len.checked_sub(1)?)?, self.back(0)?);
        (last > first).then(|| (self.len - 1) as f64 * period_ms as f64 / (last - first) as f64)
    }

    fn hybrid_idle(&mut self, idle_ms: u64) {
        let minute = (idle_ms / 60_000) as usize;
        match self.hybrid.get_mut(minute) {
            Some(bin) => *bin += 1,
            None => self.hybrid_oob += 1,
        }
        self.hybrid_total += 1;
        self.age();
    }

    fn age(&mut self) {
        if self.hybrid_total >= AGE_AT {
            for b in &mut self.hybrid {
                *b /= 2;
            }
            self.hybrid_oob /= 2;
            self.hybrid_total = self.hybrid.iter().sum::<u32>() + self.hybrid_oob;
        }
    }

    /// The most recent arrival.
    pub fn last_arrival(&self) -> Option<u64> {
        (self.len > 0).then(|| self.ring[(self.next + RING - 1) % RING])
    }

    /// The end of the last invocation.
    pub fn last_end(&self) -> Option<u64> {
        self.last_end
    }

    /// Invocations running.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The recent arrivals, oldest first.
    pub fn recent(&self) -> Vec<u64> {
        let start = (self.next + RING - self.len) % RING;
        (0..self.len)
            .map(|i| self.ring[(start + i) % RING])
            .collect()
    }

    /// The detected periods (cached; run again after new arrivals).
    pub fn periods(&mut self, now: u64) -> &[Period] {
        let stale = match self.detected_at {
            None => self.arrivals > 0,
            Some((arrivals, at)) => {
                let new = self.arrivals - arrivals;
                let since = now.saturating_sub(at);
                new > 0
                    && ((new >= REDETECT_EVERY && since >= REDETECT_MIN_MS)
                        || self.arrivals <= 2 * REDETECT_EVERY
                        || since >= REDETECT_MS)
            }
        };
        if stale {
            self.detected = detect::detect(&self.recent());
            self.detected_at = Some((self.arrivals, now));
        }
        &self.detected
    }

    /// The hybrid histogram: counts per minute bin, out-of-bounds, total.
    pub fn hybrid_histogram(&self) -> (&[u32; HYBRID_BINS], u32, u32) {
        (&self.hybrid, self.hybrid_oob, self.hybrid_total)
    }

    /// The fine histogram of `rank`: counts per bin, out-of-bounds,
    /// total.
    pub fn fine_histogram(&self, rank: Rank) -> (&[u32; FINE_BINS], u32, u32) {
        let f = &self.fine[rank as usize];
        (&f.bins, f.oob, f.total)
    }

    /// Idle times in both fine histograms.
    pub fn fine_samples(&self) -> u32 {
        self.fine.iter().map(|f| f.total).sum()
    }

    /// [`policy::cost_keep_alive`] over the fine histogram of `rank`
    /// (`None` under `min_samples` idle times), computed again once the
    /// samples grew by a sixteenth.
    pub fn cost_keep_alive(
        &mut self,
        rank: Rank,
        cold_cost_ms: u64,
        max_ms: u64,
        min_samples: u32,
    ) -> Option<u64> {
        let f = &mut self.fine[rank as usize];
        (f.total >= min_samples).then(|| f.keep_alive(cold_cost_ms, max_ms))
    }

    /// What `policy` says for this function at `now`.
    pub fn plan(&mut self, policy: Policy, now: u64, params: &PolicyParams) -> Plan {
        policy::plan(self, policy, now, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_arrivals_in_order() {
        let mut h = History::default();
        for t in 0..100u64 {
            h.arrived(t * 1000);
            h.finished(t * 1000 + 10);
        }
        let recent = h.recent();
        assert_eq!(recent.len(), RING);
        assert_eq!(recent[0], 36_000);
        assert_eq!(*recent.last().unwrap(), 99_000);
        assert_eq!(h.arrivals, 100);
        // 99 idle times of 990 ms, in the first minute bin.
        let (hybrid, oob, total) = h.hybrid_histogram();
        assert_eq!((hybrid[0], oob, total), (99, 0, 99));
    }

    #[test]
    fn the_fine_histograms_learn_from_reuses_and_from_reaps_later_missed() {
        let mut h = History::default();
        h.reused(990, Rank::Last);
        // The last instance reaped after 2 s, another after 3 s; the next
        // arrival, alone, 8 s later, found nothing: the last instance
        // would have had to idle 10 s. A second one, while it runs, found
        // nothing either: the other would have had to idle 10.6 s.
        h.reaped(50_000, 2_000, Rank::Last);
        h.reaped(50_500, 3_000, Rank::Other);
        h.arrived(58_000);
        h.cold(58_000);
        h.arrived(58_100);
        h.cold(58_100);
        // A cold start with no reap of its rank pending says nothing.
        h.arrived(58_200);
        h.cold(58_200);
        let (last, oob, total) = h.fine_histogram(Rank::Last);
        assert_eq!(last[fine_bin(990).unwrap()], 1);
        assert_eq!(last[fine_bin(10_000).unwrap()], 1);
        assert_eq!((oob, total), (0, 2));
        let (other, oob, total) = h.fine_histogram(Rank::Other);
        assert_eq!(other[fine_bin(10_600).unwrap()], 1);
        assert_eq!((oob, total), (0, 1));
        assert_eq!(h.fine_samples(), 3);
        // Reaps never missed, beyond the pending ones, count as beyond.
        for i in 0..(PENDING_REAPS as u64 + 3) {
            h.reaped(100_000 + i, 1_000, Rank::Other);
        }
        assert_eq!(h.fine_histogram(Rank::Other).1, 3);
    }

    #[test]
    fn overlapping_invocations_add_no_idle_time() {
        let mut h = History::default();
        h.arrived(0);
        h.arrived(100);
        h.finished(500);
        h.finished(900);
        h.arrived(2_000);
        assert_eq!(h.hybrid_histogram().2, 1);
        assert_eq!(h.hybrid[0], 1);
    }

    #[test]
    fn fine_bins_cover_their_edges() {
        assert_eq!(fine_bin(0), Some(0));
        for i in 1..FINE_BINS - 1 {
            let edge = fine_edge(i);
            assert_eq!(fine_bin(edge), Some(i + 1), "edge {i}: {edge}");
            assert_eq!(fine_bin(edge - 1), Some(i), "below edge {i}: {edge}");
        }
        assert!(fine_edge(FINE_BINS) > 9 * 3_600_000);
        assert_eq!(fine_bin(24 * 3_600_000), None);
    }

    #[test]
    fn histograms_age_by_halving() {
        let mut h = History::default();
        for i in 0..(AGE_AT as u64 + 10) {
            h.arrived(i * 2_000);
            h.finished(i * 2_000 + 1);
        }
        assert!(h.hybrid_histogram().2 < AGE_AT);
        assert!(h.hybrid_histogram().2 > AGE_AT / 2);
    }
}
