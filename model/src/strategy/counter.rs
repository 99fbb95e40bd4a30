//! The `counter` strategy for a column: concurrent increments add up.
//!
//! A counter is kept as each region's contribution (the sum of that region's
//! increments) rather than as one number, so that joining two versions is a
//! pointwise choice instead of an addition: joining the same versions again,
//! in any order, or a version with one it already contains, counts nothing
//! twice. The column's value is the [`Contributions::total`].
//!
//! A row whose counter can be deleted and written again keeps a [`Counter`]:
//! the increments counted, and those a reset erased. A reset (a delete, or
//! an insert that brings the row back) erases every increment its writer
//! had counted; increments it had not seen still count if the row lives
//! (observed-remove). Both parts are [`Tally`]s, each region's part known by
//! how many of its writes it covers, so both join as [`join`] does, and the
//! value is the same wherever the same writes arrived, in whatever order.

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
    let mut joined = Tally::default();
    for (vv, contributions) in versions {
        let parts = contributions.0.iter().map(|(region, &sum)| {
            let part = Part {
                writes: vv.get(region),
                sum,
            };
            (region.clone(), part)
        });
        joined.join(&Tally(parts.collect()));
    }
    Contributions(joined.0.into_iter().map(|(r, p)| (r, p.sum)).collect())
}

/// A counter's amounts: `i64` in the model, exact decimals in the extension.
pub trait Amount: Clone + Ord + Default {
    fn plus(&self, other: &Self) -> Self;
    fn minus(&self, other: &Self) -> Self;
}

impl Amount for i64 {
    fn plus(&self, other: &Self) -> Self {
        self + other
    }
    fn minus(&self, other: &Self) -> Self {
        self - other
    }
}

/// One region's part of a counter: the sum of the increments among the
/// region's first `writes` writes to the row.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "(u64, S)", into = "(u64, S)")]
pub struct Part<S: Clone> {
    pub writes: u64,
    pub sum: S,
}

impl<S: Clone> From<(u64, S)> for Part<S> {
    fn from((writes, sum): (u64, S)) -> Self {
        Part { writes, sum }
    }
}

impl<S: Clone> From<Part<S>> for (u64, S) {
    fn from(p: Part<S>) -> Self {
        (p.writes, p.sum)
    }
}

/// Region → its [`Part`]: what one version has seen of each region's
/// increments to a counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tally<S: Clone>(pub BTreeMap<String, Part<S>>);

impl<S: Clone> Default for Tally<S> {
    fn default() -> Self {
        Tally(BTreeMap::new())
    }
}

impl<S: Amount> Tally<S> {
    /// Takes each region's part from whichever side covers more of its
    /// writes: both are prefixes of the same stream of increments, so the
    /// longer one contains the other.
    pub fn join(&mut self, other: &Tally<S>) {
        for (region, part) in &other.0 {
            let mine = self.0.entry(region.clone()).or_insert_with(|| part.clone());
            // Parts covering equally many writes carry the same sum; `max`
            // only makes a corrupt input deterministic.
            if part > mine {
                *mine = part.clone();
            }
        }
    }

    pub fn total(&self) -> S {
        self.0.values().fold(S::default(), |t, p| t.plus(&p.sum))
    }
}

/// A counter column of one row, as a version holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "S: Amount + Serialize + serde::de::DeserializeOwned")]
pub struct Counter<S: Amount> {
    /// Every region's increments this version has counted.
    pub counted: Tally<S>,
    /// The increments resets have erased.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub erased: Tally<S>,
}

fn is_empty<S: Clone>(t: &Tally<S>) -> bool {
    t.0.is_empty()
}

impl<S: Amount> Default for Counter<S> {
    fn default() -> Self {
        Counter {
            counted: Tally::default(),
            erased: Tally::default(),
        }
    }
}

