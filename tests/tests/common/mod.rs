//! Shared by the integration tests: a lab per test, torn down on drop.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

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
    let dir = std::env::temp_dir().join(format!("foreshadow-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let lab = Lab::up(UpOptions {
        dir,
        regions,
        wan_ms,
        engine: foreshadow_lab::spec::Engine::Foreshadow,
    })
    .await
    .expect("lab up");
    lab.everywhere(foreshadow_lab::workload::ACCOUNTS_DDL)
        .await
        .expect("create accounts");
    TestLab(Some(lab))
}

pub const CONVERGE: Duration = Duration::from_secs(90);

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
