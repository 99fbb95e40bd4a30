//! End-to-end tests on a real multi-region lab: PostgreSQL clusters, sidecar
//! processes, logical decoding, the WAN proxy. Run serially (each starts its
//! own lab on free ports).

mod common;

use common::{assert_converged, lab, names, scalar_i64, CONVERGE};
use foreshadow_lab::workload::{write_until, WriterStats};
use foreshadow_lab::{Fault, Lab};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_deletes_reach_every_region() {
    let lab = lab("dml", 3, 5).await;
    let r = names(&lab);
    let a = lab.client(&r[0]).await.unwrap();
    let b = lab.client(&r[1]).await.unwrap();
    let c = lab.client(&r[2]).await.unwrap();
    a.batch_execute("INSERT INTO accounts VALUES (1, 'a', 10, 'from a'), (2, 'a', 20, NULL)")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO accounts VALUES (3, 'b', 30, 'from b')")
        .await
        .unwrap();
    assert_converged(&lab).await;
    c.batch_execute("UPDATE accounts SET balance = 11, note = 'c updated' WHERE id = 1")
        .await
        .unwrap();
    assert_converged(&lab).await;
    b.batch_execute("DELETE FROM accounts WHERE id = 2")
        .await
        .unwrap();
    assert_converged(&lab).await;
    // An aborted transaction leaves no intent.
    a.batch_execute("BEGIN; INSERT INTO accounts VALUES (99, 'a', 0, 'aborted'); ROLLBACK")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO accounts VALUES (4, 'a', 40, 'after abort')")
        .await
        .unwrap();
    assert_converged(&lab).await;
    for region in &r {
        let c = lab.client(region).await.unwrap();
        let rows = c
            .query("SELECT id, balance, note FROM accounts ORDER BY id", &[])
            .await
            .unwrap();
        let got: Vec<(i64, i64, Option<String>)> = rows
            .iter()
            .map(|x| (x.get(0), x.get(1), x.get(2)))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 11, Some("c updated".into())),
                (3, 30, Some("from b".into())),
                (4, 40, Some("after abort".into()))
            ],
            "region {region}"
        );
        // The delete left a tombstone, not a gap in the metadata.
        assert_eq!(
            scalar_i64(
                &lab,
                region,
                "SELECT tombstones FROM foreshadow.global_tables"
            )
            .await,
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_converge_to_one_lww_winner() {
    let lab = lab("lww", 3, 20).await;
    let r = names(&lab);
    lab.client(&r[0])
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO accounts SELECT g, 'seed', 0, NULL FROM generate_series(1, 5) g",
        )
        .await
        .unwrap();
    assert_converged(&lab).await;
    // Every region updates the same keys at once, several rounds, including
    // update/delete and delete/delete races.
    for round in 0..5i64 {
        let mut tasks = Vec::new();
        for (i, region) in r.iter().enumerate() {
            let c = lab.client(region).await.unwrap();
            let region = region.clone();
            tasks.push(tokio::spawn(async move {
                for key in 1..=5i64 {
                    let sql = if key == 5 && i > 0 {
                        "DELETE FROM accounts WHERE id = $1 AND $2::text IS NOT NULL AND $3::bigint IS NOT NULL".to_string()
                    } else {
                        "INSERT INTO accounts VALUES ($1, $2, $3, 'race') ON CONFLICT (id) DO UPDATE SET region = EXCLUDED.region, balance = EXCLUDED.balance".to_string()
                    };
                    c.execute(&sql, &[&key, &region, &(round * 100 + i as i64)]).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    assert_converged(&lab).await;
    // Every region holds, for each key, the version with the highest (hlc, origin).
    let mut winners = Vec::new();
    for region in &r {
        let c = lab.client(region).await.unwrap();
        let rows = c
            .query("SELECT key::text, hlc, origin, deleted FROM foreshadow.row_versions ORDER BY key::text", &[])
            .await
            .unwrap();
        winners.push(
            rows.iter()
                .map(|x| {
                    (
                        x.get::<_, String>(0),
                        x.get::<_, i64>(1),
                        x.get::<_, String>(2),
                        x.get::<_, bool>(3),
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    assert!(
        winners.iter().all(|w| *w == winners[0]),
        "regions disagree on versions: {winners:?}"
    );
    // The row each region shows was written by the winning origin.
    let c = lab.client(&r[1]).await.unwrap();
    let mismatched = c
        .query_one(
            "SELECT count(*) FROM accounts a JOIN foreshadow.row_versions v ON v.key::jsonb ->> 'id' = a.id::text \
             WHERE a.region <> v.origin OR v.deleted",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(mismatched, 0);
}

struct Load {
    stop: Arc<AtomicBool>,
    stats: Vec<Arc<WriterStats>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

fn start_load(lab: &Lab) -> Load {
    let lab = Arc::new(Lab::open(&lab.dir).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Vec<Arc<WriterStats>> = lab.spec.regions.iter().map(|_| Arc::default()).collect();
    let tasks = (0..lab.spec.regions.len())
        .map(|i| {
            let (lab, stop, st) = (lab.clone(), stop.clone(), stats[i].clone());
            tokio::spawn(async move { write_until(&lab, i, 0, stop, st).await })
        })
        .collect();
    Load { stop, stats, tasks }
}

impl Load {
    async fn finish(self) -> Vec<Arc<WriterStats>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap().unwrap();
        }
        self.stats
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_sigkill_under_load_loses_and_duplicates_nothing() {
    let lab = lab("sigkill", 3, 5).await;
    let r = names(&lab);
    let load = start_load(&lab);
    for pause_ms in [700u64, 350, 900, 150] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        lab.fault(&r[1], Fault::KillSidecar).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        lab.fault(&r[1], Fault::StartSidecar).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = load.finish().await;
    assert_converged(&lab).await;
    let committed: Vec<i64> = stats
        .iter()
        .map(|s| s.inserts.load(Ordering::Relaxed) as i64)
        .collect();
    assert!(
        committed.iter().all(|&n| n > 50),
        "the load wrote too little to test anything: {committed:?}"
    );
    for (i, region) in r.iter().enumerate() {
        // None missing: every region holds exactly the keys committed anywhere.
        let total = scalar_i64(&lab, region, "SELECT count(*) FROM accounts").await;
        assert_eq!(
            total,
            committed.iter().sum::<i64>(),
            "rows in region {region}"
        );
        for (j, origin) in r.iter().enumerate() {
            let from_origin = scalar_i64(
                &lab,
                region,
                &format!("SELECT count(*) FROM accounts WHERE region = '{origin}'"),
            )
            .await;
            assert_eq!(from_origin, committed[j], "rows from {origin} in {region}");
            if i != j {
                // None twice: each peer intent was applied exactly once.
                let received = scalar_i64(
                    &lab,
                    region,
                    &format!("SELECT intents FROM foreshadow.peer_stats WHERE origin = '{origin}'"),
                )
                .await;
                assert_eq!(
                    received, committed[j],
                    "intents from {origin} applied in {region}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_region_catches_up_and_others_never_stall() {
    let lab = lab("pgstop", 3, 5).await;
    let r = names(&lab);
    let load = start_load(&lab);
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.fault(&r[2], Fault::StopPg).unwrap();
    // While region 3 is down, regions 1 and 2 keep replicating to each other.
    let seen = |lab: &Lab, at: String, from: String| {
        let lab = Lab::open(&lab.dir).unwrap();
        async move {
            scalar_i64(
                &lab,
                &at,
                &format!("SELECT count(*) FROM accounts WHERE region = '{from}'"),
            )
            .await
        }
    };
    let before = seen(&lab, r[0].clone(), r[1].clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = seen(&lab, r[0].clone(), r[1].clone()).await;
    assert!(
        after > before + 20,
        "replication {} -> {} stalled while {} was down: {before} -> {after}",
        r[1],
        r[0],
        r[2]
    );
    lab.fault(&r[2], Fault::StartPg).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = load.finish().await;
    assert_converged(&lab).await;
    for (j, origin) in r.iter().enumerate() {
        let committed = stats[j].inserts.load(Ordering::Relaxed) as i64;
        // A write whose commit was cut off by the crash may or may not have
        // committed: it is either everywhere or nowhere (convergence), never
        // half; every acknowledged write is present.
        let unsure = if j == 2 {
            stats[j].errors.load(Ordering::Relaxed) as i64
        } else {
            0
        };
        for region in &r {
            let n = scalar_i64(
                &lab,
                region,
                &format!("SELECT count(*) FROM accounts WHERE region = '{origin}'"),
            )
            .await;
            assert!(
                n >= committed && n <= committed + unsure,
                "rows from {origin} in {region}: {n}, committed {committed}"
            );
        }
    }
}

/// Catching up, runs of peer transactions are applied together; when they
/// write the same row again and again (a hot key, a counter), each write
/// must see the one before it in the same local transaction (seen in the
/// chaos run: the group failed with "attempted to lock invisible tuple" and
/// fell back to one transaction at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_groups_transactions_that_write_the_same_row() {
    let lab = lab("hotgroup", 2, 5).await;
    let r = names(&lab);
    lab.everywhere("CREATE TABLE public.ctr (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO public.ctr VALUES (1, 0)")
        .await
        .unwrap();
    lab.replicate_table("public.ctr", &["n"], false)
        .await
        .unwrap();
    let c = lab.client(&r[0]).await.unwrap();
    c.execute("INSERT INTO accounts VALUES (1, 'hot', 0, NULL)", &[])
        .await
        .unwrap();
    lab.wait_converged("public.accounts", CONVERGE)
        .await
        .unwrap();
    lab.fault(&r[1], Fault::KillSidecar).unwrap();
    let here = lab.client(&r[1]).await.unwrap();
    for n in 1..=300i64 {
        c.execute("UPDATE accounts SET balance = $1 WHERE id = 1", &[&n])
            .await
            .unwrap();
        c.execute("UPDATE ctr SET n = n + 1 WHERE id = 1", &[])
            .await
            .unwrap();
        here.execute("UPDATE ctr SET n = n + 1 WHERE id = 1", &[])
            .await
            .unwrap();
    }
    lab.fault(&r[1], Fault::StartSidecar).unwrap();
    assert_converged(&lab).await;
    lab.wait_converged("public.ctr", CONVERGE).await.unwrap();
    assert_eq!(
        scalar_i64(&lab, &r[1], "SELECT n FROM ctr WHERE id = 1").await,
        600
    );
    let log = std::fs::read_to_string(lab.region_dir(&r[1]).join("sidecar.log")).unwrap();
    assert!(
        !log.contains("invisible tuple"),
        "grouped apply failed on a row written twice:\n{log}"
    );
}
