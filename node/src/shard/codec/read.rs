//! Reads of a shard executed by another node, and what they found, in their protobuf form
//! (`proto/request.proto`): a [`ShardRead`] (with its [`Listing`]) and the [`ShardReadResult`]
//! that answers it: claims grouped by predicate, an assertion's facts and retraction, concept
//! entries, or listed facts. Claims come back in a fresh [`ClaimsRead`] (its memory estimate is
//! computed again when asked for).

use std::sync::Arc;

use stemedb_proto::raft as pb;

use super::{id_bytes, id_from, narrow, record_from_proto, record_to_proto, CodecError};
use crate::model::lens::{ClaimFacts, Lens, SupersessionFact, VoteFact};
use crate::shard::claims_cache::RenderedSlot;
use crate::shard::progress::RetractionRecord;
use crate::shard::reader::{
    ClaimGroup, ClaimsRead, ConceptEntry, Listing, ShardRead, ShardReadAnswer, ShardReadResult,
};

pub fn read_to_proto(read: &ShardRead) -> pb::ShardReadQuery {
    use pb::shard_read_query::{self as q, Kind};
    let kind = match read {
        // `render` names a rendering of this node's claims cache: it never leaves the node.
        ShardRead::Claims { concept_path, predicate, memory_limit, render: _ } => Kind::Claims(q::Claims {
            concept_path: concept_path.clone(),
            predicate: predicate.clone(),
            memory_limit: *memory_limit,
        }),
        ShardRead::Assertion { id } => Kind::Assertion(q::Assertion { id: id_bytes(*id) }),
        ShardRead::Concepts { prefix, after, limit } => Kind::Concepts(q::Concepts {
            prefix: prefix.clone(),
            after: after.as_ref().map(|(concept_path, predicate)| pb::ConceptKey {
                concept_path: concept_path.clone(),
                predicate: predicate.clone(),
            }),
            limit: *limit as u64,
        }),
        ShardRead::List { listing, after, limit } => Kind::List(q::List {
            listing: Some(listing_to_proto(listing)),
            after: after.as_ref().map(|id| id_bytes(*id)),
            limit: *limit as u64,
        }),
    };
    pb::ShardReadQuery { kind: Some(kind) }
}

pub fn read_from_proto(read: pb::ShardReadQuery) -> Result<ShardRead, CodecError> {
    use pb::shard_read_query::Kind;
    Ok(match read.kind.ok_or(CodecError::Missing("shard read"))? {
        Kind::Claims(r) => ShardRead::Claims {
            concept_path: r.concept_path,
            predicate: r.predicate,
            memory_limit: r.memory_limit,
            render: None,
        },
        Kind::Assertion(r) => ShardRead::Assertion { id: id_from("read.assertion.id", &r.id)? },
        Kind::Concepts(r) => ShardRead::Concepts {
            prefix: r.prefix,
            after: r.after.map(|key| (key.concept_path, key.predicate)),
            limit: narrow("read.concepts.limit", r.limit)?,
        },
        Kind::List(r) => ShardRead::List {
            listing: listing_from_proto(r.listing.ok_or(CodecError::Missing("read.list.listing"))?)?,
            after: r.after.map(|id| id_from("read.list.after", &id)).transpose()?,
            limit: narrow("read.list.limit", r.limit)?,
        },
    })
}

fn listing_to_proto(listing: &Listing) -> pb::Listing {
    use pb::listing::{self as l, Kind};
    let kind = match listing {
        Listing::Quarantined { agent_id, concept_prefix } => {
            Kind::Quarantined(l::Quarantined { agent_id: agent_id.clone(), concept_prefix: concept_prefix.clone() })
        }
        Listing::ByAgent { agent_id, since_us, until_us } => {
            Kind::ByAgent(l::ByAgent { agent_id: agent_id.clone(), since_us: *since_us, until_us: *until_us })
        }
        Listing::ByTime { since_us, until_us } => Kind::ByTime(l::ByTime { since_us: *since_us, until_us: *until_us }),
    };
    pb::Listing { kind: Some(kind) }
}

