//! Applying peers' intents: the one apply path. The sidecar hands over a
//! peer transaction (or a run of them) with `apply_transaction`; an
//! operator replays kept intents with `retry_dead_letters`; both apply each
//! intent with [`apply_intent`].
//!
//! Writes to the user's table run as its owner (`rights`), with values
//! parsed under the canonical settings and only `ENABLE REPLICA`/`ALWAYS`
//! triggers firing (`canonical::applying`). Locks are taken in the order a
//! local write takes them, the user's row before its version, so an apply
//! and a local write of the same row queue instead of deadlocking:
//! - the row exists: lock it, then its version;
//! - it does not: insert it if its key is still free (this claims the key
//!   against local writers and other peers' applies), then lock the
//!   version; if the key was taken meanwhile, start over (the row exists
//!   now). A delete of a missing row only touches the version.
//!
//! Only an intent that can never apply here becomes a dead letter
//! (malformed, not from the region whose stream carried it, or for a table
//! that is not global here). Anything else that fails (an intent that does
//! not fit the table's columns, a constraint, a lock, the disk) raises: the
//! whole peer transaction rolls back and the sidecar retries it, stopping
//! that peer's lane with a visible error until the cause is gone.

use crate::catalog::{self, Table};
use crate::conflicts::Conflict;
use crate::counters::Counters;
use crate::errors::raise;
use crate::heap::{Heap, Heaps, Values};
use crate::row_versions::{Found, Store, Version};
use crate::spi::run_kept;
use crate::tombstones;
use foreshadow_model::lww::{incoming_wins, Stamp};
use foreshadow_model::{Causality, Intent, Op, Strategy};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::value::RawValue;
use std::rc::Rc;

const REJECT_SQL: &str = "INSERT INTO foreshadow.dead_letters (origin, kind, reason, intent) \
     VALUES ($1, $2, $3, $4)";
/// A peer's first counts (`count`), with the lane's error cleared.
const FIRST_COUNT_SQL: &str = "INSERT INTO foreshadow.peer_stats AS s \
     (origin, intents, changed_rows, conflicts, last_applied_at) VALUES ($1, $2, $3, $4, pg_catalog.now()) \
     ON CONFLICT (origin) DO UPDATE SET intents = s.intents + EXCLUDED.intents, \
       changed_rows = s.changed_rows + EXCLUDED.changed_rows, conflicts = s.conflicts + EXCLUDED.conflicts, \
       last_applied_at = EXCLUDED.last_applied_at, last_error = NULL, last_error_at = NULL";
const LOCK_TIMEOUT_SQL: &str = "SELECT pg_catalog.set_config('lock_timeout', $1, true)";
/// A group of peer transactions (catching up) runs alone among the applies
/// of peers' streams: beside another peer's group or single transactions
/// touching the same hot rows, each would hold some of them while waiting
/// for the others' (until the group's lock timeout rolls back up to
/// `GROUP_INTENTS` applied intents and its lane falls back to one peer
/// transaction at a time). So a group takes a transaction-level advisory
/// lock on the key ('FSHD', 1) exclusively, and every other apply of a
/// stream shares it; local writers do not take it (a group still gives way
/// to them by its lock timeout). A group waits for it at most
/// `GROUP_WAIT`: an apply stuck behind a local writer holds it shared, and
/// the group then goes one transaction at a time instead of queueing every
/// other lane behind it.
const GROUP_LOCK: (i32, i32) = (1179863108, 1);
const GROUP_WAIT: &str = "2s";

/// What applying one intent did.
#[derive(Default)]
pub struct Outcome {
    pub changed: bool,
    /// The conflict it met, recorded in foreshadow.conflicts.
    pub conflict: Option<Conflict>,
}

/// Why an intent can never apply here (a dead letter's `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// The sidecar found that the message was not sealed by the peer's
    /// capture (`foreshadow_model::seal`): emitted by hand.
    Forged,
    Malformed,
    WrongOrigin,
    NotGlobal,
}

impl Reject {
    pub fn kind(self) -> &'static str {
        match self {
            Reject::Forged => "forged",
            Reject::Malformed => "malformed",
            Reject::WrongOrigin => "wrong_origin",
            Reject::NotGlobal => "not_global",
        }
    }
}

/// A message the sidecar refused to pass on as an intent, handed over so
/// that it is kept and counted in the transaction that moves past it.
#[derive(serde::Deserialize)]
struct Rejected {
    reason: String,
    message: String,
}

