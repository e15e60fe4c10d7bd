//! Storage: the one RocksDB instance of a node, under `<data_dir>/db`.
//!
//! This is the only module that imports `rocksdb`. It owns the column families, the write path
//! (write batches, synchronous writes, and the group committer that turns many queued Raft log
//! appends into one write and one fsync), reads and range scans, the check of every table file at open
//! (damaged files are set aside by a RocksDB repair and reported as [`LostFile`]s), and the
//! storage metrics, and the fixed thread pools that run reads and applies off the async workers
//! (`pool`). Everything above
//! it (Raft log store, state machine, node identity) speaks in column families, byte keys and
//! [`WriteBatch`]es and never sees a RocksDB type.

pub mod disk;
mod group_commit;
pub mod metrics;
pub mod pool;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options, ReadOptions,
    WriteOptions, DB,
};

use crate::error::ErrorCode;
pub use group_commit::DurableCallback;
use group_commit::GroupCommitter;

/// The write-ahead log's size budget: four memtables' worth (64 MiB at the default 16 MiB
/// write buffer).
fn wal_budget(write_buffer_bytes: usize) -> u64 {
    (write_buffer_bytes as u64).saturating_mul(4)
}

/// Runs storage work (RocksDB reads and writes, fsyncs) so that it never stalls an async
/// worker: on the multi-threaded runtime the node runs on, the calling worker becomes a
/// blocking thread for the duration (`block_in_place`) and its other tasks move to a fresh
/// worker; elsewhere (single-threaded test runtimes, plain threads) it simply runs.
pub fn blocking<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// The column families of a node's database. Keys inside each are prefixed by group id where they
/// belong to a Raft group, so one family serves every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnFamily {
    /// Raft log entries: `group(4) | index(8)`.
    RaftLog,
    /// Raft hard state: vote, committed and purged log ids per group.
    RaftState,
    /// State machine data of each shard: assertions, events, idempotency keys, applied state.
    StateMachine,
    /// Secondary indexes of each shard (concept_path + predicate, concept listing, by agent,
    /// quarantine).
    Index,
    /// Node metadata: node id, cluster id, shard count, format version.
    Meta,
}

impl ColumnFamily {
    pub const ALL: [ColumnFamily; 5] = [
        ColumnFamily::RaftLog,
        ColumnFamily::RaftState,
        ColumnFamily::StateMachine,
        ColumnFamily::Index,
        ColumnFamily::Meta,
    ];

    /// How many families there are: [`ColumnFamily::ordinal`] is below it.
    pub const COUNT: usize = Self::ALL.len();

    /// The family's place in [`ColumnFamily::ALL`], for tables indexed by family (a new family
    /// fails to compile here until it has one).
    pub fn ordinal(self) -> usize {
        match self {
            ColumnFamily::RaftLog => 0,
            ColumnFamily::RaftState => 1,
            ColumnFamily::StateMachine => 2,
            ColumnFamily::Index => 3,
            ColumnFamily::Meta => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ColumnFamily::RaftLog => "raft_log",
            ColumnFamily::RaftState => "raft_state",
            ColumnFamily::StateMachine => "state_machine",
            ColumnFamily::Index => "index",
            ColumnFamily::Meta => "meta",
        }
    }
}

/// Errors of the storage layer. Every variant has one stable code.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb error during {operation}: {message}")]
    Engine { operation: &'static str, message: String },
    /// RocksDB found damaged data on disk (a block checksum mismatch, a truncated or missing
    /// file): what the message names is unreadable until it is repaired.
    #[error("damaged data on disk during {operation}: {message}")]
    EngineCorruption { operation: &'static str, message: String },
    #[error("data directory {path}: {message}")]
    DataDir { path: PathBuf, message: String },
    #[error("corrupt record in {cf}: {message}")]
    Corrupt { cf: &'static str, message: String },
    #[error("storage is shutting down")]
    Closed,
}

impl StorageError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StorageError::Engine { .. } => ErrorCode::StorageEngineError,
            StorageError::EngineCorruption { .. } => ErrorCode::StorageCorruptRecord,
            StorageError::DataDir { .. } => ErrorCode::StorageDataDirError,
            StorageError::Corrupt { .. } => ErrorCode::StorageCorruptRecord,
            StorageError::Closed => ErrorCode::StorageClosed,
        }
    }

    pub fn corrupt(cf: ColumnFamily, message: impl Into<String>) -> Self {
        StorageError::Corrupt { cf: cf.name(), message: message.into() }
    }

    /// Whether the data on disk is damaged (as opposed to the engine failing or closing).
    pub fn is_damage(&self) -> bool {
        matches!(self, StorageError::EngineCorruption { .. } | StorageError::Corrupt { .. })
    }
}

/// The `kind` label of a failed storage operation that is not a damaged read
/// (`metrics::ERROR_KINDS`).
fn error_kind(error: &rocksdb::Error) -> &'static str {
    match error.kind() {
        rocksdb::ErrorKind::Corruption => "corruption",
        rocksdb::ErrorKind::IOError => "io",
        _ => "other",
    }
}

fn engine_error(operation: &'static str, error: rocksdb::Error) -> StorageError {
    tracing::error!(operation, error = %error, "storage operation failed");
    // A read that fails on a damaged block or a file gone missing is damage; a write's I/O
    // error (a full disk, say) is not.
    let read = matches!(operation, "get" | "scan");
    if error.kind() == rocksdb::ErrorKind::Corruption || (read && error.kind() == rocksdb::ErrorKind::IOError) {
        metrics::STORAGE_OPERATION_ERRORS.with_label_values(&[operation, "corruption"]).inc();
        return StorageError::EngineCorruption { operation, message: error.into_string() };
    }
    metrics::STORAGE_OPERATION_ERRORS.with_label_values(&[operation, error_kind(&error)]).inc();
    StorageError::Engine { operation, message: error.into_string() }
}

/// A table file that RocksDB could not read whole at open, set aside (into `db/lost/`) by a
/// repair. Its keys, `first_key..=last_key` of `cf`, are gone from this node. A file too
/// damaged to open has no known family or range (`cf` is `None`): it may have held any key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostFile {
    pub cf: Option<ColumnFamily>,
    pub name: String,
    pub first_key: Vec<u8>,
    pub last_key: Vec<u8>,
}

impl LostFile {
    /// A loss whose family and range are unknown: it may have held any key.
    fn unknown(name: &str) -> Self {
        LostFile { cf: None, name: name.to_string(), first_key: Vec::new(), last_key: Vec::new() }
    }

    /// Whether `[from, to)` holds any key of the file's range (`last_key` included).
    pub fn overlaps(&self, cf: ColumnFamily, from: &[u8], to: &[u8]) -> bool {
        match self.cf {
            None => true,
            Some(family) => family == cf && self.first_key.as_slice() < to && self.last_key.as_slice() >= from,
        }
    }
}

/// After a repair, which registers every table file in level 0 ordered by its newest sequence
/// number, a point read could stop at an older version of a key in a file that counts as newer,
/// and the many level-0 files would stall writes: a full compaction of every family merges
/// them by sequence number before anything reads.
fn compact_after_repair(db: &DB) -> Result<(), StorageError> {
    for cf in ColumnFamily::ALL {
        let Some(handle) = db.cf_handle(cf.name()) else { continue };
        let mut options = rocksdb::CompactOptions::default();
        options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        db.compact_range_cf_opt(handle, None::<&[u8]>, None::<&[u8]>, &options);
    }
    tracing::info!("compacted every family after the repair");
    Ok(())
}

/// The first damage a full, checksum-verifying read of every column family meets, if any.
fn first_damage(db: &DB) -> Option<String> {
    for cf in ColumnFamily::ALL {
        let Some(handle) = db.cf_handle(cf.name()) else { continue };
        let mut read_options = ReadOptions::default();
        read_options.fill_cache(false);
        read_options.set_verify_checksums(true);
        // Keys a range deletion covers too (a dropped replica's, say): an iterator skips them,
        // but a compaction still reads their blocks, and a damaged one would stop every write.
        // The binding deprecates the option as a read optimization; here it is for coverage,
        // and RocksDB 10.4 still honors it (`damage_under_a_range_deletion_is_found_at_open`).
        #[allow(deprecated)]
        read_options.set_ignore_range_deletions(true);
        let mut iter = db.raw_iterator_cf_opt(handle, read_options);
        iter.seek_to_first();
        while iter.valid() {
            iter.next();
        }
        if let Err(error) = iter.status() {
            return Some(format!("{}: {error}", cf.name()));
        }
    }
    None
}

/// The names of the files in `dir` (none if it does not exist).
fn list_files(dir: &Path) -> std::collections::HashSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