impl<S: Amount> Counter<S> {
    /// Counts the increment `delta` of `region`'s write number `write` (its
    /// own entry in the write's version vector). A write already counted
    /// (delivered twice) counts nothing: returns false.
    pub fn count(&mut self, region: &str, write: u64, delta: &S) -> bool {
        let part = self.counted.0.entry(region.to_owned()).or_default();
        if write <= part.writes {
            return false;
        }
        *part = Part {
            writes: write,
            sum: part.sum.plus(delta),
        };
        true
    }

    /// Counts the increment `delta` of `region`'s write number `write` that
    /// arrives after later writes of that region were counted: a write kept
    /// aside and applied since, exactly once (a dead letter replayed once
    /// its table is global here). Its region's part covers it already by
    /// number, and now by sum too. A write not yet covered counts as
    /// [`Counter::count`] does.
    pub fn count_late(&mut self, region: &str, write: u64, delta: &S) {
        if !self.count(region, write, delta) {
            let part = self.counted.0.entry(region.to_owned()).or_default();
            part.sum = part.sum.plus(delta);
        }
    }

    /// A reset whose writer had counted `seen`: those increments no longer
    /// count.
    pub fn erase(&mut self, seen: &Tally<S>) {
        self.erased.join(seen);
    }

    pub fn value(&self) -> S {
        self.counted.total().minus(&self.erased.total())
    }
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

    /// What arrives at one replica of a counter: a region's increment (in
    /// that region's order), or a reset that had counted some prefix of
    /// each region's increments.
    #[derive(Clone, Debug)]
    enum Event {
        Increment(usize, u64, i64),
        Reset(Tally<i64>),
    }

    fn apply(events: &[Event]) -> i64 {
        let mut c = Counter::<i64>::default();
        for e in events {
            match e {
                Event::Increment(r, n, d) => {
                    c.count(["a", "b", "c"][*r], *n, d);
                }
                Event::Reset(seen) => c.erase(seen),
            }
        }
        c.value()
    }

    proptest! {
        /// Observed-remove: whatever order the events arrive in (each
        /// region's increments in their order, resets anywhere, anything
        /// twice), the value is the sum of the increments that no reset
        /// had counted.
        #[test]
        fn resets_erase_what_they_saw_in_any_order(
            streams in prop::collection::vec(prop::collection::vec(-3i64..5, 0..5), 3),
            resets in prop::collection::vec(prop::collection::vec(0usize..5, 3), 0..3),
            picks in prop::collection::vec(0usize..64, 0..40),
        ) {
            let regions = ["a", "b", "c"];
            let prefix = |r: usize, n: usize| streams[r][..n.min(streams[r].len())].iter().sum::<i64>();
            let mut events: Vec<Vec<Event>> = (0..3)
                .map(|r| {
                    streams[r]
                        .iter()
                        .enumerate()
                        .map(|(i, d)| Event::Increment(r, i as u64 + 1, *d))
                        .collect()
                })
                .collect();
            let mut erased = [0usize; 3];
            let mut reset_events = Vec::new();
            for seen in &resets {
                let mut t = Tally::default();
                for r in 0..3 {
                    let n = seen[r].min(streams[r].len());
                    erased[r] = erased[r].max(n);
                    if n > 0 {
                        t.0.insert(regions[r].to_owned(), Part { writes: n as u64, sum: prefix(r, n) });
                    }
                }
                reset_events.push(Event::Reset(t));
            }
            events.push(reset_events);
            // One arrival order: the streams interleaved by `picks`, then
            // what is left of each; and the same order delivered twice.
            let mut order = Vec::new();
            let mut next = vec![0usize; events.len()];
            for p in &picks {
                let s = p % events.len();
                if next[s] < events[s].len() {
                    order.push(events[s][next[s]].clone());
                    next[s] += 1;
                }
            }
            for (s, stream) in events.iter().enumerate() {
                order.extend(stream[next[s]..].iter().cloned());
            }
            let want: i64 = (0..3).map(|r| prefix(r, streams[r].len()) - prefix(r, erased[r])).sum();
            prop_assert_eq!(apply(&order), want);
            let twice: Vec<Event> = order.iter().chain(order.iter()).cloned().collect();
            prop_assert_eq!(apply(&twice), want);
        }

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
