//! Lenses: read-time rules that pick a winner among the claims about one (concept_path,
//! predicate). Pure functions over [`ClaimFacts`]; they never change data.
//!
//! `as_of` is applied here too: [`ClaimFacts::at`] derives what a claim looked like at a time
//! (its status, its vote score) from the immutable facts recorded about it.

use std::cmp::Ordering;
use std::str::FromStr;

use serde::Serialize;

use super::assertion::{Status, StoredAssertion};
use super::id::AssertionId;
use super::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lens {
    Recency,
    Authority,
    Consensus,
    Confidence,
    All,
    History,
}

impl Lens {
    pub const NAMES: [&'static str; 6] = ["recency", "authority", "consensus", "confidence", "all", "history"];

    pub fn resolves(self) -> bool {
        !matches!(self, Lens::All | Lens::History)
    }
}

impl FromStr for Lens {
    type Err = ModelError;
    fn from_str(text: &str) -> Result<Lens, ModelError> {
        Ok(match text {
            "recency" => Lens::Recency,
            "authority" => Lens::Authority,
            "consensus" => Lens::Consensus,
            "confidence" => Lens::Confidence,
            "all" => Lens::All,
            "history" => Lens::History,
            other => return Err(ModelError::UnknownLens { lens: other.chars().take(64).collect() }),
        })
    }
}

/// One vote as recorded: later votes by the same agent replace earlier ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VoteFact {
    pub agent_id: String,
    pub value: i8,
    pub at_us: u64,
}

/// A supersession of this claim by a later one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SupersessionFact {
    pub by: AssertionId,
    pub at_us: u64,
    /// When the superseding assertion was itself retracted, which withdraws the supersession.
    pub by_retracted_at_us: Option<u64>,
}

/// Everything recorded about one assertion.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClaimFacts {
    pub record: StoredAssertion,
    pub retracted_at_us: Option<u64>,
    /// When an admin released the claim from quarantine (only for quarantined claims).
    #[serde(default)]
    pub released_at_us: Option<u64>,
    pub supersessions: Vec<SupersessionFact>,
    pub votes: Vec<VoteFact>,
}

/// A claim as it stood at some time.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub record: &'a StoredAssertion,
    pub status: Status,
    pub retracted_at_us: Option<u64>,
    pub superseded_by: Option<AssertionId>,
    pub superseded_at_us: Option<u64>,
    pub votes_up: u32,
    pub votes_down: u32,
    /// Vote score, each vote weighted by its voter's authority (1 where it has none).
    pub score: f64,
}

impl ClaimFacts {
    /// A claim with nothing recorded about it yet: no retraction, release, supersession or vote.
    pub fn new(record: StoredAssertion) -> ClaimFacts {
        ClaimFacts { record, retracted_at_us: None, released_at_us: None, supersessions: Vec::new(), votes: Vec::new() }
    }

    /// The claim as it stood at `as_of_us` (inclusive), or `None` if it did not exist yet.
    pub fn at(&self, as_of_us: u64, vote_weight: &dyn Fn(&str) -> f64) -> Option<Claim<'_>> {
        if self.record.asserted_at_us > as_of_us {
            return None;
        }
        let retracted_at_us = self.retracted_at_us.filter(|&t| t <= as_of_us);
        let supersession = self
            .supersessions
            .iter()
            .filter(|s| s.at_us <= as_of_us && s.by_retracted_at_us.is_none_or(|r| r > as_of_us))
            .min_by_key(|s| (s.at_us, s.by));
        let status = if retracted_at_us.is_some() {
            Status::Retracted
        } else if self.record.quarantined && self.released_at_us.is_none_or(|t| t > as_of_us) {
            Status::Quarantined
        } else if supersession.is_some() {
            Status::Superseded
        } else {
            Status::Active
        };
        // The latest vote of each agent at or before as_of counts.
        let mut latest: Vec<&VoteFact> = Vec::new();
        for vote in self.votes.iter().filter(|v| v.at_us <= as_of_us) {
            match latest.iter_mut().find(|v| v.agent_id == vote.agent_id) {
                Some(slot) => {
                    if vote.at_us >= slot.at_us {
                        *slot = vote;
                    }
                }
                None => latest.push(vote),
            }
        }
        let (mut up, mut down, mut score) = (0, 0, 0.0);
        for vote in latest {
            if vote.value > 0 {
                up += 1;
            } else {
                down += 1;
            }
            score += vote.value as f64 * vote_weight(&vote.agent_id);
        }
        Some(Claim {
            record: &self.record,
            status,
            retracted_at_us,
            superseded_by: supersession.map(|s| s.by),
            superseded_at_us: supersession.map(|s| s.at_us),
            votes_up: up,
            votes_down: down,
            score,
        })
    }
}

