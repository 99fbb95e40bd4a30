//! The link never stalls and never silently loses: a peer's slot keeps
//! advancing while its global tables are idle, a peer busy decoding a large
//! transaction is not mistaken for a dead link, a panicking peer task is
//! restarted, and a missing slot stops the lane until an operator
//! resynchronises it (which brings back what was missed).

mod common;

use common::{lab, names, scalar_i64, text_in, wait_for, CONVERGE};
use foreshadow_lab::Lab;
use std::time::{Duration, Instant};

/// `region`'s sidecar, restarted with `config` and `env`.
fn restart_sidecar(lab: &Lab, region: &str, config: &str, env: &[(&str, &str)]) {
    lab.fault(region, foreshadow_lab::lab::Fault::KillSidecar)
        .unwrap();
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let started = lab.start_sidecar_with(region, config);
    for (k, _) in env {
        std::env::remove_var(k);
    }
    started.unwrap();
}

fn sidecar_log(lab: &Lab, region: &str) -> String {
    std::fs::read_to_string(lab.region_dir(region).join("sidecar.log")).unwrap_or_default()
}

/// Inserts account `id` tagged `tag` in `from`; waits until `to` has it.
async fn insert_seen(lab: &Lab, from: &str, to: &str, id: i64, tag: &str) {
    lab.client(from)
        .await
        .unwrap()
        .execute(
            "INSERT INTO accounts VALUES ($1, $2, 1, NULL)",
            &[&id, &tag],
        )
        .await
        .unwrap();
    wait_for(
        lab,
        to,
        &format!("SELECT region FROM accounts WHERE id = {id}"),
        Some(tag),
        CONVERGE,
    )
    .await
    .unwrap();
}

