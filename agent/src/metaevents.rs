//! Metaevents (docs/metaevents.md): rules over the metadata store that run
//! a function when they start (and, optionally, stop) holding. The pure
//! core — rule checking, the `ok → pending → firing → ok` state machine,
//! the cascade bound — is unit-tested here; [`Agent::metadata_tick`]
//! samples, evaluates and fires through the journal.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::host::{lock, Agent, ApiError};
use crate::journal::{self, NewEvent, StoreError};
use crate::metadata::{self, Aggregate, Chain, Gauges, Kind, Scope, Store, SERIES};

/// The longest window, s.
pub const MAX_WINDOW_S: u32 = 3600;

/// History rows kept per rule (oldest dropped first).
pub const HISTORY_PER_RULE: i64 = 1000;

/// Rules a host holds at most.
pub const MAX_RULES: usize = 10_000;

/// The largest payload of a rule or schedule, bytes of JSON (it goes into
/// every event the trigger makes).
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;

/// Checks a trigger's `payload` field.
pub fn check_payload(payload: &Value) -> Result<(), BadRule> {
    let bytes = payload.to_string().len();
    if bytes > MAX_PAYLOAD_BYTES {
        return Err(BadRule::new(
            "payload",
            format!("is {bytes} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES}"),
        ));
    }
    Ok(())
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    fn parse(text: &str) -> Option<Op> {
        Some(match text {
            ">" => Op::Gt,
            ">=" => Op::Ge,
            "<" => Op::Lt,
            "<=" => Op::Le,
            "==" => Op::Eq,
            "!=" => Op::Ne,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    /// Whether `value op threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
            Op::Eq => value == threshold,
            Op::Ne => value != threshold,
        }
    }
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its name.
    pub name: String,
    /// The series' id.
    pub series: u8,
    /// `function` label: a name, `*` (each function), or None (host).
    pub function: Option<String>,
    /// The series' other label (key, value), None: summed over its values.
    pub label: Option<(String, String)>,
    /// How the window folds.
    pub aggregate: Aggregate,
    /// The window, s.
    pub window_s: u32,
    /// The comparison.
    pub op: Op,
    /// Compared with.
    pub threshold: f64,
    /// How long it must hold before it fires, s.
    pub for_s: u32,
    /// The function it runs.
    pub target: String,
    /// Put into its event.
    pub payload: Value,
    /// Fires at most once per this many seconds.
    pub cooldown_s: u32,
    /// Fire when it stops holding too.
    pub on_resolve: bool,
}

/// A rule refused: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRule {
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl BadRule {
    fn new(field: &str, message: impl Into<String>) -> BadRule {
        BadRule {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<BadRule> for ApiError {
    fn from(e: BadRule) -> Self {
        ApiError::new(400, "bad_request", format!("{}: {}", e.field, e.message))
    }
}

fn uint(
    body: &Map<String, Value>,
    field: &str,
    default: Option<u32>,
    (min, max): (u32, u32),
) -> Result<u32, BadRule> {
    match body.get(field) {
        None | Some(Value::Null) => default.ok_or_else(|| BadRule::new(field, "is required")),
        Some(v) => v
            .as_u64()
            .filter(|n| (u64::from(min)..=u64::from(max)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| {
                BadRule::new(
                    field,
                    format!("must be a whole number from {min} to {max}, not {v}"),
                )
            }),
    }
}

fn text<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, BadRule> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(BadRule::new(field, "is required")),
        Some(v) => Err(BadRule::new(field, format!("must be a string, not {v}"))),
    }
}

/// The fields a rule takes.
const RULE_FIELDS: &[&str] = &[
    "series",
    "labels",
    "aggregate",
    "window_s",
    "op",
    "threshold",
    "for_s",
    "target",
    "payload",
    "cooldown_s",
    "on_resolve",
];

impl Rule {
    /// Checks `body` (the `PUT /metaevents/{name}` JSON); `target_exists`
    /// tells whether a function is deployed.
    pub fn parse(
        name: &str,
        body: &Value,
        target_exists: impl Fn(&str) -> bool,
    ) -> Result<Rule, BadRule> {
        crate::functions::check_name(name).map_err(|_| {
            BadRule::new("name", format!("{name:?} is not valid: 1 to 64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"))
        })?;
        let body = body
            .as_object()
            .ok_or_else(|| BadRule::new("body", "must be a JSON object"))?;
        if let Some(unknown) = body.keys().find(|k| !RULE_FIELDS.contains(&k.as_str())) {
            return Err(BadRule::new(
                unknown,
                format!("is not a rule field (they are {})", RULE_FIELDS.join(", ")),
            ));
        }
        let series_name = text(body, "series")?;
        let series = metadata::series_id(series_name).ok_or_else(|| {
            let names: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
            BadRule::new(
                "series",
                format!(
                    "unknown series {series_name:?}; the series are {}",
                    names.join(", ")
                ),
            )
        })?;
        let def = SERIES[series as usize];
        let mut function = None;
        let mut label = None;
        match body.get("labels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(labels)) => {
                for (key, value) in labels {
                    let field = format!("labels.{key}");
                    let value = value.as_str().ok_or_else(|| {
                        BadRule::new(&field, format!("must be a string, not {value}"))
                    })?;
                    if key == "function" {
                        if def.scope == Scope::Host {
                            return Err(BadRule::new(
                                &field,
                                format!("{series_name} is a host series: it has no function label"),
                            ));
                        }
                        if value != "*" {
                            crate::functions::check_name(value)
                                .map_err(|e| BadRule::new(&field, e.to_string()))?;
                        }
                        function = Some(value.to_string());
                    } else {
                        match def.label {
                            Some((name, values)) if name == key => {
                                if !values.is_empty() && !values.contains(&value) {
                                    return Err(BadRule::new(
                                        &field,
                                        format!("{value:?} is not one of {}", values.join(", ")),
                                    ));
                                }
                                label = Some((key.clone(), value.to_string()));
                            }
                            Some((name, _)) => {
                                return Err(BadRule::new(
                                    &field,
                                    format!(
                                        "{series_name} has labels function and {name}, not {key}"
                                    ),
                                ))
                            }
                            None => {
                                return Err(BadRule::new(
                                    &field,
                                    format!("{series_name} has no label {key}"),
                                ))
                            }
                        }
                    }
                }
            }
            Some(v) => {
                return Err(BadRule::new(
                    "labels",
                    format!("must be an object of strings, not {v}"),
                ))
            }
        }
        if def.scope == Scope::Function && function.is_none() {
            return Err(BadRule::new(
                "labels.function",
                format!("{series_name} is per function: name one, or \"*\" for each"),
            ));
        }
        if def.kind == Kind::Stat && label.is_none() {
            let (name, values) = def.label.unwrap_or(("stat", &[]));
            return Err(BadRule::new(
                &format!("labels.{name}"),
                format!(
                    "is required for {series_name}: one of {}",
                    values.join(", ")
                ),
            ));
        }
        let aggregate_name = text(body, "aggregate")?;
        let aggregate = Aggregate::parse(aggregate_name).ok_or_else(|| {
            BadRule::new(
                "aggregate",
                format!(
                    "unknown aggregate {aggregate_name:?}; use sum, avg, min, max, rate or last"
                ),
            )
        })?;
        let window_s = uint(body, "window_s", None, (1, MAX_WINDOW_S))?;
        let op_name = text(body, "op")?;
        let op = Op::parse(op_name).ok_or_else(|| {
            BadRule::new(
                "op",
                format!("unknown comparison {op_name:?}; use >, >=, <, <=, == or !="),
            )
        })?;
        let threshold = match body.get("threshold") {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| BadRule::new("threshold", format!("must be a number, not {v}")))?,
            None => return Err(BadRule::new("threshold", "is required")),
        };
        let target = text(body, "target")?.to_string();
        if !target_exists(&target) {
            return Err(BadRule::new(
                "target",
                format!("no function named {target:?} is deployed"),
            ));
        }
        let on_resolve = match body.get("on_resolve") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(BadRule::new(
                    "on_resolve",
                    format!("must be true or false, not {v}"),
                ))
            }
        };
        let payload = body.get("payload").cloned().unwrap_or(Value::Null);
        check_payload(&payload)?;
        Ok(Rule {
            name: name.to_string(),
            series,
            function,
            label,
            aggregate,
            window_s,
            op,
            threshold,
            for_s: uint(body, "for_s", Some(0), (0, 86_400))?,
            target,
            payload,
            cooldown_s: uint(body, "cooldown_s", Some(0), (0, 86_400))?,
            on_resolve,
        })
    }

    /// The rule as its `PUT` body (what is stored).
    pub fn to_json(&self) -> Value {
        let mut labels = Map::new();
        if let Some(f) = &self.function {
            labels.insert("function".into(), json!(f));
        }
        if let Some((k, v)) = &self.label {
            labels.insert(k.clone(), json!(v));
        }
        json!({
            "series": SERIES[self.series as usize].name,
            "labels": labels,
            "aggregate": self.aggregate.name(),
            "window_s": self.window_s,
            "op": self.op.name(),
            "threshold": self.threshold,
            "for_s": self.for_s,
            "target": self.target,
            "payload": self.payload,
            "cooldown_s": self.cooldown_s,
            "on_resolve": self.on_resolve,
        })
    }

    /// The labels of label set `key` (a function, or "" for the host).
    pub fn labels(&self, key: &str) -> Value {
        let mut labels = Map::new();
        if self.function.is_some() {
            labels.insert("function".into(), json!(key));
        }
        if let Some((k, v)) = &self.label {
            labels.insert(k.clone(), json!(v));
        }
        Value::Object(labels)
    }
}

