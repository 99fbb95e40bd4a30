//! The `merge` strategy: the user's function `(base, local, remote) -> row`,
//! which need not be commutative. It is folded over the conflict's leaves in
//! canonical order, so the result is a function of the *set* of concurrent
//! versions: the shadow that resolves a conflict once and a primary that
//! falls back to resolving it itself compute the same row.

use super::{frontier, Versioned};

/// Resolves a conflict among `versions` (any order, duplicates and
/// superseded versions allowed) with `merge(base, acc, next)`, where `acc`
/// starts as the first leaf's row and each further leaf comes in canonical
/// order. `merge` is called once per leaf after the first, and not at all
/// when there is no conflict.
///
/// `base` is the version every leaf descends from, when the caller knows one
/// that every resolver would pass alike (see docs/shadow-protocol.md); `None`
/// otherwise. A delete concurrent with an update loses to it, so that no
/// update is silently dropped; when every leaf is a delete the result is a
/// delete (`None`). An error from `merge` (the SQL function raised or
/// returned NULL) is returned as is, with nothing resolved.
pub fn resolve<V, E>(
    versions: impl IntoIterator<Item = V>,
    base: Option<&V::Row>,
    mut merge: impl FnMut(Option<&V::Row>, &V::Row, &V::Row) -> Result<V::Row, E>,
) -> Result<Option<V::Row>, E>
where
    V: Versioned,
    V::Row: Clone,
{
    let leaves = frontier(versions);
    let mut rows = leaves.iter().filter_map(|l| l.row());
    let Some(first) = rows.next() else {
        return Ok(None);
    };
    let mut acc = first.clone();
    for next in rows {
        acc = merge(base, &acc, next)?;
    }
    Ok(Some(acc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::tests::v;
    use std::convert::Infallible;

    /// Non-commutative: the accumulated row, then the next one.
    fn concat(
        _: Option<&&'static str>,
        a: &&'static str,
        b: &&'static str,
    ) -> Result<&'static str, Infallible> {
        Ok(Box::leak(format!("{a}{b}").into_boxed_str()))
    }

    #[test]
    fn folds_in_canonical_order_whatever_the_arrival_order() {
        let a = v(&[("a", 1)], 5, "a", Some("A"));
        let b = v(&[("b", 1)], 3, "b", Some("B"));
        let c = v(&[("c", 1)], 5, "c", Some("C"));
        for order in [[&a, &b, &c], [&c, &a, &b], [&b, &c, &a]] {
            assert_eq!(resolve(order, None, concat), Ok(Some("BAC")));
        }
    }

    #[test]
    fn calls_merge_once_per_extra_leaf_and_never_without_conflict() {
        let a1 = v(&[("a", 1)], 1, "a", Some("A1"));
        let a2 = v(&[("a", 2)], 2, "a", Some("A2"));
        let b = v(&[("b", 1)], 3, "b", Some("B"));
        let mut calls = 0;
        let mut counting = |base: Option<&&'static str>, x: &&'static str, y: &&'static str| {
            calls += 1;
            concat(base, x, y)
        };
        assert_eq!(resolve([&a1, &a2], None, &mut counting), Ok(Some("A2")));
        assert_eq!(
            resolve([&a2, &b, &a1, &b], None, &mut counting),
            Ok(Some("A2B"))
        );
        assert_eq!(calls, 1);
    }

    #[test]
    fn passes_the_base_and_the_error_through() {
        let a = v(&[("a", 1)], 1, "a", Some("A"));
        let b = v(&[("b", 1)], 2, "b", Some("B"));
        let got = resolve([&a, &b], Some(&"O"), |base, x, y| {
            Ok::<_, Infallible>(
                Box::leak(format!("{}{x}{y}", base.unwrap()).into_boxed_str()) as &str,
            )
        });
        assert_eq!(got, Ok(Some("OAB")));
        assert_eq!(
            resolve([&a, &b], None, |_, _, _| Err(
                "merge function returned NULL"
            )),
            Err("merge function returned NULL")
        );
    }

    #[test]
    fn update_beats_concurrent_delete() {
        let del = v(&[("a", 1)], 9, "a", None);
        let upd = v(&[("b", 1)], 1, "b", Some("B"));
        assert_eq!(resolve([&del, &upd], None, concat), Ok(Some("B")));
        assert_eq!(resolve([&del], None, concat), Ok(None));
    }
}
