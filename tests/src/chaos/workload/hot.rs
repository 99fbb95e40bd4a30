//! Hot rows every region overwrites (last writer wins), each overwrite made
//! after reading the row in the same transaction. Readers record what each
//! region shows. Promised: no region shows a row going back to a value it
//! had moved past (monotonic reads), and no region shows a value after a
//! write made on reading it, nor ends on it (causality: a read-then-write
//! supersedes what it read, in every region, whatever the clocks say).

use super::{Boxed, History, Outcome, Step, Workload, Writer};
use crate::chaos::invariants::Check;
use crate::lab::Lab;
use crate::workload::Rng;
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_postgres::Client;

/// Shared rows, present in every region (value 0) before the run.
pub const KEYS: i32 = 5;

#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub key: i32,
    /// The value read before writing (i64::MIN: the read failed).
    pub read: i64,
    /// The unique value written.
    pub wrote: i64,
}

pub struct Hot;

impl Workload for Hot {
    fn tables(&self) -> &'static [&'static str] {
        &["chaos_hot"]
    }

    fn ddl(&self) -> String {
        format!(
            "CREATE TABLE public.chaos_hot (id int PRIMARY KEY, v bigint NOT NULL, region text NOT NULL); \
             INSERT INTO public.chaos_hot SELECT g, 0, 'start' FROM generate_series(1, {KEYS}) g"
        )
    }

    fn step<'a>(
        &'a self,
        c: &'a mut Client,
        w: &'a mut Writer,
        rng: &'a mut Rng,
    ) -> Boxed<'a, Step> {
        Box::pin(async move {
            let key = (rng.next_u64() % KEYS as u64) as i32 + 1;
            let wrote = w.unique();
            let mut read = i64::MIN;
            let r = async {
                let tx = c.transaction().await?;
                read = tx
                    // Locked: the value read is the one the write replaces.
                    .query_one("SELECT v FROM chaos_hot WHERE id = $1 FOR UPDATE", &[&key])
                    .await?
                    .get(0);
                tx.execute(
                    "UPDATE chaos_hot SET v = $2, region = $3 WHERE id = $1",
                    &[&key, &wrote, &w.region],
                )
                .await?;
                tx.commit().await
            }
            .await;
            (vec![super::Op::Hot(Op { key, read, wrote })], r)
        })
    }

    fn observe<'a>(&'a self, c: &'a Client) -> Boxed<'a, Option<Vec<(String, i64)>>> {
        Box::pin(async move {
            let rows = c.query("SELECT id, v FROM chaos_hot", &[]).await.ok()?;
            Some(
                rows.iter()
                    .map(|r| (format!("chaos_hot {}", r.get::<_, i32>(0)), r.get(1)))
                    .collect(),
            )
        })
    }

    fn check<'a>(
        &'a self,
        lab: &'a Lab,
        history: &'a History,
    ) -> Boxed<'a, Result<Vec<Check>, String>> {
        Box::pin(check(lab, history))
    }
}

/// Monotonic reads and causality over what the readers saw, with each
/// region's final (converged) value as its last observation.
async fn check(lab: &Lab, history: &History) -> Result<Vec<Check>, String> {
    let mut seen: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for (region, what, v) in &history.observed {
        if what.starts_with("chaos_hot ") {
            seen.entry((region.clone(), what.clone()))
                .or_default()
                .push(*v);
        }
    }
    for r in &lab.spec.regions {
        let c = lab.client(&r.name).await?;
        for (what, v) in Hot
            .observe(&c)
            .await
            .ok_or_else(|| format!("region {}: cannot read chaos_hot", r.name))?
        {
            let values = seen.entry((r.name.clone(), what)).or_default();
            if values.last() != Some(&v) {
                values.push(v);
            }
        }
    }
    let acked: Vec<Op> = history
        .of(|o| match o {
            super::Op::Hot(h) => Some(*h),
            _ => None,
        })
        .filter(|(_, o)| *o == Outcome::Acknowledged)
        .map(|(op, _)| op)
        .collect();
    // What each acknowledged write read: it must supersede that, and all
    // that the read value itself superseded.
    let read_by: HashMap<i64, i64> = acked.iter().map(|op| (op.wrote, op.read)).collect();
    let mut monotonic = Check::new("monotonic reads (no value seen again once moved past)");
    let mut causal = Check::new("read-then-write supersedes what it read");
    for ((region, what), values) in &seen {
        let mut past: HashSet<i64> = HashSet::new();
        let mut superseded: HashSet<i64> = HashSet::new();
        for (i, &v) in values.iter().enumerate() {
            if i > 0 {
                monotonic.expect(!past.contains(&v), || {
                    format!(
                        "{region}: {what} went back to {v} (seen: {})",
                        around(values, i)
                    )
                });
                causal.expect(!superseded.contains(&v), || {
                    format!(
                        "{region}: {what} shows {v} after a write made on reading it (seen: {})",
                        around(values, i)
                    )
                });
            }
            past.insert(v);
            let mut w = v;
            while let Some(&r) = read_by.get(&w) {
                if !superseded.insert(r) {
                    break;
                }
                w = r;
            }
        }
    }
    // Every acknowledged read-then-write once more per region: what it
    // read must not be the region's final value.
    for ((region, what), values) in &seen {
        let last = values.last().copied();
        for op in acked
            .iter()
            .filter(|op| *what == format!("chaos_hot {}", op.key))
        {
            causal.expect(last != Some(op.read), || {
                format!(
                    "{region}: {what} ended at {}, which the write of {} had read",
                    op.read, op.wrote
                )
            });
        }
    }
    Ok(vec![monotonic, causal])
}

/// The values a region showed up to the `i`th.
fn around(values: &[i64], i: usize) -> String {
    let from = i.saturating_sub(4);
    let shown: Vec<String> = values[from..=i].iter().map(i64::to_string).collect();
    format!("{}{}", if from > 0 { "… " } else { "" }, shown.join(", "))
}
