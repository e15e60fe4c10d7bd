//! Replicas restored from a backup (`cluster::backup`), and what a backup records about the
//! replica it copies. A restored group is staged in an empty data dir as a snapshot of the
//! group that the state machine installs when the node opens, exactly as it finishes a snapshot
//! install a stop interrupted (`ShardStateMachine::open`): the snapshot file, then the install
//! marker (synced) naming it.
//!
//! The staged snapshot's last log id is `(term 0, node 0, index)`, with `index` the backup's
//! applied index and the **new** cluster's membership. openraft purges the (empty) log up to
//! it at start, so the group is initialized without `Raft::initialize`, every restored replica
//! of the group holds the same state at the same log id, and the first election (term 1)
//! appends after it.
//!
//! A restore that replays the archived log stages the backup's copy in a scratch storage,
//! opens it there ([`Replay`]: the state machine installs it), applies the archived entries with
//! their original log ids (so every assertion gets the id it had), and stages what results at
//! the last replayed index.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;

use openraft::{CommittedLeaderId, Membership, SnapshotMeta, StoredMembership};

use openraft::storage::RaftStateMachine;

use super::state_machine::{AppliedState, ShardStateMachine};
use super::types::{group_of_shard, Entry, LogId, NodeId};
use crate::meta::{MetaState, META_SHARD};
use crate::shard::{keys, snapshot};
use crate::storage::{ColumnFamily, Durability, Storage, WriteBatch};

/// What a replica's applied state says: for a backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedSummary {
    pub index: u64,
    pub term: u64,
    pub voters: Vec<NodeId>,
}

/// Decodes a replica's applied-state record (`keys::applied_key`); `None` if it is malformed.
pub fn applied_summary(bytes: &[u8]) -> Option<AppliedSummary> {
    let state: AppliedState = serde_json::from_slice(bytes).ok()?;
    let last = state.last_applied?;
    Some(AppliedSummary {
        index: last.index,
        term: last.leader_id.term,
        voters: state.membership.membership().voter_ids().collect(),
    })
}

/// A group being restored into this node's empty data dir.
pub struct StagedGroup<'a> {
    storage: &'a Storage,
    group: u32,
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    writer: snapshot::SnapshotWriter,
}

impl<'a> StagedGroup<'a> {
    /// Starts staging `shard` (or the meta group, `meta::META_SHARD`) at `applied_index`, with
    /// `voters` (node id → Raft address) as its membership.
    pub fn begin(
        storage: &'a Storage,
        shard: u16,
        applied_index: u64,
        voters: &BTreeMap<NodeId, String>,
    ) -> io::Result<StagedGroup<'a>> {
        let group = group_of_shard(shard);
        let log_id = LogId::new(CommittedLeaderId::new(0, 0), applied_index);
        let ids: BTreeSet<NodeId> = voters.keys().copied().collect();
        let nodes: BTreeMap<NodeId, openraft::BasicNode> =
            voters.iter().map(|(id, addr)| (*id, openraft::BasicNode::new(addr.clone()))).collect();
        let membership = Membership::new(vec![ids], nodes);
        let meta = SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: StoredMembership::new(Some(log_id), membership),
            snapshot_id: format!("{group}-restored-{applied_index}"),
        };
        let meta_bytes = serde_json::to_vec(&meta).map_err(io::Error::other)?;
        let dir = storage.data_dir().join("snapshots");
        let writer = snapshot::SnapshotWriter::create(&dir, group, &meta_bytes)?;
        Ok(StagedGroup { storage, group, meta, writer })
    }

    /// Adds one record: `family` 0 is the state machine, 1 the index (the snapshot's tags). A
    /// key outside the group is refused.
    pub fn record(&mut self, family: u8, key: &[u8], value: &[u8]) -> io::Result<()> {
        if family > 1 || !key.starts_with(&keys::group_prefix(self.group)) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a record outside the restored group"));
        }
        self.writer.record(family, key, value)
    }

    /// Makes the snapshot durable, then records (synced) that it is to be installed at open.
    pub fn finish(self) -> io::Result<()> {
        self.writer.finish()?;
        let mut batch = WriteBatch::new();
        let meta = serde_json::to_vec(&self.meta).map_err(io::Error::other)?;
        batch.put(ColumnFamily::Meta, keys::install_marker_key(self.group), meta);
        self.storage.write(batch, Durability::Synced).map_err(io::Error::other)
    }

    /// Drops what was staged (the snapshot file; no marker was written).
    pub fn abandon(self) {
        self.writer.abandon();
    }
}

/// A group staged in a scratch storage, opened to replay archived entries over it.
pub struct Replay {
    machine: ShardStateMachine,
}

impl Replay {
    /// Opens `shard`'s group staged (and finished) in `storage`: the state machine installs it.
    pub fn open(storage: Arc<Storage>, shard: u16, buckets: usize) -> io::Result<Replay> {
        let machine = if shard == META_SHARD {
            // Nothing listens: the replayed metadata only ends up in the staged records.
            let (publish, _) = tokio::sync::watch::channel(Arc::new(MetaState::default()));
            let defaults = crate::config::Config::default();
            let policy = crate::meta::policy::Policy::new(
                defaults.authority.max_chain_depth,
                crate::meta::quarantine::QuarantineRules::from_config(&defaults),
            );
            ShardStateMachine::open_meta(storage, publish, policy, buckets)
        } else {
            ShardStateMachine::open(storage, shard, group_of_shard(shard), buckets)
        };
        Ok(Replay { machine: machine.map_err(io::Error::other)? })
    }

    /// Applies `entries` (in log order, with their original log ids).
    pub async fn apply(&mut self, entries: Vec<Entry>) -> io::Result<()> {
        self.machine.apply(entries).await.map(|_| ()).map_err(io::Error::other)
    }
}

/// A stored log entry (`raft::wire`), and when it was proposed if it is a client command.
pub fn decode_stored(bytes: &[u8]) -> io::Result<(Entry, Option<u64>)> {
    let entry = super::wire::decode_entry(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let at = match &entry.payload {
        openraft::EntryPayload::Normal(command) => Some(command.proposed_at_us()),
        _ => None,
    };
    Ok((entry, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_summaries_read_the_log_id_and_voters() {
        let log_id = LogId::new(CommittedLeaderId::new(7, 2), 41);
        let nodes: BTreeMap<NodeId, openraft::BasicNode> =
            [(1, openraft::BasicNode::new("a")), (2, openraft::BasicNode::new("b"))].into_iter().collect();
        let state = AppliedState {
            last_applied: Some(log_id),
            membership: StoredMembership::new(Some(log_id), Membership::new(vec![[1, 2].into()], nodes)),
            clock_us: 5,
        };
        let bytes = serde_json::to_vec(&state).expect("encodes");
        assert_eq!(applied_summary(&bytes), Some(AppliedSummary { index: 41, term: 7, voters: vec![1, 2] }));
        assert_eq!(applied_summary(b"{"), None);
        assert_eq!(applied_summary(&serde_json::to_vec(&AppliedState::default()).expect("encodes")), None);
    }
}
