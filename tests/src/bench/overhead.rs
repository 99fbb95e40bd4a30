//! `overhead`: pgbench in every region at once, Foreshadow vs pglogical vs
//! no replication; and capture alone (one region, global tables, nobody
//! consuming) vs the same tables plain, in the same cluster, alternating.

use super::pgbench::{self, summed_per_second, Run};
use super::report::{Plot, Report, Target};
use super::{ratio, with_lab, BenchOptions};
use crate::lab::DATABASE;
use crate::spec::Engine;
use serde_json::{json, Value};

pub async fn run(opts: &BenchOptions, report: &mut Report) -> Result<(), String> {
    let mut engines = serde_json::Map::new();
    let mut series = Vec::new();
    let mut totals = std::collections::BTreeMap::new();
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
        totals.insert(engine.name(), total);
        series.push((engine.name().to_string(), summed_per_second(&runs)));
        engines.insert(engine.name().into(), runs_json(&runs, total));
    }
    let capture = capture_alone(opts).await?;
    let tps_list = |key: &str| -> Vec<f64> {
        capture[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (plain_runs, global_runs) = (tps_list("plain_tps"), tps_list("global_tps"));
    let (fs, pgl, plain) = (totals["foreshadow"], totals["pglogical"], totals["plain"]);
    let capture_ratio = capture["ratio"].as_f64().unwrap_or(0.0);
    report.set("engines", Value::Object(engines));
    report.set("capture_alone", capture.clone());
    report.set(
        "ratios",
        json!({
            "foreshadow_vs_pglogical": ratio(fs, pgl),
            "foreshadow_vs_plain": ratio(fs, plain),
            "pglogical_vs_plain": ratio(pgl, plain),
            "capture_alone_vs_plain_tables": capture["ratio"],
        }),
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
            ratio(plain, pgl),
            ratio(fs, plain),
            ratio(fs, pgl),
            ratio(pgl, plain),
        ),
    );
    report.section(
        "Capture alone",
        format!(
            "One region, {} pgbench clients, nothing consuming the intents; the same pgbench tables \
             plain (database `plain`) and global (database `app`) in one cluster, runs alternating.\n\n\
             | tables | TPS per run | mean |\n|---|---|---|\n| plain | {} | {:.0} |\n| global | {} | {:.0} |\n\n\
             Ratio global / plain: **{}**\n",
            opts.clients,
            runs_text(&plain_runs),
            capture["plain_mean"].as_f64().unwrap_or(0.0),
            runs_text(&global_runs),
            capture["global_mean"].as_f64().unwrap_or(0.0),
            capture["ratio"],
        ),
    );
    report.targets(&[
        Target {
            name: "capture alone vs plain tables",
            wanted: "≥ 0.85",
            value: capture["ratio"].clone(),
            met: Some(capture_ratio >= 0.85),
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

fn runs_json(runs: &[Run], total: f64) -> Value {
    json!({
        "total_tps": (total * 10.0).round() / 10.0,
        "regions": runs.iter().map(|r| json!({
            "region": r.region, "tps": r.tps, "transactions": r.transactions,
            "failed": r.failed, "per_second_tps": r.per_second,
        })).collect::<Vec<_>>(),
    })
}

async fn capture_alone(opts: &BenchOptions) -> Result<Value, String> {
    with_lab(opts, Engine::Foreshadow, 1, "capture", async |lab| {
        let region = lab.spec.regions[0].name.clone();
        lab.client(&region)
            .await?
            .batch_execute("CREATE DATABASE plain")
            .await
            .map_err(|e| e.to_string())?;
        pgbench::load(lab, opts.scale, false).await?;
        pgbench::load_database(lab, &region, "plain", opts.scale).await?;
        let (mut plain, mut global) = (Vec::new(), Vec::new());
        let rounds = if opts.quick { 1 } else { 3 };
        let secs = (opts.seconds / 2).max(2);
        for round in 1..=rounds {
            for (db, out) in [("plain", &mut plain), (DATABASE, &mut global)] {
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
        Ok(json!({
            "plain_tps": plain, "global_tps": global,
            "plain_mean": mean(&plain), "global_mean": mean(&global),
            "ratio": ratio(mean(&global), mean(&plain)),
            "seconds_per_run": secs,
        }))
    })
    .await
}
