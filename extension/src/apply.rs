//! Applying peers' intents: the one implementation of the apply rules, in
//! Rust with plans prepared once per backend (the plpgsql version re-planned
//! every statement of every intent). `apply_transaction` applies a whole
//! peer transaction in one call; `apply_one` is the same rule for a single
//! intent, which the SQL function `foreshadow.apply_intent` wraps in a
//! subtransaction so that an intent that fails is kept as a dead letter.
//!
//! Locks are taken in the order local writes take them (the user's row,
//! then its version), so an apply and a local write of the same row queue
//! behind each other instead of deadlocking.

use foreshadow_model::lww::{incoming_wins, Stamp};
use foreshadow_model::{Causality, Hlc, Intent, Op, VersionVector};
use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::JsonB;
use serde_json::{Map, Value};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Global tables by (schema, table): the generation read in, and the table.
type TableCache = HashMap<(String, String), (u64, Option<Rc<Table>>)>;

thread_local! {
    /// Global tables by (schema, table), with the invalidation generation
    /// they were read in; `None`: not global here.
    static TABLES: RefCell<TableCache> = RefCell::new(HashMap::new());
    /// Bumped by every relcache invalidation. Every change to a global
    /// table's setup (make_global, set_column_strategy, drop_global, DROP
    /// TABLE, ALTER TABLE) creates, replaces or drops a trigger on the
    /// table, which invalidates its relcache entry: cached tables are then
    /// read again.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// Prepared plans by SQL text. The per-table statements embed the
    /// table's name, so a table made global again gets its own entry;
    /// PostgreSQL re-plans a kept plan itself when a table's schema changes.
    static PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

const TABLE_SQL: &str =
    "SELECT relid, counter_cols, upsert_sql, delete_sql, counter_sql, lock_sql \
     FROM foreshadow.tables WHERE schema_name = $1::name AND table_name = $2::name";
const VERSION_SQL: &str =
    "SELECT hlc::text, origin, vv::text, deleted::text FROM foreshadow.row_versions \
     WHERE relid = $1 AND key = $2 FOR UPDATE";
/// The new version, written by the same statement as the row (its $1): a
/// data-modifying WITH that the main statement does not read runs after
/// it, so the row is locked before its version, as in a local write.
const STAMP_CTE: &str = "WITH stamp AS (INSERT INTO foreshadow.row_versions AS v (relid, key, hlc, origin, vv, deleted) \
     VALUES ($2, $3, $4, $5, $6::jsonb, $7) ON CONFLICT (relid, key) DO UPDATE \
     SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin, vv = EXCLUDED.vv, deleted = EXCLUDED.deleted) ";
const WRITE_TYPES: [pg_sys::Oid; 7] = [
    pg_sys::JSONBOID,
    pg_sys::OIDOID,
    pg_sys::JSONBOID,
    pg_sys::INT8OID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::BOOLOID,
];
const SEEN_SQL: &str =
    "UPDATE foreshadow.row_versions SET vv = $3::jsonb WHERE relid = $1 AND key = $2";
const REJECT_SQL: &str = "SELECT foreshadow.reject_intent($1, $2, $3)";
const COUNT_AND_PROGRESS_SQL: &str = "SELECT foreshadow.count_applied($1, $2, $3, $4), \
     pg_catalog.pg_replication_origin_xact_setup($5::pg_lsn, $6)";
const IN_STEP_SQL: &str =
    "SELECT (coalesce(pg_catalog.pg_replication_origin_session_progress(false), '0/0') \
     = $1::pg_lsn)::text";
const XID_SQL: &str = "SELECT pg_catalog.pg_current_xact_id()::text";
const LOCK_TIMEOUT_SQL: &str = "SELECT pg_catalog.set_config('lock_timeout', $1, true)";
const PROGRESS_SQL: &str = "SELECT pg_catalog.pg_replication_origin_xact_setup($1::pg_lsn, $2)";

/// The plan of `sql`, prepared on first use and kept for the backend. The
/// map is not borrowed while a plan runs: running one can fire triggers
/// that come back here.
fn kept_plan(
    client: &SpiClient<'_>,
    sql: &str,
    types: &[pg_sys::Oid],
) -> Rc<OwnedPreparedStatement> {
    if let Some(plan) = PLANS.with(|p| p.borrow().get(sql).cloned()) {
        return plan;
    }
    let types: Vec<PgOid> = types.iter().map(|&t| PgOid::from(t)).collect();
    let plan = Rc::new(
        client
            .prepare_mut(sql, &types)
            .unwrap_or_else(|e| panic!("preparing {sql}: {e}"))
            .keep(),
    );
    PLANS.with(|p| p.borrow_mut().insert(sql.to_string(), plan.clone()));
    plan
}

/// Runs `sql` with its kept plan; returns the rows, every column as text.
pub fn run_kept<'a>(
    client: &mut SpiClient<'_>,
    sql: &str,
    types: &[pg_sys::Oid],
    args: &[DatumWithOid<'a>],
) -> Vec<Vec<Option<Value>>> {
    let plan = kept_plan(client, sql, types);
    let table = client
        .update(&*plan, None, args)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out = Vec::new();
    for row in table {
        let mut cols = Vec::new();
        for i in 1..=row.columns() {
            cols.push(row.get::<String>(i).ok().flatten().map(Value::String));
        }
        out.push(cols);
    }
    // Result sets live until SPI disconnects; a peer transaction can
    // hold thousands of intents, so free each one now.
    unsafe { pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable) };
    out
}

