//! The Raft log store of one group: entries, vote, committed and purged log ids in the node's
//! RocksDB. Appends are group-committed: queued for the group committer, which writes and
//! syncs them with the other groups' appends and only then acknowledges them to openraft (see
//! `storage::group_commit`). The tail of the log is also kept in memory ([`RecentEntries`]): it
//! serves just-appended entries (those not written yet too), and replication and apply read them
//! from it, on the calling task, without a storage read or a decode. Entries are stored in their binary form
//! (`wire::encode_entry`: a version byte and protobuf); entries an earlier version stored as
//! JSON still read.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote};

use super::early::EarlyReplication;
use super::types::{Entry, GroupId, LogId, NodeId, StorageIoError, TypeConfig};
use crate::shard::keys;
use crate::storage::blocking;
use crate::storage::pool::read_pool;
use crate::storage::{ColumnFamily, Durability, Storage, WriteBatch};

pub(crate) const VOTE_TAG: u8 = b'v';
const COMMITTED_TAG: u8 = b'c';
const PURGED_TAG: u8 = b'p';

/// Log store of one Raft group. Cloning gives a reader over the same log.
#[derive(Clone)]
pub struct LogStore {
    storage: Arc<Storage>,
    group: GroupId,
    recent: Arc<Mutex<RecentEntries>>,
    /// The last index a purge may delete: `u64::MAX` unless the log is archived
    /// (`backup.archive_enabled`); then the last index this node knows to be archived, so an
    /// entry is never purged before it is archived, whatever openraft asks.
    purge_floor: Arc<AtomicU64>,
    /// openraft's committed log id, and how far it has been written ([`SavedCommitted`]).
    committed: Arc<Mutex<SavedCommitted>>,
    /// Where a leader's appends also go at once (`raft::early`), when the group has one.
    early: Option<Arc<EarlyReplication>>,
    /// This node, when known: a vote it stored as its own committed leadership is read back
    /// uncommitted ([`LogStore::with_node`]).
    node: Option<NodeId>,
    /// How many truncations of conflicting entries this log has begun ([`LogStore::truncations`]).
    truncations: Arc<AtomicU64>,
    /// Stored bytes appended since start, sampled at each append ([`LogStore::bytes_between`]).
    appended: Arc<Mutex<AppendedBytes>>,
}

/// The longest a group's newest committed log id waits for the group's next append before
/// `save_committed` writes it on its own.
const COMMITTED_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The committed log id is only a hint for a restart: openraft re-applies the log up to it
/// before the group starts, and learns the rest from the leader. A stale one is safe (openraft
/// takes the applied index when it is higher). So it is not written on every advance, which cost
/// a RocksDB write per entry and node, in the Raft task, beside the append's: the newest one
/// rides in the group's next append batch, and an advance is written on its own only when the
/// last write is [`COMMITTED_SAVE_INTERVAL`] old (a group that has stopped appending; its last
/// advance then waits for the next one, the next append or the shutdown).
#[derive(Default)]
struct SavedCommitted {
    latest: Option<LogId>,
    saved: Option<LogId>,
    saved_at: Option<std::time::Instant>,
    /// The replica is being deleted (`ShardSet::retire_replica`): nothing more is written.
    retired: bool,
}

impl SavedCommitted {
    /// The id to write with a batch being built now, if the stored one is older.
    fn take_unsaved(&mut self) -> Option<LogId> {
        if self.retired || self.latest == self.saved {
            return None;
        }
        self.saved = self.latest;
        self.saved_at = Some(std::time::Instant::now());
        self.latest
    }

    /// Records an advance; `Some` (the id to write now) when the last write is old enough.
    fn advance(&mut self, committed: Option<LogId>) -> Option<LogId> {
        self.latest = committed;
        let due = self.saved_at.is_none_or(|at| at.elapsed() >= COMMITTED_SAVE_INTERVAL);
        if due {
            self.take_unsaved()
        } else {
            None
        }
    }
}

/// The most marks [`AppendedBytes`] keeps; when full, every other one goes.
const MAX_APPEND_MARKS: usize = 1024;

/// Stored bytes appended to a group's log since the node started, with marks of where the
/// count stood after appends, so that the bytes after an index (a snapshot's) can be told
/// without reading the log. At most [`MAX_APPEND_MARKS`] marks: when full, every other one is
/// dropped, so they cover the whole log at a coarser grain; an answer then rounds up (toward
/// an earlier snapshot), never down.
#[derive(Default)]
struct AppendedBytes {
    total: u64,
    /// (last index of an append, `total` after it), by increasing index.
    marks: VecDeque<(u64, u64)>,
}

impl AppendedBytes {
    fn appended(&mut self, last_index: u64, bytes: u64) {
        // openraft truncates before it overwrites, so indexes only grow here.
        self.total += bytes;
        if self.marks.len() >= MAX_APPEND_MARKS {
            let last = self.marks.back().copied();
            let kept: VecDeque<(u64, u64)> = self.marks.iter().copied().step_by(2).collect();
            self.marks = kept;
            // The newest mark stays: the count at the log's end is exact.
            if let Some(last) = last {
                if self.marks.back() != Some(&last) {
                    self.marks.push_back(last);
                }
            }
        }
        self.marks.push_back((last_index, self.total));
    }

