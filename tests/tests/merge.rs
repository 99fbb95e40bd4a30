//! Strategy `merge` on a real 3-region lab with WAN delay: a
//! non-commutative merge function under concurrent writes to the same keys
//! from every region. Every region ends with the same rows, every committed
//! item present exactly once, and each row equal to the model crate's
//! resolution of the leaf set (an oracle computed from the writes).

mod common;

use common::carts::{
    add_one_item_each_apart, carts, carts_lab, items_of, oracle, shadow_of_carts, KEYS,
};
use common::{fault_all, scalar_i64, CONVERGE};
use foreshadow_lab::workload::{add_cart_items, cart_merge};
use foreshadow_lab::Fault;
use foreshadow_lab::Lab;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_carts_merge_to_the_model_resolution_everywhere() {
    let (lab, r) = carts_lab("merge", &["seed"]).await;

    // Every region adds its own item to every cart while no region hears
    // from any other: three concurrent versions of each row.
    let writes = add_one_item_each_apart(&lab, &r).await;

    // The oracle: the model's merge::resolve of each key's leaves with the
    // same function, in Rust.
    let (want, calls) = oracle(&writes);
    assert_eq!(calls, 2 * KEYS, "three leaves per key: two merges each");
    for region in &r {
        let got = carts(&lab, region).await;
        assert_eq!(got, want, "{region}: the model's resolution of every key");
        for (k, items) in &got {
            for w in &r {
                let item = format!("{w}-{k}");
                let n = items.iter().filter(|x| **x == item).count();
                assert_eq!(n, 1, "{region}: {item} once in cart {k}: {items:?}");
            }
        }
    }
    // The order of the items is not the arrival order: at least one key's
    // resolution differs from some region's pairwise (local, remote) merge.
    let pairwise_differs = r.iter().any(|region| {
        want.iter().any(|(k, row)| {
            let mine = writes[k].iter().find(|w| &w.origin == region).unwrap();
            let mut acc = items_of(mine.row.as_ref().unwrap());
            for w in writes[k].iter().filter(|w| &w.origin != region) {
                acc = cart_merge(&acc, &items_of(w.row.as_ref().unwrap()));
            }
            &acc != row
        })
    });
    assert!(pairwise_differs, "the merge is order-sensitive here");

    // The table's shadow (one region, chosen from foreshadow.regions)
    // resolved each key twice: when the second version met its own (one
    // call), then when the third joined them (two calls). Every other
    // region adopted its resolutions and never called the function.
    let owner = shadow_of_carts(&lab, &r[0]).await;
    for region in &r {
        let count = |sql: &'static str| scalar_i64(&lab, region, sql);
        let merged =
            count("SELECT count(*) FROM foreshadow.conflicts WHERE outcome = 'merged'").await;
        let calls = count("SELECT coalesce(sum(merge_calls), 0) FROM foreshadow.conflicts").await;
        let not_by_shadow =
            count("SELECT count(*) FROM foreshadow.conflicts WHERE resolved_by <> 'shadow'").await;
        let failures = count("SELECT count(*) FROM foreshadow.conflict_failures").await;
        let want = if *region == owner {
            (2 * KEYS, 3 * KEYS)
        } else {
            (0, 0)
        };
        assert_eq!((merged, calls), want, "{region} (shadow: {owner})");
        assert_eq!((not_by_shadow, failures), (0, 0), "{region}");
        if *region != owner {
            let adopted =
                count("SELECT count(*) FROM foreshadow.conflicts WHERE outcome LIKE 'pre-staged%'")
                    .await;
            assert!(
                adopted >= KEYS,
                "{region}: adopted the shadow's resolutions"
            );
        }
    }
}

