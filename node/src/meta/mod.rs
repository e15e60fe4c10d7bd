//! The meta group's replicated state, kept by every node: the cluster's metadata (the nodes and
//! their status, where each shard's replicas should be, the replica moves under way), and in
//! [`policy`] the cluster-wide policy (root authorities, grants, circuit breakers) with, in
//! [`quarantine`], the rules a shard leader screens writes with. This module owns the data and
//! the rules for changing it ([`MetaState::apply`], deterministic on every replica); it knows
//! nothing of openraft (the adapter is `raft::state_machine`), and the placement driver
//! (`cluster::placement`) decides which changes to propose.

pub mod policy;
pub mod quarantine;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
pub use crate::model::NodeId;

/// Bootstrap placement: shard `s` gets `replication_factor` replicas (fewer if there are fewer
/// members), the members starting at position `s mod n` in id order.
pub fn place_replicas(
    members: &BTreeMap<NodeId, String>,
    shards: u16,
    replication_factor: u16,
) -> BTreeMap<u16, Vec<NodeId>> {
    let ids: Vec<NodeId> = members.keys().copied().collect();
    if ids.is_empty() {
        return BTreeMap::new();
    }
    let count = (replication_factor.max(1) as usize).min(ids.len());
    (0..shards).map(|s| (s, (0..count).map(|i| ids[(s as usize + i) % ids.len()]).collect())).collect()
}

/// The shard number the meta group goes by inside the shard set (its group id is 0).
pub const META_SHARD: u16 = u16::MAX;

/// A node's place in the cluster's lifecycle. Liveness (UP/DOWN as the admin API reports it)
/// comes from heartbeats; this is what the cluster decided about the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeStatus {
    /// Added; becomes a member of the meta group and receives replicas until balanced.
    Joining,
    /// A full member.
    Up,
    /// Being decommissioned: its replicas move away, then it is removed.
    Leaving,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRecord {
    pub raft_addr: String,
    pub status: NodeStatus,
    /// When the status last changed (µs since the epoch, leader time).
    pub since_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RebalanceStatus {
    /// Requested, not started yet.
    Pending,
    InProgress,
    Complete,
    Failed,
}

/// Why a replica moves. Moves an operator asked for are never undone by the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MoveCause {
    /// `POST /admin/shards/rebalance`, with the operator's reason.
    Operator,
    /// A node is being decommissioned.
    Decommission,
    /// The shard had fewer replicas than the replication factor allows.
    Repair,
    /// The shard had more replicas than the replication factor.
    Trim,
    /// Replica counts per node differed by more than one.
    Balance,
}

/// One replica move of a shard: add `to` (learner, catch up, voter), then remove `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rebalance {
    #[schema(required = true)]
    pub from: Option<NodeId>,
    #[schema(required = true)]
    pub to: Option<NodeId>,
    pub cause: MoveCause,
    pub reason: String,
    pub status: RebalanceStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
    pub requested_at_us: u64,
    pub updated_at_us: u64,
}

/// Everything the meta group holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaState {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Replicas of each shard, as they are or are being made to be.
    pub placement: BTreeMap<u16, Vec<NodeId>>,
    /// The last move of each shard (finished ones stay as a record).
    pub rebalances: BTreeMap<u16, Rebalance>,
    /// Shards whose preferred leader an operator chose (a leader transfer): the spreading of
    /// preferred leaders leaves them alone.
    #[serde(default)]
    pub pinned_leaders: std::collections::BTreeSet<u16>,
}

