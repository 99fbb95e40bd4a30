//! `foreshadow-sidecar --config FILE [--check-config | --resync-peer PEER]`
//!
//! Two phases: arguments, config and logging are settled synchronously, so a
//! bad config fails before anything connects; then the runtime starts.

use clap::Parser;
use foreshadow_sidecar::{run, shutdown, Config};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Longest wait for the batches in flight after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Foreshadow's sidecar for one region: streams every peer region's
/// intents and applies them here, exactly once.
#[derive(Parser)]
#[command(name = "foreshadow-sidecar", version)]
struct Args {
    /// The region's config file (TOML; see docs/operations.md).
    #[arg(long)]
    config: PathBuf,
    /// Check the config (and the files it names) and exit.
    #[arg(long, conflicts_with = "resync_peer")]
    check_config: bool,
    /// Resynchronise from this peer after its slot went missing, and exit.
    #[arg(long, value_name = "PEER")]
    resync_peer: Option<String>,
}

fn main() -> ExitCode {
    // clap prints its own refusal or help and exits 2 (0 for --help).
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("foreshadow-sidecar: {e}");
            return ExitCode::from(78); // EX_CONFIG: systemd will not hammer restarts on it
        }
    };
    let unverified = |peer: &str| {
        format!(
            "peer {peer}: its DSN does not verify the server's certificate (sslmode=verify-full \
             with sslrootcert), so the network between the regions can answer in its place, \
             read the credentials and the link key (docs/security.md)"
        )
    };
    if args.check_config {
        for peer in config.unverified_peers() {
            eprintln!("foreshadow-sidecar: warning: {}", unverified(peer));
        }
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
    for peer in config.unverified_peers() {
        tracing::warn!("{}", unverified(peer));
    }
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