/// Where a rule stands for one label set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not holding.
    Ok,
    /// Holding, not yet for `for_s` (or within the cooldown).
    Pending,
    /// Fired.
    Firing,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Pending => "pending",
            State::Firing => "firing",
        }
    }
}

/// What an evaluation asks of a label set's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing changes.
    Stay,
    /// `ok → pending`.
    Pending,
    /// `pending → ok` (never fired).
    Clear,
    /// `→ firing`: fire the target.
    Fire,
    /// `firing → ok`: fire the target if `on_resolve`.
    Resolve,
}

/// A rule's state for one label set.
#[derive(Debug, Clone)]
pub struct LabelState {
    /// The state.
    pub state: State,
    /// Since when, ms.
    pub since_ms: i64,
    /// The last value (None: no data).
    pub last_value: Option<f64>,
    /// The last fire, ms (for the cooldown).
    pub last_fired_ms: Option<i64>,
    /// The chain its target's invocation carries (while firing).
    pub chain: Chain,
    /// Why it did not fire (loop, depth, target_missing), while firing.
    pub suppressed: Option<String>,
    /// A deferred fire was recorded (rate limit): not recorded again.
    pub deferred: bool,
}

impl LabelState {
    /// A new label set, `ok`.
    pub fn new(now_ms: i64) -> LabelState {
        LabelState {
            state: State::Ok,
            since_ms: now_ms,
            last_value: None,
            last_fired_ms: None,
            chain: Arc::from(Vec::new()),
            suppressed: None,
            deferred: false,
        }
    }

