//! Anti-entropy on one replica's data, below the network: the scrub (recompute the bucket
//! digests from a consistent snapshot of what is on disk and compare them with the ones the
//! applier kept), reading some buckets' records as of one applied index (what a peer repairs
//! from), and replacing a damaged replica's buckets by a healthy copy read at the index this
//! replica stands at. Each takes the shard's index lock only for the moment it needs a
//! consistent view: the apply path holds it through every write batch, so the view, the kept
//! digests and the applied index agree. The conversation between replicas is in
//! `cluster::anti_entropy`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::command::GroupId;
use super::digest::{self, Buckets};
use super::keys;
use super::progress::AppliedProgress;
use crate::storage::{ColumnFamily, Durability, Storage, StorageError, WriteBatch};

/// Bytes a scrub reads between two looks at its pace and at `stop`.
const PACE_STEP_BYTES: u64 = 256 << 10;

/// What one scrub of a replica found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// The applied index the scrub's snapshot was taken at.
    pub applied_index: u64,
    pub records: u64,
    pub bytes: u64,
    /// Buckets whose records on disk do not give the digests the applier kept.
    pub mismatched: Vec<usize>,
    /// Storage could not be read (a checksum mismatch, a missing file): what it said.
    pub unreadable: Option<String>,
    /// Stopped before the end (`stop` said so); nothing is concluded.
    pub stopped: bool,
}

