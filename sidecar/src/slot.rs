//! This region's replication slot on a peer, created on first start: the
//! peer keeps every intent this region has not yet durably applied.

use crate::config::slot_safe;
use crate::error::Error;
use crate::pgoutput::Lsn;
use std::time::Duration;
use tokio_postgres::Client;

/// Makes sure slot `foreshadow_<region>` exists on the peer; returns its
/// name. A missing slot is created only if this region has applied nothing
/// from the peer yet (`applied`): otherwise the slot was dropped, or the
/// peer failed over or was restored, and the intents between what this
/// region applied and now may be gone. Re-creating it at the current
/// position would skip them silently, so the lane stops for an operator
/// (`foreshadow-sidecar --resync-peer`, docs/operations.md).
pub async fn ensure(
    client: &Client,
    peer: &str,
    region: &str,
    applied: Lsn,
    timeout: Duration,
) -> Result<String, Error> {
    let slot = format!("foreshadow_{}", slot_safe(region));
    let what = format!("creating slot {slot} on peer {peer}");
    let exists = bounded(
        timeout,
        &what,
        client.query_opt(
            "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        ),
    )
    .await?
    .is_some();
    if !exists && applied > Lsn(0) {
        return Err(Error::protocol(
            format!("replicating from peer {peer}"),
            format!(
                "replication slot {slot} is missing on the peer, but this region has applied its \
                 intents up to {applied}: it was dropped, or the peer failed over or was restored, \
                 and intents may have been lost. Nothing was re-created. Resynchronise with \
                 `foreshadow-sidecar --config <file> --resync-peer {peer}`"
            ),
        ));
    }
    if !exists {
        bounded(
            timeout,
            &what,
            client.query_opt(
                "SELECT 1 FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            ),
        )
        .await?;
        tracing::info!(peer, slot, "created replication slot on peer");
    }
    Ok(slot)
}

async fn bounded<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| Error::timeout(what))?
        .map_err(|e| Error::from_pg(what, e))
}
