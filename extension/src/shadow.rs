//! Merge and vv tables on a primary, by the rules of docs/shadow-protocol.md:
//! R2 (apply a peer's write to the row's leaves), R3 (resolve a conflict
//! once, here, when this region hosts the key's owner, and publish the
//! resolution), R4 (adopt a resolution another region published: the
//! pre-stage) and R5 (resolve it here after `foreshadow.shadow_deadline`,
//! `resolve_overdue`). R1 is in capture.
//!
//! A resolution travels as an intent that carries the leaves it resolves
//! (`Intent::resolves`), on the resolving region's stream to every other
//! region, in the transaction that resolved it: it is delivered at least
//! once, in order, and sent again after any crash until each peer's
//! progress covers it (the slot keeps it), which is what the protocol
//! asks of the owner's resolution log and its re-sends (R3, R6).

use crate::apply::{decide, Outcome, RowState, Target};
use crate::catalog::Table;
use crate::conflicts::{self, Conflict};
use crate::heap::{Heap, Values};
use crate::leaves;
use crate::row_versions::{Found, Store, Version};
use foreshadow_model::intent::WIRE_VERSION;
use foreshadow_model::ownership::{key_bytes, owner};
use foreshadow_model::strategy::{self, leaf::Leaf};
use foreshadow_model::{Causality, Intent, IntentClass, Op, Strategy};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::{Map, Value};

type Row = Map<String, Value>;

/// A row of a merge table, found (and locked) for a decision.
#[derive(Clone, Copy)]
struct At<'a> {
    t: &'a Table,
    heap: &'a Heap,
    store: &'a Store,
    state: RowState,
    key: &'a Values,
    key_text: &'a str,
    key_map: &'a Row,
}

/// Who resolves the conflicts of row `key` of `t` here: `local` with no
/// shadows (every primary, on arrival; always for vv, whose resolution,
/// the siblings, needs no function), `shadow` when this region hosts the
/// key's owner; None when another region does (wait for it).
fn resolver(t: &Table, key: &Row) -> Option<&'static str> {
    if t.shadows.is_empty() || t.strategy == Some(Strategy::Vv) {
        return Some("local");
    }
    (resolver_of(t, key) == Some(crate::gucs::region().as_str())).then_some("shadow")
}

/// The leaves of the row whose version is `here`: the ones it keeps, or
/// the one write it is (with the row's image here, none if deleted).
fn leaves_of(heap: &Heap, here: Option<&Version>, row: RowState) -> Vec<Leaf> {
    let Some(v) = here else {
        return Vec::new();
    };
    if let Some(text) = &v.leaves {
        return leaves::parse(text);
    }
    let image = match row {
        RowState::Locked(local) if !v.deleted => Some(heap.row_of(local)),
        _ => None,
    };
    vec![Leaf {
        vv: v.vv.clone(),
        hlc: v.hlc,
        origin: v.origin.clone(),
        row: image,
    }]
}

/// Makes the row `image` (None: deleted); whether it changed.
fn put_row(at: At<'_>, image: Option<&Row>) -> bool {
    let heap = at.heap;
    let local = match at.state {
        RowState::Locked(local) => Some(local),
        RowState::Inserted => heap.find(at.key),
        RowState::Absent => None,
    };
    match (image, local) {
        (Some(image), Some(local)) => heap.update(local, &heap.values(image)),
        (Some(image), None) => {
            let mut v = heap.values(image);
            heap.fill_defaults(&mut v);
            heap.insert(&v);
        }
        (None, Some(local)) => heap.delete(local),
        (None, None) => return false,
    }
    true
}

/// What a resolution made of a row.
struct Resolved {
    calls: i32,
    outcome: &'static str,
}

