//! The link between regions trusts nothing a region's ordinary roles can
//! do: a message emitted by hand, capture attached to another table, an
//! intent that lies about its origin, calls that would move the clock, and
//! a peer whose clock runs too far ahead. Each is refused or held, visibly,
//! and replication of everything else goes on.

mod common;

use common::{
    barrier, client_as, create_login_role, create_table_owner, lab, names, pg_error, text_in,
    wait_for, CONVERGE,
};
use std::time::Duration;

/// An intent for `accounts` as capture in `origin` would write it (unsealed).
fn intent(origin: &str, id: i64) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let hlc = foreshadow_model::Hlc::from_millis(now_ms).0;
    format!(
        r#"{{"v":2,"origin":"{origin}","hlc":{hlc},"schema":"public","table":"accounts","op":"insert","key":{{"id":"{id}"}},"row":{{"id":"{id}","region":"{origin}","balance":"666","note":"forged"}},"vv":{{"{origin}":1}},"strategy":"lww","class":"data"}}"#
    )
}

async fn count_in(lab: &foreshadow_lab::Lab, region: &str, sql: &str) -> i64 {
    common::scalar_i64(lab, region, sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_role_cannot_reach_other_regions() {
    let lab = lab("link-roles", 3, 20).await;
    let r = names(&lab);
    create_table_owner(&lab, "mallory").await;
    let m = client_as(&lab, &r[0], "mallory").await;

    // A message with Foreshadow's prefix, emitted by hand (any role may).
    m.execute(
        "SELECT pg_logical_emit_message(true, 'foreshadow', $1)",
        &[&intent(&r[0], 666)],
    )
    .await
    .unwrap();
    // The same with a made-up seal.
    m.execute(
        "SELECT pg_logical_emit_message(true, 'foreshadow', $1)",
        &[&format!("{}{}", "0".repeat(32), intent(&r[0], 667))],
    )
    .await
    .unwrap();

    // Capture attached to a table of its own, speaking for accounts.
    m.batch_execute(
        "CREATE TABLE mine (id bigint PRIMARY KEY, region text, balance bigint, note text)",
    )
    .await
    .unwrap();
    let attach = m
        .batch_execute(
            "CREATE TRIGGER t AFTER INSERT ON mine FOR EACH ROW \
             EXECUTE FUNCTION foreshadow.capture('public', 'accounts', 'lww', '[\"id\"]', '[]')",
        )
        .await
        .expect_err("an ordinary role attached Foreshadow's capture");
    assert!(
        pg_error(&attach).starts_with("42501"),
        "{}",
        pg_error(&attach)
    );

    // Nothing internal is callable: not the clock, not apply, not the key.
    for sql in [
        "SELECT foreshadow.hlc_next(9223372036854775807)",
        "SELECT foreshadow.hlc_observe(9223372036854775807)",
        "SELECT foreshadow.link_key()",
        "SELECT key FROM foreshadow.link_key",
        "SELECT foreshadow.apply_transaction('x', '[]', '0/0', NULL, NULL, 0)",
        "SELECT foreshadow.note_lane_error('x', 'y')",
        "SELECT foreshadow.retry_dead_letters()",
        "SELECT foreshadow.announce_rows('accounts'::regclass)",
        "SET foreshadow.max_clock_offset = '1h'",
    ] {
        let e = m.batch_execute(sql).await.expect_err(sql);
        let e = pg_error(&e);
        assert!(
            e.starts_with("42501") || e.starts_with("42883") || e.starts_with("55P02"),
            "{sql}: {e}"
        );
    }

    barrier(&lab, &r[0], &r, 1).await;
    for region in &r {
        assert_eq!(
            count_in(
                &lab,
                region,
                "SELECT count(*) FROM accounts WHERE id IN (666, 667)"
            )
            .await,
            0,
            "a forged write was applied in {region}"
        );
    }
    for region in &r[1..] {
        assert_eq!(
            text_in(
                &lab,
                region,
                "SELECT string_agg(kind, ',' ORDER BY id) FROM foreshadow.dead_letters"
            )
            .await
            .unwrap()
            .as_deref(),
            Some("forged,forged"),
            "region {region}"
        );
        assert_eq!(
            text_in(
                &lab,
                region,
                &format!(
                    "SELECT detail FROM foreshadow.alerts WHERE alert = 'rejected' AND region = '{}'",
                    r[0]
                )
            )
            .await
            .unwrap()
            .as_deref(),
            Some("2 forged message(s) kept in foreshadow.dead_letters"),
        );
    }
    // Capture attached by a superuser to a table that is not global refuses
    // the write instead of speaking for another table.
    let admin = lab.client(&r[0]).await.unwrap();
    admin
        .batch_execute(
            "CREATE TRIGGER t AFTER INSERT ON mine FOR EACH ROW \
             EXECUTE FUNCTION foreshadow.capture('public', 'accounts', 'lww', '[\"id\"]', '[]')",
        )
        .await
        .unwrap();
    let e = m
        .batch_execute("INSERT INTO mine VALUES (668, 'x', 1, NULL)")
        .await
        .expect_err("capture ran on a table that is not global");
    assert!(
        pg_error(&e).contains("not a global table"),
        "{}",
        pg_error(&e)
    );
}

/// An intent sealed with the right key (only a superuser of the region can
/// read it) but claiming another region as its origin is kept, not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_that_lies_about_its_origin_is_kept_not_applied() {
    let lab = lab("link-origin", 3, 20).await;
    let r = names(&lab);
    let admin = lab.client(&r[0]).await.unwrap();
    let key: Vec<u8> = admin
        .query_one("SELECT foreshadow.link_key()", &[])
        .await
        .unwrap()
        .get(0);
    let lie = foreshadow_model::seal::seal(&key, intent(&r[2], 700).as_bytes());
    admin
        .execute(
            "SELECT pg_logical_emit_message(true, 'foreshadow', $1)",
            &[&String::from_utf8(lie).unwrap()],
        )
        .await
        .unwrap();
    barrier(&lab, &r[0], &r, 2).await;
    for region in &r {
        assert_eq!(
            count_in(&lab, region, "SELECT count(*) FROM accounts WHERE id = 700").await,
            0
        );
    }
    for region in &r[1..] {
        assert_eq!(
            text_in(
                &lab,
                region,
                "SELECT string_agg(kind, ',') FROM foreshadow.dead_letters"
            )
            .await
            .unwrap()
            .as_deref(),
            Some("wrong_origin"),
            "region {region}"
        );
    }
}

/// Within `foreshadow.max_clock_offset` a skewed clock changes nothing (the
/// causality test); beyond it the peer's writes are held with an alert,
/// the other direction goes on, and once the clock is fixed the regions
/// converge with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_too_far_ahead_is_held_then_heals() {
    let lab = lab("link-clock", 2, 20).await;
    let r = names(&lab);
    lab.skew_clock(&r[0], 4_000).unwrap();
    lab.wait_replicating(CONVERGE).await.unwrap();
    let ahead = lab.client(&r[0]).await.unwrap();
    ahead
        .execute("INSERT INTO accounts VALUES (1, 'ahead', 1, NULL)", &[])
        .await
        .unwrap();
    wait_for(
        &lab,
        &r[1],
        &format!(
            "SELECT alert FROM foreshadow.alerts WHERE region = '{}' AND alert = 'clock_offset'",
            r[0]
        ),
        Some("clock_offset"),
        CONVERGE,
    )
    .await
    .unwrap();
    assert_eq!(
        count_in(&lab, &r[1], "SELECT count(*) FROM accounts").await,
        0,
        "a write stamped 4 s ahead was adopted"
    );
    // The other direction is not held.
    lab.client(&r[1])
        .await
        .unwrap()
        .execute("INSERT INTO accounts VALUES (2, 'behind', 1, NULL)", &[])
        .await
        .unwrap();
    wait_for(
        &lab,
        &r[0],
        "SELECT region FROM accounts WHERE id = 2",
        Some("behind"),
        CONVERGE,
    )
    .await
    .unwrap();
    let log =
        std::fs::read_to_string(lab.region_dir(&r[1]).join("sidecar.log")).unwrap_or_default();
    assert!(
        log.contains("clock offset"),
        "the sidecar log does not say why the lane is held"
    );
    // Fixed: the held write applies once the wall clock passes its stamp
    // (less the bound); nothing was skipped.
    lab.skew_clock(&r[0], 0).unwrap();
    common::assert_converged(&lab).await;
    assert_eq!(
        count_in(&lab, &r[1], "SELECT count(*) FROM accounts").await,
        2
    );
    wait_for(
        &lab,
        &r[1],
        "SELECT count(*)::text FROM foreshadow.alerts",
        Some("0"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
}

/// A table's owner cannot switch capture off (disable or drop its
/// trigger), and a session with session_replication_role = replica is
/// captured like any other: every write reaches the other regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_cannot_be_bypassed() {
    let lab = lab("link-bypass", 3, 20).await;
    let r = names(&lab);
    create_login_role(&lab, "alice").await;
    lab.everywhere(
        "CREATE TABLE public.notes (id bigint PRIMARY KEY, body text); \
         ALTER TABLE public.notes OWNER TO alice; SELECT foreshadow.make_global('public.notes')",
    )
    .await
    .unwrap();
    let owner = client_as(&lab, &r[0], "alice").await;
    for sql in [
        "ALTER TABLE notes DISABLE TRIGGER foreshadow_capture",
        "ALTER TABLE notes DISABLE TRIGGER ALL",
        "ALTER TABLE notes ENABLE REPLICA TRIGGER foreshadow_capture",
        "ALTER TRIGGER foreshadow_capture ON notes RENAME TO renamed",
        "DROP TRIGGER foreshadow_capture ON notes",
    ] {
        let e = owner.batch_execute(sql).await.expect_err(sql);
        assert!(
            pg_error(&e).contains("global table"),
            "{sql}: {}",
            pg_error(&e)
        );
    }
    owner
        .batch_execute("INSERT INTO notes VALUES (1, 'by the owner')")
        .await
        .unwrap();
    lab.client(&r[0])
        .await
        .unwrap()
        .batch_execute(
            "SET session_replication_role = replica; INSERT INTO notes VALUES (2, 'as a replica')",
        )
        .await
        .unwrap();
    for region in &r[1..] {
        wait_for(
            &lab,
            region,
            "SELECT string_agg(body, ',' ORDER BY id) FROM notes",
            Some("by the owner,as a replica"),
            CONVERGE,
        )
        .await
        .unwrap();
    }
}
