//! Writing the user's row at the heap level, as PostgreSQL's own apply
//! worker does (`worker.c`, `execReplication.c`): the row is found by its
//! primary key with `RelationFindReplTupleByIndex`, which waits for a
//! concurrent writer of that row and locks it, and written with
//! `ExecSimpleRelationInsert/Update/Delete`, which maintain the indexes,
//! check constraints, compute stored generated columns and fire the
//! triggers enabled for replicas. No SQL statement runs per row.
//!
//! Everything here runs as the table's owner (`rights::as_owner`): input
//! functions (domain checks), defaults, constraints, index expressions and
//! the triggers enabled for replicas never run with more rights than the
//! owner has.
//!
//! Values arrive as text, printed by capture under the canonical settings,
//! and are read with the column types' input functions (looked up once per
//! table, `catalog.rs`), under the same settings (`canonical::applying`).

use crate::catalog::{Column, Table};
use crate::rights::as_owner;
use pgrx::pg_sys;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;

/// A row's values by attribute number (index = attnum - 1); `None`: NULL.
/// Columns the intent does not carry are left out of `set`.
pub struct Values {
    datums: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    set: Vec<bool>,
}

/// The executor state for writing rows of one table, kept for one apply
/// call (all the intents of a peer transaction, or of a run of them) or
/// one captured row; dropped (freed, closed) after.
pub struct Heap {
    table: Rc<Table>,
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    relinfo: *mut pg_sys::ResultRelInfo,
    natts: usize,
    /// Slots made once and reused for every row (each new slot pins the
    /// table's descriptor in the resource owner, which a long run of
    /// intents would make slow): the key searched for, the row found
    /// (locked), and the row to write.
    search: *mut pg_sys::TupleTableSlot,
    local: *mut pg_sys::TupleTableSlot,
    new: *mut pg_sys::TupleTableSlot,
    /// Column defaults by attribute number, prepared on first use (reading
    /// one parses its expression from the catalog's text every time).
    /// Unwind-safe: an error leaves an entry made or not, never half made.
    defaults: AssertUnwindSafe<RefCell<HashMap<i16, *mut pg_sys::ExprState>>>,
    /// Inside `after_the_intent`: AFTER triggers wait for the intent's end.
    intent_open: AssertUnwindSafe<std::cell::Cell<bool>>,
}

/// Allocations go to the executor state's memory until dropped: it is
/// freed when the apply call is done, so a long transaction's rows are not
/// kept in the function's memory until it ends.
struct Switch(pg_sys::MemoryContext);

impl Switch {
    unsafe fn to(cxt: pg_sys::MemoryContext) -> Switch {
        let old = pg_sys::CurrentMemoryContext;
        pg_sys::CurrentMemoryContext = cxt;
        Switch(old)
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        unsafe { pg_sys::CurrentMemoryContext = self.0 };
    }
}

/// Foreshadow's own triggers are ENABLE ALWAYS (so that no session can
/// write a global table without capture), but an applied row is a peer's
/// write: capture would skip it anyway, and a counter is never NULL here.
/// They are switched off in this executor state's own copy of the
/// relation's triggers, so an applied row queues no trigger event for them;
/// every other trigger keeps the state its owner gave it.
unsafe fn skip_own_triggers(relinfo: *mut pg_sys::ResultRelInfo) {
    let desc = (*relinfo).ri_TrigDesc;
    if desc.is_null() {
        return;
    }
    for i in 0..(*desc).numtriggers as usize {
        let t = (*desc).triggers.add(i);
        if is_own_trigger_function((*t).tgfoid) {
            (*t).tgenabled = pg_sys::TRIGGER_DISABLED as std::ffi::c_char;
        }
    }
}

/// Whether `func` is `foreshadow.capture` or `foreshadow.counter_nulls`:
/// known by the function, not the trigger's name, so that a table owner's
/// own trigger is never switched off whatever it is called (only the
/// extension's owner can create functions in schema foreshadow).
unsafe fn is_own_trigger_function(func: pg_sys::Oid) -> bool {
    let schema = pg_sys::get_namespace_name(pg_sys::get_func_namespace(func));
    let name = pg_sys::get_func_name(func);
    !schema.is_null()
        && !name.is_null()
        && CStr::from_ptr(schema) == c"foreshadow"
        && matches!(
            CStr::from_ptr(name).to_bytes(),
            b"capture" | b"counter_nulls"
        )
}

