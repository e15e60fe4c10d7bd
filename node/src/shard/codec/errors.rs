//! The errors an answer carries over the transport, in their protobuf form
//! (`proto/request.proto`): [`ConsensusError`] (with the [`ModelError`] of a command refused
//! whole), and the [`MetaError`] and [`PolicyError`] of the meta group's answers. Each variant
//! is its own message with its fields, so the receiver rebuilds the very error it was sent,
//! code included, without reading any text.

use stemedb_proto::raft as pb;

use super::{narrow, CodecError};
use crate::meta::policy::PolicyError;
use crate::meta::MetaError;
use crate::model::ModelError;
use crate::shard::error::ConsensusError;

pub fn consensus_error_to_proto(error: &ConsensusError) -> pb::ConsensusError {
    use pb::consensus_error::{self as e, Kind};
    let kind = match error {
        ConsensusError::NoQuorum { shard } => Kind::NoQuorum(e::NoQuorum { shard: u32::from(*shard) }),
        ConsensusError::NotLeader { shard, leader } => {
            Kind::NotLeader(e::NotLeader { shard: u32::from(*shard), leader: *leader })
        }
        ConsensusError::Timeout { shard, timeout_ms } => {
            Kind::Timeout(e::Timeout { shard: u32::from(*shard), timeout_ms: *timeout_ms })
        }
        ConsensusError::ShuttingDown { shard } => Kind::ShuttingDown(e::ShuttingDown { shard: u32::from(*shard) }),
        ConsensusError::UnknownShard { shard } => Kind::UnknownShard(e::UnknownShard { shard: u32::from(*shard) }),
        ConsensusError::Startup(message) => Kind::Startup(e::Startup { message: message.clone() }),
        ConsensusError::Internal { shard, message } => {
            Kind::Internal(e::Internal { shard: u32::from(*shard), message: message.clone() })
        }
        ConsensusError::Storage { shard, message } => {
            Kind::Storage(e::Storage { shard: u32::from(*shard), message: message.clone() })
        }
        ConsensusError::MembershipChange { shard, message } => {
            Kind::MembershipChange(e::MembershipChange { shard: u32::from(*shard), message: message.clone() })
        }
        ConsensusError::LeaderUnreachable { shard, leader, message } => Kind::LeaderUnreachable(e::LeaderUnreachable {
            shard: u32::from(*shard),
            leader: *leader,
            message: message.clone(),
        }),
        ConsensusError::QueryMemoryExceeded { shard, limit_bytes } => {
            Kind::QueryMemoryExceeded(e::QueryMemoryExceeded { shard: shard.map(u32::from), limit_bytes: *limit_bytes })
        }
        ConsensusError::OutcomeUnknown { shard, timeout_ms } => {
            Kind::OutcomeUnknown(e::OutcomeUnknown { shard: u32::from(*shard), timeout_ms: *timeout_ms })
        }
        ConsensusError::Overloaded { shard, queued } => {
            Kind::Overloaded(e::Overloaded { shard: u32::from(*shard), queued: *queued as u64 })
        }
        ConsensusError::ReadsOverloaded { shard, queued } => {
            Kind::ReadsOverloaded(e::ReadsOverloaded { shard: u32::from(*shard), queued: *queued as u64 })
        }
        ConsensusError::CatchingUp { shard } => Kind::CatchingUp(e::CatchingUp { shard: u32::from(*shard) }),
        ConsensusError::Refused { shard, error } => {
            Kind::Refused(e::Refused { shard: u32::from(*shard), error: Some(model_error_to_proto(error)) })
        }
        ConsensusError::InsufficientStorage { shard, node, free_bytes, floor_bytes } => {
            Kind::InsufficientStorage(e::InsufficientStorage {
                shard: u32::from(*shard),
                node: *node,
                free_bytes: *free_bytes,
                floor_bytes: *floor_bytes,
            })
        }
    };
    pb::ConsensusError { kind: Some(kind) }
}

