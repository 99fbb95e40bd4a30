//! `conflicts`: hot keys updated from every region at once (convergence
//! time after the writes stop, conflicts detected and where); a merge
//! table (carts, merged by a non-commutative function) written from every
//! region with Foreshadow's shadows on, with them off (every primary
//! resolving on arrival with the same fold) and on pglogical
//! (last-update-wins): who resolved, merge calls per conflict, items lost;
//! then the correctness column: pgbench's balance updates from every
//! region, with the balances as `counter` columns where the engine has
//! them, and whether every balance still equals the sum of its
//! pgbench_history deltas.

use super::pgbench::{self, summed_per_second, BALANCES, TABLES};
use super::report::{Plot, Report, Target};
use super::sampling::{round2, show, Progress};
use super::{with_lab, BenchOptions};
use crate::lab::{Lab, DATABASE};
use crate::spec::Engine;
use crate::workload::{add_cart_items, Rng, CARTS_DDL, CARTS_TABLE_DDL};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOT_DDL: &str =
    "CREATE TABLE public.hot (id bigint PRIMARY KEY, region text NOT NULL, v bigint NOT NULL)";
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);

/// One engine's figures: the hot keys, the carts (per mode) and the lost
/// updates.
#[derive(Serialize)]
struct Figures {
    hot_keys: HotKeys,
    carts: Vec<Carts>,
    balances: Balances,
}

