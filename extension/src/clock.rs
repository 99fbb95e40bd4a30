//! The region's hybrid logical clock, shared by all backends in shared memory
//! so that every write in this region is ordered after every write (local or
//! applied from a peer) that this region has seen before it.

use foreshadow_model::Hlc;
use pgrx::atomics::PgAtomic;
use pgrx::pg_shmem_init;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static CLOCK: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"foreshadow_hlc") };
/// Whether the clock has been raised to its kept reading since startup.
static RESTORED: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"foreshadow_hlc_restored") };

pub fn init() {
    pg_shmem_init!(CLOCK);
    pg_shmem_init!(RESTORED);
}

/// After a restart the clock starts from the wall clock, which can be
/// behind the stamps this region handed out or saw before (an NTP step, a
/// failover to a machine whose clock lags). A write stamped below a
/// heartbeat's promise, or below a tombstone already forgotten elsewhere,
/// would be decided differently in different regions; so the first local
/// stamp after startup raises the clock to the reading kept in
/// `foreshadow.heartbeat` (by every heartbeat and tombstone collection).
fn restore() {
    let restored = RESTORED.get();
    if restored.load(Ordering::Acquire) {
        return;
    }
    let kept = Spi::get_one::<i64>("SELECT clock FROM foreshadow.heartbeat")
        .ok()
        .flatten()
        .unwrap_or(0);
    observe(Hlc(kept.max(0) as u64));
    restored.store(true, Ordering::Release);
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
    restore();
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

/// The clock's reading, without advancing it.
pub fn now() -> Hlc {
    Hlc(CLOCK.get().load(Ordering::Acquire))
}

/// The stamp for a local write to a row last stamped `floor`.
pub fn stamp_above(floor: Hlc) -> Hlc {
    tick(floor)
}

/// Records that this region has seen a peer's stamp: later local stamps
/// are above it.
pub fn observe(remote: Hlc) {
    CLOCK.get().fetch_max(remote.0, Ordering::AcqRel);
}

/// Refuses a peer's stamp that is further ahead of this region's wall
/// clock than `foreshadow.max_clock_offset`: adopting it would drag this
/// region's clock (and every later local stamp) ahead with it, so that
/// one region with a wrong clock, or one forged stamp, could win every
/// conflict or overflow the stamps. The error stops the peer's lane; its
/// writes are held, not skipped, and apply once the wall clock catches up.
pub fn admit(remote: Hlc) {
    let now = now_ms();
    let max = crate::gucs::MAX_CLOCK_OFFSET_MS.get().max(1) as u64;
    if remote.millis() > now + max {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "clock offset: a peer's write is stamped {} ms ahead of this region's clock \
                 (foreshadow.max_clock_offset is {max} ms)",
                remote.millis() - now
            ),
            "Its region's clock runs ahead, or this one's behind: fix the clocks (NTP). \
             The peer's writes are held and apply once the offset is within bounds.",
        );
    }
}

/// Human-readable form of a stamp: `milliseconds.counter`.
#[pg_extern(immutable, strict, parallel_safe)]
pub fn hlc_text(stamp: i64) -> String {
    Hlc(stamp.max(0) as u64).to_string()
}
