//! `overhead`: pgbench in every region at once, Foreshadow vs pglogical vs
//! no replication; and capture alone (one region, global tables, nobody
//! consuming) vs the same tables plain, in the same cluster, alternating,
//! once with `lww` tables and once with the balances as `counter` columns.

use super::pgbench::{self, summed_per_second, Run};
use super::report::{Plot, Report, Target};
use super::sampling::show;
use super::{ratio, with_lab, BenchOptions};
use crate::lab::{connect, Lab, DATABASE};
use crate::spec::Engine;
use serde::Serialize;
use std::collections::BTreeMap;

/// One engine's pgbench runs, every region at once.
#[derive(Serialize)]
struct EngineRuns {
    total_tps: f64,
    regions: Vec<Run>,
}

/// Capture alone: the same pgbench tables plain, global (`lww`) and
/// global with counter balances, runs alternating.
#[derive(Serialize)]
struct CaptureAlone {
    plain_tps: Vec<f64>,
    global_tps: Vec<f64>,
    counters_tps: Vec<f64>,
    plain_mean: f64,
    global_mean: f64,
    counters_mean: f64,
    /// global ÷ plain
    ratio: Option<f64>,
    /// global with counters ÷ plain
    counters_ratio: Option<f64>,
    seconds_per_run: u64,
}

#[derive(Serialize)]
struct Ratios {
    foreshadow_vs_pglogical: Option<f64>,
    foreshadow_vs_plain: Option<f64>,
    pglogical_vs_plain: Option<f64>,
    capture_alone_vs_plain_tables: Option<f64>,
    capture_alone_with_counters_vs_plain_tables: Option<f64>,
}

pub async fn run(opts: &BenchOptions, report: &mut Report) -> Result<(), String> {
    let mut engines = BTreeMap::new();
    let mut series = Vec::new();
    for engine in [Engine::Plain, Engine::Foreshadow, Engine::Pglogical] {
        let runs = with_lab(opts, engine, opts.regions, "overhead", async |lab| {
            pgbench::load(lab, opts.scale, false).await?;
            let regions: Vec<String> = lab.spec.regions.iter().map(|r| r.name.clone()).collect();
            let label = format!("overhead/{}", engine.name());
            pgbench::run_everywhere(lab, &regions, DATABASE, opts.clients, opts.seconds, &label)
                .await
        })
        .await?;
        let total: f64 = runs.iter().map(|r| r.tps).sum();
        series.push((engine.name().to_string(), summed_per_second(&runs)));
        engines.insert(
            engine.name(),
            EngineRuns {
                total_tps: (total * 10.0).round() / 10.0,
                regions: runs,
            },
        );
    }
    let capture = capture_alone(opts).await?;
    let total = |e: &str| engines[e].total_tps;
    let (fs, pgl, plain) = (total("foreshadow"), total("pglogical"), total("plain"));
    report.set("engines", &engines);
    report.set("capture_alone", &capture);
    report.set(
        "ratios",
        Ratios {
            foreshadow_vs_pglogical: ratio(fs, pgl),
            foreshadow_vs_plain: ratio(fs, plain),
            pglogical_vs_plain: ratio(pgl, plain),
            capture_alone_vs_plain_tables: capture.ratio,
            capture_alone_with_counters_vs_plain_tables: capture.counters_ratio,
        },
    );
    report.section(
        "Every region running pgbench at once",
        format!(
            "TPC-B-like pgbench, scale {}, {} clients per region, {} s, {} regions, {} ms WAN.\n\n\
             | engine | total TPS | vs plain | vs pglogical |\n|---|---|---|---|\n\
             | plain PostgreSQL (no replication) | {plain:.0} | 1.000 | {} |\n\
             | Foreshadow | {fs:.0} | {} | {} |\n\
             | pglogical 2 | {pgl:.0} | {} | 1.000 |\n",
            opts.scale,
            opts.clients,
            opts.seconds,
            opts.regions,
            opts.wan_ms,
            show(ratio(plain, pgl)),
            show(ratio(fs, plain)),
            show(ratio(fs, pgl)),
            show(ratio(pgl, plain)),
        ),
    );
    report.section(
        "Capture alone",
        format!(
            "One region, {} pgbench clients, nothing consuming the intents; the same pgbench tables \
             plain (database `plain`), global with `lww` (database `app`) and global with the three \
             balance columns as `counter` columns (database `counters`) in one cluster, runs alternating.\n\n\
             | tables | TPS per run | mean | ÷ plain |\n|---|---|---|---|\n| plain | {} | {:.0} | 1.000 |\n\
             | global, lww | {} | {:.0} | **{}** |\n| global, counters | {} | {:.0} | {} |\n",
            opts.clients,
            runs_text(&capture.plain_tps),
            capture.plain_mean,
            runs_text(&capture.global_tps),
            capture.global_mean,
            show(capture.ratio),
            runs_text(&capture.counters_tps),
            capture.counters_mean,
            show(capture.counters_ratio),
        ),
    );
    report.targets(&[
        Target {
            name: "capture alone vs plain tables",
            wanted: "≥ 0.85",
            value: capture.ratio,
            met: capture.ratio.map(|r| r >= 0.85),
        },
        Target {
            name: "TPS, every region writing: Foreshadow vs pglogical",
            wanted: "≥ 1.0",
            value: ratio(fs, pgl),
            met: Some(fs >= pgl),
        },
    ]);
    report.plot(Plot {
        name: "tps".into(),
        title: "pgbench TPS, all regions together".into(),
        x_label: "seconds".into(),
        y_label: "transactions per second".into(),
        series,
    });
    Ok(())
}

