//! Schedules (docs/metaevents.md): a function run at a rate or on a cron
//! expression, each fire an async invocation accepted through the journal
//! together with the schedule's progress, so a fire is neither lost nor
//! doubled across restarts. The pure core — parsing, the next and the
//! latest missed fire times — is unit-tested here.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::TimeZone;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use crate::host::{lock, Agent, ApiError};
use crate::journal::{self, NewEvent};
use crate::metaevents::{rfc3339, BadRule};

/// How a schedule comes due.
#[derive(Debug, Clone)]
pub enum Every {
    /// Every so many ms, from the schedule's anchor.
    Rate(i64),
    /// On a 5-field cron expression, in a time zone.
    Cron(Box<croner::Cron>, chrono_tz::Tz),
}

/// A checked schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Its name.
    pub name: String,
    /// The function it runs.
    pub function: String,
    /// The rate or cron text, as given.
    pub rate: Option<String>,
    /// See `rate`.
    pub cron: Option<String>,
    /// How it comes due.
    pub every: Every,
    /// Put into its events.
    pub payload: Value,
    /// The cron expression's time zone.
    pub timezone: String,
    /// Fires at all.
    pub enabled: bool,
    /// After a restart, the latest fire missed while emberd was down
    /// fires once.
    pub catch_up: bool,
}

const FIELDS: &[&str] = &[
    "function", "rate", "cron", "payload", "timezone", "enabled", "catch_up",
];

/// Parses an EventBridge rate: `5 minutes`, `1 hour`, or `rate(5 minutes)`;
/// seconds, minutes, hours, days. Returns ms.
pub fn parse_rate(text: &str) -> Result<i64, String> {
    let inner = text
        .trim()
        .strip_prefix("rate(")
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or(text.trim());
    let mut parts = inner.split_whitespace();
    let (Some(n), Some(unit), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "{text:?} is not a rate: give \"N unit\", as \"5 minutes\" or \"1 second\""
        ));
    };
    let n: i64 = n
        .parse()
        .ok()
        .filter(|n| *n >= 1 && *n <= 1_000_000)
        .ok_or_else(|| format!("{text:?}: the number must be a whole number from 1 to 1000000"))?;
    let unit_ms = match unit {
        "second" | "seconds" => 1000,
        "minute" | "minutes" => 60_000,
        "hour" | "hours" => 3_600_000,
        "day" | "days" => 86_400_000,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use seconds, minutes, hours or days"
            ))
        }
    };
    Ok(n * unit_ms)
}

/// Parses a 5-field cron expression (minute hour day-of-month month
/// day-of-week), as croner reads them.
pub fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| {
            format!(
                "{text:?} is not a 5-field cron expression (minute hour day month weekday): {e}"
            )
        })
}

