//! `ember-bench sim`: replays an invocation trace against the keep-alive
//! and pre-warm policies of `ember_agent::predict`.
//!
//! The model, per function (functions are independent: each has its own
//! [`History`] and event loop, and they run in parallel threads):
//!
//! - Arrivals. For a function whose `Trigger` is `timer`, a count `c` in
//!   minute `m` (0-based) becomes arrivals at
//!   `60 000·m + (φ + i·60 000/c) mod 60 000` ms for `i` in `0..c`, each
//!   moved by a uniform jitter of ±5 % of the slot width `60 000/c`,
//!   clamped inside the minute and sorted; `φ ∈ [0, 60 000)` is the
//!   function's phase, drawn from `--seed`: a timer fires at the same
//!   second every time, like a cron, and a second call in its minute (a
//!   fan-out, or a beat fired a minute late) comes half a minute away
//!   from it, a third a third of a minute, and so on. Any other
//!   trigger (or none): `c` arrivals uniformly at random inside the
//!   minute, drawn from `--seed` (a count says nothing of when in the
//!   minute HTTP or queue calls came). Every policy sees the same
//!   arrivals.
//! - Instances serve one invocation at a time. An arrival takes the most
//!   recently idle instance, else it is a cold start (a new instance). An
//!   instance is busy for the function's duration (`Average` of the
//!   durations file by `HashFunction`, rounded, at least 1 ms; default
//!   1 000 ms), then idle.
//! - The policy. After every arrival and every end the function's plan is
//!   computed again ([`History::plan`]); the oldest idle instances go as
//!   soon as `plan.keep(idle_since, now)` is false or they have idled
//!   longer than `--keep-alive-s` (emberd's pool caps every policy so,
//!   the hybrid one's hours-long tail included), and when
//!   `plan.to_prewarm(now, idle, done)` asks for instances they are
//!   restored (idle, pre-warmed; charged from then, ready to serve
//!   `--cold-start-ms` later — an arrival before that finds it still
//!   restoring and starts cold, as in emberd's pool) and the window is
//!   marked served. Between
//!   events the loop wakes, plans again and acts at the next time the
//!   plan can change its mind: the oldest idle instance's reap time, the
//!   window's opening, and just after the window's end (a periodic plan
//!   moves on to the next beat then). Ends come before arrivals at the
//!   same millisecond.
//! - Cost. An idle instance costs its app's memory (`AverageAllocatedMb`
//!   of the memory file by `HashApp`; default 128 MiB) for as long as it
//!   idles, pre-warmed or kept after use. The trace stops at the end of
//!   its last minute: idle instances are charged up to it, invocations
//!   still running are not charged, and pre-warmed instances that never
//!   served (reaped, or still idle at the end) count as unused.
//! - Latency. Each cold start adds `--cold-start-ms` (a snapshot restore).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ember_agent::predict::{History, Plan, Policy, PolicyParams, Rank};
use serde::Serialize;
use serde_json::json;

use crate::trace::{parse_keyed, parse_trace, Rng, Trace};

/// A duration when the durations file has none for a function, ms.
pub const DEFAULT_DURATION_MS: u64 = 1_000;
/// Memory when the memory file has none for an app, MiB.
pub const DEFAULT_MEMORY_MIB: f64 = 128.0;
/// The arrivals' jitter, as a fraction of the slot width (either way).
pub const JITTER: f64 = 0.05;
/// Mixed into `--seed` for the arrivals' generators.
const ARRIVALS_STREAM: u64 = 0x5349_4D5F_4152_5256;

/// A minute, ms.
const MINUTE_MS: u64 = 60_000;

/// What `ember-bench sim` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The trace (Azure schema).
    pub trace: PathBuf,
    /// The function durations file.
    pub durations: Option<PathBuf>,
    /// The app memory file.
    pub memory: Option<PathBuf>,
    /// `fixed`, `hybrid`, `ember` or `all`.
    pub policy: String,
    /// The fixed keep-alive and every policy's cap, seconds.
    pub keep_alive_s: f64,
    /// What one cold start adds to an invocation, ms.
    pub cold_start_ms: f64,
    /// The arrivals' seed.
    pub seed: u64,
    /// Worker threads (0: one per CPU).
    pub threads: usize,
}

/// One function as the simulation sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Busy time per invocation, ms.
    pub duration_ms: u64,
    /// Memory an idle instance holds, MiB.
    pub memory_mib: f64,
    /// A pre-warm's restore: the instance serves this long after it was
    /// asked for, ms.
    pub restore_ms: u64,
}

/// What one function's simulation counted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Arrivals.
    pub invocations: u64,
    /// Arrivals that found no idle instance.
    pub cold_starts: u64,
    /// Idle instance time × memory, MiB·ms.
    pub waste_mib_ms: f64,
    /// Pre-warmed instances that served an invocation.
    pub prewarms_used: u64,
    /// Pre-warmed instances that never did.
    pub prewarms_unused: u64,
    /// Invocations by the basis of the plan in force when they arrived
    /// (in the order of [`BASES`]).
    pub invocations_by_basis: [u64; 4],
    /// Cold starts by the same.
    pub cold_by_basis: [u64; 4],
}

