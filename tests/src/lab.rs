//! A local multi-region lab: N PostgreSQL clusters, one sidecar each, and
//! the WAN proxy between them. Everything it starts is recorded under its
//! directory so that `down` and `fault` (other processes) can find it.

use crate::cluster::Cluster;
use crate::proc::{self, free_port, sibling_binary, spawn_detached};
use crate::proxy::{
    applied_path, link_key, load_controls, save_controls, LinkControl, LinkControls,
};
use crate::spec::{Engine, LabSpec, Link, Region};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub const DATABASE: &str = "app";
pub const SIDECAR_ROLE: &str = "foreshadow_sidecar";
const REGION_NAMES: [&str; 5] = ["us-east", "eu-west", "ap-south", "us-west", "eu-north"];

/// What `foreshadow-lab fault` does to a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL of the region's sidecar.
    KillSidecar,
    StartSidecar,
    /// Immediate stop of the region's PostgreSQL.
    StopPg,
    StartPg,
    /// Every link to and from the region reset and refused.
    Cut,
    /// Every link to and from the region held: open, silent.
    Blackhole,
    /// Every link to and from the region back to plain WAN delay.
    Heal,
}

pub struct UpOptions {
    pub dir: PathBuf,
    pub regions: usize,
    pub wan_ms: u64,
    pub engine: Engine,
    /// Sidecars connect with TLS (verify-full against the lab's own CA) and
    /// SCRAM, and may not connect otherwise.
    pub tls: bool,
}

pub struct Lab {
    pub dir: PathBuf,
    pub spec: LabSpec,
}

pub fn region_name(i: usize) -> String {
    REGION_NAMES
        .get(i)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("region-{i}"))
}

pub async fn connect(dsn: &str) -> Result<Client, String> {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub(crate) fn admin_dsn(port: u16, db: &str) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname={db} connect_timeout=5")
}

fn check_fresh_dir(dir: &Path) -> Result<(), String> {
    if LabSpec::path(dir).exists() {
        return Err(format!(
            "{} already holds a lab (lab.json exists): run `foreshadow-lab down --dir {}` first, or choose another --dir",
            dir.display(),
            dir.display()
        ));
    }
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(format!(
                "{} is not empty: choose an empty or new --dir for the lab",
                dir.display()
            ));
        }
    }
    Ok(())
}

impl Lab {
    pub fn open(dir: &Path) -> Result<Lab, String> {
        Ok(Lab {
            dir: dir.to_path_buf(),
            spec: LabSpec::load(dir)?,
        })
    }

