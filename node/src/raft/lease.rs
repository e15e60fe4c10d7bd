//! A group leader's read lease: while every voter has recently accepted this leader's
//! AppendEntries, no other node can be elected, so the leader answers a linearizable read's
//! read index from its own log without a heartbeat round to a quorum (the Raft thesis, §6.4.1,
//! "leases"; TiKV's and CockroachDB's lease reads).
//!
//! What makes it hold, with openraft 0.9 and this node's settings:
//!
//! - A follower that accepts an AppendEntries of the current leader (a success or a log
//!   conflict: either way it took the leader's vote) refuses every candidate for openraft's
//!   lease (`ShardSet::leader_lease`, half of `raft.election_timeout_max_ms`) from when it
//!   received it, and campaigns itself only after a longer silence (`raft::takeover` one lease
//!   and 50 ms later, openraft's timer later still). A restarted node waits as long from its
//!   start.
//! - So when every voter accepted an AppendEntries this leader *sent* at `t` or later (sent
//!   before it was received), no candidate can win without this leader's own vote before `t`
//!   plus that lease. The read lease is half of it ([`LeaseClock::holds`]'s `duration`): the
//!   other half is the margin for scheduling and clocks.
//! - The leader's own vote is the one gap: openraft 0.9 lets a leader that has led for longer
//!   than one lease vote for an up-to-date candidate of a higher term. Every vote request this
//!   node receives for the group first raises the group's *fence* to the candidate's term
//!   ([`LeaseClock::fence`]), and acknowledgements count only for a leader term above the
//!   fence, so from then on this leader's reads take the heartbeat round again. A read that
//!   checked its lease before the fence linearizes before the vote, hence before any write of
//!   a next leader.
//! - Hand-overs this node starts close the group's gate first (`raft::handoff`), and a lease
//!   read holds the gate open while it checks, as heartbeat rounds do.
//!
//! All times are from the monotonic clock ([`Instant`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::types::NodeId;

/// openraft's vote of a leader: its term and node, and whether a quorum granted it.
pub type Vote = openraft::Vote<NodeId>;

/// The read lease of one group on this node (see the module documentation).
#[derive(Default)]
pub struct LeaseClock {
    state: Mutex<LeaseState>,
}

#[derive(Default)]
struct LeaseState {
    /// The leader vote the acknowledgements below are for.
    vote: Option<Vote>,
    /// Per follower: when the newest AppendEntries it accepted under `vote` was sent.
    acked: BTreeMap<NodeId, Instant>,
    /// The highest term a candidate asked this node's vote for: acknowledgements count only for
    /// a leader term above it.
    fence: u64,
}

impl LeaseClock {
    /// `target` accepted an AppendEntries sent at `sent` under `vote` (a success, a partial
    /// success or a log conflict). Acknowledgements of an older vote, of an uncommitted one
    /// or of a term at or below the fence count for nothing.
    pub fn acked(&self, vote: &Vote, target: NodeId, sent: Instant) {
        if !vote.committed {
            return;
        }
        let mut state = self.state.lock();
        if vote.leader_id.term <= state.fence {
            return;
        }
        match &state.vote {
            Some(current) if current == vote => {}
            Some(current) if !(vote > current) => return,
            _ => {
                state.vote = Some(vote.clone());
                state.acked.clear();
            }
        }
        let newest = state.acked.entry(target).or_insert(sent);
        *newest = (*newest).max(sent);
    }

    /// A candidate of `term` asked this node for its vote: no lease of a term at or below it
    /// holds from now on.
    pub fn fence(&self, term: u64) {
        let mut state = self.state.lock();
        state.fence = state.fence.max(term);
        if state.vote.as_ref().is_some_and(|vote| vote.leader_id.term <= state.fence) {
            state.vote = None;
            state.acked.clear();
        }
    }

