//! Capturing local writes to global tables: stamp the row's version (new
//! hybrid-logical-clock stamp, the region's entry of the version vector up
//! by one) and emit the write intent as a transactional logical-decoding
//! message, in the writer's own transaction. It runs for every written row,
//! so it is Rust with one kept plan (it was plpgsql calling plpgsql).

use crate::apply::run_kept;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};

/// One statement stamps the row: a fresh stamp from the region's clock,
/// which has observed every stamp stored here, unless the row's stamp is
/// ahead of the clock (after a restart), then the next stamp above it; and
/// the region's entry of the version vector goes up by one
/// (`VersionVector::bump`, in SQL so that it is one round of work).
const STAMP_SQL: &str = "INSERT INTO foreshadow.row_versions AS v (relid, key, hlc, origin, vv, deleted) \
     VALUES ($1, $2::jsonb, $3, $4, pg_catalog.jsonb_build_object($4, 1), $5) \
     ON CONFLICT (relid, key) DO UPDATE \
     SET hlc = CASE WHEN EXCLUDED.hlc > v.hlc THEN EXCLUDED.hlc ELSE foreshadow.hlc_next(v.hlc) END, \
         origin = EXCLUDED.origin, \
         vv = v.vv OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(EXCLUDED.origin, \
              COALESCE((v.vv OPERATOR(pg_catalog.->>) EXCLUDED.origin)::bigint, 0) + 1), \
         deleted = EXCLUDED.deleted \
     RETURNING v.hlc::text, v.vv::text";

/// What the capture trigger is told about its table (trigger arguments set
/// by `foreshadow.refresh_table`).
struct TableArgs {
    schema: String,
    table: String,
    strategy: String,
    pk: Vec<String>,
    counters: Vec<String>,
}

fn table_args(args: &[String]) -> TableArgs {
    let list = |i: usize| -> Vec<String> {
        args.get(i)
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_default()
    };
    match args {
        [schema, table, strategy, ..] if args.len() == 5 => TableArgs {
            schema: schema.clone(),
            table: table.clone(),
            strategy: strategy.clone(),
            pk: list(3),
            counters: list(4),
        },
        _ => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            "foreshadow.capture() called with the wrong arguments",
            "Call foreshadow.refresh_table() on the table to recreate its capture trigger.",
        ),
    }
}

/// The row as JSON text, as `row_to_json` prints it (which
/// `jsonb_populate_record` reads back on the peers).
fn row_json(tuple: PgHeapTuple<'_, AllocatedByPostgres>) -> String {
    let datum = tuple.into_composite_datum();
    unsafe {
        pgrx::direct_function_call::<String>(pg_sys::row_to_json, &[datum])
            .expect("row_to_json returns a value")
    }
}

fn key_of(row: &Map<String, Value>, pk: &[String]) -> Map<String, Value> {
    pk.iter()
        .map(|c| (c.clone(), row.get(c).cloned().unwrap_or(Value::Null)))
        .collect()
}

fn parse(row: &str) -> Map<String, Value> {
    serde_json::from_str(row).expect("row_to_json returns a JSON object")
}

/// Stamps one local write and emits its intent. `row` is the new row image
/// as JSON text (None for deletes), `delta` the counter increments.
fn record(
    relid: pg_sys::Oid,
    t: &TableArgs,
    op: &str,
    key: Map<String, Value>,
    row: Option<&str>,
    delta: Option<Map<String, Value>>,
) {
    let region = crate::gucs::region();
    let key_text = Value::Object(key).to_string();
    let stamped = Spi::connect_mut(|client| {
        run_kept(
            client,
            STAMP_SQL,
            &[
                pg_sys::OIDOID,
                // The key's text is needed for the intent anyway: serialised once.
                pg_sys::TEXTOID,
                pg_sys::INT8OID,
                pg_sys::TEXTOID,
                pg_sys::BOOLOID,
            ],
            &[
                relid.into(),
                key_text.as_str().into(),
                crate::clock::next_stamp().into(),
                region.as_str().into(),
                (op == "delete").into(),
            ],
        )
    });
    let row0 = stamped
        .into_iter()
        .next()
        .expect("the stamp returns its row");
    let text = |i: usize| match &row0[i] {
        Some(Value::String(s)) => s.clone(),
        _ => "null".into(),
    };
    let (hlc, vv) = (text(0), text(1));
    let q = |s: &str| Value::String(s.to_string()).to_string();
    let delta = delta
        .map(|d| Value::Object(d).to_string())
        .unwrap_or_else(|| "null".into());
    // Built as text so that the row image keeps row_to_json's exact text.
    let intent = format!(
        "{{\"v\":1,\"origin\":{},\"hlc\":{hlc},\"schema\":{},\"table\":{},\"op\":{},\"key\":{key_text},\
         \"row\":{},\"vv\":{vv},\"delta\":{delta},\"strategy\":{},\"class\":\"data\"}}",
        q(&region),
        q(&t.schema),
        q(&t.table),
        q(op),
        row.unwrap_or("null"),
        q(&t.strategy),
    );
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_logical_emit_message_text,
            &[
                true.into_datum(),
                foreshadow_model::intent::MESSAGE_PREFIX.into_datum(),
                intent.as_str().into_datum(),
            ],
        );
    }
}

