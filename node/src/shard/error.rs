//! The errors of the request path over the groups (`ConsensusError`), each with its code in the
//! one table of `crate::error`. Defined here, at the lowest layer that returns them (a shard's
//! readers refuse over-budget queries and reads of a replica installing a snapshot); a leader's
//! answer to a forwarded request carries one back, in the protobuf form of `codec::errors`.

use crate::error::ErrorCode;
use crate::meta::META_SHARD;
use crate::model::NodeId;

/// How errors name a group: `shard N`, or `the meta group` for [`META_SHARD`].
pub struct GroupLabel(pub u16);

impl std::fmt::Display for GroupLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == META_SHARD {
            f.write_str("the meta group")
        } else {
            write!(f, "shard {}", self.0)
        }
    }
}

/// Errors of the consensus layer. Each has a stable code and an HTTP status. A leader's answer
/// to a forwarded request carries it back to the node the client talks to (`codec::errors`).
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ConsensusError {
    #[error("{} has no leader (no quorum); retry later", GroupLabel(*shard))]
    NoQuorum { shard: u16 },
    #[error("this node is not the leader of {}", GroupLabel(*shard))]
    NotLeader { shard: u16, leader: Option<NodeId> },
    #[error("{} did not answer within {timeout_ms} ms; the write may or may not have been applied", GroupLabel(*shard))]
    Timeout { shard: u16, timeout_ms: u64 },
    #[error("{} is shutting down", GroupLabel(*shard))]
    ShuttingDown { shard: u16 },
    #[error("{} does not exist", GroupLabel(*shard))]
    UnknownShard { shard: u16 },
    #[error("raft group failed to start: {0}")]
    Startup(String),
    #[error("internal error on {}: {message}", GroupLabel(*shard))]
    Internal { shard: u16, message: String },
    #[error("storage error on {}: {message}", GroupLabel(*shard))]
    Storage { shard: u16, message: String },
    #[error("membership change of {} failed: {message}", GroupLabel(*shard))]
    MembershipChange { shard: u16, message: String },
    #[error("could not reach the leader of {} (node {leader}): {message}", GroupLabel(*shard))]
    LeaderUnreachable { shard: u16, leader: NodeId, message: String },
    #[error(
        "the query would hold more than {} of claims and answer (query.max_memory_per_query_mb); \
         narrow it (a predicate; for a concept_prefix query, a smaller limit) or raise the limit",
        MiB(*limit_bytes)
    )]
    /// `shard` is absent for a query over a prefix, whose reads span shards.
    QueryMemoryExceeded { shard: Option<u16>, limit_bytes: u64 },
    #[error(
        "the write to {} could not be confirmed within {timeout_ms} ms: the leader failed or changed while it \
         was in flight. It was applied at most once, but may have been; retry with the same request_id to learn which",
        GroupLabel(*shard)
    )]
    OutcomeUnknown { shard: u16, timeout_ms: u64 },
    #[error("{} has too many writes waiting ({queued}); retry shortly", GroupLabel(*shard))]
    Overloaded { shard: u16, queued: usize },
    #[error("this node's storage read queue is full ({queued} reads waiting) serving {}; retry shortly", GroupLabel(*shard))]
    ReadsOverloaded { shard: u16, queued: usize },
    #[error("this node's replica of {} is installing a snapshot; retry, or read through another node", GroupLabel(*shard))]
    CatchingUp { shard: u16 },
    #[error("{error}")]
    /// The state machine refused the whole command, the same way on every replica.
    Refused { shard: u16, error: crate::model::ModelError },
    #[error(
        "node {node} has {} free on its data dir, below its floor of {} (storage.min_free_bytes, \
         storage.min_free_percent): it refuses writes to {} until space is freed; reads go on",
        MiB(*free_bytes), MiB(*floor_bytes), GroupLabel(*shard)
    )]
    /// A node on the write's path (the one the client reached, or the shard's leader) is below
    /// its free-space floor (`storage::disk`).
    InsufficientStorage { shard: u16, node: NodeId, free_bytes: u64, floor_bytes: u64 },
}

/// A byte count in MiB, for messages.
struct MiB(u64);

impl std::fmt::Display for MiB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} MiB", self.0 as f64 / (1024.0 * 1024.0))
    }
}

impl ConsensusError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ConsensusError::NoQuorum { .. } => ErrorCode::NoQuorum,
            ConsensusError::NotLeader { .. } => ErrorCode::NotLeader,
            ConsensusError::Timeout { .. } => ErrorCode::Timeout,
            ConsensusError::ShuttingDown { .. } => ErrorCode::ShuttingDown,
            ConsensusError::UnknownShard { .. } => ErrorCode::UnknownShard,
            ConsensusError::Startup(_) => ErrorCode::RaftStartupFailed,
            ConsensusError::LeaderUnreachable { .. } => ErrorCode::LeaderUnreachable,
            ConsensusError::MembershipChange { .. } => ErrorCode::MembershipChangeFailed,
            ConsensusError::Storage { .. } => ErrorCode::StorageError,
            ConsensusError::Internal { .. } => ErrorCode::InternalError,
            ConsensusError::QueryMemoryExceeded { .. } => ErrorCode::QueryMemoryExceeded,
            ConsensusError::OutcomeUnknown { .. } => ErrorCode::OutcomeUnknown,
            ConsensusError::Overloaded { .. } | ConsensusError::ReadsOverloaded { .. } => ErrorCode::Overloaded,
            ConsensusError::CatchingUp { .. } => ErrorCode::ReplicaCatchingUp,
            ConsensusError::Refused { error, .. } => error.code(),
            ConsensusError::InsufficientStorage { .. } => ErrorCode::InsufficientStorage,
        }
    }
}