/// The outcome of a lens over one (concept_path, predicate).
#[derive(Debug)]
pub enum Resolution<'a> {
    /// Resolving lenses: the winner, and how many other active claims disagree with it.
    Winner { winner: Claim<'a>, alternatives: usize },
    /// `all` and `history`: the claims, newest first.
    Listed(Vec<Claim<'a>>),
}

fn newest_first(a: &Claim<'_>, b: &Claim<'_>) -> Ordering {
    (b.record.asserted_at_us, b.record.id).cmp(&(a.record.asserted_at_us, a.record.id))
}

/// Applies `lens` to the claims of one (concept_path, predicate) at one time. `authority` gives
/// an agent's authority level for the path (`None`: it has none, which ranks below level 0).
/// Returns `None` when the lens has nothing to show (no active claim, or no claim at all for
/// `history`).
pub fn resolve<'a>(
    lens: Lens,
    claims: Vec<Claim<'a>>,
    authority: &dyn Fn(&str) -> Option<u8>,
) -> Option<Resolution<'a>> {
    if lens == Lens::History {
        if claims.is_empty() {
            return None;
        }
        let mut claims = claims;
        claims.sort_by(newest_first);
        return Some(Resolution::Listed(claims));
    }
    let mut active: Vec<Claim<'a>> = claims.into_iter().filter(|c| c.status == Status::Active).collect();
    if active.is_empty() {
        return None;
    }
    // Sorting newest first makes recency the tie-breaker of every other lens (stable sort).
    active.sort_by(newest_first);
    match lens {
        Lens::All | Lens::History => return Some(Resolution::Listed(active)),
        Lens::Recency => {}
        Lens::Authority => {
            // One lookup per claim, not one per comparison (the sort is stable).
            active.sort_by_cached_key(|c| std::cmp::Reverse(authority(&c.record.draft.agent_id)))
        }
        Lens::Consensus => active.sort_by(|a, b| b.score.partial_cmp(&a.score).unwrap_or(Ordering::Equal)),
        Lens::Confidence => active.sort_by(|a, b| {
            b.record.draft.confidence.partial_cmp(&a.record.draft.confidence).unwrap_or(Ordering::Equal)
        }),
    }
    let mut rest = active.into_iter();
    let winner = rest.next()?;
    let alternatives = rest.filter(|c| !same_value(c.record, winner.record)).count();
    Some(Resolution::Winner { winner, alternatives })
}

/// Whether two assertions claim the same value (JSON equality, not byte equality).
pub fn same_value(a: &StoredAssertion, b: &StoredAssertion) -> bool {
    same_json(&a.draft.value, &b.draft.value)
}

/// Whether two raw JSON values are equal as JSON.
pub fn same_json(a: &serde_json::value::RawValue, b: &serde_json::value::RawValue) -> bool {
    let (x, y) = (a.get(), b.get());
    if x == y {
        return true;
    }
    // Values whose text is their only spelling (strings without escapes, integers, literals)
    // differ when their texts differ: no need to parse them.
    if plain_scalar(x) && plain_scalar(y) {
        return false;
    }
    match (serde_json::from_str::<serde_json::Value>(x), serde_json::from_str::<serde_json::Value>(y)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// JSON text with exactly one spelling for its value: a string without escapes, an integer,
/// `true`, `false` or `null` (no surrounding whitespace).
fn plain_scalar(text: &str) -> bool {
    let bytes = text.as_bytes();
    match bytes {
        [b'"', inner @ .., b'"'] => !inner.iter().any(|&b| b == b'\\' || b == b'"'),
        _ if matches!(text, "true" | "false" | "null") => true,
        [b'-', digits @ ..] | digits => {
            !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) && (digits.len() == 1 || digits[0] != b'0')
        }
    }
}

#[cfg(test)]
mod same_json_tests {
    use super::same_json;
    use serde_json::value::RawValue;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).expect("raw")
    }

    #[test]
    fn equality_as_json() {
        for (a, b, equal) in [
            (r#""a""#, r#""a""#, true),
            (r#""a""#, r#""b""#, false),
            (r#""a""#, r#""\u0061""#, true),
            ("12", "12", true),
            ("12", "13", false),
            ("-1", "1", false),
            ("1", "1.0", false),
            (r#"{"x":1,"y":2}"#, r#"{"y":2, "x":1}"#, true),
            ("true", "false", false),
            ("null", r#""null""#, false),
        ] {
            assert_eq!(same_json(&raw(a), &raw(b)), equal, "{a} vs {b}");
        }
    }
}
