//! `conflicts`: hot keys updated from every region at once (convergence
//! time after the writes stop, conflicts detected and where), then the
//! correctness column: pgbench's balance updates from every region, with the
//! balances as `counter` columns where the engine has them, and whether
//! every balance still equals the sum of its pgbench_history deltas.

use super::pgbench::{self, summed_per_second, BALANCES, TABLES};
use super::report::{Plot, Report, Target};
use super::sampling::{round2, Progress};
use super::{with_lab, BenchOptions};
use crate::lab::{Lab, DATABASE};
use crate::spec::Engine;
use crate::workload::Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOT_DDL: &str =
    "CREATE TABLE public.hot (id bigint PRIMARY KEY, region text NOT NULL, v bigint NOT NULL)";
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);

/// One engine's figures: the hot keys and the lost updates.
#[derive(Serialize)]
struct Figures {
    hot_keys: HotKeys,
    balances: Balances,
}

#[derive(Serialize)]
struct HotKeys {
    writes: u64,
    converged: bool,
    /// None: not converged within the timeout.
    converge_ms: Option<u64>,
    conflicts: i64,
    resolved_at: &'static str,
}

#[derive(Serialize)]
struct Balances {
    counters: bool,
    transactions: u64,
    tps: Option<f64>,
    converged: bool,
    converge_ms: u64,
    regions_exact: u64,
    worst_wrong_rows: i64,
    worst_branch_drift: i64,
    regions: Vec<RegionBalances>,
    conflicts: i64,
}

#[derive(Serialize)]
struct RegionBalances {
    region: String,
    sum_delta: i64,
    history_rows: i64,
    /// Per balance column: its sum, and the rows whose balance is not the
    /// sum of their deltas.
    columns: Vec<(String, i64, i64)>,
}

pub async fn run(opts: &BenchOptions, report: &mut Report) -> Result<(), String> {
    let mut engines = BTreeMap::new();
    let mut series = Vec::new();
    for engine in [Engine::Foreshadow, Engine::Pglogical] {
        let (figures, tps) = with_lab(opts, engine, opts.regions, "conflicts", async |lab| {
            let hot_keys = hot_keys(lab, opts, engine).await?;
            let (balances, tps) = lost_updates(lab, opts, engine).await?;
            Ok((Figures { hot_keys, balances }, tps))
        })
        .await?;
        series.push((engine.name().to_string(), tps));
        engines.insert(engine.name(), figures);
    }
    let mut md = format!(
        "**Hot keys.** {} keys updated by one writer per region, {} regions, {} s, {} ms WAN. \
         Conflicts: Foreshadow counts the entries of its conflict history (`foreshadow.conflicts`: \
         a peer's write concurrent with the region's version of the row, or finding it missing); pglogical logs a `CONFLICT` for every remote change to a row \
         last written by another origin. Without shadows yet, both resolve at each primary on apply.\n\n\
         | engine | writes | converged after writes stopped (ms) | conflicts detected | resolved at |\n|---|---|---|---|---|\n",
        opts.hot_keys, opts.regions, opts.seconds, opts.wan_ms
    );
    for (name, e) in &engines {
        let h = &e.hot_keys;
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            h.writes,
            h.converge_ms
                .map_or_else(|| "not converged".into(), |ms| ms.to_string()),
            h.conflicts,
            h.resolved_at
        ));
    }
    md.push_str(&format!(
        "\n**Lost updates.** pgbench (scale {}, {} clients per region) in every region at once for {} s; \
         Foreshadow's balance columns are `counter` columns, pglogical has last-update-wins. After \
         convergence, in every region, each balance should equal the sum of its pgbench_history deltas.\n\n\
         | engine | transactions | converged | regions where sum(balance) = sum(delta) for all three tables | rows whose balance ≠ its deltas (worst region) | sum(delta) − sum(bbalance) (worst region) |\n|---|---|---|---|---|---|\n",
        opts.scale, opts.clients, opts.seconds
    ));
    for (name, e) in &engines {
        let b = &e.balances;
        md.push_str(&format!(
            "| {name} | {} | {} | {} of {} | {} | {} |\n",
            b.transactions,
            b.converged,
            b.regions_exact,
            opts.regions,
            b.worst_wrong_rows,
            b.worst_branch_drift
        ));
    }
    let fs_exact = engines["foreshadow"].balances.regions_exact;
    report.set("engines", &engines);
    report.section("Conflicts and lost updates", md);
    let every = format!("{} (every region)", opts.regions);
    report.targets(&[Target {
        name: "Foreshadow: regions with no lost update (every balance = sum of its deltas)",
        wanted: &every,
        value: Some(fs_exact as f64),
        met: Some(fs_exact == opts.regions as u64),
    }]);
    report.plot(Plot {
        name: "tps".into(),
        title: "pgbench TPS with balances updated in every region".into(),
        x_label: "seconds".into(),
        y_label: "transactions per second, all regions".into(),
        series,
    });
    Ok(())
}

