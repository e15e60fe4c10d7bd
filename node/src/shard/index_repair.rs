//! Index verification and repair of one shard: recomputes every secondary index entry the
//! state machine derives from its assertion records (claims by concept_path + predicate,
//! concept counts, by agent, undecided quarantine) and fixes the index family to match —
//! missing entries added, stale ones removed, counts corrected. The records are the truth; the
//! indexes are derived, so a repair never loses data.
//!
//! Online, the repair works in chunks, each under the shard's index lock, which the state
//! machine holds while it applies entries: an apply and a chunk never interleave, so writes
//! wait at most one chunk (about a thousand records), and reads keep being served (a read may
//! see the index as it is being fixed, never a record without its entries). Offline
//! (`stemedb rebuild`), nothing else runs and no lock is needed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use super::progress::AppliedProgress;
use serde::Serialize;

use super::command::GroupId;
use super::keys;
use crate::model::assertion::StoredAssertion;
use crate::model::id::AssertionId;
use crate::storage::{ColumnFamily, Durability, Storage, StorageError, WriteBatch};

/// Records (or index entries) handled per locked chunk.
const CHUNK: usize = 1000;

/// What a repair found and fixed in one shard (or, summed, in several).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RepairReport {
    pub assertions: u64,
    pub claim_entries: u64,
    pub concept_entries: u64,
    pub agent_entries: u64,
    pub quarantine_entries: u64,
    pub missing_added: u64,
    pub stale_removed: u64,
    pub counts_fixed: u64,
    /// Offline only: committed log entries applied before verifying.
    pub entries_replayed: u64,
}

impl RepairReport {
    pub fn add(&mut self, other: &RepairReport) {
        self.assertions += other.assertions;
        self.claim_entries += other.claim_entries;
        self.concept_entries += other.concept_entries;
        self.agent_entries += other.agent_entries;
        self.quarantine_entries += other.quarantine_entries;
        self.missing_added += other.missing_added;
        self.stale_removed += other.stale_removed;
        self.counts_fixed += other.counts_fixed;
        self.entries_replayed += other.entries_replayed;
    }
}

fn corrupt(message: &str) -> StorageError {
    StorageError::corrupt(ColumnFamily::StateMachine, message)
}

fn decode(bytes: &[u8]) -> Result<StoredAssertion, StorageError> {
    super::codec::decode_assertion(bytes).map_err(|e| corrupt(&format!("assertion record: {e}")))
}

/// Whether a quarantined claim still awaits a decision (not released, not retracted).
fn undecided(storage: &Storage, group: GroupId, record: &StoredAssertion) -> Result<bool, StorageError> {
    Ok(record.quarantined
        && storage.get(ColumnFamily::StateMachine, &keys::release_key(group, record.id))?.is_none()
        && storage.get(ColumnFamily::StateMachine, &keys::retraction_key(group, record.id))?.is_none())
}

fn count_in_prefix(storage: &Storage, prefix: &[u8]) -> Result<u64, StorageError> {
    let mut count = 0;
    storage.for_each_in_range(ColumnFamily::Index, prefix, &keys::prefix_end(prefix), |_, _| {
        count += 1;
        true
    })?;
    Ok(count)
}

