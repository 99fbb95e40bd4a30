//! The shadow protocol of docs/shadow-protocol.md as a stateright model.
//!
//! A plain `stateright::Model` with an explicit network: a set of messages
//! that are never consumed, so that any message can be delivered late, out
//! of order and any number of times. Every rule calls the model crate's pure
//! functions (version vectors, HLC, frontier, each strategy's resolve,
//! rendezvous ownership), the ones the sidecar and the extension call.
//!
//! Writes are numbered in commit order and a set of writes is a bit mask, so
//! that a row's state stays a few bytes; the versions themselves (vector,
//! stamp, row image) live once in `State::writes`, as immutable as the
//! intents that carry them.

use foreshadow_model::lww::{self, Stamp};
use foreshadow_model::strategy::counter::{self, Contributions};
use foreshadow_model::strategy::{self, merge, Versioned};
use foreshadow_model::{ownership, Causality, Hlc, Strategy, VersionVector};
use stateright::{Model, Property};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;

pub const REGION_NAMES: [&str; 4] = ["r0", "r1", "r2", "r3"];
/// Chosen so that shadows `r0` and `r1` own one key each, and that both
/// keys move when the set becomes `r1`, `r2` (the tests check it).
pub const KEY_NAMES: [&str; 2] = ["key-0", "key-2"];
/// Wall clocks stand still, so the HLC runs on its logical counter alone and
/// two regions' first writes carry equal clocks: the tie-break on the origin
/// name is exercised rather than avoided.
const NOW_MS: u64 = 0;

/// A set of writes by number.
pub type Mask = u8;
const MAX_WRITES: usize = Mask::BITS as usize;

fn bit(id: usize) -> Mask {
    1 << id
}

fn ids(mask: Mask) -> impl Iterator<Item = usize> {
    (0..MAX_WRITES).filter(move |i| mask & bit(*i) != 0)
}

/// Who resolves conflicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The protocol: the key's owner shadow resolves each conflict once and
    /// pre-stages it; primaries fall back only when the owner is cut off.
    Shadow,
    /// No shadow: every primary resolves every conflict itself, with the same
    /// deterministic fold as the fallback.
    NoShadow,
    /// pglogical's way: each primary resolves `(local, remote)` as a
    /// conflicting intent arrives. Only meaningful with `merge`.
    Pairwise,
}

/// Simpler rules that the checker rejected while the protocol was designed;
/// each is kept so that its counterexample stays reproducible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flaw {
    /// A local write on a row with an unresolved conflict is given the
    /// version of every leaf, including the remote ones its row image does
    /// not reflect yet.
    WriteClaimsPending,
    /// A primary applies a pre-staged resolution whenever it is not older
    /// than its row, instead of only when it dominates it.
    AdoptUndominated,
    /// A primary that falls back merges its own row with the other leaves
    /// (local first), instead of folding the leaf set in canonical order.
    PairwiseFallback,
    /// The owner's list of resolutions still to deliver is in memory only and
    /// is not rebuilt from its resolution log after a restart.
    ForgetUnackedOnRestart,
    /// The owner pre-stages only the conflicts it resolves itself, not one
    /// its host had already resolved by fallback before it owned the key.
    OwnerPublishesOnlyItsOwn,
}

#[derive(Clone, Debug)]
pub struct Setup {
    pub strategy: Strategy,
    pub mode: Mode,
    pub regions: usize,
    pub keys: usize,
    pub writes: usize,
    /// Host regions of the table's shadows, before and after the shadow-set
    /// change (`None`: the set never changes).
    pub shadows: Vec<u8>,
    pub shadows_after: Option<Vec<u8>>,
    pub crashes: u8,
    /// Whether one shadow may be cut off (until it heals).
    pub cut: bool,
    /// Whether writes may be deletes (`lww` and `vv`).
    pub deletes: bool,
    pub flaw: Option<Flaw>,
}

impl Setup {
    /// Every fault enabled, for `regions` regions and their first `shadows`
    /// as the shadow set, replaced by the last `shadows` regions later.
    pub fn faulty(
        strategy: Strategy,
        regions: usize,
        shadows: usize,
        keys: usize,
        writes: usize,
    ) -> Setup {
        Setup {
            strategy,
            mode: Mode::Shadow,
            regions,
            keys,
            writes,
            shadows: (0..shadows as u8).collect(),
            shadows_after: Some(((regions - shadows) as u8..regions as u8).collect()),
            crashes: 1,
            cut: true,
            deletes: matches!(strategy, Strategy::Lww | Strategy::Vv),
            flaw: None,
        }
    }
}

pub struct ShadowModel {
    pub setup: Setup,
    /// List only the actions that change the state. Stateright's random
    /// walks record a step that changes nothing in a way that their
    /// counterexample paths cannot replay, so they need this; exhaustive
    /// search does not, and is faster without it.
    pub only_effective_actions: bool,
    /// The owner's host region per shadow-set epoch and key, from
    /// `ownership::owner` over the shadow names.
    pub owners: [Vec<Option<u8>>; 2],
}

