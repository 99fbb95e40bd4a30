//! The `counter` strategy for a column: concurrent increments add up.
//!
//! A counter is kept as each region's contribution (the sum of that region's
//! increments) rather than as one number, so that joining two versions is a
//! pointwise choice instead of an addition: joining the same versions again,
//! in any order, or a version with one it already contains, counts nothing
//! twice. The column's value is the [`Contributions::total`].

use crate::VersionVector;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Region → sum of that region's increments, as of one version of the row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Contributions(pub BTreeMap<String, i64>);

impl Contributions {
    /// Records a local write by `region` that changed the column by `delta`.
    pub fn add(&mut self, region: &str, delta: i64) {
        *self.0.entry(region.to_owned()).or_insert(0) += delta;
    }

    pub fn total(&self) -> i64 {
        self.0.values().sum()
    }
}

/// The counter of a resolution: each region's contribution is taken from the
/// version that has seen the most of that region's writes (the highest entry
/// for it in its version vector), since that contribution includes all the
/// earlier ones.
pub fn join<'a>(
    versions: impl IntoIterator<Item = (&'a VersionVector, &'a Contributions)>,
) -> Contributions {
    let mut newest: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    for (vv, contributions) in versions {
        for (region, &sum) in &contributions.0 {
            // Versions that saw equally many writes of `region` carry the
            // same sum for it; `max` only makes a corrupt input deterministic.
            let candidate = (vv.get(region), sum);
            let e = newest.entry(region).or_insert(candidate);
            *e = (*e).max(candidate);
        }
    }
    Contributions(
        newest
            .into_iter()
            .map(|(r, (_, sum))| (r.to_owned(), sum))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn version(entries: &[(&str, u64, i64)]) -> (VersionVector, Contributions) {
        (
            VersionVector(
                entries
                    .iter()
                    .map(|(r, n, _)| (r.to_string(), *n))
                    .collect(),
            ),
            Contributions(
                entries
                    .iter()
                    .map(|(r, _, s)| (r.to_string(), *s))
                    .collect(),
            ),
        )
    }

    #[test]
    fn concurrent_increments_add_up() {
        let base = version(&[("a", 1, 10)]);
        let a = version(&[("a", 2, 15)]);
        let b = version(&[("a", 1, 10), ("b", 1, 3)]);
        let j = join([(&base.0, &base.1), (&a.0, &a.1), (&b.0, &b.1)]);
        assert_eq!(j.total(), 18);
        let mut c = Contributions::default();
        c.add("a", 2);
        c.add("a", -5);
        assert_eq!(c.total(), -3);
    }

    /// A group of versions joined into one: what a resolution of them carries.
    fn joined(vs: &[(VersionVector, Contributions)]) -> (VersionVector, Contributions) {
        let mut vv = VersionVector::new();
        vs.iter().for_each(|(v, _)| vv.merge(v));
        (vv, join(vs.iter().map(|(v, c)| (v, c))))
    }

    proptest! {
        /// Joining is order-independent and idempotent: joining groups of
        /// the versions, and one group twice, counts every increment once.
        #[test]
        fn join_is_a_semilattice(writes in prop::collection::vec((0usize..3, -3i64..4), 0..8), cut in 0usize..8) {
            let regions = ["a", "b", "c"];
            let (mut sums, mut counts) = ([0i64; 3], [0u64; 3]);
            let mut versions = Vec::new();
            for &(r, d) in &writes {
                sums[r] += d;
                counts[r] += 1;
                versions.push(version(&[(regions[r], counts[r], sums[r])]));
            }
            let all = joined(&versions);
            prop_assert_eq!(all.1.total(), writes.iter().map(|(_, d)| d).sum::<i64>());
            let (left, right) = versions.split_at(cut.min(versions.len()));
            let regrouped = joined(&[joined(right), joined(left), joined(right)]);
            prop_assert_eq!(regrouped, all);
        }
    }
}
