//! The short chaos run of `make test`: a fixed seed, 3 regions, every fault
//! kind (the schedule deals each once per round), and every invariant
//! checked from outside (`foreshadow-lab chaos`).

use foreshadow_lab::chaos::faults::Kind;
use foreshadow_lab::chaos::{run, ChaosOptions};
use foreshadow_lab::spec::Engine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_chaos_run_keeps_every_promise() {
    let dir = std::env::temp_dir().join(format!("foreshadow-test-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let verdict = run(ChaosOptions {
        dir,
        regions: 3,
        seconds: 150,
        seed: 20261130,
        engine: Engine::Foreshadow,
        wan_ms: 10,
        keep: false,
    })
    .await
    .unwrap();
    let text = verdict.render();
    println!("{text}");
    assert!(verdict.passed(), "{text}");
    assert!(
        verdict.outcomes.acknowledged > 500,
        "too little written to test anything:\n{text}"
    );
    let kinds: Vec<&str> = verdict.faults.iter().map(|(k, _)| k.as_str()).collect();
    for kind in Kind::ALL.map(Kind::name) {
        assert!(kinds.contains(&kind), "no {kind} fault in the run:\n{text}");
    }
    for check in [
        "monotonic reads (no value seen again once moved past)",
        "read-then-write supersedes what it read",
    ] {
        let c = verdict
            .checks
            .iter()
            .find(|c| c.name == check)
            .expect(check);
        assert!(c.checked > 50, "{check}: too little to check:\n{text}");
    }
}
