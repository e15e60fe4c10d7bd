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
pub mod openapi;
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
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
        } else if !self.access.admin_secured() && access::loopback_peer(peer) && !access::loopback_host(headers) {
            let host = access::host_header(headers);
            Err(ApiError::new(
                ErrorCode::AdminTokenRequired,
                format!(
                    "loopback clients have admin rights only when they name a loopback host; this request named \
                     {host:?} (open the node as localhost or 127.0.0.1, or set security.admin_token)"
                ),
            ))
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

/// The paths [`admit`] lets through even when every permit is taken.
pub(crate) fn always_admitted(path: &str) -> bool {
    matches!(path, "/health" | "/v1/health" | "/metrics" | "/cluster/health")
}

/// Admits a request while fewer than `server.max_concurrent_requests` run on its port, else
/// answers `503 overloaded` at once. Health checks and `/metrics` always pass, so a load
/// balancer and Prometheus still see an overloaded node. Both HTTP ports (18180, 18181) have
/// their own set of permits.
pub(crate) async fn admit(
    State(permits): State<Arc<tokio::sync::Semaphore>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if always_admitted(request.uri().path()) {
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

/// A set of `server.max_concurrent_requests` permits: one for the client API (18180 and the
/// dashboard's `/api`), one for the cluster admin (18181 and the dashboard's `/cluster-api`).
pub fn request_permits(state: &AppState) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(state.config.server.max_concurrent_requests))
}

/// Every route of the client API with its documentation. A route must be added here (or in a
/// module's `router()`) through `routes!`, never with a plain `.route()`, or it is missing from
/// `/openapi.json`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(writes::assert))
        .routes(routes!(writes::assert_batch))
        .routes(routes!(writes::vote))
        .routes(routes!(writes::retract))
        .routes(routes!(reads::query))
        .routes(routes!(reads::list_assertions))
        .routes(routes!(reads::get_assertion))
        .routes(routes!(reads::concepts))
        .routes(routes!(health))
        .routes(routes!(health_alias))
        .routes(routes!(metrics))
        .merge(admin::router())
        .merge(backup::router())
        .merge(authority::router())
        .merge(breakers::router())
        .merge(quarantine::router())
        .merge(indexes::router())
}

/// The client API's OpenAPI document, as `GET /openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::finish(routes().into_openapi(), openapi::Api::Client)
}

/// The client API router, admitting requests under `permits` ([`request_permits`]).
pub fn router(state: AppState, permits: Arc<tokio::sync::Semaphore>) -> Router {
    let body_limit = state.config.limits.max_request_bytes;
    let (router, document) = routes().split_for_parts();
    let document = openapi::finish(document, openapi::Api::Client);
    router
        .route("/openapi.json", openapi::serve(openapi::to_json(&document)))
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

/// A node's health, as load balancers read it.
#[derive(Serialize, ToSchema)]
pub struct NodeHealth {
    /// `ok`, `degraded` (a hosted shard has no leader) or `removed` (out of the cluster).
    status: String,
    node_id: u64,
    version: String,
    shards: u16,
    shards_hosted: usize,
    shards_with_leader: usize,
    uptime_seconds: u64,
}

/// The node's health: 200 when every shard it hosts has a leader, else 503 (the same body).
#[utoipa::path(get, path = "/v1/health", tag = "health",
    responses((status = 200, description = "healthy", body = NodeHealth),
        (status = 503, description = "degraded or removed", body = NodeHealth)))]
async fn health(State(state): State<AppState>) -> Response {
    node_health(state)
}

/// The same as `GET /v1/health`, where load balancers look by default.
#[utoipa::path(get, path = "/health", tag = "health", operation_id = "health_alias",
    responses((status = 200, description = "healthy", body = NodeHealth),
        (status = 503, description = "degraded or removed", body = NodeHealth)))]
async fn health_alias(State(state): State<AppState>) -> Response {
    node_health(state)
}

fn node_health(state: AppState) -> Response {
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
    let body = NodeHealth {
        status: if removed {
            "removed"
        } else if healthy {
            "ok"
        } else {
            "degraded"
        }
        .to_string(),
        node_id: state.shards.node_id,
        version: env!("CARGO_PKG_VERSION").to_string(),
        shards: state.shards.shard_count(),
        shards_hosted: hosted.len(),
        shards_with_leader: led,
        uptime_seconds: state.started_at.elapsed().as_secs(),
    };
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// The node's metrics in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}
