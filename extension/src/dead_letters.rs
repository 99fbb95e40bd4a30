//! Replaying dead letters: intents kept because their table was not global
//! here when they arrived. Once it is, `foreshadow.retry_dead_letters()`
//! applies each through the one apply path (so the version rules decide,
//! whatever has happened to the row since) and removes it in the same
//! transaction: each is applied exactly once.

use crate::apply::{apply_raw, Arrived, Reject};
use crate::spi::run_kept;
use pgrx::pg_sys;
use pgrx::prelude::*;

thread_local! {
    /// Set while a kept intent is applied: counters count its increments
    /// although later writes of its region were counted already.
    static REPLAYING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the intent being applied is a replayed dead letter.
pub fn replaying() -> bool {
    REPLAYING.with(std::cell::Cell::get)
}

/// Marks a replay for as long as it lives, also when the apply raises.
struct Replaying;

impl Replaying {
    fn start() -> Replaying {
        REPLAYING.with(|r| r.set(true));
        Replaying
    }
}

impl Drop for Replaying {
    fn drop(&mut self) {
        REPLAYING.with(|r| r.set(false));
    }
}

const KEPT_SQL: &str = "SELECT id::text, origin, intent FROM foreshadow.dead_letters \
     WHERE kind = $1 ORDER BY id FOR UPDATE";
const DONE_SQL: &str = "DELETE FROM foreshadow.dead_letters WHERE id = $1::bigint";

/// Applies the dead letters kept for tables that were not global here and
/// now are; returns how many were applied. Others stay (they are listed in
/// `foreshadow.dead_letters` with their reason).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn retry_dead_letters() -> i64 {
    // The operator's session applies like the sidecar's, until this returns.
    crate::canonical::applying(false);
    Spi::connect_mut(|client| {
        let kept = run_kept(
            client,
            KEPT_SQL,
            &[pg_sys::TEXTOID],
            &[Reject::NotGlobal.kind().into()],
        );
        let mut applied = 0i64;
        let heaps = crate::heap::Heaps::applying();
        for row in kept {
            let [Some(id), Some(origin), Some(intent)] = &row[..] else {
                continue;
            };
            let global = foreshadow_model::Intent::decode(intent.as_bytes())
                .is_ok_and(|i| crate::catalog::table(client, &i.schema, &i.table).is_some());
            if !global {
                continue;
            }
            let replay = Replaying::start();
            let arrived = apply_raw(client, &heaps, origin, intent);
            drop(replay);
            run_kept(client, DONE_SQL, &[pg_sys::TEXTOID], &[id.as_str().into()]);
            if let Arrived::Data(o) = arrived {
                crate::apply::count(
                    client,
                    &heaps,
                    origin,
                    0,
                    o.changed as i32,
                    o.conflict.is_some() as i32,
                );
            }
            applied += 1;
        }
        applied
    })
}
