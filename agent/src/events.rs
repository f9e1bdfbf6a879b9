//! Async invocations (docs/journal.md): accepted durably, delivered by a
//! dispatcher through the same router and pools as synchronous ones,
//! retried, and ended either `succeeded` or in the failure journal —
//! exactly once. Detected errors feed control actions (repair.rs) and the
//! functions' `on_error` controls.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Notify;

use crate::host::{lock, Agent, ApiError};
use crate::journal::{
    self, Accepted, AttemptEnd, Failure, Journal, NewEvent, OpenEvent, StoreError,
};

/// Deliveries running at once on the host (each holds a blocking thread).
pub const MAX_DELIVERIES: usize = 64;

/// Attempts emberd may be stopped under before the event is journaled as
/// `interrupted` (it may be what stops emberd).
pub const MAX_INTERRUPTIONS: u32 = 5;

/// A delivery that cannot start now (the store refuses writes, the version
/// is broken) is looked at again after this long.
const PAUSE_MS: i64 = 1000;

/// Host settings of async invocations and the journal (the emberd config).
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// Async events open on the host at most (more get a 429).
    pub max_queued_events: u64,
    /// Journal records kept at most (oldest purged first).
    pub journal_max_records: u64,
    /// Journal bytes kept at most (oldest purged first).
    pub journal_max_bytes: u64,
    /// Results of succeeded events kept at most, bytes (oldest dropped).
    pub results_max_bytes: u64,
    /// Bulk replays are queued at most this many per second.
    pub replay_rate_per_s: u32,
    /// Crashes of one version within `crash_window_s` that rebuild its
    /// template.
    pub crash_threshold: u32,
    /// See `crash_threshold`, s.
    pub crash_window_s: u64,
    /// Error records sent to one function's `on_error` control per second
    /// at most (the rest are counted, not sent).
    pub on_error_rate_per_s: u32,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            max_queued_events: 100_000,
            journal_max_records: 100_000,
            journal_max_bytes: 1 << 30,
            results_max_bytes: 256 << 20,
            replay_rate_per_s: 100,
            crash_threshold: 3,
            crash_window_s: 60,
            on_error_rate_per_s: 10,
        }
    }
}

/// The retry policy of one function (its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first retry's backoff ceiling, ms.
    pub base_ms: u64,
    /// The event's maximum age, ms.
    pub max_age_ms: i64,
}

/// What follows a failed (counted) attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Another attempt at this time, ms.
    RetryAt(i64),
    /// No retries left.
    Exhausted,
    /// The next attempt would come after the event's maximum age.
    Expired,
}

/// Backoff ceilings stop doubling here (an hour).
const MAX_BACKOFF_MS: u64 = 3_600_000;

impl RetryPolicy {
    /// After `counted` failed attempts (interrupted ones not counted) of an
    /// event accepted at `accepted_ms`, at `now`: the next step. The delay
    /// is "full jitter": uniform in [0, base·2^(counted-1)], the ceiling
    /// capped at an hour; `random` is a uniform draw.
    pub fn next(&self, counted: u32, accepted_ms: i64, now: i64, random: u64) -> NextStep {
        if counted > self.max_retries {
            return NextStep::Exhausted;
        }
        let ceiling = self
            .base_ms
            .saturating_mul(1u64 << counted.saturating_sub(1).min(40))
            .min(MAX_BACKOFF_MS);
        let delay = random % (ceiling + 1);
        let at = now + delay as i64;
        if at > accepted_ms + self.max_age_ms {
            NextStep::Expired
        } else {
            NextStep::RetryAt(at)
        }
    }
}

/// How an attempt ended, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The function answered; its result.
    Succeeded(Vec<u8>),
    /// A failure worth retrying: its kind and message.
    Retryable(String, String),
    /// A failure no retry cures (an event the function cannot take).
    Permanent(String, String),
    /// emberd stopped under it (not counted), or the version cannot run
    /// now: another attempt later.
    Interrupted(String),
    /// The function is gone.
    Deleted(String),
}

/// Classifies an API error of an invocation attempt.
pub fn classify_error(e: &ApiError) -> Outcome {
    match (e.status, e.kind) {
        (404, _) => Outcome::Deleted(e.message.clone()),
        (413, _) | (400, _) => Outcome::Permanent("invalid_event".into(), e.message.clone()),
        (503, _) => Outcome::Interrupted(e.message.clone()),
        (429, _) => Outcome::Retryable("no_capacity".into(), e.message.clone()),
        _ => Outcome::Retryable("host_error".into(), e.message.clone()),
    }
}

/// Classifies ember-vmm's answer to an attempt (its body moves into a
/// success's result); also the function's duration, µs, and the end of its
/// stderr (at most 4 KiB).
pub fn classify_response(
    response: ember_vmm::api::client::ApiResponse,
) -> (Outcome, Option<u64>, Option<String>) {
    let duration_us = response
        .header("x-ember-duration-us")
        .and_then(|d| d.parse().ok());
    let log_tail = response.header("x-ember-log").map(|log| {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(log)
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut cut = text.len().saturating_sub(4096);
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text[cut..].to_string()
    });
    let outcome = match failure_of(&response) {
        None => Outcome::Succeeded(response.body),
        Some((kind, message)) => Outcome::Retryable(kind, message),
    };
    (outcome, duration_us, log_tail)
}

