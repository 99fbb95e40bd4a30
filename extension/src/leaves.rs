//! A row's leaves as `foreshadow.row_versions.leaves` keeps them (merge
//! tables, docs/shadow-protocol.md): the frontier of every version of the
//! row this primary knows, stored only while there is more than one. The
//! conflict is *open* while a leaf is not reflected by the row's version
//! (the join of the applied leaves): the key's owner has not resolved it
//! here yet.

use crate::errors::raise;
use foreshadow_model::strategy::{frontier, leaf::Leaf};
use foreshadow_model::{Causality, VersionVector};
use pgrx::PgSqlErrorCode;

pub fn parse(text: &str) -> Vec<Leaf> {
    serde_json::from_str(text).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("foreshadow.row_versions holds leaves that do not parse: {e}"),
            "This is a bug in Foreshadow; the peer's lane stops until it is mended.",
        )
    })
}

/// The stored form: `None` for a single leaf (a row without conflict).
pub fn stored(leaves: &[Leaf]) -> Option<String> {
    (leaves.len() > 1).then(|| serde_json::to_string(leaves).expect("leaves serialise"))
}

/// Whether a leaf is not reflected by the row's version `applied`.
pub fn open(leaves: &[Leaf], applied: &VersionVector) -> bool {
    leaves.iter().any(|l| {
        !matches!(
            l.vv.compare(applied),
            Causality::DominatedBy | Causality::Equal
        )
    })
}

/// R1: the leaves after a local write (which has seen the applied version,
/// and only it) of a row that keeps `stored` leaves.
pub fn after_local_write(stored_leaves: Option<&str>, write: Leaf) -> Option<String> {
    let mut all = parse(stored_leaves?);
    all.push(write);
    stored(&frontier(all))
}
