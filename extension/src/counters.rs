//! Counter columns of a row's version (`row_versions.counters`, JSON of
//! column → the model's `strategy::counter::Counter`): every region's
//! increments counted, and those resets erased. Capture counts the local
//! write's increment, apply the peer's; a delete, or an insert of a row
//! that was not there, also erases what its writer had counted, and its
//! intent carries that (`Intent::erases`) so every region erases the same.
//! The column's value is always the counter's value, so every region that
//! has applied the same writes holds the same number, in whatever order
//! they arrived.

use crate::errors::raise;
use foreshadow_model::strategy::counter::{Amount, Counter, Part, Tally};
use foreshadow_model::{Intent, Op, VersionVector};
use pgrx::prelude::*;
use pgrx::AnyNumeric;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::collections::BTreeMap;

/// An exact number as text: integers in Rust, anything else in numeric.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Exact(pub String);

impl Default for Exact {
    fn default() -> Self {
        Exact("0".into())
    }
}

impl Amount for Exact {
    fn plus(&self, other: &Self) -> Self {
        Exact(arithmetic(&self.0, &other.0, false))
    }
    fn minus(&self, other: &Self) -> Self {
        Exact(difference(&self.0, &other.0))
    }
}

/// `a - b`, exactly: a counter write's increment.
pub fn difference(a: &str, b: &str) -> String {
    arithmetic(a, b, true)
}

fn arithmetic(a: &str, b: &str, subtract: bool) -> String {
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) if subtract => (x - y).to_string(),
        (Ok(x), Ok(y)) => (x + y).to_string(),
        _ => {
            let parse = |s: &str| {
                AnyNumeric::try_from(s).unwrap_or_else(|e| {
                    raise(
                        PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
                        format!("counter value {s:?} is not a number: {e}"),
                        "Counter columns hold numbers.",
                    )
                })
            };
            let (x, y) = (parse(a), parse(b));
            if subtract { x - y } else { x + y }.to_string()
        }
    }
}

/// A row's counter columns, by column name.
#[derive(Default)]
pub struct Counters(BTreeMap<String, Counter<Exact>>);

impl Counters {
    /// As stored in `row_versions.counters` (NULL: nothing counted yet).
    pub fn parse(stored: Option<&str>) -> Counters {
        Counters(
            stored
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default(),
        )
    }

    pub fn to_stored(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| serde_json::to_string(&self.0).expect("counters serialise"))
    }

    /// A column that has a value here (`current`) but nothing counted: it
    /// was counted before it became a counter (set_column_strategy on a
    /// table with rows). Its value then is the starting point, as a part of
    /// its own ("" is no region's name), the same in every region that
    /// starts from the same value.
    pub fn start_from(&mut self, columns: &[String], current: impl Fn(&str) -> Option<String>) {
        for c in columns {
            if self.0.contains_key(c) {
                continue;
            }
            if let Some(value) = current(c) {
                let mut counter = Counter::default();
                counter.count("", 1, &Exact(value));
                self.0.insert(c.clone(), counter);
            }
        }
    }

    /// A local write by `region` whose version is `vv`: counts its
    /// increments (`delta`); a reset (delete, insert) first erases what was
    /// counted here. Returns what the intent carries for the reset.
    pub fn local_write(
        &mut self,
        region: &str,
        vv: &VersionVector,
        op: Op,
        delta: Option<&Map<String, Value>>,
    ) -> Option<BTreeMap<String, Tally<Number>>> {
        let erases = (op != Op::Update).then(|| self.reset_here()).flatten();
        self.count(region, vv, delta);
        erases
    }

    /// Applies a peer's write: erases what its reset had counted, counts
    /// its increments.
    pub fn apply(&mut self, i: &Intent) {
        for (c, seen) in i.erases.iter().flatten() {
            let seen = Tally(
                seen.0
                    .iter()
                    .map(|(r, p)| {
                        let part = Part {
                            writes: p.writes,
                            sum: Exact(p.sum.to_string()),
                        };
                        (r.clone(), part)
                    })
                    .collect(),
            );
            self.0.entry(c.clone()).or_default().erase(&seen);
        }
        self.count(&i.origin, &i.vv, i.delta.as_ref());
    }

    /// Counts a write's increments at its region's number for it; a
    /// replayed dead letter's also when later writes of its region were
    /// counted (`Counter::count_late`).
    fn count(&mut self, region: &str, vv: &VersionVector, delta: Option<&Map<String, Value>>) {
        let late = crate::dead_letters::replaying();
        for (c, d) in delta.into_iter().flatten() {
            let (d, counter) = (Exact(d.to_string()), self.0.entry(c.clone()).or_default());
            if late {
                counter.count_late(region, vv.get(region), &d);
            } else {
                counter.count(region, vv.get(region), &d);
            }
        }
    }

    /// Erases everything counted here; returns it, for the intent.
    fn reset_here(&mut self) -> Option<BTreeMap<String, Tally<Number>>> {
        let mut erases = BTreeMap::new();
        for (c, counter) in &mut self.0 {
            let counted = counter.counted.clone();
            counter.erase(&counted);
            // NaN and infinities (numeric) are no JSON number: not sent.
            let wire = counted.0.into_iter().filter_map(|(r, p)| {
                let sum = serde_json::from_str(&p.sum.0).ok()?;
                Some((
                    r,
                    Part {
                        writes: p.writes,
                        sum,
                    },
                ))
            });
            erases.insert(c.clone(), Tally(wire.collect()));
        }
        erases.retain(|_, t| !t.0.is_empty());
        (!erases.is_empty()).then_some(erases)
    }

    /// The counter columns' values, to write into the user's row.
    pub fn values(&self, columns: &[String]) -> Map<String, Value> {
        columns
            .iter()
            .map(|c| {
                let v = self.0.get(c).map_or_else(Exact::default, Counter::value);
                (c.clone(), Value::String(v.0))
            })
            .collect()
    }
}
