//! `foreshadow-lab`: the local multi-region lab's command line (`--help`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use foreshadow_lab::bench::{self, Scenario};
use foreshadow_lab::chaos::{self, ChaosOptions};
use foreshadow_lab::demo::{self, DemoOptions};
use foreshadow_lab::proc::now_ns;
use foreshadow_lab::spec::Engine;
use foreshadow_lab::{Fault, Lab, UpOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// Foreshadow's local lab: PostgreSQL regions behind a simulated WAN, the
/// demo, faults, the chaos suite and the benchmarks beside pglogical.
#[derive(Parser)]
#[command(name = "foreshadow-lab", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a lab: one cluster per region, the WAN proxy, the engine.
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=8))]
        regions: u16,
        /// Simulated WAN latency, each way.
        #[arg(long, default_value_t = 0)]
        wan_ms: u64,
        #[arg(long, value_enum, default_value_t = Engine::Foreshadow)]
        engine: Engine,
        /// Sidecars connect with TLS (verify-full) and SCRAM only.
        #[arg(long)]
        tls: bool,
    },
    /// Stop everything a lab started.
    Down {
        #[arg(long)]
        dir: PathBuf,
        /// Keep the lab's directory (data, logs) for a look afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Inject or heal a fault on one region.
    Fault {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        region: String,
        #[arg(value_enum)]
        fault: Fault,
    },
    /// Control the link from one region's clients to another's primary.
    Link(LinkArgs),
    /// A seeded fault run with an invariant check at the end.
    Chaos {
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=5))]
        regions: u16,
        #[arg(long, conflicts_with = "seconds")]
        minutes: Option<u64>,
        #[arg(long, default_value_t = 180)]
        seconds: u64,
        /// Without one, a fresh seed is drawn and printed with the replay command.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, value_enum, default_value_t = Engine::Foreshadow)]
        engine: Engine,
        #[arg(long, default_value_t = 10)]
        wan_ms: u64,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the lab's directory even when the run passes.
        #[arg(long)]
        keep: bool,
    },
    /// The multi-region demo: writes everywhere, conflicts, convergence.
    Demo {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=8))]
        regions: u16,
        #[arg(long, default_value_t = 40)]
        wan_ms: u64,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
        #[arg(long, default_value_t = 5)]
        hot_keys: u64,
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks beside pglogical; results, report and plots in --out.
    Bench(BenchArgs),
    /// Internal: the WAN proxy daemon that `up` starts.
    #[command(hide = true)]
    Proxyd {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct LinkArgs {
    #[arg(long)]
    dir: PathBuf,
    /// The region whose clients (sidecar, subscriber) use the link.
    #[arg(long)]
    from: String,
    /// The region whose primary they reach.
    #[arg(long)]
    to: String,
    /// Close the link's connections and refuse new ones.
    #[arg(long)]
    reset: bool,
    /// Hold bytes (a black hole: nothing gets through, nobody is told).
    #[arg(long, value_enum)]
    hold: Option<Direction>,
    /// Extra delay on top of the WAN's, each direction.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Up to this much more delay, drawn per chunk (order kept).
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Percentage of chunks that stall for a retransmission timeout.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100))]
    loss_pct: u64,
    /// Back to plain WAN delay (every other option is ignored).
    #[arg(long, conflicts_with_all = ["reset", "hold", "delay_ms", "jitter_ms", "loss_pct"])]
    heal: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Direction {
    /// Towards the primary.
    Forward,
    /// From the primary (replicated changes).
    Back,
    Both,
}

#[derive(Args)]
struct BenchArgs {
    /// A scenario, or `all` of them in order.
    #[arg(value_parser = scenario_names())]
    scenario: String,
    /// Regions (default 3, 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u16).range(2..=5))]
    regions: Option<u16>,
    #[arg(long, default_value_t = 20)]
    wan_ms: u64,
    /// Measured seconds per run (default 30, 3 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: Option<u64>,
    /// The smoke form: short runs, small scale.
    #[arg(long)]
    quick: bool,
    /// pgbench scale factor (default 10, 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    scale: Option<u32>,
    /// pgbench clients per region (default 4, 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    clients: Option<u32>,
    /// Steady write rate of `lag`, rows per second (default 1000, 200 with --quick).
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long, default_value_t = 10)]
    hot_keys: u64,
    #[arg(long)]
    out: Option<PathBuf>,
}

