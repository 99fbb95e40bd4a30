//! What applying a peer's write needs to know about a global table, read
//! from the catalog (`foreshadow.tables`, `pg_class`, `pg_attribute`,
//! `pg_index`) and cached per backend until a relcache invalidation: the
//! columns the table has *now*, so an `ALTER TABLE` is picked up by the next
//! write, never applied through a stale copy.

use crate::spi::first_row;
use foreshadow_model::Strategy;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Global tables by (schema, table): the generation read in, and the table.
type TableCache = HashMap<(String, String), (u64, Option<Rc<Table>>)>;

thread_local! {
    /// `None`: not a global table here.
    static TABLES: RefCell<TableCache> = RefCell::new(HashMap::new());
    /// Bumped by every relcache invalidation. Every change to a global
    /// table's setup (make_global, set_column_strategy, drop_global, DROP
    /// TABLE, ALTER TABLE) invalidates its relcache entry: cached tables
    /// are then read again.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
}

// These run in writers' sessions too (capture, SECURITY DEFINER, with the
// writer's search_path, which is not pinned because that costs a setting
// change per written row): every function, operator and type is
// schema-qualified, so nothing a user puts on the search_path is used.

/// A global table's handle here, by the names peers use.
const RELID_SQL: &str = "SELECT relid FROM foreshadow.tables \
     WHERE schema_name OPERATOR(pg_catalog.=) $1::pg_catalog.name \
       AND table_name OPERATOR(pg_catalog.=) $2::pg_catalog.name";
/// What applying needs to know about a relation (a global table, or
/// Foreshadow's own `row_versions`).
const TABLE_SQL: &str = "SELECT c.oid, c.relowner, c.reltype, t.strategy, \
       (SELECT pg_catalog.format('%I.%I', pn.nspname, p.proname) FROM pg_catalog.pg_proc p \
          JOIN pg_catalog.pg_namespace pn ON pn.oid OPERATOR(pg_catalog.=) p.pronamespace \
         WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(t.merge_function)), \
       pg_catalog.format('%I.%I', n.nspname, c.relname), coalesce(t.counter_cols, '{}'), \
       pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY a.attnum), \
       pg_catalog.array_agg(a.attgenerated OPERATOR(pg_catalog.<>) '' ORDER BY a.attnum), \
       pg_catalog.array_agg(a.attnum::pg_catalog.int4 ORDER BY a.attnum), \
       pg_catalog.array_agg(a.atttypid ORDER BY a.attnum), \
       pg_catalog.array_agg(a.atttypmod ORDER BY a.attnum), \
       (SELECT i.indexrelid FROM pg_catalog.pg_index i \
         WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisprimary), \
       n.nspname::pg_catalog.text, c.relname::pg_catalog.text, coalesce(t.shadows, '{}') \
     FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
     JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid \
       AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
     LEFT JOIN foreshadow.tables t ON t.relid OPERATOR(pg_catalog.=) c.oid \
     WHERE c.oid OPERATOR(pg_catalog.=) $1 \
     GROUP BY c.oid, c.relowner, c.reltype, t.strategy, t.merge_function, n.nspname, c.relname, t.counter_cols, t.shadows";
const OWN_SQL: &str = "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid";

pub struct Column {
    pub name: String,
    /// `GENERATED ALWAYS AS (...) STORED`: computed here, never written.
    /// (Identity columns are written as the writer's region drew them.)
    pub generated: bool,
    pub attnum: i16,
    pub typmod: i32,
    /// The type's input function and its I/O parameter, and its output
    /// function: values travel as text.
    pub input: pg_sys::Oid,
    pub ioparam: pg_sys::Oid,
    pub output: pg_sys::Oid,
}

/// One global table of this region.
pub struct Table {
    pub relid: pg_sys::Oid,
    /// Applied writes run with the owner's rights.
    pub owner: pg_sys::Oid,
    /// `schema.table`, quoted.
    pub qualified: String,
    /// The primary key's index: rows are found through it.
    pub pk_index: pg_sys::Oid,
    pub counters: Vec<String>,
    pub columns: Vec<Column>,
    /// The table's row type (the merge function's argument type).
    pub rowtype: pg_sys::Oid,
    /// `None` for Foreshadow's own tables.
    pub strategy: Option<Strategy>,
    /// Strategy merge: the merge function's name, quoted (`None`: it was
    /// dropped, and conflicts fall back to last writer wins).
    pub merge_function: Option<String>,
    /// The names peers use (unquoted).
    pub schema: String,
    pub name: String,
    /// Strategy merge: the regions whose sidecars resolve its conflicts.
    pub shadows: Vec<String>,
}

/// Called by PostgreSQL for every relcache invalidation (registered in
/// `_PG_init`): cached tables are stale from now on.
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn forget_tables(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    GENERATION.with(|g| g.set(g.get() + 1));
}

/// Changes with every relcache invalidation (for caches of catalog facts).
pub fn generation() -> u64 {
    GENERATION.with(Cell::get)
}

