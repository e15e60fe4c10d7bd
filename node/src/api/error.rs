//! The client-facing error: `{"error": {"code", "message", "details"}}`. Its status comes from
//! the one error-code table ([`ErrorCode`]), and every lower layer's error converts into it
//! through its own `code()`, so a code always maps to the same HTTP status and gRPC code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::error::ErrorCode;
use crate::model::ModelError;
use crate::shard::ConsensusError;
use crate::storage::StorageError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Value,
    /// Seconds for the Retry-After header of a 429 or 503 (1 when not set).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), details: json!({}), retry_after_secs: None }
    }

    pub fn with_retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after_secs = Some(seconds);
        self
    }

    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = details;
        self
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn body(&self) -> Value {
        json!({"error": self.detail()})
    }

    /// The error as a batch item reports it (the body's `error` object).
    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail { code: self.code, message: self.message.clone(), details: self.details.clone() }
    }
}

/// The `error` object of an error answer.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// The stable code (docs/api.md).
    pub code: ErrorCode,
    /// For people; never match on it.
    pub message: String,
    /// The code's fields (docs/api.md), `{}` when it has none.
    #[schema(value_type = Object)]
    pub details: Value,
}

/// `Retry-After` of a `507 insufficient_storage`: the floor is sampled every second, but space
/// is freed by an operator, not by waiting.
pub const INSUFFICIENT_STORAGE_RETRY_AFTER_SECS: u64 = 30;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self.code.http_status(), 429 | 503 | 507) {
            let seconds = self.retry_after_secs.unwrap_or(1).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

impl From<ModelError> for ApiError {
    fn from(error: ModelError) -> ApiError {
        let details = serde_json::to_value(&error).unwrap_or(Value::Null);
        ApiError::new(error.code(), error.to_string()).with_details(details)
    }
}

impl From<ConsensusError> for ApiError {
    fn from(error: ConsensusError) -> ApiError {
        let details = match &error {
            ConsensusError::NoQuorum { shard }
            | ConsensusError::CatchingUp { shard }
            | ConsensusError::Timeout { shard, .. }
            | ConsensusError::ShuttingDown { shard }
            | ConsensusError::UnknownShard { shard } => json!({"shard": shard}),
            ConsensusError::NotLeader { shard, leader } => json!({"shard": shard, "leader": leader}),
            ConsensusError::LeaderUnreachable { shard, leader, .. } => json!({"shard": shard, "leader": leader}),
            ConsensusError::MembershipChange { shard, .. }
            | ConsensusError::Storage { shard, .. }
            | ConsensusError::Internal { shard, .. } => json!({"shard": shard}),
            ConsensusError::Startup(_) => json!({}),
            ConsensusError::QueryMemoryExceeded { shard, limit_bytes } => {
                json!({"shard": shard, "limit_bytes": limit_bytes})
            }
            ConsensusError::OutcomeUnknown { shard, timeout_ms } => json!({"shard": shard, "timeout_ms": timeout_ms}),
            ConsensusError::Overloaded { shard, queued } | ConsensusError::ReadsOverloaded { shard, queued } => {
                json!({"shard": shard, "queued": queued})
            }
            // The model error's own fields, as when the API refuses it before proposing.
            ConsensusError::Refused { error, .. } => return ApiError::from(error.clone()),
            ConsensusError::InsufficientStorage { shard, node, free_bytes, floor_bytes } => {
                let details =
                    json!({"shard": shard, "node": node, "free_bytes": free_bytes, "floor_bytes": floor_bytes});
                // Space comes back by an operator's hand: a client should not retry at once.
                return ApiError::new(error.code(), error.to_string())
                    .with_details(details)
                    .with_retry_after(INSUFFICIENT_STORAGE_RETRY_AFTER_SECS);
            }
        };
        ApiError::new(error.code(), error.to_string()).with_details(details)
    }
}

impl From<crate::meta::MetaError> for ApiError {
    fn from(error: crate::meta::MetaError) -> ApiError {
        ApiError::new(error.code(), error.to_string()).with_details(variant_fields(&error))
    }
}

impl From<crate::meta::policy::PolicyError> for ApiError {
    fn from(error: crate::meta::policy::PolicyError) -> ApiError {
        ApiError::new(error.code(), error.to_string()).with_details(variant_fields(&error))
    }
}

/// An externally tagged enum's fields as error details: `{"Variant": {fields}}` → `{fields}`;
/// unit variants have none.
fn variant_fields(error: &impl serde::Serialize) -> Value {
    match serde_json::to_value(error) {
        Ok(Value::Object(map)) => map.into_iter().next().map(|(_, v)| v).unwrap_or_else(|| json!({})),
        _ => json!({}),
    }
}

impl From<crate::model::signing::SignatureError> for ApiError {
    fn from(error: crate::model::signing::SignatureError) -> ApiError {
        let details = serde_json::to_value(&error).unwrap_or(Value::Null);
        ApiError::new(error.code(), error.to_string()).with_details(details)
    }
}

impl From<crate::metrics::heap_profile::HeapProfileError> for ApiError {
    fn from(error: crate::metrics::heap_profile::HeapProfileError) -> ApiError {
        ApiError::new(error.code(), error.to_string())
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> ApiError {
        ApiError::new(error.code(), error.to_string())
    }
}
