//! `foreshadow-lab chaos`: a seeded fault run. A workload writes in every
//! region at once (`workload`), faults are injected and healed at random
//! times chosen from the seed (`faults`), and at the end, after everything
//! is healed and quiet, the promises are checked on every region
//! (`invariants`): convergence, every acknowledged write kept exactly
//! once, counters equal to the acknowledged increments plus some of the
//! in-doubt ones. The same seed gives the same schedule of operations and
//! faults (timing on a shared machine still varies).

pub mod faults;
pub mod invariants;
pub mod workload;

use crate::lab::{Lab, UpOptions};
use crate::spec::Engine;
use crate::workload::Rng;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct ChaosOptions {
    pub dir: PathBuf,
    pub regions: usize,
    pub seconds: u64,
    pub seed: u64,
    pub engine: Engine,
    pub wan_ms: u64,
    pub keep: bool,
}

/// What a run found: printed as the verdict, judged by `passed`.
pub struct Verdict {
    pub seed: u64,
    pub replay: String,
    pub outcomes: workload::Tally,
    pub faults: Vec<(String, usize)>,
    pub checks: Vec<invariants::Check>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.violated == 0)
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "chaos verdict (seed {}): {}\n\
             operations: {} acknowledged, {} failed, {} in doubt\n\
             faults: {}\n",
            self.seed,
            if self.passed() { "PASS" } else { "FAIL" },
            self.outcomes.acknowledged,
            self.outcomes.failed,
            self.outcomes.in_doubt,
            self.faults
                .iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for c in &self.checks {
            out.push_str(&format!(
                "  {:<54} checked {:>7}  violated {:>4}\n",
                c.name, c.checked, c.violated
            ));
            for e in c.examples.iter().take(5) {
                out.push_str(&format!("      {e}\n"));
            }
        }
        if !self.passed() {
            out.push_str(&format!("replay: {}\n", self.replay));
        }
        out
    }
}

pub async fn run(opts: ChaosOptions) -> Result<Verdict, String> {
    let lab = Lab::up(UpOptions {
        dir: opts.dir.clone(),
        regions: opts.regions,
        wan_ms: opts.wan_ms,
        engine: opts.engine,
        tls: false,
    })
    .await?;
    let result = run_on(&lab, &opts).await;
    let keep = opts.keep || !matches!(&result, Ok(v) if v.passed());
    if keep {
        eprintln!("chaos: lab kept in {}", lab.dir.display());
    }
    lab.down(keep)?;
    result
}

async fn run_on(lab: &Lab, opts: &ChaosOptions) -> Result<Verdict, String> {
    workload::create_tables(lab).await?;
    let lab = Arc::new(Lab::open(&lab.dir)?);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..opts.regions)
        .map(|i| {
            let (lab, stop) = (lab.clone(), stop.clone());
            let seed = opts.seed.wrapping_mul(31).wrapping_add(i as u64 + 1);
            tokio::spawn(async move { workload::write(&lab, i, seed, stop).await })
        })
        .chain((0..opts.regions).map(|i| {
            let (lab, stop) = (lab.clone(), stop.clone());
            tokio::spawn(async move { workload::read(&lab, i, stop).await })
        }))
        .collect();
    let mut rng = Rng::new(opts.seed);
    let until = Instant::now() + Duration::from_secs(opts.seconds);
    let mut log = faults::FaultLog::default();
    let mut schedule = faults::Schedule::new(lab.spec.engine);
    while Instant::now() < until {
        let pause = Duration::from_millis(1_000 + rng.next_u64() % 3_000);
        tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now()))).await;
        if Instant::now() >= until {
            break;
        }
        let fault = schedule.next(&mut rng);
        let region = lab.spec.regions[rng.next_u64() as usize % opts.regions]
            .name
            .clone();
        faults::inject(&lab, fault, &region, &mut rng, &mut log).await?;
    }
    stop.store(true, Ordering::Relaxed);
    let mut history = workload::History::default();
    for w in writers {
        history.extend(w.await.map_err(|e| e.to_string())??);
    }
    faults::heal_all(&lab, &mut log).await?;
    let checks = invariants::check(&lab, &history).await?;
    Ok(Verdict {
        seed: opts.seed,
        replay: format!(
            "foreshadow-lab chaos --regions {} --seconds {} --seed {} --engine {}",
            opts.regions,
            opts.seconds,
            opts.seed,
            opts.engine.name()
        ),
        outcomes: history.tally(),
        faults: log.counts(),
        checks,
    })
}
