//! `foreshadow-sidecar --config FILE --resync-peer PEER`: what an operator
//! runs after the lane from PEER stopped because its slot for this region
//! is missing (dropped, or the peer failed over or was restored). With this
//! region's sidecar stopped, it
//! 1. forgets this region's progress for PEER (its positions may mean
//!    nothing in the peer's WAL any more),
//! 2. creates the slot on PEER again,
//! 3. has PEER re-announce its own writes to every global table with the
//!    versions they have (`foreshadow.reannounce`), into that slot, so that
//!    whatever this region missed arrives and nothing newer is overwritten.
//!
//! Tables with counter columns cannot be re-announced (increments cannot be
//! sent twice); they are listed for the operator to compare.
//!
//! From step 1 until the last table is re-announced, the replication
//! origin `foreshadow_resync_<PEER>` marks the resync as unfinished: a
//! sidecar started meanwhile would take the lane as a new one (no
//! progress) and skip for good what the resync was to bring back, so it
//! refuses the lane ([`unfinished`]) until a resync finishes.

use crate::config::Config;
use crate::connect::connect;
use crate::error::Error;
use crate::pgoutput::Lsn;

pub async fn resync(config: &Config, peer_name: &str) -> Result<String, Error> {
    let what = format!("resynchronising from peer {peer_name}");
    let peer = config
        .peers
        .iter()
        .find(|p| p.name == peer_name)
        .ok_or_else(|| Error::protocol(&what, "no such peer in the config file"))?;
    let timeout = config.apply.peer_timeout();
    let mut local = connect(&config.primary, "this region's primary", timeout).await?;
    let origin = format!("foreshadow_from_{peer_name}");
    let marker = marker(peer_name);
    // The mark and the forgetting commit together.
    let stop_first = |e| {
        let mut e = Error::from_pg(&what, e);
        e.message
            .push_str(" (stop this region's sidecar first: it holds the origin)");
        e
    };
    let tx = local.transaction().await.map_err(stop_first)?;
    tx.execute(
        "SELECT pg_catalog.pg_replication_origin_create($1::text) \
         WHERE pg_catalog.pg_replication_origin_oid($1::text) IS NULL",
        &[&marker],
    )
    .await
    .map_err(stop_first)?;
    tx.execute(
        "SELECT pg_catalog.pg_replication_origin_drop($1::text) \
         WHERE pg_catalog.pg_replication_origin_oid($1::text) IS NOT NULL",
        &[&origin],
    )
    .await
    .map_err(stop_first)?;
    tx.commit().await.map_err(stop_first)?;
    let remote = connect(&peer.dsn, &format!("peer {peer_name}"), timeout).await?;
    let slot = crate::slot::ensure(&remote, peer_name, &config.region, Lsn(0), timeout).await?;
    let tables = remote
        .query(
            "SELECT table_name::text, cardinality(counter_columns) > 0 FROM foreshadow.global_tables",
            &[],
        )
        .await
        .map_err(|e| Error::from_pg(&what, e))?;
    let mut report = vec![format!(
        "slot {slot} on peer {peer_name} is ready; progress from it starts anew"
    )];
    for t in tables {
        let (table, counters): (String, bool) = (t.get(0), t.get(1));
        if counters {
            report.push(format!(
                "{table}: has counter columns, not re-announced: compare \
                 foreshadow.table_digest('{table}') in both regions and correct by hand"
            ));
            continue;
        }
        let sent: i64 = remote
            .query_one(
                "SELECT foreshadow.reannounce($1::text::regclass)",
                &[&table],
            )
            .await
            .map_err(|e| Error::from_pg(format!("{what}: re-announcing {table}"), e))?
            .get(0);
        report.push(format!("{table}: {sent} rows and tombstones re-announced"));
    }
    local
        .execute(
            "SELECT pg_catalog.pg_replication_origin_drop($1::text)",
            &[&marker],
        )
        .await
        .map_err(|e| Error::from_pg(&what, e))?;
    Ok(report.join("\n"))
}

/// The replication origin that marks a resync from `peer` as unfinished.
fn marker(peer: &str) -> String {
    format!("foreshadow_resync_{peer}")
}

/// Refuses the lane from `peer` while a resync from it is unfinished.
pub async fn unfinished(client: &tokio_postgres::Client, peer: &str) -> Result<(), Error> {
    let ctx = format!("starting the lane from peer {peer}");
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_replication_origin_oid($1::text) IS NOT NULL",
            &[&marker(peer)],
        )
        .await
        .map_err(|e| Error::from_pg(&ctx, e))?;
    if row.get::<_, bool>(0) {
        return Err(Error::protocol(
            ctx,
            format!(
                "a --resync-peer {peer} was started and did not finish: run it again (with this \
                 region's sidecar stopped); until it finishes the lane stays stopped, so that \
                 nothing the resync is to bring back is skipped"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn an_unknown_peer_is_refused_before_anything_connects() {
        let config = crate::Config::parse(
            "region = \"us-east\"\nprimary = \"host=127.0.0.1 port=1 user=u dbname=d\"\n\
             [[peers]]\nname = \"eu-west\"\ndsn = \"host=127.0.0.1 port=1 user=u dbname=d\"\n",
        )
        .unwrap();
        let e = super::resync(&config, "ap-south").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "resynchronising from peer ap-south: no such peer in the config file"
        );
    }
}
