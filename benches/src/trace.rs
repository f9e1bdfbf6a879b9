//! Invocation traces: the Azure Functions 2019 schema, read and written,
//! and `ember-bench gen-trace`'s synthetic mix.
//!
//! The schema (`invocations_per_function_md.anon.d01.csv`): a header
//! `HashOwner,HashApp,HashFunction,Trigger,1,2,...,N`, then one row per
//! function with its invocation count in each minute. The reader accepts
//! the columns in any order, minute columns named `1..N` or
//! `minute_1..minute_N` (consecutive from 1), and no `Trigger` (it is
//! then `unknown`); any other column is an error naming it (a wrong file
//! is caught early rather than half-read). Fields are split on `,` (the
//! dataset quotes nothing), trimmed, and a trailing `\r` is dropped;
//! blank lines are skipped. The side files (`function_durations_*`,
//! `app_memory_*`) are read by [`parse_keyed`]: one numeric column per
//! key column, other columns ignored.
//!
//! The synthetic mix ([`MIX_HELP`], the same table as below). Minute 1 of
//! the trace is 00:00 of day 1. The class of each function is dealt
//! exactly in these proportions (rounded), shuffled by the seed; then
//! every function gets its own generators, derived from (seed, index),
//! for its parameters and its counts. The same seed writes the same trace.
//!
//! | share | trigger        | model |
//! |-------|----------------|-------|
//! | 35 %  | `timer`        | period 1, 5, 15 or 60 min (equal shares), random phase; per beat 3 % missed, 5 % one minute late; 1 call a beat (10 % of timers: 2–5) |
//! | 30 %  | `http`         | diurnal Poisson: rate = peak·(0.55 + 0.45·cos(2π(t − t_peak)/1 day)), trough 10 % of peak, t_peak 12:00–16:00; peak log-uniform 0.05–60 /min |
//! | 15 %  | `queue`        | bursts: exponential gaps of mean log-uniform 20–240 min; a burst lasts 1–5 min with 20–500 calls each minute (uniform) |
//! | 20 %  | `http`/`event` | rare: 1–6 calls a day (half `http`, half `event`) at uniform random minutes |
//!
//! Owners are shared by three consecutive functions; every function has
//! its own app. Hashes are 64 hex digits drawn from the seed.

use std::collections::HashMap;
use std::io::Write;

/// The mix, as shown by `ember-bench gen-trace --help` (keep it in step
/// with the module doc and the constants below).
pub const MIX_HELP: &str = "\
The mix (each function's class dealt in these proportions, shuffled by the seed):
  35 %  timer        period 1, 5, 15 or 60 min (equal shares), random phase;
                     per beat 3 % missed, 5 % one minute late; 1 call a beat
                     (10 % of timers fan out to 2-5 calls a beat)
  30 %  http         diurnal Poisson: peak rate log-uniform 0.05-60 /min,
                     peak 12:00-16:00, trough (night) 10 % of the peak
  15 %  queue        bursts with exponential gaps of mean log-uniform 20-240
                     min; each 1-5 min long, 20-500 calls a minute
  20 %  http/event   rare: 1-6 calls a day at random minutes
Minute 1 is 00:00 of day 1. The same seed always writes the same trace.";

/// The classes' shares: timer, diurnal HTTP, bursty queue, rare.
pub const SHARES: [f64; 4] = [0.35, 0.30, 0.15, 0.20];
/// Timer periods, minutes (equal shares).
pub const TIMER_PERIODS: [u32; 4] = [1, 5, 15, 60];
/// The chance a timer's beat does not fire.
pub const TIMER_MISS: f64 = 0.03;
/// The chance a timer's beat fires one minute late.
pub const TIMER_LATE: f64 = 0.05;
/// The share of timers that fan out to 2–5 calls a beat.
pub const TIMER_FANOUT: f64 = 0.10;
/// Diurnal HTTP peak rates, calls a minute (log-uniform between).
pub const HTTP_PEAK: (f64, f64) = (0.05, 60.0);
/// The night trough as a fraction of the peak.
pub const HTTP_TROUGH: f64 = 0.10;
/// Queue bursts' mean gap, minutes (log-uniform between).
pub const QUEUE_GAP_MIN: (f64, f64) = (20.0, 240.0);
/// Minutes a queue burst lasts (inclusive).
pub const QUEUE_BURST_MIN: (u64, u64) = (1, 5);
/// Calls a minute in a queue burst (inclusive).
pub const QUEUE_RATE: (u64, u64) = (20, 500);
/// Calls a day of a rare function (inclusive).
pub const RARE_PER_DAY: (u64, u64) = (1, 6);

