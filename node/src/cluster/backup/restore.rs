//! Restoring a backup into the data dir of one node of a **new** cluster. Run on every node of
//! the new cluster with the same backup and `initial_cluster`; each builds its own data dir
//! without talking to any other node (or to the old cluster):
//!
//! 1. the manifest is read and checked; the data dir must hold no node yet;
//! 2. every group this node hosts in the new cluster (the bootstrap placement of
//!    `initial_cluster`, and the meta group on every node) is staged from the backup's files
//!    (`raft::restore::StagedGroup`), each file checked against its SHA-256 and each group's
//!    records against the manifest's digest before the group is staged;
//! 3. the meta group's cluster metadata is replaced by the new cluster's (members, placement;
//!    the policy, grants and breakers, are kept), and its digests are rebuilt at install;
//! 4. the identity is written last, with a new cluster id (`identity::restored_cluster_id`).
//!
//! With the archived log (`archive`), a group's entries after the backup's copy are replayed
//! (`raft::restore::Replay`, in a scratch storage inside the data dir) up to `--as-of`, the
//! end of the archive, or a gap in it, whichever comes first; the group is then staged at the
//! last replayed index. With `--as-of` the newest backup that finished by then is used. Where
//! each group's replay ends is decided once per new cluster, by the first node restored, in a
//! plan in the store ([`ReplayPlan`]), so every node replays the same entries even while the
//! archive grows (the old cluster still running).
//!
//! At start the node installs the staged groups, checks its replicas (the start-up scrub
//! compares each replica with the digests it carries) and only then leads or serves.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::archive;
use super::chunk::{FileDamage, INDEX, STATE_MACHINE};
use super::manifest::GroupBackup;
use super::store::BackupStore;
use super::verify::{check_digest, latest, read_group, read_manifest, ReadFailure};
use super::BackupError;
use crate::cluster::identity::{
    cluster_id_of, identity_recorded, record_restored, restored_cluster_id, NodeIdentity, FORMAT_VERSION,
};
use crate::meta::{place_replicas, MetaCommand, MetaState, NodeId, META_SHARD};
use crate::raft::restore::{Replay, StagedGroup};
use crate::raft::types::group_of_shard;
use crate::shard::digest::DigestWalk;
use crate::shard::keys;
use crate::storage::{ColumnFamily, Storage, StorageOptions};

/// A file in a data dir whose restore has not finished; `stemedb serve` refuses such a dir.
pub const RESTORING_MARKER: &str = "RESTORING";

pub struct RestoreRequest {
    pub store: BackupStore,
    /// The newest backup when `None`.
    pub backup_id: Option<String>,
    pub data_dir: PathBuf,
    pub node_id: NodeId,
    /// The new cluster: node id → Raft address (one entry for a single node).
    pub members: BTreeMap<NodeId, String>,
    pub replication_factor: u16,
    pub storage: StorageOptions,
    /// Replay the archived log after the backup (`stemedb backup restore` unless `--no-log`).
    pub replay_log: bool,
    /// Replay only entries proposed at or before this time (µs since the epoch).
    pub as_of_us: Option<u64>,
}

/// How far a group's archived log was replayed after the backup's copy.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayedGroup {
    pub shard: u16,
    /// The backup's applied index, and the last index replayed.
    pub from_index: u64,
    pub to_index: u64,
    pub entries: u64,
    /// When the last replayed client command was proposed (µs), if any was.
    pub last_proposed_at_us: Option<u64>,
    /// `as_of`, `end` (of the archive) or `gap` (the archive misses entries after `to_index`).
    pub stopped_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    pub backed_up_cluster_id: String,
    pub cluster_id: String,
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// Shards restored on this node (the meta group as 65535).
    pub groups: Vec<u16>,
    pub records: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
    /// Groups whose archived log was replayed (empty without archival).
    pub replayed: Vec<ReplayedGroup>,
}