impl Rejected {
    /// The element as a rejected message, if it is one (an intent never
    /// starts with this key: its first is `v`).
    fn of(raw: &str) -> Option<Rejected> {
        #[derive(serde::Deserialize)]
        struct Wrapper {
            rejected: Rejected,
        }
        raw.starts_with("{\"rejected\":")
            .then(|| serde_json::from_str::<Wrapper>(raw).ok())
            .flatten()
            .map(|w| w.rejected)
    }
}

/// Keeps an intent that can never apply here, with the reason, and says so.
pub fn reject(client: &mut SpiClient<'_>, origin: &str, why: Reject, reason: &str, raw: &str) {
    pgrx::warning!(
        "foreshadow: intent from region {origin} kept in foreshadow.dead_letters: {reason}"
    );
    run_kept(
        client,
        REJECT_SQL,
        &[
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
        ],
        &[origin.into(), why.kind().into(), reason.into(), raw.into()],
    );
}

/// Checks that the intent fits this region's table: every column it
/// carries exists here, and its counter columns are this region's. A
/// mismatch stops the peer's lane (the transaction raises) until the
/// schemas agree again; it is never skipped.
fn check_fits(t: &Table, i: &Intent) {
    let carried = i.row.iter().flat_map(|r| r.keys()).chain(i.key.keys());
    if let Some(missing) = carried.clone().find(|c| t.column(c).is_none()) {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!(
                "intent from region {} for {} carries column \"{missing}\", which the table does not have in this region",
                i.origin, t.qualified
            ),
            "Give the table the same columns in every region (ALTER TABLE in each); replication from that region resumes by itself.",
        );
    }
    if i.op != Op::Delete {
        let delta = i.delta.as_ref();
        if let Some(c) = t
            .counters
            .iter()
            .find(|c| delta.is_none_or(|d| !d.contains_key(*c)))
        {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "intent from region {} for {} has no increment for counter column \"{c}\"",
                    i.origin, t.qualified
                ),
                "Make the same columns counters in every region (foreshadow.set_column_strategy); replication from that region resumes by itself.",
            );
        }
    }
}

/// Where the user's row stands when the intent is decided.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    /// It was there and is locked.
    Locked(*mut pg_sys::TupleTableSlot),
    /// It was not there and was just inserted with the intent's image
    /// (counters holding the increments).
    Inserted,
    /// It is not there (a delete).
    Absent,
}

/// Applies one well-formed intent to a global table: last writer wins, and
/// counter columns add their increments whether the rest of the write
/// wins or not. The user's row is written at the heap level, as its owner.
pub fn apply_intent(
    client: &mut SpiClient<'_>,
    heaps: &Heaps,
    t: &Rc<Table>,
    i: &Intent,
) -> Outcome {
    check_fits(t, i);
    let versions = catalog::versions(client);
    let (heap, store) = (heaps.get(t), Store::new(heaps.get(&versions)));
    // The owner's AFTER triggers fire once the intent is decided and written.
    heap.after_the_intent(|| {
        let key_text = serde_json::to_string(&i.key).expect("a key serialises");
        let key = heap.values(&i.key);
        let row = match heap.find(&key) {
            Some(local) => RowState::Locked(local),
            None if i.op == Op::Delete => RowState::Absent,
            None => {
                // No row: claim the key with the row itself before its version
                // is locked, the order a local insert takes them in. A
                // concurrent insert of the same key makes this wait, then
                // raise (unique violation): the sidecar applies the peer
                // transaction again, and the row is found.
                // Counter columns are set from the row's counters once its
                // version is locked (`decide`).
                let mut values = heap.values(i.row.as_ref().unwrap_or(&i.key));
                heap.fill_defaults(&mut values);
                heap.insert(&values);
                RowState::Inserted
            }
        };
        let cur = store.find(t.relid, &key_text);
        // A delete that found no row, then a live version: a local insert
        // of the key committed both in between (the version's lock waited
        // for it). Applied on, a winning delete would leave that row live
        // under a tombstone here alone; locking the row now would take the
        // locks in the reverse of a local writer's order. So the peer
        // transaction is applied again (the sidecar retries 40001), and
        // finds the row first.
        if row == RowState::Absent && cur.as_ref().is_some_and(|f| !f.version.deleted) {
            raise(
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                format!(
                    "a local insert of key {key_text} of {} committed while a peer's delete of it was applied",
                    t.qualified
                ),
                "The peer transaction is applied again.",
            );
        }
        let x = Target {
            heaps,
            t,
            i,
            row,
            heap: &heap,
            store: &store,
            key: &key,
            key_text: &key_text,
        };
        let o = if matches!(t.strategy, Some(Strategy::Merge | Strategy::Vv)) {
            // Records its conflicts itself (they can be open, then resolved).
            crate::shadow::apply(client, x, cur)
        } else {
            let o = decide(x, cur);
            if let Some(c) = &o.conflict {
                crate::conflicts::record(client, heaps, t, i, &key_text, c);
            }
            if o.changed && i.op == Op::Delete && tombstones::collectable(t.strategy, &t.counters) {
                tombstones::queue(client, t.relid, &key_text, i.hlc, &i.origin);
            }
            o
        };
        if row == RowState::Inserted && !o.changed {
            // The write lost to the version here (a newer delete): the row
            // claimed for it goes again.
            if let Some(local) = heap.find(&key) {
                heap.delete(local);
            }
        }
        o
    })
}

