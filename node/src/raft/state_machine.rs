//! The adapter from openraft's state machine trait to a shard's state (`crate::shard`): it keeps
//! what openraft asks the state machine to remember (the last applied log id and membership,
//! in the same write batch as the data they describe), hands committed commands to
//! `shard::apply::Applier` at their (index, term) position, builds, streams and installs
//! snapshots (file format in `shard::snapshot`), and translates the shard's errors into
//! openraft's storage errors.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::metrics as raft_metrics;
use super::types::{group_of_shard, Entry, GroupId, LogId, NodeId, ShardResponse, StorageIoError, TypeConfig};
use crate::meta::policy::Policy;
use crate::meta::{MetaState, META_SHARD};
use crate::shard::apply::{Applicable, Applier, ApplyError, Position};
use crate::shard::progress::AppliedProgress;
use crate::shard::{digest, keys, snapshot};
use crate::storage::{ColumnFamily, Durability, Storage, WriteBatch};

/// The longest an anti-entropy repair may stop a replica's applies (`AppliedProgress::gate`).
const MAX_REPAIR_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// What the state machine persists about itself, in the same batch as the data it describes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct AppliedState {
    pub(super) last_applied: Option<LogId>,
    pub(super) membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// The last `asserted_at` handed out: keeps time monotonic per shard across leaders.
    pub(super) clock_us: u64,
}

/// The adapter's side of [`AppliedProgress`]: it knows openraft's log ids.
trait Announce {
    fn announce_applied(&self, log_id: Option<LogId>);
}

impl Announce for AppliedProgress {
    /// Announces that everything up to `log_id` is applied. Called last by apply and snapshot
    /// install: a read barrier that sees the index (ShardSet::read_barrier) reads everything
    /// applied so far, the published metadata and policy included.
    fn announce_applied(&self, log_id: Option<LogId>) {
        self.applied_index.store(log_id.map(|l| l.index).unwrap_or(0), Ordering::Release);
        self.applied_at_us.store(crate::model::id::now_us(), Ordering::Release);
    }
}

pub struct ShardStateMachine {
    storage: Arc<Storage>,
    shard: u16,
    group: GroupId,
    state: AppliedState,
    progress: Arc<AppliedProgress>,
    /// Applies committed commands to the shard's ranges; owns the shard clock and, for the
    /// meta group, the cluster metadata.
    /// `None` only while a run is on the apply pool, or if a run never came back from it (its
    /// job panicked, which panics this task too, or the apply future was dropped mid-run).
    applier: Option<Applier>,
    /// `<data_dir>/snapshots`: the group's last snapshot and any being received.
    snapshot_dir: PathBuf,
    /// The file openraft is writing a snapshot from the leader into.
    receiving: Option<PathBuf>,
    /// `testing.snapshot_install_pause_ms`: a pause after an install's first data batch.
    install_pause: std::time::Duration,
    /// The replica's anti-entropy bucket count.
    buckets: usize,
    #[cfg(test)]
    inject: Injected,
}

fn sm_read_error(e: impl std::error::Error + 'static) -> StorageIoError {
    StorageIOError::new(ErrorSubject::StateMachine, ErrorVerb::Read, openraft::AnyError::new(&e)).into()
}

fn sm_write_error(e: impl std::error::Error + 'static) -> StorageIoError {
    StorageIOError::new(ErrorSubject::StateMachine, ErrorVerb::Write, openraft::AnyError::new(&e)).into()
}

fn lost_applier() -> StorageIoError {
    sm_write_error(std::io::Error::other("the shard's applier did not come back from an earlier apply"))
}

/// An apply failure as openraft's error for applying the entry at its position, one of
/// `log_ids`.
fn apply_error(error: ApplyError, group: GroupId, log_ids: &[LogId]) -> StorageIoError {
    tracing::error!(group, error = %error, "applying committed entries failed; the group stops");
    match log_ids.iter().find(|log_id| log_id.index == error.at.index) {
        Some(log_id) => StorageIOError::apply(*log_id, openraft::AnyError::new(&error)).into(),
        None if error.is_write() => sm_write_error(error),
        None => sm_read_error(error),
    }
}

