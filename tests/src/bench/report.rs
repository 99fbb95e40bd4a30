//! A scenario's results: JSON (settings, machine, commit, figures, raw
//! samples), a Markdown report a person can read, and SVG plots.

use super::BenchOptions;
use plotters::prelude::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

pub struct Report {
    scenario: String,
    stamp: String,
    doc: Map<String, Value>,
    /// Markdown sections, in order.
    sections: Vec<String>,
    plots: Vec<Plot>,
}

/// One line chart: named series of (x, y) points.
pub struct Plot {
    pub name: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// A target the issue sets, checked on this run's figures.
pub struct Target<'a> {
    pub name: &'a str,
    pub wanted: &'a str,
    pub value: Option<f64>,
    pub met: Option<bool>,
}

fn machine() -> Value {
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_mib": mem_kib / 1024,
        "cpu": cpu,
        "postgresql": command_output("/usr/lib/postgresql/15/bin/postgres", &["--version"]),
    })
}

fn command_output(program: &str, args: &[&str]) -> Value {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| json!(String::from_utf8_lossy(&o.stdout).trim().to_string()))
        .unwrap_or(Value::Null)
}

impl Report {
    pub fn new(
        scenario: &str,
        started: chrono::DateTime<chrono::Utc>,
        opts: &BenchOptions,
    ) -> Report {
        let mut doc = Map::new();
        doc.insert("scenario".into(), json!(scenario));
        doc.insert("started_at".into(), json!(started.to_rfc3339()));
        doc.insert(
            "commit".into(),
            command_output("git", &["rev-parse", "HEAD"]),
        );
        doc.insert("machine".into(), machine());
        doc.insert("settings".into(), opts.settings());
        Report {
            scenario: scenario.to_string(),
            stamp: started.format("%Y%m%dT%H%M%SZ").to_string(),
            doc,
            sections: Vec::new(),
            plots: Vec::new(),
        }
    }

    /// Records figures under `key` in the JSON, as their types serialise.
    pub fn set(&mut self, key: &str, value: impl serde::Serialize) {
        let value = serde_json::to_value(value).expect("figures serialise");
        self.doc.insert(key.to_string(), value);
    }

    /// A Markdown section of the report (a heading and its body).
    pub fn section(&mut self, heading: &str, body: String) {
        self.sections.push(format!("## {heading}\n\n{body}\n"));
    }

    pub fn plot(&mut self, plot: Plot) {
        self.plots.push(plot);
    }

    /// Records the targets in the JSON and as a section of the report.
    pub fn targets(&mut self, targets: &[Target]) {
        let mut md = String::from("| target | wanted | this run | met |\n|---|---|---|---|\n");
        let mut js = Vec::new();
        for t in targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            };
            md.push_str(&format!(
                "| {} | {} | {} | {met} |\n",
                t.name,
                t.wanted,
                super::sampling::show(t.value)
            ));
            js.push(json!({"target": t.name, "wanted": t.wanted, "value": t.value, "met": t.met}));
        }
        self.set("targets", Value::Array(js));
        self.section("Targets", md);
    }

    /// Writes `<scenario>-<stamp>.json`, `.md` and the plots into `dir`.
    pub fn write(mut self, dir: &Path) -> Result<PathBuf, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let base = format!("{}-{}", self.scenario, self.stamp);
        let mut images = Vec::new();
        for p in &self.plots {
            let file = format!("{base}-{}.svg", p.name);
            draw(&dir.join(&file), p)?;
            images.push(format!("![{}]({file})\n", p.title));
        }
        let plot_files: Vec<String> = self
            .plots
            .iter()
            .map(|p| format!("{base}-{}.svg", p.name))
            .collect();
        self.set("plot_files", json!(plot_files));
        let json_path = dir.join(format!("{base}.json"));
        let text = serde_json::to_string_pretty(&Value::Object(self.doc.clone())).expect("json");
        std::fs::write(&json_path, text)
            .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
        let settings = serde_json::to_string(&self.doc["settings"]).expect("json");
        let md = format!(
            "# Benchmark `{}` — {}\n\nCommit `{}` on {}; settings `{settings}`. Raw figures and samples: [`{base}.json`]({base}.json).\n\n{}\n{}",
            self.scenario,
            self.doc["started_at"].as_str().unwrap_or(""),
            self.doc["commit"].as_str().unwrap_or("unknown"),
            self.doc["machine"],
            self.sections.join("\n"),
            images.join("\n")
        );
        std::fs::write(dir.join(format!("{base}.md")), md).map_err(|e| e.to_string())?;
        Ok(json_path)
    }
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn draw(path: &Path, p: &Plot) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let points = p.series.iter().flat_map(|(_, s)| s.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    for &(x, y) in points {
        if x.is_finite() && y.is_finite() {
            x_max = x_max.max(x);
            y_max = y_max.max(y);
        }
    }
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&p.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..(x_max * 1.05).max(1e-9), 0.0..(y_max * 1.1).max(1e-9))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, series)) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                series.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
