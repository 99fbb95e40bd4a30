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

/// Local transactions sent to the primary before waiting for answers.
const PIPELINE: usize = 64;
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
            .prepare("SELECT foreshadow.apply_transaction($1, $2, $3, $4, $5)")
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
    /// local writer's lock, it gives way and this call goes on one peer
    /// transaction at a time.
    ///
    /// Malformed intents, and transactions that fail for their data, are
    /// applied intent by intent with the failing intents kept in
    /// `foreshadow.dead_letters`.
    pub async fn apply(&mut self, txns: &[Transaction], progress: Lsn) -> Result<Applied, Error> {
        let todo: Vec<(&Transaction, Prepared)> = txns
            .iter()
            .filter(|t| t.end_lsn > progress)
            .map(|t| prepare(t).map(|p| (t, p)))
            .collect::<Result<_, _>>()?;
        let mut applied = Applied::default();
        let mut prev = progress;
        let mut next = 0;
        let mut group = todo.len() > PIPELINE;
        while next < todo.len() {
            let units = units(&todo[next..], next, group);
            if units.is_empty() {
                let (t, p) = &todo[next];
                let changed = self.apply_safely(t, p).await?;
                applied.add(&todo[next..=next], changed, p.rejected.len());
                prev = t.end_lsn;
                next += 1;
                continue;
            }
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
                let (stmt, client, batch) = (&self.apply_stmt, &self.client, &u.batch);
                async move {
                    client
                        .query_one(stmt, &[batch, prev, &lsn, &at, &lock_timeout_ms])
                        .await
                }
            });
            let answers = futures_util::future::join_all(sent).await;
            for (u, answer) in units.iter().zip(answers) {
                let grouped = u.last > u.first;
                match answer {
                    Ok(row) if row.get::<_, i32>(0) >= 0 => {
                        applied.add(&todo[u.first..=u.last], row.get(0), 0);
                        next = u.last + 1;
                    }
                    Ok(_) => {
                        return Err(Error::transient(
                            format!("applying intents from peer {}", self.peer),
                            "a pipelined transaction found the progress out of step",
                        ))
                    }
                    // Grouped transactions that met a lock or a bad intent:
                    // again one by one, from this one on (the ones sent after
                    // it did nothing).
                    Err(e) if grouped && (worth_one_by_one(&e) || lock_conflict(&e)) => {
                        tracing::info!(
                            peer = %self.peer, error = %Error::from_pg("applying grouped peer transactions", e),
                            "applying one peer transaction at a time"
                        );
                        group = false;
                        break;
                    }
                    Err(e) if worth_one_by_one(&e) => {
                        let (t, p) = &todo[u.first];
                        tracing::warn!(
                            peer = %self.peer, lsn = %t.end_lsn,
                            error = %Error::from_pg("applying a peer transaction", e),
                            "applying a peer transaction failed; applying it intent by intent"
                        );
                        let changed = self.apply_safely(t, p).await?;
                        applied.add(&todo[u.first..=u.first], changed, 0);
                        next = u.first + 1;
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
            prev = if next > 0 {
                todo[next - 1].0.end_lsn
            } else {
                progress
            };
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
    fn add(&mut self, done: &[(&Transaction, Prepared)], changed: i32, rejected: usize) {
        self.transactions += done.len();
        self.intents += done.iter().map(|(t, _)| t.intents.len()).sum::<usize>();
        self.changed_rows += changed;
        self.rejected += rejected;
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
/// begins at index `offset`) up to the first transaction with malformed
/// intents; each one peer transaction, or up to `GROUP_INTENTS` intents'
/// worth of them if `group`.
fn units(rest: &[(&Transaction, Prepared)], offset: usize, group: bool) -> Vec<Unit> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < rest.len() && out.len() < PIPELINE && rest[i].1.rejected.is_empty() {
        let first = i;
        let mut intents = 0;
        let mut parts: Vec<&str> = Vec::new();
        loop {
            let (t, p) = &rest[i];
            intents += t.intents.len();
            // Each batch is a JSON array: keep what is between the brackets.
            let inner = &p.batch[1..p.batch.len() - 1];
            if !inner.is_empty() {
                parts.push(inner);
            }
            i += 1;
            let more = group
                && i < rest.len()
                && rest[i].1.rejected.is_empty()
                && intents + rest[i].0.intents.len() <= GROUP_INTENTS;
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

/// A lock that could not be had in time, or a deadlock.
fn lock_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code().map(|c| c.code()),
        Some("55P03") | Some("40P01") | Some("40001")
    )
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

    fn txn(end: u64, intents: usize) -> Transaction {
        let intent = |n: usize| {
            format!(
                r#"{{"v":1,"origin":"a","hlc":{n},"schema":"public","table":"t","op":"delete","key":{{"id":{n}}},"row":null,"vv":{{"a":1}},"strategy":"lww"}}"#
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
        let todo: Vec<(&Transaction, Prepared)> =
            txns.iter().map(|t| (t, prepare(t).unwrap())).collect();
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
    fn a_malformed_intent_ends_the_units() {
        let mut txns: Vec<Transaction> = (1..=5).map(|i| txn(i, 1)).collect();
        txns[2].intents[0] = b"not json".to_vec();
        let todo: Vec<(&Transaction, Prepared)> =
            txns.iter().map(|t| (t, prepare(t).unwrap())).collect();
        let u = units(&todo, 0, true);
        assert_eq!((u.len(), u[0].first, u[0].last), (1, 0, 1));
        assert!(units(&todo[2..], 2, true).is_empty());
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
