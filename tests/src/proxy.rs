//! The WAN simulator: a TCP proxy per cross-region link that delays every
//! byte by a fixed time each way (no `tc netem` on these machines) and can
//! cut a region off from the others in two ways: reset (connections closed
//! and refused, as a crashed peer) or black-holed (connections stay open and
//! nothing gets through, as a cut WAN link: nobody is told).
//!
//! Delay is applied by timestamping chunks as they are read and releasing
//! them at `read time + delay`, so a link keeps its bandwidth: the delay is
//! latency, not a throughput cap.

use crate::spec::{LabSpec, Link};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub fn cut_flag(dir: &Path, region: &str) -> PathBuf {
    dir.join(format!("cut-{region}"))
}

pub fn hole_flag(dir: &Path, region: &str) -> PathBuf {
    dir.join(format!("blackhole-{region}"))
}

/// Which regions are cut off now, and how.
#[derive(Clone, Default, PartialEq)]
struct Cuts {
    reset: BTreeSet<String>,
    holed: BTreeSet<String>,
}

/// Runs every link of the lab until killed.
pub async fn serve(dir: PathBuf, spec: LabSpec) -> std::io::Result<()> {
    let regions: Vec<String> = spec.regions.iter().map(|r| r.name.clone()).collect();
    let (cut_tx, cut_rx) = watch::channel(Cuts::default());
    tokio::spawn(watch_cut_flags(dir, regions, cut_tx));
    let delay = Duration::from_millis(spec.wan_ms);
    let mut tasks = Vec::new();
    for link in spec.links.clone() {
        let listener = TcpListener::bind(("127.0.0.1", link.listen_port)).await?;
        tasks.push(tokio::spawn(accept_loop(
            listener,
            link,
            delay,
            cut_rx.clone(),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn watch_cut_flags(dir: PathBuf, regions: Vec<String>, tx: watch::Sender<Cuts>) {
    loop {
        let flagged = |flag: fn(&Path, &str) -> PathBuf| -> BTreeSet<String> {
            regions
                .iter()
                .filter(|r| flag(&dir, r).exists())
                .cloned()
                .collect()
        };
        let cut = Cuts {
            reset: flagged(cut_flag),
            holed: flagged(hole_flag),
        };
        tx.send_if_modified(|cur| {
            let changed = *cur != cut;
            *cur = cut.clone();
            changed
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn touches(link: &Link, regions: &BTreeSet<String>) -> bool {
    regions.contains(&link.from) || regions.contains(&link.to)
}

async fn accept_loop(
    listener: TcpListener,
    link: Link,
    delay: Duration,
    cut: watch::Receiver<Cuts>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if touches(&link, &cut.borrow().reset) {
            continue; // dropping the socket refuses the connection
        }
        let Ok(server) = TcpStream::connect(("127.0.0.1", link.target_port)).await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let mut cut_rx = cut.clone();
        let link = link.clone();
        let hole = {
            let (cut, link) = (cut.clone(), link.clone());
            move || touches(&link, &cut.borrow().holed)
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = pump(cr, sw, delay, hole.clone()) => {}
                _ = pump(sr, cw, delay, hole) => {}
                _ = async { while cut_rx.changed().await.is_ok() && !touches(&link, &cut_rx.borrow().reset) {} } => {}
            }
        });
    }
}

/// Copies `from` to `to`, each chunk `delay` later; while `holed()`,
/// nothing gets through and nobody is told (the connection stays open, as
/// on a cut WAN link), and what was sent arrives once it heals, as TCP
/// retransmits it (nothing is dropped from the middle of a stream).
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin + Send + 'static,
    delay: Duration,
    holed: impl Fn() -> bool,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                while holed() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