/// Resolves `leaves` (two or more, canonical order) by the table's
/// strategy and makes the result the row, its version their join;
/// `publish`: sends it to every other region (R3, R5). Merge: the merge
/// function folded over them. Vv: they stay as siblings, the canonical
/// winner (the highest stamp) in the table.
fn resolve(
    client: &mut SpiClient<'_>,
    at: At<'_>,
    cur: Option<&Found>,
    leaves: &[Leaf],
    publish: bool,
) -> Resolved {
    let r = match at.t.strategy {
        Some(Strategy::Vv) => crate::merge::Resolution {
            row: strategy::siblings(leaves)
                .last()
                .and_then(|l| l.row.clone()),
            calls: 0,
            failure: None,
        },
        _ => crate::merge::resolve(client, at.heap, at.t, at.key_map, leaves),
    };
    put_row(at, r.row.as_ref());
    let last = leaves.last().expect("two leaves or more");
    let version = Version {
        hlc: last.hlc,
        origin: last.origin.clone(),
        vv: strategy::join(leaves),
        deleted: r.row.is_none(),
        leaves: leaves::stored(leaves),
        // Counter columns are refused on merge and vv tables.
        counters: None,
    };
    at.store.write(cur, at.t.relid, at.key_text, &version);
    if at.t.strategy == Some(Strategy::Merge) {
        // Closed, its leaves kept (vv: siblings, not to be forgotten).
        crate::settled::note(client, at.t.relid, at.key_text, &version.vv);
    }
    if publish {
        crate::capture::emit(&Intent {
            v: WIRE_VERSION,
            origin: crate::gucs::region(),
            hlc: last.hlc,
            schema: at.t.schema.clone(),
            table: at.t.name.clone(),
            op: if r.row.is_some() {
                Op::Update
            } else {
                Op::Delete
            },
            key: at.key_map.clone(),
            row: r.row.clone(),
            vv: version.vv,
            delta: None,
            erases: None,
            strategy: Strategy::Merge.name().into(),
            class: IntentClass::Data,
            resolves: Some(leaves.to_vec()),
            shadow_set: None,
            stability: None,
        });
    }
    Resolved {
        calls: r.calls,
        outcome: match (at.t.strategy, &r.failure) {
            (Some(Strategy::Vv), _) => "siblings kept",
            (_, Some(_)) => "merge failed: last writer wins",
            _ => "merged",
        },
    }
}

/// The conflict entries `i` makes on a row whose version was `here`:
/// given who resolved it (None: open), the outcome and the merge calls.
fn conflict_of<'a>(
    i: &'a Intent,
    here: Option<&'a Version>,
    state: RowState,
    concurrent: bool,
) -> impl Fn(Option<&'static str>, &'static str, i32) -> Conflict + 'a {
    let existed = matches!(state, RowState::Locked(_));
    let kind = conflicts::kind(i.op, here, existed, concurrent).unwrap_or("update_origin_differs");
    move |resolved_by, outcome, merge_calls| Conflict {
        kind,
        local: here.cloned(),
        outcome,
        merge_calls,
        resolved_by,
    }
}

/// Applies a peer's write, or a resolution a peer published, to a row of
/// a merge table. Records its conflicts itself.
pub fn apply(client: &mut SpiClient<'_>, x: Target<'_>, cur: Option<Found>) -> Outcome {
    // A resolution's version is the join of its leaves (intent.rs).
    let cur = crate::settled::forgotten_by(client, x.store, x.t, x.key_text, &x.i.vv, cur);
    let at = At {
        t: x.t,
        heap: x.heap,
        store: x.store,
        state: x.row,
        key: x.key,
        key_text: x.key_text,
        key_map: &x.i.key,
    };
    match &x.i.resolves {
        Some(resolution) => adopt(client, x, at, cur, resolution),
        None => apply_write(client, x, at, cur),
    }
}

/// R2: a write already known is skipped (a duplicate, superseded, or
/// pre-staged: applied as that resolution); one that has seen every leaf
/// replaces the row; a concurrent one joins the leaves and opens a
/// conflict, resolved here at once if this region resolves the key, else
/// left open for the owner (the row takes the write only if the write
/// has seen the row's version).
fn apply_write(
    client: &mut SpiClient<'_>,
    x: Target<'_>,
    at: At<'_>,
    cur: Option<Found>,
) -> Outcome {
    let i = x.i;
    let here = cur.as_ref().map(|f| &f.version);
    let mut leaves = leaves_of(at.heap, here, at.state);
    let known = matches!(
        i.vv.compare(&strategy::join(&leaves)),
        Causality::DominatedBy | Causality::Equal
    );
    if here.is_some() && known {
        return Outcome::default();
    }
    let was_open = here.is_some_and(|h| leaves::open(&leaves, &h.vv));
    leaves.push(Leaf::from(i));
    let leaves = strategy::frontier(leaves);
    if leaves.len() == 1 {
        // The version decide writes: this write's, joined with the one here.
        let mut vv = i.vv.clone();
        if let Some(h) = here {
            vv.merge(&h.vv);
        }
        let o = decide(x, cur);
        if o.changed && i.op == Op::Delete {
            crate::settled::note(client, at.t.relid, at.key_text, &vv);
        }
        if was_open {
            conflicts::close(client, at.t.relid, at.key_text, "local", SUPERSEDED, 0);
        }
        if let Some(c) = &o.conflict {
            conflicts::record(client, x.heaps, at.t, i, at.key_text, c);
        }
        return o;
    }
    let concurrent = here.is_some_and(|h| h.vv.compare(&i.vv) == Causality::Concurrent);
    let conflict = conflict_of(i, here, at.state, concurrent);
    if let Some(by) = resolver(at.t, at.key_map) {
        let r = resolve(client, at, cur.as_ref(), &leaves, by == "shadow");
        let c = conflict(Some(by), r.outcome, r.calls);
        // An entry is open here only if a leaf was (after a shadow-set
        // change): otherwise no query to close one.
        if !(was_open && conflicts::close(client, at.t.relid, at.key_text, by, r.outcome, r.calls))
        {
            conflicts::record(client, x.heaps, at.t, i, at.key_text, &c);
        }
        return Outcome {
            changed: true,
            conflict: Some(c),
        };
    }
    // Wait for the owner's resolution (or the deadline).
    let takes_it = here.is_none_or(|h| i.vv.compare(&h.vv) == Causality::Dominates);
    let version = match here {
        Some(h) if !takes_it => Version {
            leaves: leaves::stored(&leaves),
            ..h.clone()
        },
        _ => Version {
            hlc: i.hlc,
            origin: i.origin.clone(),
            vv: i.vv.clone(),
            deleted: i.op == Op::Delete,
            leaves: leaves::stored(&leaves),
            counters: None,
        },
    };
    let changed = takes_it && put_row(at, i.row.as_ref());
    at.store
        .write(cur.as_ref(), at.t.relid, at.key_text, &version);
    let c = conflict(None, "", 0);
    if !was_open {
        conflicts::record(client, x.heaps, at.t, i, at.key_text, &c);
    }
    Outcome {
        changed,
        conflict: (!was_open).then_some(c),
    }
}

