//! Forgetting tombstones (docs/operations.md, "Tombstones"): a deleted
//! row's version stays in `foreshadow.row_versions` only until no write it
//! must defeat can still arrive and no region can still need it re-sent
//! (the model's `stability::horizons`). Each region tells the others how
//! far that is for its own writes in a heartbeat on its intent stream
//! (`heartbeat`, called by its sidecar); `collect_tombstones` drops what
//! every region's heartbeats allow. Only tables whose rows are decided by
//! their stamp alone (`lww`, no counter columns) are collected: `merge` and
//! `vv` compare version vectors, and counters keep what resets erased.

use crate::spi::run_kept;
use foreshadow_model::stability::{horizons, Stability};
use foreshadow_model::{Hlc, Strategy};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::BTreeMap;

// run_kept reads every column as text.
const STATE_SQL: &str = "SELECT pending_hlc::pg_catalog.text, pending_xid::pg_catalog.text, \
   below::pg_catalog.text, seen::pg_catalog.text FROM foreshadow.heartbeat FOR UPDATE";
const SAVE_SQL: &str = "UPDATE foreshadow.heartbeat SET pending_hlc = $1, \
   pending_xid = $2::pg_catalog.xid8, below = $3, seen = $4::pg_catalog.jsonb, beat_at = pg_catalog.now(), \
   clock = GREATEST(clock, $5)";
/// Kept so that the clock never restarts below what this region has
/// announced or forgotten (clock::restore).
const KEEP_CLOCK_SQL: &str = "UPDATE foreshadow.heartbeat SET clock = GREATEST(clock, $1)";

/// Keeps the clock's reading: forgetting a version this region's later
/// writes must stay above (by stamp, or by `bump_fresh`) needs the clock
/// never to restart below it.
pub fn keep_clock(client: &mut SpiClient<'_>) {
    // A stamp, not a reading: a stamp restores the clock after a restart.
    let now = crate::clock::stamp_above(Hlc::ZERO).0.min(i64::MAX as u64) as i64;
    run_kept(client, KEEP_CLOCK_SQL, &[pg_sys::INT8OID], &[now.into()]);
}
const HEARD_SQL: &str =
    "SELECT region, below::pg_catalog.text, seen::pg_catalog.text FROM foreshadow.stability";

/// Every region's last heartbeat applied here.
fn heard(client: &mut SpiClient<'_>) -> BTreeMap<String, Stability> {
    run_kept(client, HEARD_SQL, &[], &[])
        .into_iter()
        .filter_map(|row| {
            let region = row[0].clone()?;
            let below = Hlc(row[1].as_deref()?.parse().ok()?);
            let seen = serde_json::from_str(row[2].as_deref()?).ok()?;
            Some((
                region,
                Stability {
                    below,
                    seen,
                    ..Stability::default()
                },
            ))
        })
        .collect()
}

