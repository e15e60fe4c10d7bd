//! The placement driver: on the meta group's leader, a loop that makes the cluster match its
//! metadata. It records the bootstrap, keeps the meta group's voters equal to the node list,
//! runs replica moves one at a time (add the new replica as a learner, let it catch up, promote
//! it, then remove the old one) and reports each through `rebalance_status`, marks joined nodes
//! UP once the placement is balanced, and removes decommissioned nodes once they hold nothing.
//! A node unreachable past `cluster.dead_node_timeout_seconds` is decommissioned by the driver
//! itself when the live nodes can hold its replicas: they are re-created on live nodes (added,
//! caught up, promoted, and only then the dead replica removed, so no shard drops below a
//! quorum of live replicas during a move).
//! Every step is recorded in the meta group first, so a new meta leader resumes where the old
//! one stopped; every step is idempotent, so resuming twice is harmless.
//!
//! On every node, a cleanup loop deletes the replicas that moves took away from it
//! ([`start_replica_cleanup`]): once the metadata, read fresh, has placed a shard elsewhere for
//! a while and the shard's leader confirms this node is no member of its group, the replica's
//! log, state and records are deleted and its group opened again empty.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::coordinator::Coordinator;
use crate::meta::{
    plan_next_move, plan_preferred_leader, replicas_after, MetaCommand, MetaError, MetaState, NodeStatus, Rebalance,
    RebalanceStatus, META_SHARD,
};
use crate::raft::types::{GroupAdmin, NodeId};
use crate::raft::ShardSet;
use crate::shard::ConsensusError;

/// A shard whose move failed is left alone this long before the planner tries it again.
pub const FAILED_MOVE_BACKOFF: Duration = Duration::from_secs(5);

/// How long a replica must stay moved away (see [`moved_away`]) before this node deletes it.
pub const RETIRE_AFTER: Duration = Duration::from_secs(10);

/// How the driver behaves (`[cluster]` config).
#[derive(Debug, Clone)]
pub struct PlacementSettings {
    /// How often the driver looks for work.
    pub interval: Duration,
    /// Whether replica counts are balanced across nodes (repairs and decommissions always run).
    pub auto_rebalance: bool,
    /// Time allowed for one membership change (a new replica catching up included).
    pub move_timeout: Duration,
    /// A node not heard from for this long is replaced (`None`: never).
    pub dead_node_timeout: Option<Duration>,
}

/// Why one driver round stopped early.
#[derive(Debug, thiserror::Error)]
enum DriverError {
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// Starts the driver; it ends with `stop` or when the shard set is dropped.
pub fn start(shards: &Arc<ShardSet>, settings: PlacementSettings, stop: CancellationToken) {
    let tasks = shards.tasks.clone();
    let shards = Arc::downgrade(shards);
    tasks.spawn(async move {
        tokio::select! {
            _ = run(shards, settings) => {}
            _ = stop.cancelled() => {}
        }
    });
}

async fn run(shards: Weak<ShardSet>, settings: PlacementSettings) {
    // Since when this node leads the meta group: only a leader that has been listening for a
    // whole timeout may call a node dead (a new leader has heard from nobody yet).
    let mut leading_since: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(settings.interval).await;
        let Some(shards) = shards.upgrade() else { return };
        if !shards.leads(META_SHARD) {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(std::time::Instant::now);
        if let Some(timeout) = settings.dead_node_timeout.filter(|t| since.elapsed() >= *t) {
            match replace_dead_node(&shards, timeout, settings.move_timeout).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => tracing::warn!(error = %error, "replacing a dead node failed"),
            }
        }
        if let Err(error) = round(&shards, &settings).await {
            tracing::warn!(error = %error, "placement round stopped");
        }
    }
}