/// R4: a resolution another region published. Its leaves join the row's
/// (so their own intents, when they come, are known and skipped); the row
/// becomes the resolved row if the resolution has seen the row's version,
/// stays if it is the same, and otherwise stays for the larger conflict
/// the resolution is part of.
fn adopt(
    client: &mut SpiClient<'_>,
    x: Target<'_>,
    at: At<'_>,
    cur: Option<Found>,
    resolution: &[Leaf],
) -> Outcome {
    let i = x.i;
    let here = cur.as_ref().map(|f| &f.version);
    let mut all = leaves_of(at.heap, here, at.state);
    let was_open = here.is_some_and(|h| leaves::open(&all, &h.vv));
    all.extend(resolution.iter().cloned());
    let all = strategy::frontier(all);
    for l in resolution {
        crate::clock::admit(l.hlc);
        crate::clock::observe(l.hlc);
    }
    let relation = here.map_or(Causality::Dominates, |h| i.vv.compare(&h.vv));
    let changed = relation == Causality::Dominates;
    let version = match here {
        Some(h) if !changed => Version {
            leaves: leaves::stored(&all),
            ..h.clone()
        },
        _ => {
            let last = resolution.last().expect("a resolution has leaves");
            Version {
                hlc: last.hlc,
                origin: last.origin.clone(),
                vv: i.vv.clone(),
                deleted: i.row.is_none(),
                leaves: leaves::stored(&all),
                counters: None,
            }
        }
    };
    let still_open = leaves::open(&all, &version.vv);
    let conflict = conflict_of(i, here, at.state, true);
    if still_open && resolver(at.t, at.key_map) == Some("shadow") {
        // R3: the resolution made this region, the key's owner, learn of
        // a larger conflict: resolve it now.
        let r = resolve(client, at, cur.as_ref(), &all, true);
        let c = conflict(Some("shadow"), r.outcome, r.calls);
        if !conflicts::close(
            client,
            at.t.relid,
            at.key_text,
            "shadow",
            r.outcome,
            r.calls,
        ) {
            conflicts::record(client, x.heaps, at.t, i, at.key_text, &c);
        }
        return Outcome {
            changed: true,
            conflict: Some(c),
        };
    }
    if changed {
        put_row(at, i.row.as_ref());
    }
    at.store
        .write(cur.as_ref(), at.t.relid, at.key_text, &version);
    if still_open {
        // Still waiting, for a larger conflict: its deadline runs from now
        // if none was running.
        let c = conflict(None, "", 0);
        if !was_open {
            conflicts::record(client, x.heaps, at.t, i, at.key_text, &c);
        }
        return Outcome {
            changed,
            conflict: (!was_open).then_some(c),
        };
    }
    if version.leaves.is_some() || version.deleted {
        crate::settled::note(client, at.t.relid, at.key_text, &version.vv);
    }
    // From the key's owner, or a region that fell back.
    let by = if resolver_of(at.t, at.key_map) == Some(i.origin.as_str()) {
        "shadow"
    } else {
        "fallback"
    };
    let outcome = if changed { "pre-staged" } else { SUPERSEDED };
    if was_open && conflicts::close(client, at.t.relid, at.key_text, by, outcome, 0) {
        return Outcome {
            changed,
            conflict: None,
        };
    }
    if !changed {
        return Outcome::default();
    }
    // No conflict was open here: the resolution came before (some of) the
    // writes it resolves.
    let c = conflict(Some(by), "pre-staged before its writes arrived", 0);
    conflicts::record(client, x.heaps, at.t, i, at.key_text, &c);
    Outcome {
        changed,
        conflict: Some(c),
    }
}

