//! What a shard's state machine shares with its readers: how far it has applied, the index lock
//! that keeps applies and index repairs apart, the claims cache, and the snapshot-install
//! sequence a reader checks its read against, the anti-entropy digests and the gate a repair
//! stops applies with; and the retraction record both sides read.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::digest::{Buckets, NodeHash};

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
    pub index_lock: IndexLock,
    /// Claims read by queries, dropped per path by the applies that touch it.
    pub claims_cache: super::claims_cache::ClaimsCache,
    /// Snapshot installs begun and finished (odd while one runs: the shard's ranges are partly
    /// old, partly new). A reader that sees it odd, or changed across its read, discards the
    /// read (`ShardReader::execute`).
    pub installs: AtomicU64,
    /// Claims of this replica waiting in quarantine for a release or reject (the quarantine
    /// index's entries), kept by the applier after each write.
    pub quarantine_pending: AtomicU64,
    /// The replica's anti-entropy digests as applied, and its last check.
    pub digest: parking_lot::Mutex<DigestState>,
    /// Lets an anti-entropy repair stop applies at a chosen index.
    pub gate: ApplyGate,
    /// Set by an anti-entropy repair of the meta group: the applier reloads the metadata and
    /// policy from storage before its next batch.
    pub reload_meta: std::sync::atomic::AtomicBool,
    /// Set under `index_lock` once the replica is being deleted (`ShardSet::retire_replica`):
    /// an apply its state machine handed to the apply pool before Raft stopped, still queued
    /// there, then writes nothing (the applier checks it under the same lock).
    pub retired: std::sync::atomic::AtomicBool,
}

/// The lock that a shard's applier holds while it applies, and that everything else holds
/// while it reads a consistent state of the replica or writes its records or indexes (index
/// repair, anti-entropy scrub and repair, snapshot install, retirement). It counts the times
/// anything but the applier took it with [`IndexLock::lock`], so the applier knows when what it
/// remembers of the index family may be stale (the concept counts, `shard::apply`), without
/// each writer having to say so. Holders that only read take [`IndexLock::lock_to_read`].
#[derive(Debug, Default)]
pub struct IndexLock {
    /// How many times a holder other than the applier has taken the lock.
    others: parking_lot::Mutex<u64>,
}

impl IndexLock {
    /// Takes the lock for anything but the shard's applier.
    pub fn lock(&self) -> parking_lot::MutexGuard<'_, u64> {
        let mut guard = self.others.lock();
        *guard = guard.wrapping_add(1);
        guard
    }

    /// Takes the lock for a holder that writes nothing to the replica while it holds it (an
    /// anti-entropy scrub or bucket read, which take a consistent view of the records): not
    /// counted, so the applier keeps what it remembers.
    pub fn lock_to_read(&self) -> parking_lot::MutexGuard<'_, u64> {
        self.others.lock()
    }

    /// Takes the lock for the shard's applier; the guard holds how many times others have
    /// taken it so far.
    pub fn lock_for_apply(&self) -> parking_lot::MutexGuard<'_, u64> {
        self.others.lock()
    }
}

/// A replica's digests (`shard::digest`), kept by the applier in step with its writes.
#[derive(Debug, Default)]
pub struct DigestState {
    /// The bucket digests as of the applied index (empty until the state machine opens).
    pub buckets: Option<Buckets>,
    /// What the replica recorded when it applied its last check entry.
    pub last_check: Option<Arc<CheckRecord>>,
}

/// A replica's state at a check entry: the same on every healthy replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRecord {
    pub index: u64,
    pub term: u64,
    /// When the leader proposed the check (its clock, µs).
    pub proposed_at_us: u64,
    pub root: NodeHash,
    pub buckets: Buckets,
}

/// Stops a replica's applies right after a chosen index until released, so an anti-entropy
/// repair can replace buckets at exactly the index its healthy copy was read at
/// (`cluster::anti_entropy`). The state machine checks it between entries; nothing else waits
/// on it.
#[derive(Debug, Default)]
pub struct ApplyGate {
    target: parking_lot::Mutex<Option<u64>>,
    released: parking_lot::Condvar,
}

impl ApplyGate {
    /// Applies stop once everything up to `index` is applied.
    pub fn pause_at(&self, index: u64) {
        *self.target.lock() = Some(index);
    }

    /// Lets applies go on.
    pub fn release(&self) {
        *self.target.lock() = None;
        self.released.notify_all();
    }

    /// Whether applies are to stop with everything up to `applied` applied (then
    /// [`ApplyGate::wait_if_paused_at`] waits).
    pub fn paused_at(&self, applied: u64) -> bool {
        *self.target.lock() == Some(applied)
    }

    pub fn target(&self) -> Option<u64> {
        *self.target.lock()
    }

    /// Called by the state machine with everything up to `applied` applied: if applies are to
    /// stop there, waits until released (or `longest` passes: then releases it itself, so a
    /// repair that died never stops the replica for good). Returns whether it waited.
    pub fn wait_if_paused_at(&self, applied: u64, longest: std::time::Duration) -> bool {
        let mut target = self.target.lock();
        if *target != Some(applied) {
            return false;
        }
        let deadline = std::time::Instant::now() + longest;
        while *target == Some(applied) {
            if self.released.wait_until(&mut target, deadline).timed_out() {
                if *target == Some(applied) {
                    tracing::warn!(applied, "an anti-entropy pause outlived its limit; applies go on");
                    *target = None;
                }
                break;
            }
        }
        true
    }
}