/// A change to the metadata: the payload of a meta group log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Records the founding members and the bootstrap placement; ignored once recorded.
    Bootstrap {
        nodes: BTreeMap<NodeId, String>,
        placement: BTreeMap<u16, Vec<NodeId>>,
    },
    /// Adds a node as JOINING (idempotent for the same address).
    AddNode {
        id: NodeId,
        raft_addr: String,
    },
    SetNodeStatus {
        id: NodeId,
        status: NodeStatus,
    },
    /// Forgets a node that no longer holds a replica.
    RemoveNode {
        id: NodeId,
    },
    /// Records a move, as pending (operator) or in progress (placement driver).
    StartMove {
        shard: u16,
        from: Option<NodeId>,
        to: Option<NodeId>,
        cause: MoveCause,
        reason: String,
        pending: bool,
    },
    /// The pending or running move of `shard` is in progress.
    MoveRunning {
        shard: u16,
    },
    /// The move of `shard` is done: its replicas are now `replicas`.
    FinishMove {
        shard: u16,
        replicas: Vec<NodeId>,
    },
    FailMove {
        shard: u16,
        error: String,
        /// The replicas as the failed move left them (the new one added, the old one not yet
        /// removed), so the placement stays true to the groups; trimming then fixes the count.
        #[serde(default)]
        replicas: Option<Vec<NodeId>>,
    },
    /// Makes `node` the shard's preferred leader (first in its replica list); the shard's
    /// leader hands leadership over when the preferred node is up and caught up.
    SetPreferredLeader {
        shard: u16,
        node: NodeId,
        /// Chosen by an operator: the spreading leaves this shard's preference alone.
        #[serde(default)]
        pinned: bool,
    },
}

/// Why a metadata change was refused. Each has a stable code and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MetaError {
    #[error("node {id} is not a member")]
    UnknownNode { id: NodeId },
    #[error("node {id} is already a member with raft address {existing}")]
    AddressConflict { id: NodeId, existing: String },
    #[error("raft address {addr} already belongs to node {id}")]
    AddressTaken { addr: String, id: NodeId },
    #[error("shard {shard} does not exist")]
    UnknownShard { shard: u16 },
    #[error("shard {shard} already has a move under way")]
    MoveInProgress { shard: u16 },
    #[error("shard {shard} has no move under way")]
    NoMove { shard: u16 },
    #[error("node {id} still holds replicas of shards {shards:?}")]
    StillHostsReplicas { id: NodeId, shards: Vec<u16> },
    #[error("node {node} cannot take a replica of shard {shard}: {reason}")]
    InvalidMove { shard: u16, node: NodeId, reason: String },
    #[error("the cluster metadata is not bootstrapped yet; retry shortly")]
    NotBootstrapped,
    #[error("node {id} is the last member that is not leaving; it cannot leave")]
    LastMember { id: NodeId },
}

impl MetaError {
    pub fn code(&self) -> ErrorCode {
        match self {
            MetaError::UnknownNode { .. } => ErrorCode::UnknownMember,
            MetaError::AddressConflict { .. } | MetaError::AddressTaken { .. } => ErrorCode::MemberConflict,
            MetaError::UnknownShard { .. } => ErrorCode::UnknownShard,
            MetaError::MoveInProgress { .. } => ErrorCode::RebalanceInProgress,
            MetaError::NoMove { .. } => ErrorCode::NoRebalance,
            MetaError::StillHostsReplicas { .. } => ErrorCode::MemberHostsReplicas,
            MetaError::InvalidMove { .. } => ErrorCode::InvalidRebalance,
            MetaError::NotBootstrapped => ErrorCode::ClusterNotReady,
            MetaError::LastMember { .. } => ErrorCode::LastMember,
        }
    }
}

impl MetaState {
    pub fn is_bootstrapped(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// Nodes that may receive replicas (JOINING or UP).
    pub fn active_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().filter(|(_, n)| n.status != NodeStatus::Leaving).map(|(id, _)| *id)
    }

    /// The shards `node` holds (or is to hold) a replica of.
    pub fn shards_of(&self, node: NodeId) -> Vec<u16> {
        self.placement.iter().filter(|(_, r)| r.contains(&node)).map(|(s, _)| *s).collect()
    }

