//! Strategy `merge` on a real 3-region lab with WAN delay: a
//! non-commutative merge function under concurrent writes to the same keys
//! from every region. Every region ends with the same rows, every committed
//! item present exactly once, and each row equal to the model crate's
//! resolution of the leaf set (an oracle computed from the writes).

mod common;

use common::{lab, names, scalar_i64, text_in, TestLab, CONVERGE};
use foreshadow_lab::workload::{add_cart_items, cart_merge, CARTS_DDL};
use foreshadow_lab::Fault;
use foreshadow_lab::Lab;
use foreshadow_model::strategy::{leaf::Leaf, merge};
use foreshadow_model::Hlc;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const KEYS: i64 = 4;

/// A cart's items as a leaf's row (the oracle folds leaves of the model).
fn cart_row(items: &[String]) -> Map<String, Value> {
    Map::from_iter([("items".to_string(), Value::from(items.to_vec()))])
}

fn items_of(row: &Map<String, Value>) -> Vec<String> {
    serde_json::from_value(row["items"].clone()).unwrap()
}

/// A 3-region lab with KEYS carts holding `seed`, the same everywhere.
async fn carts_lab(name: &str, seed: &[&str]) -> (TestLab, Vec<String>) {
    let lab = lab(name, 3, 20).await;
    let r = names(&lab);
    lab.everywhere(CARTS_DDL).await.unwrap();
    let first = lab.client(&r[0]).await.unwrap();
    let seed: Vec<String> = seed.iter().map(|s| s.to_string()).collect();
    for k in 0..KEYS {
        first
            .execute("INSERT INTO carts VALUES ($1, $2)", &[&k, &seed])
            .await
            .unwrap();
    }
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();
    (lab, r)
}

/// Every region's carts, by key.
async fn carts(lab: &foreshadow_lab::Lab, region: &str) -> BTreeMap<i64, Vec<String>> {
    let c = lab.client(region).await.unwrap();
    c.query("SELECT id, items FROM carts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_carts_merge_to_the_model_resolution_everywhere() {
    let (lab, r) = carts_lab("merge", &["seed"]).await;

    // Every region adds its own item to every cart while no region hears
    // from any other: three concurrent versions of each row.
    for region in &r {
        lab.fault(region, Fault::Cut).unwrap();
    }
    let mut writes: BTreeMap<i64, Vec<Leaf>> = BTreeMap::new();
    for region in &r {
        let c = lab.client(region).await.unwrap();
        for k in 0..KEYS {
            let item = format!("{region}-{k}");
            c.execute(
                "UPDATE carts SET items = items || $2::text WHERE id = $1",
                &[&k, &item],
            )
            .await
            .unwrap();
            let v = c
                .query_one(
                    "SELECT v.hlc, v.origin, v.vv, c.items FROM foreshadow.row_versions v, carts c \
                      WHERE v.relid = 'carts'::regclass AND v.key::jsonb ->> 'id' = $1 AND c.id = $2",
                    &[&k.to_string(), &k],
                )
                .await
                .unwrap();
            writes.entry(k).or_default().push(Leaf {
                hlc: Hlc(v.get::<_, i64>(0) as u64),
                origin: v.get(1),
                vv: serde_json::from_str(v.get::<_, &str>(2)).unwrap(),
                row: Some(cart_row(&v.get::<_, Vec<String>>(3))),
            });
        }
    }
    for region in &r {
        lab.fault(region, Fault::Heal).unwrap();
    }
    lab.wait_identical(&["public.carts"], CONVERGE)
        .await
        .unwrap();

    // The oracle: the model's merge::resolve of each key's leaves with the
    // same function, in Rust.
    let mut calls = 0;
    let want: BTreeMap<i64, Vec<String>> = writes
        .iter()
        .map(|(k, ws)| {
            let row = merge::resolve(ws, None, |_, a, b| {
                calls += 1;
                Ok::<_, ()>(cart_row(&cart_merge(&items_of(a), &items_of(b))))
            });
            (*k, items_of(&row.unwrap().unwrap()))
        })
        .collect();
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
    let owner = text_in(
        &lab,
        &r[0],
        "SELECT shadows[1] FROM foreshadow.global_tables WHERE table_name = 'carts'::regclass",
    )
    .await
    .unwrap()
    .expect("carts has a shadow");
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
