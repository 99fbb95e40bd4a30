//! `foreshadow-lab`: a local multi-region environment (PostgreSQL clusters,
//! sidecars, a WAN-delay proxy) for the demo, the integration tests, fault
//! injection and the benchmarks.

pub mod bench;
pub mod certs;
pub mod chaos;
pub mod cluster;
pub mod demo;
pub mod engine;
pub mod lab;
pub mod proc;
pub mod proxy;
pub mod spec;
pub mod workload;

pub use lab::{Fault, Lab, UpOptions};
