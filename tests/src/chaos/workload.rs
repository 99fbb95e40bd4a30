//! The chaos workload: one writer per region, its operations chosen from the
//! seed, each recorded with its outcome. Acknowledged: the commit answered.
//! Failed: the server refused it (nothing was written). In doubt: the
//! connection died, or the server was shutting down, before the answer, so
//! it may or may not have committed. Beside each writer a reader records
//! what its region shows of the hot keys, for the monotonic-read and
//! causality checks.

use crate::lab::Lab;
use crate::workload::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

/// Counter rows, present in every region before the run.
pub const COUNTER_KEYS: i32 = 8;
/// Shared rows every region overwrites, present in every region (value 0)
/// before the run.
pub const HOT_KEYS: i32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Acknowledged,
    Failed,
    InDoubt,
}

#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// A unique key inserted into `chaos_items`.
    Insert(i64),
    /// One of the writer's own keys deleted.
    Delete(i64),
    /// `chaos_counters.n` of a key increased by a positive amount.
    Increment(i32, i64),
    /// A shared hot key of `chaos_hot` read (value `read`) and then, in the
    /// same transaction, overwritten with the unique value `wrote`: the
    /// write was made after reading `read`, so it must supersede it.
    Overwrite { key: i32, read: i64, wrote: i64 },
}

/// What one region showed of hot key `key`: its successive values, in the
/// order a reader saw them there (repeats left out).
#[derive(Default)]
pub struct Observed(pub Vec<(String, i32, i64)>);

#[derive(Default)]
pub struct History {
    pub ops: Vec<(Op, Outcome)>,
    pub observed: Observed,
}

#[derive(Default)]
pub struct Tally {
    pub acknowledged: usize,
    pub failed: usize,
    pub in_doubt: usize,
}

impl History {
    pub fn extend(&mut self, other: History) {
        self.ops.extend(other.ops);
        self.observed.0.extend(other.observed.0);
    }

    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for (_, o) in &self.ops {
            match o {
                Outcome::Acknowledged => t.acknowledged += 1,
                Outcome::Failed => t.failed += 1,
                Outcome::InDoubt => t.in_doubt += 1,
            }
        }
        t
    }
}

/// The run's tables, replicated by the lab's engine, in every region.
pub async fn create_tables(lab: &Lab) -> Result<(), String> {
    lab.everywhere(&format!(
        "CREATE TABLE public.chaos_items (id bigint PRIMARY KEY, region text NOT NULL, note text); \
         CREATE TABLE public.chaos_counters (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0); \
         INSERT INTO public.chaos_counters SELECT g, 0 FROM generate_series(1, {COUNTER_KEYS}) g; \
         CREATE TABLE public.chaos_hot (id int PRIMARY KEY, v bigint NOT NULL, region text NOT NULL); \
         INSERT INTO public.chaos_hot SELECT g, 0, 'start' FROM generate_series(1, {HOT_KEYS}) g;"
    ))
    .await?;
    lab.replicate_table("public.chaos_items", &[], false)
        .await?;
    lab.replicate_table("public.chaos_counters", &["n"], false)
        .await?;
    lab.replicate_table("public.chaos_hot", &[], false).await
}

fn outcome_of(e: &tokio_postgres::Error) -> Outcome {
    match e.code().map(|c| c.code()) {
        // Class 08 (connection) and 57 (operator intervention: shutdown,
        // crash of another backend) can arrive after the commit was written.
        Some(code) if !code.starts_with("08") && !code.starts_with("57") => Outcome::Failed,
        _ => Outcome::InDoubt,
    }
}

