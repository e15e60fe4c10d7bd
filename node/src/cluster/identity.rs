//! A data dir remembers the node id, cluster id and shard count it was created with and refuses
//! to start with different ones: pointing a node at another node's data would silently fork or
//! lose data.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::storage::{ColumnFamily, Durability, Storage, StorageError, WriteBatch};

const IDENTITY_KEY: &[u8] = b"identity";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node_id: u64,
    pub cluster_id: String,
    pub shards: u16,
    pub format_version: u32,
    /// A data dir restored from a backup (`stemedb backup restore`): the id its initial cluster
    /// would have had (`cluster_id_of`), which the node's `initial_cluster` must still give.
    /// The restored cluster's own id (`cluster_id`) differs from it and from the backed-up
    /// cluster's, so nodes of the old cluster are never taken for members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_for: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("data dir belongs to node {found}, but this node was started as node {expected}; use that node's id or another data dir")]
    NodeIdMismatch { expected: u64, found: u64 },
    #[error("data dir belongs to cluster {found}, but this node was started for cluster {expected}; use a fresh data dir to join another cluster")]
    ClusterIdMismatch { expected: String, found: String },
    #[error("data dir was created with {found} shards, but cluster.shards is {expected}; the shard count is fixed at bootstrap")]
    ShardCountMismatch { expected: u16, found: u16 },
    #[error("data dir format {found} is not supported by this version (expects {expected})")]
    FormatMismatch { expected: u32, found: u32 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl IdentityError {
    pub fn code(&self) -> ErrorCode {
        match self {
            IdentityError::NodeIdMismatch { .. } => ErrorCode::NodeIdMismatch,
            IdentityError::ClusterIdMismatch { .. } => ErrorCode::ClusterIdMismatch,
            IdentityError::ShardCountMismatch { .. } => ErrorCode::ShardCountMismatch,
            IdentityError::FormatMismatch { .. } => ErrorCode::FormatMismatch,
            IdentityError::Storage(e) => e.code(),
        }
    }
}

pub const FORMAT_VERSION: u32 = 1;

/// The id of a cluster formed from `initial_cluster`: the same on every founding node.
pub fn cluster_id_of(initial_cluster: &std::collections::BTreeMap<u64, String>) -> String {
    let text: Vec<String> = initial_cluster.iter().map(|(id, addr)| format!("{id}={addr}")).collect();
    format!("{:016x}", crate::model::id::fnv1a64(text.join(",").as_bytes()))
}

/// Loads the identity of the data dir, creating it on first start. `cluster_id` is the cluster
/// this node was started for (`None`: a single node, which gets a random id).
use crate::shard::keys::RECOVERING_KEY;

/// Records (synced) that this node started on an empty data dir to join a running cluster and
/// has not caught up yet; a restart before it has must keep holding back its votes.
pub fn set_recovering(storage: &Storage, recovering: bool) -> Result<(), StorageError> {
    let mut batch = crate::storage::WriteBatch::new();
    if recovering {
        batch.put(ColumnFamily::Meta, RECOVERING_KEY.to_vec(), b"1".to_vec());
    } else {
        batch.delete(ColumnFamily::Meta, RECOVERING_KEY.to_vec());
    }
    storage.write(batch, crate::storage::Durability::Synced)
}

pub fn is_recovering(storage: &Storage) -> Result<bool, StorageError> {
    Ok(storage.get(ColumnFamily::Meta, RECOVERING_KEY)?.is_some())
}

/// Whether this data dir already records an identity (false: it is new, or was wiped).
/// The identity recorded in a data dir, if any.
pub fn read_identity(storage: &Storage) -> Result<Option<NodeIdentity>, StorageError> {
    storage
        .get(ColumnFamily::Meta, IDENTITY_KEY)?
        .map(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|e| StorageError::corrupt(ColumnFamily::Meta, format!("identity: {e}")))
        })
        .transpose()
}

pub fn identity_recorded(storage: &Storage) -> Result<bool, StorageError> {
    Ok(storage.get(ColumnFamily::Meta, IDENTITY_KEY)?.is_some())
}

pub fn ensure_identity(
    storage: &Storage,
    node_id: u64,
    shards: u16,
    cluster_id: Option<&str>,
) -> Result<NodeIdentity, IdentityError> {
    if let Some(bytes) = storage.get(ColumnFamily::Meta, IDENTITY_KEY)? {
        let identity: NodeIdentity = serde_json::from_slice(&bytes)
            .map_err(|e| StorageError::corrupt(ColumnFamily::Meta, format!("identity: {e}")))?;
        if identity.format_version != FORMAT_VERSION {
            return Err(IdentityError::FormatMismatch { expected: FORMAT_VERSION, found: identity.format_version });
        }
        if identity.node_id != node_id {
            return Err(IdentityError::NodeIdMismatch { expected: node_id, found: identity.node_id });
        }
        if let Some(expected) = cluster_id {
            let formed_by = identity.restored_for.as_deref().unwrap_or(&identity.cluster_id);
            if formed_by != expected {
                return Err(IdentityError::ClusterIdMismatch {
                    expected: expected.to_string(),
                    found: identity.cluster_id,
                });
            }
        }
        if identity.shards != shards {
            return Err(IdentityError::ShardCountMismatch { expected: shards, found: identity.shards });
        }
        return Ok(identity);
    }
    let identity = NodeIdentity {
        node_id,
        cluster_id: cluster_id.map(str::to_string).unwrap_or_else(|| format!("{:016x}", rand::random::<u64>())),
        shards,
        format_version: FORMAT_VERSION,
        restored_for: None,
    };
    write_identity(storage, &identity)?;
    tracing::info!(node_id, cluster_id = %identity.cluster_id, shards, "data dir initialized");
    Ok(identity)
}

/// The id of a cluster restored from backup `backup_id` into `initial_cluster`: the same on
/// every restored node, and never the backed-up cluster's nor a cluster formed normally.
pub fn restored_cluster_id(backup_id: &str, initial_cluster: &std::collections::BTreeMap<u64, String>) -> String {
    let text = format!("restored:{backup_id}:{}", cluster_id_of(initial_cluster));
    format!("{:016x}", crate::model::id::fnv1a64(text.as_bytes()))
}

/// Records the identity of a data dir a restore built: its last step.
pub fn record_restored(storage: &Storage, identity: &NodeIdentity) -> Result<(), StorageError> {
    write_identity(storage, identity)
}

fn write_identity(storage: &Storage, identity: &NodeIdentity) -> Result<(), StorageError> {
    let mut batch = WriteBatch::new();
    batch.put(
        ColumnFamily::Meta,
        IDENTITY_KEY.to_vec(),
        serde_json::to_vec(identity).map_err(|e| StorageError::corrupt(ColumnFamily::Meta, e.to_string()))?,
    );
    storage.write(batch, Durability::Synced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageOptions;

    #[test]
    fn refuses_foreign_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
        let first = ensure_identity(&storage, 1, 16, Some("c1")).expect("create");
        assert_eq!(ensure_identity(&storage, 1, 16, Some("c1")).expect("reopen"), first);
        assert_eq!(ensure_identity(&storage, 1, 16, None).expect("reopen"), first);
        assert!(matches!(ensure_identity(&storage, 1, 16, Some("c2")), Err(IdentityError::ClusterIdMismatch { .. })));
        assert!(matches!(
            ensure_identity(&storage, 2, 16, None),
            Err(IdentityError::NodeIdMismatch { expected: 2, found: 1 })
        ));
        assert!(matches!(ensure_identity(&storage, 1, 8, None), Err(IdentityError::ShardCountMismatch { .. })));
    }
}
