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
use std::time::Duration;
use tokio_postgres::{Client, Statement};

pub struct ApplySession {
    client: Client,
    peer: String,
    origin: String,
    /// `foreshadow.apply_transaction`, prepared once for the session.
    apply_stmt: Statement,
    /// A local transaction is open for a peer transaction that arrives in
    /// chunks (see `apply_chunk`).
    in_large: bool,
}

/// Local transactions sent to the primary before waiting for answers.
const PIPELINE: usize = 64;
/// How often a peer transaction that met a concurrent writer is retried in
/// place before the lane reconnects and tries again with back-off.
const RETRIES: u32 = 20;
/// Most intents in one local transaction when catching up.
const GROUP_INTENTS: usize = 500;
/// How long a grouped apply waits for a local writer's lock before it gives
/// way (well below the 1 s after which PostgreSQL looks for deadlocks).
const GROUP_LOCK_TIMEOUT_MS: i32 = 200;

/// What one applied batch did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub transactions: usize,
    pub intents: usize,
    pub changed_rows: i32,
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
            .prepare("SELECT foreshadow.apply_transaction($1, $2, $3, $4, $5, $6)")
            .await
            .map_err(map)?;
        Ok(ApplySession {
            client,
            peer: peer.to_owned(),
            origin,
            apply_stmt,
            in_large: false,
        })
    }

    /// The peer position applied up to, committed with the applies
    /// themselves.
    pub async fn progress(&self) -> Result<Lsn, Error> {
        Ok(self.progress_both().await?.1)
    }

    /// (flushed, applied): the peer position whose applies are on disk
    /// here, and the one applied up to, read in one round trip.
    pub async fn progress_both(&self) -> Result<(Lsn, Lsn), Error> {
        let row = self
            .client
            .query_one(
                "SELECT pg_catalog.pg_replication_origin_progress($1, true)::text, \
                        pg_catalog.pg_replication_origin_progress($1, false)::text",
                &[&self.origin],
            )
            .await
            .map_err(|e| Error::from_pg(format!("reading progress of {}", self.origin), e))?;
        let lsn = |i: usize| -> Result<Lsn, Error> {
            match row.get::<_, Option<String>>(i) {
                None => Ok(Lsn(0)),
                Some(text) => text
                    .parse()
                    .map_err(|e| Error::protocol("reading origin progress", e)),
            }
        };
        Ok((lsn(0)?, lsn(1)?))
    }

    /// Applies the transactions past `progress`, in the peer's commit order,
    /// each in a local transaction of its own that also records the new
    /// progress. One per peer transaction keeps row locks as short as the
    /// peer's own transaction held them, so local writers are not queued
    /// behind a batch and lock order is the writer's. Up to `PIPELINE` are
    /// sent before the answers are read (each refuses to run unless the one
    /// before it committed, see `foreshadow.apply_transaction`).
    ///
    /// When more than a pipeline's worth is waiting (catching up), runs of
    /// peer transactions are applied together, up to `GROUP_INTENTS` intents
    /// per local transaction, with a short lock timeout: if one meets a
    /// local writer's lock or fails, this call goes on one peer transaction
    /// at a time.
    ///
    /// A peer transaction that cannot apply (a column missing here, a
    /// constraint, a lock, the server) is an error: nothing of it is kept,
    /// the reason is recorded in `foreshadow.peer_stats.last_error`, and the
    /// caller retries from the durable progress. Only intents that can
    /// never apply here are kept as dead letters, by the extension.
    pub async fn apply(&mut self, txns: &[Transaction], progress: Lsn) -> Result<Applied, Error> {
        let todo: Vec<(&Transaction, String)> = txns
            .iter()
            .filter(|t| t.end_lsn > progress)
            .map(|t| (t, batch(&t.intents)))
            .collect();
        let mut applied = Applied::default();
        let mut prev = progress;
        let mut next = 0;
        let mut group = todo.len() > PIPELINE;
        let mut retries = 0u32;
        while next < todo.len() {
            let units = units(&todo[next..], next, group);
            let mut prevs = Vec::with_capacity(units.len());
            for u in &units {
                prevs.push(prev.to_string());
                prev = todo[u.last].0.end_lsn;
            }
            let sent = units.iter().zip(&prevs).map(|(u, prev)| {
                let t = todo[u.last].0;
                let (lsn, at) = (t.end_lsn.to_string(), pg_epoch_us_to_utc(t.timestamp_us));
                let lock_timeout_ms: i32 = if u.last > u.first {
                    GROUP_LOCK_TIMEOUT_MS
                } else {
                    0
                };
                let (stmt, client, batch, peer) =
                    (&self.apply_stmt, &self.client, &u.batch, &self.peer);
                async move {
                    client
                        .query_one(stmt, &[peer, batch, prev, &lsn, &at, &lock_timeout_ms])
                        .await
                }
            });
            let answers = futures_util::future::join_all(sent).await;
            for (u, answer) in units.iter().zip(answers) {
                match answer {
                    Ok(row) if row.get::<_, i32>(0) >= 0 => {
                        applied.add(&todo[u.first..=u.last], row.get(0));
                        next = u.last + 1;
                    }
                    Ok(_) => {
                        return Err(Error::transient(
                            format!("applying intents from peer {}", self.peer),
                            "a pipelined transaction found the progress out of step",
                        ))
                    }
                    // A group that met a lock or failed: again one peer
                    // transaction at a time, from this one on (the ones
                    // sent after it did nothing).
                    Err(e) if u.last > u.first => {
                        tracing::info!(
                            peer = %self.peer, error = %Error::from_pg("applying grouped peer transactions", e),
                            "applying one peer transaction at a time"
                        );
                        group = false;
                        break;
                    }
                    // Another writer got there first (the same new key, a
                    // lock): the transaction rolled back whole; again, here.
                    Err(e) if crate::error::met_concurrent_writer(&e) && retries < RETRIES => {
                        retries += 1;
                        tracing::debug!(peer = %self.peer, error = %e, retries, "retrying a peer transaction");
                        tokio::time::sleep(Duration::from_millis(10 * u64::from(retries))).await;
                        break;
                    }
                    Err(e) => {
                        let e = Error::from_pg(
                            format!(
                                "applying the peer transaction ending at {} from peer {}",
                                todo[u.first].0.end_lsn, self.peer
                            ),
                            e,
                        );
                        self.note_error(&e).await;
                        return Err(e);
                    }
                }
            }
            prev = if next > 0 {
                todo[next - 1].0.end_lsn
            } else {
                progress
            };
        }
        Ok(applied)
    }

    /// Whether a peer transaction is being applied in chunks.
    pub fn in_large(&self) -> bool {
        self.in_large
    }

    /// Applies the first part of a peer transaction too large to hold in
    /// memory, in a local transaction that stays open: `finish_large`
    /// applies the rest and commits it with the peer's progress, so the
    /// peer transaction is applied exactly once, as one local transaction.
    /// On any error the connection is dropped, which rolls it back.
    pub async fn apply_chunk(&mut self, intents: &[Vec<u8>], progress: Lsn) -> Result<(), Error> {
        let ctx = format!(
            "applying part of a large transaction from peer {}",
            self.peer
        );
        if !self.in_large {
            self.client
                .batch_execute("BEGIN")
                .await
                .map_err(|e| Error::from_pg(ctx.clone(), e))?;
            self.in_large = true;
        }
        let (no_lsn, no_time): (Option<String>, Option<DateTime<Utc>>) = (None, None);
        self.run_large(&ctx, intents, progress, &no_lsn, &no_time)
            .await
    }

    /// The rest of a peer transaction begun with `apply_chunk`, its
    /// progress, and the commit.
    pub async fn finish_large(&mut self, t: &Transaction, progress: Lsn) -> Result<(), Error> {
        let ctx = format!("applying a large transaction from peer {}", self.peer);
        let (lsn, at) = (
            Some(t.end_lsn.to_string()),
            Some(pg_epoch_us_to_utc(t.timestamp_us)),
        );
        self.run_large(&ctx, &t.intents, progress, &lsn, &at)
            .await?;
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| Error::from_pg(ctx, e))?;
        self.in_large = false;
        Ok(())
    }

    async fn run_large(
        &mut self,
        ctx: &str,
        intents: &[Vec<u8>],
        progress: Lsn,
        lsn: &Option<String>,
        at: &Option<DateTime<Utc>>,
    ) -> Result<(), Error> {
        let answer = self
            .client
            .query_one(
                &self.apply_stmt,
                &[
                    &self.peer,
                    &batch(intents),
                    &progress.to_string(),
                    lsn,
                    at,
                    &0i32,
                ],
            )
            .await;
        match answer {
            Ok(row) if row.get::<_, i32>(0) >= 0 => Ok(()),
            Ok(_) => Err(Error::transient(ctx, "the progress was out of step")),
            Err(e) => {
                let e = Error::from_pg(ctx, e);
                self.note_error(&e).await;
                Err(e)
            }
        }
    }

    /// Makes a stopped lane visible in `foreshadow.peer_stats` (best effort:
    /// the connection may be what failed; the log has it either way).
    /// Refuses the lane while a resync from the peer is unfinished.
    pub async fn refuse_unfinished_resync(&self) -> Result<(), Error> {
        crate::resync::unfinished(&self.client, &self.peer).await
    }

    pub async fn note_error(&self, e: &Error) {
        let noted = self
            .client
            .execute(
                "SELECT foreshadow.note_lane_error($1, $2)",
                &[&self.peer, &e.to_string()],
            )
            .await;
        if let Err(n) = noted {
            tracing::debug!(peer = %self.peer, error = %n, "could not record the lane error");
        }
    }
}

