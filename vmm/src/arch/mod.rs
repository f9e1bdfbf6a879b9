//! Architecture support. Ember runs on x86-64 only.

pub mod x86_64;