    pub async fn up(opts: UpOptions) -> Result<Lab, String> {
        if !(1..=8).contains(&opts.regions) {
            return Err(format!(
                "--regions must be between 1 and 8, not {}",
                opts.regions
            ));
        }
        check_fresh_dir(&opts.dir)?;
        std::fs::create_dir_all(&opts.dir)
            .map_err(|e| format!("cannot create {}: {e}", opts.dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // The clusters run as `postgres` and must reach their own folders.
            std::fs::set_permissions(&opts.dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
        }
        let dir = std::fs::canonicalize(&opts.dir).map_err(|e| e.to_string())?;
        let regions: Vec<Region> = (0..opts.regions)
            .map(|i| {
                let port = free_port();
                Region {
                    name: region_name(i),
                    port,
                    dsn: admin_dsn(port, DATABASE),
                }
            })
            .collect();
        let mut links = Vec::new();
        for from in &regions {
            for to in regions.iter().filter(|r| r.name != from.name) {
                links.push(Link {
                    from: from.name.clone(),
                    to: to.name.clone(),
                    listen_port: free_port(),
                    target_port: to.port,
                });
            }
        }
        let lab = Lab {
            dir,
            spec: LabSpec {
                engine: opts.engine,
                regions,
                wan_ms: opts.wan_ms,
                links,
                tls: opts.tls,
            },
        };
        if lab.spec.tls {
            lab.certs().generate()?;
        }
        lab.spec.save(&lab.dir)?;
        let started = lab.start_all().await;
        if let Err(e) = started {
            return Err(format!("{e}\n(the half-started lab is still in {}: `foreshadow-lab down --dir {}` cleans it up)", lab.dir.display(), lab.dir.display()));
        }
        Ok(lab)
    }

    async fn start_all(&self) -> Result<(), String> {
        let names: Vec<String> = self.spec.regions.iter().map(|r| r.name.clone()).collect();
        let names = &names;
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .spec
                .regions
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let c = self.cluster(&r.name);
                        c.init(&r.name, names, self.spec.engine)?;
                        if self.spec.tls {
                            c.enable_tls(&self.certs())?;
                        }
                        c.start()
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("init thread"))
        })?;
        for r in &self.spec.regions {
            self.install(r).await?;
        }
        let proxy = spawn_detached(
            {
                let mut c = std::process::Command::new(sibling_binary("foreshadow-lab"));
                c.args(["proxyd", "--dir", &self.dir.display().to_string()]);
                c
            },
            &self.dir.join("proxy.log"),
        )?;
        std::fs::write(self.dir.join("proxy.pid"), proxy.to_string()).map_err(|e| e.to_string())?;
        self.wait_proxy_listening(Duration::from_secs(10)).await?;
        self.spec.engine.replicator().start(self).await?;
        self.wait_replicating(Duration::from_secs(60)).await
    }

    async fn install(&self, r: &Region) -> Result<(), String> {
        let admin = connect(&admin_dsn(r.port, "postgres")).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await
            .map_err(|e| format!("{}: {e}", r.name))?;
        let app = connect(&r.dsn).await?;
        let Some(sql) = self.spec.engine.replicator().install_sql(self, r) else {
            return Ok(());
        };
        app.batch_execute(&sql).await.map_err(|e| {
            format!(
                "installing {} in region {}: {e} (is it installed? `make install`)",
                self.spec.engine.name(),
                r.name
            )
        })
    }

    /// Makes `table` (already created with the same schema in every region)
    /// replicated by the lab's engine. `counters` are columns whose concurrent
    /// increments must add up: Foreshadow's `counter` strategy; pglogical has
    /// no such thing and replicates them like any column.
    pub async fn replicate_table(
        &self,
        table: &str,
        counters: &[&str],
        announce_existing: bool,
    ) -> Result<(), String> {
        for r in &self.spec.regions {
            let c = self.client(&r.name).await?;
            let done = self
                .spec
                .engine
                .replicator()
                .replicate_table(&c, table, counters, announce_existing)
                .await;
            done.map_err(|e| format!("region {}: replicating {table}: {e}", r.name))?;
        }
        Ok(())
    }

    pub fn cluster(&self, region: &str) -> Cluster {
        let port = self.spec.region(region).map(|r| r.port).unwrap_or(0);
        Cluster::new(&self.region_dir(region), port)
    }

    pub fn region_dir(&self, region: &str) -> PathBuf {
        self.dir.join(region)
    }

    fn sidecar_pid_file(&self, region: &str) -> PathBuf {
        self.region_dir(region).join("sidecar.pid")
    }

    pub fn sidecar_pid(&self, region: &str) -> Option<u32> {
        std::fs::read_to_string(self.sidecar_pid_file(region))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn certs(&self) -> crate::certs::Certs {
        crate::certs::Certs::new(&self.dir)
    }

    pub fn sidecar_config(&self, region: &str) -> Result<String, String> {
        let me = self.spec.region(region)?;
        // TLS labs: the server's certificate is checked against the lab's CA
        // and host name, SCRAM binds to the TLS channel, the password comes
        // from a pgpass file.
        let tls = if self.spec.tls {
            let certs = self.certs();
            format!(
                " sslmode=verify-full sslrootcert={} channel_binding=require passfile={}",
                certs.ca().display(),
                certs.passfile().display()
            )
        } else {
            String::new()
        };
        let mut text = format!(
            "region = \"{}\"\nprimary = \"host=127.0.0.1 port={} user={SIDECAR_ROLE} dbname={DATABASE}{tls}\"\n",
            me.name, me.port
        );
        for peer in self.spec.regions.iter().filter(|p| p.name != me.name) {
            let link = self.spec.link(&me.name, &peer.name);
            text.push_str(&format!(
                "\n[[peers]]\nname = \"{}\"\ndsn = \"host=127.0.0.1 port={} user={SIDECAR_ROLE} dbname={DATABASE} connect_timeout=3{tls}\"\n",
                peer.name, link.listen_port
            ));
        }
        text.push_str("\n[apply]\npeer_timeout_ms = 5000\nmax_backoff_ms = 1000\n");
        Ok(text)
    }

    pub fn start_sidecar(&self, region: &str) -> Result<(), String> {
        self.start_sidecar_with(region, &self.sidecar_config(region)?)
    }

    /// Starts a region's sidecar with the given configuration text.
    pub fn start_sidecar_with(&self, region: &str, config_text: &str) -> Result<(), String> {
        if let Some(pid) = self.sidecar_pid(region).filter(|&p| proc::alive(p)) {
            return Err(format!(
                "the sidecar of region {region} is already running (pid {pid})"
            ));
        }
        let config = self.region_dir(region).join("sidecar.toml");
        std::fs::write(&config, config_text).map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new(sibling_binary("foreshadow-sidecar"));
        cmd.args(["--config", &config.display().to_string()]);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let pid = spawn_detached(cmd, &self.region_dir(region).join("sidecar.log"))?;
        std::fs::write(self.sidecar_pid_file(region), pid.to_string()).map_err(|e| e.to_string())
    }

    /// Waits until every region's link from every peer is up (Foreshadow: the
    /// sidecar's slot exists; pglogical: the subscription is replicating):
    /// from then on, every committed write reaches every region.
    pub async fn wait_replicating(&self, timeout: Duration) -> Result<(), String> {
        let expected = self.spec.regions.len() - 1;
        let Some(sql) = self.spec.engine.replicator().links_up_sql() else {
            return Ok(());
        };
        if expected == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        for r in &self.spec.regions {
            loop {
                let n = match connect(&r.dsn).await {
                    Ok(c) => c
                        .query_one(sql, &[])
                        .await
                        .map(|row| row.get::<_, i64>(0) as usize)
                        .unwrap_or(0),
                    Err(_) => 0,
                };
                if n >= expected {
                    break;
                }
                if !self.proxy_alive() {
                    return Err(format!(
                        "the WAN proxy exited: see {}",
                        self.dir.join("proxy.log").display()
                    ));
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "region {} has {n} of {expected} peer links replicating after {timeout:?}; see {}/*/*.log",
                        r.name,
                        self.dir.display()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Waits until the WAN proxy accepts connections on every link, so that
    /// whatever connects across regions next (pglogical's subscriptions do
    /// not retry) finds it.
    async fn wait_proxy_listening(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for link in &self.spec.links {
            while tokio::net::TcpStream::connect(("127.0.0.1", link.listen_port))
                .await
                .is_err()
            {
                if !self.proxy_alive() || Instant::now() > deadline {
                    return Err(format!(
                        "the WAN proxy does not listen on port {}: see {}",
                        link.listen_port,
                        self.dir.join("proxy.log").display()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    fn proxy_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("proxy.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    fn proxy_alive(&self) -> bool {
        self.proxy_pid().is_some_and(proc::alive)
    }

    pub fn fault(&self, region: &str, fault: Fault) -> Result<(), String> {
        self.spec.region(region)?;
        match fault {
            Fault::KillSidecar => match self.sidecar_pid(region) {
                Some(pid) if proc::alive(pid) => {
                    proc::signal(pid, "KILL");
                    while proc::alive(pid) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(())
                }
                _ => Err(format!("the sidecar of region {region} is not running")),
            },
            Fault::StartSidecar => self.start_sidecar(region),
            Fault::StopPg => self.cluster(region).stop("immediate"),
            Fault::StartPg => self.cluster(region).start(),
            Fault::Cut => self.control_links(region, |c| c.reset = true),
            Fault::Blackhole => self.control_links(region, |c| {
                c.hold_forward = true;
                c.hold_back = true;
            }),
            Fault::Heal => self.control_links(region, |c| *c = LinkControl::default()),
        }
    }

    /// Changes the control of the link from `from`'s clients to `to`'s
    /// primary; returns once the proxy runs with the change (it looks every
    /// 50 ms), so that what the caller does next meets the changed link.
    pub fn control_link(
        &self,
        from: &str,
        to: &str,
        change: impl FnOnce(&mut LinkControl),
    ) -> Result<(), String> {
        self.spec.region(from)?;
        self.spec.region(to)?;
        if from == to {
            return Err(format!("there is no link from region {from} to itself"));
        }
        let mut all = load_controls(&self.dir)?;
        let key = link_key(from, to);
        let mut control = all.remove(&key).unwrap_or_default();
        change(&mut control);
        if control != LinkControl::default() {
            all.insert(key, control);
        }
        save_controls(&self.dir, &all)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let applied = std::fs::read_to_string(applied_path(&self.dir))
                .ok()
                .and_then(|t| serde_json::from_str::<LinkControls>(&t).ok());
            if applied.as_ref() == Some(&all) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the WAN proxy did not take the link change within 5 s: see {}",
                    self.dir.join("proxy.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Changes both links between `region` and every other region.
    fn control_links(&self, region: &str, change: impl Fn(&mut LinkControl)) -> Result<(), String> {
        for other in self.spec.regions.iter().filter(|r| r.name != region) {
            self.control_link(region, &other.name, &change)?;
            self.control_link(&other.name, region, &change)?;
        }
        Ok(())
    }

    /// Holds (or, with `held` false, releases) every byte travelling from
    /// region `src` to region `dst`, in both links between them, while the
    /// other direction flows: a one-way cut.
    pub fn hold_flow(&self, src: &str, dst: &str, held: bool) -> Result<(), String> {
        self.control_link(src, dst, |c| c.hold_forward = held)?;
        self.control_link(dst, src, |c| c.hold_back = held)
    }

    /// Restarts `region`'s PostgreSQL with its wall clock `offset_ms` off
    /// the machine's (0: back to the real clock); its sidecar reconnects.
    pub fn skew_clock(&self, region: &str, offset_ms: i64) -> Result<(), String> {
        let cluster = self.cluster(region);
        // Immediate: a fast stop waits for the walsenders of the peers'
        // sidecars, which hold logical slots open.
        if cluster.running() {
            cluster.stop("immediate")?;
        }
        cluster.start_skewed(offset_ms)
    }

    /// Stops everything the lab started; removes its directory unless `keep`.
    pub fn down(&self, keep: bool) -> Result<(), String> {
        for r in &self.spec.regions {
            if let Some(pid) = self.sidecar_pid(&r.name) {
                proc::stop(pid, Duration::from_secs(10));
            }
        }
        if let Some(pid) = self.proxy_pid() {
            proc::stop(pid, Duration::from_secs(2));
        }
        for r in &self.spec.regions {
            let c = self.cluster(&r.name);
            if c.running() {
                c.stop("fast")?;
            }
        }
        if keep {
            std::fs::remove_file(LabSpec::path(&self.dir)).map_err(|e| e.to_string())
        } else {
            std::fs::remove_dir_all(&self.dir)
                .map_err(|e| format!("cannot remove {}: {e}", self.dir.display()))
        }
    }

    /// Connection string for database `db` of `region`, as the superuser.
    pub fn dsn(&self, region: &str, db: &str) -> Result<String, String> {
        Ok(admin_dsn(self.spec.region(region)?.port, db))
    }

    /// Waits until each of `tables` has the same rows in every region, by an
    /// order-independent md5 of the rows that needs no Foreshadow function
    /// (so it works for every engine).
    pub async fn wait_identical(&self, tables: &[&str], timeout: Duration) -> Result<(), String> {
        let sql = tables
            .iter()
            .map(|t| {
                format!(
                    "(SELECT md5(coalesce(string_agg(h, '' ORDER BY h), '')) FROM (SELECT md5(t::text) AS h FROM {t} AS t) AS s)"
                )
            })
            .collect::<Vec<_>>()
            .join(" || ");
        self.wait_same(&format!("SELECT {sql}"), &[], &tables.join(", "), timeout)
            .await
            .map(|_| ())
    }

    /// Runs `sql` (one text value) in every region until all regions give
    /// the same answer; returns it.
    async fn wait_same(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for r in &self.spec.regions {
                let answer = match self.client(&r.name).await {
                    Ok(c) => c
                        .query_one(sql, params)
                        .await
                        .map(|row| row.get::<_, String>(0))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                seen.push((r.name.clone(), answer));
            }
            if let Some(Ok(first)) = seen.first().map(|(_, a)| a.clone()) {
                if seen.iter().all(|(_, a)| a.as_ref() == Ok(&first)) {
                    return Ok(first);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{what} not the same in every region after {timeout:?}: {seen:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn client(&self, region: &str) -> Result<Client, String> {
        connect(&self.spec.region(region)?.dsn)
            .await
            .map_err(|e| format!("region {region}: {e}"))
    }

    /// Runs the same SQL in every region (global tables have the same schema everywhere).
    pub async fn everywhere(&self, sql: &str) -> Result<(), String> {
        for r in &self.spec.regions {
            self.client(&r.name)
                .await?
                .batch_execute(sql)
                .await
                .map_err(|e| format!("region {}: {e}", r.name))?;
        }
        Ok(())
    }

    /// Waits until `table` has the same `foreshadow.table_digest` in every
    /// region; returns the digest.
    pub async fn wait_converged(&self, table: &str, timeout: Duration) -> Result<String, String> {
        self.wait_same(
            "SELECT foreshadow.table_digest($1::text::regclass)",
            &[&table],
            table,
            timeout,
        )
        .await
    }
}
