//! The data model of DESIGN §2: assertions and their validation rules, ids, votes, retractions,
//! derived status and the lenses. Pure code: no storage, no network, no async.

pub mod assertion;
pub mod authority;
pub mod id;
pub mod lens;
#[cfg(test)]
mod lens_tests;
pub mod signing;

use crate::error::ErrorCode;
use serde::{Deserialize, Serialize};

/// Errors about the content of a request or the state of an assertion. Each variant has one
/// stable [`ErrorCode`] (and so one HTTP status and gRPC code).
/// A node's id in the cluster (1 and up); a node's Raft address travels beside it.
pub type NodeId = u64;

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
    #[error("{field} is nested {depth} levels deep, over the limit of {limit} (limits.max_value_depth)")]
    ValueTooDeep { field: String, depth: usize, limit: usize },
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
    #[error("a command of {items} items is more than one log entry can number (at most {limit})")]
    CommandTooLarge { items: usize, limit: usize },
    #[error("log index {index} is beyond what assertion ids can hold ({limit}); the shard takes no more assertions")]
    IdSpaceExhausted { index: u64, limit: u64 },
}

impl ModelError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ModelError::InvalidConceptPath { .. } => ErrorCode::InvalidConceptPath,
            ModelError::InvalidPredicate { .. } => ErrorCode::InvalidPredicate,
            ModelError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
            ModelError::InvalidAgentId { .. } => ErrorCode::InvalidAgentId,
            ModelError::InvalidConfidence { .. } => ErrorCode::InvalidConfidence,
            ModelError::TooManySupersedes { .. } => ErrorCode::TooManySupersedes,
            ModelError::InvalidId { .. } => ErrorCode::InvalidId,
            ModelError::SupersedesOtherConcept { .. } => ErrorCode::SupersedesOtherConcept,
            ModelError::SourceTooLarge { .. } => ErrorCode::SourceTooLarge,
            ModelError::ValueTooDeep { .. } => ErrorCode::ValueTooDeep,
            ModelError::InvalidSource => ErrorCode::InvalidSource,
            ModelError::InvalidSignatureFormat => ErrorCode::InvalidSignatureFormat,
            ModelError::InvalidRequestId => ErrorCode::InvalidRequestId,
            ModelError::UnknownLens { .. } => ErrorCode::UnknownLens,
            ModelError::InvalidTime { .. } => ErrorCode::InvalidTime,
            ModelError::InvalidVote { .. } => ErrorCode::InvalidVote,
            ModelError::ReasonTooLong => ErrorCode::ReasonTooLong,
            ModelError::AssertionNotFound { .. } => ErrorCode::AssertionNotFound,
            ModelError::AlreadyRetracted { .. } => ErrorCode::AlreadyRetracted,
            ModelError::NotAssertionOwner { .. } => ErrorCode::NotAssertionOwner,
            ModelError::NotQuarantined { .. } => ErrorCode::NotQuarantined,
            ModelError::CommandTooLarge { .. } => ErrorCode::CommandTooLarge,
            ModelError::IdSpaceExhausted { .. } => ErrorCode::IdSpaceExhausted,
        }
    }
}