pub fn consensus_error_from_proto(error: pb::ConsensusError) -> Result<ConsensusError, CodecError> {
    use pb::consensus_error::Kind;
    Ok(match error.kind.ok_or(CodecError::Missing("consensus error"))? {
        Kind::NoQuorum(e) => ConsensusError::NoQuorum { shard: narrow("no_quorum.shard", e.shard)? },
        Kind::NotLeader(e) => {
            ConsensusError::NotLeader { shard: narrow("not_leader.shard", e.shard)?, leader: e.leader }
        }
        Kind::Timeout(e) => {
            ConsensusError::Timeout { shard: narrow("timeout.shard", e.shard)?, timeout_ms: e.timeout_ms }
        }
        Kind::ShuttingDown(e) => ConsensusError::ShuttingDown { shard: narrow("shutting_down.shard", e.shard)? },
        Kind::UnknownShard(e) => ConsensusError::UnknownShard { shard: narrow("unknown_shard.shard", e.shard)? },
        Kind::Startup(e) => ConsensusError::Startup(e.message),
        Kind::Internal(e) => ConsensusError::Internal { shard: narrow("internal.shard", e.shard)?, message: e.message },
        Kind::Storage(e) => ConsensusError::Storage { shard: narrow("storage.shard", e.shard)?, message: e.message },
        Kind::MembershipChange(e) => {
            ConsensusError::MembershipChange { shard: narrow("membership_change.shard", e.shard)?, message: e.message }
        }
        Kind::LeaderUnreachable(e) => ConsensusError::LeaderUnreachable {
            shard: narrow("leader_unreachable.shard", e.shard)?,
            leader: e.leader,
            message: e.message,
        },
        Kind::QueryMemoryExceeded(e) => ConsensusError::QueryMemoryExceeded {
            shard: e.shard.map(|shard| narrow("query_memory_exceeded.shard", shard)).transpose()?,
            limit_bytes: e.limit_bytes,
        },
        Kind::OutcomeUnknown(e) => ConsensusError::OutcomeUnknown {
            shard: narrow("outcome_unknown.shard", e.shard)?,
            timeout_ms: e.timeout_ms,
        },
        Kind::Overloaded(e) => ConsensusError::Overloaded {
            shard: narrow("overloaded.shard", e.shard)?,
            queued: narrow("overloaded.queued", e.queued)?,
        },
        Kind::ReadsOverloaded(e) => ConsensusError::ReadsOverloaded {
            shard: narrow("reads_overloaded.shard", e.shard)?,
            queued: narrow("reads_overloaded.queued", e.queued)?,
        },
        Kind::CatchingUp(e) => ConsensusError::CatchingUp { shard: narrow("catching_up.shard", e.shard)? },
        Kind::Refused(e) => ConsensusError::Refused {
            shard: narrow("refused.shard", e.shard)?,
            error: model_error_from_proto(e.error.ok_or(CodecError::Missing("refused.error"))?)?,
        },
        Kind::InsufficientStorage(e) => ConsensusError::InsufficientStorage {
            shard: narrow("insufficient_storage.shard", e.shard)?,
            node: e.node,
            free_bytes: e.free_bytes,
            floor_bytes: e.floor_bytes,
        },
    })
}

