//! Bad input, surface 4 of 5: rows and transactions of awkward sizes. A
//! row as wide as PostgreSQL allows (1,500 columns, most of them NULL and
//! some TOASTed), and one transaction that writes three thousand global tables,
//! arrive whole and identical. (A million-row transaction and a 200 MB
//! value are in `large_transactions.rs`, with the sidecar's memory.)

mod common;

use common::{lab, names, wait_for, CONVERGE};
use foreshadow_lab::Fault;

const COLUMNS: usize = 1_500;
const TABLES: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widest_rows_arrive_whole() {
    let lab = lab("badrows-wide", 2, 5).await;
    let r = names(&lab);
    let cols: Vec<String> = (1..COLUMNS)
        .map(|i| {
            let ty = ["int", "text", "numeric", "boolean", "jsonb"][i % 5];
            format!("c{i} {ty}")
        })
        .collect();
    lab.everywhere(&format!(
        "CREATE TABLE wide (id int PRIMARY KEY, {}); SELECT foreshadow.make_global('wide');",
        cols.join(", ")
    ))
    .await
    .unwrap();
    // Every fifth column set; one value large enough to be TOASTed.
    let a = lab.client(&r[0]).await.unwrap();
    let set: Vec<(String, String)> = (1..COLUMNS)
        .filter(|i| i % 5 == 1 || i % 7 == 0)
        .map(|i| {
            let v = match i % 5 {
                0 => format!("{i}"),
                1 if i == 1 => "repeat('wide ', 100000)".to_string(),
                1 => format!("'t{i} ☃'"),
                2 => format!("{i}.{i}"),
                3 => "true".into(),
                _ => format!("'{{\"k\": {i}}}'"),
            };
            (format!("c{i}"), v)
        })
        .collect();
    let (names_, values): (Vec<_>, Vec<_>) = set.into_iter().unzip();
    a.batch_execute(&format!(
        "INSERT INTO wide (id, {}) VALUES (1, {}); UPDATE wide SET c{} = 42 WHERE id = 1",
        names_.join(", "),
        values.join(", "),
        COLUMNS - 5 // an int column
    ))
    .await
    .unwrap();
    let digest = "SELECT md5(w::text) FROM wide w WHERE id = 1";
    let want: String = a.query_one(digest, &[]).await.unwrap().get(0);
    wait_for(&lab, &r[1], digest, Some(&want), CONVERGE)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_over_three_thousand_tables_applies_whole() {
    let lab = lab("badrows-tables", 2, 5).await;
    let r = names(&lab);
    // A transaction that locks thousands of tables (and their indexes)
    // needs room in PostgreSQL's lock table, at the writer and at every
    // region that applies it: the operator's setting, not Foreshadow's.
    lab.everywhere("ALTER SYSTEM SET max_locks_per_transaction = 512")
        .await
        .unwrap();
    for region in &r {
        lab.fault(region, Fault::StopPg).unwrap();
        lab.fault(region, Fault::StartPg).unwrap();
    }
    for batch in (1..=TABLES).step_by(500) {
        lab.everywhere(&format!(
            "DO $$ BEGIN FOR i IN {batch}..{} LOOP \
               EXECUTE format('CREATE TABLE many_%s (id int PRIMARY KEY, v text)', i); \
               PERFORM foreshadow.make_global(format('many_%s', i)::regclass); \
             END LOOP; END $$;",
            batch + 499
        ))
        .await
        .unwrap();
    }
    lab.client(&r[0])
        .await
        .unwrap()
        .batch_execute(&format!(
            "DO $$ BEGIN FOR i IN 1..{TABLES} LOOP \
               EXECUTE format('INSERT INTO many_%s VALUES (1, %L)', i, 'row of ' || i); \
             END LOOP; END $$;"
        ))
        .await
        .unwrap();
    // One transaction: the last table's row arrives with all the others.
    wait_for(
        &lab,
        &r[1],
        &format!("SELECT v FROM many_{TABLES}"),
        Some(&format!("row of {TABLES}")),
        CONVERGE,
    )
    .await
    .unwrap();
    let sum = format!(
        "SELECT ({}) ::text",
        (1..=TABLES)
            .map(|i| format!("(SELECT count(*) FROM many_{i} WHERE v = 'row of {i}')"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    wait_for(&lab, &r[1], &sum, Some(&TABLES.to_string()), CONVERGE)
        .await
        .unwrap();
}
