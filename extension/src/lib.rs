//! The `foreshadow` extension: PostgreSQL glue only. The rules (clock, version
//! vectors, last-writer-wins) live in the pure `foreshadow-model` crate; the
//! tables, views, triggers and SQL API are hand-written SQL in `sql/`.

use pgrx::prelude::*;

mod apply;
mod canonical;
mod capture;
mod catalog;
mod clock;
mod conflicts;
mod counters;
mod dead_letters;
mod errors;
mod gucs;
mod heap;
mod keys;
mod leaves;
mod merge;
mod rights;
mod row_versions;
mod settled;
mod shadow;
mod shadow_set;
mod spi;
mod tombstones;
mod versions;

::pgrx::pg_module_magic!();

extension_sql_file!("../../sql/foreshadow.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // The hybrid logical clock lives in shared memory, which can only be
    // requested while the postmaster loads preload libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "foreshadow must be loaded via shared_preload_libraries",
            "Add 'foreshadow' to shared_preload_libraries in postgresql.conf and restart PostgreSQL."
        );
    }
    gucs::init();
    clock::init();
    // Cached global-table metadata of the apply path goes stale with the
    // table's relcache entry.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(catalog::forget_tables), pg_sys::Datum::from(0));
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod sql_api_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'foreshadow'",
            "foreshadow.region = 'test-region'",
            "foreshadow.regions = 'test-region,peer'",
            "wal_level = logical",
        ]
    }
}