fn listing_from_proto(listing: pb::Listing) -> Result<Listing, CodecError> {
    use pb::listing::Kind;
    Ok(match listing.kind.ok_or(CodecError::Missing("read.list.listing.kind"))? {
        Kind::Quarantined(l) => Listing::Quarantined { agent_id: l.agent_id, concept_prefix: l.concept_prefix },
        Kind::ByAgent(l) => Listing::ByAgent { agent_id: l.agent_id, since_us: l.since_us, until_us: l.until_us },
        Kind::ByTime(l) => Listing::ByTime { since_us: l.since_us, until_us: l.until_us },
    })
}

pub fn read_result_to_proto(result: &ShardReadResult) -> pb::ShardReadResult {
    use pb::shard_read_answer::Kind;
    let kind = match &result.answer {
        ShardReadAnswer::Claims(read) => {
            Kind::Claims(pb::ClaimsRead { groups: read.groups.iter().map(group_to_proto).collect() })
        }
        ShardReadAnswer::Assertion(found) => Kind::Assertion(pb::AssertionRead {
            found: found.as_ref().map(|(facts, retraction)| pb::assertion_read::Found {
                facts: Some(facts_to_proto(facts)),
                retraction: retraction.as_ref().map(retraction_to_proto),
            }),
        }),
        ShardReadAnswer::Concepts(entries) => {
            Kind::Concepts(pb::ConceptEntries { entries: entries.iter().map(concept_to_proto).collect() })
        }
        ShardReadAnswer::Listed(claims) => {
            Kind::Listed(pb::ClaimFactsList { claims: claims.iter().map(facts_to_proto).collect() })
        }
        ShardReadAnswer::Rendered(slot) => Kind::Rendered(pb::RenderedAnswer {
            lens: Lens::NAMES[slot.lens as usize].to_string(),
            policy_version: slot.policy_version,
            count: slot.count as u64,
            groups: slot.groups as u64,
            claims_bytes: slot.claims_bytes as u64,
            json: slot.json.get().to_string(),
        }),
    };
    pb::ShardReadResult {
        answer: Some(pb::ShardReadAnswer { kind: Some(kind) }),
        applied_index: result.applied_index,
        staleness_ms: result.staleness_ms,
    }
}

pub fn read_result_from_proto(result: pb::ShardReadResult) -> Result<ShardReadResult, CodecError> {
    use pb::shard_read_answer::Kind;
    let answer = result.answer.ok_or(CodecError::Missing("read result.answer"))?;
    let answer = match answer.kind.ok_or(CodecError::Missing("read result.answer.kind"))? {
        Kind::Claims(read) => ShardReadAnswer::Claims(Arc::new(ClaimsRead::new(
            read.groups.into_iter().map(group_from_proto).collect::<Result<_, _>>()?,
        ))),
        Kind::Assertion(read) => ShardReadAnswer::Assertion(match read.found {
            Some(found) => Some((
                facts_from_proto(found.facts.ok_or(CodecError::Missing("read result.assertion.facts"))?)?,
                found.retraction.map(retraction_from_proto),
            )),
            None => None,
        }),
        Kind::Concepts(concepts) => {
            ShardReadAnswer::Concepts(concepts.entries.into_iter().map(concept_from_proto).collect())
        }
        Kind::Listed(list) => {
            ShardReadAnswer::Listed(list.claims.into_iter().map(facts_from_proto).collect::<Result<_, _>>()?)
        }
        Kind::Rendered(r) => ShardReadAnswer::Rendered(RenderedSlot {
            lens: r
                .lens
                .parse()
                .map_err(|_| CodecError::Invalid { field: "read result.rendered.lens", reason: r.lens })?,
            policy_version: r.policy_version,
            count: narrow("read result.rendered.count", r.count)?,
            groups: narrow("read result.rendered.groups", r.groups)?,
            claims_bytes: narrow("read result.rendered.claims_bytes", r.claims_bytes)?,
            json: Arc::from(
                serde_json::value::RawValue::from_string(r.json)
                    .map_err(|e| CodecError::Invalid { field: "read result.rendered.json", reason: e.to_string() })?,
            ),
        }),
    };
    Ok(ShardReadResult { answer, applied_index: result.applied_index, staleness_ms: result.staleness_ms })
}

