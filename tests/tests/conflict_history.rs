//! The conflict history on a real lab: two regions write the same row
//! while the link between them is cut; once it heals, each region's
//! `foreshadow.conflicts` shows the conflict (kind, strategy, both leaves,
//! resolved locally), the two regions agree on the winner, and a region's
//! own successive writes are not conflicts.

mod common;

use common::{assert_converged, barrier, lab, names};
use foreshadow_lab::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_recorded_as_conflicts_in_every_region() {
    let lab = lab("conflicts", 2, 10).await;
    let r = names(&lab);
    let (a, b) = (
        lab.client(&r[0]).await.unwrap(),
        lab.client(&r[1]).await.unwrap(),
    );
    a.batch_execute(
        "INSERT INTO accounts VALUES (1, 'seed', 0, NULL), (2, 'seed', 0, NULL), (3, 'seed', 0, NULL)",
    )
    .await
    .unwrap();
    assert_converged(&lab).await;
    // Successive writes of one region, seen by the other before the next.
    for n in 1..=3i64 {
        a.execute("UPDATE accounts SET balance = $1 WHERE id = 2", &[&n])
            .await
            .unwrap();
        assert_converged(&lab).await;
    }
    lab.fault(&r[1], Fault::Cut).unwrap();
    a.batch_execute(
        "UPDATE accounts SET note = 'a' WHERE id = 1; DELETE FROM accounts WHERE id = 3",
    )
    .await
    .unwrap();
    b.batch_execute(
        "UPDATE accounts SET note = 'b' WHERE id = 1; UPDATE accounts SET note = 'b' WHERE id = 3",
    )
    .await
    .unwrap();
    lab.fault(&r[1], Fault::Heal).unwrap();
    assert_converged(&lab).await;
    // Equal rows are not enough: a region whose own writes won already
    // shows the final rows before the losing writes reach it. A write made
    // after them, seen in the other region, says they were applied there.
    barrier(&lab, &r[0], &r[1..], 100).await;
    barrier(&lab, &r[1], &r[..1], 101).await;
    let mut seen = Vec::new();
    for region in &r {
        let rows = lab
            .client(region)
            .await
            .unwrap()
            .query(
                "SELECT key->>'id', kind, strategy, resolved_by, outcome, \
                        (SELECT string_agg(l->>'origin', ',' ORDER BY l->>'side') FROM jsonb_array_elements(leaves) l) \
                   FROM foreshadow.conflicts ORDER BY (key->>'id')::int",
                &[],
            )
            .await
            .unwrap();
        let got: Vec<(String, String, String, String, String, String)> = rows
            .iter()
            .map(|x| (x.get(0), x.get(1), x.get(2), x.get(3), x.get(4), x.get(5)))
            .collect();
        assert_eq!(
            got.len(),
            2,
            "{region}: one conflict per raced row: {got:?}"
        );
        let (other, mine) = if region == &r[0] {
            (&r[1], &r[0])
        } else {
            (&r[0], &r[1])
        };
        for (id, _, strategy, by, _, leaves) in &got {
            assert_eq!(strategy, "lww");
            assert_eq!(by, "local");
            // local leaf first, then the peer's write
            assert_eq!(leaves, &format!("{mine},{other}"), "{region}: row {id}");
        }
        assert_eq!(got[0].1, "update_origin_differs", "{region}: {got:?}");
        // Row 3: a's delete met b's update, each in the other's region.
        let want3 = if region == &r[0] {
            "update_deleted"
        } else {
            "delete_origin_differs"
        };
        assert_eq!(got[1].1, want3, "{region}: {got:?}");
        seen.push(got);
    }
    // One winner per row: where the peer's write was applied in one
    // region, this region's was kept in the other.
    for (x, y) in seen[0].iter().zip(&seen[1]) {
        let outcomes = (x.4.as_str(), y.4.as_str());
        assert!(
            matches!(outcomes, ("applied", "kept") | ("kept", "applied")),
            "row {}: {outcomes:?}",
            x.0
        );
    }
}
