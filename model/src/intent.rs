//! The write intent: what a region's capture trigger emits for every write to a
//! global table, and what every other region's sidecar applies.
//!
//! On the wire an intent is one JSON object, carried by a transactional
//! `pg_logical_emit_message(true, 'foreshadow', ...)`. The extension builds it
//! in SQL (`foreshadow.capture`); this module is the one place that says what
//! a well-formed intent is, so that a malformed one is refused with a reason
//! instead of being half-applied.

use crate::stability::Stability;
use crate::strategy::counter::Tally;
use crate::strategy::leaf::Leaf;
use crate::{Hlc, VersionVector};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::collections::BTreeMap;

/// The logical-decoding message prefix that marks Foreshadow intents.
pub const MESSAGE_PREFIX: &str = "foreshadow";
/// Wire format version; bumped on incompatible changes. 2: row and key
/// values are text, as the column type's output function prints it under
/// fixed settings (1 had `row_to_json`'s JSON values, which lose -0, json
/// spacing and duplicate keys, and depend on the writer's session).
pub const WIRE_VERSION: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Delete,
}

/// Metadata intents (a table's shadow set) change Foreshadow's own
/// configuration; DESIGN step 6 gives them a lane of their own, ahead of
/// data, which is not built: they travel in their origin's stream, in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntentClass {
    #[default]
    Data,
    Metadata,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    pub v: u32,
    pub origin: String,
    pub hlc: Hlc,
    pub schema: String,
    pub table: String,
    pub op: Op,
    /// Primary-key columns → values (text, as in `row`).
    pub key: Map<String, Value>,
    /// The new row image, column → text or null; `None` for deletes.
    pub row: Option<Map<String, Value>>,
    /// The row's version vector after this write.
    pub vv: VersionVector,
    /// Increments of the table's `counter` columns (column → number), which
    /// peers add to their value instead of overwriting it; `None` when the
    /// table has no counter columns or for deletes.
    #[serde(default)]
    pub delta: Option<Map<String, Value>>,
    /// Counter columns of a reset (a delete, or an insert of a row that was
    /// not there): column → the increments its writer had counted, which
    /// no longer count (`strategy::counter::Counter::erase`). `None` when
    /// the writer had counted none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erases: Option<BTreeMap<String, Tally<Number>>>,
    pub strategy: String,
    #[serde(default)]
    pub class: IntentClass,
    /// A resolution (docs/shadow-protocol.md, R3 and R5): the leaf set it
    /// resolves, sent by the region that resolved it so that every other
    /// primary adopts it (R4, pre-stage) instead of resolving again. Its
    /// `row` is the resolved row, its `vv` the join of the leaves, its
    /// stamp the highest leaf's. `None` for a write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolves: Option<Vec<Leaf>>,
    /// A metadata intent: the table's new shadow set (docs/shadow-protocol.md,
    /// R7), which every region adopts if it is later than its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_set: Option<ShadowSet>,
    /// A metadata intent: the origin's heartbeat (`stability`), for
    /// collecting tombstones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability: Option<Stability>,
}

