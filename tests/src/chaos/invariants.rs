//! What must hold on every region once the faults are healed and the
//! regions are quiet, checked from outside (plain SQL, no Foreshadow
//! function): the tables converged, and each workload's own promises
//! (`workload::*::check`), e.g. every acknowledged insert is present
//! unless an acknowledged delete removed it, nothing refused or never
//! attempted is present, and every counter is the sum of its acknowledged
//! increments plus some of the in-doubt ones; no region showed a hot key
//! going back to a value it had moved past (monotonic reads), and no region
//! showed a value after a write made on reading it (causality: a
//! read-then-write supersedes what it read, in every region, whatever the
//! clocks say).

use super::workload::{History, WORKLOADS};
use crate::lab::Lab;
use std::time::{Duration, Instant};

pub struct Check {
    pub name: String,
    pub checked: usize,
    pub violated: usize,
    pub examples: Vec<String>,
}

impl Check {
    pub fn new(name: &str) -> Check {
        Check {
            name: name.into(),
            checked: 0,
            violated: 0,
            examples: Vec::new(),
        }
    }

    pub fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checked += 1;
        if !ok {
            self.violated += 1;
            if self.examples.len() < 10 {
                self.examples.push(what());
            }
        }
    }
}

const QUIET: Duration = Duration::from_secs(180);

/// md5 of `table`'s rows in key order, in every region, once they agree
/// (or as they are when `QUIET` has passed).
async fn settled_md5s(lab: &Lab, table: &str) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + QUIET;
    loop {
        let mut md5s = Vec::new();
        for r in &lab.spec.regions {
            md5s.push(
                crate::workload::plain_md5(lab, &r.name, table)
                    .await
                    .unwrap_or_else(|e| e),
            );
        }
        if md5s.iter().all(|m| *m == md5s[0]) || Instant::now() > deadline {
            return Ok(md5s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Convergence of every workload's tables, then each workload's own checks.
pub async fn check(lab: &Lab, history: &History) -> Result<Vec<Check>, String> {
    let mut converged = Check::new("converged (md5 of each table, every region)");
    let mut checks = Vec::new();
    for (w, _) in WORKLOADS {
        for t in w.tables() {
            let md5s = settled_md5s(lab, t).await?;
            converged.expect(md5s.iter().all(|m| *m == md5s[0]), || {
                format!("{t}: {md5s:?}")
            });
        }
    }
    for (w, _) in WORKLOADS {
        checks.extend(w.check(lab, history).await?);
    }
    checks.insert(0, converged);
    Ok(checks)
}
