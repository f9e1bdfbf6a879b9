//! The pre-warm policy in emberd: each function's arrival history
//! ([`crate::predict::History`]), the plan the host's `prewarm_policy`
//! makes of it, and what became of the plans (predicted arrivals, pre-warms
//! used and unused, idle instance time). The pool asks it which idle
//! instances to keep and when to restore one ahead of an arrival
//! (docs/prewarm.md).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::host::lock;
use crate::predict::{History, Plan, Policy, PolicyParams, Rank, Window};

/// What became of one function's plans since emberd started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Invocations that arrived.
    pub arrivals: u64,
    /// Arrivals the plans predicted (pre-warm windows opened).
    pub predicted: u64,
    /// Arrivals that came inside a predicted window.
    pub predicted_hits: u64,
    /// Instances restored ahead that served.
    pub prewarms_used: u64,
    /// Instances restored ahead that went unused.
    pub prewarms_unused: u64,
    /// Time instances of the function spent idle, ms.
    pub idle_ms: u64,
}

/// One function's state.
#[derive(Default)]
struct State {
    history: History,
    plan: Option<Plan>,
    /// The `from_ms` of the last window counted as a prediction.
    counted: Option<u64>,
    /// The `from_ms` of the last window pre-warmed for.
    done: Option<u64>,
    stats: Stats,
}

/// Every function's prediction state.
pub struct Prewarm {
    /// The host's policy.
    pub policy: Policy,
    base: Instant,
    functions: Mutex<HashMap<String, State>>,
}

/// An arrival in flight: its end is recorded when it drops.
pub struct Arrival<'a> {
    prewarm: &'a Prewarm,
    function: String,
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        let now = self.prewarm.now_ms();
        if let Some(s) = lock(&self.prewarm.functions).get_mut(&self.function) {
            s.history.finished(now);
        }
    }
}

/// The policy settings for a function whose keep-alive is `keep_alive_s`:
/// that is the cap of every keep-alive, and what one cold start is
/// weighed as (the idle time a fixed keep-alive would spend to avoid it).
pub fn params(keep_alive_s: u64) -> PolicyParams {
    PolicyParams {
        keep_alive_max_ms: keep_alive_s.saturating_mul(1000),
        cold_cost_ms: keep_alive_s.saturating_mul(1000),
        ..PolicyParams::default()
    }
}

