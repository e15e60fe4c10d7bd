//! Metrics of applying shard commands (the counters `shard::apply` raises).

use std::sync::LazyLock;

use prometheus::IntCounter;

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

pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    vec![Box::new(ASSERTIONS_INDEXED.clone()), Box::new(QUARANTINED.clone()), Box::new(DEDUPLICATED_PROPOSALS.clone())]
}
