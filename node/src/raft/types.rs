//! The Raft type configuration shared by every shard group (over the commands of
//! `shard::command`), and the membership changes a group's leader runs.

use std::sync::Arc;

/// Node ids are u64; a node's Raft address is in its [`openraft::BasicNode`].
pub use crate::model::NodeId;
pub use crate::shard::command::{
    group_of_shard, shard_of_group, AssertOutcome, EventOutcome, GroupId, ProposalToken, ShardCommand, ShardResponse,
    TOKEN_TTL_US,
};

openraft::declare_raft_types!(
    /// Type configuration of every StemeDB Raft group.
    pub TypeConfig:
        // Shared: the proposer's copy kept for a retry, the log's tail, the replication
        // streams and the apply all hold the one command (an entry of 1,000 assertions is
        // thousands of strings), and only the apply takes it apart.
        D = Arc<ShardCommand>,
        R = ShardResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        // A file: snapshots are written, sent, received and installed in chunks (shard::snapshot).
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageIoError = openraft::StorageError<NodeId>;

/// A membership change of one shard group, run by its leader (sent to it in the protobuf form
/// of `wire::admin`).
#[derive(Debug, Clone)]
pub enum GroupAdmin {
    /// Add `node` as a learner, wait until it has caught up, then make it a voter.
    AddVoter { node: NodeId, addr: String },
    /// Remove `node` from the group's voters and learners.
    RemoveNode { node: NodeId },
    /// Hand leadership to the voter `target`.
    TransferLeader { target: NodeId },
}
