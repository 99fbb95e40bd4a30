//! Strategy `merge` on a primary: the table's merge function
//! `(base, local, remote) -> row`, folded over a conflict's leaves in
//! canonical order by the model's `strategy::merge::resolve` (the one
//! function the protocol model checks), so that every region computes the
//! same row from the same leaf set whatever order its versions came in.
//!
//! Each call runs as the table's owner, in a subtransaction, bounded by
//! `foreshadow.merge_timeout`. A call that raises, returns NULL or a row
//! with another key, or runs too long fails the resolution: the leaves are
//! resolved by last writer wins instead (the same for every region) and the
//! failure is kept in `foreshadow.conflict_failures`. Errors of the server
//! itself (out of memory, disk, internal) are not the function's doing:
//! they raise, and the peer transaction is retried.

use crate::catalog::Table;
use crate::heap::Heap;
use crate::rights::as_owner;
use crate::spi::run_kept;
use foreshadow_model::strategy::leaf::Leaf;
use foreshadow_model::strategy::merge;
use foreshadow_model::{lww, strategy::Versioned};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::{json, Map, Value};
use std::ffi::CString;

type Row = Map<String, Value>;

const FAILURE_SQL: &str =
    "INSERT INTO foreshadow.conflict_failures (table_name, key, strategy, leaves, error) \
     VALUES ($1::pg_catalog.oid, $2::pg_catalog.jsonb, 'merge', $3::pg_catalog.jsonb, $4)";

/// A leaf set resolved.
pub struct Resolution {
    /// The resolved row; `None`: every leaf is a delete.
    pub row: Option<Row>,
    /// How many times the merge function ran.
    pub calls: i32,
    /// Why the merge function's answer was not used (then `row` is the
    /// last writer's), kept in `foreshadow.conflict_failures`.
    pub failure: Option<String>,
}

/// Resolves `leaves` (two or more, canonical order) of row `key` of `t`.
pub fn resolve(
    client: &mut SpiClient<'_>,
    heap: &Heap,
    t: &Table,
    key: &Row,
    leaves: &[Leaf],
) -> Resolution {
    let mut calls = 0;
    let merged = merge::resolve(leaves, None, |_base, acc, next| {
        calls += 1;
        call(heap, t, key, acc, next)
    });
    match merged {
        Ok(row) => Resolution {
            row,
            calls,
            failure: None,
        },
        Err(error) => {
            pgrx::warning!(
                "foreshadow: merge function of {} failed for key {}: {error}; resolved by last writer wins (see foreshadow.conflict_failures)",
                t.qualified,
                Value::Object(key.clone())
            );
            keep_failure(client, t, key, leaves, &error);
            let winner = lww::resolve(leaves).and_then(|l| l.row().cloned());
            Resolution {
                row: winner,
                calls,
                failure: Some(error),
            }
        }
    }
}

fn keep_failure(client: &mut SpiClient<'_>, t: &Table, key: &Row, leaves: &[Leaf], error: &str) {
    let leaves: Vec<Value> = leaves
        .iter()
        .map(|l| {
            json!({"origin": l.origin, "stamp": crate::clock::hlc_text(l.hlc.0 as i64), "vv": l.vv, "row": l.row})
        })
        .collect();
    run_kept(
        client,
        FAILURE_SQL,
        &[pg_sys::TEXTOID; 4],
        &[
            u32::from(t.relid).to_string().into(),
            Value::Object(key.clone()).to_string().into(),
            Value::Array(leaves).to_string().into(),
            error.into(),
        ],
    );
}