/// Writes in region `index` until `stop`; returns what it did.
pub async fn write(
    lab: &Lab,
    index: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<History, String> {
    let region = lab.spec.regions[index].name.clone();
    let mut rng = Rng::new(seed);
    let mut history = History::default();
    let mut written = 0i64;
    let mut mine: Vec<i64> = Vec::new();
    let base = (index as i64 + 1) * 1_000_000_000;
    let mut next = 0i64;
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            client = lab.client(&region).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        let roll = rng.next_u64() % 100;
        let (ops, result) = match roll {
            0..=39 => {
                next += 1;
                let id = base + next;
                let r = c
                    .execute(
                        "INSERT INTO chaos_items VALUES ($1, $2, 'one')",
                        &[&id, &region],
                    )
                    .await;
                (vec![Op::Insert(id)], r.map(|_| ()))
            }
            40..=49 | 99 => {
                // A multi-row transaction; now and then a large one.
                let n = if roll == 99 { 500 } else { 3 };
                let ids: Vec<i64> = (1..=n).map(|k| base + next + k).collect();
                next += n;
                let r = async {
                    let tx = c.transaction().await?;
                    tx.execute(
                        "INSERT INTO chaos_items SELECT g, $3, 'many' FROM generate_series($1::bigint, $2::bigint) g",
                        &[&ids[0], &ids[ids.len() - 1], &region],
                    )
                    .await?;
                    tx.commit().await
                }
                .await;
                (ids.into_iter().map(Op::Insert).collect(), r)
            }
            50..=59 if !mine.is_empty() => {
                let id = mine.swap_remove(rng.next_u64() as usize % mine.len());
                let r = c
                    .execute("DELETE FROM chaos_items WHERE id = $1", &[&id])
                    .await;
                (vec![Op::Delete(id)], r.map(|_| ()))
            }
            50..=84 => {
                let key = (rng.next_u64() % COUNTER_KEYS as u64) as i32 + 1;
                let delta = (rng.next_u64() % 5) as i64 + 1;
                let r = c
                    .execute(
                        "UPDATE chaos_counters SET n = n + $1 WHERE id = $2",
                        &[&delta, &key],
                    )
                    .await;
                (vec![Op::Increment(key, delta)], r.map(|_| ()))
            }
            _ => {
                let key = (rng.next_u64() % HOT_KEYS as u64) as i32 + 1;
                written += 1;
                let wrote = (index as i64 + 1) * 1_000_000_000_000 + written;
                let mut read = None;
                let r = async {
                    let tx = c.transaction().await?;
                    let v: i64 = tx
                        .query_one("SELECT v FROM chaos_hot WHERE id = $1", &[&key])
                        .await?
                        .get(0);
                    read = Some(v);
                    tx.execute(
                        "UPDATE chaos_hot SET v = $2, region = $3 WHERE id = $1",
                        &[&key, &wrote, &region],
                    )
                    .await?;
                    tx.commit().await
                }
                .await;
                // Failed before the read: nothing was written, and there is
                // nothing to check the write against.
                let read = read.unwrap_or(i64::MIN);
                (vec![Op::Overwrite { key, read, wrote }], r)
            }
        };
        let outcome = match &result {
            Ok(()) => Outcome::Acknowledged,
            Err(e) => outcome_of(e),
        };
        if outcome == Outcome::Acknowledged {
            mine.extend(ops.iter().filter_map(|o| match o {
                Op::Insert(id) => Some(*id),
                _ => None,
            }));
        }
        if result.is_err() {
            // Reconnect: after a failure the session may be gone.
            client = None;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        history.ops.extend(ops.into_iter().map(|o| (o, outcome)));
    }
    Ok(history)
}

/// Reads region `index`'s hot keys every 100 ms until `stop`; returns the
/// values seen, in order. A read that fails (region down) is skipped.
pub async fn read(lab: &Lab, index: usize, stop: Arc<AtomicBool>) -> Result<History, String> {
    let region = lab.spec.regions[index].name.clone();
    let mut history = History::default();
    let mut last: Vec<Option<i64>> = vec![None; HOT_KEYS as usize + 1];
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(c) = client.as_ref() else {
            client = lab.client(&region).await.ok();
            continue;
        };
        match c.query("SELECT id, v FROM chaos_hot", &[]).await {
            Ok(rows) => {
                for row in rows {
                    let (key, v): (i32, i64) = (row.get(0), row.get(1));
                    let seen = &mut last[key as usize];
                    if *seen != Some(v) {
                        *seen = Some(v);
                        history.observed.0.push((region.clone(), key, v));
                    }
                }
            }
            Err(_) => client = None,
        }
    }
    Ok(history)
}