    /// Forgets the marks of entries from `index` on (a truncation), and marks the count as it
    /// stands at the entry before: what is appended next is counted from there. The truncated
    /// bytes stay counted for the indexes before it: the count rounds up.
    fn truncate_from(&mut self, index: u64) {
        let mut cut = false;
        while self.marks.back().is_some_and(|&(at, _)| at.saturating_add(1) >= index) {
            self.marks.pop_back();
            cut = true;
        }
        if cut && index > 0 {
            self.marks.push_back((index - 1, self.total));
        }
    }

    /// Forgets marks a purge through `index` made useless: the newest mark at or before it
    /// stays, the count after a snapshot there starts from it.
    fn purge_through(&mut self, index: u64) {
        while self.marks.get(1).is_some_and(|&(at, _)| at <= index) {
            self.marks.pop_front();
        }
    }

    /// Bytes appended after `from` through `through` (none when `through` is not past `from`):
    /// from the newest mark at or before `from` to the oldest at or after `through`, so it
    /// rounds up too.
    fn between(&self, from: Option<u64>, through: Option<u64>) -> u64 {
        let Some(through) = through else { return 0 };
        if Some(through) <= from {
            return 0;
        }
        let at = self.marks.partition_point(|&(at, _)| at < through);
        let until = self.marks.get(at).map_or(self.total, |&(_, total)| total);
        until.saturating_sub(self.total - self.after(from))
    }

    /// Bytes appended after `index`: from the newest mark at or before it (from the start when
    /// there is none).
    fn after(&self, index: Option<u64>) -> u64 {
        let Some(index) = index else { return self.total };
        let at = self.marks.partition_point(|&(at, _)| at <= index);
        let base = if at == 0 { 0 } else { self.marks[at - 1].1 };
        self.total - base
    }
}

/// Stored bytes of log entries a group keeps in memory ([`RecentEntries`]): two full
/// AppendEntries, enough for followers and apply to read what was just appended.
pub const RECENT_LOG_BYTES: usize = 2 * MAX_APPEND_BYTES;

