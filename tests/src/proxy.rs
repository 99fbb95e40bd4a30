//! The WAN simulator: a TCP proxy per cross-region link that delays every
//! byte by a fixed time each way (no `tc netem` on these machines) and can
//! cut a region off from the others.
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

/// Runs every link of the lab until killed.
pub async fn serve(dir: PathBuf, spec: LabSpec) -> std::io::Result<()> {
    let regions: Vec<String> = spec.regions.iter().map(|r| r.name.clone()).collect();
    let (cut_tx, cut_rx) = watch::channel(BTreeSet::new());
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

async fn watch_cut_flags(dir: PathBuf, regions: Vec<String>, tx: watch::Sender<BTreeSet<String>>) {
    loop {
        let cut: BTreeSet<String> = regions
            .iter()
            .filter(|r| cut_flag(&dir, r).exists())
            .cloned()
            .collect();
        tx.send_if_modified(|cur| {
            let changed = *cur != cut;
            *cur = cut.clone();
            changed
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_cut(link: &Link, cut: &BTreeSet<String>) -> bool {
    cut.contains(&link.from) || cut.contains(&link.to)
}

async fn accept_loop(
    listener: TcpListener,
    link: Link,
    delay: Duration,
    cut: watch::Receiver<BTreeSet<String>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if is_cut(&link, &cut.borrow()) {
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
        tokio::spawn(async move {
            tokio::select! {
                _ = pump(cr, sw, delay) => {}
                _ = pump(sr, cw, delay) => {}
                _ = async { while cut_rx.changed().await.is_ok() && !is_cut(&link, &cut_rx.borrow()) {} } => {}
            }
        });
    }
}

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin + Send + 'static,
    delay: Duration,
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
