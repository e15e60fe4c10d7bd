//! The binary form of a shard log's commands, of its stored records, and of what the
//! transport carries about a shard: [`ShardCommand`] to and from the protobuf `Command` of
//! `proto/log.proto` (the Raft log stores and the transport sends commands in this form;
//! `raft::wire` frames whole entries), the state machine's records (assertions, retractions
//! and releases, write outcomes, token responses) behind a version byte ([`RECORD_V1`];
//! records an earlier version wrote as JSON start with `{` or `"` and still read), and, one
//! module per message family of `proto/request.proto`, the errors of the request path
//! (`errors`), the state machine's answers (`response`) and reads of a shard with their
//! results (`read`). Assertion commands and stored assertions are written straight from the
//! Rust values (`direct`), in the bytes prost would write for their messages. Assertion values and sources stay the client's JSON text. Decoding checks
//! every range a Rust type has and protobuf does not (a `u8` level, a `u16` shard, a 16-byte
//! id, a `usize` count) and names the field that is out of it or missing; it never panics.

pub mod direct;
pub mod errors;
pub mod read;
pub mod response;

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use stemedb_proto::raft as pb;

use super::command::{AssertOutcome, ProposalToken, ShardCommand, ShardResponse};
use super::progress::RetractionRecord;
use crate::meta::policy::{BreakerCause, PolicyCommand};
use crate::meta::{MetaCommand, MoveCause, NodeStatus};
use crate::model::assertion::{AssertionDraft, QuarantineDecision, StoredAssertion};
use crate::model::id::AssertionId;

/// Why bytes are not a command.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a protobuf message: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("a JSON record (the earlier format) that does not decode: {0}")]
    LegacyJson(#[from] serde_json::Error),
    #[error("unknown record format {0} (this version reads 1, and JSON)")]
    UnknownVersion(u8),
    #[error("an empty record")]
    Empty,
}

/// The version byte of a stored record in the protobuf form.
pub const RECORD_V1: u8 = 1;

/// [`RECORD_V1`], then `message`.
fn frame(message: &impl prost::Message) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + message.encoded_len());
    bytes.push(RECORD_V1);
    message.encode_raw(&mut bytes);
    bytes
}

/// A record in either form: framed protobuf, or the JSON an earlier version wrote (an object,
/// or for a unit variant such as `ShardResponse::Empty` a string: it starts with `{` or `"`,
/// which no version byte is).
fn unframe<P, T>(bytes: &[u8], from_proto: impl FnOnce(P) -> Result<T, CodecError>) -> Result<T, CodecError>
where
    P: prost::Message + Default,
    T: serde::de::DeserializeOwned,
{
    match bytes.first() {
        Some(&RECORD_V1) => from_proto(P::decode(&bytes[1..])?),
        Some(b'{' | b'"') => Ok(serde_json::from_slice(bytes)?),
        Some(version) => Err(CodecError::UnknownVersion(*version)),
        None => Err(CodecError::Empty),
    }
}

/// The stored form of an assertion.
pub fn encode_assertion(record: &StoredAssertion) -> Vec<u8> {
    direct::encode_record(&record.as_new())
}

/// A stored assertion, in either form.
pub fn decode_assertion(bytes: &[u8]) -> Result<StoredAssertion, CodecError> {
    unframe(bytes, record_from_proto)
}

/// The stored form of a retraction, a rejection or a quarantine release.
pub fn encode_event(record: &RetractionRecord) -> Vec<u8> {
    frame(&read::retraction_to_proto(record))
}

pub fn decode_event(bytes: &[u8]) -> Result<RetractionRecord, CodecError> {
    unframe(bytes, |p| Ok(read::retraction_from_proto(p)))
}

/// The stored form of a write's outcome, kept under its `(agent_id, request_id)`.
pub fn encode_outcome(outcome: &AssertOutcome) -> Vec<u8> {
    frame(&response::outcome_to_proto(outcome))
}

pub fn decode_outcome(bytes: &[u8]) -> Result<AssertOutcome, CodecError> {
    unframe(bytes, response::outcome_from_proto)
}

/// The stored form of an applied proposal's response, kept under its idempotency token.
pub fn encode_response(response: &ShardResponse) -> Vec<u8> {
    frame(&response::response_to_proto(response))
}

pub fn decode_response(bytes: &[u8]) -> Result<ShardResponse, CodecError> {
    unframe(bytes, response::response_from_proto)
}