impl Prewarm {
    /// Empty, with `policy` for every function that allows pre-warming.
    pub fn new(policy: Policy) -> Prewarm {
        Prewarm {
            policy,
            base: Instant::now(),
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// Now, on the plans' clock, ms.
    pub fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    /// An instant on the plans' clock, ms.
    pub fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64
    }

    /// An instant from the plans' clock.
    pub fn instant(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// An invocation of `function` arrived; its end is recorded when the
    /// returned guard drops.
    pub fn arrived(&self, function: &str) -> Arrival<'_> {
        let now = self.now_ms();
        let mut functions = lock(&self.functions);
        let s = functions.entry(function.to_string()).or_default();
        s.history.arrived(now);
        s.stats.arrivals += 1;
        if let Some(w) = s.plan.as_ref().and_then(|p| p.prewarm) {
            if w.from_ms <= now && now < w.until_ms {
                s.stats.predicted_hits += 1;
            }
        }
        Arrival {
            prewarm: self,
            function: function.to_string(),
        }
    }

    /// Plans `function` at `now` (ms), with `keep_alive_s` and whether it
    /// allows pre-warming; remembers the plan and counts a new window.
    pub fn plan(&self, function: &str, keep_alive_s: u64, auto: bool, now: u64) -> Plan {
        let policy = if auto { self.policy } else { Policy::Fixed };
        let mut functions = lock(&self.functions);
        let s = functions.entry(function.to_string()).or_default();
        let plan = s.history.plan(policy, now, &params(keep_alive_s));
        if let Some(w) = plan.prewarm {
            if s.counted != Some(w.from_ms) {
                s.counted = Some(w.from_ms);
                s.stats.predicted += 1;
            }
        }
        s.plan = Some(plan.clone());
        plan
    }

    /// How many instances to restore ahead now, `ready` being idle; the
    /// window is taken as served when this says more than 0.
    pub fn take_prewarm(&self, function: &str, plan: &Plan, now: u64, ready: u32) -> u32 {
        let mut functions = lock(&self.functions);
        let Some(s) = functions.get_mut(function) else {
            return 0;
        };
        let n = plan.to_prewarm(now, ready, s.done);
        if n > 0 {
            s.done = plan.prewarm.map(|w| w.from_ms);
        }
        n
    }

    /// An idle instance of `function` was taken by an arrival after
    /// `idle`; `prewarmed`: it was restored ahead (else it was kept after
    /// an invocation: a sample of how long instances are worth keeping);
    /// `lone`: it was the function's only instance.
    pub fn taken(&self, function: &str, idle: Duration, prewarmed: bool, lone: bool) {
        let now = self.now_ms();
        let mut functions = lock(&self.functions);
        let s = functions.entry(function.to_string()).or_default();
        s.stats.idle_ms += idle.as_millis() as u64;
        if prewarmed {
            s.stats.prewarms_used += 1;
            s.history.prewarm_used(now);
        } else {
            s.history.reused(idle.as_millis() as u64, Rank::of(lone));
        }
    }

    /// An idle instance of `function` was reaped after `idle`;
    /// `prewarmed`: it was restored ahead and never used; `lone`: it was
    /// the function's only instance.
    pub fn reaped(&self, function: &str, idle: Duration, prewarmed: bool, lone: bool) {
        let now = self.now_ms();
        let mut functions = lock(&self.functions);
        let s = functions.entry(function.to_string()).or_default();
        s.stats.idle_ms += idle.as_millis() as u64;
        if prewarmed {
            s.stats.prewarms_unused += 1;
        } else {
            s.history
                .reaped(now, idle.as_millis() as u64, Rank::of(lone));
        }
    }

    /// An arrival of `function` found no idle instance.
    pub fn cold(&self, function: &str) {
        let now = self.now_ms();
        if let Some(s) = lock(&self.functions).get_mut(function) {
            s.history.cold(now);
        }
    }

    /// Forgets a deleted function.
    pub fn forget(&self, function: &str) {
        lock(&self.functions).remove(function);
    }

    /// Every function's stats, by name.
    pub fn stats(&self) -> Vec<(String, Stats)> {
        let mut out: Vec<(String, Stats)> = lock(&self.functions)
            .iter()
            .map(|(f, s)| (f.clone(), s.stats.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// What `GET /functions/{name}` shows: the policy, the detected
    /// period, the current plan, the stats.
    pub fn describe(&self, function: &str, auto: bool, now: u64) -> serde_json::Value {
        let policy = if auto { self.policy } else { Policy::Fixed };
        let mut functions = lock(&self.functions);
        let Some(s) = functions.get_mut(function) else {
            return json!({ "policy": policy.name(), "prewarm": if auto { "auto" } else { "off" }, "arrivals": 0 });
        };
        let periods: Vec<serde_json::Value> = s
            .history
            .periods(now)
            .iter()
            .map(|p| {
                json!({
                    "period_s": p.period_ms as f64 / 1e3,
                    "confidence": (p.confidence * 1e3).round() / 1e3,
                    "spread_s": p.spread_ms as f64 / 1e3,
                    "next_in_s": (p.next_after(now, 0) as f64 - now as f64) / 1e3,
                })
            })
            .collect();
        let window = |w: &Window| {
            json!({
                "from_in_s": (w.from_ms as f64 - now as f64) / 1e3,
                "until_in_s": (w.until_ms as f64 - now as f64) / 1e3,
                "expected_in_s": (w.expected_ms as f64 - now as f64) / 1e3,
                "instances": w.count,
            })
        };
        let plan = s.plan.as_ref().map(|p| {
            json!({
                "basis": p.basis,
                "keep_alive_s": p.keep_alive_ms as f64 / 1e3,
                "keep_last_s": p.keep_last_ms as f64 / 1e3,
                "prewarm": p.prewarm.as_ref().map(window),
            })
        });
        json!({
            "policy": policy.name(),
            "prewarm": if auto { "auto" } else { "off" },
            "periods": periods,
            "plan": plan,
            "arrivals": s.stats.arrivals,
            "predicted": s.stats.predicted,
            "predicted_hits": s.stats.predicted_hits,
            "prewarms_used": s.stats.prewarms_used,
            "prewarms_unused": s.stats.prewarms_unused,
            "idle_instance_s": s.stats.idle_ms as f64 / 1e3,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_count_each_window_once_and_hits_inside_it() {
        let p = Prewarm::new(Policy::Ember);
        // Ten arrivals two seconds apart, on the plans' clock.
        {
            let mut functions = lock(&p.functions);
            let s = functions.entry("f".into()).or_default();
            for i in 0..10 {
                s.history.arrived(i * 2_000);
                s.history.finished(i * 2_000 + 5);
            }
        }
        let plan = p.plan("f", 1, true, 18_010);
        assert_eq!(plan.basis, "periodic");
        let w = plan.prewarm.unwrap();
        assert_eq!(w.expected_ms, 20_000);
        p.plan("f", 1, true, 18_020);
        assert_eq!(p.stats()[0].1.predicted, 1);
        assert_eq!(p.take_prewarm("f", &plan, w.from_ms, 0), 1);
        assert_eq!(p.take_prewarm("f", &plan, w.from_ms + 1, 0), 0);
        // `off` plans as fixed: nothing ahead, the keep-alive as set.
        let off = p.plan("f", 1, false, 18_030);
        assert_eq!(
            (off.basis, off.prewarm, off.keep_alive_ms),
            ("fixed", None, 1_000)
        );
        p.taken("f", Duration::from_millis(300), true, true);
        p.reaped("f", Duration::from_millis(700), true, true);
        let stats = &p.stats()[0].1;
        assert_eq!(
            (stats.prewarms_used, stats.prewarms_unused, stats.idle_ms),
            (1, 1, 1_000)
        );
        p.forget("f");
        assert!(p.stats().is_empty());
    }

    #[test]
    fn an_arrival_guard_records_the_end() {
        let p = Prewarm::new(Policy::Ember);
        {
            let _a = p.arrived("f");
            assert_eq!(lock(&p.functions)["f"].history.in_flight(), 1);
        }
        assert_eq!(lock(&p.functions)["f"].history.in_flight(), 0);
        assert_eq!(p.stats()[0].1.arrivals, 1);
    }
}