/// The slot `reader`'s sidecar reads on `peer`.
fn slot_of(reader: &str) -> String {
    format!("foreshadow_{}", reader.replace('-', "_"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_global_tables_on_a_busy_peer_do_not_hold_its_wal() {
    let lab = lab("live-idle", 2, 20).await;
    let r = names(&lab);
    let c = lab.client(&r[0]).await.unwrap();
    // One global write, then only writes to a table that is not global.
    insert_seen(&lab, &r[0], &r[1], 1, "x").await;
    c.batch_execute("CREATE TABLE busy (id bigint, pad text)")
        .await
        .unwrap();
    for _ in 0..20 {
        c.batch_execute(
            "INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series(1, 10000) g",
        )
        .await
        .unwrap();
    }
    let after: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_for(
        &lab,
        &r[0],
        &format!(
            "SELECT (confirmed_flush_lsn >= '{after}')::text FROM pg_replication_slots WHERE slot_name = '{}'",
            slot_of(&r[1])
        ),
        Some("true"),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_busy_decoding_a_large_transaction_is_not_a_dead_link() {
    let lab = lab("live-busy", 2, 20).await;
    let r = names(&lab);
    // A short peer timeout: decoding the transaction below takes longer.
    let config = lab
        .sidecar_config(&r[1])
        .unwrap()
        .replace("peer_timeout_ms = 5000", "peer_timeout_ms = 1000");
    restart_sidecar(&lab, &r[1], &config, &[]);
    lab.wait_replicating(CONVERGE).await.unwrap();
    let c = lab.client(&r[0]).await.unwrap();
    c.batch_execute("CREATE TABLE big (id bigint, v int)")
        .await
        .unwrap();
    // Big enough that decoding it keeps the walsender silent well past the
    // timeout (plus the 1 s status period) on a fast machine too.
    c.batch_execute("INSERT INTO big SELECT g, 0 FROM generate_series(1, 8000000) g")
        .await
        .unwrap();
    let started = Instant::now();
    insert_seen(&lab, &r[0], &r[1], 1, "after").await;
    let log = sidecar_log(&lab, &r[1]);
    assert!(
        log.contains("walsender is busy"),
        "the peer was never silent for longer than the timeout: the test tests nothing:\n{log}"
    );
    assert!(
        !log.contains("has not answered"),
        "a busy peer was taken for a dead link (after {:?}):\n{log}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_peer_task_is_restarted() {
    let lab = lab("live-panic", 2, 20).await;
    let r = names(&lab);
    let config = lab.sidecar_config(&r[1]).unwrap();
    let failpoint = format!("panic_peer:{}", r[0]);
    restart_sidecar(
        &lab,
        &r[1],
        &config,
        &[("FORESHADOW_FAILPOINT", &failpoint)],
    );
    insert_seen(&lab, &r[0], &r[1], 1, "x").await;
    let log = sidecar_log(&lab, &r[1]);
    assert!(
        log.contains("failpoint panic_peer"),
        "the failpoint did not fire:\n{log}"
    );
    assert!(log.contains("panicked; restarting it"), "{log}");
    assert!(lab
        .sidecar_pid(&r[1])
        .is_some_and(foreshadow_lab::proc::alive));
}

/// A periodic call the primary refuses (here: its grant revoked) is logged
/// once, not at every try, on a connection kept open, while the other
/// calls go on; and it is logged again when it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_periodic_call_is_logged_once_and_the_others_go_on() {
    let lab = lab("periodic-refused", 2, 20).await;
    let r = names(&lab);
    let role = foreshadow_lab::lab::SIDECAR_ROLE;
    let admin = lab.client(&r[0]).await.unwrap();
    admin
        .batch_execute(&format!(
            "REVOKE EXECUTE ON FUNCTION foreshadow.collect_settled() FROM {role}"
        ))
        .await
        .unwrap();
    let beat = "SELECT beat_at::text FROM foreshadow.heartbeat";
    let before = text_in(&lab, &r[0], beat).await.unwrap();
    // Three or more tries (one every 5 s).
    tokio::time::sleep(Duration::from_secs(16)).await;
    let log = sidecar_log(&lab, &r[0]);
    let refused = log
        .lines()
        .filter(|l| l.contains("periodic call failed") && l.contains("collect_settled"))
        .count();
    assert_eq!(refused, 1, "logged once:\n{log}");
    assert!(log.contains("permission denied"), "{log}");
    assert!(
        !log.contains("periodic calls: cannot reach the primary"),
        "{log}"
    );
    assert_ne!(
        text_in(&lab, &r[0], beat).await.unwrap(),
        before,
        "heartbeats went on"
    );
    admin
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION foreshadow.collect_settled() TO {role}"
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + CONVERGE;
    while !sidecar_log(&lab, &r[0]).contains("periodic call works again") {
        assert!(Instant::now() < deadline, "never logged as working again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits a moment, then checks that `slot` is still missing on `peer`:
/// nothing re-created it behind the operator's back (`why` says what that
/// would mean).
async fn assert_slot_stays_missing(lab: &foreshadow_lab::Lab, peer: &str, slot: &str, why: &str) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sql = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'");
    assert_eq!(scalar_i64(lab, peer, &sql).await, 0, "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_stops_the_lane_until_resynchronised() {
    let lab = lab("live-slot", 2, 20).await;
    let r = names(&lab);
    let peer = lab.client(&r[0]).await.unwrap();
    insert_seen(&lab, &r[0], &r[1], 1, "before").await;
    insert_seen(&lab, &r[0], &r[1], 4, "doomed").await;
    // The slot is lost while the reader is down, and writes go on.
    lab.fault(&r[1], foreshadow_lab::lab::Fault::KillSidecar)
        .unwrap();
    let slot = slot_of(&r[1]);
    // Its walsender lets go of the slot once it sees the link closed.
    wait_for(
        &lab,
        &r[0],
        &format!("SELECT active::text FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        Some("false"),
        CONVERGE,
    )
    .await
    .unwrap();
    peer.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    peer.batch_execute(
        "INSERT INTO accounts VALUES (2, 'missed', 1, NULL); \
         UPDATE accounts SET balance = 7 WHERE id = 1; DELETE FROM accounts WHERE id = 4",
    )
    .await
    .unwrap();
    lab.start_sidecar(&r[1]).unwrap();
    wait_for(
        &lab,
        &r[1],
        &format!(
            "SELECT alert FROM foreshadow.alerts WHERE region = '{}'",
            r[0]
        ),
        Some("lane_stopped"),
        CONVERGE,
    )
    .await
    .unwrap();
    let detail = text_in(&lab, &r[1], "SELECT detail FROM foreshadow.alerts")
        .await
        .unwrap()
        .unwrap();
    assert!(detail.contains("is missing on the peer"), "{detail}");
    assert!(sidecar_log(&lab, &r[1]).contains("--resync-peer"));
    assert_slot_stays_missing(&lab, &r[0], &slot, "the slot was re-created silently").await;
    // The operator's command, with the sidecar stopped.
    lab.fault(&r[1], foreshadow_lab::lab::Fault::KillSidecar)
        .unwrap();
    let config = lab.region_dir(&r[1]).join("sidecar.toml");
    let resync = || {
        std::process::Command::new(foreshadow_lab::proc::sibling_binary("foreshadow-sidecar"))
            .args([
                "--config",
                &config.display().to_string(),
                "--resync-peer",
                &r[0],
            ])
            .output()
            .unwrap()
    };
    // A first try fails half way (the peer is down once this region's
    // progress is forgotten). Started again, the sidecar must not take the
    // lane for a new one: what the resync was to bring back would be
    // skipped for good. It stays stopped until a resync finishes.
    lab.fault(&r[0], foreshadow_lab::lab::Fault::StopPg)
        .unwrap();
    let failed = resync();
    assert!(
        !failed.status.success(),
        "a resync with the peer down succeeded"
    );
    lab.fault(&r[0], foreshadow_lab::lab::Fault::StartPg)
        .unwrap();
    let peer = lab.client(&r[0]).await.unwrap();
    lab.start_sidecar(&r[1]).unwrap();
    wait_for(
        &lab,
        &r[1],
        "SELECT (detail LIKE '%did not finish%')::text FROM foreshadow.alerts \
          WHERE alert = 'lane_stopped'",
        Some("true"),
        CONVERGE,
    )
    .await
    .unwrap();
    assert_slot_stays_missing(
        &lab,
        &r[0],
        &slot,
        "the lane went on after an unfinished resync",
    )
    .await;
    lab.fault(&r[1], foreshadow_lab::lab::Fault::KillSidecar)
        .unwrap();
    let out = resync();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("accounts: 3 rows and tombstones re-announced"),
        "{report}"
    );
    lab.start_sidecar(&r[1]).unwrap();
    peer.execute("INSERT INTO accounts VALUES (3, 'after', 1, NULL)", &[])
        .await
        .unwrap();
    common::assert_converged(&lab).await;
    assert_eq!(
        text_in(
            &lab,
            &r[1],
            "SELECT string_agg(id || ':' || balance, ',' ORDER BY id) FROM accounts"
        )
        .await
        .unwrap()
        .as_deref(),
        Some("1:7,2:1,3:1")
    );
}
