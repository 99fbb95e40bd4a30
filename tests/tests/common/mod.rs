//! Shared by the integration tests: a lab per test, torn down on drop.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod carts;

use foreshadow_lab::{Lab, UpOptions};
use std::ops::Deref;
use std::time::Duration;

pub struct TestLab(pub Option<Lab>);

impl Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.0.as_ref().expect("lab is up")
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Some(lab) = self.0.take() {
            // On failure keep the directory (logs) for inspection.
            let keep = std::thread::panicking();
            if keep {
                eprintln!("lab logs kept in {}", lab.dir.display());
            }
            let _ = lab.down(keep);
        }
    }
}

pub async fn lab(name: &str, regions: usize, wan_ms: u64) -> TestLab {
    lab_with(name, regions, wan_ms, false).await
}

/// A lab whose sidecars connect with TLS (verify-full) and SCRAM if `tls`.
pub async fn lab_with(name: &str, regions: usize, wan_ms: u64, tls: bool) -> TestLab {
    let dir = std::env::temp_dir().join(format!("foreshadow-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let lab = Lab::up(UpOptions {
        dir,
        regions,
        wan_ms,
        engine: foreshadow_lab::spec::Engine::Foreshadow,
        tls,
    })
    .await
    .expect("lab up");
    lab.everywhere(foreshadow_lab::workload::ACCOUNTS_DDL)
        .await
        .expect("create accounts");
    TestLab(Some(lab))
}

pub const CONVERGE: Duration = Duration::from_secs(90);

/// `fault` (a cut, a heal) on each of `regions`.
pub fn fault_all(lab: &Lab, regions: &[String], fault: foreshadow_lab::Fault) {
    for region in regions {
        lab.fault(region, fault).unwrap();
    }
}

pub fn names(lab: &Lab) -> Vec<String> {
    lab.spec.regions.iter().map(|r| r.name.clone()).collect()
}

