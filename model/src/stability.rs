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

use crate::Hlc;
use serde::{Deserialize, Serialize};
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
        }
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
