//! The metadata store (docs/metaevents.md): what emberd's probes see of
//! its own operation, as named series sampled once a second and kept for
//! an hour in memory. Invocations add to the current second as they end;
//! gauges are read when a second closes. Rules (metaevents.rs) read the
//! closed seconds and the current one as it fills.
//!
//! This module is the pure core: no agent, no clock of its own.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// Seconds of history kept per series.
pub const RING_SECONDS: usize = 3600;

/// Points one `GET /metadata` answers at most.
pub const MAX_QUERY_POINTS: usize = 100_000;

/// Bytes one series' ring takes (its values are `f32`).
pub const RING_BYTES: usize = RING_SECONDS * std::mem::size_of::<f32>();

/// Whether a series belongs to one function or to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Per function (label `function`).
    Function,
    /// Of the host.
    Host,
}

/// How a series' seconds combine and what a second without data means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Events counted in the second (none: 0).
    Counter,
    /// A level read when the second closes (none: 0).
    Gauge,
    /// A statistic of the second's observations (none: no data).
    Stat,
}

/// A series emberd publishes.
#[derive(Debug, Clone, Copy)]
pub struct SeriesDef {
    /// Its name.
    pub name: &'static str,
    /// Function or host.
    pub scope: Scope,
    /// Counter, gauge or statistic.
    pub kind: Kind,
    /// Its one label besides `function`, and the values it takes (empty:
    /// any; each kind of error or journal record is its own value).
    pub label: Option<(&'static str, &'static [&'static str])>,
    /// What it is.
    pub help: &'static str,
}

/// Every series, in the order of their ids.
pub const SERIES: &[SeriesDef] = &[
    SeriesDef { name: "invocations", scope: Scope::Function, kind: Kind::Counter, label: None, help: "invocations that reached an instance (sync and async attempts)" },
    SeriesDef { name: "errors", scope: Scope::Function, kind: Kind::Counter, label: Some(("kind", &[])), help: "failed invocations by error kind (trap, timeout, handler_error, out_of_memory, crash, …, and emberd's own: internal, vmm_error)" },
    SeriesDef { name: "throttles", scope: Scope::Function, kind: Kind::Counter, label: None, help: "invocations refused with 429" },
    SeriesDef { name: "starts", scope: Scope::Function, kind: Kind::Counter, label: Some(("kind", &["warm", "prewarmed", "restored"])), help: "invocations by how their instance was found" },
    SeriesDef { name: "duration_ms", scope: Scope::Function, kind: Kind::Stat, label: Some(("stat", &["p50", "p99", "max"])), help: "invocation time in emberd, ms, over the second" },
    SeriesDef { name: "concurrency", scope: Scope::Function, kind: Kind::Gauge, label: None, help: "instances busy or restoring" },
    SeriesDef { name: "queued", scope: Scope::Function, kind: Kind::Gauge, label: None, help: "async events open (queued, retrying, running)" },
    SeriesDef { name: "queue_age_s", scope: Scope::Function, kind: Kind::Gauge, label: None, help: "age of the oldest open async event, s" },
    SeriesDef { name: "retries", scope: Scope::Function, kind: Kind::Counter, label: None, help: "async attempts that failed and were retried" },
    SeriesDef { name: "journal_records", scope: Scope::Function, kind: Kind::Counter, label: Some(("kind", &[])), help: "failure journal records written, by kind" },
    SeriesDef { name: "control_actions", scope: Scope::Function, kind: Kind::Counter, label: None, help: "control actions taken" },
    SeriesDef { name: "instances", scope: Scope::Host, kind: Kind::Gauge, label: Some(("state", &["idle", "busy", "restoring"])), help: "instances by state" },
    SeriesDef { name: "prepared_vmms", scope: Scope::Host, kind: Kind::Gauge, label: None, help: "prepared ember-vmm processes ready" },
    SeriesDef { name: "memory_claimed_mib", scope: Scope::Host, kind: Kind::Gauge, label: None, help: "memory the instances claim of the budget, MiB" },
    SeriesDef { name: "restore_ms", scope: Scope::Host, kind: Kind::Stat, label: Some(("stat", &["p50", "p99", "max"])), help: "restore time (load request → resumed), ms, over the second" },
    SeriesDef { name: "load1", scope: Scope::Host, kind: Kind::Gauge, label: None, help: "the host's 1-minute load average" },
    SeriesDef { name: "host_mem_available_mib", scope: Scope::Host, kind: Kind::Gauge, label: None, help: "the host's available memory (MemAvailable), MiB" },
];

/// The id of series `name`.
pub fn series_id(name: &str) -> Option<u8> {
    SERIES.iter().position(|s| s.name == name).map(|i| i as u8)
}

const INVOCATIONS: u8 = 0;
const ERRORS: u8 = 1;
const THROTTLES: u8 = 2;
const STARTS: u8 = 3;
const DURATION: u8 = 4;
const CONCURRENCY: u8 = 5;
const QUEUED: u8 = 6;
const QUEUE_AGE: u8 = 7;
const RETRIES: u8 = 8;
const JOURNAL: u8 = 9;
const CONTROL: u8 = 10;
const INSTANCES: u8 = 11;
const PREPARED: u8 = 12;
const CLAIMED: u8 = 13;
const RESTORE: u8 = 14;
const LOAD1: u8 = 15;
const MEM_AVAILABLE: u8 = 16;

/// The chain of metaevents that led to an invocation (rule names, first
/// first); its length is the invocation's depth. Empty for an API call.
pub type Chain = Arc<[String]>;

/// What one function did in the current second.
#[derive(Debug, Default)]
struct FnSecond {
    invocations: u64,
    errors: BTreeMap<String, u64>,
    throttles: u64,
    warm: u64,
    prewarmed: u64,
    restored: u64,
    durations_ms: Vec<f32>,
    retries: u64,
    journal: BTreeMap<String, u64>,
    control_actions: u64,
    /// The deepest chain among the second's invocations.
    deepest: Option<Chain>,
}

/// An invocation that ended (or was refused), as the probes see it.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    /// The function.
    pub function: &'a str,
    /// Whether it reached an instance.
    pub served: bool,
    /// Warm (`true`) or restored, when served.
    pub warm: bool,
    /// Restored ahead of its arrival (and not `warm`), when served.
    pub prewarmed: bool,
    /// The error kind, when it failed.
    pub error: Option<&'a str>,
    /// Refused with a 429.
    pub throttled: bool,
    /// Time in emberd, ms.
    pub duration_ms: f64,
    /// Its metaevent chain.
    pub chain: Chain,
}

/// Levels read when a second closes (and at each evaluation).
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Per function: busy or restoring instances, open async events, age
    /// of the oldest, s.
    pub functions: Vec<(String, u64, u64, f64)>,
    /// Instances idle, busy, restoring.
    pub instances: [u64; 3],
    /// Prepared VMMs.
    pub prepared: u64,
    /// Memory claimed, MiB.
    pub claimed_mib: u64,
    /// The 1-minute load average.
    pub load1: f64,
    /// MemAvailable, MiB.
    pub mem_available_mib: u64,
}