unsafe fn node<T>(tag: pg_sys::NodeTag) -> *mut T {
    let p = pg_sys::palloc0(std::mem::size_of::<T>()) as *mut T;
    (*(p as *mut pg_sys::Node)).type_ = tag;
    p
}

/// The open tables of one apply call.
pub struct Heaps(RefCell<HashMap<pg_sys::Oid, Rc<Heap>>>);

impl Heaps {
    /// Starts an apply call, in a transaction whose constraint triggers
    /// fire immediately (`SET CONSTRAINTS ALL IMMEDIATE` until it ends): a
    /// table owner's deferrable trigger enabled for replicas then fires
    /// right after the applied row, as the owner, like the others. Deferred
    /// to the commit it would be queued for the transaction from within the
    /// owner's security-restricted operation, which PostgreSQL refuses (the
    /// peer's lane would stop), and would fire with the committer's rights.
    /// Set as the calling role (outside this SECURITY DEFINER function):
    /// it fires at once what the caller's transaction had deferred, which
    /// must not run with the extension owner's rights.
    pub fn applying() -> Heaps {
        let caller = unsafe { pg_sys::GetOuterUserId() };
        as_owner(caller, || unsafe {
            let all = node::<pg_sys::ConstraintsSetStmt>(pg_sys::NodeTag::T_ConstraintsSetStmt);
            pg_sys::AfterTriggerSetState(all);
        });
        Heaps(RefCell::default())
    }

    pub fn get(&self, table: &Rc<Table>) -> Rc<Heap> {
        self.0
            .borrow_mut()
            .entry(table.relid)
            .or_insert_with(|| Rc::new(Heap::open(table.clone())))
            .clone()
    }

    /// Makes what the intents applied so far wrote visible to the next one,
    /// as PostgreSQL's apply worker does after each change: a row (or its
    /// version) written twice in one apply call, by one peer transaction or
    /// a run of them, is otherwise "invisible" to the second write's lock.
    pub fn next_command(&self) {
        unsafe {
            pg_sys::CommandCounterIncrement();
            let cid = pg_sys::GetCurrentCommandId(true);
            for heap in self.0.borrow().values() {
                (*heap.estate).es_output_cid = cid;
            }
        }
    }
}

impl Heap {
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Opens `table` as its owner: opening its indexes folds their
    /// expressions and predicates, which may call the owner's functions.
    pub fn open(table: Rc<Table>) -> Heap {
        as_owner(table.owner, || unsafe { Heap::open_as_owner(table) })
    }

