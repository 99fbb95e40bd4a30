//! The region's hybrid logical clock, shared by all backends in shared memory
//! so that every write in this region is ordered after every write (local or
//! applied from a peer) that this region has seen before it.

use foreshadow_model::Hlc;
use pgrx::atomics::PgAtomic;
use pgrx::pg_shmem_init;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

static CLOCK: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"foreshadow_hlc") };

pub fn init() {
    pg_shmem_init!(CLOCK);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Advances the clock for a local write. `floor` is the row's previous
/// stamp: the new stamp is above it even if that stamp came from a peer whose
/// wall clock runs ahead.
fn tick(floor: Hlc) -> Hlc {
    let clock = CLOCK.get();
    let mut cur = clock.load(Ordering::Acquire);
    loop {
        let next = Hlc::tick(Hlc(cur).max(floor), now_ms());
        match clock.compare_exchange_weak(cur, next.0, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return next,
            Err(seen) => cur = seen,
        }
    }
}

/// The stamp for a local write to a row last stamped `floor`.
pub fn stamp_above(floor: Hlc) -> Hlc {
    tick(floor)
}

/// The stamp for a local write to a row last stamped `floor` (NULL: new row).
#[pg_extern(volatile, parallel_unsafe)]
fn hlc_next(floor: Option<i64>) -> i64 {
    tick(Hlc(floor.unwrap_or(0).max(0) as u64)).0 as i64
}

/// Records that this region has seen a peer's stamp: later local stamps
/// are above it.
pub fn observe(remote: Hlc) {
    CLOCK.get().fetch_max(remote.0, Ordering::AcqRel);
}

/// Records that this region has seen a peer's stamp.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn hlc_observe(remote: i64) {
    observe(Hlc(remote.max(0) as u64));
}

/// Human-readable form of a stamp: `milliseconds.counter`.
#[pg_extern(immutable, strict, parallel_safe)]
fn hlc_text(stamp: i64) -> String {
    Hlc(stamp.max(0) as u64).to_string()
}