/// Minutes in a day.
const DAY_MIN: u64 = 1_440;

/// A small seeded generator: SplitMix64 (Steele, Lea and Flood), good
/// enough for simulation and with no state beyond one word.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for stream `stream` of `seed` (distinct streams of one
    /// seed are independent for all practical purposes).
    pub fn derive(seed: u64, stream: u64) -> Rng {
        Rng(mix(seed ^ mix(stream.wrapping_add(0x6A09_E667_F3BC_C909))))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in [lo, hi] (inclusive).
    pub fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Log-uniform in [lo, hi).
    pub fn log_uniform(&mut self, (lo, hi): (f64, f64)) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln())).exp()
    }

    /// Exponential with mean `mean`.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Poisson with mean `lambda` (Knuth's product method: exact, and
    /// cheap for the means here, at most 60).
    pub fn poisson(&mut self, lambda: f64) -> u32 {
        let limit = (-lambda).exp();
        let (mut k, mut p) = (0, self.unit());
        while p > limit {
            k += 1;
            p *= self.unit();
        }
        k
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One function's row of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `HashOwner`.
    pub owner: String,
    /// `HashApp`.
    pub app: String,
    /// `HashFunction`.
    pub function: String,
    /// `Trigger` (`unknown` when the file has no such column).
    pub trigger: String,
    /// Invocations in each minute, minute 1 first.
    pub counts: Vec<u32>,
}

/// A parsed trace: every row has `minutes` counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Minutes covered.
    pub minutes: usize,
    /// One row per function, in file order.
    pub rows: Vec<Row>,
}

/// The non-blank lines of `text`, 1-based line numbers, fields trimmed.
fn lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.split('\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix('\r').unwrap_or(line)))
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| (n, line.split(',').map(str::trim).collect()))
}

/// The number of a minute column (`7` or `minute_7`), if it is one.
fn minute_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("minute_").unwrap_or(name);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Where each column of a trace's header goes.
struct Layout {
    /// The `HashOwner` column.
    owner: usize,
    /// The `HashApp` column.
    app: usize,
    /// The `HashFunction` column.
    function: usize,
    /// The `Trigger` column, if any.
    trigger: Option<usize>,
    /// The column of minute 1, 2, ...
    minutes: Vec<usize>,
    /// Columns in all.
    width: usize,
}

/// Reads the header (on line `line`): the columns' places, or why not.
fn layout(line: usize, header: &[&str]) -> Result<Layout, String> {
    let mut named: HashMap<&str, usize> = HashMap::new();
    let mut minutes: Vec<(u64, usize)> = Vec::new();
    let mut unknown = Vec::new();
    for (col, &name) in header.iter().enumerate() {
        if let Some(m) = minute_number(name) {
            minutes.push((m, col));
        } else if ["HashOwner", "HashApp", "HashFunction", "Trigger"].contains(&name) {
            if named.insert(name, col).is_some() {
                return Err(format!("line {line}: column {name:?} appears twice"));
            }
        } else {
            unknown.push(format!("{name:?} (column {})", col + 1));
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "line {line}: unknown column(s) {} (a trace has HashOwner, HashApp, HashFunction, \
             an optional Trigger, and minute columns 1..N or minute_1..minute_N)",
            unknown.join(", ")
        ));
    }
    let need = |name: &str| {
        named.get(name).copied().ok_or_else(|| {
            format!(
                "line {line}: no {name} column (a trace needs HashOwner, HashApp and HashFunction)"
            )
        })
    };
    let (owner, app, function) = (need("HashOwner")?, need("HashApp")?, need("HashFunction")?);
    if minutes.is_empty() {
        return Err(format!(
            "line {line}: no minute columns (expected 1..N or minute_1..minute_N)"
        ));
    }
    minutes.sort_unstable();
    for (i, &(m, col)) in minutes.iter().enumerate() {
        if m != i as u64 + 1 {
            return Err(format!(
                "line {line}, column {} ({:?}): minute columns must run 1..N with none missing \
                 or repeated; expected minute {} here",
                col + 1,
                header[col],
                i + 1
            ));
        }
    }
    Ok(Layout {
        owner,
        app,
        function,
        trigger: named.get("Trigger").copied(),
        minutes: minutes.into_iter().map(|(_, col)| col).collect(),
        width: header.len(),
    })
}

