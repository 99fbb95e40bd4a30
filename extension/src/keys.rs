//! Which primary keys a global table may have. A row's version is found by
//! its key as printed (the key columns' canonical text), the user's row by
//! index equality; the two agree only where equal key values always print
//! alike. That is PostgreSQL's "equal image" property of the key's operator
//! classes, which B-tree deduplication relies on: numeric (1.0 = 1.00),
//! float (-0 = 0), interval ('1 day' = '24:00:00'), citext and
//! nondeterministic collations lack it. Two regions writing one row under
//! two spellings would keep two versions of it, and the later write could
//! lose. A numeric with a declared scale stores every value at that scale,
//! so its equal values print alike.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// B-tree support function 4 (access/nbtree.h's `BTEQUALIMAGE_PROC`).
const BTEQUALIMAGE_PROC: i16 = 4;

/// The columns of `tbl`'s primary key whose equal values may print
/// differently; empty when there are none, or no primary key.
#[pg_extern(stable, parallel_safe)]
fn inexact_key_columns(tbl: pg_sys::Oid) -> Vec<String> {
    unsafe {
        // The primary key, deferrable or not (RelationGetPrimaryKeyIndex
        // leaves deferrable ones out).
        let rel = pg_sys::table_open(tbl, pg_sys::AccessShareLock as i32);
        let indexes = pgrx::PgList::<pg_sys::Oid>::from_pg(pg_sys::RelationGetIndexList(rel));
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        let primary = indexes.iter_oid().find(|&i| {
            let index = pg_sys::index_open(i, pg_sys::AccessShareLock as i32);
            let primary = (*(*index).rd_index).indisprimary;
            pg_sys::index_close(index, pg_sys::AccessShareLock as i32);
            primary
        });
        let Some(pk) = primary else {
            return Vec::new();
        };
        let index = pg_sys::index_open(pk, pg_sys::AccessShareLock as i32);
        let keys = (*(*index).rd_index).indnkeyatts as usize;
        let inexact = (0..keys)
            .filter(|&i| !exact(index, i))
            .map(|i| {
                let att = (*(*index).rd_att).attrs.as_slice(keys)[i];
                pgrx::name_data_to_str(&att.attname).to_owned()
            })
            .collect();
        pg_sys::index_close(index, pg_sys::AccessShareLock as i32);
        inexact
    }
}

/// Whether equal values of key column `i` of `index` always print alike.
unsafe fn exact(index: pg_sys::Relation, i: usize) -> bool {
    let att = (*(*index).rd_att).attrs.as_slice(i + 1)[i];
    if att.atttypid == pg_sys::NUMERICOID && att.atttypmod >= 0 {
        return true;
    }
    let (family, input) = (*(*index).rd_opfamily.add(i), *(*index).rd_opcintype.add(i));
    let proc = pg_sys::get_opfamily_proc(family, input, input, BTEQUALIMAGE_PROC);
    proc != pg_sys::InvalidOid
        && pg_sys::OidFunctionCall1Coll(proc, *(*index).rd_indcollation.add(i), input.into())
            .value()
            != 0
}
