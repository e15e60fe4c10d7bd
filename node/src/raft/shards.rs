//! The shard groups of a node: creating them at first start, reopening them on restart,
//! proposing commands to a shard's leader and waiting for linearizable read barriers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};

use super::log_store::LogStore;
use super::metrics as raft_metrics;
use super::network::LocalOnlyNetwork;
use super::reader::ShardReader;
use super::state_machine::ShardStateMachine;
use super::types::{group_of_shard, NodeId, Raft, ShardCommand, ShardResponse};
use crate::model::id::shard_for_path;
use crate::storage::Storage;

/// Errors of the consensus layer. Each has a stable code and an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("shard {shard} has no leader (no quorum); retry later")]
    NoQuorum { shard: u16 },
    #[error("this node is not the leader of shard {shard}")]
    NotLeader { shard: u16, leader: Option<NodeId> },
    #[error("shard {shard} did not answer within {timeout_ms} ms; the write may or may not have been applied")]
    Timeout { shard: u16, timeout_ms: u64 },
    #[error("shard {shard} is shutting down")]
    ShuttingDown { shard: u16 },
    #[error("shard {shard} does not exist")]
    UnknownShard { shard: u16 },
    #[error("raft group failed to start: {0}")]
    Startup(String),
}

impl ConsensusError {
    pub fn code(&self) -> &'static str {
        match self {
            ConsensusError::NoQuorum { .. } => "no_quorum",
            ConsensusError::NotLeader { .. } => "not_leader",
            ConsensusError::Timeout { .. } => "timeout",
            ConsensusError::ShuttingDown { .. } => "shutting_down",
            ConsensusError::UnknownShard { .. } => "unknown_shard",
            ConsensusError::Startup(_) => "raft_startup_failed",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            ConsensusError::NoQuorum { .. }
            | ConsensusError::NotLeader { .. }
            | ConsensusError::ShuttingDown { .. } => 503,
            ConsensusError::Timeout { .. } => 504,
            ConsensusError::UnknownShard { .. } => 404,
            ConsensusError::Startup(_) => 500,
        }
    }
}

/// Raft tunables from the `[raft]` config section.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub logs_to_keep_after_snapshot: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_logs_since_last: 20_000,
            logs_to_keep_after_snapshot: 1_000,
        }
    }
}

/// One shard: its Raft group and a reader over its applied state.
pub struct ShardGroup {
    pub shard: u16,
    pub raft: Raft,
    pub reader: ShardReader,
}

/// Every shard group this node hosts.
pub struct ShardSet {
    pub node_id: NodeId,
    shards: u16,
    groups: Vec<ShardGroup>,
}

impl ShardSet {
    /// Opens (and on first start creates and initializes) `shards` groups with this node as voter.
    pub async fn open(
        storage: Arc<Storage>,
        node_id: NodeId,
        raft_addr: String,
        shards: u16,
        settings: &RaftSettings,
    ) -> Result<ShardSet, ConsensusError> {
        let config = openraft::Config {
            cluster_name: "stemedb".into(),
            heartbeat_interval: settings.heartbeat_interval_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: settings.logs_to_keep_after_snapshot,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::Startup(e.to_string()))?;
        let config = Arc::new(config);
        let mut groups = Vec::with_capacity(shards as usize);
        for shard in 0..shards {
            let group = group_of_shard(shard);
            let log_store = LogStore::new(storage.clone(), group);
            let state_machine = ShardStateMachine::open(storage.clone(), shard, group)
                .map_err(|e| ConsensusError::Startup(format!("shard {shard}: {e}")))?;
            let reader = ShardReader::new(storage.clone(), shard, group, state_machine.progress());
            let raft = Raft::new(node_id, config.clone(), LocalOnlyNetwork, log_store, state_machine)
                .await
                .map_err(|e| ConsensusError::Startup(format!("shard {shard}: {e}")))?;
            let initialized = raft.is_initialized().await.map_err(|e| ConsensusError::Startup(e.to_string()))?;
            if !initialized {
                let members = BTreeMap::from([(node_id, BasicNode::new(raft_addr.clone()))]);
                raft.initialize(members).await.map_err(|e| ConsensusError::Startup(format!("shard {shard}: {e}")))?;
                tracing::info!(shard, group, "shard group created");
            }
            groups.push(ShardGroup { shard, raft, reader });
        }
        Ok(ShardSet { node_id, shards, groups })
    }

