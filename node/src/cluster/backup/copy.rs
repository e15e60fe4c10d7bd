//! Copying this node's replica of one group into a backup store: a consistent view of the
//! replica (`Storage::point_in_time`: its records, indexes and applied state as of one
//! moment; applies go on), cut into files (`chunk`), each uploaded unless the store already
//! holds it. The records' digests are recomputed on the way and must equal the digests the
//! replica kept (both are written in the same batch as every applied entry): a replica whose
//! data does not match them is damaged and is not copied. The copy's files are made durable
//! together when it ends (`BackupStore::sync`), and reads are paced by [`ReadPacer`], slower
//! while the node takes writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};

use super::chunk::{FileBuilder, SealedFile, INDEX, STATE_MACHINE};
use super::manifest::{file_path, FileRef, GroupBackup};
use super::store::BackupStore;
use super::BackupError;
use crate::raft::restore::applied_summary;
use crate::raft::types::group_of_shard;
use crate::shard::digest::DigestWalk;
use crate::shard::keys;
use crate::storage::{ColumnFamily, Storage};

/// Running totals of one backup on this node (for progress and metrics).
#[derive(Debug, Default)]
pub struct Tally {
    pub groups_done: AtomicU64,
    pub bytes_read: AtomicU64,
    pub files_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub files_reused: AtomicU64,
    pub bytes_reused: AtomicU64,
}

/// Paces the replica reads of one node's backups over all the copies running at once: each
/// file's bytes get a slot on one virtual clock, and a walk that is ahead of it sleeps (on its
/// blocking thread) until its slot.
///
/// The pace adapts to the node's own load: `backup.max_read_mb_per_second` while the node is
/// idle, `backup.busy_read_mb_per_second` while it is taking writes (its Raft log took an
/// append within the last [`BUSY_WINDOW`]). A backup of an idle cluster runs at full pace; one
/// that overlaps writes yields the cores and the disk to them and takes longer.
pub struct ReadPacer {
    idle_bytes_per_second: f64,
    busy_bytes_per_second: f64,
    /// When the node last took a write (its last Raft log append).
    last_write: Box<dyn Fn() -> Option<std::time::Instant> + Send + Sync>,
    /// The slot of the next bytes read.
    next: parking_lot::Mutex<Option<std::time::Instant>>,
}

/// Writes seen within this long make the node busy.
pub const BUSY_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for ReadPacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPacer")
            .field("idle_bytes_per_second", &self.idle_bytes_per_second)
            .field("busy_bytes_per_second", &self.busy_bytes_per_second)
            .finish_non_exhaustive()
    }
}

impl ReadPacer {
    /// `idle_mb_per_second` 0: no limit when idle; `busy_mb_per_second` 0: the idle pace also
    /// when busy, and never faster than it. `last_write` is read at every file; it must be cheap.
    pub fn new(
        idle_mb_per_second: u64,
        busy_mb_per_second: u64,
        last_write: impl Fn() -> Option<std::time::Instant> + Send + Sync + 'static,
    ) -> ReadPacer {
        let rate = |mb: u64| (mb as f64) * 1048576.0;
        let busy = match (idle_mb_per_second, busy_mb_per_second) {
            (idle, 0) => idle,
            (0, busy) => busy,
            (idle, busy) => idle.min(busy),
        };
        ReadPacer {
            idle_bytes_per_second: rate(idle_mb_per_second),
            busy_bytes_per_second: rate(busy),
            last_write: Box::new(last_write),
            next: parking_lot::Mutex::new(None),
        }
    }

    /// Whether the node took a write within [`BUSY_WINDOW`] before `now`.
    fn busy(&self, now: std::time::Instant) -> bool {
        (self.last_write)().is_some_and(|at| now.saturating_duration_since(at) < BUSY_WINDOW)
    }

    /// Blocks until `bytes` more may be read.
    fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes, std::time::Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Gives `bytes` their slot as of `now`: how long to wait for it.
    fn reserve(&self, bytes: u64, now: std::time::Instant) -> std::time::Duration {
        let rate = if self.busy(now) { self.busy_bytes_per_second } else { self.idle_bytes_per_second };
        let mut next = self.next.lock();
        if rate <= 0.0 {
            *next = None;
            return std::time::Duration::ZERO;
        }
        let start = next.map_or(now, |n| n.max(now));
        *next = Some(start + std::time::Duration::from_secs_f64(bytes as f64 / rate));
        start.saturating_duration_since(now)
    }
}