/// The protobuf form of a stored assertion (a record, and the `record` of a claim's facts).
pub fn record_to_proto(record: &StoredAssertion) -> pb::StoredAssertion {
    pb::StoredAssertion {
        id: id_bytes(record.id),
        asserted_at_us: record.asserted_at_us,
        log_index: record.log_index,
        draft: Some(draft_to_proto(&record.draft)),
        quarantined: record.quarantined,
    }
}

pub fn record_from_proto(record: pb::StoredAssertion) -> Result<StoredAssertion, CodecError> {
    Ok(StoredAssertion {
        id: id_from("record.id", &record.id)?,
        asserted_at_us: record.asserted_at_us,
        log_index: record.log_index,
        draft: draft_from_proto(record.draft.ok_or(CodecError::Missing("record.draft"))?)?,
        quarantined: record.quarantined,
    })
}

fn invalid(field: &'static str, reason: impl ToString) -> CodecError {
    CodecError::Invalid { field, reason: reason.to_string() }
}

fn narrow<T: TryFrom<U>, U: Copy + std::fmt::Display>(field: &'static str, value: U) -> Result<T, CodecError> {
    T::try_from(value).map_err(|_| invalid(field, format!("{value} is out of range")))
}

fn id_bytes(id: AssertionId) -> Vec<u8> {
    id.to_bytes().to_vec()
}

fn id_from(field: &'static str, bytes: &[u8]) -> Result<AssertionId, CodecError> {
    if bytes.len() != 16 {
        return Err(invalid(field, format!("{} bytes, not 16", bytes.len())));
    }
    AssertionId::from_bytes(bytes).ok_or_else(|| invalid(field, "not an assertion id"))
}

fn raw_json(field: &'static str, text: String) -> Result<Box<RawValue>, CodecError> {
    RawValue::from_string(text).map_err(|e| invalid(field, e))
}

/// The protobuf form of a command.
pub fn command_to_proto(command: &ShardCommand) -> pb::Command {
    use pb::command::Kind;
    let kind = match command {
        ShardCommand::Assert { proposed_at_us, items } => Kind::Assert(pb::AssertCommand {
            proposed_at_us: *proposed_at_us,
            items: items.iter().map(draft_to_proto).collect(),
        }),
        ShardCommand::Vote { proposed_at_us, assertion_id, agent_id, value } => Kind::Vote(pb::VoteCommand {
            proposed_at_us: *proposed_at_us,
            assertion_id: id_bytes(*assertion_id),
            agent_id: agent_id.clone(),
            value: i32::from(*value),
        }),
        ShardCommand::Retract { proposed_at_us, assertion_id, agent_id, admin, reason } => {
            Kind::Retract(pb::RetractCommand {
                proposed_at_us: *proposed_at_us,
                assertion_id: id_bytes(*assertion_id),
                agent_id: agent_id.clone(),
                admin: *admin,
                reason: reason.clone(),
            })
        }
        ShardCommand::Meta { proposed_at_us, command } => Kind::Meta(meta_to_proto(*proposed_at_us, command)),
        ShardCommand::Quarantine { proposed_at_us, assertion_id, release, by, reason } => {
            Kind::Quarantine(pb::QuarantineCommand {
                proposed_at_us: *proposed_at_us,
                assertion_id: id_bytes(*assertion_id),
                release: *release,
                by: by.clone(),
                reason: reason.clone(),
            })
        }
        ShardCommand::Policy { proposed_at_us, command } => Kind::Policy(policy_to_proto(*proposed_at_us, command)),
        ShardCommand::Once { token, command } => Kind::Once(Box::new(pb::OnceCommand {
            issued_at_us: token.issued_at_us,
            nonce: token.nonce,
            command: Some(Box::new(command_to_proto(command))),
        })),
        ShardCommand::Check { proposed_at_us } => Kind::Check(pb::CheckCommand { proposed_at_us: *proposed_at_us }),
        ShardCommand::Parts { parts } => {
            Kind::Parts(pb::PartsCommand { parts: parts.iter().map(command_to_proto).collect() })
        }
    };
    pb::Command { kind: Some(kind) }
}

