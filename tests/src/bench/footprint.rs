//! `footprint`: what Foreshadow keeps per key while keys churn. Batches of
//! new keys are inserted and deleted again (one transaction per batch),
//! from each region in turn, until
//! `keys` distinct keys (1,000,000; `--quick`: 20,000) have come and gone.
//! Every second each region reports its versions of the table (live rows
//! and tombstones) and the size of the version store. Tombstones are
//! forgotten once every region's heartbeat has passed them
//! (docs/operations.md, "Tombstones"), so they stay bounded by the deletes
//! of the last few seconds instead of growing with every key ever deleted.
//! Foreshadow only: pglogical keeps no tombstones (which is how a delete
//! racing an update can leave its regions different).

use super::report::{Plot, Report, Target};
use super::sampling::round2;
use super::{with_lab, BenchOptions};
use crate::lab::Lab;
use crate::spec::Engine;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: u64 = 10_000;

#[derive(Serialize)]
struct Figures {
    keys: u64,
    write_s: Option<f64>,
    /// The most tombstones any region held at once.
    max_tombstones: u64,
    /// The most versions (live rows and tombstones) any region held.
    max_versions: u64,
    /// After the last delete: until every region held no tombstone.
    forgotten_after_s: Option<f64>,
    tombstones_at_end: u64,
    /// The version store's size (heap and indexes), largest and at the end.
    max_store_bytes: u64,
    store_bytes_at_end: u64,
    /// Per region: (seconds, tombstones) every second.
    tombstones: BTreeMap<String, Vec<(f64, f64)>>,
}

const SAMPLE_SQL: &str = "SELECT count(*) FILTER (WHERE deleted), count(*), \
        pg_total_relation_size('foreshadow.row_versions') + pg_total_relation_size('foreshadow.tombstones') \
   FROM foreshadow.row_versions WHERE relid = 'churn'::regclass";

/// (tombstones, versions, store bytes) in `region`.
async fn sample(lab: &Lab, region: &str) -> Result<(u64, u64, u64), String> {
    let row = lab
        .client(region)
        .await?
        .query_one(SAMPLE_SQL, &[])
        .await
        .map_err(|e| format!("region {region}: {e}"))?;
    let n = |i: usize| row.get::<_, i64>(i) as u64;
    Ok((n(0), n(1), n(2)))
}

pub async fn run(opts: &BenchOptions, report: &mut Report) -> Result<(), String> {
    let keys = if opts.quick { 20_000 } else { 1_000_000 };
    let f = with_lab(
        opts,
        Engine::Foreshadow,
        opts.regions,
        "footprint",
        async |lab| one(lab, keys).await,
    )
    .await?;
    let md = format!(
        "{keys} distinct keys inserted and deleted again in batches of {BATCH} (each batch one \
         insert and one delete, in one transaction, from each region in turn), {} regions, {} ms WAN.\n\n\
         | keys | writing (s) | most tombstones in a region | most versions in a region | no tombstone left after the last delete (s) | tombstones at the end | version store, largest / at the end (MB) |\n|---|---|---|---|---|---|---|\n\
         | {keys} | {} | {} | {} | {} | {} | {:.1} / {:.1} |\n\n\
         Without collection every region would hold {keys} tombstones at the end.\n",
        opts.regions,
        opts.wan_ms,
        super::sampling::show(f.write_s),
        f.max_tombstones,
        f.max_versions,
        super::sampling::show(f.forgotten_after_s),
        f.tombstones_at_end,
        f.max_store_bytes as f64 / 1e6,
        f.store_bytes_at_end as f64 / 1e6,
    );
    report.section("Tombstones while keys churn", md);
    report.targets(&[Target {
        name: "tombstones left once every region has moved past the deletes",
        wanted: "0",
        value: Some(f.tombstones_at_end as f64),
        met: Some(f.tombstones_at_end == 0),
    }]);
    report.plot(Plot {
        name: "footprint".into(),
        title: "tombstones held per region while keys churn".into(),
        x_label: "seconds".into(),
        y_label: "tombstones".into(),
        series: f.tombstones.clone().into_iter().collect(),
    });
    let mut engines = BTreeMap::new();
    engines.insert("foreshadow", f);
    report.set("engines", &engines);
    Ok(())
}

async fn one(lab: &Lab, keys: u64) -> Result<Figures, String> {
    let names: Vec<String> = lab.spec.regions.iter().map(|r| r.name.clone()).collect();
    lab.everywhere(
        "CREATE TABLE churn (id bigint PRIMARY KEY, v text);
         SELECT foreshadow.make_global('churn');",
    )
    .await?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (dir, names, stop) = (lab.dir.clone(), names.clone(), stop.clone());
        tokio::spawn(async move {
            let lab = Lab::open(&dir)?;
            let mut samples: BTreeMap<String, Vec<(f64, u64, u64, u64)>> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                for r in &names {
                    let (t, v, b) = sample(&lab, r).await?;
                    samples.entry(r.clone()).or_default().push((
                        t0.elapsed().as_secs_f64(),
                        t,
                        v,
                        b,
                    ));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok::<_, String>(samples)
        })
    };
    for (n, start) in (0..keys).step_by(BATCH as usize).enumerate() {
        let region = &names[n % names.len()];
        let c = lab.client(region).await?;
        let end = (start + BATCH).min(keys);
        c.batch_execute(&format!(
            "INSERT INTO churn SELECT g, 'v' FROM generate_series({start}, {}) g;
             DELETE FROM churn WHERE id >= {start} AND id < {end};",
            end - 1
        ))
        .await
        .map_err(|e| format!("region {region}: {e}"))?;
        if n % 10 == 0 {
            println!("   [footprint] {end} of {keys} keys written and deleted");
        }
    }
    let write_s = t0.elapsed().as_secs_f64();
    let deleted = Instant::now();
    let deadline = deleted + Duration::from_secs(300);
    let forgotten = loop {
        let mut left = 0;
        for r in &names {
            left += sample(lab, r).await?.0;
        }
        if left == 0 {
            break Some(deleted.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.map_err(|e| e.to_string())??;
    let mut end = (0, 0);
    for r in &names {
        let (t, _, b) = sample(lab, r).await?;
        end = (end.0 + t, end.1.max(b));
    }
    let all = || samples.values().flatten();
    Ok(Figures {
        keys,
        write_s: round2(write_s),
        max_tombstones: all().map(|s| s.1).max().unwrap_or(0),
        max_versions: all().map(|s| s.2).max().unwrap_or(0),
        forgotten_after_s: forgotten.and_then(round2),
        tombstones_at_end: end.0,
        max_store_bytes: all().map(|s| s.3).max().unwrap_or(0),
        store_bytes_at_end: end.1,
        tombstones: samples
            .iter()
            .map(|(r, s)| (r.clone(), s.iter().map(|x| (x.0, x.1 as f64)).collect()))
            .collect(),
    })
}
