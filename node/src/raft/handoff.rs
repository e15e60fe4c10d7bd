//! Handing the leadership of a group to another voter without leaving the group leaderless for
//! an election timeout, and what becomes of the requests that reach this node meanwhile. Used
//! by shutdown (every group this node leads), by `POST /admin/shards/{id}/transfer-leader` and
//! the leader balancer, and by a leader asked to remove itself from a group.
//!
//! openraft 0.9 has no leader-transfer call, and a voter refuses to vote while its leader lease
//! runs (half of `raft.election_timeout_max_ms` since it last heard from the leader, see
//! `shards::openraft_election_timeouts`): under a steady
//! write load, forever. The leader itself, though, refreshes its own lease only when it is
//! elected. Once it has led for longer than one lease it grants its vote to a candidate of a
//! higher term whose log is at least as long as its own, and steps down. With at most three
//! voters, that vote and the candidate's own are a majority, so a hand-over takes a few
//! milliseconds:
//!
//! 1. wait, if needed, until this node has led for longer than one lease (writes go on);
//! 2. close the group's *gate*: new proposals and read-index requests wait, those in flight
//!    finish, so the log stops growing;
//! 3. wait until the target has matched the whole log (else this node would refuse it its vote);
//! 4. ask the target to campaign (`Campaign` RPC, naming this node and its term: a target that
//!    no longer follows them, because the request came late, refuses); it wins with this
//!    node's vote;
//! 5. open the gate once this node sees the target lead: what waited is refused with
//!    `not_leader` naming the new leader, and the node that sent it follows the hint at once.
//!
//! With more voters, or in a joint configuration, the other voters' leases must run out too:
//! the gate stays closed (nothing is replicated, so nothing refreshes them) while the leader
//! stops heartbeating for one lease, then the target campaigns (`transfer_leader_local`).
//!
//! Nothing is appended while the gate is closed, so a refused request was not proposed and
//! the sender retries it (with its idempotency token) at the new leader. A leaving node (see
//! [`ShardSet::begin_leaving`]) also refuses to campaign, and tells its peers in its node
//! heartbeats, so their leader balancers do not hand leaderships back to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{RwLock, RwLockReadGuard};

use super::forward::Campaign;
use super::shards::{ShardGroup, ShardSet};
use super::types::{group_of_shard, NodeId};
use crate::meta::META_SHARD;
use crate::shard::ConsensusError;

/// How long a hand-over waits for the proposals in flight to finish.
const DRAIN_IN_FLIGHT: Duration = Duration::from_secs(1);
/// How long the target may take to match the leader's log.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Added to the leader lease: openraft compares it with its own reading of the clock.
const LEASE_MARGIN: Duration = Duration::from_millis(50);

/// Hand-over state of every group of this node.
pub struct Handoff {
    leaving: AtomicBool,
    /// One per data shard, then the meta group.
    groups: Vec<GroupHandoff>,
}

#[derive(Default)]
struct GroupHandoff {
    /// Proposals and read-index requests hold it shared while they run; a hand-over holds it
    /// exclusively, so the log stops growing while the target catches up and campaigns.
    gate: RwLock<()>,
    /// The term this node leads the group in, and when it first saw itself lead in that term
    /// (no earlier than openraft's own record, so a lease counted from it has surely run out).
    leading_since: Mutex<Option<(u64, Instant)>>,
}

impl Handoff {
    pub fn new(shards: u16) -> Handoff {
        Handoff { leaving: AtomicBool::new(false), groups: (0..=shards).map(|_| GroupHandoff::default()).collect() }
    }

    fn group(&self, shard: u16) -> &GroupHandoff {
        let last = self.groups.len() - 1;
        let slot = if shard == META_SHARD { last } else { usize::from(shard).min(last) };
        &self.groups[slot]
    }
}

impl ShardSet {
    /// Shutdown has begun: this node hands its leaderships over and refuses to take new ones.
    pub fn begin_leaving(&self) {
        self.handoff.leaving.store(true, Ordering::Release);
    }

    /// Whether this node is shutting down ([`ShardSet::begin_leaving`]).
    pub fn is_leaving(&self) -> bool {
        self.handoff.leaving.load(Ordering::Acquire)
    }

