//! The faults a chaos run injects, each with its heal: a killed sidecar is
//! started again, a stopped PostgreSQL started, a cut, black-holed or slowed
//! link or region reconnected, a skewed clock (libfaketime, up to ±250 ms)
//! set back at the end. Link faults go through the lab's per-link proxy
//! control (`proxy::LinkControl`).

use crate::lab::{Fault, Lab};
use crate::spec::Engine;
use crate::workload::Rng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// SIGKILL of a region's sidecar, restarted after a pause.
    KillSidecar,
    /// Immediate stop of a region's PostgreSQL, started after a pause.
    StopPostgres,
    /// A region cut off from every other (both directions, connections
    /// reset and refused), then healed.
    Isolate,
    /// A region's links black-holed: connections stay open, every byte
    /// vanishes, nobody is told (a cut WAN link); then healed.
    BlackHole,
    /// Bytes from one region to another held (the other way flows): a
    /// one-way cut, in both links between the two.
    CutOneWay,
    /// Both links between two regions reset and refused.
    CutLink,
    /// Both links between two regions held both ways: open and silent.
    BlackHoleLink,
    /// Both links between two regions slowed: 50-300 ms more delay, up to
    /// 100 ms jitter, 5 % of chunks stalled for a retransmission.
    SlowLink,
    /// A region's wall clock shifted by up to ±250 ms (PostgreSQL restarted
    /// under libfaketime); set back when the run heals.
    SkewClock,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillSidecar => "kill-sidecar",
            Kind::StopPostgres => "stop-postgres",
            Kind::Isolate => "isolate-region",
            Kind::BlackHole => "black-hole-region",
            Kind::SkewClock => "skew-clock",
            Kind::CutOneWay => "cut-one-way",
            Kind::CutLink => "cut-link",
            Kind::BlackHoleLink => "black-hole-link",
            Kind::SlowLink => "slow-link",
        }
    }

    /// Every kind, for the run's schedule.
    pub const ALL: [Kind; 9] = [
        Kind::KillSidecar,
        Kind::StopPostgres,
        Kind::Isolate,
        Kind::BlackHole,
        Kind::CutOneWay,
        Kind::CutLink,
        Kind::BlackHoleLink,
        Kind::SlowLink,
        Kind::SkewClock,
    ];
}

/// Every fault injected, with when and where.
#[derive(Default)]
pub struct FaultLog {
    started: Option<Instant>,
    entries: Vec<(Duration, Kind, String, String)>,
    skewed: Vec<String>,
}

impl FaultLog {
    fn note(&mut self, kind: Kind, region: &str, detail: String) {
        let at = self.started.get_or_insert_with(Instant::now).elapsed();
        eprintln!(
            "chaos: {:>7.1} s  {} {region} {detail}",
            at.as_secs_f64(),
            kind.name()
        );
        self.entries.push((at, kind, region.into(), detail));
    }

    pub fn counts(&self) -> Vec<(String, usize)> {
        let mut counts = BTreeMap::new();
        for (_, k, _, _) in &self.entries {
            *counts.entry(k.name().to_string()).or_default() += 1;
        }
        counts.into_iter().collect()
    }
}

/// The order of faults, from the seed: every kind the engine can suffer
/// once per round, each round shuffled, so that a short run still sees
/// every kind (sidecar faults only where there are sidecars).
pub struct Schedule {
    kinds: Vec<Kind>,
    round: Vec<Kind>,
}

impl Schedule {
    pub fn new(engine: Engine) -> Schedule {
        Schedule {
            kinds: Kind::ALL
                .into_iter()
                .filter(|k| *k != Kind::KillSidecar || engine.replicator().has_sidecars())
                .collect(),
            round: Vec::new(),
        }
    }

    pub fn next(&mut self, rng: &mut Rng) -> Kind {
        if self.round.is_empty() {
            self.round = self.kinds.clone();
            for i in (1..self.round.len()).rev() {
                self.round.swap(i, rng.next_u64() as usize % (i + 1));
            }
        }
        self.round.pop().expect("a round is never empty")
    }
}