/// Builds `request.data_dir` from the backup. See the module doc.
pub async fn restore(request: RestoreRequest) -> Result<RestoreReport, BackupError> {
    let started = std::time::Instant::now();
    let store = &request.store;
    let id = match (&request.backup_id, request.as_of_us) {
        (Some(id), _) => id.clone(),
        (None, None) => latest(store).await?,
        (None, Some(as_of)) => latest_by(store, as_of).await?,
    };
    let manifest = read_manifest(store, &id).await?;
    if let Some(as_of) = request.as_of_us.filter(|as_of| manifest.finished_at_us > *as_of) {
        return Err(BackupError::Refused(format!(
            "backup {id} finished after --as-of ({} > {as_of} µs): it may hold later writes; name an earlier backup",
            manifest.finished_at_us
        )));
    }
    if !request.members.contains_key(&request.node_id) {
        return Err(BackupError::Refused(format!(
            "node {} is not in the initial cluster {:?}",
            request.node_id,
            request.members.keys().collect::<Vec<_>>()
        )));
    }
    let not_empty = crate::storage::blocking(|| {
        std::fs::read_dir(&request.data_dir).map(|mut d| d.next().is_some()).unwrap_or(false)
    });
    if not_empty {
        return Err(BackupError::Refused(format!(
            "{} is not empty: restore into an empty data dir (move the old one aside)",
            request.data_dir.display()
        )));
    }
    // Until the identity is written the dir is half restored: `serve` refuses it.
    let marker = request.data_dir.join(RESTORING_MARKER);
    crate::storage::blocking(|| {
        std::fs::create_dir_all(&request.data_dir).and_then(|()| std::fs::write(&marker, id.as_bytes()))
    })
    .map_err(|e| BackupError::Refused(format!("{}: {e}", request.data_dir.display())))?;
    let data_dir = request.data_dir.clone();
    let options = request.storage.clone();
    let storage = tokio::task::spawn_blocking(move || Storage::open(&data_dir, options))
        .await
        .map_err(|e| BackupError::Refused(format!("opening the data dir: {e}")))??;
    let result = stage_all(&request, &storage, &manifest).await;
    let result = match result {
        Ok((groups, records, bytes, replayed)) => {
            let identity = NodeIdentity {
                node_id: request.node_id,
                cluster_id: restored_cluster_id(&id, &request.members),
                shards: manifest.shards,
                format_version: FORMAT_VERSION,
                restored_for: (request.members.len() > 1).then(|| cluster_id_of(&request.members)),
            };
            crate::storage::blocking(|| record_restored(&storage, &identity)).map_err(BackupError::from).map(|()| {
                RestoreReport {
                    backup_id: id.clone(),
                    backed_up_cluster_id: manifest.cluster_id.clone(),
                    cluster_id: identity.cluster_id.clone(),
                    node_id: request.node_id,
                    data_dir: request.data_dir.clone(),
                    groups,
                    records,
                    bytes,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    replayed,
                }
            })
        }
        Err(error) => Err(error),
    };
    let closed = crate::storage::blocking(|| storage.close());
    let report = result?;
    closed?;
    crate::storage::blocking(|| std::fs::remove_file(&marker))
        .map_err(|e| BackupError::Refused(format!("{}: {e}", marker.display())))?;
    Ok(report)
}

/// The newest backup that finished at or before `as_of_us`.
async fn latest_by(store: &BackupStore, as_of_us: u64) -> Result<String, BackupError> {
    let mut newest: Option<(u64, String)> = None;
    for listed in super::verify::list(store).await? {
        let Ok(manifest) = read_manifest(store, &listed.id).await else { continue };
        if manifest.finished_at_us <= as_of_us && newest.as_ref().is_none_or(|(at, _)| manifest.finished_at_us > *at) {
            newest = Some((manifest.finished_at_us, listed.id));
        }
    }
    newest.map(|(_, id)| id).ok_or_else(|| BackupError::NotFound(format!("finished by --as-of ({as_of_us} µs)")))
}

