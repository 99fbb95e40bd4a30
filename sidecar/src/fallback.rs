//! The fallback clock of docs/shadow-protocol.md (R5): an open conflict on
//! this region's primary that has waited past `foreshadow.shadow_deadline`
//! for its owner's resolution is resolved here, by the primary, with the
//! same function (`foreshadow.resolve_overdue()`, which also resolves at
//! once the open conflicts of keys this region has become the owner of,
//! R7). The deadlines are the
//! primary's durable `detected_at`, so a restarted sidecar picks them up
//! where they were (R6). A primary that is down is waited for.

use crate::config::Config;
use std::time::Duration;
use tokio::sync::watch;

/// How often the primary is asked for overdue conflicts: well under the
/// deadline, so a fallback is late by at most this much.
const EVERY: Duration = Duration::from_millis(250);

pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) {
    let mut client = None;
    while !*shutdown.borrow() {
        if client.is_none() {
            match crate::connect::connect(
                &config.primary,
                "the primary",
                config.apply.peer_timeout(),
            )
            .await
            {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "fallback: cannot reach the primary; retrying")
                }
            }
        }
        if let Some(c) = &client {
            match c
                .query_one("SELECT foreshadow.resolve_overdue()", &[])
                .await
            {
                Ok(row) => {
                    let n: i64 = row.get(0);
                    if n > 0 {
                        tracing::warn!(
                            resolved = n,
                            "resolved open conflicts here: overdue (no resolution from their shadow within foreshadow.shadow_deadline), or of keys whose shadow this region has become"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::Error::from_pg("fallback", e), "fallback: resolving overdue conflicts failed; retrying");
                    client = None;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => {}
        }
    }
}