/// How ember-vmm's answer to an invocation failed, if it did: a function
/// error (its kind and message), or `host_error` for an answer other
/// than 200.
pub fn failure_of(response: &ember_vmm::api::client::ApiResponse) -> Option<(String, String)> {
    match (response.status, response.header("x-ember-function-error")) {
        (200, None) => None,
        (200, Some(kind)) => {
            let message = serde_json::from_slice::<serde_json::Value>(&response.body)
                .ok()
                .and_then(|b| b["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&response.body).into_owned());
            Some((kind.to_string(), message))
        }
        (status, _) => Some((
            "host_error".into(),
            format!(
                "the instance answered {status}: {}",
                response.fault_message().unwrap_or_default()
            ),
        )),
    }
}

/// Whether `kind` is a function's own error (what its `on_error` control
/// is told of), not a host-side failure.
pub fn is_function_error(kind: &str) -> bool {
    matches!(
        kind,
        "handler_error" | "trap" | "timeout" | "out_of_memory" | "crash"
    )
}

/// Per-function queue: events waiting (by seq when due, by due time when
/// not), and deliveries running.
#[derive(Default)]
struct FnQueue {
    ready: BTreeMap<i64, OpenEvent>,
    waiting: BTreeMap<(i64, i64), OpenEvent>,
    running: usize,
    /// Open events (waiting, running, and accepts being written).
    open: u64,
}

impl FnQueue {
    fn push(&mut self, ev: OpenEvent, now: i64) {
        if ev.due_ms <= now {
            self.ready.insert(ev.seq, ev);
        } else {
            self.waiting.insert((ev.due_ms, ev.seq), ev);
        }
    }

    fn promote(&mut self, now: i64) {
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ev = entry.remove();
            self.ready.insert(ev.seq, ev);
        }
    }
}

#[derive(Default)]
struct Queues {
    per: HashMap<String, FnQueue>,
    open: u64,
    running: usize,
    /// The ids of the open events (queued, retrying, running).
    ids: std::collections::HashSet<String>,
}

/// Counters of async invocations for /metrics.
#[derive(Default)]
pub struct EventMetrics {
    /// Events accepted (202).
    pub accepted: AtomicU64,
    /// Retries scheduled.
    pub retries: AtomicU64,
    /// Events succeeded.
    pub succeeded: AtomicU64,
    /// Events failed (journaled).
    pub failed: AtomicU64,
    /// Control actions taken.
    pub control_actions: AtomicU64,
    /// Journal records purged by retention.
    pub purged_records: AtomicU64,
    /// Error records not sent to an `on_error` control (over its rate).
    pub on_error_limited: AtomicU64,
}

/// The async side of the agent.
pub struct Events {
    /// The store.
    pub journal: Journal,
    /// Host settings.
    pub settings: EventSettings,
    queues: Mutex<Queues>,
    /// Wakes the dispatcher.
    pub wake: Notify,
    /// Signalled whenever an event becomes final.
    pub finished: Notify,
    /// Counters.
    pub metrics: EventMetrics,
    on_error_tokens: Mutex<HashMap<String, TokenBucket>>,
    crashes: Mutex<HashMap<(String, u64), VecDeque<Instant>>>,
}

/// A reservation of queue room for one accept (released unless the event
/// was accepted).
pub struct Reservation<'a> {
    events: &'a Events,
    function: String,
    kept: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            let mut q = lock(&self.events.queues);
            q.open = q.open.saturating_sub(1);
            if let Some(f) = q.per.get_mut(&self.function) {
                f.open = f.open.saturating_sub(1);
            }
        }
    }
}

impl Events {
    /// Opens the store and recovers: attempts that were running when
    /// emberd stopped are marked interrupted; every open event is queued.
    pub fn open(journal: Journal, settings: EventSettings) -> Result<Events, String> {
        let now = journal::now_ms();
        let open = journal
            .write_blocking(false, move |conn| journal::recover_tx(conn, now))
            .map_err(|e| format!("cannot recover {}: {e}", journal.path().display()))?;
        let mut queues = Queues::default();
        for ev in open {
            queues.ids.insert(ev.id.clone());
            let f = queues.per.entry(ev.function.clone()).or_default();
            f.open += 1;
            queues.open += 1;
            f.push(ev, now);
        }
        if queues.open > 0 {
            tracing::info!(
                "{} async events to deliver from before the restart",
                queues.open
            );
        }
        Ok(Events {
            journal,
            settings,
            queues: Mutex::new(queues),
            wake: Notify::new(),
            finished: Notify::new(),
            metrics: EventMetrics::default(),
            on_error_tokens: Mutex::new(HashMap::new()),
            crashes: Mutex::new(HashMap::new()),
        })
    }

