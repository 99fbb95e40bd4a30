//! pgbench, PostgreSQL's standard TPC-B-like benchmark, against lab regions.

use super::sampling::Progress;
use crate::lab::{Lab, DATABASE};
use crate::proc::PG_BIN;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

pub const TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

/// The balance columns that pgbench's transaction adds `delta` to.
pub const BALANCES: [(&str, &str, &str); 3] = [
    ("pgbench_accounts", "abalance", "aid"),
    ("pgbench_tellers", "tbalance", "tid"),
    ("pgbench_branches", "bbalance", "bid"),
];

/// pgbench connecting to `region` as the superuser.
fn pgbench(lab: &Lab, region: &str) -> Result<tokio::process::Command, String> {
    let port = lab.spec.region(region)?.port.to_string();
    let mut cmd = tokio::process::Command::new(format!("{PG_BIN}/pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"]);
    Ok(cmd)
}

/// Loads the same pgbench data into every region of `lab` (database
/// `app`), gives pgbench_history a primary key (replication needs one, and
/// a random UUID keeps regions from colliding), and replicates the tables
/// with the lab's engine. `counters`: balance columns as counters.
pub async fn load(lab: &Lab, scale: u32, counters: bool) -> Result<(), String> {
    for r in &lab.spec.regions {
        load_database(lab, &r.name, DATABASE, scale).await?;
    }
    for t in TABLES {
        let counter: Vec<&str> = BALANCES
            .iter()
            .filter(|(table, _, _)| counters && *table == t)
            .map(|(_, col, _)| *col)
            .collect();
        // Every region loaded the same rows: nothing to announce.
        lab.replicate_table(&format!("public.{t}"), &counter, false)
            .await?;
    }
    Ok(())
}

/// `pgbench -i` into one database of one region.
pub async fn load_database(lab: &Lab, region: &str, db: &str, scale: u32) -> Result<(), String> {
    let out = pgbench(lab, region)?
        .args(["-i", "-q", "-I", "dtgvp", "-s", &scale.to_string(), db])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run pgbench: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pgbench -i in region {region} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    crate::lab::connect(&lab.dsn(region, db)?)
        .await?
        .batch_execute(
            "ALTER TABLE pgbench_history ADD COLUMN hid uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY",
        )
        .await
        .map_err(|e| format!("region {region}: {e}"))
}

/// What one pgbench run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Run {
    pub region: String,
    pub tps: f64,
    pub transactions: u64,
    pub failed: u64,
    /// (second, tps) from `--progress 1`.
    #[serde(rename = "per_second_tps")]
    pub per_second: Vec<(f64, f64)>,
}

/// Runs pgbench's TPC-B-like script against `db` in every region of
/// `regions` at once for `seconds`, printing progress. Deadlocks and
/// serialization failures (a local transaction against an applying
/// replication session) are retried by pgbench, as an application would.
pub async fn run_everywhere(
    lab: &Lab,
    regions: &[String],
    db: &str,
    clients: u32,
    seconds: u64,
    label: &str,
) -> Result<Vec<Run>, String> {
    let mut tasks = Vec::new();
    // Each region's latest per-second TPS, for the progress line.
    let now: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(vec![0.0; regions.len()]));
    for (i, region) in regions.iter().enumerate() {
        let mut cmd = pgbench(lab, region)?;
        cmd.args(["-n", "-c", &clients.to_string(), "-j", &clients.to_string()])
            .args([
                "-T",
                &seconds.to_string(),
                "-P",
                "1",
                "--max-tries",
                "100",
                db,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run pgbench: {e}"))?;
        let latest = now.clone();
        let report = move |tps: f64| latest.lock().unwrap()[i] = tps;
        tasks.push(tokio::spawn(collect(child, region.clone(), report)));
    }
    let mut progress = Progress::new(label, Duration::from_secs(seconds));
    let mut runs = Vec::new();
    for t in tasks {
        while !t.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            progress.tick(|| format!("{:.0} TPS now", now.lock().unwrap().iter().sum::<f64>()));
        }
        runs.push(t.await.map_err(|e| e.to_string())??);
    }
    println!(
        "   [{label}] {}",
        runs.iter()
            .map(|r| format!("{}: {:.0} tps", r.region, r.tps))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(runs)
}

async fn collect(
    mut child: tokio::process::Child,
    region: String,
    report: impl Fn(f64),
) -> Result<Run, String> {
    let stderr = child.stderr.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut run = Run {
        region: region.clone(),
        ..Run::default()
    };
    let mut errors = String::new();
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // progress: 3.0 s, 812.1 tps, lat 4.9 ms stddev 2.1, 0 failed
        match parse_progress(&line) {
            Some(sample) => {
                report(sample.1);
                run.per_second.push(sample);
            }
            None => {
                errors.push_str(&line);
                errors.push('\n');
            }
        }
    }
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut out)
        .await
        .map_err(|e| e.to_string())?;
    let status = child.wait().await.map_err(|e| e.to_string())?;
    for line in out.lines() {
        if let Some(v) = line.strip_prefix("tps = ") {
            run.tps = v
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("number of transactions actually processed: ") {
            run.transactions = v
                .split('/')
                .next()
                .and_then(|x| x.trim().parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("number of failed transactions: ") {
            run.failed = v
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
        }
    }
    if !status.success() || run.transactions == 0 {
        return Err(format!(
            "pgbench in region {region} failed ({status}):\n{out}{errors}"
        ));
    }
    Ok(run)
}

/// The per-second TPS of all regions added up.
pub fn summed_per_second(runs: &[Run]) -> Vec<(f64, f64)> {
    let mut sum: std::collections::BTreeMap<u64, f64> = Default::default();
    for r in runs {
        for &(t, tps) in &r.per_second {
            *sum.entry(t as u64).or_default() += tps;
        }
    }
    sum.into_iter().map(|(t, v)| (t as f64, v)).collect()
}

fn parse_progress(line: &str) -> Option<(f64, f64)> {
    let rest = line.strip_prefix("progress: ")?;
    let mut parts = rest.split(", ");
    let t = parts.next()?.strip_suffix(" s")?.parse().ok()?;
    let tps = parts.next()?.strip_suffix(" tps")?.parse().ok()?;
    Some((t, tps))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_progress_lines() {
        assert_eq!(
            super::parse_progress("progress: 3.0 s, 812.1 tps, lat 4.9 ms stddev 2.1, 0 failed"),
            Some((3.0, 812.1))
        );
        assert_eq!(super::parse_progress("pgbench: error: x"), None);
    }
}