    unsafe fn open_as_owner(table: Rc<Table>) -> Heap {
        unsafe {
            let rel = pg_sys::table_open(table.relid, pg_sys::RowExclusiveLock as i32);
            let estate = pg_sys::CreateExecutorState();
            let rte = node::<pg_sys::RangeTblEntry>(pg_sys::NodeTag::T_RangeTblEntry);
            (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
            (*rte).relid = table.relid;
            (*rte).relkind = pg_sys::RELKIND_RELATION as std::ffi::c_char;
            (*rte).rellockmode = pg_sys::AccessShareLock as i32;
            pg_sys::ExecInitRangeTable(estate, pg_sys::lappend(std::ptr::null_mut(), rte.cast()));
            let relinfo = node::<pg_sys::ResultRelInfo>(pg_sys::NodeTag::T_ResultRelInfo);
            pg_sys::InitResultRelInfo(relinfo, rel, 1, std::ptr::null_mut(), 0);
            skip_own_triggers(relinfo);
            (*estate).es_opened_result_relations =
                pg_sys::lappend((*estate).es_opened_result_relations, relinfo.cast());
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            pg_sys::ExecOpenIndices(relinfo, false);
            let natts = (*(*rel).rd_att).natts as usize;
            let (search, local, new) = {
                let _cxt = Switch::to((*estate).es_query_cxt);
                let desc = (*rel).rd_att;
                let search = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
                let local = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
                let new = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
                (search, local, new)
            };
            Heap {
                table,
                rel,
                estate,
                relinfo,
                natts,
                search,
                local,
                new,
                defaults: AssertUnwindSafe(RefCell::new(HashMap::new())),
                intent_open: AssertUnwindSafe(std::cell::Cell::new(false)),
            }
        }
    }

    fn cxt(&self) -> pg_sys::MemoryContext {
        unsafe { (*self.estate).es_query_cxt }
    }

    /// Reads the carried columns of `row` (column → text or null) into
    /// datums with the columns' input functions; generated columns are left
    /// for the executor to compute.
    pub fn values(&self, row: &Map<String, Value>) -> Values {
        as_owner(self.table.owner, || self.values_of(row))
    }

    /// Reads a row of Foreshadow's own tables, made here rather than
    /// carried by an intent: (column, text or NULL) pairs, as `values`.
    pub fn fields<'a>(
        &self,
        fields: impl IntoIterator<Item = (&'a str, Option<String>)>,
    ) -> Values {
        let row: Map<String, Value> = fields
            .into_iter()
            .map(|(c, v)| (c.to_owned(), v.map_or(Value::Null, Value::String)))
            .collect();
        self.values(&row)
    }

    fn values_of(&self, row: &Map<String, Value>) -> Values {
        let mut v = Values {
            datums: vec![pg_sys::Datum::from(0); self.natts],
            nulls: vec![true; self.natts],
            set: vec![false; self.natts],
        };
        for (name, value) in row {
            let Some(c) = self.table.column(name) else {
                continue; // refused before (check_fits)
            };
            if c.generated {
                continue;
            }
            self.set_as_owner(&mut v, c, value);
        }
        v
    }

    /// Sets one column from its text (or JSON null).
    fn set_as_owner(&self, v: &mut Values, c: &Column, value: &Value) {
        let i = c.attnum as usize - 1;
        v.set[i] = true;
        let text = match value {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        };
        let text = text.map(|s| CString::new(s).unwrap_or_else(|_| nul_in_value(c)));
        // Input functions are called for NULL too (domains check NOT NULL).
        let ptr = text.as_ref().map_or(std::ptr::null_mut(), |s| {
            s.as_ptr() as *mut std::ffi::c_char
        });
        unsafe {
            let _cxt = Switch::to(self.cxt());
            v.datums[i] = pg_sys::OidInputFunctionCall(c.input, ptr, c.ioparam, c.typmod);
        }
        v.nulls[i] = text.is_none();
    }

    /// The row with key `key`, locked; waits for a concurrent writer of it.
    pub fn find(&self, key: &Values) -> Option<*mut pg_sys::TupleTableSlot> {
        as_owner(self.table.owner, || unsafe {
            let _cxt = Switch::to(self.cxt());
            let search = self.fill(self.search, key, None);
            let found = pg_sys::RelationFindReplTupleByIndex(
                self.rel,
                self.table.pk_index,
                pg_sys::LockTupleMode::LockTupleExclusive,
                search,
                self.local,
            );
            found.then_some(self.local)
        })
    }

    /// The virtual slot `slot`, emptied and filled with `v`'s values over
    /// `base`'s (NULL where `base` is None and the column is not set).
    unsafe fn fill(
        &self,
        slot: *mut pg_sys::TupleTableSlot,
        v: &Values,
        base: Option<*mut pg_sys::TupleTableSlot>,
    ) -> *mut pg_sys::TupleTableSlot {
        let clear = (*(*slot).tts_ops).clear.expect("a slot can be cleared");
        clear(slot);
        if let Some(b) = base {
            pg_sys::slot_getsomeattrs_int(b, self.natts as i32);
        }
        for i in 0..self.natts {
            let (datum, null) = match base {
                _ if v.set[i] => (v.datums[i], v.nulls[i]),
                Some(b) => (*(*b).tts_values.add(i), *(*b).tts_isnull.add(i)),
                None => (pg_sys::Datum::from(0), true),
            };
            *(*slot).tts_values.add(i) = datum;
            *(*slot).tts_isnull.add(i) = null;
        }
        pg_sys::ExecStoreVirtualTuple(slot)
    }

    /// Fills columns the intent does not carry with their defaults (a
    /// column added here and not yet in the writer's region), as INSERT.
    pub fn fill_defaults(&self, v: &mut Values) {
        as_owner(self.table.owner, || self.fill_defaults_as_owner(v))
    }

    fn fill_defaults_as_owner(&self, v: &mut Values) {
        for c in &self.table.columns {
            let i = c.attnum as usize - 1;
            if v.set[i] || c.generated {
                continue;
            }
            let Some(state) = self.default_of(c) else {
                continue;
            };
            unsafe {
                let _cxt = Switch::to(self.cxt());
                let econtext = pg_sys::MakePerTupleExprContext(self.estate);
                let mut null = false;
                let eval = (*state).evalfunc.expect("an expression has an evaluator");
                v.datums[i] = eval(state, econtext, &mut null);
                v.nulls[i] = null;
                v.set[i] = true;
            }
        }
    }

    /// Column `c`'s default, prepared in the executor state (None: it has
    /// none).
    fn default_of(&self, c: &Column) -> Option<*mut pg_sys::ExprState> {
        if let Some(&state) = self.defaults.borrow().get(&c.attnum) {
            return (!state.is_null()).then_some(state);
        }
        let state = unsafe {
            let _cxt = Switch::to(self.cxt());
            let expr = pg_sys::build_column_default(self.rel, c.attnum as i32);
            if expr.is_null() {
                std::ptr::null_mut()
            } else {
                pg_sys::ExecPrepareExpr(expr.cast(), self.estate)
            }
        };
        self.defaults.borrow_mut().insert(c.attnum, state);
        (!state.is_null()).then_some(state)
    }

    /// Sets column `name` to `d` (a datum of its type, in memory that lives
    /// as long as `v` is used): for values made here rather than printed.
    pub fn set_datum(&self, v: &mut Values, name: &str, d: pg_sys::Datum) {
        let c = self.table.column(name).expect("the column exists");
        let i = c.attnum as usize - 1;
        (v.datums[i], v.nulls[i], v.set[i]) = (d, false, true);
    }

    pub fn insert(&self, v: &Values) {
        as_owner(self.table.owner, || unsafe {
            let _cxt = Switch::to(self.cxt());
            let slot = self.fill(self.new, v, None);
            self.firing_after_triggers(|| {
                pg_sys::ExecSimpleRelationInsert(self.relinfo, self.estate, slot)
            });
            self.next_command();
        })
    }

    /// Runs `apply`, one applied intent's writes to this table, with their
    /// AFTER triggers fired once it is done, as the owner: the row's
    /// version is decided and written by then, so a trigger that writes
    /// the row again makes a local write above it, and the row claimed for
    /// an insert that then lost is not taken for a row by the triggers of
    /// its insert alone (they see it gone).
    pub fn after_the_intent<R>(&self, apply: impl FnOnce() -> R) -> R {
        struct Close<'a>(&'a std::cell::Cell<bool>);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        unsafe { pg_sys::AfterTriggerBeginQuery() };
        let result = {
            let _close = Close(&self.intent_open);
            self.intent_open.set(true);
            apply()
        };
        as_owner(self.table.owner, || unsafe {
            pg_sys::AfterTriggerEndQuery(self.estate);
            self.next_command();
        });
        result
    }

