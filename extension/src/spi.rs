//! Kept SPI plans: every statement that runs per write is prepared once per
//! backend and reused (PostgreSQL re-plans a kept plan itself when a table
//! it reads changes).

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

thread_local! {
    /// Prepared plans by SQL text. Per-table statements embed the table's
    /// name and columns, so a changed table gets new entries.
    static PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// The plan of `sql`, prepared on first use and kept for the backend. The
/// map is not borrowed while a plan runs: running one can fire triggers
/// that come back here.
pub fn kept_plan(
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

/// The first row of `sql` (its kept plan), read by `read`; None when there
/// is no row. For look-ups that expect one row or none.
pub fn first_row<'a, T>(
    client: &mut SpiClient<'_>,
    sql: &str,
    types: &[pg_sys::Oid],
    args: &[DatumWithOid<'a>],
    read: impl FnOnce(&pgrx::spi::SpiHeapTupleData<'_>) -> Option<T>,
) -> Option<T> {
    let plan = kept_plan(client, sql, types);
    let rows = client
        .select(&*plan, None, args)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    read(&rows.into_iter().next()?)
}

/// Runs `sql` with its kept plan; returns the rows, every column as text.
pub fn run_kept<'a>(
    client: &mut SpiClient<'_>,
    sql: &str,
    types: &[pg_sys::Oid],
    args: &[DatumWithOid<'a>],
) -> Vec<Vec<Option<String>>> {
    let plan = kept_plan(client, sql, types);
    let table = client
        .update(&*plan, None, args)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out = Vec::new();
    for row in table {
        let mut cols = Vec::new();
        for i in 1..=row.columns() {
            cols.push(row.get::<String>(i).ok().flatten());
        }
        out.push(cols);
    }
    // Result sets live until SPI disconnects; a peer transaction can hold
    // thousands of intents, so free each one now.
    unsafe { pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable) };
    out
}