pub fn model_error_to_proto(error: &ModelError) -> pb::ModelError {
    use pb::model_error::{self as m, Kind};
    let kind = match error {
        ModelError::InvalidConceptPath { path, reason } => {
            Kind::InvalidConceptPath(m::InvalidConceptPath { path: path.clone(), reason: reason.clone() })
        }
        ModelError::InvalidPredicate { predicate, reason } => {
            Kind::InvalidPredicate(m::InvalidPredicate { predicate: predicate.clone(), reason: reason.clone() })
        }
        ModelError::ValueTooLarge { bytes, limit } => {
            Kind::ValueTooLarge(m::ValueTooLarge { size_bytes: *bytes as u64, limit: *limit as u64 })
        }
        ModelError::InvalidAgentId { reason } => Kind::InvalidAgentId(m::InvalidAgentId { reason: reason.clone() }),
        ModelError::InvalidConfidence { confidence } => {
            Kind::InvalidConfidence(m::InvalidConfidence { confidence_bits: confidence.to_bits() })
        }
        ModelError::TooManySupersedes { count } => {
            Kind::TooManySupersedes(m::TooManySupersedes { count: *count as u64 })
        }
        ModelError::InvalidId { id } => Kind::InvalidId(m::InvalidId { id: id.clone() }),
        ModelError::SupersedesOtherConcept { id } => {
            Kind::SupersedesOtherConcept(m::SupersedesOtherConcept { id: id.clone() })
        }
        ModelError::SourceTooLarge { bytes, limit } => {
            Kind::SourceTooLarge(m::SourceTooLarge { size_bytes: *bytes as u64, limit: *limit as u64 })
        }
        ModelError::InvalidSource => Kind::InvalidSource(pb::Blank {}),
        ModelError::InvalidSignatureFormat => Kind::InvalidSignatureFormat(pb::Blank {}),
        ModelError::InvalidRequestId => Kind::InvalidRequestId(pb::Blank {}),
        ModelError::UnknownLens { lens } => Kind::UnknownLens(m::UnknownLens { lens: lens.clone() }),
        ModelError::InvalidTime { message } => Kind::InvalidTime(m::InvalidTime { message: message.clone() }),
        ModelError::InvalidVote { value } => Kind::InvalidVote(m::InvalidVote { value: *value }),
        ModelError::ReasonTooLong => Kind::ReasonTooLong(pb::Blank {}),
        ModelError::AssertionNotFound { id } => Kind::AssertionNotFound(m::AssertionNotFound { id: id.clone() }),
        ModelError::AlreadyRetracted { id } => Kind::AlreadyRetracted(m::AlreadyRetracted { id: id.clone() }),
        ModelError::NotAssertionOwner { id, agent_id } => {
            Kind::NotAssertionOwner(m::NotAssertionOwner { id: id.clone(), agent_id: agent_id.clone() })
        }
        ModelError::NotQuarantined { id } => Kind::NotQuarantined(m::NotQuarantined { id: id.clone() }),
        ModelError::CommandTooLarge { items, limit } => {
            Kind::CommandTooLarge(m::CommandTooLarge { items: *items as u64, limit: *limit as u64 })
        }
        ModelError::ValueTooDeep { field, depth, limit } => {
            Kind::ValueTooDeep(m::ValueTooDeep { field: field.clone(), depth: *depth as u64, limit: *limit as u64 })
        }
        ModelError::IdSpaceExhausted { index, limit } => {
            Kind::IdSpaceExhausted(m::IdSpaceExhausted { index: *index, limit: *limit })
        }
    };
    pb::ModelError { kind: Some(kind) }
}

pub fn model_error_from_proto(error: pb::ModelError) -> Result<ModelError, CodecError> {
    use pb::model_error::Kind;
    Ok(match error.kind.ok_or(CodecError::Missing("model error"))? {
        Kind::InvalidConceptPath(e) => ModelError::InvalidConceptPath { path: e.path, reason: e.reason },
        Kind::InvalidPredicate(e) => ModelError::InvalidPredicate { predicate: e.predicate, reason: e.reason },
        Kind::ValueTooLarge(e) => ModelError::ValueTooLarge {
            bytes: narrow("value_too_large.size_bytes", e.size_bytes)?,
            limit: narrow("value_too_large.limit", e.limit)?,
        },
        Kind::InvalidAgentId(e) => ModelError::InvalidAgentId { reason: e.reason },
        Kind::InvalidConfidence(e) => ModelError::InvalidConfidence { confidence: f64::from_bits(e.confidence_bits) },
        Kind::TooManySupersedes(e) => {
            ModelError::TooManySupersedes { count: narrow("too_many_supersedes.count", e.count)? }
        }
        Kind::InvalidId(e) => ModelError::InvalidId { id: e.id },
        Kind::SupersedesOtherConcept(e) => ModelError::SupersedesOtherConcept { id: e.id },
        Kind::SourceTooLarge(e) => ModelError::SourceTooLarge {
            bytes: narrow("source_too_large.size_bytes", e.size_bytes)?,
            limit: narrow("source_too_large.limit", e.limit)?,
        },
        Kind::InvalidSource(_) => ModelError::InvalidSource,
        Kind::InvalidSignatureFormat(_) => ModelError::InvalidSignatureFormat,
        Kind::InvalidRequestId(_) => ModelError::InvalidRequestId,
        Kind::UnknownLens(e) => ModelError::UnknownLens { lens: e.lens },
        Kind::InvalidTime(e) => ModelError::InvalidTime { message: e.message },
        Kind::InvalidVote(e) => ModelError::InvalidVote { value: e.value },
        Kind::ReasonTooLong(_) => ModelError::ReasonTooLong,
        Kind::AssertionNotFound(e) => ModelError::AssertionNotFound { id: e.id },
        Kind::AlreadyRetracted(e) => ModelError::AlreadyRetracted { id: e.id },
        Kind::NotAssertionOwner(e) => ModelError::NotAssertionOwner { id: e.id, agent_id: e.agent_id },
        Kind::NotQuarantined(e) => ModelError::NotQuarantined { id: e.id },
        Kind::CommandTooLarge(e) => ModelError::CommandTooLarge {
            items: narrow("command_too_large.items", e.items)?,
            limit: narrow("command_too_large.limit", e.limit)?,
        },
        Kind::IdSpaceExhausted(e) => ModelError::IdSpaceExhausted { index: e.index, limit: e.limit },
        Kind::ValueTooDeep(e) => ModelError::ValueTooDeep {
            field: e.field,
            depth: narrow("value_too_deep.depth", e.depth)?,
            limit: narrow("value_too_deep.limit", e.limit)?,
        },
    })
}