impl Schedule {
    /// Checks `body` (the `PUT /schedules/{name}` JSON).
    pub fn parse(
        name: &str,
        body: &Value,
        function_exists: impl Fn(&str) -> bool,
    ) -> Result<Schedule, BadRule> {
        let bad = |field: &str, message: String| BadRule {
            field: field.into(),
            message,
        };
        crate::functions::check_name(name).map_err(|e| bad("name", e.to_string()))?;
        let body = body
            .as_object()
            .ok_or_else(|| bad("body", "must be a JSON object".into()))?;
        if let Some(unknown) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(bad(
                unknown,
                format!("is not a schedule field (they are {})", FIELDS.join(", ")),
            ));
        }
        let string = |field: &str| -> Result<Option<String>, BadRule> {
            match body.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(bad(field, format!("must be a string, not {v}"))),
            }
        };
        let boolean = |field: &str| -> Result<bool, BadRule> {
            match body.get(field) {
                None | Some(Value::Null) => Ok(true),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(bad(field, format!("must be true or false, not {v}"))),
            }
        };
        let function = string("function")?.ok_or_else(|| bad("function", "is required".into()))?;
        if !function_exists(&function) {
            return Err(bad(
                "function",
                format!("no function named {function:?} is deployed"),
            ));
        }
        let timezone = string("timezone")?.unwrap_or_else(|| "UTC".into());
        let tz: chrono_tz::Tz = timezone.parse().map_err(|_| {
            bad(
                "timezone",
                format!("{timezone:?} is not an IANA time zone (as UTC or Europe/Paris)"),
            )
        })?;
        let (rate, cron) = (string("rate")?, string("cron")?);
        let every = match (&rate, &cron) {
            (Some(r), None) => Every::Rate(parse_rate(r).map_err(|e| bad("rate", e))?),
            (None, Some(c)) => {
                Every::Cron(Box::new(parse_cron(c).map_err(|e| bad("cron", e))?), tz)
            }
            _ => return Err(bad("rate", "give either rate or cron".into())),
        };
        let payload = body.get("payload").cloned().unwrap_or(Value::Null);
        crate::metaevents::check_payload(&payload)?;
        Ok(Schedule {
            name: name.to_string(),
            function,
            rate,
            cron,
            every,
            payload,
            timezone,
            enabled: boolean("enabled")?,
            catch_up: boolean("catch_up")?,
        })
    }

    /// The schedule as its `PUT` body (what is stored).
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("function".into(), json!(self.function));
        if let Some(r) = &self.rate {
            out.insert("rate".into(), json!(r));
        }
        if let Some(c) = &self.cron {
            out.insert("cron".into(), json!(c));
        }
        out.insert("payload".into(), self.payload.clone());
        out.insert("timezone".into(), json!(self.timezone));
        out.insert("enabled".into(), json!(self.enabled));
        out.insert("catch_up".into(), json!(self.catch_up));
        Value::Object(out)
    }

    /// The first fire time after `after_ms` (a rate counts from `anchor_ms`).
    pub fn next_after(&self, anchor_ms: i64, after_ms: i64) -> Option<i64> {
        match &self.every {
            Every::Rate(period) => {
                let k = if after_ms < anchor_ms {
                    1
                } else {
                    (after_ms - anchor_ms) / period + 1
                };
                Some(anchor_ms + k * period)
            }
            Every::Cron(cron, tz) => {
                let t = tz.timestamp_millis_opt(after_ms).single()?;
                cron.find_next_occurrence(&t, false)
                    .ok()
                    .map(|t| t.timestamp_millis())
            }
        }
    }

    /// The latest fire time in (`after_ms`, `now_ms`], if any.
    pub fn latest_due(&self, anchor_ms: i64, after_ms: i64, now_ms: i64) -> Option<i64> {
        let t = match &self.every {
            Every::Rate(period) => {
                if now_ms < anchor_ms + period {
                    return None;
                }
                anchor_ms + (now_ms - anchor_ms) / period * period
            }
            Every::Cron(cron, tz) => {
                let now = tz.timestamp_millis_opt(now_ms).single()?;
                cron.find_previous_occurrence(&now, true)
                    .ok()?
                    .timestamp_millis()
            }
        };
        (t > after_ms).then_some(t)
    }
}

/// A schedule and where it stands.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The schedule.
    pub schedule: Schedule,
    /// Rates count from here (its PUT), ms.
    pub anchor_ms: i64,
    /// The last fire's scheduled time (or the anchor), ms.
    pub last_ms: i64,
    /// Fires since the PUT.
    pub fires: u64,
}

/// The schedules.
pub struct Schedules {
    /// By name.
    pub entries: Mutex<BTreeMap<String, Entry>>,
    /// Wakes the scheduler (a schedule changed).
    pub changed: Notify,
    /// Held across a change's write and its application (PUT, DELETE, a
    /// fire): disk and memory see changes in one order.
    writes: Mutex<()>,
}

impl Schedules {
    /// Loads the schedules from the journal database.
    pub fn open(journal: &journal::Journal) -> Result<Schedules, String> {
        let stored = journal
            .read(journal::schedules)
            .map_err(|e| format!("cannot read the schedules: {e}"))?;
        let mut entries = BTreeMap::new();
        for (name, spec, anchor_ms, last_ms, fires) in stored {
            match serde_json::from_str::<Value>(&spec)
                .map_err(|e| BadRule {
                    field: "body".into(),
                    message: e.to_string(),
                })
                .and_then(|body| Schedule::parse(&name, &body, |_| true))
            {
                Ok(schedule) => {
                    entries.insert(
                        name,
                        Entry {
                            schedule,
                            anchor_ms,
                            last_ms,
                            fires: fires as u64,
                        },
                    );
                }
                Err(e) => tracing::error!(
                    "schedule {name} is unusable and is ignored: {}: {}",
                    e.field,
                    e.message
                ),
            }
        }
        Ok(Schedules {
            entries: Mutex::new(entries),
            changed: Notify::new(),
            writes: Mutex::new(()),
        })
    }
}