/// The command a protobuf `Command` holds.
pub fn command_from_proto(command: pb::Command) -> Result<ShardCommand, CodecError> {
    use pb::command::Kind;
    Ok(match command.kind.ok_or(CodecError::Missing("command"))? {
        Kind::Assert(c) => ShardCommand::Assert {
            proposed_at_us: c.proposed_at_us,
            items: c.items.into_iter().map(draft_from_proto).collect::<Result<_, _>>()?,
        },
        Kind::Vote(c) => ShardCommand::Vote {
            proposed_at_us: c.proposed_at_us,
            assertion_id: id_from("vote.assertion_id", &c.assertion_id)?,
            agent_id: c.agent_id,
            value: narrow("vote.value", c.value)?,
        },
        Kind::Retract(c) => ShardCommand::Retract {
            proposed_at_us: c.proposed_at_us,
            assertion_id: id_from("retract.assertion_id", &c.assertion_id)?,
            agent_id: c.agent_id,
            admin: c.admin,
            reason: c.reason,
        },
        Kind::Meta(c) => {
            let proposed_at_us = c.proposed_at_us;
            ShardCommand::Meta { proposed_at_us, command: meta_from_proto(c)? }
        }
        Kind::Quarantine(c) => ShardCommand::Quarantine {
            proposed_at_us: c.proposed_at_us,
            assertion_id: id_from("quarantine.assertion_id", &c.assertion_id)?,
            release: c.release,
            by: c.by,
            reason: c.reason,
        },
        Kind::Policy(c) => {
            let proposed_at_us = c.proposed_at_us;
            ShardCommand::Policy { proposed_at_us, command: policy_from_proto(c)? }
        }
        Kind::Once(c) => {
            let inner = command_from_proto(*c.command.ok_or(CodecError::Missing("once.command"))?)?;
            if matches!(inner, ShardCommand::Once { .. }) {
                return Err(invalid("once.command", "a token inside a token"));
            }
            if matches!(inner, ShardCommand::Parts { .. }) {
                return Err(invalid("once.command", "parts inside a token"));
            }
            ShardCommand::Once {
                token: ProposalToken { issued_at_us: c.issued_at_us, nonce: c.nonce },
                command: Box::new(inner),
            }
        }
        Kind::Check(c) => ShardCommand::Check { proposed_at_us: c.proposed_at_us },
        Kind::Parts(c) => {
            let parts = c.parts.into_iter().map(command_from_proto).collect::<Result<Vec<_>, _>>()?;
            if let Some(part) = parts.iter().find(|part| !part.is_assertion_part()) {
                return Err(invalid("parts.parts", format!("a part that is not an assertion command: {part:?}")));
            }
            ShardCommand::Parts { parts }
        }
    })
}

fn draft_to_proto(draft: &AssertionDraft) -> pb::AssertionDraft {
    pb::AssertionDraft {
        concept_path: draft.concept_path.clone(),
        predicate: draft.predicate.clone(),
        value: draft.value.get().to_string(),
        agent_id: draft.agent_id.clone(),
        confidence_bits: draft.confidence.to_bits(),
        supersedes: draft.supersedes.iter().map(|id| id_bytes(*id)).collect(),
        source: draft.source.as_ref().map(|s| s.get().to_string()),
        signature: draft.signature.clone(),
        request_id: draft.request_id.clone(),
        quarantine: draft
            .quarantine
            .as_ref()
            .map(|q| pb::QuarantineDecision { reason: q.reason.clone(), detail: q.detail.clone() }),
    }
}

fn draft_from_proto(draft: pb::AssertionDraft) -> Result<AssertionDraft, CodecError> {
    Ok(AssertionDraft {
        concept_path: draft.concept_path,
        predicate: draft.predicate,
        value: raw_json("assert.value", draft.value)?,
        agent_id: draft.agent_id,
        confidence: f64::from_bits(draft.confidence_bits),
        supersedes: draft.supersedes.iter().map(|id| id_from("assert.supersedes", id)).collect::<Result<_, _>>()?,
        source: draft.source.map(|s| raw_json("assert.source", s)).transpose()?,
        signature: draft.signature,
        request_id: draft.request_id,
        quarantine: draft.quarantine.map(|q| QuarantineDecision { reason: q.reason, detail: q.detail }),
    })
}

fn node_ids(ids: &[u64]) -> pb::NodeIds {
    pb::NodeIds { ids: ids.to_vec() }
}

