//! The Ember host agent: `emberd` and the `ember` CLI (docs/agent.md).
#![deny(missing_docs)]

pub mod api;
pub mod client;
pub mod events;
pub mod functions;
pub mod host;
pub mod journal;
pub mod logging;
pub mod metadata;
pub mod metaevents;
pub mod pool;
pub mod predict;
pub mod prewarm;
pub mod repair;
pub mod schedules;
pub mod snapshots;
pub mod supervisor;
