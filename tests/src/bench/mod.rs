//! `foreshadow-lab bench <scenario>`: the same workload on Foreshadow, on
//! pglogical 2 and (where it makes sense) on plain PostgreSQL, side by side
//! in one run, written to `bench/results/` as JSON (every setting and raw
//! sample, for later comparison) and as a Markdown report with SVG plots.

mod catchup;
mod conflicts;
mod footprint;
mod lag;
mod overhead;
mod pgbench;
mod report;
mod sampling;

use crate::lab::{Lab, UpOptions};
use crate::spec::Engine;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use report::Report;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Overhead,
    Lag,
    Conflicts,
    Catchup,
    Footprint,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Overhead,
        Scenario::Lag,
        Scenario::Conflicts,
        Scenario::Catchup,
        Scenario::Footprint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Overhead => "overhead",
            Scenario::Lag => "lag",
            Scenario::Conflicts => "conflicts",
            Scenario::Catchup => "catchup",
            Scenario::Footprint => "footprint",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Scenario, String> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                format!("unknown scenario {s:?}: use overhead, lag, conflicts, catchup, footprint or all")
            })
    }
}

/// Settings shared by every scenario; `quick` shrinks them to a smoke run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub regions: usize,
    pub wan_ms: u64,
    /// Measured seconds per run (the outage length for `catchup`).
    pub seconds: u64,
    pub quick: bool,
    /// pgbench scale factor and clients per region.
    pub scale: u32,
    pub clients: u32,
    /// Steady write rate of the `lag` scenario, rows per second.
    pub rate: u64,
    /// Hot keys of the `conflicts` scenario.
    pub hot_keys: u64,
    pub out: PathBuf,
    /// Where the labs live while they run.
    pub work: PathBuf,
}

impl BenchOptions {
    pub fn settings(&self) -> Value {
        json!({
            "regions": self.regions, "wan_ms": self.wan_ms, "seconds": self.seconds,
            "quick": self.quick, "pgbench_scale": self.scale, "pgbench_clients_per_region": self.clients,
            "lag_rate_per_s": self.rate, "hot_keys": self.hot_keys,
        })
    }
}

/// Runs one scenario and writes its report; returns the JSON file's path.
pub async fn run(scenario: Scenario, opts: &BenchOptions) -> Result<PathBuf, String> {
    let started = chrono::Utc::now();
    let t0 = Instant::now();
    println!(
        "== bench {}: {} regions, {} ms WAN each way, {} s per run{}",
        scenario.name(),
        opts.regions,
        opts.wan_ms,
        opts.seconds,
        if opts.quick { " (quick)" } else { "" }
    );
    let mut report = Report::new(scenario.name(), started, opts);
    match scenario {
        Scenario::Overhead => overhead::run(opts, &mut report).await?,
        Scenario::Lag => lag::run(opts, &mut report).await?,
        Scenario::Conflicts => conflicts::run(opts, &mut report).await?,
        Scenario::Catchup => catchup::run(opts, &mut report).await?,
        Scenario::Footprint => footprint::run(opts, &mut report).await?,
    }
    report.set("duration_s", t0.elapsed().as_secs_f64());
    let path = report.write(&opts.out)?;
    println!(
        "== bench {} done in {:.0} s: {}",
        scenario.name(),
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(path)
}

/// A lab for one engine of one scenario; torn down when the closure is done
/// (its directory is kept, with the logs, if the closure failed).
async fn with_lab<T>(
    opts: &BenchOptions,
    engine: Engine,
    regions: usize,
    what: &str,
    body: impl AsyncFnOnce(&Lab) -> Result<T, String>,
) -> Result<T, String> {
    let dir = opts
        .work
        .join(format!("{what}-{}-{}", engine.name(), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "   [{what}/{}] starting a {regions}-region lab",
        engine.name()
    );
    let lab = Lab::up(UpOptions {
        dir: dir.clone(),
        regions,
        wan_ms: opts.wan_ms,
        engine,
        tls: false,
    })
    .await?;
    let result = body(&lab).await;
    if let Err(e) = &result {
        println!(
            "   [{what}/{}] failed: {e}; lab kept in {}",
            engine.name(),
            dir.display()
        );
    }
    lab.down(result.is_err())?;
    result
}

/// a ÷ b to three decimals; None when b is not positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| (a / b * 1000.0).round() / 1000.0)
}

pub fn default_out() -> PathBuf {
    Path::new("bench").join("results")
}
