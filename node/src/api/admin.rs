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
use crate::error::ErrorCode;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/storage/stats", get(storage_stats))
        .route("/v1/admin/storage/compact", post(compact))
        .route("/v1/admin/compact", post(compact))
        .route("/v1/admin/slow-queries", get(slow_queries))
        .route("/v1/admin/debug/heap-profile", get(heap_profile_status).post(take_heap_profile))
        .route("/v1/admin/debug/heap-profile/download", get(download_heap_profile))
        .route("/v1/admin/debug/heap-profile/sampling", post(set_heap_sampling))
        .route("/v1/admin/audit", get(audit))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    limit: Option<usize>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// `GET /v1/admin/audit[?limit=100&cursor=C]`: the admin actions this node received, newest
/// first (`api::access::audit`).
async fn audit(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    params: Result<axum::extract::Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = super::extract::query_params(params)?;
    let limit = super::extract::list_limit(params.limit)?;
    let access = state.access.clone();
    let cursor = params.cursor.clone();
    let listed = tokio::task::spawn_blocking(move || access.audit.list(limit, cursor.as_deref()))
        .await
        .map_err(|e| ApiError::new(ErrorCode::InternalError, e.to_string()))?;
    let (entries, next_cursor) = listed.map_err(|error| ApiError::new(error.code(), error.to_string()))?;
    Ok(Json(json!({"node_id": state.shards.node_id, "entries": entries, "next_cursor": next_cursor})).into_response())
}

/// `GET /v1/admin/debug/heap-profile`: whether allocations are sampled, and the dumps on disk.
async fn heap_profile_status(State(state): State<AppState>, _admin: super::AdminRights) -> Response {
    Json(state.heap_profiler.status()).into_response()
}

/// `POST /v1/admin/debug/heap-profile`: writes a heap profile of the live sampled allocations
/// now. When sampling was off it is switched on first, so this dump is nearly empty and the
/// next one, taken after the workload ran, shows where memory goes.
async fn take_heap_profile(State(state): State<AppState>, _admin: super::AdminRights) -> Result<Response, ApiError> {
    use crate::metrics::heap_profile::HeapProfiler;
    let was_sampling = HeapProfiler::sampling();
    let context = state.clone();
    let file = off_workers(move || {
        if !was_sampling {
            context.heap_profiler.set_sampling(true)?;
        }
        context.heap_profiler.dump()
    })
    .await?;
    let note = if was_sampling {
        "profile of the allocations sampled since sampling began that are still live"
    } else {
        "sampling was off and is on from now: this profile is nearly empty; take another once the workload has run"
    };
    Ok(Json(json!({
        "profile": file,
        "download": format!("/v1/admin/debug/heap-profile/download?name={}", file.name),
        "sampling_was_on": was_sampling,
        "sampling_since": state.heap_profiler.sampling_since(),
        "sample_interval_bytes": HeapProfiler::sample_interval_bytes(),
        "binary": HeapProfiler::binary(),
        "note": note,
    }))
    .into_response())
}

/// Runs blocking heap-profile file work on tokio's blocking pool, off the request workers.
async fn off_workers<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::metrics::heap_profile::HeapProfileError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(panicked) => Err(ApiError::new(ErrorCode::HeapProfileFailed, panicked.to_string())),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadParams {
    name: Option<String>,
}

/// `GET /v1/admin/debug/heap-profile/download[?name=heap-….prof]`: the newest dump, or the
/// named one, in jemalloc's heap-profile format (`jeprof --text $(which stemedb) FILE`).
async fn download_heap_profile(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    params: Result<axum::extract::Query<DownloadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = super::extract::query_params(params)?;
    let context = state.clone();
    let (name, bytes) = off_workers(move || context.heap_profiler.read(params.name.as_deref())).await?;
    let headers = [
        (axum::http::header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (axum::http::header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}\"")),
    ];
    Ok((headers, bytes).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplingRequest {
    enabled: bool,
}

/// `POST /v1/admin/debug/heap-profile/sampling` `{"enabled": bool}`: switches allocation
/// sampling on or off without a restart.
async fn set_heap_sampling(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SamplingRequest = parse_json(&body)?;
    state.heap_profiler.set_sampling(request.enabled)?;
    Ok(Json(state.heap_profiler.status()).into_response())
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
    let mut body = serde_json::to_value(&stats).map_err(|e| ApiError::new(ErrorCode::EncodingFailed, e.to_string()))?;
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
/// in the background; the answer returns at once. One at a time: `409 compaction_in_progress`
/// while one runs. Progress: `stemedb_compaction_progress_ratio`, and `manual_compaction` of
/// `GET /v1/admin/storage/stats`.
async fn compact(State(state): State<AppState>, _admin: super::AdminRights, body: Bytes) -> Result<Response, ApiError> {
    let request: CompactRequest =
        if body.iter().all(|b| b.is_ascii_whitespace()) { CompactRequest::default() } else { parse_json(&body)? };
    let storage = state.storage.clone();
    if let Err(running) = storage.begin_manual_compaction() {
        return Err(ApiError::new(ErrorCode::CompactionInProgress, "a manual compaction is already running")
            .with_details(json!({"manual_compaction": running})));
    }
    // Tracked: shutdown waits (bounded) for it before closing the storage.
    state.shards.tasks.spawn_blocking(move || {
        tracing::info!(force = request.force, aggressive = request.aggressive, "manual compaction started");
        let started = std::time::Instant::now();
        match storage.run_manual_compaction(request.aggressive) {
            Ok(()) => tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "manual compaction finished"),
            Err(error) => tracing::error!(error = %error, "manual compaction failed"),
        }
    });
    Ok((axum::http::StatusCode::ACCEPTED, Json(json!({"status": "started"}))).into_response())
}
