//! Last-writer-wins: the version with the higher hybrid-logical-clock stamp
//! wins; equal stamps are broken by the origin region's name (byte order), so
//! every region picks the same winner without talking to the others.

use crate::strategy::{frontier, Versioned};
use crate::Hlc;
use std::cmp::Ordering;

/// The `(clock, origin region)` pair that LWW orders versions by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub hlc: Hlc,
    pub origin: &'a str,
}

impl Ord for Stamp<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.hlc
            .cmp(&other.hlc)
            .then_with(|| self.origin.as_bytes().cmp(other.origin.as_bytes()))
    }
}

impl PartialOrd for Stamp<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Whether an incoming version replaces the current one under LWW.
/// `current` is `None` when the row has never been seen here.
pub fn incoming_wins(incoming: Stamp<'_>, current: Option<Stamp<'_>>) -> bool {
    current.is_none_or(|cur| incoming > cur)
}

/// The LWW resolution of a conflict: among the versions no other version has
/// seen, the one with the highest stamp. A version that saw another wins over
/// it whatever the clocks say, so causality first, then the stamp.
pub fn resolve<V: Versioned>(versions: impl IntoIterator<Item = V>) -> Option<V> {
    frontier(versions).pop()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(hlc: u64, origin: &str) -> Stamp<'_> {
        Stamp {
            hlc: Hlc(hlc),
            origin,
        }
    }

    #[test]
    fn higher_clock_wins() {
        assert!(incoming_wins(s(2, "a"), Some(s(1, "b"))));
        assert!(!incoming_wins(s(1, "b"), Some(s(2, "a"))));
    }

    #[test]
    fn ties_break_on_region_name() {
        assert!(incoming_wins(s(5, "us-west"), Some(s(5, "us-east"))));
        assert!(!incoming_wins(s(5, "us-east"), Some(s(5, "us-west"))));
    }

    #[test]
    fn same_version_again_is_not_applied_twice() {
        assert!(!incoming_wins(s(5, "a"), Some(s(5, "a"))));
        assert!(incoming_wins(s(0, "a"), None));
    }

    #[test]
    fn resolve_prefers_causality_then_stamp() {
        use crate::strategy::tests::v;
        let old = v(&[("a", 1)], 9, "a", Some("old"));
        let newer = v(&[("a", 2)], 1, "a", Some("newer"));
        let other = v(&[("b", 1)], 1, "b", Some("other"));
        assert_eq!(resolve([&old, &newer]), Some(&newer));
        assert_eq!(resolve([&newer, &other, &old]), Some(&other));
        assert_eq!(resolve(Vec::<&crate::strategy::tests::V>::new()), None);
    }

    proptest! {
        /// Applying the same set of versions in any order ends on the same one.
        #[test]
        fn winner_is_order_independent(mut vs in prop::collection::vec((0u64..4, prop::sample::select(vec!["a", "b", "c"])), 1..6)) {
            let fold = |vs: &[(u64, &'static str)]| {
                let mut cur: Option<(u64, &str)> = None;
                for &(h, o) in vs {
                    if incoming_wins(s(h, o), cur.map(|(h, o)| s(h, o))) {
                        cur = Some((h, o));
                    }
                }
                cur
            };
            let forward = fold(&vs);
            vs.reverse();
            prop_assert_eq!(forward, fold(&vs));
        }
    }
}
