//! Forgetting what a merge or vv table keeps of a row once no region can
//! still need it (docs/shadow-protocol.md, "Forgetting settled versions"):
//! a resolved conflict's leaves (merge) and a deleted row's tombstone
//! (merge, vv).
//!
//! Leaves are kept so that a write concurrent with one of them is folded
//! with all of them, the same in every region. No such write can come from
//! a region once its row's version has reached the join of the leaves:
//! every write it makes after that is above it (R1: a write is based on
//! the applied version, which only grows). So each region notes, when its
//! row settles at a version worth forgetting (`note`), and its next
//! heartbeat tells the others (`take`, `hear`), on its intent stream: after
//! every write it made before. A region forgets a closed conflict's leaves,
//! or a tombstone, once every other region has said so of a version at
//! least as high (`collect_settled`, the model's `stability::forgettable`).

use crate::row_versions::{Found, Store};
use crate::spi::run_kept;
use foreshadow_model::stability::{forgettable, Settled};
use foreshadow_model::{Causality, Strategy, VersionVector};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::BTreeMap;

const NOTE_SQL: &str = "INSERT INTO foreshadow.settled AS s (relid, key, vv) VALUES ($1, $2, $3) \
   ON CONFLICT (relid, key) DO UPDATE SET vv = EXCLUDED.vv";

