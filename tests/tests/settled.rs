//! What a merge table keeps of a conflict after it is resolved
//! (docs/shadow-protocol.md, "Forgetting settled versions"), on a real
//! 3-region lab with WAN delay: a resolved conflict's leaves, and a
//! deleted row's tombstone, are forgotten in every region once every other
//! region has said, on its own intent stream, that its row has settled at
//! that version or past it — and never before: while one region is cut
//! off, the others keep the leaves, and the write it made meanwhile,
//! concurrent with them, is still resolved with all of them.

mod common;

use common::carts::{add_one_item_each, add_tagged_item_each, carts, carts_lab, oracle, KEYS};
use common::{run, scalar_i64, wait_for_everywhere, CONVERGE};
use foreshadow_lab::{Fault, Lab};
use foreshadow_model::strategy::leaf::Leaf;
use std::collections::BTreeMap;
use std::time::Duration;

/// Rows of `carts` whose version keeps leaves, in one region.
const WITH_LEAVES: &str = "SELECT count(*)::text FROM foreshadow.row_versions \
    WHERE relid = 'carts'::regclass AND leaves IS NOT NULL";

/// Every region holds the model's resolution of `writes`, each committed
/// item once.
async fn assert_resolution_everywhere(lab: &Lab, r: &[String], writes: &BTreeMap<i64, Vec<Leaf>>) {
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    wait_for_resolution(lab, r, writes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_leaves_and_tombstones_are_forgotten_and_never_before() {
    let (lab, r) = carts_lab("settled", &["seed"]).await;

    // Regions 0 and 1 write every cart while no region hears from any
    // other; then they hear from each other, and not from region 2, and
    // their conflicts are resolved (by the shadow, or by a fallback if the
    // shadow is region 2).
    common::fault_all(&lab, &r, Fault::Cut);
    let mut writes = add_one_item_each(&lab, &r[..2]).await;
    for (from, to) in [(&r[0], &r[1]), (&r[1], &r[0])] {
        lab.control_link(from, to, |c| *c = Default::default())
            .unwrap();
    }
    let pair = &r[..2];
    wait_for_resolution(&lab, pair, &writes).await;
    // Several heartbeats and collections later, they still keep them:
    // region 2 has not settled (it has not even heard of the writes).
    tokio::time::sleep(Duration::from_secs(12)).await;
    for region in pair {
        let kept = scalar_i64(&lab, region, &WITH_LEAVES.replace("::text", "")).await;
        assert_eq!(
            kept, KEYS,
            "{region}: leaves kept while region 2 is cut off"
        );
    }

    // Region 2 writes every cart too, concurrent with both, then comes
    // back: every region resolves all three writes, as the model does.
    for (k, w) in add_one_item_each(&lab, &r[2..]).await {
        writes.entry(k).or_default().extend(w);
    }
    common::fault_all(&lab, &r, Fault::Heal);
    assert_resolution_everywhere(&lab, &r, &writes).await;

    // Once every region has settled, no region keeps any leaf.
    wait_for_everywhere(&lab, WITH_LEAVES, Some("0"), CONVERGE)
        .await
        .unwrap();

    // The carts' versions are now single versions: a new round of
    // concurrent writes is resolved from them as before.
    common::fault_all(&lab, &r, Fault::Cut);
    let again = add_tagged_item_each(&lab, &r, "-again").await;
    common::fault_all(&lab, &r, Fault::Heal);
    assert_resolution_everywhere(&lab, &r, &again).await;
    wait_for_everywhere(&lab, WITH_LEAVES, Some("0"), CONVERGE)
        .await
        .unwrap();

    // Deleted carts leave no tombstone once every region has settled
    // them, and a forgotten key can be written again.
    run(&lab, &r[0], "DELETE FROM carts").await;
    wait_for_everywhere(
        &lab,
        "SELECT count(*)::text FROM foreshadow.row_versions WHERE relid = 'carts'::regclass",
        Some("0"),
        CONVERGE,
    )
    .await
    .unwrap();
    run(&lab, &r[1], "INSERT INTO carts VALUES (1, '{back}')").await;
    wait_for_everywhere(
        &lab,
        "SELECT coalesce(string_agg(array_to_string(items, ','), ';'), '') FROM carts",
        Some("back"),
        CONVERGE,
    )
    .await
    .unwrap();
    // What regions said of their rows is kept only until it is used.
    for table in ["foreshadow.settled", "foreshadow.settled_by"] {
        let sql = format!("SELECT count(*)::text FROM {table}");
        wait_for_everywhere(&lab, &sql, Some("0"), CONVERGE)
            .await
            .unwrap();
    }
}

/// Waits until each of `regions` holds the model's resolution of `writes`.
async fn wait_for_resolution(lab: &Lab, regions: &[String], writes: &BTreeMap<i64, Vec<Leaf>>) {
    let (want, _) = oracle(writes);
    let deadline = std::time::Instant::now() + CONVERGE;
    for region in regions {
        loop {
            let got = carts(lab, region).await;
            if got == want {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{region}: {got:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A key deleted, forgotten in the regions that could, and written again
/// in one of them, is not lost in a region that still holds the tombstone:
/// the new write starts the writer's entry of the version vector above
/// every entry the key had (`VersionVector::bump_fresh`), so it is never
/// taken for a write the tombstone has already seen; and the region that
/// holds the tombstone forgets it on hearing the write, as the writer did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_again_after_its_tombstone_was_forgotten_is_not_lost() {
    let (lab, r) = carts_lab("reinsert", &["seed"]).await;

    // Region 2 keeps every tombstone its collection would forget: its
    // sidecar may not call collect_settled(); it still applies and says.
    run(
        &lab,
        &r[2],
        &format!(
            "REVOKE EXECUTE ON FUNCTION foreshadow.collect_settled() FROM {}",
            foreshadow_lab::lab::SIDECAR_ROLE
        ),
    )
    .await;

    // Cart 1 (inserted in region 0) is deleted in region 1; regions 0 and
    // 1 forget its tombstone, region 2 keeps it.
    run(&lab, &r[1], "DELETE FROM carts WHERE id = 1").await;
    let version = "SELECT coalesce(string_agg(deleted::text, ','), 'none') \
        FROM foreshadow.row_versions WHERE relid = 'carts'::regclass AND key::jsonb ->> 'id' = '1'";
    for region in &r[..2] {
        common::wait_for(&lab, region, version, Some("none"), CONVERGE)
            .await
            .unwrap();
    }
    assert_eq!(
        common::text_in(&lab, &r[2], version)
            .await
            .unwrap()
            .as_deref(),
        Some("true"),
        "{}: the tombstone is kept while collect_settled() is not called",
        r[2]
    );

    // Written again in region 0: every region holds it.
    run(&lab, &r[0], "INSERT INTO carts VALUES (1, '{again}')").await;
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    assert_eq!(
        carts(&lab, &r[2]).await.get(&1),
        Some(&vec!["again".to_string()])
    );
    // Region 2 forgot the tombstone on hearing the write (every other
    // region had said it was past it, and the write had not seen it): no
    // conflict, and the same version as everywhere, not one joined with
    // the tombstone.
    let vv = "SELECT vv || coalesce(leaves, '') FROM foreshadow.row_versions \
        WHERE relid = 'carts'::regclass AND key::jsonb ->> 'id' = '1'";
    let want = common::text_in(&lab, &r[0], vv).await.unwrap();
    for region in &r[1..] {
        common::wait_for(&lab, region, vv, want.as_deref(), CONVERGE)
            .await
            .unwrap();
    }
    assert_eq!(
        scalar_i64(
            &lab,
            &r[2],
            "SELECT count(*) FROM foreshadow.conflicts WHERE key ->> 'id' = '1'"
        )
        .await,
        0,
        "{}: a write after the tombstone was forgotten is no conflict",
        r[2]
    );
}
