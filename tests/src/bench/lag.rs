//! `lag`: a steady write rate in the first region; commit-to-visible time in
//! every other region (minus the WAN delay); then the apply throughput per
//! region: a backlog written while the other regions do not apply, timed
//! while they drain it. Above that rate, lag grows without bound.

use super::report::{Plot, Report, Target};
use super::sampling::{round2, show, summary, Progress, Summary};
use super::{ratio, with_lab, BenchOptions};
use crate::lab::Lab;
use crate::spec::Engine;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WRITERS: i32 = 4;
const PROBE_DDL: &str = "CREATE TABLE public.lag_probe (writer int, seq bigint, \
    written_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (writer, seq))";

/// One engine's figures: steady lag, then apply throughput.
#[derive(Serialize)]
struct Figures {
    steady: Steady,
    apply: Apply,
}

#[derive(Serialize)]
struct Steady {
    target_rows_per_s: u64,
    achieved_rows_per_s: Option<f64>,
    rows_written: usize,
    last_seq_per_writer: Vec<i64>,
    samples: usize,
    missing_samples: usize,
    lag_minus_wan_ms: Summary,
    regions: Vec<RegionLag>,
    lag_minus_wan_ms_samples: Vec<f64>,
}

#[derive(Serialize)]
struct RegionLag {
    region: String,
    lag_minus_wan_ms: Summary,
}

#[derive(Serialize)]
struct Apply {
    rows: i64,
    backlog_write_rows_per_s: Option<f64>,
    min_rows_per_s: Option<f64>,
    regions: Vec<RegionApply>,
}

#[derive(Serialize)]
struct RegionApply {
    region: String,
    rows_per_s: Option<f64>,
    drain_s: Option<f64>,
}

#[derive(Serialize)]
struct Ratios {
    apply_throughput_foreshadow_vs_pglogical: Option<f64>,
    lag_p99_foreshadow_vs_pglogical: Option<f64>,
}

pub async fn run(opts: &BenchOptions, report: &mut Report) -> Result<(), String> {
    let mut engines = BTreeMap::new();
    let mut cdf = Vec::new();
    for engine in [Engine::Foreshadow, Engine::Pglogical] {
        let result = with_lab(opts, engine, opts.regions, "lag", async |lab| {
            lab.everywhere(PROBE_DDL).await?;
            lab.replicate_table("public.lag_probe", &[], false).await?;
            let steady = steady(lab, opts, engine).await?;
            let drain = drain(lab, opts, engine).await?;
            Ok((steady, drain))
        })
        .await?;
        let ((lags, steady), drain) = result;
        cdf.push((engine.name().to_string(), cdf_points(&lags)));
        engines.insert(
            engine.name(),
            Figures {
                steady,
                apply: drain,
            },
        );
    }
    let p99 = |e: &str| engines[e].steady.lag_minus_wan_ms.p99.unwrap_or(f64::NAN);
    let apply = |e: &str| engines[e].apply.min_rows_per_s.unwrap_or(0.0);
    let mut md = format!(
        "{} rows/s from {} writers in the first region for {} s; every other region polls what is visible every 2 ms. \
         Lag = visible − committed, minus the {} ms WAN delay.\n\n\
         | engine | achieved rows/s | samples | p50 | p95 | p99 | max | apply throughput (rows/s, slowest region) |\n|---|---|---|---|---|---|---|---|\n",
        opts.rate, WRITERS, opts.seconds, opts.wan_ms
    );
    for (name, e) in &engines {
        let l = &e.steady.lag_minus_wan_ms;
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
            show(e.steady.achieved_rows_per_s),
            l.count,
            show(l.p50),
            show(l.p95),
            show(l.p99),
            show(l.max),
            show(e.apply.min_rows_per_s)
        ));
    }
    md.push_str(&format!(
        "\nApply throughput: {} rows written in the first region while the others did not apply \
         (Foreshadow: sidecars stopped; pglogical: subscriptions disabled), then the time each other \
         region took to apply them from the first applied row to the last.\n",
        engines["foreshadow"].apply.rows
    ));
    let (fs_apply, pgl_apply) = (apply("foreshadow"), apply("pglogical"));
    report.set(
        "ratios",
        Ratios {
            apply_throughput_foreshadow_vs_pglogical: ratio(fs_apply, pgl_apply),
            lag_p99_foreshadow_vs_pglogical: ratio(p99("foreshadow"), p99("pglogical")),
        },
    );
    let fs_p99 = p99("foreshadow");
    report.set("engines", &engines);
    report.section("Commit-to-visible lag (ms)", md);
    report.targets(&[
        Target {
            name: "Foreshadow lag p99 minus WAN",
            wanted: "≤ 10 ms at 1000 rows/s",
            value: round2(fs_p99),
            met: (opts.rate >= 1000).then_some(fs_p99 <= 10.0),
        },
        Target {
            name: "apply throughput per region: Foreshadow vs pglogical",
            wanted: "≥ 1.0",
            value: ratio(fs_apply, pgl_apply),
            met: Some(fs_apply >= pgl_apply),
        },
    ]);
    report.plot(Plot {
        name: "lag-cdf".into(),
        title: "commit-to-visible lag minus WAN delay (CDF)".into(),
        x_label: "milliseconds".into(),
        y_label: "fraction of rows visible".into(),
        series: cdf,
    });
    Ok(())
}

