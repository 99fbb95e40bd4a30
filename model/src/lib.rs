//! Foreshadow's pure core, shared by the extension, the sidecar and the
//! protocol model: no PostgreSQL, no async runtime, so that every rule here is
//! unit- and property-tested with plain `cargo test`.

pub mod hlc;
pub mod intent;
pub mod lww;
pub mod ownership;
pub mod seal;
pub mod stability;
pub mod strategy;
pub mod vv;

pub use hlc::Hlc;
pub use intent::{Intent, IntentClass, IntentError, Op};
pub use strategy::Strategy;
pub use vv::{Causality, VersionVector};
