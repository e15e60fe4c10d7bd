//! The state machine's answers in their protobuf form (`proto/request.proto`): the
//! [`ShardResponse`] a leader sends back for a forwarded write, with the outcome or the error
//! of each item ([`AssertOutcome`], [`EventOutcome`]), and the meta group's answers
//! ([`PolicyOutcome`] with the [`Grant`] or [`BreakerRecord`] it recorded).

use stemedb_proto::raft as pb;

use super::errors::{
    meta_error_from_proto, meta_error_to_proto, model_error_from_proto, model_error_to_proto, policy_error_from_proto,
    policy_error_to_proto,
};
use super::{breaker_cause_from_proto, breaker_cause_to_proto, id_bytes, id_from, narrow, CodecError};
use crate::meta::policy::{BreakerRecord, PolicyOutcome};
use crate::model::assertion::QuarantineDecision;
use crate::model::authority::Grant;
use crate::model::ModelError;
use crate::shard::command::{AssertOutcome, EventOutcome, ShardResponse};

pub fn response_to_proto(response: &ShardResponse) -> pb::ShardResponse {
    use pb::shard_response::Kind;
    let kind = match response {
        ShardResponse::Asserted(items) => {
            Kind::Asserted(pb::AssertResults { items: items.iter().map(assert_result_to_proto).collect() })
        }
        ShardResponse::Voted(result) => Kind::Voted(event_result_to_proto(result)),
        ShardResponse::Retracted(result) => Kind::Retracted(event_result_to_proto(result)),
        ShardResponse::Quarantine(result) => Kind::Quarantine(event_result_to_proto(result)),
        ShardResponse::Meta(result) => {
            use pb::meta_result::Result as R;
            Kind::Meta(pb::MetaResult {
                result: Some(match result {
                    Ok(()) => R::Done(pb::Blank {}),
                    Err(error) => R::Error(meta_error_to_proto(error)),
                }),
            })
        }
        ShardResponse::Policy(result) => {
            use pb::policy_result::Result as R;
            Kind::Policy(pb::PolicyResult {
                result: Some(match result {
                    Ok(outcome) => R::Outcome(policy_outcome_to_proto(outcome)),
                    Err(error) => R::Error(policy_error_to_proto(error)),
                }),
            })
        }
        ShardResponse::TokenExpired => Kind::TokenExpired(pb::Blank {}),
        ShardResponse::Refused(error) => Kind::Refused(model_error_to_proto(error)),
        ShardResponse::Empty => Kind::Empty(pb::Blank {}),
        ShardResponse::Parts(parts) => {
            Kind::Parts(pb::PartsResult { parts: parts.iter().map(response_to_proto).collect() })
        }
    };
    pb::ShardResponse { kind: Some(kind) }
}

pub fn response_from_proto(response: pb::ShardResponse) -> Result<ShardResponse, CodecError> {
    use pb::shard_response::Kind;
    Ok(match response.kind.ok_or(CodecError::Missing("shard response"))? {
        Kind::Asserted(results) => {
            ShardResponse::Asserted(results.items.into_iter().map(assert_result_from_proto).collect::<Result<_, _>>()?)
        }
        Kind::Voted(result) => ShardResponse::Voted(event_result_from_proto(result, VOTED)?),
        Kind::Retracted(result) => ShardResponse::Retracted(event_result_from_proto(result, RETRACTED)?),
        Kind::Quarantine(result) => ShardResponse::Quarantine(event_result_from_proto(result, QUARANTINE)?),
        Kind::Meta(result) => {
            use pb::meta_result::Result as R;
            ShardResponse::Meta(match result.result.ok_or(CodecError::Missing("meta result"))? {
                R::Done(_) => Ok(()),
                R::Error(error) => Err(meta_error_from_proto(error)?),
            })
        }
        Kind::Policy(result) => {
            use pb::policy_result::Result as R;
            ShardResponse::Policy(match result.result.ok_or(CodecError::Missing("policy result"))? {
                R::Outcome(outcome) => Ok(policy_outcome_from_proto(outcome)?),
                R::Error(error) => Err(policy_error_from_proto(error)?),
            })
        }
        Kind::TokenExpired(_) => ShardResponse::TokenExpired,
        Kind::Refused(error) => ShardResponse::Refused(model_error_from_proto(error)?),
        Kind::Empty(_) => ShardResponse::Empty,
        Kind::Parts(result) => {
            ShardResponse::Parts(result.parts.into_iter().map(response_from_proto).collect::<Result<_, _>>()?)
        }
    })
}