/// The plans' bases, as [`Plan::basis`] names them.
pub const BASES: [&str; 4] = ["fixed", "fallback", "histogram", "periodic"];

/// The index in [`BASES`] of a plan's basis.
fn basis_index(basis: &str) -> usize {
    BASES.iter().position(|&b| b == basis).unwrap_or(0)
}

impl Tally {
    /// Adds `other`'s counts to these.
    fn add(&mut self, other: &Tally) {
        self.invocations += other.invocations;
        self.cold_starts += other.cold_starts;
        self.waste_mib_ms += other.waste_mib_ms;
        self.prewarms_used += other.prewarms_used;
        self.prewarms_unused += other.prewarms_unused;
        for i in 0..BASES.len() {
            self.invocations_by_basis[i] += other.invocations_by_basis[i];
            self.cold_by_basis[i] += other.cold_by_basis[i];
        }
    }
}

/// The arrivals of one function's `counts` (see the module doc), into
/// `out` (cleared first).
pub fn spread(counts: &[u32], timer: bool, rng: &mut Rng, out: &mut Vec<u64>) {
    out.clear();
    let phase = rng.unit() * MINUTE_MS as f64;
    for (m, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let start = m as u64 * MINUTE_MS;
        let slot = MINUTE_MS as f64 / c as f64;
        let first = out.len();
        for i in 0..c {
            let at = if timer {
                let jitter = (rng.unit() * 2.0 - 1.0) * JITTER * slot;
                (phase + i as f64 * slot) % MINUTE_MS as f64 + jitter
            } else {
                rng.unit() * MINUTE_MS as f64
            };
            out.push(start + (at.max(0.0) as u64).min(MINUTE_MS - 1));
        }
        out[first..].sort_unstable();
    }
}

/// An idle instance.
#[derive(Debug, Clone, Copy)]
struct Idle {
    /// Idle since, ms.
    since: u64,
    /// Restored ahead, and not used yet.
    prewarmed: bool,
    /// Ready to serve from, ms (a pre-warm's restore takes time).
    ready: u64,
}

/// Whether an instance idle since `since` is kept at `now`: as emberd's
/// pool decides, the plan says so and it has idled at most `cap_ms`.
fn keep(plan: &Plan, cap_ms: u64, since: u64, now: u64, lone: bool) -> bool {
    now - since <= cap_ms && plan.keep(since, now, lone)
}

/// The first time from `now` at which [`keep`] is false for an instance
/// idle since `since` (`now` itself when it is false now).
fn first_drop(plan: &Plan, cap_ms: u64, since: u64, now: u64, lone: bool) -> u64 {
    let after = |ms: u64| now.max(since.saturating_add(ms).saturating_add(1));
    let mut t = after(plan.keep_alive(lone));
    if let Some(w) = plan.prewarm {
        if t + plan.bridge_ms >= w.from_ms && t < w.until_ms {
            t = w.until_ms;
        }
    }
    t.min(after(cap_ms))
}

/// The next time after `now` at which `plan` may act or change.
fn next_wake(
    plan: &Plan,
    cap_ms: u64,
    now: u64,
    oldest: Option<(&Idle, bool)>,
    done: Option<u64>,
) -> u64 {
    let mut wake = oldest.map_or(u64::MAX, |(i, lone)| {
        first_drop(plan, cap_ms, i.since, now, lone)
    });
    if let Some(q) = plan.quiet_at_ms.filter(|&q| q > now && oldest.is_some()) {
        wake = wake.min(q);
    }
    if let Some(w) = plan.prewarm {
        if w.from_ms > now && done != Some(w.from_ms) {
            wake = wake.min(w.from_ms);
        }
        if w.until_ms >= now {
            wake = wake.min(w.until_ms.saturating_add(1));
        }
    }
    wake
}

/// Simulates one function under `policy` until `end_ms`.
pub fn simulate(
    arrivals: &[u64],
    shape: Shape,
    end_ms: u64,
    policy: Policy,
    params: &PolicyParams,
) -> Tally {
    simulate_observed(arrivals, shape, end_ms, policy, params, |_, _| {})
}

