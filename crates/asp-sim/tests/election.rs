//! Leader namespaces in simulation: elections, failover and fencing under partitions,
//! crashes and clock drift. `ASP_SIM_ELECTION_SEEDS=N` runs more seeds,
//! `ASP_SIM_ELECTION_SEED=S` one.

use asp_sim::election::{ElectionConfig, ElectionOutcome, run_election};

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn elections_keep_one_leader_per_epoch_and_lose_nothing() {
    let seeds: Vec<u64> = match env("ASP_SIM_ELECTION_SEED") {
        Some(s) => vec![s],
        None => (0..env("ASP_SIM_ELECTION_SEEDS").unwrap_or(120)).collect(),
    };
    let mut total = ElectionOutcome::default();
    for seed in seeds.iter().copied() {
        let nodes = 3 + (seed % 3) as usize;
        match run_election(seed, &ElectionConfig::new(nodes, 4_000)) {
            Ok(o) => {
                total.epochs += o.epochs;
                total.automatic += o.automatic;
                total.by_hand += o.by_hand;
                total.refused_asks += o.refused_asks;
                total.writes += o.writes;
                total.divergent += o.divergent;
                total.majority_acked += o.majority_acked;
                total.tokens += o.tokens;
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("{} worlds: {total:?}", seeds.len());
    // The worlds exercise what they claim to: elections of both kinds, refusals,
    // divergent tails, writes held by a majority.
    if seeds.len() >= 50 {
        assert!(total.epochs > seeds.len() as u64, "{total:?}");
        assert!(total.automatic > 0 && total.by_hand > 0, "{total:?}");
        assert!(total.refused_asks > 0, "{total:?}");
        assert!(total.divergent > 0, "{total:?}");
        assert!(total.majority_acked > 0, "{total:?}");
        assert!(total.tokens > 0, "{total:?}");
    }
}
