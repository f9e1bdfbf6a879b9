//! Periodicity detection over a function's recent arrivals.
//!
//! Arrivals closer than [`MERGE_MS`] to the previous one are one *beat*
//! (a timer that fans out to a few calls is still one beat). A candidate
//! period is scored by walking the beats in order along a chain: a beat
//! whose distance from the chain's last on-beat arrival is `k` periods
//! (1 ≤ k ≤ [`MAX_SKIP`]) within a tolerance is *on beat* and moves the
//! chain; any other beat is *off beat* (another timer, a manual call); a
//! gap longer than [`MAX_SKIP`] periods restarts the chain. The score is
//! `on / (beats − 1)` (how much of the traffic the period explains) times
//! `on / Σk` (how many expected beats came): 1.0 for an exact timer, 0.9
//! with one beat in ten missed, ~0.8 when a second timer adds a sixth of
//! the beats, 0.5 for half or double the true period, and well under 0.5
//! for Poisson traffic. Candidates are the beats' own gaps, clustered.
//! The off-beat residue is searched once more for a second timer.

/// Arrivals closer than this to the previous one belong to one beat, ms.
pub const MERGE_MS: u64 = 500;

/// A missed beat is tolerated up to this many periods between two
/// on-beat arrivals; a longer gap restarts the chain.
pub const MAX_SKIP: u64 = 4;

/// The tolerance around each expected beat, as a fraction of the period
/// (timer jitter of ±10 % moves two consecutive beats up to 20 % apart).
pub const TOLERANCE: f64 = 0.22;

/// The tolerance never goes below this, ms (scheduling noise on a short
/// period).
pub const MIN_TOLERANCE_MS: u64 = 100;

/// Periods shorter than this are not worth predicting, ms.
pub const MIN_PERIOD_MS: u64 = 1_000;

/// On-beat arrivals needed before a period is trusted at all.
pub const MIN_HITS: u32 = 3;

/// The spread is at least this fraction of the period.
pub const SPREAD_FLOOR: f64 = 0.02;

/// The confidence ramps up to the score over this many on-beat arrivals
/// (a few random arrivals can line up by chance).
pub const RAMP_HITS: u32 = 8;

/// Candidate periods scored per search (the most frequent gap clusters).
const MAX_CANDIDATES: usize = 12;

/// A detected period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Period {
    /// The period, ms (refined: on-beat distances over their beat counts).
    pub period_ms: u64,
    /// Where the grid puts the last on-beat arrival (the phase), ms.
    pub last_beat_ms: u64,
    /// How far on-beat arrivals stray from the grid: 1.5 × the
    /// [`SPREAD_QUANTILE`] of their distances from it, ms.
    pub spread_ms: u64,
    /// 0–1: the chain score, scaled down until [`RAMP_HITS`] on-beat
    /// arrivals.
    pub confidence: f64,
    /// On-beat arrivals seen.
    pub hits: u32,
    /// Arrivals in the last on-beat burst (a timer that fans out).
    pub burst: u32,
}

impl Period {
    /// The next expected beat whose window (± spread, and `grace_ms`
    /// after) has not passed at `now_ms`.
    pub fn next_after(&self, now_ms: u64, grace_ms: u64) -> u64 {
        let p = self.period_ms.max(1);
        let first = self.last_beat_ms + p;
        let cutoff = now_ms.saturating_sub(self.spread_ms + grace_ms);
        if first >= cutoff {
            return first;
        }
        let k = (cutoff - first).div_ceil(p);
        first + k * p
    }
}

/// One beat: its first arrival and how many arrivals it merged.
#[derive(Debug, Clone, Copy)]
struct Beat {
    at: u64,
    size: u32,
}

fn beats(arrivals: &[u64]) -> Vec<Beat> {
    let mut out: Vec<Beat> = Vec::with_capacity(arrivals.len());
    let mut last = None;
    for &t in arrivals {
        match (out.last_mut(), last) {
            (Some(b), Some(prev)) if t.saturating_sub(prev) < MERGE_MS => b.size += 1,
            _ => out.push(Beat { at: t, size: 1 }),
        }
        last = Some(t);
    }
    out
}

fn tolerance(period: f64) -> f64 {
    (period * TOLERANCE).max(MIN_TOLERANCE_MS as f64)
}

/// The result of walking the beats along one candidate period.
struct Chain {
    score: f64,
    hits: u32,
    period: f64,
    last: Beat,
    /// The on-beat arrivals since the chain last restarted: (beats
    /// since the segment's first, when).
    segment: Vec<(u64, u64)>,
    off: Vec<u64>,
}

