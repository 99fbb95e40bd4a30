//! Replicating from one peer: connect, read its intents, apply them here,
//! advance its slot; on any failure wait (doubling up to a bound) and start
//! over from the durable progress. The peer's state is logged once per
//! change, not once per retry.

use crate::apply::ApplySession;
use crate::config::{ApplyConfig, Config, Peer};
use crate::connect::connect;
use crate::error::{Error, Kind};
use crate::source::PeerSource;
use std::time::Duration;
use tokio::sync::watch;

/// How the link to a peer is doing, as last logged.
#[derive(Clone, Debug, PartialEq)]
enum LinkState {
    Starting,
    Replicating,
    Failing(String),
}

struct Link {
    peer: String,
    state: LinkState,
}

impl Link {
    fn set(&mut self, next: LinkState) {
        if self.state == next {
            return;
        }
        match &next {
            LinkState::Replicating => tracing::info!(peer = %self.peer, "replicating from peer"),
            LinkState::Failing(reason) => {
                tracing::warn!(peer = %self.peer, %reason, "peer link down, retrying with back-off")
            }
            LinkState::Starting => {}
        }
        self.state = next;
    }
}

/// Sleeps unless shutdown is requested first; returns whether to go on.
async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => !*shutdown.borrow(),
        _ = shutdown.changed() => false,
    }
}

pub async fn replicate(config: Config, peer: Peer, mut shutdown: watch::Receiver<bool>) {
    let mut link = Link {
        peer: peer.name.clone(),
        state: LinkState::Starting,
    };
    let mut backoff = Duration::from_millis(100);
    while !*shutdown.borrow() {
        match session(&config, &peer, &mut shutdown, &mut link).await {
            Ok(()) => break,
            Err(e) => {
                let needs_operator = matches!(e.kind, Kind::NeedsOperator);
                let reason = if needs_operator {
                    format!("{e} (needs operator action)")
                } else {
                    e.to_string()
                };
                if needs_operator && link.state != LinkState::Failing(reason.clone()) {
                    tracing::error!(peer = %peer.name, error = %e, "peer link needs operator action");
                }
                link.set(LinkState::Failing(reason));
                if !pause(&mut shutdown, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(config.apply.max_backoff());
            }
        }
    }
    tracing::info!(peer = %peer.name, "stopped replicating from peer");
}

/// One connected stretch; returns `Ok` only on shutdown.
async fn session(
    config: &Config,
    peer: &Peer,
    shutdown: &mut watch::Receiver<bool>,
    link: &mut Link,
) -> Result<(), Error> {
    let ApplyConfig { batch_changes, .. } = config.apply;
    let timeout = config.apply.peer_timeout();
    let local = connect(&config.primary, "this region's primary", timeout).await?;
    let mut apply = ApplySession::open(local, &peer.name).await?;
    let remote = connect(&peer.dsn, &format!("peer {}", peer.name), timeout).await?;
    let source = PeerSource::open(remote, &peer.name, &config.region, timeout).await?;
    let mut progress = apply.progress().await?;
    link.set(LinkState::Replicating);
    // The batch in flight always finishes: shutdown is only looked at between batches.
    while !*shutdown.borrow() {
        let txns = source.peek(batch_changes).await?;
        let Some(last) = txns.last().map(|t| t.end_lsn) else {
            if !pause(shutdown, config.apply.poll_interval()).await {
                break;
            }
            continue;
        };
        let applied = apply.apply(&txns, progress).await?;
        if applied.transactions > 0 {
            tracing::debug!(peer = %peer.name, ?applied, upto = %last, "applied");
        }
        progress = progress.max(last);
        source.advance(last).await?;
    }
    Ok(())
}