/// The capture trigger of every global table (AFTER INSERT OR UPDATE OR
/// DELETE, FOR EACH ROW); the SQL declaration, with SECURITY DEFINER so that
/// writers need no access to Foreshadow's catalog, is in `sql/`.
#[pg_trigger(sql = false)]
fn capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    // The sidecar's apply session: the write came from a peer, don't echo it.
    if crate::versions::suppressed() {
        return Ok(None);
    }
    let t = table_args(&trigger.extra_args()?);
    let relid = trigger.relid()?;
    let old = trigger.old().map(row_json);
    let new = trigger.new().map(row_json);
    let (old_row, new_row) = (old.as_deref().map(parse), new.as_deref().map(parse));
    match (&old_row, &new_row) {
        (Some(o), None) => record(relid, &t, "delete", key_of(o, &t.pk), None, None),
        (_, Some(n)) => {
            let key = key_of(n, &t.pk);
            let op = if old_row.is_some() {
                "update"
            } else {
                "insert"
            };
            if let Some(o) = &old_row {
                let old_key = key_of(o, &t.pk);
                if old_key != key {
                    crate::errors::raise(
                        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        format!(
                            "cannot change the primary key of a row of global table {}.{}",
                            t.schema, t.table
                        ),
                        &format!(
                            "Key {} would become {}: delete the row and insert it again with the new key.",
                            Value::Object(old_key),
                            Value::Object(key)
                        ),
                    );
                }
            }
            let delta =
                (!t.counters.is_empty()).then(|| counter_delta(&t.counters, old_row.as_ref(), n));
            record(relid, &t, op, key, new.as_deref(), delta);
        }
        (None, None) => {}
    }
    Ok(None)
}

/// Counter columns travel as increments: new value minus old (insert: minus
/// 0). Integers in Rust; other numbers exactly, in PostgreSQL's numeric.
fn counter_delta(
    counters: &[String],
    old: Option<&Map<String, Value>>,
    new: &Map<String, Value>,
) -> Map<String, Value> {
    let zero = Value::from(0);
    counters
        .iter()
        .map(|c| {
            let n = new.get(c).unwrap_or(&zero);
            let o = old.and_then(|r| r.get(c)).unwrap_or(&zero);
            let d = match (n.as_i64(), o.as_i64()) {
                (Some(a), Some(b)) if a.checked_sub(b).is_some() => Value::from(a - b),
                _ => numeric_difference(n, o),
            };
            (c.clone(), d)
        })
        .collect()
}

fn numeric_difference(new: &Value, old: &Value) -> Value {
    let text = Spi::get_one_with_args::<String>(
        "SELECT ($1::numeric - $2::numeric)::text",
        &[new.to_string().into(), old.to_string().into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| "0".into());
    serde_json::from_str(&text).unwrap_or(Value::from(0))
}

/// Stamps and announces a write made before capture existed (make_global
/// announcing rows already in a table).
#[pg_extern(volatile, parallel_unsafe)]
fn record_write(
    tbl: pg_sys::Oid,
    schema_name: &str,
    table_name: &str,
    strategy: &str,
    op: &str,
    k: JsonB,
    row_image: Option<JsonB>,
) {
    let key = match k.0 {
        Value::Object(m) => m,
        _ => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "the key must be a JSON object",
            "Pass the primary-key columns as {\"column\": value}.",
        ),
    };
    let t = TableArgs {
        schema: schema_name.into(),
        table: table_name.into(),
        strategy: strategy.into(),
        pk: Vec::new(),
        counters: Vec::new(),
    };
    let row = row_image.map(|r| r.0.to_string());
    record(tbl, &t, op, key, row.as_deref(), None);
}
