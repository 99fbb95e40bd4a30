//! A merge table's shadow set travels to every region (docs/shadow-protocol.md,
//! R7): `set_shadows` in one region emits it as a metadata intent in the same
//! transaction, and each peer adopts it if it is later than its own, by
//! `(epoch, regions)`. Two regions that change the set at once both end with
//! the same one; a set delivered again changes nothing.

use crate::catalog::Table;
use crate::errors::raise;
use crate::spi::run_kept;
use foreshadow_model::intent::ShadowSet;
use foreshadow_model::Strategy;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

const SET_SQL: &str = "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, \
       t.shadow_epoch, t.shadows \
  FROM foreshadow.tables t \
  JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid \
  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
 WHERE t.relid OPERATOR(pg_catalog.=) $1 AND t.strategy OPERATOR(pg_catalog.=) 'merge'";

/// Sends `tbl`'s shadow set, as stored here, to every other region (called
/// by `set_shadows` after it stored a new one). Internal: not executable
/// by PUBLIC.
#[pg_extern(volatile, parallel_unsafe)]
fn announce_shadow_set(tbl: pg_sys::Oid) {
    let (schema, table, set) = Spi::connect(|client| {
        let rows = client
            .select(SET_SQL, None, &[tbl.into()])
            .unwrap_or_else(|e| panic!("{SET_SQL}: {e}"));
        let row = rows.into_iter().next().unwrap_or_else(|| {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                "not a global table with strategy merge",
                "Shadow sets belong to merge tables.",
            )
        });
        let text = |i| row.get::<String>(i).ok().flatten().unwrap_or_default();
        let epoch = row.get::<i32>(3).ok().flatten().unwrap_or(1);
        let regions = row.get::<Vec<String>>(4).ok().flatten().unwrap_or_default();
        let set = ShadowSet {
            epoch: epoch as u32,
            regions,
        };
        (text(1), text(2), set)
    });
    let hlc = crate::clock::stamp_above(foreshadow_model::Hlc(0));
    crate::capture::emit_metadata(&schema, &table, Strategy::Merge, hlc, |i| {
        i.shadow_set = Some(set)
    });
}

const CURRENT_SQL: &str = "SELECT t.shadow_epoch::pg_catalog.text, \
        pg_catalog.array_to_json(t.shadows)::pg_catalog.text \
   FROM foreshadow.tables t WHERE t.relid OPERATOR(pg_catalog.=) $1 FOR UPDATE";
const ADOPT_SQL: &str = "UPDATE foreshadow.tables t \
    SET shadows = foreshadow.checked_shadows($2), shadow_epoch = $3 \
  WHERE t.relid OPERATOR(pg_catalog.=) $1";

/// Adopts a peer's shadow set for `t` if it is later than the one here.
/// Returns whether it changed anything. A table that is not a merge table
/// here, or a set naming a region not in `foreshadow.regions` here, stops
/// the peer's lane until the configurations agree.
pub fn adopt(client: &mut SpiClient<'_>, t: &Table, set: &ShadowSet) -> bool {
    if t.strategy != Some(Strategy::Merge) {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "a peer changed the shadows of {}, which is not a merge table in this region",
                t.qualified
            ),
            "Give the table the same strategy in every region; replication from that region resumes by itself.",
        );
    }
    // Compared by the model's order (byte order of the names), not SQL's
    // (the database's collation), so that every region picks the same.
    let here = run_kept(client, CURRENT_SQL, &[pg_sys::OIDOID], &[t.relid.into()]);
    let field = |i: usize| here.first().and_then(|r| r[i].clone()).unwrap_or_default();
    let current = ShadowSet {
        epoch: field(0).parse().unwrap_or(0),
        regions: serde_json::from_str(&field(1)).unwrap_or_default(),
    };
    if *set <= current {
        return false;
    }
    let epoch = i32::try_from(set.epoch).unwrap_or(i32::MAX);
    run_kept(
        client,
        ADOPT_SQL,
        &[pg_sys::OIDOID, pg_sys::TEXTARRAYOID, pg_sys::INT4OID],
        &[t.relid.into(), set.regions.clone().into(), epoch.into()],
    );
    // Every session's cached table (its shadows) is stale now.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(t.relid) };
    true
}
