//! Metrics of applying shard commands (the counters `shard::apply` raises) and of the claims
//! cache (`shard::claims_cache`).

use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, Opts};

pub static ASSERTIONS_INDEXED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new("assertions_indexed_total", "Assertions applied and indexed by this node's state machines")
        .expect("valid metric")
});

pub static QUARANTINED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_quarantined_assertions_total",
        "Assertions this node's state machines applied as quarantined (DESIGN §2 triggers)",
    )
    .expect("valid metric")
});

pub static DEDUPLICATED_PROPOSALS: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_raft_deduplicated_proposals_total",
        "Copies of forwarded proposals this node's state machines applied as no-ops (their token was applied already)",
    )
    .expect("valid metric")
});

/// Claims reads by where the cache found them: `hit` (the claims), `rendered` (an answer kept
/// for the query's lens and policy version) or `miss` (read from storage). Every result is
/// exported from the start, at 0.
pub static CLAIMS_CACHE_LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let lookups = IntCounterVec::new(
        Opts::new(
            "stemedb_claims_cache_lookups_total",
            "Claims reads of this node's replicas by result: hit (cached claims), rendered (a kept answer), miss (read from storage)",
        ),
        &["result"],
    )
    .expect("valid metric");
    for result in ["hit", "rendered", "miss"] {
        lookups.with_label_values(&[result]);
    }
    lookups
});

/// Cached claims reads that applies brought up to date in place with a new claim (instead of
/// dropping them): one per read, so a claim added to the read of all of its concept's
/// predicates and to that of its own counts twice.
pub static CLAIMS_CACHE_READS_UPDATED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_claims_cache_reads_updated_total",
        "Cached claims reads this node's applies updated in place with new claims (one per read and apply)",
    )
    .expect("valid metric")
});

pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    vec![
        Box::new(ASSERTIONS_INDEXED.clone()),
        Box::new(QUARANTINED.clone()),
        Box::new(DEDUPLICATED_PROPOSALS.clone()),
        Box::new(CLAIMS_CACHE_LOOKUPS.clone()),
        Box::new(CLAIMS_CACHE_READS_UPDATED.clone()),
    ]
}
