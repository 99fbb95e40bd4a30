//! `foreshadow-lab`: see `usage()`.

use foreshadow_lab::bench;
use foreshadow_lab::demo::{self, DemoOptions};
use foreshadow_lab::spec::Engine;
use foreshadow_lab::{Fault, Lab, UpOptions};
use std::path::PathBuf;
use std::process::ExitCode;

fn usage() -> &'static str {
    "usage:
  foreshadow-lab up --dir DIR --regions N [--wan-ms MS] [--engine foreshadow|pglogical|plain] [--tls]
  foreshadow-lab down --dir DIR [--keep]
  foreshadow-lab fault --dir DIR --region NAME <kill-sidecar|start-sidecar|stop-pg|start-pg|cut|blackhole|heal>
  foreshadow-lab chaos [--regions N] [--minutes M | --seconds S] [--seed S] [--engine foreshadow|pglogical]
                 [--wan-ms MS] [--dir DIR] [--keep]
  foreshadow-lab demo [--dir DIR] [--regions N] [--wan-ms MS] [--seconds S] [--hot-keys K] [--keep]
  foreshadow-lab bench <overhead|lag|conflicts|catchup|all> [--regions N] [--wan-ms MS] [--seconds S] [--quick]
                 [--scale N] [--clients N] [--rate ROWS_PER_S] [--hot-keys K] [--out DIR]"
}

struct Args {
    command: String,
    flags: std::collections::BTreeMap<String, String>,
    positional: Vec<String>,
}

const SWITCHES: [&str; 3] = ["--keep", "--quick", "--tls"];

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or_else(|| usage().to_string())?;
    let mut flags = std::collections::BTreeMap::new();
    let mut positional = Vec::new();
    while let Some(a) = it.next() {
        if SWITCHES.contains(&a.as_str()) {
            flags.insert(a, String::new());
        } else if a.starts_with("--") {
            let v = it
                .next()
                .ok_or_else(|| format!("{a} needs a value\n{}", usage()))?;
            flags.insert(a, v);
        } else {
            positional.push(a);
        }
    }
    Ok(Args {
        command,
        flags,
        positional,
    })
}

impl Args {
    fn get<T: std::str::FromStr>(&self, flag: &str, default: Option<T>) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.flags.get(flag) {
            Some(v) => v
                .parse()
                .map_err(|e| format!("{flag}: cannot use {v:?}: {e}")),
            None => default.ok_or_else(|| format!("{flag} is required\n{}", usage())),
        }
    }
    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        match self.flags.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!(
                "unknown option {k} for `{}`\n{}",
                self.command,
                usage()
            )),
            None => Ok(()),
        }
    }
}