fn chain(beats: &[Beat], period: f64) -> Chain {
    let tol = tolerance(period);
    let mut last = beats[0];
    let (mut hits, mut expected) = (0u32, 0u64);
    let (mut sum_d, mut sum_k) = (0.0f64, 0u64);
    // Sized once: a detection scores up to a dozen candidates.
    let mut segment = Vec::with_capacity(beats.len());
    segment.push((0, beats[0].at));
    let mut off = Vec::with_capacity(beats.len());
    for b in &beats[1..] {
        let d = (b.at - last.at) as f64;
        let k = (d / period).round().max(1.0) as u64;
        if k <= MAX_SKIP && (d - k as f64 * period).abs() <= tol {
            hits += 1;
            expected += k;
            sum_d += d;
            sum_k += k;
            let n = segment.last().map_or(0, |s| s.0) + k;
            segment.push((n, b.at));
            last = *b;
        } else if d > (MAX_SKIP as f64 + 0.5) * period {
            // The pattern broke off: start again from here.
            off.push(b.at);
            segment.clear();
            segment.push((0, b.at));
            last = *b;
        } else {
            off.push(b.at);
        }
    }
    let n = (beats.len() - 1).max(1) as f64;
    let score = if hits == 0 {
        0.0
    } else {
        (hits as f64 / n) * (hits as f64 / expected as f64)
    };
    let refined = if sum_k > 0 {
        sum_d / sum_k as f64
    } else {
        period
    };
    Chain {
        score,
        hits,
        period: refined,
        last,
        segment,
        off,
    }
}

/// The share of on-beat arrivals the first grid keeps for the second fit
/// (a beat fired a minute late must not tilt it).
pub const INLIER_QUANTILE: f64 = 0.8;

/// The share of on-beat arrivals the window must cover (with a margin of
/// half again): the others (a straggler, a beat fired late) are left to
/// the owed-call keep-alive rather than widening every window.
pub const SPREAD_QUANTILE: f64 = 0.9;

/// A least-squares line `t = a + slope·n` through `pts` (the fallback
/// slope when they cannot fix one): the line's value at `n`.
fn line(pts: &[(f64, f64)], fallback: f64) -> impl Fn(f64) -> f64 {
    let m = pts.len().max(1) as f64;
    let mn = pts.iter().map(|p| p.0).sum::<f64>() / m;
    let mt = pts.iter().map(|p| p.1).sum::<f64>() / m;
    let var: f64 = pts.iter().map(|p| (p.0 - mn).powi(2)).sum();
    let cov: f64 = pts.iter().map(|p| (p.0 - mn) * (p.1 - mt)).sum();
    let slope = if pts.len() >= 3 && var > 0.0 {
        cov / var
    } else {
        fallback
    };
    move |n: f64| mt + slope * (n - mn)
}

/// The median of `xs`, and the [`SPREAD_QUANTILE`] of their distances
/// from it.
fn centre(mut xs: Vec<f64>, quantile: f64) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    let median = xs[xs.len() / 2];
    let mut dev: Vec<f64> = xs.iter().map(|x| (x - median).abs()).collect();
    dev.sort_by(f64::total_cmp);
    let i = ((quantile * dev.len() as f64).ceil() as usize).clamp(1, dev.len());
    (median, dev[i - 1])
}

/// The grid through a chain's last segment: a least-squares line of
/// arrival time over beat number (the chain's period when the segment
/// is too short), fitted again without the arrivals beyond the
/// [`SPREAD_QUANTILE`] (a beat fired a minute late must not tilt it) and
/// moved by the residuals' median. Returns the period, the grid time of
/// the segment's last beat, and the spread: 1.5 × the quantile distance
/// from the grid, at least 2 % of the period and half of
/// [`MIN_TOLERANCE_MS`].
fn fit(segment: &[(u64, u64)], period: f64) -> (f64, f64, f64) {
    let t0 = segment[0].1;
    let pts: Vec<(f64, f64)> = segment
        .iter()
        .map(|&(n, t)| (n as f64, (t - t0) as f64))
        .collect();
    let first = line(&pts, period);
    let (median, q) = centre(
        pts.iter().map(|&(n, t)| t - first(n)).collect(),
        INLIER_QUANTILE,
    );
    let inliers: Vec<(f64, f64)> = pts
        .iter()
        .copied()
        .filter(|&(n, t)| (t - first(n) - median).abs() <= q)
        .collect();
    let grid = line(&inliers, period);
    let slope = grid(1.0) - grid(0.0);
    let (median, q) = centre(
        pts.iter().map(|&(n, t)| t - grid(n)).collect(),
        SPREAD_QUANTILE,
    );
    let floor = (MIN_TOLERANCE_MS as f64 / 2.0).max(slope * SPREAD_FLOOR);
    let last = pts.last().map_or(0.0, |p| p.0);
    (slope, t0 as f64 + grid(last) + median, (1.5 * q).max(floor))
}