/// Stages every group this node hosts: (groups, records, bytes, replayed).
async fn stage_all(
    request: &RestoreRequest,
    storage: &Arc<Storage>,
    manifest: &super::manifest::Manifest,
) -> Result<(Vec<u16>, u64, u64, Vec<ReplayedGroup>), BackupError> {
    if identity_recorded(storage)? {
        return Err(BackupError::Refused(format!(
            "{} already holds a node's data: restore into an empty data dir (move the old one aside)",
            request.data_dir.display()
        )));
    }
    let placement = place_replicas(&request.members, manifest.shards, request.replication_factor);
    let voters_of = |shard: u16| -> BTreeMap<NodeId, String> {
        if shard == META_SHARD {
            return request.members.clone();
        }
        placement
            .get(&shard)
            .into_iter()
            .flatten()
            .filter_map(|id| request.members.get(id).map(|addr| (*id, addr.clone())))
            .collect()
    };
    let mut meta = MetaState::default();
    let bootstrap = MetaCommand::Bootstrap { nodes: request.members.clone(), placement: placement.clone() };
    // The same on every node: each restores on its own, and the replicas must be identical.
    meta.apply(bootstrap, manifest.started_at_us)
        .map_err(|e| BackupError::Refused(format!("the new cluster's metadata: {e}")))?;
    let meta_bytes = serde_json::to_vec(&meta).map_err(|e| BackupError::Refused(e.to_string()))?;
    let plan = match request.replay_log {
        true => Some(settle_plan(request, manifest).await?),
        false => None,
    };
    let (mut groups, mut records, mut bytes, mut replayed) = (Vec::new(), 0u64, 0u64, Vec::new());
    let mut scratch: Option<Arc<Storage>> = None;
    let scratch_dir = request.data_dir.join("replay-scratch");
    let mut outcome = Ok(());
    for group in &manifest.groups {
        let voters = voters_of(group.shard);
        if !voters.contains_key(&request.node_id) {
            continue;
        }
        let planned =
            plan.as_ref().and_then(|p| p.groups.get(&group.shard)).filter(|p| p.to_index > group.applied_index);
        let segments = match planned {
            Some(_) => archive::list_segments(&request.store, &manifest.cluster_id, group.shard)
                .await?
                .into_iter()
                .filter(|(_, last, _)| *last > group.applied_index)
                .collect::<Vec<_>>(),
            None => Vec::new(),
        };
        let staged = if let Some(planned) = planned.filter(|_| !segments.is_empty()) {
            let scratch = match &scratch {
                Some(opened) => opened.clone(),
                None => {
                    let (dir, options) = (scratch_dir.clone(), request.storage.clone());
                    let opened = tokio::task::spawn_blocking(move || Storage::open(&dir, options))
                        .await
                        .map_err(|e| BackupError::Refused(format!("opening the replay scratch: {e}")))??;
                    scratch.insert(opened).clone()
                }
            };
            match replay_group(request, storage, &scratch, group, &segments, planned, &voters, &meta_bytes).await {
                Ok(done) => {
                    replayed.push(done);
                    Ok(())
                }
                Err(error) => Err(error),
            }
        } else {
            stage_group(request, storage, group, &voters, Some(&meta_bytes)).await
        };
        if let Err(error) = staged {
            outcome = Err(error);
            break;
        }
        groups.push(group.shard);
        records += group.records;
        bytes += group.files.iter().map(|f| f.bytes).sum::<u64>();
    }
    if let Some(scratch) = scratch {
        let (closed, removed) = crate::storage::blocking(|| (scratch.close(), std::fs::remove_dir_all(&scratch_dir)));
        if outcome.is_ok() {
            closed?;
            removed.map_err(|e| BackupError::Refused(format!("{}: {e}", scratch_dir.display())))?;
        }
    }
    outcome.map(|()| (groups, records, bytes, replayed))
}

