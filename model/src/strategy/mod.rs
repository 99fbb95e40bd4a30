//! Conflict strategies: the pure part of each, shared by the shadow that
//! resolves a conflict once and by the primaries that fall back to the very
//! same function when no resolution arrives in time (docs/shadow-protocol.md).
//!
//! Every strategy resolves a *set* of versions, never a pair at a time. The
//! set is first reduced to its [`frontier`] (versions no other version has
//! seen) and put in one canonical order, the LWW stamp order. A resolver that
//! met the versions in another order, or in several batches, still computes
//! the same result; a pairwise `(local, remote)` rule does not, which is how
//! primaries resolving on their own diverge under a non-commutative merge.

pub mod counter;
pub mod leaf;
pub mod merge;

use crate::lww::Stamp;
use crate::{Causality, VersionVector};
use std::fmt;
use std::str::FromStr;

/// A table's (or a column's) conflict strategy, by its SQL name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// Last writer wins: the highest [`Stamp`] among concurrent versions.
    Lww,
    /// The user's 3-way merge function, folded over the versions ([`merge::resolve`]).
    Merge,
    /// Causal: concurrent versions are all kept as [`siblings`].
    Vv,
    /// Per-column counters: concurrent increments add up ([`counter::join`]).
    Counter,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Lww,
        Strategy::Merge,
        Strategy::Vv,
        Strategy::Counter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Lww => "lww",
            Strategy::Merge => "merge",
            Strategy::Vv => "vv",
            Strategy::Counter => "counter",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown conflict strategy \"{0}\" (known: lww, merge, vv, counter)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

/// One version of a row as the strategies see it: an intent in the sidecar,
/// a row's stored version in the extension, a write in the protocol model.
pub trait Versioned {
    type Row;
    fn vv(&self) -> &VersionVector;
    fn stamp(&self) -> Stamp<'_>;
    /// The row image; `None` for a delete (a tombstone).
    fn row(&self) -> Option<&Self::Row>;
}

impl<T: Versioned + ?Sized> Versioned for &T {
    type Row = T::Row;
    fn vv(&self) -> &VersionVector {
        (**self).vv()
    }
    fn stamp(&self) -> Stamp<'_> {
        (**self).stamp()
    }
    fn row(&self) -> Option<&Self::Row> {
        (**self).row()
    }
}

/// The versions that no other version has seen, in canonical (ascending
/// stamp) order: the leaves of a conflict, and the `vv` strategy's siblings.
///
/// A version dominated by another is superseded, not in conflict. Two
/// versions with equal vectors are the same write met twice (a duplicate
/// delivery); one is kept, the higher stamp, so that the choice does not
/// depend on which copy came first.
pub fn frontier<V: Versioned>(versions: impl IntoIterator<Item = V>) -> Vec<V> {
    let all: Vec<V> = versions.into_iter().collect();
    let superseded = |i: usize| {
        all.iter()
            .enumerate()
            .any(|(j, other)| match other.vv().compare(all[i].vv()) {
                Causality::Dominates => true,
                Causality::Equal => (other.stamp(), j) > (all[i].stamp(), i),
                _ => false,
            })
    };
    let keep: Vec<bool> = (0..all.len()).map(|i| !superseded(i)).collect();
    let mut leaves: Vec<V> = all
        .into_iter()
        .zip(keep)
        .filter_map(|(v, k)| k.then_some(v))
        .collect();
    leaves.sort_by(|a, b| a.stamp().cmp(&b.stamp()));
    leaves
}

/// The `vv` strategy: concurrent versions are kept side by side, in
/// canonical order, until a write that has seen them all replaces them.
pub fn siblings<V: Versioned>(versions: impl IntoIterator<Item = V>) -> Vec<V> {
    frontier(versions)
}

/// The version of a resolution: the pointwise maximum of its inputs, so that
/// it dominates each of them and is dominated by any later write that saw it.
pub fn join<'a, V: Versioned + 'a>(versions: impl IntoIterator<Item = &'a V>) -> VersionVector {
    let mut vv = VersionVector::new();
    for v in versions {
        vv.merge(v.vv());
    }
    vv
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Hlc, Intent};

    /// A test version: `(vector entries, hlc, origin, row)`.
    #[derive(Clone, Debug, PartialEq)]
    pub(crate) struct V {
        pub vv: VersionVector,
        pub hlc: Hlc,
        pub origin: &'static str,
        pub row: Option<&'static str>,
    }

    impl Versioned for V {
        type Row = &'static str;
        fn vv(&self) -> &VersionVector {
            &self.vv
        }
        fn stamp(&self) -> Stamp<'_> {
            Stamp {
                hlc: self.hlc,
                origin: self.origin,
            }
        }
        fn row(&self) -> Option<&Self::Row> {
            self.row.as_ref()
        }
    }

    pub(crate) fn v(
        entries: &[(&str, u64)],
        hlc: u64,
        origin: &'static str,
        row: Option<&'static str>,
    ) -> V {
        V {
            vv: VersionVector(entries.iter().map(|(r, n)| (r.to_string(), *n)).collect()),
            hlc: Hlc(hlc),
            origin,
            row,
        }
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>(), Ok(s));
        }
        assert_eq!(
            "fancy".parse::<Strategy>(),
            Err(UnknownStrategy("fancy".into()))
        );
    }

    #[test]
    fn frontier_drops_superseded_and_duplicates_and_sorts() {
        let a1 = v(&[("a", 1)], 1, "a", Some("a1"));
        let a2 = v(&[("a", 2)], 3, "a", Some("a2"));
        let b1 = v(&[("b", 1)], 2, "b", Some("b1"));
        let c1 = v(&[("c", 1)], 2, "c", Some("c1"));
        let got = frontier([&c1, &a1, &a2, &b1, &a2]);
        assert_eq!(got, vec![&b1, &c1, &a2]);
        assert_eq!(siblings([&a1, &a2]), vec![&a2]);
    }

    #[test]
    fn join_dominates_every_input() {
        let a = v(&[("a", 2), ("b", 1)], 1, "a", None);
        let b = v(&[("b", 2)], 1, "b", None);
        let j = join([&a, &b]);
        assert_eq!(j.compare(&a.vv), Causality::Dominates);
        assert_eq!(j.compare(&b.vv), Causality::Dominates);
    }

    #[test]
    fn intents_are_versions() {
        let i = leaf::Leaf::from(&Intent::decode(
            br#"{"v":2,"origin":"eu","hlc":7,"schema":"s","table":"t","op":"delete","key":{"id":1},"row":null,"vv":{"eu":1},"strategy":"lww"}"#,
        )
        .unwrap());
        assert_eq!(
            i.stamp(),
            Stamp {
                hlc: Hlc(7),
                origin: "eu"
            }
        );
        assert!(i.row().is_none());
        assert_eq!(frontier([&i]).len(), 1);
    }
}