/// What walking a replica found, besides its files.
struct Walked {
    index: u64,
    term: u64,
    voters: Vec<u64>,
    digest_root: String,
    digest_buckets: u32,
    records: u64,
    raw_bytes: u64,
}

fn label(shard: u16) -> String {
    if shard == crate::meta::META_SHARD {
        "meta".into()
    } else {
        format!("shard {shard}")
    }
}

/// Walks `shard`'s replica as of one moment, sending each finished file to `files`.
fn walk(
    storage: &Storage,
    shard: u16,
    compress: bool,
    pacer: &ReadPacer,
    files: tokio::sync::mpsc::Sender<SealedFile>,
) -> Result<Walked, BackupError> {
    let group = group_of_shard(shard);
    let failed = |message: String| BackupError::Failed { shard, message };
    let view = storage.point_in_time();
    let applied = view
        .get(ColumnFamily::StateMachine, &keys::applied_key(group))?
        .ok_or_else(|| failed("the replica has applied nothing".into()))?;
    let summary =
        applied_summary(&applied).ok_or_else(|| failed("the replica's applied state is unreadable".into()))?;
    let mut builder = FileBuilder::new(compress);
    let mut digests = DigestWalk::new(group);
    let (mut records, mut raw_bytes) = (0u64, 0u64);
    let mut receiver_gone = false;
    for (family, cf) in [(STATE_MACHINE, ColumnFamily::StateMachine), (INDEX, ColumnFamily::Index)] {
        let mut send = |file: SealedFile| {
            pacer.take(file.raw_bytes);
            if files.blocking_send(file).is_err() {
                receiver_gone = true;
            }
            !receiver_gone
        };
        view.for_each_in_range(cf, &keys::group_prefix(group), &keys::group_end(group), |key, value| {
            if family == STATE_MACHINE {
                digests.record(key, value);
            }
            records += 1;
            raw_bytes += (key.len() + value.len()) as u64;
            match builder.push(family, key, value) {
                Some(file) => send(file),
                None => true,
            }
        })?;
        // A family ends its last file, so the index's files never depend on the records'.
        if let Some(file) = builder.seal() {
            send(file);
        }
        if receiver_gone {
            return Err(failed("the upload stopped".into()));
        }
    }
    let Some(stored) = digests.stored() else {
        return Err(failed("the replica's digests are missing or incomplete".into()));
    };
    let recomputed = digests.recomputed(stored.count());
    if recomputed != stored {
        let differing = recomputed.differing(&stored).len();
        return Err(failed(format!(
            "the replica's records do not match its digests in {differing} of {} buckets: it is damaged",
            stored.count()
        )));
    }
    Ok(Walked {
        index: summary.index,
        term: summary.term,
        voters: summary.voters,
        digest_root: hex::encode(recomputed.tree().root()),
        digest_buckets: stored.count() as u32,
        records,
        raw_bytes,
    })
}

/// Uploads one file unless the store holds it already; `true` if it uploaded. The upload is
/// not durable until [`BackupStore::sync`].
async fn store_file(store: &BackupStore, file: SealedFile) -> Result<(FileRef, bool), BackupError> {
    let path = file_path(&file.sha256);
    let reference = FileRef { sha256: file.sha256.clone(), bytes: file.bytes.len() as u64, records: file.records };
    if reusable(store, &path, &file.bytes).await? {
        return Ok((reference, false));
    }
    store.put_unsynced(&path, file.bytes).await?;
    Ok((reference, true))
}

/// Whether the store's copy of a file can stand for `bytes`. A file cut short (a store that lost
/// power mid-write) is written again. In a directory its bytes must also still be these: a file
/// whose unsynced bytes a crash lost, or that the disk damaged since, or that cannot be read, is
/// written again rather than named by a manifest. (S3 is checked by size only: reading back
/// would cost a transfer, and its writes are durable when they return.)
async fn reusable(store: &BackupStore, path: &str, bytes: &[u8]) -> Result<bool, BackupError> {
    if store.size(path).await? != Some(bytes.len() as u64) {
        return Ok(false);
    }
    if store.directory().is_none() {
        return Ok(true);
    }
    match store.get(path).await {
        Ok(Some(stored)) => Ok(stored == bytes),
        Ok(None) => Ok(false),
        Err(error) => {
            tracing::warn!(path = %path, error = %error, "a stored backup file could not be read back; writing it again");
            Ok(false)
        }
    }
}

