//! Unique rows: inserts of fresh keys (alone, three at a time, now and then
//! 500 in one transaction) and deletes of the writer's own rows. At the
//! end every acknowledged insert is present unless a delete (acknowledged
//! or in doubt) removed it, nothing refused or deleted is present, and no
//! row is present that no client wrote.

use super::{Boxed, History, Outcome, Step, Workload, Writer};
use crate::chaos::invariants::Check;
use crate::lab::Lab;
use crate::workload::Rng;
use std::collections::HashSet;
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
            let roll = rng.next_u64() % 60;
            if roll < 10 && !w.mine.is_empty() {
                let id = w.mine.swap_remove(rng.next_u64() as usize % w.mine.len());
                let r = c
                    .execute("DELETE FROM chaos_items WHERE id = $1", &[&id])
                    .await;
                return (vec![super::Op::Items(Op::Delete(id))], r.map(|_| ()));
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

async fn check(lab: &Lab, history: &History) -> Result<Vec<Check>, String> {
    // What each key's fate must be.
    let mut attempted = HashSet::new();
    let (mut must, mut must_not) = (HashSet::new(), HashSet::new());
    let mut deleted_maybe = HashSet::new();
    for (op, outcome) in history.of(|o| match o {
        super::Op::Items(i) => Some(*i),
        _ => None,
    }) {
        match (op, outcome) {
            (Op::Insert(id), o) => {
                attempted.insert(id);
                match o {
                    Outcome::Acknowledged => {
                        must.insert(id);
                    }
                    Outcome::Failed => {
                        must_not.insert(id);
                    }
                    Outcome::InDoubt => {}
                }
            }
            (Op::Delete(id), Outcome::Acknowledged) => {
                must.remove(&id);
                must_not.insert(id);
            }
            (Op::Delete(id), Outcome::InDoubt) => {
                deleted_maybe.insert(id);
            }
            (Op::Delete(_), Outcome::Failed) => {}
        }
    }
    for id in &deleted_maybe {
        must.remove(id);
    }
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
            phantom.expect(attempted.contains(id), || {
                format!("{}: id {id} never written", r.name)
            });
        }
    }
    Ok(vec![kept, gone, phantom])
}