impl ShadowModel {
    pub fn new(setup: Setup) -> ShadowModel {
        assert!(
            setup.writes <= MAX_WRITES
                && setup.regions <= REGION_NAMES.len()
                && setup.keys <= KEY_NAMES.len()
        );
        assert!(setup.mode != Mode::Pairwise || setup.strategy == Strategy::Merge);
        let owners_of = |hosts: &[u8]| -> Vec<Option<u8>> {
            let names: Vec<&str> = hosts.iter().map(|&h| REGION_NAMES[h as usize]).collect();
            (0..setup.keys)
                .map(|k| {
                    let owner = ownership::owner(KEY_NAMES[k].as_bytes(), &names)?;
                    hosts
                        .iter()
                        .copied()
                        .find(|&h| REGION_NAMES[h as usize] == *owner)
                })
                .collect()
        };
        let shadows = if setup.mode == Mode::Shadow {
            setup.shadows.clone()
        } else {
            Vec::new()
        };
        let after = setup
            .shadows_after
            .clone()
            .unwrap_or_else(|| shadows.clone());
        let owners = [owners_of(&shadows), owners_of(&after)];
        ShadowModel {
            setup,
            owners,
            only_effective_actions: false,
        }
    }
}

/// One committed write: the version its intent carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Write {
    pub origin: u8,
    /// Position in the origin's intent stream (1-based).
    pub seq: u8,
    pub key: u8,
    pub hlc: Hlc,
    pub vv: VersionVector,
    /// `lww`, `vv`: `[own number]`, `None` for a delete. `merge`: the row the
    /// writer saw plus its own number. Unused by `counter`.
    pub row: Option<Vec<u8>>,
    /// `counter`: the contributions the writer saw plus its own increment.
    pub counter: Contributions,
    pub delta: i64,
}

impl Versioned for Write {
    type Row = Vec<u8>;
    fn vv(&self) -> &VersionVector {
        &self.vv
    }
    fn stamp(&self) -> Stamp<'_> {
        Stamp {
            hlc: self.hlc,
            origin: REGION_NAMES[self.origin as usize],
        }
    }
    fn row(&self) -> Option<&Vec<u8>> {
        self.row.as_ref()
    }
}

/// A write with its number, so that the strategies' results map back to
/// masks.
struct Leaf<'a>(usize, &'a Write);

impl Versioned for Leaf<'_> {
    type Row = Vec<u8>;
    fn vv(&self) -> &VersionVector {
        self.1.vv()
    }
    fn stamp(&self) -> Stamp<'_> {
        self.1.stamp()
    }
    fn row(&self) -> Option<&Vec<u8>> {
        self.1.row()
    }
}

/// What a `SELECT` of the row shows.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// `lww`, `merge`: the row image; `None` when absent or deleted.
    Row(Option<Vec<u8>>),
    /// `vv`: the siblings in canonical order.
    Siblings(Vec<Option<Vec<u8>>>),
    Counter(Contributions),
}

/// A row of a global table on one primary, with its version metadata.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Row {
    /// The frontier of every version of the row this primary knows.
    pub leaves: Mask,
    /// The frontier that `value` reflects; the row's version is their join.
    /// `applied != leaves` is an unresolved conflict.
    pub applied: Mask,
    pub value: Value,
    /// Metadata only (not compared for convergence): the current value came
    /// from this primary's own fallback.
    pub by_fallback: bool,
}

