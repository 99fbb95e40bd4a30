//! Bad input, surface 5 of 5: peers (one that does not exist, one that
//! accepts connections and never answers, a region cut off), the lab's and
//! the sidecar's life cycle, and a few SQL API refusals with their hints.
//! Each gets a clear error or a logged state, and replication of
//! everything else goes on. (Surfaces 1-4: `bad_input_sql.rs`,
//! `bad_input_config.rs`, `bad_input_intents.rs`, `bad_input_rows.rs`.)

mod common;

use common::{assert_converged, lab, names};
use foreshadow_lab::proc::sibling_binary;
use foreshadow_lab::Fault;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_api_refuses_bad_tables_and_strategies_with_clear_errors() {
    let lab = lab("badsql", 1, 0).await;
    let c = lab.client(&names(&lab)[0]).await.unwrap();
    c.batch_execute("CREATE TABLE nopk (v int)").await.unwrap();
    let e = c
        .batch_execute("SELECT foreshadow.make_global('nopk')")
        .await
        .unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42P16");
    assert!(db.message().contains("nopk has no primary key"), "{db:?}");
    assert!(db.hint().unwrap().contains("ADD PRIMARY KEY"));
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let e = c
        .batch_execute("SELECT foreshadow.make_global('t', strategy => 'fancy')")
        .await
        .unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "22023");
    assert!(
        db.message()
            .contains("unknown conflict strategy \"fancy\" for table public.t"),
        "{db:?}"
    );
    assert!(db.hint().unwrap().contains("lww"));
    let e = c
        .batch_execute("SELECT foreshadow.make_global('missing')")
        .await
        .unwrap_err();
    assert!(e
        .as_db_error()
        .unwrap()
        .message()
        .contains("\"missing\" does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_pointing_nowhere_and_cut_region_do_not_stop_the_others() {
    let lab = lab("deadpeer", 3, 0).await;
    let r = names(&lab);
    // A "peer" that accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    // Region 1's sidecar gets two extra peers: one that does not exist,
    // one that never answers.
    lab.fault(&r[0], Fault::KillSidecar).unwrap();
    let mut config = lab.sidecar_config(&r[0]).unwrap();
    config = config.replacen(
        "\n[apply]",
        &format!(
            "\n[[peers]]\nname = \"ghost\"\ndsn = \"host=127.0.0.1 port=1 user=x dbname=app\"\n\
             \n[[peers]]\nname = \"silent\"\ndsn = \"host=127.0.0.1 port={silent_port} user=x dbname=app\"\n\n[apply]"
        ),
        1,
    );
    lab.start_sidecar_with(&r[0], &config).unwrap();
    // And region 3 is cut off from everyone.
    lab.fault(&r[2], Fault::Cut).unwrap();
    lab.client(&r[1])
        .await
        .unwrap()
        .batch_execute("INSERT INTO accounts VALUES (1, 'b', 1, 'while cut')")
        .await
        .unwrap();
    let a = lab.client(&r[0]).await.unwrap();
    let mut arrived = false;
    for _ in 0..100 {
        if a.query_one("SELECT count(*) FROM accounts", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
        {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        arrived,
        "a write in {} did not reach {} while a peer was dead and another cut",
        r[1], r[0]
    );
    let log = std::fs::read_to_string(lab.region_dir(&r[0]).join("sidecar.log")).unwrap();
    assert!(
        log.contains("peer=ghost") && log.contains("retrying"),
        "the dead peer is not logged:\n{log}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let silent_logged = |log: &str| {
        log.lines()
            .any(|l| l.contains("peer=silent") && l.contains("retrying") && l.contains("timed out"))
    };
    let mut log = log;
    while !silent_logged(&log) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        log = std::fs::read_to_string(lab.region_dir(&r[0]).join("sidecar.log")).unwrap();
    }
    assert!(
        silent_logged(&log),
        "the silent peer's timeout is not logged:\n{log}"
    );
    assert!(!log.contains("password"), "log mentions a password");
    // Healing lets the cut region catch up.
    lab.fault(&r[2], Fault::Heal).unwrap();
    assert_converged(&lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intent_for_a_table_that_is_not_global_here_is_kept_not_lost() {
    let lab = lab("deadletter", 2, 0).await;
    let r = names(&lab);
    // Only region 1 makes this table global.
    lab.everywhere("CREATE TABLE only_a (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let a = lab.client(&r[0]).await.unwrap();
    a.batch_execute("SELECT foreshadow.make_global('only_a'); INSERT INTO only_a VALUES (1, 'x')")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO accounts VALUES (7, 'a', 7, 'after the odd one')")
        .await
        .unwrap();
    // Replication goes on past it, and the intent is kept with its reason.
    assert_converged(&lab).await;
    let b = lab.client(&r[1]).await.unwrap();
    let row = b
        .query_one("SELECT reason, intent FROM foreshadow.dead_letters", &[])
        .await
        .unwrap();
    assert!(row
        .get::<_, String>(0)
        .contains("public.only_a is not a global table"));
    assert!(row.get::<_, String>(1).contains("\"x\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_on_a_used_dir_is_refused_clearly() {
    let lab = lab("twice", 1, 0).await;
    let again = foreshadow_lab::Lab::up(foreshadow_lab::UpOptions {
        dir: lab.dir.clone(),
        regions: 1,
        wan_ms: 0,
        engine: foreshadow_lab::spec::Engine::Foreshadow,
        tls: false,
    })
    .await;
    let err = again.err().expect("second up on the same dir is refused");
    assert!(
        err.contains("already holds a lab") && err.contains("foreshadow-lab down"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_exits_cleanly_on_sigterm() {
    let lab = lab("sigterm", 2, 0).await;
    let region = names(&lab)[0].clone();
    lab.fault(&region, Fault::KillSidecar).unwrap();
    let config = lab.region_dir(&region).join("sidecar.toml");
    let child = Command::new(sibling_binary("foreshadow-sidecar"))
        .args(["--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(foreshadow_lab::proc::signal(child.id(), "TERM"));
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains("SIGTERM") && log.contains("foreshadow sidecar stopped"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_column_strategy_refuses_bad_columns_with_clear_errors() {
    let lab = lab("badcounter", 1, 0).await;
    let c = lab.client(&names(&lab)[0]).await.unwrap();
    let refused = |sql: &'static str| {
        let c = &c;
        async move {
            let e = c.batch_execute(sql).await.unwrap_err();
            let db = e.as_db_error().unwrap().clone();
            (db.code().code().to_string(), db.message().to_string())
        }
    };
    let (code, msg) =
        refused("SELECT foreshadow.set_column_strategy('accounts', 'id', 'counter')").await;
    assert_eq!(code, "22023");
    assert!(msg.contains("part of the primary key"), "{msg}");
    let (code, msg) =
        refused("SELECT foreshadow.set_column_strategy('accounts', 'nope', 'counter')").await;
    assert_eq!(code, "42703", "{msg}");
    let (code, msg) =
        refused("SELECT foreshadow.set_column_strategy('accounts', 'balance', 'sum')").await;
    assert_eq!(code, "22023");
    assert!(msg.contains("unknown column strategy \"sum\""), "{msg}");
    c.batch_execute("CREATE TABLE plain_t (id int PRIMARY KEY, n int)")
        .await
        .unwrap();
    let (code, _) =
        refused("SELECT foreshadow.set_column_strategy('plain_t', 'n', 'counter')").await;
    assert_eq!(code, "42704");
    // Nothing half-done: the table's columns are as they were.
    let counters: Vec<String> = c
        .query_one(
            "SELECT counter_columns FROM foreshadow.global_tables WHERE table_name = 'accounts'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(counters.is_empty());
}

#[test]
fn lab_cli_refuses_bad_engines_scenarios_and_sizes() {
    const NEVER: &str = "/tmp/foreshadow-never";
    // (arguments, words every refusal must contain)
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["up", "--dir", NEVER, "--engine", "bdr"],
            &[
                "invalid value 'bdr' for '--engine <ENGINE>'",
                "[possible values: foreshadow, pglogical, plain]",
            ],
        ),
        (
            &["bench", "speed"],
            &[
                "invalid value 'speed'",
                "overhead, lag, conflicts, catchup, footprint, all",
            ],
        ),
        (&["bench", "lag", "--regions", "9"], &["9 is not in 2..=5"]),
        (
            &["bench", "lag", "--seconds", "soon"],
            &["invalid value 'soon' for '--seconds"],
        ),
        (
            &["chaos", "--minutes", "1", "--seconds", "5"],
            &["cannot be used with"],
        ),
        (
            &[
                "link", "--dir", NEVER, "--from", "a", "--to", "b", "--heal", "--reset",
            ],
            &["cannot be used with"],
        ),
        (
            &[
                "link",
                "--dir",
                NEVER,
                "--from",
                "a",
                "--to",
                "b",
                "--loss-pct",
                "101",
            ],
            &["101 is not in 0..=100"],
        ),
        (
            &["fault", "--dir", NEVER, "--region", "a", "explode"],
            &["invalid value 'explode'"],
        ),
    ];
    for (args, words) in cases {
        let out = Command::new(sibling_binary("foreshadow-lab"))
            .args(*args)
            .output()
            .expect("runs the lab");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for w in *words {
            assert!(err.contains(w), "{args:?}: no {w:?} in {err}");
        }
    }
    assert!(!std::path::Path::new("/tmp/foreshadow-never").exists());
}
