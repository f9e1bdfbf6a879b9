//! Control actions: the execution environment repairs itself, and says so
//! (docs/journal.md, "Control actions"). A version whose instances keep
//! crashing gets its template rebuilt and its idle instances replaced; a
//! template ember-vmm refuses twice is rebuilt, or its version marked
//! `broken` if it cannot be; a refused base snapshot is rebuilt. Each
//! action is a `control_action` journal record and goes to the function's
//! `on_error` control. The crash window itself is
//! [`Events::crash_loop`](crate::events::Events::crash_loop).

use std::sync::Arc;

use serde_json::json;

use crate::events::ErrorReport;
use crate::functions::FunctionVersion;
use crate::host::{lock, Agent, ApiError};
use crate::journal::{self, NewRecord};
use crate::pool::Instance;
use crate::snapshots;
use crate::supervisor::VmmError;

impl Agent {
    /// Whether `v` is marked broken.
    pub fn is_broken(&self, v: &FunctionVersion) -> bool {
        lock(&self.broken).contains(&v.uid)
    }

    /// How many times `v`'s template was rebuilt since start.
    pub fn template_generation(&self, v: &FunctionVersion) -> u64 {
        lock(&self.generations)
            .get(&(v.name.clone(), v.version))
            .copied()
            .unwrap_or(0)
    }

    fn bump_generation(&self, v: &FunctionVersion) -> u64 {
        let mut generations = lock(&self.generations);
        let g = generations.entry((v.name.clone(), v.version)).or_insert(0);
        *g += 1;
        *g
    }

    /// Notes a crash of `v` (an instance that died serving or idle); the
    /// `crash_threshold`-th within the window rebuilds its template and
    /// replaces its idle instances, on a thread of its own.
    pub(crate) fn crash_detected(
        &self,
        v: &Arc<FunctionVersion>,
        instance: Option<&str>,
        message: &str,
    ) {
        if !self.events.crash_loop(&v.name, v.version) {
            return;
        }
        let Some(agent) = self.me.upgrade() else {
            return;
        };
        let v = v.clone();
        let detected = json!({
            "condition": "crash_loop",
            "message": format!(
                "{} crashes within {} s; the last: {message}",
                self.events.settings.crash_threshold, self.events.settings.crash_window_s
            ),
            "instance": instance,
        });
        let spawned = std::thread::Builder::new()
            .name("ember-repair".into())
            .spawn(move || agent.rebuild_after_crashes(&v, detected));
        if let Err(e) = spawned {
            tracing::error!("cannot start a control action: {e}");
        }
    }

    fn rebuild_after_crashes(&self, v: &FunctionVersion, detected: serde_json::Value) {
        lock(&self.validated).remove(&(v.name.clone(), v.version));
        let done = match self.template(v, true) {
            Ok(_) => {
                let generation = self.bump_generation(v);
                let doomed: Vec<Instance> = {
                    let mut pools = lock(&self.pools);
                    let ids: Vec<String> = pools
                        .instances
                        .values()
                        .filter(|i| i.uid == v.uid && i.vmm.is_some())
                        .map(|i| i.id.clone())
                        .collect();
                    ids.iter().filter_map(|id| pools.remove(id)).collect()
                };
                let replaced = doomed.len();
                drop(doomed);
                self.changed.notify_waiters();
                json!({
                    "action": "template_rebuilt",
                    "template_generation": generation,
                    "idle_instances_replaced": replaced,
                })
            }
            Err(e) => {
                lock(&self.broken).insert(v.uid);
                json!({ "action": "version_marked_broken", "rebuild_error": e.message })
            }
        };
        self.record_control_action(&v.name, Some(v.version), detected, done);
    }

    /// ember-vmm refused `v`'s template twice (the last time with
    /// `refusal`): rebuilds it, or, if that fails, marks the version
    /// broken and answers the 503 that says so.
    pub(crate) fn rebuild_refused_template(
        &self,
        v: &FunctionVersion,
        refusal: &VmmError,
    ) -> Result<(), ApiError> {
        let detected = json!({
            "condition": "template_refused",
            "message": format!("ember-vmm refused the template twice: {refusal}"),
        });
        lock(&self.validated).remove(&(v.name.clone(), v.version));
        match self.template(v, true) {
            Ok(_) => {
                let generation = self.bump_generation(v);
                self.record_control_action(
                    &v.name,
                    Some(v.version),
                    detected,
                    json!({ "action": "template_rebuilt", "template_generation": generation }),
                );
                Ok(())
            }
            Err(rebuild) => {
                lock(&self.broken).insert(v.uid);
                self.record_control_action(
                    &v.name,
                    Some(v.version),
                    detected,
                    json!({ "action": "version_marked_broken", "rebuild_error": rebuild.message }),
                );
                Err(ApiError::new(
                    503,
                    "broken",
                    format!(
                        "{} v{} is broken: its template was refused and its rebuild failed ({}); deploy a new version",
                        v.name, v.version, rebuild.message
                    ),
                ))
            }
        }
    }

    /// ember-vmm refused the base snapshot (`message`) while building
    /// `v`'s template: rebuilds the base.
    pub(crate) fn rebuild_base(&self, v: &FunctionVersion, message: &str) -> Result<(), ApiError> {
        let detected = json!({
            "condition": "base_refused",
            "message": format!("ember-vmm refused the base snapshot: {message}"),
        });
        let rebuilt = snapshots::build_base(
            &self.supervisor,
            &self.config.guest_image,
            self.config.base_mem_mib,
            &self.base,
            (self.config.base_mem_mib as u64 + self.config.vmm_overhead_mib) << 20,
        );
        self.record_control_action(
            &v.name,
            Some(v.version),
            detected,
            match &rebuilt {
                Ok(_) => json!({ "action": "base_rebuilt" }),
                Err(e) => json!({ "action": "base_rebuild_failed", "error": e.to_string() }),
            },
        );
        rebuilt?;
        Ok(())
    }

    /// Writes a control action's journal record, counts it, and tells the
    /// function's `on_error` control (blocking).
    pub fn record_control_action(
        &self,
        function: &str,
        version: Option<u64>,
        detected: serde_json::Value,
        done: serde_json::Value,
    ) {
        let record = NewRecord {
            id: self.new_invocation_id(),
            kind: "control_action",
            function: function.to_string(),
            version,
            error_kind: detected["condition"].as_str().map(str::to_string),
            error_message: detected["message"].as_str().map(str::to_string),
            detail: Some(json!({ "detected": detected, "done": done })),
            ..Default::default()
        };
        tracing::warn!(
            function,
            version,
            detected = %detected,
            done = %done,
            "control action"
        );
        self.events
            .metrics
            .control_actions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = journal::now_ms();
        let written = record.clone();
        if let Err(e) = self.events.journal.write_blocking(true, move |conn| {
            journal::insert_record_tx(conn, &written, now)
        }) {
            tracing::error!("cannot journal a control action: {e}");
        } else {
            let mut store = crate::host::lock(&self.triggers.live);
            store.journaled(function, "control_action");
            store.control_action(function);
        }
        self.report_error(ErrorReport {
            kind: "control_action",
            function: function.to_string(),
            version,
            invocation_id: None,
            error_kind: record.error_kind.unwrap_or_default(),
            message: record.error_message.unwrap_or_default(),
            journal_id: Some(record.id),
            detail: record.detail,
        });
    }
}