impl ShardStateMachine {
    /// Opens the state machine of `shard` (group `group`), keeping `buckets` anti-entropy
    /// digests (`shard::digest`).
    pub fn open(
        storage: Arc<Storage>,
        shard: u16,
        group: GroupId,
        buckets: usize,
    ) -> Result<ShardStateMachine, StorageIoError> {
        let state = match storage.get(ColumnFamily::StateMachine, &keys::applied_key(group)).map_err(sm_read_error)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(sm_read_error)?,
            None => AppliedState::default(),
        };
        let progress = Arc::new(AppliedProgress::default());
        progress.announce_applied(state.last_applied);
        progress.digest.lock().buckets =
            Some(digest::load_or_rebuild(&storage, group, buckets).map_err(sm_read_error)?);
        let snapshot_dir = storage.data_dir().join("snapshots");
        let applier = Applier::new(storage.clone(), shard, group, progress.clone(), state.clock_us);
        let mut machine = ShardStateMachine {
            storage,
            shard,
            group,
            state,
            progress,
            applier: Some(applier),
            snapshot_dir,
            receiving: None,
            install_pause: std::time::Duration::ZERO,
            buckets,
            #[cfg(test)]
            inject: Injected::default(),
        };
        machine.recover_snapshot()?;
        Ok(machine)
    }

    /// Pauses every snapshot install after its first data batch (`testing.snapshot_install_pause_ms`).
    pub fn with_install_pause(mut self, pause: std::time::Duration) -> ShardStateMachine {
        self.install_pause = pause;
        self
    }

    /// Opens the meta group's state machine; every applied change of the cluster metadata is
    /// published on `publish`.
    pub fn open_meta(
        storage: Arc<Storage>,
        publish: tokio::sync::watch::Sender<Arc<MetaState>>,
        policy: Policy,
        buckets: usize,
    ) -> Result<ShardStateMachine, StorageIoError> {
        let mut machine = ShardStateMachine::open(storage, META_SHARD, group_of_shard(META_SHARD), buckets)?;
        machine.applier_mut()?.attach_meta(publish, policy).map_err(sm_read_error)?;
        Ok(machine)
    }

    fn applier_mut(&mut self) -> Result<&mut Applier, StorageIoError> {
        self.applier.as_mut().ok_or_else(lost_applier)
    }

    pub fn progress(&self) -> Arc<AppliedProgress> {
        self.progress.clone()
    }

    /// Applies `entries`, stopping right after the index an anti-entropy repair asked for
    /// (`AppliedProgress::gate`) until it is done. Each run goes to the apply pool
    /// (`storage::pool::apply_pool`), never onto an async worker; a pause, rare, waits off the
    /// worker in place.
    async fn apply_entries(&mut self, mut entries: Vec<Entry>) -> Result<Vec<ShardResponse>, StorageIoError> {
        let mut responses = Vec::with_capacity(entries.len());
        loop {
            let applied = self.state.last_applied.map_or(0, |l| l.index);
            if self.progress.gate.paused_at(applied) {
                let progress = self.progress.clone();
                crate::storage::blocking(|| progress.gate.wait_if_paused_at(applied, MAX_REPAIR_PAUSE));
            }
            let cut = match self.progress.gate.target() {
                Some(target) if target > applied => entries.iter().position(|e| e.log_id.index > target),
                _ => None,
            };
            match cut {
                Some(cut) if cut > 0 => {
                    let rest = entries.split_off(cut);
                    responses.extend(self.apply_run(std::mem::replace(&mut entries, rest)).await?);
                }
                _ => {
                    responses.extend(self.apply_run(entries).await?);
                    return Ok(responses);
                }
            }
        }
    }

    /// Applies `entries` in one write batch with the new applied state (see
    /// [`ShardStateMachine::apply`]), then announces them applied. The applier moves to an
    /// apply-pool thread for the run and back. Not cancel-safe: dropped mid-run, the run still
    /// writes and announces on the pool while this machine keeps its old state and no applier,
    /// so every later apply fails the group (openraft drives applies to completion). A job that
    /// panics on the pool panics this task, as a panic inline would.
    async fn apply_run(&mut self, entries: Vec<Entry>) -> Result<Vec<ShardResponse>, StorageIoError> {
        let mut applier = self.applier.take().ok_or_else(lost_applier)?;
        let state = self.state.clone();
        let (group, progress) = (self.group, self.progress.clone());
        let (applier, outcome) = crate::storage::pool::apply_pool()
            .run_or_block(move || {
                let outcome = apply_one_run(&mut applier, state, group, &progress, entries);
                (applier, outcome)
            })
            .await;
        self.applier = Some(applier);
        let (next, responses) = outcome?;
        self.state = next;
        Ok(responses)
    }

    /// Replaces this shard's ranges by the snapshot in `path` (already verified), in bounded
    /// write batches. Crash-safe: the install marker, written first and synced, names the
    /// snapshot; until the last batch (synced, with the new applied state) removes it, opening
    /// the node finishes the install from the file ([`ShardStateMachine::open`]). Readers are
    /// turned away meanwhile (`AppliedProgress::installing`).
    fn install_file(
        &mut self,
        path: &Path,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
    ) -> Result<(), StorageIoError> {
        let signature = Some(meta.signature());
        let read_failed =
            |e: std::io::Error| StorageIoError::from(StorageIOError::read_snapshot(signature.clone(), &e));
        let progress = self.progress.clone();
        let _index_guard = progress.index_lock.lock();
        // Held to the end: a retirement waits for this install, or this install sees it.
        if progress.retired.load(Ordering::Acquire) {
            return Err(read_failed(replica_deleted()));
        }
        progress.installs.fetch_add(1, Ordering::AcqRel);
        let _done = InstallingFlag(&progress);
        let marker = keys::install_marker_key(self.group);
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::Meta, marker.clone(), serde_json::to_vec(meta).map_err(sm_write_error)?);
        for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
            batch.delete_range(cf, keys::group_prefix(self.group), keys::group_end(self.group));
        }
        self.storage.write(batch, Durability::Synced).map_err(sm_write_error)?;
        let (mut reader, _) = snapshot::SnapshotReader::open(path).map_err(read_failed)?;
        let applied_key = keys::applied_key(self.group);
        let mut clock_us = 0;
        let mut batch = WriteBatch::new();
        let mut batch_bytes = 0usize;
        let mut written = 0u64;
        while let Some((tag, key, value)) = reader.next_record().map_err(read_failed)? {
            let cf = if tag == 0 { ColumnFamily::StateMachine } else { ColumnFamily::Index };
            if cf == ColumnFamily::StateMachine && key == applied_key {
                // Only its clock is taken: the applied state is written last, below.
                clock_us = serde_json::from_slice::<AppliedState>(&value).map(|s| s.clock_us).unwrap_or(0);
                continue;
            }
            if !key.starts_with(&keys::group_prefix(self.group)) {
                return Err(read_failed(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "snapshot holds a key of another group",
                )));
            }
            batch_bytes += key.len() + value.len();
            batch.put(cf, key, value);
            if batch_bytes >= INSTALL_BATCH_BYTES {
                self.storage
                    .write(std::mem::replace(&mut batch, WriteBatch::new()), Durability::Buffered)
                    .map_err(sm_write_error)?;
                batch_bytes = 0;
                written += 1;
                if !self.install_pause.is_zero() && written == 1 {
                    // testing.snapshot_install_pause_ms: a window for tests to kill the node.
                    std::thread::sleep(self.install_pause);
                }
            }
        }
        let state = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), clock_us };
        batch.put(ColumnFamily::StateMachine, applied_key, serde_json::to_vec(&state).map_err(sm_write_error)?);
        batch.delete(ColumnFamily::Meta, marker);
        // The data batches were buffered: this synced write makes them durable too (one WAL).
        self.storage.write(batch, Durability::Synced).map_err(sm_write_error)?;
        // The snapshot carries the sender's digests; they are rebuilt if it did not (or with
        // another bucket count). The scrub then checks them against what was installed.
        let buckets = digest::load_or_rebuild(&self.storage, self.group, self.buckets).map_err(sm_read_error)?;
        {
            let mut digests = progress.digest.lock();
            digests.buckets = Some(buckets);
            digests.last_check = None;
        }
        self.applier_mut()?.installed(clock_us).map_err(sm_read_error)?;
        self.state = state;
        self.progress.announce_applied(meta.last_log_id);
        Ok(())
    }

    /// Finishes an install a stop interrupted, and converts a snapshot kept in the old format
    /// (one RocksDB value) into a file.
    fn recover_snapshot(&mut self) -> Result<(), StorageIoError> {
        snapshot::remove_partial(&self.snapshot_dir, self.group);
        let marker = keys::install_marker_key(self.group);
        if let Some(bytes) = self.storage.get(ColumnFamily::Meta, &marker).map_err(sm_read_error)? {
            let meta: SnapshotMeta<NodeId, openraft::BasicNode> =
                serde_json::from_slice(&bytes).map_err(sm_read_error)?;
            let path = snapshot::snapshot_path(&self.snapshot_dir, self.group);
            tracing::warn!(shard = self.shard, snapshot = %meta.snapshot_id, "finishing a snapshot install a stop interrupted");
            self.install_file(&path, &meta)?;
        }
        let legacy = keys::snapshot_key(self.group);
        if let Some(bytes) = self.storage.get(ColumnFamily::Meta, &legacy).map_err(sm_read_error)? {
            let converted = convert_legacy(&bytes, &self.snapshot_dir, self.group);
            if let Err(error) = converted {
                tracing::warn!(shard = self.shard, error = %error, "old-format snapshot dropped; the next snapshot replaces it");
            }
            let mut batch = WriteBatch::new();
            batch.delete(ColumnFamily::Meta, legacy);
            self.storage.write(batch, Durability::Synced).map_err(sm_write_error)?;
        }
        Ok(())
    }
}