pub fn meta_error_to_proto(error: &MetaError) -> pb::MetaError {
    use pb::meta_error::{self as m, Kind};
    let kind = match error {
        MetaError::UnknownNode { id } => Kind::UnknownNode(m::UnknownNode { id: *id }),
        MetaError::AddressConflict { id, existing } => {
            Kind::AddressConflict(m::AddressConflict { id: *id, existing: existing.clone() })
        }
        MetaError::AddressTaken { addr, id } => Kind::AddressTaken(m::AddressTaken { addr: addr.clone(), id: *id }),
        MetaError::UnknownShard { shard } => Kind::UnknownShard(m::UnknownShard { shard: u32::from(*shard) }),
        MetaError::MoveInProgress { shard } => Kind::MoveInProgress(m::MoveInProgress { shard: u32::from(*shard) }),
        MetaError::NoMove { shard } => Kind::NoMove(m::NoMove { shard: u32::from(*shard) }),
        MetaError::StillHostsReplicas { id, shards } => Kind::StillHostsReplicas(m::StillHostsReplicas {
            id: *id,
            shards: shards.iter().map(|shard| u32::from(*shard)).collect(),
        }),
        MetaError::InvalidMove { shard, node, reason } => {
            Kind::InvalidMove(m::InvalidMove { shard: u32::from(*shard), node: *node, reason: reason.clone() })
        }
        MetaError::NotBootstrapped => Kind::NotBootstrapped(pb::Blank {}),
        MetaError::LastMember { id } => Kind::LastMember(m::LastMember { id: *id }),
    };
    pb::MetaError { kind: Some(kind) }
}

pub fn meta_error_from_proto(error: pb::MetaError) -> Result<MetaError, CodecError> {
    use pb::meta_error::Kind;
    Ok(match error.kind.ok_or(CodecError::Missing("meta error"))? {
        Kind::UnknownNode(e) => MetaError::UnknownNode { id: e.id },
        Kind::AddressConflict(e) => MetaError::AddressConflict { id: e.id, existing: e.existing },
        Kind::AddressTaken(e) => MetaError::AddressTaken { addr: e.addr, id: e.id },
        Kind::UnknownShard(e) => MetaError::UnknownShard { shard: narrow("meta_error.unknown_shard.shard", e.shard)? },
        Kind::MoveInProgress(e) => MetaError::MoveInProgress { shard: narrow("move_in_progress.shard", e.shard)? },
        Kind::NoMove(e) => MetaError::NoMove { shard: narrow("no_move.shard", e.shard)? },
        Kind::StillHostsReplicas(e) => MetaError::StillHostsReplicas {
            id: e.id,
            shards: e
                .shards
                .into_iter()
                .map(|shard| narrow("still_hosts_replicas.shards", shard))
                .collect::<Result<_, _>>()?,
        },
        Kind::InvalidMove(e) => {
            MetaError::InvalidMove { shard: narrow("invalid_move.shard", e.shard)?, node: e.node, reason: e.reason }
        }
        Kind::NotBootstrapped(_) => MetaError::NotBootstrapped,
        Kind::LastMember(e) => MetaError::LastMember { id: e.id },
    })
}

