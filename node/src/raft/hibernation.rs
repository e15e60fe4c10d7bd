//! Hibernation of idle shard groups, so that idle cost does not grow with the number of shards.
//!
//! openraft 0.9 heartbeats every group on its own. Here, a leader whose group has been idle
//! (no proposal for [`IDLE_AFTER`] and every follower caught up) stops that group's heartbeats.
//! Instead, each node sends every peer one **node heartbeat** per heartbeat interval listing the
//! groups it leads that hibernate. A follower that hears it pauses elections in those groups; a
//! watchdog resumes them as soon as node heartbeats from that leader stop for one election
//! timeout, so a dead or partitioned leader is still replaced. Any proposal or read barrier on a
//! hibernating group wakes it first (`ShardSet::wake`), and a group missing from the leader's
//! next node heartbeat resumes elections on its followers. Node heartbeats also carry the last
//! log index of each of the sender's replicas, for `raft::takeover`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::shards::ShardSet;
use super::types::{GroupId, NodeId};
use crate::model::id::now_us;

/// A group with no proposal for this long, and all followers caught up, hibernates.
pub const IDLE_AFTER: Duration = Duration::from_secs(3);

/// What a node tells each peer once per heartbeat interval.
#[derive(Debug, Clone)]
pub struct NodeHeartbeat {
    pub from: NodeId,
    /// Groups `from` leads whose own heartbeats are paused.
    pub hibernating: Vec<GroupId>,
    /// `from` started on an empty data dir and waits to hear from its groups' leaders (see
    /// `ShardSet::arm_vote_guards`): leaders wake the groups it belongs to so it catches up.
    pub recovering: bool,
    /// `from` is shutting down (`ShardSet::begin_leaving`): peers stop counting it as up, so
    /// their leader balancers do not hand it leaderships it would only hand back.
    pub leaving: bool,
    /// The last log index of each of `from`'s replicas, by group: who should campaign when a
    /// leader goes silent (`raft::takeover`).
    pub logs: Vec<(GroupId, u64)>,
}

/// What the last node heartbeat from a peer said, and when it arrived.
struct Seen {
    at: Instant,
    leaving: bool,
    logs: HashMap<GroupId, u64>,
}

/// When each peer's node heartbeat was last received, and what it said. One entry per known
/// node: bounded by the membership.
#[derive(Default)]
pub struct PeerLiveness {
    seen: Mutex<HashMap<NodeId, Seen>>,
}

impl PeerLiveness {
    pub fn saw_with_logs(&self, node: NodeId, leaving: bool, logs: &[(GroupId, u64)]) {
        let logs = logs.iter().copied().collect();
        self.seen.lock().insert(node, Seen { at: Instant::now(), leaving, logs });
    }

    /// Whether a heartbeat from `node` arrived within `window` and it is not leaving.
    pub fn heard_within(&self, node: NodeId, window: Duration) -> bool {
        self.seen.lock().get(&node).is_some_and(|seen| !seen.leaving && seen.at.elapsed() < window)
    }

    /// How long ago the last heartbeat from `node` arrived, leaving or not (`None`: never).
    pub fn since_heard(&self, node: NodeId) -> Option<Duration> {
        self.seen.lock().get(&node).map(|seen| seen.at.elapsed())
    }

    /// The last log index `node` reported for `group` in a heartbeat received within `fresh`,
    /// and how long ago that heartbeat arrived.
    pub fn reported_index(&self, node: NodeId, group: GroupId, fresh: Duration) -> Option<(u64, Duration)> {
        let seen = self.seen.lock();
        let seen = seen.get(&node).filter(|seen| seen.at.elapsed() < fresh)?;
        seen.logs.get(&group).map(|index| (*index, seen.at.elapsed()))
    }
}

impl ShardSet {
    /// Applies a peer's node heartbeat: pause elections in the groups it leads and hibernates,
    /// resume them in the groups it leads and does not.
    pub fn on_node_heartbeat(&self, heartbeat: &NodeHeartbeat) {
        self.liveness.saw_with_logs(heartbeat.from, heartbeat.leaving, &heartbeat.logs);
        let hibernating: BTreeSet<GroupId> = heartbeat.hibernating.iter().copied().collect();
        if heartbeat.recovering {
            for group in self.groups().iter().filter(|g| g.hibernating.load(Ordering::Acquire)) {
                let member =
                    group.raft.metrics().borrow().membership_config.membership().get_node(&heartbeat.from).is_some();
                if member {
                    self.wake(group);
                }
            }
        }
        for group in self.groups() {
            if group.raft.metrics().borrow().current_leader != Some(heartbeat.from) {
                continue;
            }
            let paused = hibernating.contains(&super::types::group_of_shard(group.shard));
            if group.elections_paused.swap(paused, Ordering::AcqRel) != paused {
                group.update_elections();
            }
        }
    }