/// Checks a row's width against the header's.
fn check_width(line: usize, fields: &[&str], width: usize) -> Result<(), String> {
    if fields.len() == width {
        return Ok(());
    }
    Err(format!(
        "line {line}: {} fields where the header has {width} (a ragged row)",
        fields.len()
    ))
}

/// Parses a trace in the Azure schema (see the module doc). Errors name
/// the line (1-based) and, for a bad value, the column.
pub fn parse_trace(text: &str) -> Result<Trace, String> {
    let mut lines = lines(text);
    let Some((n, header)) = lines.next() else {
        return Err("empty trace: no header line".into());
    };
    let layout = layout(n, &header)?;
    let mut rows = Vec::new();
    for (line, fields) in lines {
        check_width(line, &fields, layout.width)?;
        let counts = layout
            .minutes
            .iter()
            .map(|&col| count(line, col, header[col], fields[col]))
            .collect::<Result<Vec<u32>, String>>()?;
        let hash = |col: usize| {
            let value = fields[col];
            if value.is_empty() {
                Err(format!(
                    "line {line}, column {} ({}): empty",
                    col + 1,
                    header[col]
                ))
            } else {
                Ok(value.to_string())
            }
        };
        rows.push(Row {
            owner: hash(layout.owner)?,
            app: hash(layout.app)?,
            function: hash(layout.function)?,
            trigger: layout
                .trigger
                .map_or("unknown", |col| fields[col])
                .to_string(),
            counts,
        });
    }
    Ok(Trace {
        minutes: layout.minutes.len(),
        rows,
    })
}

/// One minute's count.
fn count(line: usize, col: usize, name: &str, value: &str) -> Result<u32, String> {
    value.parse::<u32>().map_err(|_| {
        let what = if value.starts_with('-') && value[1..].parse::<f64>().is_ok() {
            "a negative count"
        } else {
            "not a count (a non-negative integer)"
        };
        format!(
            "line {line}, column {} (minute {}): {value:?} is {what}",
            col + 1,
            minute_number(name).unwrap_or(0)
        )
    })
}

/// Reads a side file of the dataset: `value` (a non-negative number) per
/// `key`, other columns ignored; a key seen twice keeps its first value.
pub fn parse_keyed(text: &str, key: &str, value: &str) -> Result<HashMap<String, f64>, String> {
    let mut lines = lines(text);
    let Some((n, header)) = lines.next() else {
        return Err("empty file: no header line".into());
    };
    let find = |name: &str| {
        header
            .iter()
            .position(|&h| h == name)
            .ok_or_else(|| format!("line {n}: no {name} column"))
    };
    let (k, v) = (find(key)?, find(value)?);
    let mut out = HashMap::new();
    for (line, fields) in lines {
        check_width(line, &fields, header.len())?;
        let x = fields[v]
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| {
                format!(
                    "line {line}, column {} ({value}): {:?} is not a non-negative number",
                    v + 1,
                    fields[v]
                )
            })?;
        out.entry(fields[k].to_string()).or_insert(x);
    }
    Ok(out)
}