    /// What `holds` at `now_ms` asks for, under `rule`'s `for_s` and
    /// `cooldown_s`.
    pub fn next(&self, holds: bool, now_ms: i64, rule: &Rule) -> Next {
        let cooled = self
            .last_fired_ms
            .is_none_or(|t| now_ms - t >= i64::from(rule.cooldown_s) * 1000);
        match (self.state, holds) {
            (State::Ok, true) if rule.for_s == 0 && cooled => Next::Fire,
            (State::Ok, true) => Next::Pending,
            (State::Pending, true)
                if now_ms - self.since_ms >= i64::from(rule.for_s) * 1000 && cooled =>
            {
                Next::Fire
            }
            (State::Pending, false) => Next::Clear,
            (State::Firing, false) => Next::Resolve,
            _ => Next::Stay,
        }
    }

    /// Moves to `state` at `now_ms`.
    pub fn enter(&mut self, state: State, now_ms: i64) {
        if state != self.state {
            self.state = state;
            self.since_ms = now_ms;
        }
        if state != State::Firing {
            self.suppressed = None;
        }
        if state != State::Pending {
            self.deferred = false;
        }
    }
}

/// Whether a metaevent may fire its target, given the chain of the
/// invocation whose metadata fired it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cascade {
    /// Yes: the target runs with this chain (depth = its length).
    Go(Chain),
    /// The rule is in the chain already: it would fire itself again.
    Loop,
    /// The target would run deeper than `max_metaevent_depth`.
    TooDeep,
}

/// The cascade bound: `rule` fired by an invocation of chain `parent`.
pub fn cascade(rule: &str, parent: &[String], max_depth: u32) -> Cascade {
    if parent.iter().any(|r| r == rule) {
        Cascade::Loop
    } else if parent.len() as u32 + 1 > max_depth {
        Cascade::TooDeep
    } else {
        let mut chain = parent.to_vec();
        chain.push(rule.to_string());
        Cascade::Go(Arc::from(chain))
    }
}

/// A rule and its label sets' states.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The rule.
    pub rule: Rule,
    /// Changes with every PUT (a fire decided on an older rule is dropped).
    pub generation: u64,
    /// States by label set (function, or "" for the host); `*` rules
    /// keep those that ever left `ok`.
    pub states: BTreeMap<String, LabelState>,
}

/// A transition an evaluation wants committed.
#[derive(Debug, Clone)]
pub struct Want {
    /// The rule.
    pub rule: String,
    /// Its generation.
    pub generation: u64,
    /// The label set.
    pub key: String,
    /// Fire or Resolve (other transitions are applied at once).
    pub next: Next,
    /// The value.
    pub value: Option<f64>,
    /// The chain of the invocations whose metadata fired it.
    pub parent: Chain,
}

/// A history row.
#[derive(Debug, Clone)]
pub struct HistoryRow {
    /// The rule.
    pub rule: String,
    /// When, ms.
    pub at_ms: i64,
    /// Its labels.
    pub labels: Value,
    /// `pending`, `firing`, `ok`, `deferred`.
    pub transition: &'static str,
    /// The value.
    pub value: Option<f64>,
    /// The chain (of the target, or the one that was refused).
    pub chain: Vec<String>,
    /// Whether the target was invoked.
    pub fired: bool,
    /// The target's invocation.
    pub invocation_id: Option<String>,
    /// Why it did not fire, or other detail.
    pub detail: Option<String>,
}

/// The rules and their states.
#[derive(Debug, Default)]
pub struct Engine {
    /// By name.
    pub rules: BTreeMap<String, Entry>,
    generation: u64,
}

impl Engine {
    /// Adds or replaces a rule (its states start at `ok`).
    pub fn put(&mut self, rule: Rule) {
        self.generation += 1;
        self.rules.insert(
            rule.name.clone(),
            Entry {
                rule,
                generation: self.generation,
                states: BTreeMap::new(),
            },
        );
    }

