//! The data model of DESIGN §2: assertions and their validation rules, ids, votes, retractions,
//! derived status and the lenses. Pure code: no storage, no network, no async.

pub mod assertion;
pub mod authority;
pub mod id;
pub mod lens;
#[cfg(test)]
mod lens_tests;
pub mod signing;

use serde::{Deserialize, Serialize};

/// Errors about the content of a request or the state of an assertion. Each variant has one
/// stable code and one HTTP status; the API layer maps them, gRPC will use the same table.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum ModelError {
    #[error("invalid concept_path {path:?}: {reason}")]
    InvalidConceptPath { path: String, reason: String },
    #[error("invalid predicate {predicate:?}: {reason}")]
    InvalidPredicate { predicate: String, reason: String },
    #[error("value is {bytes} bytes encoded, over the limit of {limit} (limits.max_value_bytes)")]
    ValueTooLarge { bytes: usize, limit: usize },
    #[error("invalid agent_id: {reason}")]
    InvalidAgentId { reason: String },
    #[error("confidence {confidence} is outside [0, 1]")]
    InvalidConfidence { confidence: f64 },
    #[error("supersedes lists {count} ids; at most 64 are allowed")]
    TooManySupersedes { count: usize },
    #[error("invalid assertion id {id:?}: expected 26 Crockford base-32 characters")]
    InvalidId { id: String },
    #[error("assertion {id} is on another concept_path and cannot be superseded by this one")]
    SupersedesOtherConcept { id: String },
    #[error("source is {bytes} bytes, over the limit of {limit}")]
    SourceTooLarge { bytes: usize, limit: usize },
    #[error("source must be a JSON object")]
    InvalidSource,
    #[error("signature must be hex")]
    InvalidSignatureFormat,
    #[error("request_id must be 1-128 characters without control characters")]
    InvalidRequestId,
    #[error("unknown lens {lens:?}; expected one of recency, authority, consensus, confidence, all, history")]
    UnknownLens { lens: String },
    #[error("{message}")]
    InvalidTime { message: String },
    #[error("vote value must be +1 or -1, got {value}")]
    InvalidVote { value: i64 },
    #[error("reason is longer than 1024 characters")]
    ReasonTooLong,
    #[error("assertion {id} not found")]
    AssertionNotFound { id: String },
    #[error("assertion {id} is already retracted")]
    AlreadyRetracted { id: String },
    #[error("agent {agent_id:?} did not make assertion {id}; only its agent or an admin may retract it")]
    NotAssertionOwner { id: String, agent_id: String },
    #[error("assertion {id} is not in quarantine (never quarantined, or already released or rejected)")]
    NotQuarantined { id: String },
}

impl ModelError {
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::InvalidConceptPath { .. } => "invalid_concept_path",
            ModelError::InvalidPredicate { .. } => "invalid_predicate",
            ModelError::ValueTooLarge { .. } => "value_too_large",
            ModelError::InvalidAgentId { .. } => "invalid_agent_id",
            ModelError::InvalidConfidence { .. } => "invalid_confidence",
            ModelError::TooManySupersedes { .. } => "too_many_supersedes",
            ModelError::InvalidId { .. } => "invalid_id",
            ModelError::SupersedesOtherConcept { .. } => "supersedes_other_concept",
            ModelError::SourceTooLarge { .. } => "source_too_large",
            ModelError::InvalidSource => "invalid_source",
            ModelError::InvalidSignatureFormat => "invalid_signature_format",
            ModelError::InvalidRequestId => "invalid_request_id",
            ModelError::UnknownLens { .. } => "unknown_lens",
            ModelError::InvalidTime { .. } => "invalid_time",
            ModelError::InvalidVote { .. } => "invalid_vote",
            ModelError::ReasonTooLong => "reason_too_long",
            ModelError::AssertionNotFound { .. } => "assertion_not_found",
            ModelError::AlreadyRetracted { .. } => "already_retracted",
            ModelError::NotAssertionOwner { .. } => "not_assertion_owner",
            ModelError::NotQuarantined { .. } => "not_quarantined",
        }
    }

    /// The HTTP status of this error (the gRPC status follows from it in the API error table).
    pub fn http_status(&self) -> u16 {
        match self {
            ModelError::ValueTooLarge { .. } | ModelError::SourceTooLarge { .. } => 413,
            ModelError::UnknownLens { .. } | ModelError::InvalidTime { .. } | ModelError::InvalidId { .. } => 400,
            ModelError::AssertionNotFound { .. } => 404,
            ModelError::AlreadyRetracted { .. } | ModelError::NotQuarantined { .. } => 409,
            ModelError::NotAssertionOwner { .. } => 403,
            _ => 422,
        }
    }
}
