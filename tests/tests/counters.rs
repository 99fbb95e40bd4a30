//! Strategy `counter` on a real 3-region lab with WAN delay: increments
//! from every region add up, and a delete racing increments leaves every
//! region with the same row. A reset (a delete, or an insert that brings a
//! row back) erases the increments its writer had seen; increments it had
//! not seen still count if the row lives (docs/shadow-protocol.md,
//! "counter").

mod common;

use common::{dead_letters, diff_rows, fault_all, names, run, CONVERGE};
use foreshadow_lab::workload::Rng;
use foreshadow_lab::{Fault, Lab};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const KEYS: i64 = 8;

/// A lab with `hits (id, n)`, `n` a counter column, in every region.
async fn hits_lab(name: &str) -> (common::TestLab, Vec<String>) {
    let lab = common::lab(name, 3, 20).await;
    lab.everywhere(
        "CREATE TABLE hits (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
         SELECT foreshadow.make_global('hits');
         SELECT foreshadow.set_column_strategy('hits', 'n', 'counter');",
    )
    .await
    .unwrap();
    let r = names(&lab);
    (lab, r)
}

async fn assert_hits_identical(lab: &Lab) {
    if let Err(e) = lab.wait_identical(&["public.hits"], CONVERGE).await {
        panic!(
            "hits did not converge: {e}\n{}\ndead letters: {}",
            diff_rows(lab, "", "SELECT id::text, n::text FROM hits").await,
            dead_letters(lab).await
        );
    }
}

/// Every row of `hits` in `region`: id → n.
async fn hits(lab: &Lab, region: &str) -> BTreeMap<i32, i64> {
    let c = lab.client(region).await.unwrap();
    c.query("SELECT id, n FROM hits", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Three concurrent writes to each row, while no region hears from any
/// other, stamped in this order: region a adds 5, region b deletes the
/// row, region c adds 3. The row lives (c's write is the last), and its
/// counter is what b's delete had not seen: 10 + 5 + 3 - 10 = 8.
/// Pairwise, region a would bring the row back as c wrote it (13) and
/// region c would add a's increment to its own (18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_increments_leaves_every_region_the_same() {
    let (lab, r) = hits_lab("counter-race").await;
    run(
        &lab,
        &r[0],
        "INSERT INTO hits SELECT g, 10 FROM generate_series(1, 8) g",
    )
    .await;
    assert_hits_identical(&lab).await;
    assert_eq!(hits(&lab, &r[2]).await.len(), KEYS as usize);

    fault_all(&lab, &r, Fault::Cut);
    run(&lab, &r[0], "UPDATE hits SET n = n + 5").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    run(&lab, &r[1], "DELETE FROM hits").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    run(&lab, &r[2], "UPDATE hits SET n = n + 3").await;
    fault_all(&lab, &r, Fault::Heal);

    assert_hits_identical(&lab).await;
    let want: BTreeMap<i32, i64> = (1..=KEYS as i32).map(|k| (k, 8)).collect();
    for region in &r {
        assert_eq!(hits(&lab, region).await, want, "{region}");
    }

    // Then the row deleted last, with increments racing the delete: it
    // stays deleted everywhere, and a later insert starts from its own
    // value, not from the increments the delete erased or raced.
    fault_all(&lab, &r, Fault::Cut);
    run(&lab, &r[0], "UPDATE hits SET n = n + 7 WHERE id = 1").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    run(&lab, &r[1], "DELETE FROM hits WHERE id = 1").await;
    fault_all(&lab, &r, Fault::Heal);
    assert_hits_identical(&lab).await;
    assert!(!hits(&lab, &r[0]).await.contains_key(&1), "deleted last");
    run(&lab, &r[2], "INSERT INTO hits VALUES (1, 4)").await;
    assert_hits_identical(&lab).await;
    for region in &r {
        assert_eq!(hits(&lab, region).await.get(&1), Some(&4), "{region}");
    }
}

/// One region's writer: random increments, and with `resets` also deletes
/// and inserts, on the keys 1..=KEYS until `stop`. Returns the increments
/// it committed per key (meaningful without resets).
async fn writer(
    lab: Arc<Lab>,
    region: String,
    seed: u64,
    resets: bool,
    stop: Arc<AtomicBool>,
) -> BTreeMap<i32, i64> {
    let c = lab.client(&region).await.unwrap();
    let mut rng = Rng::new(seed);
    let mut added = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let k = (rng.next_u64() % KEYS as u64) as i32 + 1;
        let d = (rng.next_u64() % 5) as i64 + 1;
        let dice = rng.next_u64() % 100;
        let result = if resets && dice < 12 {
            c.execute("DELETE FROM hits WHERE id = $1", &[&k]).await
        } else if resets && dice < 25 {
            c.execute(
                "INSERT INTO hits VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET n = hits.n + excluded.n",
                &[&k, &d],
            )
            .await
        } else {
            c.execute("UPDATE hits SET n = n + $2 WHERE id = $1", &[&k, &d])
                .await
        };
        match result {
            Ok(1) if !resets => *added.entry(k).or_insert(0) += d,
            Ok(_) => {}
            Err(e) => panic!(
                "{region}: a client's write failed: {}",
                common::pg_error(&e)
            ),
        }
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 15)).await;
    }
    added
}

/// Writers in every region for `secs`, with `killed`'s sidecar SIGKILLed
/// a third of the way in and started again a little later.
async fn write_everywhere(
    lab: &Lab,
    r: &[String],
    secs: u64,
    resets: bool,
    killed: &str,
    seed: u64,
) -> Vec<BTreeMap<i32, i64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Lab::open(&lab.dir).unwrap());
    let writers: Vec<_> = r
        .iter()
        .enumerate()
        .map(|(i, region)| {
            let (lab, stop, region) = (shared.clone(), stop.clone(), region.clone());
            tokio::spawn(writer(lab, region, seed + i as u64, resets, stop))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs / 3)).await;
    lab.fault(killed, Fault::KillSidecar).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.fault(killed, Fault::StartSidecar).unwrap();
    tokio::time::sleep(Duration::from_secs(secs - secs / 3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    for w in writers {
        out.push(w.await.unwrap());
    }
    out
}

/// Increments, deletes and re-inserts from every region on a few rows,
/// with a sidecar SIGKILLed mid-run: every region ends with the same rows.
/// Then increments only, again with a sidecar SIGKILLed: every row ends at
/// its value before plus exactly the increments the writers committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_exact_under_increments_deletes_and_a_killed_sidecar() {
    let (lab, r) = hits_lab("counter-load").await;
    write_everywhere(&lab, &r, 9, true, &r[1], 11).await;
    assert_hits_identical(&lab).await;

    run(
        &lab,
        &r[0],
        "INSERT INTO hits SELECT g, 0 FROM generate_series(1, 8) g ON CONFLICT DO NOTHING",
    )
    .await;
    assert_hits_identical(&lab).await;
    let before = hits(&lab, &r[0]).await;
    assert_eq!(before.len(), KEYS as usize);

    let added = write_everywhere(&lab, &r, 9, false, &r[2], 101).await;
    assert_hits_identical(&lab).await;
    let mut want = before.clone();
    for per_region in &added {
        for (k, d) in per_region {
            *want.get_mut(k).unwrap() += d;
        }
    }
    for region in &r {
        assert_eq!(
            hits(&lab, region).await,
            want,
            "{region}: before {before:?}"
        );
    }
}