    /// Evaluates every rule over `store` at `now_ms`; `functions` are the
    /// deployed functions (the label sets of `*` rules). Transitions that
    /// need no invocation are applied and returned as history; fires and
    /// resolves are returned to be committed.
    pub fn evaluate(
        &mut self,
        store: &Store,
        functions: &[String],
        now_ms: i64,
    ) -> (Vec<Want>, Vec<HistoryRow>) {
        let mut wants = Vec::new();
        let mut rows = Vec::new();
        let deployed: std::collections::HashSet<&str> =
            functions.iter().map(String::as_str).collect();
        for entry in self.rules.values_mut() {
            let rule = &entry.rule;
            let each = rule.function.as_deref() == Some("*");
            // Label sets: each function for `*` (and those gone since that
            // are not ok yet), else the one.
            let gone: Vec<String> = if each {
                entry
                    .states
                    .keys()
                    .filter(|k| !deployed.contains(k.as_str()))
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            let keys: Vec<&str> = if each {
                functions
                    .iter()
                    .chain(gone.iter())
                    .map(String::as_str)
                    .collect()
            } else {
                vec![rule.function.as_deref().unwrap_or_default()]
            };
            let label = rule.label.as_ref().map(|(_, v)| v.as_str());
            for key in keys {
                let value = store.aggregate(rule.series, key, label, rule.aggregate, rule.window_s);
                let holds = value.is_some_and(|v| rule.op.holds(v, rule.threshold));
                let next = match entry.states.get(key) {
                    Some(st) => st.next(holds, now_ms, rule),
                    None => LabelState::new(now_ms).next(holds, now_ms, rule),
                };
                if next == Next::Stay && each && !entry.states.contains_key(key) {
                    continue;
                }
                if !entry.states.contains_key(key) {
                    entry
                        .states
                        .insert(key.to_string(), LabelState::new(now_ms));
                }
                let Some(st) = entry.states.get_mut(key) else {
                    continue;
                };
                if !holds && st.state != State::Firing {
                    // A fire deferred in this episode is not any more.
                    st.deferred = false;
                }
                st.last_value = value;
                let row = |transition, detail: Option<String>| HistoryRow {
                    rule: rule.name.clone(),
                    at_ms: now_ms,
                    labels: rule.labels(key),
                    transition,
                    value,
                    chain: Vec::new(),
                    fired: false,
                    invocation_id: None,
                    detail,
                };
                match next {
                    Next::Stay => {}
                    Next::Pending => {
                        st.enter(State::Pending, now_ms);
                        let why = if rule.for_s > 0 {
                            format!("holds; fires if it holds {} s", rule.for_s)
                        } else {
                            "holds; within the cooldown".to_string()
                        };
                        rows.push(row("pending", Some(why)));
                    }
                    Next::Clear => {
                        st.enter(State::Ok, now_ms);
                        rows.push(row("ok", Some("stopped holding before it fired".into())));
                    }
                    Next::Fire | Next::Resolve => {
                        let parent = if next == Next::Fire {
                            match SERIES[rule.series as usize].scope {
                                Scope::Function => store.deepest_chain(key, rule.window_s),
                                Scope::Host => Arc::from(Vec::new()),
                            }
                        } else {
                            st.chain.clone()
                        };
                        wants.push(Want {
                            rule: rule.name.clone(),
                            generation: entry.generation,
                            key: key.to_string(),
                            next,
                            value,
                            parent,
                        });
                    }
                }
            }
            if each {
                // A function gone, its label set back at ok: forgotten.
                entry
                    .states
                    .retain(|k, st| st.state != State::Ok || deployed.contains(k.as_str()));
            }
        }
        (wants, rows)
    }
}

/// Settings of metaevents (emberd's config file).
#[derive(Debug, Clone)]
pub struct TriggerSettings {
    /// Metaevent chains run this deep at most.
    pub max_metaevent_depth: u32,
    /// Metaevents fired on the host per second at most (others wait).
    pub metaevents_per_s: u32,
}

impl Default for TriggerSettings {
    fn default() -> Self {
        TriggerSettings {
            max_metaevent_depth: 3,
            metaevents_per_s: 50,
        }
    }
}

/// Counters of metaevents for /metrics.
#[derive(Default)]
pub struct TriggerMetrics {
    /// Targets invoked on entering firing.
    pub fired: AtomicU64,
    /// Targets invoked on resolving.
    pub resolved: AtomicU64,
    /// Fires refused: loops.
    pub loops: AtomicU64,
    /// Fires refused: too deep.
    pub too_deep: AtomicU64,
    /// Fires deferred by the host's rate.
    pub rate_limited: AtomicU64,
    /// Evaluations.
    pub evaluations: AtomicU64,
    /// Time spent sampling and evaluating, ns.
    pub eval_ns: AtomicU64,
    /// Schedule fires.
    pub schedule_fires: AtomicU64,
    /// Schedule fires skipped (missed, `catch_up: false`, or older than
    /// the latest missed one).
    pub schedule_skipped: AtomicU64,
}

/// The metaevent side of the agent.
pub struct Triggers {
    /// Settings.
    pub settings: TriggerSettings,
    /// Rules and states.
    pub engine: Mutex<Engine>,
    /// The metadata.
    pub store: Mutex<Store>,
    /// The current second's counts, as invocations end (locked apart from
    /// the store: evaluations never hold up an invocation).
    pub live: Mutex<metadata::Live>,
    /// Counters.
    pub metrics: TriggerMetrics,
    tokens: Mutex<crate::events::TokenBucket>,
    /// Held across a change's write and its application (PUT, DELETE, a
    /// tick's fires): disk and memory see changes in one order.
    writes: Mutex<()>,
}

impl Triggers {
    /// Loads the rules from the journal database.
    pub fn open(journal: &journal::Journal, settings: TriggerSettings) -> Result<Triggers, String> {
        let mut engine = Engine::default();
        let stored = journal
            .read(journal::metaevents)
            .map_err(|e| format!("cannot read the metaevent rules: {e}"))?;
        for (name, spec) in stored {
            match serde_json::from_str::<Value>(&spec)
                .map_err(|e| BadRule::new("body", e.to_string()))
                .and_then(|body| Rule::parse(&name, &body, |_| true))
            {
                Ok(rule) => engine.put(rule),
                Err(e) => tracing::error!(
                    "metaevent {name} is unusable and is ignored: {}: {}",
                    e.field,
                    e.message
                ),
            }
        }
        Ok(Triggers {
            tokens: Mutex::new(crate::events::TokenBucket::full(f64::from(
                settings.metaevents_per_s.max(1),
            ))),
            writes: Mutex::new(()),
            settings,
            engine: Mutex::new(engine),
            store: Mutex::new(Store::new(journal::now_ms() / 1000)),
            live: Mutex::new(metadata::Live::default()),
            metrics: TriggerMetrics::default(),
        })
    }

    /// Takes a token of the host's fire rate.
    fn allowed(&self) -> bool {
        lock(&self.tokens).take(f64::from(self.settings.metaevents_per_s.max(1)))
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Reads `MemAvailable` (MiB) and the 1-minute load average.
fn host_levels() -> (u64, f64) {
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0);
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .next()
                        .and_then(|x| x.parse::<u64>().ok())
                })
        })
        .map_or(0, |kib| kib / 1024);
    (available, load1)
}

/// A fire ready to be written (with the queue room its event takes).
struct Fire<'a> {
    want: Want,
    row: HistoryRow,
    event: Option<(NewEvent, crate::events::Reservation<'a>)>,
}

