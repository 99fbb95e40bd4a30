//! Replicating from one peer: stream its intents, apply each transaction
//! here as soon as nothing more is waiting, confirm the durable progress
//! back every second; on any failure wait (doubling up to a bound) and
//! start over from the durable progress. The peer's state is logged once
//! per change, not once per retry.

use crate::apply::ApplySession;
use crate::config::{ApplyConfig, Config, Peer};
use crate::connect::connect;
use crate::error::{Error, Kind};
use crate::pgoutput::{Grouper, Lsn, Transaction};
use crate::seals::LinkKey;
use crate::stream::{Event, ReplicationStream};
use std::time::Duration;
use tokio::sync::watch;

/// A peer transaction is applied in parts once this much of it has
/// arrived, so that the sidecar holds at most about this much of it.
const CHUNK_BYTES: usize = 16 << 20;
const CHUNK_INTENTS: usize = 20_000;
/// A batch of whole peer transactions is applied once it holds this many
/// bytes of intents, however few intents (each up to `CHUNK_BYTES`): the
/// sidecar's memory stays bounded while a peer streams a backlog.
const BATCH_BYTES: usize = 4 * CHUNK_BYTES;

/// How the link to a peer is doing, as last logged.
#[derive(Clone, Debug, PartialEq)]
enum LinkState {
    Starting,
    Replicating,
    Failing(String),
}

struct Link {
    peer: String,
    state: LinkState,
}

impl Link {
    fn set(&mut self, next: LinkState) {
        if self.state == next {
            return;
        }
        match &next {
            LinkState::Replicating => tracing::info!(peer = %self.peer, "replicating from peer"),
            LinkState::Failing(reason) => {
                tracing::warn!(peer = %self.peer, %reason, "peer link down, retrying with back-off")
            }
            LinkState::Starting => {}
        }
        self.state = next;
    }
}

/// Sleeps unless shutdown is requested first; returns whether to go on.
async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => !*shutdown.borrow(),
        _ = shutdown.changed() => false,
    }
}

