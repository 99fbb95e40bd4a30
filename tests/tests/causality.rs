//! Causality under clock skew: a write made after reading a row wins over
//! the version it read in every region, even when the writer's wall clock
//! runs behind the clock of the region that wrote what it read. Clocks are
//! skewed with libfaketime on each region's PostgreSQL.

mod common;

use common::{assert_converged, lab, names, CONVERGE};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_read_wins_under_clock_skew() {
    let lab = lab("skew", 3, 20).await;
    let r = names(&lab);
    // r[1] runs 250 ms behind the machine, r[2] 250 ms ahead: 500 ms apart.
    lab.skew_clock(&r[1], -250).unwrap();
    lab.skew_clock(&r[2], 250).unwrap();
    lab.wait_replicating(CONVERGE).await.unwrap();
    let ahead = lab.client(&r[2]).await.unwrap();
    let behind = lab.client(&r[1]).await.unwrap();
    let skew: f64 = ahead
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .unwrap()
        .get::<_, f64>(0)
        - behind
            .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
            .await
            .unwrap()
            .get::<_, f64>(0);
    assert!(skew > 0.4, "the clocks are not skewed: {skew} s apart");
    for key in 1..=20i64 {
        // The region ahead writes; the region behind reads that version
        // and writes after it, well within the 500 ms the clocks differ.
        ahead
            .execute(
                "INSERT INTO accounts VALUES ($1, 'ahead', 1, 'from ahead')",
                &[&key],
            )
            .await
            .unwrap();
        let deadline = Instant::now() + CONVERGE;
        loop {
            let seen = behind
                .query_opt("SELECT note FROM accounts WHERE id = $1", &[&key])
                .await
                .unwrap();
            if seen.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "key {key} never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        behind
            .execute(
                "UPDATE accounts SET note = note || ' then behind', balance = balance + 1 WHERE id = $1",
                &[&key],
            )
            .await
            .unwrap();
    }
    assert_converged(&lab).await;
    for region in &r {
        let c = lab.client(region).await.unwrap();
        let lost: i64 = c
            .query_one(
                "SELECT count(*) FROM accounts WHERE note <> 'from ahead then behind' OR balance <> 2",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            lost, 0,
            "region {region}: a write after a read lost to what it read"
        );
        let rows: i64 = c
            .query_one("SELECT count(*) FROM accounts", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 20, "region {region}");
    }
}