impl Applied {
    fn add(&mut self, done: &[(&Transaction, String)], changed: i32) {
        self.transactions += done.len();
        self.intents += done.iter().map(|(t, _)| t.intents.len()).sum::<usize>();
        self.changed_rows += changed;
    }
}

/// Peer transactions `todo[first..=last]` (indexes into the whole list)
/// applied as one local transaction, their intents as one JSON array.
struct Unit {
    first: usize,
    last: usize,
    batch: String,
}

/// The next units to send: up to `PIPELINE`, from the start of `rest` (which
/// begins at index `offset`); each one peer transaction, or up to
/// `GROUP_INTENTS` intents' worth of them if `group`.
fn units(rest: &[(&Transaction, String)], offset: usize, group: bool) -> Vec<Unit> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < rest.len() && out.len() < PIPELINE {
        let first = i;
        let mut intents = 0;
        let mut parts: Vec<&str> = Vec::new();
        loop {
            let (t, batch) = &rest[i];
            intents += t.intents.len();
            // Each batch is a JSON array: keep what is between the brackets.
            let inner = &batch[1..batch.len() - 1];
            if !inner.is_empty() {
                parts.push(inner);
            }
            i += 1;
            let more =
                group && i < rest.len() && intents + rest[i].0.intents.len() <= GROUP_INTENTS;
            if !more {
                break;
            }
        }
        out.push(Unit {
            first: offset + first,
            last: offset + i - 1,
            batch: format!("[{}]", parts.join(",")),
        });
    }
    out
}

