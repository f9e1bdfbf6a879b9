//! Instances (VMs restored from a function's template) per function, the
//! router that picks one per invocation, and the pool of prepared
//! ember-vmm processes that restores draw from.
//!
//! One invocation at a time per instance, as Lambda does. Routing, per
//! invocation: an instance the caller names (`X-Ember-Instance`), else the
//! instance an affinity key (`X-Ember-Affinity`) was bound to; if that one
//! is busy, wait up to [`AFFINITY_WAIT`] for it, then serve elsewhere; if it
//! is gone, serve elsewhere. A key seen for the first time takes an idle
//! instance bound to no other key, else a new restore. Without either: the
//! most recently used idle instance, else a restore.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::supervisor::Vmm;

/// Affinity bindings kept before those to gone instances are dropped.
pub const MAX_STALE_BINDINGS: usize = 100_000;

/// How long a request for a busy, named or affine instance waits for it.
pub const AFFINITY_WAIT: Duration = Duration::from_millis(200);

/// How an invocation found its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// An instance that had served before.
    Warm,
    /// Restored from the template for this request.
    Restored,
    /// Restored ahead of a predicted arrival, serving for the first time.
    Prewarmed,
}

impl Start {
    /// Its header value.
    pub fn name(self) -> &'static str {
        match self {
            Start::Warm => "warm",
            Start::Restored => "restored",
            Start::Prewarmed => "prewarmed",
        }
    }
}

/// What became of an affinity key or named instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// The instance asked for served.
    Hit,
    /// It was gone or stayed busy: another served.
    Miss,
    /// A key seen for the first time.
    New,
}

impl Affinity {
    /// Its header value.
    pub fn name(self) -> &'static str {
        match self {
            Affinity::Hit => "hit",
            Affinity::Miss => "miss",
            Affinity::New => "new",
        }
    }
}

/// An instance of a function version.
pub struct Instance {
    /// Its id.
    pub id: String,
    /// The id of the ember-vmm it runs in (its files in the run directory,
    /// its lines in the log), once restored.
    pub vmm_id: Option<String>,
    /// The function.
    pub function: String,
    /// The version it runs.
    pub version: u64,
    /// That version's deploy id.
    pub uid: u64,
    /// Being restored (counted, not yet serving).
    pub restoring: bool,
    /// The VMM, while idle (taken out while it serves).
    pub vmm: Option<Vmm>,
    /// When it last finished serving.
    pub last_used: Instant,
    /// Invocations served.
    pub served: u64,
    /// When it was restored.
    pub created: Instant,
    /// Memory it claims of the host's budget, MiB.
    pub memory_mib: u64,
    /// The template rebuild it was restored from (0: the deploy's).
    pub template_generation: u64,
    /// Restored ahead of a predicted arrival and not yet used.
    pub prewarmed: bool,
}

impl Instance {
    /// An instance of `version` (deploy `uid`) of `function` being
    /// restored, counted against the limits from now on; `prewarmed`: ahead
    /// of a predicted arrival.
    pub fn restoring(
        id: &str,
        function: &str,
        (version, uid): (u64, u64),
        memory_mib: u64,
        template_generation: u64,
        prewarmed: bool,
    ) -> Instance {
        Instance {
            id: id.to_string(),
            function: function.to_string(),
            version,
            uid,
            restoring: true,
            vmm: None,
            last_used: Instant::now(),
            served: 0,
            created: Instant::now(),
            memory_mib,
            vmm_id: None,
            template_generation,
            prewarmed,
        }
    }
}

/// What the router decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Serve on this idle instance.
    Instance {
        /// Its id.
        id: String,
        /// Hit/miss/new, when asked for an instance or key.
        affinity: Option<Affinity>,
    },
    /// The instance asked for is busy: wait, then ask again.
    Wait,
    /// Restore a new instance (and bind the key to it, if any).
    Restore {
        /// Hit/miss/new, when asked for an instance or key.
        affinity: Option<Affinity>,
    },
    /// The function is at its instance limit and all are busy.
    Full,
    /// The caller named an instance that does not exist (or serves
    /// another function): the message says which.
    NoSuchInstance(String),
}

