//! `counter` columns: positive increments of eight shared rows from every
//! region. At the end every counter is the sum of its acknowledged
//! increments plus some of the in-doubt ones: never less, never more.

use super::{Boxed, History, Outcome, Step, Workload, Writer};
use crate::chaos::invariants::Check;
use crate::lab::Lab;
use crate::workload::Rng;
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// Counter rows, present in every region before the run.
pub const KEYS: i32 = 8;

#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// `chaos_counters.n` of a key increased by a positive amount.
    Increment(i32, i64),
}

pub struct Counters;

impl Workload for Counters {
    fn tables(&self) -> &'static [&'static str] {
        &["chaos_counters"]
    }

    fn ddl(&self) -> String {
        format!(
            "CREATE TABLE public.chaos_counters (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0); \
             INSERT INTO public.chaos_counters SELECT g, 0 FROM generate_series(1, {KEYS}) g"
        )
    }

    fn counters(&self, _table: &str) -> &'static [&'static str] {
        &["n"]
    }

    fn step<'a>(
        &'a self,
        c: &'a mut Client,
        _: &'a mut Writer,
        rng: &'a mut Rng,
    ) -> Boxed<'a, Step> {
        Box::pin(async move {
            let key = (rng.next_u64() % KEYS as u64) as i32 + 1;
            let delta = (rng.next_u64() % 5) as i64 + 1;
            let r = c
                .execute(
                    "UPDATE chaos_counters SET n = n + $1 WHERE id = $2",
                    &[&delta, &key],
                )
                .await;
            (
                vec![super::Op::Counters(Op::Increment(key, delta))],
                r.map(|_| ()),
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
    let mut sums: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for (Op::Increment(k, d), outcome) in history.of(|o| match o {
        super::Op::Counters(c) => Some(*c),
        _ => None,
    }) {
        match outcome {
            Outcome::Acknowledged => sums.entry(k).or_default().0 += d,
            Outcome::InDoubt => sums.entry(k).or_default().1 += d,
            Outcome::Failed => {}
        }
    }
    let mut counters = Check::new("counter = acknowledged + some in-doubt increments");
    for r in &lab.spec.regions {
        let c = lab.client(&r.name).await?;
        for key in 1..=KEYS {
            let n: i64 = c
                .query_one("SELECT n FROM chaos_counters WHERE id = $1", &[&key])
                .await
                .map_err(|e| format!("region {}: {e}", r.name))?
                .get(0);
            let (acked, doubt) = sums.get(&key).copied().unwrap_or_default();
            counters.expect(n >= acked && n <= acked + doubt, || {
                format!(
                    "{}: counter {key} is {n}, acknowledged {acked}, in doubt {doubt}",
                    r.name
                )
            });
        }
    }
    Ok(vec![counters])
}
