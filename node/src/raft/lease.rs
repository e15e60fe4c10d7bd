//! A group leader's read lease: while every voter has recently accepted this leader's
//! AppendEntries, no other node can be elected, so the leader answers a linearizable read's
//! read index from its own log without a heartbeat round to a quorum (the Raft thesis, §6.4.1,
//! "leases"; TiKV's and CockroachDB's lease reads).
//!
//! What makes it hold, with openraft 0.9 and this node's settings:
//!
//! - A follower that accepts an AppendEntries of the current leader (a success or a log
//!   conflict: either way it took the leader's vote) refuses every candidate for openraft's
//!   lease (its `ShardSet::leader_lease`, half of its `raft.election_timeout_max_ms`) from when
//!   it received it, and campaigns itself only after a longer silence (`raft::takeover` one
//!   lease and 50 ms later, openraft's timer later still). A restarted node waits as long from
//!   its start. Each answer carries that promise, the follower's own lease (`lease_ms`), so
//!   nodes whose timeouts differ (a rolling change of them) still agree; an answer without one
//!   (an older node) counts for nothing.
//! - So when every voter accepted an AppendEntries this leader *sent* at `t` or later (sent
//!   before it was received), no candidate can win without this leader's own vote before `t`
//!   plus the smallest of those promises. The read lease is half of each promise: the other
//!   half is the margin for scheduling and clocks.
//! - The leader's own vote is the one gap: openraft 0.9 lets a leader that has led for longer
//!   than one lease vote for an up-to-date candidate of a higher term. Every vote request this
//!   node receives for the group first raises the group's *fence* to the candidate's term
//!   ([`LeaseClock::fence`]), and acknowledgements count only for a leader term above the
//!   fence, so from then on this leader's reads take the heartbeat round again. A read that
//!   checked its lease before the fence linearizes before the vote, hence before any write of
//!   a next leader.
//! - Hand-overs this node starts close the group's gate first (`raft::handoff`), and a lease
//!   read holds the gate open while it checks, as heartbeat rounds do. The hand-over also
//!   fences its own term before it asks a follower to campaign: a follower that campaigns no
//!   longer refuses other candidates, and a Campaign request whose answer was lost may still
//!   have started one.
//!
//! All times are from the boot-time clock ([`now`], `CLOCK_BOOTTIME`), which keeps counting
//! while the host is suspended, where the monotonic clock stops: a leader whose host slept for
//! longer than a lease finds its lease run out when it wakes.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;

use super::types::NodeId;

/// openraft's vote of a leader: its term and node, and whether a quorum granted it.
pub type Vote = openraft::Vote<NodeId>;

/// The time since boot, suspended time included (`CLOCK_BOOTTIME`): what lease times are
/// measured in.
pub fn now() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0))
}

/// The read lease of one group on this node (see the module documentation).
#[derive(Default)]
pub struct LeaseClock {
    state: Mutex<LeaseState>,
}

#[derive(Default)]
struct LeaseState {
    /// The leader vote the acknowledgements below are for.
    vote: Option<Vote>,
    /// Per follower: until when its newest acceptance under `vote` keeps the lease (the send
    /// time plus half the lease the follower promised), in [`now`]'s time.
    acked: BTreeMap<NodeId, Duration>,
    /// The highest term a candidate asked this node's vote for: acknowledgements count only for
    /// a leader term above it.
    fence: u64,
}