/// One second's values that are not the default: per function ("" for
/// the host), series, label value ("" for none), value.
type Frame = HashMap<Arc<str>, Vec<(u8, Arc<str>, f32)>>;

/// The default value of a series in a second without data.
fn default_of(series: u8) -> f32 {
    match SERIES[series as usize].kind {
        Kind::Stat => f32::NAN,
        _ => 0.0,
    }
}

/// One series' last hour, one value per second.
struct Ring {
    values: Box<[f32]>,
    /// The newest second written.
    newest: i64,
    default: f32,
}

impl Ring {
    fn new(default: f32) -> Ring {
        Ring {
            values: vec![default; RING_SECONDS].into_boxed_slice(),
            newest: i64::MIN,
            default,
        }
    }

    fn slot(sec: i64) -> usize {
        sec.rem_euclid(RING_SECONDS as i64) as usize
    }

    fn put(&mut self, sec: i64, value: f32) {
        if self.newest != i64::MIN && sec > self.newest {
            // The seconds between had no data.
            let gap = (sec - self.newest - 1).min(RING_SECONDS as i64);
            for s in sec - gap..sec {
                self.values[Ring::slot(s)] = self.default;
            }
        } else if self.newest != i64::MIN && sec <= self.newest - RING_SECONDS as i64 {
            return;
        }
        self.values[Ring::slot(sec)] = value;
        self.newest = self.newest.max(sec);
    }

    fn get(&self, sec: i64) -> f32 {
        if sec > self.newest || sec <= self.newest.saturating_sub(RING_SECONDS as i64) {
            self.default
        } else {
            self.values[Ring::slot(sec)]
        }
    }

    /// Folds seconds `from..to` into `fold`, oldest first: the kept ones
    /// as (at most two) slices of the ring, the others as its default.
    fn fold_range(&self, from: i64, to: i64, fold: &mut Fold) {
        if from >= to {
            return;
        }
        let oldest_kept = self.newest.saturating_sub(RING_SECONDS as i64 - 1);
        let lo = from.max(oldest_kept);
        let hi = to.min(self.newest.saturating_add(1));
        if lo > from {
            fold.add_repeat(self.default, (lo.min(to) - from) as u64);
        }
        if lo < hi {
            let (a, b) = (Ring::slot(lo), Ring::slot(hi - 1));
            if a <= b {
                fold.add_slice(&self.values[a..=b]);
            } else {
                fold.add_slice(&self.values[a..]);
                fold.add_slice(&self.values[..=b]);
            }
        }
        let after = hi.max(from);
        if to > after {
            fold.add_repeat(self.default, (to - after) as u64);
        }
    }
}

/// A ring of one series and label value: series, label value, ring.
type LabelledRing = (u8, Arc<str>, Ring);

/// How a window's seconds are folded into one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// The sum.
    Sum,
    /// The mean of the seconds with data.
    Avg,
    /// The least.
    Min,
    /// The greatest.
    Max,
    /// The sum per second of the window.
    Rate,
    /// The newest second with data.
    Last,
}