/// Every instance, and the affinity bindings.
#[derive(Default)]
pub struct Pools {
    /// By id.
    pub instances: HashMap<String, Instance>,
    /// (function, key) → instance id.
    pub affinity: HashMap<(String, String), String>,
    next: u64,
    boot: String,
    /// The highest instance number given out per function.
    issued: HashMap<String, u64>,
}

impl Pools {
    /// A new instance id: `<function>-<boot>-<n>`, where `boot` differs
    /// from one emberd to the next (an id kept across a restart names no
    /// instance rather than another one).
    pub fn new_id(&mut self, function: &str) -> String {
        self.next += 1;
        self.issued.insert(function.to_string(), self.next);
        let n = self.next;
        format!("{function}-{}-{n}", self.boot())
    }

    fn boot(&mut self) -> &str {
        if self.boot.is_empty() {
            // The pid alone if the kernel has no entropy to give.
            let mut bytes = [0u8; 2];
            let _ = ember_vmm::persist::getrandom_into(&mut bytes);
            self.boot = format!(
                "{:04x}",
                u16::from_le_bytes(bytes) ^ (std::process::id() as u16)
            );
        }
        &self.boot
    }

    fn keys_of(&self, id: &str) -> HashSet<&str> {
        self.affinity
            .iter()
            .filter(|(_, i)| i.as_str() == id)
            .map(|((_, k), _)| k.as_str())
            .collect()
    }