    /// Runs one write in its own level of the AFTER-trigger queue and fires
    /// what it queued (the triggers enabled for replicas) right after it,
    /// as PostgreSQL's apply worker does per change: called as the owner,
    /// the owner's triggers fire as the owner. Queued at a level shared by
    /// several heaps, they would fire as whichever heap ends it — the
    /// version store's, whose owner is the superuser.
    unsafe fn firing_after_triggers(&self, write: impl FnOnce()) {
        if self.intent_open.get() {
            return write();
        }
        pg_sys::AfterTriggerBeginQuery();
        write();
        pg_sys::AfterTriggerEndQuery(self.estate);
    }

    /// Makes this heap's last write visible to its next one: a row inserted
    /// and then locked and updated in one intent (a counter row brought
    /// back) is otherwise "invisible" to the lock, its command being the
    /// current one.
    unsafe fn next_command(&self) {
        pg_sys::CommandCounterIncrement();
        pg_sys::UpdateActiveSnapshotCommandId();
        (*self.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
    }

    /// Overwrites the set columns of the locked row `local`.
    pub fn update(&self, local: *mut pg_sys::TupleTableSlot, v: &Values) {
        self.with_epq(|epq| unsafe {
            let slot = self.fill(self.new, v, Some(local));
            (*epq).origslot = slot;
            pg_sys::ExecSimpleRelationUpdate(self.relinfo, self.estate, epq, local, slot);
        });
    }

    pub fn delete(&self, local: *mut pg_sys::TupleTableSlot) {
        self.with_epq(|epq| unsafe {
            pg_sys::ExecSimpleRelationDelete(self.relinfo, self.estate, epq, local);
        });
    }

    /// Runs an update or delete (as the owner, in the intent's memory) with
    /// the EvalPlanQual state they need, then makes the change visible.
    fn with_epq(&self, f: impl FnOnce(*mut pg_sys::EPQState)) {
        as_owner(self.table.owner, || unsafe {
            let _cxt = Switch::to(self.cxt());
            let mut epq: pg_sys::EPQState = std::mem::zeroed();
            let none = std::ptr::null_mut();
            pg_sys::EvalPlanQualInit(&mut epq, self.estate, none, none.cast(), -1);
            self.firing_after_triggers(|| f(&mut epq));
            pg_sys::EvalPlanQualEnd(&mut epq);
            self.next_command();
        })
    }

    /// The row in `slot` as an intent carries it: every column but the
    /// generated ones, as text (or null).
    pub fn row_of(&self, slot: *mut pg_sys::TupleTableSlot) -> Map<String, Value> {
        self.table
            .columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| {
                let v = self.text_of(slot, c).map_or(Value::Null, Value::String);
                (c.name.clone(), v)
            })
            .collect()
    }