/// The files of `before` that a repair set aside (absent from `after`). If the damage was found
/// and yet no file went (the repair could read them all: damage in a write-ahead log, say),
/// nothing is reported lost.
fn lost_after_repair(
    before: Vec<rocksdb::LiveFile>,
    after: &std::collections::HashSet<String>,
    damage: &str,
) -> Vec<LostFile> {
    let lost: Vec<LostFile> = before
        .into_iter()
        .filter(|f| !after.contains(&f.name))
        .filter_map(|f| {
            let cf = ColumnFamily::ALL.into_iter().find(|cf| cf.name() == f.column_family_name)?;
            let name = f.name.trim_start_matches('/').to_string();
            Some(match (f.start_key, f.end_key) {
                (Some(first_key), Some(last_key)) => LostFile { cf: Some(cf), name, first_key, last_key },
                _ => LostFile::unknown(&name),
            })
        })
        .collect();
    if lost.is_empty() {
        // Damage was seen and yet no table file went: where it was is unknown, so every key
        // counts as possibly lost (every replica is re-seeded) rather than none.
        tracing::error!(error = %damage, "the repair kept every table file; treating every key as possibly lost");
        return vec![LostFile::unknown("(none set aside)")];
    }
    lost
}

/// Tunables of the storage engine, taken from the `[storage]` config section.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Shared block cache for every column family.
    pub block_cache_bytes: usize,
    /// Memtable budget per column family.
    pub write_buffer_bytes: usize,
    /// Whether the Raft log is fsync'd before a write is acknowledged. Only tests and benchmarks
    /// that measure the rest of the stack should turn this off.
    pub fsync: bool,
    /// `testing.log_sync_delay_ms`: each group-commit round waits this long before its write
    /// and sync (tests only; zero otherwise).
    pub log_sync_delay: std::time::Duration,
    /// A block cache of its own for the `index` family (`storage.index_eviction_enabled`,
    /// `storage.index_max_memory_mb`): its blocks are evicted past this size and no longer
    /// compete with the claims data for the shared cache. `None`: it shares the block cache.
    pub index_cache_bytes: Option<usize>,
    /// Read every table file at open (`storage.verify_on_start`); see [`Storage::lost_files`].
    pub verify_on_start: bool,
    /// The free-space floor below which writes are refused ([`Storage::check_floor`]).
    pub disk_floor: disk::DiskFloor,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 16 << 20,
            fsync: true,
            log_sync_delay: std::time::Duration::ZERO,
            index_cache_bytes: None,
            verify_on_start: true,
            disk_floor: disk::DiskFloor::default(),
        }
    }
}

/// An atomic set of writes, possibly across column families.
#[derive(Default)]
pub struct WriteBatch {
    operations: Vec<BatchOperation>,
    /// Key and value bytes of every operation (a range delete: both bounds).
    payload_bytes: usize,
}

enum BatchOperation {
    Put(ColumnFamily, Vec<u8>, Vec<u8>),
    Delete(ColumnFamily, Vec<u8>),
    DeleteRange(ColumnFamily, Vec<u8>, Vec<u8>),
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, cf: ColumnFamily, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let (key, value) = (key.into(), value.into());
        self.payload_bytes += key.len() + value.len();
        self.operations.push(BatchOperation::Put(cf, key, value));
    }

    pub fn delete(&mut self, cf: ColumnFamily, key: impl Into<Vec<u8>>) {
        let key = key.into();
        self.payload_bytes += key.len();
        self.operations.push(BatchOperation::Delete(cf, key));
    }

    /// Deletes every key in `[from, to)`.
    pub fn delete_range(&mut self, cf: ColumnFamily, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        let (from, to) = (from.into(), to.into());
        self.payload_bytes += from.len() + to.len();
        self.operations.push(BatchOperation::DeleteRange(cf, from, to));
    }

    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }

    pub fn len(&self) -> usize {
        self.operations.len()
    }

    /// Adds `later`'s operations after this batch's, as if written after it.
    fn absorb(&mut self, later: WriteBatch) {
        self.payload_bytes += later.payload_bytes;
        if self.operations.is_empty() {
            self.operations = later.operations;
        } else {
            self.operations.extend(later.operations);
        }
    }
}

/// Writes `batch` to `db` atomically, synced when `sync`; counted in the storage metrics.
fn write_batch(db: &DB, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
    if batch.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let bytes = batch.payload_bytes;
    let handle = |cf: ColumnFamily| db.cf_handle(cf.name()).ok_or(StorageError::Closed);
    // RocksDB's batch is one buffer: sized up front, it is not copied as it grows. Each
    // operation adds a tag, a family id and two lengths (at most 16 bytes) to its key and value.
    let capacity = 12 + bytes + 16 * batch.operations.len();
    let mut rocks_batch = rocksdb::WriteBatch::with_capacity_bytes(capacity);
    for operation in key_ordered(batch.operations) {
        match operation {
            BatchOperation::Put(cf, k, v) => rocks_batch.put_cf(handle(cf)?, k, v),
            BatchOperation::Delete(cf, k) => rocks_batch.delete_cf(handle(cf)?, k),
            BatchOperation::DeleteRange(cf, from, to) => rocks_batch.delete_range_cf(handle(cf)?, from, to),
        }
    }
    let mut write_options = WriteOptions::default();
    write_options.set_sync(sync);
    metrics::OPS_PUT.inc();
    let result = db.write_opt(rocks_batch, &write_options).map_err(|e| engine_error("put", e));
    metrics::STORAGE_PUT_DURATION.observe(started.elapsed().as_secs_f64());
    metrics::STORAGE_WRITTEN_BYTES.inc_by(bytes as u64);
    result
}

/// The operations of a batch in key order within each family, writes to the same key in the
/// order given (a stable sort), when the batch has no range delete; otherwise as given, since a
/// range delete covers the writes before it and not those after.
///
/// A memtable (a skip list) written by one writer at a time remembers where its last insert
/// went, and an insert just after it searches only the levels below the gap; one far from it
/// searches from the top. (When RocksDB inserts a group of concurrent writers' batches in
/// parallel, each insert searches from the top, sorted or not; `memtable_insert_hint_per_batch`
/// would keep a position per batch, but RocksDB then fails a batch that writes one key twice.)
/// An apply's batch interleaves unrelated keys (a record, its agent and concept entries, a
/// request record): sorted, a batch of 1,000 assertions walks each family's memtable forwards
/// once. Measured on one node, 4 clients of 1,000-item batches: 77,004 and 79,761
/// assertions/s against 75,285 and 74,089, a gain within the spread of later runs
/// (docs/performance.md, "Issue 15, applies on a fixed pool, and fewer reads per write").
fn key_ordered(mut operations: Vec<BatchOperation>) -> Vec<BatchOperation> {
    if operations.len() > 2 && !operations.iter().any(|op| matches!(op, BatchOperation::DeleteRange(..))) {
        operations.sort_by(|a, b| a.position().cmp(&b.position()));
    }
    operations
}

impl BatchOperation {
    /// Family and key of a put or a point delete (a range delete: its start).
    fn position(&self) -> (u8, &[u8]) {
        match self {
            BatchOperation::Put(cf, key, _)
            | BatchOperation::Delete(cf, key)
            | BatchOperation::DeleteRange(cf, key, _) => (*cf as u8, key),
        }
    }
}

/// Whether a write must be on disk when the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In the RocksDB WAL buffer (memory, `manual_wal_flush`): lost on a crash of the process
    /// or of the machine until the next sync or WAL flush.
    Buffered,
    /// fsync'd before returning.
    Synced,
}

/// Engine statistics for `/v1/admin/storage/stats`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct StorageStats {
    pub total_bytes: u64,
    pub sst_file_count: u64,
    pub live_data_bytes: u64,
    pub pending_compaction_bytes: u64,
    pub memtable_bytes: u64,
    pub cache_memory_bytes: u64,
    /// The `index` family's own block cache (`storage.index_eviction_enabled`), else 0.
    pub index_cache_memory_bytes: u64,
    /// Bytes RocksDB wrote to disk (its write-ahead log, flushes and compactions) per byte of
    /// keys and values written to it, since the node started; 0 before the first write.
    pub write_amplification: f64,
    pub manual_compaction: ManualCompaction,
    pub estimated_keys: u64,
    pub column_families: Vec<ColumnFamilyStats>,
}

/// Compaction durations since the node started (RocksDB's `rocksdb.compaction.times.micros`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactionDurations {
    pub count: u64,
    pub sum_seconds: f64,
    /// (quantile, seconds) for the median, p95 and p99.
    pub quantiles: [(f64, f64); 3],
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct IndexFamilyStats {
    pub estimated_keys: u64,
    pub sst_bytes: u64,
    pub memory_bytes: u64,
}

