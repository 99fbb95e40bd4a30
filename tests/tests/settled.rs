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

/// Whether row 1 of `table` has a version in a region: `none`, or whether
/// it is deleted.
fn version_of_row_1(table: &str) -> String {
    format!(
        "SELECT coalesce(string_agg(deleted::text, ','), 'none') FROM foreshadow.row_versions \
         WHERE relid = '{table}'::regclass AND key::jsonb ->> 'id' = '1'"
    )
}

/// Regions 0 and 1 forget the tombstone of row 1 of `table`; region 2
/// still holds it (`why`).
async fn forgotten_but_in_region_2(lab: &Lab, r: &[String], table: &str, why: &str) {
    let version = version_of_row_1(table);
    for region in &r[..2] {
        common::wait_for(lab, region, &version, Some("none"), CONVERGE)
            .await
            .unwrap();
    }
    assert_eq!(
        common::text_in(lab, &r[2], &version)
            .await
            .unwrap()
            .as_deref(),
        Some("true"),
        "{}: {why}",
        r[2]
    );
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
    forgotten_but_in_region_2(
        &lab,
        &r,
        "carts",
        "the tombstone is kept while collect_settled() is not called",
    )
    .await;

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

/// A region that keeps an intent of a table as a dead letter (the table
/// was not global there yet) does not forget that table's tombstones until
/// the dead letters are replayed: the replayed insert, older than the
/// delete, must still meet the tombstone and lose to it. Had the region
/// forgotten the tombstone with the others, the replay would bring the row
/// back there alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_is_kept_while_a_dead_letter_could_still_apply_under_it() {
    let lab = common::lab("deadletter-settled", 3, 20).await;
    let r = common::names(&lab);
    lab.everywhere("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    let make_global = "SELECT foreshadow.make_global('public.notes', strategy => 'vv')";
    for region in &r[..2] {
        run(&lab, region, make_global).await;
    }
    let has_row = "SELECT coalesce(string_agg(body, ','), 'none') FROM notes WHERE id = 1";

    // Region 2 receives the insert before notes is global there.
    run(&lab, &r[0], "INSERT INTO notes VALUES (1, 'first')").await;
    let kept = "SELECT count(*)::text FROM foreshadow.dead_letters \
        WHERE kind = 'not_global' AND intent LIKE '%\"op\":\"insert\"%'";
    common::wait_for(&lab, &r[2], kept, Some("1"), CONVERGE)
        .await
        .unwrap();
    common::wait_for(&lab, &r[1], has_row, Some("first"), CONVERGE)
        .await
        .unwrap();

    // Global everywhere now; region 1 deletes the row, which region 2 never
    // had: it holds the tombstone.
    run(&lab, &r[2], make_global).await;
    run(&lab, &r[1], "DELETE FROM notes WHERE id = 1").await;
    let version = version_of_row_1("notes");
    common::wait_for(&lab, &r[2], &version, Some("true"), CONVERGE)
        .await
        .unwrap();

    // Regions 0 and 1 forget the tombstone once every other region has
    // said it is past it; region 2 keeps it, its dead letter could still
    // apply.
    let why = "the tombstone is kept while a not_global dead letter is kept";
    forgotten_but_in_region_2(&lab, &r, "notes", why).await;
    // Two more collection periods in region 2 (every 5 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    forgotten_but_in_region_2(&lab, &r, "notes", why).await;

    // The replayed insert loses to the tombstone: the row is deleted
    // everywhere, and region 2 forgets the tombstone afterwards.
    assert_eq!(
        scalar_i64(&lab, &r[2], "SELECT foreshadow.retry_dead_letters()").await,
        1,
        "{}: {}",
        r[2],
        common::dead_letters(&lab).await
    );
    for region in &r {
        assert_eq!(
            common::text_in(&lab, region, has_row)
                .await
                .unwrap()
                .as_deref(),
            Some("none"),
            "{region}: the deleted row stays deleted"
        );
    }
    common::wait_for(&lab, &r[2], &version, Some("none"), CONVERGE)
        .await
        .unwrap();
    lab.wait_identical(&["public.notes"], CONVERGE)
        .await
        .unwrap();
}

/// A key deleted in one region and written again there once that region
/// has forgotten the tombstone, while a third region has not yet heard
/// every region say it is past the tombstone (its lane from one of them
/// held): the write had seen the delete, so it survives everywhere; the
/// third region does not resolve it as a conflict with a tombstone every
/// other region has forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_again_survives_where_a_lane_lags_behind_the_forgetting() {
    let (lab, r) = carts_lab("reinsert-lag", &["seed"]).await;

    // Region 2 hears nothing from region 0 from now on.
    lab.hold_flow(&r[0], &r[2], true).unwrap();

    // Cart 1 is deleted in region 1; regions 0 and 1 hear every other
    // region say it is past the tombstone and forget it, region 2 keeps it
    // (region 0's word has not reached it).
    run(&lab, &r[1], "DELETE FROM carts WHERE id = 1").await;
    forgotten_but_in_region_2(
        &lab,
        &r,
        "carts",
        "the tombstone is kept until every region has said it is past it",
    )
    .await;

    // Written again in region 1, which had deleted it: every region holds
    // the new row once region 2 hears region 0 again.
    run(&lab, &r[1], "INSERT INTO carts VALUES (1, '{again}')").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    lab.hold_flow(&r[0], &r[2], false).unwrap();
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    for region in &r {
        assert_eq!(
            carts(&lab, region).await.get(&1),
            Some(&vec!["again".to_string()]),
            "{region}: the write made after the delete is kept"
        );
    }

    // Region 0, whose entry the row's first life had, writes it again: a
    // write region 2 has not seen (whatever it kept of the tombstone's
    // version), so it arrives there too.
    run(
        &lab,
        &r[0],
        "UPDATE carts SET items = items || '{later}'::text[] WHERE id = 1",
    )
    .await;
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    for region in &r {
        assert_eq!(
            carts(&lab, region).await.get(&1),
            Some(&vec!["again".to_string(), "later".to_string()]),
            "{region}: the later write is applied"
        );
    }
}