/// The newest entries of the log, contiguous, oldest first, with their stored sizes; at most
/// [`RECENT_LOG_BYTES`] of them (the newest entry is kept whatever its size). Every change of
/// the stored log goes through [`LogStore`], which changes this the same way in the same call:
/// when it holds anything, its last entry is the log's last entry.
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// Adds an appended entry. An entry that does not follow the last one starts the tail
    /// afresh: after a purge past the tail (a snapshot installed) the log continues after a gap.
    /// openraft truncates before it overwrites, so an append never lands inside the tail.
    fn push(&mut self, entry: Entry, size: usize) {
        if self.last_index().is_some_and(|last| last.checked_add(1) != Some(entry.log_id.index)) {
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.bytes > RECENT_LOG_BYTES && self.entries.len() > 1 {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets entries at `index` and after (a truncation).
    fn truncate_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets entries up to and including `index` (a purge).
    fn purge_through(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// The entry at `index`, when the tail holds it. The tail's entries are consecutive
    /// ([`RecentEntries::push`] restarts it at a gap), so the offset from the first is exact;
    /// the index is checked all the same.
    fn get(&self, index: u64) -> Option<&Entry> {
        let offset = usize::try_from(index.checked_sub(self.first_index()?)?).ok()?;
        self.entries.get(offset).map(|(entry, _)| entry).filter(|entry| entry.log_id.index == index)
    }

    /// The entries in `[start, end)` when this holds all of them that the log holds (from
    /// `start` on), else `None`. With `max_bytes`, stops before the entry that would pass it,
    /// after at least one.
    fn read(&self, start: u64, end: u64, max_bytes: Option<usize>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (entry, size) in self.entries.iter().skip(skip) {
            if entry.log_id.index >= end {
                break;
            }
            if max_bytes.is_some_and(|max| !out.is_empty() && bytes + size > max) {
                break;
            }
            bytes += size;
            out.push(entry.clone());
        }
        Some(out)
    }
}

pub(crate) fn read_error(e: impl std::error::Error + 'static) -> StorageIoError {
    StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Read, openraft::AnyError::new(&e)).into()
}

pub(crate) fn write_error(e: impl std::error::Error + 'static) -> StorageIoError {
    StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, openraft::AnyError::new(&e)).into()
}

impl LogStore {
    pub fn new(storage: Arc<Storage>, group: GroupId) -> LogStore {
        LogStore {
            storage,
            group,
            recent: Arc::new(Mutex::new(RecentEntries::default())),
            purge_floor: Arc::new(AtomicU64::new(u64::MAX)),
            committed: Arc::new(Mutex::new(SavedCommitted::default())),
            early: None,
            node: None,
            truncations: Arc::new(AtomicU64::new(0)),
            appended: Arc::new(Mutex::new(AppendedBytes::default())),
        }
    }

    /// This store belongs to node `node`, which must never resume leading a term after a
    /// restart: `read_vote` (read by openraft only at start) turns the node's own committed vote
    /// into an uncommitted one for the same term, so the node starts as a follower and must win
    /// a later term to lead again.
    ///
    /// Why: with early replication (`raft::early`) a leader's followers may hold entries of its
    /// term that it had not yet written when it crashed. Resuming the same term, it would give
    /// new entries the same log ids (openraft assigns them after its own last entry), and a
    /// follower would take its different entry for the leader's (same id), answer that it
    /// matches, and apply it. A new term gives every new entry a new id, and the new leader's
    /// first entry overwrites what the lost ones left on the followers (none was committed: the
    /// leader counts a follower only through openraft's own messages, sent after its own write).
    /// The uncommitted vote still refuses every other candidate of that term.
    pub fn with_node(mut self, node: NodeId) -> LogStore {
        self.node = Some(node);
        self
    }

    /// This store hands every append to `early` as well, which sends a leader's new entries to
    /// its caught-up followers while they are being written here.
    pub fn with_early_replication(mut self, early: Arc<EarlyReplication>) -> LogStore {
        self.early = Some(early);
        self
    }

    /// How many truncations of conflicting entries (openraft's `DeleteConflictLog`) this log has
    /// begun since start. Counted before the entries go, and openraft answers the proposals
    /// whose entries a truncation removed with `ForwardToLeader` only after it: a proposal that
    /// got `ForwardToLeader` while this count stayed the same was refused before it was
    /// appended, and one that got it after the count moved may have been appended, reached a
    /// follower, and be committed by a later leader (`ShardSet::propose_local`).
    pub fn truncations(&self) -> u64 {
        self.truncations.load(Ordering::Acquire)
    }

    /// Stored bytes of the entries after `snapshot` through `applied`, as far as this process
    /// has seen them (entries appended before the node started are not counted), rounded up
    /// ([`AppendedBytes`]): what a snapshot built
    /// now (it holds the applied state) would let go. Entries appended but not applied yet do
    /// not count: a follower catching up on a backlog, or a leader without a quorum, would
    /// otherwise build snapshot after snapshot that each move past only a few of them.
    pub fn bytes_between(&self, snapshot: Option<u64>, applied: Option<u64>) -> u64 {
        self.appended.lock().between(snapshot, applied)
    }

    /// The index of the newest entry appended in this process (written yet or not), when the
    /// in-memory tail holds it: every append goes through the tail, so this is the log's last
    /// index. `None` before the first append since start, or when a purge emptied the tail.
    pub fn last_appended_index(&self) -> Option<u64> {
        self.recent.lock().last_index()
    }

    /// Keeps every entry until [`LogStore::archived_through`] says it is archived.
    pub fn keep_unarchived(self) -> LogStore {
        self.purge_floor.store(0, Ordering::Release);
        self
    }

    /// Entries through `index` are archived: purges may delete them. Never lowers the floor.
    pub fn archived_through(&self, index: u64) {
        self.purge_floor.fetch_max(index, Ordering::AcqRel);
    }

    /// The group's stored log entries from `from` through `through`, in their stored (binary)
    /// form with their indexes, while their size stays under `max_bytes` (at least one entry
    /// if any). A blocking read: for the archiver, on a blocking thread. The first entry
    /// returned is after `from` when the log no longer holds `from` (purged or a snapshot).
    pub fn stored_entries(
        &self,
        from: u64,
        through: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, crate::storage::StorageError> {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let (start, end) = (keys::log_key(self.group, from), keys::log_key(self.group, through.saturating_add(1)));
        let prefix = keys::group_prefix(self.group).len();
        self.storage.for_each_in_range(ColumnFamily::RaftLog, &start, &end, |key, value| {
            if !entries.is_empty() && bytes + value.len() > max_bytes {
                return false;
            }
            let Some(index) = key.get(prefix..).and_then(|i| <[u8; 8]>::try_from(i).ok()).map(u64::from_be_bytes)
            else {
                return true;
            };
            bytes += value.len();
            entries.push((index, value.to_vec()));
            true
        })?;
        Ok(entries)
    }

    fn read_state<T: serde::de::DeserializeOwned>(&self, tag: u8) -> Result<Option<T>, StorageIoError> {
        let Some(bytes) =
            self.storage.get(ColumnFamily::RaftState, &keys::state_key(self.group, tag)).map_err(read_error)?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(read_error)
    }

    /// Stops writing the committed log id, for good: the group's Raft task has stopped and its
    /// replica is about to be deleted. A write after the deletion (the node's shutdown, say)
    /// would leave a committed id over an empty log, which openraft refuses to start from.
    pub fn retire(&self) {
        self.committed.lock().retired = true;
    }

    /// Writes the newest committed log id if it is not stored yet (at shutdown, after the
    /// group's Raft task stopped), unless the store was retired.
    pub fn save_latest_committed(&self) -> Result<(), StorageIoError> {
        let Some(committed) = self.committed.lock().take_unsaved() else {
            return Ok(());
        };
        let mut batch = WriteBatch::new();
        self.state_put(&mut batch, COMMITTED_TAG, &Some(committed))?;
        blocking(|| self.storage.write(batch, Durability::Synced)).map_err(write_error)
    }

    /// The batch that appends `entries` (with the newest committed log id when it is not
    /// stored yet), after putting them in the tail.
    fn append_batch(&self, entries: impl IntoIterator<Item = Entry>) -> Result<WriteBatch, StorageIoError> {
        let mut batch = WriteBatch::new();
        let mut appended = Vec::new();
        let mut sizes = Vec::new();
        for entry in entries {
            let bytes = super::wire::encode_entry(&entry);
            sizes.push(bytes.len());
            batch.put(ColumnFamily::RaftLog, keys::log_key(self.group, entry.log_id.index), bytes);
            appended.push(entry);
        }
        if let Some(committed) = self.committed.lock().take_unsaved() {
            self.state_put(&mut batch, COMMITTED_TAG, &Some(committed))?;
        }
        // Before the write, under the lock a reader takes: a reader never finds an entry in
        // storage that the tail lacks while the tail holds later ones. openraft reads nothing
        // past what this call returned, and a failed write fails the group.
        if let Some(early) = &self.early {
            // Only this call appends to the group (openraft awaits it), so the tail's last entry
            // stays the one before these until they are pushed below.
            let prev = self.recent.lock().entries.back().map(|(entry, _)| entry.log_id);
            early.appended(prev, &appended, sizes.iter().sum());
        }
        if let Some(last) = appended.last() {
            self.appended.lock().appended(last.log_id.index, sizes.iter().sum::<usize>() as u64);
        }
        let mut recent = self.recent.lock();
        for (entry, size) in appended.into_iter().zip(sizes) {
            recent.push(entry, size);
        }
        Ok(batch)
    }

    fn state_put<T: serde::Serialize>(&self, batch: &mut WriteBatch, tag: u8, value: &T) -> Result<(), StorageIoError> {
        let bytes = serde_json::to_vec(value).map_err(write_error)?;
        batch.put(ColumnFamily::RaftState, keys::state_key(self.group, tag), bytes);
        Ok(())
    }

    /// When the client command at `index` was proposed, if that entry is a client command.
    pub fn proposed_at_us(&self, index: u64) -> Result<Option<u64>, StorageIoError> {
        let proposed_at = |entry: &Entry| match &entry.payload {
            openraft::EntryPayload::Normal(command) => Some(command.proposed_at_us()),
            _ => None,
        };
        // The tail first: it holds the newest entries, including those the group committer has
        // not written yet.
        {
            let recent = self.recent.lock();
            if let Some(entry) = recent.get(index) {
                return Ok(proposed_at(entry));
            }
        }
        let Some(bytes) =
            self.storage.get(ColumnFamily::RaftLog, &keys::log_key(self.group, index)).map_err(read_error)?
        else {
            return Ok(None);
        };
        Ok(proposed_at(&Self::decode(&bytes)?))
    }

    /// What a purge through `log_id` may delete when entries after `floor` are not archived
    /// yet: through `floor` only (openraft never reads what it asked to purge, so keeping more
    /// is safe; a later purge takes the rest), or nothing if the log does not hold `floor`.
    /// When the log does not hold `log_id` itself, a snapshot was installed past the log's end
    /// (a truncation may have left a gap): everything goes, as without archival, since a log
    /// with a hole must not survive a restart.
    fn clamped_purge(&self, log_id: LogId, floor: u64) -> Result<Option<LogId>, StorageIoError> {
        let (asked, kept) = (keys::log_key(self.group, log_id.index), keys::log_key(self.group, floor));
        let (asked, kept) = blocking(|| {
            Ok::<_, crate::storage::StorageError>((
                self.storage.get(ColumnFamily::RaftLog, &asked)?.is_some(),
                self.storage.get(ColumnFamily::RaftLog, &kept)?,
            ))
        })
        .map_err(read_error)?;
        if !asked {
            return Ok(Some(log_id));
        }
        match kept {
            Some(bytes) => Ok(Some(Self::decode(&bytes)?.log_id)),
            None => Ok(None),
        }
    }

    fn decode(bytes: &[u8]) -> Result<Entry, StorageIoError> {
        super::wire::decode_entry(bytes).map_err(read_error)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageIoError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end_index = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.recent.lock().read(start, end_index, None) {
            return Ok(entries);
        }
        let end = match range.end_bound() {
            Bound::Unbounded => keys::group_end(self.group),
            _ => keys::log_key(self.group, end_index),
        };
        let (storage, from) = (self.storage.clone(), keys::log_key(self.group, start));
        // Entries to apply or replicate: on the storage read pool, like every request-path read.
        let rows = read_pool()
            .run_or_block(move || storage.scan(ColumnFamily::RaftLog, &from, &end, usize::MAX))
            .await
            .map_err(read_error)?;
        let mut entries = rows.iter().map(|(_, v)| Self::decode(v)).collect::<Result<Vec<_>, _>>()?;
        // Appended entries the group committer has not written yet are only in the tail.
        let next = entries.last().map_or(start, |e| e.log_id.index.saturating_add(1));
        if next < end_index {
            if let Some(unwritten) = self.recent.lock().read(next, end_index, None) {
                entries.extend(unwritten);
            }
        }
        Ok(entries)
    }

    /// What replication sends in one AppendEntries: entries from `start`, at least one, while
    /// their stored size stays under [`MAX_APPEND_BYTES`]. openraft gives each AppendEntries
    /// one heartbeat interval; a byte bound, not an entry count, keeps any backlog moving.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageIoError> {
        if let Some(entries) = self.recent.lock().read(start, end, Some(MAX_APPEND_BYTES)) {
            return Ok(entries);
        }
        let (from, to) = (keys::log_key(self.group, start), keys::log_key(self.group, end));
        let storage = self.storage.clone();
        // A far-behind follower's entries come from disk.
        // (Entries not written yet are at the log's end, in the tail; openraft 0.9 reads none.)
        read_pool().run_or_block(move || read_limited(&storage, &from, &to)).await
    }
}

/// Log entries in `[from, to)`, at least one, while their stored size stays under
/// [`MAX_APPEND_BYTES`].
fn read_limited(storage: &Storage, from: &[u8], to: &[u8]) -> Result<Vec<Entry>, StorageIoError> {
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    let mut failure = None;
    storage
        .for_each_in_range(ColumnFamily::RaftLog, from, to, |_, value| {
            if !entries.is_empty() && bytes + value.len() > MAX_APPEND_BYTES {
                return false;
            }
            bytes += value.len();
            match LogStore::decode(value) {
                Ok(entry) => entries.push(entry),
                Err(error) => {
                    failure = Some(error);
                    return false;
                }
            }
            true
        })
        .map_err(read_error)?;
    match failure {
        Some(error) => Err(error),
        None => Ok(entries),
    }
}

/// Stored bytes of log entries one AppendEntries carries, beyond its first entry.
pub const MAX_APPEND_BYTES: usize = 1 << 20;

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageIoError> {
        let last_purged_log_id: Option<LogId> = self.read_state(PURGED_TAG)?;
        let last = self
            .storage
            .last_in_range(ColumnFamily::RaftLog, &keys::group_prefix(self.group), &keys::group_end(self.group))
            .map_err(read_error)?;
        let last_log_id = match last {
            Some((_, bytes)) => Some(Self::decode(&bytes)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageIoError> {
        let mut batch = WriteBatch::new();
        self.state_put(&mut batch, VOTE_TAG, vote)?;
        // And a copy in another family, so that one lost table file cannot take the vote.
        let copy = serde_json::to_vec(vote).map_err(write_error)?;
        batch.put(ColumnFamily::Meta, keys::vote_copy_key(self.group), copy);
        blocking(|| self.storage.write(batch, Durability::Synced)).map_err(write_error)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageIoError> {
        let vote: Option<Vote<NodeId>> = self.read_state(VOTE_TAG)?;
        Ok(vote.map(|vote| match self.node {
            Some(node) if vote.is_committed() && vote.leader_id().voted_for() == Some(node) => {
                let term = vote.leader_id().get_term();
                tracing::info!(
                    group = self.group,
                    term,
                    "this node led the group when it stopped; it campaigns for a later term"
                );
                Vote::new(term, node)
            }
            _ => vote,
        }))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageIoError> {
        // Usually written by the next append ([`SavedCommitted`]).
        let Some(committed) = self.committed.lock().advance(committed) else {
            return Ok(());
        };
        let mut batch = WriteBatch::new();
        self.state_put(&mut batch, COMMITTED_TAG, &Some(committed))?;
        // Buffered (a memtable insert, at most once a second per group): inline.
        self.storage.write(batch, Durability::Buffered).map_err(write_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageIoError> {
        if let Some(latest) = self.committed.lock().latest {
            return Ok(Some(latest));
        }
        Ok(self.read_state::<Option<LogId>>(COMMITTED_TAG)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageIoError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let batch = self.append_batch(entries)?;
        // Queued for the group committer, which writes it with the other groups' appends and
        // syncs, never here. Until then the tail serves the entries: openraft 0.9 awaits this
        // append's callback before anything reads past the log it had, and before it truncates,
        // purges or appends again to this group, so no other write to the group's log can
        // overtake the queued batch.
        self.storage
            .write_group_commit(batch, Box::new(move |result| callback.log_io_completed(result)))
            .map_err(write_error)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageIoError> {
        self.truncations.fetch_add(1, Ordering::AcqRel);
        self.recent.lock().truncate_from(log_id.index);
        self.appended.lock().truncate_from(log_id.index);
        let mut batch = WriteBatch::new();
        batch.delete_range(ColumnFamily::RaftLog, keys::log_key(self.group, log_id.index), keys::group_end(self.group));
        blocking(|| self.storage.write(batch, Durability::Synced)).map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageIoError> {
        let floor = self.purge_floor.load(Ordering::Acquire);
        let log_id = if log_id.index <= floor { Some(log_id) } else { self.clamped_purge(log_id, floor)? };
        let Some(log_id) = log_id else { return Ok(()) };
        self.recent.lock().purge_through(log_id.index);
        self.appended.lock().purge_through(log_id.index);
        let mut batch = WriteBatch::new();
        self.state_put(&mut batch, PURGED_TAG, &log_id)?;
        batch.delete_range(
            ColumnFamily::RaftLog,
            keys::log_key(self.group, 0),
            keys::log_key(self.group, log_id.index.saturating_add(1)),
        );
        blocking(|| self.storage.write(batch, Durability::Buffered)).map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::{CommittedLeaderId, EntryPayload};
    use proptest::prelude::*;

    use super::*;

    fn entry(index: u64) -> Entry {
        Entry { log_id: openraft::LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Appends this many entries after the log's last.
        Append(u64, usize),
        /// Truncates this many entries off the end.
        Truncate(u64),
        /// Purges this many entries off the front.
        Purge(u64),
        /// Installs a snapshot this far past the end: purge everything, continue after a gap.
        Install(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..40, 1usize..300_000).prop_map(|(n, size)| Op::Append(n, size)),
            1 => (0u64..20).prop_map(Op::Truncate),
            1 => (0u64..20).prop_map(Op::Purge),
            1 => (1u64..50).prop_map(Op::Install),
        ]
    }

    /// What one [`Op`] did to the model log (`log`: index to size; `purged`: the last purged
    /// index), for the structure under test to do the same.
    enum Step {
        Appended { first: u64, last: u64, size: usize },
        Truncated { from: u64, bytes: u64 },
        Purged { through: u64 },
    }

    fn model_step(log: &mut BTreeMap<u64, usize>, purged: &mut u64, op: Op) -> Step {
        let last = log.keys().next_back().copied().unwrap_or(*purged);
        match op {
            Op::Append(n, size) => {
                for index in last + 1..=last + n {
                    log.insert(index, size);
                }
                Step::Appended { first: last + 1, last: last + n, size }
            }
            Op::Truncate(n) => {
                let from = last.saturating_sub(n).max(*purged + 1);
                let bytes = log.range(from..).map(|(_, &size)| size as u64).sum();
                log.retain(|&i, _| i < from);
                Step::Truncated { from, bytes }
            }
            Op::Purge(n) => {
                let through = (log.keys().next().copied().unwrap_or(*purged + 1) + n).min(last);
                log.retain(|&i, _| i > through);
                *purged = (*purged).max(through);
                Step::Purged { through }
            }
            Op::Install(gap) => {
                *purged = last + gap;
                log.clear();
                Step::Purged { through: *purged }
            }
        }
    }

    proptest! {
        /// Whatever appends, truncations, purges and snapshot gaps happen, a read the tail
        /// answers is exactly what the stored log holds in that range (and bounded reads stop
        /// where the stored-log read stops), and the tail stays within its byte budget.
        #[test]
        fn the_tail_answers_only_what_the_log_holds(ops in proptest::collection::vec(op(), 1..60),
                                                      probes in proptest::collection::vec((0u64..400, 0u64..400), 8)) {
            let mut log: BTreeMap<u64, usize> = BTreeMap::new();
            let mut purged = 0u64;
            let mut recent = RecentEntries::default();
            for op in ops {
                match model_step(&mut log, &mut purged, op) {
                    Step::Appended { first, last, size } => (first..=last).for_each(|i| recent.push(entry(i), size)),
                    Step::Truncated { from, .. } => recent.truncate_from(from),
                    Step::Purged { through } => recent.purge_through(through),
                }
                prop_assert!(recent.entries.len() <= 1 || recent.bytes <= RECENT_LOG_BYTES);
                prop_assert_eq!(recent.bytes, recent.entries.iter().map(|(_, s)| s).sum::<usize>());
                for &(start, len) in &probes {
                    if let Some(found) = recent.get(start) {
                        prop_assert_eq!(found.log_id.index, start);
                        prop_assert!(log.contains_key(&start), "the tail holds only what the log holds");
                    }
                    let end = start + len;
                    let stored: Vec<u64> = log.range(start..end.max(start)).map(|(i, _)| *i).collect();
                    if let Some(read) = recent.read(start, end, None) {
                        let got: Vec<u64> = read.iter().map(|e| e.log_id.index).collect();
                        prop_assert_eq!(&got, &stored);
                    }
                    if let Some(read) = recent.read(start, end, Some(MAX_APPEND_BYTES)) {
                        let mut bytes = 0usize;
                        let limited: Vec<u64> = log
                            .range(start..end.max(start))
                            .take_while(|(_, &size)| {
                                let fits = bytes == 0 || bytes + size <= MAX_APPEND_BYTES;
                                bytes += size;
                                fits
                            })
                            .map(|(i, _)| *i)
                            .collect();
                        let got: Vec<u64> = read.iter().map(|e| e.log_id.index).collect();
                        prop_assert_eq!(got, limited);
                    }
                }
            }
        }
    }

    proptest! {
        /// The bytes after an index never fall short of what the log holds after it (so a
        /// group over the limit always gets its snapshot), and overshoot it by at most the
        /// truncated entries and one append.
        #[test]
        fn appended_bytes_round_up_by_at_most_one_append(ops in proptest::collection::vec(op(), 1..60),
                                                          probes in proptest::collection::vec(0u64..400, 8)) {
            let mut log: BTreeMap<u64, usize> = BTreeMap::new();
            let mut purged = 0u64;
            let mut counted = AppendedBytes::default();
            let (mut truncated, mut largest_append) = (0u64, 0u64);
            for op in ops {
                match model_step(&mut log, &mut purged, op) {
                    Step::Appended { first, last, size } => {
                        let bytes = (last - first + 1) * size as u64;
                        counted.appended(last, bytes);
                        largest_append = largest_append.max(bytes);
                    }
                    Step::Truncated { from, bytes } => {
                        truncated += bytes;
                        counted.truncate_from(from);
                    }
                    Step::Purged { through } => counted.purge_through(through),
                }
                let all: u64 = log.values().map(|&size| size as u64).sum();
                prop_assert!(counted.after(None) >= all);
                for &probe in &probes {
                    let held: u64 = log.range(probe + 1..).map(|(_, &size)| size as u64).sum();
                    let after = counted.after(Some(probe));
                    prop_assert!(after >= held, "after {}: counted {} < held {}", probe, after, held);
                    if probe >= purged {
                        prop_assert!(after <= held + truncated + largest_append,
                            "after {}: counted {} > held {} + truncated {} + one append {}", probe, after, held, truncated, largest_append);
                    }
                }
                for pair in probes.windows(2) {
                    let (from, through) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
                    if from == through {
                        continue;
                    }
                    let held: u64 = log.range(from + 1..=through).map(|(_, &size)| size as u64).sum();
                    let between = counted.between(Some(from), Some(through));
                    prop_assert!(between >= held, "{}..={}: counted {} < held {}", from + 1, through, between, held);
                }
                prop_assert!(counted.marks.len() <= MAX_APPEND_MARKS);
            }
        }
    }

    /// Only the applied part of the log after a snapshot counts toward the next: entries
    /// appended but not applied yet would not be in it.
    #[test]
    fn a_snapshot_can_let_go_only_of_applied_entries() {
        let mut counted = AppendedBytes::default();
        for index in 1..=10u64 {
            counted.appended(index, 100);
        }
        assert_eq!(counted.between(Some(2), Some(6)), 400);
        assert_eq!(counted.between(None, Some(10)), 1_000);
        assert_eq!(counted.between(Some(6), Some(6)), 0, "nothing applied since the snapshot");
        assert_eq!(counted.between(Some(8), Some(6)), 0, "a snapshot past the applied index (installed)");
        assert_eq!(counted.between(Some(4), None), 0);
    }

    /// Past [`MAX_APPEND_MARKS`] appends the marks thin out but still cover the whole log, and
    /// the count at its end stays exact.
    #[test]
    fn appended_bytes_keep_covering_the_log_when_the_marks_thin_out() {
        let mut counted = AppendedBytes::default();
        for index in 1..=5_000u64 {
            counted.appended(index, 10);
        }
        assert!(counted.marks.len() <= MAX_APPEND_MARKS);
        assert_eq!(counted.after(None), 50_000);
        assert_eq!(counted.after(Some(5_000)), 0, "nothing after the last entry");
        for probe in [0u64, 1, 999, 2_500, 4_990] {
            let held = (5_000 - probe) * 10;
            let after = counted.after(Some(probe));
            // The oldest marks are the most thinned: a coarser grain there, a small share of
            // what follows them.
            assert!(after >= held && after <= held + held / 10 + 10, "after {probe}: {after} against {held}");
        }
    }

    /// Right after appends, reads of what was just appended come from the tail.
    #[test]
    fn just_appended_entries_are_served_from_the_tail() {
        let mut recent = RecentEntries::default();
        for index in 1..=10 {
            recent.push(entry(index), 100);
        }
        let read = recent.read(5, u64::MAX, None).expect("served from the tail");
        assert_eq!(read.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (5..=10).collect::<Vec<_>>());
        assert!(recent.read(0, 3, None).is_none(), "before the tail: storage");
        assert_eq!(recent.get(7).map(|e| e.log_id.index), Some(7));
        assert!(recent.get(0).is_none() && recent.get(11).is_none(), "outside the tail: none");
    }

    fn stored_log(count: u64) -> (tempfile::TempDir, LogStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), crate::storage::StorageOptions::default()).expect("opens");
        let mut batch = WriteBatch::new();
        for index in 1..=count {
            batch.put(ColumnFamily::RaftLog, keys::log_key(7, index), super::super::wire::encode_entry(&entry(index)));
        }
        storage.write(batch, Durability::Synced).expect("writes");
        (dir, LogStore::new(storage, 7))
    }

    /// Entries appended but not written yet by the group committer are only in the tail; a read
    /// that starts before the tail gets them after what storage holds.
    #[tokio::test]
    async fn reads_from_storage_end_with_the_unwritten_tail() {
        let (_dir, log) = stored_log(5);
        {
            let mut recent = log.recent.lock();
            for index in 3..=8 {
                recent.push(entry(index), 100);
            }
        }
        let mut reader = log.clone();
        let indexes = |entries: Vec<Entry>| entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
        let all = reader.try_get_log_entries(1..9).await.expect("reads");
        assert_eq!(indexes(all), (1..=8).collect::<Vec<_>>());
        let some = reader.try_get_log_entries(2..7).await.expect("reads");
        assert_eq!(indexes(some), (2..=6).collect::<Vec<_>>());
        let limited = reader.limited_get_log_entries(1, 9).await.expect("reads");
        assert_eq!(indexes(limited), (1..=5).collect::<Vec<_>>(), "storage's part first; the next call takes the rest");
    }

    /// A node never resumes leading a term after a restart: its own committed vote reads back
    /// uncommitted (same term, so it still refuses that term's other candidates); any other vote
    /// reads back as stored.
    #[tokio::test]
    async fn a_restarted_leader_reads_its_vote_back_uncommitted() {
        let (_dir, log) = stored_log(0);
        let mut plain = log.clone();
        let mut node_1 = log.clone().with_node(1);
        plain.save_vote(&Vote::new_committed(3, 1)).await.expect("saves");
        assert_eq!(node_1.read_vote().await.expect("reads"), Some(Vote::new(3, 1)));
        assert_eq!(plain.read_vote().await.expect("reads"), Some(Vote::new_committed(3, 1)), "no node given");
        let mut node_2 = log.clone().with_node(2);
        assert_eq!(node_2.read_vote().await.expect("reads"), Some(Vote::new_committed(3, 1)), "another's leadership");
        plain.save_vote(&Vote::new(4, 1)).await.expect("saves");
        assert_eq!(node_1.read_vote().await.expect("reads"), Some(Vote::new(4, 1)), "a vote for itself, not won");
    }

    /// Every truncation is counted, by every clone of the store (the proposer reads the count
    /// through its own clone), before the entries go; appends and purges are not truncations.
    #[tokio::test]
    async fn truncations_are_counted_before_the_entries_go() {
        let (_dir, log) = stored_log(10);
        let proposer = log.clone();
        let mut raft = log;
        assert_eq!(proposer.truncations(), 0);
        raft.purge(entry(2).log_id).await.expect("purges");
        assert_eq!(proposer.truncations(), 0, "a purge");
        raft.truncate(entry(8).log_id).await.expect("truncates");
        assert_eq!(proposer.truncations(), 1);
        assert_eq!(stored_indexes(&proposer), (3..=7).collect::<Vec<_>>());
        raft.truncate(entry(20).log_id).await.expect("truncates nothing stored");
        assert_eq!(proposer.truncations(), 2, "counted whether or not entries were there");
    }

    fn stored_indexes(log: &LogStore) -> Vec<u64> {
        log.stored_entries(0, u64::MAX - 1, usize::MAX).expect("reads").into_iter().map(|(i, _)| i).collect()
    }

    /// With archival on, a purge never deletes an entry past what is archived; without it, a
    /// purge deletes what openraft asks. A purge for a snapshot past the log's end still clears it.
    #[tokio::test]
    async fn purges_stop_at_the_archived_index() {
        let (_dir, log) = stored_log(10);
        let mut log = log.keep_unarchived();
        log.purge(entry(8).log_id).await.expect("purges");
        assert_eq!(stored_indexes(&log), (1..=10).collect::<Vec<_>>(), "nothing archived: nothing purged");
        log.archived_through(5);
        log.archived_through(3); // never lowers the floor
        log.purge(entry(8).log_id).await.expect("purges");
        assert_eq!(stored_indexes(&log), (6..=10).collect::<Vec<_>>());
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(5));
        log.purge(entry(30).log_id).await.expect("a snapshot past the end");
        assert!(stored_indexes(&log).is_empty());

        let (_dir, mut free) = stored_log(10);
        free.purge(entry(8).log_id).await.expect("purges");
        assert_eq!(stored_indexes(&free), vec![9, 10]);
        let bounded = free.stored_entries(9, 10, 1).expect("reads");
        assert_eq!(bounded.len(), 1, "a byte bound still returns one entry");
    }

    /// What a restart finds: `read_committed` of a fresh store over the same storage.
    async fn stored_committed(log: &LogStore) -> Option<u64> {
        let mut fresh = LogStore::new(log.storage.clone(), log.group);
        fresh.read_committed().await.expect("reads").map(|l| l.index)
    }

    /// A commit advance is written at once only when the last write is old; otherwise it
    /// rides in the next append's batch. The store answers the newest one either way, and a
    /// restart (a fresh store) finds the one written.
    #[tokio::test]
    async fn committed_ids_ride_in_the_next_append() {
        let (_dir, mut log) = stored_log(0);
        log.save_committed(Some(entry(3).log_id)).await.expect("saves");
        assert_eq!(stored_committed(&log).await, Some(3), "the first advance is written at once");
        log.save_committed(Some(entry(4).log_id)).await.expect("saves");
        log.save_committed(Some(entry(5).log_id)).await.expect("saves");
        assert_eq!(stored_committed(&log).await, Some(3), "advances within the interval wait for an append");
        assert_eq!(log.read_committed().await.expect("reads").map(|l| l.index), Some(5));

        let batch = log.append_batch([entry(6)]).expect("builds");
        log.storage.write(batch, Durability::Synced).expect("writes");
        assert_eq!(stored_committed(&log).await, Some(5), "the append carried the newest committed id");
        let batch = log.append_batch([entry(7)]).expect("builds");
        assert_eq!(batch.len(), 1, "nothing new to carry: the entry alone");

        // A group that stopped appending: once the last write is old, an advance is written.
        log.save_committed(Some(entry(6).log_id)).await.expect("saves");
        assert_eq!(stored_committed(&log).await, Some(5));
        log.committed.lock().saved_at = Some(std::time::Instant::now() - COMMITTED_SAVE_INTERVAL);
        log.save_committed(Some(entry(7).log_id)).await.expect("saves");
        assert_eq!(stored_committed(&log).await, Some(7));

        // At shutdown the newest one is written whatever its age.
        log.save_committed(Some(entry(8).log_id)).await.expect("saves");
        assert_eq!(stored_committed(&log).await, Some(7));
        log.save_latest_committed().expect("saves");
        assert_eq!(stored_committed(&log).await, Some(8));

        // A retired store (its replica being deleted) writes nothing more, even at shutdown.
        log.save_committed(Some(entry(9).log_id)).await.expect("saves");
        log.retire();
        log.committed.lock().saved_at = Some(std::time::Instant::now() - COMMITTED_SAVE_INTERVAL);
        log.save_committed(Some(entry(10).log_id)).await.expect("saves");
        log.save_latest_committed().expect("saves");
        let batch = log.append_batch([entry(8)]).expect("builds");
        assert_eq!(batch.len(), 1, "no committed id rides along");
        assert_eq!(stored_committed(&log).await, Some(8));
    }
}
