//! The chaos workload: one writer per region, its operations drawn from the
//! seed among the workloads of `WORKLOADS`, each recorded with its outcome.
//! Acknowledged: the commit answered. Failed: the server refused it
//! (nothing was written). In doubt: the connection died, or the server was
//! shutting down, before the answer, so it may or may not have committed.
//! Beside each writer a reader records what its region shows, for the
//! workloads that promise something about reads.
//!
//! A workload is a module with a `Workload` impl: its tables, one operation,
//! what a reader looks at, and what must hold at the end. Adding one is its
//! module, its line in `WORKLOADS` and its `Op` variant.

pub mod counters;
pub mod hot;
pub mod items;

use super::invariants::Check;
use crate::lab::Lab;
use crate::workload::Rng;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

/// A boxed future, so that workloads can be listed as `dyn Workload`.
pub type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Every workload of a chaos run, with its share of the operations (%).
pub const WORKLOADS: [(&dyn Workload, u64); 3] = [
    (&items::Items, 60),
    (&counters::Counters, 25),
    (&hot::Hot, 15),
];

pub trait Workload: Sync {
    /// Its tables: created in every region and replicated before the run,
    /// compared across regions after it.
    fn tables(&self) -> &'static [&'static str];
    /// The DDL of its tables (and rows present everywhere before the run).
    fn ddl(&self) -> String;
    /// Columns of its tables whose concurrent increments must add up.
    fn counters(&self, _table: &str) -> &'static [&'static str] {
        &[]
    }
    /// One operation by writer `w`: what it did and how it ended.
    fn step<'a>(
        &'a self,
        c: &'a mut Client,
        w: &'a mut Writer,
        rng: &'a mut Rng,
    ) -> Boxed<'a, Step>;
    /// What a reader in a region sees now, as (what, value) pairs; a
    /// change is recorded in `History::observed`.
    fn observe<'a>(&'a self, _c: &'a Client) -> Boxed<'a, Option<Vec<(String, i64)>>> {
        Box::pin(async { Some(Vec::new()) })
    }
    /// What must hold once the regions are healed and quiet.
    fn check<'a>(
        &'a self,
        lab: &'a Lab,
        history: &'a History,
    ) -> Boxed<'a, Result<Vec<Check>, String>>;
}

/// The operations of one step and how the step ended.
pub type Step = (Vec<Op>, Result<(), tokio_postgres::Error>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Acknowledged,
    Failed,
    InDoubt,
}

/// One recorded operation, by workload.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Items(items::Op),
    Counters(counters::Op),
    Hot(hot::Op),
}

/// One region's writer: who it is and what it has written so far.
pub struct Writer {
    pub index: usize,
    pub region: String,
    /// Keys it allocated (unique across writers: they start at
    /// (index + 1) × 10⁹).
    pub next: i64,
    /// Its acknowledged inserts not yet deleted.
    pub mine: Vec<i64>,
    /// Its acknowledged deletes not yet inserted again.
    pub gone: Vec<i64>,
}

impl Writer {
    /// A fresh value or key no other writer uses.
    pub fn unique(&mut self) -> i64 {
        self.next += 1;
        (self.index as i64 + 1) * 1_000_000_000 + self.next
    }
}

#[derive(Default)]
pub struct History {
    pub ops: Vec<(Op, Outcome)>,
    /// What the readers saw: (region, what, value), in the order seen in
    /// that region, repeats left out.
    pub observed: Vec<(String, String, i64)>,
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
        self.observed.extend(other.observed);
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

    /// The operations of one workload with their outcomes.
    pub fn of<'a, T: 'a>(
        &'a self,
        pick: impl Fn(&Op) -> Option<T> + 'a,
    ) -> impl Iterator<Item = (T, Outcome)> + 'a {
        self.ops
            .iter()
            .filter_map(move |(op, o)| Some((pick(op)?, *o)))
    }
}

/// Every workload's tables, replicated by the lab's engine, in every region.
pub async fn create_tables(lab: &Lab) -> Result<(), String> {
    for (w, _) in WORKLOADS {
        lab.everywhere(&w.ddl()).await?;
        for t in w.tables() {
            lab.replicate_table(&format!("public.{t}"), w.counters(t), false)
                .await?;
        }
    }
    Ok(())
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
    let mut w = Writer {
        index,
        region: lab.spec.regions[index].name.clone(),
        next: 0,
        mine: Vec::new(),
        gone: Vec::new(),
    };
    let mut rng = Rng::new(seed);
    let mut history = History::default();
    let total: u64 = WORKLOADS.iter().map(|(_, share)| share).sum();
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            client = lab.client(&w.region).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        let mut roll = rng.next_u64() % total;
        let (workload, _) = WORKLOADS
            .iter()
            .find(|(_, share)| {
                let here = roll < *share;
                roll = roll.saturating_sub(*share);
                here
            })
            .expect("the roll falls in some share");
        let (ops, result) = workload.step(c, &mut w, &mut rng).await;
        let outcome = match &result {
            Ok(()) => Outcome::Acknowledged,
            Err(e) => outcome_of(e),
        };
        if result.is_err() {
            // Reconnect: after a failure the session may be gone.
            client = None;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        history.ops.extend(ops.into_iter().map(|o| (o, outcome)));
    }
    Ok(history)
}

/// Reads what the workloads observe in region `index` every 100 ms until
/// `stop`; returns the changes seen, in order. A read that fails (region
/// down) is skipped.
pub async fn read(lab: &Lab, index: usize, stop: Arc<AtomicBool>) -> Result<History, String> {
    let region = lab.spec.regions[index].name.clone();
    let mut history = History::default();
    let mut last = std::collections::HashMap::new();
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(c) = client.as_ref() else {
            client = lab.client(&region).await.ok();
            continue;
        };
        for (w, _) in WORKLOADS {
            let Some(seen) = w.observe(c).await else {
                client = None;
                break;
            };
            for (what, v) in seen {
                if last.insert(what.clone(), v) != Some(v) {
                    history.observed.push((region.clone(), what, v));
                }
            }
        }
    }
    Ok(history)
}