/// Decommissions one UP node that has not been heard from for `timeout`, if the other live
/// nodes can hold the replication factor without it (else its shards keep running one replica
/// short, and it is kept for when it comes back). Returns whether it did.
async fn replace_dead_node(shards: &ShardSet, timeout: Duration, move_timeout: Duration) -> Result<bool, DriverError> {
    let state = shards.meta();
    if !state.is_bootstrapped() {
        return Ok(false);
    }
    // Silence, not the `leaving` flag of a heartbeat: a node that stops for a restart says it
    // is leaving, and must still get the whole timeout to come back.
    let alive = |id: &NodeId| *id == shards.node_id || shards.unheard_for(*id).is_some_and(|d| d < timeout);
    let up: Vec<NodeId> = state.nodes.iter().filter(|(_, n)| n.status == NodeStatus::Up).map(|(id, _)| *id).collect();
    let Some(dead) = up.iter().copied().find(|id| !alive(id)) else { return Ok(false) };
    let live = up.iter().filter(|id| alive(id)).count();
    if live < shards.replication_factor as usize {
        tracing::debug!(node = dead, live, "a node is unreachable, but too few live nodes to re-create its replicas");
        return Ok(false);
    }
    let hosted = state.shards_of(dead).len();
    shards
        .propose_meta_local(MetaCommand::SetNodeStatus { id: dead, status: NodeStatus::Leaving }, move_timeout)
        .await??;
    tracing::warn!(
        node = dead,
        unreachable_for_s = timeout.as_secs(),
        replicas = hosted,
        "node unreachable past cluster.dead_node_timeout_seconds: re-creating its replicas on live nodes"
    );
    Ok(true)
}

/// One round: at most one replica move, so each round is short and sees fresh metadata.
async fn round(shards: &ShardSet, settings: &PlacementSettings) -> Result<(), DriverError> {
    let timeout = settings.move_timeout;
    let state = shards.meta();
    if !state.is_bootstrapped() {
        if let Some((nodes, placement)) = shards.founding() {
            let bootstrap = MetaCommand::Bootstrap { nodes: nodes.clone(), placement: placement.clone() };
            shards.propose_meta_local(bootstrap, timeout).await??;
            tracing::info!(nodes = nodes.len(), shards = placement.len(), "cluster metadata bootstrapped");
        }
        return Ok(());
    }
    sync_meta_voters(shards, &state, timeout).await?;
    if let Some((shard, rebalance)) = state.rebalances.iter().find(|(s, _)| state.move_under_way(**s)) {
        return run_move(shards, &state, *shard, rebalance.clone(), timeout).await;
    }
    let now_us = crate::model::id::now_us();
    if let Some(planned) =
        plan_next_move(&state, shards.replication_factor, settings.auto_rebalance, now_us, FAILED_MOVE_BACKOFF)
    {
        let reason = format!("{:?}", planned.cause).to_lowercase();
        let start = MetaCommand::StartMove {
            shard: planned.shard,
            from: planned.from,
            to: planned.to,
            cause: planned.cause,
            reason,
            pending: false,
        };
        shards.propose_meta_local(start, timeout).await??;
        let state = shards.meta();
        if let Some(rebalance) = state.rebalances.get(&planned.shard).cloned() {
            return run_move(shards, &state, planned.shard, rebalance, timeout).await;
        }
        return Ok(());
    }
    // Balanced: joined nodes are full members now; decommissioned ones that hold nothing go.
    for (id, node) in &state.nodes {
        match node.status {
            NodeStatus::Joining => {
                shards
                    .propose_meta_local(MetaCommand::SetNodeStatus { id: *id, status: NodeStatus::Up }, timeout)
                    .await??;
                tracing::info!(node = id, "node joined");
            }
            NodeStatus::Leaving if state.shards_of(*id).is_empty() => {
                shards.propose_meta_local(MetaCommand::RemoveNode { id: *id }, timeout).await??;
                tracing::info!(node = id, "node removed");
            }
            _ => {}
        }
    }
    // Then spread the preferred leaders; each shard's leader follows its preference (below).
    if settings.auto_rebalance {
        if let Some((shard, node)) = plan_preferred_leader(&state) {
            shards
                .propose_meta_local(MetaCommand::SetPreferredLeader { shard, node, pinned: false }, timeout)
                .await??;
            tracing::info!(shard, node, "preferred leader changed");
        }
    }
    Ok(())
}

