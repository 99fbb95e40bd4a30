//! When a region may forget a tombstone (a deleted row's version): once no
//! write it could decide can still arrive, and no region can still need it
//! re-sent.
//!
//! Each region says, in a heartbeat on its own intent stream, `below`: every
//! write it stamped below that has already been sent (the transactions that
//! took those stamps have all ended), and `seen`: per other region, the
//! `below` of that region's heartbeats it has applied (so it has every write
//! of that region stamped below it). The streams are in commit order, so a
//! heartbeat arrives after every write it vouches for.

use crate::{Causality, Hlc, VersionVector};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One region's heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stability {
    /// Every write of the region stamped below this has been sent.
    pub below: Hlc,
    /// Per other region: every write of it stamped below this has been
    /// applied by this region.
    #[serde(default)]
    pub seen: BTreeMap<String, Hlc>,
    /// Rows of merge and vv tables that have settled in the region since
    /// its last heartbeat (see `forgettable`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settled: Vec<Settled>,
}

/// A row whose version in the heartbeat's region is at least `vv`: every
/// write that region makes of it from now on is above `vv` (a write is
/// based on the row's applied version, which only grows, R1), and every
/// write it made before is earlier on its stream than this heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    pub schema: String,
    pub table: String,
    pub key: Map<String, Value>,
    pub vv: VersionVector,
}

/// Whether a region may forget what it keeps of a row beyond its version
/// `vv` — a resolved conflict's leaves, or the row's tombstone — given
/// what each of `peers` (every other region) has said has `settled` there.
/// Leaves are kept so that a write concurrent with one of them is folded
/// with all of them; a tombstone, so that a write it has seen does not
/// bring the row back. Once every other region is at `vv` or past it, and
/// this region has applied everything each of them wrote before saying
/// so, every write still to come here is above `vv`: it supersedes the
/// leaves and the tombstone alike. Only a `closed` row (no leaf pending
/// here) is at `vv` as a whole.
pub fn forgettable(
    closed: bool,
    vv: &VersionVector,
    settled: &BTreeMap<String, VersionVector>,
    peers: &[String],
) -> bool {
    closed
        && peers.iter().all(|p| {
            settled
                .get(p)
                .is_some_and(|s| matches!(s.compare(vv), Causality::Dominates | Causality::Equal))
        })
}

/// Per origin region, the stamp below which region `me` may drop a
/// tombstone written by that origin, given the last heartbeat `heard` from
/// each other region of `regions`: nothing stamped below it can still
/// arrive here from any region (the least `below`), and every region other
/// than the origin has applied the origin's writes below it (so a region
/// that must be sent the origin's rows again never needs the tombstone).
/// Empty while some region has not been heard from.
pub fn horizons(
    me: &str,
    regions: &[String],
    heard: &BTreeMap<String, Stability>,
) -> BTreeMap<String, Hlc> {
    let peers: Vec<&String> = regions.iter().filter(|r| *r != me).collect();
    let Some(beats) = peers
        .iter()
        .map(|p| heard.get(*p))
        .collect::<Option<Vec<&Stability>>>()
    else {
        return BTreeMap::new();
    };
    let arrived = beats.iter().map(|b| b.below).min().unwrap_or(Hlc(u64::MAX));
    regions
        .iter()
        .map(|origin| {
            let everywhere = peers
                .iter()
                .zip(&beats)
                .filter(|(p, _)| **p != origin)
                .map(|(_, b)| b.seen.get(origin).copied().unwrap_or_default())
                .min()
                .unwrap_or(Hlc(u64::MAX));
            (origin.clone(), arrived.min(everywhere))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(below: u64, seen: &[(&str, u64)]) -> Stability {
        Stability {
            below: Hlc(below),
            seen: seen.iter().map(|(r, h)| (r.to_string(), Hlc(*h))).collect(),
            settled: Vec::new(),
        }
    }

    fn vv(entries: &[(&str, u64)]) -> VersionVector {
        let mut v = VersionVector::new();
        for (r, n) in entries {
            for _ in 0..*n {
                v.bump(r);
            }
        }
        v
    }

    #[test]
    fn a_row_is_forgotten_once_every_other_region_is_past_it() {
        let peers: Vec<String> = ["b", "c"].map(String::from).to_vec();
        let row = vv(&[("a", 1), ("b", 1)]);
        let mut said = BTreeMap::new();
        said.insert("b".to_string(), row.clone());
        assert!(
            !forgettable(true, &row, &said, &peers),
            "c has said nothing"
        );
        // c is at a version concurrent with the row's: a write it makes
        // can still be concurrent with a leaf.
        said.insert("c".to_string(), vv(&[("a", 1), ("c", 1)]));
        assert!(!forgettable(true, &row, &said, &peers));
        said.insert("c".to_string(), vv(&[("a", 1), ("b", 1), ("c", 2)]));
        assert!(forgettable(true, &row, &said, &peers));
        assert!(
            !forgettable(false, &row, &said, &peers),
            "a conflict still open here"
        );
        // A row that has moved on since: the others must catch up.
        let later = vv(&[("a", 2), ("b", 1)]);
        assert!(!forgettable(true, &later, &said, &peers));
    }

    #[test]
    fn a_horizon_waits_for_every_region() {
        let regions: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut heard = BTreeMap::new();
        heard.insert("b".to_string(), beat(50, &[("a", 40), ("c", 30)]));
        assert!(
            horizons("a", &regions, &heard).is_empty(),
            "c not heard from"
        );
        heard.insert("c".to_string(), beat(60, &[("a", 45), ("b", 20)]));
        let h = horizons("a", &regions, &heard);
        // Nothing below 50 can still arrive (b's below); a's own tombstones
        // also need b and c to have them (40, 45); b's need c to (20); c's
        // need b to (30).
        assert_eq!(h["a"], Hlc(40));
        assert_eq!(h["b"], Hlc(20));
        assert_eq!(h["c"], Hlc(30));
        // A region that has applied nothing of an origin holds its
        // tombstones everywhere.
        heard.insert("c".to_string(), beat(60, &[("a", 45)]));
        assert_eq!(horizons("a", &regions, &heard)["b"], Hlc(0));
    }
}
