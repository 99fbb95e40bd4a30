//! The sidecar's configuration file (TOML), parsed strictly and validated
//! before anything connects: a bad file is refused with the key it is about.

use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This sidecar's region; must equal `foreshadow.region` on its primary.
    pub region: String,
    /// libpq-style connection string of this region's primary.
    pub primary: String,
    /// Every other region.
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub apply: ApplyConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    /// Connection string of the peer's primary (its intents are read there).
    pub dsn: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplyConfig {
    /// Most intents received from a peer before they are applied (fewer are
    /// applied as soon as the peer has nothing more ready).
    pub batch_changes: u32,
    /// Longest wait for one query to a peer before it counts as unreachable.
    pub peer_timeout_ms: u64,
    /// Longest pause between reconnection attempts (back-off doubles up to it).
    pub max_backoff_ms: u64,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_changes: 2000,
            peer_timeout_ms: 10_000,
            max_backoff_ms: 5_000,
        }
    }
}

impl ApplyConfig {
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }
    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }
}

/// The name a region takes in replication slot names (which allow only
/// lower-case letters, digits and underscores).
pub fn slot_safe(region: &str) -> String {
    region.replace('-', "_")
}

fn check_region_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("region name {name:?} must be 1-40 characters of a-z, 0-9, '-' or '_'"),
        ))
    }
}

fn check_dsn(key: &str, dsn: &str) -> Result<crate::tls::Target, ConfigError> {
    crate::tls::parse_dsn(dsn)
        .map_err(|e| invalid(key, format!("not a valid connection string: {e}")))
}

impl Config {
    /// Peers whose DSN does not authenticate the server by its certificate
    /// (`sslmode=verify-full` or `verify-ca` with `sslrootcert`): there the
    /// network can answer in the peer's place, read the credentials and
    /// the link key (docs/security.md). Allowed, for labs, but said.
    pub fn unverified_peers(&self) -> Vec<&str> {
        self.peers
            .iter()
            .filter(|p| crate::tls::parse_dsn(&p.dsn).is_ok_and(|t| !t.tls.verifies_server()))
            .map(|p| p.name.as_str())
            .collect()
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: shown,
                message,
            },
            other => other,
        })?;
        config.check_files()?;
        Ok(config)
    }

    /// Reads the certificate and key files the DSNs name: a wrong path or a
    /// bad file fails at startup, not at the first connection.
    fn check_files(&self) -> Result<(), ConfigError> {
        let dsns = std::iter::once(("primary".to_string(), &self.primary)).chain(
            self.peers
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("peers[{i}].dsn"), &p.dsn)),
        );
        for (key, dsn) in dsns {
            let target = check_dsn(&key, dsn)?;
            crate::tls::client_config(&target.tls).map_err(|e| invalid(&key, e))?;
        }
        Ok(())
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_region_name("region", &self.region)?;
        check_dsn("primary", &self.primary)?;
        let mut slot_names = BTreeSet::from([slot_safe(&self.region)]);
        for (i, peer) in self.peers.iter().enumerate() {
            check_region_name(&format!("peers[{i}].name"), &peer.name)?;
            check_dsn(&format!("peers[{i}].dsn"), &peer.dsn)?;
            if !slot_names.insert(slot_safe(&peer.name)) {
                return Err(invalid(
                    format!("peers[{i}].name"),
                    format!(
                        "region {:?} appears twice (or as this sidecar's own region)",
                        peer.name
                    ),
                ));
            }
        }
        let a = &self.apply;
        if a.batch_changes == 0 {
            return Err(invalid("apply.batch_changes", "must be at least 1"));
        }
        if a.peer_timeout_ms == 0 || a.max_backoff_ms == 0 {
            return Err(invalid(
                "apply.peer_timeout_ms/max_backoff_ms",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        region = "us-east"
        primary = "host=/tmp port=5432 user=postgres dbname=app"
        [[peers]]
        name = "eu-west"
        dsn = "host=10.0.0.2 port=5432 user=foreshadow dbname=app"
    "#;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_example_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.peers[0].name, "eu-west");
        assert_eq!(c.apply.batch_changes, 2000);
    }

    #[test]
    fn the_shipped_example_is_valid() {
        Config::parse(include_str!("../foreshadow-sidecar.example.toml")).unwrap();
    }

    #[test]
    fn a_missing_certificate_fails_at_load_naming_the_key() {
        let path = std::env::temp_dir().join(format!("fs-config-{}.toml", std::process::id()));
        let text = GOOD.replace(
            "port=5432 user=foreshadow",
            "sslmode=verify-full sslrootcert=/nonexistent/ca.crt port=5432 user=foreshadow",
        );
        std::fs::write(&path, &text).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.contains("`peers[0].dsn`") && e.contains("/nonexistent/ca.crt"),
            "{e}"
        );
        // Parsing alone (e.g. the shipped example) does not read files.
        Config::parse(&text).unwrap();
    }

    #[test]
    fn peers_whose_server_is_not_verified_are_listed() {
        let verified = GOOD.replace(
            "port=5432 user=foreshadow",
            "sslmode=verify-full sslrootcert=/etc/ca.crt port=5432 user=foreshadow",
        );
        assert!(Config::parse(&verified)
            .unwrap()
            .unverified_peers()
            .is_empty());
        assert_eq!(Config::parse(GOOD).unwrap().unverified_peers(), ["eu-west"]);
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&GOOD.replace("region =", "regoin =")).contains("unknown field `regoin`"));
        assert!(err(&GOOD.replace("\"us-east\"", "\"US East\"")).contains("`region`"));
        assert!(
            err(&GOOD.replace("port=5432 user=foreshadow", "port=notaport user=foreshadow"))
                .contains("`peers[0].dsn`")
        );
        assert!(err(&GOOD.replace("eu-west", "us-east")).contains("`peers[0].name`"));
        assert!(
            err(&format!("{GOOD}\n[apply]\nbatch_changes = 0\n")).contains("`apply.batch_changes`")
        );
        assert!(err("region = \"a\"").contains("missing field `primary`"));
    }
}