/// Leaders that are not their shard's preferred leader hand leadership over once the preferred
/// node is UP (heard from), a voter and caught up: after failovers, leadership drifts to the
/// survivors, and this brings it back so leaders stay spread. At most one transfer per node
/// every round, and none for a shard that transferred in the last 30 s.
pub fn start_leader_balancer(shards: &Arc<ShardSet>, interval: Duration, stop: CancellationToken) {
    let tasks = shards.tasks.clone();
    let shards = Arc::downgrade(shards);
    tasks.spawn(async move {
        let mut last_transfer: std::collections::HashMap<u16, std::time::Instant> = Default::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            let Some(shards) = shards.upgrade() else { return };
            let meta = shards.meta();
            for group in shards.groups() {
                let shard = group.shard;
                // A shard being moved is left to the move (it hands leadership over itself).
                let busy = meta.move_under_way(shard);
                if busy || !shards.leads(shard) || last_transfer.get(&shard).is_some_and(|at| at.elapsed() < COOLDOWN) {
                    continue;
                }
                let Some(&preferred) = meta.placement.get(&shard).and_then(|r| r.first()) else { continue };
                if preferred == shards.node_id || !shards.heard_from(preferred, Duration::from_secs(2)) {
                    continue;
                }
                let Ok(status) = shards.status(shard) else { continue };
                let caught_up = status.replication.iter().any(|f| {
                    f.node == preferred && f.matched_index.is_some() && f.matched_index == status.last_log_index
                });
                if !status.voters.contains(&preferred) || !caught_up {
                    continue;
                }
                last_transfer.insert(shard, std::time::Instant::now());
                match shards.admin_group_local(shard, GroupAdmin::TransferLeader { target: preferred }).await {
                    Ok(()) => tracing::info!(shard, to = preferred, "leadership handed to the preferred leader"),
                    Err(error) => {
                        tracing::info!(shard, to = preferred, error = %error, "leader hand-over did not happen")
                    }
                }
                break;
            }
        }
    });
}

/// How long a shard waits between two hand-overs to its preferred leader.
const COOLDOWN: Duration = Duration::from_secs(30);

/// Makes the meta group's membership follow the node list: every node a voter, removed nodes out.
async fn sync_meta_voters(shards: &ShardSet, state: &MetaState, timeout: Duration) -> Result<(), DriverError> {
    let status = shards.status(META_SHARD)?;
    let members: Vec<NodeId> = status.voters.iter().chain(&status.learners).copied().collect();
    // A node that cannot catch up (it died while joining) must not stall every other change:
    // each addition gets a short wait, and its failure is logged and retried next round.
    let add_timeout = timeout.min(Duration::from_secs(10));
    for (id, node) in &state.nodes {
        if status.voters.contains(id) || node.status == NodeStatus::Leaving {
            continue;
        }
        let add = GroupAdmin::AddVoter { node: *id, addr: node.raft_addr.clone() };
        match shards.admin_group(META_SHARD, add, add_timeout).await {
            Ok(()) => tracing::info!(node = id, "node added to the meta group"),
            Err(error) => tracing::warn!(node = id, error = %error, "adding a node to the meta group failed; retrying"),
        }
    }
    for id in members.into_iter().filter(|id| !state.nodes.contains_key(id)) {
        shards.admin_group(META_SHARD, GroupAdmin::RemoveNode { node: id }, timeout).await?;
        shards.forget_node(id);
        tracing::info!(node = id, "node removed from the meta group");
    }
    Ok(())
}