/// An intent being applied, and where its row stands.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    /// The apply call's open tables (the conflict history is written there).
    pub heaps: &'a Heaps,
    pub t: &'a Table,
    pub i: &'a Intent,
    pub row: RowState,
    pub heap: &'a Heap,
    pub store: &'a Store,
    pub key: &'a Values,
    pub key_text: &'a str,
}

/// Compares the intent with the row's version `cur` (locked) and writes
/// what wins.
pub fn decide(x: Target<'_>, cur: Option<Found>) -> Outcome {
    let Target {
        heaps: _,
        t,
        i,
        row,
        heap,
        store,
        key,
        key_text,
    } = x;
    let here = cur.as_ref().map(|f| &f.version);
    let mut vv = here.map(|c| c.vv.clone()).unwrap_or_default();
    let concurrent = here.is_some() && vv.compare(&i.vv) == Causality::Concurrent;
    let existed = matches!(row, RowState::Locked(_));
    let conflict = |outcome| {
        crate::conflicts::kind(i.op, here, existed, concurrent).map(|kind| Conflict {
            kind,
            local: here.cloned(),
            outcome,
            merge_calls: 0,
            resolved_by: Some("local"),
        })
    };
    vv.merge(&i.vv);
    let wins = incoming_wins(
        Stamp {
            hlc: i.hlc,
            origin: &i.origin,
        },
        here.map(|c| Stamp {
            hlc: c.hlc,
            origin: &c.origin,
        }),
    );
    let deleted_here = here.is_some_and(|c| c.deleted);
    // Counter columns: the row's counters with this write counted (and
    // what its reset erased), whether the rest of the write wins or not.
    let counters = (!t.counters.is_empty()).then(|| {
        let mut c = Counters::parse(here.and_then(|h| h.counters.as_deref()));
        if let RowState::Locked(local) = row {
            c.start_from(&t.counters, |col| {
                t.column(col).and_then(|column| heap.text_of(local, column))
            });
        }
        c.apply(i);
        c
    });
    let stored = counters.as_ref().and_then(Counters::to_stored);
    let counter_values = counters.map(|c| c.values(&t.counters));
    if !wins {
        // The version here supersedes this write: remember it was seen, and
        // keep its increments unless the row is deleted.
        if let (Some(found), Some(h)) = (&cur, here) {
            let seen = Version {
                vv,
                origin: h.origin.clone(),
                leaves: h.leaves.clone(),
                counters: stored,
                ..*h
            };
            store.write(Some(found), t.relid, key_text, &seen);
        }
        let changed = match (row, &counter_values) {
            (RowState::Locked(local), Some(values)) if !deleted_here => {
                heap.update(local, &heap.values(values));
                true
            }
            _ => false,
        };
        return Outcome {
            changed,
            conflict: conflict(if changed {
                "kept, increments added"
            } else {
                "kept"
            }),
        };
    }
    match (i.op, row) {
        (Op::Delete, RowState::Locked(local)) => heap.delete(local),
        (Op::Insert | Op::Update, RowState::Locked(local)) => {
            let mut image = i.row.clone().unwrap_or_else(|| i.key.clone());
            image.extend(counter_values.into_iter().flatten());
            heap.update(local, &heap.values(&image));
        }
        (_, RowState::Inserted) => {
            if let (Some(values), Some(local)) = (&counter_values, heap.find(key)) {
                heap.update(local, &heap.values(values));
            }
        }
        _ => {}
    }
    let new = Version {
        hlc: i.hlc,
        origin: i.origin.clone(),
        vv,
        deleted: i.op == Op::Delete,
        leaves: None,
        counters: stored,
    };
    store.write(cur.as_ref(), t.relid, key_text, &new);
    Outcome {
        changed: true,
        conflict: conflict("applied"),
    }
}

