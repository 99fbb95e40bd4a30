//! Hybrid logical clock packed into one `u64` (a PostgreSQL `bigint`).
//!
//! The high 48 bits are milliseconds since the Unix epoch, the low 16 bits a
//! logical counter. Packing keeps comparison a plain integer comparison in
//! Rust and in SQL, and `max(now, last + 1)` is the whole tick rule: it stays
//! close to wall-clock time, never goes backwards, and orders every event
//! after every event it has seen.

use serde::{Deserialize, Serialize};
use std::fmt;

const LOGICAL_BITS: u32 = 16;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Hlc(pub u64);

impl Hlc {
    pub const ZERO: Hlc = Hlc(0);

    /// The clock value for wall-clock time `ms` with a zero logical counter.
    pub fn from_millis(ms: u64) -> Hlc {
        Hlc(ms << LOGICAL_BITS)
    }

    pub fn millis(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u64 {
        self.0 & ((1 << LOGICAL_BITS) - 1)
    }

    /// A local event: later than `last` and not behind the wall clock.
    pub fn tick(last: Hlc, now_ms: u64) -> Hlc {
        Hlc::from_millis(now_ms).max(Hlc(last.0.saturating_add(1)))
    }

    /// Receiving an event stamped `remote`: the clock moves past it so that
    /// every later local event is ordered after it.
    pub fn observe(last: Hlc, remote: Hlc, now_ms: u64) -> Hlc {
        Hlc::tick(last.max(remote), now_ms)
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.millis(), self.logical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tick_follows_wall_clock_when_it_moves() {
        let last = Hlc::from_millis(100);
        assert_eq!(Hlc::tick(last, 200), Hlc::from_millis(200));
    }

    #[test]
    fn tick_counts_logically_when_wall_clock_stalls_or_goes_back() {
        let last = Hlc::from_millis(100);
        let t = Hlc::tick(last, 90);
        assert_eq!((t.millis(), t.logical()), (100, 1));
    }

    #[test]
    fn display_shows_millis_and_counter() {
        assert_eq!(Hlc::tick(Hlc::from_millis(5), 5).to_string(), "5.1");
    }

    proptest! {
        #[test]
        fn tick_is_strictly_monotonic(last in 0u64..u64::MAX / 2, now in 0u64..(1 << 40)) {
            let t = Hlc::tick(Hlc(last), now);
            prop_assert!(t > Hlc(last));
            prop_assert!(t >= Hlc::from_millis(now));
        }

        #[test]
        fn observe_orders_after_both(last in 0u64..u64::MAX / 2, remote in 0u64..u64::MAX / 2, now in 0u64..(1 << 40)) {
            let t = Hlc::observe(Hlc(last), Hlc(remote), now);
            prop_assert!(t > Hlc(last) && t > Hlc(remote));
        }
    }
}
