//! Metrics of anti-entropy: checks, scrubs and repairs (`cluster::anti_entropy`).

use std::sync::LazyLock;

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

pub static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_antientropy_checks_total",
            "Anti-entropy checks this node ran as shard leader, by result (agree, mismatch, incomplete, failed)",
        ),
        &["result"],
    )
    .expect("valid metric")
});

pub static MISMATCHED_BUCKETS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new(
            "stemedb_antientropy_mismatched_buckets",
            "Digest buckets of this node's replica that differ from a healthy copy, found by the last check or scrub (0 once repaired)",
        ),
        &["shard"],
    )
    .expect("valid metric")
});

pub static REPAIRED_KEYS: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_antientropy_repaired_keys_total",
        "Records this node's replicas rewrote or deleted to match a healthy replica",
    )
    .expect("valid metric")
});

pub static REPAIRS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_antientropy_repairs_total",
            "Repairs of this node's replicas, by kind (buckets, reseed) and result (ok, failed)",
        ),
        &["kind", "result"],
    )
    .expect("valid metric")
});

pub static LAST_CHECK: LazyLock<Gauge> = LazyLock::new(|| {
    Gauge::new(
        "stemedb_antientropy_last_check_timestamp_seconds",
        "Unix time of the last anti-entropy check this node finished as a shard leader",
    )
    .expect("valid metric")
});

pub static CHECK_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "stemedb_antientropy_check_duration_seconds",
            "Time from proposing a check entry to every replica's root compared",
        )
        .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
    )
    .expect("valid metric")
});

pub static SCRUBS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_antientropy_scrubs_total",
            "Scrubs of this node's replicas, by result (clean, mismatch, unreadable, failed)",
        ),
        &["result"],
    )
    .expect("valid metric")
});

pub static SCRUB_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new("stemedb_antientropy_scrub_read_bytes_total", "Bytes the scrub read from this node's storage")
        .expect("valid metric")
});

pub static DIGEST_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    IntGauge::new(
        "stemedb_antientropy_digest_memory_bytes",
        "Memory the digests of this node's replicas take (kept buckets and last check records)",
    )
    .expect("valid metric")
});

/// Every label value the node can report, at zero, so dashboards and alerts see the series
/// before the first check, scrub or repair.
pub fn initialize(shards: impl Iterator<Item = String>) {
    for result in ["agree", "mismatch", "incomplete", "failed"] {
        CHECKS.with_label_values(&[result]);
    }
    for result in ["clean", "mismatch", "unreadable", "failed"] {
        SCRUBS.with_label_values(&[result]);
    }
    for kind in ["buckets", "reseed"] {
        for result in ["ok", "failed"] {
            REPAIRS.with_label_values(&[kind, result]);
        }
    }
    for shard in shards {
        MISMATCHED_BUCKETS.with_label_values(&[&shard]).set(0);
    }
}

pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    vec![
        Box::new(CHECKS.clone()),
        Box::new(MISMATCHED_BUCKETS.clone()),
        Box::new(REPAIRED_KEYS.clone()),
        Box::new(REPAIRS.clone()),
        Box::new(LAST_CHECK.clone()),
        Box::new(CHECK_DURATION.clone()),
        Box::new(SCRUBS.clone()),
        Box::new(SCRUB_BYTES.clone()),
        Box::new(DIGEST_BYTES.clone()),
    ]
}
