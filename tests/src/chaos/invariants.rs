//! What must hold on every region once the faults are healed and the
//! regions are quiet, checked from outside (plain SQL, no Foreshadow
//! function): the tables converged, every acknowledged insert is present
//! unless an acknowledged delete removed it, nothing refused or never
//! attempted is present, and every counter is the sum of its acknowledged
//! increments plus some of the in-doubt ones; no region showed a hot key
//! going back to a value it had moved past (monotonic reads), and no region
//! showed a value after a write made on reading it (causality: a
//! read-then-write supersedes what it read, in every region, whatever the
//! clocks say).

use super::workload::{History, Op, Outcome, COUNTER_KEYS};
use crate::lab::Lab;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

pub struct Check {
    pub name: String,
    pub checked: usize,
    pub violated: usize,
    pub examples: Vec<String>,
}

impl Check {
    fn new(name: &str) -> Check {
        Check {
            name: name.into(),
            checked: 0,
            violated: 0,
            examples: Vec::new(),
        }
    }

    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checked += 1;
        if !ok {
            self.violated += 1;
            if self.examples.len() < 10 {
                self.examples.push(what());
            }
        }
    }
}

const TABLES: [&str; 3] = ["chaos_items", "chaos_counters", "chaos_hot"];
const QUIET: Duration = Duration::from_secs(180);

/// md5 of `table`'s rows in key order, in every region, once they agree
/// (or as they are when `QUIET` has passed).
async fn settled_md5s(lab: &Lab, table: &str) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + QUIET;
    loop {
        let mut md5s = Vec::new();
        for r in &lab.spec.regions {
            md5s.push(
                crate::workload::plain_md5(lab, &r.name, table)
                    .await
                    .unwrap_or_else(|e| e),
            );
        }
        if md5s.iter().all(|m| *m == md5s[0]) || Instant::now() > deadline {
            return Ok(md5s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn check(lab: &Lab, history: &History) -> Result<Vec<Check>, String> {
    let mut converged = Check::new("converged (md5 of each table, every region)");
    for t in TABLES {
        let md5s = settled_md5s(lab, t).await?;
        converged.expect(md5s.iter().all(|m| *m == md5s[0]), || {
            format!("{t}: {md5s:?}")
        });
    }
    // What each key's fate must be.
    let mut attempted = HashSet::new();
    let (mut must, mut must_not) = (HashSet::new(), HashSet::new());
    let mut deleted_maybe = HashSet::new();
    let mut sums: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for (op, outcome) in &history.ops {
        match (op, outcome) {
            (Op::Insert(id), o) => {
                attempted.insert(*id);
                match o {
                    Outcome::Acknowledged => {
                        must.insert(*id);
                    }
                    Outcome::Failed => {
                        must_not.insert(*id);
                    }
                    Outcome::InDoubt => {}
                }
            }
            (Op::Delete(id), Outcome::Acknowledged) => {
                must.remove(id);
                must_not.insert(*id);
            }
            (Op::Delete(id), Outcome::InDoubt) => {
                deleted_maybe.insert(*id);
            }
            (Op::Increment(k, d), Outcome::Acknowledged) => sums.entry(*k).or_default().0 += d,
            (Op::Increment(k, d), Outcome::InDoubt) => sums.entry(*k).or_default().1 += d,
            _ => {}
        }
    }
    for id in &deleted_maybe {
        must.remove(id);
    }
    let mut kept = Check::new("acknowledged inserts present");
    let mut gone = Check::new("refused inserts and deleted rows absent");
    let mut phantom = Check::new("no row that no client wrote");
    let mut counters = Check::new("counter = acknowledged + some in-doubt increments");
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
        for key in 1..=COUNTER_KEYS {
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
    let (monotonic, causal) = check_reads(lab, history).await?;
    Ok(vec![
        converged, kept, gone, phantom, counters, monotonic, causal,
    ])
}

/// Monotonic reads and causality over what the readers saw, with each
/// region's final (converged) value as its last observation.
async fn check_reads(lab: &Lab, history: &History) -> Result<(Check, Check), String> {
    let mut seen: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
    for (region, key, v) in &history.observed.0 {
        seen.entry((region.clone(), *key)).or_default().push(*v);
    }
    for r in &lab.spec.regions {
        let c = lab.client(&r.name).await?;
        for row in c
            .query("SELECT id, v FROM chaos_hot", &[])
            .await
            .map_err(|e| format!("region {}: {e}", r.name))?
        {
            let (key, v): (i32, i64) = (row.get(0), row.get(1));
            let values = seen.entry((r.name.clone(), key)).or_default();
            if values.last() != Some(&v) {
                values.push(v);
            }
        }
    }
    // What each acknowledged write read: it must supersede that, and all
    // that the read value itself superseded.
    let read_by: HashMap<i64, i64> = history
        .ops
        .iter()
        .filter_map(|(op, o)| match (op, o) {
            (Op::Overwrite { read, wrote, .. }, Outcome::Acknowledged) => Some((*wrote, *read)),
            _ => None,
        })
        .collect();
    let mut monotonic = Check::new("monotonic reads (no value seen again once moved past)");
    let mut causal = Check::new("read-then-write supersedes what it read");
    for ((region, key), values) in &seen {
        let mut past: HashSet<i64> = HashSet::new();
        let mut superseded: HashSet<i64> = HashSet::new();
        for (i, &v) in values.iter().enumerate() {
            if i > 0 {
                monotonic.expect(!past.contains(&v), || {
                    format!(
                        "{region}: hot key {key} went back to {v} (seen: {})",
                        around(values, i)
                    )
                });
                causal.expect(!superseded.contains(&v), || {
                    format!(
                        "{region}: hot key {key} shows {v} after a write made on reading it (seen: {})",
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
    // Every acknowledged read-then-write counts as checked once more: its
    // read value must not be any region's final value.
    for ((region, key), values) in &seen {
        let last = values.last().copied();
        for (op, o) in &history.ops {
            if let (
                Op::Overwrite {
                    key: k,
                    read,
                    wrote,
                },
                Outcome::Acknowledged,
            ) = (op, o)
            {
                if k == key {
                    causal.expect(last != Some(*read), || {
                        format!("{region}: hot key {key} ended at {read}, which the write of {wrote} had read")
                    });
                }
            }
        }
    }
    Ok((monotonic, causal))
}

/// The values a region showed just before the `i`th.
fn around(values: &[i64], i: usize) -> String {
    let from = i.saturating_sub(4);
    let shown: Vec<String> = values[from..=i].iter().map(i64::to_string).collect();
    format!("{}{}", if from > 0 { "… " } else { "" }, shown.join(", "))
}
