//! Capturing local writes to global tables: stamp the row's version (new
//! hybrid-logical-clock stamp, the region's entry of the version vector up
//! by one) and emit the write intent as a transactional logical-decoding
//! message, in the writer's own transaction. It runs for every written row,
//! so it is Rust with one kept plan (it was plpgsql calling plpgsql).

use crate::counters::Counters;
use crate::row_versions::{Store, Version};
use foreshadow_model::intent::{MESSAGE_PREFIX, WIRE_VERSION};
use foreshadow_model::strategy::counter::Tally;
use foreshadow_model::strategy::leaf::Leaf;
use foreshadow_model::{Hlc, Intent, IntentClass, Op, Strategy};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use serde_json::{Map, Number, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// What capture needs to know about a global table, from Foreshadow's
/// registry (`foreshadow.tables`), never from the trigger's arguments: a
/// role that attaches `foreshadow.capture()` to a table of its own cannot
/// make it speak for another table.
struct TableArgs {
    schema: String,
    table: String,
    strategy: String,
    pk: Vec<String>,
    counters: Vec<String>,
}

// Fully qualified: capture runs with the writer's search_path.
const REGISTRY_SQL: &str =
    "SELECT schema_name::pg_catalog.text, table_name::pg_catalog.text, strategy, \
     pk_cols, counter_cols FROM foreshadow.tables WHERE relid OPERATOR(pg_catalog.=) $1";
const LINK_KEY_SQL: &str = "SELECT key FROM foreshadow.link_key";

/// What `foreshadow.tables` says of global table `relid`; `caller` names
/// who asks, for the error when it is not global.
fn registered(relid: pg_sys::Oid, caller: Caller) -> TableArgs {
    let found = Spi::connect_mut(|client| {
        crate::spi::first_row(
            client,
            REGISTRY_SQL,
            &[pg_sys::OIDOID],
            &[relid.into()],
            |row| {
                let text = |i| row.get::<String>(i).ok().flatten().unwrap_or_default();
                let list = |i| row.get::<Vec<String>>(i).ok().flatten().unwrap_or_default();
                Some(TableArgs {
                    schema: text(1),
                    table: text(2),
                    strategy: text(3),
                    pk: list(4),
                    counters: list(5),
                })
            },
        )
    });
    found.unwrap_or_else(|| {
        let name = unsafe { pg_sys::get_rel_name(relid) };
        let name = if name.is_null() {
            format!("{relid:?}")
        } else {
            unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        };
        match caller {
            Caller::Capture => crate::errors::raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("foreshadow.capture() fired on table \"{name}\", which is not a global table"),
                "Only foreshadow.make_global() attaches Foreshadow's capture trigger; drop this trigger.",
            ),
            Caller::Function(f) => crate::errors::raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("foreshadow.{f}: table \"{name}\" is not global"),
                "SELECT * FROM foreshadow.global_tables lists the global tables.",
            ),
        }
    })
}