pub fn policy_error_to_proto(error: &PolicyError) -> pb::PolicyError {
    use pb::policy_error::{self as p, Kind};
    let kind = match error {
        PolicyError::InvalidLevel { level } => Kind::InvalidLevel(p::InvalidLevel { level: *level }),
        PolicyError::InsufficientAuthority { grantor, concept_prefix, level, held } => {
            Kind::InsufficientAuthority(p::InsufficientAuthority {
                grantor: grantor.clone(),
                concept_prefix: concept_prefix.clone(),
                level: u32::from(*level),
                held: held.clone(),
            })
        }
        PolicyError::SelfGrant => Kind::SelfGrant(pb::Blank {}),
        PolicyError::UnknownGrant { id } => Kind::UnknownGrant(p::UnknownGrant { id: *id }),
        PolicyError::AlreadyRevoked { id } => Kind::AlreadyRevoked(p::AlreadyRevoked { id: *id }),
        PolicyError::NotGrantor { id, agent_id } => {
            Kind::NotGrantor(p::NotGrantor { id: *id, agent_id: agent_id.clone() })
        }
        PolicyError::BreakerNotOpen { agent_id } => {
            Kind::BreakerNotOpen(p::BreakerNotOpen { agent_id: agent_id.clone() })
        }
        PolicyError::NotMetaGroup => Kind::NotMetaGroup(pb::Blank {}),
    };
    pb::PolicyError { kind: Some(kind) }
}