impl Aggregate {
    /// Parses `sum | avg | min | max | rate | last`.
    pub fn parse(text: &str) -> Option<Aggregate> {
        Some(match text {
            "sum" => Aggregate::Sum,
            "avg" => Aggregate::Avg,
            "min" => Aggregate::Min,
            "max" => Aggregate::Max,
            "rate" => Aggregate::Rate,
            "last" => Aggregate::Last,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Sum => "sum",
            Aggregate::Avg => "avg",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Rate => "rate",
            Aggregate::Last => "last",
        }
    }
}

/// The seconds of a window folded as they come, oldest first.
#[derive(Debug, Clone, Copy)]
struct Fold {
    sum: f64,
    n: u32,
    min: f64,
    max: f64,
    last: f64,
}

impl Fold {
    fn new() -> Fold {
        Fold {
            sum: 0.0,
            n: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            last: f64::NAN,
        }
    }

    fn add(&mut self, v: f32) {
        if v.is_nan() {
            return;
        }
        let v = f64::from(v);
        self.sum += v;
        self.n += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.last = v;
    }

    fn add_slice(&mut self, values: &[f32]) {
        for v in values {
            self.add(*v);
        }
    }

    /// Adds `v`, `k` times.
    fn add_repeat(&mut self, v: f32, k: u64) {
        if k == 0 || v.is_nan() {
            return;
        }
        let v = f64::from(v);
        self.sum += v * k as f64;
        self.n += k as u32;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.last = v;
    }

    /// The fold as `aggregate`; `span_s` is the time it covers (for `rate`).
    fn value(&self, aggregate: Aggregate, span_s: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        Some(match aggregate {
            Aggregate::Sum => self.sum,
            Aggregate::Avg => self.sum / f64::from(self.n),
            Aggregate::Min => self.min,
            Aggregate::Max => self.max,
            Aggregate::Rate => self.sum / span_s.max(1.0),
            Aggregate::Last => self.last,
        })
    }
}

/// What the current second has seen so far: invocations add to it as they
/// end. Its own lock, apart from the [`Store`]: an invocation never waits
/// for a rule evaluation, only for a sample's copy of these counts.
#[derive(Debug, Default)]
pub struct Live {
    per: HashMap<Arc<str>, FnSecond>,
    restores_ms: Vec<f32>,
}

impl Live {
    fn second(&mut self, function: &str) -> &mut FnSecond {
        if !self.per.contains_key(function) {
            self.per.insert(Arc::from(function), FnSecond::default());
        }
        self.per.get_mut(function).expect("inserted")
    }

    /// Adds an invocation's end (or refusal) to the current second.
    pub fn observe(&mut self, o: &Observation<'_>) {
        let s = self.second(o.function);
        if o.throttled {
            s.throttles += 1;
        }
        if o.served {
            s.invocations += 1;
            if o.warm {
                s.warm += 1;
            } else if o.prewarmed {
                s.prewarmed += 1;
            } else {
                s.restored += 1;
            }
            s.durations_ms.push(o.duration_ms as f32);
        }
        if let Some(kind) = o.error {
            *s.errors.entry(kind.to_string()).or_default() += 1;
        }
        if !o.chain.is_empty() && s.deepest.as_ref().is_none_or(|d| d.len() < o.chain.len()) {
            s.deepest = Some(o.chain.clone());
        }
    }

    /// Adds a retry of one of `function`'s async events.
    pub fn retried(&mut self, function: &str) {
        self.second(function).retries += 1;
    }

    /// Adds a journal record of `kind` for `function`.
    pub fn journaled(&mut self, function: &str, kind: &str) {
        *self
            .second(function)
            .journal
            .entry(kind.to_string())
            .or_default() += 1;
    }

    /// Adds a control action on `function`.
    pub fn control_action(&mut self, function: &str) {
        self.second(function).control_actions += 1;
    }

    /// Adds a restore that took `ms`.
    pub fn restored(&mut self, ms: f64) {
        self.restores_ms.push(ms as f32);
    }
}

/// The store: the current second's values as of the last sample, and the
/// last hour of closed seconds.
pub struct Store {
    /// The second being filled.
    current: i64,
    /// The deepest chain of each function's invocations in the current
    /// second, as of the last sample.
    current_chains: HashMap<Arc<str>, Chain>,
    /// Per function ("" for the host): a ring per series and label value.
    rings: HashMap<Arc<str>, Vec<LabelledRing>>,
    /// Per function: seconds whose invocations ran at a depth > 0, with
    /// the deepest chain.
    chains: HashMap<Arc<str>, VecDeque<(i64, Chain)>>,
    /// The current second's frame as of the last [`Store::sample`].
    frame: Frame,
    /// How much of the current second had passed at that sample (0–1).
    elapsed: f64,
    /// Counter series summed since start, for /metrics.
    totals: BTreeMap<(u8, Arc<str>, Arc<str>), f64>,
    empty: Arc<str>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(0)
    }
}

impl Store {
    /// An empty store whose current second is `now_s`.
    pub fn new(now_s: i64) -> Store {
        Store {
            current: now_s,
            current_chains: HashMap::new(),
            rings: HashMap::new(),
            chains: HashMap::new(),
            frame: Frame::new(),
            elapsed: 0.0,
            totals: BTreeMap::new(),
            empty: Arc::from(""),
        }
    }

    /// The second being filled.
    pub fn current(&self) -> i64 {
        self.current
    }