    /// Replicas per node, for every node (zero included).
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.nodes.keys().map(|id| (*id, 0)).collect();
        for replicas in self.placement.values() {
            for id in replicas {
                *load.entry(*id).or_default() += 1;
            }
        }
        load
    }

    /// Whether a move of `shard` is pending or running.
    pub fn move_under_way(&self, shard: u16) -> bool {
        self.rebalances
            .get(&shard)
            .is_some_and(|r| matches!(r.status, RebalanceStatus::Pending | RebalanceStatus::InProgress))
    }

    /// Applies one command at leader time `now_us`. Deterministic: every replica computes the same
    /// state from the same log.
    pub fn apply(&mut self, command: MetaCommand, now_us: u64) -> Result<(), MetaError> {
        if !self.is_bootstrapped() && !matches!(command, MetaCommand::Bootstrap { .. }) {
            return Err(MetaError::NotBootstrapped);
        }
        match command {
            MetaCommand::Bootstrap { nodes, placement } => {
                if self.is_bootstrapped() {
                    return Ok(());
                }
                self.nodes = nodes
                    .into_iter()
                    .map(|(id, raft_addr)| (id, NodeRecord { raft_addr, status: NodeStatus::Up, since_us: now_us }))
                    .collect();
                self.placement = placement;
                Ok(())
            }
            MetaCommand::AddNode { id, raft_addr } => {
                if let Some(existing) = self.nodes.get(&id) {
                    return if existing.raft_addr == raft_addr {
                        Ok(())
                    } else {
                        Err(MetaError::AddressConflict { id, existing: existing.raft_addr.clone() })
                    };
                }
                if let Some((other, _)) = self.nodes.iter().find(|(_, n)| n.raft_addr == raft_addr) {
                    return Err(MetaError::AddressTaken { addr: raft_addr, id: *other });
                }
                self.nodes.insert(id, NodeRecord { raft_addr, status: NodeStatus::Joining, since_us: now_us });
                Ok(())
            }
            MetaCommand::SetNodeStatus { id, status } => {
                if status == NodeStatus::Leaving && self.active_nodes().all(|other| other == id) {
                    return Err(MetaError::LastMember { id });
                }
                let node = self.nodes.get_mut(&id).ok_or(MetaError::UnknownNode { id })?;
                if node.status != status {
                    node.status = status;
                    node.since_us = now_us;
                }
                Ok(())
            }
            MetaCommand::RemoveNode { id } => {
                if !self.nodes.contains_key(&id) {
                    return Err(MetaError::UnknownNode { id });
                }
                let shards = self.shards_of(id);
                if !shards.is_empty() {
                    return Err(MetaError::StillHostsReplicas { id, shards });
                }
                self.nodes.remove(&id);
                Ok(())
            }
            MetaCommand::StartMove { shard, from, to, cause, reason, pending } => {
                let replicas = self.placement.get(&shard).ok_or(MetaError::UnknownShard { shard })?;
                if self.move_under_way(shard) {
                    return Err(MetaError::MoveInProgress { shard });
                }
                if let Some(to) = to {
                    let node = self.nodes.get(&to).ok_or(MetaError::UnknownNode { id: to })?;
                    let invalid = |reason: &str| MetaError::InvalidMove { shard, node: to, reason: reason.into() };
                    if node.status == NodeStatus::Leaving {
                        return Err(invalid("the node is being decommissioned"));
                    }
                    if replicas.contains(&to) {
                        return Err(invalid("it already holds one"));
                    }
                }
                if let Some(from) = from {
                    if !replicas.contains(&from) {
                        return Err(MetaError::InvalidMove {
                            shard,
                            node: from,
                            reason: "it holds no replica to move away".into(),
                        });
                    }
                }
                let status = if pending { RebalanceStatus::Pending } else { RebalanceStatus::InProgress };
                self.rebalances.insert(
                    shard,
                    Rebalance {
                        from,
                        to,
                        cause,
                        reason,
                        status,
                        error: None,
                        requested_at_us: now_us,
                        updated_at_us: now_us,
                    },
                );
                Ok(())
            }
            MetaCommand::MoveRunning { shard } => {
                let record = self.running_move(shard)?;
                record.status = RebalanceStatus::InProgress;
                record.updated_at_us = now_us;
                Ok(())
            }
            MetaCommand::FinishMove { shard, replicas } => {
                let record = self.running_move(shard)?;
                record.status = RebalanceStatus::Complete;
                record.updated_at_us = now_us;
                self.placement.insert(shard, replicas);
                Ok(())
            }
            MetaCommand::SetPreferredLeader { shard, node, pinned } => {
                let replicas = self.placement.get_mut(&shard).ok_or(MetaError::UnknownShard { shard })?;
                let position = replicas.iter().position(|id| *id == node).ok_or_else(|| MetaError::InvalidMove {
                    shard,
                    node,
                    reason: "it holds no replica to lead".into(),
                })?;
                let preferred = replicas.remove(position);
                replicas.insert(0, preferred);
                if pinned {
                    self.pinned_leaders.insert(shard);
                } else {
                    self.pinned_leaders.remove(&shard);
                }
                Ok(())
            }
            MetaCommand::FailMove { shard, error, replicas } => {
                let record = self.running_move(shard)?;
                record.status = RebalanceStatus::Failed;
                record.error = Some(error);
                record.updated_at_us = now_us;
                if let Some(replicas) = replicas {
                    self.placement.insert(shard, replicas);
                }
                Ok(())
            }
        }
    }

    fn running_move(&mut self, shard: u16) -> Result<&mut Rebalance, MetaError> {
        match self.rebalances.get_mut(&shard) {
            Some(r) if matches!(r.status, RebalanceStatus::Pending | RebalanceStatus::InProgress) => Ok(r),
            _ => Err(MetaError::NoMove { shard }),
        }
    }
}

