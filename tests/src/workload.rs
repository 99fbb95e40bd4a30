//! Writers that tests and the demo run against a lab.

use crate::lab::Lab;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The table the demo and the tests write.
pub const ACCOUNTS_DDL: &str =
    "CREATE TABLE public.accounts (id bigint PRIMARY KEY, region text NOT NULL, \
     balance bigint NOT NULL, note text); SELECT foreshadow.make_global('public.accounts');";

macro_rules! carts_table {
    () => {
        "CREATE TABLE public.carts (id bigint PRIMARY KEY, items text[] NOT NULL); \
         CREATE FUNCTION public.cart_merge(base public.carts, local public.carts, remote public.carts) \
         RETURNS public.carts LANGUAGE sql IMMUTABLE \
         AS $$ SELECT ROW(local.id, local.items || ARRAY(SELECT x FROM unnest(remote.items) AS x \
                                                     WHERE x <> ALL (local.items)))::public.carts $$;"
    };
}

/// A shopping cart per key whose concurrent versions are merged by a
/// non-commutative function: the accumulated items in their order, then
/// the next version's items not in it yet. Every added item is kept, once;
/// the order depends on the order the versions are folded in, so regions
/// that fold in different orders end with different rows.
pub const CARTS_DDL: &str = concat!(
    carts_table!(),
    " SELECT foreshadow.make_global('public.carts', strategy => 'merge', \
       merge_function => 'public.cart_merge(public.carts, public.carts, public.carts)');"
);

/// The carts table and its merge function alone (for engines that have
/// no merge: the benchmark's pglogical run).
pub const CARTS_TABLE_DDL: &str = carts_table!();

/// `cart_merge` of CARTS_DDL, for oracles: `acc`'s items, then `next`'s
/// that `acc` does not have.
pub fn cart_merge(acc: &[String], next: &[String]) -> Vec<String> {
    let mut out = acc.to_vec();
    out.extend(next.iter().filter(|x| !acc.contains(x)).cloned());
    out
}

/// Adds items (`<region>-<n>`) to carts `0..carts` of region
/// `region_index`, one per transaction, every `pause`, until `stop`;
/// returns the committed ones as (cart, item).
pub async fn add_cart_items(
    lab: &Lab,
    region_index: usize,
    carts: i64,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> Result<Vec<(i64, String)>, String> {
    let region = lab.spec.regions[region_index].name.clone();
    let c = lab.client(&region).await?;
    let mut rng = Rng::new(region_index as u64 * 104_729 + 3);
    let (mut committed, mut n) = (Vec::new(), 0u64);
    while !stop.load(Ordering::Relaxed) {
        let (cart, item) = (
            (rng.next_u64() % carts as u64) as i64,
            format!("{region}-{n}"),
        );
        let added = c
            .execute(
                "UPDATE carts SET items = items || $2::text WHERE id = $1",
                &[&cart, &item],
            )
            .await;
        if added.is_ok_and(|rows| rows == 1) {
            committed.push((cart, item));
        }
        n += 1;
        tokio::time::sleep(pause).await;
    }
    Ok(committed)
}

/// A small deterministic pseudo-random sequence (xorshift), enough to pick hot keys.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Counts of what one region's writer committed.
#[derive(Default)]
pub struct WriterStats {
    pub inserts: AtomicU64,
    pub hot_updates: AtomicU64,
    pub errors: AtomicU64,
}

/// Inserts unique keys ((region index + 1) × 10⁹ + n) and, if `hot_keys > 0`,
/// updates one of keys 1..=hot_keys after every insert, until `stop`. A
/// failed write (region down) is counted and retried after a pause: only
/// committed writes count.
pub async fn write_until(
    lab: &Lab,
    region_index: usize,
    hot_keys: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<WriterStats>,
) -> Result<(), String> {
    let region = lab.spec.regions[region_index].name.clone();
    let mut rng = Rng::new(region_index as u64 * 7919 + 1);
    let mut n: i64 = 0;
    let mut client = None;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            client = lab.client(&region).await.ok();
            if client.is_none() {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let c = client.as_ref().expect("connected");
        let id = (region_index as i64 + 1) * 1_000_000_000 + n;
        let ok = c
            .execute(
                "INSERT INTO accounts VALUES ($1, $2, 0, 'insert')",
                &[&id, &region],
            )
            .await
            .is_ok();
        if !ok {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            client = None;
            continue;
        }
        n += 1;
        stats.inserts.fetch_add(1, Ordering::Relaxed);
        if hot_keys > 0 {
            let key = (rng.next_u64() % hot_keys + 1) as i64;
            let balance = (rng.next_u64() % 1000) as i64;
            let r = c
                .execute(
                    "INSERT INTO accounts VALUES ($1, $2, $3, 'hot') \
                     ON CONFLICT (id) DO UPDATE SET region = EXCLUDED.region, balance = EXCLUDED.balance",
                    &[&key, &region, &balance],
                )
                .await;
            match r {
                Ok(_) => stats.hot_updates.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
    Ok(())
}

/// An independent check of convergence: md5 over the rows in key order,
/// computed without any Foreshadow function.
pub async fn plain_md5(lab: &Lab, region: &str, table: &str) -> Result<String, String> {
    let c = lab.client(region).await?;
    let row = c
        .query_one(
            &format!(
                "SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.id), '')) FROM {table} t"
            ),
            &[],
        )
        .await
        .map_err(|e| format!("region {region}: {e}"))?;
    Ok(row.get(0))
}
