//! Raft metrics: proposals, applies, read barriers and read-index confirmations, snapshots, elections, peer RPCs and forwarding.
//! The counters of applying itself are in `shard::metrics`.

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};

pub static APPLY_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new("stemedb_raft_apply_duration_seconds", "Duration of one state machine apply call")
            .buckets(vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1]),
    )
    .expect("valid metric")
});

/// From taking the shard's view to the snapshot file in place, for the snapshots put in place.
/// Applies go on meanwhile.
pub static SNAPSHOT_BUILD_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "stemedb_raft_snapshot_build_duration_seconds",
            "Duration of writing one shard snapshot, from a point-in-time view, beside the applies",
        )
        .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
    )
    .expect("valid metric")
});

pub static PROPOSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("stemedb_raft_proposals_total", "Entries proposed to shard groups, by outcome"),
        &["outcome"],
    )
    .expect("valid metric")
});

pub static PROPOSE_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "stemedb_raft_propose_duration_seconds",
            "Time from proposing an entry to its applied result",
        )
        .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0]),
    )
    .expect("valid metric")
});

/// Linearizable reads by how they confirmed leadership: `sole_voter` (the node leads the group
/// alone, no round needed), `lease` (the node leads it and holds its read lease, `raft::lease`)
/// or `quorum` (a read index from the leader, which confirms it by its lease or a heartbeat
/// round, see `READ_INDEX_CONFIRMATIONS`).
pub static READ_BARRIERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("stemedb_read_barriers_total", "Linearizable read barriers, by how leadership was confirmed"),
        &["path"],
    )
    .expect("valid metric")
});

/// The two `READ_BARRIERS` series, resolved once: a read must not look up labels.
pub static SOLE_VOTER_READS: LazyLock<IntCounter> = LazyLock::new(|| READ_BARRIERS.with_label_values(&["sole_voter"]));
pub static QUORUM_READS: LazyLock<IntCounter> = LazyLock::new(|| READ_BARRIERS.with_label_values(&["quorum"]));
pub static LEASE_READS: LazyLock<IntCounter> = LazyLock::new(|| READ_BARRIERS.with_label_values(&["lease"]));

/// Read indexes this node answered as a group's leader, for its own readers' barriers and for
/// other nodes' `ReadIndex` requests, by what confirmed its leadership: `lease` (its read lease
/// held, no round) or `heartbeats` (a heartbeat round to a quorum).
pub static READ_INDEX_CONFIRMATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_read_index_confirmations_total",
            "Read indexes answered as leader, by what confirmed the leadership (lease or heartbeats)",
        ),
        &["by"],
    )
    .expect("valid metric")
});
pub static READ_INDEX_CONFIRMATIONS_LEASE: LazyLock<IntCounter> =
    LazyLock::new(|| READ_INDEX_CONFIRMATIONS.with_label_values(&["lease"]));
pub static READ_INDEX_CONFIRMATIONS_HEARTBEATS: LazyLock<IntCounter> =
    LazyLock::new(|| READ_INDEX_CONFIRMATIONS.with_label_values(&["heartbeats"]));

pub static WRONG_CLUSTER: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_transport_wrong_cluster_total",
        "Messages on the transport (18182) refused because they came from a node of another cluster",
    )
    .expect("valid metric")
});

pub static FRAME_DIALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_transport_frame_dials_total",
            "Frame connections this node dialled to peers (raft::frames), by result: ok, failed (unreachable), refused (another cluster), unsupported (a peer without frames, sent gRPC instead)",
        ),
        &["result"],
    )
    .expect("valid metric")
});

pub static FRAME_CONNECTIONS: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    prometheus::IntGauge::new(
        "stemedb_transport_frame_connections",
        "Frame connections from peers this node is serving on the transport (18182)",
    )
    .expect("valid metric")
});

pub static TLS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_transport_tls_refused_total",
        "Connections to the transport (18182) refused at the TLS handshake: no certificate, one of another CA, expired, or no TLS at all (cluster.tls_*)",
    )
    .expect("valid metric")
});

pub static LEADER_CHANGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("stemedb_raft_leader_changes_total", "Times this node saw a shard's leader change, by shard"),
        &["shard"],
    )
    .expect("valid metric")
});

/// Snapshots of shard state machines: `built`, `installed`, `build_failed`, `install_failed`,
/// and `held` (a send refused because this replica is unchecked since start or being repaired).
pub static SNAPSHOTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("stemedb_raft_snapshots_total", "Shard snapshots this node built or installed, by event"),
        &["event"],
    )
    .expect("valid metric")
});

pub static FORWARD_RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_forward_retries_total",
            "Forwarded proposals sent again with the same idempotency token, by cause \
             (leader_changed, not_leader, ambiguous)",
        ),
        &["cause"],
    )
    .expect("valid metric")
});

pub static PROMPT_CAMPAIGNS: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_raft_prompt_campaigns_total",
        "Elections this node started because its group's leader went silent past every lease and no \
         reachable voter had a longer log (raft::takeover)",
    )
    .expect("valid metric")
});

pub static APPEND_BATCH_MESSAGES: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "stemedb_raft_append_batch_messages",
            "AppendEntries messages (of all groups) sent to a peer in one call",
        )
        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
    )
    .expect("valid metric")
});

pub static ENTRY_PARTS: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "stemedb_raft_entry_parts",
            "Proposals in one entry a shard leader's write batcher proposed with batches other nodes forwarded (its own batch counts as one)",
        )
        .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]),
    )
    .expect("valid metric")
});

