//! Bad input, surface 3 of 5: intents from a peer that are sealed with the
//! peer's link key (so they pass the seal check; forged and wrong-origin
//! messages are in `link_security.rs`) but are bad inside: truncated, of
//! an unknown version, for a table that is not global here, oversized, or
//! with a column this region does not have. The first four can never apply
//! and are kept as dead letters of the named kind; the last stops the
//! peer's lane with a visible error until the schema fits, then applies.
//! Replication of everything else goes on throughout.

mod common;

use common::{barrier, lab, names, text_in, wait_for, CONVERGE};
use foreshadow_lab::Lab;

fn now_hlc() -> i64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    foreshadow_model::Hlc::from_millis(ms).0 as i64
}

/// An intent for `table` as capture in `origin` would write it.
fn intent(origin: &str, table: &str, id: i64, extra: &str) -> String {
    format!(
        r#"{{"v":2,"origin":"{origin}","hlc":{},"schema":"public","table":"{table}","op":"insert","key":{{"id":"{id}"}},"row":{{"id":"{id}","region":"{origin}","balance":"1","note":"bad input"{extra}}},"vv":{{"{origin}":1}},"strategy":"lww","class":"data"}}"#,
        now_hlc()
    )
}

/// Emits `body` in `region`, sealed with that region's link key, as its
/// capture would (the test runs as superuser, who can read the key).
async fn emit_sealed(lab: &Lab, region: &str, body: &[u8]) {
    let c = lab.client(region).await.unwrap();
    let key: Vec<u8> = c
        .query_one("SELECT foreshadow.link_key()", &[])
        .await
        .unwrap()
        .get(0);
    let sealed = foreshadow_model::seal::seal(&key, body);
    c.execute(
        "SELECT pg_logical_emit_message(true, 'foreshadow', $1::text)",
        &[&String::from_utf8(sealed).expect("sealed text")],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_intents_are_kept_or_hold_the_lane_and_the_rest_goes_on() {
    let lab = lab("badintents", 2, 5).await;
    let r = names(&lab);
    let (a, b) = (&r[0], &r[1]);
    let good = intent(a, "accounts", 801, "");
    let truncated = &good[..good.len() / 2];
    let wrong_version = good.replacen(r#""v":2"#, r#""v":99"#, 1);
    let not_global = intent(a, "no_such_table", 802, "");
    let oversized = format!(
        r#"{{"v":2,"origin":"{a}","junk":"{}"}}"#,
        "x".repeat(64 << 20)
    );
    for body in [truncated, &wrong_version, &not_global, &oversized] {
        emit_sealed(&lab, a, body.as_bytes()).await;
    }
    barrier(&lab, a, &r[1..], 1).await;
    let kinds = text_in(
        &lab,
        b,
        "SELECT string_agg(kind, ',' ORDER BY id) FROM foreshadow.dead_letters",
    )
    .await
    .unwrap();
    assert_eq!(
        kinds.as_deref(),
        Some("malformed,malformed,not_global,malformed"),
        "{b}'s dead letters"
    );
    let reasons = text_in(
        &lab,
        b,
        "SELECT string_agg(reason, ' | ' ORDER BY id) FROM foreshadow.dead_letters",
    )
    .await
    .unwrap()
    .unwrap_or_default();
    for words in ["version 99", "no_such_table"] {
        assert!(reasons.contains(words), "no {words:?} in: {reasons}");
    }
    assert!(
        reasons.len() < 10_000,
        "a reason quotes the oversized intent whole"
    );

    // A column this region lacks: the lane stops, visibly, the other
    // direction goes on, and once the column exists the intent applies.
    emit_sealed(
        &lab,
        a,
        intent(a, "accounts", 803, r#","added_later":"kept""#).as_bytes(),
    )
    .await;
    lab.client(a)
        .await
        .unwrap()
        .batch_execute("INSERT INTO accounts VALUES (804, 'after', 1, NULL)")
        .await
        .unwrap();
    wait_for(
        &lab,
        b,
        "SELECT alert FROM foreshadow.alerts WHERE alert = 'lane_stopped'",
        Some("lane_stopped"),
        CONVERGE,
    )
    .await
    .unwrap();
    barrier(&lab, b, &r[..1], 2).await;
    lab.client(b)
        .await
        .unwrap()
        .batch_execute("ALTER TABLE accounts ADD COLUMN added_later text")
        .await
        .unwrap();
    for (id, want) in [(803, "kept"), (804, "")] {
        wait_for(
            &lab,
            b,
            &format!("SELECT coalesce(added_later, '') FROM accounts WHERE id = {id}"),
            Some(want),
            CONVERGE,
        )
        .await
        .unwrap();
    }
    assert_eq!(
        text_in(
            &lab,
            b,
            "SELECT count(*)::text FROM foreshadow.dead_letters"
        )
        .await
        .unwrap()
        .as_deref(),
        Some("4"),
        "the lane's held intent was applied, not dead-lettered"
    );
}
