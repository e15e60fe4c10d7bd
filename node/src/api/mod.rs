//! The client API on port 18180 (HTTP/JSON): assertions, votes, retractions, queries, concept
//! listing, health, `/metrics` and the node admin endpoints. Handlers validate input, route to
//! the owning shard and turn results into JSON; they hold no data of their own.

pub mod access;
pub mod admin;
pub mod authority;
pub mod backup;
pub mod breakers;
pub mod error;
pub mod extract;
pub mod indexes;
pub mod quarantine;
pub mod reads;
pub mod slow_queries;
pub mod writes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::Config;
use crate::error::ErrorCode;
use crate::metrics::Metrics;
use crate::raft::ShardSet;
use crate::storage::Storage;
pub use error::ApiError;

/// Everything a request handler may use.
pub struct NodeContext {
    pub cluster_id: String,
    pub config: Config,
    pub shards: Arc<ShardSet>,
    /// Coalesces concurrent single-assertion writes per shard into one Raft entry.
    pub write_batchers: crate::coordinator::batch::WriteBatchers,
    pub storage: Arc<Storage>,
    pub metrics: Metrics,
    pub started_at: Instant,
    pub slow_queries: slow_queries::SlowQueryLog,
    /// Per-agent write rates and circuit-breaker admission.
    pub breakers: breakers::BreakerMonitor,
    /// Online index rebuilds of this node's shards.
    pub indexes: indexes::IndexRebuilds,
    /// Anti-entropy checks, scrubs and repairs of this node's replicas (`/cluster/sync*`).
    pub anti_entropy: Arc<crate::cluster::anti_entropy::AntiEntropy>,
    /// Backups this node coordinates (`/v1/admin/backup`), and copies of its replicas for
    /// backups peers coordinate.
    pub backups: Arc<crate::cluster::backup::Backups>,
    /// Heap-profile sampling and dumps (`/v1/admin/debug/heap-profile`).
    pub heap_profiler: crate::metrics::heap_profile::HeapProfiler,
    /// Tokens, rate limits and the audit log of both HTTP APIs.
    pub access: Arc<access::Access>,
}

pub type AppState = Arc<NodeContext>;

impl NodeContext {
    /// Whether the request carries admin rights ([`access::Access::is_admin`]): an admin token
    /// when tokens are configured; else `security.admin_token`, or a loopback peer when none is
    /// set.
    pub fn is_admin(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> bool {
        self.access.is_admin(headers, peer)
    }

    pub fn require_admin(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        if self.is_admin(headers, peer) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::AdminTokenRequired,
                "this endpoint needs the admin token: Authorization: Bearer <security.admin_token>",
            ))
        }
    }
}

/// Extractor for admin endpoints: the request carries admin rights ([`NodeContext::is_admin`]),
/// else it is refused with `401 admin_token_required` before the handler runs.
pub struct AdminRights;

impl axum::extract::FromRequestParts<AppState> for AdminRights {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0);
        state.require_admin(&parts.headers, peer).map(|_| AdminRights)
    }
}

/// The peer address of a request (the server always runs with connect info).
pub fn peer_of(connect_info: ConnectInfo<SocketAddr>) -> Option<SocketAddr> {
    Some(connect_info.0)
}

/// Admits a request while fewer than `server.max_concurrent_requests` run, else answers
/// `503 overloaded` at once. Health checks and `/metrics` always pass, so a load balancer and
/// Prometheus still see an overloaded node.
async fn admit(
    State(permits): State<Arc<tokio::sync::Semaphore>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if matches!(request.uri().path(), "/health" | "/v1/health" | "/metrics") {
        return next.run(request).await;
    }
    match permits.try_acquire_owned() {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(_) => {
            crate::metrics::REQUESTS_SHED.with_label_values(&["concurrency"]).inc();
            ApiError::new(
                ErrorCode::Overloaded,
                "this node is serving server.max_concurrent_requests requests already; retry shortly",
            )
            .into_response()
        }
    }
}

/// The permits of `server.max_concurrent_requests`: one set per node, shared by every router
/// that serves the client API (18180 and the dashboard's `/api`).
pub fn request_permits(state: &AppState) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(state.config.server.max_concurrent_requests))
}

/// The client API router, admitting requests under `permits` ([`request_permits`]).
pub fn router(state: AppState, permits: Arc<tokio::sync::Semaphore>) -> Router {
    let body_limit = state.config.limits.max_request_bytes;
    Router::new()
        .route("/v1/assert", post(writes::assert))
        .route("/v1/assert/batch", post(writes::assert_batch))
        .route("/v1/vote", post(writes::vote))
        .route("/v1/retract", post(writes::retract))
        .route("/v1/query", post(reads::query))
        .route("/v1/assertions", get(reads::list_assertions))
        .route("/v1/assertions/{id}", get(reads::get_assertion))
        .route("/v1/concepts", get(reads::concepts))
        .route("/v1/health", get(health))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(admin::router())
        .merge(backup::router())
        .merge(authority::router())
        .merge(breakers::router())
        .merge(quarantine::router())
        .merge(indexes::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(state.access.clone(), access::guard))
        .layer(axum::middleware::from_fn_with_state(permits, admit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint; see docs/api.md")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "this endpoint does not accept that HTTP method; see docs/api.md")
}

async fn health(State(state): State<AppState>) -> Response {
    // Only the shards this node hosts: with replication_factor below the node count, the others
    // have no local leader by design and must not make a load balancer drop the node.
    let groups = state.shards.groups();
    let hosted: Vec<_> = groups.iter().filter(|g| state.shards.hosts(g)).collect();
    // A shard in a hand-over or an election (leaderless for less than the grace) still counts:
    // its requests wait for the new leader, and a load balancer must not drop the node for it.
    let grace = state.config.raft.leaderless_grace();
    let led = hosted.iter().filter(|g| g.leaderless_for().map_or(true, |d| d <= grace)).count();
    // A node told it was removed from the cluster serves nothing of its own.
    let removed = state.shards.removed_by().is_some();
    let healthy = led == hosted.len() && !removed;
    let body = json!({
        "status": if removed { "removed" } else if healthy { "ok" } else { "degraded" },
        "node_id": state.shards.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "shards": state.shards.shard_count(),
        "shards_hosted": hosted.len(),
        "shards_with_leader": led,
        "uptime_seconds": state.started_at.elapsed().as_secs(),
    });
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}
