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
use tokio_postgres::{Client, Statement};

pub struct ApplySession {
    client: Client,
    peer: String,
    origin: String,
    /// `foreshadow.apply_transaction`, prepared once for the session.
    apply_stmt: Statement,
}

/// Peer transactions sent to the primary before waiting for answers.
const PIPELINE: usize = 64;

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
        let apply_stmt = client
            .prepare("SELECT foreshadow.apply_transaction($1, $2, $3, $4)")
            .await
            .map_err(map)?;
        Ok(ApplySession {
            client,
            peer: peer.to_owned(),
            origin,
            apply_stmt,
        })
    }

    /// The peer position applied up to, committed with the applies
    /// themselves; `flushed`: only what is on disk here.
    pub async fn progress(&self, flushed: bool) -> Result<Lsn, Error> {
        let row = self
            .client
            .query_one(
                "SELECT pg_catalog.pg_replication_origin_progress($1, $2)::text",
                &[&self.origin, &flushed],
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
    /// are not queued behind a whole batch and lock order is the writer's.
    /// Up to `PIPELINE` transactions are sent before the answers are read
    /// (each refuses to run unless the one before it committed, see
    /// `foreshadow.apply_transaction`). Malformed intents, and transactions
    /// that fail for their data, are applied intent by intent with the
    /// failing intents kept in `foreshadow.dead_letters`.
    pub async fn apply(&mut self, txns: &[Transaction], progress: Lsn) -> Result<Applied, Error> {
        let todo: Vec<(&Transaction, Prepared)> = txns
            .iter()
            .filter(|t| t.end_lsn > progress)
            .map(|t| prepare(t).map(|p| (t, p)))
            .collect::<Result<_, _>>()?;
        let mut applied = Applied::default();
        let mut prev = progress;
        let mut next = 0;
        while next < todo.len() {
            let clean = todo[next..]
                .iter()
                .take(PIPELINE)
                .take_while(|(_, p)| p.rejected.is_empty())
                .count();
            if clean == 0 {
                let (t, p) = &todo[next];
                applied.add(t, self.apply_safely(t, p).await?, p.rejected.len());
                prev = t.end_lsn;
                next += 1;
                continue;
            }
            let mut prevs = Vec::with_capacity(clean);
            for (t, _) in &todo[next..next + clean] {
                prevs.push(prev.to_string());
                prev = t.end_lsn;
            }
            let sent = todo[next..next + clean]
                .iter()
                .zip(&prevs)
                .map(|((t, p), prev)| {
                    let (lsn, at) = (t.end_lsn.to_string(), pg_epoch_us_to_utc(t.timestamp_us));
                    let stmt = &self.apply_stmt;
                    let client = &self.client;
                    let batch = &p.batch;
                    async move { client.query_one(stmt, &[batch, prev, &lsn, &at]).await }
                });
            let answers = futures_util::future::join_all(sent).await;
            for answer in answers {
                let (t, p) = &todo[next];
                match answer {
                    Ok(row) if row.get::<_, i32>(0) >= 0 => {
                        applied.add(t, row.get(0), 0);
                        next += 1;
                    }
                    Ok(_) => {
                        return Err(Error::transient(
                            format!("applying intents from peer {}", self.peer),
                            "a pipelined transaction found the progress out of step",
                        ))
                    }
                    Err(e) if worth_one_by_one(&e) => {
                        tracing::warn!(
                            peer = %self.peer, lsn = %t.end_lsn,
                            error = %Error::from_pg("applying a peer transaction", e),
                            "applying a peer transaction failed; applying it intent by intent"
                        );
                        applied.add(t, self.apply_safely(t, p).await?, 0);
                        next += 1;
                        // The ones sent after it did nothing: send them again.
                        break;
                    }
                    Err(e) => {
                        return Err(Error::from_pg(
                            format!("applying intents from peer {}", self.peer),
                            e,
                        ))
                    }
                }
            }
            prev = todo[next - 1].0.end_lsn;
        }
        Ok(applied)
    }

    /// The transaction intent by intent, in a local transaction that keeps
    /// malformed and failing intents as dead letters.
    async fn apply_safely(&mut self, t: &Transaction, p: &Prepared) -> Result<i32, Error> {
        let ctx = format!("applying intents from peer {}", self.peer);
        let map = |e| Error::from_pg(ctx.clone(), e);
        let tx = self.client.transaction().await.map_err(map)?;
        for (raw, reason) in &p.rejected {
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
                "SELECT foreshadow.apply_transaction_safely($1::text::jsonb, $2::text::pg_lsn, $3)",
                &[
                    &p.batch,
                    &t.end_lsn.to_string(),
                    &pg_epoch_us_to_utc(t.timestamp_us),
                ],
            )
            .await
            .map_err(map)?;
        tx.commit().await.map_err(map)?;
        Ok(row.get(0))
    }
}

impl Applied {
    fn add(&mut self, t: &Transaction, changed: i32, rejected: usize) {
        self.transactions += 1;
        self.intents += t.intents.len();
        self.changed_rows += changed;
        self.rejected += rejected;
    }
}

/// A peer transaction made ready to apply: its well-formed intents as one
/// JSON array, and the malformed ones with the reason.
struct Prepared {
    batch: String,
    rejected: Vec<(String, String)>,
}

fn prepare(t: &Transaction) -> Result<Prepared, Error> {
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
    Ok(Prepared { batch, rejected })
}

/// Whether a failed transaction should be applied again intent by intent
/// (the data or the table is at fault), rather than retried as a whole
/// after a pause (locks, cancellation, the server going away).
fn worth_one_by_one(e: &tokio_postgres::Error) -> bool {
    match e.code().map(|c| c.code()) {
        None => false,
        Some(code) => !["40", "53", "55", "57", "08", "58", "XX"]
            .iter()
            .any(|class| code.starts_with(class)),
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
