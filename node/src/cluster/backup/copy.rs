//! Copying this node's replica of one group into a backup store: a consistent view of the
//! replica (`Storage::point_in_time`: its records, indexes and applied state as of one
//! moment; applies go on), cut into files (`chunk`), each uploaded unless the store already
//! holds it. The records' digests are recomputed on the way and must equal the digests the
//! replica kept (both are written in the same batch as every applied entry): a replica whose
//! data does not match them is damaged and is not copied.

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

/// Paces the replica reads of one node's backups to `backup.max_read_mb_per_second`, over all
/// the copies running at once: each file's bytes get a slot on one virtual clock, and a walk
/// that is ahead of it sleeps (on its blocking thread) until its slot.
#[derive(Debug)]
pub struct ReadPacer {
    bytes_per_second: f64,
    next: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl ReadPacer {
    /// `mb_per_second` 0: no limit.
    pub fn new(mb_per_second: u64) -> ReadPacer {
        ReadPacer { bytes_per_second: (mb_per_second as f64) * 1048576.0, next: parking_lot::Mutex::new(None) }
    }

    /// Blocks until `bytes` more may be read.
    fn take(&self, bytes: u64) {
        if self.bytes_per_second <= 0.0 {
            return;
        }
        let wait = {
            let mut next = self.next.lock();
            let now = std::time::Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + std::time::Duration::from_secs_f64(bytes as f64 / self.bytes_per_second));
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
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

/// Uploads one file unless the store holds it already; `true` if it uploaded.
async fn store_file(store: &BackupStore, file: SealedFile) -> Result<(FileRef, bool), BackupError> {
    let path = file_path(&file.sha256);
    let reference = FileRef { sha256: file.sha256.clone(), bytes: file.bytes.len() as u64, records: file.records };
    // A file cut short (a store that lost power mid-write) is written again, not reused.
    if store.size(&path).await? == Some(reference.bytes) {
        return Ok((reference, false));
    }
    store.put(&path, file.bytes).await?;
    Ok((reference, true))
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
                Ok((reference, uploaded)) => stored.push((position, counted(&tally, reference, uploaded))),
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
            Ok((reference, uploaded)) => stored.push((position, counted(&tally, reference, uploaded))),
            Err(error) => failure = failure.or(Some(error)),
        }
    }
    let walked = walking.await.map_err(|e| BackupError::Failed { shard, message: format!("the copy stopped: {e}") });
    if let Some(error) = failure {
        return Err(error);
    }
    let walked = walked??;
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