impl Row {
    pub fn pending(&self) -> bool {
        self.leaves != self.applied
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    // The primary: durable.
    pub hlc: Hlc,
    /// Per origin, the last intent applied (the replication origin's
    /// progress, committed with the apply).
    pub progress: Vec<u8>,
    /// The shadow-set epoch this region has received on the metadata lane.
    pub epoch: u8,
    pub rows: Vec<Row>,
    /// As a shadow's host: every resolution it made, by (key, leaves).
    pub resolutions: BTreeMap<(u8, Mask), Value>,
    // The sidecar: in memory, lost in a crash.
    /// As a shadow: (key, leaves, region) pre-stages not yet acknowledged.
    pub unacked: BTreeSet<(u8, Mask, u8)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    /// A write intent, on the origin's logical-decoding stream: every region
    /// reads it from its own slot, in order, from its durable progress.
    Intent { write: u8 },
    /// The new shadow set, on the metadata lane.
    ShadowSet { epoch: u8 },
    /// `foreshadow.prestage(...)` called by the owner on region `to`.
    Prestage {
        host: u8,
        key: u8,
        leaves: Mask,
        to: u8,
    },
    /// `to`'s prestage call returned: the resolution is durable there.
    Ack {
        host: u8,
        key: u8,
        leaves: Mask,
        from: u8,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Write {
        region: u8,
        key: u8,
        delete: bool,
    },
    Deliver {
        msg: Msg,
        to: u8,
    },
    /// The owner resolves a conflict its host has detected.
    Resolve {
        host: u8,
        key: u8,
    },
    /// The owner resends an unacknowledged pre-stage whose call was lost.
    Send {
        host: u8,
        key: u8,
        leaves: Mask,
        to: u8,
    },
    /// The deadline passed without a resolution.
    Fallback {
        region: u8,
        key: u8,
    },
    /// The region's sidecar is killed and restarted, and its primary with
    /// it: memory is lost, and so are the pre-stage calls in flight to and
    /// from the region, with their connections.
    Crash {
        region: u8,
    },
    Cut {
        host: u8,
    },
    Heal,
    ChangeShadowSet,
}

impl Action {
    /// The protocol's own steps, as opposed to clients and faults: when none
    /// of them changes anything, the system is quiescent.
    fn is_protocol(&self) -> bool {
        matches!(
            self,
            Action::Deliver { .. }
                | Action::Resolve { .. }
                | Action::Send { .. }
                | Action::Fallback { .. }
        )
    }
}

/// Things that happened, for the properties.
pub mod seen {
    pub const CONFLICT: u16 = 1;
    pub const PRESTAGED: u16 = 1 << 1;
    pub const FALLBACK: u16 = 1 << 2;
    pub const CHANGE_IN_FLIGHT: u16 = 1 << 3;
    pub const LATE_RESOLUTION: u16 = 1 << 4;
    pub const CRASH: u16 = 1 << 5;
    /// A conflict among three or more concurrent writes was resolved.
    pub const THREE_WAY: u16 = 1 << 6;
    /// A row's version went down or sideways.
    pub const REGRESSED: u16 = 1 << 7;
    /// Two resolutions of the same leaf set gave different rows.
    pub const DISAGREED: u16 = 1 << 8;
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Book {
    /// Times each (key, leaf set) was resolved, by an owner or a fallback,
    /// and the result.
    pub resolved: BTreeMap<(u8, Mask), (u8, Value)>,
    pub merge_calls: u16,
    pub seen: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// Shared between states: a write never changes once committed.
    pub writes: Vec<Arc<Write>>,
    pub regions: Vec<Region>,
    pub net: BTreeSet<Msg>,
    /// The host of the shadow that is currently unreachable.
    pub cut: Option<u8>,
    pub crashes_left: u8,
    pub cut_used: bool,
    pub set_changed: bool,
    pub book: Book,
}

/// The user's merge function (it ignores the base), deliberately
/// non-commutative: the local row's items, then the remote row's items that
/// the local row lacks. It loses nothing, so any lost write is the
/// protocol's fault.
fn union_merge(local: &[u8], remote: &[u8]) -> Vec<u8> {
    let mut out = local.to_vec();
    out.extend(remote.iter().filter(|x| !local.contains(x)));
    out
}

impl ShadowModel {
    fn leaves<'a>(&self, s: &'a State, mask: Mask) -> Vec<Leaf<'a>> {
        ids(mask).map(|i| Leaf(i, &s.writes[i])).collect()
    }

    fn join(&self, s: &State, mask: Mask) -> VersionVector {
        strategy::join(self.leaves(s, mask).iter())
    }

    fn frontier(&self, s: &State, mask: Mask) -> Mask {
        strategy::frontier(self.leaves(s, mask))
            .iter()
            .fold(0, |m, l| m | bit(l.0))
    }

    fn empty_value(&self) -> Value {
        match self.setup.strategy {
            Strategy::Lww | Strategy::Merge => Value::Row(None),
            Strategy::Vv => Value::Siblings(Vec::new()),
            Strategy::Counter => Value::Counter(Contributions::default()),
        }
    }

    /// The row as it is right after write `w`.
    fn write_value(&self, w: &Write) -> Value {
        match self.setup.strategy {
            Strategy::Lww | Strategy::Merge => Value::Row(w.row.clone()),
            Strategy::Vv => Value::Siblings(vec![w.row.clone()]),
            Strategy::Counter => Value::Counter(w.counter.clone()),
        }
    }

    /// The strategy's resolution of a leaf set, by the crate's functions.
    fn resolve(&self, s: &State, mask: Mask, merge_calls: &mut u16) -> Value {
        let leaves = self.leaves(s, mask);
        match self.setup.strategy {
            Strategy::Lww => Value::Row(lww::resolve(&leaves).and_then(|l| l.1.row.clone())),
            Strategy::Merge => {
                let merged = merge::resolve(&leaves, None, |_base, local, remote| {
                    *merge_calls += 1;
                    Ok::<_, Infallible>(union_merge(local, remote))
                });
                Value::Row(merged.unwrap_or_else(|never| match never {}))
            }
            Strategy::Vv => Value::Siblings(
                strategy::siblings(&leaves)
                    .iter()
                    .map(|l| l.1.row.clone())
                    .collect(),
            ),
            Strategy::Counter => Value::Counter(counter::join(
                leaves.iter().map(|l| (&l.1.vv, &l.1.counter)),
            )),
        }
    }

    /// `Flaw::PairwiseFallback`: the row as it is, merged with each leaf it
    /// does not reflect yet.
    fn resolve_local_first(&self, s: &State, row: &Row, merge_calls: &mut u16) -> Value {
        let Value::Row(Some(mut acc)) = row.value.clone() else {
            return self.resolve(s, row.leaves, merge_calls);
        };
        for l in strategy::frontier(self.leaves(s, row.leaves & !row.applied)) {
            *merge_calls += 1;
            acc = union_merge(
                &acc,
                l.1.row.as_ref().expect("merge writes are never deletes"),
            );
        }
        Value::Row(Some(acc))
    }

    fn owner(&self, s: &State, region: usize, key: usize) -> Option<u8> {
        self.owners[s.regions[region].epoch as usize][key]
    }

    fn shadow_hosts(&self) -> BTreeSet<u8> {
        self.setup
            .shadows
            .iter()
            .chain(self.setup.shadows_after.iter().flatten())
            .copied()
            .collect()
    }

    /// The owner resolves the conflict its host has detected, and publishes
    /// any resolved conflict its host holds that it has not published yet:
    /// after a shadow-set change, a row that its host resolved by fallback
    /// may be the one every other primary waits for.
    fn resolution_enabled(&self, s: &State, host: usize, key: usize) -> bool {
        let row = &s.regions[host].rows[key];
        let unpublished = row.leaves.count_ones() > 1
            && !s.regions[host]
                .resolutions
                .contains_key(&(key as u8, row.leaves))
            && self.setup.flaw != Some(Flaw::OwnerPublishesOnlyItsOwn);
        self.setup.mode == Mode::Shadow
            && self.owner(s, host, key) == Some(host as u8)
            && (row.pending() || unpublished)
    }

    fn fallback_enabled(&self, s: &State, region: usize, key: usize) -> bool {
        let owner = self.owner(s, region, key);
        self.setup.mode != Mode::Pairwise
            && s.regions[region].rows[key].pending()
            && owner != Some(region as u8)
            && (owner.is_none() || owner == s.cut)
    }

    /// Records a resolution of `leaves` for the properties.
    fn book_resolution(s: &mut State, key: u8, leaves: Mask, value: &Value) {
        if leaves.count_ones() > 2 {
            s.book.seen |= seen::THREE_WAY;
        }
        let entry = s
            .book
            .resolved
            .entry((key, leaves))
            .or_insert((0, value.clone()));
        entry.0 += 1;
        if entry.1 != *value {
            s.book.seen |= seen::DISAGREED;
        }
    }

    fn write(&self, s: &mut State, region: usize, key: usize, delete: bool) {
        let id = s.writes.len();
        let name = REGION_NAMES[region];
        let row = &s.regions[region].rows[key];
        // The write is based on what its row image reflects, so it has seen
        // only the applied leaves; pending remote leaves stay concurrent with
        // it and are resolved with it.
        let seen = if self.setup.flaw == Some(Flaw::WriteClaimsPending) {
            row.leaves
        } else {
            row.applied
        };
        let hlc = Hlc::tick(s.regions[region].hlc, NOW_MS);
        let mut vv = self.join(s, seen);
        match self.setup.strategy {
            // As capture does: a row with no version here starts its
            // writer's entry at the stamp.
            Strategy::Merge | Strategy::Vv if seen == 0 => vv.bump_fresh(name, hlc),
            _ => vv.bump(name),
        }
        let (image, mut counter) = match &row.value {
            Value::Row(Some(items)) if self.setup.strategy == Strategy::Merge => {
                (items.clone(), Contributions::default())
            }
            Value::Counter(c) => (Vec::new(), c.clone()),
            _ => (Vec::new(), Contributions::default()),
        };
        let delta = id as i64 + 1;
        let row_image = match self.setup.strategy {
            Strategy::Counter => {
                counter.add(name, delta);
                None
            }
            _ if delete => None,
            _ => Some([image, vec![id as u8]].concat()),
        };
        let w = Write {
            origin: region as u8,
            seq: s
                .writes
                .iter()
                .filter(|w| w.origin as usize == region)
                .count() as u8
                + 1,
            key: key as u8,
            hlc,
            vv,
            row: row_image,
            counter,
            delta,
        };
        s.regions[region].hlc = w.hlc;
        let value = self.write_value(&w);
        s.writes.push(Arc::new(w));
        let leaves = self.frontier(s, s.regions[region].rows[key].leaves | bit(id));
        s.regions[region].rows[key] = Row {
            leaves,
            applied: bit(id),
            value,
            by_fallback: false,
        };
        s.net.insert(Msg::Intent { write: id as u8 });
    }

    /// Whether region `to` applies intent `id` now: the next one in its
    /// origin's commit order. Anything else is a duplicate, or ahead of a gap
    /// that the slot will fill, and is dropped.
    fn next_in_order(s: &State, to: usize, id: usize) -> bool {
        let w = &s.writes[id];
        to != w.origin as usize && w.seq == s.regions[to].progress[w.origin as usize] + 1
    }

    /// A remote intent, next in origin order, applied by the region's
    /// sidecar in one transaction with its progress.
    fn apply_intent(&self, s: &mut State, to: usize, id: usize) {
        let (origin, seq, key) = (
            s.writes[id].origin as usize,
            s.writes[id].seq,
            s.writes[id].key as usize,
        );
        s.regions[to].progress[origin] = seq;
        s.regions[to].hlc = Hlc::observe(s.regions[to].hlc, s.writes[id].hlc, NOW_MS);
        let row = s.regions[to].rows[key].clone();
        let w = &s.writes[id];
        if self.setup.mode == Mode::Pairwise {
            let next = match w.vv.compare(&self.join(s, row.applied)) {
                Causality::Dominates => self.write_value(w),
                Causality::Concurrent => match (&row.value, &w.row) {
                    (Value::Row(Some(local)), Some(remote)) => {
                        s.book.merge_calls += 1;
                        Value::Row(Some(union_merge(local, remote)))
                    }
                    _ => unreachable!("pairwise mode models merge, which never deletes"),
                },
                Causality::Equal | Causality::DominatedBy => return,
            };
            let leaves = self.frontier(s, row.leaves | bit(id));
            s.regions[to].rows[key] = Row {
                leaves,
                applied: leaves,
                value: next,
                by_fallback: false,
            };
            return;
        }
        if matches!(
            w.vv.compare(&self.join(s, row.leaves)),
            Causality::DominatedBy | Causality::Equal
        ) {
            return; // already known: seen by a later version, or pre-staged
        }
        let mut next = Row {
            leaves: self.frontier(s, row.leaves | bit(id)),
            ..row.clone()
        };
        if w.vv.compare(&self.join(s, row.applied)) == Causality::Dominates {
            next = Row {
                applied: bit(id),
                value: self.write_value(w),
                by_fallback: false,
                ..next
            };
        }
        if next.pending() {
            s.book.seen |= seen::CONFLICT;
        }
        s.regions[to].rows[key] = next;
    }

    /// A pre-staged resolution: its leaves join what the primary knows, and
    /// it becomes the row if it dominates what the row reflects.
    fn prestage(&self, s: &mut State, host: usize, key: usize, leaves: Mask, to: usize) {
        let value = s.regions[host].resolutions[&(key as u8, leaves)].clone();
        let row = s.regions[to].rows[key].clone();
        let known = self.join(s, row.leaves);
        let news = self.leaves(s, leaves).iter().any(|l| {
            !matches!(
                l.vv().compare(&known),
                Causality::DominatedBy | Causality::Equal
            )
        });
        if news {
            // Only news moves the clock: a duplicate must leave no trace.
            let max_hlc = self
                .leaves(s, leaves)
                .iter()
                .map(|l| l.1.hlc)
                .max()
                .unwrap_or_default();
            s.regions[to].hlc = Hlc::observe(s.regions[to].hlc, max_hlc, NOW_MS);
        }
        let mut next = Row {
            leaves: self.frontier(s, row.leaves | leaves),
            ..row.clone()
        };
        match self.join(s, leaves).compare(&self.join(s, row.applied)) {
            Causality::Dominates => {
                next = Row {
                    applied: leaves,
                    value: value.clone(),
                    by_fallback: false,
                    ..next
                };
                if news {
                    s.book.seen |= seen::PRESTAGED;
                }
            }
            Causality::Concurrent if self.setup.flaw == Some(Flaw::AdoptUndominated) => {
                next = Row {
                    applied: leaves,
                    value: value.clone(),
                    by_fallback: false,
                    ..next
                };
            }
            Causality::Equal => {
                if row.by_fallback {
                    s.book.seen |= seen::LATE_RESOLUTION;
                }
                if row.value != value {
                    s.book.seen |= seen::DISAGREED;
                }
            }
            _ => {}
        }
        s.regions[to].rows[key] = next;
        s.net.insert(Msg::Ack {
            host: host as u8,
            key: key as u8,
            leaves,
            from: to as u8,
        });
    }

    /// A region resolves its row's conflict itself: as the key's owner, or
    /// as a fallback when the owner is cut off.
    fn resolve_row(&self, s: &mut State, region: usize, key: usize, fallback: bool) {
        let row = s.regions[region].rows[key].clone();
        if !row.pending() {
            return self.publish(s, region, key, row.leaves, row.value);
        }
        let mut calls = 0;
        let value = if fallback && self.setup.flaw == Some(Flaw::PairwiseFallback) {
            self.resolve_local_first(s, &row, &mut calls)
        } else {
            self.resolve(s, row.leaves, &mut calls)
        };
        s.book.merge_calls += calls;
        Self::book_resolution(s, key as u8, row.leaves, &value);
        s.regions[region].rows[key] = Row {
            applied: row.leaves,
            value: value.clone(),
            by_fallback: fallback,
            ..row
        };
        if fallback {
            s.book.seen |= seen::FALLBACK;
        } else {
            self.publish(s, region, key, row.leaves, value);
        }
    }

    /// The owner logs a resolution durably, then pre-stages it everywhere.
    /// Sending to every region in this step loses no interleaving: each call
    /// is delivered whenever, and a crash before some were sent is the same
    /// as a crash that drops them in flight.
    fn publish(&self, s: &mut State, host: usize, key: usize, leaves: Mask, value: Value) {
        let (h, k) = (host as u8, key as u8);
        s.regions[host].resolutions.insert((k, leaves), value);
        for to in (0..self.setup.regions as u8).filter(|&t| t != h) {
            s.regions[host].unacked.insert((k, leaves, to));
            s.net.insert(Msg::Prestage {
                host: h,
                key: k,
                leaves,
                to,
            });
        }
    }

    /// Pre-stage calls and their replies travel on the sidecars' own
    /// connections, which die with either end.
    fn on_connection_of(m: &Msg, region: u8) -> bool {
        match *m {
            Msg::Prestage { host, to, .. } => host == region || to == region,
            Msg::Ack { host, from, .. } => host == region || from == region,
            Msg::Intent { .. } | Msg::ShadowSet { .. } => false,
        }
    }

    /// A crash is only explored where it loses something: with nothing in
    /// memory and nothing in flight, a restart changes nothing that
    /// duplicate deliveries do not already cover.
    fn crash_loses_something(s: &State, region: usize) -> bool {
        !s.regions[region].unacked.is_empty()
            || s.net
                .iter()
                .any(|m| Self::on_connection_of(m, region as u8))
    }

    fn crash(&self, s: &mut State, region: usize) {
        s.crashes_left -= 1;
        let r = region as u8;
        s.net.retain(|m| !Self::on_connection_of(m, r));
        // Restart: every logged resolution is delivered again (duplicates
        // are harmless), since which ones were acknowledged was in memory.
        let others: Vec<u8> = (0..self.setup.regions as u8).filter(|&t| t != r).collect();
        let region = &mut s.regions[region];
        region.unacked.clear();
        if self.setup.flaw != Some(Flaw::ForgetUnackedOnRestart) {
            for &(key, leaves) in region.resolutions.keys() {
                region
                    .unacked
                    .extend(others.iter().map(|&t| (key, leaves, t)));
            }
        }
    }

    /// Every always-property's evidence that needs the step itself: a row
    /// whose version went down or sideways was overwritten by an older one.
    fn book_regressions(&self, before: &State, after: &mut State) {
        for (r, region) in after.regions.iter().enumerate() {
            for (k, row) in region.rows.iter().enumerate() {
                let was = before.regions[r].rows[k].applied;
                if row.applied != was
                    && matches!(
                        self.join(after, row.applied)
                            .compare(&self.join(before, was)),
                        Causality::DominatedBy | Causality::Concurrent
                    )
                {
                    after.book.seen |= seen::REGRESSED;
                }
            }
        }
    }

    /// No protocol step changes anything: what every property "after
    /// quiescence" is about. Clients could still write.
    pub fn quiescent(&self, s: &State) -> bool {
        // Shortcuts for steps that always change something: an intent next
        // in its origin's order, and the owner's and the fallback's steps.
        let next_intent = s.net.iter().any(|m| match *m {
            Msg::Intent { write } => {
                (0..self.setup.regions).any(|r| Self::next_in_order(s, r, write as usize))
            }
            _ => false,
        });
        let resolvable = (0..self.setup.regions).any(|r| {
            (0..self.setup.keys)
                .any(|k| self.resolution_enabled(s, r, k) || self.fallback_enabled(s, r, k))
        });
        if next_intent || resolvable {
            return false;
        }
        let mut actions = Vec::new();
        self.actions(s, &mut actions);
        actions
            .into_iter()
            .filter(Action::is_protocol)
            .all(|a| self.next_state(s, a).is_none())
    }

    /// Every primary holds the same rows, no conflict is open, and every
    /// write has reached every row.
    pub fn converged(&self, s: &State) -> bool {
        (0..self.setup.keys).all(|k| {
            let first = &s.regions[0].rows[k];
            let all_writes = self.join(
                s,
                s.writes
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.key as usize == k)
                    .fold(0, |m, (i, _)| m | bit(i)),
            );
            s.regions.iter().all(|r| {
                let row = &r.rows[k];
                (row.leaves, row.applied, &row.value) == (first.leaves, first.applied, &first.value)
                    && !row.pending()
            }) && self.join(s, first.applied) == all_writes
        })
    }