/// What one global table needs for applying.
struct Table {
    relid: pg_sys::Oid,
    counter_cols: Vec<String>,
    /// The row's upsert, and its delete, each with the version's stamp.
    write_sql: String,
    remove_sql: String,
    counter_sql: Option<String>,
    lock_sql: String,
}

/// Called by PostgreSQL for every relcache invalidation (registered in
/// `_PG_init`): cached tables are stale from now on.
#[pg_guard]
pub unsafe extern "C-unwind" fn forget_tables(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    GENERATION.with(|g| g.set(g.get() + 1));
}

/// The global table `schema.table`, from the cache while nothing changed.
fn table(client: &mut SpiClient<'_>, schema: &str, table: &str) -> Option<Rc<Table>> {
    // Read first: an invalidation during the lookup leaves the entry stale.
    let generation = GENERATION.with(Cell::get);
    let key = (schema.to_string(), table.to_string());
    if let Some((g, t)) = TABLES.with(|c| c.borrow().get(&key).cloned()) {
        if g == generation {
            return t;
        }
    }
    let t = lookup(client, schema, table).map(Rc::new);
    TABLES.with(|c| c.borrow_mut().insert(key, (generation, t.clone())));
    t
}

fn lookup(client: &mut SpiClient<'_>, schema: &str, table: &str) -> Option<Table> {
    let plan = kept_plan(client, TABLE_SQL, &[pg_sys::TEXTOID, pg_sys::TEXTOID]);
    let rows = client
        .select(&*plan, None, &[schema.into(), table.into()])
        .expect("table lookup");
    let row = rows.into_iter().next()?;
    Some(Table {
        relid: row.get::<pg_sys::Oid>(1).ok()??,
        counter_cols: row.get::<Vec<String>>(2).ok()??,
        write_sql: format!("{STAMP_CTE}{}", row.get::<String>(3).ok()??),
        remove_sql: format!("{STAMP_CTE}{}", row.get::<String>(4).ok()??),
        counter_sql: row.get::<String>(5).ok()?,
        lock_sql: row.get::<String>(6).ok()??,
    })
}

/// What applying one intent did.
#[derive(Default, Clone, Copy)]
struct Outcome {
    changed: bool,
    conflict: bool,
}

fn jsonb(map: &Map<String, Value>) -> DatumWithOid<'static> {
    JsonB(Value::Object(map.clone())).into()
}

fn reject(client: &mut SpiClient<'_>, origin: &str, reason: String, raw: &str) {
    run_kept(
        client,
        REJECT_SQL,
        &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
        &[origin.into(), reason.into(), raw.into()],
    );
}