/// [`simulate`], showing `observe` every plan and when it was made.
pub fn simulate_observed(
    arrivals: &[u64],
    shape: Shape,
    end_ms: u64,
    policy: Policy,
    params: &PolicyParams,
    mut observe: impl FnMut(u64, &Plan),
) -> Tally {
    let mut t = Tally::default();
    let cap = params.keep_alive_max_ms;
    let charge = |t: &mut Tally, idle: Idle, now: u64| {
        t.waste_mib_ms += (now - idle.since) as f64 * shape.memory_mib;
    };
    let mut history = History::default();
    let mut idle: VecDeque<Idle> = VecDeque::new();
    let mut busy: VecDeque<u64> = VecDeque::new();
    let (mut next, mut now, mut done) = (0, 0, None);
    loop {
        let plan = history.plan(policy, now, params);
        observe(now, &plan);
        // Keeping is monotone in the idle time: the oldest go first.
        // (`lone`: the function's only instance, which the plan may keep
        // longer or shorter than the others.)
        let lone = |idle: &VecDeque<Idle>| idle.len() == 1 && busy.is_empty();
        while let Some(&oldest) = idle.front() {
            let lone = lone(&idle);
            if keep(&plan, cap, oldest.since, now, lone) {
                break;
            }
            idle.pop_front();
            charge(&mut t, oldest, now);
            t.prewarms_unused += oldest.prewarmed as u64;
            if !oldest.prewarmed {
                history.reaped(now, now - oldest.since, Rank::of(lone));
            }
        }
        let want = plan.to_prewarm(now, idle.len() as u32, done);
        if want > 0 {
            let restored = Idle {
                since: now,
                prewarmed: true,
                ready: now + shape.restore_ms,
            };
            idle.extend(std::iter::repeat_n(restored, want as usize));
            done = plan.prewarm.map(|w| w.from_ms);
            // The history did not change: the plan stands.
        }
        let arrival = arrivals.get(next).copied().unwrap_or(u64::MAX);
        let end = busy.front().copied().unwrap_or(u64::MAX);
        let event = arrival.min(end);
        let wake = next_wake(
            &plan,
            cap,
            now,
            idle.front().map(|i| (i, lone(&idle))),
            done,
        );
        if wake < event.min(end_ms) {
            now = wake;
            continue;
        }
        if event >= end_ms {
            break;
        }
        now = event;
        if end <= arrival {
            busy.pop_front();
            history.finished(now);
            idle.push_back(Idle {
                since: now,
                prewarmed: false,
                ready: now,
            });
        } else {
            next += 1;
            history.arrived(now);
            t.invocations += 1;
            let basis = basis_index(plan.basis);
            t.invocations_by_basis[basis] += 1;
            // The most recently idle instance that is ready (one still
            // restoring does not serve: the arrival restores its own, as
            // emberd's pool does).
            let ready = idle.iter().rposition(|i| i.ready <= now);
            // (Alone: the arrival took the function's only instance.)
            let alone = busy.is_empty() && idle.len() == 1;
            match ready.and_then(|i| idle.remove(i)) {
                Some(instance) => {
                    charge(&mut t, instance, now);
                    t.prewarms_used += instance.prewarmed as u64;
                    if instance.prewarmed {
                        history.prewarm_used(now);
                    } else {
                        history.reused(now - instance.since, Rank::of(alone));
                    }
                }
                None => {
                    history.cold(now);
                    t.cold_starts += 1;
                    t.cold_by_basis[basis] += 1;
                }
            }
            busy.push_back(now + shape.duration_ms);
        }
    }
    for instance in idle {
        charge(&mut t, instance, end_ms);
        t.prewarms_unused += instance.prewarmed as u64;
    }
    t
}

/// Each trace row's shape: durations by `HashFunction`, memory by
/// `HashApp`, defaults where missing; every restore `restore_ms`.
pub fn join(
    trace: &Trace,
    durations: &HashMap<String, f64>,
    memory: &HashMap<String, f64>,
    restore_ms: u64,
) -> Vec<Shape> {
    trace
        .rows
        .iter()
        .map(|row| Shape {
            duration_ms: durations
                .get(&row.function)
                .map_or(DEFAULT_DURATION_MS, |&ms| (ms.round() as u64).max(1)),
            memory_mib: memory.get(&row.app).copied().unwrap_or(DEFAULT_MEMORY_MIB),
            restore_ms,
        })
        .collect()
}

/// Every function of `trace` under `policy`, on `threads` threads: the
/// tallies in row order, and the wall time.
fn run(
    trace: &Trace,
    shapes: &[Shape],
    policy: Policy,
    params: &PolicyParams,
    seed: u64,
    threads: usize,
) -> (Vec<Tally>, Duration) {
    let start = Instant::now();
    let end_ms = trace.minutes as u64 * MINUTE_MS;
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, Tally)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let (mut out, mut arrivals) = (Vec::new(), Vec::new());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(row) = trace.rows.get(i) else {
                            return out;
                        };
                        let mut rng = Rng::derive(seed ^ ARRIVALS_STREAM, i as u64);
                        let timer = row.trigger.eq_ignore_ascii_case("timer");
                        spread(&row.counts, timer, &mut rng, &mut arrivals);
                        out.push((i, simulate(&arrivals, shapes[i], end_ms, policy, params)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a simulation thread panicked"))
            .collect()
    });
    done.sort_unstable_by_key(|&(i, _)| i);
    (done.into_iter().map(|(_, t)| t).collect(), start.elapsed())
}