fn no_schedule(name: &str) -> ApiError {
    ApiError::new(404, "not_found", format!("no schedule named {name:?}"))
}

fn describe(name: &str, e: &Entry, now: i64) -> Value {
    let mut out = e.schedule.to_json();
    out["name"] = json!(name);
    let mut next = Vec::new();
    let mut after = e.last_ms.max(now);
    while e.schedule.enabled && next.len() < 5 {
        match e.schedule.next_after(e.anchor_ms, after) {
            Some(t) => {
                next.push(json!(rfc3339(t)));
                after = t;
            }
            None => break,
        }
    }
    out["next"] = json!(next);
    out["last_scheduled_at"] = if e.fires > 0 {
        json!(rfc3339(e.last_ms))
    } else {
        Value::Null
    };
    out["fires"] = json!(e.fires);
    out
}

impl Agent {
    /// `PUT /schedules/{name}`: checks and stores it durably; a rate counts
    /// from now.
    pub fn put_schedule(&self, name: &str, body: &Value) -> Result<Value, ApiError> {
        let schedule = Schedule::parse(name, body, |f| self.current(f).is_ok())?;
        let _one = lock(&self.schedules.writes);
        {
            let entries = lock(&self.schedules.entries);
            let max = crate::metaevents::MAX_RULES;
            if entries.len() >= max && !entries.contains_key(name) {
                return Err(ApiError::new(
                    409,
                    "limit",
                    format!("emberd holds {max} schedules, its limit: delete some first"),
                ));
            }
        }
        let spec = schedule.to_json().to_string();
        let now = journal::now_ms();
        let key = name.to_string();
        self.events
            .journal
            .write_blocking(true, move |conn| {
                journal::put_schedule_tx(conn, &key, &spec, now)
            })
            .map_err(crate::events::store_error)?;
        let entry = Entry {
            schedule,
            anchor_ms: now,
            last_ms: now,
            fires: 0,
        };
        let out = describe(name, &entry, now);
        lock(&self.schedules.entries).insert(name.to_string(), entry);
        self.schedules.changed.notify_one();
        Ok(out)
    }

    /// `DELETE /schedules/{name}`.
    pub fn delete_schedule(&self, name: &str) -> Result<(), ApiError> {
        let _one = lock(&self.schedules.writes);
        if !lock(&self.schedules.entries).contains_key(name) {
            return Err(no_schedule(name));
        }
        let key = name.to_string();
        self.events
            .journal
            .write_blocking(true, move |conn| journal::delete_schedule_tx(conn, &key))
            .map_err(crate::events::store_error)?;
        lock(&self.schedules.entries).remove(name);
        self.schedules.changed.notify_one();
        Ok(())
    }

    /// `GET /schedules/{name}`.
    pub fn schedule(&self, name: &str) -> Result<Value, ApiError> {
        let entries = lock(&self.schedules.entries);
        let e = entries.get(name).ok_or_else(|| no_schedule(name))?;
        Ok(describe(name, e, journal::now_ms()))
    }

    /// `GET /schedules`.
    pub fn schedules_list(&self) -> Value {
        let now = journal::now_ms();
        let entries = lock(&self.schedules.entries);
        Value::Array(entries.iter().map(|(n, e)| describe(n, e, now)).collect())
    }

    /// Skips the fires missed while emberd was down of schedules with
    /// `catch_up: false` (called once, at start, before the scheduler).
    pub fn skip_missed_fires(&self) {
        let _one = lock(&self.schedules.writes);
        let now = journal::now_ms();
        let skipped: Vec<(String, i64, i64)> = lock(&self.schedules.entries)
            .iter()
            .filter(|(_, e)| e.schedule.enabled && !e.schedule.catch_up)
            .filter_map(|(n, e)| {
                e.schedule
                    .latest_due(e.anchor_ms, e.last_ms, now)
                    .map(|t| (n.clone(), e.anchor_ms, t))
            })
            .collect();
        for (name, anchor, t) in skipped {
            let key = name.clone();
            match self.events.journal.write_blocking(true, move |conn| {
                journal::schedule_fired_tx(conn, &key, anchor, t, false)
            }) {
                Ok(()) => {
                    if let Some(e) = lock(&self.schedules.entries).get_mut(&name) {
                        e.last_ms = t;
                    }
                    self.triggers
                        .metrics
                        .schedule_skipped
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(schedule = %name, "skipped the fire of {} missed while emberd was down (catch_up is false)", rfc3339(t));
                }
                Err(e) => tracing::error!(schedule = %name, "cannot record a skipped fire: {e}"),
            }
        }
    }

