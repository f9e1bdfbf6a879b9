//! The Ember host agent: `emberd` and the `ember` CLI.
//!
//! Not built yet: functions, snapshots, pools, routing, the journal,
//! pre-warming and metaevents arrive with issue 5 (see shared/DESIGN.md).
//! The crate exists so the workspace has its final shape.
#![deny(missing_docs)]
