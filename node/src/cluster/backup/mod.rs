//! Backups (docs/backup.md): online copies of a cluster into a directory or S3, shared between
//! backups file by file, verified without a restore, and restored into a new cluster.
//!
//! - `store`: the backup store (directory or `s3://bucket/prefix`, one object-store API);
//! - `chunk`: backup files, cut at boundaries the keys choose and named by their SHA-256;
//! - `manifest`: what a backup holds; written last, it is the backup's commit point;
//! - `copy`: copying one replica of this node from a consistent view of its storage;
//! - [`Backups`]: a backup of the whole cluster coordinated by this node (`POST
//!   /v1/admin/backup`): for every shard and the meta group, the replica of its leader (else
//!   another healthy one) is copied by the node holding it (this one, or a peer asked over the
//!   `Backup` service on 18182), then the manifest is written, then old backups are pruned
//!   (`backup.retention_days`);
//! - `verify`: re-reads every file of a backup and recomputes every shard's digest;
//! - `restore`: builds one node's data dir of a new cluster from a backup, and replays the
//!   archived log after it (up to `--as-of`);
//! - `archive`: continuous Raft log archival, segments shipped by each group's leader.

pub mod archive;
pub mod chunk;
pub mod copy;
pub mod manifest;
pub mod metrics;
pub mod restore;
pub mod store;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use parking_lot::Mutex;
use serde::Serialize;
use stemedb_proto::raft::backup_client::BackupClient;
use stemedb_proto::raft::{BackupFile, CopiedReplica, CopyReplicasReply, CopyReplicasRequest};

use crate::config::BackupSection;
use crate::error::ErrorCode;
use crate::meta::META_SHARD;
use crate::model::id::now_us;
use crate::raft::ShardSet;
use crate::storage::{ColumnFamily, Durability, Storage, StorageError, WriteBatch};
use copy::Tally;
use manifest::{FileRef, GroupBackup, Manifest};
use store::BackupStore;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup destination {0:?}: {1}")]
    Destination(String, String),
    #[error("no backup {0} (no manifest)")]
    NotFound(String),
    #[error("backup {0} is running on this node; wait for it to finish")]
    InProgress(String),
    #[error("backup store: {0}")]
    Store(String),
    #[error("damaged backup: {0}")]
    Damaged(String),
    #[error("{}: {message}", if *.shard == META_SHARD { "meta group".to_string() } else { format!("shard {}", .shard) })]
    Failed { shard: u16, message: String },
    #[error("restore refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl BackupError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BackupError::Destination(..) => ErrorCode::BackupDestinationInvalid,
            BackupError::NotFound(_) => ErrorCode::BackupNotFound,
            BackupError::InProgress(_) => ErrorCode::BackupInProgress,
            BackupError::Store(_) => ErrorCode::BackupStoreFailed,
            BackupError::Damaged(_) => ErrorCode::BackupDamaged,
            BackupError::Failed { .. } => ErrorCode::BackupFailed,
            BackupError::Refused(_) => ErrorCode::RestoreRefused,
            BackupError::Storage(e) => e.code(),
        }
    }

    /// The error as a gRPC status (code in the metadata, see `ErrorCode::to_status`).
    pub fn to_status(&self) -> tonic::Status {
        self.code().to_status(self.to_string())
    }
}

/// Backups kept in a node's list of runs (the running one and the last finished ones).
const RUNS_KEPT: usize = 32;
/// Groups copied at the same time by one backup.
const GROUPS_AT_ONCE: usize = 4;
/// Files no kept backup uses are deleted only once they are this old (and no backup is
/// pending): a backup that started and finished meanwhile may have just uploaded them.
const UNREFERENCED_GRACE_US: u64 = 3600 * 1_000_000;
/// A pending marker older than this is of a coordinator that died: it no longer holds pruning.
const PENDING_MAX_AGE_US: u64 = 24 * 3600 * 1_000_000;
/// Largest backup message (a reply names a few thousand files).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Where a node records its last successful backup (`meta` family).
const LAST_SUCCESS_KEY: &[u8] = b"backup_last_success";

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct LastSuccess {
    id: String,
    finished_at_us: u64,
    duration_seconds: f64,
    bytes: u64,
}

impl LastSuccess {
    fn publish(&self) {
        metrics::LAST_SUCCESS.set(self.finished_at_us as f64 / 1e6);
        metrics::DURATION.set(self.duration_seconds);
        metrics::LAST_BYTES.set(self.bytes as f64);
    }
}