/// The path of the snapshot data in `handle`: the receiving file when `handle` is that file,
/// else a copy of `handle`'s content (from its start) in a new receiving file.
fn adopt_snapshot_file(
    mut handle: std::fs::File,
    receiving: Option<PathBuf>,
    dir: &Path,
    group: GroupId,
) -> std::io::Result<PathBuf> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let opened = handle.metadata()?;
    if let Some(path) = receiving {
        match std::fs::metadata(&path) {
            Ok(meta) if meta.dev() == opened.dev() && meta.ino() == opened.ino() => return Ok(path),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    std::fs::create_dir_all(dir)?;
    let path = snapshot::receiving_path(dir, group);
    let mut copy = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    handle.seek(SeekFrom::Start(0))?;
    std::io::copy(&mut handle, &mut copy)?;
    copy.sync_all()?;
    Ok(path)
}

/// Write batches of a snapshot install are cut at about this many bytes.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

/// Ends the install in `AppliedProgress::installs` however the install ends, after dropping
/// the claims cache: an install that fails after emptying the ranges leaves them unlike every
/// read cached before it, and reads must not be answered from those.
struct InstallingFlag<'a>(&'a AppliedProgress);

impl Drop for InstallingFlag<'_> {
    fn drop(&mut self) {
        self.0.claims_cache.clear();
        self.0.installs.fetch_add(1, Ordering::AcqRel);
    }
}

/// Failures and a pause a test can inject into snapshot building.
#[cfg(test)]
#[derive(Default, Clone)]
struct Injected {
    fail_build: bool,
    fail_persist: bool,
    /// The build waits for a message here once it has taken its view.
    hold_build: Option<Arc<parking_lot::Mutex<std::sync::mpsc::Receiver<()>>>>,
}

/// Writes an old-format snapshot (`meta_len(4) | meta | records`) as a snapshot file.
fn convert_legacy(bytes: &[u8], dir: &Path, group: GroupId) -> std::io::Result<()> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed old-format snapshot");
    let meta_len = u32::from_be_bytes(bytes.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(bad)?) as usize;
    let meta = bytes.get(4..4 + meta_len).ok_or_else(bad)?;
    let records = decode_dump(&bytes[4 + meta_len..]).ok_or_else(bad)?;
    let mut writer = snapshot::SnapshotWriter::create(dir, group, meta)?;
    for (cf, key, value) in records {
        let tag = if cf == ColumnFamily::StateMachine { 0 } else { 1 };
        if let Err(error) = writer.record(tag, key, value) {
            writer.abandon();
            return Err(error);
        }
    }
    writer.finish().map(|_| ())
}

