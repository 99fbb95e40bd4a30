//! Every `foreshadow.*` setting, in one place.

use crate::errors::raise;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PgSqlErrorCode;
use std::ffi::CString;

/// The name of the region this primary belongs to. It is stamped on every
/// write as its origin and is the tie-breaker of last-writer-wins, so it must
/// be unique among the regions and must not change while the cluster runs.
pub static REGION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn init() {
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
