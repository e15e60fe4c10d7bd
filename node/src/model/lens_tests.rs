//! Property tests: every lens, at every `as_of`, against a naive reference model that replays a
//! random history of asserts, supersessions, votes, retractions, quarantines and releases from
//! scratch, with random authority levels per agent (authority lens, weighted consensus).

use proptest::prelude::*;
use serde_json::value::RawValue;

use super::assertion::{AssertionDraft, Status, StoredAssertion};
use super::id::AssertionId;
use super::lens::{resolve, ClaimFacts, Lens, Resolution, SupersessionFact, VoteFact};

#[derive(Debug, Clone)]
enum Op {
    Assert { predicate: u8, value: u8, agent: u8, confidence: u8, supersedes: Vec<usize>, quarantined: bool },
    Vote { target: usize, agent: u8, up: bool },
    Retract { target: usize },
    Release { target: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..2, 0u8..3, 0u8..4, 0u8..5, proptest::collection::vec(0usize..64, 0..2), proptest::bool::weighted(0.2))
            .prop_map(|(predicate, value, agent, confidence, supersedes, quarantined)| Op::Assert { predicate, value, agent, confidence, supersedes, quarantined }),
        3 => (0usize..64, 0u8..4, any::<bool>()).prop_map(|(target, agent, up)| Op::Vote { target, agent, up }),
        1 => (0usize..64).prop_map(|target| Op::Retract { target }),
        1 => (0usize..64).prop_map(|target| Op::Release { target }),
    ]
}

/// An assertion of the replayed history with the time of each op (op i happens at time 10 * (i + 1)).
struct Asserted {
    id: AssertionId,
    at: u64,
    predicate: u8,
    value: u8,
    agent: u8,
    confidence: f64,
    supersedes: Vec<usize>,
    quarantined: bool,
    released_at: Option<u64>,
}

struct History {
    asserts: Vec<Asserted>,
    votes: Vec<(usize, u8, i8, u64)>,
    retractions: Vec<(usize, u64)>,
}

impl History {
    /// When a claim's supersessions take effect: when it is written, or for a quarantined claim
    /// when it is released (the state machine writes them then); never while quarantined.
    fn effective_at(&self, i: usize) -> Option<u64> {
        let a = &self.asserts[i];
        if a.quarantined {
            a.released_at
        } else {
            Some(a.at)
        }
    }
}

fn replay(ops: &[Op]) -> History {
    let mut history = History { asserts: Vec::new(), votes: Vec::new(), retractions: Vec::new() };
    for (i, op) in ops.iter().enumerate() {
        let at = 10 * (i as u64 + 1);
        match op {
            Op::Assert { predicate, value, agent, confidence, supersedes, quarantined } => {
                // Supersession only of earlier assertions with the same predicate (same concept).
                let targets: Vec<usize> = supersedes
                    .iter()
                    .filter_map(|t| (!history.asserts.is_empty()).then(|| t % history.asserts.len()))
                    .collect();
                history.asserts.push(Asserted {
                    id: AssertionId::new(at, 0, i as u64 + 1, 0),
                    at,
                    predicate: *predicate,
                    value: *value,
                    agent: *agent,
                    confidence: *confidence as f64 / 4.0,
                    supersedes: targets,
                    quarantined: *quarantined,
                    released_at: None,
                });
            }
            Op::Vote { target, agent, up } => {
                if !history.asserts.is_empty() {
                    history.votes.push((target % history.asserts.len(), *agent, if *up { 1 } else { -1 }, at));
                }
            }
            Op::Retract { target } => {
                if !history.asserts.is_empty() {
                    let t = target % history.asserts.len();
                    if !history.retractions.iter().any(|(r, _)| *r == t) {
                        history.retractions.push((t, at));
                    }
                }
            }
            Op::Release { target } => {
                if !history.asserts.is_empty() {
                    let t = target % history.asserts.len();
                    let retracted = history.retractions.iter().any(|(r, _)| *r == t);
                    let claim = &mut history.asserts[t];
                    if claim.quarantined && claim.released_at.is_none() && !retracted {
                        claim.released_at = Some(at);
                    }
                }
            }
        }
    }
    history
}

/// What the state machine would have recorded: the system under test's input.
fn facts(history: &History) -> Vec<ClaimFacts> {
    let retracted_at = |i: usize| history.retractions.iter().find(|(r, _)| *r == i).map(|(_, at)| *at);
    history
        .asserts
        .iter()
        .enumerate()
        .map(|(i, a)| ClaimFacts {
            record: StoredAssertion {
                id: a.id,
                asserted_at_us: a.at,
                log_index: 0,
                draft: AssertionDraft {
                    concept_path: "c".into(),
                    predicate: format!("p{}", a.predicate),
                    value: RawValue::from_string(a.value.to_string()).expect("raw"),
                    agent_id: format!("agent{}", a.agent),
                    confidence: a.confidence,
                    supersedes: vec![],
                    source: None,
                    signature: None,
                    request_id: None,
                    quarantine: None,
                },
                quarantined: a.quarantined,
            },
            retracted_at_us: retracted_at(i),
            released_at_us: a.released_at,
            supersessions: history
                .asserts
                .iter()
                .enumerate()
                .filter(|(j, b)| b.supersedes.contains(&i) && *j != i)
                .filter_map(|(j, b)| {
                    let at_us = history.effective_at(j)?;
                    Some(SupersessionFact { by: b.id, at_us, by_retracted_at_us: retracted_at(j) })
                })
                .collect(),
            votes: history
                .votes
                .iter()
                .filter(|(t, ..)| *t == i)
                .map(|(_, agent, value, at)| VoteFact { agent_id: format!("agent{agent}"), value: *value, at_us: *at })
                .collect(),
        })
        .collect()
}

