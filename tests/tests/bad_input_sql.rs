//! Bad input, surface 1 of 5: arguments of the SQL API. Each case names the
//! SQLSTATE and the words of the error it expects; tables that are legal
//! but awkward (other schemas; identifiers with quotes, spaces, unicode and
//! reserved words) must replicate. Afterwards replication of everything
//! else goes on and nothing was dead-lettered. (The other surfaces:
//! `bad_input_config.rs`, `bad_input_intents.rs`, `bad_input_rows.rs`,
//! `bad_input.rs` for peers and the lab's own command line.)

mod common;

use common::{dead_letters, lab, names, pg_error, wait_for, wait_for_everywhere, CONVERGE};

/// Every call that must be refused: (SQL, SQLSTATE, words in the message).
const REFUSED: &[(&str, &str, &str)] = &[
    // NULLs
    (
        "SELECT foreshadow.make_global(NULL)",
        "22004",
        "table must not be NULL",
    ),
    (
        "SELECT foreshadow.make_global('t_ok', strategy => NULL)",
        "22023",
        "unknown conflict strategy",
    ),
    (
        "SELECT foreshadow.make_global('t_ok', announce_existing => NULL)",
        "22004",
        "announce_existing must not be NULL",
    ),
    (
        "SELECT foreshadow.drop_global(NULL)",
        "22004",
        "table must not be NULL",
    ),
    (
        "SELECT foreshadow.set_column_strategy(NULL, 'n', 'counter')",
        "22004",
        "table must not be NULL",
    ),
    (
        "SELECT foreshadow.set_column_strategy('accounts', NULL, 'counter')",
        "22004",
        "column_name must not be NULL",
    ),
    (
        "SELECT foreshadow.set_column_strategy('accounts', 'balance', NULL)",
        "22004",
        "strategy must not be NULL",
    ),
    // Wrong types and unknown tables
    (
        "SELECT foreshadow.make_global(true)",
        "42883",
        "does not exist",
    ),
    (
        "SELECT foreshadow.make_global(987654321)",
        "42P01",
        "relation with OID 987654321 does not exist",
    ),
    (
        "SELECT foreshadow.make_global('no_such_table')",
        "42P01",
        "\"no_such_table\" does not exist",
    ),
    (
        "SELECT foreshadow.make_global('public.\"T_OK\"')",
        "42P01",
        "does not exist",
    ),
    (
        "SELECT foreshadow.set_column_strategy('accounts', 'balance', 'Counter')",
        "22023",
        "unknown column strategy \"Counter\"",
    ),
    (
        "SELECT foreshadow.make_global('t_ok', strategy => 'LWW')",
        "22023",
        "unknown conflict strategy \"LWW\"",
    ),
    // Things that are not ordinary, permanent, user tables
    (
        "SELECT foreshadow.make_global('v_view')",
        "42809",
        "not an ordinary table",
    ),
    (
        "SELECT foreshadow.make_global('m_view')",
        "42809",
        "not an ordinary table",
    ),
    (
        "SELECT foreshadow.make_global('p_parted')",
        "42809",
        "not an ordinary table",
    ),
    (
        "SELECT foreshadow.make_global('p_parted_1')",
        "42809",
        "is a partition",
    ),
    (
        "SELECT foreshadow.make_global('pg_temp.tmp_t')",
        "42809",
        "is a temporary table",
    ),
    (
        "SELECT foreshadow.make_global('u_unlogged')",
        "42809",
        "is an unlogged table",
    ),
    (
        "SELECT foreshadow.make_global('pg_catalog.pg_class')",
        "42809",
        "is a system table",
    ),
    (
        "SELECT foreshadow.make_global('foreshadow.tables')",
        "42809",
        "belongs to Foreshadow",
    ),
    (
        "SELECT foreshadow.make_global('accounts')",
        "42710",
        "already global",
    ),
    (
        "SELECT foreshadow.drop_global('t_ok')",
        "42704",
        "is not global",
    ),
    (
        "SELECT foreshadow.reannounce('t_ok'::regclass)",
        "42704",
        "is not global",
    ),
    // A global table cannot be made unlogged: a crash would empty it here
    // while its versions say the rows exist.
    (
        "ALTER TABLE accounts SET UNLOGGED",
        "55000",
        "cannot be unlogged",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_api_arguments_are_refused_clearly_and_awkward_names_replicate() {
    let lab = lab("badsqlapi", 2, 5).await;
    let r = names(&lab);
    let weird = "CREATE SCHEMA \"Sch ëma\"; \
         CREATE TABLE \"Sch ëma\".\"we\"\"ird ta-ble\" (\"select\" int PRIMARY KEY, \"Ünï Côde\" text, \
             \"has space\" bigint NOT NULL DEFAULT 0, \"order\" text); \
         SELECT foreshadow.make_global('\"Sch ëma\".\"we\"\"ird ta-ble\"'); \
         SELECT foreshadow.set_column_strategy('\"Sch ëma\".\"we\"\"ird ta-ble\"', 'has space', 'counter'); \
         CREATE SCHEMA other; CREATE TABLE other.accounts (id int PRIMARY KEY, v text); \
         SELECT foreshadow.make_global('other.accounts');";
    lab.everywhere(weird).await.unwrap();
    let a = lab.client(&r[0]).await.unwrap();
    a.batch_execute(
        "CREATE TABLE t_ok (id int PRIMARY KEY); \
         CREATE VIEW v_view AS SELECT 1 AS id; \
         CREATE MATERIALIZED VIEW m_view AS SELECT 1 AS id; \
         CREATE TABLE p_parted (id int PRIMARY KEY) PARTITION BY RANGE (id); \
         CREATE TABLE p_parted_1 PARTITION OF p_parted FOR VALUES FROM (0) TO (100); \
         CREATE TEMPORARY TABLE tmp_t (id int PRIMARY KEY); \
         CREATE UNLOGGED TABLE u_unlogged (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let mut wrong = Vec::new();
    for (sql, code, words) in REFUSED {
        match a.batch_execute(sql).await {
            Ok(()) => wrong.push(format!("{sql}: accepted")),
            Err(e) => {
                let got = pg_error(&e);
                if !got.starts_with(code) || !got.contains(words) {
                    wrong.push(format!("{sql}: {got} (expected {code} with {words:?})"));
                }
            }
        }
    }
    // STRICT functions: NULL in, NULL out, nothing done (PostgreSQL's rule).
    for sql in [
        "SELECT foreshadow.reannounce(NULL)::text",
        "SELECT foreshadow.table_digest(NULL)",
    ] {
        match a.query_one(sql, &[]).await {
            Ok(row) if row.get::<_, Option<String>>(0).is_none() => {}
            other => wrong.push(format!("{sql}: {other:?} (expected NULL)")),
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused as expected:\n{}",
        wrong.join("\n")
    );
    // Nothing half-done by the refusals.
    let globals: i64 = a
        .query_one("SELECT count(*) FROM foreshadow.global_tables", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(globals, 3, "accounts, the awkward table and other.accounts");
    // The awkward names replicate, counters and all, and so does the rest.
    a.batch_execute(
        "INSERT INTO \"Sch ëma\".\"we\"\"ird ta-ble\" VALUES (1, 'ça va? \"quoted\" ''single''', 5, 'by'); \
         INSERT INTO other.accounts VALUES (1, 'other schema'); \
         INSERT INTO accounts VALUES (1, 'a', 1, 'after the refusals');",
    )
    .await
    .unwrap();
    let b = &r[1];
    for (sql, want) in [
        (
            "SELECT \"Ünï Côde\" || '/' || \"has space\" || '/' || \"order\" FROM \"Sch ëma\".\"we\"\"ird ta-ble\" WHERE \"select\" = 1",
            "ça va? \"quoted\" 'single'/5/by",
        ),
        ("SELECT v FROM other.accounts WHERE id = 1", "other schema"),
        ("SELECT note FROM accounts WHERE id = 1", "after the refusals"),
    ] {
        wait_for(&lab, b, sql, Some(want), CONVERGE).await.unwrap();
    }
    lab.client(b)
        .await
        .unwrap()
        .batch_execute(
            "UPDATE \"Sch ëma\".\"we\"\"ird ta-ble\" SET \"has space\" = \"has space\" + 2",
        )
        .await
        .unwrap();
    a.batch_execute(
        "UPDATE \"Sch ëma\".\"we\"\"ird ta-ble\" SET \"has space\" = \"has space\" + 3",
    )
    .await
    .unwrap();
    wait_for_everywhere(
        &lab,
        "SELECT \"has space\"::text FROM \"Sch ëma\".\"we\"\"ird ta-ble\"",
        Some("10"),
        CONVERGE,
    )
    .await
    .unwrap();
    let letters = dead_letters(&lab).await;
    assert!(
        letters.split("; ").all(|r| r.ends_with(": 0 ")),
        "nothing dead-lettered: {letters}"
    );
}