/// The records of an old-format snapshot.
fn decode_dump(data: &[u8]) -> Option<Vec<(ColumnFamily, &[u8], &[u8])>> {
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let cf = match rest.first()? {
            0 => ColumnFamily::StateMachine,
            1 => ColumnFamily::Index,
            _ => return None,
        };
        let key_len = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
        let key = rest.get(5..5 + key_len)?;
        let at = 5 + key_len;
        let value_len = u32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?) as usize;
        let value = rest.get(at + 4..at + 4 + value_len)?;
        records.push((cf, key, value));
        rest = &rest[at + 4 + value_len..];
    }
    Some(records)
}

/// A snapshot being written beside the state machine task, from a view of the shard taken
/// before any later apply (`get_snapshot_builder`), handed to openraft when written.
pub struct ShardSnapshotBuilder {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    job: Option<tokio::task::JoinHandle<Result<Built, StorageIoError>>>,
    /// Tells a build stopped because its replica moved away from a failed one.
    progress: Arc<AppliedProgress>,
}

/// What a snapshot job left: its file in place, or, when a newer snapshot took the place
/// meanwhile (installed from the leader), that one.
enum Built {
    Published(PathBuf),
    Superseded { path: PathBuf, meta: SnapshotMeta<NodeId, openraft::BasicNode> },
}

impl RaftSnapshotBuilder<TypeConfig> for ShardSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageIoError> {
        // Every failure reaches openraft, which stops the group: the last durable snapshot and
        // the log after it stay.
        let signature = Some(self.meta.signature());
        let failed = |e: std::io::Error| StorageIoError::from(StorageIOError::write_snapshot(signature.clone(), &e));
        let built = match self.job.take() {
            Some(job) => job.await.map_err(|e| failed(std::io::Error::other(format!("snapshot job ended: {e}"))))?,
            None => Err(failed(std::io::Error::other("built twice"))),
        };
        let (path, meta) = match built {
            Ok(Built::Published(path)) => {
                raft_metrics::SNAPSHOTS.with_label_values(&["built"]).inc();
                (path, self.meta.clone())
            }
            // openraft keeps the newer one it installed; this answer changes nothing.
            Ok(Built::Superseded { path, meta }) => {
                raft_metrics::SNAPSHOTS.with_label_values(&["superseded"]).inc();
                (path, meta)
            }
            // Nobody waits for this answer: the group stopped when its replica was deleted.
            Err(error) if self.progress.retired.load(Ordering::Acquire) => {
                tracing::info!(snapshot = %self.meta.snapshot_id, "snapshot build stopped: the replica moved away");
                return Err(error);
            }
            Err(error) => {
                raft_metrics::SNAPSHOTS.with_label_values(&["build_failed"]).inc();
                tracing::error!(snapshot = %self.meta.snapshot_id, error = %error, "building a snapshot failed; the log is kept");
                return Err(error);
            }
        };
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| StorageIoError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e)))?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

/// Writes one snapshot of a shard on a blocking thread: its state machine and index ranges as
/// of a point-in-time view, taken first, so applies go on while the file is written.
struct SnapshotJob {
    storage: Arc<Storage>,
    group: GroupId,
    dir: PathBuf,
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    progress: Arc<AppliedProgress>,
    #[cfg(test)]
    inject: Injected,
}

impl SnapshotJob {
    /// Takes the view, says so on `pinned`, writes the file and puts it in place unless a newer
    /// snapshot is there by then, or the replica was deleted meanwhile.
    fn run(self, pinned: tokio::sync::oneshot::Sender<()>) -> Result<Built, StorageIoError> {
        let started = Instant::now();
        let view = self.storage.point_in_time();
        let _ = pinned.send(());
        let signature = Some(self.meta.signature());
        let write_failed =
            |e: std::io::Error| StorageIoError::from(StorageIOError::write_snapshot(signature.clone(), &e));
        #[cfg(test)]
        if self.inject.fail_build {
            return Err(write_failed(std::io::Error::other("injected snapshot build failure")));
        }
        let meta_bytes = serde_json::to_vec(&self.meta).map_err(sm_write_error)?;
        let mut writer = snapshot::SnapshotWriter::create(&self.dir, self.group, &meta_bytes).map_err(write_failed)?;
        #[cfg(test)]
        if let Some(hold) = &self.inject.hold_build {
            let _ = hold.lock().recv();
        }
        let mut failure = None;
        let mut records = 0u64;
        for (tag, cf) in [(0u8, ColumnFamily::StateMachine), (1u8, ColumnFamily::Index)] {
            let scanned =
                view.for_each_in_range(cf, &keys::group_prefix(self.group), &keys::group_end(self.group), |k, v| {
                    records += 1;
                    // A replica moved away stops its build early: its file would only be
                    // deleted, and a large one holds disk space meanwhile.
                    if records % RETIRED_CHECK_RECORDS == 0 && self.progress.retired.load(Ordering::Acquire) {
                        failure = Some(replica_deleted());
                        return false;
                    }
                    match writer.record(tag, k, v) {
                        Ok(()) => true,
                        Err(error) => {
                            failure = Some(error);
                            false
                        }
                    }
                });
            if let Err(error) = scanned {
                writer.abandon();
                return Err(sm_read_error(error));
            }
            if let Some(error) = failure.take() {
                writer.abandon();
                return Err(write_failed(error));
            }
        }
        drop(view);
        #[cfg(test)]
        if self.inject.fail_persist {
            writer.abandon();
            return Err(write_failed(std::io::Error::other("injected snapshot persist failure")));
        }
        // Made durable before the lock: only the check and the rename happen under it.
        let sealed = writer.seal().map_err(write_failed)?;
        let path = {
            // Under the lock an install renames its file under, and a retirement marks the
            // replica deleted under: the newer snapshot, and the deletion, win.
            let _guard = self.progress.index_lock.lock_to_read();
            if self.progress.retired.load(Ordering::Acquire) {
                sealed.discard();
                return Err(write_failed(replica_deleted()));
            }
            let destination = snapshot::snapshot_path(&self.dir, self.group);
            match open_snapshot(&destination).map(|opened| opened.map(|(meta, _)| meta)) {
                Ok(Some(current)) if current.last_log_id >= self.meta.last_log_id => {
                    sealed.discard();
                    return Ok(Built::Superseded { path: destination, meta: current });
                }
                Ok(_) => {}
                // A file in place that cannot be read is no snapshot to keep: this one replaces it.
                Err(error) => {
                    tracing::warn!(group = self.group, error = %error, "the snapshot in place is unreadable; replacing it")
                }
            }
            sealed.publish().map_err(write_failed)?
        };
        snapshot::sync_dir(&self.dir).map_err(write_failed)?;
        raft_metrics::SNAPSHOT_BUILD_DURATION.observe(started.elapsed().as_secs_f64());
        Ok(Built::Published(path))
    }
}