/// One trigger's figures under one policy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TriggerReport {
    /// Functions with this trigger.
    pub functions: u64,
    /// Their invocations.
    pub invocations: u64,
    /// Their cold starts.
    pub cold_starts: u64,
    /// Cold starts over invocations.
    pub cold_fraction: f64,
    /// Idle memory-time, GiB·s.
    pub waste_gib_s: f64,
    /// Pre-warmed instances that served.
    pub prewarms_used: u64,
    /// Pre-warmed instances that did not.
    pub prewarms_unused: u64,
}

/// One policy's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    /// Invocations.
    pub invocations: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Cold starts over invocations.
    pub cold_fraction: f64,
    /// Per-function cold fractions (functions with an invocation): p50,
    /// p75, p90 (nearest rank).
    pub function_cold_fraction_p50: f64,
    /// See `function_cold_fraction_p50`.
    pub function_cold_fraction_p75: f64,
    /// See `function_cold_fraction_p50`.
    pub function_cold_fraction_p90: f64,
    /// Idle instance memory-time, GiB·s.
    pub waste_gib_s: f64,
    /// The waste over `fixed`'s (when fixed was run).
    pub waste_vs_fixed: Option<f64>,
    /// The cold fraction over `fixed`'s (when fixed was run).
    pub cold_vs_fixed: Option<f64>,
    /// Pre-warmed instances that served.
    pub prewarms_used: u64,
    /// Pre-warmed instances that did not.
    pub prewarms_unused: u64,
    /// Cold starts × the cold-start cost, s.
    pub added_latency_s: f64,
    /// The added latency per invocation, µs.
    pub added_latency_us_per_invocation: f64,
    /// The simulation's wall time, s.
    pub wall_s: f64,
    /// The figures per `Trigger`.
    pub by_trigger: BTreeMap<String, TriggerReport>,
    /// Invocations and cold starts by the basis of the plan in force at
    /// the arrival (`fixed`, `fallback`, `histogram`, `periodic`).
    pub by_basis: BTreeMap<&'static str, BasisReport>,
}

/// Arrivals under plans of one basis.
#[derive(Debug, Clone, Serialize)]
pub struct BasisReport {
    /// Invocations.
    pub invocations: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Cold starts over invocations.
    pub cold_fraction: f64,
}

/// `a / b`, or 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// MiB·ms in a GiB·s.
const MIB_MS_PER_GIB_S: f64 = 1024.0 * 1000.0;

/// Nearest-rank percentile `p` (0–100) of sorted `xs` (0 if empty).
fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

impl PolicyReport {
    /// The figures of `tallies` (one per row of `trace`).
    fn of(trace: &Trace, tallies: &[Tally], wall: Duration, cold_start_ms: f64) -> PolicyReport {
        let mut total = Tally::default();
        let mut by_trigger: BTreeMap<String, (u64, Tally)> = BTreeMap::new();
        let mut fractions = Vec::new();
        for (row, t) in trace.rows.iter().zip(tallies) {
            total.add(t);
            let entry = by_trigger.entry(row.trigger.clone()).or_default();
            entry.0 += 1;
            entry.1.add(t);
            if t.invocations > 0 {
                fractions.push(t.cold_starts as f64 / t.invocations as f64);
            }
        }
        fractions.sort_by(f64::total_cmp);
        let added_ms = total.cold_starts as f64 * cold_start_ms;
        PolicyReport {
            invocations: total.invocations,
            cold_starts: total.cold_starts,
            cold_fraction: ratio(total.cold_starts as f64, total.invocations as f64),
            function_cold_fraction_p50: percentile(&fractions, 50.0),
            function_cold_fraction_p75: percentile(&fractions, 75.0),
            function_cold_fraction_p90: percentile(&fractions, 90.0),
            waste_gib_s: total.waste_mib_ms / MIB_MS_PER_GIB_S,
            waste_vs_fixed: None,
            cold_vs_fixed: None,
            prewarms_used: total.prewarms_used,
            prewarms_unused: total.prewarms_unused,
            added_latency_s: added_ms / 1e3,
            added_latency_us_per_invocation: ratio(added_ms * 1e3, total.invocations as f64),
            wall_s: wall.as_secs_f64(),
            by_trigger: by_trigger
                .into_iter()
                .map(|(trigger, (functions, t))| {
                    let report = TriggerReport {
                        functions,
                        invocations: t.invocations,
                        cold_starts: t.cold_starts,
                        cold_fraction: ratio(t.cold_starts as f64, t.invocations as f64),
                        waste_gib_s: t.waste_mib_ms / MIB_MS_PER_GIB_S,
                        prewarms_used: t.prewarms_used,
                        prewarms_unused: t.prewarms_unused,
                    };
                    (trigger, report)
                })
                .collect(),
            by_basis: BASES
                .iter()
                .enumerate()
                .filter(|&(i, _)| total.invocations_by_basis[i] > 0)
                .map(|(i, &basis)| {
                    let (n, cold) = (total.invocations_by_basis[i], total.cold_by_basis[i]);
                    let report = BasisReport {
                        invocations: n,
                        cold_starts: cold,
                        cold_fraction: ratio(cold as f64, n as f64),
                    };
                    (basis, report)
                })
                .collect(),
        }
    }
}