fn assert_result_to_proto(result: &Result<AssertOutcome, ModelError>) -> pb::AssertResult {
    use pb::assert_result::Result as R;
    pb::AssertResult {
        result: Some(match result {
            Ok(outcome) => R::Outcome(outcome_to_proto(outcome)),
            Err(error) => R::Error(model_error_to_proto(error)),
        }),
    }
}

fn assert_result_from_proto(result: pb::AssertResult) -> Result<Result<AssertOutcome, ModelError>, CodecError> {
    use pb::assert_result::Result as R;
    Ok(match result.result.ok_or(CodecError::Missing("asserted.result"))? {
        R::Outcome(outcome) => Ok(outcome_from_proto(outcome)?),
        R::Error(error) => Err(model_error_from_proto(error)?),
    })
}

pub(super) fn outcome_to_proto(outcome: &AssertOutcome) -> pb::AssertOutcome {
    pb::AssertOutcome {
        id: id_bytes(outcome.id),
        shard: u32::from(outcome.shard),
        log_index: outcome.log_index,
        asserted_at_us: outcome.asserted_at_us,
        duplicate: outcome.duplicate,
        quarantine: outcome
            .quarantine
            .as_ref()
            .map(|q| pb::QuarantineDecision { reason: q.reason.clone(), detail: q.detail.clone() }),
    }
}

pub(super) fn outcome_from_proto(outcome: pb::AssertOutcome) -> Result<AssertOutcome, CodecError> {
    Ok(AssertOutcome {
        id: id_from("asserted.id", &outcome.id)?,
        shard: narrow("asserted.shard", outcome.shard)?,
        log_index: outcome.log_index,
        asserted_at_us: outcome.asserted_at_us,
        duplicate: outcome.duplicate,
        quarantine: outcome.quarantine.map(|q| QuarantineDecision { reason: q.reason, detail: q.detail }),
    })
}

fn event_result_to_proto(result: &Result<EventOutcome, ModelError>) -> pb::EventResult {
    use pb::event_result::Result as R;
    pb::EventResult {
        result: Some(match result {
            Ok(outcome) => R::Outcome(pb::EventOutcome {
                assertion_id: id_bytes(outcome.assertion_id),
                at_us: outcome.at_us,
                log_index: outcome.log_index,
            }),
            Err(error) => R::Error(model_error_to_proto(error)),
        }),
    }
}

/// The fields an event result's errors name: its result, and its outcome's assertion id.
struct EventFields(&'static str, &'static str);

const VOTED: EventFields = EventFields("voted.result", "voted.assertion_id");
const RETRACTED: EventFields = EventFields("retracted.result", "retracted.assertion_id");
const QUARANTINE: EventFields = EventFields("quarantine.result", "quarantine.assertion_id");

fn event_result_from_proto(
    result: pb::EventResult,
    fields: EventFields,
) -> Result<Result<EventOutcome, ModelError>, CodecError> {
    use pb::event_result::Result as R;
    Ok(match result.result.ok_or(CodecError::Missing(fields.0))? {
        R::Outcome(outcome) => Ok(EventOutcome {
            assertion_id: id_from(fields.1, &outcome.assertion_id)?,
            at_us: outcome.at_us,
            log_index: outcome.log_index,
        }),
        R::Error(error) => Err(model_error_from_proto(error)?),
    })
}