/// What a restored replica holds for one record of the backed-up one: the meta group's
/// cluster metadata is the new cluster's (`new_meta`), its digests are rebuilt at install
/// (`None`: not staged); every other record is kept.
fn restaged<'a>(group: &GroupBackup, family: u8, key: &[u8], value: &'a [u8], new_meta: &'a [u8]) -> Option<&'a [u8]> {
    if !group.is_meta() || family != STATE_MACHINE {
        return Some(value);
    }
    let group_id = group_of_shard(group.shard);
    if key.starts_with(&keys::state_key(group_id, b'D')) {
        None
    } else if key == keys::meta_state_key(group_id).as_slice() {
        Some(new_meta)
    } else {
        Some(value)
    }
}

/// Where each group's replay ends, decided once for the new cluster and shared by its nodes
/// through the store (`restores/<new cluster id>.json`, written only if absent): nodes restored
/// at different moments, while the archive still grows, replay the same entries.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ReplayPlan {
    pub cluster_id: String,
    pub backup_id: String,
    pub as_of_us: Option<u64>,
    pub groups: BTreeMap<u16, PlannedGroup>,
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct PlannedGroup {
    pub to_index: u64,
    pub last_proposed_at_us: Option<u64>,
    /// `as_of`, `end` or `gap`.
    pub stopped_at: String,
}

fn plan_path(cluster_id: &str) -> String {
    format!("restores/{cluster_id}.json")
}

/// The plan of this restore: the one another node of the new cluster wrote, else a new one
/// (written if no other node wrote one meanwhile; else theirs). A plan made with another
/// backup or `--as-of` is refused.
async fn settle_plan(
    request: &RestoreRequest,
    manifest: &super::manifest::Manifest,
) -> Result<ReplayPlan, BackupError> {
    let cluster_id = restored_cluster_id(&manifest.id, &request.members);
    let path = plan_path(&cluster_id);
    let read = |bytes: Vec<u8>| -> Result<ReplayPlan, BackupError> {
        let plan: ReplayPlan = serde_json::from_slice(&bytes)
            .map_err(|e| BackupError::Damaged(format!("{path}: unreadable restore plan: {e}")))?;
        if plan.backup_id != manifest.id || plan.as_of_us != request.as_of_us {
            return Err(BackupError::Refused(format!(
                "another restore of the same new cluster ({cluster_id}) used backup {} and --as-of {:?}: restore every node with the same values, or delete {path} from the store to start over",
                plan.backup_id, plan.as_of_us
            )));
        }
        Ok(plan)
    };
    if let Some(bytes) = request.store.get(&path).await? {
        return read(bytes);
    }
    let mut groups = BTreeMap::new();
    for group in &manifest.groups {
        groups.insert(group.shard, plan_group(request, &manifest.cluster_id, group).await?);
    }
    let plan = ReplayPlan {
        cluster_id: cluster_id.clone(),
        backup_id: manifest.id.clone(),
        as_of_us: request.as_of_us,
        groups,
    };
    let nothing_to_replay =
        manifest.groups.iter().all(|g| plan.groups.get(&g.shard).is_none_or(|p| p.to_index <= g.applied_index));
    if nothing_to_replay {
        // No archived entry after the backup: the restore writes nothing into the store.
        return Ok(plan);
    }
    let bytes = serde_json::to_vec_pretty(&plan).map_err(|e| BackupError::Refused(e.to_string()))?;
    if request.store.put_if_absent(&path, bytes).await? {
        return Ok(plan);
    }
    match request.store.get(&path).await? {
        Some(bytes) => read(bytes),
        None => Err(BackupError::Store(format!("{path}: the restore plan vanished"))),
    }
}

