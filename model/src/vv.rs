//! Version vectors: region name → a number that grows by one with each write
//! that region makes to a row (from 1, or from the write's stamp when the row
//! has no version where it is written: [`VersionVector::bump_fresh`]).
//!
//! A `BTreeMap` keeps the entries sorted, so the JSON form (stored beside each
//! row and carried in intents) is canonical: equal vectors serialise to equal
//! bytes in every region.

use crate::Hlc;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(pub BTreeMap<String, u64>);

/// How two versions of one row relate causally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// The left version has seen everything the right one has, and more.
    Dominates,
    /// The right version has seen everything the left one has, and more.
    DominatedBy,
    /// Neither saw the other: a conflict.
    Concurrent,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, region: &str) -> u64 {
        self.0.get(region).copied().unwrap_or(0)
    }

    /// Records one more write by `region`.
    pub fn bump(&mut self, region: &str) {
        *self.0.entry(region.to_owned()).or_insert(0) += 1;
    }

    /// Records a write by `region` of a row that has no version where it is
    /// written (`merge` and `vv` tables): a new row, or one whose tombstone
    /// was forgotten there (docs/shadow-protocol.md, "Forgetting settled
    /// versions"). The entry starts at the write's stamp, not at 1: every
    /// earlier write by `region` of the row took a smaller stamp from the
    /// same clock, and each raised the entry by one at most as much as its
    /// stamp rose, so the write is never taken for one that a forgotten
    /// version (still held by a region that has not forgotten it) has seen.
    pub fn bump_fresh(&mut self, region: &str, stamp: Hlc) {
        let e = self.0.entry(region.to_owned()).or_insert(0);
        *e = (*e + 1).max(stamp.0);
    }

    /// Pointwise maximum: the version that has seen both.
    pub fn merge(&mut self, other: &VersionVector) {
        for (region, &n) in &other.0 {
            let e = self.0.entry(region.clone()).or_insert(0);
            *e = (*e).max(n);
        }
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        // One walk over both sorted maps; a missing entry counts as 0. This
        // runs for every apply, and in every state the protocol model checks.
        let (mut ahead, mut behind) = (false, false);
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            let (x, y) = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some((ka, _)), Some((kb, _))) => match ka.cmp(kb) {
                    Ordering::Less => (a.next(), None),
                    Ordering::Greater => (None, b.next()),
                    Ordering::Equal => (a.next(), b.next()),
                },
                (Some(_), None) => (a.next(), None),
                (None, Some(_)) => (None, b.next()),
            };
            let (x, y) = (x.map_or(0, |e| *e.1), y.map_or(0, |e| *e.1));
            ahead |= x > y;
            behind |= x < y;
        }
        match (ahead, behind) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::DominatedBy,
            (true, true) => Causality::Concurrent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(entries: &[(&str, u64)]) -> VersionVector {
        VersionVector(entries.iter().map(|(r, n)| (r.to_string(), *n)).collect())
    }

    #[test]
    fn compare_cases() {
        let a = vv(&[("a", 2), ("b", 1)]);
        assert_eq!(a.compare(&a), Causality::Equal);
        assert_eq!(a.compare(&vv(&[("a", 1), ("b", 1)])), Causality::Dominates);
        assert_eq!(
            a.compare(&vv(&[("a", 2), ("b", 1), ("c", 1)])),
            Causality::DominatedBy
        );
        assert_eq!(a.compare(&vv(&[("a", 1), ("b", 2)])), Causality::Concurrent);
        assert_eq!(vv(&[]).compare(&vv(&[("a", 0)])), Causality::Equal);
    }

    #[test]
    fn a_fresh_write_is_not_dominated_by_a_forgotten_version() {
        // The row's earlier life: written fresh at stamp 100, then twice
        // more by "a" (stamps above 100), deleted by "b".
        let mut old = VersionVector::new();
        old.bump_fresh("a", Hlc(100));
        old.bump("a");
        old.bump("a");
        old.bump("b");
        // "a" forgot the tombstone, and writes the key again later.
        let mut again = VersionVector::new();
        again.bump_fresh("a", Hlc(103));
        assert_eq!(again.compare(&old), Causality::Concurrent);
        // Counting from 1 instead, a region that still holds the tombstone
        // would drop the new write as one it has seen.
        let mut counted = VersionVector::new();
        counted.bump("a");
        assert_eq!(counted.compare(&old), Causality::DominatedBy);
    }

    #[test]
    fn json_form_is_canonical() {
        let mut x = vv(&[("b", 1)]);
        x.bump("a");
        assert_eq!(serde_json::to_string(&x).unwrap(), r#"{"a":1,"b":1}"#);
    }

    fn arb_vv() -> impl Strategy<Value = VersionVector> {
        prop::collection::btree_map(
            prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from),
            0u64..4,
            0..3,
        )
        .prop_map(VersionVector)
    }

    proptest! {
        #[test]
        fn merge_dominates_or_equals_both(x in arb_vv(), y in arb_vv()) {
            let mut m = x.clone();
            m.merge(&y);
            prop_assert!(matches!(m.compare(&x), Causality::Dominates | Causality::Equal));
            prop_assert!(matches!(m.compare(&y), Causality::Dominates | Causality::Equal));
        }

        #[test]
        fn compare_is_antisymmetric(x in arb_vv(), y in arb_vv()) {
            let flipped = match x.compare(&y) {
                Causality::Dominates => Causality::DominatedBy,
                Causality::DominatedBy => Causality::Dominates,
                c => c,
            };
            prop_assert_eq!(y.compare(&x), flipped);
        }

        /// The definition, entry by entry over both vectors' regions.
        #[test]
        fn compare_matches_definition(x in arb_vv(), y in arb_vv()) {
            let regions: Vec<&String> = x.0.keys().chain(y.0.keys()).collect();
            let ahead = regions.iter().any(|r| x.get(r) > y.get(r));
            let behind = regions.iter().any(|r| x.get(r) < y.get(r));
            let want = match (ahead, behind) {
                (false, false) => Causality::Equal,
                (true, false) => Causality::Dominates,
                (false, true) => Causality::DominatedBy,
                (true, true) => Causality::Concurrent,
            };
            prop_assert_eq!(x.compare(&y), want);
        }

        #[test]
        fn bump_dominates(x in arb_vv()) {
            let mut b = x.clone();
            b.bump("a");
            prop_assert_eq!(b.compare(&x), Causality::Dominates);
        }
    }
}
