//! Unique rows: inserts of fresh keys (alone, three at a time, now and then
//! 500 in one transaction), deletes of the writer's own rows, and inserts
//! again of keys it deleted (over their tombstones). At the end a key whose
//! last sure operation was an acknowledged insert is present, one whose
//! last was an acknowledged delete (or that was only ever refused) is
//! absent, unless an in-doubt operation came after; and no row is present
//! that no client wrote.

use super::{Boxed, History, Outcome, Step, Workload, Writer};
use crate::chaos::invariants::Check;
use crate::lab::Lab;
use crate::workload::Rng;
use std::collections::{HashMap, HashSet};
use tokio_postgres::Client;

#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// A unique key inserted into `chaos_items`.
    Insert(i64),
    /// One of the writer's own keys deleted.
    Delete(i64),
}

pub struct Items;

impl Workload for Items {
    fn tables(&self) -> &'static [&'static str] {
        &["chaos_items"]
    }

    fn ddl(&self) -> String {
        "CREATE TABLE public.chaos_items (id bigint PRIMARY KEY, region text NOT NULL, note text)"
            .into()
    }

    fn step<'a>(
        &'a self,
        c: &'a mut Client,
        w: &'a mut Writer,
        rng: &'a mut Rng,
    ) -> Boxed<'a, Step> {
        Box::pin(async move {
            let (ops, r) = one_step(c, w, rng).await;
            // The writer's own keys: present ones it may delete, deleted
            // ones it may insert again.
            if r.is_ok() {
                for op in &ops {
                    match op {
                        super::Op::Items(Op::Insert(id)) => w.mine.push(*id),
                        super::Op::Items(Op::Delete(id)) => w.gone.push(*id),
                        _ => {}
                    }
                }
            }
            (ops, r)
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

async fn one_step(c: &mut Client, w: &mut Writer, rng: &mut Rng) -> Step {
    let roll = rng.next_u64() % 60;
    if roll < 8 && !w.mine.is_empty() {
        let id = w.mine.swap_remove(rng.next_u64() as usize % w.mine.len());
        let r = c
            .execute("DELETE FROM chaos_items WHERE id = $1", &[&id])
            .await;
        return (vec![super::Op::Items(Op::Delete(id))], r.map(|_| ()));
    }
    if roll < 12 && !w.gone.is_empty() {
        // A key deleted a moment ago, inserted again (over its tombstone).
        let id = w.gone.swap_remove(rng.next_u64() as usize % w.gone.len());
        let r = c
            .execute(
                "INSERT INTO chaos_items VALUES ($1, $2, 'again')",
                &[&id, &w.region],
            )
            .await;
        return (vec![super::Op::Items(Op::Insert(id))], r.map(|_| ()));
    }
    if roll < 50 {
        let id = w.unique();
        let r = c
            .execute(
                "INSERT INTO chaos_items VALUES ($1, $2, 'one')",
                &[&id, &w.region],
            )
            .await;
        return (vec![super::Op::Items(Op::Insert(id))], r.map(|_| ()));
    }
    // A multi-row transaction; now and then a large one.
    let n = if roll == 59 { 500 } else { 3 };
    let ids: Vec<i64> = (0..n).map(|_| w.unique()).collect();
    let r = async {
        let tx = c.transaction().await?;
        tx.execute(
            "INSERT INTO chaos_items SELECT g, $3, 'many' FROM generate_series($1::bigint, $2::bigint) g",
            &[&ids[0], &ids[ids.len() - 1], &w.region],
        )
        .await?;
        tx.commit().await
    }
    .await;
    (
        ids.into_iter()
            .map(|id| super::Op::Items(Op::Insert(id)))
            .collect(),
        r,
    )
}

async fn check(lab: &Lab, history: &History) -> Result<Vec<Check>, String> {
    // What each key's fate must be: every key is written by one writer
    // only, in its order, so the last of its operations that surely
    // happened decides, unless one after it is in doubt.
    #[derive(Clone, Copy, PartialEq)]
    enum Fate {
        Present,
        Absent,
        Unknown,
    }
    let mut fate: HashMap<i64, Fate> = HashMap::new();
    for (op, outcome) in history.of(|o| match o {
        super::Op::Items(i) => Some(*i),
        _ => None,
    }) {
        let (id, done) = match op {
            Op::Insert(id) => (id, Fate::Present),
            Op::Delete(id) => (id, Fate::Absent),
        };
        let f = fate.entry(id).or_insert(Fate::Absent);
        match outcome {
            Outcome::Acknowledged => *f = done,
            Outcome::InDoubt => *f = Fate::Unknown,
            Outcome::Failed => {}
        }
    }
    let must: HashSet<i64> = fate
        .iter()
        .filter(|(_, f)| **f == Fate::Present)
        .map(|(id, _)| *id)
        .collect();
    let must_not: HashSet<i64> = fate
        .iter()
        .filter(|(_, f)| **f == Fate::Absent)
        .map(|(id, _)| *id)
        .collect();
    let mut kept = Check::new("acknowledged inserts present");
    let mut gone = Check::new("refused inserts and deleted rows absent");
    let mut phantom = Check::new("no row that no client wrote");
    for r in &lab.spec.regions {
        let c = lab.client(&r.name).await?;
        let present: HashSet<i64> = c
            .query("SELECT id FROM chaos_items", &[])
            .await
            .map_err(|e| format!("region {}: {e}", r.name))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for id in &must {
            kept.expect(present.contains(id), || {
                format!("{}: id {id} missing", r.name)
            });
        }
        for id in &must_not {
            gone.expect(!present.contains(id), || {
                format!("{}: id {id} present", r.name)
            });
        }
        for id in &present {
            phantom.expect(fate.contains_key(id), || {
                format!("{}: id {id} never written", r.name)
            });
        }
    }
    Ok(vec![kept, gone, phantom])
}