/// A replica move the placement driver should make next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMove {
    pub shard: u16,
    pub from: Option<NodeId>,
    pub to: Option<NodeId>,
    pub cause: MoveCause,
}

/// The next move that brings the placement closer to its goals, in order of urgency: replicas on
/// leaving nodes, shards below `min(replication_factor, active nodes)` replicas, shards above the
/// replication factor, and (with `balance`) replica counts per active node differing by more
/// than one. Shards with a move under way are left alone; shards an operator moved are not
/// moved again by balancing. `None` when the placement meets every goal.
/// A shard whose last move failed less than `backoff` before `now_us` is left alone too.
pub fn plan_next_move(
    state: &MetaState,
    replication_factor: u16,
    balance: bool,
    now_us: u64,
    backoff: std::time::Duration,
) -> Option<PlannedMove> {
    let active: Vec<NodeId> = state.active_nodes().collect();
    if active.is_empty() {
        return None;
    }
    let load = state.load();
    let target = (replication_factor.max(1) as usize).min(active.len());
    // The least-loaded active node not already among `replicas` (ties: lowest id).
    let least_loaded_outside = |replicas: &[NodeId]| {
        active.iter().copied().filter(|id| !replicas.contains(id)).min_by_key(|id| (load.get(id).copied(), *id))
    };
    let recently_failed = |shard: &u16| {
        state.rebalances.get(shard).is_some_and(|r| {
            r.status == RebalanceStatus::Failed && now_us.saturating_sub(r.updated_at_us) < backoff.as_micros() as u64
        })
    };
    let movable = |shard: &u16| !state.move_under_way(*shard) && !recently_failed(shard);
    for (shard, replicas) in state.placement.iter().filter(|(s, _)| movable(s)) {
        let leaving =
            replicas.iter().copied().find(|id| state.nodes.get(id).is_none_or(|n| n.status == NodeStatus::Leaving));
        if let Some(from) = leaving {
            // Keep the replica count: add a replacement where one exists, else just remove.
            let to = if replicas.len() <= target { least_loaded_outside(replicas) } else { None };
            return Some(PlannedMove { shard: *shard, from: Some(from), to, cause: MoveCause::Decommission });
        }
    }
    for (shard, replicas) in state.placement.iter().filter(|(s, _)| movable(s)) {
        if replicas.len() < target {
            if let Some(to) = least_loaded_outside(replicas) {
                return Some(PlannedMove { shard: *shard, from: None, to: Some(to), cause: MoveCause::Repair });
            }
        }
    }
    for (shard, replicas) in state.placement.iter().filter(|(s, _)| movable(s)) {
        if replicas.len() > target {
            let from = replicas.iter().copied().max_by_key(|id| (load.get(id).copied(), *id));
            return Some(PlannedMove { shard: *shard, from, to: None, cause: MoveCause::Trim });
        }
    }
    if !balance {
        return None;
    }
    let (&min_node, &min_load) = load.iter().filter(|(id, _)| active.contains(id)).min_by_key(|(id, l)| (**l, **id))?;
    // Most loaded first; among its shards, the lowest-numbered one the least-loaded node lacks.
    let mut by_load: Vec<(NodeId, usize)> =
        load.iter().filter(|(id, _)| active.contains(id)).map(|(id, l)| (*id, *l)).collect();
    by_load.sort_by_key(|(id, l)| (std::cmp::Reverse(*l), *id));
    for (max_node, max_load) in by_load {
        if max_load <= min_load + 1 {
            break;
        }
        let operator_moved = |shard: &u16| state.rebalances.get(shard).is_some_and(|r| r.cause == MoveCause::Operator);
        let candidate = state
            .placement
            .iter()
            .filter(|(s, r)| movable(s) && !operator_moved(s) && r.contains(&max_node) && !r.contains(&min_node))
            .map(|(s, _)| *s)
            .next();
        if let Some(shard) = candidate {
            return Some(PlannedMove { shard, from: Some(max_node), to: Some(min_node), cause: MoveCause::Balance });
        }
    }
    None
}

