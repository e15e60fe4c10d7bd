//! Prompt failover: when a group's leader goes silent, its most up-to-date follower campaigns as
//! soon as every voter's leader lease has run out, instead of waiting for openraft's timer.
//!
//! openraft 0.9 picks the follower that campaigns first by its random timeout, not by its log,
//! and a voter refuses a candidate whose log is shorter than its own. The refused candidate has
//! then raised the term and voted for itself, so the better follower's campaign in that term is
//! refused too, and the group waits another timeout. openraft also delays a follower's next
//! campaign by twice the lease once a vote it asked for was refused for a shorter log, and keeps
//! that delay until it campaigns again, which may be long after the election that set it. In
//! the chaos run those two made failovers of 2.2-3.2 s out of the 1.2 s the timeouts promise.
//!
//! So each node heartbeat (`raft::hibernation`) also carries the last log index of each of the
//! sender's replicas, and every `raft.heartbeat_interval_ms / 3` a follower campaigns
//! (`Trigger::elect`, which skips openraft's timer) in a group where:
//!
//! - it is a voter, the membership is not joint, and it is neither leaving nor recovering;
//! - no AppendEntries reached it for one lease plus [`MARGIN`], and no node heartbeat came from
//!   the leader's node for as long (the leader of a hibernating group sends node heartbeats);
//! - it heard, within three heartbeat intervals, from enough of the other voters to make a
//!   majority with itself, each of them sent that report after the leader fell silent (so the
//!   report holds the voter's whole log), and none of them reported a longer log (ties: the
//!   lowest node id campaigns), so a voter never refuses it for its log;
//! - it has not campaigned for this group in this term yet.
//!
//! openraft's own timer stays the fallback (for instance when a peer's report is missing); it
//! fires later (`shards::openraft_election_timeouts`), so the two rarely compete.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::metrics as raft_metrics;
use super::shards::{ShardGroup, ShardSet};
use super::types::{group_of_shard, NodeId};

/// Past the lease, how long a follower waits before it campaigns: the other voters heard the
/// leader's last AppendEntries a little after this node may have.
pub const MARGIN: Duration = Duration::from_millis(50);

/// Milliseconds on a monotonic clock that starts with the process, so an instant fits an atomic.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What a follower knows about one group when it decides whether to campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Situation {
    pub me: NodeId,
    pub leader: NodeId,
    pub voters: BTreeSet<NodeId>,
    pub my_last_index: u64,
    /// The last log index each other voter reported in a fresh node heartbeat, and how long ago
    /// that heartbeat arrived (absent: not heard from lately).
    pub reported: Vec<(NodeId, u64, Duration)>,
    /// Since the last AppendEntries this replica received.
    pub since_append: Duration,
    /// Since the last node heartbeat from the leader's node (`None`: never).
    pub since_leader_heartbeat: Option<Duration>,
}

/// How long a leader must have been silent before a follower campaigns: every voter's lease
/// has run out by then.
fn quiet(lease: Duration) -> Duration {
    lease + MARGIN
}

/// Whether this follower should campaign now (see the module documentation).
pub fn should_campaign(s: &Situation, lease: Duration) -> bool {
    let quiet = quiet(lease);
    if s.leader == s.me || !s.voters.contains(&s.me) || s.since_append < quiet {
        return false;
    }
    if s.since_leader_heartbeat.is_some_and(|since| since < quiet) {
        return false;
    }
    let heard: Vec<&(NodeId, u64, Duration)> =
        s.reported.iter().filter(|(id, _, _)| *id != s.me && *id != s.leader && s.voters.contains(id)).collect();
    // A majority of the voters, this node included; the silent leader does not count.
    if (1 + heard.len()) * 2 <= s.voters.len() {
        return false;
    }
    // Only a report sent after the leader fell silent shows the voter's whole log: an older one
    // may miss the last entries it received.
    if heard.iter().any(|(_, _, age)| *age + MARGIN * 2 > s.since_append) {
        return false;
    }
    heard.iter().all(|(id, index, _)| (*index, std::cmp::Reverse(*id)) < (s.my_last_index, std::cmp::Reverse(s.me)))
}

impl ShardSet {
    /// One pass over every group this node follows: campaign where [`should_campaign`] says so.
    async fn takeover_round(&self, fresh: Duration) {
        if self.is_leaving() || self.recovering() {
            return;
        }
        let now = monotonic_ms();
        // An unchecked replica does not lead (`raft::replica_health`).
        for group in self.all_groups().filter(|g| g.health.checked()) {
            let Some((situation, term)) = self.situation(&group, now, fresh) else { continue };
            if !should_campaign(&situation, self.leader_lease) {
                continue;
            }
            if group.campaigned_term.swap(term, Ordering::AcqRel) == term {
                continue;
            }
            tracing::info!(
                shard = group.shard,
                silent_leader = situation.leader,
                silent_ms = situation.since_append.as_millis() as u64,
                last_index = situation.my_last_index,
                "leader silent past every lease; campaigning"
            );
            raft_metrics::PROMPT_CAMPAIGNS.inc();
            if let Err(error) = group.raft.trigger().elect().await {
                tracing::warn!(shard = group.shard, %error, "could not campaign");
            }
        }
    }

