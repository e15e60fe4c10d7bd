//! The request path over the shard groups: proposing a command to a shard's leader wherever it
//! is (exactly-once forwarding with idempotency tokens, `outcome_unknown` when a copy may have
//! landed), changes of the cluster metadata and policy through the meta group, reads of a
//! shard on a replica here or elsewhere, and write coalescing (`batch`). It drives the groups
//! of `raft` (leaders, read barriers, local proposals) and knows nothing of HTTP or gRPC
//! servers: `api`, `rpc`, `admin` and `cluster` call it.
//!
//! The path is a trait on [`ShardSet`], so every caller names it (`use crate::coordinator::
//! Coordinator`) and the layering test sees the dependency; `raft` never calls it.

pub mod batch;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::meta::policy::{PolicyCommand, PolicyError, PolicyOutcome};
use crate::meta::{MetaCommand, MetaError, META_SHARD};
use crate::model::NodeId;
use crate::raft::forward::ReplicaRead;
use crate::raft::metrics as raft_metrics;
use crate::raft::shards::RETRY_PAUSE;
use crate::raft::{ShardGroup, ShardSet};
use crate::shard::command::{ShardCommand, ShardResponse};
use crate::shard::reader::{ShardRead, ShardReadResult};
use crate::shard::ConsensusError;

/// Proposals and reads of the shard groups, from any node. One implementation: [`ShardSet`]
/// (a trait so callers import it by name; called on the concrete type, so its futures are
/// `Send` wherever the set is).
#[allow(async_fn_in_trait)]
pub trait Coordinator {
    /// Proposes `command` to `shard` and returns what applying it produced: on this node when it
    /// leads the shard, else forwarded to the leader.
    ///
    /// A forwarded command carries an idempotency token this node generates
    /// ([`ShardCommand::once`]), so it is retried freely: after a transport failure (which may
    /// have come after the leader received it), after a "not the leader" answer, when this
    /// node sees the leader change while an attempt is in flight (a paused or isolated leader
    /// never answers: the request moves to the new leader at once), and when an attempt passes
    /// its own deadline. Every copy applies once. If no copy is confirmed by the deadline and
    /// one may have arrived, the answer is [`ConsensusError::OutcomeUnknown`], never a silent
    /// second write.
    async fn propose(
        &self,
        shard: u16,
        command: ShardCommand,
        timeout: Duration,
    ) -> Result<ShardResponse, ConsensusError>;

    /// Proposes a change of the cluster metadata to the meta group.
    async fn propose_meta(
        &self,
        command: MetaCommand,
        timeout: Duration,
    ) -> Result<Result<(), MetaError>, ConsensusError>;

    /// Proposes a change of the cluster metadata on this node only, which must lead the meta
    /// group (the placement driver: a deposed leader's change must not land via forwarding).
    async fn propose_meta_local(
        &self,
        command: MetaCommand,
        timeout: Duration,
    ) -> Result<Result<(), MetaError>, ConsensusError>;

    /// Proposes a change of the cluster-wide policy (authority, breakers) to the meta group.
    async fn propose_policy(
        &self,
        command: PolicyCommand,
        timeout: Duration,
    ) -> Result<Result<PolicyOutcome, PolicyError>, ConsensusError>;

    /// Reads a shard: on the local replica when this node hosts it (after a read barrier when
    /// `linearizable`), else on a replica elsewhere.
    async fn read(
        &self,
        shard: u16,
        read: ShardRead,
        linearizable: bool,
        timeout: Duration,
    ) -> Result<ShardReadResult, ConsensusError>;

    /// Reads this node's replica of `shard` (used for forwarded reads: never forwarded again).
    async fn read_local(
        &self,
        shard: u16,
        read: ShardRead,
        linearizable: bool,
        timeout: Duration,
    ) -> Result<ShardReadResult, ConsensusError>;
}

impl Coordinator for ShardSet {
    async fn propose(
        &self,
        shard: u16,
        command: ShardCommand,
        timeout: Duration,
    ) -> Result<ShardResponse, ConsensusError> {
        let group = self.group(shard)?;
        group.writes.fetch_add(1, Ordering::Relaxed);
        if command.grows_data() {
            self.check_disk_floor(shard)?;
        }
        let deadline = Instant::now() + timeout;
        let response = if !self.hosts(&group) {
            let command = command.once();
            match self.ask_replicas(&group, &command, deadline).await {
                Err(error) if may_have_arrived(&error) => {
                    Err(ConsensusError::OutcomeUnknown { shard, timeout_ms: timeout.as_millis() as u64 })
                }
                other => other,
            }
        } else {
            propose_hosted(self, &group, command, deadline, timeout).await
        };
        settle(shard, response?)
    }