/// Candidate periods: the gaps between beats, clustered within 5 %, the
/// most frequent first.
fn candidates(beats: &[Beat]) -> Vec<f64> {
    let mut gaps: Vec<u64> = beats
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .filter(|&g| g >= MIN_PERIOD_MS)
        .collect();
    gaps.sort_unstable();
    let mut clusters: Vec<(f64, usize)> = Vec::new();
    let mut start = 0;
    for i in 1..=gaps.len() {
        if i == gaps.len() || gaps[i] as f64 > gaps[start] as f64 * 1.05 {
            let members = &gaps[start..i];
            if !members.is_empty() {
                clusters.push((members[members.len() / 2] as f64, members.len()));
            }
            start = i;
        }
    }
    clusters.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
    clusters.truncate(MAX_CANDIDATES);
    clusters.into_iter().map(|(g, _)| g).collect()
}

/// The best period of a sequence of beats, and the beats it left off.
fn best(beats: &[Beat]) -> Option<(Period, Vec<u64>)> {
    if beats.len() < MIN_HITS as usize + 1 {
        return None;
    }
    let mut best: Option<Chain> = None;
    for p in candidates(beats) {
        let c = chain(beats, p);
        // Ties go to the longer period (a multiple explains as much with
        // fewer expected beats only if none were missed).
        if best.as_ref().is_none_or(|b| c.score > b.score + 1e-9) {
            best = Some(c);
        }
    }
    let c = best?;
    if c.hits < MIN_HITS || c.period < MIN_PERIOD_MS as f64 {
        return None;
    }
    let ramp = (c.hits as f64 / RAMP_HITS as f64).min(1.0);
    let (period, last_beat, spread) = fit(&c.segment, c.period);
    Some((
        Period {
            period_ms: period.round() as u64,
            last_beat_ms: last_beat.round().max(0.0) as u64,
            spread_ms: spread.round() as u64,
            confidence: c.score * ramp,
            hits: c.hits,
            burst: c.last.size,
        },
        c.off,
    ))
}

