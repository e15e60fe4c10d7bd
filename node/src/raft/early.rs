//! Early replication: a shard leader sends its new entries to every follower that is caught up
//! as it appends them, so that the followers' writes and fsyncs overlap the leader's own.
//!
//! openraft 0.9 awaits the leader's append (its fsync, through the group committer) before it
//! hands the entries to the group's replication tasks, so a write pays the leader's fsync and
//! then a follower's, in series (`docs/performance.md`, "where one write's time goes"). Raft
//! does not ask for that order: a leader may send an entry before its own copy is durable, since
//! it counts its own copy towards the quorum only once it is.
//!
//! So the log store hands each append of the leader to [`EarlyReplication::appended`], which
//! sends, on the same per-peer batcher as openraft's AppendEntries, the AppendEntries openraft
//! would send next to each follower that is idle and has accepted everything before the new
//! entries: the same vote (the one openraft last sent that follower, which must be the leader
//! that made the entries), the entries, and the last commit openraft sent. openraft is not
//! told: its own AppendEntries follow as before, and the follower, which has the entries by
//! then, answers them without writing anything (openraft skips entries it already holds). The
//! leader counts a follower's copy only through that answer, so the quorum and the commit are
//! decided exactly as before, and the early message's answer is only counted in a metric.
//!
//! Why an early message is always safe: it is an AppendEntries the leader could have sent at that
//! moment (its vote, entries of its own log right after an entry of its log, a commit it has
//! announced), and a follower treats it like any other: it refuses it under a newer vote, and on
//! a log that does not match it drops only entries the leader's log does not have, which no
//! quorum counted. It renews no read lease (`raft::lease` counts only openraft's own messages).
//!
//! Only small appends go early ([`EARLY_MAX_BYTES`]): they are the ones whose latency the
//! fsyncs in series dominate, and a large batch would cost its copy and transfer twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use openraft::Vote;
use parking_lot::Mutex;
use stemedb_proto::raft as pb;

use super::metrics as raft_metrics;
use super::network::PeerBatcher;
use super::types::{Entry, GroupId, LogId, NodeId};
use super::wire;

/// Appends larger than this (in stored bytes) are left to openraft's replication.
pub const EARLY_MAX_BYTES: usize = 64 << 10;

/// A follower whose last answer to openraft is older than this gets nothing early: it may have
/// left the group, or the group hibernated (openraft's next message will say where it stands).
const FRESH: Duration = Duration::from_secs(1);

/// What openraft last sent one follower, and where the follower stood after it.
struct Target {
    batcher: PeerBatcher,
    /// The vote of openraft's last AppendEntries to it.
    vote: Vote<NodeId>,
    /// The commit that message announced.
    leader_commit: Option<LogId>,
    /// openraft's AppendEntries with entries to it not answered yet (heartbeats and commit
    /// updates, which carry none, change nothing an early message depends on).
    in_flight: u32,
    /// The last entry it holds, as its newest answers said (`None` after a refusal or a
    /// failure).
    matched: Option<LogId>,
    answered: Instant,
    /// The deadline openraft gave its last message.
    timeout: Duration,
}

/// Early replication of one group (one per group, shared by its log store and its transport).
pub struct EarlyReplication {
    group: GroupId,
    enabled: bool,
    targets: Mutex<HashMap<NodeId, Target>>,
}

/// An early AppendEntries ready to go to one follower.
struct Send {
    batcher: PeerBatcher,
    message: pb::AppendRequest,
    timeout: Duration,
}

impl EarlyReplication {
    /// `enabled` is `raft.early_replication`.
    pub fn new(group: GroupId, enabled: bool) -> EarlyReplication {
        EarlyReplication { group, enabled, targets: Mutex::new(HashMap::new()) }
    }