/// Notes that row `key` of `relid` is here at version `vv` (a later note of
/// the same row replaces it: a row's version only grows), for the next
/// heartbeat. Called where a merge table's conflict closes with its leaves
/// kept, and where a merge or vv row is deleted.
pub fn note(client: &mut SpiClient<'_>, relid: pg_sys::Oid, key: &str, vv: &VersionVector) {
    let vv = serde_json::to_string(vv).expect("a version vector serialises");
    run_kept(
        client,
        NOTE_SQL,
        &[pg_sys::OIDOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
        &[relid.into(), key.into(), vv.into()],
    );
}

/// At most this many rows in one heartbeat; the rest go in the next.
const PER_HEARTBEAT: i64 = 1_000;

/// Runs with `search_path` pinned (heartbeat): plain names are pg_catalog's.
const TAKE_SQL: &str = "WITH taken AS (\
     DELETE FROM foreshadow.settled s \
      WHERE s.ctid = ANY (ARRAY(SELECT ctid FROM foreshadow.settled LIMIT $1 FOR UPDATE SKIP LOCKED)) \
     RETURNING s.relid, s.key, s.vv) \
   SELECT n.nspname::text, c.relname::text, taken.key, taken.vv \
     FROM taken JOIN pg_class c ON c.oid = taken.relid \
     JOIN pg_namespace n ON n.oid = c.relnamespace";

/// The rows noted since the last heartbeat, removed here: the heartbeat
/// that carries them commits in the same transaction. A note an apply is
/// writing is left for the next heartbeat, not waited for (an apply can
/// note many rows, in any order: waiting could deadlock).
pub fn take(client: &mut SpiClient<'_>) -> Vec<Settled> {
    run_kept(
        client,
        TAKE_SQL,
        &[pg_sys::INT8OID],
        &[PER_HEARTBEAT.into()],
    )
    .into_iter()
    .filter_map(|row| {
        Some(Settled {
            schema: row[0].clone()?,
            table: row[1].clone()?,
            key: serde_json::from_str(row[2].as_deref()?).ok()?,
            vv: serde_json::from_str(row[3].as_deref()?).ok()?,
        })
    })
    .collect()
}

const HEAR_SQL: &str = "INSERT INTO foreshadow.settled_by AS b (relid, key, region, vv) \
   VALUES ($1, $2, $3, $4) ON CONFLICT (relid, key, region) DO UPDATE SET vv = EXCLUDED.vv, heard_at = now()";

/// Records what a peer's heartbeat says has settled there (rows of tables
/// not global here are nothing to this region).
pub fn hear(client: &mut SpiClient<'_>, origin: &str, settled: &[Settled]) {
    for s in settled {
        let Some(t) = crate::catalog::table(client, &s.schema, &s.table) else {
            continue;
        };
        let key = serde_json::to_string(&s.key).expect("a key serialises");
        let vv = serde_json::to_string(&s.vv).expect("a version vector serialises");
        run_kept(
            client,
            HEAR_SQL,
            &[
                pg_sys::OIDOID,
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
            ],
            &[t.relid.into(), key.into(), origin.into(), vv.into()],
        );
    }
}

/// What every region said of row `key` (`settled_by`), read without
/// locking (an apply must not wait on `collect_settled`).
const SAID_ALL_SQL: &str = "SELECT b.region, b.vv FROM foreshadow.settled_by b \
    WHERE b.relid = $1 AND b.key = $2";

/// A write or resolution (version `vv`) arriving at a row of `t` whose
/// tombstone is held here (`cur`) and concurrent with it: the writer
/// wrote the key again after forgetting the tombstone (`bump_fresh` keeps
/// such a write from looking older). If this region may forget the
/// tombstone as well — exactly what `collect_settled` would decide at its
/// next call: every other region has said it is past it, no `not_global`
/// dead letter could still be applied late, no region replicating here is
/// missing from `foreshadow.regions` — it is forgotten now, first (returns
/// None), and the write applies as the row's first version, as where it
/// was made, instead of as a conflict with a tombstone only this region
/// still holds (leaves, or a deleted sibling, no other region has). Not
/// while replaying dead letters. What the regions said of the row goes
/// with it, as after `collect_settled`.
pub fn forgotten_by(
    client: &mut SpiClient<'_>,
    store: &Store,
    t: &crate::catalog::Table,
    key: &str,
    vv: &VersionVector,
    cur: Option<Found>,
) -> Option<Found> {
    let Some(h) = cur.as_ref().map(|f| &f.version) else {
        return cur;
    };
    if !h.deleted || vv.compare(&h.vv) != Causality::Concurrent || crate::dead_letters::replaying()
    {
        return cur;
    }
    let Some(peers) = may_forget(client) else {
        return cur;
    };
    let said = said(client, SAID_ALL_SQL, t.relid, key);
    let verdict = verdict(t.strategy, &h.vv, true, h.leaves.as_deref(), &said, &peers);
    if !matches!(verdict, Verdict::Row) {
        return cur;
    }
    store.forget(cur?);
    run_kept(
        client,
        USED_SQL,
        &[pg_sys::OIDOID, pg_sys::TEXTOID],
        &[t.relid.into(), key.into()],
    );
    None
}

/// The other regions, if this region may forget anything now: they are
/// known (`foreshadow.regions`), every region replicating here is among
/// them, and no intent is kept as a `not_global` dead letter
/// (`retry_dead_letters()` may still apply such an intent, as old as it
/// is: what it could be concurrent with stays).
fn may_forget(client: &mut SpiClient<'_>) -> Option<Vec<String>> {
    let me = crate::gucs::region();
    let peers: Vec<String> = crate::gucs::regions()
        .into_iter()
        .filter(|r| *r != me)
        .collect();
    let may = !peers.is_empty()
        && !crate::tombstones::unlisted_peer(client, "settled versions")
        && run_kept(client, KEPT_SQL, &[], &[]).is_empty();
    may.then_some(peers)
}

/// What the regions said of row `key` of `relid`, by region (`sql`: one of
/// the reads of `settled_by` by relid and key).
fn said(
    client: &mut SpiClient<'_>,
    sql: &str,
    relid: pg_sys::Oid,
    key: &str,
) -> BTreeMap<String, VersionVector> {
    run_kept(
        client,
        sql,
        &[pg_sys::OIDOID, pg_sys::TEXTOID],
        &[relid.into(), key.into()],
    )
    .into_iter()
    .filter_map(|r| Some((r[0].clone()?, serde_json::from_str(r[1].as_deref()?).ok()?)))
    .collect()
}

/// At most this many rows per call, so that one call does not hold the
/// sidecar's connection (and its fallbacks).
const BATCH: i64 = 10_000;

/// Runs with `search_path` pinned (collect_settled). What a region said of
/// a row its version here has already passed (and keeps nothing of) can
/// no longer help forget anything.
const PASSED_SQL: &str = "DELETE FROM foreshadow.settled_by WHERE ctid = ANY (ARRAY(\
    SELECT b.ctid FROM foreshadow.settled_by b JOIN foreshadow.row_versions v \
        ON v.relid = b.relid AND v.key = b.key \
     WHERE v.leaves IS NULL AND NOT v.deleted \
       AND NOT EXISTS (SELECT 1 FROM jsonb_each_text(b.vv::jsonb) e \
                        WHERE coalesce((v.vv::jsonb ->> e.key)::int8, 0) < e.value::int8) \
       FOR UPDATE OF b SKIP LOCKED))";

/// Runs with `search_path` pinned (collect_settled). What a region said of
/// a row with no version here, an hour ago or more: the row's tombstone was
/// already forgotten here (a note said again), or the writes that make the
/// row here are still on the way from a third region — which an hour has
/// long delivered, unless a lane is stopped. Dropping it only means that
/// row, if it comes, is not forgotten on that word; kept, it would never
/// go.
const UNUSED_SQL: &str = "DELETE FROM foreshadow.settled_by WHERE ctid = ANY (ARRAY(\
    SELECT b.ctid FROM foreshadow.settled_by b \
     WHERE b.heard_at < now() - interval '1 hour' AND NOT EXISTS \
       (SELECT 1 FROM foreshadow.row_versions v WHERE v.relid = b.relid AND v.key = b.key) \
       FOR UPDATE SKIP LOCKED))";

/// An intent kept because its table was not global here.
const KEPT_SQL: &str = "SELECT 1 FROM foreshadow.dead_letters WHERE kind = 'not_global' LIMIT 1";

/// Rows that every other region has said something of.
const CANDIDATES_SQL: &str = "SELECT b.relid::text, b.key FROM foreshadow.settled_by b \
    WHERE b.region = ANY ($1::text[]) \
    GROUP BY b.relid, b.key HAVING count(*) = cardinality($1::text[]) LIMIT $2";

/// What the regions said of a row, unless an apply is recording more of it
/// (then: next time). Neither this nor the version's lock waits: an apply
/// holding one of them may want the other.
const SAID_SQL: &str = "SELECT b.region, b.vv FROM foreshadow.settled_by b \
    WHERE b.relid = $1 AND b.key = $2 FOR UPDATE SKIP LOCKED";

/// The row's version, unless a writer holds it (then: next time).
const LOCK_SQL: &str = "SELECT v.vv, v.deleted::text, v.leaves FROM foreshadow.row_versions v \
    WHERE v.relid = $1 AND v.key = $2 FOR UPDATE SKIP LOCKED";
const FORGET_LEAVES_SQL: &str =
    "UPDATE foreshadow.row_versions v SET leaves = NULL WHERE v.relid = $1 AND v.key = $2";
const FORGET_ROW_SQL: &str =
    "DELETE FROM foreshadow.row_versions v WHERE v.relid = $1 AND v.key = $2";
const USED_SQL: &str = "DELETE FROM foreshadow.settled_by b WHERE b.relid = $1 AND b.key = $2";

/// What to do with a row every other region has said something of.
enum Verdict {
    Wait,
    /// Forget the leaves (the row and its version stay).
    Leaves,
    /// Forget the tombstone.
    Row,
    /// Nothing to forget: what the regions said is of no use.
    Drop,
}

/// Decides for the row of `t` whose version is `vv` (`deleted`, keeping
/// `leaves`), given what every other region said of it (`said`).
fn verdict(
    strategy: Option<Strategy>,
    vv: &VersionVector,
    deleted: bool,
    leaves: Option<&str>,
    said: &BTreeMap<String, VersionVector>,
    peers: &[String],
) -> Verdict {
    if !matches!(strategy, Some(Strategy::Merge | Strategy::Vv)) {
        return Verdict::Drop;
    }
    let closed = match leaves {
        // vv siblings stay until a write that has seen them all.
        Some(_) if strategy == Some(Strategy::Vv) => return Verdict::Wait,
        Some(text) => !crate::leaves::open(&crate::leaves::parse(text), vv),
        None if deleted => true,
        None => return Verdict::Drop,
    };
    match (forgettable(closed, vv, said, peers), deleted) {
        (false, _) => Verdict::Wait,
        (true, true) => Verdict::Row,
        (true, false) => Verdict::Leaves,
    }
}

/// Forgets the leaves of closed conflicts of merge tables, and the
/// tombstones of merge and vv tables, that every other region's heartbeats
/// allow. Returns how many rows it forgot something of. Nothing while
/// `foreshadow.regions` is unset or misses a region replicating here, nor
/// while an intent is kept as a `not_global` dead letter.
/// Internal: the sidecar calls it (grant_sidecar).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn collect_settled() -> i64 {
    Spi::connect_mut(|client| {
        let Some(peers) = may_forget(client) else {
            return 0;
        };
        run_kept(client, PASSED_SQL, &[], &[]);
        run_kept(client, UNUSED_SQL, &[], &[]);
        let candidates = run_kept(
            client,
            CANDIDATES_SQL,
            &[pg_sys::TEXTARRAYOID, pg_sys::INT8OID],
            &[peers.clone().into(), BATCH.into()],
        );
        let mut forgot = 0;
        for row in candidates {
            let [Some(relid), Some(key)] = &row[..] else {
                continue;
            };
            let relid = pg_sys::Oid::from(relid.parse::<u32>().unwrap_or(0));
            let args =
                || -> [pgrx::datum::DatumWithOid<'_>; 2] { [relid.into(), key.as_str().into()] };
            let types = [pg_sys::OIDOID, pg_sys::TEXTOID];
            let said = said(client, SAID_SQL, relid, key);
            if !peers.iter().all(|p| said.contains_key(p)) {
                continue;
            }
            let Some(v) = run_kept(client, LOCK_SQL, &types, &args()).pop() else {
                continue;
            };
            let (Some(vv), Some(deleted)) = (&v[0], &v[1]) else {
                continue;
            };
            let Ok(vv) = serde_json::from_str::<VersionVector>(vv) else {
                continue;
            };
            let strategy = crate::catalog::table_by_relid(client, relid).and_then(|t| t.strategy);
            let verdict = verdict(
                strategy,
                &vv,
                deleted == "true",
                v[2].as_deref(),
                &said,
                &peers,
            );
            let forget = match verdict {
                Verdict::Wait => continue,
                Verdict::Leaves => Some(FORGET_LEAVES_SQL),
                Verdict::Row => Some(FORGET_ROW_SQL),
                Verdict::Drop => None,
            };
            if let Some(sql) = forget {
                if forgot == 0 {
                    crate::tombstones::keep_clock(client);
                }
                run_kept(client, sql, &types, &args());
                forgot += 1;
            }
            run_kept(client, USED_SQL, &types, &args());
        }
        forgot
    })
}