/// "4582, 4254, 4591": one figure per run.
fn runs_text(tps: &[f64]) -> String {
    tps.iter()
        .map(|t| format!("{t:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn capture_alone(opts: &BenchOptions) -> Result<CaptureAlone, String> {
    with_lab(opts, Engine::Foreshadow, 1, "capture", async |lab| {
        let region = lab.spec.regions[0].name.clone();
        lab.client(&region)
            .await?
            .batch_execute("CREATE DATABASE plain")
            .await
            .map_err(|e| e.to_string())?;
        pgbench::load(lab, opts.scale, false).await?;
        pgbench::load_database(lab, &region, "plain", opts.scale).await?;
        load_with_counters(lab, &region, opts.scale).await?;
        let (mut plain, mut global, mut counters) = (Vec::new(), Vec::new(), Vec::new());
        let rounds = if opts.quick { 1 } else { 3 };
        let secs = (opts.seconds / 2).max(2);
        for round in 1..=rounds {
            for (db, out) in [
                ("plain", &mut plain),
                (DATABASE, &mut global),
                ("counters", &mut counters),
            ] {
                let label = format!("capture/{db} {round}/{rounds}");
                let runs = pgbench::run_everywhere(
                    lab,
                    std::slice::from_ref(&region),
                    db,
                    opts.clients,
                    secs,
                    &label,
                )
                .await?;
                out.push(runs[0].tps);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        Ok(CaptureAlone {
            ratio: ratio(mean(&global), mean(&plain)),
            counters_ratio: ratio(mean(&counters), mean(&plain)),
            plain_mean: mean(&plain),
            global_mean: mean(&global),
            counters_mean: mean(&counters),
            plain_tps: plain,
            global_tps: global,
            counters_tps: counters,
            seconds_per_run: secs,
        })
    })
    .await
}

/// Database `counters` of `region`: the pgbench tables global, with the
/// balance columns as `counter` columns.
async fn load_with_counters(lab: &Lab, region: &str, scale: u32) -> Result<(), String> {
    lab.client(region)
        .await?
        .batch_execute("CREATE DATABASE counters")
        .await
        .map_err(|e| e.to_string())?;
    pgbench::load_database(lab, region, "counters", scale).await?;
    let c = connect(&lab.dsn(region, "counters")?).await?;
    c.batch_execute("CREATE EXTENSION foreshadow")
        .await
        .map_err(|e| e.to_string())?;
    for t in pgbench::TABLES {
        let counters: Vec<&str> = pgbench::BALANCES
            .iter()
            .filter(|(table, _, _)| *table == t)
            .map(|(_, col, _)| *col)
            .collect();
        Engine::Foreshadow
            .replicator()
            .replicate_table(&c, &format!("public.{t}"), &counters, false)
            .await?;
    }
    Ok(())
}
