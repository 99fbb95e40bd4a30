//! `catchup`: pgbench in every region but the last; the last region's
//! PostgreSQL is down for `seconds` in the middle of the run. Reported: the
//! time it takes to catch up after it returns and after the load ends, and
//! the maximum sustainable rate, transactions ÷ (run time + catch-up time).

use super::pgbench::{self, summed_per_second};
use super::report::{Plot, Report, Target};
use super::sampling::{round2, show};
use super::{ratio, with_lab, BenchOptions};
use crate::lab::{Fault, Lab, DATABASE};
use crate::spec::Engine;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One engine's catch-up.
#[derive(Serialize)]
struct Figures {
    transactions: u64,
    tps: Option<f64>,
    run_s: Option<f64>,
    catchup_after_restart_s: Option<f64>,
    catchup_after_load_s: Option<f64>,
    sustainable_tps: Option<f64>,
    per_second_tps: Vec<(f64, f64)>,
    rows_behind_after_restart: Vec<(f64, f64)>,
}

#[derive(Serialize)]
struct Ratios {
    sustainable_tps_foreshadow_vs_pglogical: Option<f64>,
}

pub async fn run(opts: &BenchOptions, report: &mut Report) -> Result<(), String> {
    if opts.regions < 2 {
        return Err("catchup needs at least 2 regions".into());
    }
    let mut engines = BTreeMap::new();
    let mut curves = Vec::new();
    for engine in [Engine::Foreshadow, Engine::Pglogical] {
        let (figures, curve) = with_lab(opts, engine, opts.regions, "catchup", async |lab| {
            one(lab, opts, engine).await
        })
        .await?;
        curves.push((engine.name().to_string(), curve));
        engines.insert(engine.name(), figures);
    }
    let rate = |e: &str| engines[e].sustainable_tps.unwrap_or(0.0);
    let (fs, pgl) = (rate("foreshadow"), rate("pglogical"));
    let mut md = format!(
        "pgbench (scale {}, {} clients) in every region but the last for {} s; the last region's \
         PostgreSQL is stopped (immediate) after {} s and started again {} s later. Caught up: the \
         lagging region has every pgbench_history row.\n\n\
         | engine | transactions | TPS while writing | catch-up after restart (s) | catch-up after load ended (s) | sustainable TPS |\n|---|---|---|---|---|---|\n",
        opts.scale, opts.clients, run_seconds(opts), outage_start(opts), opts.seconds
    );
    for (name, e) in &engines {
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            e.transactions,
            show(e.tps),
            show(e.catchup_after_restart_s),
            show(e.catchup_after_load_s),
            show(e.sustainable_tps)
        ));
    }
    report.set(
        "ratios",
        Ratios {
            sustainable_tps_foreshadow_vs_pglogical: ratio(fs, pgl),
        },
    );
    report.set("engines", &engines);
    report.section("Catch-up after an outage", md);
    report.targets(&[Target {
        name: "sustainable rate: Foreshadow vs pglogical",
        wanted: "≥ 1.0",
        value: ratio(fs, pgl),
        met: Some(fs >= pgl),
    }]);
    report.plot(Plot {
        name: "catchup".into(),
        title: "rows of pgbench_history missing in the returning region".into(),
        x_label: "seconds since the region started again".into(),
        y_label: "rows behind".into(),
        series: curves,
    });
    Ok(())
}

fn outage_start(opts: &BenchOptions) -> u64 {
    (opts.seconds / 2).max(1)
}

fn run_seconds(opts: &BenchOptions) -> u64 {
    outage_start(opts) + opts.seconds * 2
}

async fn history_rows(lab: &Lab, region: &str) -> Result<i64, String> {
    Ok(lab
        .client(region)
        .await?
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .map_err(|e| format!("region {region}: {e}"))?
        .get(0))
}

async fn one(
    lab: &Lab,
    opts: &BenchOptions,
    engine: Engine,
) -> Result<(Figures, Vec<(f64, f64)>), String> {
    pgbench::load(lab, opts.scale, false).await?;
    let names: Vec<String> = lab.spec.regions.iter().map(|r| r.name.clone()).collect();
    let (down, writers) = names.split_last().expect("two regions");
    let (down, writers) = (down.clone(), writers.to_vec());
    let label = format!("catchup/{}", engine.name());
    let seconds = run_seconds(opts);
    let load = {
        let dir = lab.dir.clone();
        let (writers, label, clients) = (writers.clone(), label.clone(), opts.clients);
        tokio::spawn(async move {
            let lab = Lab::open(&dir)?;
            pgbench::run_everywhere(&lab, &writers, DATABASE, clients, seconds, &label).await
        })
    };
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(outage_start(opts))).await;
    println!(
        "   [{label}] stopping PostgreSQL in {down} for {} s",
        opts.seconds
    );
    lab.fault(&down, Fault::StopPg)?;
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    lab.fault(&down, Fault::StartPg)?;
    let restarted = Instant::now();
    println!("   [{label}] {down} is back; load goes on until {seconds} s");
    let runs = load.await.map_err(|e| e.to_string())??;
    let load_ended = Instant::now();
    let run_time = load_ended.duration_since(t0).as_secs_f64();
    let transactions: u64 = runs.iter().map(|r| r.transactions).sum();
    // Every writer region's own rows plus what it received: once writing
    // stopped, the first writer region holds all of them (checked below).
    let mut curve = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let caught_up = loop {
        let expected = history_rows(lab, &writers[0]).await?;
        let have = history_rows(lab, &down).await.unwrap_or(0);
        curve.push((
            restarted.elapsed().as_secs_f64(),
            (expected - have).max(0) as f64,
        ));
        if have >= expected && expected as u64 >= transactions {
            break Instant::now();
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{down} did not catch up within 10 minutes ({have} of {expected} rows)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after_load = caught_up.duration_since(load_ended).as_secs_f64();
    let sustainable = transactions as f64 / (run_time + after_load);
    println!(
        "   [{label}] caught up {:.1} s after restart, {after_load:.1} s after the load ended; sustainable {sustainable:.0} TPS",
        caught_up.duration_since(restarted).as_secs_f64()
    );
    Ok((
        Figures {
            transactions,
            tps: round2(runs.iter().map(|r| r.tps).sum()),
            run_s: round2(run_time),
            catchup_after_restart_s: round2(caught_up.duration_since(restarted).as_secs_f64()),
            catchup_after_load_s: round2(after_load),
            sustainable_tps: round2(sustainable),
            per_second_tps: summed_per_second(&runs),
            rows_behind_after_restart: curve.clone(),
        },
        curve,
    ))
}