/// Writes `trace` in the Azure schema (with a `Trigger` column and minute
/// columns `1..N`).
pub fn write_csv(trace: &Trace, out: &mut impl Write) -> std::io::Result<()> {
    write!(out, "HashOwner,HashApp,HashFunction,Trigger")?;
    for m in 1..=trace.minutes {
        write!(out, ",{m}")?;
    }
    writeln!(out)?;
    for row in &trace.rows {
        write!(
            out,
            "{},{},{},{}",
            row.owner, row.app, row.function, row.trigger
        )?;
        for c in &row.counts {
            write!(out, ",{c}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// A synthetic function's class and parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Class {
    /// A cron-like timer.
    Timer {
        /// Minutes between beats.
        period: u32,
        /// The first beat's minute (0-based), below the period.
        phase: u32,
        /// Calls a beat.
        fanout: u32,
    },
    /// Diurnal HTTP traffic.
    Http {
        /// Calls a minute at the peak.
        peak: f64,
        /// The peak's minute of the day.
        peak_minute: f64,
    },
    /// A bursty queue consumer.
    Queue {
        /// The mean gap between bursts, minutes.
        mean_gap: f64,
    },
    /// A function called a few times a day.
    Rare {
        /// Calls a day.
        per_day: u32,
        /// `http` or `event`.
        event: bool,
    },
}

impl Class {
    /// The `Trigger` column's value.
    pub fn trigger(&self) -> &'static str {
        match self {
            Class::Timer { .. } => "timer",
            Class::Http { .. } | Class::Rare { event: false, .. } => "http",
            Class::Queue { .. } => "queue",
            Class::Rare { event: true, .. } => "event",
        }
    }

    /// Draws the parameters of a function of kind `kind` (an index into
    /// [`SHARES`]).
    fn draw(kind: usize, rng: &mut Rng) -> Class {
        match kind {
            0 => Class::Timer {
                period: TIMER_PERIODS[rng.below(4) as usize],
                phase: 0, // set below, once the period is known
                fanout: if rng.chance(TIMER_FANOUT) {
                    rng.between((2, 5)) as u32
                } else {
                    1
                },
            },
            1 => Class::Http {
                peak: rng.log_uniform(HTTP_PEAK),
                peak_minute: 720.0 + rng.unit() * 240.0,
            },
            2 => Class::Queue {
                mean_gap: rng.log_uniform(QUEUE_GAP_MIN),
            },
            _ => Class::Rare {
                per_day: rng.between(RARE_PER_DAY) as u32,
                event: rng.chance(0.5),
            },
        }
    }

    /// Invocations in each of `minutes` minutes.
    fn counts(&self, minutes: usize, rng: &mut Rng) -> Vec<u32> {
        let mut counts = vec![0u32; minutes];
        let n = minutes as u64;
        match *self {
            Class::Timer {
                period,
                phase,
                fanout,
            } => {
                for beat in (phase as u64..n).step_by(period as usize) {
                    let r = rng.unit();
                    let at = if r < TIMER_MISS {
                        continue;
                    } else if r < TIMER_MISS + TIMER_LATE {
                        beat + 1
                    } else {
                        beat
                    };
                    if let Some(c) = counts.get_mut(at as usize) {
                        *c += fanout;
                    }
                }
            }
            Class::Http { peak, peak_minute } => {
                let depth = (1.0 - HTTP_TROUGH) / 2.0;
                for (m, c) in counts.iter_mut().enumerate() {
                    let angle = std::f64::consts::TAU * (m as f64 - peak_minute) / DAY_MIN as f64;
                    *c = rng.poisson(peak * (1.0 - depth + depth * angle.cos()));
                }
            }
            Class::Queue { mean_gap } => {
                let mut t = rng.exponential(mean_gap).round() as u64;
                while t < n {
                    let (len, start) = (rng.between(QUEUE_BURST_MIN), t);
                    for m in start..(start + len).min(n) {
                        counts[m as usize] += rng.between(QUEUE_RATE) as u32;
                    }
                    t = start + len + rng.exponential(mean_gap).round() as u64;
                }
            }
            Class::Rare { per_day, .. } => {
                for day in 0..n.div_ceil(DAY_MIN) {
                    for _ in 0..per_day {
                        let m = day * DAY_MIN + rng.below(DAY_MIN);
                        if let Some(c) = counts.get_mut(m as usize) {
                            *c += 1;
                        }
                    }
                }
            }
        }
        counts
    }
}

/// The class of each of `functions` functions: exact shares, shuffled.
pub fn classes(functions: usize, seed: u64) -> Vec<Class> {
    let mut kinds = Vec::with_capacity(functions);
    for (kind, share) in SHARES.iter().enumerate() {
        let n = if kind + 1 == SHARES.len() {
            functions - kinds.len()
        } else {
            ((share * functions as f64).round() as usize).min(functions - kinds.len())
        };
        kinds.extend(std::iter::repeat_n(kind, n));
    }
    let mut shuffle = Rng::derive(seed, u64::MAX);
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, shuffle.below(i as u64 + 1) as usize);
    }
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let mut rng = Rng::derive(seed, i as u64);
            match Class::draw(kind, &mut rng) {
                Class::Timer { period, fanout, .. } => Class::Timer {
                    period,
                    phase: rng.below(period as u64) as u32,
                    fanout,
                },
                class => class,
            }
        })
        .collect()
}