/// Injects `kind` on `region` and heals it after a pause from the seed
/// (a skewed clock stays skewed until `heal_all`).
pub async fn inject(
    lab: &Lab,
    kind: Kind,
    region: &str,
    rng: &mut Rng,
    log: &mut FaultLog,
) -> Result<(), String> {
    let pause = Duration::from_millis(500 + rng.next_u64() % 2_500);
    let detail = format!("for {} ms", pause.as_millis());
    match kind {
        Kind::KillSidecar => {
            log.note(kind, region, detail);
            lab.fault(region, Fault::KillSidecar)?;
            tokio::time::sleep(pause).await;
            lab.fault(region, Fault::StartSidecar)?;
        }
        Kind::StopPostgres => {
            log.note(kind, region, detail);
            lab.fault(region, Fault::StopPg)?;
            tokio::time::sleep(pause).await;
            lab.skew_clock(region, skew_of(log, region))?;
        }
        Kind::Isolate | Kind::BlackHole => {
            log.note(kind, region, detail);
            let cut = if kind == Kind::Isolate {
                Fault::Cut
            } else {
                Fault::Blackhole
            };
            lab.fault(region, cut)?;
            tokio::time::sleep(pause).await;
            lab.fault(region, Fault::Heal)?;
        }
        Kind::CutOneWay | Kind::CutLink | Kind::BlackHoleLink | Kind::SlowLink => {
            let others: Vec<&str> = lab
                .spec
                .regions
                .iter()
                .map(|r| r.name.as_str())
                .filter(|r| *r != region)
                .collect();
            let other = others[rng.next_u64() as usize % others.len()];
            let (delay, jitter) = (50 + rng.next_u64() % 251, rng.next_u64() % 101);
            log.note(kind, region, format!("and {other} {detail}"));
            let set = |on: bool| -> Result<(), String> {
                match kind {
                    Kind::CutOneWay => lab.hold_flow(region, other, on),
                    _ => [(region, other), (other, region)]
                        .iter()
                        .try_for_each(|(a, b)| {
                            lab.control_link(a, b, |c| match (kind, on) {
                                (_, false) => *c = Default::default(),
                                (Kind::CutLink, _) => c.reset = true,
                                (Kind::BlackHoleLink, _) => {
                                    c.hold_forward = true;
                                    c.hold_back = true;
                                }
                                _ => {
                                    c.delay_ms = delay;
                                    c.jitter_ms = jitter;
                                    c.loss_pct = 5;
                                }
                            })
                        }),
                }
            };
            set(true)?;
            tokio::time::sleep(pause).await;
            set(false)?;
        }
        Kind::SkewClock => {
            let offset = (rng.next_u64() % 501) as i64 - 250;
            log.note(kind, region, format!("{offset:+} ms"));
            log.skewed.retain(|r| r != region);
            log.skewed.push(format!("{region}={offset}"));
            lab.skew_clock(region, offset)?;
        }
    }
    Ok(())
}

/// The clock offset a region runs with now (0 unless skewed).
fn skew_of(log: &FaultLog, region: &str) -> i64 {
    log.skewed
        .iter()
        .filter_map(|s| s.strip_prefix(&format!("{region}=")))
        .filter_map(|o| o.parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Heals everything: links joined, every PostgreSQL running on the real
/// clock, every sidecar running.
pub async fn heal_all(lab: &Lab, log: &mut FaultLog) -> Result<(), String> {
    for r in &lab.spec.regions {
        lab.fault(&r.name, Fault::Heal)?;
        if skew_of(log, &r.name) != 0 || !lab.cluster(&r.name).running() {
            lab.skew_clock(&r.name, 0)?;
        }
        if lab.spec.engine.replicator().has_sidecars()
            && !lab.sidecar_pid(&r.name).is_some_and(crate::proc::alive)
        {
            lab.fault(&r.name, Fault::StartSidecar)?;
        }
    }
    log.skewed.clear();
    Ok(())
}