/// Applies one intent under last-writer-wins, with counter columns adding
/// their increments whether the rest of the write wins or not.
fn apply_intent_in(client: &mut SpiClient<'_>, i: &Intent, raw: &str) -> Outcome {
    let Some(t) = table(client, &i.schema, &i.table) else {
        let reason = format!(
            "table {} is not a global table in this region",
            qualified(&i.schema, &i.table)
        );
        reject(client, &i.origin, reason, raw);
        return Outcome::default();
    };
    let delta = i.delta.clone().unwrap_or_default();
    if i.op != Op::Delete && t.counter_cols.iter().any(|c| !delta.contains_key(c)) {
        let reason = format!(
            "intent for {} lacks increments for counter columns {:?}: are the columns counters in region {}?",
            qualified(&i.schema, &i.table),
            t.counter_cols,
            i.origin
        );
        reject(client, &i.origin, reason, raw);
        return Outcome::default();
    }
    let relid = t.relid;
    run_kept(client, &t.lock_sql, &[pg_sys::JSONBOID], &[jsonb(&i.key)]);
    let cur = run_kept(
        client,
        VERSION_SQL,
        &[pg_sys::OIDOID, pg_sys::JSONBOID],
        &[relid.into(), jsonb(&i.key)],
    )
    .into_iter()
    .next()
    .map(|row| {
        let text = |k: usize| match &row[k] {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let vv: VersionVector = serde_json::from_str(&text(2)).unwrap_or_default();
        (
            text(0).parse::<u64>().unwrap_or(0),
            text(1),
            vv,
            text(3) == "true",
        )
    });
    let mut vv = cur.as_ref().map(|c| c.2.clone()).unwrap_or_default();
    let conflict = cur.is_some() && vv.compare(&i.vv) == Causality::Concurrent;
    vv.merge(&i.vv);
    let vv_text = serde_json::to_string(&vv).expect("a version vector serialises");
    let wins = incoming_wins(
        Stamp {
            hlc: i.hlc,
            origin: &i.origin,
        },
        cur.as_ref().map(|c| Stamp {
            hlc: Hlc(c.0),
            origin: &c.1,
        }),
    );
    if !wins {
        // The current version supersedes this write: remember it was seen,
        // and keep its increments unless the row is deleted.
        run_kept(
            client,
            SEEN_SQL,
            &[pg_sys::OIDOID, pg_sys::JSONBOID, pg_sys::TEXTOID],
            &[relid.into(), jsonb(&i.key), vv_text.into()],
        );
        let deleted = cur.as_ref().map(|c| c.3).unwrap_or(false);
        let changed = match (&t.counter_sql, i.delta.is_some() && !deleted) {
            (Some(sql), true) => {
                let mut k = i.key.clone();
                k.extend(
                    delta
                        .into_iter()
                        .filter(|(c, _)| t.counter_cols.contains(c)),
                );
                run_kept(client, sql, &[pg_sys::JSONBOID], &[jsonb(&k)]);
                true
            }
            _ => false,
        };
        return Outcome { changed, conflict };
    }
    // $1: the row image with the counter increments, or the key to delete.
    // Counter columns carry the increment, which the upsert adds to the
    // row here, except where the row was deleted here: then the write
    // brings it back as the writer has it (absolute values). Increments for
    // columns that are not counters here are ignored (the row image has the
    // absolute value).
    let resurrects = cur.as_ref().is_some_and(|c| c.3);
    let (sql, target) = match (&i.op, &i.row) {
        (Op::Delete, _) | (_, None) => (&t.remove_sql, i.key.clone()),
        (_, Some(row)) => {
            let mut image = row.clone();
            if !resurrects {
                image.extend(
                    delta
                        .into_iter()
                        .filter(|(c, _)| t.counter_cols.contains(c)),
                );
            }
            (&t.write_sql, image)
        }
    };
    run_kept(
        client,
        sql,
        &WRITE_TYPES,
        &[
            jsonb(&target),
            relid.into(),
            jsonb(&i.key),
            (i.hlc.0 as i64).into(),
            i.origin.as_str().into(),
            vv_text.into(),
            (i.op == Op::Delete).into(),
        ],
    );
    Outcome {
        changed: true,
        conflict,
    }
}

/// `schema.table` quoted as PostgreSQL quotes identifiers (for messages).
fn qualified(schema: &str, table: &str) -> String {
    let quote = |s: &str| {
        let c = std::ffi::CString::new(s).unwrap_or_default();
        unsafe { std::ffi::CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }
            .to_string_lossy()
            .into_owned()
    };
    format!("{}.{}", quote(schema), quote(table))
}

fn decode(raw: &str) -> Intent {
    Intent::decode(raw.as_bytes()).unwrap_or_else(|e| {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("malformed intent: {e}"),
            "Intents are produced by Foreshadow's capture trigger; see foreshadow.dead_letters.",
        )
    })
}