    /// Fires every schedule due now (the latest due time of each, once);
    /// returns when to look again, ms (blocking: call on a blocking thread).
    pub fn fire_schedules(&self) -> i64 {
        let _one = lock(&self.schedules.writes);
        let now = journal::now_ms();
        let due: Vec<(String, Entry, i64)> = lock(&self.schedules.entries)
            .iter()
            .filter(|(_, e)| e.schedule.enabled)
            .filter_map(|(n, e)| {
                e.schedule
                    .latest_due(e.anchor_ms, e.last_ms, now)
                    .map(|t| (n.clone(), e.clone(), t))
            })
            .collect();
        let mut failed = false;
        for (name, entry, t) in due {
            let s = &entry.schedule;
            let body = json!({
                "schedule": name,
                "scheduled_at": rfc3339(t),
                "fired_at": rfc3339(now),
                "payload": s.payload,
            });
            let ev = NewEvent {
                id: self.new_invocation_id(),
                function: s.function.clone(),
                origin: "schedule",
                source_id: Some(format!("schedule/{name}")),
                affinity: None,
                idempotency_key: None,
                event: body.to_string().into_bytes(),
                accepted_ms: now,
                due_ms: now,
            };
            // Room in the function's queue and the host's, as for any
            // async event (a function deleted since: its delivery journals
            // it as function_deleted).
            let max = self
                .current(&s.function)
                .map_or(u64::MAX, |v| v.config.max_queued);
            let reservation = match self.events.reserve(&s.function, max) {
                Ok(r) => r,
                Err(e) => {
                    failed = true;
                    tracing::warn!(schedule = %name, "no room for the fire's event ({}); trying again in a second", e.message);
                    continue;
                }
            };
            let (key, write_ev, anchor) = (name.clone(), ev.clone(), entry.anchor_ms);
            let written = self.events.journal.write_blocking(true, move |conn| {
                let accepted = journal::accept_tx(conn, &write_ev, now)?;
                journal::schedule_fired_tx(conn, &key, anchor, t, true)?;
                Ok(accepted)
            });
            match written {
                Ok(accepted) => {
                    if let journal::Accepted::New(seq) = accepted {
                        self.events.keep(reservation, ev.open(seq));
                    }
                    if let Some(e) = lock(&self.schedules.entries).get_mut(&name) {
                        // Unless it was replaced meanwhile.
                        if e.anchor_ms == entry.anchor_ms {
                            // Due times between the last fire and this one.
                            let mut missed = 0u64;
                            let mut at = e.last_ms;
                            while let Some(next) = s.next_after(e.anchor_ms, at) {
                                if next >= t || missed >= 100_000 {
                                    break;
                                }
                                missed += 1;
                                at = next;
                            }
                            e.last_ms = t;
                            e.fires += 1;
                            if missed > 0 {
                                self.triggers
                                    .metrics
                                    .schedule_skipped
                                    .fetch_add(missed, Ordering::Relaxed);
                            }
                        }
                    }
                    self.triggers
                        .metrics
                        .schedule_fires
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(schedule = %name, function = %s.function, "schedule fired for {}", rfc3339(t));
                }
                Err(e) => {
                    failed = true;
                    tracing::error!(schedule = %name, "cannot record a schedule's fire ({e}); trying again in a second");
                }
            }
        }
        let entries = lock(&self.schedules.entries);
        entries
            .values()
            .filter(|e| e.schedule.enabled)
            .filter_map(|e| e.schedule.next_after(e.anchor_ms, e.last_ms.max(now)))
            .min()
            .unwrap_or(now + 60_000)
            .min(if failed { now + 1000 } else { i64::MAX })
    }
}