/// A backup this node coordinates or coordinated: `GET /v1/admin/backup/{id}`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BackupProgress {
    pub id: String,
    pub destination: String,
    /// `running`, `succeeded` or `failed`.
    pub state: &'static str,
    pub started_at_us: u64,
    #[schema(required = true)]
    pub finished_at_us: Option<u64>,
    /// Data shards plus the meta group.
    pub groups_total: u64,
    pub groups_done: u64,
    /// Raw bytes read and files stored, over every node's copies (a peer's count when it
    /// answers).
    pub bytes_read: u64,
    pub files_uploaded: u64,
    pub bytes_uploaded: u64,
    pub files_reused: u64,
    pub bytes_reused: u64,
    #[schema(required = true)]
    pub error: Option<String>,
    #[schema(required = true)]
    pub error_code: Option<&'static str>,
    /// Set once the manifest is written.
    #[schema(required = true)]
    pub manifest: Option<String>,
}

struct Run {
    destination: String,
    started_at_us: u64,
    groups_total: u64,
    tally: Arc<Tally>,
    finished: Option<(u64, Result<String, (ErrorCode, String)>)>,
}

impl Run {
    fn progress(&self, id: &str) -> BackupProgress {
        let t = &self.tally;
        let (state, finished_at_us, error, error_code, manifest) = match &self.finished {
            None => ("running", None, None, None, None),
            Some((at, Ok(path))) => ("succeeded", Some(*at), None, None, Some(path.clone())),
            Some((at, Err((code, message)))) => ("failed", Some(*at), Some(message.clone()), Some(code.as_str()), None),
        };
        BackupProgress {
            id: id.to_string(),
            destination: self.destination.clone(),
            state,
            started_at_us: self.started_at_us,
            finished_at_us,
            groups_total: self.groups_total,
            groups_done: t.groups_done.load(Ordering::Relaxed),
            bytes_read: t.bytes_read.load(Ordering::Relaxed),
            files_uploaded: t.files_uploaded.load(Ordering::Relaxed),
            bytes_uploaded: t.bytes_uploaded.load(Ordering::Relaxed),
            files_reused: t.files_reused.load(Ordering::Relaxed),
            bytes_reused: t.bytes_reused.load(Ordering::Relaxed),
            error,
            error_code,
            manifest,
        }
    }
}

/// The backups of this node: the ones it coordinates, and the copies of its replicas peers ask
/// for.
pub struct Backups {
    shards: Arc<ShardSet>,
    storage: Arc<Storage>,
    settings: BackupSection,
    cluster_id: String,
    runs: Mutex<BTreeMap<String, Run>>,
    /// `backup.max_read_mb_per_second` (`busy_read_mb_per_second` while the node takes writes)
    /// over every copy this node makes.
    pacer: Arc<copy::ReadPacer>,
}

impl Backups {
    /// Also sets the backup gauges from the last success this node recorded, so that the age of
    /// the last backup survives restarts.
    pub fn new(shards: Arc<ShardSet>, storage: Arc<Storage>, settings: BackupSection, cluster_id: String) -> Backups {
        let recorded = crate::storage::blocking(|| storage.get(ColumnFamily::Meta, LAST_SUCCESS_KEY));
        match recorded.map(|bytes| bytes.and_then(|b| serde_json::from_slice::<LastSuccess>(&b).ok())) {
            Ok(Some(last)) => last.publish(),
            Ok(None) => {}
            Err(error) => tracing::warn!(error = %error, "reading the last backup's record failed"),
        }
        let appends = storage.clone();
        let pacer = Arc::new(copy::ReadPacer::new(
            settings.max_read_mb_per_second,
            settings.busy_read_mb_per_second,
            move || appends.last_log_append(),
        ));
        Backups { shards, storage, settings, cluster_id, runs: Mutex::new(BTreeMap::new()), pacer }
    }

    /// Records a successful backup (metrics, and the node's storage for the next start).
    fn record_success(&self, last: LastSuccess) {
        last.publish();
        let mut batch = WriteBatch::new();
        match serde_json::to_vec(&last) {
            Ok(bytes) => batch.put(ColumnFamily::Meta, LAST_SUCCESS_KEY.to_vec(), bytes),
            Err(_) => return,
        }
        if let Err(error) = crate::storage::blocking(|| self.storage.write(batch, Durability::Synced)) {
            tracing::warn!(error = %error, "recording the last backup failed; its age restarts from 0 at the next start");
        }
    }