fn meta_to_proto(proposed_at_us: u64, command: &MetaCommand) -> pb::MetaCommand {
    use pb::meta_command::Kind;
    let kind = match command {
        MetaCommand::Bootstrap { nodes, placement } => Kind::Bootstrap(pb::Bootstrap {
            nodes: nodes.iter().map(|(id, addr)| (*id, addr.clone())).collect(),
            placement: placement.iter().map(|(shard, ids)| (u32::from(*shard), node_ids(ids))).collect(),
        }),
        MetaCommand::AddNode { id, raft_addr } => Kind::AddNode(pb::AddNode { id: *id, raft_addr: raft_addr.clone() }),
        MetaCommand::SetNodeStatus { id, status } => Kind::SetNodeStatus(pb::SetNodeStatus {
            id: *id,
            status: match status {
                NodeStatus::Joining => pb::NodeStatus::Joining,
                NodeStatus::Up => pb::NodeStatus::Up,
                NodeStatus::Leaving => pb::NodeStatus::Leaving,
            } as i32,
        }),
        MetaCommand::RemoveNode { id } => Kind::RemoveNode(pb::RemoveNode { id: *id }),
        MetaCommand::StartMove { shard, from, to, cause, reason, pending } => Kind::StartMove(pb::StartMove {
            shard: u32::from(*shard),
            from: *from,
            to: *to,
            cause: match cause {
                MoveCause::Operator => pb::MoveCause::Operator,
                MoveCause::Decommission => pb::MoveCause::Decommission,
                MoveCause::Repair => pb::MoveCause::Repair,
                MoveCause::Trim => pb::MoveCause::Trim,
                MoveCause::Balance => pb::MoveCause::Balance,
            } as i32,
            reason: reason.clone(),
            pending: *pending,
        }),
        MetaCommand::MoveRunning { shard } => Kind::MoveRunning(pb::MoveRunning { shard: u32::from(*shard) }),
        MetaCommand::FinishMove { shard, replicas } => {
            Kind::FinishMove(pb::FinishMove { shard: u32::from(*shard), replicas: replicas.clone() })
        }
        MetaCommand::FailMove { shard, error, replicas } => Kind::FailMove(pb::FailMove {
            shard: u32::from(*shard),
            error: error.clone(),
            replicas: replicas.as_deref().map(node_ids),
        }),
        MetaCommand::SetPreferredLeader { shard, node, pinned } => {
            Kind::SetPreferredLeader(pb::SetPreferredLeader { shard: u32::from(*shard), node: *node, pinned: *pinned })
        }
    };
    pb::MetaCommand { proposed_at_us, kind: Some(kind) }
}

fn meta_from_proto(command: pb::MetaCommand) -> Result<MetaCommand, CodecError> {
    use pb::meta_command::Kind;
    Ok(match command.kind.ok_or(CodecError::Missing("meta command"))? {
        Kind::Bootstrap(c) => MetaCommand::Bootstrap {
            nodes: c.nodes.into_iter().collect::<BTreeMap<_, _>>(),
            placement: c
                .placement
                .into_iter()
                .map(|(shard, ids)| Ok((narrow("bootstrap.placement", shard)?, ids.ids)))
                .collect::<Result<_, CodecError>>()?,
        },
        Kind::AddNode(c) => MetaCommand::AddNode { id: c.id, raft_addr: c.raft_addr },
        Kind::SetNodeStatus(c) => MetaCommand::SetNodeStatus {
            id: c.id,
            status: match pb::NodeStatus::try_from(c.status) {
                Ok(pb::NodeStatus::Joining) => NodeStatus::Joining,
                Ok(pb::NodeStatus::Up) => NodeStatus::Up,
                Ok(pb::NodeStatus::Leaving) => NodeStatus::Leaving,
                _ => return Err(invalid("set_node_status.status", c.status)),
            },
        },
        Kind::RemoveNode(c) => MetaCommand::RemoveNode { id: c.id },
        Kind::StartMove(c) => MetaCommand::StartMove {
            shard: narrow("start_move.shard", c.shard)?,
            from: c.from,
            to: c.to,
            cause: match pb::MoveCause::try_from(c.cause) {
                Ok(pb::MoveCause::Operator) => MoveCause::Operator,
                Ok(pb::MoveCause::Decommission) => MoveCause::Decommission,
                Ok(pb::MoveCause::Repair) => MoveCause::Repair,
                Ok(pb::MoveCause::Trim) => MoveCause::Trim,
                Ok(pb::MoveCause::Balance) => MoveCause::Balance,
                _ => return Err(invalid("start_move.cause", c.cause)),
            },
            reason: c.reason,
            pending: c.pending,
        },
        Kind::MoveRunning(c) => MetaCommand::MoveRunning { shard: narrow("move_running.shard", c.shard)? },
        Kind::FinishMove(c) => {
            MetaCommand::FinishMove { shard: narrow("finish_move.shard", c.shard)?, replicas: c.replicas }
        }
        Kind::FailMove(c) => MetaCommand::FailMove {
            shard: narrow("fail_move.shard", c.shard)?,
            error: c.error,
            replicas: c.replicas.map(|r| r.ids),
        },
        Kind::SetPreferredLeader(c) => MetaCommand::SetPreferredLeader {
            shard: narrow("set_preferred_leader.shard", c.shard)?,
            node: c.node,
            pinned: c.pinned,
        },
    })
}