/// The outcome of an open conflict that a later version ended: a write,
/// or a resolution, that had seen every leaf.
const SUPERSEDED: &str = "superseded by a version that saw every leaf";

/// The region hosting the owner of row `key` of `t`, if it has shadows.
fn resolver_of<'a>(t: &'a Table, key: &Row) -> Option<&'a str> {
    owner(&key_bytes(&t.schema, &t.name, key), &t.shadows).map(String::as_str)
}

/// Open conflicts, oldest first, and whether each is past the deadline
/// (from its latest entry: a conflict that grew waits afresh).
const OPEN_SQL: &str = "SELECT relid::pg_catalog.text, key, (pg_catalog.max(detected_at) OPERATOR(pg_catalog.<) \
           (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1::pg_catalog.float8 OPERATOR(pg_catalog./) 1000)))::pg_catalog.text \
     FROM foreshadow.conflict_log WHERE resolved_at IS NULL \
     GROUP BY relid, key ORDER BY pg_catalog.min(id) LIMIT 1000";

/// R5: resolves here the open conflicts that have waited past
/// `foreshadow.shadow_deadline` for their owner's resolution, with the same
/// function the owner uses, and publishes them (a late resolution of the
/// same leaves from the owner is then the same row). Also, at once, open
/// conflicts of keys this region has become the owner of (R7: a
/// shadow-set change while they waited for the old owner). The sidecar
/// calls it every few hundred milliseconds; returns how many it resolved.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn resolve_overdue() -> i64 {
    crate::canonical::applying(false);
    Spi::connect_mut(|client| {
        // A row a client holds is skipped this round, not waited for.
        crate::spi::run_kept(client, LOCK_TIMEOUT_SQL, &[], &[]);
        let deadline = crate::gucs::SHADOW_DEADLINE_MS.get();
        let due = crate::spi::run_kept(
            client,
            OPEN_SQL,
            &[pg_sys::TEXTOID],
            &[deadline.to_string().into()],
        );
        let mut resolved = 0;
        for row in due {
            let [Some(relid), Some(key_text), Some(overdue)] = &row[..] else {
                continue;
            };
            let relid = pg_sys::Oid::from(relid.parse::<u32>().unwrap_or(0));
            // Each row in a subtransaction of its own: one that cannot be
            // resolved now (a lock, a constraint the merged row breaks)
            // holds up no other.
            let one = std::panic::AssertUnwindSafe(|| {
                resolve_open(client, relid, key_text, overdue == "true")
            });
            match crate::merge::in_subtransaction(one) {
                Ok(done) => resolved += done as i64,
                Err(e) => pgrx::warning!(
                    "foreshadow: the open conflict of row {key_text} of table {relid:?} could not be resolved now: {}; it is tried again",
                    e.message
                ),
            }
        }
        resolved
    })
}

const LOCK_TIMEOUT_SQL: &str = "SELECT pg_catalog.set_config('lock_timeout', '200ms', true)";

/// Resolves the open conflict of row `key_text` of `relid` here if this
/// region is its owner, or it is `overdue`; whether it did.
fn resolve_open(
    client: &mut SpiClient<'_>,
    relid: pg_sys::Oid,
    key_text: &str,
    overdue: bool,
) -> bool {
    let (Some(t), Ok(key_map)) = (
        crate::catalog::table_by_relid(client, relid),
        serde_json::from_str::<Row>(key_text),
    ) else {
        return false;
    };
    let by = match resolver(&t, &key_map) {
        Some("shadow") => "shadow",
        _ if overdue => "fallback",
        _ => return false,
    };
    let heaps = crate::heap::Heaps::applying();
    let versions = crate::catalog::versions(client);
    let (heap, store) = (heaps.get(&t), Store::new(heaps.get(&versions)));
    let key = heap.values(&key_map);
    let state = heap.find(&key).map_or(RowState::Absent, RowState::Locked);
    let cur = store.find(t.relid, key_text);
    let here = cur.as_ref().map(|f| &f.version);
    let leaves = here
        .map(|h| leaves_of(&heap, Some(h), state))
        .unwrap_or_default();
    if !here.is_some_and(|h| leaves::open(&leaves, &h.vv)) {
        // Ended meanwhile without its entry being closed: close it.
        conflicts::close(client, relid, key_text, "local", SUPERSEDED, 0);
        return false;
    }
    let at = At {
        t: &t,
        heap: &heap,
        store: &store,
        state,
        key: &key,
        key_text,
        key_map: &key_map,
    };
    let r = resolve(client, at, cur.as_ref(), &leaves, true);
    conflicts::close(client, relid, key_text, by, r.outcome, r.calls);
    true
}