impl LeaseClock {
    /// `target` accepted an AppendEntries sent at `sent` (in [`now`]'s time) under `vote` (a
    /// success, a partial success or a log conflict), promising to refuse other candidates for
    /// `promise` after it received it. Acknowledgements of an older vote, of an uncommitted one,
    /// of a term at or below the fence, or without a promise count for nothing.
    pub fn acked(&self, vote: &Vote, target: NodeId, sent: Duration, promise: Duration) {
        if !vote.committed || promise.is_zero() {
            return;
        }
        let until = sent.saturating_add(promise / 2);
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
        let newest = state.acked.entry(target).or_insert(until);
        *newest = (*newest).max(until);
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

    /// Whether this node, `me`, leading under `vote`, holds the read lease at `now` (in
    /// [`now`]'s time): it is one of `voters`, and every other voter accepted an AppendEntries
    /// of this vote that was sent less than half its promise before `now`. One pass over the
    /// voters, nothing collected: it runs on every lease read.
    pub fn holds(&self, vote: &Vote, me: NodeId, voters: impl IntoIterator<Item = NodeId>, now: Duration) -> bool {
        if !vote.committed || vote.leader_id.node_id != me {
            return false;
        }
        let state = self.state.lock();
        if state.vote.as_ref() != Some(vote) || vote.leader_id.term <= state.fence {
            return false;
        }
        let mut a_voter = false;
        for voter in voters {
            if voter == me {
                a_voter = true;
            } else if !state.acked.get(&voter).is_some_and(|&until| now < until) {
                return false;
            }
        }
        a_voter
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use std::collections::BTreeSet;

    use super::*;

    fn vote(term: u64, node: NodeId) -> Vote {
        let mut vote = Vote::new(term, node);
        vote.commit();
        vote
    }

    /// What the followers promise: openraft's lease of 600 ms, so a read lease of 300 ms.
    const PROMISE: Duration = Duration::from_millis(600);

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn the_boot_time_clock_moves_forward() {
        let (a, b) = (now(), now());
        assert!(a > Duration::ZERO && b >= a);
    }

    #[test]
    fn every_voter_must_have_acknowledged_recently() {
        let clock = LeaseClock::default();
        let (v, t) = (vote(3, 1), ms(10_000));
        assert!(!clock.holds(&v, 1, voters(&[1, 2, 3]), t), "nothing acknowledged");
        clock.acked(&v, 2, t, PROMISE);
        assert!(!clock.holds(&v, 1, voters(&[1, 2, 3]), t), "a quorum is not enough: node 3 may campaign");
        clock.acked(&v, 3, t - ms(100), PROMISE);
        assert!(clock.holds(&v, 1, voters(&[1, 2, 3]), t));
        assert!(clock.holds(&v, 1, voters(&[1, 2, 3]), t + ms(199)));
        assert!(!clock.holds(&v, 1, voters(&[1, 2, 3]), t + ms(200)), "node 3's ran out (half its promise)");
        assert!(!clock.holds(&v, 2, voters(&[1, 2, 3]), t), "only the vote's leader holds it");
        assert!(!clock.holds(&v, 1, voters(&[2, 3, 4]), t), "a leader that is not a voter");
        assert!(!clock.holds(&v, 1, voters(&[1, 2, 3, 4]), t), "a voter that never answered");
        assert!(!clock.holds(&Vote::new(3, 1), 1, voters(&[1, 2, 3]), t), "a candidate holds none");
    }

    #[test]
    fn each_follower_counts_with_its_own_promise() {
        let clock = LeaseClock::default();
        let (v, t) = (vote(1, 1), ms(10_000));
        // Node 3 runs with shorter timeouts (a rolling change): its promise bounds the lease.
        clock.acked(&v, 2, t, PROMISE);
        clock.acked(&v, 3, t, ms(200));
        assert!(clock.holds(&v, 1, voters(&[1, 2, 3]), t + ms(99)));
        assert!(!clock.holds(&v, 1, voters(&[1, 2, 3]), t + ms(100)));
        // An answer without a promise (an older node) counts for nothing.
        let older = LeaseClock::default();
        older.acked(&v, 2, t, PROMISE);
        older.acked(&v, 3, t, Duration::ZERO);
        assert!(!older.holds(&v, 1, voters(&[1, 2, 3]), t));
    }

    #[test]
    fn an_older_acknowledgement_never_moves_the_time_back() {
        let clock = LeaseClock::default();
        let (v, t) = (vote(1, 1), ms(10_000));
        clock.acked(&v, 2, t, PROMISE);
        clock.acked(&v, 2, t - ms(1_000), PROMISE);
        assert!(clock.holds(&v, 1, voters(&[1, 2]), t));
    }

    #[test]
    fn a_new_term_starts_afresh_and_an_old_one_counts_for_nothing() {
        let clock = LeaseClock::default();
        let t = ms(10_000);
        clock.acked(&vote(1, 1), 2, t, PROMISE);
        clock.acked(&vote(2, 1), 3, t, PROMISE);
        assert!(!clock.holds(&vote(2, 1), 1, voters(&[1, 2, 3]), t), "node 2's answer was for term 1");
        clock.acked(&vote(1, 1), 2, t, PROMISE);
        assert!(!clock.holds(&vote(2, 1), 1, voters(&[1, 2, 3]), t), "a late answer of term 1");
        clock.acked(&vote(2, 1), 2, t, PROMISE);
        assert!(clock.holds(&vote(2, 1), 1, voters(&[1, 2, 3]), t));
    }

    #[test]
    fn a_vote_request_ends_the_lease_of_its_term_and_below() {
        let clock = LeaseClock::default();
        let (v, t) = (vote(4, 1), ms(10_000));
        clock.acked(&v, 2, t, PROMISE);
        clock.acked(&v, 3, t, PROMISE);
        assert!(clock.holds(&v, 1, voters(&[1, 2, 3]), t));
        clock.fence(5);
        assert!(!clock.holds(&v, 1, voters(&[1, 2, 3]), t));
        // Answers to AppendEntries sent before the vote request arrive later: still nothing.
        clock.acked(&v, 2, t, PROMISE);
        clock.acked(&v, 3, t, PROMISE);
        assert!(!clock.holds(&v, 1, voters(&[1, 2, 3]), t));
        // Elected again in a later term: the lease comes back with its answers.
        let later = vote(6, 1);
        clock.acked(&later, 2, t, PROMISE);
        clock.acked(&later, 3, t, PROMISE);
        assert!(clock.holds(&later, 1, voters(&[1, 2, 3]), t));
    }

    proptest! {
        /// Whatever answers, vote requests and terms arrive in whatever order, the lease holds
        /// only when every other voter answered under the asked vote less than half its
        /// promise ago, and no vote request of that term or above came.
        #[test]
        fn the_lease_holds_only_when_its_rule_does(
            events in proptest::collection::vec((0u8..3, 1u64..5, 2u64..5, 0u64..600, 0u64..4), 1..40),
            asked_term in 1u64..5,
        ) {
            let clock = LeaseClock::default();
            let now = ms(10_600);
            let mut until: BTreeMap<(u64, NodeId), Duration> = BTreeMap::new();
            let mut fence = 0u64;
            let mut max_term_seen = 0u64;
            for (kind, term, target, at, promise) in events {
                let (sent, promise) = (ms(10_000 + at), ms(promise * 300));
                if kind == 0 {
                    fence = fence.max(term);
                    clock.fence(term);
                } else {
                    clock.acked(&vote(term, 1), target, sent, promise);
                    if term > fence && term >= max_term_seen && !promise.is_zero() {
                        max_term_seen = term;
                        let slot = until.entry((term, target)).or_insert(sent + promise / 2);
                        *slot = (*slot).max(sent + promise / 2);
                    }
                }
            }
            let all = voters(&[1, 2, 3, 4]);
            let expected = asked_term > fence
                && asked_term == max_term_seen
                && (2..=4).all(|n| until.get(&(asked_term, n)).is_some_and(|&u| now < u));
            prop_assert_eq!(clock.holds(&vote(asked_term, 1), 1, all, now), expected);
        }
    }
}