/// Verifies and repairs the indexes of `group`. `replica`: the live replica's progress, whose
/// index lock each chunk holds (online); a replica retired meanwhile (deleted, perhaps created
/// again under a new lock) stops the repair before its next chunk with
/// [`StorageError::Closed`]. `scanned` counts records as they are checked (progress).
pub fn repair_group(
    storage: &Storage,
    group: GroupId,
    replica: Option<&AppliedProgress>,
    scanned: &AtomicU64,
) -> Result<RepairReport, StorageError> {
    let mut report = RepairReport::default();
    let hold = || {
        let Some(progress) = replica else { return Ok(None) };
        let guard = progress.index_lock.lock();
        if progress.retired.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(Some(guard))
    };
    // Phase 1: every record has its entries.
    let records = keys::assertions_prefix(group);
    let records_end = keys::prefix_end(&records);
    let mut from = records.clone();
    let mut concepts_without_count: BTreeSet<(String, String)> = BTreeSet::new();
    loop {
        let _guard = hold()?;
        let rows = storage.scan(ColumnFamily::StateMachine, &from, &records_end, CHUNK)?;
        let Some((last, _)) = rows.last() else { break };
        from = last.clone();
        from.push(0);
        let mut batch = WriteBatch::new();
        for (_, value) in &rows {
            let record = decode(value)?;
            let draft = &record.draft;
            let mut expected = vec![
                keys::claim_key(group, &draft.concept_path, &draft.predicate, record.id),
                keys::agent_key(group, &draft.agent_id, record.id),
            ];
            if undecided(storage, group, &record)? {
                expected.push(keys::quarantine_key(group, record.id));
            }
            // One read for the entries and the concept count: the count is fixed in phase 3.
            let entries = expected.len();
            expected.push(keys::concept_key(group, &draft.concept_path, &draft.predicate));
            let found = storage.multi_get(ColumnFamily::Index, &expected)?;
            for (key, found) in expected.iter().zip(&found).take(entries) {
                if found.is_none() {
                    batch.put(ColumnFamily::Index, key.clone(), Vec::new());
                    report.missing_added += 1;
                }
            }
            if found.get(entries).is_none_or(Option::is_none) {
                concepts_without_count.insert((draft.concept_path.clone(), draft.predicate.clone()));
            }
            report.assertions += 1;
        }
        storage.write(batch, Durability::Buffered)?;
        scanned.fetch_add(rows.len() as u64, Ordering::Relaxed);
    }
    // Phase 2: every entry belongs to a record, every count is right.
    let index_start = keys::group_prefix(group);
    let index_end = keys::group_end(group);
    let mut from = index_start;
    loop {
        let _guard = hold()?;
        let rows = storage.scan(ColumnFamily::Index, &from, &index_end, CHUNK)?;
        let Some((last, _)) = rows.last() else { break };
        from = last.clone();
        from.push(0);
        let mut batch = WriteBatch::new();
        for (key, value) in &rows {
            let tag = key.get(4).copied().unwrap_or(0);
            let body = &key[5.min(key.len())..];
            let keep = match tag {
                b'P' => {
                    report.claim_entries += 1;
                    let parsed = parse_claim(body);
                    match parsed {
                        Some((path, predicate, id)) => record_of(storage, group, id)?
                            .is_some_and(|r| r.draft.concept_path == path && r.draft.predicate == predicate),
                        None => false,
                    }
                }
                b'a' => {
                    report.agent_entries += 1;
                    match parse_agent(body) {
                        Some((agent, id)) => record_of(storage, group, id)?.is_some_and(|r| r.draft.agent_id == agent),
                        None => false,
                    }
                }
                b'q' => {
                    report.quarantine_entries += 1;
                    match AssertionId::from_bytes(body).map(|id| record_of(storage, group, id)).transpose()? {
                        Some(Some(record)) => undecided(storage, group, &record)?,
                        _ => false,
                    }
                }
                b'C' => {
                    report.concept_entries += 1;
                    let Some((path, predicate)) = keys::parse_concept_key(key) else {
                        batch.delete(ColumnFamily::Index, key.clone());
                        report.stale_removed += 1;
                        continue;
                    };
                    let count = count_in_prefix(storage, &keys::claims_prefix(group, path, Some(predicate)))?;
                    let stored = value.as_slice().try_into().map(u64::from_be_bytes).ok();
                    if count == 0 {
                        false
                    } else {
                        if stored != Some(count) {
                            batch.put(ColumnFamily::Index, key.clone(), count.to_be_bytes().to_vec());
                            report.counts_fixed += 1;
                        }
                        true
                    }
                }
                _ => true,
            };
            if !keep {
                batch.delete(ColumnFamily::Index, key.clone());
                report.stale_removed += 1;
            }
        }
        storage.write(batch, Durability::Buffered)?;
    }
    // Phase 3: concepts that had claims but no count at all.
    for (path, predicate) in concepts_without_count {
        let _guard = hold()?;
        let key = keys::concept_key(group, &path, &predicate);
        if storage.get(ColumnFamily::Index, &key)?.is_some() {
            continue;
        }
        let count = count_in_prefix(storage, &keys::claims_prefix(group, &path, Some(&predicate)))?;
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::Index, key, count.to_be_bytes().to_vec());
        storage.write(batch, Durability::Buffered)?;
        report.counts_fixed += 1;
        report.concept_entries += 1;
    }
    // Reported to an operator as done: durable first (buffered writes wait in RocksDB's WAL
    // buffer until a sync, and an idle node may not sync for a long time).
    storage.sync()?;
    Ok(report)
}