fn group_to_proto(group: &ClaimGroup) -> pb::ClaimGroup {
    pb::ClaimGroup {
        concept_path: group.concept_path.clone(),
        predicate: group.predicate.clone(),
        claims: group.claims.iter().map(|facts| facts_to_proto(facts)).collect(),
    }
}

fn group_from_proto(group: pb::ClaimGroup) -> Result<ClaimGroup, CodecError> {
    Ok(ClaimGroup {
        concept_path: group.concept_path,
        predicate: group.predicate,
        claims: group
            .claims
            .into_iter()
            .map(|facts| facts_from_proto(facts).map(Arc::new))
            .collect::<Result<_, _>>()?,
    })
}

fn facts_to_proto(facts: &ClaimFacts) -> pb::ClaimFacts {
    pb::ClaimFacts {
        record: Some(record_to_proto(&facts.record)),
        retracted_at_us: facts.retracted_at_us,
        released_at_us: facts.released_at_us,
        supersessions: facts
            .supersessions
            .iter()
            .map(|s| pb::SupersessionFact {
                by: id_bytes(s.by),
                at_us: s.at_us,
                by_retracted_at_us: s.by_retracted_at_us,
            })
            .collect(),
        votes: facts
            .votes
            .iter()
            .map(|v| pb::VoteFact { agent_id: v.agent_id.clone(), value: i32::from(v.value), at_us: v.at_us })
            .collect(),
    }
}

fn facts_from_proto(facts: pb::ClaimFacts) -> Result<ClaimFacts, CodecError> {
    Ok(ClaimFacts {
        record: record_from_proto(facts.record.ok_or(CodecError::Missing("claim facts.record"))?)?,
        retracted_at_us: facts.retracted_at_us,
        released_at_us: facts.released_at_us,
        supersessions: facts
            .supersessions
            .into_iter()
            .map(|s| -> Result<SupersessionFact, CodecError> {
                Ok(SupersessionFact {
                    by: id_from("claim facts.supersessions.by", &s.by)?,
                    at_us: s.at_us,
                    by_retracted_at_us: s.by_retracted_at_us,
                })
            })
            .collect::<Result<_, _>>()?,
        votes: facts
            .votes
            .into_iter()
            .map(|v| -> Result<VoteFact, CodecError> {
                let value = narrow("claim facts.votes.value", v.value)?;
                Ok(VoteFact { agent_id: v.agent_id, value, at_us: v.at_us })
            })
            .collect::<Result<_, _>>()?,
    })
}

pub(super) fn retraction_to_proto(retraction: &RetractionRecord) -> pb::RetractionRecord {
    pb::RetractionRecord { at_us: retraction.at_us, by: retraction.by.clone(), reason: retraction.reason.clone() }
}

pub(super) fn retraction_from_proto(retraction: pb::RetractionRecord) -> RetractionRecord {
    RetractionRecord { at_us: retraction.at_us, by: retraction.by, reason: retraction.reason }
}

fn concept_to_proto(entry: &ConceptEntry) -> pb::ConceptEntry {
    pb::ConceptEntry {
        concept_path: entry.concept_path.clone(),
        predicate: entry.predicate.clone(),
        assertions: entry.assertions,
    }
}

