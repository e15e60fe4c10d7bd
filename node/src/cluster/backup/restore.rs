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
//! At start the node installs the staged groups, checks its replicas (the start-up scrub
//! compares each replica with the digests it carries) and only then leads or serves.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::chunk::{FileDamage, STATE_MACHINE};
use super::manifest::GroupBackup;
use super::store::BackupStore;
use super::verify::{check_digest, latest, read_group, read_manifest, ReadFailure};
use super::BackupError;
use crate::cluster::identity::{
    cluster_id_of, identity_recorded, record_restored, restored_cluster_id, NodeIdentity, FORMAT_VERSION,
};
use crate::meta::{place_replicas, MetaCommand, MetaState, NodeId, META_SHARD};
use crate::raft::restore::StagedGroup;
use crate::raft::types::group_of_shard;
use crate::shard::digest::DigestWalk;
use crate::shard::keys;
use crate::storage::{Storage, StorageOptions};

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
}

/// Builds `request.data_dir` from the backup. See the module doc.
pub async fn restore(request: RestoreRequest) -> Result<RestoreReport, BackupError> {
    let started = std::time::Instant::now();
    let store = &request.store;
    let id = match &request.backup_id {
        Some(id) => id.clone(),
        None => latest(store).await?,
    };
    let manifest = read_manifest(store, &id).await?;
    if !request.members.contains_key(&request.node_id) {
        return Err(BackupError::Refused(format!(
            "node {} is not in the initial cluster {:?}",
            request.node_id,
            request.members.keys().collect::<Vec<_>>()
        )));
    }
    let not_empty = std::fs::read_dir(&request.data_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if not_empty {
        return Err(BackupError::Refused(format!(
            "{} is not empty: restore into an empty data dir (move the old one aside)",
            request.data_dir.display()
        )));
    }
    // Until the identity is written the dir is half restored: `serve` refuses it.
    let marker = request.data_dir.join(RESTORING_MARKER);
    std::fs::create_dir_all(&request.data_dir)
        .and_then(|()| std::fs::write(&marker, id.as_bytes()))
        .map_err(|e| BackupError::Refused(format!("{}: {e}", request.data_dir.display())))?;
    let data_dir = request.data_dir.clone();
    let options = request.storage.clone();
    let storage = tokio::task::spawn_blocking(move || Storage::open(&data_dir, options))
        .await
        .map_err(|e| BackupError::Refused(format!("opening the data dir: {e}")))??;
    let result = stage_all(&request, &storage, &manifest).await;
    let result = match result {
        Ok((groups, records, bytes)) => {
            let identity = NodeIdentity {
                node_id: request.node_id,
                cluster_id: restored_cluster_id(&id, &request.members),
                shards: manifest.shards,
                format_version: FORMAT_VERSION,
                restored_for: (request.members.len() > 1).then(|| cluster_id_of(&request.members)),
            };
            record_restored(&storage, &identity).map_err(BackupError::from).map(|()| RestoreReport {
                backup_id: id.clone(),
                backed_up_cluster_id: manifest.cluster_id.clone(),
                cluster_id: identity.cluster_id.clone(),
                node_id: request.node_id,
                data_dir: request.data_dir.clone(),
                groups,
                records,
                bytes,
                elapsed_ms: started.elapsed().as_millis() as u64,
            })
        }
        Err(error) => Err(error),
    };
    let closed = storage.close();
    let report = result?;
    closed?;
    std::fs::remove_file(&marker).map_err(|e| BackupError::Refused(format!("{}: {e}", marker.display())))?;
    Ok(report)
}

/// Stages every group this node hosts: (groups, records, bytes).
async fn stage_all(
    request: &RestoreRequest,
    storage: &Arc<Storage>,
    manifest: &super::manifest::Manifest,
) -> Result<(Vec<u16>, u64, u64), BackupError> {
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
    let (mut groups, mut records, mut bytes) = (Vec::new(), 0u64, 0u64);
    for group in &manifest.groups {
        let voters = voters_of(group.shard);
        if !voters.contains_key(&request.node_id) {
            continue;
        }
        stage_group(request, storage, group, &voters, &meta_bytes).await?;
        groups.push(group.shard);
        records += group.records;
        bytes += group.files.iter().map(|f| f.bytes).sum::<u64>();
    }
    Ok((groups, records, bytes))
}

async fn stage_group(
    request: &RestoreRequest,
    storage: &Storage,
    group: &GroupBackup,
    voters: &BTreeMap<NodeId, String>,
    meta_bytes: &[u8],
) -> Result<(), BackupError> {
    let group_id = group_of_shard(group.shard);
    let mut staged = StagedGroup::begin(storage, group.shard, group.applied_index, voters)
        .map_err(|e| BackupError::Refused(format!("{}: staging: {e}", group.label())))?;
    let mut walk = DigestWalk::new(group_id);
    let digests = keys::state_key(group_id, b'D');
    let meta_key = keys::meta_state_key(group_id);
    let mut write_error = None;
    let read = read_group(&request.store, group, |family, key, value| {
        if family == STATE_MACHINE {
            walk.record(key, value);
        }
        let written = if group.is_meta() && family == STATE_MACHINE && key.starts_with(&digests) {
            // Rebuilt at install, over the new metadata.
            Ok(())
        } else if group.is_meta() && family == STATE_MACHINE && key == meta_key.as_slice() {
            staged.record(family, key, meta_bytes)
        } else {
            staged.record(family, key, value)
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
            staged.abandon();
            Err(BackupError::Refused(format!("{}: staging: {error}", group.label())))
        }
        (None, Err(ReadFailure::Store(error))) => {
            staged.abandon();
            Err(error)
        }
        (None, Err(ReadFailure::Damaged(damage))) => {
            staged.abandon();
            let file = damage.file.map(|f| format!(" file {f}:")).unwrap_or_default();
            Err(BackupError::Damaged(format!("{}:{file} {}", damage.group, damage.problem)))
        }
        (None, Ok(())) => {
            staged.finish().map_err(|e| BackupError::Refused(format!("{}: staging: {e}", group.label())))?;
            tracing::info!(group = %group.label(), index = group.applied_index, records = group.records, "replica restored");
            Ok(())
        }
    }
}
