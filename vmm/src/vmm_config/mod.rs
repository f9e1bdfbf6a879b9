//! The request bodies of the configuration endpoints, one file per resource
//! (Firecracker's JSON, unknown fields refused), and their validation.

pub mod boot_source;
pub mod function;
pub mod machine_config;
pub mod snapshot;