    /// Waits until every shard has a leader, up to `timeout`.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> Result<(), ConsensusError> {
        for group in &self.groups {
            group
                .raft
                .wait(Some(timeout))
                .metrics(|m| m.current_leader.is_some(), "shard has a leader")
                .await
                .map_err(|_| ConsensusError::NoQuorum { shard: group.shard })?;
        }
        Ok(())
    }

    pub fn shard_count(&self) -> u16 {
        self.shards
    }

    pub fn shard_for_path(&self, concept_path: &str) -> u16 {
        shard_for_path(concept_path, self.shards)
    }

    pub fn group(&self, shard: u16) -> Result<&ShardGroup, ConsensusError> {
        self.groups.get(shard as usize).ok_or(ConsensusError::UnknownShard { shard })
    }

    pub fn groups(&self) -> &[ShardGroup] {
        &self.groups
    }

    /// Waits (until `deadline`) for `shard` to have a leader and returns it.
    async fn wait_for_leader(&self, group: &ShardGroup, deadline: Instant) -> Result<NodeId, ConsensusError> {
        let mut metrics = group.raft.metrics();
        loop {
            if let Some(leader) = metrics.borrow_and_update().current_leader {
                return Ok(leader);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, metrics.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(ConsensusError::ShuttingDown { shard: group.shard }),
                Err(_) => return Err(ConsensusError::NoQuorum { shard: group.shard }),
            }
        }
    }

    /// Proposes `command` to `shard` and returns what applying it produced. Waits (up to
    /// `timeout`) while the shard has no leader; reports a timeout as indeterminate.
    pub async fn propose(
        &self,
        shard: u16,
        command: ShardCommand,
        timeout: Duration,
    ) -> Result<ShardResponse, ConsensusError> {
        let group = self.group(shard)?;
        let started = Instant::now();
        let deadline = started + timeout;
        let leader = self.wait_for_leader(group, deadline).await.inspect_err(|_| {
            raft_metrics::PROPOSALS.with_label_values(&["no_quorum"]).inc();
        })?;
        if leader != self.node_id {
            raft_metrics::PROPOSALS.with_label_values(&["not_leader"]).inc();
            return Err(ConsensusError::NotLeader { shard, leader: Some(leader) });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, group.raft.client_write(command)).await {
            Err(_) => {
                raft_metrics::PROPOSALS.with_label_values(&["timeout"]).inc();
                Err(ConsensusError::Timeout { shard, timeout_ms: timeout.as_millis() as u64 })
            }
            Ok(Ok(response)) => {
                raft_metrics::PROPOSALS.with_label_values(&["ok"]).inc();
                raft_metrics::PROPOSE_DURATION.observe(started.elapsed().as_secs_f64());
                Ok(response.data)
            }
            // Leadership moved between the check and the proposal: the entry was not appended,
            // so the client may retry safely.
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                raft_metrics::PROPOSALS.with_label_values(&["not_leader"]).inc();
                match forward.leader_id {
                    Some(leader) if leader != self.node_id => {
                        Err(ConsensusError::NotLeader { shard, leader: Some(leader) })
                    }
                    _ => Err(ConsensusError::NoQuorum { shard }),
                }
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(ConsensusError::Startup(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(_))) => {
                raft_metrics::PROPOSALS.with_label_values(&["fatal"]).inc();
                Err(ConsensusError::ShuttingDown { shard })
            }
        }
    }

    /// A linearizable read barrier: returns once this node's copy of `shard` reflects every write
    /// acknowledged before the call.
    pub async fn read_barrier(&self, shard: u16, timeout: Duration) -> Result<(), ConsensusError> {
        let group = self.group(shard)?;
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, group.raft.ensure_linearizable()).await {
                Err(_) => return Err(ConsensusError::Timeout { shard, timeout_ms: timeout.as_millis() as u64 }),
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                    if forward.leader_id.is_some() && forward.leader_id != Some(self.node_id) {
                        return Err(ConsensusError::NotLeader { shard, leader: forward.leader_id });
                    }
                    if Instant::now() + Duration::from_millis(20) >= deadline {
                        return Err(ConsensusError::NoQuorum { shard });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                    return Err(ConsensusError::NoQuorum { shard })
                }
                Ok(Err(RaftError::Fatal(_))) => return Err(ConsensusError::ShuttingDown { shard }),
            }
        }
    }

    /// Stops every group's Raft task.
    pub async fn shutdown(&self) {
        for group in &self.groups {
            if let Err(error) = group.raft.shutdown().await {
                tracing::warn!(shard = group.shard, error = %error, "raft shutdown failed");
            }
        }
    }
}