/// Up to two periods (a second timer in the off-beat residue) found in
/// `arrivals` (ascending, ms), the more confident first. A period is
/// returned with whatever confidence it has: the caller decides what is
/// enough.
pub fn detect(arrivals: &[u64]) -> Vec<Period> {
    let all = beats(arrivals);
    let Some((first, off)) = best(&all) else {
        return Vec::new();
    };
    let mut out = vec![first];
    let residue: Vec<Beat> = off.iter().map(|&at| Beat { at, size: 1 }).collect();
    if let Some((second, _)) = best(&residue) {
        // Scored against the residue alone; what it explains of all the
        // traffic is its share of it.
        let share = residue.len() as f64 / all.len().max(1) as f64;
        if second.confidence * share > 0.05 {
            out.push(second);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) for the synthetic
    /// sequences.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub(crate) fn unit(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn timer(period_ms: u64, n: u64, offset: u64) -> Vec<u64> {
        (0..n).map(|i| offset + i * period_ms).collect()
    }

    #[test]
    fn an_exact_period_is_found_with_full_confidence() {
        let p = detect(&timer(300_000, 20, 7_000));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].period_ms, 300_000);
        assert_eq!(p[0].last_beat_ms, 7_000 + 19 * 300_000);
        assert!(p[0].confidence > 0.99, "{p:?}");
        assert_eq!(
            p[0].next_after(7_000 + 19 * 300_000 + 1, 0),
            7_000 + 20 * 300_000
        );
    }

    #[test]
    fn jitter_of_ten_percent_still_reads_as_the_period() {
        for seed in 1..20 {
            let mut rng = Rng::new(seed);
            // Jitter on the schedule (each beat ±10 % of the period off
            // its slot) and on the intervals.
            let on_schedule: Vec<u64> = (0..30)
                .map(|i| (1_000_000.0 + i as f64 * 60_000.0 + (rng.unit() - 0.5) * 12_000.0) as u64)
                .collect();
            let mut t = 1_000_000.0;
            let on_intervals: Vec<u64> = (0..30)
                .map(|_| {
                    t += 60_000.0 * (0.9 + 0.2 * rng.unit());
                    t as u64
                })
                .collect();
            for seq in [on_schedule, on_intervals] {
                let p = detect(&seq);
                assert!(!p.is_empty(), "seed {seed}");
                assert!((p[0].period_ms as f64 - 60_000.0).abs() < 3_000.0, "{p:?}");
                assert!(p[0].confidence > 0.8, "seed {seed}: {p:?}");
                // Windows stay well inside the period (a random walk of
                // intervals strays further from any grid than a jittered
                // schedule).
                assert!(p[0].spread_ms <= 24_000, "{p:?}");
            }
        }
    }

    #[test]
    fn a_few_late_beats_neither_tilt_the_grid_nor_widen_the_window() {
        // 30 beats a minute apart, ±300 ms off; two of them 4 s late.
        let seq: Vec<u64> = (0..30u64)
            .map(|i| {
                let wobble = [0, 300, 150, 0, 250, 100][i as usize % 6];
                let late = if i == 11 || i == 23 { 4_000 } else { 0 };
                1_000_000 + i * 60_000 + wobble + late
            })
            .collect();
        let p = detect(&seq);
        assert_eq!(p.len(), 1, "{p:?}");
        let truth = 1_000_000 + 29 * 60_000 + 150;
        assert!(p[0].last_beat_ms.abs_diff(truth) <= 500, "{p:?}");
        assert!(p[0].period_ms.abs_diff(60_000) <= 50, "{p:?}");
        // The window covers the usual wobble (the 2 % floor), not the
        // stragglers: they are left to the owed-call keep-alive.
        assert!(p[0].spread_ms <= 2_000, "{p:?}");
    }

    #[test]
    fn missed_beats_lower_the_confidence_a_little_not_the_period() {
        let seq: Vec<u64> = timer(60_000, 40, 0)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 10 != 5)
            .map(|(_, t)| t)
            .collect();
        let p = detect(&seq);
        assert_eq!(p[0].period_ms, 60_000, "{p:?}");
        assert!(p[0].confidence > 0.85 && p[0].confidence < 0.95, "{p:?}");
    }

    #[test]
    fn two_timers_are_both_found() {
        // Every minute at :00 and every five minutes at :20.
        let mut seq: Vec<u64> = timer(60_000, 60, 0);
        seq.extend(timer(300_000, 12, 20_000));
        seq.sort_unstable();
        let p = detect(&seq);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].period_ms, 60_000, "{p:?}");
        assert!(p[0].confidence > 0.75, "{p:?}");
        assert_eq!(p[1].period_ms, 300_000, "{p:?}");
        assert!(p[1].confidence > 0.9, "{p:?}");
    }

    #[test]
    fn poisson_traffic_is_not_called_periodic() {
        for seed in 1..50 {
            let mut rng = Rng::new(seed);
            let mut t = 0.0;
            let seq: Vec<u64> = (0..64)
                .map(|_| {
                    t += -60_000.0 * (1.0 - rng.unit()).ln();
                    t as u64
                })
                .collect();
            let best = detect(&seq).first().map_or(0.0, |p| p.confidence);
            assert!(best < 0.5, "seed {seed}: confidence {best}");
        }
    }

    #[test]
    fn a_fanned_out_beat_counts_once_and_says_how_wide_it_was() {
        let mut seq = Vec::new();
        for i in 0..10u64 {
            for j in 0..3 {
                seq.push(i * 120_000 + j * 40);
            }
        }
        let p = detect(&seq);
        assert_eq!((p[0].period_ms, p[0].burst), (120_000, 3), "{p:?}");
        assert!(p[0].confidence > 0.99);
    }

    #[test]
    fn too_few_beats_say_nothing() {
        assert!(detect(&timer(60_000, 3, 0)).is_empty());
        assert!(detect(&[]).is_empty());
        // Four beats: a period, with confidence still ramping up.
        let p = detect(&timer(60_000, 4, 0));
        assert!((p[0].confidence - 3.0 / 8.0).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn next_after_skips_windows_already_past() {
        let p = Period {
            period_ms: 10_000,
            last_beat_ms: 100_000,
            spread_ms: 500,
            confidence: 1.0,
            hits: 10,
            burst: 1,
        };
        assert_eq!(p.next_after(100_000, 0), 110_000);
        // Inside the next beat's window it is still that beat.
        assert_eq!(p.next_after(110_400, 0), 110_000);
        assert_eq!(p.next_after(110_600, 0), 120_000);
        assert_eq!(p.next_after(110_600, 200), 110_000);
        // Beats missed since are skipped.
        assert_eq!(p.next_after(155_000, 0), 160_000);
    }
}
