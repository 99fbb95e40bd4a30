//! Reading a peer's intents through this region's replication slot on it.
//!
//! Always peek, apply, then advance: `pg_logical_slot_get_changes` would
//! consume changes even if the apply then failed.

use crate::config::slot_safe;
use crate::error::Error;
use crate::pgoutput::{self, Lsn, Transaction};
use std::time::Duration;
use tokio_postgres::Client;

pub struct PeerSource {
    client: Client,
    pub peer: String,
    slot: String,
    timeout: Duration,
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

impl PeerSource {
    /// Uses (and on first start creates) the slot `foreshadow_<region>` on the peer.
    pub async fn open(
        client: Client,
        peer: &str,
        region: &str,
        timeout: Duration,
    ) -> Result<PeerSource, Error> {
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
        if !exists {
            bounded(
                timeout,
                &what,
                client.execute(
                    "SELECT pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                ),
            )
            .await?;
            tracing::info!(peer, slot, "created replication slot on peer");
        }
        Ok(PeerSource {
            client,
            peer: peer.to_owned(),
            slot,
            timeout,
        })
    }

    /// The next committed transactions, up to about `max_changes` decoded rows.
    pub async fn peek(&self, max_changes: u32) -> Result<Vec<Transaction>, Error> {
        let what = format!("reading intents from peer {}", self.peer);
        let rows = bounded(
            self.timeout,
            &what,
            self.client.query(
                "SELECT data FROM pg_catalog.pg_logical_slot_peek_binary_changes($1, NULL, $2, \
                 'proto_version', '1', 'publication_names', 'foreshadow_intents', 'messages', 'true')",
                &[&self.slot, &(max_changes as i32)],
            ),
        )
        .await?;
        let data: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
        pgoutput::group(&data).map_err(|e| Error::protocol(what, e))
    }

    /// Lets the peer release WAL up to `lsn`: everything before it is applied here.
    pub async fn advance(&self, lsn: Lsn) -> Result<(), Error> {
        let what = format!("advancing slot {} on peer {}", self.slot, self.peer);
        bounded(
            self.timeout,
            &what,
            self.client.execute(
                "SELECT pg_catalog.pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&self.slot, &lsn.to_string()],
            ),
        )
        .await?;
        Ok(())
    }
}