pub static DAMAGED_REPLICAS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_damaged_replicas_total",
            "Replicas of this node dropped at start to be re-seeded from their peers because a table file holding their keys was damaged, by shard and file",
        ),
        &["shard", "file"],
    )
    .expect("valid metric")
});

pub static RETIRED_REPLICAS: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_retired_replicas_total",
        "Replicas this node deleted (log, state, records) because a move took them to other nodes",
    )
    .expect("valid metric")
});

/// Every Raft collector, for registration. The known label values start at 0, so dashboards
/// show 0 rather than no data and `increase()` sees the first event after a start.
pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    for outcome in ["ok", "not_leader", "no_quorum", "timeout", "fatal", "outcome_unknown"] {
        PROPOSALS.with_label_values(&[outcome]);
    }
    for cause in ["leader_changed", "not_leader", "ambiguous"] {
        FORWARD_RETRIES.with_label_values(&[cause]);
    }
    for barrier in ["quorum", "sole_voter", "lease"] {
        READ_BARRIERS.with_label_values(&[barrier]);
    }
    for by in ["lease", "heartbeats"] {
        READ_INDEX_CONFIRMATIONS.with_label_values(&[by]);
    }
    for outcome in ["accepted", "refused", "failed"] {
        EARLY_APPENDS.with_label_values(&[outcome]);
    }
    for event in ["built", "build_failed", "superseded", "log_size", "installed", "install_failed", "held"] {
        SNAPSHOTS.with_label_values(&[event]);
    }
    for kind in FORWARD_KINDS {
        for outcome in ["ok", "error", "timeout", "unreachable"] {
            FORWARDED.with_label_values(&[kind, outcome]);
        }
    }
    vec![
        Box::new(DAMAGED_REPLICAS.clone()),
        Box::new(RETIRED_REPLICAS.clone()),
        Box::new(FORWARD_RETRIES.clone()),
        Box::new(PROMPT_CAMPAIGNS.clone()),
        Box::new(SNAPSHOTS.clone()),
        Box::new(APPLY_DURATION.clone()),
        Box::new(SNAPSHOT_BUILD_DURATION.clone()),
        Box::new(APPEND_BATCH_MESSAGES.clone()),
        Box::new(ENTRY_PARTS.clone()),
        Box::new(PROPOSALS.clone()),
        Box::new(READ_BARRIERS.clone()),
        Box::new(READ_INDEX_CONFIRMATIONS.clone()),
        Box::new(EARLY_APPENDS.clone()),
        Box::new(PROPOSE_DURATION.clone()),
        Box::new(PEER_RPC_DURATION.clone()),
        Box::new(PEER_RPC_ERRORS.clone()),
        Box::new(FORWARDED.clone()),
        Box::new(LEADER_CHANGES.clone()),
        Box::new(WRONG_CLUSTER.clone()),
        Box::new(TLS_REFUSED.clone()),
        Box::new(FRAME_DIALS.clone()),
        Box::new(FRAME_CONNECTIONS.clone()),
    ]
}

/// AppendEntries a shard leader sent its followers early (`raft::early`: as it appended the
/// entries, before its own fsync), by the follower's answer: `accepted`, `refused` (a newer vote
/// or a log that did not match; openraft's own message follows), `failed` (no answer in time).
pub static EARLY_APPENDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_raft_early_appends_total",
            "AppendEntries a shard leader sent its caught-up followers as it appended, by outcome",
        ),
        &["outcome"],
    )
    .expect("valid metric")
});

pub static PEER_RPC_DURATION: LazyLock<prometheus::HistogramVec> = LazyLock::new(|| {
    prometheus::HistogramVec::new(
        HistogramOpts::new("stemedb_peer_rpc_duration_seconds", "Latency of Raft RPCs to peer nodes, by RPC")
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0]),
        &["rpc"],
    )
    .expect("valid metric")
});

pub static PEER_RPC_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("stemedb_peer_rpc_errors_total", "Failed RPCs to peer nodes, by RPC and peer"),
        &["rpc", "peer"],
    )
    .expect("valid metric")
});

/// The `kind` label values of [`FORWARDED`].
pub const FORWARD_KINDS: [&str; 5] = ["write", "read", "read_index", "admin", "campaign"];

pub static FORWARDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_forwarded_requests_total",
            "Requests this node forwarded to a shard leader, by kind and outcome",
        ),
        &["kind", "outcome"],
    )
    .expect("valid metric")
});

#[cfg(test)]
mod tests {
    /// Labelled counters exist at 0 from the start: dashboards and `increase()` need the series
    /// before the first event.
    #[test]
    fn known_label_values_start_at_zero() {
        let registry = prometheus::Registry::new();
        for collector in super::collectors() {
            registry.register(collector).expect("register");
        }
        let mut text = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut text).expect("encode");
        let text = String::from_utf8(text).expect("utf-8");
        for series in [
            r#"stemedb_raft_proposals_total{outcome="no_quorum"}"#,
            r#"stemedb_raft_proposals_total{outcome="outcome_unknown"}"#,
            r#"stemedb_forward_retries_total{cause="ambiguous"}"#,
            r#"stemedb_raft_snapshots_total{event="install_failed"}"#,
            r#"stemedb_forwarded_requests_total{kind="read_index",outcome="unreachable"}"#,
        ] {
            assert!(text.contains(series), "missing {series}");
        }
    }
}
