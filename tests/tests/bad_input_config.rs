//! Bad input, surface 2 of 5: the sidecar's config file. Every key wrong in
//! turn, files that cannot be read, duplicate regions and a region that is
//! its own peer: `foreshadow-sidecar --check-config` (the same load the
//! service runs at start) exits with EX_CONFIG (78, which systemd does not
//! restart on) and a message naming the key or the file.

use foreshadow_lab::proc::sibling_binary;
use std::path::Path;
use std::process::Command;

const GOOD: &str = "region = \"a\"\n\
    primary = \"host=127.0.0.1 user=x dbname=app\"\n\
    [[peers]]\nname = \"b\"\ndsn = \"host=127.0.0.1 port=1 user=x dbname=app\"\n\
    [apply]\nbatch_changes = 100\npeer_timeout_ms = 1000\nmax_backoff_ms = 1000\n";

fn check(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(sibling_binary("foreshadow-sidecar"))
        .args(["--config", path.to_str().unwrap(), "--check-config"])
        .output()
        .expect("runs the sidecar");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn every_bad_config_is_refused_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("foreshadow-badconfig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sidecar.toml");
    let run = |text: &str| {
        std::fs::write(&path, text).unwrap();
        check(&path)
    };
    assert_eq!(run(GOOD).0, Some(0), "{}", run(GOOD).1);
    // (what is changed, the changed file, words the refusal must contain)
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown top-level key", GOOD.replace("region", "regoin"), "unknown field `regoin`"),
        ("region missing", GOOD.replace("region = \"a\"\n", ""), "missing field `region`"),
        ("region empty", GOOD.replace("region = \"a\"", "region = \"\""), "`region`: region name \"\""),
        ("region with capitals", GOOD.replace("region = \"a\"", "region = \"US East\""), "`region`: region name \"US East\""),
        ("region not a string", GOOD.replace("region = \"a\"", "region = 7"), "invalid type: integer `7`, expected a string"),
        ("primary missing", GOOD.replace("primary = \"host=127.0.0.1 user=x dbname=app\"\n", ""), "missing field `primary`"),
        ("primary not a DSN", GOOD.replace("primary = \"host=127.0.0.1 user=x dbname=app\"", "primary = \"host=127.0.0.1 port=x\""), "`primary`: not a valid connection string"),
        ("primary sslmode unknown", GOOD.replace("user=x dbname=app\"\n[[", "user=x dbname=app sslmode=sometimes\"\n[["), "invalid sslmode \"sometimes\""),
        ("primary sslrootcert missing", GOOD.replace("user=x dbname=app\"\n[[", "user=x dbname=app sslmode=verify-full sslrootcert=/nonexistent/ca.crt\"\n[["), "primary"),
        ("peers not a list", GOOD.replace("[[peers]]", "[peers]"), "peers"),
        ("peer without a name", GOOD.replace("name = \"b\"\n", ""), "missing field `name`"),
        ("peer without a dsn", GOOD.replace("dsn = \"host=127.0.0.1 port=1 user=x dbname=app\"\n", ""), "missing field `dsn`"),
        ("peer name with a space", GOOD.replace("name = \"b\"", "name = \"b c\""), "peers[0].name"),
        ("peer dsn not a DSN", GOOD.replace("port=1", "port=x"), "peers[0].dsn"),
        ("peer unknown key", GOOD.replace("name = \"b\"\n", "name = \"b\"\nlag = 3\n"), "unknown field `lag`"),
        ("a region that is its own peer", GOOD.replace("name = \"b\"", "name = \"a\""), "`peers[0].name`: region \"a\" appears twice"),
        ("duplicate peers", format!("{GOOD}[[peers]]\nname = \"b\"\ndsn = \"host=127.0.0.1 port=2\"\n"), "region \"b\" appears twice"),
        ("peers that clash as slot names", format!("{GOOD}[[peers]]\nname = \"b_c\"\ndsn = \"host=127.0.0.1 port=2\"\n[[peers]]\nname = \"b-c\"\ndsn = \"host=127.0.0.1 port=3\"\n"), "region \"b-c\" appears twice"),
        ("apply.batch_changes zero", GOOD.replace("batch_changes = 100", "batch_changes = 0"), "`apply.batch_changes`: must be at least 1"),
        ("apply.batch_changes negative", GOOD.replace("batch_changes = 100", "batch_changes = -5"), "batch_changes"),
        ("apply.batch_changes a string", GOOD.replace("batch_changes = 100", "batch_changes = \"many\""), "batch_changes"),
        ("apply.peer_timeout_ms zero", GOOD.replace("peer_timeout_ms = 1000", "peer_timeout_ms = 0"), "peer_timeout_ms"),
        ("apply.max_backoff_ms zero", GOOD.replace("max_backoff_ms = 1000", "max_backoff_ms = 0"), "max_backoff_ms"),
        ("apply unknown key", GOOD.replace("[apply]\n", "[apply]\nthreads = 4\n"), "unknown field `threads`"),
        ("empty file", String::new(), "missing field"),
        ("not TOML", "region: a\nprimary: b\n".to_string(), "TOML"),
    ];
    let mut wrong = Vec::new();
    for (what, text, words) in &cases {
        let (code, out) = run(text);
        if code != Some(78) || !out.contains(words) {
            wrong.push(format!(
                "{what}: exit {code:?}, {out:?} (expected 78 and {words:?})"
            ));
        }
        assert!(
            !out.contains("password"),
            "{what}: output mentions a password"
        );
    }
    // Files that cannot be read as a config at all.
    for (what, p, words) in [
        ("no such file", dir.join("missing.toml"), "missing.toml"),
        ("a directory", dir.clone(), "cannot read"),
    ] {
        let (code, out) = check(&p);
        if code != Some(78) || !out.contains(words) {
            wrong.push(format!(
                "{what}: exit {code:?}, {out:?} (expected 78 and {words:?})"
            ));
        }
    }
    std::fs::write(&path, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let (code, out) = check(&path);
    if code != Some(78) || !out.contains("sidecar.toml") {
        wrong.push(format!("not UTF-8: exit {code:?}, {out:?}"));
    }
    assert!(
        wrong.is_empty(),
        "config not refused as expected:\n{}",
        wrong.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_command_lines_are_refused_with_usage() {
    let run = |args: &[&str]| {
        let out = Command::new(sibling_binary("foreshadow-sidecar"))
            .args(args)
            .output()
            .expect("runs the sidecar");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--config <CONFIG>"), "{err}");
    let (code, err) = run(&["--config", "x", "--check-config", "--resync-peer", "b"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = run(&["--config"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("a value is required"), "{err}");
}