fn policy_to_proto(proposed_at_us: u64, command: &PolicyCommand) -> pb::PolicyCommand {
    use pb::policy_command::Kind;
    let kind = match command {
        PolicyCommand::SetRoot { agent_id, level } => {
            Kind::SetRoot(pb::SetRoot { agent_id: agent_id.clone(), level: level.map(u32::from) })
        }
        PolicyCommand::Grant { grantor, grantee, concept_prefix, level, max_chain_depth } => Kind::Grant(pb::Grant {
            grantor: grantor.clone(),
            grantee: grantee.clone(),
            concept_prefix: concept_prefix.clone(),
            level: u32::from(*level),
            max_chain_depth: *max_chain_depth as u64,
        }),
        PolicyCommand::Revoke { grant_id, by } => Kind::Revoke(pb::Revoke { grant_id: *grant_id, by: by.clone() }),
        PolicyCommand::TripBreaker { agent_id, cause, reason, open_for_ms, max_open_ms } => {
            Kind::TripBreaker(pb::TripBreaker {
                agent_id: agent_id.clone(),
                cause: breaker_cause_to_proto(*cause),
                reason: reason.clone(),
                open_for_ms: *open_for_ms,
                max_open_ms: *max_open_ms,
            })
        }
        PolicyCommand::ResetBreaker { agent_id, reason, opened_at_us } => Kind::ResetBreaker(pb::ResetBreaker {
            agent_id: agent_id.clone(),
            reason: reason.clone(),
            opened_at_us: *opened_at_us,
        }),
    };
    pb::PolicyCommand { proposed_at_us, kind: Some(kind) }
}

fn policy_from_proto(command: pb::PolicyCommand) -> Result<PolicyCommand, CodecError> {
    use pb::policy_command::Kind;
    Ok(match command.kind.ok_or(CodecError::Missing("policy command"))? {
        Kind::SetRoot(c) => PolicyCommand::SetRoot {
            agent_id: c.agent_id,
            level: c.level.map(|l| narrow("set_root.level", l)).transpose()?,
        },
        Kind::Grant(c) => PolicyCommand::Grant {
            grantor: c.grantor,
            grantee: c.grantee,
            concept_prefix: c.concept_prefix,
            level: narrow("grant.level", c.level)?,
            max_chain_depth: narrow("grant.max_chain_depth", c.max_chain_depth)?,
        },
        Kind::Revoke(c) => PolicyCommand::Revoke { grant_id: c.grant_id, by: c.by },
        Kind::TripBreaker(c) => PolicyCommand::TripBreaker {
            agent_id: c.agent_id,
            cause: breaker_cause_from_proto("trip_breaker.cause", c.cause)?,
            reason: c.reason,
            open_for_ms: c.open_for_ms,
            max_open_ms: c.max_open_ms,
        },
        Kind::ResetBreaker(c) => {
            PolicyCommand::ResetBreaker { agent_id: c.agent_id, reason: c.reason, opened_at_us: c.opened_at_us }
        }
    })
}

fn breaker_cause_to_proto(cause: BreakerCause) -> i32 {
    let cause = match cause {
        BreakerCause::Manual => pb::BreakerCause::Manual,
        BreakerCause::WriteRate => pb::BreakerCause::WriteRate,
        BreakerCause::InvalidRate => pb::BreakerCause::InvalidRate,
    };
    cause as i32
}