async fn dispatch(args: Args) -> Result<(), String> {
    match args.command.as_str() {
        "up" => {
            args.check_known(&["--dir", "--regions", "--wan-ms", "--engine", "--tls"])?;
            let lab = Lab::up(UpOptions {
                dir: args.get("--dir", None)?,
                regions: args.get("--regions", Some(3))?,
                wan_ms: args.get("--wan-ms", Some(0))?,
                engine: args.get("--engine", Some(Engine::Foreshadow))?,
                tls: args.flags.contains_key("--tls"),
            })
            .await?;
            for r in &lab.spec.regions {
                println!("{}: {}", r.name, r.dsn);
            }
            println!("lab up: {}", lab.dir.join("lab.json").display());
            Ok(())
        }
        "down" => {
            args.check_known(&["--dir", "--keep"])?;
            let dir: PathBuf = args.get("--dir", None)?;
            Lab::open(&dir)?.down(args.flags.contains_key("--keep"))?;
            println!("lab down: {}", dir.display());
            Ok(())
        }
        "fault" => {
            args.check_known(&["--dir", "--region"])?;
            let lab = Lab::open(&args.get::<PathBuf>("--dir", None)?)?;
            let region: String = args.get("--region", None)?;
            let [fault] = args.positional.as_slice() else {
                return Err(format!("fault needs exactly one fault name\n{}", usage()));
            };
            lab.fault(&region, fault.parse::<Fault>()?)?;
            println!("{fault}: done for region {region}");
            Ok(())
        }
        "chaos" => {
            args.check_known(&[
                "--regions",
                "--minutes",
                "--seconds",
                "--seed",
                "--engine",
                "--wan-ms",
                "--dir",
                "--keep",
            ])?;
            let seconds = match args.flags.get("--minutes") {
                Some(_) => args.get::<u64>("--minutes", None)? * 60,
                None => args.get("--seconds", Some(180))?,
            };
            // Without --seed: a fresh one, printed so that the run can be replayed.
            let seed = args.get("--seed", Some(std::process::id() as u64 ^ now_ns()))?;
            let engine = args.get("--engine", Some(Engine::Foreshadow))?;
            let default_dir = std::env::temp_dir().join(format!(
                "foreshadow-chaos-{}-{seed}-{}",
                engine.name(),
                std::process::id()
            ));
            let verdict = foreshadow_lab::chaos::run(foreshadow_lab::chaos::ChaosOptions {
                dir: args.get("--dir", Some(default_dir))?,
                regions: args.get("--regions", Some(3))?,
                seconds,
                seed,
                engine,
                wan_ms: args.get("--wan-ms", Some(10))?,
                keep: args.flags.contains_key("--keep"),
            })
            .await?;
            print!("{}", verdict.render());
            if verdict.passed() {
                Ok(())
            } else {
                Err("chaos: invariants violated (see the verdict above)".into())
            }
        }
        "demo" => {
            args.check_known(&[
                "--dir",
                "--regions",
                "--wan-ms",
                "--seconds",
                "--hot-keys",
                "--keep",
            ])?;
            let default_dir =
                std::env::temp_dir().join(format!("foreshadow-demo-{}", std::process::id()));
            demo::run(DemoOptions {
                dir: args.get("--dir", Some(default_dir))?,
                regions: args.get("--regions", Some(3))?,
                wan_ms: args.get("--wan-ms", Some(40))?,
                seconds: args.get("--seconds", Some(10))?,
                hot_keys: args.get("--hot-keys", Some(5))?,
                keep: args.flags.contains_key("--keep"),
            })
            .await
        }
        "bench" => {
            args.check_known(&[
                "--regions",
                "--wan-ms",
                "--seconds",
                "--quick",
                "--scale",
                "--clients",
                "--rate",
                "--hot-keys",
                "--out",
            ])?;
            let [which] = args.positional.as_slice() else {
                return Err(format!("bench needs one scenario\n{}", usage()));
            };
            let scenarios = if which == "all" {
                bench::Scenario::ALL.to_vec()
            } else {
                vec![which.parse::<bench::Scenario>()?]
            };
            let quick = args.flags.contains_key("--quick");
            let opts = bench::BenchOptions {
                regions: args.get("--regions", Some(if quick { 2 } else { 3 }))?,
                wan_ms: args.get("--wan-ms", Some(20))?,
                seconds: args.get("--seconds", Some(if quick { 3 } else { 30 }))?,
                quick,
                scale: args.get("--scale", Some(if quick { 1 } else { 10 }))?,
                clients: args.get("--clients", Some(if quick { 2 } else { 4 }))?,
                rate: args.get("--rate", Some(if quick { 200 } else { 1000 }))?,
                hot_keys: args.get("--hot-keys", Some(10))?,
                out: args.get("--out", Some(bench::default_out()))?,
                work: std::env::temp_dir(),
            };
            if !(2..=5).contains(&opts.regions)
                || opts.seconds == 0
                || opts.clients == 0
                || opts.scale == 0
            {
                return Err(
                    "bench needs 2 to 5 regions and positive --seconds, --clients and --scale"
                        .into(),
                );
            }
            for s in scenarios {
                bench::run(s, &opts).await?;
            }
            Ok(())
        }
        // Internal: the WAN proxy daemon that `up` starts.
        "proxyd" => {
            let dir: PathBuf = args.get("--dir", None)?;
            let spec = foreshadow_lab::spec::LabSpec::load(&dir)?;
            foreshadow_lab::proxy::serve(dir, spec)
                .await
                .map_err(|e| format!("proxy: {e}"))
        }
        other => Err(format!("unknown command {other:?}\n{}", usage())),
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(dispatch(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foreshadow-lab: {e}");
            ExitCode::FAILURE
        }
    }
}
