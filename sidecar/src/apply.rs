//! The apply session: one connection to this region's primary per peer,
//! tagged with the replication origin `foreshadow_from_<peer>`.
//!
//! The origin does two jobs. Capture triggers skip writes made in a session
//! with an origin set, so applied intents are not sent out again. And the
//! origin's progress (the peer LSN applied up to) is committed in the same
//! transaction as the intents it covers, so after a crash the sidecar knows
//! exactly which peer transactions are already applied: none is lost, none
//! applied twice.

use crate::error::Error;
use crate::pgoutput::{Lsn, Transaction};
use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use foreshadow_model::Intent;
use tokio_postgres::Client;

pub struct ApplySession {
    client: Client,
    peer: String,
    origin: String,
}

/// What one applied batch did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub transactions: usize,
    pub intents: usize,
    pub changed_rows: i32,
    pub rejected: usize,
}

fn pg_epoch_us_to_utc(us: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date")
        + ChronoDuration::microseconds(us)
}

impl ApplySession {
    pub async fn open(client: Client, peer: &str) -> Result<ApplySession, Error> {
        let origin = format!("foreshadow_from_{peer}");
        let ctx = format!("setting up replication origin {origin} on this region's primary");
        let map = |e| Error::from_pg(ctx.clone(), e);
        let exists = client
            .query_one(
                "SELECT pg_catalog.pg_replication_origin_oid($1)",
                &[&origin],
            )
            .await
            .map_err(map)?;
        if exists.get::<_, Option<u32>>(0).is_none() {
            client
                .execute(
                    "SELECT pg_catalog.pg_replication_origin_create($1)",
                    &[&origin],
                )
                .await
                .map_err(map)?;
        }
        client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                &[&origin],
            )
            .await
            .map_err(map)?;
        // Safe without waiting for the flush: the origin's progress is in the
        // same commit record, so after a crash the peer's transactions past
        // the last durable commit are read from the slot again.
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(map)?;
        Ok(ApplySession {
            client,
            peer: peer.to_owned(),
            origin,
        })
    }

    /// The peer position applied up to, committed with the applies themselves.
    pub async fn progress(&self) -> Result<Lsn, Error> {
        let row = self
            .client
            .query_one(
                "SELECT pg_catalog.pg_replication_origin_progress($1, true)::text",
                &[&self.origin],
            )
            .await
            .map_err(|e| Error::from_pg(format!("reading progress of {}", self.origin), e))?;
        match row.get::<_, Option<String>>(0) {
            None => Ok(Lsn(0)),
            Some(text) => text
                .parse()
                .map_err(|e| Error::protocol("reading origin progress", e)),
        }
    }

    /// Applies the transactions past `progress`, each in a local transaction
    /// of its own that also records the new progress, in the peer's commit
    /// order. One per peer transaction (not one per batch) keeps row locks
    /// as short as the peer's own transaction held them, so local writers
    /// are not queued behind a whole batch and lock order is the writer's
    /// (no deadlocks between apply and local transactions doing the same
    /// work). Malformed intents are kept in `foreshadow.dead_letters` with
    /// the reason, not applied.
    pub async fn apply(&mut self, txns: &[Transaction], progress: Lsn) -> Result<Applied, Error> {
        let mut applied = Applied::default();
        for t in txns.iter().filter(|t| t.end_lsn > progress) {
            let (changed, rejected) = self.apply_one(t).await?;
            applied.transactions += 1;
            applied.intents += t.intents.len();
            applied.changed_rows += changed;
            applied.rejected += rejected;
        }
        Ok(applied)
    }

    async fn apply_one(&mut self, t: &Transaction) -> Result<(i32, usize), Error> {
        let mut batch = Vec::from(&b"["[..]);
        let mut rejected = Vec::new();
        for raw in &t.intents {
            match Intent::decode(raw) {
                Ok(_) => {
                    if batch.len() > 1 {
                        batch.push(b',');
                    }
                    batch.extend_from_slice(raw);
                }
                Err(e) => rejected.push((String::from_utf8_lossy(raw).into_owned(), e.to_string())),
            }
        }
        batch.push(b']');
        let batch = String::from_utf8(batch).map_err(|e| Error::protocol("intent batch", e))?;
        let ctx = format!("applying intents from peer {}", self.peer);
        let map = |e| Error::from_pg(ctx.clone(), e);
        let (lsn, at) = (t.end_lsn.to_string(), pg_epoch_us_to_utc(t.timestamp_us));
        const APPLY: &str =
            "SELECT foreshadow.apply_transaction($1::text::jsonb, $2::text::pg_lsn, $3)";
        if rejected.is_empty() {
            // The common case: one statement, its own implicit transaction,
            // one round trip.
            let row = self
                .client
                .query_one(APPLY, &[&batch, &lsn, &at])
                .await
                .map_err(map)?;
            return Ok((row.get(0), 0));
        }
        let tx = self.client.transaction().await.map_err(map)?;
        for (raw, reason) in &rejected {
            tracing::warn!(peer = %self.peer, %reason, "malformed intent kept in foreshadow.dead_letters");
            tx.execute(
                "SELECT foreshadow.reject_intent($1, $2, $3)",
                &[&self.peer, &format!("malformed intent: {reason}"), raw],
            )
            .await
            .map_err(map)?;
        }
        let row = tx
            .query_one(APPLY, &[&batch, &lsn, &at])
            .await
            .map_err(map)?;
        tx.commit().await.map_err(map)?;
        Ok((row.get(0), rejected.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_postgres_epoch() {
        assert_eq!(
            pg_epoch_us_to_utc(0).to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
        assert_eq!(
            pg_epoch_us_to_utc(1_500_000).timestamp_millis(),
            946_684_801_500
        );
    }
}
