//! Model checks of the shadow protocol (docs/shadow-protocol.md):
//! exhaustive for 2 regions, 1 shadow and 3 writes with every fault; random
//! walks for 3 regions and 2 shadows; and the controls that must fail: the
//! same model without the shadow, and each rejected design rule.
//!
//! Each check prints its state-space size and time (`-- --nocapture`);
//! counterexamples print their steps.

mod model;

use foreshadow_model::Strategy;
use model::{Flaw, Mode, Setup, ShadowModel};
use stateright::{Checker, HasDiscoveries, Model, UniformChooser};
use std::time::Instant;

/// 2 regions, 1 shadow (moving from the first region to the second), 1 key,
/// 3 writes; a crash, a cut-off owner and a shadow-set change, each at any
/// point.
fn small(strategy: Strategy) -> Setup {
    Setup {
        deletes: false,
        ..Setup::faulty(strategy, 2, 1, 1, 3)
    }
}

/// `small` without faults.
fn fault_free(strategy: Strategy) -> Setup {
    Setup {
        crashes: 0,
        cut: false,
        shadows_after: None,
        ..small(strategy)
    }
}

fn report<C: Checker<ShadowModel>>(label: &str, checker: &C, start: Instant) {
    eprintln!(
        "{label}: {} states ({} distinct), depth {}, {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        start.elapsed()
    );
}

/// Visits every reachable state; every `always` holds and every
/// `sometimes` happens.
fn exhaustive(label: &str, setup: Setup) {
    let start = Instant::now();
    let checker = ShadowModel::new(setup).checker().spawn_bfs().join();
    report(label, &checker, start);
    checker.assert_properties();
}

/// Random walks to quiescence, from a fixed seed so that CI is repeatable.
fn random(label: &str, setup: Setup, states: usize) {
    let mut model = ShadowModel::new(setup);
    model.only_effective_actions = true;
    let start = Instant::now();
    let checker = model
        .checker()
        .target_state_count(states)
        .spawn_simulation(4, UniformChooser)
        .join();
    report(label, &checker, start);
    checker.assert_properties();
}

/// Searches for a shortest counterexample to `property`, which must exist,
/// and prints it. Stateright's search is breadth-first across blocks of
/// states but not within one, so the depth bound is raised step by step.
fn counterexample(label: &str, setup: Setup, property: &'static str) {
    let start = Instant::now();
    for depth in 1..=40 {
        let checker = ShadowModel::new(setup.clone())
            .checker()
            .target_max_depth(depth)
            .finish_when(HasDiscoveries::AnyOf([property].into()))
            .spawn_bfs()
            .join();
        if let Some(path) = checker.discovery(property) {
            report(label, &checker, start);
            eprintln!("{label}: counterexample to {property:?}:");
            for action in path.into_actions() {
                eprintln!("    {action:?}");
            }
            return;
        }
    }
    panic!("{label}: no counterexample to {property:?}");
}

#[test]
fn exhaustive_lww() {
    exhaustive("lww, 2 regions, 1 shadow, 3 writes", small(Strategy::Lww));
}

#[test]
fn exhaustive_merge() {
    exhaustive(
        "merge, 2 regions, 1 shadow, 3 writes",
        small(Strategy::Merge),
    );
}

#[test]
fn exhaustive_vv() {
    exhaustive("vv, 2 regions, 1 shadow, 3 writes", small(Strategy::Vv));
}

#[test]
fn exhaustive_counter() {
    exhaustive(
        "counter, 2 regions, 1 shadow, 3 writes",
        small(Strategy::Counter),
    );
}

/// Deletes (tombstones) add little to the protocol and multiply the state
/// space by eight, so they get every fault but the shadow-set change here,
/// and everything in the random walks.
#[test]
fn exhaustive_deletes() {
    for strategy in [Strategy::Lww, Strategy::Vv] {
        let setup = Setup {
            shadows_after: None,
            ..Setup::faulty(strategy, 2, 1, 1, 3)
        };
        exhaustive(
            &format!("{strategy} with deletes, 2 regions, 1 shadow, 3 writes"),
            setup,
        );
    }
}

/// 3 regions, shadows on the first two moving to the last two, 2 keys (one
/// per shadow), 5 writes, every fault and deletes.
fn three_regions(strategy: Strategy) {
    let setup = Setup::faulty(strategy, 3, 2, 2, 5);
    let owners = &ShadowModel::new(setup.clone()).owners;
    let expected = [vec![Some(0), Some(1)], vec![Some(1), Some(2)]];
    assert_eq!(
        owners, &expected,
        "each shadow owns a key, and both keys move"
    );
    random(
        &format!("{strategy}, 3 regions, 2 shadows, 5 writes"),
        setup,
        300_000,
    );
}

#[test]
fn random_lww() {
    three_regions(Strategy::Lww);
}

#[test]
fn random_merge() {
    three_regions(Strategy::Merge);
}

#[test]
fn random_vv() {
    three_regions(Strategy::Vv);
}

#[test]
fn random_counter() {
    three_regions(Strategy::Counter);
}

/// Without shadows, each primary resolving `(local, remote)` as pglogical
/// does: the non-commutative merge leaves the primaries different forever.
#[test]
fn negative_control_pglogical_diverges() {
    let setup = Setup {
        mode: Mode::Pairwise,
        ..fault_free(Strategy::Merge)
    };
    counterexample("pglogical-style merge", setup, "converged at quiescence");
}

/// Without shadows but with the deterministic fold at every primary, the
/// primaries converge, yet every one of them calls the merge function.
#[test]
fn negative_control_fold_everywhere_resolves_per_region() {
    let setup = || Setup {
        mode: Mode::NoShadow,
        ..fault_free(Strategy::Merge)
    };
    let checker = ShadowModel::new(setup()).checker().spawn_bfs().join();
    checker.assert_no_discovery("converged at quiescence");
    counterexample(
        "fold at every primary",
        setup(),
        "resolved once while the owner is reachable",
    );
}

fn rejected(flaw: Flaw, setup: Setup, property: &'static str) {
    counterexample(
        &format!("{flaw:?}"),
        Setup {
            flaw: Some(flaw),
            ..setup
        },
        property,
    );
}

#[test]
fn rejected_write_claims_pending_leaves() {
    rejected(
        Flaw::WriteClaimsPending,
        fault_free(Strategy::Merge),
        "rows reflect exactly the writes they have seen",
    );
}

#[test]
fn rejected_adopting_an_undominated_resolution() {
    rejected(
        Flaw::AdoptUndominated,
        fault_free(Strategy::Merge),
        "no row is overwritten by an older version",
    );
}

#[test]
fn rejected_pairwise_fallback() {
    let setup = Setup {
        cut: true,
        writes: 2,
        ..fault_free(Strategy::Merge)
    };
    rejected(Flaw::PairwiseFallback, setup, "converged at quiescence");
}

#[test]
fn rejected_unacked_pre_stages_in_memory_only() {
    let setup = Setup {
        crashes: 1,
        writes: 2,
        ..fault_free(Strategy::Merge)
    };
    rejected(
        Flaw::ForgetUnackedOnRestart,
        setup,
        "converged at quiescence",
    );
}

#[test]
fn rejected_owner_publishing_only_its_own_resolutions() {
    let setup = Setup {
        crashes: 0,
        ..small(Strategy::Merge)
    };
    rejected(
        Flaw::OwnerPublishesOnlyItsOwn,
        setup,
        "converged at quiescence",
    );
}