impl Agent {
    /// What the probes read now: instances, queues, the host.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        let mut per: BTreeMap<String, (u64, u64, f64)> = BTreeMap::new();
        {
            let pools = lock(&self.pools);
            for i in pools.instances.values() {
                let state = if i.vmm.is_some() {
                    0
                } else if i.restoring {
                    2
                } else {
                    1
                };
                g.instances[state] += 1;
                g.claimed_mib += i.memory_mib;
                if state != 0 {
                    per.entry(i.function.clone()).or_default().0 += 1;
                }
            }
        }
        let now = journal::now_ms();
        for (function, depth, oldest) in self.events.depths() {
            let e = per.entry(function).or_default();
            e.1 = depth;
            e.2 = oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
        }
        g.functions = per.into_iter().map(|(f, (c, q, a))| (f, c, q, a)).collect();
        g.prepared = self.prepared_count() as u64;
        (g.mem_available_mib, g.load1) = host_levels();
        g
    }

    /// Adds what an invocation of `function` did to the metadata (and
    /// /metrics): `served` as the router answered, `ms` in emberd, `chain`
    /// its metaevent chain. Refusals with 429 count as throttles only when
    /// `throttles`.
    pub fn observe(
        &self,
        function: &str,
        served: &Result<crate::host::Served, ApiError>,
        ms: f64,
        chain: Chain,
        throttles: bool,
    ) {
        let start = served.as_ref().ok().map(|s| s.start);
        let (is_served, warm, error, throttled) = match served {
            Ok(s) => (
                true,
                s.start == crate::pool::Start::Warm,
                crate::events::failure_of(&s.response).map(|(kind, _)| kind),
                false,
            ),
            Err(e) if e.status == 429 => (false, false, None, throttles),
            Err(e) if e.status >= 500 && e.kind != "shutting_down" => {
                (false, false, Some(e.kind.to_string()), false)
            }
            Err(_) => return,
        };
        lock(&self.triggers.live).observe(&metadata::Observation {
            function,
            served: is_served,
            warm,
            prewarmed: start == Some(crate::pool::Start::Prewarmed),
            error: error.as_deref(),
            throttled,
            duration_ms: ms,
            chain,
        });
    }

    /// A 429 answered to an invocation of `function`.
    pub fn observe_throttle(&self, function: &str) {
        let refused = Err(ApiError::too_many(""));
        self.observe(function, &refused, 0.0, Arc::from(Vec::new()), true);
    }

    /// One tick (four a second): samples the metadata (closing a second
    /// that ended), evaluates every rule, fires what entered `firing`
    /// (blocking: call on a blocking thread).
    pub fn metadata_tick(&self) {
        let started = Instant::now();
        let now = journal::now_ms();
        let gauges = self.gauges();
        let functions: Vec<String> = self.functions().into_iter().map(|v| v.name).collect();
        let (wants, rows) = {
            let mut store = lock(&self.triggers.store);
            store.sample_at(now, &gauges, &mut lock(&self.triggers.live));
            lock(&self.triggers.engine).evaluate(&store, &functions, now)
        };
        let m = &self.triggers.metrics;
        m.evaluations.fetch_add(1, Ordering::Relaxed);
        m.eval_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if !rows.is_empty() {
            self.events.journal.write_nowait(false, move |conn| {
                for row in &rows {
                    journal::history_tx(conn, row)?;
                }
                Ok(())
            });
        }
        if !wants.is_empty() {
            self.commit(wants, now);
        }
    }

    /// Decides each wanted transition (target, cascade, rate) and writes
    /// the fires with their history in one durable group; states move
    /// only once that is on disk.
    fn commit(&self, wants: Vec<Want>, now: i64) {
        // No PUT or DELETE between the decision and its application.
        let _one = lock(&self.triggers.writes);
        let max_depth = self.triggers.settings.max_metaevent_depth;
        let mut fires: Vec<Fire> = Vec::new();
        let mut deferred: Vec<(String, HistoryRow)> = Vec::new();
        {
            let engine = lock(&self.triggers.engine);
            for want in wants {
                let Some(entry) = engine
                    .rules
                    .get(&want.rule)
                    .filter(|e| e.generation == want.generation)
                else {
                    continue;
                };
                let rule = &entry.rule;
                let st = entry.states.get(&want.key);
                let mut row = HistoryRow {
                    rule: rule.name.clone(),
                    at_ms: now,
                    labels: rule.labels(&want.key),
                    transition: if want.next == Next::Fire {
                        "firing"
                    } else {
                        "ok"
                    },
                    value: want.value,
                    chain: want.parent.to_vec(),
                    fired: false,
                    invocation_id: None,
                    detail: None,
                };
                let (chain, why_not) = if want.next == Next::Resolve {
                    let suppressed = st.and_then(|s| s.suppressed.clone());
                    match (rule.on_resolve, suppressed) {
                        (false, _) => (None, Some("resolved (on_resolve is off)".to_string())),
                        (true, Some(why)) => (
                            None,
                            Some(format!(
                                "resolved; not fired: its firing was not fired either ({why})"
                            )),
                        ),
                        (true, None) if self.current(&rule.target).is_err() => (
                            None,
                            Some(format!(
                                "resolved; target_missing: no function {} is deployed",
                                rule.target
                            )),
                        ),
                        (true, None) => (Some(want.parent.clone()), None),
                    }
                } else if self.current(&rule.target).is_err() {
                    (
                        None,
                        Some(format!(
                            "target_missing: no function {} is deployed",
                            rule.target
                        )),
                    )
                } else {
                    match cascade(&rule.name, &want.parent, max_depth) {
                        Cascade::Go(chain) => (Some(chain), None),
                        Cascade::Loop => {
                            self.triggers.metrics.loops.fetch_add(1, Ordering::Relaxed);
                            (
                                None,
                                Some(format!(
                                    "loop: the chain {} already holds {}, which would fire again",
                                    want.parent.join(" → "),
                                    rule.name
                                )),
                            )
                        }
                        Cascade::TooDeep => {
                            self.triggers
                                .metrics
                                .too_deep
                                .fetch_add(1, Ordering::Relaxed);
                            (None, Some(format!("depth: the target would run at depth {}, past max_metaevent_depth {max_depth} (chain {})", want.parent.len() + 1, want.parent.join(" → "))))
                        }
                    }
                };
                // Room in the target's queue and the host's, then the rate;
                // short of either, the fire waits in its state.
                let room = chain.as_ref().map(|_| {
                    let max = self
                        .current(&rule.target)
                        .map_or(1, |v| v.config.max_queued);
                    self.events.reserve(&rule.target, max)
                });
                let refused = match &room {
                    Some(Err(e)) => Some(format!(
                        "no room for the target's event ({}); it fires when there is",
                        e.message
                    )),
                    Some(Ok(_)) if !self.triggers.allowed() => {
                        self.triggers
                            .metrics
                            .rate_limited
                            .fetch_add(1, Ordering::Relaxed);
                        Some(format!("the host fires {} metaevents a second at most (metaevents_per_s); it fires when there is room", self.triggers.settings.metaevents_per_s))
                    }
                    _ => None,
                };
                if let Some(why) = refused {
                    if !st.is_some_and(|s| s.deferred) {
                        row.transition = "deferred";
                        row.chain = chain.as_deref().unwrap_or_default().to_vec();
                        row.detail = Some(why);
                        deferred.push((want.key.clone(), row));
                    }
                    continue;
                }
                let event = match chain {
                    Some(chain) => {
                        let id = self.new_invocation_id();
                        let state = if want.next == Next::Fire {
                            "firing"
                        } else {
                            "ok"
                        };
                        let body = json!({
                            "metaevent": rule.name,
                            "state": state,
                            "labels": rule.labels(&want.key),
                            "value": want.value,
                            "threshold": rule.threshold,
                            "window_s": rule.window_s,
                            "series": SERIES[rule.series as usize].name,
                            "at": rfc3339(now),
                            "depth": chain.len(),
                            "chain": chain.to_vec(),
                            "payload": rule.payload,
                        });
                        row.fired = true;
                        row.invocation_id = Some(id.clone());
                        row.chain = chain.to_vec();
                        let Some(Ok(reservation)) = room else {
                            continue;
                        };
                        let ev = NewEvent {
                            id,
                            function: rule.target.clone(),
                            origin: "metaevent",
                            source_id: Some(format!("metaevent/{}", rule.name)),
                            affinity: None,
                            idempotency_key: None,
                            event: body.to_string().into_bytes(),
                            accepted_ms: now,
                            due_ms: now,
                        };
                        Some((ev, reservation))
                    }
                    None => {
                        row.detail = why_not;
                        None
                    }
                };
                fires.push(Fire { want, row, event });
            }
        }
        let mut engine_rows: Vec<HistoryRow> = fires.iter().map(|f| f.row.clone()).collect();
        engine_rows.extend(deferred.iter().map(|(_, row)| row.clone()));
        let events: Vec<NewEvent> = fires
            .iter()
            .filter_map(|f| f.event.as_ref().map(|(ev, _)| ev.clone()))
            .collect();
        let written = self.events.journal.write_blocking(true, move |conn| {
            let mut seqs = Vec::new();
            for ev in &events {
                // New ids, no idempotency key: always new.
                seqs.push(match journal::accept_tx(conn, ev, now)? {
                    journal::Accepted::New(seq) => Some(ev.open(seq)),
                    journal::Accepted::Existing(_) => None,
                });
            }
            for row in &engine_rows {
                journal::history_tx(conn, row)?;
            }
            Ok(seqs)
        });
        let open = match written {
            Ok(open) => open,
            Err(e) => {
                tracing::error!(
                    "cannot record {} metaevents ({e}); they fire at the next evaluation",
                    fires.len()
                );
                return;
            }
        };
        let mut open = open.into_iter();
        let mut engine = lock(&self.triggers.engine);
        for (key, row) in &deferred {
            if let Some(st) = engine
                .rules
                .get_mut(&row.rule)
                .and_then(|e| e.states.get_mut(key))
            {
                st.deferred = true;
            }
        }
        for mut fire in fires {
            if let Some((_, reservation)) = fire.event.take() {
                if let Some(Some(ev)) = open.next() {
                    self.events.keep(reservation, ev);
                }
            }
            let Some(entry) = engine
                .rules
                .get_mut(&fire.want.rule)
                .filter(|e| e.generation == fire.want.generation)
            else {
                continue;
            };
            let st = entry
                .states
                .entry(fire.want.key.clone())
                .or_insert_with(|| LabelState::new(now));
            match fire.want.next {
                Next::Fire => {
                    st.enter(State::Firing, now);
                    st.chain = Arc::from(fire.row.chain.clone());
                    st.suppressed = if fire.row.fired {
                        None
                    } else {
                        fire.row.detail.clone()
                    };
                    if fire.row.fired {
                        st.last_fired_ms = Some(now);
                        self.triggers.metrics.fired.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(metaevent = %fire.want.rule, labels = %fire.row.labels, target = %entry.rule.target, "metaevent firing");
                    } else {
                        tracing::warn!(metaevent = %fire.want.rule, "metaevent not fired: {}", fire.row.detail.as_deref().unwrap_or(""));
                    }
                }
                _ => {
                    st.enter(State::Ok, now);
                    if fire.row.fired {
                        self.triggers
                            .metrics
                            .resolved
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(metaevent = %fire.want.rule, "metaevent resolved");
                    }
                }
            }
        }
    }

    /// `PUT /metaevents/{name}`: checks, stores durably, then evaluates.
    pub fn put_metaevent(&self, name: &str, body: &Value) -> Result<Value, ApiError> {
        let rule = Rule::parse(name, body, |f| self.current(f).is_ok())?;
        let _one = lock(&self.triggers.writes);
        {
            let engine = lock(&self.triggers.engine);
            if engine.rules.len() >= MAX_RULES && !engine.rules.contains_key(name) {
                return Err(ApiError::new(
                    409,
                    "limit",
                    format!("emberd holds {MAX_RULES} rules, its limit: delete some first"),
                ));
            }
        }
        let spec = rule.to_json();
        let stored = spec.to_string();
        let key = name.to_string();
        let now = journal::now_ms();
        self.events
            .journal
            .write_blocking(true, move |conn| {
                journal::put_metaevent_tx(conn, &key, &stored, now)
            })
            .map_err(crate::events::store_error)?;
        lock(&self.triggers.engine).put(rule);
        let mut out = spec;
        out["name"] = json!(name);
        Ok(out)
    }

    /// `DELETE /metaevents/{name}`.
    pub fn delete_metaevent(&self, name: &str) -> Result<(), ApiError> {
        let _one = lock(&self.triggers.writes);
        if !lock(&self.triggers.engine).rules.contains_key(name) {
            return Err(no_rule(name));
        }
        let key = name.to_string();
        self.events
            .journal
            .write_blocking(true, move |conn| journal::delete_metaevent_tx(conn, &key))
            .map_err(crate::events::store_error)?;
        lock(&self.triggers.engine).rules.remove(name);
        Ok(())
    }

    /// `GET /metaevents/{name}` (or a summary of it for the list).
    pub fn metaevent(&self, name: &str, detail: bool) -> Result<Value, ApiError> {
        let engine = lock(&self.triggers.engine);
        let entry = engine.rules.get(name).ok_or_else(|| no_rule(name))?;
        Ok(describe(entry, detail))
    }

    /// `GET /metaevents`.
    pub fn metaevents(&self) -> Value {
        let engine = lock(&self.triggers.engine);
        Value::Array(engine.rules.values().map(|e| describe(e, false)).collect())
    }
}