    async fn propose_meta(
        &self,
        command: MetaCommand,
        timeout: Duration,
    ) -> Result<Result<(), MetaError>, ConsensusError> {
        let proposed_at_us = crate::model::id::now_us();
        meta_answer(self.propose(META_SHARD, ShardCommand::Meta { proposed_at_us, command }, timeout).await?)
    }

    async fn propose_meta_local(
        &self,
        command: MetaCommand,
        timeout: Duration,
    ) -> Result<Result<(), MetaError>, ConsensusError> {
        let proposed_at_us = crate::model::id::now_us();
        let command = Arc::new(ShardCommand::Meta { proposed_at_us, command });
        meta_answer(self.propose_local(META_SHARD, command, timeout).await?)
    }

    async fn propose_policy(
        &self,
        command: PolicyCommand,
        timeout: Duration,
    ) -> Result<Result<PolicyOutcome, PolicyError>, ConsensusError> {
        let proposed_at_us = crate::model::id::now_us();
        match self.propose(META_SHARD, ShardCommand::Policy { proposed_at_us, command }, timeout).await? {
            ShardResponse::Policy(result) => Ok(result),
            other => Err(ConsensusError::Internal {
                shard: META_SHARD,
                message: format!("unexpected answer to a policy change: {other:?}"),
            }),
        }
    }

    async fn read(
        &self,
        shard: u16,
        read: ShardRead,
        linearizable: bool,
        timeout: Duration,
    ) -> Result<ShardReadResult, ConsensusError> {
        let group = self.group(shard)?;
        group.queries.fetch_add(1, Ordering::Relaxed);
        // A replica not checked since start (`raft::replica_health`) serves nothing from its own
        // state: a follower that knows its leader sends the read on, like a node that does not
        // host the shard.
        if !self.hosts(&group) || (!group.health.checked() && knows_other_leader(self, &group)) {
            let deadline = Instant::now() + timeout;
            return self.ask_replicas(&group, &ReplicaRead { read, linearizable }, deadline).await;
        }
        self.read_local(shard, read, linearizable, timeout).await
    }

    async fn read_local(
        &self,
        shard: u16,
        read: ShardRead,
        linearizable: bool,
        timeout: Duration,
    ) -> Result<ShardReadResult, ConsensusError> {
        let group = self.group(shard)?;
        if !self.hosts(&group) {
            return Err(ConsensusError::NotLeader { shard, leader: None });
        }
        if !group.health.checked() {
            // Sent on to the leader; a replica that knows none (or leads) waits for its check.
            let leader = group.raft.metrics().borrow().current_leader;
            if let Some(leader) = leader.filter(|l| *l != self.node_id) {
                return Err(ConsensusError::NotLeader { shard, leader: Some(leader) });
            }
            self.until_checked(&group, Instant::now() + timeout).await?;
        }
        if linearizable && !self.unsafe_skip_read_barrier {
            self.read_barrier(shard, timeout).await?;
        }
        // On the storage read pool: a fixed set of threads, never an async worker.
        let reader = group.reader.clone();
        let answer = crate::storage::pool::read_pool()
            .run(move || reader.execute(&read))
            .await
            .map_err(|_| ConsensusError::ReadsOverloaded { shard, queued: crate::storage::pool::READ_QUEUE })??;
        let staleness_ms = if group.raft.metrics().borrow().current_leader == Some(self.node_id) {
            0
        } else {
            crate::model::id::now_us().saturating_sub(group.reader.applied_at_us()) / 1000
        };
        Ok(ShardReadResult { answer, applied_index: group.reader.applied_index(), staleness_ms })
    }
}

/// Whether `group` has a leader that is not this node.
fn knows_other_leader(shards: &ShardSet, group: &ShardGroup) -> bool {
    group.raft.metrics().borrow().current_leader.is_some_and(|leader| leader != shards.node_id)
}