/// Block cache traffic since the node started ([`Storage::cache_traffic`]).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CacheTraffic {
    pub hits: u64,
    pub misses: u64,
    pub inserted_bytes: u64,
    pub evicted_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ColumnFamilyStats {
    pub name: &'static str,
    pub estimated_keys: u64,
    pub live_data_bytes: u64,
    pub sst_bytes: u64,
}

/// A node's database. Cheap to share through `Arc`.
pub struct Storage {
    db: Arc<DB>,
    /// Kept for the statistics object RocksDB attached to it at open.
    db_options: Options,
    cache: Cache,
    /// The `index` family's own block cache, with `storage.index_eviction_enabled`.
    index_cache: Option<Cache>,
    path: PathBuf,
    options: StorageOptions,
    committer: GroupCommitter,
    /// When storage opened, and microseconds after that of the last Raft log append plus one
    /// (0: none yet) ([`Storage::last_log_append`]).
    opened: Instant,
    last_log_append_us: std::sync::atomic::AtomicU64,
    /// The manual compaction (`POST /v1/admin/storage/compact`): one at a time, with progress.
    manual_compaction: parking_lot::Mutex<ManualCompaction>,
    /// Table files found damaged at open and set aside.
    lost_files: Vec<LostFile>,
    /// The largest count of bytes seen leaving the block caches ([`Storage::cache_traffic`]).
    cache_bytes_left: std::sync::atomic::AtomicU64,
    /// The data dir's free space against the floor; sampled while `_disk_sampler` lives.
    disk: Arc<disk::DiskSpace>,
    _disk_sampler: std::sync::mpsc::Sender<()>,
}

/// See [`Storage::point_in_time`]. Reads verify block checksums and stay out of the block cache
/// (a backup reads everything once).
pub struct PointInTime<'a> {
    storage: &'a Storage,
    snapshot: rocksdb::Snapshot<'a>,
}

impl PointInTime<'_> {
    fn read_options(&self, upper_bound: Option<&[u8]>) -> ReadOptions {
        let mut read_options = ReadOptions::default();
        if let Some(to) = upper_bound {
            read_options.set_iterate_upper_bound(to.to_vec());
        }
        read_options.fill_cache(false);
        read_options.set_verify_checksums(true);
        read_options.set_snapshot(&self.snapshot);
        read_options
    }

    pub fn get(&self, cf: ColumnFamily, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        metrics::OPS_GET.inc();
        let handle = self.storage.handle(cf)?;
        self.storage.db.get_cf_opt(handle, key, &self.read_options(None)).map_err(|e| engine_error("get", e))
    }

    /// Calls `visit` on every key/value in `[from, to)`, as of the snapshot, until it returns
    /// `false`.
    pub fn for_each_in_range(
        &self,
        cf: ColumnFamily,
        from: &[u8],
        to: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        self.storage.scan_with(cf, from, self.read_options(Some(to)), visit)
    }
}

/// Marks a manual compaction as no longer running when dropped, if its run did not get to.
struct EndManualCompaction<'a>(&'a parking_lot::Mutex<ManualCompaction>);

impl Drop for EndManualCompaction<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if state.running {
            state.running = false;
            state.last_finished_at_us = Some(crate::model::id::now_us());
            state.last_error = Some("the compaction stopped unexpectedly".into());
        }
    }
}

/// What the node knows of its manual compactions: the one running, or the last one.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ManualCompaction {
    pub running: bool,
    /// Share of the run done, 0 to 1: the bytes (tables and memtables, measured at the start)
    /// of the column families compacted so far. 1 once a run has finished.
    pub progress: f64,
    /// Runs started since the node started.
    pub runs: u64,
    #[schema(required = true)]
    pub last_started_at_us: Option<u64>,
    #[schema(required = true)]
    pub last_finished_at_us: Option<u64>,
    /// The last run's error, if it failed.
    #[schema(required = true)]
    pub last_error: Option<String>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("path", &self.path).finish()
    }
}

impl Storage {
    /// Opens (creating if needed) the database under `<data_dir>/db`.
    /// The node's data directory (RocksDB lives in its `db/`).
    pub fn data_dir(&self) -> &Path {
        self.path.parent().unwrap_or(&self.path)
    }

