//! Foreshadow's per-region sidecar. `run` replicates from every peer until
//! the shutdown signal; the binary in `main.rs` only wires it up, so the lab
//! and tests can drive the same code.

pub mod apply;
pub mod config;
mod connect;
pub mod error;
mod peer;
pub mod pgoutput;
mod seals;
pub mod shutdown;
pub mod slot;
pub mod stream;

pub use config::Config;

/// Replicates from every peer concurrently; returns when all have stopped
/// after `shutdown` turned true. A peer that is down does not hold up the
/// others: each has its own task, connections and back-off.
pub async fn run(config: Config, shutdown: tokio::sync::watch::Receiver<bool>) {
    tracing::info!(region = %config.region, peers = config.peers.len(), "foreshadow sidecar starting");
    let tasks: Vec<_> = config
        .peers
        .iter()
        .map(|p| tokio::spawn(peer::replicate(config.clone(), p.clone(), shutdown.clone())))
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "a peer task panicked");
        }
    }
    tracing::info!(region = %config.region, "foreshadow sidecar stopped");
}
