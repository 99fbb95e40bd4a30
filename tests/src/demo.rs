//! The README's main command: three regions behind a simulated WAN, every
//! region writing one global table at once (some keys hot in all regions),
//! then proof that every region converged to the same rows.

use crate::lab::{Lab, UpOptions};
use crate::workload::{
    add_cart_items, plain_md5, write_until, WriterStats, ACCOUNTS_DDL, CARTS_DDL,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Carts every region adds items to.
const CARTS: i64 = 5;

pub struct DemoOptions {
    pub dir: PathBuf,
    pub regions: usize,
    pub wan_ms: u64,
    pub seconds: u64,
    pub hot_keys: u64,
    pub keep: bool,
}

pub async fn run(opts: DemoOptions) -> Result<(), String> {
    println!(
        "== Foreshadow demo: {} regions, {} ms simulated WAN latency each way, {} s of writes",
        opts.regions, opts.wan_ms, opts.seconds
    );
    let t0 = Instant::now();
    let lab = Lab::up(UpOptions {
        dir: opts.dir.clone(),
        regions: opts.regions,
        wan_ms: opts.wan_ms,
        engine: crate::spec::Engine::Foreshadow,
        tls: false,
    })
    .await?;
    println!(
        "   lab up in {:.1} s at {} (regions: {})",
        t0.elapsed().as_secs_f64(),
        lab.dir.display(),
        lab.spec
            .regions
            .iter()
            .map(|r| format!("{} :{}", r.name, r.port))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let result = drive(&lab, &opts).await;
    if opts.keep {
        println!(
            "   lab left running: foreshadow-lab down --dir {}",
            lab.dir.display()
        );
    } else {
        lab.down(false)?;
    }
    result
}

async fn drive(lab: &Lab, opts: &DemoOptions) -> Result<(), String> {
    lab.everywhere(ACCOUNTS_DDL).await?;
    println!("== created global table public.accounts (strategy lww) in every region");
    lab.everywhere(CARTS_DDL).await?;
    let first = lab.client(&lab.spec.regions[0].name).await?;
    for cart in 0..CARTS {
        first
            .execute("INSERT INTO carts VALUES ($1, '{}')", &[&cart])
            .await
            .map_err(|e| e.to_string())?;
    }
    lab.wait_identical(&["public.carts"], Duration::from_secs(60))
        .await?;
    println!(
        "== created global table public.carts (strategy merge: public.cart_merge, which is not commutative) with {CARTS} carts"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Vec<Arc<WriterStats>> = lab.spec.regions.iter().map(|_| Arc::default()).collect();
    let lab = Arc::new(Lab::open(&lab.dir)?);
    let writers: Vec<_> = (0..lab.spec.regions.len())
        .map(|i| {
            let (lab, stop, stats, hot) =
                (lab.clone(), stop.clone(), stats[i].clone(), opts.hot_keys);
            tokio::spawn(async move { write_until(&lab, i, hot, stop, stats).await })
        })
        .collect();
    let carts: Vec<_> = (0..lab.spec.regions.len())
        .map(|i| {
            let (lab, stop) = (lab.clone(), stop.clone());
            tokio::spawn(async move {
                add_cart_items(&lab, i, CARTS, Duration::from_millis(50), stop).await
            })
        })
        .collect();
    println!(
        "== writing from every region at once; keys 1..={} are hot in all regions (conflicts), and every region adds items to the same carts",
        opts.hot_keys
    );
    for s in 1..=opts.seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut line = format!("   t={s:>2}s");
        for (r, st) in lab.spec.regions.iter().zip(&stats) {
            let rows: i64 = lab
                .client(&r.name)
                .await?
                .query_one("SELECT count(*) FROM accounts", &[])
                .await
                .map(|x| x.get(0))
                .unwrap_or(-1);
            line.push_str(&format!(
                "  {}: {} writes, {} rows visible",
                r.name,
                st.inserts.load(Ordering::Relaxed) + st.hot_updates.load(Ordering::Relaxed),
                rows
            ));
        }
        println!("{line}");
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.map_err(|e| e.to_string())??;
    }
    let mut items = Vec::new();
    for c in carts {
        items.extend(c.await.map_err(|e| e.to_string())??);
    }
    let stopped = Instant::now();
    println!("== writes stopped; waiting for every region to converge");
    let digest = lab
        .wait_converged("public.accounts", Duration::from_secs(120))
        .await?;
    let converge_ms = stopped.elapsed().as_millis();
    println!(
        "   {:<10} {:<34} {:<34} rows",
        "region", "foreshadow.table_digest", "md5 of rows in key order"
    );
    let mut plain = Vec::new();
    for r in &lab.spec.regions {
        let md5 = plain_md5(&lab, &r.name, "accounts").await?;
        let rows: i64 = lab
            .client(&r.name)
            .await?
            .query_one("SELECT count(*) FROM accounts", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        println!("   {:<10} {:<34} {:<34} {}", r.name, digest, md5, rows);
        plain.push(md5);
    }
    if plain.iter().any(|m| *m != plain[0]) {
        return Err("regions disagree on the independent md5".into());
    }
    let c = lab.client(&lab.spec.regions[0].name).await?;
    let winners = c
        .query(
            "SELECT a.id, a.region, a.balance, v.origin, foreshadow.hlc_text(v.hlc) AS hlc \
             FROM accounts a JOIN foreshadow.row_versions v ON v.relid = 'accounts'::regclass AND v.key::jsonb ->> 'id' = a.id::text \
             WHERE a.id <= $1 ORDER BY a.id",
            &[&(opts.hot_keys as i64)],
        )
        .await
        .map_err(|e| e.to_string())?;
    println!("== hot keys: the last writer (highest hybrid logical clock, then region) won in every region");
    for w in winners {
        println!(
            "   id={:<3} balance={:<4} written by {:<9} at hlc {}",
            w.get::<_, i64>(0),
            w.get::<_, i64>(2),
            w.get::<_, String>(3),
            w.get::<_, String>(4)
        );
    }
    println!(
        "== accounts (lww): conflicts each region resolved on arrival (foreshadow.conflicts), by kind and outcome"
    );
    for r in &lab.spec.regions {
        let kinds: Vec<String> = lab
            .client(&r.name)
            .await?
            .query(
                "SELECT kind || ': ' || count(*) || ' (' || string_agg(DISTINCT outcome, ', ') || ')' \
                   FROM foreshadow.conflicts WHERE table_name = 'accounts'::regclass GROUP BY kind ORDER BY kind",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|row| row.get(0))
            .collect();
        println!(
            "   {:<10} {}",
            r.name,
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join("; ")
            }
        );
    }
    lab.wait_identical(&["public.carts"], Duration::from_secs(120))
        .await?;
    show_carts(&lab, &items).await?;
    let total: u64 = stats
        .iter()
        .map(|s| s.inserts.load(Ordering::Relaxed) + s.hot_updates.load(Ordering::Relaxed))
        .sum();
    let hot: u64 = stats
        .iter()
        .map(|s| s.hot_updates.load(Ordering::Relaxed))
        .sum();
    println!(
        "== summary: {total} committed writes ({hot} to hot keys) in {} regions; converged {converge_ms} ms after writes stopped; all digests equal",
        lab.spec.regions.len()
    );
    Ok(())
}

/// The merge table: per region, the conflicts detected, resolved by the
/// table's shadow (here if this region hosts it, else adopted from its
/// pre-stage, some before the conflicting writes arrived), the fallbacks
/// and the merge function's calls; and every committed item in its cart
/// exactly once, in every region.
async fn show_carts(lab: &Lab, items: &[(i64, String)]) -> Result<(), String> {
    let c0 = lab.client(&lab.spec.regions[0].name).await?;
    let shadow: String = c0
        .query_one(
            "SELECT array_to_string(shadows, ', ') FROM foreshadow.global_tables WHERE table_name = 'carts'::regclass",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    println!("== carts (strategy merge, shadow in {shadow}): per region, conflicts detected and how each was resolved");
    for r in &lab.spec.regions {
        let c = lab.client(&r.name).await?;
        let row = c
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE resolved_by = 'shadow' AND outcome = 'merged'), \
                        count(*) FILTER (WHERE outcome LIKE 'pre-staged%'), \
                        count(*) FILTER (WHERE outcome = 'pre-staged before its writes arrived'), \
                        count(*) FILTER (WHERE resolved_by IN ('fallback', 'local') AND outcome IN ('merged', 'merge failed: last writer wins')), \
                        coalesce(sum(merge_calls), 0), \
                        (SELECT count(*) FROM foreshadow.conflict_failures) \
                   FROM foreshadow.conflicts WHERE table_name = 'carts'::regclass",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let n = |i: usize| row.get::<_, i64>(i);
        println!(
            "   {:<10} {} detected: {} resolved here by the shadow, {} adopted from the shadow ({} pre-staged before the conflicting write arrived), {} fallbacks; {} merge-function calls ({:.2} per conflict resolved here), {} failures",
            r.name,
            n(0),
            n(1),
            n(2),
            n(3),
            n(4),
            n(5),
            n(5) as f64 / (n(1) + n(4)).max(1) as f64,
            n(6)
        );
        let carts: std::collections::HashMap<i64, Vec<String>> = c
            .query("SELECT id, items FROM carts", &[])
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|x| (x.get(0), x.get(1)))
            .collect();
        let wrong = items
            .iter()
            .filter(|(cart, item)| carts[cart].iter().filter(|x| *x == item).count() != 1)
            .count();
        let held: usize = carts.values().map(Vec::len).sum();
        if wrong > 0 || held != items.len() {
            return Err(format!(
                "region {}: {wrong} committed items not present exactly once, {held} items held for {} committed",
                r.name,
                items.len()
            ));
        }
    }
    println!(
        "   {} items committed into {CARTS} carts; every one present exactly once in every region, and the carts are identical",
        items.len()
    );
    Ok(())
}