/// Where `group`'s replay ends: the last client command proposed by `--as-of` (entries without
/// a time count only before a later command), the archive's end, or a gap.
async fn plan_group(
    request: &RestoreRequest,
    cluster_id: &str,
    group: &GroupBackup,
) -> Result<PlannedGroup, BackupError> {
    let segments = archive::list_segments(&request.store, cluster_id, group.shard).await?;
    let mut next = group.applied_index + 1;
    let mut planned =
        PlannedGroup { to_index: group.applied_index, last_proposed_at_us: None, stopped_at: "end".into() };
    'segments: for (first, last, path) in segments.iter().filter(|(_, last, _)| *last > group.applied_index) {
        if *first > next {
            planned.stopped_at = "gap".into();
            break;
        }
        for (index, _, proposed_at) in read_segment(&request.store, group, *first, *last, path).await? {
            if index < next {
                continue;
            }
            if index > next {
                planned.stopped_at = "gap".into();
                break 'segments;
            }
            next += 1;
            let Some(at) = proposed_at else { continue };
            if request.as_of_us.is_some_and(|as_of| at > as_of) {
                planned.stopped_at = "as_of".into();
                break 'segments;
            }
            planned.to_index = index;
            planned.last_proposed_at_us = Some(at);
        }
    }
    Ok(planned)
}

/// The entries of one archived segment of `group`, checked: (index, entry, proposed at).
async fn read_segment(
    store: &BackupStore,
    group: &GroupBackup,
    first: u64,
    last: u64,
    path: &str,
) -> Result<Vec<(u64, crate::raft::types::Entry, Option<u64>)>, BackupError> {
    let bytes = store.get(path).await?.ok_or_else(|| BackupError::Damaged(format!("{path}: vanished")))?;
    archive::decode_entries(&bytes, (group.shard, first, last))
        .map_err(|problem| BackupError::Damaged(format!("{}: file {path}: {problem}", group.label())))
}

/// Entries replayed at once.
const REPLAY_BATCH: usize = 512;

/// Stages `group` after replaying its archived log (`segments`, by first index) over the
/// backup's copy in `scratch`. See the module doc.
async fn replay_group(
    request: &RestoreRequest,
    storage: &Storage,
    scratch: &Arc<Storage>,
    group: &GroupBackup,
    segments: &[(u64, u64, String)],
    planned: &PlannedGroup,
    voters: &BTreeMap<NodeId, String>,
    meta_bytes: &[u8],
) -> Result<ReplayedGroup, BackupError> {
    let group_id = group_of_shard(group.shard);
    let refused =
        |what: &str, e: &dyn std::fmt::Display| BackupError::Refused(format!("{}: {what}: {e}", group.label()));
    // 1. The backup's copy, staged and installed in the scratch storage, records as they were.
    stage_group(request, scratch, group, voters, None).await?;
    let (scratch_storage, shard, buckets) = (scratch.clone(), group.shard, group.digest_buckets as usize);
    let mut replay = tokio::task::spawn_blocking(move || Replay::open(scratch_storage, shard, buckets))
        .await
        .map_err(|e| refused("opening for replay", &e))?
        .map_err(|e| refused("opening for replay", &e))?;
    // 2. The archived entries after it, in order, exactly through the plan's index.
    let to_index = planned.to_index;
    let mut next = group.applied_index + 1;
    let mut batch = Vec::new();
    for (first, last, path) in segments {
        if next > to_index {
            break;
        }
        if *first > next {
            break;
        }
        for (index, entry, _) in read_segment(&request.store, group, *first, *last, path).await? {
            if index < next || index > to_index {
                continue;
            }
            if index > next {
                break;
            }
            batch.push(entry);
            next += 1;
            if batch.len() >= REPLAY_BATCH {
                replay.apply(std::mem::take(&mut batch)).await.map_err(|e| refused("replaying", &e))?;
            }
        }
    }
    if next <= to_index {
        return Err(BackupError::Damaged(format!(
            "{}: the restore plan replays through index {to_index}, the archive now holds only through {} (segments pruned or lost since the plan was made)",
            group.label(),
            next - 1
        )));
    }
    if !batch.is_empty() {
        replay.apply(batch).await.map_err(|e| refused("replaying", &e))?;
    }
    drop(replay);
    let (last_proposed_at_us, stopped_at) = (planned.last_proposed_at_us, planned.stopped_at.clone());
    // 3. What the replay left, staged at its last index with the new membership.
    // Files created and synced: on a blocking thread, as every filesystem call here.
    let mut staged = crate::storage::blocking(|| StagedGroup::begin(storage, group.shard, to_index, voters))
        .map_err(|e| refused("staging", &e))?;
    let (scratch_storage, mut failure) = (scratch.clone(), None);
    let copied = crate::storage::blocking(|| {
        for (family, cf) in [(STATE_MACHINE, ColumnFamily::StateMachine), (INDEX, ColumnFamily::Index)] {
            scratch_storage.for_each_in_range(
                cf,
                &keys::group_prefix(group_id),
                &keys::group_end(group_id),
                |key, value| {
                    let written = restaged(group, family, key, value, meta_bytes)
                        .map_or(Ok(()), |v| staged.record(family, key, v));
                    match written {
                        Ok(()) => true,
                        Err(error) => {
                            failure = Some(error);
                            false
                        }
                    }
                },
            )?;
        }
        Ok::<_, crate::storage::StorageError>(())
    });
    if let Err(error) = copied {
        crate::storage::blocking(|| staged.abandon());
        return Err(error.into());
    }
    if let Some(error) = failure {
        crate::storage::blocking(|| staged.abandon());
        return Err(refused("staging", &error));
    }
    crate::storage::blocking(|| staged.finish()).map_err(|e| refused("staging", &e))?;
    tracing::info!(group = %group.label(), from = group.applied_index, to = to_index, stopped_at, "replica restored and its archived log replayed");
    Ok(ReplayedGroup {
        shard: group.shard,
        from_index: group.applied_index,
        to_index,
        entries: to_index - group.applied_index,
        last_proposed_at_us,
        stopped_at,
    })
}

