//! Node admin endpoints under `/v1/admin/*` (admin token, or loopback when none is configured).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::audit::AuditEntry;
use super::error::ApiError;
use super::extract::{optional_json, parse_json};
use super::openapi::{errors, ADMIN, OPTIONAL_BODY, QUERY, STORAGE};
use super::slow_queries::SlowQuery;
use super::AppState;
use crate::error::ErrorCode;
use crate::metrics::heap_profile::{HeapProfileStatus, ProfileFile};
use crate::model::assertion::{validate_agent_id, AgentIdText};
use crate::storage::{IndexFamilyStats, StorageStats};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(storage_stats))
        .routes(routes!(compact))
        .routes(routes!(compact_alias))
        .routes(routes!(slow_queries))
        .routes(routes!(heap_profile_status, take_heap_profile))
        .routes(routes!(download_heap_profile))
        .routes(routes!(set_heap_sampling))
        .routes(routes!(audit))
}

#[derive(Debug, Default, serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    /// 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// A page of the audit log.
#[derive(Serialize, ToSchema)]
struct AuditPage {
    node_id: u64,
    entries: Vec<AuditEntry>,
    #[schema(required = true)]
    next_cursor: Option<String>,
}

errors!(AuditErrors: ADMIN, QUERY, STORAGE, &[ErrorCode::InvalidLimit, ErrorCode::InvalidCursor, ErrorCode::InternalError]);

/// The admin actions this node received, newest first.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "node admin", params(AuditParams),
    responses((status = 200, description = "one page", body = AuditPage), AuditErrors))]
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
    Ok(Json(AuditPage { node_id: state.shards.node_id, entries, next_cursor }).into_response())
}

errors!(HeapStatusErrors: ADMIN);

/// Whether allocations are sampled, and the dumps on disk.
#[utoipa::path(get, path = "/v1/admin/debug/heap-profile", tag = "node admin",
    responses((status = 200, description = "the profiler", body = HeapProfileStatus), HeapStatusErrors))]
async fn heap_profile_status(State(state): State<AppState>, _admin: super::AdminRights) -> Response {
    Json(state.heap_profiler.status()).into_response()
}

/// A heap profile just written.
#[derive(Serialize, ToSchema)]
struct HeapProfileTaken {
    profile: ProfileFile,
    /// Where to download it.
    download: String,
    sampling_was_on: bool,
    #[schema(required = true)]
    sampling_since: Option<String>,
    #[schema(required = true)]
    sample_interval_bytes: Option<u64>,
    #[schema(required = true)]
    binary: Option<String>,
    note: String,
}

/// What heap profiling can answer besides admin rights.
const HEAP: &[ErrorCode] =
    &[ErrorCode::HeapProfilingUnavailable, ErrorCode::NoHeapProfile, ErrorCode::HeapProfileFailed];

errors!(TakeHeapErrors: ADMIN, HEAP);

/// Writes a heap profile of the live sampled allocations now. When sampling was off it is
/// switched on first, so this dump is nearly empty and the next one, taken after the workload
/// ran, shows where memory goes.
#[utoipa::path(post, path = "/v1/admin/debug/heap-profile", tag = "node admin",
    responses((status = 200, description = "written", body = HeapProfileTaken), TakeHeapErrors))]
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
    Ok(Json(HeapProfileTaken {
        download: format!("/v1/admin/debug/heap-profile/download?name={}", file.name),
        profile: file,
        sampling_was_on: was_sampling,
        sampling_since: state.heap_profiler.sampling_since(),
        sample_interval_bytes: HeapProfiler::sample_interval_bytes(),
        binary: HeapProfiler::binary(),
        note: note.to_string(),
    })
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

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DownloadParams {
    /// A dump's name (default: the newest).
    name: Option<String>,
}

errors!(DownloadErrors: ADMIN, QUERY, HEAP, &[ErrorCode::HeapProfileNotFound, ErrorCode::InvalidHeapProfileName]);

/// The newest dump, or the named one, in jemalloc's heap-profile format
/// (`jeprof --text $(which stemedb) FILE`).
#[utoipa::path(get, path = "/v1/admin/debug/heap-profile/download", tag = "node admin", params(DownloadParams),
    responses((status = 200, description = "the dump", content_type = "application/octet-stream", body = String,
        headers(("Content-Disposition" = String, description = "attachment; filename=..."))), DownloadErrors))]
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SamplingRequest {
    enabled: bool,
}

errors!(SamplingErrors: ADMIN, OPTIONAL_BODY, HEAP);