    /// openraft is sending `target` an AppendEntries under `vote` announcing `leader_commit`,
    /// with entries or not (`with_entries`).
    pub(crate) fn sending(
        &self,
        target: NodeId,
        batcher: &PeerBatcher,
        vote: &Vote<NodeId>,
        leader_commit: Option<LogId>,
        with_entries: bool,
        timeout: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let mut targets = self.targets.lock();
        let entry = targets.entry(target).or_insert_with(|| Target {
            batcher: batcher.clone(),
            vote: *vote,
            leader_commit,
            in_flight: 0,
            matched: None,
            answered: Instant::now(),
            timeout,
        });
        if entry.vote != *vote {
            // A new leadership: nothing heard under the old one says where it stands now.
            entry.matched = None;
        }
        entry.batcher = batcher.clone();
        entry.vote = *vote;
        entry.leader_commit = leader_commit;
        entry.timeout = timeout;
        if with_entries {
            entry.in_flight = entry.in_flight.saturating_add(1);
        }
    }

    /// `target` answered one of openraft's AppendEntries sent under `vote`, `with_entries` or not
    /// (or the call failed): `Some(matched)` when it accepted, with the last entry it holds since.
    pub(crate) fn answered(
        &self,
        target: NodeId,
        vote: &Vote<NodeId>,
        with_entries: bool,
        accepted: Option<Option<LogId>>,
    ) {
        if !self.enabled {
            return;
        }
        let mut targets = self.targets.lock();
        if let Some(entry) = targets.get_mut(&target) {
            if with_entries {
                entry.in_flight = entry.in_flight.saturating_sub(1);
            }
            entry.answered = Instant::now();
            // An answer to a message of an earlier leadership says nothing about where the
            // follower stands under this one (its log may have changed since).
            if entry.vote != *vote {
                return;
            }
            // A late answer to an earlier message must not move it back; a refusal or a failure
            // says nothing sure about where it stands.
            entry.matched = match accepted {
                Some(matched) => entry.matched.max(matched),
                None => None,
            };
        }
    }

    /// The log store appended `entries` (`bytes` of them stored) right after `prev`: sends them
    /// early to every follower that qualifies. Never waits: the sends run on their own tasks.
    pub(crate) fn appended(&self, prev: Option<LogId>, entries: &[Entry], bytes: usize) {
        let sends = self.early_sends(prev, entries, bytes, Instant::now());
        for Send { batcher, message, timeout } in sends {
            tokio::spawn(async move {
                let outcome = match batcher.append(message, timeout).await.map(|reply| reply.result) {
                    Ok(Some(pb::append_reply::Result::Success(_))) => "accepted",
                    Ok(_) => "refused",
                    Err(_) => "failed",
                };
                raft_metrics::EARLY_APPENDS.with_label_values(&[outcome]).inc();
            });
        }
    }

