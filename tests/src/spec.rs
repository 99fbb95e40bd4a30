//! `DIR/lab.json`: what a running lab is made of, for the lab's own commands
//! and for anything that wants to connect to it.

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Region {
    pub name: String,
    pub port: u16,
    /// Connection string for clients (superuser, database `app`).
    pub dsn: String,
}

/// One direction of cross-region traffic: region `from`'s sidecar reaching
/// region `to`'s primary through the delaying proxy on `listen_port`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Link {
    pub from: String,
    pub to: String,
    pub listen_port: u16,
    pub target_port: u16,
}

/// What keeps the lab's regions in step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Foreshadow: the extension in every region and a sidecar per region.
    #[default]
    Foreshadow,
    /// pglogical 2: two-way subscriptions between every pair of regions.
    Pglogical,
    /// No replication at all: independent clusters, the baseline.
    Plain,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Foreshadow => "foreshadow",
            Engine::Pglogical => "pglogical",
            Engine::Plain => "plain",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabSpec {
    #[serde(default)]
    pub engine: Engine,
    pub regions: Vec<Region>,
    pub wan_ms: u64,
    pub links: Vec<Link>,
    /// Sidecars connect with TLS (verify-full) and SCRAM (`up --tls`).
    #[serde(default)]
    pub tls: bool,
}

impl LabSpec {
    pub fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("lab.json")
    }

    pub fn load(dir: &Path) -> Result<LabSpec, String> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "no lab in {}: cannot read {}: {e}",
                dir.display(),
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a lab description: {e}", path.display()))
    }

    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).expect("spec serialises");
        std::fs::write(Self::path(dir), text).map_err(|e| format!("cannot write lab.json: {e}"))
    }

    pub fn region(&self, name: &str) -> Result<&Region, String> {
        self.regions.iter().find(|r| r.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
            format!(
                "no region {name:?} in this lab (regions: {})",
                known.join(", ")
            )
        })
    }

    pub fn link(&self, from: &str, to: &str) -> &Link {
        self.links
            .iter()
            .find(|l| l.from == from && l.to == to)
            .expect("every ordered pair of regions has a link")
    }
}