    /// Starts a backup of the whole cluster into `destination` (else `backup.destination`);
    /// it runs in the background. One at a time per node.
    pub fn start(self: &Arc<Self>, destination: Option<&str>) -> Result<BackupProgress, BackupError> {
        let destination = destination.map(str::to_string).unwrap_or_else(|| self.settings.destination.clone());
        // A directory destination is created: a filesystem call, off the async workers.
        let store = crate::storage::blocking(|| BackupStore::open(&destination, &self.settings, true))?;
        if crate::storage::blocking(|| shares_a_filesystem(store.directory(), self.storage.data_dir())) {
            tracing::warn!(
                destination = %destination,
                "the backup destination is on the data dir's filesystem: the backup does not survive \
                 that disk, and its writes share the disk's flushes with the raft log; use another disk or s3"
            );
        }
        let started_at_us = now_us();
        let id = manifest::new_id(started_at_us);
        let tally = Arc::new(Tally::default());
        let progress = {
            let mut runs = self.runs.lock();
            if let Some((running, _)) = runs.iter().find(|(_, run)| run.finished.is_none()) {
                return Err(BackupError::InProgress(running.clone()));
            }
            let run = Run {
                destination: destination.clone(),
                started_at_us,
                groups_total: u64::from(self.shards.shard_count()) + 1,
                tally: tally.clone(),
                finished: None,
            };
            let progress = run.progress(&id);
            runs.insert(id.clone(), run);
            while runs.len() > RUNS_KEPT {
                let oldest_finished = runs.iter().find(|(_, run)| run.finished.is_some()).map(|(id, _)| id.clone());
                match oldest_finished {
                    Some(oldest) => runs.remove(&oldest),
                    None => break,
                };
            }
            progress
        };
        tracing::info!(backup = %id, destination = %destination, "backup started");
        let this = self.clone();
        // A node task: shutdown waits (bounded) for it before closing the storage it reads.
        self.shards.tasks.spawn(async move {
            let result = this.run(&id, &store, started_at_us, tally).await;
            // The marker protected this backup's files from pruning while it ran.
            if let Err(error) = store.delete(&manifest::pending_path(&id)).await {
                tracing::warn!(backup = %id, error = %error, "removing the backup's pending marker failed; pruning waits for it to age");
            }
            let finished_at_us = now_us();
            let duration = (finished_at_us.saturating_sub(started_at_us)) as f64 / 1e6;
            let outcome = match result {
                Ok(manifest) => {
                    metrics::BACKUPS.with_label_values(&["success"]).inc();
                    this.record_success(LastSuccess {
                        id: id.clone(),
                        finished_at_us,
                        duration_seconds: duration,
                        bytes: manifest.bytes,
                    });
                    tracing::info!(backup = %id, duration_s = duration, bytes = manifest.bytes, uploaded = manifest.uploaded_bytes, "backup finished");
                    this.prune(&store, &id).await;
                    Ok(manifest::manifest_path(&id))
                }
                Err(error) => {
                    metrics::BACKUPS.with_label_values(&["failure"]).inc();
                    tracing::error!(backup = %id, error = %error, "backup failed; it left no manifest");
                    Err((error.code(), error.to_string()))
                }
            };
            if let Some(run) = this.runs.lock().get_mut(&id) {
                run.finished = Some((finished_at_us, outcome));
            }
        });
        Ok(progress)
    }

    pub fn progress(&self, id: &str) -> Result<BackupProgress, BackupError> {
        self.runs.lock().get(id).map(|run| run.progress(id)).ok_or_else(|| BackupError::NotFound(id.to_string()))
    }

    /// Every run this node remembers, newest first.
    pub fn runs(&self) -> Vec<BackupProgress> {
        self.runs.lock().iter().rev().map(|(id, run)| run.progress(id)).collect()
    }

