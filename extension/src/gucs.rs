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

/// Every region's name, comma-separated, the same in every region: where
/// a merge table's shadows may run (`set_shadows`, and the default one).
pub static REGIONS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// How long a primary waits for the owner's resolution of an open
/// conflict before resolving it itself (R5, ms).
pub static SHADOW_DEADLINE_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);

pub fn init() {
    GucRegistry::define_string_guc(
        c"foreshadow.regions",
        c"Every region's name, comma-separated (the same list in every region).",
        c"Shadows of merge tables run in these regions; empty: no shadows, every primary resolves its conflicts on arrival.",
        &REGIONS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"foreshadow.shadow_deadline",
        c"How long an open conflict waits for its shadow's resolution.",
        c"Past it the primary resolves the conflict itself with the same function (a fallback, counted in foreshadow.conflicts).",
        &SHADOW_DEADLINE_MS,
        1,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
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

/// The regions of `foreshadow.regions`, sorted, each once.
pub fn regions() -> Vec<String> {
    let list = REGIONS
        .get()
        .map(|r| r.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(String::from)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `foreshadow.regions` as a list.
#[pgrx::pg_extern(stable, parallel_safe)]
fn known_regions() -> Vec<String> {
    regions()
}

/// The shadow a merge table gets by default: one region of
/// `foreshadow.regions`, chosen by rendezvous hashing of the table's name,
/// so every region picks the same; none when the list is empty.
#[pgrx::pg_extern(stable, parallel_safe)]
fn default_shadows(schema: &str, table: &str) -> Vec<String> {
    use foreshadow_model::ownership::{key_bytes, owner};
    let regions = regions();
    let key = key_bytes(schema, table, &serde_json::Map::new());
    owner(&key, &regions).cloned().into_iter().collect()
}
