//! Every benchmark scenario in its quick form, on 2 regions, against both
//! engines (and plain PostgreSQL where it has a column): the result files
//! must be well-formed and the figures plausible. No timing assertions:
//! speed is for the full benchmark's report, not for tests.

use foreshadow_lab::bench::{self, BenchOptions, Scenario};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn options(out: &Path) -> BenchOptions {
    BenchOptions {
        regions: 2,
        wan_ms: 10,
        seconds: 3,
        quick: true,
        scale: 1,
        clients: 2,
        rate: 200,
        hot_keys: 10,
        out: out.to_path_buf(),
        work: std::env::temp_dir(),
    }
}

async fn run(scenario: Scenario) -> (Value, PathBuf) {
    let out = std::env::temp_dir().join(format!("foreshadow-bench-smoke-{}", std::process::id()));
    let path = bench::run(scenario, &options(&out))
        .await
        .expect("benchmark runs");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    assert_eq!(doc["scenario"], scenario.name());
    for key in ["started_at", "machine", "settings", "targets", "engines"] {
        assert!(!doc[key].is_null(), "{key} missing in {}", path.display());
    }
    assert!(doc["machine"]["cores"].as_u64().unwrap() > 0);
    let md = path.with_extension("md");
    let report = std::fs::read_to_string(&md).expect("markdown report");
    assert!(
        report.contains("| target |"),
        "report has its targets table"
    );
    for plot in doc["plot_files"].as_array().expect("plots") {
        let svg = std::fs::read_to_string(out.join(plot.as_str().unwrap())).expect("plot file");
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "plot is an SVG with data"
        );
        assert!(
            report.contains(plot.as_str().unwrap()),
            "report shows the plot"
        );
    }
    (doc, out)
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overhead_quick() {
    let (doc, _) = run(Scenario::Overhead).await;
    for engine in ["plain", "foreshadow", "pglogical"] {
        let e = &doc["engines"][engine];
        assert!(num(&e["total_tps"]) > 0.0, "{engine}: {e}");
        for r in e["regions"].as_array().unwrap() {
            assert!(
                num(&r["transactions"]) > 0.0,
                "{engine}: every region ran pgbench"
            );
            assert!(!r["per_second_tps"].as_array().unwrap().is_empty());
        }
    }
    let c = &doc["capture_alone"];
    assert!(num(&c["ratio"]) > 0.0 && num(&c["plain_mean"]) > 0.0, "{c}");
    assert!(
        num(&c["counters_ratio"]) > 0.0 && num(&c["counters_mean"]) > 0.0,
        "capture with counter columns measured: {c}"
    );
    assert!(num(&doc["ratios"]["foreshadow_vs_pglogical"]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_quick() {
    let (doc, _) = run(Scenario::Lag).await;
    for engine in ["foreshadow", "pglogical"] {
        let s = &doc["engines"][engine]["steady"];
        // Every row written is seen in the other region: all samples accounted for.
        assert_eq!(s["missing_samples"], 0, "{engine}");
        assert_eq!(
            num(&s["samples"]),
            num(&s["rows_written"]),
            "{engine}: one sample per row and region"
        );
        assert!(num(&s["rows_written"]) > 0.0);
        // Visible elsewhere no earlier than the WAN allows (small clock slack).
        assert!(num(&s["lag_minus_wan_ms"]["p50"]) > -5.0, "{engine}: {s}");
        let a = &doc["engines"][engine]["apply"];
        assert!(num(&a["min_rows_per_s"]) > 0.0, "{engine}: {a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_quick() {
    let (doc, _) = run(Scenario::Conflicts).await;
    let fs = &doc["engines"]["foreshadow"];
    assert_eq!(fs["hot_keys"]["converged"], true, "{fs}");
    assert!(num(&fs["hot_keys"]["writes"]) > 0.0);
    let b = &fs["balances"];
    assert_eq!(b["converged"], true, "{b}");
    // The correctness column: counters lose no update, in every region.
    assert_eq!(b["regions_exact"], 2, "{b}");
    assert_eq!(b["worst_wrong_rows"], 0, "{b}");
    assert!(num(&b["transactions"]) > 0.0);
    let pgl = &doc["engines"]["pglogical"];
    assert_eq!(pgl["hot_keys"]["converged"], true, "{pgl}");
    assert!(num(&pgl["balances"]["transactions"]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_quick() {
    let (doc, _) = run(Scenario::Catchup).await;
    for engine in ["foreshadow", "pglogical"] {
        let e = &doc["engines"][engine];
        assert!(num(&e["transactions"]) > 0.0, "{engine}: {e}");
        assert!(num(&e["catchup_after_restart_s"]) >= 0.0);
        let sustainable = num(&e["sustainable_tps"]);
        assert!(
            sustainable > 0.0 && sustainable <= num(&e["tps"]) * 1.05,
            "{engine}: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn footprint_quick() {
    let (doc, _) = run(Scenario::Footprint).await;
    let f = &doc["engines"]["foreshadow"];
    assert_eq!(num(&f["keys"]), 20_000.0, "{f}");
    assert!(num(&f["max_versions"]) > 0.0, "versions were sampled: {f}");
    assert_eq!(
        num(&f["tombstones_at_end"]),
        0.0,
        "every tombstone forgotten: {f}"
    );
}