fn breaker_cause_from_proto(field: &'static str, cause: i32) -> Result<BreakerCause, CodecError> {
    match pb::BreakerCause::try_from(cause) {
        Ok(pb::BreakerCause::Manual) => Ok(BreakerCause::Manual),
        Ok(pb::BreakerCause::WriteRate) => Ok(BreakerCause::WriteRate),
        Ok(pb::BreakerCause::InvalidRate) => Ok(BreakerCause::InvalidRate),
        _ => Err(invalid(field, cause)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    pub(crate) fn text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z/._-]{1,24}", "\\PC{0,12}"]
    }

    pub(crate) fn json() -> impl Strategy<Value = Box<RawValue>> {
        prop_oneof![
            Just("null".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[a-z ]{0,20}".prop_map(|s| format!("{s:?}")),
            ("[a-z]{1,8}", any::<bool>()).prop_map(|(k, b)| format!("{{\"{k}\": [1, {b}, {{\"x\": null}}]}}")),
        ]
        .prop_map(|s| RawValue::from_string(s).expect("json"))
    }

    /// Any 16 bytes: the codec carries ids it does not interpret (`AssertionId::new` would
    /// refuse, in debug builds, a log index or an item beyond what ids number).
    pub(crate) fn id() -> impl Strategy<Value = AssertionId> {
        any::<u128>().prop_map(|bits| AssertionId::from_bytes(&bits.to_be_bytes()).expect("16 bytes"))
    }

    pub(crate) fn draft() -> impl Strategy<Value = AssertionDraft> {
        (
            (text(), text(), json(), text(), any::<f64>()),
            (
                proptest::collection::vec(id(), 0..3),
                proptest::option::of(json()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of((text(), text())),
            ),
        )
            .prop_map(
                |(
                    (concept_path, predicate, value, agent_id, confidence),
                    (supersedes, source, signature, request_id, q),
                )| {
                    AssertionDraft {
                        concept_path,
                        predicate,
                        value,
                        agent_id,
                        confidence,
                        supersedes,
                        source,
                        signature,
                        request_id,
                        quarantine: q.map(|(reason, detail)| QuarantineDecision { reason, detail }),
                    }
                },
            )
    }

    pub(crate) fn record() -> impl Strategy<Value = StoredAssertion> {
        (draft(), id(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(draft, id, asserted_at_us, log_index, quarantined)| StoredAssertion {
                id,
                asserted_at_us,
                log_index,
                draft,
                quarantined,
            },
        )
    }

    fn meta() -> impl Strategy<Value = MetaCommand> {
        let status = prop_oneof![Just(NodeStatus::Joining), Just(NodeStatus::Up), Just(NodeStatus::Leaving)];
        let cause = prop_oneof![
            Just(MoveCause::Operator),
            Just(MoveCause::Decommission),
            Just(MoveCause::Repair),
            Just(MoveCause::Trim),
            Just(MoveCause::Balance)
        ];
        let ids = proptest::collection::vec(any::<u64>(), 0..4);
        prop_oneof![
            (
                proptest::collection::btree_map(any::<u64>(), text(), 0..4),
                proptest::collection::btree_map(any::<u16>(), ids.clone(), 0..4)
            )
                .prop_map(|(nodes, placement)| MetaCommand::Bootstrap { nodes, placement }),
            (any::<u64>(), text()).prop_map(|(id, raft_addr)| MetaCommand::AddNode { id, raft_addr }),
            (any::<u64>(), status).prop_map(|(id, status)| MetaCommand::SetNodeStatus { id, status }),
            any::<u64>().prop_map(|id| MetaCommand::RemoveNode { id }),
            (any::<u16>(), any::<Option<u64>>(), any::<Option<u64>>(), cause, text(), any::<bool>()).prop_map(
                |(shard, from, to, cause, reason, pending)| MetaCommand::StartMove {
                    shard,
                    from,
                    to,
                    cause,
                    reason,
                    pending
                }
            ),
            any::<u16>().prop_map(|shard| MetaCommand::MoveRunning { shard }),
            (any::<u16>(), ids.clone()).prop_map(|(shard, replicas)| MetaCommand::FinishMove { shard, replicas }),
            (any::<u16>(), text(), proptest::option::of(ids))
                .prop_map(|(shard, error, replicas)| MetaCommand::FailMove { shard, error, replicas }),
            (any::<u16>(), any::<u64>(), any::<bool>())
                .prop_map(|(shard, node, pinned)| MetaCommand::SetPreferredLeader { shard, node, pinned }),
        ]
    }

    fn policy() -> impl Strategy<Value = PolicyCommand> {
        let cause =
            prop_oneof![Just(BreakerCause::Manual), Just(BreakerCause::WriteRate), Just(BreakerCause::InvalidRate)];
        prop_oneof![
            (text(), any::<Option<u8>>()).prop_map(|(agent_id, level)| PolicyCommand::SetRoot { agent_id, level }),
            (text(), text(), text(), any::<u8>(), 0usize..64).prop_map(
                |(grantor, grantee, concept_prefix, level, max_chain_depth)| PolicyCommand::Grant {
                    grantor,
                    grantee,
                    concept_prefix,
                    level,
                    max_chain_depth
                }
            ),
            (any::<u64>(), proptest::option::of(text()))
                .prop_map(|(grant_id, by)| PolicyCommand::Revoke { grant_id, by }),
            (text(), cause, text(), any::<Option<u64>>(), any::<Option<u64>>()).prop_map(
                |(agent_id, cause, reason, open_for_ms, max_open_ms)| PolicyCommand::TripBreaker {
                    agent_id,
                    cause,
                    reason,
                    open_for_ms,
                    max_open_ms
                }
            ),
            (text(), text(), any::<Option<u64>>()).prop_map(|(agent_id, reason, opened_at_us)| {
                PolicyCommand::ResetBreaker { agent_id, reason, opened_at_us }
            }),
        ]
    }

    /// Every kind of command, any field values, with or without a token.
    pub(crate) fn command() -> impl Strategy<Value = ShardCommand> {
        let at = any::<u64>();
        let plain = prop_oneof![
            (at, proptest::collection::vec(draft(), 0..4))
                .prop_map(|(proposed_at_us, items)| ShardCommand::Assert { proposed_at_us, items }),
            (at, id(), text(), any::<i8>()).prop_map(|(proposed_at_us, assertion_id, agent_id, value)| {
                ShardCommand::Vote { proposed_at_us, assertion_id, agent_id, value }
            }),
            (at, id(), text(), any::<bool>(), proptest::option::of(text())).prop_map(
                |(proposed_at_us, assertion_id, agent_id, admin, reason)| ShardCommand::Retract {
                    proposed_at_us,
                    assertion_id,
                    agent_id,
                    admin,
                    reason
                }
            ),
            (at, meta()).prop_map(|(proposed_at_us, command)| ShardCommand::Meta { proposed_at_us, command }),
            (at, id(), any::<bool>(), text(), proptest::option::of(text())).prop_map(
                |(proposed_at_us, assertion_id, release, by, reason)| ShardCommand::Quarantine {
                    proposed_at_us,
                    assertion_id,
                    release,
                    by,
                    reason
                }
            ),
            (at, policy()).prop_map(|(proposed_at_us, command)| ShardCommand::Policy { proposed_at_us, command }),
            at.prop_map(|proposed_at_us| ShardCommand::Check { proposed_at_us }),
        ];
        let single = (plain, token()).prop_map(|(command, token)| in_token(command, token));
        // A leader's entry of several proposals: assertion commands, each alone or in a token.
        let part =
            ((at, proptest::collection::vec(draft(), 0..3)), token()).prop_map(|((proposed_at_us, items), token)| {
                in_token(ShardCommand::Assert { proposed_at_us, items }, token)
            });
        let parts = proptest::collection::vec(part, 0..4).prop_map(|parts| ShardCommand::Parts { parts });
        prop_oneof![6 => single, 1 => parts]
    }

    fn token() -> impl Strategy<Value = Option<ProposalToken>> {
        proptest::option::of(
            (any::<u64>(), any::<u64>()).prop_map(|(issued_at_us, nonce)| ProposalToken { issued_at_us, nonce }),
        )
    }

    fn in_token(command: ShardCommand, token: Option<ProposalToken>) -> ShardCommand {
        match token {
            Some(token) => ShardCommand::Once { token, command: Box::new(command) },
            None => command,
        }
    }

    /// `value` survives its stored form, and its JSON form (what an earlier version stored)
    /// reads as that version read it; compared by their JSON.
    fn same_both_ways<T: serde::Serialize + serde::de::DeserializeOwned>(
        value: &T,
        encode: fn(&T) -> Vec<u8>,
        decode: fn(&[u8]) -> Result<T, CodecError>,
    ) -> Result<(), TestCaseError> {
        let json = |v: &T| serde_json::to_string(v).expect("json");
        let bytes = encode(value);
        prop_assert_eq!(bytes[0], RECORD_V1);
        prop_assert_eq!(json(value), json(&decode(&bytes).expect("decodes")));
        let legacy = serde_json::to_vec(value).expect("json");
        let before: T = serde_json::from_slice(&legacy).expect("the earlier version read it");
        prop_assert_eq!(json(&before), json(&decode(&legacy).expect("decodes")));
        Ok(())
    }

    /// Values compare by their JSON form (the form they had before the binary codecs): equal
    /// JSON, equal value. Shared by every codec test, here and in `raft::wire`.
    pub(crate) fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
        serde_json::to_string(a).expect("json") == serde_json::to_string(b).expect("json")
    }

    /// A protobuf message after encoding and decoding.
    pub(crate) fn round_trip<M: prost::Message + Default>(message: &M) -> M {
        M::decode(message.encode_to_vec().as_slice()).expect("decode")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Parts hold assertion commands only, and never sit in a token: anything else from a
        /// peer is refused at decoding.
        #[test]
        fn parts_of_other_shapes_do_not_decode(proposed_at_us in any::<u64>(), nonce in any::<u64>()) {
            let token = ProposalToken { issued_at_us: proposed_at_us, nonce };
            let check = ShardCommand::Check { proposed_at_us };
            let nested = ShardCommand::Parts { parts: vec![ShardCommand::Parts { parts: Vec::new() }] };
            let in_token = ShardCommand::Once { token, command: Box::new(ShardCommand::Parts { parts: Vec::new() }) };
            let check_in_token = ShardCommand::Parts {
                parts: vec![ShardCommand::Once { token, command: Box::new(check.clone()) }],
            };
            for command in [ShardCommand::Parts { parts: vec![check] }, nested, in_token, check_in_token] {
                let bytes = prost::Message::encode_to_vec(&command_to_proto(&command));
                let decoded = command_from_proto(prost::Message::decode(bytes.as_slice()).expect("decode"));
                prop_assert!(decoded.is_err(), "{command:?} decoded as {decoded:?}");
            }
        }

        #[test]
        fn every_command_round_trips(command in command()) {
            let bytes = prost::Message::encode_to_vec(&command_to_proto(&command));
            let decoded = command_from_proto(prost::Message::decode(bytes.as_slice()).expect("decode"))
                .expect("a command");
            prop_assert!(same(&command, &decoded), "{command:?} came back as {decoded:?}");
        }

        #[test]
        fn every_stored_assertion_round_trips(
            draft in draft(),
            id in id(),
            asserted_at_us in any::<u64>(),
            log_index in any::<u64>(),
            quarantined in any::<bool>(),
        ) {
            let record = StoredAssertion { id, asserted_at_us, log_index, draft, quarantined };
            let bytes = encode_assertion(&record);
            prop_assert_eq!(bytes[0], RECORD_V1);
            let decoded = decode_assertion(&bytes).expect("decodes");
            prop_assert_eq!(serde_json::to_string(&record).expect("json"), serde_json::to_string(&decoded).expect("json"));
            // A record an earlier version wrote as JSON reads as that version read it.
            let json = serde_json::to_vec(&record).expect("json");
            let before: StoredAssertion = serde_json::from_slice(&json).expect("the earlier version read it");
            let decoded = decode_assertion(&json).expect("decodes");
            prop_assert_eq!(serde_json::to_string(&before).expect("json"), serde_json::to_string(&decoded).expect("json"));
        }

        /// Events, outcomes and token responses: framed, and as JSON from an earlier version.
        #[test]
        fn every_other_record_round_trips(
            event in super::read::tests::retraction(),
            outcome in super::response::tests::assert_outcome(),
            response in super::response::tests::response(),
        ) {
            same_both_ways(&event, encode_event, decode_event)?;
            same_both_ways(&outcome, encode_outcome, decode_outcome)?;
            same_both_ways(&response, encode_response, decode_response)?;
        }

        #[test]
        fn damaged_records_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut framed = vec![RECORD_V1];
            framed.extend_from_slice(&bytes);
            for bytes in [&bytes, &framed] {
                let _ = decode_assertion(bytes);
                let _ = decode_event(bytes);
                let _ = decode_outcome(bytes);
                let _ = decode_response(bytes);
            }
        }

        /// Arbitrary bytes never panic the decoder: they are a command or a named error.
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(message) = <pb::Command as prost::Message>::decode(bytes.as_slice()) {
                let _ = command_from_proto(message);
            }
        }
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let vote = pb::Command {
            kind: Some(pb::command::Kind::Vote(pb::VoteCommand {
                proposed_at_us: 1,
                assertion_id: vec![0; 16],
                agent_id: "a".into(),
                value: 300,
            })),
        };
        assert!(matches!(command_from_proto(vote), Err(CodecError::Invalid { field: "vote.value", .. })));
        let short_id = pb::Command {
            kind: Some(pb::command::Kind::Retract(pb::RetractCommand {
                assertion_id: vec![1, 2, 3],
                ..Default::default()
            })),
        };
        assert!(matches!(command_from_proto(short_id), Err(CodecError::Invalid { field: "retract.assertion_id", .. })));
        let bad_value = pb::Command {
            kind: Some(pb::command::Kind::Assert(pb::AssertCommand {
                proposed_at_us: 1,
                items: vec![pb::AssertionDraft { value: "{not json".into(), ..Default::default() }],
            })),
        };
        assert!(matches!(command_from_proto(bad_value), Err(CodecError::Invalid { field: "assert.value", .. })));
        assert!(matches!(command_from_proto(pb::Command { kind: None }), Err(CodecError::Missing("command"))));
    }
}
