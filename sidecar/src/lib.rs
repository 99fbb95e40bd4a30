//! Foreshadow's per-region sidecar. `run` replicates from every peer until
//! the shutdown signal; the binary in `main.rs` only wires it up, so the lab
//! and tests can drive the same code.

pub mod apply;
pub mod config;
mod connect;
pub mod error;
mod peer;
mod periodic;
pub mod pgoutput;
pub mod resync;
mod seals;
pub mod shutdown;
pub mod slot;
pub mod stream;
pub mod tls;

pub use config::Config;

/// Replicates from every peer concurrently; returns when all have stopped
/// after `shutdown` turned true. A peer that is down does not hold up the
/// others: each has its own task, connections and back-off.
pub async fn run(config: Config, shutdown: tokio::sync::watch::Receiver<bool>) {
    tracing::info!(region = %config.region, peers = config.peers.len(), "foreshadow sidecar starting");
    let tasks: Vec<_> = config
        .peers
        .iter()
        .map(|p| tokio::spawn(supervise(config.clone(), p.clone(), shutdown.clone())))
        .chain([tokio::spawn(periodic::run(
            config.clone(),
            shutdown.clone(),
        ))])
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    tracing::info!(region = %config.region, "foreshadow sidecar stopped");
}

/// Runs one peer's task, and runs it again (after a back-off) if it
/// panics: a bug met by one peer's data leaves no half-alive sidecar, and
/// the task resumes from the durable progress like after any failure.
async fn supervise(config: Config, p: config::Peer, shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut backoff = std::time::Duration::from_secs(1);
    loop {
        let task = tokio::spawn(peer::replicate(config.clone(), p.clone(), shutdown.clone()));
        match task.await {
            Err(e) if e.is_panic() && !*shutdown.borrow() => {
                tracing::error!(peer = %p.name, error = %e, "the peer's task panicked; restarting it");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.apply.max_backoff());
            }
            _ => return,
        }
    }
}