/// 64 hex digits for item `index` of kind `tag` under `seed`.
fn hash(seed: u64, tag: u64, index: u64) -> String {
    let mut rng = Rng::derive(seed ^ mix(tag), index);
    (0..4).map(|_| format!("{:016x}", rng.next_u64())).collect()
}

/// A synthetic trace of `functions` functions over `minutes` minutes.
pub fn generate(functions: usize, minutes: usize, seed: u64) -> Trace {
    let rows = classes(functions, seed)
        .iter()
        .enumerate()
        .map(|(i, class)| {
            // The counts' own stream: the class's draws do not shift them.
            let mut rng = Rng::derive(seed ^ mix(4), i as u64);
            Row {
                owner: hash(seed, 1, i as u64 / 3),
                app: hash(seed, 2, i as u64),
                function: hash(seed, 3, i as u64),
                trigger: class.trigger().to_string(),
                counts: class.counts(minutes, &mut rng),
            }
        })
        .collect();
    Trace { minutes, rows }
}

/// `ember-bench gen-trace`: writes the trace to `out` (stdout if `None`).
pub fn command(
    functions: usize,
    minutes: usize,
    seed: u64,
    out: Option<&std::path::Path>,
) -> Result<serde_json::Value, String> {
    if functions == 0 || minutes == 0 {
        return Err("--functions and --minutes must be at least 1".into());
    }
    let trace = generate(functions, minutes, seed);
    let written = match out {
        Some(path) => std::fs::File::create(path)
            .and_then(|f| {
                let mut w = std::io::BufWriter::new(f);
                write_csv(&trace, &mut w)?;
                w.flush()
            })
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        None => {
            let mut w = std::io::BufWriter::new(std::io::stdout().lock());
            write_csv(&trace, &mut w)
                .and_then(|()| w.flush())
                .map_err(|e| format!("cannot write the trace to stdout: {e}"))
        }
    };
    written?;
    let invocations: u64 = trace
        .rows
        .iter()
        .flat_map(|r| &r.counts)
        .map(|&c| c as u64)
        .sum();
    let mut by_trigger: std::collections::BTreeMap<&str, usize> = Default::default();
    for row in &trace.rows {
        *by_trigger.entry(row.trigger.as_str()).or_default() += 1;
    }
    eprintln!(
        "gen-trace: {functions} functions, {minutes} minutes, seed {seed}: {invocations} \
         invocations ({by_trigger:?}){}",
        out.map_or(String::new(), |p| format!(" → {}", p.display()))
    );
    Ok(serde_json::json!({
        "bench": "gen-trace",
        "functions": functions,
        "minutes": minutes,
        "seed": seed,
        "invocations": invocations,
        "functions_by_trigger": by_trigger,
        "out": out.map(|p| p.display().to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_round_trips_and_names_its_columns() {
        let trace = generate(40, 90, 3);
        let mut text = Vec::new();
        write_csv(&trace, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with("HashOwner,HashApp,HashFunction,Trigger,1,2,3,"));
        assert_eq!(parse_trace(&text).unwrap(), trace);
        assert_eq!(trace.rows[0].function.len(), 64);
    }

    #[test]
    fn the_generator_is_deterministic_for_a_seed() {
        assert_eq!(generate(50, 200, 9), generate(50, 200, 9));
        assert_ne!(generate(50, 200, 9), generate(50, 200, 10));
        // Hashes depend on the index alone.
        let (a, b) = (generate(20, 60, 5), generate(30, 60, 5));
        assert_eq!(a.rows[7].function, b.rows[7].function);
    }

    #[test]
    fn the_mix_has_the_documented_proportions() {
        let dealt = classes(2_000, 1);
        let count = |f: &dyn Fn(&Class) -> bool| dealt.iter().filter(|c| f(c)).count();
        assert_eq!(count(&|c| matches!(c, Class::Timer { .. })), 700);
        assert_eq!(count(&|c| matches!(c, Class::Http { .. })), 600);
        assert_eq!(count(&|c| matches!(c, Class::Queue { .. })), 300);
        assert_eq!(count(&|c| matches!(c, Class::Rare { .. })), 400);
        for p in TIMER_PERIODS {
            let n = count(&|c| matches!(c, Class::Timer { period, .. } if *period == p));
            assert!((140..=210).contains(&n), "period {p}: {n} of 700");
        }
        let fanned = count(&|c| matches!(c, Class::Timer { fanout, .. } if *fanout > 1));
        assert!((40..=100).contains(&fanned), "{fanned} of 700 fan out");
        let events = count(&|c| matches!(c, Class::Rare { event: true, .. }));
        assert!(
            (160..=240).contains(&events),
            "{events} of 400 rare are events"
        );
        for c in &dealt {
            match *c {
                Class::Timer {
                    period,
                    phase,
                    fanout,
                } => {
                    assert!(phase < period && (1..=5).contains(&fanout))
                }
                Class::Http { peak, .. } => assert!((0.05..60.0).contains(&peak)),
                Class::Queue { mean_gap } => assert!((20.0..240.0).contains(&mean_gap)),
                Class::Rare { per_day, .. } => assert!((1..=6).contains(&per_day)),
            }
        }
        // Small numbers still add up.
        for n in 1..12 {
            assert_eq!(classes(n, 2).len(), n);
        }
    }

    #[test]
    fn each_class_counts_as_documented() {
        let mut rng = Rng::derive(1, 1);
        // A 5-minute timer over 10 days: 2,880 beats, 3 % missed, 5 % late.
        let timer = Class::Timer {
            period: 5,
            phase: 2,
            fanout: 1,
        };
        let c = timer.counts(14_400, &mut rng);
        let on = (2..14_400).step_by(5).filter(|&m| c[m] == 1).count();
        let late = (3..14_400).step_by(5).filter(|&m| c[m] == 1).count();
        assert!((2_550..2_700).contains(&on), "{on} on time");
        assert!((100..190).contains(&late), "{late} late");
        assert_eq!(c.iter().map(|&x| x as usize).sum::<usize>(), on + late);
        // Diurnal: the afternoon is ~10× the night.
        let http = Class::Http {
            peak: 20.0,
            peak_minute: 840.0,
        };
        let c = http.counts(1_440, &mut rng);
        let day: u32 = c[780..900].iter().sum();
        let night: u32 = c[60..180].iter().sum();
        assert!((2_200..2_600).contains(&day), "{day} by day");
        assert!((150..350).contains(&night), "{night} by night");
        // Queue bursts: 20–500 a busy minute, mostly idle.
        let queue = Class::Queue { mean_gap: 60.0 };
        let c = queue.counts(14_400, &mut rng);
        let busy = c.iter().filter(|&&x| x > 0).count();
        assert!(c.iter().all(|&x| x == 0 || (20..=1_000).contains(&x)));
        assert!((200..900).contains(&busy), "{busy} busy minutes");
        // Rare: exactly `per_day` a full day.
        let rare = Class::Rare {
            per_day: 4,
            event: true,
        };
        let c = rare.counts(2 * 1_440, &mut rng);
        assert_eq!(c.iter().sum::<u32>(), 8);
    }

    #[test]
    fn poisson_has_its_mean() {
        let mut rng = Rng::derive(7, 0);
        for lambda in [0.05, 1.0, 60.0] {
            let n = 20_000;
            let mean = (0..n).map(|_| rng.poisson(lambda) as f64).sum::<f64>() / n as f64;
            assert!(
                (mean - lambda).abs() < 0.05 * lambda + 0.01,
                "{lambda}: {mean}"
            );
        }
    }

    #[test]
    fn the_header_takes_any_order_and_minute_names() {
        let text = "minute_2, HashFunction,minute_1,HashApp,HashOwner\r\n3,f,4,a,o\r\n\n";
        let t = parse_trace(text).unwrap();
        assert_eq!(t.minutes, 2);
        assert_eq!(t.rows[0].counts, vec![4, 3]);
        assert_eq!(
            (&*t.rows[0].owner, &*t.rows[0].app, &*t.rows[0].function),
            ("o", "a", "f")
        );
        assert_eq!(t.rows[0].trigger, "unknown");
    }

    fn error(text: &str) -> String {
        parse_trace(text).unwrap_err()
    }

    #[test]
    fn bad_traces_are_refused_with_their_line() {
        let head = "HashOwner,HashApp,HashFunction,Trigger,1,2\n";
        let e = error(&format!("{head}o,a,f,timer,1,2\no,a,g,timer,-1,0\n"));
        assert!(
            e.contains("line 3") && e.contains("column 5") && e.contains("negative"),
            "{e}"
        );
        let e = error(&format!("{head}o,a,f,timer,1,2\no,a,g,timer,1\n"));
        assert!(e.contains("line 3") && e.contains("ragged"), "{e}");
        let e = error(&format!("{head}o,a,f,timer,1,x\n"));
        assert!(
            e.contains("line 2") && e.contains("column 6") && e.contains("\"x\""),
            "{e}"
        );
        let e = error(&format!("{head}o,a,f,timer,1,2.5\n"));
        assert!(e.contains("line 2") && e.contains("not a count"), "{e}");
        let e = error("HashOwner,HashApp,HashFunction,Trigger\no,a,f,timer\n");
        assert!(
            e.contains("line 1") && e.contains("no minute columns"),
            "{e}"
        );
        let e = error("\n\nHashOwner,HashApp,Trigger,1\n");
        assert!(e.contains("line 3") && e.contains("no HashFunction"), "{e}");
        let e = error("HashOwner,HashApp,HashFunction,1,3\n");
        assert!(
            e.contains("column 5") && e.contains("expected minute 2"),
            "{e}"
        );
        let e = error("HashOwner,HashApp,HashFunction,Average,1\n");
        assert!(e.contains("unknown column") && e.contains("Average"), "{e}");
        assert!(error("").contains("empty"));
        assert!(error(" \r\n").contains("empty"));
    }

    #[test]
    fn side_files_are_keyed_by_the_named_column() {
        let text = "HashOwner,HashApp,HashFunction,Average,Count\no,a1,f1,250.5,10\no,a1,f2,40,3\n";
        let by_function = parse_keyed(text, "HashFunction", "Average").unwrap();
        assert_eq!(by_function["f1"], 250.5);
        assert_eq!(by_function["f2"], 40.0);
        let by_app = parse_keyed(text, "HashApp", "Count").unwrap();
        assert_eq!(by_app.len(), 1);
        assert_eq!(by_app["a1"], 10.0);
        let e = parse_keyed(text, "HashFunction", "AverageAllocatedMb").unwrap_err();
        assert!(
            e.contains("line 1") && e.contains("AverageAllocatedMb"),
            "{e}"
        );
        let e = parse_keyed("HashApp,X\na,1\nb,-2\n", "HashApp", "X").unwrap_err();
        assert!(e.contains("line 3") && e.contains("column 2"), "{e}");
    }
}