/// Runs (or resumes) the move of `shard` and records how it ended.
async fn run_move(
    shards: &ShardSet,
    state: &MetaState,
    shard: u16,
    rebalance: Rebalance,
    timeout: Duration,
) -> Result<(), DriverError> {
    if rebalance.status == RebalanceStatus::Pending {
        shards.propose_meta_local(MetaCommand::MoveRunning { shard }, timeout).await??;
    }
    tracing::info!(shard, from = ?rebalance.from, to = ?rebalance.to, cause = ?rebalance.cause, "moving replica");
    let mut added = false;
    let outcome = async {
        if let Some(to) = rebalance.to {
            let addr = state.nodes.get(&to).map(|n| n.raft_addr.clone()).ok_or(MetaError::UnknownNode { id: to })?;
            shards.admin_group(shard, GroupAdmin::AddVoter { node: to, addr }, timeout).await?;
            added = true;
        }
        if let Some(from) = rebalance.from {
            shards.admin_group(shard, GroupAdmin::RemoveNode { node: from }, timeout).await?;
        }
        Ok::<(), DriverError>(())
    }
    .await;
    match outcome {
        Ok(()) => {
            let replicas = state.placement.get(&shard).cloned().unwrap_or_default();
            let replicas = replicas_after(&replicas, rebalance.from, rebalance.to);
            shards.propose_meta_local(MetaCommand::FinishMove { shard, replicas }, timeout).await??;
            tracing::info!(shard, "replica moved");
            Ok(())
        }
        Err(error) => {
            tracing::warn!(shard, error = %error, "replica move failed");
            // Half done (added, not removed): the placement records both, as the group has them.
            let replicas = added
                .then(|| replicas_after(&state.placement.get(&shard).cloned().unwrap_or_default(), None, rebalance.to));
            shards
                .propose_meta_local(MetaCommand::FailMove { shard, error: error.to_string(), replicas }, timeout)
                .await??;
            // Give the cluster a moment before the planner tries again.
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(())
        }
    }
}

/// Starts, on every node, the loop that deletes the replicas moves took away from it, every
/// `interval`; it ends with `stop` or when the shard set is dropped.
pub fn start_replica_cleanup(shards: &Arc<ShardSet>, interval: Duration, stop: CancellationToken) {
    let tasks = shards.tasks.clone();
    let shards = Arc::downgrade(shards);
    tasks.spawn(async move {
        // Since when each shard has been seen moved away.
        let mut seen: std::collections::HashMap<u16, std::time::Instant> = Default::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            let Some(shards) = shards.upgrade() else { return };
            // A round stops with the node: nothing is retired once shutdown has begun.
            let round = tokio::select! {
                round = cleanup_round(&shards, &mut seen) => round,
                _ = stop.cancelled() => return,
            };
            if let Err(error) = round {
                tracing::info!(error = %error, "moved-away replicas not deleted yet; trying again");
            }
        }
    });
}

/// Whether this node's replica of `group` holds anything (an empty, never-initialized group
/// needs no cleanup).
fn holds_data(group: &crate::raft::ShardGroup) -> bool {
    let metrics = group.raft.metrics();
    let metrics = metrics.borrow();
    metrics.last_log_index.is_some()
        || metrics.last_applied.is_some()
        || metrics.membership_config.membership().nodes().next().is_some()
}