fn cdf_points(lags: &[f64]) -> Vec<(f64, f64)> {
    let mut v = lags.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len().max(1) as f64;
    let step = (v.len() / 400).max(1);
    v.iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i + 1 == v.len())
        .map(|(i, x)| (*x, (i + 1) as f64 / n))
        .collect()
}

/// The steady phase: returns every row's lag minus WAN (ms) and the figures.
async fn steady(
    lab: &Lab,
    opts: &BenchOptions,
    engine: Engine,
) -> Result<(Vec<f64>, Steady), String> {
    let source = lab.spec.regions[0].name.clone();
    let others: Vec<String> = lab.spec.regions[1..]
        .iter()
        .map(|r| r.name.clone())
        .collect();
    let stop: Arc<Mutex<Option<Vec<i64>>>> = Arc::default();
    let commits: Vec<Arc<Mutex<Vec<Instant>>>> = (0..WRITERS).map(|_| Arc::default()).collect();
    let mut observers = Vec::new();
    for r in &others {
        let c = lab.client(r).await?;
        observers.push(tokio::spawn(observe(c, 0, stop.clone())));
    }
    let t0 = Instant::now();
    let duration = Duration::from_secs(opts.seconds);
    let interval = Duration::from_secs_f64(WRITERS as f64 / opts.rate.max(1) as f64);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let c = lab.client(&source).await?;
        let out = commits[w as usize].clone();
        writers.push(tokio::spawn(async move {
            let mut seq: i64 = 0;
            // Writers start staggered so that the rows are spread evenly.
            let mut due = t0 + interval.mul_f64(w as f64 / WRITERS as f64);
            while due < t0 + duration {
                tokio::time::sleep_until(due.into()).await;
                c.execute(
                    "INSERT INTO lag_probe (writer, seq) VALUES ($1, $2)",
                    &[&w, &seq],
                )
                .await
                .map_err(|e| format!("lag writer: {e}"))?;
                out.lock().unwrap().push(Instant::now());
                seq += 1;
                due += interval;
            }
            Ok::<(), String>(())
        }));
    }
    let mut progress = Progress::new(format!("lag/{}", engine.name()), duration);
    while t0.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        progress.tick(|| {
            let n: usize = commits.iter().map(|c| c.lock().unwrap().len()).sum();
            format!(
                "{n} rows written, {:.0} rows/s",
                n as f64 / t0.elapsed().as_secs_f64()
            )
        });
    }
    for w in writers {
        w.await.map_err(|e| e.to_string())??;
    }
    let written: usize = commits.iter().map(|c| c.lock().unwrap().len()).sum();
    let achieved = written as f64 / t0.elapsed().as_secs_f64();
    let last: Vec<i64> = commits
        .iter()
        .map(|c| c.lock().unwrap().len() as i64 - 1)
        .collect();
    // The observers stop once they have seen every writer's last row.
    *stop.lock().unwrap() = Some(last.clone());
    let mut seen = Vec::new();
    for o in observers {
        seen.push(o.await.map_err(|e| e.to_string())??);
    }
    let wan = opts.wan_ms as f64;
    let mut lags = Vec::new();
    let mut per_region = Vec::new();
    let mut missing = 0usize;
    for (region, obs) in others.iter().zip(&seen) {
        let mut region_lags = Vec::new();
        for (w, commit_times) in commits.iter().enumerate() {
            let commit_times = commit_times.lock().unwrap();
            let mut k = 0;
            for (seq, committed) in commit_times.iter().enumerate() {
                while k < obs.len() && obs[k].1[w] < seq as i64 {
                    k += 1;
                }
                match obs.get(k) {
                    Some((visible, _)) => region_lags.push(
                        visible.saturating_duration_since(*committed).as_secs_f64() * 1000.0 - wan,
                    ),
                    None => missing += 1,
                }
            }
        }
        per_region.push(RegionLag {
            region: region.clone(),
            lag_minus_wan_ms: summary(&region_lags),
        });
        lags.extend(region_lags);
    }
    let figures = Steady {
        target_rows_per_s: opts.rate,
        achieved_rows_per_s: round2(achieved),
        rows_written: written,
        last_seq_per_writer: last,
        samples: lags.len(),
        missing_samples: missing,
        lag_minus_wan_ms: summary(&lags),
        regions: per_region,
        lag_minus_wan_ms_samples: lags.iter().filter_map(|x| round2(*x)).collect(),
    };
    if missing > 0 {
        return Err(format!(
            "{missing} rows written in {source} never became visible elsewhere within 60 s ({})",
            engine.name()
        ));
    }
    Ok((lags, figures))
}

