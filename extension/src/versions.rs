//! Version-vector and last-writer-wins rules exposed to the SQL layer, so
//! that capture and apply use the model crate's one implementation.

use crate::errors::raise;
use foreshadow_model::lww::{incoming_wins, Stamp};
use foreshadow_model::{Hlc, VersionVector};
use pgrx::prelude::*;
use pgrx::JsonB;

fn parse_vv(value: &JsonB) -> VersionVector {
    match serde_json::from_value(value.0.clone()) {
        Ok(vv) => vv,
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("not a version vector: {e}"),
            "A version vector is a JSON object of region name to a non-negative write count.",
        ),
    }
}

fn to_jsonb(vv: &VersionVector) -> JsonB {
    JsonB(serde_json::to_value(vv).expect("a version vector always serialises"))
}

/// The version vector after one more write by `region`.
#[pg_extern(immutable, strict, parallel_safe)]
fn vv_bump(vv: JsonB, region: &str) -> JsonB {
    let mut v = parse_vv(&vv);
    v.bump(region);
    to_jsonb(&v)
}

/// The pointwise maximum of two version vectors.
#[pg_extern(immutable, strict, parallel_safe)]
fn vv_merge(a: JsonB, b: JsonB) -> JsonB {
    let mut v = parse_vv(&a);
    v.merge(&parse_vv(&b));
    to_jsonb(&v)
}

/// How version `a` relates to `b`: `equal`, `dominates`, `dominated` or `concurrent`.
#[pg_extern(immutable, strict, parallel_safe)]
fn vv_compare(a: JsonB, b: JsonB) -> &'static str {
    use foreshadow_model::Causality::*;
    match parse_vv(&a).compare(&parse_vv(&b)) {
        Equal => "equal",
        Dominates => "dominates",
        DominatedBy => "dominated",
        Concurrent => "concurrent",
    }
}

/// Whether an incoming write stamped `(in_hlc, in_origin)` replaces the
/// current version `(cur_hlc, cur_origin)` under last-writer-wins; a NULL
/// current version (row never seen here) always loses.
#[pg_extern(immutable, parallel_safe)]
fn lww_wins(in_hlc: i64, in_origin: &str, cur_hlc: Option<i64>, cur_origin: Option<&str>) -> bool {
    let current = cur_hlc.zip(cur_origin).map(|(h, o)| Stamp {
        hlc: Hlc(h as u64),
        origin: o,
    });
    incoming_wins(
        Stamp {
            hlc: Hlc(in_hlc as u64),
            origin: in_origin,
        },
        current,
    )
}