pub async fn replicate(config: Config, peer: Peer, mut shutdown: watch::Receiver<bool>) {
    let mut link = Link {
        peer: peer.name.clone(),
        state: LinkState::Starting,
    };
    let mut backoff = Duration::from_millis(100);
    while !*shutdown.borrow() {
        match session(&config, &peer, &mut shutdown, &mut link).await {
            Ok(()) => break,
            Err(e) => {
                let needs_operator = matches!(e.kind, Kind::NeedsOperator);
                let reason = if needs_operator {
                    format!("{e} (needs operator action)")
                } else {
                    e.to_string()
                };
                if needs_operator && link.state != LinkState::Failing(reason.clone()) {
                    tracing::error!(peer = %peer.name, error = %e, "peer link needs operator action");
                }
                link.set(LinkState::Failing(reason));
                if !pause(&mut shutdown, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(config.apply.max_backoff());
            }
        }
    }
    tracing::info!(peer = %peer.name, "stopped replicating from peer");
}

/// One connected stretch; returns `Ok` only on shutdown.
async fn session(
    config: &Config,
    peer: &Peer,
    shutdown: &mut watch::Receiver<bool>,
    link: &mut Link,
) -> Result<(), Error> {
    let ApplyConfig { batch_changes, .. } = config.apply;
    let timeout = config.apply.peer_timeout();
    let local = connect(&config.primary, "this region's primary", timeout).await?;
    let mut apply = ApplySession::open(local, &peer.name).await?;
    // Where applying resumes: the last commit here, flushed or not (the
    // in-memory origin position, which is what `apply_transaction` checks).
    let mut progress = apply.progress().await?;
    let what = format!("replicating from peer {}", peer.name);
    let linked = async {
        apply.refuse_unfinished_resync().await?;
        let remote = connect(&peer.dsn, &format!("peer {}", peer.name), timeout).await?;
        let slot =
            crate::slot::ensure(&remote, &peer.name, &config.region, progress, timeout).await?;
        let key = LinkKey::read(&remote, &peer.name, timeout).await?;
        let stream = ReplicationStream::start(&peer.dsn, &slot, progress, &what, timeout).await?;
        Ok::<_, Error>((slot, key, stream))
    };
    let (slot, key, mut stream) = match linked.await {
        Ok(linked) => linked,
        // What an operator must fix (a refused certificate or password, a
        // missing slot or grant, an unfinished resync) is shown in
        // foreshadow.alerts here too.
        Err(e) => {
            if matches!(e.kind, Kind::NeedsOperator) {
                apply.note_error(&e).await;
            }
            return Err(e);
        }
    };
    link.set(LinkState::Replicating);
    let mut grouper = Grouper::default();
    let mut pending: Vec<Transaction> = Vec::new();
    let (mut pending_intents, mut pending_bytes) = (0usize, 0usize);
    let mut received = progress;
    let mut status = tokio::time::interval(Duration::from_secs(1));
    let mut last_heard = std::time::Instant::now();
    // The peer's end of WAL, last said in a keepalive while this region
    // had applied everything sent before it: safe to confirm once flushed.
    let mut idle_upto = progress;
    let mut busy_logged = false;
    failpoint_panic(&peer.name);
    loop {
        // Whatever has arrived is applied as soon as the peer has nothing
        // more ready (or the batch is full): no waiting to fill batches.
        let ready = !pending.is_empty();
        let apply_now = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            event = stream.next() => {
                last_heard = std::time::Instant::now();
                match event? {
                    Event::Data(data) => {
                        let done = grouper.feed(&data).map_err(|e| Error::protocol(&what, e))?;
                        if let Some(mut chunk) = grouper.take_chunk(CHUNK_BYTES, CHUNK_INTENTS) {
                            key.open_all(&peer.name, &mut chunk);
                            // A large transaction: what came before it is
                            // applied first, then it, part by part.
                            if !pending.is_empty() {
                                said_while_waiting(&peer.name, apply.apply(&pending, progress)).await?;
                                progress = pending.last().map(|t| t.end_lsn).unwrap_or(progress);
                                pending.clear();
                                (pending_intents, pending_bytes) = (0, 0);
                            }
                            said_while_waiting(&peer.name, apply.apply_chunk(&chunk, progress)).await?;
                        }
                        let done = done.map(|mut t| {
                            key.open_all(&peer.name, &mut t.intents);
                            t
                        });
                        match done {
                            Some(t) if apply.in_large() => {
                                said_while_waiting(&peer.name, apply.finish_large(&t, progress)).await?;
                                received = t.end_lsn;
                                progress = t.end_lsn;
                                false
                            }
                            Some(t) => {
                                received = t.end_lsn;
                                pending_intents += t.intents.len();
                                pending_bytes += t.intents.iter().map(Vec::len).sum::<usize>();
                                pending.push(t);
                                // Transactions count too: ones without
                                // intents would otherwise pile up unbounded.
                                pending_intents.max(pending.len()) >= batch_changes as usize
                                    || pending_bytes >= BATCH_BYTES
                            }
                            None => false,
                        }
                    }
                    Event::Keepalive { wal_end, reply } => {
                        // Nothing of ours before wal_end is pending: with
                        // quiet global tables on a busy peer, confirming it
                        // lets the peer release its WAL.
                        if pending.is_empty() && grouper.between() && !apply.in_large() {
                            idle_upto = idle_upto.max(wal_end);
                        }
                        if reply {
                            confirm(&mut stream, &apply, received, idle_upto).await?;
                        }
                        false
                    }
                }
            }
            // The status update asks the peer to answer. Silence for longer
            // than the peer timeout: either the link is gone, or the peer's
            // walsender is busy (decoding a large transaction on tables
            // that are not global sends nothing for a long time). The peer
            // is asked over a fresh connection which one it is.
            _ = status.tick() => {
                if last_heard.elapsed() > timeout {
                    if !walsender_working(peer, &slot, stream.backend_pid, timeout).await {
                        return Err(Error::transient(&what, format!(
                            "the peer has not answered for {:.0} s", last_heard.elapsed().as_secs_f64()
                        )));
                    }
                    if !busy_logged {
                        tracing::info!(peer = %peer.name, silent_s = last_heard.elapsed().as_secs(),
                            "the peer's walsender is busy (decoding a large transaction?); waiting for it");
                        busy_logged = true;
                    }
                    last_heard = std::time::Instant::now();
                }
                confirm(&mut stream, &apply, received, idle_upto).await?;
                false
            }
            _ = std::future::ready(()), if ready => true,
        };
        if apply_now {
            let applied = said_while_waiting(&peer.name, apply.apply(&pending, progress)).await?;
            tracing::debug!(peer = %peer.name, ?applied, upto = %received, "applied");
            progress = progress.max(pending.last().map(|t| t.end_lsn).unwrap_or(progress));
            pending.clear();
            (pending_intents, pending_bytes) = (0, 0);
        }
    }
}