    /// Waits while a hand-over of `group` is under way (its gate is closed), up to `deadline`.
    /// The guard keeps the gate open until the proposal or read index that holds it is done.
    /// Afterwards a node that no longer leads answers `not_leader` naming the new leader, which
    /// the sending node follows at once (`propose`, `read_barrier`).
    pub(super) async fn admit(
        &self,
        group: &ShardGroup,
        deadline: Instant,
    ) -> Result<RwLockReadGuard<'_, ()>, ConsensusError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(remaining, self.handoff.group(group.shard).gate.read())
            .await
            .map_err(|_| ConsensusError::Timeout { shard: group.shard, timeout_ms: remaining.as_millis() as u64 })
    }

    /// Hands the leadership of `group`, which this node leads, to the first of `targets` that
    /// takes it; with no targets given, to the other voters in [`ShardSet::handover_order`].
    /// Returns the new leader.
    pub(super) async fn hand_over(&self, group: &ShardGroup, targets: &[NodeId]) -> Result<NodeId, ConsensusError> {
        let shard = group.shard;
        let failed = |message: String| ConsensusError::MembershipChange { shard, message };
        let voters = {
            let metrics = group.raft.metrics();
            let metrics = metrics.borrow();
            if metrics.current_leader != Some(self.node_id) {
                return Err(ConsensusError::NotLeader { shard, leader: metrics.current_leader });
            }
            metrics.membership_config.membership().voter_ids().collect::<std::collections::BTreeSet<NodeId>>()
        };
        if targets.contains(&self.node_id) {
            return Ok(self.node_id);
        }
        if let [only] = targets {
            if !voters.contains(only) {
                return Err(failed(format!("node {only} is not a voter")));
            }
        }
        let targets =
            if targets.is_empty() { self.handover_order(group, &mut self.leaders_tally()) } else { targets.to_vec() };
        if targets.is_empty() {
            return Err(failed("no other voter to hand leadership to".into()));
        }
        let state = self.handoff.group(shard);
        self.outlive_own_lease(group, state).await;
        self.wake(group);
        let Ok(_closed) = tokio::time::timeout(DRAIN_IN_FLIGHT, state.gate.write()).await else {
            return Err(failed("requests in flight did not finish; leadership kept".into()));
        };
        let (last_log_index, fast, term) = {
            let metrics = group.raft.metrics();
            let metrics = metrics.borrow();
            if metrics.current_leader != Some(self.node_id) {
                return Err(ConsensusError::NotLeader { shard, leader: metrics.current_leader });
            }
            let membership = metrics.membership_config.membership();
            (
                metrics.last_log_index,
                membership.get_joint_config().len() == 1 && voters.len() <= 3,
                metrics.current_term,
            )
        };
        let mut last = failed("no other voter to hand leadership to".into());
        for target in targets.into_iter().filter(|t| voters.contains(t) && *t != self.node_id) {
            if let Err(error) = self.wait_caught_up(group, target, last_log_index).await {
                last = error;
                continue;
            }
            // No read lease of this term from here on (`raft::lease`): a follower asked to
            // campaign stops refusing other candidates, and one whose Campaign answer is lost may
            // have started anyway. The gate is closed, so no lease check runs in between. If
            // this node keeps the leadership, its reads take heartbeat rounds until it is
            // elected again.
            group.lease.fence(term);
            let moved = if fast {
                self.campaign_for(group, target).await
            } else {
                self.transfer_leader_local(group, target, &voters).await
            };
            let leader = group.raft.metrics().borrow().current_leader;
            match moved {
                Ok(()) => return Ok(target),
                // A failed campaign ends in an election; trying another target would only add one.
                Err(error) if leader != Some(self.node_id) => return Err(error),
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// Hands over every group this node leads, all at once, each within `bound`. Returns how
    /// many moved and how many did not (their followers elect a leader after an election
    /// timeout instead).
    pub async fn hand_over_leaderships(&self, bound: Duration) -> (usize, usize) {
        // A group of one voter has nobody to hand over to (a single node): it just stops.
        let has_other_voter =
            |g: &ShardGroup| g.raft.metrics().borrow().membership_config.membership().voter_ids().count() > 1;
        let led: Vec<Arc<ShardGroup>> =
            self.all_groups().filter(|g| self.leads(g.shard) && has_other_voter(g)).collect();
        // Spread the leaderships over the other nodes, most caught-up first.
        let mut tally = self.leaders_tally();
        let plans: Vec<(Arc<ShardGroup>, Vec<NodeId>)> = led
            .into_iter()
            .map(|g| {
                let order = self.handover_order(&g, &mut tally);
                (g, order)
            })
            .collect();
        let outcomes = futures::future::join_all(plans.iter().map(|(group, targets)| async move {
            let started = Instant::now();
            let outcome = tokio::time::timeout(bound, self.hand_over(group, targets)).await;
            (group.shard, started.elapsed(), outcome)
        }))
        .await;
        let (mut moved, mut kept) = (0, 0);
        for (shard, took, outcome) in outcomes {
            let group = group_of_shard(shard);
            let took_ms = took.as_millis() as u64;
            match outcome {
                Ok(Ok(to)) => {
                    moved += 1;
                    tracing::info!(group, to, took_ms, "leadership handed over");
                }
                Ok(Err(error)) => {
                    kept += 1;
                    tracing::warn!(group, error = %error, took_ms, "leadership not handed over");
                }
                Err(_) => {
                    kept += 1;
                    tracing::warn!(group, took_ms, "leadership hand-over timed out");
                }
            }
        }
        (moved, kept)
    }

    /// The other voters of `group` in the order to offer them its leadership: nodes heard from
    /// (and not leaving) first, then the most caught-up, then those leading the fewest groups
    /// (counting the ones already planned in `tally`), then by id. Counts the first in `tally`.
    fn handover_order(&self, group: &ShardGroup, tally: &mut BTreeMap<NodeId, usize>) -> Vec<NodeId> {
        let metrics = group.raft.metrics().borrow().clone();
        let matched = metrics.replication.clone().unwrap_or_default();
        let mut voters: Vec<NodeId> =
            metrics.membership_config.membership().voter_ids().filter(|id| *id != self.node_id).collect();
        voters.sort_by_key(|id| {
            let alive = self.heard_from(*id, self.leader_lease);
            let index = matched.get(id).copied().flatten().map(|l| l.index);
            (!alive, std::cmp::Reverse(index), tally.get(id).copied().unwrap_or(0), *id)
        });
        if let Some(first) = voters.first() {
            *tally.entry(*first).or_default() += 1;
        }
        voters
    }

    /// How many groups each node leads, as this node sees it.
    fn leaders_tally(&self) -> BTreeMap<NodeId, usize> {
        let mut tally = BTreeMap::new();
        for group in self.all_groups() {
            if let Some(leader) = group.raft.metrics().borrow().current_leader {
                *tally.entry(leader).or_default() += 1;
            }
        }
        tally
    }

    /// Waits until this node has led `group` for longer than one leader lease, so that it may
    /// grant its vote; at most one lease.
    async fn outlive_own_lease(&self, group: &ShardGroup, state: &GroupHandoff) {
        let term = group.raft.metrics().borrow().current_term;
        let since = {
            let mut leading = state.leading_since.lock();
            match *leading {
                Some((t, at)) if t == term => at,
                // Not seen yet (the clock runs behind): count from now, which is later than
                // openraft's record and so errs on the safe side.
                _ => leading.insert((term, Instant::now())).1,
            }
        };
        tokio::time::sleep_until((since + self.leader_lease + LEASE_MARGIN).into()).await;
    }

    /// Waits until `target` has matched this leader's log up to `last_log_index`.
    async fn wait_caught_up(
        &self,
        group: &ShardGroup,
        target: NodeId,
        last_log_index: Option<u64>,
    ) -> Result<(), ConsensusError> {
        let matched = |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| {
            let index = m.replication.as_ref().and_then(|r| r.get(&target).copied().flatten()).map(|l| l.index);
            index >= last_log_index
        };
        group.raft.wait(Some(CATCH_UP)).metrics(matched, "hand-over target caught up").await.map(|_| ()).map_err(|_| {
            ConsensusError::MembershipChange {
                shard: group.shard,
                message: format!("node {target} did not catch up within {} ms", CATCH_UP.as_millis()),
            }
        })
    }

    /// Asks `target` to campaign and waits until this node sees it lead. This node, having led
    /// for longer than a lease, grants the vote at once, and with at most three voters that
    /// is the majority the target needs.
    async fn campaign_for(&self, group: &ShardGroup, target: NodeId) -> Result<(), ConsensusError> {
        let shard = group.shard;
        let deadline = Instant::now() + self.leader_lease * 2;
        let campaign = Campaign { term: group.raft.metrics().borrow().current_term, leader: self.node_id };
        self.ask_leader(group, target, &campaign, deadline).await?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let someone_else = |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| {
            m.current_leader.is_some_and(|leader| leader != self.node_id)
        };
        let _ = group.raft.wait(Some(remaining)).metrics(someone_else, "leadership handed over").await;
        match group.raft.metrics().borrow().current_leader {
            Some(leader) if leader == target => Ok(()),
            other => Err(ConsensusError::MembershipChange {
                shard,
                message: format!("leadership went to {other:?} instead of node {target}; retry"),
            }),
        }
    }

    /// Starts, for every group, a task that notes when this node starts leading it in a new
    /// term ([`ShardSet::hand_over`] must know whether its own lease has run out).
    pub fn start_leadership_clocks(self: &Arc<Self>) {
        for group in self.all_groups() {
            let mut watch = group.raft.server_metrics();
            let (shards, shard) = (Arc::downgrade(self), group.shard);
            self.tasks.spawn_until_stopped(async move {
                loop {
                    {
                        let Some(shards) = shards.upgrade() else { return };
                        let metrics = watch.borrow_and_update();
                        let term = metrics.vote.leader_id().get_term();
                        let mut leading = shards.handoff.group(shard).leading_since.lock();
                        if metrics.current_leader != Some(shards.node_id) {
                            *leading = None;
                        } else if leading.is_none_or(|(t, _)| t != term) {
                            *leading = Some((term, Instant::now()));
                        }
                    }
                    if watch.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}
