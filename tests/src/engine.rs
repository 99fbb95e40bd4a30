//! What keeps a lab's regions in step, behind one trait: how each engine is
//! configured, installed and started, how it replicates a table, pauses its
//! apply and counts conflicts. The lab, the benchmarks and the chaos suite
//! ask the trait; adding an engine is a variant of `spec::Engine` and an
//! impl here.

use crate::lab::{admin_dsn, connect, Lab, DATABASE, SIDECAR_ROLE};
use crate::spec::{Engine, Region};
use std::future::Future;
use std::pin::Pin;
use tokio_postgres::Client;

/// A boxed future, so that the trait can be used as `dyn Replicator`.
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

pub trait Replicator: Sync {
    /// `postgresql.conf` lines this engine needs in `region`.
    /// postgresql.conf lines of `region`, one of `regions` (all of the lab's).
    fn conf(&self, region: &str, regions: &[String]) -> String;
    /// SQL that installs the engine in a region's database, if any.
    fn install_sql(&self, lab: &Lab, region: &Region) -> Option<String>;
    /// Starts replicating between the regions once every cluster runs.
    fn start<'a>(&'a self, lab: &'a Lab) -> Fut<'a, ()>;
    /// A query for the number of a region's peers whose changes reach it
    /// (None: the engine does not replicate).
    fn links_up_sql(&self) -> Option<&'static str>;
    /// Makes `table` (same schema in every region) replicated, run in each
    /// region. `counters` are columns whose concurrent increments must add
    /// up, where the engine can do that.
    fn replicate_table<'a>(
        &'a self,
        region: &'a Client,
        table: &'a str,
        counters: &'a [&'a str],
        announce_existing: bool,
    ) -> Fut<'a, ()>;
    /// Stops (`pause`) or restarts applying peers' changes in `region`.
    fn pause_apply<'a>(&'a self, lab: &'a Lab, region: &'a str, pause: bool) -> Fut<'a, ()>;
    /// Conflicts the engine has counted in `region` so far.
    fn conflicts<'a>(&'a self, lab: &'a Lab, region: &'a str) -> Fut<'a, i64>;
    /// Whether concurrent increments of counter columns add up.
    fn has_counters(&self) -> bool;
    /// Whether each region runs a sidecar (that faults can kill).
    fn has_sidecars(&self) -> bool;
}

impl Engine {
    pub fn replicator(self) -> &'static dyn Replicator {
        match self {
            Engine::Foreshadow => &Foreshadow,
            Engine::Pglogical => &Pglogical,
            Engine::Plain => &Plain,
        }
    }
}

struct Foreshadow;
struct Pglogical;
struct Plain;

impl Replicator for Foreshadow {
    fn conf(&self, region: &str, regions: &[String]) -> String {
        format!(
            "shared_preload_libraries = 'foreshadow'\nforeshadow.region = '{region}'\nforeshadow.regions = '{}'\n",
            regions.join(",")
        )
    }

    fn install_sql(&self, lab: &Lab, _: &Region) -> Option<String> {
        let password = if lab.spec.tls {
            format!("PASSWORD '{}'", crate::certs::SIDECAR_PASSWORD)
        } else {
            String::new()
        };
        Some(format!(
            "CREATE EXTENSION foreshadow; CREATE ROLE {SIDECAR_ROLE} LOGIN REPLICATION {password}; \
             SELECT foreshadow.grant_sidecar('{SIDECAR_ROLE}');"
        ))
    }

    fn start<'a>(&'a self, lab: &'a Lab) -> Fut<'a, ()> {
        Box::pin(async move {
            // A lone region has nobody to replicate with: no sidecar, so its
            // intents are captured and nothing consumes them.
            if lab.spec.regions.len() > 1 {
                for r in &lab.spec.regions {
                    lab.start_sidecar(&r.name)?;
                }
            }
            Ok(())
        })
    }

    fn links_up_sql(&self) -> Option<&'static str> {
        Some("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'foreshadow\\_%'")
    }

    fn replicate_table<'a>(
        &'a self,
        c: &'a Client,
        table: &'a str,
        counters: &'a [&'a str],
        announce_existing: bool,
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            c.execute(
                "SELECT foreshadow.make_global($1::text::regclass, announce_existing := $2)",
                &[&table, &announce_existing],
            )
            .await
            .map_err(|e| e.to_string())?;
            for col in counters {
                c.execute(
                    "SELECT foreshadow.set_column_strategy($1::text::regclass, $2, 'counter')",
                    &[&table, col],
                )
                .await
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }

    fn pause_apply<'a>(&'a self, lab: &'a Lab, region: &'a str, pause: bool) -> Fut<'a, ()> {
        Box::pin(async move {
            lab.fault(
                region,
                if pause {
                    crate::Fault::KillSidecar
                } else {
                    crate::Fault::StartSidecar
                },
            )
        })
    }

    fn conflicts<'a>(&'a self, lab: &'a Lab, region: &'a str) -> Fut<'a, i64> {
        Box::pin(async move {
            Ok(lab
                .client(region)
                .await?
                .query_one(
                    "SELECT coalesce(sum(conflicts), 0)::bigint FROM foreshadow.peer_stats",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0))
        })
    }

    fn has_counters(&self) -> bool {
        true
    }

    fn has_sidecars(&self) -> bool {
        true
    }
}