async fn cleanup_round(
    shards: &ShardSet,
    seen: &mut std::collections::HashMap<u16, std::time::Instant>,
) -> Result<(), DriverError> {
    // Decided on this node's metadata only once its own replica of it has been checked; and a
    // replica under repair (suspect) is left alone until its repair ends.
    if !shards.checked(META_SHARD) {
        return Ok(());
    }
    let holding: std::collections::BTreeSet<u16> =
        shards.groups().iter().filter(|g| holds_data(g) && !g.health.suspect()).map(|g| g.shard).collect();
    // A node the meta group's leader says was removed holds no replica any more: its own
    // metadata is stale (it left the meta group), so it cannot read that fresh. (`holding`
    // has data shards only.)
    let removed = shards.removed_by().is_some();
    let pick = || {
        if removed {
            holding.iter().copied().collect()
        } else {
            moved_away(&shards.meta(), shards.node_id, &holding)
        }
    };
    let candidates: Vec<u16> = pick();
    seen.retain(|shard, _| candidates.contains(shard));
    if candidates.is_empty() {
        return Ok(());
    }
    // Otherwise decided on fresh metadata only: a linearizable read of the meta group first.
    let fresh = || shards.read_barrier(META_SHARD, Duration::from_secs(5));
    if !removed {
        fresh().await?;
    }
    for shard in pick() {
        let since = *seen.entry(shard).or_insert_with(std::time::Instant::now);
        if since.elapsed() < RETIRE_AFTER {
            continue;
        }
        // The shard's leader confirms this node is no member of the group (and removes it, should
        // a failed move have left it in): idempotent, and refused without a leader.
        let me = shards.node_id;
        shards.admin_group(shard, GroupAdmin::RemoveNode { node: me }, Duration::from_secs(10)).await?;
        // A move back to this node may have started meanwhile: read the metadata fresh again.
        if !removed {
            fresh().await?;
            if !pick().contains(&shard) {
                seen.remove(&shard);
                continue;
            }
        }
        shards.retire_replica(shard).await?;
        seen.remove(&shard);
    }
    Ok(())
}

/// The data shards of which `me` holds a replica (`holding`) that the metadata places on other
/// nodes, with no move of the shard under way; every one if the metadata no longer lists `me`
/// (a node is removed only once it holds no replica); none before the metadata is bootstrapped.
pub fn moved_away(meta: &MetaState, me: NodeId, holding: &std::collections::BTreeSet<u16>) -> Vec<u16> {
    if !meta.is_bootstrapped() {
        return Vec::new();
    }
    if !meta.nodes.contains_key(&me) {
        return holding.iter().copied().filter(|s| *s != META_SHARD).collect();
    }
    holding
        .iter()
        .copied()
        .filter(|shard| {
            *shard != META_SHARD
                && meta.placement.get(shard).is_some_and(|replicas| !replicas.contains(&me))
                && !meta.move_under_way(*shard)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::MoveCause;

    fn state(placement: &[(u16, &[NodeId])]) -> MetaState {
        let mut state = MetaState::default();
        let nodes = (1..=4).map(|id| (id, format!("127.0.0.{id}:18182"))).collect();
        let placement = placement.iter().map(|(s, r)| (*s, r.to_vec())).collect();
        state.apply(MetaCommand::Bootstrap { nodes, placement }, 1).expect("bootstrap");
        state
    }

    #[test]
    fn only_replicas_placed_elsewhere_with_no_move_under_way_are_moved_away() {
        let mut meta = state(&[(0, &[1, 2, 3]), (1, &[2, 3, 4]), (2, &[2, 3, 4])]);
        let holding = [0u16, 1, 2].into_iter().collect();
        // Node 1 holds 1 and 2, which are placed on 2, 3, 4.
        assert_eq!(moved_away(&meta, 1, &holding), vec![1, 2]);
        // Not what it does not hold.
        assert_eq!(moved_away(&meta, 1, &[0u16, 2].into_iter().collect()), vec![2]);
        // A move of shard 2 under way (to node 1, say): left alone until it ends.
        let start = MetaCommand::StartMove {
            shard: 2,
            from: Some(4),
            to: Some(1),
            cause: MoveCause::Operator,
            reason: "operator".into(),
            pending: false,
        };
        meta.apply(start, 2).expect("start move");
        assert_eq!(moved_away(&meta, 1, &holding), vec![1]);
        // A node the metadata no longer lists holds nothing; never the meta group.
        let with_meta = [0u16, 1, META_SHARD].into_iter().collect();
        assert_eq!(moved_away(&meta, 9, &with_meta), vec![0, 1]);
        // Nothing before the metadata is bootstrapped.
        assert!(moved_away(&MetaState::default(), 1, &holding).is_empty());
    }
}