/// The global table `schema.table`, from the cache while nothing changed.
pub fn table(client: &mut SpiClient<'_>, schema: &str, name: &str) -> Option<Rc<Table>> {
    // Read first: an invalidation during the lookup leaves the entry stale.
    let generation = GENERATION.with(Cell::get);
    let key = (schema.to_string(), name.to_string());
    if let Some((g, t)) = TABLES.with(|c| c.borrow().get(&key).cloned()) {
        if g == generation {
            return t;
        }
    }
    let relid = first_oid(client, RELID_SQL, &[schema.into(), name.into()]);
    let t = relid.and_then(|r| lookup(client, r)).map(Rc::new);
    TABLES.with(|c| c.borrow_mut().insert(key, (generation, t.clone())));
    t
}

/// The global table whose handle here is `relid`.
pub fn table_by_relid(client: &mut SpiClient<'_>, relid: pg_sys::Oid) -> Option<Rc<Table>> {
    lookup(client, relid).map(Rc::new)
}

/// `foreshadow.row_versions`, where every row's version is kept; written
/// at the heap level like the users' tables.
pub fn versions(client: &mut SpiClient<'_>) -> Rc<Table> {
    own(client, "foreshadow.row_versions")
}

/// `foreshadow.conflict_log`: written for every conflict an apply meets,
/// which under contention is every other intent, so at the heap level too.
pub fn conflict_log(client: &mut SpiClient<'_>) -> Rc<Table> {
    own(client, "foreshadow.conflict_log")
}

/// `foreshadow.peer_stats`: written by every apply call.
pub fn peer_stats(client: &mut SpiClient<'_>) -> Rc<Table> {
    own(client, "foreshadow.peer_stats")
}

/// One of Foreshadow's own tables, from the cache while nothing changed.
fn own(client: &mut SpiClient<'_>, name: &'static str) -> Rc<Table> {
    thread_local! {
        static OWN: RefCell<HashMap<&'static str, (u64, Rc<Table>)>> = RefCell::new(HashMap::new());
    }
    let generation = GENERATION.with(Cell::get);
    if let Some((g, t)) = OWN.with(|o| o.borrow().get(name).cloned()) {
        if g == generation {
            return t;
        }
    }
    let t = first_oid(client, OWN_SQL, &[name.into()])
        .and_then(|r| lookup(client, r))
        .map(Rc::new)
        .unwrap_or_else(|| panic!("{name} exists"));
    OWN.with(|o| o.borrow_mut().insert(name, (generation, t.clone())));
    t
}

fn first_oid(
    client: &mut SpiClient<'_>,
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Option<pg_sys::Oid> {
    let types: Vec<pg_sys::Oid> = args.iter().map(|_| pg_sys::TEXTOID).collect();
    first_row(client, sql, &types, args, |row| {
        row.get::<pg_sys::Oid>(1).ok()?
    })
}

fn lookup(client: &mut SpiClient<'_>, relid: pg_sys::Oid) -> Option<Table> {
    first_row(
        client,
        TABLE_SQL,
        &[pg_sys::OIDOID],
        &[relid.into()],
        table_of,
    )
}

/// A table's apply metadata from its `TABLE_SQL` row.
fn table_of(row: &pgrx::spi::SpiHeapTupleData<'_>) -> Option<Table> {
    let list =
        |i: usize| -> Vec<String> { row.get::<Vec<String>>(i).ok().flatten().unwrap_or_default() };
    let names = list(8);
    let generated = row.get::<Vec<bool>>(9).ok().flatten().unwrap_or_default();
    let attnums = row.get::<Vec<i32>>(10).ok().flatten().unwrap_or_default();
    let typids = row
        .get::<Vec<pg_sys::Oid>>(11)
        .ok()
        .flatten()
        .unwrap_or_default();
    let typmods = row.get::<Vec<i32>>(12).ok().flatten().unwrap_or_default();
    let columns = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let typid = typids[i];
            let (mut input, mut ioparam, mut output, mut varlena) = (
                pg_sys::Oid::INVALID,
                pg_sys::Oid::INVALID,
                pg_sys::Oid::INVALID,
                false,
            );
            unsafe {
                pg_sys::getTypeInputInfo(typid, &mut input, &mut ioparam);
                pg_sys::getTypeOutputInfo(typid, &mut output, &mut varlena);
            }
            Column {
                name,
                generated: generated[i],
                attnum: attnums[i] as i16,
                typmod: typmods[i],
                input,
                ioparam,
                output,
            }
        })
        .collect();
    Some(Table {
        relid: row.get::<pg_sys::Oid>(1).ok()??,
        owner: row.get::<pg_sys::Oid>(2).ok()??,
        qualified: row.get::<String>(6).ok()??,
        pk_index: row.get::<pg_sys::Oid>(13).ok()??,
        counters: list(7),
        columns,
        rowtype: row.get::<pg_sys::Oid>(3).ok()??,
        strategy: row
            .get::<String>(4)
            .ok()
            .flatten()
            .and_then(|s| s.parse().ok()),
        merge_function: row.get::<String>(5).ok().flatten(),
        schema: row.get::<String>(14).ok()??,
        name: row.get::<String>(15).ok()??,
        shadows: list(16),
    })
}

/// An identifier quoted as PostgreSQL quotes it.
pub fn ident(s: &str) -> String {
    let c = std::ffi::CString::new(s).unwrap_or_default();
    unsafe { std::ffi::CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }
        .to_string_lossy()
        .into_owned()
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}