impl Replicator for Pglogical {
    fn conf(&self, _: &str, _: &[String]) -> String {
        // pglogical's output plugin must be approved on this PostgreSQL;
        // conflicts are logged as WARNINGs so that the benchmark can count them.
        "shared_preload_libraries = 'pglogical'\n\
         output_plugin_libraries = 'pgoutput, test_decoding, pglogical_output'\n\
         pglogical.conflict_resolution = 'last_update_wins'\n\
         pglogical.conflict_log_level = warning\nmax_worker_processes = 32\n"
            .to_string()
    }

    fn install_sql(&self, _: &Lab, r: &Region) -> Option<String> {
        Some(format!(
            "CREATE EXTENSION pglogical; SELECT pglogical.create_node(node_name := '{}', dsn := '{}');",
            r.name,
            admin_dsn(r.port, DATABASE)
        ))
    }

    /// Two-way: every region subscribes to every other region through the
    /// WAN proxy, without forwarding what that region itself received.
    fn start<'a>(&'a self, lab: &'a Lab) -> Fut<'a, ()> {
        Box::pin(async move {
            for r in &lab.spec.regions {
                let app = connect(&r.dsn).await?;
                for peer in lab.spec.regions.iter().filter(|p| p.name != r.name) {
                    let link = lab.spec.link(&r.name, &peer.name);
                    app.execute(
                        "SELECT pglogical.create_subscription(subscription_name := $1, provider_dsn := $2, \
                         replication_sets := ARRAY['default'], synchronize_structure := false, \
                         synchronize_data := false, forward_origins := '{}')",
                        &[
                            // pglogical names the slot on the provider after the
                            // subscription: unique per subscriber, not just per provider.
                            &format!(
                                "{}_from_{}",
                                r.name.replace('-', "_"),
                                peer.name.replace('-', "_")
                            ),
                            &admin_dsn(link.listen_port, DATABASE),
                        ],
                    )
                    .await
                    .map_err(|e| {
                        let why = e
                            .as_db_error()
                            .map(|d| d.message().to_string())
                            .unwrap_or(e.to_string());
                        format!("region {}: subscribing to {}: {why}", r.name, peer.name)
                    })?;
                }
            }
            Ok(())
        })
    }

    fn links_up_sql(&self) -> Option<&'static str> {
        Some("SELECT count(*) FROM pglogical.show_subscription_status() WHERE status = 'replicating'")
    }

    fn replicate_table<'a>(
        &'a self,
        c: &'a Client,
        table: &'a str,
        _counters: &'a [&'a str],
        _announce_existing: bool,
    ) -> Fut<'a, ()> {
        // No counters in pglogical: they replicate like any column.
        Box::pin(async move {
            c.execute(
                "SELECT pglogical.replication_set_add_table('default', $1::text::regclass, synchronize_data := false)",
                &[&table],
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    }

    fn pause_apply<'a>(&'a self, lab: &'a Lab, region: &'a str, pause: bool) -> Fut<'a, ()> {
        Box::pin(async move {
            let f = if pause {
                "alter_subscription_disable"
            } else {
                "alter_subscription_enable"
            };
            lab.client(region)
                .await?
                .batch_execute(&format!(
                    "SELECT pglogical.{f}(sub_name, true) FROM pglogical.subscription"
                ))
                .await
                .map_err(|e| format!("region {region}: {e}"))
        })
    }

    /// pglogical keeps no count: its conflict WARNINGs in the server log.
    fn conflicts<'a>(&'a self, lab: &'a Lab, region: &'a str) -> Fut<'a, i64> {
        let log = std::fs::read_to_string(lab.cluster(region).log()).unwrap_or_default();
        Box::pin(async move { Ok(log.matches("CONFLICT: remote").count() as i64) })
    }

    fn has_counters(&self) -> bool {
        false
    }

    fn has_sidecars(&self) -> bool {
        false
    }
}

/// Independent clusters: the baseline that replicates nothing.
impl Replicator for Plain {
    fn conf(&self, _: &str, _: &[String]) -> String {
        String::new()
    }

    fn install_sql(&self, _: &Lab, _: &Region) -> Option<String> {
        None
    }

    fn start<'a>(&'a self, _: &'a Lab) -> Fut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn links_up_sql(&self) -> Option<&'static str> {
        None
    }

    fn replicate_table<'a>(
        &'a self,
        _: &'a Client,
        _: &'a str,
        _: &'a [&'a str],
        _: bool,
    ) -> Fut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn pause_apply<'a>(&'a self, _: &'a Lab, _: &'a str, _: bool) -> Fut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn conflicts<'a>(&'a self, _: &'a Lab, _: &'a str) -> Fut<'a, i64> {
        Box::pin(async { Ok(0) })
    }

    fn has_counters(&self) -> bool {
        false
    }

    fn has_sidecars(&self) -> bool {
        false
    }
}
