//! The Raft log store of one group: entries, vote, committed and purged log ids in the node's
//! RocksDB. Appends are group-committed: readable at once, acknowledged to openraft only after
//! the fsync that covers them (see `storage::group_commit`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote};

use super::types::{Entry, GroupId, LogId, NodeId, StorageIoError, TypeConfig};
use crate::shard::keys;
use crate::storage::blocking;
use crate::storage::read_pool::read_pool;
use crate::storage::{ColumnFamily, Durability, Storage, WriteBatch};

const VOTE_TAG: u8 = b'v';
const COMMITTED_TAG: u8 = b'c';
const PURGED_TAG: u8 = b'p';

/// Log store of one Raft group. Cloning gives a reader over the same log.
#[derive(Clone)]
pub struct LogStore {
    storage: Arc<Storage>,
    group: GroupId,
}

pub(crate) fn read_error(e: impl std::error::Error + 'static) -> StorageIoError {
    StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Read, openraft::AnyError::new(&e)).into()
}

pub(crate) fn write_error(e: impl std::error::Error + 'static) -> StorageIoError {
    StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, openraft::AnyError::new(&e)).into()
}

impl LogStore {
    pub fn new(storage: Arc<Storage>, group: GroupId) -> LogStore {
        LogStore { storage, group }
    }

    fn read_state<T: serde::de::DeserializeOwned>(&self, tag: u8) -> Result<Option<T>, StorageIoError> {
        let Some(bytes) =
            self.storage.get(ColumnFamily::RaftState, &keys::state_key(self.group, tag)).map_err(read_error)?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(read_error)
    }

    fn state_put<T: serde::Serialize>(&self, batch: &mut WriteBatch, tag: u8, value: &T) -> Result<(), StorageIoError> {
        let bytes = serde_json::to_vec(value).map_err(write_error)?;
        batch.put(ColumnFamily::RaftState, keys::state_key(self.group, tag), bytes);
        Ok(())
    }

    /// When the client command at `index` was proposed, if that entry is a client command.
    pub fn proposed_at_us(&self, index: u64) -> Result<Option<u64>, StorageIoError> {
        let Some(bytes) =
            self.storage.get(ColumnFamily::RaftLog, &keys::log_key(self.group, index)).map_err(read_error)?
        else {
            return Ok(None);
        };
        let entry = Self::decode(&bytes)?;
        Ok(match entry.payload {
            openraft::EntryPayload::Normal(command) => Some(command.proposed_at_us()),
            _ => None,
        })
    }

    fn decode(bytes: &[u8]) -> Result<Entry, StorageIoError> {
        serde_json::from_slice(bytes).map_err(read_error)
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
        let end = match range.end_bound() {
            Bound::Included(&i) => keys::log_key(self.group, i.saturating_add(1)),
            Bound::Excluded(&i) => keys::log_key(self.group, i),
            Bound::Unbounded => keys::group_end(self.group),
        };
        let (storage, from) = (self.storage.clone(), keys::log_key(self.group, start));
        // Entries to apply or replicate: on the storage read pool, like every request-path read.
        let rows = read_pool()
            .run_or_block(move || storage.scan(ColumnFamily::RaftLog, &from, &end, usize::MAX))
            .await
            .map_err(read_error)?;
        rows.iter().map(|(_, v)| Self::decode(v)).collect()
    }

    /// What replication sends in one AppendEntries: entries from `start`, at least one, while
    /// their stored size stays under [`MAX_APPEND_BYTES`]. openraft gives each AppendEntries
    /// one heartbeat interval; a byte bound, not an entry count, keeps any backlog moving.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageIoError> {
        let (from, to) = (keys::log_key(self.group, start), keys::log_key(self.group, end));
        let storage = self.storage.clone();
        // A far-behind follower's entries come from disk.
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
        blocking(|| self.storage.write(batch, Durability::Synced)).map_err(write_error)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageIoError> {
        self.read_state(VOTE_TAG)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageIoError> {
        let mut batch = WriteBatch::new();
        self.state_put(&mut batch, COMMITTED_TAG, &committed)?;
        // Buffered (a memtable insert, on every commit advance): inline, like `append`.
        self.storage.write(batch, Durability::Buffered).map_err(write_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageIoError> {
        Ok(self.read_state::<Option<LogId>>(COMMITTED_TAG)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageIoError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::new();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(write_error)?;
            batch.put(ColumnFamily::RaftLog, keys::log_key(self.group, entry.log_id.index), bytes);
        }
        // A buffered write into the memtable (microseconds); the fsync that makes it durable
        // runs on the group-commit thread, never here.
        self.storage
            .write_group_commit(batch, Box::new(move |result| callback.log_io_completed(result)))
            .map_err(write_error)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageIoError> {
        let mut batch = WriteBatch::new();
        batch.delete_range(ColumnFamily::RaftLog, keys::log_key(self.group, log_id.index), keys::group_end(self.group));
        blocking(|| self.storage.write(batch, Durability::Synced)).map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageIoError> {
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