/// The metadata sampler and rule evaluator, four times a second, until
/// emberd drains; it trims the rules' history every minute. Call once, on
/// the runtime.
pub fn start(agent: Arc<Agent>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tick.tick().await;
            if agent.draining.load(Ordering::Relaxed) {
                return;
            }
            let a = agent.clone();
            let _ = tokio::task::spawn_blocking(move || a.metadata_tick()).await;
            if n % 240 == 239 {
                agent.events.journal.write_nowait(false, trim_history);
            }
        }
    });
}

fn no_rule(name: &str) -> ApiError {
    ApiError::new(404, "not_found", format!("no metaevent named {name:?}"))
}

fn describe(entry: &Entry, detail: bool) -> Value {
    let mut out = entry.rule.to_json();
    out["name"] = json!(entry.rule.name);
    let count = |s: State| entry.states.values().filter(|st| st.state == s).count();
    out["firing"] = json!(count(State::Firing));
    out["pending"] = json!(count(State::Pending));
    if detail {
        let states: Vec<Value> = entry
            .states
            .iter()
            .map(|(key, st)| {
                json!({
                    "labels": entry.rule.labels(key),
                    "state": st.state.name(),
                    "since_ms": st.since_ms,
                    "last_value": st.last_value,
                    "last_fired_ms": st.last_fired_ms,
                    "chain": st.chain.to_vec(),
                    "suppressed": st.suppressed,
                })
            })
            .collect();
        out["states"] = json!(states);
    }
    out
}