/// Recomputes the digests of `group` from a snapshot of storage taken under the index lock,
/// at most `bytes_per_second` (0: unlimited), and compares them with the kept ones. `stop`
/// ends it early; `progress_bytes` counts what it read so far.
pub fn scrub(
    storage: &Storage,
    progress: &AppliedProgress,
    group: GroupId,
    bytes_per_second: u64,
    stop: &dyn Fn() -> bool,
    progress_bytes: &std::sync::atomic::AtomicU64,
) -> Result<ScrubReport, StorageError> {
    struct Walk {
        report: ScrubReport,
        kept: Option<Buckets>,
        recomputed: Option<Buckets>,
        next_pause: u64,
    }
    let mut guard = Some(progress.index_lock.lock_to_read());
    let started = Instant::now();
    let walked = storage.for_each_in_snapshot(
        ColumnFamily::StateMachine,
        &keys::group_prefix(group),
        &keys::group_end(group),
        || {
            let kept = progress.digest.lock().buckets.clone();
            let applied_index = progress.applied_index.load(Ordering::Acquire);
            guard.take();
            Walk {
                recomputed: kept.as_ref().map(|k| Buckets::empty(k.count())),
                kept,
                report: ScrubReport { applied_index, ..ScrubReport::default() },
                next_pause: PACE_STEP_BYTES,
            }
        },
        |walk, key, value| {
            let Some(buckets) = walk.recomputed.as_mut() else { return false };
            let report = &mut walk.report;
            if digest::digested(key) {
                buckets.toggle(key, value);
                report.records += 1;
            }
            report.bytes += (key.len() + value.len()) as u64;
            if report.bytes >= walk.next_pause {
                walk.next_pause += PACE_STEP_BYTES;
                progress_bytes.store(report.bytes, Ordering::Relaxed);
                if stop() {
                    report.stopped = true;
                    return false;
                }
                if bytes_per_second > 0 {
                    let due = Duration::from_secs_f64(report.bytes as f64 / bytes_per_second as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            true
        },
    );
    let walk = match walked {
        Ok(walk) => walk,
        Err(error) if error.is_damage() => {
            return Ok(ScrubReport {
                bytes: progress_bytes.load(Ordering::Relaxed),
                unreadable: Some(error.to_string()),
                ..ScrubReport::default()
            });
        }
        Err(error) => return Err(error),
    };
    progress_bytes.store(walk.report.bytes, Ordering::Relaxed);
    let mut report = walk.report;
    if let (Some(kept), Some(recomputed), false) = (walk.kept, walk.recomputed, report.stopped) {
        report.mismatched = kept.differing(&recomputed);
    }
    Ok(report)
}

/// Records of some buckets of a replica, with the applied index they are as of and the
/// replica's kept digests of those buckets (the asker checks the records against them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketCopy {
    pub applied_index: u64,
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
    /// (bucket, kept digest), in bucket order.
    pub digests: Vec<(usize, u64)>,
}

impl BucketCopy {
    /// Whether the records are digested records of `group` in the asked buckets and give the
    /// digests the source kept: a source whose own disk is damaged in these buckets (or that
    /// sends anything else) is not copied from.
    pub fn consistent(&self, group: GroupId, count: usize) -> bool {
        let mut recomputed: HashMap<usize, u64> = self.digests.iter().map(|(b, _)| (*b, 0)).collect();
        let prefix = keys::group_prefix(group);
        for (key, value) in &self.records {
            if !key.starts_with(&prefix) || !digest::digested(key) {
                return false;
            }
            let bucket = digest::bucket_of(key, count);
            match recomputed.get_mut(&bucket) {
                Some(digest) => *digest ^= digest::record_hash(key, value),
                None => return false,
            }
        }
        self.digests.iter().all(|(bucket, digest)| recomputed.get(bucket) == Some(digest))
    }
}

/// Reads the records of `buckets` (of `count`) from a snapshot taken under the index lock.
pub fn read_buckets(
    storage: &Storage,
    progress: &AppliedProgress,
    group: GroupId,
    count: usize,
    buckets: &BTreeSet<usize>,
) -> Result<BucketCopy, StorageError> {
    let mut guard = Some(progress.index_lock.lock_to_read());
    let (mut copy, kept_count) = storage.for_each_in_snapshot(
        ColumnFamily::StateMachine,
        &keys::group_prefix(group),
        &keys::group_end(group),
        || {
            let mut copy = BucketCopy::default();
            let digests = progress.digest.lock();
            let kept_count = digests.buckets.as_ref().map(Buckets::count);
            if let Some(kept) = digests.buckets.as_ref() {
                copy.digests = buckets.iter().filter(|b| **b < kept.count()).map(|b| (*b, kept.get(*b))).collect();
            }
            copy.applied_index = progress.applied_index.load(Ordering::Acquire);
            drop(digests);
            guard.take();
            (copy, kept_count)
        },
        |(copy, _), key, value| {
            if digest::digested(key) && buckets.contains(&digest::bucket_of(key, count)) {
                copy.records.push((key.to_vec(), value.to_vec()));
            }
            true
        },
    )?;
    if kept_count != Some(count) {
        // Another bucket count: the digests say nothing about these buckets.
        copy.digests.clear();
    }
    Ok(copy)
}

/// What replacing buckets did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replaced {
    /// Records written (missing or different here).
    pub written: u64,
    /// Records deleted (here but not in the healthy copy).
    pub deleted: u64,
}

/// Why buckets were not replaced.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("the replica is at applied index {at}, not {expected}")]
    NotAtIndex { at: u64, expected: u64 },
    #[error("the replica keeps no digests")]
    NoDigests,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Replaces the records of `buckets` of `group` by `copy` (read from a healthy replica at the
/// applied index this replica stands at, which is checked under the index lock), and their
/// digests, in one write batch. If this replica's own records cannot be read, every digested
/// range of the group is dropped first and `copy` must hold every bucket (a re-seed).
pub fn replace_buckets(
    storage: &Storage,
    progress: &AppliedProgress,
    group: GroupId,
    buckets: &BTreeSet<usize>,
    copy: &BucketCopy,
) -> Result<Replaced, ReplaceError> {
    let _guard = progress.index_lock.lock();
    let at = progress.applied_index.load(Ordering::Acquire);
    if at != copy.applied_index {
        return Err(ReplaceError::NotAtIndex { at, expected: copy.applied_index });
    }
    let count = progress.digest.lock().buckets.as_ref().map(Buckets::count).ok_or(ReplaceError::NoDigests)?;
    let healthy: HashMap<&[u8], &[u8]> = copy.records.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    let mut batch = WriteBatch::new();
    let mut replaced = Replaced::default();
    let mut present: BTreeSet<Vec<u8>> = BTreeSet::new();
    let whole = buckets.len() == count;
    let scanned = storage.for_each_in_range(
        ColumnFamily::StateMachine,
        &keys::group_prefix(group),
        &keys::group_end(group),
        |key, value| {
            if digest::digested(key) && buckets.contains(&digest::bucket_of(key, count)) {
                match healthy.get(key) {
                    Some(good) if *good == value => {
                        present.insert(key.to_vec());
                    }
                    Some(_) => {}
                    None => {
                        batch.delete(ColumnFamily::StateMachine, key.to_vec());
                        replaced.deleted += 1;
                    }
                }
            }
            true
        },
    );
    match scanned {
        Ok(()) => {}
        Err(error) if error.is_damage() && whole => {
            // Unreadable: drop every digested range and write the healthy copy whole.
            tracing::warn!(group, error = %error, "replica unreadable: re-seeding its records whole");
            batch = WriteBatch::new();
            present.clear();
            for (from, to) in digested_ranges(group) {
                batch.delete_range(ColumnFamily::StateMachine, from, to);
            }
        }
        Err(error) => return Err(error.into()),
    }
    let mut fresh = Buckets::empty(count);
    let mut kept = progress.digest.lock().buckets.clone().ok_or(ReplaceError::NoDigests)?;
    for (key, value) in &copy.records {
        fresh.toggle(key, value);
        if !present.contains(key) {
            batch.put(ColumnFamily::StateMachine, key.clone(), value.clone());
            replaced.written += 1;
        }
    }
    for &bucket in buckets {
        kept.set(bucket, fresh.get(bucket));
    }
    digest::put_all(&mut batch, group, &kept);
    storage.write(batch, Durability::Synced)?;
    progress.digest.lock().buckets = Some(kept);
    progress.claims_cache.clear();
    // The meta group's applier holds its records in memory too: it reloads them first thing.
    progress.reload_meta.store(true, Ordering::Release);
    Ok(replaced)
}

/// The key ranges of a group's digested records: its `state_machine` range less the applied
/// state (`M`), the proposal tokens (`T`) and the digests (`D`).
fn digested_ranges(group: GroupId) -> Vec<(Vec<u8>, Vec<u8>)> {
    let tag = |t: u8| keys::state_key(group, t);
    vec![
        (keys::group_prefix(group), tag(b'D')),
        (tag(b'D' + 1), tag(b'M')),
        (tag(b'M' + 1), tag(b'T')),
        (tag(b'T' + 1), keys::group_end(group)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    const GROUP: GroupId = 9;
    const COUNT: usize = 64;

    fn replica(records: &[(u32, &str)]) -> (tempfile::TempDir, std::sync::Arc<Storage>, AppliedProgress) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), Default::default()).expect("open");
        let mut batch = WriteBatch::new();
        for (n, value) in records {
            batch.put(ColumnFamily::StateMachine, key(*n), value.as_bytes().to_vec());
        }
        batch.put(ColumnFamily::StateMachine, keys::applied_key(GROUP), b"applied".to_vec());
        storage.write(batch, Durability::Buffered).expect("write");
        let progress = AppliedProgress::default();
        progress.digest.lock().buckets = Some(digest::load_or_rebuild(&storage, GROUP, COUNT).expect("digests"));
        progress.applied_index.store(7, Ordering::Release);
        (dir, storage, progress)
    }

    fn key(n: u32) -> Vec<u8> {
        let mut key = keys::state_key(GROUP, b'A');
        key.extend_from_slice(&n.to_be_bytes());
        key
    }

    fn scrub_now(storage: &Storage, progress: &AppliedProgress) -> ScrubReport {
        scrub(storage, progress, GROUP, 0, &|| false, &AtomicU64::new(0)).expect("scrub")
    }

    /// A record changed and one deleted behind the applier's back are found by the scrub, and
    /// copying just their buckets from a healthy replica makes the two equal again.
    #[test]
    fn the_scrub_finds_changed_and_deleted_records_and_a_bucket_copy_repairs_them() {
        let records: Vec<(u32, String)> = (0..300).map(|n| (n, format!("value-{n}"))).collect();
        let as_refs: Vec<(u32, &str)> = records.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (_healthy_dir, healthy, healthy_progress) = replica(&as_refs);
        let (_damaged_dir, damaged, damaged_progress) = replica(&as_refs);
        assert_eq!(scrub_now(&damaged, &damaged_progress).mismatched, Vec::<usize>::new(), "no false alarm");
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::StateMachine, key(17), b"rotten".to_vec());
        batch.delete(ColumnFamily::StateMachine, key(230));
        damaged.write(batch, Durability::Buffered).expect("damage");
        let report = scrub_now(&damaged, &damaged_progress);
        let expected: BTreeSet<usize> =
            [digest::bucket_of(&key(17), COUNT), digest::bucket_of(&key(230), COUNT)].into();
        assert_eq!(report.mismatched.iter().copied().collect::<BTreeSet<_>>(), expected);
        assert_eq!(report.records, 299);

        let copy = read_buckets(&healthy, &healthy_progress, GROUP, COUNT, &expected).expect("read");
        assert!(copy.consistent(GROUP, COUNT));
        assert_eq!(copy.applied_index, 7);
        let replaced = replace_buckets(&damaged, &damaged_progress, GROUP, &expected, &copy).expect("replace");
        assert_eq!(replaced, Replaced { written: 2, deleted: 0 });
        assert!(scrub_now(&damaged, &damaged_progress).mismatched.is_empty());
        assert_eq!(damaged.get(ColumnFamily::StateMachine, &key(17)).expect("get"), Some(b"value-17".to_vec()));
        assert_eq!(damaged.get(ColumnFamily::StateMachine, &key(230)).expect("get"), Some(b"value-230".to_vec()));
        assert_eq!(
            damaged_progress.digest.lock().buckets,
            healthy_progress.digest.lock().buckets,
            "the kept digests agree again"
        );
    }

    /// A copy is applied only at the index it was read at, and a source whose records do not
    /// give its own digests is recognised.
    #[test]
    fn a_copy_is_refused_at_another_index_and_a_damaged_source_is_recognised() {
        let (_dir, storage, progress) = replica(&[(1, "a"), (2, "b")]);
        let all: BTreeSet<usize> = (0..COUNT).collect();
        let mut copy = read_buckets(&storage, &progress, GROUP, COUNT, &all).expect("read");
        assert!(copy.consistent(GROUP, COUNT));
        progress.applied_index.store(8, Ordering::Release);
        assert!(matches!(
            replace_buckets(&storage, &progress, GROUP, &all, &copy),
            Err(ReplaceError::NotAtIndex { at: 8, expected: 7 })
        ));
        copy.records[0].1 = b"changed".to_vec();
        assert!(!copy.consistent(GROUP, COUNT));
    }

    /// An extra record (here, not on the healthy replica) is deleted by the repair.
    #[test]
    fn a_record_the_healthy_replica_lacks_is_deleted() {
        let (_h, healthy, healthy_progress) = replica(&[(1, "a")]);
        let (_d, damaged, damaged_progress) = replica(&[(1, "a"), (2, "stray")]);
        // The stray record is not in the damaged replica's kept digests either: the scrub sees
        // it only if the digests were kept without it.
        damaged_progress.digest.lock().buckets = healthy_progress.digest.lock().buckets.clone();
        let report = scrub_now(&damaged, &damaged_progress);
        let buckets: BTreeSet<usize> = report.mismatched.iter().copied().collect();
        assert_eq!(buckets, [digest::bucket_of(&key(2), COUNT)].into());
        let copy = read_buckets(&healthy, &healthy_progress, GROUP, COUNT, &buckets).expect("read");
        let replaced = replace_buckets(&damaged, &damaged_progress, GROUP, &buckets, &copy).expect("replace");
        assert_eq!(replaced.deleted, 1);
        assert_eq!(damaged.get(ColumnFamily::StateMachine, &key(2)).expect("get"), None);
        assert!(scrub_now(&damaged, &damaged_progress).mismatched.is_empty());
    }
}