/// Applies one intent as it arrived (JSON text), or keeps it as a dead
/// letter if it can never apply here. `peer`: the region whose stream
/// carried it; only that region's own writes are accepted from it.
pub fn apply_raw(client: &mut SpiClient<'_>, heaps: &Heaps, peer: &str, raw: &str) -> Arrived {
    heaps.next_command();
    if let Some(r) = Rejected::of(raw) {
        reject(client, peer, Reject::Forged, &r.reason, &r.message);
        return Arrived::Data(Outcome::default());
    }
    let i = match Intent::decode(raw.as_bytes()) {
        Ok(i) => i,
        Err(e) => {
            reject(
                client,
                peer,
                Reject::Malformed,
                &format!("malformed intent: {e}"),
                raw,
            );
            return Arrived::Data(Outcome::default());
        }
    };
    if i.origin != peer {
        let reason = format!(
            "intent claims origin region {} but came from region {peer}",
            i.origin
        );
        reject(client, peer, Reject::WrongOrigin, &reason, raw);
        return Arrived::Data(Outcome::default());
    }
    if let Some(s) = &i.stability {
        crate::tombstones::hear(client, &i.origin, s);
        return Arrived::Metadata;
    }
    let Some(t) = catalog::table(client, &i.schema, &i.table) else {
        let reason = format!(
            "table {}.{} is not a global table in this region",
            catalog::ident(&i.schema),
            catalog::ident(&i.table)
        );
        reject(client, peer, Reject::NotGlobal, &reason, raw);
        return Arrived::Data(Outcome::default());
    };
    crate::clock::admit(i.hlc);
    if let Some(set) = &i.shadow_set {
        crate::shadow_set::adopt(client, &t, set);
        crate::clock::observe(i.hlc);
        return Arrived::Metadata;
    }
    let o = apply_intent(client, heaps, &t, &i);
    crate::clock::observe(i.hlc);
    Arrived::Data(o)
}

/// What an arrived intent was: a write (or one kept as a dead letter),
/// counted in `peer_stats`, or Foreshadow's own metadata (a heartbeat, a
/// shadow set), which is not.
pub enum Arrived {
    Data(Outcome),
    Metadata,
}

/// Counts applied intents (and the rows they changed, and conflicts) for
/// `peer` in `foreshadow.peer_stats`, in the current transaction (so the
/// figures are exact across crashes), and clears the lane's error: it
/// applies again. At the heap level, in the apply call's `heaps`: it runs
/// once per applied peer transaction.
pub fn count(
    client: &mut SpiClient<'_>,
    heaps: &Heaps,
    peer: &str,
    intents: i32,
    changed: i32,
    conflicts: i32,
) {
    let stats = heaps.get(&catalog::peer_stats(client));
    let Some(slot) = stats.find(&stats.fields([("origin", Some(peer.to_owned()))])) else {
        // The peer's first count here (once): an upsert, which also settles
        // a race with another session counting the same peer first.
        run_kept(
            client,
            FIRST_COUNT_SQL,
            &[
                pg_sys::TEXTOID,
                pg_sys::INT4OID,
                pg_sys::INT4OID,
                pg_sys::INT4OID,
            ],
            &[
                peer.into(),
                intents.into(),
                changed.into(),
                conflicts.into(),
            ],
        );
        return;
    };
    let mut row = vec![
        ("origin", Some(peer.to_owned())),
        ("last_error", None),
        ("last_error_at", None),
    ];
    for (column, n) in [
        ("intents", intents),
        ("changed_rows", changed),
        ("conflicts", conflicts),
    ] {
        let c = stats
            .table()
            .column(column)
            .expect("peer_stats has the column");
        let so_far: i64 = stats
            .text_of(slot, c)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        row.push((
            column,
            Some(so_far.saturating_add(i64::from(n)).to_string()),
        ));
    }
    let mut values = stats.fields(row);
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    stats.set_datum(&mut values, "last_applied_at", pg_sys::Datum::from(now));
    stats.update(slot, &values);
}

/// The peer position this session's replication origin has applied up to
/// (committed, flushed or not). Raises unless the session set one up.
fn session_progress() -> u64 {
    unsafe {
        if pg_sys::replorigin_session_origin == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "no replication origin is set up in this session",
                "The sidecar sets up foreshadow_from_<peer> with pg_replication_origin_session_setup() before applying.",
            );
        }
        pg_sys::replorigin_session_get_progress(false)
    }
}