/// The preferred leader of a shard is the first of its replicas. This picks the next change that
/// spreads preferred leaders evenly over UP nodes: a shard preferring a node that is not UP gets
/// its least-preferred UP replica instead; then, while one node is preferred by two more shards
/// than another, one shard moves its preference from the first to the second (if it has a
/// replica there). Shards with a move under way are left alone.
pub fn plan_preferred_leader(state: &MetaState) -> Option<(u16, NodeId)> {
    let up: Vec<NodeId> = state.nodes.iter().filter(|(_, n)| n.status == NodeStatus::Up).map(|(id, _)| *id).collect();
    if up.is_empty() {
        return None;
    }
    let mut preferred: BTreeMap<NodeId, usize> = up.iter().map(|id| (*id, 0)).collect();
    for replicas in state.placement.values() {
        if let Some(first) = replicas.first() {
            *preferred.entry(*first).or_default() += 1;
        }
    }
    let movable = |shard: &u16| !state.move_under_way(*shard);
    for (shard, replicas) in state.placement.iter().filter(|(s, _)| movable(s)) {
        let Some(first) = replicas.first() else { continue };
        if !up.contains(first) {
            let best = replicas
                .iter()
                .copied()
                .filter(|id| up.contains(id))
                .min_by_key(|id| (preferred.get(id).copied(), *id));
            if let Some(best) = best {
                return Some((*shard, best));
            }
        }
    }
    let (&most, &most_count) =
        preferred.iter().filter(|(id, _)| up.contains(id)).max_by_key(|(id, c)| (**c, std::cmp::Reverse(**id)))?;
    let mut by_fewest: Vec<(NodeId, usize)> =
        preferred.iter().filter(|(id, _)| up.contains(id)).map(|(id, c)| (*id, *c)).collect();
    by_fewest.sort_by_key(|(id, c)| (*c, *id));
    for (fewest, fewest_count) in by_fewest {
        if most_count <= fewest_count + 1 {
            break;
        }
        let candidate = state
            .placement
            .iter()
            .filter(|(s, r)| {
                movable(s) && !state.pinned_leaders.contains(*s) && r.first() == Some(&most) && r.contains(&fewest)
            })
            .map(|(s, _)| *s)
            .next();
        if let Some(shard) = candidate {
            return Some((shard, fewest));
        }
    }
    None
}

