//! Index admin endpoints: `POST /v1/admin/indexes/rebuild` starts a verification and repair of
//! every shard this node hosts (in the background, writes wait at most one chunk at a time, see
//! `shard::index_repair`), `GET /v1/admin/indexes/status` reports progress and the last result.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use parking_lot::Mutex;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::openapi::{errors, ADMIN};
use super::AppState;
use crate::error::ErrorCode;
use crate::model::id::{format_time_us, now_us};
use crate::shard::index_repair::{repair_group, RepairReport};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(rebuild)).routes(routes!(status))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RebuildState {
    Ready,
    Rebuilding,
    Failed,
}

/// The node's index rebuilds: the one running, if any, and the last result.
#[derive(Default)]
pub struct IndexRebuilds {
    inner: Mutex<RebuildStatus>,
    scanned: AtomicU64,
}

#[derive(Debug, Clone, Default)]
struct RebuildStatus {
    running: bool,
    failed: Option<String>,
    started_at_us: Option<u64>,
    finished_at_us: Option<u64>,
    shards_total: usize,
    shards_done: usize,
    report: Option<RepairReport>,
}

/// A rebuild's state and progress.
#[derive(Serialize, ToSchema)]
pub struct RebuildView {
    status: RebuildState,
    /// When the last rebuild finished (`null` while one runs).
    #[schema(required = true)]
    last_rebuild: Option<String>,
    #[schema(required = true)]
    started_at: Option<String>,
    #[schema(required = true)]
    error: Option<String>,
    progress: RebuildProgress,
    #[schema(required = true)]
    report: Option<RepairReport>,
}

#[derive(Serialize, ToSchema)]
pub struct RebuildProgress {
    shards_total: usize,
    shards_done: usize,
    assertions_scanned: u64,
}

/// The rebuild status with the size of the indexes.
#[derive(Serialize, ToSchema)]
pub struct IndexStatus {
    #[serde(flatten)]
    rebuild: RebuildView,
    index_memory_bytes: u64,
    index_entries_estimate: u64,
}

impl IndexRebuilds {
    fn view(&self) -> RebuildView {
        let status = self.inner.lock().clone();
        let state = if status.running {
            RebuildState::Rebuilding
        } else if status.failed.is_some() {
            RebuildState::Failed
        } else {
            RebuildState::Ready
        };
        RebuildView {
            status: state,
            last_rebuild: if status.running { None } else { status.finished_at_us.map(format_time_us) },
            started_at: status.started_at_us.map(format_time_us),
            error: status.failed,
            progress: RebuildProgress {
                shards_total: status.shards_total,
                shards_done: status.shards_done,
                assertions_scanned: self.scanned.load(Ordering::Relaxed),
            },
            report: status.report,
        }
    }
}

errors!(RebuildErrors: ADMIN, &[ErrorCode::RebuildInProgress]);

/// Verifies and repairs the indexes of every shard this node hosts, in the background.
#[utoipa::path(post, path = "/v1/admin/indexes/rebuild", tag = "node admin",
    responses((status = 202, description = "started", body = RebuildView), RebuildErrors))]
async fn rebuild(State(state): State<AppState>, _admin: super::AdminRights) -> Result<Response, ApiError> {
    start_rebuild(&state, "admin request")?;
    Ok((StatusCode::ACCEPTED, Json(state.indexes.view())).into_response())
}

/// Starts a verification and repair of every shard this node hosts, in the background; 409
/// while one runs.
pub fn start_rebuild(state: &AppState, trigger: &'static str) -> Result<(), ApiError> {
    let readers: Vec<_> =
        state.shards.groups().iter().filter(|g| state.shards.hosts(g)).map(|g| g.reader.clone()).collect();
    {
        let mut status = state.indexes.inner.lock();
        if status.running {
            return Err(ApiError::new(
                ErrorCode::RebuildInProgress,
                "an index rebuild is already running on this node",
            ));
        }
        *status = RebuildStatus {
            running: true,
            started_at_us: Some(now_us()),
            shards_total: readers.len(),
            ..RebuildStatus::default()
        };
        state.indexes.scanned.store(0, Ordering::Relaxed);
    }
    tracing::info!(shards = readers.len(), trigger, "starting index rebuild");
    let context = state.clone();
    state.shards.tasks.spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut total = RepairReport::default();
        let mut failure = None;
        for reader in &readers {
            // Shutdown waits for this task before closing the storage: stop between shards.
            if context.shards.tasks.is_stopping() {
                failure = Some("interrupted by shutdown; run it again".to_string());
                break;
            }
            let repaired = repair_group(
                &context.storage,
                reader.group_id(),
                Some(reader.progress().as_ref()),
                &context.indexes.scanned,
            );
            // Whatever it wrote, a failed run included (it commits chunk by chunk): cached reads
            // may predate it, and applies now update them in place rather than drop them.
            reader.clear_cache();
            match repaired {
                Ok(report) => {
                    tracing::info!(
                        shard = reader.shard,
                        assertions = report.assertions,
                        missing_added = report.missing_added,
                        stale_removed = report.stale_removed,
                        counts_fixed = report.counts_fixed,
                        "shard indexes verified"
                    );
                    total.add(&report);
                }
                Err(error) => {
                    tracing::error!(shard = reader.shard, error = %error, "index rebuild failed");
                    failure = Some(format!("shard {}: {error}", reader.shard));
                    break;
                }
            }
            context.indexes.inner.lock().shards_done += 1;
        }
        if failure.is_some() {
            tracing::error!(elapsed_ms = started.elapsed().as_millis() as u64, "index rebuild failed");
        } else {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                assertions = total.assertions,
                claim_entries = total.claim_entries,
                concept_entries = total.concept_entries,
                agent_entries = total.agent_entries,
                missing_added = total.missing_added,
                stale_removed = total.stale_removed,
                "index rebuild complete"
            );
        }
        let mut status = context.indexes.inner.lock();
        status.running = false;
        status.failed = failure;
        status.finished_at_us = Some(now_us());
        status.report = Some(total);
    });
    Ok(())
}

errors!(StatusErrors: ADMIN);

/// The index rebuild's state and progress, and the indexes' size.
#[utoipa::path(get, path = "/v1/admin/indexes/status", tag = "node admin",
    responses((status = 200, description = "the status", body = IndexStatus), StatusErrors))]
async fn status(State(state): State<AppState>, _admin: super::AdminRights) -> Result<Response, ApiError> {
    let body = IndexStatus {
        rebuild: state.indexes.view(),
        index_memory_bytes: index_memory_bytes(&state),
        index_entries_estimate: state.storage.index_stats().estimated_keys,
    };
    Ok(Json(body).into_response())
}

/// Memory the node's indexes hold: the RocksDB index family's memtables and table readers, and
/// the in-memory authority graph (grants, roots, breakers) with its cache.
pub fn index_memory_bytes(state: &AppState) -> u64 {
    state.storage.index_stats().memory_bytes + state.shards.policy().memory_bytes()
}