    /// Reserves room for one event of `function` (limit `max_queued`), or
    /// refuses with a 429.
    pub fn reserve(&self, function: &str, max_queued: u64) -> Result<Reservation<'_>, ApiError> {
        let mut q = lock(&self.queues);
        let host_max = self.settings.max_queued_events;
        if q.open >= host_max {
            return Err(ApiError::too_many(format!(
                "the host holds {host_max} async events, its limit (max_queued_events); retry"
            )));
        }
        let f = q.per.entry(function.to_string()).or_default();
        if f.open >= max_queued {
            return Err(ApiError::too_many(format!(
                "{function} holds {max_queued} async events, its limit (max_queued); retry"
            )));
        }
        f.open += 1;
        q.open += 1;
        Ok(Reservation {
            events: self,
            function: function.to_string(),
            kept: false,
        })
    }

    /// Accepts `ev` durably: answers once it is on disk. With an
    /// idempotency key seen before, the earlier id and no new event.
    pub async fn accept(
        &self,
        reservation: Reservation<'_>,
        ev: NewEvent,
    ) -> Result<Accepted, ApiError> {
        let now = journal::now_ms();
        let new = ev.clone();
        let accepted = self
            .journal
            .write(true, move |conn| journal::accept_tx(conn, &new, now))
            .await
            .map_err(store_error)?;
        if let Accepted::New(seq) = accepted {
            self.keep(reservation, ev.open(seq));
        }
        Ok(accepted)
    }

    /// [`Events::accept`] for a blocking thread, past the limits (events
    /// emberd makes itself: `on_error` records).
    pub fn accept_internal(&self, ev: NewEvent) -> Result<(), StoreError> {
        let now = journal::now_ms();
        let new = ev.clone();
        if let Accepted::New(seq) = self
            .journal
            .write_blocking(true, move |conn| journal::accept_tx(conn, &new, now))?
        {
            self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
            self.enqueue(ev.open(seq), true);
        }
        Ok(())
    }

    /// Queues an accepted event; `count` when its room was not reserved.
    pub fn enqueue(&self, ev: OpenEvent, count: bool) {
        let now = journal::now_ms();
        {
            let mut q = lock(&self.queues);
            if count {
                q.open += 1;
            }
            q.ids.insert(ev.id.clone());
            let f = q.per.entry(ev.function.clone()).or_default();
            if count {
                f.open += 1;
            }
            f.push(ev, now);
        }
        self.wake.notify_one();
    }

    /// Queues an event accepted under `reservation`.
    pub fn keep(&self, mut reservation: Reservation<'_>, ev: OpenEvent) {
        reservation.kept = true;
        self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        self.enqueue(ev, false);
    }

    /// Room left on the host.
    pub fn room(&self) -> u64 {
        self.settings
            .max_queued_events
            .saturating_sub(lock(&self.queues).open)
    }

    /// Queue depth and oldest open event's acceptance (ms) per function.
    pub fn depths(&self) -> Vec<(String, u64, Option<i64>)> {
        let q = lock(&self.queues);
        let mut out: Vec<(String, u64, Option<i64>)> = q
            .per
            .iter()
            .map(|(name, f)| {
                let oldest = f
                    .ready
                    .values()
                    .chain(f.waiting.values())
                    .map(|e| e.accepted_ms)
                    .min();
                (name.clone(), f.open, oldest)
            })
            .collect();
        out.sort();
        out
    }

    /// Takes the events due now, within each function's concurrency and
    /// the host's delivery limit. Returns them and when to look again.
    fn take_due(&self, now: i64, concurrency: impl Fn(&str) -> usize) -> (Vec<OpenEvent>, i64) {
        let mut q = lock(&self.queues);
        let mut due = Vec::new();
        let mut next = now + 1000;
        let mut running = q.running;
        for (name, f) in q.per.iter_mut() {
            f.promote(now);
            if let Some(((at, _), _)) = f.waiting.first_key_value() {
                next = next.min(*at);
            }
            if f.ready.is_empty() {
                continue;
            }
            let max = concurrency(name);
            while f.running < max && running < MAX_DELIVERIES {
                let Some((_, ev)) = f.ready.pop_first() else {
                    break;
                };
                f.running += 1;
                running += 1;
                due.push(ev);
            }
        }
        q.running = running;
        (due, next)
    }

    /// Whether event `id` is open (not final) — from memory, no read.
    pub fn is_open(&self, id: &str) -> bool {
        lock(&self.queues).ids.contains(id)
    }

    /// A delivery ended: the event goes back (`again`) or leaves.
    fn delivered(&self, function: &str, id: &str, again: Option<OpenEvent>) {
        let now = journal::now_ms();
        {
            let mut q = lock(&self.queues);
            q.running = q.running.saturating_sub(1);
            let gone = again.is_none();
            if gone {
                q.open = q.open.saturating_sub(1);
                q.ids.remove(id);
            }
            let f = q.per.entry(function.to_string()).or_default();
            f.running = f.running.saturating_sub(1);
            match again {
                Some(ev) => f.push(ev, now),
                None => f.open = f.open.saturating_sub(1),
            }
            if f.open == 0 && f.running == 0 {
                q.per.remove(function);
            }
        }
        self.wake.notify_one();
        // After the id left the open set: a waiter woken here reads the
        // final state (written before the delivery ended).
        self.finished.notify_waiters();
    }

    /// Whether an error record for `function`'s control may go now (token
    /// bucket of `on_error_rate_per_s`).
    fn on_error_allowed(&self, function: &str) -> bool {
        let rate = f64::from(self.settings.on_error_rate_per_s.max(1));
        lock(&self.on_error_tokens)
            .entry(function.to_string())
            .or_insert_with(|| TokenBucket::full(rate))
            .take(rate)
    }

    /// Notes a crash of `function` v`version`; true when it makes
    /// `crash_threshold` within the window (the window starts again).
    pub fn crash_loop(&self, function: &str, version: u64) -> bool {
        let window = Duration::from_secs(self.settings.crash_window_s);
        let now = Instant::now();
        let mut crashes = lock(&self.crashes);
        let seen = crashes.entry((function.to_string(), version)).or_default();
        seen.push_back(now);
        while seen
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            seen.pop_front();
        }
        if seen.len() >= self.settings.crash_threshold.max(1) as usize {
            seen.clear();
            true
        } else {
            false
        }
    }
}