/// Applies one intent (JSON text); says whether it changed the row and
/// whether it was a conflict. Raises on failure: `foreshadow.apply_intent`
/// turns that into a dead letter.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn apply_one(
    intent: &str,
) -> TableIterator<'static, (name!(changed, bool), name!(conflict, bool))> {
    let i = decode(intent);
    let o = Spi::connect_mut(|client| apply_intent_in(client, &i, intent));
    crate::clock::observe(i.hlc);
    TableIterator::once((o.changed, o.conflict))
}

/// Applies one peer transaction (a JSON array of intents) and records, in
/// the same local transaction, that the peer is applied up to `origin_lsn`
/// (the session must have set up its replication origin). Raises if any
/// intent fails, so that nothing of the transaction is kept; the sidecar
/// then applies it intent by intent with `apply_transaction_safely`.
///
/// The sidecar sends many of these without waiting for each answer. So
/// that a failed one cannot be overtaken by the next, each applies only if
/// the session's progress is still `prev_lsn` (the one before it);
/// otherwise it does nothing and returns -1. `intents` may hold several
/// peer transactions (catching up); `lock_timeout_ms` > 0 then bounds each
/// wait for a local writer's lock, so that such a group gives way.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn apply_transaction(
    intents: &str,
    prev_lsn: &str,
    origin_lsn: &str,
    origin_commit: TimestampWithTimeZone,
    lock_timeout_ms: default!(i32, 0),
) -> i32 {
    let in_step = Spi::connect_mut(|client| {
        let in_step = run_kept(client, IN_STEP_SQL, &[pg_sys::TEXTOID], &[prev_lsn.into()])
            .first()
            .and_then(|row| row[0].clone())
            == Some(Value::String("true".into()));
        if in_step && lock_timeout_ms > 0 {
            run_kept(
                client,
                LOCK_TIMEOUT_SQL,
                &[pg_sys::TEXTOID],
                &[format!("{lock_timeout_ms}ms").into()],
            );
        }
        in_step
    });
    if !in_step {
        return -1;
    }
    let raws: Vec<&serde_json::value::RawValue> =
        serde_json::from_str(intents).unwrap_or_else(|e| {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("intents are not a JSON array: {e}"),
                "Pass the intents of one peer transaction as a JSON array.",
            )
        });
    let parsed: Vec<(Intent, &str)> = raws.iter().map(|r| (decode(r.get()), r.get())).collect();
    let (mut changed, mut conflicts) = (0i32, 0i32);
    let mut max_hlc = Hlc(0);
    Spi::connect_mut(|client| {
        if parsed.is_empty() {
            // A peer transaction without intents (another tool's message):
            // progress is only recorded with a commit record, which needs a
            // transaction id.
            run_kept(client, XID_SQL, &[], &[]);
        }
        for (i, raw) in &parsed {
            let o = apply_intent_in(client, i, raw);
            changed += o.changed as i32;
            conflicts += o.conflict as i32;
            max_hlc = max_hlc.max(i.hlc);
        }
        match parsed.first() {
            Some((first, _)) => run_kept(
                client,
                COUNT_AND_PROGRESS_SQL,
                &[
                    pg_sys::TEXTOID,
                    pg_sys::INT4OID,
                    pg_sys::INT4OID,
                    pg_sys::INT4OID,
                    pg_sys::TEXTOID,
                    pg_sys::TIMESTAMPTZOID,
                ],
                &[
                    first.origin.as_str().into(),
                    (parsed.len() as i32).into(),
                    changed.into(),
                    conflicts.into(),
                    origin_lsn.into(),
                    origin_commit.into(),
                ],
            ),
            None => run_kept(
                client,
                PROGRESS_SQL,
                &[pg_sys::TEXTOID, pg_sys::TIMESTAMPTZOID],
                &[origin_lsn.into(), origin_commit.into()],
            ),
        };
    });
    crate::clock::observe(max_hlc);
    changed
}
