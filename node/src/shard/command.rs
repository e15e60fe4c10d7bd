//! The commands a shard group's log holds and the answers applying them gives, and how group ids
//! map to shards. Shared by the data shards and the meta group (whose commands it carries); no
//! openraft here: `raft::types` declares the type config over these.

use serde::{Deserialize, Serialize};

use crate::meta::policy::{PolicyCommand, PolicyError, PolicyOutcome};
use crate::meta::{MetaCommand, MetaError, META_SHARD};
use crate::model::assertion::AssertionDraft;
use crate::model::id::AssertionId;
use crate::model::ModelError;

/// Group 0 is the meta group; shard `s` is group `s + 1`.
pub type GroupId = u32;

/// The group of `shard`; [`META_SHARD`] names the meta group, group 0.
pub fn group_of_shard(shard: u16) -> GroupId {
    if shard == META_SHARD {
        0
    } else {
        shard as GroupId + 1
    }
}

/// The shard of a group id (group 0: [`META_SHARD`]); `None` for ids no shard can have.
pub fn shard_of_group(group: GroupId) -> Option<u16> {
    match group {
        0 => Some(META_SHARD),
        g => u16::try_from(g - 1).ok().filter(|s| *s != META_SHARD),
    }
}

/// A command in a shard's log. Everything that varies between replicas (time, ids) is decided by
/// the leader before proposing or derived deterministically while applying.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardCommand {
    /// New assertions, all on this shard. Items keep their order; each gets its own result.
    Assert { proposed_at_us: u64, items: Vec<AssertionDraft> },
    /// A vote; a later vote of the same agent on the same assertion replaces the earlier one.
    Vote { proposed_at_us: u64, assertion_id: AssertionId, agent_id: String, value: i8 },
    /// A retraction, by the asserting agent or (with `admin`) by an administrator.
    Retract { proposed_at_us: u64, assertion_id: AssertionId, agent_id: String, admin: bool, reason: Option<String> },
    /// A change to the cluster metadata; only the meta group (group 0) applies these.
    Meta { proposed_at_us: u64, command: MetaCommand },
    /// An admin's decision on a quarantined claim: release it into the lenses, or reject it
    /// (recorded as a retraction).
    Quarantine { proposed_at_us: u64, assertion_id: AssertionId, release: bool, by: String, reason: Option<String> },
    /// A change to the cluster-wide policy (authority, breakers); meta group only.
    Policy { proposed_at_us: u64, command: PolicyCommand },
    /// A proposal forwarded to the shard leader by another node, with the idempotency token
    /// that node generated: every copy of it (a forward retried after an ambiguous failure, or
    /// sent again to a new leader) applies once; later copies answer the first copy's response.
    Once { token: ProposalToken, command: Box<ShardCommand> },
    /// An anti-entropy check: every replica records the root of its digests as of this entry,
    /// so replicas compare their state at the same log position (`shard::digest`). Changes no
    /// data.
    Check { proposed_at_us: u64 },
    /// Proposals that reached the shard leader while its previous entry was in flight, in one
    /// entry (`coordinator::batch`): its own batch of assertions and the batches other nodes
    /// forwarded, each in its token. Each part is an `Assert`, alone or in a `Once`; its items
    /// are numbered after the previous parts' (an assertion id packs the position), and it gets
    /// its own response ([`ShardResponse::Parts`]).
    Parts { parts: Vec<ShardCommand> },
}

/// The idempotency token of a forwarded proposal: when the forwarding node issued it (its
/// clock) and a random nonce. Applied tokens are remembered for [`TOKEN_TTL_US`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalToken {
    pub issued_at_us: u64,
    pub nonce: u64,
}

/// How long a replica remembers an applied token. Forwarding retries a proposal only within
/// its write timeout (seconds), so ten minutes leaves room for any clock skew between nodes.
pub const TOKEN_TTL_US: u64 = 10 * 60 * 1_000_000;

impl ProposalToken {
    pub fn new() -> ProposalToken {
        ProposalToken { issued_at_us: crate::model::id::now_us(), nonce: rand::random() }
    }
}

impl Default for ProposalToken {
    fn default() -> Self {
        ProposalToken::new()
    }
}

impl ShardCommand {
    pub fn proposed_at_us(&self) -> u64 {
        match self {
            ShardCommand::Assert { proposed_at_us, .. }
            | ShardCommand::Vote { proposed_at_us, .. }
            | ShardCommand::Retract { proposed_at_us, .. }
            | ShardCommand::Meta { proposed_at_us, .. }
            | ShardCommand::Quarantine { proposed_at_us, .. }
            | ShardCommand::Policy { proposed_at_us, .. }
            | ShardCommand::Check { proposed_at_us } => *proposed_at_us,
            ShardCommand::Once { command, .. } => command.proposed_at_us(),
            ShardCommand::Parts { parts } => parts.iter().map(ShardCommand::proposed_at_us).max().unwrap_or(0),
        }
    }