/// Items added to the same carts from every region for `--seconds`.
#[derive(Serialize)]
struct Carts {
    mode: &'static str,
    /// Committed item additions (one per transaction), all regions.
    items: u64,
    tps: f64,
    converge_ms: Option<u64>,
    /// Committed items not in their cart exactly once after convergence.
    lost: u64,
    /// Conflicts resolved by the table's shadow, and by a primary itself
    /// (on arrival without shadows, or after the deadline).
    by_shadow: i64,
    by_primaries: i64,
    /// Conflicts other regions adopted from the shadow, and those adopted
    /// before (some of) the conflicting writes arrived.
    adopted: i64,
    pre_staged_first: i64,
    merge_calls: i64,
    /// Merge calls in all regions per conflict resolved.
    calls_per_conflict: Option<f64>,
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
            let carts = carts_modes(lab, opts, engine).await?;
            let (balances, tps) = lost_updates(lab, opts, engine).await?;
            Ok((
                Figures {
                    hot_keys,
                    carts,
                    balances,
                },
                tps,
            ))
        })
        .await?;
        series.push((engine.name().to_string(), tps));
        engines.insert(engine.name(), figures);
    }
    let mut md = format!(
        "**Hot keys.** {} keys updated by one writer per region, {} regions, {} s, {} ms WAN. \
         Conflicts: Foreshadow counts the entries of its conflict history (`foreshadow.conflicts`: \
         a peer's write concurrent with the region's version of the row, or finding it missing); pglogical logs a `CONFLICT` for every remote change to a row \
         last written by another origin. These are lww tables: both engines resolve at each primary on apply (Foreshadow's shadows are for merge tables, below).\n\n\
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
        "\n**A merge table.** {} carts; one writer per region adds an item to a random cart every 10 ms for {} s \
         (`cart_merge`: the accumulated items, then the next version's new ones — not commutative). \
         Calls per conflict: merge-function calls in all regions ÷ conflicts resolved. Lost: committed items not \
         in their cart exactly once after convergence (pglogical has no merge: last update wins).\n\n\
         | engine, mode | items added | items/s | converged after writes stopped (ms) | resolved by the shadow | by primaries | adopted (pre-staged before the writes) | merge calls | calls per conflict | items lost |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        opts.hot_keys, opts.seconds
    ));
    for (name, e) in &engines {
        for c in &e.carts {
            md.push_str(&format!(
                "| {name}, {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} |\n",
                c.mode,
                c.items,
                c.tps,
                c.converge_ms
                    .map_or_else(|| "not converged".into(), |ms| ms.to_string()),
                c.by_shadow,
                c.by_primaries,
                c.adopted,
                c.pre_staged_first,
                c.merge_calls,
                show(c.calls_per_conflict),
                c.lost
            ));
        }
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
    let on = &engines["foreshadow"].carts[0];
    report.set("engines", &engines);
    report.section("Conflicts and lost updates", md);
    let every = format!("{} (every region)", opts.regions);
    report.targets(&[
        Target {
            name: "Foreshadow: regions with no lost update (every balance = sum of its deltas)",
            wanted: &every,
            value: Some(fs_exact as f64),
            met: Some(fs_exact == opts.regions as u64),
        },
        Target {
            name: "Foreshadow, shadows on: merge-function calls per conflict",
            wanted: "≤ 1 per extra leaf (about 1)",
            value: on.calls_per_conflict,
            met: on.calls_per_conflict.map(|x| x <= 1.5),
        },
        Target {
            name: "Foreshadow, shadows on: items lost under the non-commutative merge",
            wanted: "0",
            value: Some(on.lost as f64),
            met: Some(on.lost == 0),
        },
    ]);
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

/// The carts in each mode the engine has: Foreshadow with shadows on,
/// then off; pglogical's last update wins.
async fn carts_modes(lab: &Lab, opts: &BenchOptions, engine: Engine) -> Result<Vec<Carts>, String> {
    let first = &lab.spec.regions[0].name;
    if engine != Engine::Foreshadow {
        lab.everywhere(&format!(
            "{CARTS_TABLE_DDL} INSERT INTO carts SELECT g, '{{}}' FROM generate_series(0, {} - 1) g",
            opts.hot_keys
        ))
        .await?;
        lab.replicate_table("public.carts", &[], false).await?;
        return Ok(vec![carts(lab, opts, engine, "last update wins").await?]);
    }
    lab.everywhere(CARTS_DDL).await?;
    lab.client(first)
        .await?
        .execute(
            "INSERT INTO carts SELECT g, '{}' FROM generate_series(0, $1::int - 1) g",
            &[&(opts.hot_keys as i32)],
        )
        .await
        .map_err(|e| e.to_string())?;
    lab.wait_identical(&["public.carts"], CONVERGE_TIMEOUT)
        .await?;
    let on = carts(lab, opts, engine, "shadows on").await?;
    lab.everywhere("SELECT foreshadow.set_shadows('public.carts', '{}')")
        .await?;
    lab.client(first)
        .await?
        .execute("UPDATE carts SET items = '{}'", &[])
        .await
        .map_err(|e| e.to_string())?;
    lab.wait_identical(&["public.carts"], CONVERGE_TIMEOUT)
        .await?;
    let off = carts(lab, opts, engine, "shadows off").await?;
    Ok(vec![on, off])
}

/// Conflict figures of the carts since conflict id `since` per region:
/// (by shadow, by primaries, adopted, pre-staged first, merge calls).
const CART_CONFLICTS_SQL: &str =
    "SELECT count(*) FILTER (WHERE resolved_by = 'shadow' AND outcome = 'merged'), \
       count(*) FILTER (WHERE resolved_by IN ('local', 'fallback') \
                          AND outcome IN ('merged', 'merge failed: last writer wins')), \
       count(*) FILTER (WHERE outcome LIKE 'pre-staged%'), \
       count(*) FILTER (WHERE outcome = 'pre-staged before its writes arrived'), \
       coalesce(sum(merge_calls), 0)::bigint \
  FROM foreshadow.conflicts WHERE table_name = 'public.carts'::regclass AND id > $1";

async fn carts(
    lab: &Lab,
    opts: &BenchOptions,
    engine: Engine,
    mode: &'static str,
) -> Result<Carts, String> {
    let foreshadow = engine == Engine::Foreshadow;
    let mut marks = Vec::new();
    for r in &lab.spec.regions {
        let mark: i64 = if foreshadow {
            lab.client(&r.name)
                .await?
                .query_one(
                    "SELECT coalesce(max(id), 0) FROM foreshadow.conflict_log",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0)
        } else {
            0
        };
        marks.push(mark);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Lab::open(&lab.dir)?);
    let writers: Vec<_> = (0..lab.spec.regions.len())
        .map(|i| {
            let (lab, stop, keys) = (shared.clone(), stop.clone(), opts.hot_keys as i64);
            tokio::spawn(async move {
                add_cart_items(&lab, i, keys, Duration::from_millis(10), stop).await
            })
        })
        .collect();
    let total = Duration::from_secs(opts.seconds);
    let mut progress = Progress::new(format!("conflicts/{} carts, {mode}", engine.name()), total);
    while progress.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(200)).await;
        progress.tick(String::new);
    }
    stop.store(true, Ordering::Relaxed);
    let mut committed = Vec::new();
    for w in writers {
        committed.extend(w.await.map_err(|e| e.to_string())??);
    }
    let stopped = Instant::now();
    let converged = lab
        .wait_identical(&["public.carts"], CONVERGE_TIMEOUT)
        .await;
    let converge_ms = stopped.elapsed().as_millis() as u64;
    let held: BTreeMap<i64, Vec<String>> = lab
        .client(&lab.spec.regions[0].name)
        .await?
        .query("SELECT id, items FROM carts", &[])
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let lost = committed
        .iter()
        .filter(|(cart, item)| {
            held.get(cart)
                .is_none_or(|items| items.iter().filter(|x| *x == item).count() != 1)
        })
        .count() as u64;
    let mut f = [0i64; 5];
    if foreshadow {
        for (r, mark) in lab.spec.regions.iter().zip(marks) {
            let row = lab
                .client(&r.name)
                .await?
                .query_one(CART_CONFLICTS_SQL, &[&mark])
                .await
                .map_err(|e| e.to_string())?;
            for (i, x) in f.iter_mut().enumerate() {
                *x += row.get::<_, i64>(i);
            }
        }
    }
    let [by_shadow, by_primaries, adopted, pre_staged_first, merge_calls] = f;
    // Without shadows every primary resolves each conflict: count it once.
    let conflicts = if mode == "shadows off" {
        by_primaries as f64 / lab.spec.regions.len() as f64
    } else {
        (by_shadow + by_primaries) as f64
    };
    Ok(Carts {
        mode,
        items: committed.len() as u64,
        tps: round2(committed.len() as f64 / opts.seconds as f64).unwrap_or(0.0),
        converge_ms: converged.is_ok().then_some(converge_ms),
        lost,
        by_shadow,
        by_primaries,
        adopted,
        pre_staged_first,
        merge_calls,
        calls_per_conflict: (foreshadow && conflicts > 0.0)
            .then(|| round2(merge_calls as f64 / conflicts))
            .flatten(),
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