/// A merge table's shadows as of one `set_shadows` call: `epoch` counts the
/// changes, `regions` is sorted. Sets are ordered by `(epoch, regions)`, so
/// two regions that changed the set at once both end with the same one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShadowSet {
    pub epoch: u32,
    pub regions: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IntentError {
    #[error("intent is not valid JSON of the intent shape: {0}")]
    Shape(String),
    #[error("intent wire version {0} is not supported (this build reads version {WIRE_VERSION})")]
    Version(u32),
    #[error("intent field `{0}` is empty")]
    Empty(&'static str),
    #[error("{op:?} intent {detail}")]
    RowImage { op: Op, detail: &'static str },
    #[error("intent key column `{0}` is missing from its row image or differs from it")]
    KeyMismatch(String),
    #[error("intent's version vector has no entry for its origin `{0}`")]
    NoOriginEntry(String),
    #[error("intent's counter increment for column `{0}` is not a number")]
    DeltaNotNumber(String),
    #[error("intent's erased counter tally for column `{0}` has a part of no writes")]
    ErasesNoWrites(String),
    #[error("metadata intent {0}")]
    Metadata(&'static str),
    #[error("resolution {0}")]
    Resolution(&'static str),
}

impl Intent {
    /// Parses and validates one intent as emitted by a capture trigger.
    pub fn decode(bytes: &[u8]) -> Result<Intent, IntentError> {
        let intent: Intent =
            serde_json::from_slice(bytes).map_err(|e| IntentError::Shape(e.to_string()))?;
        intent.validate()?;
        Ok(intent)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an intent always serialises")
    }

    /// A metadata intent carries a shadow set or a heartbeat, and nothing
    /// of a row.
    fn validate_metadata(&self) -> Result<(), IntentError> {
        let set = match (&self.shadow_set, &self.stability) {
            (Some(set), None) => Some(set),
            (None, Some(_)) => None,
            _ => {
                return Err(IntentError::Metadata(
                    "carries not exactly one of a shadow set and a heartbeat",
                ))
            }
        };
        if self.class != IntentClass::Metadata {
            return Err(IntentError::Metadata("is not of class metadata"));
        }
        if self.row.is_some()
            || self.delta.is_some()
            || self.erases.is_some()
            || self.resolves.is_some()
        {
            return Err(IntentError::Metadata("carries a row"));
        }
        let settled = self.stability.iter().flat_map(|s| &s.settled);
        if settled
            .into_iter()
            .any(|s| s.schema.is_empty() || s.table.is_empty() || s.key.is_empty())
        {
            return Err(IntentError::Metadata(
                "says a row has settled without naming its table and key",
            ));
        }
        if set.is_some_and(|set| !set.regions.windows(2).all(|w| w[0] < w[1])) {
            return Err(IntentError::Metadata(
                "has shadow regions not sorted or named twice",
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), IntentError> {
        if self.v != WIRE_VERSION {
            return Err(IntentError::Version(self.v));
        }
        for (name, value) in [
            ("origin", &self.origin),
            ("schema", &self.schema),
            ("table", &self.table),
            ("strategy", &self.strategy),
        ] {
            if value.is_empty() {
                return Err(IntentError::Empty(name));
            }
        }
        if self.class == IntentClass::Metadata
            || self.shadow_set.is_some()
            || self.stability.is_some()
        {
            return self.validate_metadata();
        }
        if self.key.is_empty() {
            return Err(IntentError::Empty("key"));
        }
        match &self.resolves {
            None if self.vv.get(&self.origin) == 0 => {
                return Err(IntentError::NoOriginEntry(self.origin.clone()))
            }
            Some(leaves) if leaves.len() < 2 => {
                return Err(IntentError::Resolution("resolves fewer than two leaves"))
            }
            Some(leaves) if crate::strategy::join(leaves) != self.vv => {
                return Err(IntentError::Resolution(
                    "has a version that is not the join of its leaves",
                ))
            }
            Some(leaves) if leaves.iter().map(|l| l.hlc).max() != Some(self.hlc) => {
                return Err(IntentError::Resolution(
                    "has a stamp that is not its highest leaf's",
                ))
            }
            Some(leaves) if leaves.iter().any(|l| l.vv.get(&l.origin) == 0) => {
                return Err(IntentError::Resolution(
                    "has a leaf whose version has no entry for its origin",
                ))
            }
            _ => {}
        }
        if let Some((column, _)) = self.delta.iter().flatten().find(|(_, v)| !v.is_number()) {
            return Err(IntentError::DeltaNotNumber(column.clone()));
        }
        if let Some((column, _)) = self
            .erases
            .iter()
            .flatten()
            .find(|(_, t)| t.0.values().any(|p| p.writes == 0))
        {
            return Err(IntentError::ErasesNoWrites(column.clone()));
        }
        match (&self.op, &self.row) {
            (Op::Delete, Some(_)) => Err(IntentError::RowImage {
                op: self.op,
                detail: "carries a row image",
            }),
            (Op::Insert | Op::Update, None) => Err(IntentError::RowImage {
                op: self.op,
                detail: "has no row image",
            }),
            (_, Some(row)) => match self.key.iter().find(|(k, v)| row.get(*k) != Some(*v)) {
                Some((k, _)) => Err(IntentError::KeyMismatch(k.clone())),
                None => Ok(()),
            },
            (Op::Delete, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "v": 2, "origin": "us-east", "hlc": 42, "schema": "public", "table": "accounts",
            "op": "update", "key": {"id": 7}, "row": {"id": 7, "balance": 10},
            "vv": {"us-east": 3}, "strategy": "lww", "class": "data"
        })
    }

    fn decode(v: &Value) -> Result<Intent, IntentError> {
        Intent::decode(v.to_string().as_bytes())
    }

    #[test]
    fn round_trips() {
        let i = decode(&sample()).unwrap();
        assert_eq!(i.op, Op::Update);
        assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
    }

    #[test]
    fn refuses_malformed() {
        assert!(matches!(
            Intent::decode(b"not json"),
            Err(IntentError::Shape(_))
        ));
        let mut v = sample();
        v["v"] = json!(9);
        assert_eq!(decode(&v), Err(IntentError::Version(9)));
        let mut v = sample();
        v["op"] = json!("delete");
        assert!(matches!(decode(&v), Err(IntentError::RowImage { .. })));
        let mut v = sample();
        v["row"]["id"] = json!(8);
        assert_eq!(decode(&v), Err(IntentError::KeyMismatch("id".into())));
        let mut v = sample();
        v["vv"] = json!({"eu": 1});
        assert_eq!(
            decode(&v),
            Err(IntentError::NoOriginEntry("us-east".into()))
        );
        let mut v = sample();
        v["extra"] = json!(1);
        assert!(matches!(decode(&v), Err(IntentError::Shape(_))));
        let mut v = sample();
        v["table"] = json!("");
        assert_eq!(decode(&v), Err(IntentError::Empty("table")));
        let mut v = sample();
        v["delta"] = json!({"balance": "ten"});
        assert_eq!(
            decode(&v),
            Err(IntentError::DeltaNotNumber("balance".into()))
        );
    }

    #[test]
    fn a_resolution_carries_its_leaves() {
        let leaf = |o: &str| json!({"vv": {o: 1}, "hlc": 1, "origin": o, "row": {"id": 7}});
        let mut v = sample();
        v["vv"] = json!({"eu": 1, "us": 1});
        v["hlc"] = json!(1);
        v["resolves"] = json!([leaf("eu"), leaf("us")]);
        let i = decode(&v).unwrap();
        assert_eq!(i.resolves.as_ref().map(Vec::len), Some(2));
        assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
        v["resolves"] = json!([leaf("eu")]);
        assert!(matches!(decode(&v), Err(IntentError::Resolution(_))));
        v["resolves"] = json!([leaf("eu"), leaf("ap")]);
        assert!(matches!(decode(&v), Err(IntentError::Resolution(_))));
        v["resolves"] = json!([leaf("eu"), leaf("us")]);
        v["hlc"] = json!(2);
        assert!(matches!(decode(&v), Err(IntentError::Resolution(_))));
    }

    #[test]
    fn carries_counter_increments() {
        let mut v = sample();
        v["delta"] = json!({"balance": -5});
        let i = decode(&v).unwrap();
        assert_eq!(i.delta.as_ref().unwrap()["balance"], json!(-5));
        v["delta"] = Value::Null;
        assert_eq!(decode(&v).unwrap().delta, None);
    }

    #[test]
    fn carries_a_shadow_set() {
        let mut v = sample();
        v["class"] = json!("metadata");
        v["key"] = json!({});
        v["row"] = Value::Null;
        v["shadow_set"] = json!({"epoch": 3, "regions": ["ap", "eu"]});
        let i = decode(&v).unwrap();
        assert_eq!(i.shadow_set.as_ref().unwrap().epoch, 3);
        assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
        v["shadow_set"] = json!({"epoch": 3, "regions": ["eu", "ap"]});
        assert!(matches!(decode(&v), Err(IntentError::Metadata(_))));
        v["shadow_set"] = Value::Null;
        assert!(matches!(decode(&v), Err(IntentError::Metadata(_))));
        v["class"] = json!("data");
        v["shadow_set"] = json!({"epoch": 3, "regions": []});
        assert!(matches!(decode(&v), Err(IntentError::Metadata(_))));
        v["shadow_set"] = Value::Null;
        v["class"] = json!("metadata");
        v["stability"] = json!({"below": 7, "seen": {"eu": 3}});
        assert_eq!(decode(&v).unwrap().stability.unwrap().below, Hlc(7));
        v["shadow_set"] = json!({"epoch": 3, "regions": []});
        assert!(matches!(decode(&v), Err(IntentError::Metadata(_))));
        let older = ShadowSet {
            epoch: 2,
            regions: vec!["us".into()],
        };
        let tie = ShadowSet {
            epoch: 3,
            regions: vec!["ap".into()],
        };
        assert!(
            older < tie
                && tie
                    < ShadowSet {
                        epoch: 3,
                        regions: vec!["eu".into()]
                    }
        );
    }

    #[test]
    fn carries_what_a_reset_erases() {
        let mut v = sample();
        v["op"] = json!("delete");
        v["row"] = Value::Null;
        v["erases"] = json!({"balance": {"us-east": [2, 15], "eu": [1, -3]}});
        let i = decode(&v).unwrap();
        let part = &i.erases.as_ref().unwrap()["balance"].0["us-east"];
        assert_eq!((part.writes, part.sum.as_i64()), (2, Some(15)));
        assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
        v["erases"] = json!({"balance": {"eu": [0, 4]}});
        assert_eq!(
            decode(&v),
            Err(IntentError::ErasesNoWrites("balance".into()))
        );
        v["erases"] = json!({"balance": {"eu": [1, "four"]}});
        assert!(matches!(decode(&v), Err(IntentError::Shape(_))));
    }
}