/// [`Coordinator::propose`] for a shard this node hosts: it knows the leader from its replica.
async fn propose_hosted(
    shards: &ShardSet,
    group: &ShardGroup,
    command: ShardCommand,
    deadline: Instant,
    timeout: Duration,
) -> Result<ShardResponse, ConsensusError> {
    let shard = group.shard;
    // Shared with the proposal, so a retry needs no copy of the command.
    let mut command = Some(Arc::new(command));
    // Whether some forwarded copy may have reached a leader: then the outcome is unknown
    // unless a later copy is confirmed.
    let mut maybe_delivered = false;
    let mut last_error = None;
    // A leader named by a node that no longer leads: this replica may not know it yet.
    let mut hint: Option<NodeId> = None;
    loop {
        let known = match hint.take() {
            Some(leader) => Ok(leader),
            None => shards.wait_for_leader(group, deadline).await,
        };
        let leader = match known {
            Ok(leader) => leader,
            Err(error) => {
                raft_metrics::PROPOSALS.with_label_values(&["no_quorum"]).inc();
                return Err(unconfirmed(shard, timeout, maybe_delivered, last_error.unwrap_or(error)));
            }
        };
        let Some(current) = command.take() else {
            return Err(ConsensusError::Internal { shard, message: "proposal lost".into() });
        };
        if leader == shards.node_id {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match shards.propose_local(shard, Arc::clone(&current), remaining).await {
                // Leadership moved between the check and the proposal: nothing appended, or the
                // command applies once (`ShardSet::propose_local`).
                Err(ConsensusError::NotLeader { .. } | ConsensusError::NoQuorum { .. })
                    if Instant::now() < deadline =>
                {
                    command = Some(current);
                    shards.await_leader_change(group, leader, deadline).await;
                    continue;
                }
                Err(error) if maybe_delivered => return Err(unconfirmed(shard, timeout, true, error)),
                other => return other,
            }
        }
        let current = match *current {
            ShardCommand::Once { .. } => current,
            // Not proposed here, or refused: usually the only holder by now (openraft may still
            // hold a refused entry for a moment, and then this copies it).
            _ => Arc::new(Arc::unwrap_or_clone(current).once()),
        };
        let attempt_deadline = deadline.min(Instant::now() + shards.forward_attempt_timeout);
        let attempt = shards.ask_leader(group, leader, &*current, attempt_deadline);
        let outcome = tokio::select! {
            outcome = attempt => Some(outcome),
            // The leader this attempt went to was replaced: the new one gets the same token.
            _ = shards.await_leader_change(group, leader, attempt_deadline) => None,
        };
        command = Some(current);
        match outcome {
            Some(Ok(response)) => return Ok(response),
            None => {
                maybe_delivered = true;
                raft_metrics::FORWARD_RETRIES.with_label_values(&["leader_changed"]).inc();
            }
            Some(Err(error @ (ConsensusError::NotLeader { .. } | ConsensusError::NoQuorum { .. }))) => {
                // Refused before proposing: this copy was not appended.
                raft_metrics::FORWARD_RETRIES.with_label_values(&["not_leader"]).inc();
                hint = match error {
                    ConsensusError::NotLeader { leader: Some(named), .. } if named != leader => Some(named),
                    _ => None,
                };
                last_error = Some(error);
                if hint.is_none() {
                    shards.await_leader_change(group, leader, deadline.min(Instant::now() + RETRY_PAUSE)).await;
                }
            }
            Some(Err(error)) if may_have_arrived(&error) => {
                maybe_delivered = true;
                raft_metrics::FORWARD_RETRIES.with_label_values(&["ambiguous"]).inc();
                last_error = Some(error);
                // A dead leader refuses connections at once: wait for a new leader (or a
                // short pause) rather than spin.
                shards.await_leader_change(group, leader, deadline.min(Instant::now() + RETRY_PAUSE)).await;
            }
            Some(Err(ConsensusError::ShuttingDown { .. })) if Instant::now() < deadline => {
                shards.await_leader_change(group, leader, deadline).await;
            }
            Some(Err(error)) => return Err(unconfirmed(shard, timeout, maybe_delivered, error)),
        }
        if Instant::now() >= deadline {
            let error = last_error.take().unwrap_or(ConsensusError::NoQuorum { shard });
            return Err(unconfirmed(shard, timeout, maybe_delivered, error));
        }
    }
}

/// Turns the answers that refuse a whole command into errors.
fn settle(shard: u16, response: ShardResponse) -> Result<ShardResponse, ConsensusError> {
    match response {
        ShardResponse::TokenExpired => Err(ConsensusError::OutcomeUnknown { shard, timeout_ms: 0 }),
        ShardResponse::Refused(error) => Err(ConsensusError::Refused { shard, error }),
        other => Ok(other),
    }
}

/// Whether a failed forward may still have reached the leader (and so may be applied).
fn may_have_arrived(error: &ConsensusError) -> bool {
    matches!(error, ConsensusError::LeaderUnreachable { .. } | ConsensusError::Timeout { .. })
}

/// The answer when no copy of a proposal was confirmed: `outcome_unknown` if one may have
/// arrived somewhere, else the error that ended the attempts.
fn unconfirmed(shard: u16, timeout: Duration, maybe_delivered: bool, error: ConsensusError) -> ConsensusError {
    if maybe_delivered || may_have_arrived(&error) {
        raft_metrics::PROPOSALS.with_label_values(&["outcome_unknown"]).inc();
        ConsensusError::OutcomeUnknown { shard, timeout_ms: timeout.as_millis() as u64 }
    } else {
        error
    }
}

fn meta_answer(response: ShardResponse) -> Result<Result<(), MetaError>, ConsensusError> {
    match response {
        ShardResponse::Meta(result) => Ok(result),
        other => Err(ConsensusError::Internal {
            shard: META_SHARD,
            message: format!("unexpected answer to a metadata change: {other:?}"),
        }),
    }
}