fn record_of(storage: &Storage, group: GroupId, id: AssertionId) -> Result<Option<StoredAssertion>, StorageError> {
    storage.get(ColumnFamily::StateMachine, &keys::assertion_key(group, id))?.map(|b| decode(&b)).transpose()
}

/// `path, 0, predicate, 0, id(16)` → parts.
fn parse_claim(body: &[u8]) -> Option<(&str, &str, AssertionId)> {
    if body.len() < 18 {
        return None;
    }
    let (rest, id) = body.split_at(body.len() - 16);
    let rest = rest.strip_suffix(&[0])?;
    let split = rest.iter().position(|&b| b == 0)?;
    let path = std::str::from_utf8(&rest[..split]).ok()?;
    let predicate = std::str::from_utf8(&rest[split + 1..]).ok()?;
    Some((path, predicate, AssertionId::from_bytes(id)?))
}

/// `agent, 0, id(16)` → parts.
fn parse_agent(body: &[u8]) -> Option<(&str, AssertionId)> {
    if body.len() < 17 {
        return None;
    }
    let (rest, id) = body.split_at(body.len() - 16);
    let agent = std::str::from_utf8(rest.strip_suffix(&[0])?).ok()?;
    Some((agent, AssertionId::from_bytes(id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An online repair of a replica that was retired (and may exist again under a new lock)
    /// stops before its first chunk and writes nothing; the same repair of a live replica adds
    /// the record's missing entries.
    #[test]
    fn a_retired_replica_is_not_repaired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), crate::storage::StorageOptions::default()).expect("open");
        let group = 5;
        let id = AssertionId::new(1_700_000_000_000_000, 4, 1, 0);
        let draft = crate::model::assertion::AssertionDraft::for_test("a/b", "p", "writer", "1");
        let record =
            StoredAssertion { id, asserted_at_us: 1_700_000_000_000_000, log_index: 1, draft, quarantined: false };
        let mut batch = WriteBatch::new();
        batch.put(
            ColumnFamily::StateMachine,
            keys::assertion_key(group, id),
            super::super::codec::encode_assertion(&record),
        );
        storage.write(batch, Durability::Buffered).expect("write");
        let index_entries = || {
            let (from, to) = (keys::group_prefix(group), keys::group_end(group));
            storage.scan(ColumnFamily::Index, &from, &to, usize::MAX).expect("scan").len()
        };
        let progress = AppliedProgress::default();
        progress.retired.store(true, Ordering::Release);
        let stopped = repair_group(&storage, group, Some(&progress), &AtomicU64::new(0));
        assert!(matches!(stopped, Err(StorageError::Closed)), "{stopped:?}");
        assert_eq!(index_entries(), 0);
        let live = AppliedProgress::default();
        let report = repair_group(&storage, group, Some(&live), &AtomicU64::new(0)).expect("repair");
        assert_eq!((report.missing_added, report.counts_fixed), (2, 1));
        assert_eq!(index_entries(), 3);
    }

    #[test]
    fn key_parsers_round_trip() {
        let id = AssertionId::new(1_700_000_000_000_000, 3, 42, 7);
        let claim = keys::claim_key(9, "a/b", "p.q", id);
        assert_eq!(parse_claim(&claim[5..]), Some(("a/b", "p.q", id)));
        let agent = keys::agent_key(9, "ops-bot", id);
        assert_eq!(parse_agent(&agent[5..]), Some(("ops-bot", id)));
        assert_eq!(parse_claim(b"short"), None);
    }
}