/// A token bucket: `rate` tokens a second, `rate` at most.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens.
    pub fn full(rate: f64) -> TokenBucket {
        TokenBucket {
            tokens: rate,
            at: Instant::now(),
        }
    }

    /// Takes a token if there is one (refilled at `rate` a second).
    pub fn take(&mut self, rate: f64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A store error as the API reports it.
pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(_) => ApiError::new(503, "journal_unavailable", e.to_string()),
        StoreError::KeyConflict(_) => ApiError::new(409, "idempotency_conflict", e.to_string()),
        StoreError::NotFound(m) => ApiError::new(404, "not_found", m),
        StoreError::Conflict(m) => ApiError::new(409, "conflict", m),
        StoreError::Other(_) => ApiError::new(500, "internal", e.to_string()),
    }
}

/// A detected error or control action, as a function's `on_error` control
/// receives it.
#[derive(Debug, Clone)]
pub struct ErrorReport {
    /// `error` or `control_action`.
    pub kind: &'static str,
    /// The function.
    pub function: String,
    /// Its version.
    pub version: Option<u64>,
    /// The invocation, if one.
    pub invocation_id: Option<String>,
    /// The error kind.
    pub error_kind: String,
    /// Its message.
    pub message: String,
    /// The journal record, if one.
    pub journal_id: Option<String>,
    /// What was detected and done (control actions).
    pub detail: Option<serde_json::Value>,
}