pub fn policy_error_from_proto(error: pb::PolicyError) -> Result<PolicyError, CodecError> {
    use pb::policy_error::Kind;
    Ok(match error.kind.ok_or(CodecError::Missing("policy error"))? {
        Kind::InvalidLevel(e) => PolicyError::InvalidLevel { level: e.level },
        Kind::InsufficientAuthority(e) => PolicyError::InsufficientAuthority {
            grantor: e.grantor,
            concept_prefix: e.concept_prefix,
            level: narrow("insufficient_authority.level", e.level)?,
            held: e.held,
        },
        Kind::SelfGrant(_) => PolicyError::SelfGrant,
        Kind::UnknownGrant(e) => PolicyError::UnknownGrant { id: e.id },
        Kind::AlreadyRevoked(e) => PolicyError::AlreadyRevoked { id: e.id },
        Kind::NotGrantor(e) => PolicyError::NotGrantor { id: e.id, agent_id: e.agent_id },
        Kind::BreakerNotOpen(e) => PolicyError::BreakerNotOpen { agent_id: e.agent_id },
        Kind::NotMetaGroup(_) => PolicyError::NotMetaGroup,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::super::tests::{round_trip, same, text};
    use super::*;

    fn count() -> impl Strategy<Value = usize> {
        prop_oneof![Just(0usize), Just(usize::MAX), any::<usize>()]
    }

    /// Every variant of `ModelError`, any field values.
    pub(crate) fn model_error() -> impl Strategy<Value = ModelError> {
        prop_oneof![
            (text(), text()).prop_map(|(path, reason)| ModelError::InvalidConceptPath { path, reason }),
            (text(), text()).prop_map(|(predicate, reason)| ModelError::InvalidPredicate { predicate, reason }),
            (count(), count()).prop_map(|(bytes, limit)| ModelError::ValueTooLarge { bytes, limit }),
            text().prop_map(|reason| ModelError::InvalidAgentId { reason }),
            any::<f64>().prop_map(|confidence| ModelError::InvalidConfidence { confidence }),
            count().prop_map(|count| ModelError::TooManySupersedes { count }),
            text().prop_map(|id| ModelError::InvalidId { id }),
            text().prop_map(|id| ModelError::SupersedesOtherConcept { id }),
            (count(), count()).prop_map(|(bytes, limit)| ModelError::SourceTooLarge { bytes, limit }),
            Just(ModelError::InvalidSource),
            Just(ModelError::InvalidSignatureFormat),
            Just(ModelError::InvalidRequestId),
            text().prop_map(|lens| ModelError::UnknownLens { lens }),
            text().prop_map(|message| ModelError::InvalidTime { message }),
            any::<i64>().prop_map(|value| ModelError::InvalidVote { value }),
            Just(ModelError::ReasonTooLong),
            text().prop_map(|id| ModelError::AssertionNotFound { id }),
            text().prop_map(|id| ModelError::AlreadyRetracted { id }),
            (text(), text()).prop_map(|(id, agent_id)| ModelError::NotAssertionOwner { id, agent_id }),
            text().prop_map(|id| ModelError::NotQuarantined { id }),
            (count(), count()).prop_map(|(items, limit)| ModelError::CommandTooLarge { items, limit }),
            (any::<u64>(), any::<u64>()).prop_map(|(index, limit)| ModelError::IdSpaceExhausted { index, limit }),
            (text(), count(), count()).prop_map(|(field, depth, limit)| ModelError::ValueTooDeep {
                field,
                depth,
                limit
            }),
        ]
    }

    /// Every variant of `MetaError`, any field values.
    pub(crate) fn meta_error() -> impl Strategy<Value = MetaError> {
        prop_oneof![
            any::<u64>().prop_map(|id| MetaError::UnknownNode { id }),
            (any::<u64>(), text()).prop_map(|(id, existing)| MetaError::AddressConflict { id, existing }),
            (text(), any::<u64>()).prop_map(|(addr, id)| MetaError::AddressTaken { addr, id }),
            any::<u16>().prop_map(|shard| MetaError::UnknownShard { shard }),
            any::<u16>().prop_map(|shard| MetaError::MoveInProgress { shard }),
            any::<u16>().prop_map(|shard| MetaError::NoMove { shard }),
            (any::<u64>(), proptest::collection::vec(any::<u16>(), 0..5))
                .prop_map(|(id, shards)| MetaError::StillHostsReplicas { id, shards }),
            (any::<u16>(), any::<u64>(), text()).prop_map(|(shard, node, reason)| MetaError::InvalidMove {
                shard,
                node,
                reason
            }),
            Just(MetaError::NotBootstrapped),
            any::<u64>().prop_map(|id| MetaError::LastMember { id }),
        ]
    }

    /// Every variant of `PolicyError`, any field values.
    pub(crate) fn policy_error() -> impl Strategy<Value = PolicyError> {
        prop_oneof![
            any::<u32>().prop_map(|level| PolicyError::InvalidLevel { level }),
            (text(), text(), any::<u8>(), text()).prop_map(|(grantor, concept_prefix, level, held)| {
                PolicyError::InsufficientAuthority { grantor, concept_prefix, level, held }
            }),
            Just(PolicyError::SelfGrant),
            any::<u64>().prop_map(|id| PolicyError::UnknownGrant { id }),
            any::<u64>().prop_map(|id| PolicyError::AlreadyRevoked { id }),
            (any::<u64>(), text()).prop_map(|(id, agent_id)| PolicyError::NotGrantor { id, agent_id }),
            text().prop_map(|agent_id| PolicyError::BreakerNotOpen { agent_id }),
            Just(PolicyError::NotMetaGroup),
        ]
    }

    /// Every variant of `ConsensusError`, any field values.
    pub(crate) fn consensus_error() -> impl Strategy<Value = ConsensusError> {
        let shard = any::<u16>();
        prop_oneof![
            shard.prop_map(|shard| ConsensusError::NoQuorum { shard }),
            (shard, any::<Option<u64>>()).prop_map(|(shard, leader)| ConsensusError::NotLeader { shard, leader }),
            (shard, any::<u64>()).prop_map(|(shard, timeout_ms)| ConsensusError::Timeout { shard, timeout_ms }),
            shard.prop_map(|shard| ConsensusError::ShuttingDown { shard }),
            shard.prop_map(|shard| ConsensusError::UnknownShard { shard }),
            text().prop_map(ConsensusError::Startup),
            (shard, text()).prop_map(|(shard, message)| ConsensusError::Internal { shard, message }),
            (shard, text()).prop_map(|(shard, message)| ConsensusError::Storage { shard, message }),
            (shard, text()).prop_map(|(shard, message)| ConsensusError::MembershipChange { shard, message }),
            (shard, any::<u64>(), text()).prop_map(|(shard, leader, message)| ConsensusError::LeaderUnreachable {
                shard,
                leader,
                message
            }),
            (any::<Option<u16>>(), any::<u64>())
                .prop_map(|(shard, limit_bytes)| ConsensusError::QueryMemoryExceeded { shard, limit_bytes }),
            (shard, any::<u64>()).prop_map(|(shard, timeout_ms)| ConsensusError::OutcomeUnknown { shard, timeout_ms }),
            (shard, count()).prop_map(|(shard, queued)| ConsensusError::Overloaded { shard, queued }),
            (shard, count()).prop_map(|(shard, queued)| ConsensusError::ReadsOverloaded { shard, queued }),
            shard.prop_map(|shard| ConsensusError::CatchingUp { shard }),
            (shard, model_error()).prop_map(|(shard, error)| ConsensusError::Refused { shard, error }),
            (shard, any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(shard, node, free_bytes, floor_bytes)| {
                ConsensusError::InsufficientStorage { shard, node, free_bytes, floor_bytes }
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_consensus_error_round_trips(error in consensus_error()) {
            let decoded = consensus_error_from_proto(round_trip(&consensus_error_to_proto(&error))).expect("decodes");
            prop_assert!(same(&error, &decoded), "{:?} came back as {:?}", error, decoded);
            prop_assert_eq!(error.code(), decoded.code());
        }

        #[test]
        fn every_model_error_round_trips(error in model_error()) {
            let decoded = model_error_from_proto(round_trip(&model_error_to_proto(&error))).expect("decodes");
            prop_assert!(same(&error, &decoded), "{:?} came back as {:?}", error, decoded);
            // Exact, NaN payloads and -0.0 included (JSON would not tell them apart).
            if let (ModelError::InvalidConfidence { confidence: a }, ModelError::InvalidConfidence { confidence: b }) =
                (&error, &decoded)
            {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
        }

        #[test]
        fn every_meta_error_round_trips(error in meta_error()) {
            let decoded = meta_error_from_proto(round_trip(&meta_error_to_proto(&error))).expect("decodes");
            prop_assert_eq!(&error, &decoded);
        }

        #[test]
        fn every_policy_error_round_trips(error in policy_error()) {
            let decoded = policy_error_from_proto(round_trip(&policy_error_to_proto(&error))).expect("decodes");
            prop_assert_eq!(&error, &decoded);
        }

        /// Arbitrary bytes never panic the decoders: they are an error or a named refusal.
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(message) = <pb::ConsensusError as prost::Message>::decode(bytes.as_slice()) {
                let _ = consensus_error_from_proto(message);
            }
            if let Ok(message) = <pb::ModelError as prost::Message>::decode(bytes.as_slice()) {
                let _ = model_error_from_proto(message);
            }
            if let Ok(message) = <pb::MetaError as prost::Message>::decode(bytes.as_slice()) {
                let _ = meta_error_from_proto(message);
            }
            if let Ok(message) = <pb::PolicyError as prost::Message>::decode(bytes.as_slice()) {
                let _ = policy_error_from_proto(message);
            }
        }
    }

    #[test]
    fn out_of_range_fields_are_named() {
        use pb::consensus_error::{Kind, NotLeader, Refused};
        let shard = pb::ConsensusError { kind: Some(Kind::NotLeader(NotLeader { shard: 70_000, leader: None })) };
        assert!(matches!(
            consensus_error_from_proto(shard),
            Err(CodecError::Invalid { field: "not_leader.shard", .. })
        ));
        let no_error = pb::ConsensusError { kind: Some(Kind::Refused(Refused { shard: 1, error: None })) };
        assert!(matches!(consensus_error_from_proto(no_error), Err(CodecError::Missing("refused.error"))));
        assert!(matches!(
            consensus_error_from_proto(pb::ConsensusError { kind: None }),
            Err(CodecError::Missing("consensus error"))
        ));
        let level = pb::PolicyError {
            kind: Some(pb::policy_error::Kind::InsufficientAuthority(pb::policy_error::InsufficientAuthority {
                level: 256,
                ..Default::default()
            })),
        };
        assert!(matches!(
            policy_error_from_proto(level),
            Err(CodecError::Invalid { field: "insufficient_authority.level", .. })
        ));
    }
}