    /// Whether this node, `me`, leading under `vote`, holds the read lease at `now`: every
    /// voter but itself accepted an AppendEntries of this vote that was sent within `duration`
    /// of `now`.
    pub fn holds(&self, vote: &Vote, me: NodeId, voters: &BTreeSet<NodeId>, now: Instant, duration: Duration) -> bool {
        if !vote.committed || vote.leader_id.node_id != me || !voters.contains(&me) {
            return false;
        }
        let state = self.state.lock();
        if state.vote.as_ref() != Some(vote) || vote.leader_id.term <= state.fence {
            return false;
        }
        voters
            .iter()
            .filter(|&&voter| voter != me)
            .all(|voter| state.acked.get(voter).is_some_and(|&sent| now.saturating_duration_since(sent) < duration))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn vote(term: u64, node: NodeId) -> Vote {
        let mut vote = Vote::new(term, node);
        vote.commit();
        vote
    }

    const LEASE: Duration = Duration::from_millis(300);

    fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn every_voter_must_have_acknowledged_recently() {
        let clock = LeaseClock::default();
        let (v, now) = (vote(3, 1), Instant::now());
        assert!(!clock.holds(&v, 1, &voters(&[1, 2, 3]), now, LEASE), "nothing acknowledged");
        clock.acked(&v, 2, now);
        assert!(!clock.holds(&v, 1, &voters(&[1, 2, 3]), now, LEASE), "a quorum is not enough: node 3 may campaign");
        clock.acked(&v, 3, now - Duration::from_millis(100));
        assert!(clock.holds(&v, 1, &voters(&[1, 2, 3]), now, LEASE));
        assert!(!clock.holds(&v, 1, &voters(&[1, 2, 3]), now + Duration::from_millis(200), LEASE), "node 3's ran out");
        assert!(!clock.holds(&v, 2, &voters(&[1, 2, 3]), now, LEASE), "only the vote's leader holds it");
        assert!(!clock.holds(&v, 1, &voters(&[2, 3, 4]), now, LEASE), "a leader that is not a voter");
        assert!(!clock.holds(&v, 1, &voters(&[1, 2, 3, 4]), now, LEASE), "a voter that never answered");
        let uncommitted = Vote::new(3, 1);
        assert!(!clock.holds(&uncommitted, 1, &voters(&[1, 2, 3]), now, LEASE), "a candidate holds none");
    }

    #[test]
    fn an_older_acknowledgement_never_moves_the_time_back() {
        let clock = LeaseClock::default();
        let (v, now) = (vote(1, 1), Instant::now());
        clock.acked(&v, 2, now);
        clock.acked(&v, 2, now - Duration::from_secs(1));
        assert!(clock.holds(&v, 1, &voters(&[1, 2]), now, LEASE));
    }

    #[test]
    fn a_new_term_starts_afresh_and_an_old_one_counts_for_nothing() {
        let clock = LeaseClock::default();
        let now = Instant::now();
        clock.acked(&vote(1, 1), 2, now);
        clock.acked(&vote(2, 1), 3, now);
        assert!(!clock.holds(&vote(2, 1), 1, &voters(&[1, 2, 3]), now, LEASE), "node 2's answer was for term 1");
        clock.acked(&vote(1, 1), 2, now);
        assert!(!clock.holds(&vote(2, 1), 1, &voters(&[1, 2, 3]), now, LEASE), "a late answer of term 1");
        clock.acked(&vote(2, 1), 2, now);
        assert!(clock.holds(&vote(2, 1), 1, &voters(&[1, 2, 3]), now, LEASE));
    }

    #[test]
    fn a_vote_request_ends_the_lease_of_its_term_and_below() {
        let clock = LeaseClock::default();
        let (v, now) = (vote(4, 1), Instant::now());
        clock.acked(&v, 2, now);
        clock.acked(&v, 3, now);
        assert!(clock.holds(&v, 1, &voters(&[1, 2, 3]), now, LEASE));
        clock.fence(5);
        assert!(!clock.holds(&v, 1, &voters(&[1, 2, 3]), now, LEASE));
        // Answers to AppendEntries sent before the vote request arrive later: still nothing.
        clock.acked(&v, 2, now);
        clock.acked(&v, 3, now);
        assert!(!clock.holds(&v, 1, &voters(&[1, 2, 3]), now, LEASE));
        // Elected again in a later term: the lease comes back with its answers.
        let later = vote(6, 1);
        clock.acked(&later, 2, now);
        clock.acked(&later, 3, now);
        assert!(clock.holds(&later, 1, &voters(&[1, 2, 3]), now, LEASE));
    }

    proptest! {
        /// Whatever answers, vote requests and terms arrive in whatever order, the lease holds
        /// only when every other voter answered under the asked vote, within the duration, and
        /// no vote request of that term or above came.
        #[test]
        fn the_lease_holds_only_when_its_rule_does(
            events in proptest::collection::vec((0u8..3, 1u64..5, 2u64..5, 0u64..600), 1..40),
            asked_term in 1u64..5,
        ) {
            let clock = LeaseClock::default();
            let start = Instant::now();
            let now = start + Duration::from_millis(600);
            let mut newest: BTreeMap<(u64, NodeId), Instant> = BTreeMap::new();
            let mut fence = 0u64;
            let mut max_term_seen = 0u64;
            for (kind, term, target, at) in events {
                let sent = start + Duration::from_millis(at);
                if kind == 0 {
                    fence = fence.max(term);
                    clock.fence(term);
                } else {
                    clock.acked(&vote(term, 1), target, sent);
                    if term > fence && term >= max_term_seen {
                        max_term_seen = term;
                        let slot = newest.entry((term, target)).or_insert(sent);
                        *slot = (*slot).max(sent);
                    }
                }
            }
            let all = voters(&[1, 2, 3, 4]);
            let expected = asked_term > fence
                && asked_term == max_term_seen
                && (2..=4).all(|n| newest.get(&(asked_term, n)).is_some_and(|&sent| now.saturating_duration_since(sent) < LEASE));
            prop_assert_eq!(clock.holds(&vote(asked_term, 1), 1, &all, now, LEASE), expected);
        }
    }
}