/// Advances this region's heartbeat and sends it when it moved. A stamp
/// is safe (`below` may pass it) once every transaction that could have
/// taken a stamp up to it has ended: the clock is read, then the next
/// transaction id; a write takes its stamp after its transaction has an id
/// (its row is written first), so once the oldest running transaction is
/// at or past that id, every stamp up to the reading is committed or gone,
/// and committed before this heartbeat in the stream. Returns `below`.
/// Internal: the sidecar calls it (grant_sidecar).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn heartbeat() -> i64 {
    // First, while this transaction has no id of its own.
    let oldest = unsafe { pg_sys::GetOldestActiveTransactionId() };
    let now = crate::clock::now();
    let next = unsafe { pg_sys::ReadNextFullTransactionId() }.value;
    Spi::connect_mut(|client| {
        let state = run_kept(client, STATE_SQL, &[], &[])
            .pop()
            .unwrap_or_default();
        let field = |i: usize| state.get(i).cloned().flatten();
        let mut below: i64 = field(2).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut pending = field(0)
            .and_then(|h| h.parse::<i64>().ok())
            .zip(field(1).and_then(|x| x.parse::<u64>().ok()));
        if let Some((hlc, xid)) = pending {
            // xid is a full id; the oldest running one wraps at 2^32.
            if unsafe {
                pg_sys::TransactionIdFollowsOrEquals(
                    oldest,
                    pg_sys::TransactionId::from(xid as u32),
                )
            } {
                below = below.max(hlc + 1);
                pending = None;
            }
        }
        let pending = pending.unwrap_or((now.0 as i64, next));
        let seen: BTreeMap<String, Hlc> = heard(client)
            .into_iter()
            .map(|(r, s)| (r, s.below))
            .collect();
        let seen_text = serde_json::to_string(&seen).expect("stamps serialise");
        let moved = field(2).and_then(|s| s.parse().ok()) != Some(below)
            || field(3).and_then(|s| serde_json::from_str::<BTreeMap<String, Hlc>>(&s).ok())
                != Some(seen.clone());
        // What this heartbeat announces: its own clock's reading and the
        // other regions' `below`s.
        let announced = seen.values().map(|h| h.0).fold(now.0, u64::max);
        run_kept(
            client,
            SAVE_SQL,
            &[
                pg_sys::INT8OID,
                pg_sys::TEXTOID,
                pg_sys::INT8OID,
                pg_sys::TEXTOID,
                pg_sys::INT8OID,
            ],
            &[
                pending.0.into(),
                pending.1.to_string().into(),
                below.into(),
                seen_text.into(),
                (announced.min(i64::MAX as u64) as i64).into(),
            ],
        );
        if below > 0 {
            // Taken (and removed) only when a heartbeat will carry them.
            let settled = crate::settled::take(client);
            if moved || !settled.is_empty() {
                let below = Hlc(below as u64);
                crate::capture::emit_metadata("foreshadow", "stability", Strategy::Lww, now, |i| {
                    i.stability = Some(Stability {
                        below,
                        seen,
                        settled,
                    })
                });
            }
        }
        below
    })
}

const HEAR_SQL: &str = "INSERT INTO foreshadow.stability AS s (region, below, seen, heard_at) \
   VALUES ($1, $2, $3::pg_catalog.jsonb, pg_catalog.now()) \
   ON CONFLICT (region) DO UPDATE SET below = GREATEST(s.below, EXCLUDED.below), \
   seen = EXCLUDED.seen, heard_at = EXCLUDED.heard_at";

/// Records a peer's heartbeat (applied in its stream's order), and the
/// rows it says have settled there.
pub fn hear(client: &mut SpiClient<'_>, origin: &str, s: &Stability) {
    crate::settled::hear(client, origin, &s.settled);
    let seen = serde_json::to_string(&s.seen).expect("stamps serialise");
    run_kept(
        client,
        HEAR_SQL,
        &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::TEXTOID],
        &[origin.into(), (s.below.0 as i64).into(), seen.into()],
    );
}

/// Queued by capture and apply for every tombstone of a collectable table.
const QUEUE_SQL: &str = "INSERT INTO foreshadow.tombstones (relid, key, hlc, origin) \
   VALUES ($1, $2, $3, $4)";

/// Whether a table's tombstones are collected: rows decided by stamp alone.
pub fn collectable(strategy: Option<Strategy>, counters: &[String]) -> bool {
    strategy == Some(Strategy::Lww) && counters.is_empty()
}

/// Queues the tombstone just written for row `key` of `relid`.
pub fn queue(client: &mut SpiClient<'_>, relid: pg_sys::Oid, key: &str, hlc: Hlc, origin: &str) {
    run_kept(
        client,
        QUEUE_SQL,
        &[
            pg_sys::OIDOID,
            pg_sys::TEXTOID,
            pg_sys::INT8OID,
            pg_sys::TEXTOID,
        ],
        &[
            relid.into(),
            key.into(),
            (hlc.0 as i64).into(),
            origin.into(),
        ],
    );
}