    async fn run(
        &self,
        id: &str,
        store: &BackupStore,
        started_at_us: u64,
        tally: Arc<Tally>,
    ) -> Result<Manifest, BackupError> {
        // Written first: peers check they see it (one store for every node), and pruning
        // leaves files alone while a backup is pending.
        let marker = serde_json::json!({"coordinator": self.shards.node_id, "started_at_us": started_at_us});
        store.put(&manifest::pending_path(id), marker.to_string().into_bytes()).await?;
        let mut shards: Vec<u16> = (0..self.shards.shard_count()).collect();
        shards.push(META_SHARD);
        let copies: Vec<Result<GroupBackup, BackupError>> = stream::iter(shards)
            .map(|shard| self.copy_anywhere(id, store, shard, tally.clone()))
            .buffered(GROUPS_AT_ONCE)
            .collect()
            .await;
        let groups = copies.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut seen = BTreeSet::new();
        let bytes =
            groups.iter().flat_map(|g| &g.files).filter(|f| seen.insert(f.sha256.clone())).map(|f| f.bytes).sum();
        let manifest = Manifest {
            format: manifest::FORMAT,
            id: id.to_string(),
            cluster_id: self.cluster_id.clone(),
            shards: self.shards.shard_count(),
            coordinator: self.shards.node_id,
            started_at: chrono::DateTime::from_timestamp_micros(started_at_us as i64).unwrap_or_default().to_rfc3339(),
            started_at_us,
            finished_at_us: now_us(),
            groups,
            bytes,
            uploaded_bytes: tally.bytes_uploaded.load(Ordering::Relaxed),
            compression: self.settings.compression_enabled,
        };
        // Every file the manifest names is in the store, whole, before it is committed.
        let files: Vec<FileRef> = manifest.groups.iter().flat_map(|g| g.files.iter().cloned()).collect();
        let checks: Vec<Result<(), BackupError>> = stream::iter(files)
            .map(|file| async move {
                match store.size(&manifest::file_path(&file.sha256)).await? {
                    Some(size) if size == file.bytes => Ok(()),
                    found => Err(BackupError::Store(format!(
                        "file {} is {} after the copy, expected {} bytes",
                        manifest::file_path(&file.sha256),
                        found.map_or("missing".to_string(), |s| format!("{s} bytes")),
                        file.bytes
                    ))),
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        checks.into_iter().collect::<Result<Vec<()>, _>>()?;
        let encoded = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Store(e.to_string()))?;
        // The commit point: written once every file it names is stored.
        store.put(&manifest::manifest_path(id), encoded).await?;
        Ok(manifest)
    }

    /// The nodes to copy `shard` from, best first: its leader (it has applied the most), this
    /// node, the other voters.
    fn sources(&self, shard: u16) -> Result<Vec<(u64, String)>, BackupError> {
        let failed = |message: String| BackupError::Failed { shard, message };
        let status = self.shards.status(shard).map_err(|e| failed(e.to_string()))?;
        let voters = self.shards.voters(shard).map_err(|e| failed(e.to_string()))?;
        let rank = |id: u64| (Some(id) != status.leader, id != self.shards.node_id, id);
        let mut ranked = voters;
        ranked.sort_by_key(|(id, _)| rank(*id));
        Ok(ranked)
    }

    /// Copies `shard` from the first source that can.
    async fn copy_anywhere(
        &self,
        id: &str,
        store: &BackupStore,
        shard: u16,
        tally: Arc<Tally>,
    ) -> Result<GroupBackup, BackupError> {
        let mut failures = Vec::new();
        for (node, addr) in self.sources(shard)? {
            let copied = if node == self.shards.node_id {
                self.copy_local(store, shard, self.settings.compression_enabled, tally.clone()).await
            } else {
                self.copy_remote(id, &store.name, &addr, shard, &tally).await
            };
            match copied {
                Ok(group) => return Ok(group),
                // Another replica would meet the same store.
                Err(error @ (BackupError::Store(_) | BackupError::Destination(..))) => return Err(error),
                Err(error) => {
                    tracing::warn!(backup = %id, shard, node, error = %error, "copying a replica failed; trying another");
                    failures.push(format!("node {node}: {error}"));
                }
            }
        }
        Err(BackupError::Failed { shard, message: format!("no replica could be copied ({})", failures.join("; ")) })
    }

    /// Copies this node's replica of `shard` if it is healthy (checked since start, not being
    /// repaired).
    pub async fn copy_local(
        &self,
        store: &BackupStore,
        shard: u16,
        compress: bool,
        tally: Arc<Tally>,
    ) -> Result<GroupBackup, BackupError> {
        let failed = |message: String| BackupError::Failed { shard, message };
        let group = self.shards.group(shard).map_err(|e| failed(e.to_string()))?;
        if shard != META_SHARD && !self.shards.hosts(&group) {
            return Err(failed("this node holds no replica".into()));
        }
        if !group.health.sends_snapshots() {
            return Err(failed("this node's replica is unchecked since start or being repaired".into()));
        }
        copy::copy_group(
            self.storage.clone(),
            self.shards.node_id,
            store.clone(),
            shard,
            compress,
            self.settings.max_concurrent_uploads,
            self.pacer.clone(),
            tally,
        )
        .await
    }

    /// Answers a peer's `CopyReplicas`: copies this node's replicas of `shards`.
    pub async fn copy_for_peer(
        &self,
        backup_id: &str,
        destination: &str,
        shards: &[u16],
        compress: bool,
    ) -> Result<CopyReplicasReply, BackupError> {
        let store = crate::storage::blocking(|| BackupStore::open(destination, &self.settings, true))?;
        // A directory destination must be one directory every node sees (a shared mount): else
        // this node's files would land where the manifest is not.
        if !store.exists(&manifest::pending_path(backup_id)).await? {
            return Err(BackupError::Destination(
                destination.to_string(),
                format!(
                    "node {} does not see the coordinator's store (no pending marker of backup {backup_id}): a directory destination must be the same shared directory on every node; use S3 otherwise",
                    self.shards.node_id
                ),
            ));
        }
        tracing::info!(backup = %backup_id, ?shards, "copying replicas for a backup a peer coordinates");
        let tally = Arc::new(Tally::default());
        let mut replicas = Vec::with_capacity(shards.len());
        for shard in shards {
            replicas.push(to_wire(&self.copy_local(&store, *shard, compress, tally.clone()).await?));
        }
        let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        Ok(CopyReplicasReply {
            replicas,
            bytes_read: count(&tally.bytes_read),
            files_uploaded: count(&tally.files_uploaded),
            bytes_uploaded: count(&tally.bytes_uploaded),
            files_reused: count(&tally.files_reused),
            bytes_reused: count(&tally.bytes_reused),
        })
    }

    async fn copy_remote(
        &self,
        id: &str,
        destination: &str,
        addr: &str,
        shard: u16,
        tally: &Tally,
    ) -> Result<GroupBackup, BackupError> {
        let failed = |message: String| BackupError::Failed { shard, message };
        let channel = self.shards.peer_channel(addr).ok_or_else(|| failed(format!("no channel to {addr}")))?;
        let mut client = BackupClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let request = CopyReplicasRequest {
            backup_id: id.to_string(),
            destination: destination.to_string(),
            shards: vec![u32::from(shard)],
            compress: self.settings.compression_enabled,
        };
        let reply = client.copy_replicas(request).await.map_err(|status| match ErrorCode::of_status(&status) {
            Some(ErrorCode::BackupStoreFailed) => BackupError::Store(format!("node at {addr}: {}", status.message())),
            _ => failed(status.message().to_string()),
        })?;
        let reply = reply.into_inner();
        for (counter, value) in [
            (&tally.bytes_read, reply.bytes_read),
            (&tally.files_uploaded, reply.files_uploaded),
            (&tally.bytes_uploaded, reply.bytes_uploaded),
            (&tally.files_reused, reply.files_reused),
            (&tally.bytes_reused, reply.bytes_reused),
        ] {
            counter.fetch_add(value, Ordering::Relaxed);
        }
        let replica = reply.replicas.into_iter().find(|r| r.shard == u32::from(shard));
        let replica = replica.ok_or_else(|| failed(format!("{addr} answered without the shard")))?;
        let group = from_wire(replica).map_err(failed)?;
        tally.groups_done.fetch_add(1, Ordering::Relaxed);
        Ok(group)
    }

    /// Deletes the manifests older than `backup.retention_days` (never the newest backup,
    /// `keep`), then the files no remaining backup uses and the archived log segments that end
    /// before every remaining backup (never a group's newest). Failures are logged: the backup
    /// itself succeeded.
    async fn prune(&self, store: &BackupStore, keep: &str) {
        if self.settings.retention_days == 0 {
            return;
        }
        match prune(store, self.settings.retention_days, keep, now_us()).await {
            Ok((manifests, files)) if manifests + files > 0 => {
                tracing::info!(manifests, files, "old backups pruned (backup.retention_days)");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, "pruning old backups failed"),
        }
    }
}

/// See [`Backups::prune`]: (manifests deleted, files and archived log segments deleted).
pub async fn prune(
    store: &BackupStore,
    retention_days: u64,
    keep: &str,
    now_us: u64,
) -> Result<(usize, usize), BackupError> {
    let cutoff = now_us.saturating_sub(retention_days.saturating_mul(86_400_000_000));
    let listed = store.list("manifests").await?;
    let mut kept = Vec::new();
    let mut deleted = 0;
    for object in listed {
        let id = object.path.trim_start_matches("manifests/").trim_end_matches(".json").to_string();
        if id != keep && object.modified_us < cutoff {
            store.delete(&object.path).await?;
            deleted += 1;
        } else {
            kept.push(id);
        }
    }
    // A backup running now (its pending marker less than a day old) may use files no manifest
    // names yet, or reuse old ones: files wait. Older markers are of coordinators that died.
    let mut running = false;
    for marker in store.list("pending").await? {
        if marker.modified_us.saturating_add(PENDING_MAX_AGE_US) < now_us {
            store.delete(&marker.path).await?;
        } else {
            running = true;
        }
    }
    if running {
        return Ok((deleted, 0));
    }
    let mut used = BTreeSet::new();
    // Per (cluster, shard): the oldest applied index a kept backup starts from. Archived log
    // segments wholly before it are never replayed again.
    let mut oldest_start: BTreeMap<(String, u16), u64> = BTreeMap::new();
    for id in &kept {
        // A manifest that cannot be read keeps every file (the verify names it).
        let Ok(manifest) = verify::read_manifest(store, id).await else { return Ok((deleted, 0)) };
        used.extend(manifest.files().map(|(_, f)| f.sha256.clone()));
        for group in &manifest.groups {
            let start = oldest_start.entry((manifest.cluster_id.clone(), group.shard)).or_insert(u64::MAX);
            *start = (*start).min(group.applied_index);
        }
    }
    let mut segments = 0;
    for ((cluster_id, shard), start) in &oldest_start {
        let listed = archive::list_segments(store, cluster_id, *shard).await?;
        // The newest segment stays: it tells a new leader where the archive ends.
        let newest = listed.iter().map(|(_, last, _)| *last).max().unwrap_or(0);
        for (_, last, path) in listed {
            if last <= *start && last < newest {
                store.delete(&path).await?;
                segments += 1;
            }
        }
    }
    let mut files = 0;
    for object in store.list("files").await? {
        let name = object.path.rsplit('/').next().unwrap_or_default();
        if !used.contains(name) && object.modified_us.saturating_add(UNREFERENCED_GRACE_US) < now_us {
            store.delete(&object.path).await?;
            files += 1;
        }
    }
    Ok((deleted, files + segments))
}

/// A copied replica as sent between nodes.
pub fn to_wire(group: &GroupBackup) -> CopiedReplica {
    CopiedReplica {
        shard: u32::from(group.shard),
        node: group.node,
        applied_index: group.applied_index,
        applied_term: group.applied_term,
        voters: group.voters.clone(),
        digest_root: group.digest_root.clone(),
        digest_buckets: group.digest_buckets,
        records: group.records,
        raw_bytes: group.raw_bytes,
        files: group
            .files
            .iter()
            .map(|f| BackupFile { sha256: f.sha256.clone(), bytes: f.bytes, records: f.records })
            .collect(),
    }
}

pub fn from_wire(replica: CopiedReplica) -> Result<GroupBackup, String> {
    let shard = u16::try_from(replica.shard).map_err(|_| format!("shard {} out of range", replica.shard))?;
    Ok(GroupBackup {
        shard,
        node: replica.node,
        applied_index: replica.applied_index,
        applied_term: replica.applied_term,
        voters: replica.voters,
        digest_root: replica.digest_root,
        digest_buckets: replica.digest_buckets,
        records: replica.records,
        raw_bytes: replica.raw_bytes,
        files: replica
            .files
            .into_iter()
            .map(|f| FileRef { sha256: f.sha256, bytes: f.bytes, records: f.records })
            .collect(),
    })
}

/// Whether a directory store's `dir` is on the same filesystem as `data_dir`.
fn shares_a_filesystem(dir: Option<&std::path::Path>, data_dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = dir else { return false };
    match (std::fs::metadata(dir), std::fs::metadata(data_dir)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_on_the_data_dirs_filesystem_is_noticed() {
        let data = tempfile::tempdir().expect("tempdir");
        let beside = data.path().join("backups");
        std::fs::create_dir(&beside).expect("mkdir");
        assert!(shares_a_filesystem(Some(&beside), data.path()));
        // procfs is never the data dir's filesystem; S3 (no directory) and missing directories
        // are not either.
        assert!(!shares_a_filesystem(Some(std::path::Path::new("/proc")), data.path()));
        assert!(!shares_a_filesystem(None, data.path()));
        assert!(!shares_a_filesystem(Some(&data.path().join("missing")), data.path()));
    }
}