    /// Every row shows exactly the writes its version has seen, computed
    /// here from the history rather than by the strategies: no write lost,
    /// none applied twice, counters are the sum of their increments.
    pub fn reflects_history(&self, s: &State) -> bool {
        s.regions.iter().all(|region| {
            region.rows.iter().enumerate().all(|(k, row)| {
                let version = self.join(s, row.applied);
                let seen: Vec<(usize, &Write)> = s
                    .writes
                    .iter()
                    .enumerate()
                    .map(|(i, w)| (i, &**w))
                    .filter(|(_, w)| {
                        w.key as usize == k
                            && matches!(
                                w.vv.compare(&version),
                                Causality::DominatedBy | Causality::Equal
                            )
                    })
                    .collect();
                let latest: Vec<&Write> = seen
                    .iter()
                    .filter(|(_, w)| {
                        !seen
                            .iter()
                            .any(|(_, o)| o.vv.compare(&w.vv) == Causality::Dominates)
                    })
                    .map(|(_, w)| *w)
                    .collect();
                match (&row.value, self.setup.strategy) {
                    (Value::Row(items), Strategy::Merge) => {
                        let mut items = items.clone().unwrap_or_default();
                        items.sort();
                        items == seen.iter().map(|(i, _)| *i as u8).collect::<Vec<_>>()
                    }
                    (Value::Counter(c), _) => {
                        c.total() == seen.iter().map(|(_, w)| w.delta).sum::<i64>()
                    }
                    (Value::Siblings(rows), _) => {
                        let mut rows = rows.clone();
                        let mut want: Vec<_> = latest.iter().map(|w| w.row.clone()).collect();
                        rows.sort();
                        want.sort();
                        rows == want
                    }
                    (Value::Row(row), _) => {
                        *row == latest
                            .iter()
                            .max_by(|a, b| a.stamp().cmp(&b.stamp()))
                            .and_then(|w| w.row.clone())
                    }
                }
            })
        })
    }