/// Who looks a global table up: the capture trigger (a table that is not
/// global means a trigger attached by hand) or an SQL function.
#[derive(Clone, Copy)]
enum Caller {
    Capture,
    Function(&'static str),
}

/// This region's link key, which seals every intent (model's `seal`): read
/// once per backend, with the extension owner's rights (capture is
/// SECURITY DEFINER); only the owner and the peers' sidecars can read it.
fn link_key() -> Rc<Vec<u8>> {
    thread_local! {
        static KEY: RefCell<Option<Rc<Vec<u8>>>> = const { RefCell::new(None) };
    }
    if let Some(k) = KEY.with(|k| k.borrow().clone()) {
        return k;
    }
    let key = Spi::connect_mut(|client| {
        crate::spi::first_row(client, LINK_KEY_SQL, &[], &[], |r| {
            r.get::<Vec<u8>>(1).ok().flatten()
        })
    })
    .expect("foreshadow.link_key has its row");
    let key = Rc::new(key);
    KEY.with(|k| *k.borrow_mut() = Some(key.clone()));
    key
}

/// How to print a relation's rows: each column's name and output
/// function by attribute number (`None`: dropped or generated, not sent).
struct Printer {
    columns: Vec<Option<(String, pg_sys::Oid)>>,
    /// By attribute number: whether the column is a key or counter column,
    /// all that is read of a row's image before an update or delete.
    before: Vec<bool>,
    /// money is printed after `lc_monetary`.
    money: bool,
}

/// 790: money (pg_type.h's CASHOID, which the bindings leave out).
const CASHOID: u32 = 790;

impl Printer {
    fn new(desc: pg_sys::TupleDesc, t: &TableArgs) -> Printer {
        let desc = unsafe { PgTupleDesc::from_pg_unchecked(desc) };
        let mut money = false;
        let columns: Vec<_> = desc
            .iter()
            .map(|a| {
                if a.is_dropped() || a.attgenerated != 0 {
                    return None;
                }
                let typ = a.type_oid().value();
                money |= typ == pg_sys::Oid::from(CASHOID);
                let (mut output, mut varlena) = (pg_sys::Oid::INVALID, false);
                unsafe { pg_sys::getTypeOutputInfo(typ, &mut output, &mut varlena) };
                Some((a.name().to_string(), output))
            })
            .collect();
        let before = columns
            .iter()
            .map(|c| {
                c.as_ref()
                    .is_some_and(|(name, _)| t.pk.contains(name) || t.counters.contains(name))
            })
            .collect();
        Printer {
            columns,
            before,
            money,
        }
    }

    /// The row as column → text (as the type's output function prints it,
    /// under the canonical settings) or null. Text, not JSON numbers or
    /// arrays, so that every value reaches the peers bit-identical (-0,
    /// NaN, json with duplicate keys, 'null'::json) and is read back there
    /// by the same type's input function.
    fn print(&self, desc: pg_sys::TupleDesc, tuple: pg_sys::HeapTuple) -> Map<String, Value> {
        self.print_where(desc, tuple, |_| true)
    }

    /// The key and counter columns of the row (an image before a write).
    fn print_before(
        &self,
        desc: pg_sys::TupleDesc,
        tuple: pg_sys::HeapTuple,
    ) -> Map<String, Value> {
        self.print_where(desc, tuple, |i| self.before[i])
    }

    fn print_where(
        &self,
        desc: pg_sys::TupleDesc,
        tuple: pg_sys::HeapTuple,
        wanted: impl Fn(usize) -> bool,
    ) -> Map<String, Value> {
        let n = self.columns.len();
        let (mut values, mut nulls) = (vec![pg_sys::Datum::from(0); n], vec![true; n]);
        unsafe { pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr()) };
        crate::canonical::printing(self.money, || {
            self.columns
                .iter()
                .enumerate()
                .filter(|(i, _)| wanted(*i))
                .filter_map(|(i, c)| {
                    let (name, output) = c.as_ref()?;
                    let value = if nulls[i] {
                        Value::Null
                    } else {
                        let text = unsafe { pg_sys::OidOutputFunctionCall(*output, values[i]) };
                        let s = unsafe { std::ffi::CStr::from_ptr(text) }
                            .to_string_lossy()
                            .into_owned();
                        unsafe { pg_sys::pfree(text.cast()) };
                        Value::String(s)
                    };
                    Some((name.clone(), value))
                })
                .collect()
        })
    }
}

/// A global table's registry entry and printer.
type Captured = Rc<(TableArgs, Printer)>;

thread_local! {
    /// By table, with the relcache generation they were read in (every
    /// change to a table's registry entry recreates its capture trigger,
    /// which invalidates its relcache entry).
    static CAPTURED: RefCell<HashMap<pg_sys::Oid, (u64, Captured)>> = RefCell::new(HashMap::new());
}