pub async fn scalar_i64(lab: &Lab, region: &str, sql: &str) -> i64 {
    lab.client(region)
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// Converged by Foreshadow's digest and by an independent md5 of the rows.
pub async fn assert_converged(lab: &Lab) -> String {
    let digest = lab
        .wait_converged("public.accounts", CONVERGE)
        .await
        .expect("converged");
    let mut md5s = Vec::new();
    for r in names(lab) {
        md5s.push(
            foreshadow_lab::workload::plain_md5(lab, &r, "accounts")
                .await
                .unwrap(),
        );
    }
    assert!(
        md5s.iter().all(|m| *m == md5s[0]),
        "independent md5s differ: {md5s:?}"
    );
    digest
}

/// The one value (as text, NULL as None) that `sql` returns in `region`.
pub async fn text_in(lab: &Lab, region: &str, sql: &str) -> Result<Option<String>, String> {
    let c = lab.client(region).await?;
    let row = c
        .query_one(sql, &[])
        .await
        .map_err(|e| format!("region {region}: {sql}: {}", pg_error(&e)))?;
    Ok(row.get(0))
}

/// Runs `sql` (any statements) in `region`; a failure names the region,
/// the statement and the error.
pub async fn run(lab: &Lab, region: &str, sql: &str) {
    let c = lab.client(region).await.unwrap();
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{region}: {sql}: {}", pg_error(&e)));
}

/// A PostgreSQL error as `SQLSTATE: message`, or the client error.
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Polls `sql` (one text value) in `region` until it returns `expected`
/// (None: NULL); the error names the last answer.
pub async fn wait_for(
    lab: &Lab,
    region: &str,
    sql: &str,
    expected: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let got = text_in(lab, region, sql).await;
        if matches!(&got, Ok(v) if v.as_deref() == expected) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "region {region}: `{sql}` gave {got:?}, not {expected:?}, after {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `wait_for` in every region.
pub async fn wait_for_everywhere(
    lab: &Lab,
    sql: &str,
    expected: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    for r in names(lab) {
        wait_for(lab, &r, sql, expected, timeout).await?;
    }
    Ok(())
}

/// Runs `setup` (session settings) then `sql` (one text value) in every
/// region until all regions give the same answer; returns it.
pub async fn wait_same_with(
    lab: &Lab,
    setup: &str,
    sql: &str,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        for r in names(lab) {
            let answer = async {
                let c = lab.client(&r).await?;
                c.batch_execute(setup).await.map_err(|e| pg_error(&e))?;
                let row = c.query_one(sql, &[]).await.map_err(|e| pg_error(&e))?;
                Ok::<Option<String>, String>(row.get(0))
            }
            .await;
            seen.push((r, answer));
        }
        if let Ok(first) = &seen[0].1 {
            if seen.iter().all(|(_, a)| a.as_ref() == Ok(first)) {
                return Ok(first.clone().unwrap_or_default());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "`{sql}` not the same in every region after {timeout:?}: {seen:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// For failure messages: the rows (`sql` returns key text, row text, after
/// `setup`) that differ between regions, at most ten keys.
pub async fn diff_rows(lab: &Lab, setup: &str, sql: &str) -> String {
    use std::collections::{BTreeMap, BTreeSet};
    let mut per_region = Vec::new();
    for r in names(lab) {
        let mut rows = BTreeMap::new();
        if let Ok(c) = lab.client(&r).await {
            let _ = c.batch_execute(setup).await;
            match c.query(sql, &[]).await {
                Ok(found) => {
                    for row in found {
                        rows.insert(row.get::<_, String>(0), row.get::<_, Option<String>>(1));
                    }
                }
                Err(e) => return format!("region {r}: {}", pg_error(&e)),
            }
        }
        per_region.push((r, rows));
    }
    let keys: BTreeSet<&String> = per_region.iter().flat_map(|(_, m)| m.keys()).collect();
    let differing: Vec<String> = keys
        .into_iter()
        .filter(|k| {
            let first = per_region[0].1.get(*k);
            per_region.iter().any(|(_, m)| m.get(*k) != first)
        })
        .map(|k| {
            let each: Vec<String> = per_region
                .iter()
                .map(|(r, m)| {
                    format!(
                        "{r}: {:?}",
                        m.get(k).map(|v| v.as_deref().unwrap_or("NULL"))
                    )
                })
                .collect();
            format!("key {k}: {}", each.join(", "))
        })
        .collect();
    format!(
        "{} differing keys{}{}",
        differing.len(),
        if differing.is_empty() {
            ""
        } else {
            ", e.g.\n  "
        },
        differing
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    )
}

/// For failure messages: every region's dead letters (count and reasons).
pub async fn dead_letters(lab: &Lab) -> String {
    let mut out = Vec::new();
    for r in names(lab) {
        let got = text_in(
            lab,
            &r,
            "SELECT count(*) || ' ' || coalesce(string_agg(reason, ' | ' ORDER BY id), '') FROM foreshadow.dead_letters",
        )
        .await;
        out.push(format!(
            "{r}: {}",
            got.map(|v| v.unwrap_or_default()).unwrap_or_else(|e| e)
        ));
    }
    out.join("; ")
}

/// A session in `region` as the login role `role` (the lab trusts local TCP).
pub async fn client_as(lab: &Lab, region: &str, role: &str) -> tokio_postgres::Client {
    let dsn = lab
        .dsn(region, foreshadow_lab::lab::DATABASE)
        .unwrap()
        .replace("user=postgres", &format!("user={role}"));
    foreshadow_lab::lab::connect(&dsn).await.unwrap()
}

/// An ordinary login role (no superuser, no other attributes) in every region.
pub async fn create_login_role(lab: &Lab, role: &str) {
    lab.everywhere(&format!(
        "CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
    ))
    .await
    .unwrap();
}

/// A login role in every region of `lab` that may create tables (and so
/// own global tables) in schema public.
pub async fn create_table_owner(lab: &Lab, role: &str) {
    create_login_role(lab, role).await;
    lab.everywhere(&format!("GRANT CREATE ON SCHEMA public TO {role}"))
        .await
        .unwrap();
}

/// `region`'s sidecar configuration without the peer `peer`.
pub fn sidecar_config_without(lab: &Lab, region: &str, peer: &str) -> String {
    let text = lab.sidecar_config(region).unwrap();
    let start = text
        .find(&format!("\n[[peers]]\nname = \"{peer}\"\n"))
        .unwrap_or_else(|| panic!("no peer {peer} in {text}"));
    let end = text[start + 1..]
        .find("\n[")
        .map(|i| start + 1 + i)
        .unwrap_or(text.len());
    format!("{}{}", &text[..start], &text[end..])
}

/// A real write in `from` after everything else, arrived in every region
/// of `to`: whatever came before it on those links has been dealt with.
pub async fn barrier(lab: &Lab, from: &str, to: &[String], id: i64) {
    lab.client(from)
        .await
        .unwrap()
        .execute(
            "INSERT INTO accounts VALUES ($1, 'barrier', 1, NULL)",
            &[&id],
        )
        .await
        .unwrap();
    for r in to {
        wait_for(
            lab,
            r,
            &format!("SELECT region FROM accounts WHERE id = {id}"),
            Some("barrier"),
            CONVERGE,
        )
        .await
        .unwrap();
    }
}
