//! A merge table's shadow on a real 3-region lab with WAN delay
//! (docs/shadow-protocol.md): while the shadow's sidecar is down, the
//! other primaries resolve their conflicts themselves after
//! foreshadow.shadow_deadline (R5) and agree; once it is back, it catches
//! up and resolves again (R6). A shadow-set change while conflicts are in
//! flight, seen by the regions at different times (R7), loses nothing and
//! resolves nothing twice differently.

mod common;

use common::carts::{
    add_one_item_each, add_one_item_each_apart, assert_carts_everywhere, carts, carts_lab, oracle,
    shadow_of_carts,
};
use common::{fault_all, scalar_i64, CONVERGE};
use foreshadow_lab::{Fault, Lab};

/// How region's cart conflicts were resolved: (by the shadow, by
/// fallback, still open).
async fn resolved_by(lab: &Lab, region: &str, since_id: i64) -> (i64, i64, i64) {
    let count = |by: &str| {
        format!(
            "SELECT count(*) FROM foreshadow.conflicts WHERE resolved_by = '{by}' AND id > {since_id}"
        )
    };
    (
        scalar_i64(lab, region, &count("shadow")).await,
        scalar_i64(lab, region, &count("fallback")).await,
        scalar_i64(lab, region, &count("pending")).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_shadow_primaries_fall_back_and_agree_then_it_resolves_again() {
    let (lab, r) = carts_lab("shadow-down", &["seed"]).await;
    let owner = shadow_of_carts(&lab, &r[0]).await;
    let others: Vec<String> = r.iter().filter(|x| **x != owner).cloned().collect();
    lab.fault(&owner, Fault::KillSidecar).unwrap();
    // The two other regions write the same carts without hearing each
    // other, then meet: every conflict waits for the shadow, which is down.
    lab.fault(&others[0], Fault::Cut).unwrap();
    let writes = add_one_item_each(&lab, &others).await;
    lab.fault(&others[0], Fault::Heal).unwrap();
    lab.fault(&owner, Fault::Heal).unwrap();
    let (want, _) = oracle(&writes);
    for region in &others {
        common::wait_for(
            &lab,
            region,
            "SELECT count(*)::text FROM foreshadow.conflicts WHERE resolved_by = 'fallback'",
            Some(&common::carts::KEYS.to_string()),
            CONVERGE,
        )
        .await
        .unwrap();
    }
    for region in &others {
        assert_eq!(
            carts(&lab, region).await,
            want,
            "{region}: the fallback is the model's resolution"
        );
        assert_eq!(
            resolved_by(&lab, region, 0).await,
            (0, common::carts::KEYS, 0),
            "{region}"
        );
    }
    // The shadow's sidecar back: it catches up to the same rows.
    lab.fault(&owner, Fault::StartSidecar).unwrap();
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    assert_eq!(carts(&lab, &owner).await, want);
    // And resolves the next conflicts itself.
    let mark = scalar_i64(
        &lab,
        &others[0],
        "SELECT coalesce(max(id), 0) FROM foreshadow.conflicts",
    )
    .await;
    let mark1 = scalar_i64(
        &lab,
        &others[1],
        "SELECT coalesce(max(id), 0) FROM foreshadow.conflicts",
    )
    .await;
    lab.fault(&others[0], Fault::Cut).unwrap();
    let writes = add_one_item_each(&lab, &others).await;
    lab.fault(&others[0], Fault::Heal).unwrap();
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    for (region, since) in others.iter().zip([mark, mark1]) {
        common::wait_for(
            &lab,
            region,
            &format!("SELECT count(*)::text FROM foreshadow.conflicts WHERE resolved_by = 'pending' AND id > {since}"),
            Some("0"),
            CONVERGE,
        )
        .await
        .unwrap();
        let (shadow, fallback, _) = resolved_by(&lab, region, since).await;
        assert!(
            shadow >= 1 && fallback == 0,
            "{region}: by the shadow again: {shadow} / {fallback}"
        );
    }
    let (want, _) = oracle(&writes);
    assert_carts_everywhere(&lab, &r, &want, "the shadow's resolution").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_set_change_in_flight_loses_nothing() {
    let (lab, r) = carts_lab("shadow-change", &["seed"]).await;
    let old = shadow_of_carts(&lab, &r[0]).await;
    let new = r.iter().find(|x| **x != old).unwrap().clone();
    fault_all(&lab, &r, Fault::Cut);
    let writes = add_one_item_each(&lab, &r).await;
    // Two regions move the shadow while cut off; the third still has the
    // old one when the conflicts meet, and moves it afterwards.
    let (late, early) = r.split_last().unwrap();
    for region in early {
        lab.client(region)
            .await
            .unwrap()
            .execute("SELECT foreshadow.set_shadows('carts', ARRAY[$1])", &[&new])
            .await
            .unwrap();
    }
    fault_all(&lab, &r, Fault::Heal);
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    lab.client(late)
        .await
        .unwrap()
        .execute("SELECT foreshadow.set_shadows('carts', ARRAY[$1])", &[&new])
        .await
        .unwrap();
    let (want, _) = oracle(&writes);
    for region in &r {
        assert_eq!(
            carts(&lab, region).await,
            want,
            "{region}: the model's resolution, once"
        );
        common::wait_for(
            &lab,
            region,
            "SELECT count(*)::text FROM foreshadow.conflicts WHERE resolved_by = 'pending'",
            Some("0"),
            CONVERGE,
        )
        .await
        .unwrap();
        assert_eq!(
            scalar_i64(
                &lab,
                region,
                "SELECT count(*) FROM foreshadow.conflict_failures"
            )
            .await,
            0
        );
    }
}

/// `set_shadows` run in one region changes the shadows in every region
/// (R7: the set travels as a metadata intent). Two regions that change it
/// at once, cut off from each other, end with the same set everywhere: the
/// later by `(epoch, regions)`. Conflicts after the change are resolved by
/// the new shadow alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_set_change_in_one_region_reaches_every_region() {
    let (lab, r) = carts_lab("shadow-set", &["seed"]).await;
    let set_of_carts = "SELECT shadow_epoch || ':' || shadows::text FROM foreshadow.global_tables \
                        WHERE table_name = 'carts'::regclass";
    let set = |region: &str, regions: Vec<String>| {
        let lab = &lab;
        let region = region.to_owned();
        async move {
            let c = lab.client(&region).await.unwrap();
            c.query_one("SELECT foreshadow.set_shadows('carts', $1)", &[&regions])
                .await
                .unwrap_or_else(|e| panic!("{region}: set_shadows: {}", common::pg_error(&e)))
                .get::<_, i32>(0)
        }
    };
    let old = shadow_of_carts(&lab, &r[0]).await;
    let new = r.iter().find(|x| **x != old).unwrap().clone();
    assert_eq!(set(&r[2], vec![new.clone()]).await, 2);
    let want = format!("2:{{{new}}}");
    common::wait_for_everywhere(&lab, set_of_carts, Some(&want), CONVERGE)
        .await
        .unwrap();

    // Both other regions change it at once while cut off: r[0] to no
    // shadows, r[1] to two. Epoch 3 both; the larger set wins everywhere.
    fault_all(&lab, &r, Fault::Cut);
    let both = vec![r[0].clone(), r[1].clone()];
    let mut sorted = both.clone();
    sorted.sort();
    assert_eq!(set(&r[0], vec![]).await, 3);
    assert_eq!(set(&r[1], both).await, 3);
    fault_all(&lab, &r, Fault::Heal);
    let want = format!("3:{{{}}}", sorted.join(","));
    common::wait_for_everywhere(&lab, set_of_carts, Some(&want), CONVERGE)
        .await
        .unwrap();

    // Back to one shadow, then conflicts: resolved by it, adopted by the
    // others, the model's resolution everywhere.
    assert_eq!(set(&r[1], vec![new.clone()]).await, 4);
    let want = format!("4:{{{new}}}");
    common::wait_for_everywhere(&lab, set_of_carts, Some(&want), CONVERGE)
        .await
        .unwrap();
    let writes = add_one_item_each_apart(&lab, &r).await;
    let (want, _) = oracle(&writes);
    assert_carts_everywhere(&lab, &r, &want, "the new shadow's resolution").await;
    for region in &r {
        let merged = scalar_i64(
            &lab,
            region,
            "SELECT count(*) FROM foreshadow.conflicts WHERE outcome = 'merged'",
        )
        .await;
        assert_eq!(merged > 0, *region == new, "{region}: only {new} merges");
    }
}