    /// The messages [`EarlyReplication::appended`] sends, decided at `now`.
    fn early_sends(&self, prev: Option<LogId>, entries: &[Entry], bytes: usize, now: Instant) -> Vec<Send> {
        let (Some(prev), Some(first)) = (prev, entries.first()) else { return Vec::new() };
        if !self.enabled || bytes > EARLY_MAX_BYTES || prev.index.checked_add(1) != Some(first.log_id.index) {
            return Vec::new();
        }
        let leader = first.log_id.leader_id;
        // All of them made by one leader: a follower can append entries of several terms at once.
        if entries.iter().any(|entry| entry.log_id.leader_id != leader) {
            return Vec::new();
        }
        let ready: Vec<(PeerBatcher, Vote<NodeId>, Option<LogId>, Duration)> = {
            let targets = self.targets.lock();
            targets
                .values()
                .filter(|t| {
                    t.in_flight == 0
                        && t.matched == Some(prev)
                        && t.vote.is_committed()
                        && *t.vote.leader_id() == leader
                        && now.saturating_duration_since(t.answered) < FRESH
                })
                .map(|t| (t.batcher.clone(), t.vote, t.leader_commit, t.timeout))
                .collect()
        };
        if ready.is_empty() {
            return Vec::new();
        }
        let entries: Vec<pb::Entry> = entries.iter().map(wire::entry_to_proto).collect();
        let prev = Some(wire::log_id_to_proto(&prev));
        ready
            .into_iter()
            .map(|(batcher, vote, leader_commit, timeout)| Send {
                batcher,
                message: pb::AppendRequest {
                    group_id: self.group,
                    vote: Some(wire::vote_to_proto(&vote)),
                    prev_log_id: prev,
                    entries: entries.clone(),
                    leader_commit: leader_commit.as_ref().map(wire::log_id_to_proto),
                },
                timeout,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
        openraft::LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn entry(term: u64, node: NodeId, index: u64) -> Entry {
        Entry { log_id: log_id(term, node, index), payload: EntryPayload::Blank }
    }

    fn batcher() -> PeerBatcher {
        PeerBatcher::detached()
    }

    /// A group whose leader (node 1, term 3) last heard follower 2 accept through index 10.
    fn caught_up() -> EarlyReplication {
        let early = EarlyReplication::new(5, true);
        let vote = Vote::new_committed(3, 1);
        early.sending(2, &batcher(), &vote, Some(log_id(3, 1, 9)), true, Duration::from_secs(1));
        early.answered(2, &vote, true, Some(Some(log_id(3, 1, 10))));
        early
    }

    #[tokio::test]
    async fn a_caught_up_follower_gets_the_entries_openraft_would_send_next() {
        let early = caught_up();
        let sends = early.early_sends(Some(log_id(3, 1, 10)), &[entry(3, 1, 11)], 100, Instant::now());
        assert_eq!(sends.len(), 1);
        let message = &sends[0].message;
        assert_eq!(message.group_id, 5);
        let request = wire::replication::append_from_proto(message.clone()).expect("decodes");
        assert_eq!(request.vote, Vote::new_committed(3, 1));
        assert_eq!(request.prev_log_id, Some(log_id(3, 1, 10)));
        assert_eq!(request.leader_commit, Some(log_id(3, 1, 9)));
        assert_eq!(request.entries.len(), 1);
        assert_eq!(request.entries[0].log_id, log_id(3, 1, 11));
    }

    #[tokio::test]
    async fn nothing_goes_early_unless_the_follower_is_idle_and_right_behind_the_entries() {
        let now = Instant::now();
        let next = [entry(3, 1, 11)];
        // Behind: it holds index 9 only.
        let early = EarlyReplication::new(5, true);
        early.sending(2, &batcher(), &Vote::new_committed(3, 1), None, true, Duration::from_secs(1));
        early.answered(2, &Vote::new_committed(3, 1), true, Some(Some(log_id(3, 1, 9))));
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &next, 100, now).is_empty());
        // One of openraft's messages still in flight.
        let early = caught_up();
        early.sending(2, &batcher(), &Vote::new_committed(3, 1), None, true, Duration::from_secs(1));
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &next, 100, now).is_empty());
        // Refused, or the call failed.
        let early = caught_up();
        early.sending(2, &batcher(), &Vote::new_committed(3, 1), None, true, Duration::from_secs(1));
        early.answered(2, &Vote::new_committed(3, 1), true, None);
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &next, 100, now).is_empty());
        // Too large, no known predecessor, or nothing to send.
        let early = caught_up();
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &next, EARLY_MAX_BYTES + 1, now).is_empty());
        assert!(early.early_sends(None, &next, 100, now).is_empty());
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &[], 0, now).is_empty());
        // Entries that do not follow the predecessor given.
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &[entry(3, 1, 12)], 100, now).is_empty());
        // Its last answer is too old.
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &next, 100, Instant::now() + FRESH).is_empty());
        // Turned off.
        let early = EarlyReplication::new(5, false);
        early.sending(2, &batcher(), &Vote::new_committed(3, 1), None, true, Duration::from_secs(1));
        early.answered(2, &Vote::new_committed(3, 1), true, Some(Some(log_id(3, 1, 10))));
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &next, 100, now).is_empty());
    }

    #[tokio::test]
    async fn heartbeats_in_flight_and_late_answers_change_nothing() {
        let now = Instant::now();
        let next = [entry(3, 1, 11)];
        let early = caught_up();
        // A heartbeat or commit update (no entries) in flight: the follower's log stays as it is.
        early.sending(2, &batcher(), &Vote::new_committed(3, 1), Some(log_id(3, 1, 10)), false, Duration::from_secs(1));
        assert_eq!(early.early_sends(Some(log_id(3, 1, 10)), &next, 100, now).len(), 1);
        // Its answer, naming an older entry, arrives after a newer one: the newer stands.
        early.answered(2, &Vote::new_committed(3, 1), false, Some(Some(log_id(3, 1, 8))));
        assert_eq!(early.early_sends(Some(log_id(3, 1, 10)), &next, 100, now).len(), 1);
        // A refusal or a failure of any message forgets it.
        early.sending(2, &batcher(), &Vote::new_committed(3, 1), None, false, Duration::from_secs(1));
        early.answered(2, &Vote::new_committed(3, 1), false, None);
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &next, 100, now).is_empty());
    }

    #[tokio::test]
    async fn only_the_leader_that_made_the_entries_sends_them_under_its_own_vote() {
        let now = Instant::now();
        let early = caught_up();
        // Entries of another leader (this node is a follower appending what it was sent).
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &[entry(3, 2, 11)], 100, now).is_empty());
        // Entries of two leaders at once (a follower appending what it was sent).
        let mixed = [entry(3, 1, 11), entry(4, 2, 12)];
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &mixed, 100, now).is_empty());
        // Entries of a later term of this node: openraft has not sent under that vote yet.
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &[entry(4, 1, 11)], 100, now).is_empty());
        // A vote not committed (a candidate's) never carries entries.
        let early = EarlyReplication::new(5, true);
        early.sending(2, &batcher(), &Vote::new(3, 1), None, true, Duration::from_secs(1));
        early.answered(2, &Vote::new(3, 1), true, Some(Some(log_id(3, 1, 10))));
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &[entry(3, 1, 11)], 100, now).is_empty());
    }

    /// An answer to a message of the previous leadership arrives after openraft's first message
    /// of the new one: it does not say where the follower stands now.
    #[tokio::test]
    async fn a_late_answer_of_an_earlier_leadership_matches_nothing() {
        let early = caught_up();
        early.sending(2, &batcher(), &Vote::new_committed(4, 1), Some(log_id(3, 1, 10)), true, Duration::from_secs(1));
        early.answered(2, &Vote::new_committed(3, 1), true, Some(Some(log_id(3, 1, 10))));
        assert!(early.early_sends(Some(log_id(3, 1, 10)), &[entry(4, 1, 11)], 100, Instant::now()).is_empty());
        // openraft's own answer under the new vote does.
        early.answered(2, &Vote::new_committed(4, 1), true, Some(Some(log_id(3, 1, 10))));
        assert_eq!(early.early_sends(Some(log_id(3, 1, 10)), &[entry(4, 1, 11)], 100, Instant::now()).len(), 1);
    }

    #[tokio::test]
    async fn a_new_term_sends_once_openraft_has_sent_under_it() {
        let early = caught_up();
        // This node leads again in term 4; openraft's first message under it was accepted.
        early.sending(2, &batcher(), &Vote::new_committed(4, 1), Some(log_id(3, 1, 10)), true, Duration::from_secs(1));
        early.answered(2, &Vote::new_committed(4, 1), true, Some(Some(log_id(3, 1, 10))));
        let sends = early.early_sends(Some(log_id(3, 1, 10)), &[entry(4, 1, 11)], 100, Instant::now());
        assert_eq!(sends.len(), 1);
        let request = wire::replication::append_from_proto(sends[0].message.clone()).expect("decodes");
        assert_eq!(request.vote, Vote::new_committed(4, 1));
    }
}