/// The reference: straight from the history, no shared code with the lens module.
fn reference(
    history: &History,
    levels: &[Option<u8>; 4],
    lens: Lens,
    predicate: u8,
    t: u64,
) -> Option<(Vec<AssertionId>, usize)> {
    let retracted = |i: usize| history.retractions.iter().any(|(r, at)| *r == i && *at <= t);
    let status = |i: usize| {
        let a = &history.asserts[i];
        if retracted(i) {
            Status::Retracted
        } else if a.quarantined && a.released_at.is_none_or(|r| r > t) {
            Status::Quarantined
        } else if history.asserts.iter().enumerate().any(|(j, b)| {
            j != i && history.effective_at(j).is_some_and(|e| e <= t) && b.supersedes.contains(&i) && !retracted(j)
        }) {
            Status::Superseded
        } else {
            Status::Active
        }
    };
    let score = |i: usize| -> f64 {
        let mut latest: std::collections::BTreeMap<u8, (u64, i8)> = Default::default();
        for (target, agent, value, at) in &history.votes {
            if *target == i && *at <= t {
                latest.insert(*agent, (*at, *value));
            }
        }
        latest.iter().map(|(agent, (_, v))| *v as f64 * levels[*agent as usize].map_or(1.0, f64::from)).sum()
    };
    let visible: Vec<usize> = (0..history.asserts.len())
        .filter(|&i| history.asserts[i].at <= t && history.asserts[i].predicate == predicate)
        .collect();
    let newest_first = |mut v: Vec<usize>| {
        v.sort_by_key(|&i| std::cmp::Reverse(history.asserts[i].at));
        v
    };
    if lens == Lens::History {
        return (!visible.is_empty())
            .then(|| (newest_first(visible).iter().map(|&i| history.asserts[i].id).collect(), 0));
    }
    let active: Vec<usize> = visible.into_iter().filter(|&i| status(i) == Status::Active).collect();
    if active.is_empty() {
        return None;
    }
    if lens == Lens::All {
        return Some((newest_first(active).iter().map(|&i| history.asserts[i].id).collect(), 0));
    }
    let key = |i: usize| -> (f64, u64) {
        let a = &history.asserts[i];
        let primary = match lens {
            Lens::Consensus => score(i),
            Lens::Confidence => a.confidence,
            Lens::Authority => levels[a.agent as usize].map_or(-1.0, f64::from),
            _ => 0.0,
        };
        (primary, a.at)
    };
    let winner = *active
        .iter()
        .max_by(|&&x, &&y| key(x).partial_cmp(&key(y)).unwrap_or(std::cmp::Ordering::Equal))
        .expect("non-empty");
    let alternatives =
        active.iter().filter(|&&i| i != winner && history.asserts[i].value != history.asserts[winner].value).count();
    Some((vec![history.asserts[winner].id], alternatives))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn lenses_match_reference_model(
        ops in proptest::collection::vec(op(), 1..40),
        probe in 0u64..420,
        levels in proptest::array::uniform4(proptest::option::of(0u8..=100)),
    ) {
        let history = replay(&ops);
        let all_facts = facts(&history);
        let level_of = |agent: &str| -> Option<u8> {
            agent.strip_prefix("agent").and_then(|n| n.parse::<usize>().ok()).and_then(|n| levels[n])
        };
        let weight_of = |agent: &str| level_of(agent).map_or(1.0, f64::from);
        for lens in [Lens::Recency, Lens::Authority, Lens::Consensus, Lens::Confidence, Lens::All, Lens::History] {
            for predicate in 0u8..2 {
                for t in [probe, u64::MAX] {
                    let claims: Vec<_> = all_facts
                        .iter()
                        .filter(|f| f.record.draft.predicate == format!("p{predicate}"))
                        .filter_map(|f| f.at(t, &weight_of))
                        .collect();
                    let got = resolve(lens, claims, &level_of).map(|r| match r {
                        Resolution::Winner { winner, alternatives } => (vec![winner.record.id], alternatives),
                        Resolution::Listed(list) => (list.iter().map(|c| c.record.id).collect(), 0),
                    });
                    let expected = reference(&history, &levels, lens, predicate, t);
                    prop_assert_eq!(got, expected, "lens {:?} predicate {} t {}", lens, predicate, t);
                }
            }
        }
    }
}