/// One call `merge(NULL, acc, next)`; the row it returns, or why not.
fn call(heap: &Heap, t: &Table, key: &Row, acc: &Row, next: &Row) -> Result<Row, String> {
    let Some(function) = &t.merge_function else {
        return Err(format!(
            "the merge function of {} no longer exists",
            t.qualified
        ));
    };
    let sql = format!(
        "SELECT {function}(NULL::{table}, $1, $2)",
        table = t.qualified
    );
    let args = [
        heap.composite(&heap.values(acc)),
        heap.composite(&heap.values(next)),
    ];
    let timeout = crate::gucs::MERGE_TIMEOUT_MS.get();
    // Armed around the subtransaction, and disarmed whatever it raised:
    // left armed, it would cancel the rest of the apply. (An error that
    // raises on aborts the transaction, which disarms every timeout.)
    let started = std::time::Instant::now();
    unsafe { enable_timeout_after(STATEMENT_TIMEOUT, timeout) };
    let result =
        in_subtransaction(|| as_owner(t.owner, || unsafe { run_call(heap, t, &sql, &args) }));
    unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
    // Whether this timeout is what cancelled the call, not an operator's
    // pg_cancel_backend, which must cancel the apply itself. (PostgreSQL
    // resets the timeout's indicator as it reports the cancel.)
    let timed_out = started.elapsed() >= std::time::Duration::from_millis(timeout as u64);
    let row = match result {
        Ok(Some(row)) => row,
        Ok(None) => return Err(format!("merge function {function} returned NULL")),
        Err(e) if e.code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED && timed_out => {
            return Err(format!(
                "merge function {function} ran past foreshadow.merge_timeout ({timeout} ms)"
            ))
        }
        Err(e) if e.code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
            e.message,
            "The merge call was cancelled from outside; the peer transaction is applied again.",
        ),
        Err(e) => return Err(format!("merge function {function} raised: {}", e.message)),
    };
    if let Some(c) = key.keys().find(|c| row.get(*c) != key.get(*c)) {
        return Err(format!(
            "merge function {function} returned a row with another primary key (column \"{c}\")"
        ));
    }
    Ok(row)
}

// utils/timeout.h, which the bindings leave out. The statement timeout's
// handler cancels the running query (57014), as statement_timeout would;
// the apply session's own statement_timeout is not in use meanwhile.
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
// Neither raises an ERROR (only FATAL for a timeout never registered).
unsafe extern "C" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}

/// Runs the merge call; its row, or None for NULL.
unsafe fn run_call(heap: &Heap, t: &Table, sql: &str, args: &[pg_sys::Datum; 2]) -> Option<Row> {
    let sql = CString::new(sql).expect("no NUL in a quoted name");
    let mut types = [t.rowtype, t.rowtype];
    let mut values = *args;
    let nulls = c"  ";
    let rc = pg_sys::SPI_execute_with_args(
        sql.as_ptr(),
        2,
        types.as_mut_ptr(),
        values.as_mut_ptr(),
        nulls.as_ptr(),
        true,
        1,
    );
    if rc != pg_sys::SPI_OK_SELECT as i32 || pg_sys::SPI_processed != 1 {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!(
                "calling the merge function of {} failed (SPI code {rc})",
                t.qualified
            ),
            "This is a bug in Foreshadow.",
        );
    }
    let table = pg_sys::SPI_tuptable;
    let mut null = false;
    let d = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut null);
    let row = (!null).then(|| heap.row_of_composite(d));
    pg_sys::SPI_freetuptable(table);
    row
}

/// An error the merge function raised (or its timeout).
pub struct Raised {
    pub code: PgSqlErrorCode,
    pub message: String,
}

/// Runs `f` in a subtransaction: its result, or the error it raised (then
/// everything it did is rolled back). Errors that are the server's, not
/// the function's (resources, system, internal), raise on.
pub fn in_subtransaction<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, Raised> {
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let restore = move || {
            pg_sys::MemoryContextSwitchTo(cxt);
            pg_sys::CurrentResourceOwner = owner;
        };
        PgTryBuilder::new(move || {
            let r = f();
            pg_sys::ReleaseCurrentSubTransaction();
            restore();
            Ok(r)
        })
        .catch_others(move |e| {
            pg_sys::MemoryContextSwitchTo(cxt);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            restore();
            match e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r)
                    if !servers_own(r.sql_error_code()) =>
                {
                    Err(Raised {
                        code: r.sql_error_code(),
                        message: r.message().to_string(),
                    })
                }
                other => other.rethrow(),
            }
        })
        .execute()
    }
}

/// Out of resources (53), operator intervention but a cancel (57), system
/// (58) and internal (XX) errors: the server's, retried with the peer
/// transaction, never held against the merge function.
fn servers_own(code: PgSqlErrorCode) -> bool {
    use PgSqlErrorCode::*;
    let class = |c: PgSqlErrorCode| (c as i32) & 0xFFF;
    let is_class = |prefix: PgSqlErrorCode| class(code) == class(prefix);
    code != ERRCODE_QUERY_CANCELED
        && (is_class(ERRCODE_INSUFFICIENT_RESOURCES)
            || is_class(ERRCODE_OPERATOR_INTERVENTION)
            || is_class(ERRCODE_SYSTEM_ERROR)
            || is_class(ERRCODE_INTERNAL_ERROR))
}