/// Counts a stored file, and remembers it if this copy wrote it.
fn kept(tally: &Tally, uploaded: &mut Vec<String>, reference: FileRef, wrote: bool) -> FileRef {
    if wrote {
        uploaded.push(file_path(&reference.sha256));
    }
    counted(tally, reference, wrote)
}

/// Counts a stored file in the backup's tally and the metrics.
fn counted(tally: &Tally, reference: FileRef, uploaded: bool) -> FileRef {
    let (count, bytes, outcome) = if uploaded {
        (&tally.files_uploaded, &tally.bytes_uploaded, "uploaded")
    } else {
        (&tally.files_reused, &tally.bytes_reused, "reused")
    };
    count.fetch_add(1, Ordering::Relaxed);
    bytes.fetch_add(reference.bytes, Ordering::Relaxed);
    super::metrics::FILE_BYTES.with_label_values(&[outcome]).inc_by(reference.bytes);
    reference
}

/// Copies this node's replica of `shard` (or the meta group) into `store`, with up to
/// `uploads` files in flight.
pub async fn copy_group(
    storage: Arc<Storage>,
    node_id: u64,
    store: BackupStore,
    shard: u16,
    compress: bool,
    uploads: usize,
    pacer: Arc<ReadPacer>,
    tally: Arc<Tally>,
) -> Result<GroupBackup, BackupError> {
    let (sender, mut files) = tokio::sync::mpsc::channel::<SealedFile>(uploads.max(1));
    let walking = tokio::task::spawn_blocking(move || walk(&storage, shard, compress, &pacer, sender));
    let mut in_flight = FuturesUnordered::new();
    let mut stored: Vec<(usize, FileRef)> = Vec::new();
    let mut next = 0usize;
    let mut failure = None;
    // The files this copy wrote, removed again if they cannot be made durable.
    let mut uploaded: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            file = files.recv(), if in_flight.len() < uploads.max(1) && failure.is_none() => {
                let Some(file) = file else { break };
                tally.bytes_read.fetch_add(file.raw_bytes, Ordering::Relaxed);
                let (store, position) = (store.clone(), next);
                next += 1;
                in_flight.push(async move { (position, store_file(&store, file).await) });
            }
            Some((position, result)) = in_flight.next(), if !in_flight.is_empty() => match result {
                Ok((reference, wrote)) => stored.push((position, kept(&tally, &mut uploaded, reference, wrote))),
                Err(error) => {
                    failure = Some(error);
                    // Closing the receiver stops the walk at its next file.
                    files.close();
                }
            },
            else => break,
        }
    }
    while let Some((position, result)) = in_flight.next().await {
        match result {
            Ok((reference, wrote)) => stored.push((position, kept(&tally, &mut uploaded, reference, wrote))),
            Err(error) => failure = failure.or(Some(error)),
        }
    }
    let walked = walking.await.map_err(|e| BackupError::Failed { shard, message: format!("the copy stopped: {e}") });
    if let Some(error) = failure {
        return Err(error);
    }
    let walked = walked??;
    // The files must be durable before a manifest names them: also those this copy reused,
    // which an earlier attempt may have written and not synced (their bytes are intact in the
    // page cache). A sync with nothing to write costs little.
    if let Err(error) = store.sync().await {
        // Pages that failed to reach the disk may stay readable: remove what this copy wrote,
        // so that no later backup reuses it.
        for path in &uploaded {
            if let Err(e) = store.delete(path).await {
                tracing::warn!(path = %path, error = %e, "removing a backup file that could not be synced failed");
            }
        }
        return Err(error);
    }
    stored.sort_by_key(|(position, _)| *position);
    tally.groups_done.fetch_add(1, Ordering::Relaxed);
    tracing::info!(group = %label(shard), index = walked.index, files = stored.len(), records = walked.records, "replica copied into the backup");
    Ok(GroupBackup {
        shard,
        node: node_id,
        applied_index: walked.index,
        applied_term: walked.term,
        voters: walked.voters,
        digest_root: walked.digest_root,
        digest_buckets: walked.digest_buckets,
        records: walked.records,
        raw_bytes: walked.raw_bytes,
        files: stored.into_iter().map(|(_, reference)| reference).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;

    /// A pacer whose node last took a write at the time in the returned cell (None: never).
    fn pacer(idle: u64, busy: u64) -> (ReadPacer, Arc<parking_lot::Mutex<Option<Instant>>>) {
        let last_write = Arc::new(parking_lot::Mutex::new(None));
        let seen = last_write.clone();
        (ReadPacer::new(idle, busy, move || *seen.lock()), last_write)
    }

    #[test]
    fn an_idle_node_reads_at_the_full_pace_and_a_busy_one_at_the_busy_pace() {
        let (pacer, last_write) = pacer(16, 2);
        let t0 = Instant::now();
        // Idle: 16 MiB take a second of slots, so the next MiB waits a second.
        assert_eq!(pacer.reserve(16 * MIB, t0), Duration::ZERO);
        assert_eq!(pacer.reserve(MIB, t0), Duration::from_secs(1));
        // The node takes a write: a MiB now takes half a second of slots.
        let t1 = t0 + Duration::from_millis(1062) + Duration::from_micros(500);
        *last_write.lock() = Some(t1);
        assert_eq!(pacer.reserve(MIB, t1), Duration::ZERO);
        assert_eq!(pacer.reserve(MIB, t1), Duration::from_millis(500));
        // Still busy within the window of that write, with no new one.
        let t2 = t1 + BUSY_WINDOW - Duration::from_millis(1);
        assert_eq!(pacer.reserve(MIB, t2), Duration::from_millis(1));
        assert_eq!(pacer.reserve(MIB, t2), Duration::from_millis(501));
        // No write for a whole window: the full pace again.
        let t3 = t1 + BUSY_WINDOW + Duration::from_secs(5);
        assert_eq!(pacer.reserve(16 * MIB, t3), Duration::ZERO);
        assert_eq!(pacer.reserve(MIB, t3), Duration::from_secs(1));
    }

    #[test]
    fn writes_long_before_the_backup_leave_the_full_pace() {
        let (pacer, last_write) = pacer(16, 2);
        let now = Instant::now() + Duration::from_secs(60);
        *last_write.lock() = Some(now - BUSY_WINDOW - Duration::from_millis(1));
        assert_eq!(pacer.reserve(16 * MIB, now), Duration::ZERO);
        assert_eq!(pacer.reserve(MIB, now), Duration::from_secs(1));
    }

    #[test]
    fn the_busy_pace_is_never_faster_than_the_idle_one_and_zero_means_no_limit() {
        let busy_reserve = |idle, busy| {
            let (pacer, last_write) = pacer(idle, busy);
            let now = Instant::now();
            *last_write.lock() = Some(now);
            pacer.reserve(4 * MIB, now);
            pacer.reserve(MIB, now)
        };
        // A busy pace above the idle one is capped at it; 0 is the idle pace.
        assert_eq!(busy_reserve(4, 8), Duration::from_secs(1));
        assert_eq!(busy_reserve(4, 0), Duration::from_secs(1));
        // No idle limit: the busy pace alone applies when busy; no limit at all when both are 0.
        assert_eq!(busy_reserve(0, 2), Duration::from_secs(2));
        assert_eq!(busy_reserve(0, 0), Duration::ZERO);
        let (pacer, _) = pacer(0, 2);
        let now = Instant::now();
        assert_eq!(pacer.reserve(64 * MIB, now), Duration::ZERO);
        assert_eq!(pacer.reserve(MIB, now), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_directory_file_is_reused_only_while_its_bytes_read_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BackupStore::open(&dir.path().display().to_string(), &Default::default(), true).expect("open");
        let mut builder = FileBuilder::new(true);
        builder.push(STATE_MACHINE, b"key", b"value");
        let file = builder.seal().expect("a file");
        let on_disk = dir.path().join(file_path(&file.sha256));
        let (reference, uploaded) = store_file(&store, file.clone()).await.expect("store");
        assert!(uploaded);
        store.sync().await.expect("sync");
        assert_eq!(std::fs::read(&on_disk).expect("read"), file.bytes);
        // Stored and intact: reused.
        assert!(!store_file(&store, file.clone()).await.expect("store").1);
        // The same size with one byte changed (a crash before the sync, or the disk): written again.
        let mut damaged = file.bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x01;
        std::fs::write(&on_disk, &damaged).expect("damage");
        assert!(store_file(&store, file.clone()).await.expect("store").1);
        assert_eq!(std::fs::read(&on_disk).expect("read"), file.bytes);
        // Cut short: written again.
        std::fs::write(&on_disk, &file.bytes[..3]).expect("truncate");
        assert!(store_file(&store, file.clone()).await.expect("store").1);
        assert_eq!(reference.bytes, file.bytes.len() as u64);
    }
}
