//! Peer transactions of any size apply as one local transaction, exactly
//! once, with the sidecar's memory bounded: a transaction of a million rows
//! and one with a 200 MB row. The sidecar applies such a transaction in
//! parts (16 MiB or 20,000 intents) as it arrives.

mod common;

use common::{lab, names, scalar_i64, CONVERGE};
use std::time::{Duration, Instant};

/// The sidecar's peak resident memory (VmHWM), in MiB.
fn sidecar_peak_mib(lab: &foreshadow_lab::Lab, region: &str) -> u64 {
    let pid = lab.sidecar_pid(region).expect("the sidecar runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib / 1024
}

async fn wait_count(lab: &foreshadow_lab::Lab, sql: &str, want: i64) {
    let deadline = Instant::now() + CONVERGE * 4;
    for region in names(lab) {
        loop {
            let got = scalar_i64(lab, &region, sql).await;
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "region {region}: {sql} gave {got}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_applies_once_in_bounded_memory() {
    let lab = lab("bigtxn", 3, 5).await;
    let r = names(&lab);
    const ROWS: i64 = 1_000_000;
    lab.client(&r[0])
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO accounts SELECT g, 'bulk', g, NULL FROM generate_series(1, {ROWS}) g"
        ))
        .await
        .unwrap();
    wait_count(&lab, "SELECT count(*) FROM accounts", ROWS).await;
    for region in &r[1..] {
        // Applied exactly once, as one transaction of the peer: every
        // intent counted once, and the sum of the rows is exact.
        assert_eq!(
            scalar_i64(
                &lab,
                region,
                &format!(
                    "SELECT intents FROM foreshadow.peer_stats WHERE origin = '{}'",
                    r[0]
                )
            )
            .await,
            ROWS,
            "intents applied in {region}"
        );
        assert_eq!(
            scalar_i64(&lab, region, "SELECT sum(balance)::bigint FROM accounts").await,
            ROWS * (ROWS + 1) / 2
        );
        let peak = sidecar_peak_mib(&lab, region);
        println!(
            "sidecar of {region}: peak resident memory {peak} MiB for a {ROWS}-row transaction"
        );
        assert!(peak < 512, "the sidecar of {region} held {peak} MiB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_row_applies() {
    let lab = lab("bigrow", 2, 5).await;
    let r = names(&lab);
    const MB: i64 = 200;
    lab.client(&r[0])
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO accounts VALUES (1, 'big', 1, repeat('x', {MB} * 1024 * 1024)), (2, 'small', 2, 'after')"
        ))
        .await
        .unwrap();
    wait_count(
        &lab,
        "SELECT count(*) FROM accounts WHERE (id = 1 AND length(note) = 200 * 1024 * 1024) OR (id = 2 AND note = 'after')",
        2,
    )
    .await;
    let peak = sidecar_peak_mib(&lab, &r[1]);
    println!(
        "sidecar of {}: peak resident memory {peak} MiB for a {MB} MB row",
        r[1]
    );
    assert!(
        peak < 8 * MB as u64,
        "the sidecar of {} held {peak} MiB",
        r[1]
    );
}