    /// `v` as a value of the table's row type (a merge function's argument),
    /// in the apply call's memory.
    pub fn composite(&self, v: &Values) -> pg_sys::Datum {
        unsafe {
            let _cxt = Switch::to(self.cxt());
            let desc = (*self.rel).rd_att;
            let mut datums = v.datums.clone();
            let mut nulls = v.nulls.clone();
            let tuple = pg_sys::heap_form_tuple(desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::heap_copy_tuple_as_datum(tuple, desc)
        }
    }

    /// A value of the table's row type (a merge function's result) as an
    /// intent carries a row.
    pub fn row_of_composite(&self, d: pg_sys::Datum) -> Map<String, Value> {
        as_owner(self.table.owner, || unsafe {
            let _cxt = Switch::to(self.cxt());
            let header = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as pg_sys::HeapTupleHeader;
            let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
            tuple.t_len = pgrx::varsize(header as *const pg_sys::varlena) as u32;
            tuple.t_data = header;
            let (mut datums, mut nulls) = (
                vec![pg_sys::Datum::from(0); self.natts],
                vec![true; self.natts],
            );
            pg_sys::heap_deform_tuple(
                &mut tuple,
                (*self.rel).rd_att,
                datums.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            self.table
                .columns
                .iter()
                .filter(|c| !c.generated)
                .map(|c| {
                    let i = c.attnum as usize - 1;
                    let v = if nulls[i] {
                        Value::Null
                    } else {
                        Value::String(output(c, datums[i]))
                    };
                    (c.name.clone(), v)
                })
                .collect()
        })
    }

    /// The text of column `c` of the locked row `local` (for counters).
    pub fn text_of(&self, local: *mut pg_sys::TupleTableSlot, c: &Column) -> Option<String> {
        as_owner(self.table.owner, || unsafe {
            let _cxt = Switch::to(self.cxt());
            pg_sys::slot_getsomeattrs_int(local, c.attnum as i32);
            let i = c.attnum as usize - 1;
            if *(*local).tts_isnull.add(i) {
                return None;
            }
            Some(output(c, *(*local).tts_values.add(i)))
        })
    }
}

/// A value as column `c`'s type prints it.
unsafe fn output(c: &Column, d: pg_sys::Datum) -> String {
    let text = pg_sys::OidOutputFunctionCall(c.output, d);
    CStr::from_ptr(text).to_string_lossy().into_owned()
}

fn nul_in_value(c: &Column) -> CString {
    crate::errors::raise(
        pgrx::PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER,
        format!("a value for column \"{}\" contains a NUL character", c.name),
        "Intents carry values as PostgreSQL prints them, which never contain NUL.",
    )
}

impl Drop for Heap {
    fn drop(&mut self) {
        // After an error the transaction's abort frees and closes all this.
        if std::thread::panicking() {
            return;
        }
        // The AFTER triggers have fired after each write, each on this
        // heap's own relation.
        unsafe {
            pg_sys::ExecCloseIndices(self.relinfo);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::PopActiveSnapshot();
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        }
    }
}
