//! What a shard's state machine shares with its readers: how far it has applied, the index lock
//! that keeps applies and index repairs apart, the claims cache, and the snapshot-install
//! sequence a reader checks its read against; and the retraction record both sides read.

use std::sync::atomic::AtomicU64;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetractionRecord {
    pub at_us: u64,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Progress shared between the state machine task and the readers of a shard.
#[derive(Debug, Default)]
pub struct AppliedProgress {
    pub applied_index: AtomicU64,
    /// Wall-clock time (µs) of the last apply, for staleness reports.
    pub applied_at_us: AtomicU64,
    /// Held by `apply` and by each chunk of an online index repair, so they never interleave.
    pub index_lock: parking_lot::Mutex<()>,
    /// Claims read by queries, dropped per path by the applies that touch it.
    pub claims_cache: super::claims_cache::ClaimsCache,
    /// Snapshot installs begun and finished (odd while one runs: the shard's ranges are partly
    /// old, partly new). A reader that sees it odd, or changed across its read, discards the
    /// read (`ShardReader::execute`).
    pub installs: AtomicU64,
    /// Claims of this replica waiting in quarantine for a release or reject (the quarantine
    /// index's entries), kept by the applier after each write.
    pub quarantine_pending: AtomicU64,
}
