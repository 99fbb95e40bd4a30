//! The conflict history (`foreshadow.conflicts`): every conflict this
//! region resolved, with its kind in PostgreSQL's vocabulary, the two
//! leaves (this region's version of the row and the peer's write), where it
//! was resolved and how. Kept for `foreshadow.conflict_retention`, apart
//! from failures (`foreshadow.dead_letters`).
//!
//! A conflict is a peer's write that is concurrent with this region's
//! version of its row (neither had seen the other: their version vectors
//! say so), or one that finds its row missing. A region's own successive
//! writes, and a write that had seen the version here, are never one.

use crate::catalog::Table;
use crate::heap::Heaps;
use crate::row_versions::Version;
use crate::spi::run_kept;
use foreshadow_model::{Intent, Op};
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Closes the open conflict of a row: resolved, and how.
const CLOSE_SQL: &str = "UPDATE foreshadow.conflict_log SET resolved_by = $3, outcome = $4, \
       merge_calls = merge_calls OPERATOR(pg_catalog.+) $5::int, resolved_at = pg_catalog.clock_timestamp() \
     WHERE relid OPERATOR(pg_catalog.=) $1::oid AND key OPERATOR(pg_catalog.=) $2 AND resolved_at IS NULL \
     RETURNING id";
/// Skips rows another apply session is pruning (both would otherwise queue
/// on the same old rows inside their apply transactions), and open
/// conflicts, whatever their age: they hold the fallback's deadline.
const PRUNE_SQL: &str = "DELETE FROM foreshadow.conflict_log WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY( \
     SELECT id FROM foreshadow.conflict_log \
      WHERE detected_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(mins => $1::int)) \
        AND resolved_at IS NOT NULL \
      ORDER BY id LIMIT 10000 FOR UPDATE SKIP LOCKED))";
/// Entries past the retention are removed at most this often per session
/// (the view hides them at once).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

thread_local! {
    static LAST_PRUNE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// One conflict met applying a peer's write.
#[derive(Clone, Debug)]
pub struct Conflict {
    pub kind: &'static str,
    /// This region's version of the row, if it had one.
    pub local: Option<Version>,
    /// What was done: the peer's write `applied`, or this region's version
    /// `kept` (with the write's counter increments `kept, increments added`).
    pub outcome: &'static str,
    /// Strategy merge: the merge function's calls.
    pub merge_calls: i32,
    /// `local`, `shadow` or `fallback`; None: open, waiting for the key's
    /// owner (then `outcome` is empty until it is closed).
    pub resolved_by: Option<&'static str>,
}

/// The kind of conflict, if any, of applying `op` where the row's version
/// is `here` (None: never written here) and the row `existed` in the table.
/// `concurrent`: the write's version vector and `here`'s are concurrent.
pub fn kind(
    op: Op,
    here: Option<&Version>,
    existed: bool,
    concurrent: bool,
) -> Option<&'static str> {
    match (op, here) {
        // Never written here: an update or delete whose row is missing
        // (its insert has not arrived). A row loaded in every region before
        // it was made global has no version but exists: not a conflict.
        (Op::Update, None) if !existed => Some("update_missing"),
        (Op::Delete, None) if !existed => Some("delete_missing"),
        (_, None) => None,
        (_, Some(_)) if !concurrent => None,
        (Op::Delete, Some(v)) if v.deleted => Some("delete_missing"),
        (Op::Delete, Some(_)) => Some("delete_origin_differs"),
        // A write concurrent with a delete here (told apart from one whose
        // row never arrived, update_missing).
        (_, Some(v)) if v.deleted => Some("update_deleted"),
        (Op::Insert, Some(_)) => Some("insert_exists"),
        (Op::Update, Some(_)) => Some("update_origin_differs"),
    }
}

/// Records `c`, met applying `i` to `t` (key `key_text`), in the history:
/// written at the heap level in the apply call's `heaps` (a statement per
/// conflict, with the constraints parsed by each, was most of the SQL that
/// took a quarter of the apply backends' time when every other intent met
/// one: docs/benchmarks.md). The id and times are the columns' defaults; an
/// open conflict has no resolution time.
pub fn record(
    client: &mut SpiClient<'_>,
    heaps: &Heaps,
    t: &Table,
    i: &Intent,
    key_text: &str,
    c: &Conflict,
) {
    let local = c.local.as_ref();
    let op = match i.op {
        Op::Insert => "insert",
        Op::Update => "update",
        Op::Delete => "delete",
    };
    let row = [
        ("relid", Some(u32::from(t.relid).to_string())),
        ("key", Some(key_text.into())),
        ("kind", Some(c.kind.into())),
        ("strategy", Some(i.strategy.clone())),
        ("local_origin", local.map(|v| v.origin.clone())),
        ("local_hlc", local.map(|v| v.hlc.0.to_string())),
        ("local_deleted", local.map(|v| v.deleted.to_string())),
        ("remote_origin", Some(i.origin.clone())),
        ("remote_hlc", Some(i.hlc.0.to_string())),
        ("remote_op", Some(op.into())),
        ("resolved_by", c.resolved_by.map(str::to_owned)),
        ("outcome", c.resolved_by.map(|_| c.outcome.to_owned())),
        ("merge_calls", Some(c.merge_calls.to_string())),
    ]
    .into_iter()
    .chain(c.resolved_by.is_none().then_some(("resolved_at", None)));
    let log = heaps.get(&crate::catalog::conflict_log(client));
    let mut values = log.fields(row);
    log.fill_defaults(&mut values);
    log.insert(&values);
    prune_now_and_then(client);
}

/// Closes the open conflict of row `key_text` of `relid`, if it has one:
/// resolved `by` with `outcome`. Whether it had one.
pub fn close(
    client: &mut SpiClient<'_>,
    relid: pg_sys::Oid,
    key_text: &str,
    by: &str,
    outcome: &str,
    merge_calls: i32,
) -> bool {
    let closed = run_kept(
        client,
        CLOSE_SQL,
        &[pg_sys::TEXTOID; 5],
        &[
            u32::from(relid).to_string().into(),
            key_text.into(),
            by.into(),
            outcome.into(),
            merge_calls.to_string().into(),
        ],
    );
    !closed.is_empty()
}

fn prune_now_and_then(client: &mut SpiClient<'_>) {
    let due = LAST_PRUNE.with(|l| l.get().is_none_or(|t| t.elapsed() >= PRUNE_EVERY));
    if due {
        LAST_PRUNE.with(|l| l.set(Some(Instant::now())));
        run_kept(
            client,
            PRUNE_SQL,
            &[pg_sys::TEXTOID],
            &[crate::gucs::CONFLICT_RETENTION_MIN.get().to_string().into()],
        );
    }
}
