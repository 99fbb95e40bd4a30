//! `foreshadow-sidecar --config FILE [--check-config | --resync-peer PEER]`
//!
//! Two phases: arguments, config and logging are settled synchronously, so a
//! bad config fails before anything connects; then the runtime starts.

use foreshadow_sidecar::{run, shutdown, Config};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: foreshadow-sidecar --config FILE [--check-config | --resync-peer PEER]";
/// Longest wait for the batches in flight after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

struct Args {
    config: PathBuf,
    check_only: bool,
    /// Resynchronise from this peer after its slot went missing, and exit.
    resync_peer: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut config = None;
    let mut check_only = false;
    let mut resync_peer = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = Some(args.next().ok_or("--config needs a file")?.into()),
            "--check-config" => check_only = true,
            "--resync-peer" => {
                resync_peer = Some(args.next().ok_or("--resync-peer needs a peer name")?)
            }
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        config: config.ok_or_else(|| format!("--config is required\n{USAGE}"))?,
        check_only,
        resync_peer,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("foreshadow-sidecar: {e}");
            return ExitCode::from(78); // EX_CONFIG: systemd will not hammer restarts on it
        }
    };
    if args.check_only {
        println!(
            "{}: ok (region {}, {} peers)",
            args.config.display(),
            config.region,
            config.peers.len()
        );
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never in journald or log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Some(peer) = args.resync_peer {
        return match runtime.block_on(foreshadow_sidecar::resync::resync(&config, &peer)) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("foreshadow-sidecar: {e}");
                ExitCode::FAILURE
            }
        };
    }
    runtime.block_on(async {
        let (tx, rx) = shutdown::channel();
        let mut stopping = rx.clone();
        tokio::spawn(shutdown::on_signal(tx));
        let mut replication = tokio::spawn(run(config, rx));
        tokio::select! {
            _ = &mut replication => return,
            _ = stopping.changed() => {}
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, replication)
            .await
            .is_err()
        {
            tracing::warn!("batches still in flight after {SHUTDOWN_GRACE:?}; exiting anyway");
        }
    });
    ExitCode::SUCCESS
}