pub fn policy_outcome_to_proto(outcome: &PolicyOutcome) -> pb::PolicyOutcome {
    use pb::policy_outcome::{Kind, Root};
    let kind = match outcome {
        PolicyOutcome::Root { agent_id, level, changed } => {
            Kind::Root(Root { agent_id: agent_id.clone(), level: level.map(u32::from), changed: *changed })
        }
        PolicyOutcome::Grant(grant) => Kind::Grant(pb::GrantRecord {
            id: grant.id,
            grantor: grant.grantor.clone(),
            grantee: grant.grantee.clone(),
            concept_prefix: grant.concept_prefix.clone(),
            level: u32::from(grant.level),
            granted_at_us: grant.granted_at_us,
            revoked_at_us: grant.revoked_at_us,
        }),
        PolicyOutcome::Breaker(record) => Kind::Breaker(pb::BreakerRecord {
            agent_id: record.agent_id.clone(),
            cause: breaker_cause_to_proto(record.cause),
            reason: record.reason.clone(),
            opened_at_us: record.opened_at_us,
            open_until_us: record.open_until_us,
            trips: record.trips,
            closed_at_us: record.closed_at_us,
            closed_reason: record.closed_reason.clone(),
        }),
    };
    pb::PolicyOutcome { kind: Some(kind) }
}

