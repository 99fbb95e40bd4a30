//! The WAN simulator: a TCP proxy per cross-region link (no `tc netem` on
//! these machines). Every byte is delayed by the lab's WAN time each way,
//! and each link can be controlled on its own, while it runs, through
//! `DIR/links.json` (`LinkControl`): reset (connections closed and refused,
//! as a crashed peer), one direction or both held (a black hole: the
//! connection stays open, nothing gets through and nobody is told, as a cut
//! WAN link), extra delay, jitter, and loss.
//!
//! Delay is applied by timestamping chunks as they are read and releasing
//! them at `read time + delay`, so a link keeps its bandwidth: the delay is
//! latency, not a throughput cap. Jitter and loss never reorder a stream
//! (TCP delivers in order): a chunk is released no earlier than the one
//! before it, and a lost chunk shows as a retransmission stall.

use crate::spec::{LabSpec, Link};
use crate::workload::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How long a lost chunk stalls its stream: TCP's minimum retransmission
/// timeout on Linux.
const RETRANSMIT: Duration = Duration::from_millis(200);

/// What is done to one link (`from`'s client reaching `to`'s primary) on
/// top of the WAN delay. "Forward" is the client's bytes towards the
/// primary; "back" is the primary's answer (for a sidecar or subscriber:
/// the replicated changes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkControl {
    /// Connections closed and new ones refused.
    pub reset: bool,
    /// Bytes towards the primary held until healed.
    pub hold_forward: bool,
    /// Bytes from the primary held until healed.
    pub hold_back: bool,
    /// Added to the WAN delay, each direction.
    pub delay_ms: u64,
    /// Up to this much more, drawn per chunk.
    pub jitter_ms: u64,
    /// Percentage of chunks "lost": each stalls its stream for a
    /// retransmission timeout.
    pub loss_pct: u64,
}

impl LinkControl {
    fn held(&self, forward: bool) -> bool {
        if forward {
            self.hold_forward
        } else {
            self.hold_back
        }
    }
}

/// Every link's control, keyed by `from>to`; a link not named is untouched.
pub type LinkControls = BTreeMap<String, LinkControl>;

pub fn link_key(from: &str, to: &str) -> String {
    format!("{from}>{to}")
}

pub fn controls_path(dir: &Path) -> PathBuf {
    dir.join("links.json")
}

/// What the proxy runs with now, written once it has taken a change, so
/// that whoever changed `links.json` knows when the change holds.
pub fn applied_path(dir: &Path) -> PathBuf {
    dir.join("links.applied.json")
}

pub fn load_controls(dir: &Path) -> Result<LinkControls, String> {
    match std::fs::read_to_string(controls_path(dir)) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| format!("{}: {e}", controls_path(dir).display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LinkControls::new()),
        Err(e) => Err(format!("{}: {e}", controls_path(dir).display())),
    }
}

/// Writes the controls so that the proxy never reads half a file.
pub fn save_controls(dir: &Path, controls: &LinkControls) -> Result<(), String> {
    let tmp = dir.join("links.json.tmp");
    let text = serde_json::to_string_pretty(controls).expect("controls serialise");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, controls_path(dir)).map_err(|e| format!("links.json: {e}"))
}

/// Runs every link of the lab until killed.
pub async fn serve(dir: PathBuf, spec: LabSpec) -> std::io::Result<()> {
    let (tx, rx) = watch::channel(LinkControls::new());
    tokio::spawn(watch_controls(dir, tx));
    let delay = Duration::from_millis(spec.wan_ms);
    let mut tasks = Vec::new();
    for link in spec.links.clone() {
        let listener = TcpListener::bind(("127.0.0.1", link.listen_port)).await?;
        let control = link_view(rx.clone(), link_key(&link.from, &link.to));
        tasks.push(tokio::spawn(accept_loop(listener, link, delay, control)));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn watch_controls(dir: PathBuf, tx: watch::Sender<LinkControls>) {
    loop {
        match load_controls(&dir) {
            Ok(now) => {
                let changed = tx.send_if_modified(|cur| {
                    let changed = *cur != now;
                    *cur = now.clone();
                    changed
                });
                if changed || !applied_path(&dir).exists() {
                    let text = serde_json::to_string(&now).expect("controls serialise");
                    if let Err(e) = std::fs::write(applied_path(&dir), text) {
                        eprintln!("proxy: cannot write {}: {e}", applied_path(&dir).display());
                    }
                }
            }
            Err(e) => eprintln!("proxy: ignoring unreadable link controls: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One link's control, following the file.
fn link_view(mut all: watch::Receiver<LinkControls>, key: String) -> watch::Receiver<LinkControl> {
    let first = all.borrow().get(&key).cloned().unwrap_or_default();
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        while all.changed().await.is_ok() {
            let now = all.borrow().get(&key).cloned().unwrap_or_default();
            tx.send_if_modified(|cur| {
                let changed = *cur != now;
                *cur = now;
                changed
            });
        }
    });
    rx
}

async fn accept_loop(
    listener: TcpListener,
    link: Link,
    delay: Duration,
    control: watch::Receiver<LinkControl>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if control.borrow().reset {
            continue; // dropping the socket refuses the connection
        }
        let Ok(server) = TcpStream::connect(("127.0.0.1", link.target_port)).await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let mut reset = control.clone();
        let seed = u64::from(link.listen_port) ^ crate::proc::now_ns();
        let forward = pump(cr, sw, delay, control.clone(), true, seed);
        let back = pump(sr, cw, delay, control.clone(), false, seed ^ 0x5eed);
        tokio::spawn(async move {
            tokio::select! {
                _ = forward => {}
                _ = back => {}
                _ = async { while reset.changed().await.is_ok() && !reset.borrow().reset {} } => {}
            }
        });
    }
}

/// Copies `from` to `to` in one direction of a link, each chunk released
/// `delay` (plus the control's extra delay, jitter and loss) after it was
/// read, never before the chunk ahead of it. While the direction is held,
/// nothing gets through and nobody is told, and what was sent arrives once
/// it heals, as TCP retransmits it (nothing is dropped from the middle of
/// a stream). A reset drops this future: what was still queued is not
/// delivered.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin + Send + 'static,
    delay: Duration,
    control: watch::Receiver<LinkControl>,
    forward: bool,
    seed: u64,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    // Dropped when the link is reset: nothing more is delivered.
    let mut writer = AbortOnDrop(tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }));
    let mut rng = Rng::new(seed);
    let mut last_due = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                while control.borrow().held(forward) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let c = control.borrow().clone();
                let mut extra = c.delay_ms + rng.next_u64() % (c.jitter_ms + 1);
                if c.loss_pct > 0 && rng.next_u64() % 100 < c.loss_pct {
                    extra += RETRANSMIT.as_millis() as u64;
                }
                let due = (Instant::now() + delay + Duration::from_millis(extra)).max(last_due);
                last_due = due;
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = (&mut writer.0).await;
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