async fn total_conflicts(lab: &Lab, engine: Engine) -> Result<i64, String> {
    let mut n = 0;
    for r in &lab.spec.regions {
        n += engine.replicator().conflicts(lab, &r.name).await?;
    }
    Ok(n)
}

async fn hot_keys(lab: &Lab, opts: &BenchOptions, engine: Engine) -> Result<HotKeys, String> {
    lab.everywhere(&format!(
        "{HOT_DDL}; INSERT INTO hot SELECT g, 'seed', 0 FROM generate_series(1, {}) g",
        opts.hot_keys
    ))
    .await?;
    lab.replicate_table("public.hot", &[], false).await?;
    let before = total_conflicts(lab, engine).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, r) in lab.spec.regions.iter().enumerate() {
        let c = lab.client(&r.name).await?;
        let (stop, writes, region, keys) =
            (stop.clone(), writes.clone(), r.name.clone(), opts.hot_keys);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(i as u64 * 7919 + 17);
            while !stop.load(Ordering::Relaxed) {
                let id = (rng.next_u64() % keys + 1) as i64;
                let v = (rng.next_u64() % 1_000_000) as i64;
                c.execute(
                    "UPDATE hot SET region = $1, v = $2 WHERE id = $3",
                    &[&region, &v, &id],
                )
                .await
                .map_err(|e| format!("hot writer in {region}: {e}"))?;
                writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    let total = Duration::from_secs(opts.seconds);
    let mut progress = Progress::new(format!("conflicts/{} hot keys", engine.name()), total);
    while progress.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(200)).await;
        progress.tick(|| format!("{} writes", writes.load(Ordering::Relaxed)));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let stopped = Instant::now();
    let converged = lab.wait_identical(&["public.hot"], CONVERGE_TIMEOUT).await;
    let converge_ms = stopped.elapsed().as_millis() as u64;
    // Conflicts are counted as the last intents are applied: read after convergence.
    let conflicts = total_conflicts(lab, engine).await? - before;
    Ok(HotKeys {
        writes: writes.load(Ordering::Relaxed),
        converged: converged.is_ok(),
        converge_ms: converged.is_ok().then_some(converge_ms),
        conflicts,
        resolved_at: "each primary, on apply",
    })
}

async fn lost_updates(
    lab: &Lab,
    opts: &BenchOptions,
    engine: Engine,
) -> Result<(Balances, Vec<(f64, f64)>), String> {
    pgbench::load(lab, opts.scale, engine.replicator().has_counters()).await?;
    let regions: Vec<String> = lab.spec.regions.iter().map(|r| r.name.clone()).collect();
    let label = format!("conflicts/{} balances", engine.name());
    let runs = pgbench::run_everywhere(lab, &regions, DATABASE, opts.clients, opts.seconds, &label)
        .await?;
    let stopped = Instant::now();
    let tables: Vec<String> = TABLES.iter().map(|t| format!("public.{t}")).collect();
    let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
    let converged = lab.wait_identical(&tables, CONVERGE_TIMEOUT).await.is_ok();
    let converge_ms = stopped.elapsed().as_millis() as u64;
    let mut per_region = Vec::new();
    let (mut exact, mut worst_rows, mut worst_drift) = (0, 0i64, 0i64);
    for r in &regions {
        let c = lab.client(r).await?;
        let deltas: i64 = c
            .query_one(
                "SELECT coalesce(sum(delta), 0)::bigint FROM pgbench_history",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        let mut region = RegionBalances {
            region: r.clone(),
            sum_delta: deltas,
            history_rows: c
                .query_one("SELECT count(*) FROM pgbench_history", &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0),
            columns: Vec::new(),
        };
        let mut all_equal = true;
        let mut wrong_rows = 0;
        for (table, col, key) in BALANCES {
            let row = c
                .query_one(
                    &format!(
                        "SELECT (SELECT coalesce(sum({col}), 0)::bigint FROM {table}), \
                         (SELECT count(*) FROM {table} t LEFT JOIN \
                           (SELECT {key}, sum(delta) AS s FROM pgbench_history GROUP BY {key}) h USING ({key}) \
                          WHERE t.{col} <> coalesce(h.s, 0))"
                    ),
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            let (sum, wrong): (i64, i64) = (row.get(0), row.get(1));
            all_equal &= sum == deltas && wrong == 0;
            wrong_rows += wrong;
            if table == "pgbench_branches" {
                worst_drift = worst_drift.max((deltas - sum).abs());
            }
            region.columns.push((col.to_string(), sum, wrong));
        }
        exact += all_equal as u64;
        worst_rows = worst_rows.max(wrong_rows);
        per_region.push(region);
    }
    let transactions: u64 = runs.iter().map(|r| r.transactions).sum();
    Ok((
        Balances {
            counters: engine.replicator().has_counters(),
            transactions,
            tps: round2(runs.iter().map(|r| r.tps).sum()),
            converged,
            converge_ms,
            regions_exact: exact,
            worst_wrong_rows: worst_rows,
            worst_branch_drift: worst_drift,
            regions: per_region,
            conflicts: total_conflicts(lab, engine).await?,
        },
        summed_per_second(&runs),
    ))
}