    /// One round: hibernate idle groups this node leads, send node heartbeats, resume elections
    /// in groups whose leader has gone quiet.
    fn hibernation_round(&self, election_timeout: Duration) {
        let mut hibernating = Vec::new();
        // Node heartbeats go to every known node: they also tell the cluster admin who is up.
        let peers: BTreeSet<(NodeId, String)> =
            self.known_nodes().into_iter().filter(|(id, _)| *id != self.node_id).collect();
        for group in self.groups() {
            let metrics = group.raft.metrics().borrow().clone();
            if metrics.current_leader != Some(self.node_id) {
                if group.hibernating.swap(false, Ordering::AcqRel) {
                    group.raft.runtime_config().heartbeat(true);
                }
                // Follower: resume elections when the leader's node heartbeats stopped.
                if group.elections_paused.load(Ordering::Acquire) {
                    let leader_alive = metrics
                        .current_leader
                        .is_some_and(|leader| self.liveness.heard_within(leader, election_timeout));
                    if !leader_alive && group.elections_paused.swap(false, Ordering::AcqRel) {
                        group.update_elections();
                        tracing::info!(shard = group.shard, "leader went quiet; elections resumed");
                    }
                }
                continue;
            }
            if group.hibernating.load(Ordering::Acquire) {
                hibernating.push(super::types::group_of_shard(group.shard));
                continue;
            }
            let idle =
                now_us().saturating_sub(group.last_proposal_us.load(Ordering::Acquire)) > IDLE_AFTER.as_micros() as u64;
            let last = metrics.last_log_index;
            let caught_up = metrics
                .replication
                .as_ref()
                .is_some_and(|r| r.values().all(|matched| matched.map(|m| m.index) == last));
            if idle && caught_up && !group.hibernating.swap(true, Ordering::AcqRel) {
                group.raft.runtime_config().heartbeat(false);
                hibernating.push(super::types::group_of_shard(group.shard));
            }
        }
        let logs = self
            .all_groups()
            .map(|group| {
                let last = group.raft.metrics().borrow().last_log_index.unwrap_or(0);
                (super::types::group_of_shard(group.shard), last)
            })
            .collect();
        let heartbeat = NodeHeartbeat {
            from: self.node_id,
            hibernating,
            recovering: self.recovering(),
            leaving: self.is_leaving(),
            logs,
        };
        let message = super::wire::heartbeat::heartbeat_to_proto(&heartbeat);
        // Each peer gets its own send, and a peer whose last send has not finished is skipped
        // this round: a dead or cut-off peer must not delay the heartbeats of the live ones
        // (`raft::takeover` relies on them), nor pile up sends.
        let mut in_flight = self.heartbeats_in_flight.lock();
        in_flight.retain(|_, send: &mut tokio::task::JoinHandle<()>| !send.is_finished());
        for (id, addr) in peers {
            if in_flight.contains_key(&id) {
                continue;
            }
            let Ok(mut client) = self.peers().client(&addr) else { continue };
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(election_timeout / 2);
            let (removed_by, removed_first) = (self.removed_by.clone(), self.removed_first_ms.clone());
            let send = self.tasks.spawn(async move {
                let Ok(ack) = client.node_heartbeat(request).await else { return };
                if ack.into_inner().removed {
                    // Believed once said twice, far enough apart.
                    let now = super::takeover::monotonic_ms().max(1);
                    let first = match removed_first.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => now,
                        Err(first) => first,
                    };
                    let confirmed = now.saturating_sub(first) >= super::shards::REMOVED_CONFIRM_MS;
                    if confirmed && removed_by.swap(id, Ordering::AcqRel) == 0 {
                        tracing::error!(
                            told_by = id,
                            "this node was removed from the cluster (the meta group's leader no longer lists it): \
                             its replicas moved to other nodes and are deleted here; it serves nothing. To bring it \
                             back, start it with an empty data dir and --join"
                        );
                    }
                }
            });
            in_flight.insert(id, send);
        }
    }
}

/// Runs hibernation rounds every `interval` until the shard set is dropped.
pub async fn run(shards: Weak<ShardSet>, interval: Duration, election_timeout: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(shards) = shards.upgrade() else { return };
        shards.hibernation_round(election_timeout);
    }
}

/// Runs until the node stops its tasks: a leaving node keeps telling its peers so until its Raft
/// groups have stopped.
pub fn start(shards: &Arc<ShardSet>, interval: Duration, election_timeout: Duration) {
    shards.tasks.spawn_until_stopped(run(Arc::downgrade(shards), interval, election_timeout));
}