    /// Whether the command adds client data (claims, votes, an agent's own retraction): what a
    /// node below its free-space floor refuses. Admin decisions, metadata, policy and checks
    /// are small and keep working there.
    pub fn grows_data(&self) -> bool {
        match self {
            ShardCommand::Assert { .. } | ShardCommand::Vote { .. } => true,
            ShardCommand::Retract { admin, .. } => !admin,
            ShardCommand::Once { command, .. } => command.grows_data(),
            ShardCommand::Parts { parts } => parts.iter().any(ShardCommand::grows_data),
            ShardCommand::Meta { .. }
            | ShardCommand::Quarantine { .. }
            | ShardCommand::Policy { .. }
            | ShardCommand::Check { .. } => false,
        }
    }

    /// This command with an idempotency token, unless it has one already.
    pub fn once(self) -> ShardCommand {
        match self {
            ShardCommand::Once { .. } => self,
            command => ShardCommand::Once { token: ProposalToken::new(), command: Box::new(command) },
        }
    }

    /// Whether every copy of this command applies once, however many are proposed: a `Once`,
    /// or an entry of parts that are all `Once`. Only such a command may be proposed again
    /// after a copy of it may have been appended.
    pub fn applies_once(&self) -> bool {
        match self {
            ShardCommand::Once { .. } => true,
            ShardCommand::Parts { parts } => parts.iter().all(ShardCommand::applies_once),
            _ => false,
        }
    }

    /// Whether this command may be a part of a [`ShardCommand::Parts`]: an `Assert`, alone or in
    /// a token.
    pub fn is_assertion_part(&self) -> bool {
        match self {
            ShardCommand::Assert { .. } => true,
            ShardCommand::Once { command, .. } => matches!(**command, ShardCommand::Assert { .. }),
            _ => false,
        }
    }

    /// The number of items an entry of this command numbers (assertion ids pack the position).
    pub fn item_count(&self) -> usize {
        match self {
            ShardCommand::Assert { items, .. } => items.len(),
            ShardCommand::Once { command, .. } => command.item_count(),
            ShardCommand::Parts { parts } => parts.iter().map(ShardCommand::item_count).sum(),
            _ => 1,
        }
    }
}

/// What applying an assertion produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssertOutcome {
    pub id: AssertionId,
    pub shard: u16,
    pub log_index: u64,
    pub asserted_at_us: u64,
    /// True when this is a retry of an earlier write with the same (agent_id, request_id).
    #[serde(default)]
    pub duplicate: bool,
    /// Set when the shard leader quarantined the claim (DESIGN §2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<crate::model::assertion::QuarantineDecision>,
}

/// What applying a vote or retraction produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventOutcome {
    pub assertion_id: AssertionId,
    pub at_us: u64,
    pub log_index: u64,
}

/// The state machine's answer to one log entry.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub enum ShardResponse {
    Asserted(Vec<Result<AssertOutcome, ModelError>>),
    Voted(Result<EventOutcome, ModelError>),
    Retracted(Result<EventOutcome, ModelError>),
    Quarantine(Result<EventOutcome, ModelError>),
    Meta(Result<(), MetaError>),
    Policy(Result<PolicyOutcome, PolicyError>),
    /// A forwarded proposal whose token had expired when it was applied: it was not applied
    /// (the proposer answers `outcome_unknown`; an earlier copy may have been applied).
    TokenExpired,
    /// A command refused whole, deterministically on every replica (e.g. more items than an
    /// entry can number): nothing was applied.
    Refused(crate::model::ModelError),
    /// Blank and membership entries.
    #[default]
    Empty,
    /// The answers to the parts of a [`ShardCommand::Parts`], in order.
    Parts(Vec<ShardResponse>),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only tokens make a second copy a no-op: a `Once`, or parts that are all `Once`.
    #[test]
    fn a_command_applies_once_only_with_every_part_in_a_token() {
        let assert = || ShardCommand::Assert { proposed_at_us: 1, items: Vec::new() };
        assert!(!assert().applies_once());
        assert!(assert().once().applies_once());
        assert!(!ShardCommand::Check { proposed_at_us: 1 }.applies_once());
        let tokened = ShardCommand::Parts { parts: vec![assert().once(), assert().once()] };
        assert!(tokened.applies_once());
        let own_first = ShardCommand::Parts { parts: vec![assert(), assert().once()] };
        assert!(!own_first.applies_once(), "the leader's own writes carry no token");
    }
}