/// The replicas of a shard after a move.
pub fn replicas_after(replicas: &[NodeId], from: Option<NodeId>, to: Option<NodeId>) -> Vec<NodeId> {
    let mut after: Vec<NodeId> = replicas.iter().copied().filter(|id| Some(*id) != from).collect();
    if let Some(to) = to {
        if !after.contains(&to) {
            after.push(to);
        }
    }
    after
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bootstrapped(nodes: u64, shards: u16, rf: u16) -> MetaState {
        let members: BTreeMap<NodeId, String> = (1..=nodes).map(|id| (id, format!("127.0.0.{id}:18182"))).collect();
        let placement = place_replicas(&members, shards, rf);
        let mut state = MetaState::default();
        state.apply(MetaCommand::Bootstrap { nodes: members, placement }, 1).unwrap();
        state
    }

    /// Runs the planner to completion, applying each move as the driver would.
    fn settle(state: &mut MetaState, rf: u16, balance: bool) -> usize {
        let mut moves = 0;
        while let Some(planned) = plan_next_move(state, rf, balance, 0, std::time::Duration::ZERO) {
            let replicas = state.placement[&planned.shard].clone();
            state
                .apply(
                    MetaCommand::StartMove {
                        shard: planned.shard,
                        from: planned.from,
                        to: planned.to,
                        cause: planned.cause,
                        reason: String::new(),
                        pending: false,
                    },
                    2,
                )
                .unwrap();
            let after = replicas_after(&replicas, planned.from, planned.to);
            state.apply(MetaCommand::FinishMove { shard: planned.shard, replicas: after }, 3).unwrap();
            moves += 1;
            assert!(moves < 1000, "the planner does not converge");
        }
        moves
    }

    #[test]
    fn bootstrap_is_recorded_once() {
        let mut state = bootstrapped(3, 4, 3);
        let before = state.clone();
        state.apply(MetaCommand::Bootstrap { nodes: BTreeMap::new(), placement: BTreeMap::new() }, 9).unwrap();
        assert_eq!(state, before);
        assert!(
            plan_next_move(&state, 3, true, 0, std::time::Duration::ZERO).is_none(),
            "bootstrap placement is already balanced"
        );
    }

    #[test]
    fn nothing_but_bootstrap_before_bootstrap() {
        let mut state = MetaState::default();
        let add = MetaCommand::AddNode { id: 4, raft_addr: "127.0.0.4:18182".into() };
        assert_eq!(state.apply(add, 1), Err(MetaError::NotBootstrapped));
        assert!(!state.is_bootstrapped());
    }

    #[test]
    fn the_last_active_member_cannot_leave() {
        let mut state = bootstrapped(2, 2, 3);
        assert_eq!(state.apply(MetaCommand::SetNodeStatus { id: 1, status: NodeStatus::Leaving }, 2), Ok(()));
        assert_eq!(
            state.apply(MetaCommand::SetNodeStatus { id: 2, status: NodeStatus::Leaving }, 3),
            Err(MetaError::LastMember { id: 2 })
        );
    }

    #[test]
    fn add_node_conflicts_are_refused() {
        let mut state = bootstrapped(3, 4, 3);
        assert_eq!(state.apply(MetaCommand::AddNode { id: 4, raft_addr: "127.0.0.4:18182".into() }, 2), Ok(()));
        assert_eq!(state.apply(MetaCommand::AddNode { id: 4, raft_addr: "127.0.0.4:18182".into() }, 3), Ok(()));
        assert!(matches!(
            state.apply(MetaCommand::AddNode { id: 4, raft_addr: "127.0.0.9:18182".into() }, 4),
            Err(MetaError::AddressConflict { .. })
        ));
        assert!(matches!(
            state.apply(MetaCommand::AddNode { id: 5, raft_addr: "127.0.0.1:18182".into() }, 4),
            Err(MetaError::AddressTaken { id: 1, .. })
        ));
        assert!(matches!(state.apply(MetaCommand::RemoveNode { id: 1 }, 5), Err(MetaError::StillHostsReplicas { .. })));
    }

    #[test]
    fn a_joining_node_receives_its_share() {
        let mut state = bootstrapped(3, 16, 3);
        state.apply(MetaCommand::AddNode { id: 4, raft_addr: "127.0.0.4:18182".into() }, 2).unwrap();
        let moves = settle(&mut state, 3, true);
        let load = state.load();
        assert_eq!(moves, 12, "16*3/4 = 12 replicas move to the new node: {load:?}");
        assert!(load.values().all(|l| *l == 12), "{load:?}");
    }

    #[test]
    fn decommission_moves_every_replica_away() {
        let mut state = bootstrapped(5, 8, 3);
        state.apply(MetaCommand::SetNodeStatus { id: 3, status: NodeStatus::Leaving }, 2).unwrap();
        settle(&mut state, 3, true);
        assert!(state.shards_of(3).is_empty());
        assert!(state.placement.values().all(|r| r.len() == 3 && !r.contains(&3)), "{:?}", state.placement);
        state.apply(MetaCommand::RemoveNode { id: 3 }, 4).unwrap();
        assert!(!state.nodes.contains_key(&3));
    }

    #[test]
    fn operator_moves_are_not_undone_by_balancing() {
        let mut state = bootstrapped(4, 4, 3);
        settle(&mut state, 3, true);
        let shard = *state.placement.keys().next().unwrap();
        let replicas = state.placement[&shard].clone();
        let outside = (1..=4).find(|id| !replicas.contains(id)).unwrap();
        let from = replicas[0];
        let start = MetaCommand::StartMove {
            shard,
            from: Some(from),
            to: Some(outside),
            cause: MoveCause::Operator,
            reason: "hotspot".into(),
            pending: true,
        };
        state.apply(start, 2).unwrap();
        assert!(
            plan_next_move(&state, 3, true, 0, std::time::Duration::ZERO).is_none_or(|m| m.shard != shard),
            "a pending move is left alone"
        );
        state.apply(MetaCommand::MoveRunning { shard }, 3).unwrap();
        state
            .apply(MetaCommand::FinishMove { shard, replicas: replicas_after(&replicas, Some(from), Some(outside)) }, 4)
            .unwrap();
        settle(&mut state, 3, true);
        assert!(state.placement[&shard].contains(&outside), "the operator's move stands");
    }

    #[test]
    fn preferred_leaders_spread_after_a_join() {
        let mut state = bootstrapped(3, 12, 3);
        state.apply(MetaCommand::AddNode { id: 4, raft_addr: "127.0.0.4:18182".into() }, 2).unwrap();
        settle(&mut state, 3, true);
        state.apply(MetaCommand::SetNodeStatus { id: 4, status: NodeStatus::Up }, 3).unwrap();
        let mut changes = 0;
        while let Some((shard, node)) = plan_preferred_leader(&state) {
            state.apply(MetaCommand::SetPreferredLeader { shard, node, pinned: false }, 4).unwrap();
            changes += 1;
            assert!(changes < 100, "does not converge");
        }
        let mut counts: BTreeMap<NodeId, usize> = BTreeMap::new();
        for replicas in state.placement.values() {
            *counts.entry(replicas[0]).or_default() += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![3, 3, 3, 3], "{counts:?}");
    }

    #[test]
    fn an_operator_choice_of_leader_stands() {
        let mut state = bootstrapped(3, 6, 3);
        // Shard 0 prefers node 1; the operator moves it to node 2, making node 2 preferred by 3
        // shards and node 1 by 1: spreading would move one back, but not shard 0's.
        state.apply(MetaCommand::SetPreferredLeader { shard: 0, node: 2, pinned: true }, 2).unwrap();
        while let Some((shard, node)) = plan_preferred_leader(&state) {
            assert_ne!(shard, 0, "the pinned shard was moved");
            state.apply(MetaCommand::SetPreferredLeader { shard, node, pinned: false }, 3).unwrap();
        }
        assert_eq!(state.placement[&0][0], 2);
    }

    proptest! {
        /// From any bootstrap, joins and decommissions, the planner converges to a placement where
        /// every shard has min(rf, active) replicas on distinct active nodes, balanced within one.
        #[test]
        fn planner_converges(nodes in 1u64..7, shards in 1u16..24, rf in 1u16..5, joins in 0u64..3, leaves in 0u64..3) {
            let mut state = bootstrapped(nodes, shards, rf);
            for j in 0..joins {
                let id = nodes + 1 + j;
                state.apply(MetaCommand::AddNode { id, raft_addr: format!("127.0.1.{id}:18182") }, 2).unwrap();
            }
            for id in 1..=leaves.min(nodes + joins - 1) {
                state.apply(MetaCommand::SetNodeStatus { id, status: NodeStatus::Leaving }, 2).unwrap();
            }
            settle(&mut state, rf, true);
            let active: Vec<NodeId> = state.active_nodes().collect();
            let target = (rf as usize).min(active.len());
            for replicas in state.placement.values() {
                let mut distinct = replicas.clone();
                distinct.sort();
                distinct.dedup();
                prop_assert_eq!(distinct.len(), replicas.len());
                prop_assert_eq!(replicas.len(), target);
                prop_assert!(replicas.iter().all(|id| active.contains(id)));
            }
            let load = state.load();
            let active_loads: Vec<usize> = active.iter().map(|id| load[id]).collect();
            let (min, max) = (active_loads.iter().min().copied().unwrap_or(0), active_loads.iter().max().copied().unwrap_or(0));
            prop_assert!(max <= min + 1, "unbalanced: {:?}", load);
        }
    }
}