/// Keeps each rule's history to its newest rows (housekeeping).
pub fn trim_history(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    journal::trim_history_tx(conn, HISTORY_PER_RULE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Gauges, Observation};

    fn rule(body: Value) -> Result<Rule, BadRule> {
        Rule::parse("r", &body, |f| f == "alert")
    }

    fn base() -> Value {
        json!({
            "series": "errors",
            "labels": { "function": "resize", "kind": "trap" },
            "aggregate": "sum", "window_s": 10, "op": ">", "threshold": 5,
            "target": "alert",
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut b = base();
        b[field] = value;
        b
    }

    #[test]
    fn a_rule_is_checked_field_by_field() {
        let r = rule(base()).expect("valid");
        assert_eq!(
            (r.window_s, r.op, r.threshold, r.for_s),
            (10, Op::Gt, 5.0, 0)
        );
        assert_eq!(r.label, Some(("kind".into(), "trap".into())));
        assert_eq!(
            Rule::parse("r", &r.to_json(), |_| true).unwrap(),
            r,
            "round trip"
        );
        for (body, field) in [
            (with("series", json!("nope")), "series"),
            (with("aggregate", json!("median")), "aggregate"),
            (with("window_s", json!(0)), "window_s"),
            (with("window_s", json!(3601)), "window_s"),
            (with("window_s", json!(-1)), "window_s"),
            (with("op", json!("=>")), "op"),
            (with("threshold", json!("5")), "threshold"),
            (with("target", json!("nobody")), "target"),
            (with("for_s", json!(1.5)), "for_s"),
            (with("labels", json!({ "kind": "trap" })), "labels.function"),
            (
                with("labels", json!({ "function": "f", "state": "idle" })),
                "labels.state",
            ),
            (
                with("labels", json!({ "function": "F!" })),
                "labels.function",
            ),
            (with("extra", json!(1)), "extra"),
            (with("payload", json!("x".repeat(70_000))), "payload"),
            (
                json!({ "series": "duration_ms", "labels": { "function": "f" }, "aggregate": "max", "window_s": 5, "op": ">", "threshold": 1, "target": "alert" }),
                "labels.stat",
            ),
            (
                json!({ "series": "load1", "labels": { "function": "f" }, "aggregate": "max", "window_s": 5, "op": ">", "threshold": 1, "target": "alert" }),
                "labels.function",
            ),
            (
                json!({ "series": "starts", "labels": { "function": "f", "kind": "cold" }, "aggregate": "sum", "window_s": 5, "op": ">", "threshold": 1, "target": "alert" }),
                "labels.kind",
            ),
        ] {
            let e = rule(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.field, field, "{body}: {}", e.message);
        }
        assert_eq!(
            Rule::parse("Bad Name", &base(), |_| true)
                .unwrap_err()
                .field,
            "name"
        );
    }

    fn r(for_s: u32, cooldown_s: u32) -> Rule {
        let mut r = rule(base()).unwrap();
        r.for_s = for_s;
        r.cooldown_s = cooldown_s;
        r
    }

    #[test]
    fn the_state_machine_fires_once_per_transition_into_firing() {
        let rule = r(0, 0);
        let mut st = LabelState::new(0);
        assert_eq!(st.next(false, 0, &rule), Next::Stay);
        assert_eq!(st.next(true, 0, &rule), Next::Fire);
        st.enter(State::Firing, 0);
        st.last_fired_ms = Some(0);
        assert_eq!(
            st.next(true, 1000, &rule),
            Next::Stay,
            "holding while firing fires nothing more"
        );
        assert_eq!(st.next(false, 2000, &rule), Next::Resolve);
        st.enter(State::Ok, 2000);
        assert_eq!(
            st.next(true, 3000, &rule),
            Next::Fire,
            "again after it stopped"
        );
    }

    #[test]
    fn for_s_delays_firing_and_a_shorter_hold_does_not_fire() {
        let rule = r(3, 0);
        let mut st = LabelState::new(0);
        assert_eq!(st.next(true, 0, &rule), Next::Pending);
        st.enter(State::Pending, 0);
        assert_eq!(st.next(true, 2999, &rule), Next::Stay);
        assert_eq!(st.next(false, 2999, &rule), Next::Clear);
        assert_eq!(st.next(true, 3000, &rule), Next::Fire);
        st.enter(State::Ok, 3000);
        assert_eq!(
            st.next(true, 3000, &rule),
            Next::Pending,
            "pending starts again"
        );
    }

    #[test]
    fn the_cooldown_holds_a_new_firing_in_pending_until_it_ends() {
        let rule = r(0, 60);
        let mut st = LabelState::new(0);
        st.enter(State::Firing, 0);
        st.last_fired_ms = Some(0);
        st.enter(State::Ok, 5_000);
        assert_eq!(st.next(true, 10_000, &rule), Next::Pending);
        st.enter(State::Pending, 10_000);
        assert_eq!(st.next(true, 59_999, &rule), Next::Stay);
        assert_eq!(st.next(true, 60_000, &rule), Next::Fire);
    }

    #[test]
    fn cascades_are_bounded_by_depth_and_loops() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(cascade("a", &[], 3), Cascade::Go(Arc::from(s(&["a"]))));
        assert_eq!(
            cascade("b", &s(&["a"]), 3),
            Cascade::Go(Arc::from(s(&["a", "b"])))
        );
        assert_eq!(
            cascade("c", &s(&["a", "b"]), 3),
            Cascade::Go(Arc::from(s(&["a", "b", "c"])))
        );
        assert_eq!(cascade("b", &s(&["a", "b", "c"]), 3), Cascade::Loop);
        assert_eq!(cascade("d", &s(&["a", "b", "c"]), 3), Cascade::TooDeep);
        assert_eq!(cascade("c", &s(&["a", "b"]), 2), Cascade::TooDeep);
    }

    #[test]
    fn a_star_rules_label_set_of_a_gone_function_is_forgotten_once_ok() {
        let mut engine = Engine::default();
        let mut each = rule(base()).unwrap();
        each.function = Some("*".into());
        engine.put(each);
        let mut st = LabelState::new(0);
        st.enter(State::Firing, 0);
        st.deferred = true;
        engine
            .rules
            .get_mut("r")
            .unwrap()
            .states
            .insert("gone".into(), st);
        let store = Store::new(100);
        // Not deployed any more, no data: it resolves (a want), and stays
        // until the resolve is applied.
        let (wants, _) = engine.evaluate(&store, &[], 100_000);
        assert_eq!((wants.len(), wants[0].next), (1, Next::Resolve));
        assert!(engine.rules["r"].states.contains_key("gone"));
        let st = engine
            .rules
            .get_mut("r")
            .unwrap()
            .states
            .get_mut("gone")
            .unwrap();
        st.enter(State::Ok, 100_000);
        assert!(!st.deferred, "a new episode is not deferred");
        engine.evaluate(&store, &[], 100_250);
        assert!(engine.rules["r"].states.is_empty(), "forgotten once ok");
    }

    #[test]
    fn the_engine_tracks_label_sets_of_star_rules_separately() {
        let mut engine = Engine::default();
        let mut each = rule(base()).unwrap();
        each.function = Some("*".into());
        each.threshold = 1.0;
        engine.put(each);
        let mut store = Store::new(100);
        let mut live = metadata::Live::default();
        for _ in 0..2 {
            live.observe(&Observation {
                function: "f",
                served: true,
                warm: true,
                prewarmed: false,
                error: Some("trap"),
                throttled: false,
                duration_ms: 1.0,
                chain: Arc::from(vec!["x".to_string()]),
            });
        }
        store.sample(100, &Gauges::default(), &mut live);
        let functions = vec!["f".to_string(), "g".to_string()];
        let (wants, rows) = engine.evaluate(&store, &functions, 100_000);
        assert!(rows.is_empty());
        assert_eq!(wants.len(), 1, "{wants:?}");
        assert_eq!((wants[0].key.as_str(), wants[0].next), ("f", Next::Fire));
        assert_eq!(wants[0].value, Some(2.0));
        assert_eq!(
            &*wants[0].parent,
            &["x".to_string()],
            "attributed to f's invocations"
        );
        assert!(
            !engine.rules["r"].states.contains_key("g"),
            "an ok label set of a * rule is not kept"
        );
    }
}