fn concept_from_proto(entry: pb::ConceptEntry) -> ConceptEntry {
    ConceptEntry { concept_path: entry.concept_path, predicate: entry.predicate, assertions: entry.assertions }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::super::tests::{id, record, same, text};
    use super::*;

    fn limit() -> impl Strategy<Value = usize> {
        prop_oneof![Just(0usize), Just(usize::MAX), any::<usize>()]
    }

    fn listing() -> impl Strategy<Value = Listing> {
        prop_oneof![
            (proptest::option::of(text()), proptest::option::of(text()))
                .prop_map(|(agent_id, concept_prefix)| Listing::Quarantined { agent_id, concept_prefix }),
            (text(), any::<u64>(), any::<u64>()).prop_map(|(agent_id, since_us, until_us)| Listing::ByAgent {
                agent_id,
                since_us,
                until_us
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(since_us, until_us)| Listing::ByTime { since_us, until_us }),
        ]
    }

    /// Every kind of read, any field values.
    pub(crate) fn shard_read() -> impl Strategy<Value = ShardRead> {
        prop_oneof![
            (text(), proptest::option::of(text()), any::<Option<u64>>()).prop_map(
                |(concept_path, predicate, memory_limit)| ShardRead::Claims {
                    concept_path,
                    predicate,
                    memory_limit,
                    render: None
                }
            ),
            id().prop_map(|id| ShardRead::Assertion { id }),
            (text(), proptest::option::of((text(), text())), limit())
                .prop_map(|(prefix, after, limit)| ShardRead::Concepts { prefix, after, limit }),
            (listing(), proptest::option::of(id()), limit()).prop_map(|(listing, after, limit)| ShardRead::List {
                listing,
                after,
                limit
            }),
        ]
    }

    pub(crate) fn facts() -> impl Strategy<Value = ClaimFacts> {
        (
            record(),
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            proptest::collection::vec(
                (id(), any::<u64>(), any::<Option<u64>>())
                    .prop_map(|(by, at_us, by_retracted_at_us)| SupersessionFact { by, at_us, by_retracted_at_us }),
                0..3,
            ),
            proptest::collection::vec(
                (text(), any::<i8>(), any::<u64>()).prop_map(|(agent_id, value, at_us)| VoteFact {
                    agent_id,
                    value,
                    at_us,
                }),
                0..3,
            ),
        )
            .prop_map(|(record, retracted_at_us, released_at_us, supersessions, votes)| ClaimFacts {
                record,
                retracted_at_us,
                released_at_us,
                supersessions,
                votes,
            })
    }

    pub(crate) fn retraction() -> impl Strategy<Value = RetractionRecord> {
        (any::<u64>(), text(), proptest::option::of(text())).prop_map(|(at_us, by, reason)| RetractionRecord {
            at_us,
            by,
            reason,
        })
    }

    /// Every kind of answer, any field values.
    pub(crate) fn read_result() -> impl Strategy<Value = ShardReadResult> {
        let group =
            (text(), text(), proptest::collection::vec(facts(), 0..3)).prop_map(|(concept_path, predicate, claims)| {
                ClaimGroup { concept_path, predicate, claims: claims.into_iter().map(Arc::new).collect() }
            });
        let concept = (text(), text(), any::<u64>()).prop_map(|(concept_path, predicate, assertions)| ConceptEntry {
            concept_path,
            predicate,
            assertions,
        });
        let answer = prop_oneof![
            proptest::collection::vec(group, 0..3)
                .prop_map(|groups| ShardReadAnswer::Claims(Arc::new(ClaimsRead::new(groups)))),
            proptest::option::of((facts(), proptest::option::of(retraction()))).prop_map(ShardReadAnswer::Assertion),
            proptest::collection::vec(concept, 0..4).prop_map(ShardReadAnswer::Concepts),
            proptest::collection::vec(facts(), 0..3).prop_map(ShardReadAnswer::Listed),
            (0..Lens::NAMES.len(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>(), text()).prop_map(
                |(lens, policy_version, count, groups, claims_bytes, text)| {
                    let json = serde_json::value::to_raw_value(&vec![text]).expect("a JSON array");
                    ShardReadAnswer::Rendered(RenderedSlot {
                        lens: Lens::NAMES[lens].parse().expect("a lens"),
                        policy_version,
                        count: count as usize,
                        groups: groups as usize,
                        claims_bytes: claims_bytes as usize,
                        json: Arc::from(json),
                    })
                }
            ),
        ];
        (answer, any::<u64>(), any::<u64>()).prop_map(|(answer, applied_index, staleness_ms)| ShardReadResult {
            answer,
            applied_index,
            staleness_ms,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_read_round_trips(read in shard_read()) {
            let bytes = prost::Message::encode_to_vec(&read_to_proto(&read));
            let decoded = read_from_proto(prost::Message::decode(bytes.as_slice()).expect("decode")).expect("a read");
            prop_assert!(same(&read, &decoded), "{:?} came back as {:?}", read, decoded);
        }

        #[test]
        fn every_read_result_round_trips(result in read_result()) {
            let bytes = prost::Message::encode_to_vec(&read_result_to_proto(&result));
            let decoded = read_result_from_proto(prost::Message::decode(bytes.as_slice()).expect("decode"))
                .expect("a result");
            prop_assert!(same(&result, &decoded), "{:?} came back as {:?}", result, decoded);
        }

        /// A claims read's render key names a rendering of this node's cache: it stays here.
        #[test]
        fn a_render_key_never_goes_on_the_wire(read in shard_read()) {
            let ShardRead::Claims { concept_path, predicate, memory_limit, .. } = read else { return Ok(()) };
            let render = Some(crate::shard::claims_cache::RenderKey { lens: Lens::Recency, policy_version: 1, max_groups: 5 });
            let read = ShardRead::Claims { concept_path, predicate, memory_limit, render };
            let bytes = prost::Message::encode_to_vec(&read_to_proto(&read));
            let decoded = read_from_proto(prost::Message::decode(bytes.as_slice()).expect("decode")).expect("a read");
            prop_assert!(matches!(decoded, ShardRead::Claims { render: None, .. }), "{:?}", decoded);
        }

        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(message) = <pb::ShardReadQuery as prost::Message>::decode(bytes.as_slice()) {
                let _ = read_from_proto(message);
            }
            if let Ok(message) = <pb::ShardReadResult as prost::Message>::decode(bytes.as_slice()) {
                let _ = read_result_from_proto(message);
            }
        }
    }

    /// A claims read without a memory limit (what an older node sends) has none.
    #[test]
    fn a_claims_read_without_a_memory_limit_has_none() {
        let read = pb::ShardReadQuery {
            kind: Some(pb::shard_read_query::Kind::Claims(pb::shard_read_query::Claims {
                concept_path: "a/b".into(),
                predicate: None,
                memory_limit: None,
            })),
        };
        let decoded = read_from_proto(read).expect("a read");
        assert!(matches!(decoded, ShardRead::Claims { memory_limit: None, predicate: None, .. }), "{decoded:?}");
    }

    #[test]
    fn bad_fields_are_named() {
        let vote = pb::ShardReadResult {
            answer: Some(pb::ShardReadAnswer {
                kind: Some(pb::shard_read_answer::Kind::Listed(pb::ClaimFactsList {
                    claims: vec![pb::ClaimFacts {
                        record: Some(crate::shard::codec::record_to_proto(&crate::model::assertion::StoredAssertion {
                            id: crate::model::id::AssertionId::new(1, 2, 3, 4),
                            asserted_at_us: 1,
                            log_index: 3,
                            draft: crate::model::assertion::AssertionDraft::for_test("a/b", "p", "agent", "1"),
                            quarantined: false,
                        })),
                        votes: vec![pb::VoteFact { agent_id: "a".into(), value: 200, at_us: 1 }],
                        ..Default::default()
                    }],
                })),
            }),
            ..Default::default()
        };
        assert!(matches!(
            read_result_from_proto(vote),
            Err(CodecError::Invalid { field: "claim facts.votes.value", .. })
        ));
        let no_record = pb::ClaimFactsList { claims: vec![pb::ClaimFacts { record: None, ..Default::default() }] };
        let listed = pb::ShardReadResult {
            answer: Some(pb::ShardReadAnswer { kind: Some(pb::shard_read_answer::Kind::Listed(no_record)) }),
            ..Default::default()
        };
        assert!(matches!(read_result_from_proto(listed), Err(CodecError::Missing("claim facts.record"))));
        let short_id = pb::ShardReadQuery {
            kind: Some(pb::shard_read_query::Kind::Assertion(pb::shard_read_query::Assertion { id: vec![0; 15] })),
        };
        assert!(matches!(read_from_proto(short_id), Err(CodecError::Invalid { field: "read.assertion.id", .. })));
    }
}