pub fn policy_outcome_from_proto(outcome: pb::PolicyOutcome) -> Result<PolicyOutcome, CodecError> {
    use pb::policy_outcome::Kind;
    Ok(match outcome.kind.ok_or(CodecError::Missing("policy outcome"))? {
        Kind::Root(root) => PolicyOutcome::Root {
            agent_id: root.agent_id,
            level: root.level.map(|level| narrow("policy_outcome.root.level", level)).transpose()?,
            changed: root.changed,
        },
        Kind::Grant(grant) => PolicyOutcome::Grant(Grant {
            id: grant.id,
            grantor: grant.grantor,
            grantee: grant.grantee,
            concept_prefix: grant.concept_prefix,
            level: narrow("policy_outcome.grant.level", grant.level)?,
            granted_at_us: grant.granted_at_us,
            revoked_at_us: grant.revoked_at_us,
        }),
        Kind::Breaker(record) => PolicyOutcome::Breaker(BreakerRecord {
            agent_id: record.agent_id,
            cause: breaker_cause_from_proto("policy_outcome.breaker.cause", record.cause)?,
            reason: record.reason,
            opened_at_us: record.opened_at_us,
            open_until_us: record.open_until_us,
            trips: record.trips,
            closed_at_us: record.closed_at_us,
            closed_reason: record.closed_reason,
        }),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::super::errors::tests::{meta_error, model_error, policy_error};
    use super::super::tests::{id, same, text};
    use super::*;
    use crate::meta::policy::{BreakerCause, PolicyError};

    fn quarantine() -> impl Strategy<Value = Option<QuarantineDecision>> {
        proptest::option::of((text(), text()).prop_map(|(reason, detail)| QuarantineDecision { reason, detail }))
    }

    pub(crate) fn assert_outcome() -> impl Strategy<Value = AssertOutcome> {
        (id(), any::<u16>(), any::<u64>(), any::<u64>(), any::<bool>(), quarantine()).prop_map(
            |(id, shard, log_index, asserted_at_us, duplicate, quarantine)| AssertOutcome {
                id,
                shard,
                log_index,
                asserted_at_us,
                duplicate,
                quarantine,
            },
        )
    }

    fn event_result() -> impl Strategy<Value = Result<EventOutcome, ModelError>> {
        prop_oneof![
            (id(), any::<u64>(), any::<u64>()).prop_map(|(assertion_id, at_us, log_index)| {
                Ok::<_, ModelError>(EventOutcome { assertion_id, at_us, log_index })
            }),
            model_error().prop_map(Err::<EventOutcome, ModelError>),
        ]
    }

    /// Every variant of `PolicyOutcome`, any field values.
    pub(crate) fn policy_outcome() -> impl Strategy<Value = PolicyOutcome> {
        let cause =
            prop_oneof![Just(BreakerCause::Manual), Just(BreakerCause::WriteRate), Just(BreakerCause::InvalidRate)];
        prop_oneof![
            (text(), any::<Option<u8>>(), any::<bool>()).prop_map(|(agent_id, level, changed)| PolicyOutcome::Root {
                agent_id,
                level,
                changed
            }),
            (any::<u64>(), text(), text(), text(), any::<u8>(), any::<u64>(), any::<Option<u64>>()).prop_map(
                |(id, grantor, grantee, concept_prefix, level, granted_at_us, revoked_at_us)| {
                    PolicyOutcome::Grant(Grant {
                        id,
                        grantor,
                        grantee,
                        concept_prefix,
                        level,
                        granted_at_us,
                        revoked_at_us,
                    })
                }
            ),
            (
                (text(), cause, text(), any::<u64>()),
                (any::<Option<u64>>(), any::<u32>(), any::<Option<u64>>(), proptest::option::of(text())),
            )
                .prop_map(
                    |((agent_id, cause, reason, opened_at_us), (open_until_us, trips, closed_at_us, closed_reason))| {
                        PolicyOutcome::Breaker(BreakerRecord {
                            agent_id,
                            cause,
                            reason,
                            opened_at_us,
                            open_until_us,
                            trips,
                            closed_at_us,
                            closed_reason,
                        })
                    }
                ),
        ]
    }

    /// Every variant of `ShardResponse`, any field values.
    /// Every kind of response, the answers to a leader's entry of several parts included.
    pub(crate) fn response() -> impl Strategy<Value = ShardResponse> {
        let single = single_response();
        prop_oneof![
            4 => single,
            1 => proptest::collection::vec(single_response(), 0..4).prop_map(ShardResponse::Parts),
        ]
    }

    fn single_response() -> impl Strategy<Value = ShardResponse> {
        prop_oneof![
            proptest::collection::vec(
                prop_oneof![
                    assert_outcome().prop_map(Ok::<AssertOutcome, ModelError>),
                    model_error().prop_map(Err::<AssertOutcome, ModelError>),
                ],
                0..4
            )
            .prop_map(ShardResponse::Asserted),
            event_result().prop_map(ShardResponse::Voted),
            event_result().prop_map(ShardResponse::Retracted),
            event_result().prop_map(ShardResponse::Quarantine),
            proptest::option::of(meta_error()).prop_map(|error| ShardResponse::Meta(error.map_or(Ok(()), Err))),
            prop_oneof![
                policy_outcome().prop_map(Ok::<PolicyOutcome, PolicyError>),
                policy_error().prop_map(Err::<PolicyOutcome, PolicyError>),
            ]
            .prop_map(ShardResponse::Policy),
            Just(ShardResponse::TokenExpired),
            model_error().prop_map(ShardResponse::Refused),
            Just(ShardResponse::Empty),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_response_round_trips(response in response()) {
            let bytes = prost::Message::encode_to_vec(&response_to_proto(&response));
            let decoded = response_from_proto(prost::Message::decode(bytes.as_slice()).expect("decode"))
                .expect("a response");
            prop_assert!(same(&response, &decoded), "{:?} came back as {:?}", response, decoded);
        }

        #[test]
        fn every_policy_outcome_round_trips(outcome in policy_outcome()) {
            let bytes = prost::Message::encode_to_vec(&policy_outcome_to_proto(&outcome));
            let decoded = policy_outcome_from_proto(prost::Message::decode(bytes.as_slice()).expect("decode"))
                .expect("an outcome");
            prop_assert_eq!(&outcome, &decoded);
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(message) = <pb::ShardResponse as prost::Message>::decode(bytes.as_slice()) {
                let _ = response_from_proto(message);
            }
            if let Ok(message) = <pb::PolicyOutcome as prost::Message>::decode(bytes.as_slice()) {
                let _ = policy_outcome_from_proto(message);
            }
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let short_id = pb::ShardResponse {
            kind: Some(pb::shard_response::Kind::Retracted(pb::EventResult {
                result: Some(pb::event_result::Result::Outcome(pb::EventOutcome {
                    assertion_id: vec![1, 2],
                    ..Default::default()
                })),
            })),
        };
        assert!(matches!(
            response_from_proto(short_id),
            Err(CodecError::Invalid { field: "retracted.assertion_id", .. })
        ));
        let cause = pb::PolicyOutcome {
            kind: Some(pb::policy_outcome::Kind::Breaker(pb::BreakerRecord { cause: 99, ..Default::default() })),
        };
        assert!(matches!(
            policy_outcome_from_proto(cause),
            Err(CodecError::Invalid { field: "policy_outcome.breaker.cause", .. })
        ));
        assert!(matches!(
            response_from_proto(pb::ShardResponse { kind: None }),
            Err(CodecError::Missing("shard response"))
        ));
    }
}
