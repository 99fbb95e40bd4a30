//! Tombstones are forgotten (docs/operations.md, "Tombstones") on a real
//! 3-region lab with WAN delay: once every region's heartbeat says no
//! write they could defeat can still arrive, and never before: a
//! transaction still open in one region, holding a write stamped before a
//! delete made elsewhere, keeps that delete's tombstone in every region,
//! and its write loses to it when it commits.

mod common;

use common::{names, run, scalar_i64, wait_for_everywhere, CONVERGE};
use foreshadow_lab::Lab;
use std::time::Duration;

async fn notes_lab(name: &str) -> (common::TestLab, Vec<String>) {
    let lab = common::lab(name, 3, 20).await;
    lab.everywhere(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         SELECT foreshadow.make_global('notes');",
    )
    .await
    .unwrap();
    let r = names(&lab);
    (lab, r)
}

/// Waits until every region holds `n` rows of `notes`.
async fn notes_everywhere(lab: &Lab, n: usize) {
    let count = "SELECT count(*)::text FROM notes";
    wait_for_everywhere(lab, count, Some(&n.to_string()), CONVERGE)
        .await
        .unwrap();
}

/// Versions of `notes` rows (live or tombstones) in each region.
const VERSIONS: &str =
    "SELECT count(*)::text FROM foreshadow.row_versions WHERE relid = 'notes'::regclass";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_forgotten_once_every_region_has_moved_past_them() {
    let (lab, r) = notes_lab("tombstones").await;
    run(
        &lab,
        &r[0],
        "INSERT INTO notes SELECT g, 'n' FROM generate_series(1, 200) g",
    )
    .await;
    notes_everywhere(&lab, 200).await;
    run(&lab, &r[1], "DELETE FROM notes").await;
    notes_everywhere(&lab, 0).await;
    // 200 tombstones, then none: in every region, the queue too.
    wait_for_everywhere(&lab, VERSIONS, Some("0"), CONVERGE)
        .await
        .unwrap();
    wait_for_everywhere(
        &lab,
        "SELECT count(*)::text FROM foreshadow.tombstones",
        Some("0"),
        CONVERGE,
    )
    .await
    .unwrap();
    // A key deleted and forgotten can be written again, everywhere.
    run(&lab, &r[2], "INSERT INTO notes VALUES (7, 'again')").await;
    wait_for_everywhere(
        &lab,
        "SELECT coalesce(string_agg(body, ','), '') FROM notes",
        Some("again"),
        CONVERGE,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_keeps_the_tombstones_its_write_must_lose_to() {
    let (lab, r) = notes_lab("tombstones-open").await;
    run(
        &lab,
        &r[0],
        "INSERT INTO notes SELECT g, 'n' FROM generate_series(1, 5) g",
    )
    .await;
    notes_everywhere(&lab, 5).await;

    // Region 0 writes row 1 and does not commit yet; region 1 then deletes
    // every row, stamped later.
    let open = lab.client(&r[0]).await.unwrap();
    open.batch_execute("BEGIN; UPDATE notes SET body = 'late' WHERE id = 1")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    run(&lab, &r[1], "DELETE FROM notes").await;
    common::wait_for(
        &lab,
        &r[2],
        "SELECT count(*)::text FROM notes",
        Some("0"),
        CONVERGE,
    )
    .await
    .unwrap();
    // Several collections later, region 2 still holds the tombstones.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let held = scalar_i64(
        &lab,
        &r[2],
        "SELECT count(*) FROM foreshadow.row_versions WHERE relid = 'notes'::regclass AND deleted",
    )
    .await;
    assert_eq!(held, 5, "tombstones kept while region 0's write is open");

    // The write commits: it is older than the delete and loses everywhere.
    open.batch_execute("COMMIT").await.unwrap();
    notes_everywhere(&lab, 0).await;
    wait_for_everywhere(&lab, VERSIONS, Some("0"), CONVERGE)
        .await
        .unwrap();
    lab.wait_identical(&["public.notes"], CONVERGE)
        .await
        .unwrap();
    for region in &r {
        let rows = scalar_i64(&lab, region, "SELECT count(*) FROM notes").await;
        assert_eq!(rows, 0, "{region}: the late write lost to the delete");
    }
}
