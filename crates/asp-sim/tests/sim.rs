//! Deterministic simulation of whole clusters. `ASP_SIM_SEEDS=N` runs more seeds,
//! `ASP_SIM_STEPS=N` longer worlds, `ASP_SIM_SEED=S` replays one seed (with
//! `ASP_SIM_LOG=1`, printing every step). `ASP_SIM_ONLY=<Mutation>` tries one mutation
//! of `the_simulator_catches_broken_guarantees`. `ASP_SIM_RELAY_TREE=1` (or `0`) runs
//! relay trees on every node (on none) instead of as each seed picks.

use std::time::Instant;

use asp_sim::{Config, Durability, Invariant, ModelFault, Mutation, run};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const NODES: usize = 5;

/// Relay trees as `ASP_SIM_RELAY_TREE` forces them (`1` or `0`), or as the seed picks.
fn relay_tree() -> Option<bool> {
    match std::env::var("ASP_SIM_RELAY_TREE").as_deref() {
        Ok("1") => Some(true),
        Ok("0") => Some(false),
        Ok("") | Err(_) => None,
        Ok(other) => panic!("ASP_SIM_RELAY_TREE is 1 or 0, not {other:?}"),
    }
}

fn sweep(durability: Durability, first_seed: u64, seeds: u64) {
    let steps = env("ASP_SIM_STEPS", 10_000);
    let started = Instant::now();
    let (mut events, mut writes, mut total_steps) = (0, 0, 0);
    let (mut runs, mut decoded, mut differences, mut handovers, mut lost) = (0, 0, 0, 0, 0);
    let (mut compacted, mut collected, mut epitaphs, mut dropped) = (0, 0, 0, 0);
    let mut crdt_collected = 0;
    let mut crdt_pruned = 0;
    let (mut parked, mut released, mut passed, mut failed) = (0, 0, 0, 0);
    let (mut relay_seeds, mut relay_nodes, mut prunes) = (0, 0, 0);
    let (mut grafts_down, mut grafts_lag, mut relay_runs) = (0, 0, 0);
    let mut failures = Vec::new();
    let mut config = Config::new(NODES, steps, durability);
    config.relay_tree = relay_tree();
    for seed in first_seed..first_seed + seeds {
        match run(seed, &config) {
            Ok(outcome) => {
                relay_seeds += u64::from(outcome.relay_tree_nodes > 0);
                relay_nodes += outcome.relay_tree_nodes;
                prunes += outcome.reconcile.prunes;
                grafts_down += outcome.reconcile.grafts_link_down;
                grafts_lag += outcome.reconcile.grafts_lag;
                relay_runs += outcome.reconcile.relay_runs;
                events += outcome.events;
                writes += outcome.acked_writes;
                total_steps += outcome.steps;
                runs += outcome.reconcile.runs;
                decoded += outcome.reconcile.decoded;
                differences += outcome.reconcile.differences;
                handovers += outcome.reconcile.handovers;
                lost += outcome.lost_writes;
                compacted += outcome.reconcile.compacted;
                collected += outcome.reconcile.collected;
                epitaphs += outcome.reconcile.epitaphs;
                dropped += outcome.reconcile.epitaphs_dropped;
                crdt_collected += outcome.reconcile.crdt_collected;
                crdt_pruned += outcome.reconcile.crdt_pruned;
                parked += outcome.reconcile.parked;
                released += outcome.reconcile.released;
                passed += outcome.reconcile.conditions_passed;
                failed += outcome.reconcile.conditions_failed;
            }
            Err(failure) => {
                eprintln!("{failure}");
                failures.push(seed);
                if failures.len() == 10 {
                    break;
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{durability:?}: seeds {failures:?} failed; replay one with ASP_SIM_SEED=<seed>{}",
        if durability == Durability::Never {
            " ASP_SIM_NEVER=1"
        } else {
            ""
        }
    );
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{durability:?}: {seeds} seeds x {NODES} nodes x {steps} chaos steps in {secs:.1} s: {:.1} seeds/s, {:.0} steps/s, {:.0} events applied/s, {writes} acknowledged writes",
        seeds as f64 / secs,
        total_steps as f64 / secs,
        events as f64 / secs
    );
    eprintln!(
        "{durability:?}: reconciliation: {runs} runs ended, {decoded} decoded, {differences} keys found different, {handovers} handovers; {lost} acknowledged writes lost in machine crashes (fsync = never only)"
    );
    eprintln!(
        "{durability:?}: compaction: {compacted} records removed, {collected} deletes collected, {epitaphs} with an epitaph, {dropped} epitaphs dropped, {crdt_collected} emptied CRDT keys collected, {crdt_pruned} live ones pruned; {parked} received events held (clock ahead), {released} released; compare-and-set writes: {passed} passed, {failed} failed"
    );
    eprintln!(
        "{durability:?}: relay trees: on in {relay_seeds} seeds ({relay_nodes} nodes); {prunes} origins pruned, {grafts_down} grafted after a link went down, {grafts_lag} after a peer's summaries showed a lag, {relay_runs} anti-entropy runs queued for what pruned streams skipped"
    );
    // The sweep exercises the collection and pruning of CRDT keys, not only the
    // collection of deletes.
    assert!(
        failures.is_empty() && (seeds < 20 || (crdt_collected > 0 && crdt_pruned > 0)),
        "{durability:?}: failures, or no emptied CRDT key collected or live one pruned in {seeds} seeds"
    );
    // And relay trees: prunes, and grafts when their paths break.
    assert!(
        seeds < 20
            || config.relay_tree == Some(false)
            || (prunes > 0 && grafts_down + grafts_lag > 0),
        "{durability:?}: no relay-tree prune or graft in {seeds} seeds"
    );
}

#[test]
fn seeds_under_fsync_always_hold_every_invariant() {
    let seeds = env("ASP_SIM_SEEDS", 500);
    sweep(Durability::Always, 0, seeds / 2 + seeds % 2);
}

#[test]
fn seeds_under_fsync_never_hold_every_invariant() {
    let seeds = env("ASP_SIM_SEEDS", 500);
    sweep(Durability::Never, 1_000_000, seeds / 2);
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    for seed in [7, 12_345] {
        let config = Config::new(NODES, 5_000, Durability::Always);
        let a = run(seed, &config).unwrap();
        let b = run(seed, &config).unwrap();
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {seed} ran differently twice"
        );
        assert_eq!(a.steps, b.steps);
        let c = run(seed + 1, &config).unwrap();
        assert_ne!(a.trace_hash, c.trace_hash, "different seeds should differ");
    }
}

/// Each deliberate bug in product code must be caught within the default seed budget,
/// and by the invariant it breaks: a run that fails for another reason proves nothing
/// about it.
#[test]
fn the_simulator_catches_broken_guarantees() {
    let budget = env("ASP_SIM_SEEDS", 500);
    for (mutation, invariants) in [
        // Replicas keep different winners: the reference model, the replicas'
        // disagreement (once compaction has removed the losing copies), an older
        // write read over a collected delete, or a compare-and-set judged against the
        // wrong winner sees it first.
        (
            Mutation::LwwTieGoesToArrival,
            &[
                Invariant::WrongWinner,
                Invariant::Divergence,
                Invariant::Resurrection,
                Invariant::Condition,
            ][..],
        ),
        (Mutation::AckOnReceipt, &[Invariant::AckedNotHeld][..]),
        (Mutation::DropLastOfBatch, &[Invariant::AckedNotHeld][..]),
        (
            Mutation::UncheckedStreamOrder,
            &[Invariant::AckedNotHeld][..],
        ),
        // Every replica picks the same wrong winner, until tombstone collection (whose
        // rule assumes a later write wins) lets replicas part or an older write come
        // back, or a compare-and-set is judged against it: any of these is caught.
        (
            Mutation::LwwFirstWriterWins,
            &[
                Invariant::WrongWinner,
                Invariant::Divergence,
                Invariant::Resurrection,
                Invariant::Condition,
            ][..],
        ),
        // A vector that claims a dot it lacks, or, once a peer's cover has made the claim
        // true in name, a state that lacks the event.
        (
            Mutation::RangeSetMergesGap,
            &[Invariant::VectorMismatch, Invariant::Divergence][..],
        ),
        (
            Mutation::ReconcileDropsLocalSide,
            &[Invariant::Divergence][..],
        ),
        (Mutation::CounterJoinAdds, &[Invariant::CounterSum][..]),
        (
            Mutation::SetJoinDropsConcurrentAdds,
            &[Invariant::AddWins][..],
        ),
        (
            Mutation::GcReportNotContained,
            &[Invariant::Resurrection][..],
        ),
        // A delete collected before a node that never reported has seen it: that node
        // later brings an older write back, or the two end on different states (which
        // of the two a seed shows first depends on delivery order).
        (
            Mutation::GcSkipsUnreportedNodes,
            &[Invariant::Resurrection, Invariant::Divergence][..],
        ),
        (
            Mutation::GcAwayLeavesNoEpitaph,
            &[Invariant::Resurrection][..],
        ),
        (
            Mutation::SiblingsJoinKeepsReplaced,
            &[Invariant::Siblings][..],
        ),
        (
            Mutation::ConditionIgnoresVersion,
            &[Invariant::Condition][..],
        ),
        // Replicas keep whichever value they heard of first: they disagree, or agree
        // on a value the reference does not pick.
        (
            Mutation::JsonMapJoinKeepsFirst,
            &[Invariant::JsonFields, Invariant::Divergence][..],
        ),
    ] {
        if std::env::var("ASP_SIM_ONLY").is_ok_and(|only| only != format!("{mutation:?}")) {
            continue;
        }
        let mut config = Config::new(NODES, 10_000, Durability::Always);
        config.mutation = Some(mutation);
        expect_caught(&format!("{mutation:?}"), &config, budget, invariants);
    }
}

/// The checker itself: faults in the simulator's store model (not product code; the
/// store's own bugs are caught in asp-store's tests) are seen as the invariant each
/// breaks.
#[test]
fn the_checker_sees_a_broken_store_model() {
    let budget = env("ASP_SIM_SEEDS", 500);
    let cases: [(ModelFault, Durability, &[Invariant]); 7] = [
        (
            ModelFault::AckBeforeFsync,
            Durability::Always,
            &[Invariant::AckedWriteLost],
        ),
        (
            ModelFault::ForgetDedupe,
            Durability::Never,
            &[Invariant::AppliedTwice],
        ),
        (
            ModelFault::VisibleBeforeDurable,
            Durability::Always,
            &[Invariant::FeedChanged],
        ),
        (
            ModelFault::ReuseCounters,
            Durability::Never,
            &[Invariant::DotReused],
        ),
        // The released event is dropped as a duplicate where the cover claimed it:
        // the nodes part.
        (
            ModelFault::CoverClaimsHeld,
            Durability::Always,
            &[Invariant::Divergence],
        ),
        // A late view brings back, where the key was collected, a member that the
        // node still holding the key's entries reads as removed: the nodes part (or,
        // for a siblings key, the collecting node takes an older write back).
        (
            ModelFault::CrdtCollectsUnstable,
            Durability::Always,
            &[Invariant::Divergence, Invariant::Resurrection],
        ),
        // A removal pruned before every node held what it lost to or took lets a
        // write back that the patches say is gone (or, where relay trees changed the
        // order events arrive in, leaves the nodes with the same events in different
        // states).
        (
            ModelFault::CrdtPrunesUnstable,
            Durability::Always,
            &[Invariant::JsonFields, Invariant::Divergence],
        ),
    ];
    for (fault, durability, invariants) in cases {
        let mut config = Config::new(NODES, 10_000, durability);
        config.model_fault = Some(fault);
        expect_caught(&format!("{fault:?}"), &config, budget, invariants);
    }
}

fn expect_caught(what: &str, config: &Config, budget: u64, invariants: &[Invariant]) {
    match (0..budget).find_map(|seed| run(seed, config).err()) {
        Some(failure) => {
            eprintln!("{what} caught: {failure}");
            assert!(
                invariants.contains(&failure.invariant),
                "{what} was caught by another invariant than the one it breaks: {failure}"
            );
        }
        None => panic!("{what} went unnoticed in {budget} seeds"),
    }
}

/// Replays `ASP_SIM_SEED` (seed 7 when unset, so that the test always runs a world).
#[test]
fn replay_one_seed() {
    let seed: u64 = std::env::var("ASP_SIM_SEED")
        .map_or(7, |seed| seed.parse().expect("ASP_SIM_SEED is a number"));
    let durability = if std::env::var("ASP_SIM_NEVER").is_ok() {
        Durability::Never
    } else {
        Durability::Always
    };
    let mut config = Config::new(NODES, env("ASP_SIM_STEPS", 10_000), durability);
    config.log = std::env::var("ASP_SIM_LOG").is_ok();
    config.relay_tree = relay_tree();
    config.mutation = match std::env::var("ASP_SIM_MUTATION").as_deref() {
        Ok("LwwTieGoesToArrival") => Some(Mutation::LwwTieGoesToArrival),
        Ok("CounterJoinAdds") => Some(Mutation::CounterJoinAdds),
        Ok("SetJoinDropsConcurrentAdds") => Some(Mutation::SetJoinDropsConcurrentAdds),
        Ok("AckOnReceipt") => Some(Mutation::AckOnReceipt),
        Ok("DropLastOfBatch") => Some(Mutation::DropLastOfBatch),
        Ok("UncheckedStreamOrder") => Some(Mutation::UncheckedStreamOrder),
        Ok("LwwFirstWriterWins") => Some(Mutation::LwwFirstWriterWins),
        Ok("RangeSetMergesGap") => Some(Mutation::RangeSetMergesGap),
        Ok("ReconcileDropsLocalSide") => Some(Mutation::ReconcileDropsLocalSide),
        Ok("GcReportNotContained") => Some(Mutation::GcReportNotContained),
        Ok("GcSkipsUnreportedNodes") => Some(Mutation::GcSkipsUnreportedNodes),
        Ok("GcAwayLeavesNoEpitaph") => Some(Mutation::GcAwayLeavesNoEpitaph),
        Ok("SiblingsJoinKeepsReplaced") => Some(Mutation::SiblingsJoinKeepsReplaced),
        Ok("JsonMapJoinKeepsFirst") => Some(Mutation::JsonMapJoinKeepsFirst),
        Ok("ConditionIgnoresVersion") => Some(Mutation::ConditionIgnoresVersion),
        Ok(other) => panic!("unknown ASP_SIM_MUTATION {other:?}"),
        Err(_) => None,
    };
    config.model_fault = match std::env::var("ASP_SIM_MODEL_FAULT").as_deref() {
        Ok("AckBeforeFsync") => Some(ModelFault::AckBeforeFsync),
        Ok("ForgetDedupe") => Some(ModelFault::ForgetDedupe),
        Ok("VisibleBeforeDurable") => Some(ModelFault::VisibleBeforeDurable),
        Ok("ReuseCounters") => Some(ModelFault::ReuseCounters),
        Ok("CoverClaimsHeld") => Some(ModelFault::CoverClaimsHeld),
        Ok("CrdtCollectsUnstable") => Some(ModelFault::CrdtCollectsUnstable),
        Ok("CrdtPrunesUnstable") => Some(ModelFault::CrdtPrunesUnstable),
        Ok(other) => panic!("unknown ASP_SIM_MODEL_FAULT {other:?}"),
        Err(_) => None,
    };
    let outcome = match run(seed, &config) {
        Ok(outcome) => outcome,
        Err(failure) => panic!("{failure}"),
    };
    eprintln!("seed {seed}: {outcome:?}");
    assert!(
        outcome.acked_writes > 0,
        "seed {seed} ran a world without a write"
    );
}