    /// The current second's values so far, with `gauges` as they are now.
    fn build_frame(&self, live: &Live, gauges: &Gauges) -> Frame {
        let mut frame = Frame::new();
        let empty = self.empty.clone();
        let put = |frame: &mut Frame, series: u8, f: &Arc<str>, label: Arc<str>, v: f64| {
            let v = v as f32;
            if v != 0.0 || SERIES[series as usize].kind == Kind::Stat {
                frame.entry(f.clone()).or_default().push((series, label, v));
            }
        };
        for (f, s) in &live.per {
            put(
                &mut frame,
                INVOCATIONS,
                f,
                empty.clone(),
                s.invocations as f64,
            );
            put(&mut frame, THROTTLES, f, empty.clone(), s.throttles as f64);
            put(&mut frame, STARTS, f, Arc::from("warm"), s.warm as f64);
            put(
                &mut frame,
                STARTS,
                f,
                Arc::from("prewarmed"),
                s.prewarmed as f64,
            );
            put(
                &mut frame,
                STARTS,
                f,
                Arc::from("restored"),
                s.restored as f64,
            );
            put(&mut frame, RETRIES, f, empty.clone(), s.retries as f64);
            put(
                &mut frame,
                CONTROL,
                f,
                empty.clone(),
                s.control_actions as f64,
            );
            for (series, by_kind) in [(ERRORS, &s.errors), (JOURNAL, &s.journal)] {
                for (kind, n) in by_kind {
                    put(&mut frame, series, f, Arc::from(kind.as_str()), *n as f64);
                }
            }
            if !s.durations_ms.is_empty() {
                let [p50, p99, max] = stats(&s.durations_ms);
                put(&mut frame, DURATION, f, Arc::from("p50"), p50);
                put(&mut frame, DURATION, f, Arc::from("p99"), p99);
                put(&mut frame, DURATION, f, Arc::from("max"), max);
            }
        }
        for (f, concurrency, queued, age) in &gauges.functions {
            let f = live
                .per
                .get_key_value(f.as_str())
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| Arc::from(f.as_str()));
            put(
                &mut frame,
                CONCURRENCY,
                &f,
                empty.clone(),
                *concurrency as f64,
            );
            put(&mut frame, QUEUED, &f, empty.clone(), *queued as f64);
            put(&mut frame, QUEUE_AGE, &f, empty.clone(), *age);
        }
        let host = empty.clone();
        for (i, state) in ["idle", "busy", "restoring"].iter().enumerate() {
            put(
                &mut frame,
                INSTANCES,
                &host,
                Arc::from(*state),
                gauges.instances[i] as f64,
            );
        }
        put(
            &mut frame,
            PREPARED,
            &host,
            empty.clone(),
            gauges.prepared as f64,
        );
        put(
            &mut frame,
            CLAIMED,
            &host,
            empty.clone(),
            gauges.claimed_mib as f64,
        );
        put(&mut frame, LOAD1, &host, empty.clone(), gauges.load1);
        put(
            &mut frame,
            MEM_AVAILABLE,
            &host,
            empty.clone(),
            gauges.mem_available_mib as f64,
        );
        if !live.restores_ms.is_empty() {
            let [p50, p99, max] = stats(&live.restores_ms);
            put(&mut frame, RESTORE, &host, Arc::from("p50"), p50);
            put(&mut frame, RESTORE, &host, Arc::from("p99"), p99);
            put(&mut frame, RESTORE, &host, Arc::from("max"), max);
        }
        frame
    }

    /// Samples at `now_ms`: a second that ended since the last
    /// sample is closed into the rings (what `live` saw, with `gauges` as
    /// its levels; `live` starts the new second empty), and the current
    /// second's frame is brought up to date.
    pub fn sample_at(&mut self, now_ms: i64, gauges: &Gauges, live: &mut Live) {
        self.sample(now_ms.div_euclid(1000), gauges, live);
        self.elapsed = now_ms.rem_euclid(1000) as f64 / 1000.0;
    }

    /// [`Store::sample_at`] the start of second `now_s`.
    pub fn sample(&mut self, now_s: i64, gauges: &Gauges, live: &mut Live) {
        self.elapsed = 0.0;
        if now_s > self.current {
            let closed = self.build_frame(live, gauges);
            let sec = self.current;
            for (function, values) in closed {
                let rings = self.rings.entry(function.clone()).or_default();
                for (series, label, v) in values {
                    if SERIES[series as usize].kind == Kind::Counter {
                        *self
                            .totals
                            .entry((series, function.clone(), label.clone()))
                            .or_default() += f64::from(v);
                    }
                    let ring = match rings
                        .iter()
                        .position(|(s, l, _)| *s == series && *l == label)
                    {
                        Some(i) => &mut rings[i].2,
                        None => {
                            rings.push((series, label, Ring::new(default_of(series))));
                            &mut rings.last_mut().expect("pushed").2
                        }
                    };
                    ring.put(sec, v);
                }
            }
            for (f, s) in &live.per {
                if let Some(chain) = &s.deepest {
                    let seen = self.chains.entry(f.clone()).or_default();
                    seen.push_back((sec, chain.clone()));
                    while seen.len() > RING_SECONDS {
                        seen.pop_front();
                    }
                }
            }
            live.per.clear();
            live.restores_ms.clear();
            self.current = now_s;
            self.forget(now_s);
        }
        self.frame = self.build_frame(live, gauges);
        self.current_chains = live
            .per
            .iter()
            .filter_map(|(f, s)| s.deepest.clone().map(|c| (f.clone(), c)))
            .collect();
    }

    /// Drops rings and chains with nothing in the last hour.
    fn forget(&mut self, now_s: i64) {
        // The oldest second a window of an hour reads.
        let horizon = now_s - RING_SECONDS as i64;
        self.rings.retain(|_, rings| {
            rings.retain(|(_, _, r)| r.newest >= horizon);
            !rings.is_empty()
        });
        self.chains.retain(|_, seen| {
            while seen.front().is_some_and(|(s, _)| *s < horizon) {
                seen.pop_front();
            }
            !seen.is_empty()
        });
    }

    /// Series `series` of `function` ("" for the host), label value `label`
    /// (None: the sum over label values) at second `sec` (the current
    /// second: as far as it has filled).
    pub fn value(&self, series: u8, function: &str, label: Option<&str>, sec: i64) -> f32 {
        let mut v = default_of(series);
        let wanted = |s: u8, l: &str| s == series && label.is_none_or(|want| want == l);
        if sec == self.current {
            for (s, l, x) in self.frame.get(function).into_iter().flatten() {
                if wanted(*s, l) {
                    v = if v.is_nan() { *x } else { v + x };
                }
            }
        } else {
            for (s, l, ring) in self.rings.get(function).into_iter().flatten() {
                if wanted(*s, l) {
                    let x = ring.get(sec);
                    if !x.is_nan() {
                        v = if v.is_nan() { x } else { v + x };
                    }
                }
            }
        }
        v
    }

    /// The window of the last `window_s` closed seconds and the current
    /// one as far as it has filled (so that whatever happened is seen for
    /// `window_s` seconds at least, whenever in its second it happened;
    /// a counter's current second only for sum, max and rate), folded by
    /// `aggregate`; None when it holds no data.
    pub fn aggregate(
        &self,
        series: u8,
        function: &str,
        label: Option<&str>,
        aggregate: Aggregate,
        window_s: u32,
    ) -> Option<f64> {
        let mut fold = Fold::new();
        let from = self.current - i64::from(window_s.max(1));
        let default = default_of(series);
        let rings = self.rings.get(function).map_or(&[][..], Vec::as_slice);
        let matches =
            |(s, l, _): &&LabelledRing| *s == series && label.is_none_or(|want| want == &**l);
        let mut matching = rings.iter().filter(matches);
        match (matching.next(), matching.next()) {
            (None, _) => fold.add_repeat(default, (self.current - from) as u64),
            // One ring (a series without a label, or one label value):
            // its slices.
            (Some((_, _, ring)), None) => ring.fold_range(from, self.current, &mut fold),
            // Label values summed second by second.
            _ => {
                for sec in from..self.current {
                    let mut v = default;
                    for (_, _, ring) in rings.iter().filter(matches) {
                        let x = ring.get(sec);
                        if !x.is_nan() {
                            v = if v.is_nan() { x } else { v + x };
                        }
                    }
                    fold.add(v);
                }
            }
        }
        // The current second as far as it has filled: a counter's is
        // still counting, so it adds to sum, max and rate (seen at once)
        // but would drag min, avg and last towards 0 at each second's
        // start — for those a counter's window is its closed seconds.
        let counting = SERIES[series as usize].kind == Kind::Counter
            && matches!(aggregate, Aggregate::Min | Aggregate::Avg | Aggregate::Last);
        let mut span = f64::from(window_s.max(1));
        if !counting {
            fold.add(self.value(series, function, label, self.current));
            span += self.elapsed;
        }
        fold.value(aggregate, span)
    }

    /// The deepest chain among `function`'s invocations in the window of
    /// [`Store::aggregate`] (empty: none ran at a depth > 0).
    pub fn deepest_chain(&self, function: &str, window_s: u32) -> Chain {
        let from = self.current - i64::from(window_s.max(1));
        let mut deepest: Option<&Chain> = self.current_chains.get(function);
        if let Some(seen) = self.chains.get(function) {
            for (sec, chain) in seen.iter().rev() {
                if *sec < from {
                    break;
                }
                if deepest.is_none_or(|d| d.len() < chain.len()) {
                    deepest = Some(chain);
                }
            }
        }
        deepest.cloned().unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// The functions with data in `series`, closed or current.
    pub fn functions_of(&self, series: u8) -> Vec<Arc<str>> {
        let has = |values: &[(u8, Arc<str>, f32)]| values.iter().any(|(s, _, _)| *s == series);
        let mut out: Vec<Arc<str>> = self
            .rings
            .iter()
            .filter(|(f, rings)| !f.is_empty() && rings.iter().any(|(s, _, _)| *s == series))
            .map(|(f, _)| f.clone())
            .collect();
        for (f, values) in &self.frame {
            if !f.is_empty() && has(values) && !out.contains(f) {
                out.push(f.clone());
            }
        }
        out.sort();
        out
    }

    /// The label values seen of `series` for `function` ("" for the host).
    pub fn labels_of(&self, series: u8, function: &str) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        let closed = self
            .rings
            .get(function)
            .into_iter()
            .flatten()
            .map(|(s, l, _)| (s, l));
        let current = self
            .frame
            .get(function)
            .into_iter()
            .flatten()
            .map(|(s, l, _)| (s, l));
        for (s, l) in closed.chain(current) {
            if *s == series && !out.contains(l) {
                out.push(l.clone());
            }
        }
        out.sort();
        out
    }

    /// `GET /metadata`: `series` of `function` (None: every function with
    /// data; ignored for a host series) and label value `label` (None:
    /// each), from second `from_s` to the current one in steps of
    /// `step_s` (a counter's seconds summed, a gauge's averaged, a
    /// statistic's greatest).
    pub fn query(
        &self,
        series: u8,
        function: Option<&str>,
        label: Option<&str>,
        from_s: i64,
        step_s: u32,
    ) -> Result<serde_json::Value, String> {
        let def = SERIES[series as usize];
        let functions: Vec<Arc<str>> = match (def.scope, function) {
            (Scope::Host, _) => vec![Arc::from("")],
            (Scope::Function, Some(f)) => vec![Arc::from(f)],
            (Scope::Function, None) => self.functions_of(series),
        };
        let step = i64::from(step_s.max(1));
        let from = from_s.max(self.current - RING_SECONDS as i64 + 1);
        let mut results = Vec::new();
        let per_result = ((self.current - from) / step + 1).max(0) as usize;
        let mut points_total = 0usize;
        for f in functions {
            let labels: Vec<Option<Arc<str>>> = match (def.label, label) {
                (None, _) => vec![None],
                (Some(_), Some(l)) => vec![Some(Arc::from(l))],
                (Some(_), None) => self.labels_of(series, &f).into_iter().map(Some).collect(),
            };
            for l in labels {
                points_total += per_result;
                if points_total > MAX_QUERY_POINTS {
                    return Err(format!(
                        "the answer would hold more than {MAX_QUERY_POINTS} points: name a function or a label, or give a larger step or a shorter since"
                    ));
                }
                let mut points = Vec::new();
                let mut start = from;
                while start <= self.current {
                    let end = (start + step - 1).min(self.current);
                    let mut fold = Fold::new();
                    for sec in start..=end {
                        fold.add(self.value(series, &f, l.as_deref(), sec));
                    }
                    let how = match def.kind {
                        Kind::Counter => Aggregate::Sum,
                        Kind::Gauge => Aggregate::Avg,
                        Kind::Stat => Aggregate::Max,
                    };
                    points.push(serde_json::json!([start, fold.value(how, 1.0)]));
                    start += step;
                }
                let mut labels = serde_json::Map::new();
                if def.scope == Scope::Function {
                    labels.insert("function".into(), serde_json::json!(&*f));
                }
                if let (Some((key, _)), Some(l)) = (def.label, &l) {
                    labels.insert(key.into(), serde_json::json!(&**l));
                }
                results.push(serde_json::json!({ "labels": labels, "points": points }));
            }
        }
        Ok(serde_json::json!({
            "series": def.name,
            "kind": match def.kind { Kind::Counter => "counter", Kind::Gauge => "gauge", Kind::Stat => "stat" },
            "from_s": from,
            "to_s": self.current,
            "step_s": step,
            "results": results,
        }))
    }

    /// The series in Prometheus' text format, as `ember_meta_<series>`:
    /// counters summed since start (to the last closed second), gauges
    /// and statistics as the current second has them.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let labels = |series: u8, f: &str, l: &str| {
            let def = SERIES[series as usize];
            let mut parts = Vec::new();
            if !f.is_empty() {
                parts.push(format!("function=\"{f}\""));
            }
            if let (Some((key, _)), false) = (def.label, l.is_empty()) {
                parts.push(format!(
                    "{key}=\"{}\"",
                    l.replace('\\', "\\\\").replace('"', "\\\"")
                ));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(","))
            }
        };
        for (id, def) in SERIES.iter().enumerate() {
            let id = id as u8;
            let (metric, kind) = match def.kind {
                Kind::Counter => (format!("ember_meta_{}_total", def.name), "counter"),
                _ => (format!("ember_meta_{}", def.name), "gauge"),
            };
            let _ = writeln!(out, "# HELP {metric} {}.", def.help);
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            if def.kind == Kind::Counter {
                for ((s, f, l), v) in &self.totals {
                    if *s == id {
                        let _ = writeln!(out, "{metric}{} {v}", labels(id, f, l));
                    }
                }
            } else {
                let mut rows: Vec<(&Arc<str>, &Arc<str>, f32)> = self
                    .frame
                    .iter()
                    .flat_map(|(f, values)| values.iter().map(move |(s, l, v)| (f, s, l, v)))
                    .filter(|(_, s, _, _)| **s == id)
                    .map(|(f, _, l, v)| (f, l, *v))
                    .collect();
                rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
                for (f, l, v) in rows {
                    let _ = writeln!(out, "{metric}{} {v}", labels(id, f, l));
                }
            }
        }
    }

    /// Rings held, and the bytes their values take.
    pub fn footprint(&self) -> (usize, usize) {
        let rings: usize = self.rings.values().map(Vec::len).sum();
        (rings, rings * RING_BYTES)
    }
}

