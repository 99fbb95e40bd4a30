//! One shutdown signal for every task, fed by SIGTERM and SIGINT.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

pub fn channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

/// Resolves on the first SIGTERM or SIGINT and tells every task to stop.
pub async fn on_signal(tx: watch::Sender<bool>) {
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutting down: finishing the batches in flight"
    );
    let _ = tx.send(true);
}