/// Why a snapshot build or install of a replica moved away stops.
fn replica_deleted() -> std::io::Error {
    std::io::Error::other("the replica was deleted (moved away) meanwhile")
}

/// A snapshot build checks every this many records whether its replica was deleted.
const RETIRED_CHECK_RECORDS: u64 = 4096;

/// The snapshot file at `path`, if there is one: its metadata, and the file from its start.
/// One open for both: a build may rename a newer file into place at any moment, and openraft
/// sends this metadata with this data.
fn open_snapshot(path: &Path) -> std::io::Result<Option<(SnapshotMeta<NodeId, openraft::BasicNode>, std::fs::File)>> {
    use std::io::{Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let (_, meta) = snapshot::SnapshotReader::from_file(file.try_clone()?)?;
    let meta = serde_json::from_slice(&meta).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(Some((meta, file)))
}

/// Applies `entries` to the shard after `state` in one write batch with the new applied state,
/// announces them applied, and returns that state with the entries' responses.
fn apply_one_run(
    applier: &mut Applier,
    state: AppliedState,
    group: GroupId,
    progress: &Arc<AppliedProgress>,
    entries: Vec<Entry>,
) -> Result<(AppliedState, Vec<ShardResponse>), StorageIoError> {
    let mut next = state;
    let mut log_ids = Vec::with_capacity(entries.len());
    let mut run: Vec<Applicable> = Vec::with_capacity(entries.len());
    for entry in entries {
        let at = Position { index: entry.log_id.index, term: entry.log_id.leader_id.term };
        next.last_applied = Some(entry.log_id);
        log_ids.push(entry.log_id);
        let command = match entry.payload {
            EntryPayload::Blank => None,
            EntryPayload::Membership(membership) => {
                next.membership = StoredMembership::new(Some(entry.log_id), membership);
                None
            }
            // Shared with the log's tail: the apply reads it in place.
            EntryPayload::Normal(command) => Some(command),
        };
        run.push((at, command));
    }
    let last_applied = next.last_applied;
    // Announced by the applier under the index lock, right after the write.
    let responses = applier
        .apply(
            run,
            keys::applied_key(group),
            |clock_us| {
                next.clock_us = clock_us;
                serde_json::to_vec(&next)
            },
            || progress.announce_applied(last_applied),
        )
        .map_err(|error| apply_error(error, group, &log_ids))?;
    Ok((next, responses))
}

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotBuilder = ShardSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, openraft::BasicNode>), StorageIoError> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ShardResponse>, StorageIoError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = Instant::now();
        let entries: Vec<Entry> = entries.into_iter().collect();
        // RocksDB reads and the batch write: on the apply pool, off the async workers.
        let responses = self.apply_entries(entries).await?;
        raft_metrics::APPLY_DURATION.observe(started.elapsed().as_secs_f64());
        Ok(responses)
    }
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let last = self.state.last_applied;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: self.state.membership.clone(),
            snapshot_id: format!(
                "{}-{}-{}",
                self.group,
                last.map(|l| l.leader_id.term).unwrap_or(0),
                last.map(|l| l.index).unwrap_or(0)
            ),
        };
        let job = SnapshotJob {
            storage: self.storage.clone(),
            group: self.group,
            dir: self.snapshot_dir.clone(),
            meta: meta.clone(),
            progress: self.progress.clone(),
            #[cfg(test)]
            inject: self.inject.clone(),
        };
        // Written on a blocking thread from a view of the shard as applied now (every apply
        // before this call has written its batch): openraft runs `build_snapshot` on a task of
        // its own and goes on applying, so the view must be taken before this returns. Streamed
        // record by record, so memory stays a buffer whatever the shard's size.
        let (pinned, taken) = tokio::sync::oneshot::channel();
        let job = tokio::task::spawn_blocking(move || job.run(pinned));
        // Dropped unsent only if the job ended before taking it (a panic): its result says so.
        let _ = taken.await;
        ShardSnapshotBuilder { meta, job: Some(job), progress: self.progress.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageIoError> {
        let failed = |e: std::io::Error| StorageIoError::from(StorageIOError::write_snapshot(None, &e));
        let dir = self.snapshot_dir.clone();
        let path = snapshot::receiving_path(&dir, self.group);
        let file = crate::storage::blocking(|| {
            snapshot::remove_partial_received(&dir, self.group);
            std::fs::create_dir_all(&dir)?;
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)
        })
        .map_err(failed)?;
        self.receiving = Some(path);
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageIoError> {
        let signature = Some(meta.signature());
        let failed = |e: std::io::Error| StorageIoError::from(StorageIOError::write_snapshot(signature.clone(), &e));
        snapshot.sync_all().await.map_err(failed)?;
        let handle = snapshot.into_std().await;
        let dir = self.snapshot_dir.clone();
        let group = self.group;
        let receiving = self.receiving.take();
        // Normally openraft hands back the file `begin_receiving_snapshot` opened; any other
        // handle (a snapshot passed on directly) is copied into a file of our own first.
        let received =
            crate::storage::blocking(|| adopt_snapshot_file(handle, receiving, &dir, group)).map_err(failed)?;
        let result = crate::storage::blocking(|| {
            // Checked whole before anything changes: a damaged transfer leaves the old state.
            let (file_meta, _) = snapshot::verify(&received).map_err(failed)?;
            // The data must be the snapshot openraft describes: installed with another's applied
            // state, entries would be applied twice or skipped.
            let file_meta: SnapshotMeta<NodeId, openraft::BasicNode> =
                serde_json::from_slice(&file_meta).map_err(sm_read_error)?;
            if file_meta.last_log_id != meta.last_log_id || file_meta.last_membership != meta.last_membership {
                return Err(failed(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the snapshot's data is of {}, its metadata of {}",
                        file_meta.snapshot_id, meta.snapshot_id
                    ),
                )));
            }
            let path = snapshot::snapshot_path(&self.snapshot_dir, self.group);
            {
                // Under the lock a snapshot build puts its file in place under (`SnapshotJob`), and
                // a retirement marks the replica deleted under: openraft's shutdown does not stop
                // an install already handed to the state machine task, which must then not bring
                // the deleted replica's file back.
                let _guard = self.progress.index_lock.lock_to_read();
                if self.progress.retired.load(Ordering::Acquire) {
                    return Err(failed(replica_deleted()));
                }
                std::fs::rename(&received, &path).map_err(failed)?;
            }
            snapshot::sync_dir(&self.snapshot_dir).map_err(failed)?;
            self.install_file(&path, meta)
        });
        match &result {
            Ok(()) => raft_metrics::SNAPSHOTS.with_label_values(&["installed"]).inc(),
            Err(_) => {
                let _ = std::fs::remove_file(&received);
                raft_metrics::SNAPSHOTS.with_label_values(&["install_failed"]).inc()
            }
        }
        result
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageIoError> {
        let path = snapshot::snapshot_path(&self.snapshot_dir, self.group);
        let opened = crate::storage::blocking(|| open_snapshot(&path))
            .map_err(|e| StorageIoError::from(StorageIOError::read_snapshot(None, &e)))?;
        Ok(opened.map(|(meta, file)| Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload};

    use std::time::Duration;

    use super::*;
    use crate::model::assertion::AssertionDraft;
    use crate::model::id::AssertionId;
    use crate::shard::command::ShardCommand;
    use crate::storage::StorageOptions;

    fn draft(value: u32) -> AssertionDraft {
        AssertionDraft::for_test("test/set", "member", "writer", &value.to_string())
    }

    fn entry(index: u64, command: ShardCommand) -> Entry {
        Entry {
            log_id: openraft::LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Arc::new(command)),
        }
    }

    fn machine() -> (tempfile::TempDir, Arc<Storage>, ShardStateMachine) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open storage");
        let machine =
            ShardStateMachine::open(storage.clone(), 2, 3, digest::DEFAULT_BUCKETS).expect("open state machine");
        (dir, storage, machine)
    }

    fn shard_rows(storage: &Storage) -> Vec<(ColumnFamily, Vec<u8>, Vec<u8>)> {
        let mut rows = Vec::new();
        for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
            for (k, v) in storage.scan(cf, &keys::group_prefix(3), &keys::group_end(3), usize::MAX).expect("scan") {
                if cf == ColumnFamily::StateMachine && k == keys::applied_key(3) {
                    continue;
                }
                rows.push((cf, k, v));
            }
        }
        rows
    }

    /// A leader's machine with `count` assertions applied.
    async fn leader_with(count: u32) -> (tempfile::TempDir, Arc<Storage>, ShardStateMachine) {
        let (dir, storage, mut machine) = machine();
        let items: Vec<AssertionDraft> = (0..count).map(draft).collect();
        let command = ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items };
        machine.apply(vec![entry(1, command)]).await.expect("apply");
        (dir, storage, machine)
    }

    /// Sends `snapshot` to `follower` the way openraft does: into the file it opens for
    /// receiving, in chunks, then installs it.
    async fn transfer(snapshot: Snapshot<TypeConfig>, follower: &mut ShardStateMachine) -> Result<(), StorageIoError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut source = snapshot.snapshot;
        let mut sink = follower.begin_receiving_snapshot().await.expect("begin receiving");
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = source.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            sink.write_all(&chunk[..n]).await.expect("write");
        }
        sink.shutdown().await.expect("flush");
        follower.install_snapshot(&snapshot.meta, sink).await
    }

    #[tokio::test]
    async fn a_snapshot_streams_from_leader_to_follower_and_replaces_its_range() {
        let (_a, leader_storage, mut leader) = leader_with(300).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let (_b, follower_storage, mut follower) = machine();
        // Something the snapshot does not hold must go.
        let stray = ShardCommand::Assert { proposed_at_us: 1, items: vec![draft(99_999)] };
        follower.apply(vec![entry(1, stray)]).await.expect("apply");
        transfer(snapshot, &mut follower).await.expect("install");
        assert_eq!(shard_rows(&follower_storage), shard_rows(&leader_storage));
        assert_eq!(follower.state.last_applied, leader.state.last_applied);
        assert_eq!(follower.state.clock_us, leader.state.clock_us, "the shard clock travels with the snapshot");
        // The installed snapshot is the follower's current one now, and survives a reopen.
        let current = follower.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert_eq!(current.meta.last_log_id, leader.state.last_applied);
    }

    #[tokio::test]
    async fn a_failed_build_or_persist_is_an_error_and_keeps_the_last_snapshot() {
        let (_a, _storage, mut leader) = leader_with(10).await;
        let first = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let more = ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items: vec![draft(11)] };
        leader.apply(vec![entry(2, more)]).await.expect("apply");
        for (fail_build, fail_persist) in [(true, false), (false, true)] {
            leader.inject = Injected { fail_build, fail_persist, ..Injected::default() };
            let built = leader.get_snapshot_builder().await.build_snapshot().await;
            assert!(built.is_err(), "openraft must see the failure (build {fail_build}, persist {fail_persist})");
            let current = leader.get_current_snapshot().await.expect("current").expect("a snapshot");
            assert_eq!(current.meta.last_log_id, first.meta.last_log_id, "the last durable snapshot stays");
        }
        let leftovers = std::fs::read_dir(&leader.snapshot_dir).expect("dir").count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
    }

    /// Holds `machine`'s next snapshot builds once they have taken their view and created their
    /// file; send to go on.
    fn hold_builds(machine: &mut ShardStateMachine) -> std::sync::mpsc::Sender<()> {
        let (release, hold) = std::sync::mpsc::channel();
        machine.inject.hold_build = Some(Arc::new(parking_lot::Mutex::new(hold)));
        release
    }

    fn snapshot_files(machine: &ShardStateMachine) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&machine.snapshot_dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn applies_go_on_while_a_snapshot_is_written_and_it_holds_the_shard_as_it_started() {
        let (_a, leader_storage, mut leader) = leader_with(100).await;
        let at_start = shard_rows(&leader_storage);
        let applied_at_start = leader.state.last_applied;
        let release = hold_builds(&mut leader);
        let mut builder = leader.get_snapshot_builder().await;
        // The build is held with its view taken: applies go on meanwhile.
        let more = ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items: vec![draft(500)] };
        tokio::time::timeout(Duration::from_secs(30), leader.apply(vec![entry(2, more)]))
            .await
            .expect("an apply is not held up by a snapshot being written")
            .expect("apply");
        assert_ne!(shard_rows(&leader_storage), at_start, "the apply wrote");
        release.send(()).expect("release");
        let snapshot = builder.build_snapshot().await.expect("build");
        assert_eq!(snapshot.meta.last_log_id, applied_at_start);
        let (_b, follower_storage, mut follower) = machine();
        transfer(snapshot, &mut follower).await.expect("install");
        assert_eq!(shard_rows(&follower_storage), at_start, "the snapshot holds the shard as of its start");
        assert_eq!(follower.state.last_applied, applied_at_start);
    }

    #[tokio::test]
    async fn a_build_that_ends_after_a_newer_install_leaves_the_installed_snapshot() {
        let (_a, _storage, mut node) = leader_with(5).await;
        let release = hold_builds(&mut node);
        let mut builder = node.get_snapshot_builder().await;
        // Meanwhile the node installs a newer snapshot from a leader.
        let (_b, _leader_storage, mut leader) = leader_with(20).await;
        let more = ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items: vec![draft(21)] };
        leader.apply(vec![entry(2, more)]).await.expect("apply");
        let newer = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let newer_id = newer.meta.last_log_id;
        transfer(newer, &mut node).await.expect("install");
        release.send(()).expect("release");
        let answered = builder.build_snapshot().await.expect("a superseded build is no failure");
        assert_eq!(answered.meta.last_log_id, newer_id, "openraft is told of the snapshot in place");
        let current = node.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert_eq!(current.meta.last_log_id, newer_id, "the older build did not replace the installed snapshot");
        assert_eq!(snapshot_files(&node), vec!["group-3.snap".to_string()], "the older build's file is gone");
    }

    #[tokio::test]
    async fn a_build_that_ends_after_its_replica_was_deleted_puts_nothing_in_place() {
        let (_a, _storage, mut node) = leader_with(5).await;
        let release = hold_builds(&mut node);
        let mut builder = node.get_snapshot_builder().await;
        {
            let _guard = node.progress.index_lock.lock();
            node.progress.retired.store(true, Ordering::Release);
        }
        release.send(()).expect("release");
        assert!(builder.build_snapshot().await.is_err());
        assert!(snapshot_files(&node).is_empty(), "no snapshot of a deleted replica, and no temporary file");
    }

    /// Data of one snapshot under another's metadata is refused: installed, the follower
    /// would record the wrong applied index and apply entries twice or skip them.
    #[tokio::test]
    async fn an_install_whose_data_is_not_the_snapshot_described_is_refused() {
        let (_a, _leader_storage, mut leader) = leader_with(20).await;
        let older = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let older_meta = older.meta.clone();
        drop(older);
        let more = ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items: vec![draft(21)] };
        leader.apply(vec![entry(2, more)]).await.expect("apply");
        let mut newer = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        newer.meta = older_meta;
        let (_b, follower_storage, mut follower) = leader_with(3).await;
        let before = shard_rows(&follower_storage);
        assert!(transfer(newer, &mut follower).await.is_err(), "the metadata does not describe the data");
        assert_eq!(shard_rows(&follower_storage), before, "nothing changed");
    }

    /// A snapshot file in place that cannot be read is replaced by the next build, which does
    /// not fail the group.
    #[tokio::test]
    async fn a_build_replaces_an_unreadable_snapshot_in_place() {
        let (_a, _storage, mut node) = leader_with(5).await;
        std::fs::create_dir_all(&node.snapshot_dir).expect("dir");
        std::fs::write(snapshot::snapshot_path(&node.snapshot_dir, 3), b"not a snapshot").expect("write");
        let built = node.get_snapshot_builder().await.build_snapshot().await.expect("build");
        assert_eq!(built.meta.last_log_id, node.state.last_applied);
        let current = node.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert_eq!(current.meta.last_log_id, node.state.last_applied);
        assert_eq!(snapshot_files(&node), vec!["group-3.snap".to_string()]);
    }

    /// An install that openraft handed to the state machine before the replica was deleted does
    /// not bring the deleted replica back.
    #[tokio::test]
    async fn an_install_after_its_replica_was_deleted_writes_nothing() {
        let (_a, _leader_storage, mut leader) = leader_with(20).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let (_b, follower_storage, mut follower) = machine();
        let before = shard_rows(&follower_storage);
        {
            let _guard = follower.progress.index_lock.lock();
            follower.progress.retired.store(true, Ordering::Release);
        }
        assert!(transfer(snapshot, &mut follower).await.is_err());
        assert_eq!(shard_rows(&follower_storage), before, "no record came back");
        assert!(follower.state.last_applied.is_none());
        assert!(snapshot_files(&follower).is_empty(), "no snapshot file came back");
    }

    /// A snapshot being received does not remove the file a build is writing.
    #[tokio::test]
    async fn receiving_a_snapshot_leaves_a_build_in_progress_alone() {
        let (_a, _storage, mut node) = leader_with(5).await;
        let release = hold_builds(&mut node);
        let mut builder = node.get_snapshot_builder().await;
        let receiving = node.begin_receiving_snapshot().await.expect("begin receiving");
        drop(receiving);
        release.send(()).expect("release");
        let built = builder.build_snapshot().await.expect("build");
        assert_eq!(built.meta.last_log_id, node.state.last_applied);
    }

    #[tokio::test]
    async fn a_damaged_transfer_is_refused_and_leaves_the_follower_intact() {
        let (_a, _leader_storage, mut leader) = leader_with(50).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let (_b, follower_storage, mut follower) = leader_with(5).await;
        let before = shard_rows(&follower_storage);
        let path = snapshot::snapshot_path(&leader.snapshot_dir, 3);
        let mut bytes = std::fs::read(&path).expect("read");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        let damaged = leader.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert!(transfer(damaged, &mut follower).await.is_err());
        assert_eq!(shard_rows(&follower_storage), before, "nothing changed");
        drop(snapshot);
    }

    /// An install that fails after emptying the ranges (here: a record of another group, found
    /// while writing) leaves no read cached from before it.
    #[tokio::test]
    async fn an_install_that_fails_midway_drops_the_cached_reads() {
        let (_a, _leader_storage, mut leader) = leader_with(5).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let meta = snapshot.meta.clone();
        drop(snapshot);
        // The leader's snapshot with one record of another group after the first.
        let path = snapshot::snapshot_path(&leader.snapshot_dir, 3);
        let (mut reader, meta_bytes) = snapshot::SnapshotReader::open(&path).expect("open");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut writer = snapshot::SnapshotWriter::create(dir.path(), 3, &meta_bytes).expect("create");
        let mut records = 0;
        while let Some((tag, key, value)) = reader.next_record().expect("record") {
            writer.record(tag, &key, &value).expect("write");
            records += 1;
            if records == 1 {
                writer.record(0, &keys::assertion_key(4, AssertionId::new(1, 2, 1, 0)), b"x").expect("write");
            }
        }
        let foreign = writer.finish().expect("finish");
        let (_b, follower_storage, mut follower) = leader_with(3).await;
        let reader = crate::shard::reader::ShardReader::new(follower_storage, 2, 3, follower.progress());
        reader.claims("test/set", None, None).expect("read");
        let cache = &follower.progress().claims_cache;
        assert!(cache.get("test/set", None).is_some(), "the read is cached");
        assert!(follower.install_file(&foreign, &meta).is_err(), "a record of another group fails the install");
        assert!(cache.get("test/set", None).is_none(), "the reads cached before the install are gone");
    }

    /// A node killed between the first and the last batch of an install finishes it from the
    /// snapshot file when it opens again: it never serves a half-installed range.
    #[tokio::test]
    async fn an_install_interrupted_by_a_crash_is_finished_on_reopen() {
        let (_a, leader_storage, mut leader) = leader_with(200).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let meta = snapshot.meta.clone();
        let (_b, follower_storage, mut follower) = machine();
        transfer(snapshot, &mut follower).await.expect("install");
        // The state right after the first batch of an install: marker set, ranges emptied,
        // part of the data written, no applied state.
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::Meta, keys::install_marker_key(3), serde_json::to_vec(&meta).expect("meta"));
        for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
            batch.delete_range(cf, keys::group_prefix(3), keys::group_end(3));
        }
        batch.put(ColumnFamily::StateMachine, keys::assertion_key(3, AssertionId::new(1, 2, 1, 0)), b"{}".to_vec());
        follower_storage.write(batch, Durability::Synced).expect("write");
        drop(follower);
        let reopened =
            ShardStateMachine::open(follower_storage.clone(), 2, 3, digest::DEFAULT_BUCKETS).expect("reopen");
        assert_eq!(shard_rows(&follower_storage), shard_rows(&leader_storage));
        assert_eq!(reopened.state.last_applied, meta.last_log_id);
        assert!(follower_storage.get(ColumnFamily::Meta, &keys::install_marker_key(3)).expect("get").is_none());
    }
}