/// Polls the highest visible `seq` of each writer from `first_writer` on
/// until every writer's last row (set in `last` when writing ends) is
/// visible, or 60 s after that; returns each change with the time it was seen.
async fn observe(
    c: tokio_postgres::Client,
    first_writer: i32,
    last: Arc<Mutex<Option<Vec<i64>>>>,
) -> Result<Vec<(Instant, Vec<i64>)>, String> {
    let q = c
        .prepare(
            "SELECT (SELECT coalesce(max(seq), -1) FROM lag_probe p WHERE p.writer = w) \
             FROM generate_series($1::int, $1::int + $2::int - 1) AS w ORDER BY w",
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut out: Vec<(Instant, Vec<i64>)> = Vec::new();
    let mut ended_at: Option<Instant> = None;
    loop {
        let rows = c
            .query(&q, &[&first_writer, &WRITERS])
            .await
            .map_err(|e| e.to_string())?;
        let now = Instant::now();
        let maxes: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        if out.last().map(|(_, m)| m != &maxes).unwrap_or(true) {
            out.push((now, maxes.clone()));
        }
        if let Some(last) = last.lock().unwrap().as_ref() {
            let ended = *ended_at.get_or_insert(now);
            let all_seen = maxes.iter().zip(last).all(|(m, l)| m >= l);
            if all_seen || now.duration_since(ended) > Duration::from_secs(60) {
                return Ok(out);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The apply-throughput phase (see the module comment).
async fn drain(lab: &Lab, opts: &BenchOptions, engine: Engine) -> Result<Apply, String> {
    let source = lab.spec.regions[0].name.clone();
    let others: Vec<String> = lab.spec.regions[1..]
        .iter()
        .map(|r| r.name.clone())
        .collect();
    let rows: i64 = if opts.quick {
        2_000
    } else {
        (opts.rate as i64 * 10).max(20_000)
    };
    for r in &others {
        engine.replicator().pause_apply(lab, r, true).await?;
    }
    let t_write = Instant::now();
    let mut writers = Vec::new();
    for w in WRITERS..2 * WRITERS {
        let c = lab.client(&source).await?;
        let n = rows / WRITERS as i64;
        writers.push(tokio::spawn(async move {
            for seq in 0..n {
                c.execute(
                    "INSERT INTO lag_probe (writer, seq) VALUES ($1, $2)",
                    &[&w, &seq],
                )
                .await
                .map_err(|e| format!("backlog writer: {e}"))?;
            }
            Ok::<(), String>(())
        }));
    }
    for w in writers {
        w.await.map_err(|e| e.to_string())??;
    }
    let rows = rows / WRITERS as i64 * WRITERS as i64;
    let write_rate = rows as f64 / t_write.elapsed().as_secs_f64();
    println!(
        "   [lag/{}] backlog of {rows} rows written at {write_rate:.0} rows/s; resuming apply",
        engine.name()
    );
    let mut per_region = Vec::new();
    let mut tasks = Vec::new();
    let resumed = Instant::now();
    for r in &others {
        engine.replicator().pause_apply(lab, r, false).await?;
        let c = lab.client(r).await?;
        let region = r.clone();
        tasks.push(tokio::spawn(
            async move { drain_one(c, region, rows).await },
        ));
    }
    let mut min_rate = f64::INFINITY;
    for t in tasks {
        let (region, first_seen, done, first_count) = t.await.map_err(|e| e.to_string())??;
        // From the first applied row to the last, so that reconnecting is
        // not counted; if one poll saw everything, from the restart.
        let (span, applied) = if first_count < rows {
            (done.duration_since(first_seen), rows - first_count)
        } else {
            (done.duration_since(resumed), rows)
        };
        let span = span.as_secs_f64().max(1e-3);
        let rate = applied as f64 / span;
        min_rate = min_rate.min(rate);
        per_region.push(RegionApply {
            region,
            rows_per_s: round2(rate),
            drain_s: round2(span),
        });
    }
    println!(
        "   [lag/{}] apply throughput (slowest region): {min_rate:.0} rows/s",
        engine.name()
    );
    Ok(Apply {
        rows,
        backlog_write_rows_per_s: round2(write_rate),
        min_rows_per_s: round2(min_rate),
        regions: per_region,
    })
}

/// Waits until `region` has all `rows` backlog rows: when the first ones
/// appeared, when the last did, and how many the first poll already saw.
async fn drain_one(
    c: tokio_postgres::Client,
    region: String,
    rows: i64,
) -> Result<(String, Instant, Instant, i64), String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, i64)> = None;
    loop {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM lag_probe WHERE writer >= $1",
                &[&WRITERS],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some((now, n));
        }
        if n >= rows {
            let (t, c0) = first.expect("seen");
            return Ok((region, t, now, c0));
        }
        if now > deadline {
            return Err(format!(
                "region {region} applied {n} of {rows} backlog rows in 10 minutes"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