/// Stages `group` from the backup's files into `storage` at the backup's applied index. With
/// `new_meta`, the meta group's cluster metadata is replaced by it (and its digests dropped, to
/// be rebuilt at install); without, the records are staged as they are (for a replay).
async fn stage_group(
    request: &RestoreRequest,
    storage: &Storage,
    group: &GroupBackup,
    voters: &BTreeMap<NodeId, String>,
    new_meta: Option<&[u8]>,
) -> Result<(), BackupError> {
    let group_id = group_of_shard(group.shard);
    let mut staged = crate::storage::blocking(|| StagedGroup::begin(storage, group.shard, group.applied_index, voters))
        .map_err(|e| BackupError::Refused(format!("{}: staging: {e}", group.label())))?;
    let mut walk = DigestWalk::new(group_id);
    let mut write_error = None;
    let read = read_group(&request.store, group, |family, key, value| {
        if family == STATE_MACHINE {
            walk.record(key, value);
        }
        let written = match new_meta {
            Some(meta) => restaged(group, family, key, value, meta).map_or(Ok(()), |v| staged.record(family, key, v)),
            None => staged.record(family, key, value),
        };
        written.map_err(|e| {
            write_error = Some(e);
            FileDamage::Malformed("staging failed")
        })
    })
    .await;
    let checked = read.and_then(|()| check_digest(group, &walk).map_err(ReadFailure::Damaged));
    match (write_error, checked) {
        (Some(error), _) => {
            crate::storage::blocking(|| staged.abandon());
            Err(BackupError::Refused(format!("{}: staging: {error}", group.label())))
        }
        (None, Err(ReadFailure::Store(error))) => {
            crate::storage::blocking(|| staged.abandon());
            Err(error)
        }
        (None, Err(ReadFailure::Damaged(damage))) => {
            crate::storage::blocking(|| staged.abandon());
            let file = damage.file.map(|f| format!(" file {f}:")).unwrap_or_default();
            Err(BackupError::Damaged(format!("{}:{file} {}", damage.group, damage.problem)))
        }
        (None, Ok(())) => {
            crate::storage::blocking(|| staged.finish())
                .map_err(|e| BackupError::Refused(format!("{}: staging: {e}", group.label())))?;
            tracing::info!(group = %group.label(), index = group.applied_index, records = group.records, "replica restored");
            Ok(())
        }
    }
}