/// Reads a file for `what`, naming it in errors.
fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Reads an optional side file: `value` per `key`.
fn side(
    path: Option<&Path>,
    what: &str,
    key: &str,
    value: &str,
) -> Result<HashMap<String, f64>, String> {
    let Some(path) = path else {
        return Ok(HashMap::new());
    };
    parse_keyed(&read(path, what)?, key, value).map_err(|e| format!("{}: {e}", path.display()))
}

/// The policies `--policy` names.
fn policies(name: &str) -> Result<Vec<Policy>, String> {
    match name {
        "all" => Ok(vec![Policy::Fixed, Policy::Hybrid, Policy::Ember]),
        one => Policy::parse(one)
            .map(|p| vec![p])
            .map_err(|e| format!("--policy: {e}, or all")),
    }
}

/// `ember-bench sim` (see the module doc).
pub fn command(opts: &Options) -> Result<serde_json::Value, String> {
    let policies = policies(&opts.policy)?;
    if !(opts.keep_alive_s >= 0.0 && opts.cold_start_ms >= 0.0) {
        return Err("--keep-alive-s and --cold-start-ms must be non-negative numbers".into());
    }
    let trace = parse_trace(&read(&opts.trace, "the trace")?)
        .map_err(|e| format!("{}: {e}", opts.trace.display()))?;
    let durations = side(
        opts.durations.as_deref(),
        "the durations",
        "HashFunction",
        "Average",
    )?;
    let memory = side(
        opts.memory.as_deref(),
        "the memory file",
        "HashApp",
        "AverageAllocatedMb",
    )?;
    let shapes = join(
        &trace,
        &durations,
        &memory,
        opts.cold_start_ms.ceil() as u64,
    );
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let n = trace.rows.len();
    let timed = trace
        .rows
        .iter()
        .filter(|r| durations.contains_key(&r.function));
    let sized = trace.rows.iter().filter(|r| memory.contains_key(&r.app));
    println!(
        "sim: {} — {n} functions, {} minutes; durations for {} (others {DEFAULT_DURATION_MS} ms), \
         memory for {} (others {DEFAULT_MEMORY_MIB} MiB); keep-alive {} s, cold start {} ms, \
         seed {}, {threads} thread(s)",
        opts.trace.display(),
        trace.minutes,
        timed.count(),
        sized.count(),
        opts.keep_alive_s,
        opts.cold_start_ms,
        opts.seed,
    );
    let params = PolicyParams {
        keep_alive_max_ms: (opts.keep_alive_s * 1e3).round() as u64,
        ..PolicyParams::default()
    };
    let mut reports: Vec<(Policy, PolicyReport)> = Vec::new();
    for policy in policies {
        let (tallies, wall) = run(&trace, &shapes, policy, &params, opts.seed, threads);
        reports.push((
            policy,
            PolicyReport::of(&trace, &tallies, wall, opts.cold_start_ms),
        ));
    }
    compare_with_fixed(&mut reports);
    print_tables(&reports);
    let by_name: serde_json::Map<String, serde_json::Value> = reports
        .iter()
        .map(|(p, r)| (p.name().to_string(), json!(r)))
        .collect();
    Ok(json!({
        "bench": "sim",
        "trace": opts.trace.display().to_string(),
        "functions": n,
        "minutes": trace.minutes,
        "seed": opts.seed,
        "keep_alive_s": opts.keep_alive_s,
        "cold_start_ms": opts.cold_start_ms,
        "threads": threads,
        "policies": by_name,
    }))
}

/// Fills in the ratios to `fixed`, when it was run.
fn compare_with_fixed(reports: &mut [(Policy, PolicyReport)]) {
    let Some((_, fixed)) = reports.iter().find(|(p, _)| *p == Policy::Fixed) else {
        return;
    };
    let (waste, cold) = (fixed.waste_gib_s, fixed.cold_fraction);
    for (_, r) in reports.iter_mut() {
        r.waste_vs_fixed = Some(ratio(r.waste_gib_s, waste));
        r.cold_vs_fixed = Some(ratio(r.cold_fraction, cold));
    }
}

/// A ratio to `fixed` for the table.
fn vs(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.3}"))
}