/// At most this many per call, oldest first, so that one call after a long
/// partition does not hold the sidecar's connection (and its fallbacks).
const BATCH: i64 = 10_000;

/// Runs with `search_path` pinned (collect_tombstones): plain names and
/// operators are pg_catalog's.
const COLLECT_SQL: &str = "WITH h AS (\
     SELECT key AS origin, value::int8 AS below FROM jsonb_each_text($1::jsonb)), \
   due AS (\
     DELETE FROM foreshadow.tombstones q \
      WHERE q.ctid = ANY (ARRAY(\
        SELECT d.ctid FROM foreshadow.tombstones d JOIN h ON d.origin = h.origin \
         WHERE d.hlc < h.below ORDER BY d.hlc LIMIT $2)) \
     RETURNING q.relid, q.key, q.hlc, q.origin) \
   DELETE FROM foreshadow.row_versions v USING due, foreshadow.tables t \
    WHERE v.relid = due.relid AND v.key = due.key AND v.hlc = due.hlc AND v.origin = due.origin \
      AND v.deleted AND t.relid = v.relid AND t.strategy = 'lww' AND cardinality(t.counter_cols) = 0 \
   RETURNING 1";

/// The regions whose streams this region applies (its replication origins).
const CONSUMED_SQL: &str = "SELECT substr(roname, 17) FROM pg_replication_origin \
    WHERE starts_with(roname, 'foreshadow_from_')";

/// Whether a region replicates here that `foreshadow.regions` does not
/// list (warned of, naming `what` is not collected): its heartbeats are not
/// waited for, and its writes could need anything this region keeps.
pub fn unlisted_peer(client: &mut SpiClient<'_>, what: &str) -> bool {
    let regions = crate::gucs::regions();
    let consumed = run_kept(client, CONSUMED_SQL, &[], &[]);
    let Some(peer) = consumed
        .iter()
        .filter_map(|r| r[0].as_ref())
        .find(|p| !regions.contains(p))
    else {
        return false;
    };
    pgrx::warning!(
        "foreshadow: not collecting {what}: region {peer} replicates here but is not in foreshadow.regions"
    );
    true
}

/// The oldest stamp among the intents kept because their table was not
/// global here: retry_dead_letters() may apply them later, old stamps and
/// all, so no tombstone at or above it may go yet.
const KEPT_SQL: &str = "SELECT min((intent::jsonb ->> 'hlc')::int8)::text \
   FROM foreshadow.dead_letters WHERE kind = 'not_global'";

/// Drops the tombstones every region's heartbeats allow (a version written
/// since, by a later write of the row, stays). Returns how many. Nothing
/// while `foreshadow.regions` is unset or a region has not been heard from.
/// Internal: the sidecar calls it (grant_sidecar).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn collect_tombstones() -> i64 {
    let (me, regions) = (crate::gucs::region(), crate::gucs::regions());
    Spi::connect_mut(|client| {
        if unlisted_peer(client, "tombstones") {
            return 0;
        }
        let mut h = horizons(&me, &regions, &heard(client));
        if h.is_empty() {
            return 0;
        }
        let kept = run_kept(client, KEPT_SQL, &[], &[]);
        if let Some(oldest) = kept.first().and_then(|r| r[0].as_deref()?.parse().ok()) {
            h.values_mut().for_each(|v| *v = (*v).min(Hlc(oldest)));
        }
        keep_clock(client);
        let h: BTreeMap<&String, i64> = h
            .iter()
            .map(|(o, v)| (o, v.0.min(i64::MAX as u64) as i64))
            .collect();
        let h = serde_json::to_string(&h).expect("stamps serialise");
        run_kept(
            client,
            COLLECT_SQL,
            &[pg_sys::TEXTOID, pg_sys::INT8OID],
            &[h.into(), BATCH.into()],
        )
        .len() as i64
    })
}
