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

    /// Applies transactions past `progress` in one local transaction and
    /// records the new progress in it. Malformed intents are kept in
    /// `foreshadow.dead_letters` with the reason, not applied.
    pub async fn apply(&mut self, txns: &[Transaction], progress: Lsn) -> Result<Applied, Error> {
        let todo: Vec<&Transaction> = txns.iter().filter(|t| t.end_lsn > progress).collect();
        let Some(last) = todo.last() else {
            return Ok(Applied::default());
        };
        let mut batch = Vec::from(&b"["[..]);
        let mut rejected = Vec::new();
        let mut applied = Applied {
            transactions: todo.len(),
            ..Applied::default()
        };
        for raw in todo.iter().flat_map(|t| t.intents.iter()) {
            applied.intents += 1;
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
            .query_one(
                "SELECT foreshadow.apply_intents($1::text::jsonb)",
                &[&batch],
            )
            .await
            .map_err(map)?;
        applied.changed_rows = row.get(0);
        applied.rejected = rejected.len();
        tx.execute(
            "SELECT pg_catalog.pg_replication_origin_xact_setup($1::text::pg_lsn, $2)",
            &[
                &last.end_lsn.to_string(),
                &pg_epoch_us_to_utc(last.timestamp_us),
            ],
        )
        .await
        .map_err(map)?;
        tx.commit().await.map_err(map)?;
        Ok(applied)
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