/// p50, p99 and max of `values` (not empty).
fn stats(values: &[f32]) -> [f64; 3] {
    let mut sorted: Vec<f32> = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    let at = |q: f64| {
        let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
        f64::from(sorted[i])
    };
    [at(0.5), at(0.99), f64::from(sorted[sorted.len() - 1])]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served<'a>(function: &'a str, error: Option<&'a str>, ms: f64) -> Observation<'a> {
        Observation {
            function,
            served: true,
            warm: true,
            prewarmed: false,
            error,
            throttled: false,
            duration_ms: ms,
            chain: Arc::from(Vec::new()),
        }
    }

    fn id(name: &str) -> u8 {
        series_id(name).expect(name)
    }

    #[test]
    fn series_ids_match_the_catalog() {
        for (i, name) in [
            "invocations",
            "errors",
            "throttles",
            "starts",
            "duration_ms",
            "concurrency",
            "queued",
            "queue_age_s",
            "retries",
            "journal_records",
            "control_actions",
            "instances",
            "prepared_vmms",
            "memory_claimed_mib",
            "restore_ms",
            "load1",
            "host_mem_available_mib",
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(series_id(name), Some(i as u8), "{name}");
        }
        assert_eq!(series_id("nope"), None);
    }

    #[test]
    fn counters_close_into_seconds_and_windows_fold_them() {
        let mut store = Store::new(100);
        let mut live = Live::default();
        let g = Gauges::default();
        for _ in 0..3 {
            live.observe(&served("f", Some("trap"), 2.0));
        }
        live.observe(&served("f", None, 4.0));
        store.sample(100, &g, &mut live);
        // The current second counts as it fills.
        assert_eq!(store.value(id("errors"), "f", Some("trap"), 100), 3.0);
        store.sample(101, &g, &mut live);
        live.observe(&served("f", Some("timeout"), 9.0));
        store.sample(101, &g, &mut live);
        let errors = id("errors");
        assert_eq!(store.value(errors, "f", Some("trap"), 100), 3.0);
        assert_eq!(store.value(errors, "f", None, 101), 1.0);
        assert_eq!(
            store.aggregate(errors, "f", None, Aggregate::Sum, 10),
            Some(4.0)
        );
        assert_eq!(
            store.aggregate(errors, "f", Some("trap"), Aggregate::Sum, 10),
            Some(3.0)
        );
        assert_eq!(
            store.aggregate(errors, "f", None, Aggregate::Max, 10),
            Some(3.0)
        );
        assert_eq!(
            store.aggregate(errors, "f", None, Aggregate::Min, 10),
            Some(0.0)
        );
        assert_eq!(
            store.aggregate(errors, "f", None, Aggregate::Rate, 10),
            Some(0.4)
        );
        // A counter's last, min and avg read closed seconds only: the
        // current one is still counting.
        assert_eq!(
            store.aggregate(errors, "f", None, Aggregate::Last, 10),
            Some(3.0)
        );
        // Half a second in, a rate counts the half second too.
        store.sample_at(101_500, &g, &mut live);
        assert_eq!(
            store.aggregate(errors, "f", None, Aggregate::Rate, 10),
            Some(4.0 / 10.5)
        );
        // A window of one second: the last closed second and the current one.
        assert_eq!(
            store.aggregate(errors, "f", None, Aggregate::Sum, 1),
            Some(4.0)
        );
        store.sample(102, &g, &mut live);
        assert_eq!(
            store.aggregate(errors, "f", None, Aggregate::Sum, 1),
            Some(1.0)
        );
        store.sample(101, &g, &mut live);
        assert_eq!(
            store.aggregate(errors, "g", None, Aggregate::Sum, 10),
            Some(0.0)
        );
        // Durations: p50/p99/max of the second.
        let d = id("duration_ms");
        assert_eq!(store.value(d, "f", Some("max"), 100), 4.0);
        assert_eq!(store.value(d, "f", Some("p50"), 100), 2.0);
    }

    #[test]
    fn a_second_without_data_is_no_data_for_a_statistic_and_zero_for_a_counter() {
        let mut store = Store::new(10);
        let mut live = Live::default();
        let g = Gauges::default();
        live.observe(&served("f", None, 5.0));
        store.sample(11, &g, &mut live);
        store.sample(30, &g, &mut live);
        let d = id("duration_ms");
        assert!(store.value(d, "f", Some("max"), 20).is_nan());
        assert_eq!(
            store.aggregate(d, "f", Some("max"), Aggregate::Avg, 60),
            Some(5.0)
        );
        assert_eq!(
            store.aggregate(d, "f", Some("max"), Aggregate::Avg, 5),
            None
        );
        assert_eq!(
            store.aggregate(id("invocations"), "f", None, Aggregate::Sum, 60),
            Some(1.0)
        );
        assert_eq!(
            store.aggregate(id("invocations"), "f", None, Aggregate::Avg, 5),
            Some(0.0)
        );
    }

    #[test]
    fn a_steady_counter_does_not_dip_at_each_seconds_start() {
        let mut store = Store::new(0);
        let mut live = Live::default();
        let g = Gauges::default();
        for sec in 0..5 {
            for _ in 0..100 {
                live.observe(&served("f", None, 1.0));
            }
            store.sample(sec + 1, &g, &mut live);
        }
        // The first tick of second 5: nothing counted in it yet.
        let invocations = id("invocations");
        assert_eq!(
            store.aggregate(invocations, "f", None, Aggregate::Min, 3),
            Some(100.0)
        );
        assert_eq!(
            store.aggregate(invocations, "f", None, Aggregate::Avg, 3),
            Some(100.0)
        );
        assert_eq!(
            store.aggregate(invocations, "f", None, Aggregate::Last, 3),
            Some(100.0)
        );
        assert_eq!(
            store.aggregate(invocations, "f", None, Aggregate::Sum, 3),
            Some(300.0)
        );
    }

    #[test]
    fn gauges_are_read_when_a_second_closes() {
        let mut store = Store::new(0);
        let mut live = Live::default();
        let mut g = Gauges {
            functions: vec![("f".into(), 2, 7, 1.5)],
            instances: [1, 2, 0],
            prepared: 2,
            ..Default::default()
        };
        store.sample(1, &g, &mut live);
        g.functions[0].1 = 5;
        store.sample(1, &g, &mut live);
        assert_eq!(store.value(id("concurrency"), "f", None, 0), 2.0);
        assert_eq!(store.value(id("concurrency"), "f", None, 1), 5.0);
        assert_eq!(store.value(id("queued"), "f", None, 0), 7.0);
        assert_eq!(store.value(id("instances"), "", Some("busy"), 0), 2.0);
        assert_eq!(store.value(id("instances"), "", None, 0), 3.0);
        assert_eq!(
            store.functions_of(id("queued")),
            vec![Arc::<str>::from("f")]
        );
    }

    #[test]
    fn the_ring_keeps_an_hour_and_forgets_what_is_older() {
        let mut store = Store::new(0);
        let mut live = Live::default();
        let g = Gauges::default();
        live.observe(&served("f", None, 1.0));
        store.sample(1, &g, &mut live);
        assert_eq!(store.footprint().0, 5);
        store.sample(RING_SECONDS as i64 - 1, &g, &mut live);
        assert_eq!(store.value(id("invocations"), "f", None, 0), 1.0);
        store.sample(RING_SECONDS as i64 + 1, &g, &mut live);
        assert_eq!(store.value(id("invocations"), "f", None, 0), 0.0);
        assert_eq!(
            store.footprint().0,
            0,
            "rings with nothing in the last hour go"
        );
        // A ring written again after a long gap reads the gap as no data.
        let mut ring = Ring::new(0.0);
        ring.put(5, 1.0);
        ring.put(5 + RING_SECONDS as i64 + 3, 2.0);
        assert_eq!(ring.get(5 + RING_SECONDS as i64), 0.0);
        assert_eq!(ring.get(5 + RING_SECONDS as i64 + 3), 2.0);
    }

    #[test]
    fn a_range_folded_from_slices_equals_one_folded_second_by_second() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for default in [0.0, f32::NAN] {
            let mut ring = Ring::new(default);
            let mut sec = 10_000i64;
            for _ in 0..5000 {
                sec += 1 + (next() % 3) as i64;
                let v = if next() % 4 == 0 {
                    default
                } else {
                    (next() % 100) as f32
                };
                ring.put(sec, v);
            }
            for _ in 0..500 {
                let to = sec - 4000 + (next() % 4100) as i64;
                let from = to - (next() % 3700) as i64;
                let mut fast = Fold::new();
                ring.fold_range(from, to, &mut fast);
                let mut slow = Fold::new();
                for s in from..to {
                    slow.add(ring.get(s));
                }
                for a in [
                    Aggregate::Sum,
                    Aggregate::Avg,
                    Aggregate::Min,
                    Aggregate::Max,
                    Aggregate::Last,
                ] {
                    let (x, y) = (fast.value(a, 60.0), slow.value(a, 60.0));
                    assert!(
                        x == y
                            || x.zip(y)
                                .is_some_and(|(x, y)| (x - y).abs() < 1e-6 * y.abs().max(1.0)),
                        "{a:?} over {from}..{to}: {x:?} vs {y:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_deepest_chain_of_the_window_is_the_attribution() {
        let mut store = Store::new(0);
        let mut live = Live::default();
        let g = Gauges::default();
        let mut o = served("g", None, 1.0);
        o.chain = Arc::from(vec!["a".to_string()]);
        live.observe(&o);
        store.sample(1, &g, &mut live);
        o.chain = Arc::from(vec!["a".to_string(), "b".to_string()]);
        live.observe(&o);
        store.sample(5, &g, &mut live);
        assert_eq!(store.deepest_chain("g", 10).len(), 2);
        assert_eq!(store.deepest_chain("g", 3).len(), 0, "outside the window");
        live.observe(&o);
        // The current second counts, as of its last sample.
        store.sample(5, &g, &mut live);
        assert_eq!(
            store.deepest_chain("g", 1).len(),
            2,
            "the current second counts"
        );
        assert!(store.deepest_chain("h", 10).is_empty());
    }
}