/// How long an apply call may wait before the log says so, and again.
const WAITING_SAID_EVERY: Duration = Duration::from_secs(30);

/// Runs an apply call, logging while it takes long: it waits for what a
/// session here holds (a row lock, an idle transaction), as PostgreSQL's
/// own apply worker does, and the lane stands still meanwhile.
async fn said_while_waiting<T>(peer: &str, apply: impl std::future::Future<Output = T>) -> T {
    let mut apply = std::pin::pin!(apply);
    let started = std::time::Instant::now();
    loop {
        tokio::select! {
            done = &mut apply => {
                if started.elapsed() >= WAITING_SAID_EVERY {
                    tracing::info!(peer, waited_s = started.elapsed().as_secs(), "applying from the peer goes on");
                }
                return done;
            }
            _ = tokio::time::sleep(WAITING_SAID_EVERY) => tracing::warn!(
                peer, waited_s = started.elapsed().as_secs(),
                "applying from the peer is waiting: a session here may hold rows it writes \
                 (see pg_stat_activity and pg_locks)"
            ),
        }
    }
}

/// Tells the peer what this region has durably applied (asynchronous
/// commits may not be on disk yet: only flushed progress lets the peer
/// release WAL). Past the last applied transaction, up to `idle_upto`
/// (where the peer said it was while nothing of ours was pending), once
/// everything applied is flushed.
async fn confirm(
    stream: &mut ReplicationStream,
    apply: &ApplySession,
    received: Lsn,
    idle_upto: Lsn,
) -> Result<(), Error> {
    let (flushed, applied) = apply.progress_both().await?;
    let flushed = if flushed == applied && idle_upto > flushed {
        idle_upto
    } else {
        flushed
    };
    stream.confirm(received.max(flushed), flushed).await
}

/// Whether the peer's walsender serving this link (`pid`) is alive and
/// still holds this region's slot: then silence means it is busy, not
/// that the link is gone. Any failure to find out counts as gone.
async fn walsender_working(peer: &Peer, slot: &str, pid: Option<i32>, timeout: Duration) -> bool {
    let Some(pid) = pid else {
        return false;
    };
    let probe = async {
        let c = connect(&peer.dsn, &format!("peer {}", peer.name), timeout)
            .await
            .ok()?;
        c.query_opt(
            "SELECT 1 FROM pg_catalog.pg_replication_slots s \
              JOIN pg_catalog.pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1 AND s.active_pid = $2",
            &[&slot, &pid],
        )
        .await
        .ok()?
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(_)))
}

/// For the test of a panicking peer task: `FORESHADOW_FAILPOINT=panic_peer:<peer>`
/// makes this process's first session with that peer panic.
fn failpoint_panic(peer: &str) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let armed = std::env::var("FORESHADOW_FAILPOINT")
        .is_ok_and(|f| f.strip_prefix("panic_peer:") == Some(peer));
    if armed && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        panic!("failpoint panic_peer:{peer}");
    }
}