/// A peer transaction's intents as one JSON array. What is not JSON at all
/// goes in as a JSON string, so that the extension keeps it as a dead
/// letter instead of the whole batch failing to parse.
fn batch(intents: &[Vec<u8>]) -> String {
    let mut batch = String::from("[");
    for raw in intents {
        if batch.len() > 1 {
            batch.push(',');
        }
        let json = std::str::from_utf8(raw)
            .ok()
            .filter(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
        match json {
            Some(text) => batch.push_str(text),
            None => batch.push_str(
                &serde_json::to_string(&String::from_utf8_lossy(raw)).expect("a string serialises"),
            ),
        }
    }
    batch.push(']');
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(end: u64, intents: usize) -> Transaction {
        let intent = |n: usize| {
            format!(
                r#"{{"v":2,"origin":"a","hlc":{n},"schema":"public","table":"t","op":"delete","key":{{"id":{n}}},"row":null,"vv":{{"a":1}},"strategy":"lww"}}"#
            )
            .into_bytes()
        };
        Transaction {
            end_lsn: Lsn(end),
            timestamp_us: 0,
            intents: (0..intents).map(intent).collect(),
        }
    }

    #[test]
    fn groups_only_when_asked_and_within_bounds() {
        let txns: Vec<Transaction> = (1..=300).map(|i| txn(i, 3)).collect();
        let todo: Vec<(&Transaction, String)> =
            txns.iter().map(|t| (t, batch(&t.intents))).collect();
        let one_by_one = units(&todo, 0, false);
        assert_eq!(one_by_one.len(), PIPELINE);
        assert!(one_by_one.iter().all(|u| u.first == u.last));
        let grouped = units(&todo[10..], 10, true);
        assert_eq!(grouped[0].first, 10);
        // 3 intents each: 166 transactions fit in 500 intents.
        assert_eq!(grouped[0].last, 10 + 165);
        assert_eq!(grouped[1].first, 176);
        assert_eq!(grouped.last().unwrap().last, 299);
        let batch: serde_json::Value = serde_json::from_str(&grouped[0].batch).unwrap();
        assert_eq!(batch.as_array().unwrap().len(), 166 * 3);
    }

    #[test]
    fn what_is_not_json_travels_as_a_string() {
        let mut t = txn(1, 2);
        t.intents[1] = b"not json \"at\" all".to_vec();
        let batch: serde_json::Value = serde_json::from_str(&batch(&t.intents)).unwrap();
        assert!(batch[0].is_object());
        assert_eq!(batch[1], serde_json::json!("not json \"at\" all"));
    }

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