/// An LSN as PostgreSQL prints it (`16/B374D848`).
fn lsn(text: &str) -> u64 {
    let parsed = text.split_once('/').and_then(|(hi, lo)| {
        Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
    });
    parsed.unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
            format!("invalid LSN {text:?}"),
            "An LSN looks like 16/B374D848.",
        )
    })
}

/// The intents of a batch: a JSON array whose elements are intents, or
/// JSON strings holding what arrived where an intent was expected but was
/// not JSON at all (the sidecar wraps those so that they are kept).
fn elements(intents: &str) -> Vec<std::borrow::Cow<'_, str>> {
    let raws: Vec<&RawValue> = serde_json::from_str(intents).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("intents are not a JSON array: {e}"),
            "Pass the intents of peer transactions as a JSON array.",
        )
    });
    raws.into_iter()
        .map(|r| match serde_json::from_str::<String>(r.get()) {
            Ok(text) => std::borrow::Cow::Owned(text),
            Err(_) => std::borrow::Cow::Borrowed(r.get()),
        })
        .collect()
}

/// Applies peer transactions (the intents of one or more, in commit order,
/// as a JSON array) and records, in the same local transaction, that the
/// peer is applied up to `origin_lsn` (the session must have set up its
/// replication origin). Raises if an intent cannot apply now, so that
/// nothing of the transaction is kept; the sidecar retries it.
///
/// The sidecar sends many of these without waiting for each answer. So
/// that a failed one cannot be overtaken by the next, each applies only if
/// the session's progress is still `prev_lsn` (the one before it);
/// otherwise it does nothing and returns -1. `lock_timeout_ms` > 0 bounds
/// each wait for a local writer's lock, so that a group of transactions
/// gives way to local writers. Returns the rows changed.
///
/// A peer transaction too large to send at once comes in parts, in one
/// local transaction that the sidecar opened: every part but the last has
/// no `origin_lsn` (no progress yet); the last records it.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn apply_transaction(
    peer: &str,
    intents: &str,
    prev_lsn: &str,
    origin_lsn: Option<&str>,
    origin_commit: Option<TimestampWithTimeZone>,
    lock_timeout_ms: default!(i32, 0),
) -> i32 {
    crate::canonical::applying(true);
    Spi::connect_mut(|client| {
        if session_progress() != lsn(prev_lsn) {
            return -1;
        }
        let alone = lock_timeout_ms > 0;
        if alone {
            run_kept(
                client,
                LOCK_TIMEOUT_SQL,
                &[pg_sys::TEXTOID],
                &[GROUP_WAIT.into()],
            );
        }
        // Called directly rather than through a statement: it runs for
        // every apply call, most of which apply one small transaction.
        let lock = if alone {
            pg_sys::pg_advisory_xact_lock_int4
        } else {
            pg_sys::pg_advisory_xact_lock_shared_int4
        };
        unsafe {
            pgrx::direct_function_call_as_datum(
                lock,
                &[GROUP_LOCK.0.into_datum(), GROUP_LOCK.1.into_datum()],
            );
        }
        if alone {
            run_kept(
                client,
                LOCK_TIMEOUT_SQL,
                &[pg_sys::TEXTOID],
                &[format!("{lock_timeout_ms}ms").into()],
            );
        }
        let elements = elements(intents);
        // Progress is recorded with the commit record, which needs a
        // transaction id even when nothing here was written.
        unsafe { pg_sys::GetCurrentTransactionId() };
        let (mut intents, mut changed, mut conflicts) = (0i32, 0i32, 0i32);
        let heaps = Heaps::applying();
        for raw in &elements {
            if let Arrived::Data(o) = apply_raw(client, &heaps, peer, raw) {
                intents += 1;
                changed += o.changed as i32;
                conflicts += o.conflict.is_some() as i32;
            }
        }
        count(client, &heaps, peer, intents, changed, conflicts);
        if let Some(at) = origin_lsn {
            // What pg_replication_origin_xact_setup does: the commit record
            // carries the peer's position, so progress is exactly the
            // applied transactions.
            let commit = origin_commit.into_datum().map_or(0, |d| d.value() as i64);
            unsafe {
                pg_sys::replorigin_session_origin_lsn = lsn(at);
                pg_sys::replorigin_session_origin_timestamp = commit;
            }
        }
        changed
    })
}