    /// While no owner has been cut off and the shadow set has not changed
    /// (crashes allowed), no primary falls back and each conflict is resolved
    /// exactly once, so the merge function runs once per extra leaf of each
    /// conflict, not once per region.
    pub fn resolved_once(&self, s: &State) -> bool {
        if s.cut_used || s.set_changed {
            return true;
        }
        let expected: u32 = match self.setup.strategy {
            Strategy::Merge => s
                .book
                .resolved
                .keys()
                .map(|(_, m)| m.count_ones() - 1)
                .sum(),
            _ => 0,
        };
        s.book.seen & seen::FALLBACK == 0
            && s.book.resolved.values().all(|(n, _)| *n == 1)
            && u32::from(s.book.merge_calls) == expected
    }

    fn candidate_actions(&self, s: &State, actions: &mut Vec<Action>) {
        let (regions, keys) = (self.setup.regions as u8, self.setup.keys as u8);
        if s.writes.len() < self.setup.writes {
            for region in 0..regions {
                for key in 0..keys {
                    actions.push(Action::Write {
                        region,
                        key,
                        delete: false,
                    });
                    if self.setup.deletes {
                        actions.push(Action::Write {
                            region,
                            key,
                            delete: true,
                        });
                    }
                }
            }
        }
        for msg in &s.net {
            let deliver = |to| Action::Deliver {
                msg: msg.clone(),
                to,
            };
            match *msg {
                Msg::Intent { write } => actions.extend(
                    (0..regions)
                        .filter(|&r| r != s.writes[write as usize].origin)
                        .map(deliver),
                ),
                Msg::ShadowSet { .. } => actions.extend((0..regions).map(deliver)),
                Msg::Prestage { host, to, .. } if s.cut != Some(host) => actions.push(deliver(to)),
                Msg::Ack { host, .. } if s.cut != Some(host) => actions.push(deliver(host)),
                _ => {}
            }
        }
        for r in 0..self.setup.regions {
            for k in 0..self.setup.keys {
                let (region, key) = (r as u8, k as u8);
                if self.resolution_enabled(s, r, k) {
                    actions.push(Action::Resolve { host: region, key });
                }
                if self.fallback_enabled(s, r, k) {
                    actions.push(Action::Fallback { region, key });
                }
            }
            for &(key, leaves, to) in &s.regions[r].unacked {
                if !s.net.contains(&Msg::Prestage {
                    host: r as u8,
                    key,
                    leaves,
                    to,
                }) {
                    actions.push(Action::Send {
                        host: r as u8,
                        key,
                        leaves,
                        to,
                    });
                }
            }
        }
        if s.crashes_left > 0 {
            let lossy = (0..regions).filter(|&r| Self::crash_loses_something(s, r as usize));
            actions.extend(lossy.map(|region| Action::Crash { region }));
        }
        if self.setup.cut && !s.cut_used && self.setup.mode == Mode::Shadow {
            actions.extend(
                self.shadow_hosts()
                    .into_iter()
                    .map(|host| Action::Cut { host }),
            );
        }
        if s.cut.is_some() {
            actions.push(Action::Heal);
        }
        if self.setup.shadows_after.is_some() && !s.set_changed && self.setup.mode == Mode::Shadow {
            actions.push(Action::ChangeShadowSet);
        }
    }
}