    /// What this node knows about `group`, and its current term; `None` when it knows no leader,
    /// the membership is joint, or AppendEntries still arrive (the common case, decided on an
    /// atomic before anything else is read).
    fn situation(&self, group: &ShardGroup, now_ms: u64, fresh: Duration) -> Option<(Situation, u64)> {
        let since_append = Duration::from_millis(now_ms.saturating_sub(group.last_append_ms.load(Ordering::Acquire)));
        if since_append < quiet(self.leader_lease) {
            return None;
        }
        let (leader, voters, my_last_index, term) = {
            let metrics = group.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            if membership.get_joint_config().len() != 1 {
                return None;
            }
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            (metrics.current_leader?, voters, metrics.last_log_index.unwrap_or(0), metrics.current_term)
        };
        let group_id = group_of_shard(group.shard);
        let reported = voters
            .iter()
            .filter(|id| **id != self.node_id && **id != leader)
            .filter_map(|id| self.liveness.reported_index(*id, group_id, fresh).map(|(index, age)| (*id, index, age)))
            .collect();
        let situation = Situation {
            me: self.node_id,
            leader,
            voters,
            my_last_index,
            reported,
            since_append,
            since_leader_heartbeat: self.liveness.since_heard(leader),
        };
        Some((situation, term))
    }
}

/// Runs takeover rounds every `heartbeat / 3` until the shard set is dropped.
pub async fn run(shards: Weak<ShardSet>, heartbeat: Duration) {
    let mut ticker = tokio::time::interval((heartbeat / 3).max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(shards) = shards.upgrade() else { return };
        shards.takeover_round(heartbeat * 3).await;
    }
}

pub fn start(shards: &Arc<ShardSet>, heartbeat: Duration) {
    shards.tasks.spawn_until_stopped(run(Arc::downgrade(shards), heartbeat));
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(600);
    const MS_100: Duration = Duration::from_millis(100);

    fn situation() -> Situation {
        Situation {
            me: 2,
            leader: 1,
            voters: [1, 2, 3].into(),
            my_last_index: 100,
            reported: vec![(3, 100, MS_100)],
            since_append: Duration::from_millis(700),
            since_leader_heartbeat: Some(Duration::from_millis(700)),
        }
    }

    #[test]
    fn the_longest_log_campaigns_once_every_lease_ran_out() {
        assert!(should_campaign(&situation(), LEASE));
        // Node 3 has the same log and a higher id: it leaves the campaign to node 2.
        let three = Situation { me: 3, reported: vec![(2, 100, MS_100)], ..situation() };
        assert!(!should_campaign(&three, LEASE));
        // A longer log wins whatever the ids.
        let longer = Situation { me: 3, my_last_index: 101, reported: vec![(2, 100, MS_100)], ..situation() };
        assert!(should_campaign(&longer, LEASE));
        assert!(!should_campaign(&Situation { reported: vec![(3, 101, MS_100)], ..situation() }, LEASE));
    }

    #[test]
    fn a_live_leader_or_a_running_lease_stops_the_campaign() {
        let within_lease = Duration::from_millis(640);
        assert!(!should_campaign(&Situation { since_append: within_lease, ..situation() }, LEASE));
        // A hibernating group: no AppendEntries, but its leader's node heartbeats go on.
        let hibernating = Situation { since_append: Duration::from_secs(60), ..situation() };
        assert!(!should_campaign(&Situation { since_leader_heartbeat: Some(within_lease), ..hibernating }, LEASE));
        // A leader never heard from at all is silent.
        assert!(should_campaign(&Situation { since_leader_heartbeat: None, ..situation() }, LEASE));
    }

    #[test]
    fn a_report_older_than_the_silence_does_not_count() {
        // Node 3's report left it before the leader's last entries: it may have more now.
        let stale = Situation { reported: vec![(3, 100, Duration::from_millis(650))], ..situation() };
        assert!(!should_campaign(&stale, LEASE));
        let sent_after = Situation { reported: vec![(3, 100, Duration::from_millis(550))], ..situation() };
        assert!(should_campaign(&sent_after, LEASE));
    }

    #[test]
    fn an_isolated_follower_a_learner_or_the_leader_does_not_campaign() {
        // Nobody else heard: this node alone is no majority of three.
        assert!(!should_campaign(&Situation { reported: vec![], ..situation() }, LEASE));
        assert!(!should_campaign(&Situation { voters: [1, 3, 4].into(), ..situation() }, LEASE));
        assert!(!should_campaign(&Situation { leader: 2, ..situation() }, LEASE));
        // Five voters: with the leader silent, node 2 needs two of the other three.
        let five = Situation { voters: [1, 2, 3, 4, 5].into(), ..situation() };
        assert!(!should_campaign(&five, LEASE));
        assert!(should_campaign(&Situation { reported: vec![(3, 99, MS_100), (4, 100, MS_100)], ..five }, LEASE));
        // Reports from the silent leader or a non-voter do not count towards the majority.
        assert!(!should_campaign(
            &Situation { reported: vec![(1, 100, MS_100), (9, 5, MS_100)], ..situation() },
            LEASE
        ));
    }
}