/// Switches allocation sampling on or off without a restart.
#[utoipa::path(post, path = "/v1/admin/debug/heap-profile/sampling", tag = "node admin", request_body = SamplingRequest,
    responses((status = 200, description = "the profiler now", body = HeapProfileStatus), SamplingErrors))]
async fn set_heap_sampling(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SamplingRequest = parse_json(&body)?;
    state.heap_profiler.set_sampling(request.enabled)?;
    Ok(Json(state.heap_profiler.status()).into_response())
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct SlowQueriesParams {
    /// 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Only this agent's queries.
    #[param(value_type = Option<AgentIdText>, inline)]
    agent_id: Option<String>,
}

/// The slow-query log.
#[derive(Serialize, ToSchema)]
struct SlowQueryPage {
    /// `query.slow_query_ms`.
    slow_query_ms: u64,
    /// `query.slow_query_log_size`.
    capacity: usize,
    /// Newest first.
    queries: Vec<SlowQuery>,
}

errors!(SlowQueryErrors: ADMIN, QUERY, &[ErrorCode::InvalidLimit, ErrorCode::InvalidAgentId]);

/// The slow-query log, newest first.
#[utoipa::path(get, path = "/v1/admin/slow-queries", tag = "node admin", params(SlowQueriesParams),
    responses((status = 200, description = "the log", body = SlowQueryPage), SlowQueryErrors))]
async fn slow_queries(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    params: Result<axum::extract::Query<SlowQueriesParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = super::extract::query_params(params)?;
    let limit = super::extract::list_limit(params.limit)?;
    if let Some(agent_id) = &params.agent_id {
        validate_agent_id(agent_id)?;
    }
    let queries = state.slow_queries.list(limit, params.agent_id.as_deref());
    Ok(Json(SlowQueryPage {
        slow_query_ms: state.config.query.slow_query_ms,
        capacity: state.config.query.slow_query_log_size,
        queries,
    })
    .into_response())
}

/// The engine's statistics with the indexes' size.
#[derive(Serialize, ToSchema)]
struct StorageStatsResponse {
    #[serde(flatten)]
    stats: StorageStats,
    /// The index family's memory and the authority graph's.
    index_memory_bytes: u64,
    index: IndexFamilyStats,
}

errors!(StatsErrors: ADMIN);

/// Engine statistics as the runbooks read them.
#[utoipa::path(get, path = "/v1/admin/storage/stats", tag = "node admin",
    responses((status = 200, description = "the statistics", body = StorageStatsResponse), StatsErrors))]
async fn storage_stats(State(state): State<AppState>, _admin: super::AdminRights) -> Result<Response, ApiError> {
    let body = StorageStatsResponse {
        stats: state.storage.stats(),
        index_memory_bytes: super::indexes::index_memory_bytes(&state),
        index: state.storage.index_stats(),
    };
    Ok(Json(body).into_response())
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CompactRequest {
    /// Accepted for the runbooks' commands; every manual compaction is full.
    #[serde(default)]
    force: bool,
    /// Also rewrite the bottommost level.
    #[serde(default)]
    aggressive: bool,
}

#[derive(Serialize, ToSchema)]
struct CompactStarted {
    /// Always `started`.
    status: String,
}

errors!(CompactErrors: ADMIN, OPTIONAL_BODY, &[ErrorCode::CompactionInProgress]);

/// Full manual compaction, run in the background; the answer returns at once. One at a time:
/// `409 compaction_in_progress` while one runs. Progress: `stemedb_compaction_progress_ratio`,
/// and `manual_compaction` of `GET /v1/admin/storage/stats`.
#[utoipa::path(post, path = "/v1/admin/storage/compact", tag = "node admin",
    request_body(content = Option<CompactRequest>, description = "optional"),
    responses((status = 202, description = "started", body = CompactStarted), CompactErrors))]
async fn compact(State(state): State<AppState>, _admin: super::AdminRights, body: Bytes) -> Result<Response, ApiError> {
    compact_now(state, body)
}

/// The same as `POST /v1/admin/storage/compact` (the runbooks' older path).
#[utoipa::path(post, path = "/v1/admin/compact", tag = "node admin",
    request_body(content = Option<CompactRequest>, description = "optional"),
    responses((status = 202, description = "started", body = CompactStarted), CompactErrors))]
async fn compact_alias(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    body: Bytes,
) -> Result<Response, ApiError> {
    compact_now(state, body)
}

/// Starts a manual compaction in the background (admin rights checked by the caller).
fn compact_now(state: AppState, body: Bytes) -> Result<Response, ApiError> {
    let request: CompactRequest = optional_json(&body)?;
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
    Ok((axum::http::StatusCode::ACCEPTED, Json(CompactStarted { status: "started".into() })).into_response())
}
