//! Node admin endpoints under `/v1/admin/*` (admin token, or loopback when none is configured).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::extract::parse_json;
use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/storage/stats", get(storage_stats))
        .route("/v1/admin/storage/compact", post(compact))
        .route("/v1/admin/compact", post(compact))
        .route("/v1/admin/slow-queries", get(slow_queries))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlowQueriesParams {
    limit: Option<usize>,
    agent_id: Option<String>,
}

/// `GET /v1/admin/slow-queries[?limit=N&agent_id=A]`: the slow-query log, newest first
/// (`limit` default 100, at most 1000).
async fn slow_queries(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    params: Result<axum::extract::Query<SlowQueriesParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = super::extract::query_params(params)?;
    let limit = super::extract::list_limit(params.limit)?;
    let queries = state.slow_queries.list(limit, params.agent_id.as_deref());
    Ok(Json(json!({
        "slow_query_ms": state.config.query.slow_query_ms,
        "capacity": state.config.query.slow_query_log_size,
        "queries": queries,
    }))
    .into_response())
}

/// `GET /v1/admin/storage/stats`: engine statistics as the runbooks read them.
async fn storage_stats(State(state): State<AppState>, _admin: super::AdminRights) -> Result<Response, ApiError> {
    let stats = state.storage.stats();
    let mut body = serde_json::to_value(&stats).map_err(|e| ApiError::new(500, "encoding_failed", e.to_string()))?;
    body["index_memory_bytes"] = json!(super::indexes::index_memory_bytes(&state));
    body["index"] = serde_json::to_value(state.storage.index_stats()).unwrap_or_default();
    Ok(Json(body).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompactRequest {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    aggressive: bool,
}

/// `POST /v1/admin/storage/compact` and `POST /v1/admin/compact`: full manual compaction, run
/// in the background; the answer returns at once.
async fn compact(State(state): State<AppState>, _admin: super::AdminRights, body: Bytes) -> Result<Response, ApiError> {
    let request: CompactRequest =
        if body.iter().all(|b| b.is_ascii_whitespace()) { CompactRequest::default() } else { parse_json(&body)? };
    let storage = state.storage.clone();
    tokio::task::spawn_blocking(move || {
        tracing::info!(force = request.force, aggressive = request.aggressive, "manual compaction started");
        match storage.compact_all() {
            Ok(()) => tracing::info!("manual compaction finished"),
            Err(error) => tracing::error!(error = %error, "manual compaction failed"),
        }
    });
    Ok((axum::http::StatusCode::ACCEPTED, Json(json!({"status": "started"}))).into_response())
}