/// The scheduler, until emberd drains. Call once, on the runtime.
pub fn start(agent: Arc<Agent>) {
    tokio::spawn(async move {
        {
            let agent = agent.clone();
            let _ = tokio::task::spawn_blocking(move || agent.skip_missed_fires()).await;
        }
        loop {
            if agent.draining.load(Ordering::Relaxed) {
                return;
            }
            let a = agent.clone();
            let next = tokio::task::spawn_blocking(move || a.fire_schedules())
                .await
                .unwrap_or_else(|_| journal::now_ms() + 1000);
            let wait = (next - journal::now_ms()).clamp(1, 60_000) as u64;
            tokio::select! {
                _ = agent.schedules.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(body: Value) -> Result<Schedule, BadRule> {
        Schedule::parse("s", &body, |f| f == "f")
    }

    fn ms(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn rates_read_as_eventbridge_writes_them() {
        assert_eq!(parse_rate("5 minutes"), Ok(300_000));
        assert_eq!(parse_rate("1 minute"), Ok(60_000));
        assert_eq!(parse_rate("rate(2 hours)"), Ok(7_200_000));
        assert_eq!(parse_rate("1 second"), Ok(1000));
        assert_eq!(parse_rate("1 day"), Ok(86_400_000));
        for bad in [
            "",
            "5",
            "0 minutes",
            "5 fortnights",
            "-1 minute",
            "1.5 minutes",
            "5 minutes ago",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_schedule_is_checked_field_by_field() {
        let s = schedule(json!({ "function": "f", "rate": "1 minute" })).unwrap();
        assert!(s.enabled && s.catch_up);
        assert_eq!(s.timezone, "UTC");
        for (body, field) in [
            (json!({ "function": "g", "rate": "1 minute" }), "function"),
            (json!({ "function": "f" }), "rate"),
            (
                json!({ "function": "f", "rate": "1 minute", "cron": "* * * * *" }),
                "rate",
            ),
            (json!({ "function": "f", "rate": "fast" }), "rate"),
            (json!({ "function": "f", "cron": "*/5 * * *" }), "cron"),
            (json!({ "function": "f", "cron": "0 */5 * * * *" }), "cron"),
            (json!({ "function": "f", "cron": "61 * * * *" }), "cron"),
            (
                json!({ "function": "f", "cron": "* * * * *", "timezone": "Mars/Olympus" }),
                "timezone",
            ),
            (
                json!({ "function": "f", "rate": "1 minute", "enabled": "yes" }),
                "enabled",
            ),
            (
                json!({ "function": "f", "rate": "1 minute", "every": 1 }),
                "every",
            ),
        ] {
            assert_eq!(schedule(body.clone()).unwrap_err().field, field, "{body}");
        }
    }

    #[test]
    fn a_rate_counts_from_its_anchor() {
        let s = schedule(json!({ "function": "f", "rate": "5 seconds" })).unwrap();
        assert_eq!(s.next_after(1000, 1000), Some(6000));
        assert_eq!(s.next_after(1000, 5999), Some(6000));
        assert_eq!(s.next_after(1000, 6000), Some(11_000));
        assert_eq!(s.latest_due(1000, 1000, 5999), None);
        assert_eq!(s.latest_due(1000, 1000, 6000), Some(6000));
        // Three missed: the latest one only.
        assert_eq!(s.latest_due(1000, 1000, 17_500), Some(16_000));
        assert_eq!(s.latest_due(1000, 16_000, 17_500), None);
    }

    #[test]
    fn cron_fire_times_match_the_expression() {
        let s = schedule(json!({ "function": "f", "cron": "*/5 * * * *" })).unwrap();
        let t = ms("2026-12-05T09:03:20Z");
        assert_eq!(s.next_after(0, t), Some(ms("2026-12-05T09:05:00Z")));
        assert_eq!(
            s.next_after(0, ms("2026-12-05T09:05:00Z")),
            Some(ms("2026-12-05T09:10:00Z"))
        );
        assert_eq!(s.latest_due(0, 0, t), Some(ms("2026-12-05T09:00:00Z")));
        assert_eq!(s.latest_due(0, ms("2026-12-05T09:00:00Z"), t), None);
        let nightly =
            schedule(json!({ "function": "f", "cron": "30 2 * * *", "timezone": "Europe/Paris" }))
                .unwrap();
        // 02:30 in Paris is 01:30 UTC in winter.
        assert_eq!(nightly.next_after(0, t), Some(ms("2026-12-06T01:30:00Z")));
        let weekdays = schedule(json!({ "function": "f", "cron": "0 9 * * MON-FRI" })).unwrap();
        // 2026-12-05 is a Saturday: next Monday.
        assert_eq!(weekdays.next_after(0, t), Some(ms("2026-12-07T09:00:00Z")));
    }
}