impl Model for ShadowModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let row = Row {
            leaves: 0,
            applied: 0,
            value: self.empty_value(),
            by_fallback: false,
        };
        let region = Region {
            hlc: Hlc::ZERO,
            progress: vec![0; self.setup.regions],
            epoch: 0,
            rows: vec![row; self.setup.keys],
            resolutions: BTreeMap::new(),
            unacked: BTreeSet::new(),
        };
        vec![State {
            writes: Vec::new(),
            regions: vec![region; self.setup.regions],
            net: BTreeSet::new(),
            cut: None,
            crashes_left: self.setup.crashes,
            cut_used: false,
            set_changed: false,
            book: Book::default(),
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        self.candidate_actions(s, actions);
        if self.only_effective_actions {
            actions.retain(|a| self.next_state(s, a.clone()).is_some());
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        // Deliveries that change nothing, recognised before the state is
        // cloned: most actions in a state with duplicates are these.
        match action {
            Action::Deliver {
                msg: Msg::Intent { write },
                to,
            } if !Self::next_in_order(last, to as usize, write as usize) => {
                return None;
            }
            Action::Deliver {
                msg: Msg::ShadowSet { epoch },
                to,
            } if last.regions[to as usize].epoch >= epoch => return None,
            Action::Deliver {
                msg: Msg::Ack {
                    key, leaves, from, ..
                },
                to,
            } if !last.regions[to as usize]
                .unacked
                .contains(&(key, leaves, from)) =>
            {
                return None;
            }
            _ => {}
        }
        let mut s = last.clone();
        match action {
            Action::Write {
                region,
                key,
                delete,
            } => self.write(&mut s, region as usize, key as usize, delete),
            Action::Deliver { msg, to } => {
                let to = to as usize;
                match msg {
                    Msg::Intent { write } => self.apply_intent(&mut s, to, write as usize),
                    Msg::ShadowSet { epoch } => s.regions[to].epoch = epoch,
                    Msg::Prestage {
                        host, key, leaves, ..
                    } => self.prestage(&mut s, host as usize, key as usize, leaves, to),
                    Msg::Ack {
                        key, leaves, from, ..
                    } => {
                        s.regions[to].unacked.remove(&(key, leaves, from));
                    }
                }
            }
            Action::Resolve { host, key } => {
                self.resolve_row(&mut s, host as usize, key as usize, false)
            }
            Action::Send {
                host,
                key,
                leaves,
                to,
            } => {
                s.net.insert(Msg::Prestage {
                    host,
                    key,
                    leaves,
                    to,
                });
            }
            Action::Fallback { region, key } => {
                self.resolve_row(&mut s, region as usize, key as usize, true)
            }
            Action::Crash { region } => {
                s.book.seen |= seen::CRASH;
                self.crash(&mut s, region as usize)
            }
            Action::Cut { host } => {
                s.cut = Some(host);
                s.cut_used = true;
            }
            Action::Heal => s.cut = None,
            Action::ChangeShadowSet => {
                s.set_changed = true;
                if s.regions.iter().any(|r| r.rows.iter().any(Row::pending)) {
                    s.book.seen |= seen::CHANGE_IN_FLIGHT;
                }
                s.net.insert(Msg::ShadowSet { epoch: 1 });
            }
        }
        self.book_regressions(last, &mut s);
        (s != *last).then_some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut p = vec![
            Property::always("converged at quiescence", |m: &Self, s: &State| {
                !m.quiescent(s) || m.converged(s)
            }),
            Property::always(
                "rows reflect exactly the writes they have seen",
                |m: &Self, s: &State| m.reflects_history(s),
            ),
            Property::always(
                "no row is overwritten by an older version",
                |_, s: &State| s.book.seen & seen::REGRESSED == 0,
            ),
            Property::always("one result per conflict", |_, s: &State| {
                s.book.seen & seen::DISAGREED == 0
            }),
            Property::always(
                "resolved once while the owner is reachable",
                |m: &Self, s: &State| m.resolved_once(s),
            ),
            Property::sometimes("a conflict is detected", |_, s: &State| {
                s.book.seen & seen::CONFLICT != 0
            }),
        ];
        if self.setup.mode == Mode::Shadow {
            p.push(Property::sometimes(
                "a pre-staged resolution is used",
                |_, s: &State| s.book.seen & seen::PRESTAGED != 0,
            ));
        }
        if self.setup.cut || self.setup.mode == Mode::NoShadow {
            p.push(Property::sometimes(
                "a primary falls back",
                |_, s: &State| s.book.seen & seen::FALLBACK != 0,
            ));
        }
        if self.setup.cut && self.setup.mode == Mode::Shadow {
            p.push(Property::sometimes(
                "a late resolution reaches a primary that fell back",
                |_, s: &State| s.book.seen & seen::LATE_RESOLUTION != 0,
            ));
        }
        if self.setup.shadows_after.is_some() && self.setup.mode == Mode::Shadow {
            p.push(Property::sometimes(
                "the shadow set changes while a conflict is in flight",
                |_, s: &State| s.book.seen & seen::CHANGE_IN_FLIGHT != 0,
            ));
        }
        if self.setup.regions > 2 {
            p.push(Property::sometimes(
                "three concurrent writes are resolved",
                |_, s: &State| s.book.seen & seen::THREE_WAY != 0,
            ));
        }
        if self.setup.crashes > 0 && self.setup.mode == Mode::Shadow {
            p.push(Property::sometimes(
                "a crash loses pre-stages in flight",
                |_, s: &State| s.book.seen & seen::CRASH != 0,
            ));
        }
        p
    }
}
