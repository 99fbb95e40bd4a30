//! What the sidecar asks of its primary on a clock, each on one connection
//! (a primary that is down is waited for):
//! - every 250 ms, the fallback of docs/shadow-protocol.md (R5): an open
//!   conflict that has waited past `foreshadow.shadow_deadline` for its
//!   owner's resolution is resolved by the primary, with the same function
//!   (`foreshadow.resolve_overdue()`, which also resolves at once the open
//!   conflicts of keys this region has become the owner of, R7). The
//!   deadlines are the primary's durable `detected_at`, so a restarted
//!   sidecar picks them up where they were (R6);
//! - every second, this region's heartbeat (`foreshadow.heartbeat()`): how
//!   far its writes have all been sent, which the other regions need to
//!   forget tombstones;
//! - every 5 seconds, the tombstones every region's heartbeats allow this
//!   region to forget (`foreshadow.collect_tombstones()`, a batch at a
//!   time: while a call forgets any, the next comes at the next tick), and
//!   the leaves of resolved conflicts and tombstones of merge and vv tables
//!   that every region has said it is past (`foreshadow.collect_settled()`,
//!   the same way).

use crate::config::Config;
use std::time::Duration;
use tokio::sync::watch;

/// How often the primary is asked for overdue conflicts: well under the
/// deadline, so a fallback is late by at most this much.
const EVERY: Duration = Duration::from_millis(250);

/// One call on the clock: its SQL (returning a count), every how many
/// ticks, and what a non-zero count means, for the log (a warning if it
/// needs an operator's eye); `batched`: a non-zero count may mean more to
/// do, so it is called again at the next tick.
struct Call {
    sql: &'static str,
    ticks: u32,
    done: &'static str,
    warn: bool,
    batched: bool,
}

const CALLS: [Call; 4] = [
    Call {
        sql: "SELECT foreshadow.resolve_overdue()",
        ticks: 1,
        done: "resolved open conflicts here: overdue (no resolution from their shadow within foreshadow.shadow_deadline), or of keys whose shadow this region has become",
        warn: true,
        batched: false,
    },
    Call {
        sql: "SELECT foreshadow.heartbeat()",
        ticks: 4,
        done: "",
        warn: false,
        batched: false,
    },
    Call {
        sql: "SELECT foreshadow.collect_tombstones()",
        ticks: 20,
        done: "forgot tombstones that no write can still need",
        warn: false,
        batched: true,
    },
    Call {
        sql: "SELECT foreshadow.collect_settled()",
        ticks: 20,
        done: "forgot resolved conflicts' leaves and tombstones of merge and vv tables that every region is past",
        warn: false,
        batched: true,
    },
];

pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) {
    let mut client = None;
    let mut tick: u32 = 0;
    // The tick at which each call is next due.
    let mut due = [0u32; CALLS.len()];
    // Each call's error while it keeps failing: logged when it starts or
    // changes, not at every tick.
    let mut failing: [Option<String>; CALLS.len()] = Default::default();
    while !*shutdown.borrow() {
        if client.is_none() {
            match crate::connect::connect(
                &config.primary,
                "the primary",
                config.apply.peer_timeout(),
            )
            .await
            {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "periodic calls: cannot reach the primary; retrying")
                }
            }
        }
        for ((call, due), failing) in CALLS.iter().zip(&mut due).zip(&mut failing) {
            let Some(c) = &client else { break };
            if tick < *due {
                continue;
            }
            *due = tick + call.ticks;
            match c.query_one(call.sql, &[]).await {
                Ok(row) => {
                    if failing.take().is_some() {
                        tracing::info!(sql = call.sql, "periodic call works again");
                    }
                    let n: i64 = row.get(0);
                    if call.batched && n > 0 {
                        *due = tick + 1;
                    }
                    match (n > 0 && !call.done.is_empty(), call.warn) {
                        (true, true) => tracing::warn!(count = n, "{}", call.done),
                        (true, false) => tracing::info!(count = n, "{}", call.done),
                        _ => {}
                    }
                }
                Err(e) => {
                    // A lost connection is made again; an error from the
                    // primary (a missing grant, a lock) is not the
                    // connection's fault: it is kept.
                    let closed = c.is_closed();
                    let error = crate::error::Error::from_pg("periodic", e).to_string();
                    if failing.as_deref() != Some(error.as_str()) {
                        tracing::warn!(error = %error, sql = call.sql, "periodic call failed; retrying");
                        *failing = Some(error);
                    }
                    if closed {
                        client = None;
                    }
                }
            }
        }
        tick += 1;
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => {}
        }
    }
}