/// Writers in every region add items to a few carts at once, over the
/// WAN: every committed item ends in its cart exactly once, everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_item_is_kept_once_under_concurrent_writers() {
    let (lab, r) = carts_lab("merge-load", &[]).await;
    // Carts grow with every item: a few hundred per region.
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Lab::open(&lab.dir).unwrap());
    let writers: Vec<_> = (0..r.len())
        .map(|i| {
            let (lab, stop) = (shared.clone(), stop.clone());
            tokio::spawn(async move {
                add_cart_items(&lab, i, KEYS, Duration::from_millis(20), stop).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let mut committed = Vec::new();
    for w in writers {
        committed.extend(w.await.unwrap().unwrap());
    }
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    let got = carts(&lab, &r[0]).await;
    for (k, item) in &committed {
        let n = got[k].iter().filter(|x| *x == item).count();
        assert_eq!(n, 1, "{item} once in cart {k}");
    }
    let total: usize = got.values().map(Vec::len).sum();
    assert_eq!(total, committed.len(), "nothing but the committed items");
    // Resolved by the table's shadow (where the function ran) and adopted
    // everywhere else; none left open.
    let mut merged = 0;
    for region in &r {
        let count = |sql: &'static str| scalar_i64(&lab, region, sql);
        merged += count("SELECT count(*) FROM foreshadow.conflicts WHERE outcome = 'merged'").await;
        let open = count("SELECT count(*) FROM foreshadow.conflicts WHERE resolved_by = 'pending'");
        assert_eq!(open.await, 0, "{region}: no conflict left open");
    }
    assert!(merged > 0, "the writers raced");
}

/// A merge function that raises, returns NULL or runs past
/// foreshadow.merge_timeout: the conflict is resolved by last writer wins
/// over the same leaves, the same in every region; the failure is kept
/// with the error where the function ran (the table's shadow); and
/// replication of everything else goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_merge_function_falls_back_and_replication_goes_on() {
    let (lab, r) = carts_lab("merge-fails", &["seed"]).await;
    lab.everywhere(
        "CREATE OR REPLACE FUNCTION public.cart_merge(base public.carts, local public.carts, remote public.carts) \
         RETURNS public.carts LANGUAGE plpgsql IMMUTABLE AS $$ \
         BEGIN \
           IF 'boom-0' = ANY (local.items || remote.items) THEN RAISE EXCEPTION 'cart % went boom', local.id; END IF; \
           IF 'null-1' = ANY (local.items || remote.items) THEN RETURN NULL; END IF; \
           IF 'sleep-2' = ANY (local.items || remote.items) THEN PERFORM pg_catalog.pg_sleep(30); END IF; \
           RETURN ROW(local.id, local.items || remote.items)::public.carts; \
         END $$",
    )
    .await
    .unwrap();
    fault_all(&lab, &r, Fault::Cut);
    let poison = ["boom-0", "null-1", "sleep-2"];
    for region in &r {
        let c = lab.client(region).await.unwrap();
        for (k, bad) in poison.iter().enumerate() {
            let item = if region == &r[0] {
                bad.to_string()
            } else {
                format!("{region}-{k}")
            };
            c.execute(
                "UPDATE carts SET items = items || $2::text WHERE id = $1",
                &[&(k as i64), &item],
            )
            .await
            .unwrap();
        }
    }
    fault_all(&lab, &r, Fault::Heal);
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    // Everything else replicates meanwhile and after.
    common::barrier(&lab, &r[1], &r, 900).await;
    let owner = shadow_of_carts(&lab, &r[0]).await;
    common::wait_for(
        &lab,
        &owner,
        "SELECT string_agg(key ->> 'id' || ': ' || error, '; ' ORDER BY key ->> 'id') \
           FROM (SELECT DISTINCT ON (key) key, error FROM foreshadow.conflict_failures ORDER BY key, id) f",
        Some(
            "0: merge function public.cart_merge raised: cart 0 went boom; \
             1: merge function public.cart_merge returned NULL; \
             2: merge function public.cart_merge ran past foreshadow.merge_timeout (1000 ms)",
        ),
        CONVERGE,
    )
    .await
    .unwrap();
    // Where the function ran, every poisoned cart fell back (two other
    // regions' versions, met first, may have merged before).
    let count = |sql: &'static str| scalar_i64(&lab, &owner, sql);
    let failed = count("SELECT count(*) FROM foreshadow.conflicts WHERE outcome = 'merge failed: last writer wins'");
    assert!(
        failed.await >= poison.len() as i64,
        "{owner}: every poisoned cart fell back"
    );
    // Last writer wins: each cart is one region's version, whole.
    let got = carts(&lab, &r[0]).await;
    for (k, items) in &got {
        if *k < poison.len() as i64 {
            assert_eq!(
                items.len(),
                2,
                "cart {k}: one version, not a merge: {items:?}"
            );
        }
    }
}