impl Agent {
    /// Sends `report` to its function's `on_error` control, if it has one
    /// and its rate allows (blocking: call on a blocking thread).
    pub fn report_error(&self, report: ErrorReport) {
        let Ok(v) = self.current(&report.function) else {
            return;
        };
        let Some(control) = v.config.on_error.clone() else {
            return;
        };
        if !self.events.on_error_allowed(&report.function) {
            self.events
                .metrics
                .on_error_limited
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = journal::now_ms();
        let body = json!({
            "kind": report.kind,
            "function": report.function,
            "version": report.version,
            "invocation_id": report.invocation_id,
            "error": { "kind": report.error_kind, "message": report.message },
            "journal_id": report.journal_id,
            "detail": report.detail,
            "time_ms": now,
        });
        let ev = NewEvent {
            id: self.new_invocation_id(),
            function: control.clone(),
            origin: "on_error",
            source_id: report.invocation_id.clone().or(report.journal_id.clone()),
            affinity: None,
            idempotency_key: None,
            event: body.to_string().into_bytes(),
            accepted_ms: now,
            due_ms: now,
        };
        if let Err(e) = self.events.accept_internal(ev) {
            tracing::error!(
                function = report.function,
                "cannot queue the error record for its on_error function {control}: {e}"
            );
        }
    }

    /// Delivers one attempt of `ev` (blocking). Returns the event if it
    /// stays open.
    fn deliver(&self, mut ev: OpenEvent) -> Option<OpenEvent> {
        let now = journal::now_ms();
        let span = tracing::info_span!(
            "deliver",
            function = %ev.function,
            invocation = %ev.id,
            instance = tracing::field::Empty,
            version = tracing::field::Empty,
        );
        let _in = span.enter();
        let v = match self.current(&ev.function) {
            Ok(v) => v,
            Err(_) => {
                let message = format!("function {} was deleted", ev.function);
                return self.fail(
                    ev,
                    None,
                    "function_deleted",
                    "function_deleted",
                    message,
                    None,
                );
            }
        };
        let policy = RetryPolicy {
            max_retries: v.config.max_retries,
            base_ms: v.config.retry_base_ms,
            max_age_ms: v.config.max_event_age_s as i64 * 1000,
        };
        if now > ev.accepted_ms + policy.max_age_ms {
            let message = format!(
                "the event is older than max_event_age_s ({} s) after {} attempts",
                v.config.max_event_age_s, ev.attempts
            );
            return self.fail(ev, None, "expired", "expired", message, Some(v.version));
        }
        if self.is_broken(&v) {
            // Waits for a deploy (or its age).
            ev.due_ms = now + PAUSE_MS;
            return Some(ev);
        }
        let n = ev.attempts + 1;
        let (id, version) = (ev.id.clone(), v.version);
        let start = move |conn: &rusqlite::Connection| {
            journal::attempt_start_tx(conn, &id, n, now, version)
        };
        if self.events.journal.failing() {
            // The state dir refused the last write: this one is waited for,
            // and the attempt runs only once it is recorded.
            if let Err(e) = self.events.journal.write_blocking(false, start) {
                tracing::warn!("cannot record an attempt ({e}); delivery paused");
                ev.due_ms = now + PAUSE_MS;
                return Some(ev);
            }
        } else {
            // Not waited for: the attempt's end, written after it in the
            // same order, records the attempt whole if this write was lost;
            // a crash before either redelivers the event.
            self.events.journal.write_nowait(false, start);
        }
        ev.attempts = n;
        let event = match self
            .events
            .journal
            .read(|conn| journal::event_bytes(conn, &ev.id))
        {
            Ok(Some(event)) => event,
            Ok(None) => {
                tracing::error!("event {} vanished from the store", ev.id);
                return None;
            }
            Err(e) => {
                tracing::error!("cannot read event {}: {e}; delivery paused", ev.id);
                ev.due_ms = now + PAUSE_MS;
                return Some(ev);
            }
        };
        let chain = if ev.origin == "metaevent" {
            metaevent_chain(&event)
        } else {
            std::sync::Arc::from(Vec::new())
        };
        let started = Instant::now();
        let served = self.invoke(&ev.function, &event, None, ev.affinity.as_deref());
        let ms = started.elapsed().as_secs_f64() * 1e3;
        self.observe(&ev.function, &served, ms, chain, true);
        let mut end = AttemptEnd {
            started_ms: now,
            outcome: "failed",
            version: Some(v.version),
            ..Default::default()
        };
        let outcome = match served {
            Ok(served) => {
                end.version = Some(served.version);
                end.instance = Some(served.instance.clone());
                end.start = Some(served.start.name());
                let (outcome, duration_us, log_tail) = classify_response(served.response);
                end.duration_us = duration_us;
                end.log_tail = log_tail;
                outcome
            }
            Err(e) => classify_error(&e),
        };
        let now = journal::now_ms();
        let id = ev.id.clone();
        match outcome {
            Outcome::Succeeded(result) => {
                end.outcome = "succeeded";
                let expires = now + v.config.result_retention_s as i64 * 1000;
                let written = self.events.journal.write_blocking(false, move |conn| {
                    journal::attempt_end_tx(conn, &id, n, &end, now)?;
                    journal::succeeded_tx(conn, &id, &result, now, expires)
                });
                match written {
                    Ok(()) => {
                        self.events
                            .metrics
                            .succeeded
                            .fetch_add(1, Ordering::Relaxed);
                        None
                    }
                    Err(e) => {
                        tracing::error!(
                            "cannot record a success ({e}); it will be delivered again"
                        );
                        ev.due_ms = now + PAUSE_MS;
                        Some(ev)
                    }
                }
            }
            Outcome::Interrupted(message) => {
                end.outcome = "interrupted";
                end.error_kind = Some("interrupted".into());
                end.error_message = Some(message.clone());
                ev.interrupted += 1;
                if ev.interrupted > MAX_INTERRUPTIONS {
                    let message = format!(
                        "{} attempts were interrupted (emberd stopped or the version could not run under them): {message}",
                        ev.interrupted
                    );
                    return self.fail(
                        ev,
                        Some(end),
                        "interrupted",
                        "interrupted",
                        message,
                        Some(v.version),
                    );
                }
                let error = ("interrupted".to_string(), message);
                Some(self.retry(ev, end, now + PAUSE_MS, true, error))
            }
            Outcome::Deleted(message) => self.fail(
                ev,
                Some(end),
                "function_deleted",
                "function_deleted",
                message,
                Some(v.version),
            ),
            Outcome::Permanent(kind, message) => {
                end.error_kind = Some(kind.clone());
                end.error_message = Some(message.clone());
                self.fail(
                    ev,
                    Some(end),
                    "invalid_event",
                    &kind,
                    message,
                    Some(v.version),
                )
            }
            Outcome::Retryable(kind, message) => {
                end.error_kind = Some(kind.clone());
                end.error_message = Some(message.clone());
                if is_function_error(&kind) {
                    self.report_error(ErrorReport {
                        kind: "error",
                        function: ev.function.clone(),
                        version: end.version,
                        invocation_id: Some(ev.id.clone()),
                        error_kind: kind.clone(),
                        message: message.clone(),
                        journal_id: None,
                        detail: None,
                    });
                }
                let counted = ev.attempts.saturating_sub(ev.interrupted);
                match policy.next(counted, ev.accepted_ms, now, crate::functions::random_u64()) {
                    NextStep::RetryAt(due) => {
                        self.events.metrics.retries.fetch_add(1, Ordering::Relaxed);
                        lock(&self.triggers.live).retried(&ev.function);
                        tracing::info!(
                            kind,
                            attempt = n,
                            "attempt failed; retrying in {} ms",
                            due - now
                        );
                        Some(self.retry(ev, end, due, false, (kind, message)))
                    }
                    NextStep::Exhausted => {
                        let message = format!("{n} attempts failed; the last: {kind}: {message}");
                        self.fail(
                            ev,
                            Some(end),
                            "retries_exhausted",
                            &kind,
                            message,
                            Some(v.version),
                        )
                    }
                    NextStep::Expired => {
                        let message = format!(
                            "the next retry would come after max_event_age_s ({} s); the last attempt: {kind}: {message}",
                            v.config.max_event_age_s
                        );
                        self.fail(ev, Some(end), "expired", &kind, message, Some(v.version))
                    }
                }
            }
        }
    }

    /// Records attempt `ev.attempts`'s `end` and `ev`'s next attempt at
    /// `due` (`interrupted`: not counted); returns `ev`, to queue again.
    /// A write that fails is logged: the event stays queued in memory, and
    /// the store still holds it open.
    fn retry(
        &self,
        mut ev: OpenEvent,
        end: AttemptEnd,
        due: i64,
        interrupted: bool,
        error: (String, String),
    ) -> OpenEvent {
        let now = journal::now_ms();
        let (id, n) = (ev.id.clone(), ev.attempts);
        let written = self.events.journal.write_blocking(false, move |conn| {
            journal::attempt_end_tx(conn, &id, n, &end, now)?;
            journal::retry_tx(conn, &id, due, interrupted, Some((&error.0, &error.1)))
        });
        if let Err(e) = written {
            tracing::error!("cannot record a failed attempt: {e}");
        }
        ev.due_ms = due;
        ev
    }

    /// Ends `ev` in the journal (with its destination's event), durably.
    /// A write that fails leaves it open, to try again.
    fn fail(
        &self,
        mut ev: OpenEvent,
        end: Option<AttemptEnd>,
        condition: &'static str,
        error_kind: &str,
        message: String,
        version: Option<u64>,
    ) -> Option<OpenEvent> {
        let now = journal::now_ms();
        let config = self.current(&ev.function).ok().map(|v| v.config.clone());
        // Destinations' own failures go no further.
        let destination = config
            .as_ref()
            .and_then(|c| c.on_failure.clone())
            .filter(|_| ev.origin != "destination" && ev.origin != "on_error")
            .map(|target| (target, self.new_invocation_id()));
        let retention = config.map_or(3600, |c| c.result_retention_s) as i64 * 1000;
        let failure = Failure {
            condition,
            error_kind: error_kind.to_string(),
            message: message.clone(),
            version,
            record_id: self.new_invocation_id(),
            destination,
            expires_ms: now + retention,
        };
        let (id, n) = (ev.id.clone(), ev.attempts);
        let written = failure.clone();
        let result = self.events.journal.write_blocking(true, move |conn| {
            if let Some(end) = &end {
                journal::attempt_end_tx(conn, &id, n, end, now)?;
            }
            journal::failed_tx(conn, &id, &written, now)
        });
        match result {
            Ok(destination) => {
                self.events.metrics.failed.fetch_add(1, Ordering::Relaxed);
                lock(&self.triggers.live).journaled(&ev.function, condition);
                tracing::warn!(
                    condition,
                    journal = %failure.record_id,
                    "async event failed: {message}"
                );
                if let Some(dest) = destination {
                    self.events.enqueue(dest, true);
                }
                None
            }
            Err(e) => {
                tracing::error!("cannot journal a failed event ({e}); trying again");
                ev.due_ms = now + PAUSE_MS;
                Some(ev)
            }
        }
    }
}

/// The metaevent chain a metaevent's event carries (its `chain`; emberd
/// wrote it, but it is read as any bytes are: what is not a list of
/// strings is no chain).
fn metaevent_chain(event: &[u8]) -> crate::metadata::Chain {
    let chain: Vec<String> = serde_json::from_slice::<serde_json::Value>(event)
        .ok()
        .and_then(|v| {
            v["chain"].as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default();
    std::sync::Arc::from(chain)
}

/// The dispatcher: starts deliveries as events come due, until emberd
/// drains. Call once, on the runtime.
pub fn start(agent: Arc<Agent>) {
    let agent_hk = agent.clone();
    tokio::spawn(async move {
        loop {
            if agent.draining.load(Ordering::Relaxed) {
                return;
            }
            let now = journal::now_ms();
            let (due, next) = agent.events.take_due(now, |name| {
                agent
                    .current(name)
                    .map_or(1, |v| v.config.max_concurrency as usize)
            });
            for ev in due {
                let agent = agent.clone();
                // Straight onto a blocking thread, which gives the event
                // back to the queue when the attempt is over.
                tokio::task::spawn_blocking(move || {
                    let (function, id) = (ev.function.clone(), ev.id.clone());
                    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        agent.deliver(ev)
                    }))
                    .unwrap_or_else(|_| {
                        // Left open in the store: delivered after a restart.
                        tracing::error!("a delivery of {function} panicked");
                        None
                    });
                    agent.events.delivered(&function, &id, again);
                });
            }
            let wait = Duration::from_millis((next - now).clamp(1, 1000) as u64);
            tokio::select! {
                _ = agent.events.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
    // Housekeeping: results, final events, keys and journal records past
    // their retention, every 10 s.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            if agent_hk.draining.load(Ordering::Relaxed) {
                return;
            }
            let s = &agent_hk.events.settings;
            let keep = journal::Retention {
                max_records: s.journal_max_records,
                max_bytes: s.journal_max_bytes,
                results_max_bytes: s.results_max_bytes,
            };
            let now = journal::now_ms();
            match agent_hk
                .events
                .journal
                .write(false, move |conn| journal::housekeeping_tx(conn, now, keep))
                .await
            {
                Ok(purged) => {
                    agent_hk
                        .events
                        .metrics
                        .purged_records
                        .fetch_add(purged.records, Ordering::Relaxed);
                    if purged.records > 0 {
                        tracing::warn!("journal retention purged {} records", purged.records);
                    }
                }
                Err(e) => tracing::warn!("journal housekeeping failed: {e}"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::tests::TempDb;

    const POLICY: RetryPolicy = RetryPolicy {
        max_retries: 2,
        base_ms: 1000,
        max_age_ms: 21_600_000,
    };

    #[test]
    fn retries_back_off_with_full_jitter_until_exhausted() {
        // First retry: within [0, 1000] ms; second: [0, 2000].
        assert_eq!(POLICY.next(1, 0, 0, 0), NextStep::RetryAt(0));
        assert_eq!(POLICY.next(1, 0, 0, 1000), NextStep::RetryAt(1000));
        assert_eq!(POLICY.next(1, 0, 0, 1001), NextStep::RetryAt(0));
        assert_eq!(POLICY.next(2, 0, 0, 2000), NextStep::RetryAt(2000));
        assert_eq!(POLICY.next(3, 0, 0, 5), NextStep::Exhausted);
        let none = RetryPolicy {
            max_retries: 0,
            ..POLICY
        };
        assert_eq!(none.next(1, 0, 0, 5), NextStep::Exhausted);
    }

    #[test]
    fn backoff_ceilings_stop_at_an_hour() {
        let many = RetryPolicy {
            max_retries: 10,
            base_ms: 3_600_000,
            ..POLICY
        };
        assert_eq!(
            many.next(10, 0, 0, u64::MAX - 1),
            NextStep::RetryAt(((u64::MAX - 1) % 3_600_001) as i64)
        );
        for counted in 1..=10 {
            let NextStep::RetryAt(at) = many.next(counted, 0, 0, u64::MAX) else {
                panic!()
            };
            assert!(at <= 3_600_000);
        }
    }

    #[test]
    fn a_retry_past_the_maximum_age_expires_the_event() {
        let short = RetryPolicy {
            max_age_ms: 60_000,
            base_ms: 3_600_000,
            ..POLICY
        };
        assert_eq!(short.next(1, 0, 10_000, 50_000), NextStep::RetryAt(60_000));
        assert_eq!(short.next(1, 0, 10_000, 50_001), NextStep::Expired);
    }

    #[test]
    fn errors_are_classified_for_retry() {
        let e = |status, kind| ApiError::new(status, kind, "m");
        assert!(matches!(
            classify_error(&e(404, "not_found")),
            Outcome::Deleted(_)
        ));
        assert!(matches!(
            classify_error(&e(413, "payload_too_large")),
            Outcome::Permanent(..)
        ));
        assert!(matches!(
            classify_error(&e(503, "shutting_down")),
            Outcome::Interrupted(_)
        ));
        assert!(matches!(
            classify_error(&e(503, "broken")),
            Outcome::Interrupted(_)
        ));
        assert_eq!(
            classify_error(&e(429, "too_many_requests")),
            Outcome::Retryable("no_capacity".into(), "m".into())
        );
        assert_eq!(
            classify_error(&e(500, "internal")),
            Outcome::Retryable("host_error".into(), "m".into())
        );
    }

    fn answer(
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> ember_vmm::api::client::ApiResponse {
        ember_vmm::api::client::ApiResponse {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn an_attempts_answer_is_classified_with_its_duration_and_log_tail() {
        use base64::Engine;
        let log = base64::engine::general_purpose::STANDARD.encode("é".repeat(3000));
        let ok = answer(
            200,
            &[("x-ember-duration-us", "42"), ("x-ember-log", &log)],
            b"result",
        );
        let (outcome, duration, tail) = classify_response(ok);
        assert_eq!(outcome, Outcome::Succeeded(b"result".to_vec()));
        assert_eq!(duration, Some(42));
        let tail = tail.unwrap();
        assert!(
            tail.len() <= 4096 && tail.chars().all(|c| c == 'é'),
            "cut on a char boundary"
        );
        let trap = answer(
            200,
            &[("x-ember-function-error", "trap")],
            br#"{"error": {"kind": "trap", "message": "unreachable"}}"#,
        );
        assert_eq!(
            classify_response(trap).0,
            Outcome::Retryable("trap".into(), "unreachable".into())
        );
        let refused = answer(400, &[], br#"{"fault_message": "bad"}"#);
        assert!(matches!(
            classify_response(refused).0,
            Outcome::Retryable(kind, message) if kind == "host_error" && message.contains("400")
        ));
    }

    fn open(seq: i64, due_ms: i64) -> OpenEvent {
        OpenEvent {
            seq,
            id: format!("e{seq}"),
            function: "f".into(),
            origin: "invoke".into(),
            affinity: None,
            accepted_ms: 0,
            due_ms,
            attempts: 0,
            interrupted: 0,
        }
    }

    fn events(settings: EventSettings) -> (Events, TempDb) {
        let db = TempDb::new("events");
        let journal = Journal::open(&db).unwrap();
        (Events::open(journal, settings).unwrap(), db)
    }

    #[test]
    fn reservations_hold_the_function_and_host_limits_until_released() {
        let (e, _db) = events(EventSettings {
            max_queued_events: 3,
            ..EventSettings::default()
        });
        let a = e.reserve("f", 2).unwrap();
        let b = e.reserve("f", 2).unwrap();
        let refused = e.reserve("f", 2).err().unwrap();
        assert_eq!((refused.status, refused.retry_after), (429, Some(1)));
        assert!(
            refused.message.contains("max_queued"),
            "{}",
            refused.message
        );
        let c = e.reserve("g", 10).unwrap();
        let host = e.reserve("g", 10).err().unwrap();
        assert!(
            host.message.contains("max_queued_events"),
            "{}",
            host.message
        );
        drop(a);
        assert_eq!(e.room(), 1);
        let d = e.reserve("f", 2).unwrap();
        // A kept reservation stays counted until its event is delivered.
        e.keep(d, open(7, 0));
        drop((b, c));
        assert_eq!(e.room(), 2);
        let (due, _) = e.take_due(0, |_| 1);
        assert_eq!(due.len(), 1);
        e.delivered("f", "e7", None);
        assert_eq!(e.room(), 3);
    }

    #[test]
    fn deliveries_stay_within_each_functions_concurrency() {
        let (e, _db) = events(EventSettings::default());
        let now = journal::now_ms();
        for seq in 1..=5 {
            e.enqueue(open(seq, 0), true);
        }
        let mut other = open(6, 0);
        other.function = "g".into();
        e.enqueue(other, true);
        let (due, _) = e.take_due(now, |name| if name == "f" { 2 } else { 1 });
        let mut seqs: Vec<i64> = due.iter().map(|e| e.seq).collect();
        seqs.sort();
        assert_eq!(seqs, [1, 2, 6], "the first two of f, and g's");
        let (more, _) = e.take_due(now, |_| 2);
        assert!(more.is_empty(), "f is at its concurrency: {more:?}");
        // One of f's ends and is retried later: the next in order goes.
        let mut retried = due.into_iter().find(|e| e.seq == 1).unwrap();
        retried.due_ms = now + 500;
        e.delivered("f", "e1", Some(retried));
        let (next, at) = e.take_due(now, |_| 2);
        assert_eq!(next.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(at, now + 500, "woken when the retry is due");
    }

    #[test]
    fn crash_loops_need_the_threshold_within_the_window() {
        let (e, _db) = events(EventSettings {
            crash_threshold: 3,
            ..EventSettings::default()
        });
        assert!(!e.crash_loop("f", 1));
        assert!(!e.crash_loop("f", 1));
        assert!(!e.crash_loop("f", 2), "another version counts apart");
        assert!(e.crash_loop("f", 1));
        assert!(!e.crash_loop("f", 1), "the window starts again");
    }

    #[test]
    fn on_error_records_are_rate_limited_per_function() {
        let (e, _db) = events(EventSettings {
            on_error_rate_per_s: 2,
            ..EventSettings::default()
        });
        assert!(e.on_error_allowed("f"));
        assert!(e.on_error_allowed("f"));
        assert!(!e.on_error_allowed("f"));
        assert!(e.on_error_allowed("g"));
    }

    #[test]
    fn queues_deliver_in_acceptance_order_as_events_come_due() {
        let mut q = FnQueue::default();
        q.push(open(3, 0), 0);
        q.push(open(1, 500), 0);
        q.push(open(2, 0), 0);
        let seqs = |q: &FnQueue| q.ready.keys().copied().collect::<Vec<_>>();
        assert_eq!(seqs(&q), vec![2, 3]);
        q.promote(499);
        assert_eq!(seqs(&q), vec![2, 3]);
        q.promote(500);
        assert_eq!(seqs(&q), vec![1, 2, 3]);
        assert!(q.waiting.is_empty());
    }
}
