//! Merge-table tests: a lab with carts (workload::CARTS_DDL), concurrent
//! writes whose versions are read back as the model's leaves, and the
//! model's resolution of them as the oracle.

use super::{lab, names, TestLab, CONVERGE};
use foreshadow_lab::workload::{cart_merge, CARTS_DDL};
use foreshadow_lab::Lab;
use foreshadow_model::strategy::{leaf::Leaf, merge};
use foreshadow_model::Hlc;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const KEYS: i64 = 4;

/// A cart's items as a leaf's row (the oracle folds leaves of the model).
pub fn cart_row(items: &[String]) -> Map<String, Value> {
    Map::from_iter([("items".to_string(), Value::from(items.to_vec()))])
}

pub fn items_of(row: &Map<String, Value>) -> Vec<String> {
    serde_json::from_value(row["items"].clone()).unwrap()
}

/// A 3-region lab with KEYS carts holding `seed`, the same everywhere.
pub async fn carts_lab(name: &str, seed: &[&str]) -> (TestLab, Vec<String>) {
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

/// The region hosting the carts' shadow.
pub async fn shadow_of_carts(lab: &Lab, region: &str) -> String {
    super::text_in(
        lab,
        region,
        "SELECT shadows[1] FROM foreshadow.global_tables WHERE table_name = 'carts'::regclass",
    )
    .await
    .unwrap()
    .expect("carts has a shadow")
}

/// Every one of `regions` holds the carts `want`.
pub async fn assert_carts_everywhere(
    lab: &Lab,
    regions: &[String],
    want: &BTreeMap<i64, Vec<String>>,
    what: &str,
) {
    for region in regions {
        assert_eq!(&carts(lab, region).await, want, "{region}: {what}");
    }
}

/// A region's carts, by key.
pub async fn carts(lab: &Lab, region: &str) -> BTreeMap<i64, Vec<String>> {
    let c = lab.client(region).await.unwrap();
    c.query("SELECT id, items FROM carts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Each of `regions` adds `<region>-<key>` to every cart; the writes as
/// leaves (version, stamp, row), by key.
pub async fn add_one_item_each(lab: &Lab, regions: &[String]) -> BTreeMap<i64, Vec<Leaf>> {
    add_tagged_item_each(lab, regions, "").await
}

/// `add_one_item_each` with the items `<region>-<key><tag>`, for a later
/// round of writes to the same carts.
pub async fn add_tagged_item_each(
    lab: &Lab,
    regions: &[String],
    tag: &str,
) -> BTreeMap<i64, Vec<Leaf>> {
    let mut writes: BTreeMap<i64, Vec<Leaf>> = BTreeMap::new();
    for region in regions {
        let c = lab.client(region).await.unwrap();
        for k in 0..KEYS {
            let item = format!("{region}-{k}{tag}");
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
    writes
}

/// `add_one_item_each` while no region hears from any other (three
/// concurrent versions of each row with three regions), then healed and
/// converged.
pub async fn add_one_item_each_apart(lab: &Lab, regions: &[String]) -> BTreeMap<i64, Vec<Leaf>> {
    super::fault_all(lab, regions, foreshadow_lab::Fault::Cut);
    let writes = add_one_item_each(lab, regions).await;
    super::fault_all(lab, regions, foreshadow_lab::Fault::Heal);
    lab.wait_identical(&["public.carts"], super::CONVERGE)
        .await
        .unwrap();
    writes
}

/// The model's merge::resolve of each key's leaves with cart_merge, in
/// Rust; and how many merges that took.
pub fn oracle(writes: &BTreeMap<i64, Vec<Leaf>>) -> (BTreeMap<i64, Vec<String>>, i64) {
    let mut calls = 0;
    let want = writes
        .iter()
        .map(|(k, ws)| {
            let row = merge::resolve(ws, None, |_, a, b| {
                calls += 1;
                Ok::<_, ()>(cart_row(&cart_merge(&items_of(a), &items_of(b))))
            });
            (*k, items_of(&row.unwrap().unwrap()))
        })
        .collect();
    (want, calls)
}