fn scenario_names() -> clap::builder::PossibleValuesParser {
    let mut names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
    names.push("all");
    names.into()
}

async fn dispatch(command: Command) -> Result<(), String> {
    match command {
        Command::Up {
            dir,
            regions,
            wan_ms,
            engine,
            tls,
        } => {
            let lab = Lab::up(UpOptions {
                dir,
                regions: regions.into(),
                wan_ms,
                engine,
                tls,
            })
            .await?;
            for r in &lab.spec.regions {
                println!("{}: {}", r.name, r.dsn);
            }
            println!("lab up: {}", lab.dir.join("lab.json").display());
            Ok(())
        }
        Command::Down { dir, keep } => {
            Lab::open(&dir)?.down(keep)?;
            println!("lab down: {}", dir.display());
            Ok(())
        }
        Command::Fault { dir, region, fault } => {
            Lab::open(&dir)?.fault(&region, fault)?;
            println!("{fault:?}: done for region {region}");
            Ok(())
        }
        Command::Link(a) => {
            let lab = Lab::open(&a.dir)?;
            lab.control_link(&a.from, &a.to, |c| {
                *c = Default::default();
                if !a.heal {
                    c.reset = a.reset;
                    c.hold_forward = matches!(a.hold, Some(Direction::Forward | Direction::Both));
                    c.hold_back = matches!(a.hold, Some(Direction::Back | Direction::Both));
                    c.delay_ms = a.delay_ms;
                    c.jitter_ms = a.jitter_ms;
                    c.loss_pct = a.loss_pct;
                }
            })?;
            println!("link {} -> {}: set", a.from, a.to);
            Ok(())
        }
        Command::Chaos {
            regions,
            minutes,
            seconds,
            seed,
            engine,
            wan_ms,
            dir,
            keep,
        } => {
            let seed = seed.unwrap_or_else(|| std::process::id() as u64 ^ now_ns());
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!(
                    "foreshadow-chaos-{}-{seed}-{}",
                    engine.name(),
                    std::process::id()
                ))
            });
            let verdict = chaos::run(ChaosOptions {
                dir,
                regions: regions.into(),
                seconds: minutes.map_or(seconds, |m| m * 60),
                seed,
                engine,
                wan_ms,
                keep,
            })
            .await?;
            print!("{}", verdict.render());
            if verdict.passed() {
                Ok(())
            } else {
                Err("chaos: invariants violated (see the verdict above)".into())
            }
        }
        Command::Demo {
            dir,
            regions,
            wan_ms,
            seconds,
            hot_keys,
            keep,
        } => {
            demo::run(DemoOptions {
                dir: dir.unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("foreshadow-demo-{}", std::process::id()))
                }),
                regions: regions.into(),
                wan_ms,
                seconds,
                hot_keys,
                keep,
            })
            .await
        }
        Command::Bench(a) => {
            let q = a.quick;
            let opts = bench::BenchOptions {
                regions: a.regions.map_or(if q { 2 } else { 3 }, usize::from),
                wan_ms: a.wan_ms,
                seconds: a.seconds.unwrap_or(if q { 3 } else { 30 }),
                quick: q,
                scale: a.scale.unwrap_or(if q { 1 } else { 10 }),
                clients: a.clients.unwrap_or(if q { 2 } else { 4 }),
                rate: a.rate.unwrap_or(if q { 200 } else { 1000 }),
                hot_keys: a.hot_keys,
                out: a.out.unwrap_or_else(bench::default_out),
                work: std::env::temp_dir(),
            };
            let scenarios = match a.scenario.as_str() {
                "all" => Scenario::ALL.to_vec(),
                one => vec![one.parse()?],
            };
            for s in scenarios {
                bench::run(s, &opts).await?;
            }
            Ok(())
        }
        Command::Proxyd { dir } => {
            let spec = foreshadow_lab::spec::LabSpec::load(&dir)?;
            foreshadow_lab::proxy::serve(dir, spec)
                .await
                .map_err(|e| format!("proxy: {e}"))
        }
    }
}

fn main() -> ExitCode {
    // clap prints its own refusal or help and exits 2 (0 for --help).
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foreshadow-lab: {e}");
            ExitCode::FAILURE
        }
    }
}
