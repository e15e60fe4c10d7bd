//! Quarantine triggers (DESIGN §2). The shard leader screens every assertion before proposing
//! it and records its decision in the entry ([`AssertionDraft::quarantine`]), so every replica
//! applies the same thing whatever its clock, config or cache says.
//!
//! A claim is quarantined when
//! 1. its agent's circuit breaker is open and `circuit_breaker.mode = "quarantine"`;
//! 2. its path is under one of `quarantine.require_authority_prefixes` and its agent has no
//!    authority for the path;
//! 3. it contradicts (same concept_path and predicate, another value) an active claim by an
//!    agent at or above `quarantine.protect_authority_level`, and its own agent is below that
//!    (among the [`SCREENED_CLAIMS`] newest claims there).

use super::policy::{BreakerState, Policy};
use crate::config::Config;
use crate::model::assertion::{AssertionDraft, QuarantineDecision, Status};
use crate::model::authority::prefix_covers;
use crate::model::lens::same_json;
use crate::model::lens::ClaimFacts;
use crate::storage::StorageError;

/// Where screening reads the claims already made about a path: the leader's replica of the
/// shard (`shard::reader::ShardReader`). A trait, so these rules depend on no Raft code.
pub trait RecentClaims {
    /// The newest `limit` claims about (concept_path, predicate), newest first.
    fn recent_claims(&self, concept_path: &str, predicate: &str, limit: usize)
        -> Result<Vec<ClaimFacts>, StorageError>;
}

/// The contradiction trigger compares a claim with this many of the newest claims on its
/// concept_path and predicate.
pub const SCREENED_CLAIMS: usize = 256;

/// The configured triggers.
#[derive(Debug, Clone, Default)]
pub struct QuarantineRules {
    pub require_authority_prefixes: Vec<String>,
    /// 0: the contradiction trigger is off.
    pub protect_authority_level: u8,
    /// `circuit_breaker.mode = "quarantine"`: writes of agents with an open breaker are
    /// quarantined instead of refused.
    pub breaker_quarantines: bool,
}

impl QuarantineRules {
    pub fn from_config(config: &Config) -> QuarantineRules {
        QuarantineRules {
            require_authority_prefixes: config.quarantine.require_authority_prefixes.clone(),
            protect_authority_level: config.quarantine.protect_authority_level,
            breaker_quarantines: config.circuit_breaker.mode == "quarantine",
        }
    }

    /// Whether screening may read claims (the protected-claim rule is on and some agent has
    /// authority). When not, [`QuarantineRules::decide`] does no I/O: memory lookups only, cheap
    /// enough to run on an async worker.
    pub fn reads_claims(&self, policy: &Policy) -> bool {
        self.protect_authority_level != 0 && policy.has_authorities()
    }

    /// Whether `draft`, proposed at `now_us`, is quarantined, and why (the shard leader records
    /// it in the draft before proposing).
    pub fn decide(
        &self,
        policy: &Policy,
        reader: &dyn RecentClaims,
        draft: &AssertionDraft,
        now_us: u64,
    ) -> Option<QuarantineDecision> {
        let agent = draft.agent_id.as_str();
        let path = draft.concept_path.as_str();
        if self.breaker_quarantines {
            if let Some((breaker, state)) = policy.open_breaker(agent, now_us) {
                if state == BreakerState::Open {
                    return Some(QuarantineDecision {
                        reason: "circuit_breaker_open".into(),
                        detail: format!("agent {agent:?} has an open circuit breaker: {}", breaker.reason),
                    });
                }
            }
        }
        let mut own_level = None;
        let mut level = || *own_level.get_or_insert_with(|| policy.level(agent, path, u64::MAX));
        if let Some(prefix) = self.require_authority_prefixes.iter().find(|p| prefix_covers(p, path)) {
            if level().is_none() {
                return Some(QuarantineDecision {
                    reason: "authority_required".into(),
                    detail: format!("claims under {prefix:?} need authority; agent {agent:?} has none for {path:?}"),
                });
            }
        }
        let protect = self.protect_authority_level;
        if protect == 0 || !policy.has_authorities() || level().is_some_and(|l| l >= protect) {
            return None;
        }
        // The leader's applied state: claims still in flight are not seen, which only means a
        // contradiction racing its protected claim is not caught. Only the newest claims are
        // compared, so a write costs the same on a path with millions of claims.
        let claims = match reader.recent_claims(path, &draft.predicate, SCREENED_CLAIMS) {
            Ok(claims) => claims,
            Err(error) => {
                tracing::warn!(error = %error, path, "quarantine screening could not read claims; not quarantining");
                return None;
            }
        };
        for facts in &claims {
            let Some(claim) = facts.at(u64::MAX, &|_| 1.0) else { continue };
            if claim.status != Status::Active || same_json(&claim.record.draft.value, &draft.value) {
                continue;
            }
            let other = claim.record.draft.agent_id.as_str();
            if let Some(level) = policy.level(other, path, u64::MAX).filter(|l| *l >= protect) {
                return Some(QuarantineDecision {
                    reason: "contradicts_protected_claim".into(),
                    detail: format!(
                        "contradicts assertion {} by {other:?} (authority {}, protected at {protect})",
                        claim.record.id, level
                    ),
                });
            }
        }
        None
    }
}
