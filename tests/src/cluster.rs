//! One region's PostgreSQL cluster: initdb, configure, start, stop.

use crate::proc::{as_pg_owner, is_root, run, PG_BIN};
use crate::spec::Engine;
use std::path::{Path, PathBuf};

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
}

impl Cluster {
    pub fn new(region_dir: &Path, port: u16) -> Cluster {
        Cluster {
            dir: region_dir.to_path_buf(),
            port,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    pub fn init(&self, region: &str, regions: &[String], engine: Engine) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        if is_root() {
            run(
                {
                    let mut c = std::process::Command::new("chown");
                    c.args(["postgres:postgres", &self.dir.display().to_string()]);
                    c
                },
                "chown region dir",
            )?;
        }
        let mut initdb = as_pg_owner(&format!("{PG_BIN}/initdb"));
        initdb.args([
            "-D",
            &self.data().display().to_string(),
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]);
        run(initdb, &format!("initdb for region {region}"))?;
        // Small, fast clusters: several share this machine. fsync is off
        // because lab clusters are scratch data.
        let engine_conf = engine.replicator().conf(region, regions);
        let conf = format!(
            "\n# foreshadow lab ({engine})\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n\
             {engine_conf}wal_level = logical\nmax_replication_slots = 16\nmax_wal_senders = 16\n\
             track_commit_timestamp = on\nshared_buffers = 32MB\nfsync = off\nfull_page_writes = off\n\
             max_connections = 60\nlog_min_messages = warning\nlog_line_prefix = '%m [%p] %a '\n",
            engine = engine.name(),
            port = self.port
        );
        let conf_path = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).map_err(|e| e.to_string())?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text).map_err(|e| e.to_string())
    }

    /// Serves TLS with the lab's server certificate, and lets the sidecar's
    /// role in only over TLS with SCRAM (the lab's own admin connections,
    /// as `postgres`, stay trusted and plain).
    pub fn enable_tls(&self, certs: &crate::certs::Certs) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data();
        for (from, mode) in [("server.key", 0o600), ("server.crt", 0o644)] {
            let dest = data.join(from);
            std::fs::copy(certs.dir.join(from), &dest)
                .map_err(|e| format!("copying {from}: {e}"))?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
            if is_root() {
                let mut c = std::process::Command::new("chown");
                c.args(["postgres:postgres", &dest.display().to_string()]);
                run(c, "chown TLS file")?;
            }
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).map_err(|e| e.to_string())?;
        text.push_str(
            "ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
             password_encryption = 'scram-sha-256'
",
        );
        std::fs::write(&conf_path, text).map_err(|e| e.to_string())?;
        // A logical replication connection matches on the database name
        // (the `all` lines), not on `replication`.
        let sidecar = crate::lab::SIDECAR_ROLE;
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "host all postgres 127.0.0.1/32 trust
                 hostssl all {sidecar} 127.0.0.1/32 scram-sha-256
                 hostssl replication {sidecar} 127.0.0.1/32 scram-sha-256
                 host all all 127.0.0.1/32 reject
"
            ),
        )
        .map_err(|e| e.to_string())
    }

    pub fn start(&self) -> Result<(), String> {
        self.start_skewed(0)
    }

    /// Starts PostgreSQL with its wall clock `offset_ms` ahead of the
    /// machine's (behind if negative), through libfaketime (Debian's
    /// `faketime`), monotonic clocks untouched: clock skew between regions.
    pub fn start_skewed(&self, offset_ms: i64) -> Result<(), String> {
        let mut c = as_pg_owner(&format!("{PG_BIN}/pg_ctl"));
        if offset_ms != 0 {
            if !Path::new(FAKETIME_LIB).exists() {
                return Err(format!(
                    "{FAKETIME_LIB} is missing: install Debian's faketime package to skew clocks"
                ));
            }
            let sign = if offset_ms < 0 { "-" } else { "+" };
            let ms = offset_ms.unsigned_abs();
            c.env("LD_PRELOAD", FAKETIME_LIB)
                .env("FAKETIME", format!("{sign}{}.{:03}", ms / 1000, ms % 1000))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        c.args([
            "-D",
            &self.data().display().to_string(),
            "-l",
            &self.log().display().to_string(),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        run(c, &format!("starting PostgreSQL in {}", self.dir.display()))
    }

    /// `mode`: `fast` for a clean stop, `immediate` to simulate a crash.
    pub fn stop(&self, mode: &str) -> Result<(), String> {
        let mut c = as_pg_owner(&format!("{PG_BIN}/pg_ctl"));
        c.args([
            "-D",
            &self.data().display().to_string(),
            "-m",
            mode,
            "-w",
            "stop",
        ]);
        run(c, &format!("stopping PostgreSQL in {}", self.dir.display()))
    }

    pub fn running(&self) -> bool {
        let mut c = as_pg_owner(&format!("{PG_BIN}/pg_ctl"));
        c.args(["-D", &self.data().display().to_string(), "status"]);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c.status().map(|s| s.success()).unwrap_or(false)
    }
}