    /// Whether `id` names an instance of `function` this agent started
    /// (and that may be gone since).
    fn was_issued(&self, function: &str, id: &str) -> bool {
        let prefix = format!("{function}-{}-", self.boot);
        !self.boot.is_empty()
            && id
                .strip_prefix(&prefix)
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= 1 && self.issued.get(function).is_some_and(|&max| n <= max))
    }

    /// Routes a request for `function` (current deploy `uid`, at most
    /// `max_instances`). `waited` says the caller already waited for a
    /// busy instance it asked for.
    pub fn route(
        &self,
        function: &str,
        uid: u64,
        max_instances: usize,
        instance: Option<&str>,
        key: Option<&str>,
        waited: bool,
    ) -> Route {
        let current = |i: &&Instance| i.function == function && i.uid == uid;
        let idle = |i: &&Instance| current(i) && i.vmm.is_some();
        let count = self.instances.values().filter(current).count();
        // Asked for an instance, or for a key bound to one.
        let wanted = match (instance, key) {
            (Some(id), _) => match self.instances.get(id) {
                Some(i) if i.function != function => {
                    return Route::NoSuchInstance(format!(
                        "instance {id} serves function {}, not {function}",
                        i.function
                    ))
                }
                Some(_) => Some(id.to_string()),
                // Gone (it lived once): served elsewhere, as a miss.
                None if self.was_issued(function, id) => Some(id.to_string()),
                None => return Route::NoSuchInstance(format!("no instance {id}")),
            },
            (None, Some(key)) => self
                .affinity
                .get(&(function.to_string(), key.to_string()))
                .cloned(),
            (None, None) => None,
        };
        let asked = instance.is_some() || key.is_some();
        if let Some(id) = &wanted {
            match self.instances.get(id) {
                Some(i) if current(&i) && i.vmm.is_some() => {
                    return Route::Instance {
                        id: id.clone(),
                        affinity: Some(Affinity::Hit),
                    }
                }
                Some(i) if current(&i) && !waited => return Route::Wait,
                _ => {}
            }
        }
        let affinity = asked.then(|| {
            if wanted.is_some() {
                Affinity::Miss
            } else {
                Affinity::New
            }
        });
        // Another idle instance: for a key, one bound to no other key.
        let mut candidates: Vec<&Instance> = self
            .instances
            .values()
            .filter(idle)
            .filter(|i| key.is_none() || self.keys_of(&i.id).is_empty())
            .collect();
        candidates.sort_by_key(|i| std::cmp::Reverse(i.last_used));
        if let Some(i) = candidates.first() {
            return Route::Instance {
                id: i.id.clone(),
                affinity,
            };
        }
        if count < max_instances {
            return Route::Restore { affinity };
        }
        // At the limit: rather than make a key wait while instances idle,
        // take the least recently used idle one (its keys move along).
        match self
            .instances
            .values()
            .filter(idle)
            .min_by_key(|i| i.last_used)
        {
            Some(i) => Route::Instance {
                id: i.id.clone(),
                affinity,
            },
            None => Route::Full,
        }
    }

    /// Binds `key` of `function` to instance `id`.
    pub fn bind(&mut self, function: &str, key: &str, id: &str) {
        self.affinity
            .insert((function.to_string(), key.to_string()), id.to_string());
    }

    /// Forgets an instance; returns it (its VMM to drop). Keys bound to
    /// it stay bound to the gone id, so that their next request says
    /// `miss` (and binds them anew), up to [`MAX_STALE_BINDINGS`].
    pub fn remove(&mut self, id: &str) -> Option<Instance> {
        let removed = self.instances.remove(id);
        if self.affinity.len() > MAX_STALE_BINDINGS {
            let live = &self.instances;
            self.affinity.retain(|_, i| live.contains_key(i));
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools_with(ids: &[&str]) -> Pools {
        let mut pools = Pools::default();
        for (i, id) in ids.iter().enumerate() {
            pools.instances.insert(
                id.to_string(),
                Instance {
                    id: id.to_string(),
                    function: "f".into(),
                    version: 1,
                    uid: 1,
                    restoring: false,
                    vmm: None,
                    last_used: Instant::now() + Duration::from_millis(i as u64),
                    served: 0,
                    created: Instant::now(),
                    memory_mib: 128,
                    template_generation: 0,
                    vmm_id: None,
                    prewarmed: false,
                },
            );
        }
        pools
    }

    #[test]
    fn restores_when_nothing_is_idle_and_stops_at_the_limit() {
        let pools = pools_with(&["a"]);
        assert_eq!(
            pools.route("f", 1, 2, None, None, false),
            Route::Restore { affinity: None }
        );
        assert_eq!(pools.route("f", 1, 1, None, None, false), Route::Full);
        assert_eq!(
            pools.route("f", 1, 2, None, Some("k"), false),
            Route::Restore {
                affinity: Some(Affinity::New)
            }
        );
    }

    #[test]
    fn a_busy_affine_instance_is_waited_for_once_then_missed() {
        let mut pools = pools_with(&["a"]);
        pools.bind("f", "k", "a");
        assert_eq!(pools.route("f", 1, 2, None, Some("k"), false), Route::Wait);
        assert_eq!(
            pools.route("f", 1, 2, None, Some("k"), true),
            Route::Restore {
                affinity: Some(Affinity::Miss)
            }
        );
        assert_eq!(
            pools.route("f", 1, 2, Some("zz"), None, false),
            Route::NoSuchInstance("no instance zz".into())
        );
        // The instance gone, its key misses (and is bound anew).
        pools.remove("a");
        assert_eq!(
            pools.route("f", 1, 2, None, Some("k"), false),
            Route::Restore {
                affinity: Some(Affinity::Miss)
            }
        );
    }

    #[test]
    fn old_versions_do_not_count_or_serve() {
        let pools = pools_with(&["a"]);
        // "a" runs deploy 1; deploy 2 has no instance.
        assert_eq!(
            pools.route("f", 2, 1, None, None, false),
            Route::Restore { affinity: None }
        );
    }
}