fn captured(relid: pg_sys::Oid, desc: pg_sys::TupleDesc) -> Captured {
    let generation = crate::catalog::generation();
    if let Some((g, c)) = CAPTURED.with(|c| c.borrow().get(&relid).cloned()) {
        if g == generation {
            return c;
        }
    }
    let args = registered(relid, Caller::Capture);
    let printer = Printer::new(desc, &args);
    let c = Rc::new((args, printer));
    CAPTURED.with(|m| m.borrow_mut().insert(relid, (generation, c.clone())));
    c
}

fn key_of(row: &Map<String, Value>, pk: &[String]) -> Map<String, Value> {
    pk.iter()
        .map(|c| (c.clone(), row.get(c).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// The version store, opened for one write or one announced table.
fn open_store() -> Store {
    let versions = Spi::connect_mut(crate::catalog::versions);
    Store::new(Rc::new(crate::heap::Heap::open(versions)))
}

/// One local write: the row's key, its image before (None for inserts) and
/// after (None for deletes), and the counter increments.
struct Write {
    op: Op,
    key: Map<String, Value>,
    old: Option<Map<String, Value>>,
    row: Option<Map<String, Value>>,
    delta: Option<Map<String, Value>>,
}

/// Stamps one local write and emits its intent.
fn record(store: &Store, relid: pg_sys::Oid, t: &TableArgs, w: Write) {
    let Write {
        op,
        key,
        old,
        row,
        delta,
    } = w;
    let region = crate::gucs::region();
    let key_text = serde_json::to_string(&key).expect("a key serialises");
    // The row's new version: a stamp from the region's clock above the
    // row's previous stamp (which may be a peer's, from a clock ahead of
    // this one), and the region's entry of the version vector up by one.
    let found = store.find(relid, &key_text);
    let here = found.as_ref().map(|f| &f.version);
    let hlc = crate::clock::stamp_above(here.map_or(Hlc(0), |v| v.hlc));
    let strategy = t.strategy.parse().ok();
    let mut vv = here.map(|v| v.vv.clone()).unwrap_or_default();
    match strategy {
        // Their tombstones are forgotten by version (settled.rs): a row
        // with no version here may have had one.
        Some(Strategy::Merge | Strategy::Vv) if here.is_none() => vv.bump_fresh(&region, hlc),
        _ => vv.bump(&region),
    }
    // R1: the write has seen the row's applied version, not the leaves of
    // a conflict still open on it, which stays open with this write in it.
    let (counters, erases) = if t.counters.is_empty() {
        (None, None)
    } else {
        let mut c = Counters::parse(here.and_then(|h| h.counters.as_deref()));
        if let Some(old) = &old {
            c.start_from(&t.counters, |col| {
                old.get(col).and_then(Value::as_str).map(str::to_owned)
            });
        }
        let erases = c.local_write(&region, &vv, op, delta.as_ref());
        (c.to_stored(), erases)
    };
    let leaves = here.and_then(|h| {
        let write = Leaf {
            vv: vv.clone(),
            hlc,
            origin: region.clone(),
            row: row.clone(),
        };
        crate::leaves::after_local_write(h.leaves.as_deref(), write)
    });
    let version = Version {
        hlc,
        origin: region.clone(),
        vv,
        deleted: op == Op::Delete,
        leaves,
        counters,
    };
    store.write(found.as_ref(), relid, &key_text, &version);
    if op == Op::Delete && crate::tombstones::collectable(strategy, &t.counters) {
        Spi::connect_mut(|c| crate::tombstones::queue(c, relid, &key_text, hlc, &region));
    }
    if op == Op::Delete && matches!(strategy, Some(Strategy::Merge | Strategy::Vv)) {
        // Its tombstone goes once every region is past it (settled.rs).
        Spi::connect_mut(|c| crate::settled::note(c, relid, &key_text, &version.vv));
    }
    emit_write(t, version, op, key, row, delta, erases);
}

/// Emits the intent of a write whose version is `version`.
fn emit_write(
    t: &TableArgs,
    version: Version,
    op: Op,
    key: Map<String, Value>,
    row: Option<Map<String, Value>>,
    delta: Option<Map<String, Value>>,
    erases: Option<BTreeMap<String, Tally<Number>>>,
) {
    // The one wire type (model/src/intent.rs).
    emit(&Intent {
        v: WIRE_VERSION,
        origin: version.origin,
        hlc: version.hlc,
        schema: t.schema.clone(),
        table: t.table.clone(),
        op,
        key,
        row,
        vv: version.vv,
        delta,
        erases,
        strategy: t.strategy.clone(),
        class: IntentClass::Data,
        resolves: None,
        shadow_set: None,
        stability: None,
    });
}

/// Emits a metadata intent of this region (a shadow set, a heartbeat),
/// stamped `hlc`, for `schema.table` (its `strategy`): `fill` sets what it
/// carries. It describes no row: no key, no image.
pub fn emit_metadata(
    schema: &str,
    table: &str,
    strategy: Strategy,
    hlc: Hlc,
    fill: impl FnOnce(&mut Intent),
) {
    let origin = crate::gucs::region();
    let mut vv = foreshadow_model::VersionVector::new();
    vv.bump(&origin);
    let mut intent = Intent {
        v: WIRE_VERSION,
        origin,
        hlc,
        schema: schema.into(),
        table: table.into(),
        op: Op::Update,
        key: Map::new(),
        row: None,
        vv,
        delta: None,
        erases: None,
        strategy: strategy.name().into(),
        class: IntentClass::Metadata,
        resolves: None,
        shadow_set: None,
        stability: None,
    };
    fill(&mut intent);
    emit(&intent);
}

/// Emits `intent`, sealed, in the current transaction: a local write's, or
/// a resolution this region made.
pub fn emit(intent: &Intent) {
    let sealed = foreshadow_model::seal::seal(&link_key(), &intent.encode());
    let intent = String::from_utf8(sealed).expect("hex and JSON are UTF-8");
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_logical_emit_message_text,
            &[
                true.into_datum(),
                MESSAGE_PREFIX.into_datum(),
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
    // Rows applied from peers never get here: apply switches this trigger
    // off in its own executor state (heap.rs). What does get here from an
    // apply session is a write by a user's trigger enabled for replicas,
    // a local write like any other.
    let relid = trigger.relid()?;
    let data = trigger.trigger_data();
    let desc = unsafe { (*data.tg_relation).rd_att };
    let c = captured(relid, desc);
    let (t, p) = (&c.0, &c.1);
    let event = data.tg_event;
    let fired_by = |e: u32| event & pg_sys::TRIGGER_EVENT_OPMASK == e;
    let (old_row, new_row) = if fired_by(pg_sys::TRIGGER_EVENT_INSERT) {
        (None, Some(p.print(desc, data.tg_trigtuple)))
    } else if fired_by(pg_sys::TRIGGER_EVENT_UPDATE) {
        (
            Some(p.print_before(desc, data.tg_trigtuple)),
            Some(p.print(desc, data.tg_newtuple)),
        )
    } else {
        (Some(p.print_before(desc, data.tg_trigtuple)), None)
    };
    match (&old_row, new_row) {
        (Some(o), None) => record(
            &open_store(),
            relid,
            t,
            Write {
                op: Op::Delete,
                key: key_of(o, &t.pk),
                old: old_row.clone(),
                row: None,
                delta: None,
            },
        ),
        (_, Some(n)) => {
            let key = key_of(&n, &t.pk);
            let op = if old_row.is_some() {
                Op::Update
            } else {
                Op::Insert
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
                (!t.counters.is_empty()).then(|| counter_delta(&t.counters, old_row.as_ref(), &n));
            let w = Write {
                op,
                key,
                old: old_row,
                row: Some(n),
                delta,
            };
            record(&open_store(), relid, t, w);
        }
        (None, None) => {}
    }
    Ok(None)
}

/// Counter columns travel as increments: new value minus old (insert: minus
/// 0; NULL counts as 0), exactly.
fn counter_delta(
    counters: &[String],
    old: Option<&Map<String, Value>>,
    new: &Map<String, Value>,
) -> Map<String, Value> {
    counters
        .iter()
        .map(|c| {
            let text = |v: Option<&Value>| match v {
                Some(Value::String(s)) => s.clone(),
                _ => "0".into(),
            };
            let (n, o) = (text(new.get(c)), text(old.and_then(|r| r.get(c))));
            let d = if n == o {
                "0".into()
            } else {
                crate::counters::difference(&n, &o)
            };
            // NaN and the infinities (numeric) are no increment: sent as
            // 0, the writer's region alone would hold them.
            let Ok(d) = serde_json::from_str::<Number>(&d) else {
                crate::errors::raise(
                    PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
                    format!("counter column \"{c}\" cannot go from {o} to {n}"),
                    "A counter adds up its increments in every region: only finite numbers.",
                )
            };
            (c.clone(), Value::Number(d))
        })
        .collect()
}

/// BEFORE INSERT OR UPDATE on tables with counter columns (arguments: the
/// counter columns): a counter written as NULL is stored as zero, so that
/// every region holds the same number (peers add increments to zero).
#[pg_trigger(sql = false)]
fn counter_nulls<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, Box<dyn std::error::Error>> {
    let Some(new) = trigger.new() else {
        return Ok(None);
    };
    let mut row = new.into_owned();
    let columns = trigger.extra_args().unwrap_or_default();
    for c in &columns {
        let Some((_, att)) = row.get_attribute_by_name(c) else {
            continue;
        };
        let typ = att.type_oid().value();
        macro_rules! zero_if_null {
            ($t:ty, $zero:expr) => {
                if row.get_by_name::<$t>(c)?.is_none() {
                    row.set_by_name::<$t>(c, $zero)?;
                }
            };
        }
        match typ {
            pg_sys::INT2OID => zero_if_null!(i16, 0),
            pg_sys::INT4OID => zero_if_null!(i32, 0),
            pg_sys::INT8OID => zero_if_null!(i64, 0),
            pg_sys::NUMERICOID => zero_if_null!(AnyNumeric, AnyNumeric::from(0)),
            _ => {}
        }
    }
    Ok(Some(row))
}

/// Announces the rows already in a table that was just made global, as
/// inserts, so that they reach the regions that do not have them yet
/// (`make_global(..., announce_existing => true)`). Read through a cursor,
/// a batch at a time, printed as capture prints rows.
#[pg_extern(volatile, parallel_unsafe)]
fn announce_rows(tbl: pg_sys::Oid) {
    let t = registered(tbl, Caller::Function("announce_rows"));
    let store = open_store();
    each_row(tbl, &t, |row| {
        let key = key_of(&row, &t.pk);
        let w = Write {
            op: Op::Insert,
            key,
            old: None,
            row: Some(row),
            delta: None,
        };
        record(&store, tbl, &t, w);
    });
}

/// Calls `f` with every row of global table `relid`, printed as capture
/// prints rows; read through a cursor, a batch at a time. The table is
/// read by its relid, whatever it is called now (the name it was made
/// global under may since name someone's view), and as its owner: opening
/// it folds the owner's index expressions, which the callers' rights
/// (the extension's, in `reannounce`) must not run.
fn each_row(relid: pg_sys::Oid, t: &TableArgs, mut f: impl FnMut(Map<String, Value>)) {
    let table = Spi::connect_mut(|client| crate::catalog::table_by_relid(client, relid))
        .filter(|_| unsafe { pg_sys::get_rel_relkind(relid) } == pg_sys::RELKIND_RELATION as i8)
        .unwrap_or_else(|| {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                format!(
                    "global table {}.{} is no longer an ordinary table",
                    t.schema, t.table
                ),
                "Only ordinary tables can be global; drop_global() it.",
            )
        });
    // Row-level security the owner is subject to (FORCE) would skip rows
    // silently: refused instead.
    let forced = unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        let forced = (*(*rel).rd_rel).relrowsecurity && (*(*rel).rd_rel).relforcerowsecurity;
        pg_sys::RelationClose(rel);
        forced
    };
    if forced {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "cannot read {} to announce its rows: row-level security is forced on its owner",
                table.qualified
            ),
            "Its rows are read as its owner; run ALTER TABLE ... NO FORCE ROW LEVEL SECURITY for the announce, then FORCE again.",
        );
    }
    let query = format!("SELECT * FROM ONLY {}", table.qualified);
    let owner = table.owner;
    Spi::connect_mut(|client| {
        let mut cursor = crate::rights::as_owner(owner, || client.open_cursor(&query, &[]));
        loop {
            let batch =
                crate::rights::as_owner(owner, || cursor.fetch(1000)).expect("fetching rows");
            if batch.is_empty() {
                break;
            }
            // The fetched rows are SPI's current result set.
            let rows: Vec<Map<String, Value>> = unsafe {
                let fetched = pg_sys::SPI_tuptable;
                let desc = (*fetched).tupdesc;
                let printer = Printer::new(desc, t);
                (0..(*fetched).numvals as usize)
                    .map(|i| printer.print(desc, *(*fetched).vals.add(i)))
                    .collect()
            };
            rows.into_iter().for_each(&mut f);
        }
    });
}

/// Sends this region's own writes to `tbl` again, each with the version it
/// has (no new stamps): every row and tombstone whose last writer is this
/// region. Receivers apply them by the table's strategy, so a region that
/// missed some of them (a lost slot, see `foreshadow-sidecar
/// --resync-peer`) gets exactly those, and nothing newer is overwritten.
/// Counter columns travel as increments, which cannot be sent again, so
/// tables with counters are refused. Returns how many were sent. With the
/// extension owner's rights: the peers' sidecars call it (grant_sidecar).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn reannounce(tbl: pg_sys::Oid) -> i64 {
    let t = registered(tbl, Caller::Function("reannounce"));
    if !t.counters.is_empty() {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "cannot re-announce {}.{}: it has counter columns",
                crate::catalog::ident(&t.schema),
                crate::catalog::ident(&t.table)
            ),
            "Increments that a region missed cannot be sent again; compare the counters with foreshadow.table_digest() and correct them by hand.",
        );
    }
    let region = crate::gucs::region();
    // One open of the version store for the whole table, not one per row.
    let store = open_store();
    let own = |key: &Map<String, Value>, deleted: bool| -> Option<Version> {
        let key_text = serde_json::to_string(key).expect("a key serialises");
        let v = store.find(tbl, &key_text)?.version;
        (v.origin == region && v.deleted == deleted).then_some(v)
    };
    let mut sent = 0i64;
    let tombstones = format!(
        "SELECT key::pg_catalog.text FROM foreshadow.row_versions \
          WHERE relid OPERATOR(pg_catalog.=) {} AND deleted",
        u32::from(tbl)
    );
    each_row(tbl, &t, |row| {
        let key = key_of(&row, &t.pk);
        if let Some(v) = own(&key, false) {
            emit_write(&t, v, Op::Insert, key, Some(row), None, None);
            sent += 1;
        }
    });
    let keys: Vec<String> = Spi::connect_mut(|client| {
        let mut cursor = client.open_cursor(&tombstones, &[]);
        let mut keys = Vec::new();
        loop {
            let batch = cursor
                .fetch(1000)
                .expect("fetching tombstones to re-announce");
            if batch.is_empty() {
                break;
            }
            keys.extend(
                batch
                    .into_iter()
                    .filter_map(|r| r.get::<String>(1).ok().flatten()),
            );
        }
        keys
    });
    for k in keys {
        let Ok(key) = serde_json::from_str::<Map<String, Value>>(&k) else {
            continue;
        };
        if let Some(v) = own(&key, true) {
            emit_write(&t, v, Op::Delete, key, None, None, None);
            sent += 1;
        }
    }
    sent
}
