//! The client-facing error: `{"error": {"code", "message", "details"}}` with one HTTP status per
//! code. Every lower layer's error converts into it through its own `code()` and
//! `http_status()`, so a code always maps to the same status (and, for gRPC, to the same status
//! code through [`ApiError::grpc_code`]).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::model::ModelError;
use crate::raft::ConsensusError;
use crate::storage::StorageError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Value,
    /// Seconds for the Retry-After header of a 429 or 503 (1 when not set).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
            details: json!({}),
            retry_after_secs: None,
        }
    }

    pub fn with_retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after_secs = Some(seconds);
        self
    }

    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = details;
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(400, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", message)
    }

    /// The gRPC status code for this error's HTTP status.
    pub fn grpc_code(&self) -> i32 {
        match self.status.as_u16() {
            400 | 413 | 422 => 3, // INVALID_ARGUMENT
            401 => 16,            // UNAUTHENTICATED
            403 => 7,             // PERMISSION_DENIED
            404 => 5,             // NOT_FOUND
            409 => 6,             // ALREADY_EXISTS
            429 => 8,             // RESOURCE_EXHAUSTED
            501 => 12,            // UNIMPLEMENTED
            503 => 14,            // UNAVAILABLE
            504 => 4,             // DEADLINE_EXCEEDED
            _ => 13,              // INTERNAL
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message, "details": self.details}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if matches!(self.status.as_u16(), 429 | 503) {
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
        ApiError::new(error.http_status(), error.code(), error.to_string()).with_details(details)
    }
}

impl From<ConsensusError> for ApiError {
    fn from(error: ConsensusError) -> ApiError {
        let details = match &error {
            ConsensusError::NoQuorum { shard }
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
        };
        ApiError::new(error.http_status(), error.code(), error.to_string()).with_details(details)
    }
}

impl From<crate::cluster::meta::MetaError> for ApiError {
    fn from(error: crate::cluster::meta::MetaError) -> ApiError {
        ApiError::new(error.http_status(), error.code(), error.to_string()).with_details(variant_fields(&error))
    }
}

impl From<crate::cluster::policy::PolicyError> for ApiError {
    fn from(error: crate::cluster::policy::PolicyError) -> ApiError {
        ApiError::new(error.http_status(), error.code(), error.to_string()).with_details(variant_fields(&error))
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
        ApiError::new(error.http_status(), error.code(), error.to_string()).with_details(details)
    }
}

impl From<crate::metrics::heap_profile::HeapProfileError> for ApiError {
    fn from(error: crate::metrics::heap_profile::HeapProfileError) -> ApiError {
        ApiError::new(error.http_status(), error.code(), error.to_string())
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> ApiError {
        ApiError::new(500, error.code(), error.to_string())
    }
}