    pub fn open(data_dir: &Path, options: StorageOptions) -> Result<Arc<Storage>, StorageError> {
        let path = data_dir.join("db");
        std::fs::create_dir_all(&path)
            .map_err(|e| StorageError::DataDir { path: path.clone(), message: e.to_string() })?;
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let index_cache = options.index_cache_bytes.map(Cache::new_lru_cache);
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.set_keep_log_file_num(5);
        // A write-ahead-log file can go only once every column family with writes in it has
        // flushed, and the small families (Raft state, node metadata) fill their memtables
        // slowly. Past this total, RocksDB flushes the families that hold the oldest file. It
        // bounds the log's disk use and what a restart after a crash replays: RocksDB's default
        // is 4x every family's memtable limit, about 3 GiB here, and 60 s of batch writes left
        // 2.7 GiB of log, with 9.5 s from a kill -9 to a healthy restart (81 MiB and 2.3 s with
        // this budget). `storage.write_buffer_mb` is at least 1, so the budget is never 0
        // (which RocksDB would read as "its default").
        db_options.set_max_total_wal_size(wal_budget(options.write_buffer_bytes));
        // On few cores, spinning and yielding while waiting to join a write group costs more than
        // it saves (it showed up as sched_yield in profiles); block instead.
        db_options.set_enable_write_thread_adaptive_yield(false);
        // A buffered write stays in RocksDB's WAL buffer instead of costing a `write` system call
        // of its own: the group-commit thread's `FlushWAL` writes everything buffered since the
        // last one and syncs it (a synced write flushes the buffer too, and so do a checkpoint, a
        // memtable switch and closing the database). The log is still a prefix of the writes, so
        // a crash never keeps an applied batch without the log entries before it. What changes
        // is that a process crash, not only a power failure, now loses buffered writes that no
        // sync has covered: applied state (re-applied from the log), repair and scrub progress
        // (redone) and the committed-id hint, none of which was ever acknowledged as durable.
        db_options.set_manual_wal_flush(true);
        // Statistics give the compaction durations (`stemedb_lsm_compaction_duration_seconds`);
        // the default level also times each RocksDB read and write with two clock reads.
        db_options.enable_statistics();
        let descriptors = || {
            ColumnFamily::ALL
                .iter()
                .map(|cf| {
                    let cache = match (cf, &index_cache) {
                        (ColumnFamily::Index, Some(index_cache)) => index_cache,
                        _ => &cache,
                    };
                    ColumnFamilyDescriptor::new(cf.name(), column_family_options(*cf, cache, &options))
                })
                .collect::<Vec<_>>()
        };
        let open = |descriptors| {
            DB::open_cf_descriptors(&db_options, &path, descriptors)
                .map_err(|e| StorageError::DataDir { path: path.clone(), message: e.into_string() })
        };
        let mut lost_files = Vec::new();
        let mut db = match DB::open_cf_descriptors(&db_options, &path, descriptors()) {
            Ok(db) => db,
            // A table file too damaged to open (its footer or index): repair, then open. Which
            // keys it held is unknown, so it counts as holding every key.
            Err(error) if options.verify_on_start && error.kind() == rocksdb::ErrorKind::Corruption => {
                let damage = error.into_string();
                tracing::error!(path = %path.display(), error = %damage, "the database does not open on damaged files; repairing it");
                let lost_dir = path.join("lost");
                let set_aside_before = list_files(&lost_dir);
                DB::repair(&db_options, &path).map_err(|e| StorageError::DataDir {
                    path: path.clone(),
                    message: format!("repair after damage ({damage}): {}", e.into_string()),
                })?;
                lost_files = list_files(&lost_dir)
                    .into_iter()
                    .filter(|name| name.ends_with(".sst") && !set_aside_before.contains(name))
                    .map(|name| LostFile::unknown(&name))
                    .collect();
                if lost_files.is_empty() {
                    // It did not open, and the repair set no table aside (a file missing, say):
                    // what was lost is unknown, so every replica is re-seeded.
                    lost_files.push(LostFile::unknown("(none set aside)"));
                }
                open(descriptors())?
            }
            Err(error) => {
                return Err(StorageError::DataDir { path: path.clone(), message: error.into_string() });
            }
        };
        if options.verify_on_start {
            let started = Instant::now();
            if let Some(damage) = first_damage(&db) {
                // A damaged table file must go: a compaction that reads it would stop every write
                // of the node. RocksDB's repair re-reads every table and sets aside (into `lost/`)
                // those it cannot read whole; the replicas whose keys they held are re-seeded
                // from their peers by the layers above (`Storage::lost_files`).
                tracing::error!(path = %path.display(), error = %damage, "damaged table file found at start; repairing the database");
                let before = db.live_files().map_err(|e| engine_error("live_files", e))?;
                drop(db);
                DB::repair(&db_options, &path).map_err(|e| StorageError::DataDir {
                    path: path.clone(),
                    message: format!("repair after damage ({damage}): {}", e.into_string()),
                })?;
                db = open(descriptors())?;
                let after: std::collections::HashSet<String> =
                    db.live_files().map_err(|e| engine_error("live_files", e))?.into_iter().map(|f| f.name).collect();
                lost_files.extend(lost_after_repair(before, &after, &damage));
            }
            if !lost_files.is_empty() {
                compact_after_repair(&db)?;
                if let Some(still) = first_damage(&db) {
                    return Err(StorageError::DataDir {
                        path: path.clone(),
                        message: format!("still damaged after a repair: {still}"),
                    });
                }
            }
            for lost in &lost_files {
                let family = lost.cf.map_or("unknown", ColumnFamily::name);
                metrics::LOST_FILES.with_label_values(&[family, &lost.name]).inc();
                tracing::error!(
                family,
                    file = %lost.name,
                    first_key = %hex::encode(&lost.first_key),
                    last_key = %hex::encode(&lost.last_key),
                    "damaged table file set aside in db/lost; its keys are gone from this node"
                );
            }
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                lost_files = lost_files.len(),
                "verified every table file"
            );
        }
        let db = Arc::new(db);
        let committer = GroupCommitter::start(db.clone(), options.fsync, options.log_sync_delay);
        let disk = disk::DiskSpace::new(&path, options.disk_floor);
        let disk_sampler = disk.start_sampling();
        tracing::info!(path = %path.display(), "storage opened");
        Ok(Arc::new(Storage {
            db,
            db_options,
            cache,
            index_cache,
            path,
            options,
            committer,
            opened: Instant::now(),
            last_log_append_us: std::sync::atomic::AtomicU64::new(0),
            manual_compaction: parking_lot::Mutex::new(ManualCompaction::default()),
            cache_bytes_left: std::sync::atomic::AtomicU64::new(0),
            lost_files,
            disk,
            _disk_sampler: disk_sampler,
        }))
    }

    /// The table files found damaged at open and set aside (empty when none was, or when
    /// `verify_on_start` is off). Every key in their ranges is gone from this node: the
    /// replicas that held any must be re-seeded.
    pub fn lost_files(&self) -> &[LostFile] {
        &self.lost_files
    }

    /// Refuses (and counts) a write that would grow the data while the data dir's free space is
    /// below the floor (`storage::disk`). Raft's own writes never ask.
    pub fn check_floor(&self) -> Result<(), disk::BelowFloor> {
        match self.disk.below_floor() {
            None => Ok(()),
            Some(below) => {
                metrics::WRITES_REFUSED_BELOW_FLOOR.inc();
                Err(below)
            }
        }
    }

    /// The data dir's free space as last sampled, against the floor.
    pub fn disk_space(&self) -> &disk::DiskSpace {
        &self.disk
    }

    fn handle(&self, cf: ColumnFamily) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db.cf_handle(cf.name()).ok_or(StorageError::Closed)
    }

    pub fn get(&self, cf: ColumnFamily, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        metrics::OPS_GET.inc();
        self.db.get_cf(self.handle(cf)?, key).map_err(|e| engine_error("get", e))
    }

    /// Point reads of many keys of one column family, in order.
    pub fn multi_get(&self, cf: ColumnFamily, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        let handle = self.handle(cf)?;
        metrics::OPS_GET.inc_by(keys.len() as u64);
        self.db
            .batched_multi_get_cf(handle, keys.iter(), false)
            .into_iter()
            .map(|r| r.map(|v| v.map(|s| s.to_vec())).map_err(|e| engine_error("get", e)))
            .collect()
    }

    /// Key/value pairs in `[from, to)`, ascending, at most `limit` of them.
    pub fn scan(
        &self,
        cf: ColumnFamily,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound(to.to_vec());
        metrics::OPS_SCAN.inc();
        let iter =
            self.db.iterator_cf_opt(self.handle(cf)?, read_options, IteratorMode::From(from, Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| engine_error("scan", e))?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Calls `visit` on every key/value in `[from, to)` until it returns `false`.
    pub fn for_each_in_range(
        &self,
        cf: ColumnFamily,
        from: &[u8],
        to: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound(to.to_vec());
        self.scan_with(cf, from, read_options, visit)
    }

    /// The walk of [`Storage::for_each_in_range`] and [`PointInTime::for_each_in_range`]: from
    /// `from` forward, bounded by `read_options` (upper bound, snapshot, caching).
    fn scan_with(
        &self,
        cf: ColumnFamily,
        from: &[u8],
        read_options: ReadOptions,
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        metrics::OPS_SCAN.inc();
        let iter =
            self.db.iterator_cf_opt(self.handle(cf)?, read_options, IteratorMode::From(from, Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(|e| engine_error("scan", e))?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    /// Like [`Storage::for_each_in_range`], over a consistent snapshot of the database:
    /// `taken` runs right after the snapshot is taken (so a caller holding a lock that keeps
    /// writers out can note what it needs and let them go on) and makes the walk's state, then
    /// `visit` sees the range as it was at that moment, however long the walk takes. Returns
    /// the state.
    pub fn for_each_in_snapshot<T>(
        &self,
        cf: ColumnFamily,
        from: &[u8],
        to: &[u8],
        taken: impl FnOnce() -> T,
        mut visit: impl FnMut(&mut T, &[u8], &[u8]) -> bool,
    ) -> Result<T, StorageError> {
        // A scrub reads everything once: the view keeps it out of the block cache.
        let view = self.point_in_time();
        let mut state = taken();
        view.for_each_in_range(cf, from, to, |k, v| visit(&mut state, k, v))?;
        Ok(state)
    }

    /// A consistent, read-only view of the whole database as it is now, over every column
    /// family (a RocksDB snapshot: nothing is copied, and writes go on). Backups read one
    /// shard's ranges and its applied state through it, so they agree with each other.
    pub fn point_in_time(&self) -> PointInTime<'_> {
        PointInTime { storage: self, snapshot: self.db.snapshot() }
    }

    /// Calls `visit(i, key, value)` on every key/value whose key starts with `prefixes[i]`, for
    /// each prefix in turn, until it returns `false`. One iterator seeks to each prefix: many
    /// small ranges cost one iterator's set-up (a view of every memtable and level), not one
    /// each.
    pub fn for_each_with_prefixes(
        &self,
        cf: ColumnFamily,
        prefixes: &[Vec<u8>],
        mut visit: impl FnMut(usize, &[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        metrics::OPS_SCAN.inc_by(prefixes.len() as u64);
        let mut iter = self.db.raw_iterator_cf_opt(self.handle(cf)?, ReadOptions::default());
        for (i, prefix) in prefixes.iter().enumerate() {
            iter.seek(prefix);
            while iter.valid() {
                let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
                if !key.starts_with(prefix) {
                    break;
                }
                if !visit(i, key, value) {
                    return iter.status().map_err(|e| engine_error("scan", e));
                }
                iter.next();
            }
            iter.status().map_err(|e| engine_error("scan", e))?;
        }
        Ok(())
    }

    /// Up to `limit` key/values of `[from, to)`, greatest key first.
    pub fn scan_reverse(
        &self,
        cf: ColumnFamily,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_lower_bound(from.to_vec());
        read_options.set_iterate_upper_bound(to.to_vec());
        metrics::OPS_SCAN.inc();
        let mut iter = self.db.raw_iterator_cf_opt(self.handle(cf)?, read_options);
        iter.seek_to_last();
        let mut out = Vec::new();
        while iter.valid() && out.len() < limit {
            if let (Some(k), Some(v)) = (iter.key(), iter.value()) {
                out.push((k.to_vec(), v.to_vec()));
            }
            iter.prev();
        }
        iter.status().map_err(|e| engine_error("scan", e))?;
        Ok(out)
    }

    /// The greatest key/value in `[from, to)`.
    pub fn last_in_range(
        &self,
        cf: ColumnFamily,
        from: &[u8],
        to: &[u8],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, StorageError> {
        Ok(self.scan_reverse(cf, from, to, 1)?.pop())
    }

    /// Writes a batch atomically.
    pub fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), StorageError> {
        write_batch(&self.db, batch, durability == Durability::Synced && self.options.fsync)
    }

    /// Hands a batch to the group committer, which writes it together with every other batch
    /// queued meanwhile, in one RocksDB write, syncs, and then calls `on_durable`. Writes from
    /// every shard that arrive while a sync is in progress share the next write and sync.
    ///
    /// The batch is **not readable when this returns**, only once `on_durable` runs: the caller
    /// keeps what it wrote readable meanwhile (the Raft log store's tail of recent entries) and
    /// must not write keys of the batch by another path before then. In return no async worker
    /// ever waits in RocksDB's write path (its memtable inserts, or its queue behind another
    /// thread's write) for an append.
    pub fn write_group_commit(&self, batch: WriteBatch, on_durable: DurableCallback) -> Result<(), StorageError> {
        let since_open = self.opened.elapsed().as_micros().min(u128::from(u64::MAX - 1)) as u64;
        self.last_log_append_us.store(since_open + 1, std::sync::atomic::Ordering::Relaxed);
        self.committer.enqueue(batch, on_durable);
        Ok(())
    }

    /// Waits until every batch handed to [`Self::write_group_commit`] before this call is
    /// written (and synced), whatever its outcome. A caller that deletes a stopped group's log
    /// calls it first, so that an append its Raft queued just before it stopped cannot land
    /// after the deletion. Blocks: call it on a blocking thread.
    pub fn settle_appends(&self) {
        let (done, settled) = std::sync::mpsc::sync_channel(1);
        self.committer.enqueue(
            WriteBatch::new(),
            Box::new(move |_| {
                let _ = done.send(());
            }),
        );
        // The committer calls every callback, even when it stops or a write fails; an error
        // here means it is gone, and then nothing queued is left to write.
        let _ = settled.recv();
    }

    /// When this node last appended to a Raft log (a group-committed write), if it has since its
    /// storage opened: a node that did so recently is taking writes (backups read slower then).
    pub fn last_log_append(&self) -> Option<Instant> {
        match self.last_log_append_us.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            us => Some(self.opened + std::time::Duration::from_micros(us - 1)),
        }
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> Result<(), StorageError> {
        metrics::OPS_SYNC.inc();
        self.db.flush_wal(self.options.fsync).map_err(|e| engine_error("sync", e))
    }

    /// Marks a manual compaction as running, unless one already is (then `Err` with its state).
    /// The caller then runs [`Self::run_manual_compaction`], typically on a blocking thread.
    pub fn begin_manual_compaction(&self) -> Result<(), ManualCompaction> {
        let mut state = self.manual_compaction.lock();
        if state.running {
            return Err(state.clone());
        }
        state.running = true;
        state.progress = 0.0;
        state.runs += 1;
        state.last_started_at_us = Some(crate::model::id::now_us());
        state.last_error = None;
        Ok(())
    }

    /// Compacts every column family in turn (flushing its memtables first), updating the
    /// progress after each; ends the run [`Self::begin_manual_compaction`] marked. `aggressive`
    /// also rewrites the bottommost level's tables, which an ordinary run leaves as they are:
    /// more I/O, and the space of everything deleted or overwritten since they were written
    /// comes back.
    pub fn run_manual_compaction(&self, aggressive: bool) -> Result<(), StorageError> {
        // However this ends, even by a panic, the run is over: later requests must not find it
        // still running.
        let _end = EndManualCompaction(&self.manual_compaction);
        let mut compact_options = rocksdb::CompactOptions::default();
        if aggressive {
            compact_options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::ForceOptimized);
        }
        let size = |cf| {
            self.property_u64(cf, "rocksdb.total-sst-files-size")
                + self.property_u64(cf, "rocksdb.cur-size-all-mem-tables")
        };
        let sizes: Vec<(ColumnFamily, u64)> = ColumnFamily::ALL.iter().map(|&cf| (cf, size(cf))).collect();
        let total = sizes.iter().map(|(_, bytes)| bytes).sum::<u64>().max(1);
        let mut done = 0;
        let outcome: Result<(), StorageError> = sizes.iter().try_for_each(|&(cf, bytes)| {
            self.db.compact_range_cf_opt::<&[u8], &[u8]>(self.handle(cf)?, None, None, &compact_options);
            done += bytes;
            self.manual_compaction.lock().progress = done as f64 / total as f64;
            Ok(())
        });
        let mut state = self.manual_compaction.lock();
        state.running = false;
        state.last_finished_at_us = Some(crate::model::id::now_us());
        match &outcome {
            Ok(()) => state.progress = 1.0,
            Err(error) => state.last_error = Some(error.to_string()),
        }
        outcome
    }

    /// The running manual compaction, or the last one.
    pub fn manual_compaction(&self) -> ManualCompaction {
        self.manual_compaction.lock().clone()
    }

    /// Bytes RocksDB wrote to disk (its write-ahead log, flushes and compactions) per byte of
    /// keys and values written to it, since the node started; 0 before the first write.
    pub fn write_amplification(&self) -> f64 {
        use rocksdb::statistics::Ticker;
        let ticker = |t| self.db_options.get_ticker_count(t);
        let written = ticker(Ticker::BytesWritten);
        if written == 0 {
            return 0.0;
        }
        let disk = ticker(Ticker::WalFileBytes) + ticker(Ticker::FlushWriteBytes) + ticker(Ticker::CompactWriteBytes);
        disk as f64 / written as f64
    }

    /// The block caches' traffic since the node started (both caches when the `index` family
    /// has its own): lookups that found the block, lookups that missed, bytes inserted, and bytes
    /// that left (evicted for room, or dropped with their table file). What left is what was
    /// inserted less what the caches hold now, kept from ever going down.
    pub fn cache_traffic(&self) -> CacheTraffic {
        use rocksdb::statistics::Ticker;
        let ticker = |t| self.db_options.get_ticker_count(t);
        let inserted = ticker(Ticker::BlockCacheBytesWrite);
        let held = self.cache_memory_bytes() + self.index_cache_memory_bytes();
        let ordering = std::sync::atomic::Ordering::AcqRel;
        let left = self.cache_bytes_left.fetch_max(inserted.saturating_sub(held), ordering);
        CacheTraffic {
            hits: ticker(Ticker::BlockCacheHit),
            misses: ticker(Ticker::BlockCacheMiss),
            inserted_bytes: inserted,
            evicted_bytes: left.max(inserted.saturating_sub(held)),
        }
    }

    fn property_u64(&self, cf: ColumnFamily, name: &str) -> u64 {
        self.handle(cf).ok().and_then(|h| self.db.property_int_value_cf(h, name).ok().flatten()).unwrap_or(0)
    }

    /// The secondary-index family: entries, bytes on disk, and the memory it holds (memtables
    /// plus table readers' index and filter blocks outside the block cache).
    pub fn index_stats(&self) -> IndexFamilyStats {
        let cf = ColumnFamily::Index;
        IndexFamilyStats {
            estimated_keys: self.property_u64(cf, "rocksdb.estimate-num-keys"),
            sst_bytes: self.property_u64(cf, "rocksdb.total-sst-files-size"),
            memory_bytes: self.property_u64(cf, "rocksdb.cur-size-all-mem-tables")
                + self.property_u64(cf, "rocksdb.estimate-table-readers-mem")
                + self.index_cache_memory_bytes(),
        }
    }

    /// Capacity of the `index` family's own block cache (`storage.index_max_memory_mb` with
    /// `storage.index_eviction_enabled`; 0 when it shares the block cache).
    pub fn index_cache_capacity_bytes(&self) -> u64 {
        self.options.index_cache_bytes.unwrap_or(0) as u64
    }

    /// Bytes held by the `index` family's own block cache (0 when it shares the block cache).
    pub fn index_cache_memory_bytes(&self) -> u64 {
        self.index_cache.as_ref().map_or(0, |cache| cache.get_usage() as u64)
    }

    /// Bytes held by the shared block cache.
    pub fn cache_memory_bytes(&self) -> u64 {
        self.cache.get_usage() as u64
    }

    /// Capacity of the block cache (`storage.max_cache_size_mb`).
    pub fn block_cache_capacity_bytes(&self) -> u64 {
        self.options.block_cache_bytes as u64
    }

    /// Bytes RocksDB estimates compaction must rewrite to bring every level under its target,
    /// over all column families.
    pub fn pending_compaction_bytes(&self) -> u64 {
        ColumnFamily::ALL.iter().map(|&cf| self.property_u64(cf, "rocksdb.estimate-pending-compaction-bytes")).sum()
    }

    /// Durations of the compactions RocksDB ran since the node started.
    pub fn compaction_durations(&self) -> CompactionDurations {
        let data = self.db_options.get_histogram_data(rocksdb::statistics::Histogram::CompactionTime);
        let seconds = |micros: f64| if micros.is_finite() { micros / 1e6 } else { 0.0 };
        CompactionDurations {
            count: data.count(),
            sum_seconds: data.sum() as f64 / 1e6,
            quantiles: [(0.5, seconds(data.median())), (0.95, seconds(data.p95())), (0.99, seconds(data.p99()))],
        }
    }

    pub fn stats(&self) -> StorageStats {
        let mut column_families = Vec::new();
        let (mut sst_files, mut live, mut memtable, mut keys, mut total) = (0, 0, 0, 0, 0);
        for cf in ColumnFamily::ALL {
            let cf_keys = self.property_u64(cf, "rocksdb.estimate-num-keys");
            let cf_live = self.property_u64(cf, "rocksdb.estimate-live-data-size");
            let cf_sst = self.property_u64(cf, "rocksdb.total-sst-files-size");
            sst_files += self.property_u64(cf, "rocksdb.num-files-at-level0")
                + (1..7).map(|l| self.property_u64(cf, &format!("rocksdb.num-files-at-level{l}"))).sum::<u64>();
            memtable += self.property_u64(cf, "rocksdb.cur-size-all-mem-tables");
            live += cf_live;
            keys += cf_keys;
            total += cf_sst;
            column_families.push(ColumnFamilyStats {
                name: cf.name(),
                estimated_keys: cf_keys,
                live_data_bytes: cf_live,
                sst_bytes: cf_sst,
            });
        }
        StorageStats {
            total_bytes: total + memtable,
            sst_file_count: sst_files,
            live_data_bytes: live,
            pending_compaction_bytes: self.pending_compaction_bytes(),
            memtable_bytes: memtable,
            cache_memory_bytes: self.cache_memory_bytes(),
            index_cache_memory_bytes: self.index_cache_memory_bytes(),
            write_amplification: self.write_amplification(),
            manual_compaction: self.manual_compaction(),
            estimated_keys: keys,
            column_families,
        }
    }

    /// Flushes memtables and syncs the WAL; called last in the shutdown sequence.
    pub fn close(&self) -> Result<(), StorageError> {
        self.committer.stop();
        self.sync()?;
        metrics::OPS_FLUSH.inc();
        // Every family's memtable (`DB::flush` alone flushes only the default family, leaving
        // the others to a write-ahead-log replay at the next start).
        for cf in ColumnFamily::ALL {
            self.db.flush_cf(self.handle(cf)?).map_err(|e| engine_error("flush", e))?;
        }
        Ok(())
    }
}

fn column_family_options(cf: ColumnFamily, cache: &Cache, options: &StorageOptions) -> Options {
    let mut cf_options = Options::default();
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    cf_options.set_block_based_table_factory(&table);
    cf_options.set_write_buffer_size(options.write_buffer_bytes);
    match cf {
        // Log entries are written once, read by followers soon after, and purged in ranges.
        ColumnFamily::RaftLog => cf_options.set_compression_type(DBCompressionType::None),
        ColumnFamily::StateMachine | ColumnFamily::Index => {
            cf_options.set_compression_type(DBCompressionType::Lz4);
            cf_options.set_level_zero_file_num_compaction_trigger(LEVEL0_COMPACTION_TRIGGER);
        }
        ColumnFamily::RaftState | ColumnFamily::Meta => cf_options.set_compression_type(DBCompressionType::Lz4),
    }
    cf_options
}

/// Level-0 files that start a compaction in the data families (RocksDB's default is 4).
///
/// Every flush of the state machine or index family spans the whole key range (16 shards'
/// records, idempotency keys, digests and applied states interleave), so each level-0
/// compaction rewrites all of the level below it, which holds everything written so far until
/// the data outgrows it. Twice as many files per compaction halve those rewrites. Measured on
/// one node, 4 clients of 1,000-assertion batches for 25 s: compaction CPU 6.5 against 9.3 s and
/// about 7% more assertions/s; three nodes' single writes and reads did not move
/// (docs/performance.md, "Issue 15, compactions of the data families"). Point reads check up to
/// twice as many level-0 files, each behind its bloom filter; writes slow down at 20 files, as
/// before.
const LEVEL0_COMPACTION_TRIGGER: i32 = 8;

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches are written in key order, yet what they leave is what their order says: the
    /// last of several writes to one key wins, a delete after a put removes it, a put after a
    /// delete restores it, and a range delete covers only the writes before it.
    #[test]
    fn key_ordered_batches_keep_the_meaning_of_their_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
        let (sm, index) = (ColumnFamily::StateMachine, ColumnFamily::Index);
        let build = || {
            let mut batch = WriteBatch::new();
            batch.put(index, b"z".to_vec(), b"1".to_vec());
            batch.put(sm, b"m".to_vec(), b"first".to_vec());
            batch.put(index, b"a".to_vec(), b"2".to_vec());
            batch.put(sm, b"m".to_vec(), b"second".to_vec());
            batch.put(sm, b"b".to_vec(), b"gone".to_vec());
            batch.delete(sm, b"b".to_vec());
            batch.delete(sm, b"c".to_vec());
            batch.put(sm, b"c".to_vec(), b"back".to_vec());
            batch.put(sm, b"a".to_vec(), b"kept".to_vec());
            batch
        };
        let ordered: Vec<(u8, Vec<u8>)> =
            key_ordered(build().operations).iter().map(|op| (op.position().0, op.position().1.to_vec())).collect();
        let mut sorted = ordered.clone();
        sorted.sort();
        assert_eq!(ordered, sorted, "written in (family, key) order");
        storage.write(build(), Durability::Buffered).expect("write");
        let get = |cf, key: &[u8]| storage.get(cf, key).expect("get");
        assert_eq!(get(sm, b"m").as_deref(), Some(&b"second"[..]));
        assert_eq!(get(sm, b"b"), None);
        assert_eq!(get(sm, b"c").as_deref(), Some(&b"back"[..]));
        assert_eq!(get(sm, b"a").as_deref(), Some(&b"kept"[..]));
        assert_eq!(get(index, b"a").as_deref(), Some(&b"2"[..]));
        assert_eq!(get(index, b"z").as_deref(), Some(&b"1"[..]));
        // With a range delete, the order stays: the put before it is covered, the one after not.
        let mut batch = WriteBatch::new();
        batch.put(sm, b"r2".to_vec(), b"covered".to_vec());
        batch.delete_range(sm, b"r".to_vec(), b"s".to_vec());
        batch.put(sm, b"r1".to_vec(), b"after".to_vec());
        storage.write(batch, Durability::Buffered).expect("write");
        assert_eq!(get(sm, b"r2"), None);
        assert_eq!(get(sm, b"r1").as_deref(), Some(&b"after"[..]));
    }

    /// A batch's byte count (its RocksDB buffer's size up front, and
    /// `stemedb_storage_written_bytes_total`) has every key and value: deletes' keys and range
    /// deletes' bounds too, and what an absorbed batch had.
    #[test]
    fn a_batch_counts_the_bytes_of_every_operation() {
        let sm = ColumnFamily::StateMachine;
        let mut batch = WriteBatch::new();
        batch.put(sm, b"k".to_vec(), b"vv".to_vec());
        batch.delete(sm, b"abc".to_vec());
        batch.delete_range(sm, b"de".to_vec(), b"fgh".to_vec());
        assert_eq!(batch.payload_bytes, 1 + 2 + 3 + 2 + 3);
        let mut later = WriteBatch::new();
        later.delete(sm, b"xy".to_vec());
        batch.absorb(later);
        assert_eq!(batch.payload_bytes, 13);
        assert_eq!(batch.len(), 4);
    }

    #[test]
    fn write_scan_and_last_in_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
        let mut batch = WriteBatch::new();
        for i in 0u8..10 {
            batch.put(ColumnFamily::RaftLog, vec![1, i], vec![i]);
        }
        storage.write(batch, Durability::Synced).expect("write");
        let all = storage.scan(ColumnFamily::RaftLog, &[1], &[2], usize::MAX).expect("scan");
        assert_eq!(all.len(), 10);
        assert_eq!(storage.scan(ColumnFamily::RaftLog, &[1, 3], &[1, 5], 10).expect("scan").len(), 2);
        let last = storage.last_in_range(ColumnFamily::RaftLog, &[1], &[2]).expect("last");
        assert_eq!(last, Some((vec![1, 9], vec![9])));
        let last = storage.last_in_range(ColumnFamily::RaftLog, &[1], &[1, 9]).expect("last");
        assert_eq!(last, Some((vec![1, 8], vec![8])));
        assert_eq!(storage.last_in_range(ColumnFamily::RaftLog, &[2], &[3]).expect("last"), None);
        // Column families are separate key spaces.
        assert_eq!(storage.get(ColumnFamily::Meta, &[1, 1]).expect("get"), None);
        let mut batch = WriteBatch::new();
        batch.delete_range(ColumnFamily::RaftLog, vec![1, 0], vec![1, 5]);
        storage.write(batch, Durability::Buffered).expect("delete");
        assert_eq!(storage.scan(ColumnFamily::RaftLog, &[1], &[2], usize::MAX).expect("scan").len(), 5);
    }

    #[test]
    fn compactions_are_counted_and_timed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
        assert_eq!(storage.compaction_durations().count, 0);
        // Two overlapping tables (each manual compaction flushes the memtable first), so the
        // second compaction has to merge them rather than move a file.
        for round in 0u8..2 {
            let mut batch = WriteBatch::new();
            for i in 0u8..100 {
                batch.put(ColumnFamily::StateMachine, vec![7, i], vec![round; 100]);
            }
            storage.write(batch, Durability::Synced).expect("write");
            compact(&storage);
        }
        let durations = storage.compaction_durations();
        assert!(durations.count >= 1, "{durations:?}");
        assert!(durations.sum_seconds > 0.0, "{durations:?}");
        assert!(durations.quantiles.iter().all(|&(_, seconds)| seconds >= 0.0), "{durations:?}");
    }

    #[test]
    fn group_commit_calls_back_after_sync_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
            assert_eq!(storage.last_log_append(), None);
            let before = Instant::now();
            let (tx, rx) = std::sync::mpsc::channel();
            for i in 0u8..50 {
                let mut batch = WriteBatch::new();
                batch.put(ColumnFamily::RaftLog, vec![i], vec![i]);
                let tx = tx.clone();
                storage.write_group_commit(batch, Box::new(move |r| tx.send(r.is_ok()).expect("send"))).expect("write");
            }
            for _ in 0..50 {
                assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).expect("callback"));
            }
            // The appends are what backups' pace watches; a plain write is not one.
            let last = storage.last_log_append().expect("appended");
            assert!(last + std::time::Duration::from_millis(1) >= before && last <= Instant::now());
            let mut batch = WriteBatch::new();
            batch.put(ColumnFamily::Meta, b"k".to_vec(), b"v".to_vec());
            storage.write(batch, Durability::Synced).expect("write");
            assert_eq!(storage.last_log_append(), Some(last));
            storage.close().expect("close");
        }
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("reopen");
        assert_eq!(storage.scan(ColumnFamily::RaftLog, &[0], &[255], usize::MAX).expect("scan").len(), 50);
    }

    /// The files of a live database copied aside, as a crash of the process would leave them.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::create_dir_all(to.join("db")).expect("mkdir");
        for file in std::fs::read_dir(from.join("db")).expect("read db dir") {
            let file = file.expect("entry");
            if file.file_name() != "LOCK" && file.file_type().expect("type").is_file() {
                std::fs::copy(file.path(), to.join("db").join(file.file_name())).expect("copy");
            }
        }
    }

    #[test]
    fn what_a_sync_covered_is_in_the_files_before_close() {
        // Buffered writes wait in RocksDB's WAL buffer (`manual_wal_flush`): only the files count
        // after a crash, so what a group-commit callback or a synced write promised must be in
        // them while the database is still open.
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0u8..20 {
            let mut batch = WriteBatch::new();
            batch.put(ColumnFamily::StateMachine, vec![b'a', i], vec![i]);
            storage.write(batch, Durability::Buffered).expect("buffered write");
            let mut batch = WriteBatch::new();
            batch.put(ColumnFamily::RaftLog, vec![i], vec![i; 100]);
            let tx = tx.clone();
            storage.write_group_commit(batch, Box::new(move |r| tx.send(r.is_ok()).expect("send"))).expect("append");
        }
        for _ in 0..20 {
            assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).expect("callback"));
        }
        let first = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), first.path());
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::Meta, b"synced".to_vec(), b"v".to_vec());
        storage.write(batch, Durability::Synced).expect("synced write");
        let second = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), second.path());
        drop(storage);

        let image = Storage::open(first.path(), StorageOptions::default()).expect("open the first image");
        assert_eq!(image.scan(ColumnFamily::RaftLog, &[0], &[255], usize::MAX).expect("scan").len(), 20);
        // Written before the appends that the callbacks covered: the log is a prefix.
        assert_eq!(image.scan(ColumnFamily::StateMachine, b"a", b"b", usize::MAX).expect("scan").len(), 20);
        drop(image);
        let image = Storage::open(second.path(), StorageOptions::default()).expect("open the second image");
        assert_eq!(image.get(ColumnFamily::Meta, b"synced").expect("get"), Some(b"v".to_vec()));
    }

    /// A manual compaction of every family, as `POST /v1/admin/storage/compact` runs it.
    fn compact(storage: &Storage) {
        storage.begin_manual_compaction().expect("none running");
        storage.run_manual_compaction(false).expect("compact");
    }

    /// `rows` keys of `cf` with random values of `value_bytes`: they do not compress, so the
    /// tables written are as large as the data.
    fn incompressible_rows(cf: ColumnFamily, rows: u32, value_bytes: usize) -> WriteBatch {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(rows));
        let mut batch = WriteBatch::new();
        for i in 0..rows {
            let value: Vec<u8> = (0..value_bytes).map(|_| rng.random::<u8>()).collect();
            batch.put(cf, i.to_be_bytes().to_vec(), value);
        }
        batch
    }

    /// Index blocks read through 4 MiB of index data: how much the shared cache and the
    /// index family's own cache hold afterwards.
    fn cache_usage_after_reading_the_index(index_cache_bytes: Option<usize>) -> (u64, u64, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StorageOptions { block_cache_bytes: 64 << 20, index_cache_bytes, ..StorageOptions::default() };
        let storage = Storage::open(dir.path(), options).expect("open");
        storage.write(incompressible_rows(ColumnFamily::Index, 16_384, 256), Durability::Synced).expect("write");
        compact(&storage);
        let rows = storage.scan(ColumnFamily::Index, &[], &[255; 5], usize::MAX).expect("scan");
        assert_eq!(rows.len(), 16_384);
        (storage.cache.get_usage() as u64, storage.index_cache_memory_bytes(), storage.index_stats().memory_bytes)
    }

    #[test]
    fn with_index_eviction_the_index_family_has_its_own_bounded_cache() {
        let (shared, own, _) = cache_usage_after_reading_the_index(None);
        assert!(shared > 2 << 20, "without it, index blocks fill the shared cache: {shared}");
        assert_eq!(own, 0);
        let (shared, own, index_memory) = cache_usage_after_reading_the_index(Some(1 << 20));
        assert!(shared < 256 << 10, "index blocks stay out of the shared cache: {shared}");
        assert!(own > 0 && own <= (1 << 20) + (64 << 10), "evicted past 1 MiB (give or take a block): {own}");
        assert!(index_memory >= own, "counted as index memory: {index_memory} < {own}");
    }

    #[test]
    fn a_manual_compaction_runs_once_at_a_time_and_reports_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
        assert_eq!(storage.write_amplification(), 0.0, "nothing written yet");
        storage.write(incompressible_rows(ColumnFamily::StateMachine, 2000, 200), Durability::Synced).expect("write");
        assert_eq!(storage.manual_compaction(), ManualCompaction::default());
        storage.begin_manual_compaction().expect("none running");
        let running = storage.begin_manual_compaction().expect_err("one at a time");
        assert!(running.running && running.runs == 1 && running.progress == 0.0, "{running:?}");
        storage.run_manual_compaction(true).expect("compact");
        let done = storage.manual_compaction();
        assert!(!done.running && done.progress == 1.0 && done.last_error.is_none(), "{done:?}");
        assert!(done.last_finished_at_us >= done.last_started_at_us, "{done:?}");
        storage.begin_manual_compaction().expect("the next run may start");
        // Written to the WAL and flushed to a table, each a little more than the data: the
        // WAL alone would be just over 1.
        let amplification = storage.write_amplification();
        assert!(amplification > 1.8, "{amplification}");
    }

    /// Writes 2,000 random 200-byte records for each of `groups` (4-byte group prefix) into
    /// one bottom-level table file, closes, and flips 16 bytes a quarter into that file.
    fn damaged_table(dir: &Path, groups: &[u32]) -> String {
        let storage = Storage::open(dir, StorageOptions::default()).expect("open");
        for group in groups {
            let mut batch = WriteBatch::new();
            for i in 0u32..2000 {
                let value: Vec<u8> = (0..200).map(|_| rand::random::<u8>()).collect();
                let mut key = group.to_be_bytes().to_vec();
                key.extend_from_slice(&i.to_be_bytes());
                batch.put(ColumnFamily::RaftLog, key, value);
            }
            storage.write(batch, Durability::Synced).expect("write");
        }
        storage.close().expect("close");
        let handle = storage.handle(ColumnFamily::RaftLog).expect("family");
        storage.db.compact_range_cf(handle, None::<&[u8]>, None::<&[u8]>);
        let files = storage.db.live_files().expect("live files");
        let tables: Vec<_> = files.iter().filter(|f| f.column_family_name == "raft_log").collect();
        assert_eq!(tables.len(), 1, "one table file: {files:?}");
        let name = tables[0].name.trim_start_matches('/').to_string();
        drop(storage);
        let path = dir.join("db").join(&name);
        let mut bytes = std::fs::read(&path).expect("read table");
        let at = bytes.len() / 4;
        for b in &mut bytes[at..at + 16] {
            *b ^= 0xff;
        }
        std::fs::write(&path, bytes).expect("write table");
        name
    }

    /// Tables indexed by family (an apply's staged writes) find each family at its place in
    /// `ALL`, every place taken once.
    #[test]
    fn each_family_is_at_its_ordinal_in_all() {
        for (at, cf) in ColumnFamily::ALL.iter().enumerate() {
            assert_eq!(cf.ordinal(), at, "{}", cf.name());
        }
        assert_eq!(ColumnFamily::COUNT, ColumnFamily::ALL.len());
    }

    /// The data families compact level 0 at [`LEVEL0_COMPACTION_TRIGGER`] files, as the options
    /// file RocksDB writes for the opened database records; the others keep RocksDB's 4.
    #[test]
    fn the_data_families_compact_level_zero_at_eight_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
        let db_dir = dir.path().join("db");
        let latest = std::fs::read_dir(&db_dir)
            .expect("db dir")
            .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|name| name.starts_with("OPTIONS-"))
            .max_by_key(|name| name["OPTIONS-".len()..].parse::<u64>().unwrap_or(0))
            .expect("an options file");
        let text = std::fs::read_to_string(db_dir.join(latest)).expect("read options");
        let trigger_of = |cf: ColumnFamily| -> Option<i32> {
            let section = format!("[CFOptions \"{}\"]", cf.name());
            let body = text.split(&section).nth(1)?.split("\n[").next()?;
            body.lines()
                .find_map(|line| line.trim().strip_prefix("level0_file_num_compaction_trigger="))
                .and_then(|value| value.parse().ok())
        };
        for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
            assert_eq!(trigger_of(cf), Some(LEVEL0_COMPACTION_TRIGGER), "{}", cf.name());
        }
        for cf in [ColumnFamily::RaftLog, ColumnFamily::RaftState, ColumnFamily::Meta] {
            assert_eq!(trigger_of(cf), Some(4), "{}", cf.name());
        }
        drop(storage);
    }

    #[test]
    fn a_damaged_table_file_is_set_aside_at_open_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = damaged_table(dir.path(), &[1, 2]);
        // Without the check, the damage surfaces on a read of group 1 (and would stop every
        // write once a compaction read it).
        let unchecked = Storage::open(dir.path(), StorageOptions { verify_on_start: false, ..Default::default() })
            .expect("open unchecked");
        assert!(unchecked.lost_files().is_empty());
        let read = unchecked.scan(ColumnFamily::RaftLog, &1u32.to_be_bytes(), &2u32.to_be_bytes(), usize::MAX);
        assert!(matches!(read, Err(ref e) if e.is_damage()), "{read:?}");
        drop(unchecked);

        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open checked");
        let lost = storage.lost_files().to_vec();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].name, name);
        assert_eq!(lost[0].cf, Some(ColumnFamily::RaftLog));
        let mut group1_start = 1u32.to_be_bytes().to_vec();
        group1_start.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(lost[0].first_key, group1_start, "the file's range, as it was");
        assert!(lost[0].overlaps(ColumnFamily::RaftLog, &2u32.to_be_bytes(), &3u32.to_be_bytes()));
        assert!(!lost[0].overlaps(ColumnFamily::RaftLog, &3u32.to_be_bytes(), &4u32.to_be_bytes()));
        assert!(dir.path().join("db/lost").join(&name).exists(), "set aside, not deleted");
        // Every read works (the file's keys are gone) and, after a full compaction, so do writes.
        for group in [1u32, 2] {
            let left = storage.scan(ColumnFamily::RaftLog, &group.to_be_bytes(), &(group + 1).to_be_bytes(), 10);
            assert_eq!(left.expect("scan").len(), 0);
        }
        let handle = storage.handle(ColumnFamily::RaftLog).expect("family");
        storage.db.compact_range_cf(handle, None::<&[u8]>, None::<&[u8]>);
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::RaftLog, vec![0, 0, 0, 3], vec![1]);
        storage.write(batch, Durability::Synced).expect("write after compaction");
        drop(storage);
        // A clean database opens with nothing lost.
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("reopen");
        assert!(storage.lost_files().is_empty());
    }

    #[test]
    fn block_cache_traffic_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
        let mut batch = WriteBatch::new();
        for i in 0u32..1000 {
            batch.put(ColumnFamily::StateMachine, i.to_be_bytes().to_vec(), vec![7; 100]);
        }
        storage.write(batch, Durability::Synced).expect("write");
        storage.close().expect("flush");
        let before = storage.cache_traffic();
        for _ in 0..2 {
            storage.get(ColumnFamily::StateMachine, &500u32.to_be_bytes()).expect("read").expect("found");
        }
        let after = storage.cache_traffic();
        assert!(after.misses > before.misses, "the first read of a flushed block misses: {after:?}");
        assert!(after.hits > before.hits, "the second one hits: {after:?}");
        assert!(after.inserted_bytes > before.inserted_bytes, "{after:?}");
        assert!(after.evicted_bytes <= after.inserted_bytes, "{after:?}");
    }

    #[test]
    fn damage_under_a_range_deletion_is_found_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = damaged_table(dir.path(), &[1, 2]);
        // The damaged keys are deleted by a range deletion in a newer file (a dropped replica,
        // say): a read skips them, yet a compaction would read the damaged block.
        let storage = Storage::open(dir.path(), StorageOptions { verify_on_start: false, ..Default::default() })
            .expect("open unchecked");
        let mut batch = WriteBatch::new();
        batch.delete_range(ColumnFamily::RaftLog, 1u32.to_be_bytes().to_vec(), 3u32.to_be_bytes().to_vec());
        storage.write(batch, Durability::Synced).expect("delete range");
        storage.close().expect("close");
        drop(storage);
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open checked");
        let lost: Vec<&str> = storage.lost_files().iter().map(|f| f.name.as_str()).collect();
        assert_eq!(lost, vec![name.as_str()], "the damaged file behind the range deletion");
    }

    #[test]
    fn a_table_file_too_damaged_to_open_is_set_aside_with_an_unknown_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = damaged_table(dir.path(), &[1]);
        // Its footer too: RocksDB cannot open the file at all.
        let path = dir.path().join("db").join(&name);
        let mut bytes = std::fs::read(&path).expect("read table");
        let len = bytes.len();
        bytes[len - 48..].fill(0);
        std::fs::write(&path, bytes).expect("write table");
        let unchecked = Storage::open(dir.path(), StorageOptions { verify_on_start: false, ..Default::default() });
        assert!(unchecked.is_err(), "the database does not open on it");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open checked");
        assert_eq!(storage.lost_files(), &[LostFile::unknown(&name)]);
        assert!(storage.lost_files()[0].overlaps(ColumnFamily::StateMachine, &[0], &[1]), "may have held any key");
    }

    #[test]
    fn the_write_ahead_log_stays_within_its_budget_while_a_small_family_holds_old_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write_buffer_bytes = 1 << 20;
        let options = StorageOptions { write_buffer_bytes, ..StorageOptions::default() };
        let storage = Storage::open(dir.path(), options).expect("open");
        // One small write to a family that is otherwise never written: its memtable alone keeps
        // every log file from the first on, unless the budget has it flushed.
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::Meta, b"held".to_vec(), b"1".to_vec());
        storage.write(batch, Durability::Buffered).expect("write meta");
        let written: u64 = 24 << 20;
        for _ in 0..written / (256 << 10) {
            storage
                .write(incompressible_rows(ColumnFamily::StateMachine, 256, 1024), Durability::Buffered)
                .expect("write");
        }
        let log_bytes = || -> u64 {
            std::fs::read_dir(dir.path().join("db"))
                .expect("list db")
                .filter_map(Result::ok)
                .filter(|entry| entry.file_name().to_string_lossy().ends_with(".log"))
                .filter_map(|entry| entry.metadata().ok())
                .map(|metadata| metadata.len())
                .sum()
        };
        // Flushes and file deletions run in the background: poll until they have caught up.
        let bound = wal_budget(write_buffer_bytes) + 2 * write_buffer_bytes as u64;
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while log_bytes() > bound && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let kept = log_bytes();
        assert!(kept <= bound, "{kept} bytes of write-ahead log kept after {written} written (bound {bound})");
        assert_eq!(storage.get(ColumnFamily::Meta, b"held").expect("get"), Some(b"1".to_vec()));
    }
}
