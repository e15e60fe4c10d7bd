//! Authority resolution in process, without HTTP: 10,000 grants in chains of depth 8 under one
//! prefix (the setup of `stemedb bench --authority-grants 10000`), then
//! - cold: one chain search per (agent, path), cache cleared each time;
//! - cached: the node's cached lookup, as the authority lens does it after the first query;
//! - lens: the authority lens over 5 claims (4 chain-end agents, 1 without authority) with a
//!   cold cache for the path.
//! Prints throughput and p50/p99/p999 (hdrhistogram). Run: cargo bench -p stemedb --bench authority

use std::time::Instant;

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use stemedb::meta::policy::{Policy, PolicyCommand};
use stemedb::meta::quarantine::QuarantineRules;

const GRANTS: usize = 10_000;
const DEPTH: usize = 8;
const SAMPLES: usize = 200_000;

fn agent(chain: usize, depth: usize) -> String {
    if depth == 0 {
        "bench-root".into()
    } else {
        format!("auth-c{chain}-d{depth}")
    }
}

fn report(name: &str, histogram: &Histogram<u64>, seconds: f64) {
    println!(
        "{name:<8} {:>10.0} ops/s   p50 {:>7.2} µs   p99 {:>7.2} µs   p999 {:>7.2} µs   max {:>8.2} µs",
        histogram.len() as f64 / seconds,
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.value_at_quantile(0.999) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0,
    );
}

fn main() {
    let policy = Policy::new(DEPTH, QuarantineRules::default());
    let chains = GRANTS / DEPTH;
    policy.update(|store| {
        let mut at = 1;
        store.apply(PolicyCommand::SetRoot { agent_id: "bench-root".into(), level: Some(100) }, at).expect("root");
        for chain in 0..chains {
            for depth in 1..=DEPTH {
                at += 1;
                let command = PolicyCommand::Grant {
                    grantor: agent(chain, depth - 1),
                    grantee: agent(chain, depth),
                    concept_prefix: "auth".into(),
                    level: (100 - (chain % 40) - depth) as u8,
                    max_chain_depth: DEPTH,
                };
                store.apply(command, at).expect("grant");
            }
        }
    });
    println!("{GRANTS} grants in {chains} chains of depth {DEPTH}; {SAMPLES} samples each");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut histogram = |run: &mut dyn FnMut(&mut rand::rngs::StdRng)| {
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("histogram");
        let started = Instant::now();
        for _ in 0..SAMPLES {
            let t = Instant::now();
            run(&mut rng);
            let _ = h.record((t.elapsed().as_nanos() as u64).max(1));
        }
        (h, started.elapsed().as_secs_f64())
    };
    let (cold, s) = histogram(&mut |rng| {
        let chain = rng.random_range(0..chains);
        let path = format!("auth/k{}", rng.random_range(0..2000));
        let found = policy.read(|s| s.authorities.authority(&agent(chain, DEPTH), &path, u64::MAX, DEPTH));
        assert!(found.is_some_and(|f| f.chain.len() == DEPTH));
    });
    report("cold", &cold, s);
    let (cached, s) = histogram(&mut |rng| {
        // 100 agents × 200 paths: the working set fits the node's cache.
        let chain = rng.random_range(0..100);
        let path = format!("auth/k{}", rng.random_range(0..200));
        std::hint::black_box(policy.authority(&agent(chain, DEPTH), &path, u64::MAX));
    });
    report("cached", &cached, s);
    let (lens, s) = histogram(&mut |rng| {
        // A path no earlier sample used: every lookup of this lens evaluation is a cold search.
        let path = format!("auth/fresh/{}", rng.random::<u64>());
        let mut agents: Vec<String> = (0..4).map(|_| agent(rng.random_range(0..chains), DEPTH)).collect();
        agents.push("bench-nobody".into());
        let best = agents.iter().max_by_key(|a| policy.authority(a, &path, u64::MAX).map(|x| x.level));
        std::hint::black_box(best);
    });
    report("lens", &lens, s);
}