/// Prints the per-policy, per-trigger and per-basis tables.
fn print_tables(reports: &[(Policy, PolicyReport)]) {
    println!(
        "\n{:<7} {:>11} {:>10} {:>7} {:>6} {:>20} {:>12} {:>6} {:>17} {:>9} {:>7} {:>7}",
        "policy",
        "invocations",
        "cold",
        "cold %",
        "×fixed",
        "per-fn cold % 50/75/90",
        "waste GiB·s",
        "×fixed",
        "prewarm used/unused",
        "added s",
        "µs/inv",
        "wall s"
    );
    for (p, r) in reports {
        println!(
            "{:<7} {:>11} {:>10} {:>7.3} {:>6} {:>6.1}/{:>6.1}/{:>6.1} {:>12.1} {:>6} {:>9}/{:<9} {:>9.1} {:>7.2} {:>7.2}",
            p.name(),
            r.invocations,
            r.cold_starts,
            100.0 * r.cold_fraction,
            vs(r.cold_vs_fixed),
            100.0 * r.function_cold_fraction_p50,
            100.0 * r.function_cold_fraction_p75,
            100.0 * r.function_cold_fraction_p90,
            r.waste_gib_s,
            vs(r.waste_vs_fixed),
            r.prewarms_used,
            r.prewarms_unused,
            r.added_latency_s,
            r.added_latency_us_per_invocation,
            r.wall_s
        );
    }
    println!(
        "\n{:<8} {:<7} {:>9} {:>11} {:>10} {:>8} {:>12} {:>19}",
        "trigger",
        "policy",
        "functions",
        "invocations",
        "cold",
        "cold %",
        "waste GiB·s",
        "prewarm used/unused"
    );
    let triggers: std::collections::BTreeSet<&String> = reports
        .iter()
        .flat_map(|(_, r)| r.by_trigger.keys())
        .collect();
    for trigger in triggers {
        for (p, r) in reports {
            let Some(t) = r.by_trigger.get(trigger) else {
                continue;
            };
            println!(
                "{:<8} {:<7} {:>9} {:>11} {:>10} {:>8.3} {:>12.1} {:>9}/{:<9}",
                trigger,
                p.name(),
                t.functions,
                t.invocations,
                t.cold_starts,
                100.0 * t.cold_fraction,
                t.waste_gib_s,
                t.prewarms_used,
                t.prewarms_unused
            );
        }
    }
    println!("\nby the plan in force at the arrival:");
    for (p, r) in reports {
        let parts: Vec<String> = r
            .by_basis
            .iter()
            .map(|(basis, b)| {
                format!(
                    "{basis} {} inv, {} cold ({:.3} %)",
                    b.invocations,
                    b.cold_starts,
                    100.0 * b.cold_fraction
                )
            })
            .collect();
        println!("{:<7} {}", p.name(), parts.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Row;

    /// A 1 s function of 128 MiB.
    const SHAPE: Shape = Shape {
        duration_ms: 1_000,
        memory_mib: 128.0,
        restore_ms: 4,
    };

    /// The arrivals [`spread`] places for `counts` with `seed`.
    fn arrivals(counts: &[u32], seed: u64) -> Vec<u64> {
        let mut out = Vec::new();
        spread(counts, true, &mut Rng::derive(seed, 0), &mut out);
        out
    }

    /// One function of `counts` under `policy`, default parameters.
    fn run_one(counts: &[u32], policy: Policy) -> Tally {
        let end = counts.len() as u64 * MINUTE_MS;
        simulate(
            &arrivals(counts, 1),
            SHAPE,
            end,
            policy,
            &PolicyParams::default(),
        )
    }

    #[test]
    fn arrivals_stay_inside_their_minute_in_order() {
        let counts = [0, 1, 3, 0, 500, 2, 60_000, 7];
        for seed in 0..20 {
            let a = arrivals(&counts, seed);
            assert_eq!(a.len() as u32, counts.iter().sum::<u32>());
            assert!(
                a.windows(2).all(|w| w[0] <= w[1]),
                "seed {seed}: not sorted"
            );
            let mut i = 0;
            for (m, &c) in counts.iter().enumerate() {
                for &t in &a[i..i + c as usize] {
                    assert_eq!(
                        t / MINUTE_MS,
                        m as u64,
                        "seed {seed}: {t} outside minute {m}"
                    );
                }
                i += c as usize;
            }
            assert_eq!(a, arrivals(&counts, seed));
        }
        // A timer's single call lands at the same second every minute,
        // give or take the jitter (5 % of 60 s).
        let a = arrivals(&[1; 10], 3);
        let offsets: Vec<u64> = a.iter().map(|t| t % MINUTE_MS).collect();
        let (lo, hi) = (offsets.iter().min().unwrap(), offsets.iter().max().unwrap());
        assert!(hi - lo <= 6_000, "{offsets:?}");
        // Three calls in a minute: one at that second, the others a third
        // of a minute apart round the minute (jitters: 3 s and 1 s).
        let three = arrivals(&[1, 3], 3);
        let near = |t: u64, want: u64| {
            let d = (t as i64 - want as i64).rem_euclid(MINUTE_MS as i64);
            d.min(MINUTE_MS as i64 - d) <= 4_500
        };
        for k in 0..3 {
            let want = (three[0] + k * 20_000) % MINUTE_MS;
            assert!(
                three[1..].iter().any(|&t| near(t % MINUTE_MS, want)),
                "{three:?}: none near {want}"
            );
        }
    }

    #[test]
    fn first_drop_is_the_first_time_keep_turns_false() {
        use ember_agent::predict::Window;
        let window = Window {
            from_ms: 2_000,
            until_ms: 5_000,
            count: 1,
            expected_ms: 2_500,
        };
        for (keep_alive_ms, prewarm, cap) in [
            (500, Some(window), 100_000),
            (1_500, Some(window), 100_000),
            (1_500, Some(window), 3_000),
            (9_000_000, None, 6_000),
            (0, None, 6_000),
        ] {
            // The last instance kept twice as long as the others.
            let plan = Plan {
                keep_alive_ms,
                keep_last_ms: keep_alive_ms.saturating_mul(2),
                quiet_at_ms: None,
                prewarm,
                bridge_ms: 1_000,
                period: None,
                basis: "histogram",
            };
            for now in [0, 700, 1_800, 4_000] {
                for lone in [false, true] {
                    let drop = first_drop(&plan, cap, 0, now, lone);
                    let brute = (now..).find(|&t| !keep(&plan, cap, 0, t, lone)).unwrap();
                    assert_eq!(drop, brute, "{plan:?}, cap {cap}, now {now}, lone {lone}");
                }
            }
        }
    }

    #[test]
    fn fixed_charges_exactly_its_keep_alive() {
        let mut counts = vec![0u32; 30];
        counts[0] = 1;
        let t = run_one(&counts, Policy::Fixed);
        assert_eq!((t.invocations, t.cold_starts), (1, 1));
        // Idle from the end to 600 s + 1 ms later.
        assert_eq!(t.waste_mib_ms, 600_001.0 * 128.0);
        // A second call within the keep-alive is warm; the idle time
        // between the two is charged, and the trace's end stops the clock.
        counts[5] = 1;
        let t = run_one(&counts, Policy::Fixed);
        assert_eq!((t.invocations, t.cold_starts), (2, 1));
        let a = arrivals(&counts, 1);
        let idle = (a[1] - a[0] - 1_000) + 600_001;
        assert_eq!(t.waste_mib_ms, idle as f64 * 128.0);
        let end = 10 * MINUTE_MS;
        let t = simulate(&a, SHAPE, end, Policy::Fixed, &PolicyParams::default());
        let idle = (a[1] - a[0] - 1_000) + (end - a[1] - 1_000);
        assert_eq!(t.waste_mib_ms, idle as f64 * 128.0);
    }

    /// The brief's check, on arrivals placed by [`spread`] (±3 s of
    /// jitter a beat). Fails on the current policy: a window is centred
    /// on the last beat plus the period (two jitters apart from the
    /// arrival) and only as wide as the largest residual seen so far, so
    /// early beats land before it opens (seed 1: 3 cold starts, beats 6
    /// and 14 arrive 3.1 s and 1.2 s early).
    #[test]
    fn ember_prewarms_a_five_minute_timer() {
        let counts: Vec<u32> = (0..360).map(|m| (m % 5 == 0) as u32).collect();
        let fixed = run_one(&counts, Policy::Fixed);
        let ember = run_one(&counts, Policy::Ember);
        assert_eq!((fixed.invocations, fixed.cold_starts), (72, 1));
        assert_eq!(ember.invocations, 72);
        assert!(ember.cold_starts <= 1, "{ember:?}");
        assert!(
            ember.waste_mib_ms < fixed.waste_mib_ms,
            "{ember:?} vs {fixed:?}"
        );
    }

    #[test]
    fn ember_prewarms_an_exact_five_minute_timer() {
        // At :17 every five minutes for 6 hours, to the millisecond.
        let a: Vec<u64> = (0..72).map(|i| 17_000 + i * 300_000).collect();
        let end = 360 * MINUTE_MS;
        let params = PolicyParams::default();
        let fixed = simulate(&a, SHAPE, end, Policy::Fixed, &params);
        let ember = simulate(&a, SHAPE, end, Policy::Ember, &params);
        assert_eq!((fixed.invocations, fixed.cold_starts), (72, 1));
        assert_eq!((ember.invocations, ember.cold_starts), (72, 1), "{ember:?}");
        assert!(ember.prewarms_used >= 60, "{ember:?}");
        assert!(ember.prewarms_unused <= 1, "{ember:?}");
        // A window is ~13 s of idle instance a beat against 299 s; the
        // first beats, before the period is trusted, keep as fixed does.
        assert!(
            ember.waste_mib_ms < 0.15 * fixed.waste_mib_ms,
            "{ember:?} vs {fixed:?}"
        );
        assert_eq!(ember.cold_by_basis[basis_index("fallback")], 1);
        assert!(
            ember.invocations_by_basis[basis_index("periodic")] >= 64,
            "{ember:?}"
        );
    }

    /// Periodic plans a Poisson function (1/min, arrivals placed by
    /// [`spread`]) is given, as (minute, period ms) pairs.
    fn periodic_plans(seed: u64) -> Vec<(u64, u64)> {
        let mut rng = Rng::derive(seed, 99);
        let counts: Vec<u32> = (0..360).map(|_| rng.poisson(1.0)).collect();
        let mut periodic = Vec::new();
        // Not a timer: arrivals at random inside each minute.
        let mut placed = Vec::new();
        spread(&counts, false, &mut Rng::derive(seed, 0), &mut placed);
        simulate_observed(
            &placed,
            SHAPE,
            360 * MINUTE_MS,
            Policy::Ember,
            &PolicyParams::default(),
            |now, plan| {
                if let (Some(p), "periodic") = (plan.period, plan.basis) {
                    periodic.push((now / MINUTE_MS, p.period_ms));
                }
            },
        );
        periodic
    }

    /// The brief's check. Fails on the current policy: while the history
    /// is young, three or four evenly spaced beats (a minute of 3 calls
    /// is 3 beats 20 s apart) make a period of confidence 0.6–0.75
    /// (seeds 1, 2, 4, 5, 8, 13, 14, 17, 18, 20 of 1–20).
    #[test]
    fn poisson_traffic_is_never_planned_as_periodic() {
        for seed in 1..21 {
            let periodic = periodic_plans(seed);
            assert!(periodic.is_empty(), "seed {seed}: {:?}", &periodic[..1]);
        }
    }

    #[test]
    fn poisson_traffic_is_not_periodic_once_its_history_fills() {
        for seed in 1..21 {
            let late: Vec<_> = periodic_plans(seed)
                .into_iter()
                .filter(|&(minute, _)| minute >= 60)
                .collect();
            assert!(late.is_empty(), "seed {seed}: {late:?}");
        }
    }

    #[test]
    fn every_policy_serves_every_arrival() {
        let mut rng = Rng::derive(4, 4);
        let counts: Vec<u32> = (0..240)
            .map(|m| if m % 37 < 3 { 50 } else { rng.poisson(0.2) })
            .collect();
        for policy in [Policy::Fixed, Policy::Hybrid, Policy::Ember] {
            let t = run_one(&counts, policy);
            assert_eq!(t.invocations, counts.iter().map(|&c| c as u64).sum::<u64>());
            assert!(t.cold_starts >= 1 && t.cold_starts <= t.invocations);
            assert!(t.waste_mib_ms > 0.0);
        }
    }

    #[test]
    fn side_files_join_by_function_and_by_app() {
        let row = |app: &str, function: &str| Row {
            owner: "o".into(),
            app: app.into(),
            function: function.into(),
            trigger: "http".into(),
            counts: vec![0],
        };
        let trace = Trace {
            minutes: 1,
            rows: vec![row("a1", "f1"), row("a2", "f2")],
        };
        // Decoys: a function hash in the app column and the other way round.
        let durations = parse_keyed(
            "HashOwner,HashApp,HashFunction,Average\no,f2,f1,250.4\no,a1,x,9\n",
            "HashFunction",
            "Average",
        )
        .unwrap();
        let memory = parse_keyed(
            "HashOwner,HashApp,SampleCount,AverageAllocatedMb\no,a2,3,300\no,f1,3,77\n",
            "HashApp",
            "AverageAllocatedMb",
        )
        .unwrap();
        let shapes = join(&trace, &durations, &memory, 4);
        assert_eq!(
            shapes,
            vec![
                Shape {
                    duration_ms: 250,
                    memory_mib: DEFAULT_MEMORY_MIB,
                    restore_ms: 4,
                },
                Shape {
                    duration_ms: DEFAULT_DURATION_MS,
                    memory_mib: 300.0,
                    restore_ms: 4,
                },
            ]
        );
    }

    #[test]
    fn reports_add_up_and_compare_with_fixed() {
        let trace = Trace {
            minutes: 1,
            rows: vec![
                Row {
                    owner: "o".into(),
                    app: "a".into(),
                    function: "f".into(),
                    trigger: "timer".into(),
                    counts: vec![0],
                };
                3
            ],
        };
        let tally = |inv, cold, waste| Tally {
            invocations: inv,
            cold_starts: cold,
            waste_mib_ms: waste,
            ..Tally::default()
        };
        let a = [tally(10, 1, 1024e3), tally(0, 0, 0.0), tally(10, 5, 0.0)];
        let r = PolicyReport::of(&trace, &a, Duration::ZERO, 4.0);
        assert_eq!((r.invocations, r.cold_starts), (20, 6));
        assert_eq!(r.waste_gib_s, 1.0);
        assert_eq!(
            (r.function_cold_fraction_p50, r.function_cold_fraction_p90),
            (0.1, 0.5)
        );
        assert_eq!(r.added_latency_s, 0.024);
        assert_eq!(r.added_latency_us_per_invocation, 1_200.0);
        assert_eq!(r.by_trigger["timer"].functions, 3);
        let b = [tally(10, 0, 512e3), tally(0, 0, 0.0), tally(10, 3, 0.0)];
        let mut reports = vec![
            (
                Policy::Ember,
                PolicyReport::of(&trace, &b, Duration::ZERO, 4.0),
            ),
            (Policy::Fixed, r),
        ];
        compare_with_fixed(&mut reports);
        assert_eq!(reports[0].1.waste_vs_fixed, Some(0.5));
        assert_eq!(reports[0].1.cold_vs_fixed, Some(0.5));
        assert!(policies("lru").unwrap_err().contains("all"));
    }
}
