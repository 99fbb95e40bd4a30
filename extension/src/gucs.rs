//! Every `foreshadow.*` setting, in one place.

use crate::errors::raise;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PgSqlErrorCode;
use std::ffi::CString;

/// The name of the region this primary belongs to. It is stamped on every
/// write as its origin and is the tie-breaker of last-writer-wins, so it must
/// be unique among the regions and must not change while the cluster runs.
pub static REGION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// How far ahead of this region's wall clock a peer's stamp may be before
/// its writes are held (clock.rs): a bound on clock skew between regions,
/// as CockroachDB's `max-offset`.
pub static MAX_CLOCK_OFFSET_MS: GucSetting<i32> = GucSetting::<i32>::new(500);

/// How long `foreshadow.conflicts` keeps a conflict (minutes).
pub static CONFLICT_RETENTION_MIN: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 60);

/// How long one call of a table's merge function may run (ms): past it
/// the call is cancelled and the conflict is recorded as failed.
pub static MERGE_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);

pub fn init() {
    GucRegistry::define_int_guc(
        c"foreshadow.merge_timeout",
        c"Longest time one call of a merge function may run.",
        c"A call that runs longer is cancelled; the conflict is kept in foreshadow.conflict_failures and resolved by last writer wins.",
        &MERGE_TIMEOUT_MS,
        1,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"foreshadow.conflict_retention",
        c"How long the conflict history keeps a conflict.",
        c"foreshadow.conflicts shows the conflicts of this long ago and since; older entries are removed as new ones are recorded.",
        &CONFLICT_RETENTION_MIN,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_int_guc(
        c"foreshadow.max_clock_offset",
        c"Largest clock offset accepted from a peer region.",
        c"A peer's write stamped further ahead of this region's wall clock is held (its lane stops, with an alert) until the wall clock catches up.",
        &MAX_CLOCK_OFFSET_MS,
        1,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"foreshadow.region",
        c"Name of this primary's region (unique among all regions).",
        c"Stamped on every write to a global table as its origin. Set it in postgresql.conf; changing it needs a restart.",
        &REGION,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

/// The configured region, or an error telling the operator how to set it.
pub fn region() -> String {
    match REGION.get() {
        Some(r) if !r.as_bytes().is_empty() => r.to_string_lossy().into_owned(),
        _ => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "foreshadow.region is not set",
            "Set foreshadow.region = '<region name>' in postgresql.conf and restart PostgreSQL.",
        ),
    }
}

#[pgrx::pg_extern(stable, parallel_safe)]
fn region_name() -> String {
    region()
}
