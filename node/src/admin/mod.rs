//! Cluster admin on port 18181 (HTTP/JSON): cluster health, members, shards, leader transfer,
//! replica moves and the cluster metadata, from this node's view of the groups it hosts and its
//! copy of the meta group. JSON shapes follow the operations runbooks (`.members[]` with `id`,
//! `status`, `replication_lag`; `.shards[]` with `query_rate`). Anti-entropy's status and its
//! sync-now request are in `sync`.

mod sync;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::openapi::{self, errors, ADMIN, BODY, PROPOSE};
use crate::api::{ApiError, AppState};
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::meta::{MetaCommand, MetaState, MoveCause, NodeRecord, NodeStatus, Rebalance, RebalanceStatus, META_SHARD};
use crate::raft::shards::{ShardRates, ShardStatus};
use crate::raft::types::GroupAdmin;

/// Every route of the cluster admin API with its documentation (through `routes!` only, or it
/// is missing from `/openapi.json`).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(members, add_member))
        .routes(routes!(remove_member))
        .routes(routes!(shards))
        .routes(routes!(shard))
        .routes(routes!(shard_digest))
        .routes(routes!(meta))
        .routes(routes!(sync::sync_status))
        .routes(routes!(sync::sync))
        .routes(routes!(rebalance))
        .routes(routes!(transfer_leader))
}

/// The cluster admin API's OpenAPI document, as `GET /openapi.json` on 18181 serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::finish(routes().into_openapi(), openapi::Api::Cluster)
}

/// The cluster admin router, admitting requests under `permits` (`api::request_permits`: its
/// own set, so a flood of slow admin requests cannot take the client API's, nor the reverse).
pub fn router(state: AppState, permits: std::sync::Arc<tokio::sync::Semaphore>) -> Router {
    let (router, document) = routes().split_for_parts();
    let document = openapi::finish(document, openapi::Api::Cluster);
    router
        .route("/openapi.json", openapi::serve(openapi::to_json(&document)))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such cluster admin endpoint; see docs/api.md") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "this endpoint does not accept that HTTP method; see docs/api.md",
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.access.clone(), crate::api::access::guard))
        .layer(axum::middleware::from_fn_with_state(permits, crate::api::admit))
        .with_state(state)
}

/// The shards this node hosts a replica of, as it sees them.
fn statuses(state: &AppState) -> Vec<ShardStatus> {
    state
        .shards
        .groups()
        .iter()
        .filter(|g| state.shards.hosts(g))
        .filter_map(|g| state.shards.status(g.shard).ok())
        .collect()
}

struct MemberView {
    addr: String,
    /// What the cluster metadata says (JOINING, UP or LEAVING); `None` before it is bootstrapped.
    lifecycle: Option<NodeStatus>,
    shards_led: usize,
    shards_hosted: usize,
    max_lag: Option<f64>,
}

/// Every member: from the cluster metadata once bootstrapped (else from the groups' memberships),
/// with the shards placed on it and, as far as this node sees them, the shards it leads.
fn member_views(state: &AppState, statuses: &[ShardStatus]) -> BTreeMap<u64, MemberView> {
    let meta = state.shards.meta();
    let view = |addr: String, lifecycle: Option<NodeStatus>| MemberView {
        addr,
        lifecycle,
        shards_led: 0,
        shards_hosted: 0,
        max_lag: None,
    };
    let mut members: BTreeMap<u64, MemberView> = if meta.is_bootstrapped() {
        meta.nodes.iter().map(|(id, n)| (*id, view(n.raft_addr.clone(), Some(n.status)))).collect()
    } else {
        state.shards.known_nodes().into_iter().map(|(id, addr)| (id, view(addr, None))).collect()
    };
    if meta.is_bootstrapped() {
        for (id, member) in members.iter_mut() {
            member.shards_hosted = meta.shards_of(*id).len();
        }
    } else {
        for status in statuses {
            for id in status.voters.iter().chain(&status.learners) {
                if let Some(member) = members.get_mut(id) {
                    member.shards_hosted += 1;
                }
            }
        }
    }
    for status in statuses {
        if let Some(member) = status.leader.and_then(|l| members.get_mut(&l)) {
            member.shards_led += 1;
        }
        for follower in &status.replication {
            if let Some(member) = members.get_mut(&follower.node) {
                member.max_lag = Some(member.max_lag.unwrap_or(0.0).max(follower.lag_seconds));
            }
        }
    }
    members
}

/// UP when it is this node or its node heartbeats (sent every `raft.heartbeat_interval_ms` to
/// every known node) arrived within two maximum election timeouts. Replication lag says nothing
/// about liveness: a follower of a shard nobody writes to has no lag, reachable or not.
fn member_up(state: &AppState, id: u64) -> bool {
    id == state.shards.node_id || state.shards.heard_from(id, liveness_window(state))
}

/// How long a member may stay silent before it counts as DOWN.
fn liveness_window(state: &AppState) -> std::time::Duration {
    std::time::Duration::from_millis(state.config.raft.election_timeout_max_ms.saturating_mul(2))
}

/// JOINING or LEAVING while the cluster adds or decommissions the node, else UP or DOWN.
fn member_status(state: &AppState, id: u64, member: &MemberView) -> &'static str {
    match member.lifecycle {
        Some(NodeStatus::Joining) => "JOINING",
        Some(NodeStatus::Leaving) => "LEAVING",
        _ if member_up(state, id) => "UP",
        _ => "DOWN",
    }
}

/// The cluster's health as this node sees it.
#[derive(Serialize, ToSchema)]
struct ClusterHealth {
    /// `healthy`, `degraded` (a member is down) or `unavailable` (a shard has no leader).
    status: String,
    node_id: u64,
    cluster_id: String,
    nodes_total: usize,
    nodes_up: usize,
    shards_total: u16,
    /// Shards (and the meta group) this node hosts.
    shards_hosted: usize,
    shards_with_leader: usize,
    shards_without_leader: Vec<u16>,
    /// Leaderless for less than one maximum election timeout: in a hand-over or an election.
    shards_electing: Vec<u16>,
}

/// The cluster's health: 200 unless a hosted shard has had no leader for longer than an
/// election, then 503 (the same body).
#[utoipa::path(get, path = "/cluster/health", tag = "cluster",
    responses((status = 200, description = "healthy or degraded", body = ClusterHealth),
        (status = 503, description = "a shard has no leader", body = ClusterHealth)))]
async fn health(State(state): State<AppState>) -> Response {
    let statuses = statuses(&state);
    let members = member_views(&state, &statuses);
    let up = members.keys().filter(|id| member_up(&state, **id)).count();
    // A shard that lost its leader less than one maximum election timeout ago is in a hand-over
    // or an election (requests for it wait); past that it has no leader.
    let grace = state.config.raft.leaderless_grace();
    let (without_leader, electing): (Vec<&ShardStatus>, Vec<&ShardStatus>) =
        statuses.iter().filter(|s| s.leaderless_for.is_some()).partition(|s| s.leaderless_for > Some(grace));
    let without_leader: Vec<u16> = without_leader.iter().map(|s| s.shard).collect();
    let electing: Vec<u16> = electing.iter().map(|s| s.shard).collect();
    let status = if !without_leader.is_empty() {
        "unavailable"
    } else if up < members.len() {
        "degraded"
    } else {
        "healthy"
    };
    let body = ClusterHealth {
        status: status.to_string(),
        node_id: state.shards.node_id,
        cluster_id: state.cluster_id.clone(),
        nodes_total: members.len(),
        nodes_up: up,
        shards_total: state.shards.shard_count(),
        shards_hosted: statuses.len(),
        shards_with_leader: statuses.len() - without_leader.len(),
        shards_without_leader: without_leader,
        shards_electing: electing,
    };
    let code = if status == "unavailable" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, Json(body)).into_response()
}

/// The members as this node sees them.
#[derive(Serialize, ToSchema)]
struct MemberList {
    node_id: u64,
    members: Vec<Member>,
}

#[derive(Serialize, ToSchema)]
struct Member {
    id: u64,
    raft_addr: String,
    /// `UP`, `DOWN`, `JOINING` or `LEAVING`.
    status: String,
    /// The largest lag, in seconds, of its replicas of the shards this node leads.
    #[schema(required = true)]
    replication_lag: Option<f64>,
    shards_led: usize,
    shards_hosted: usize,
    /// Whether it is the node answering.
    #[serde(rename = "self")]
    is_self: bool,
}

/// The members with their status, lag and shards.
#[utoipa::path(get, path = "/cluster/members", tag = "cluster",
    responses((status = 200, description = "the members", body = MemberList)))]
async fn members(State(state): State<AppState>) -> Json<MemberList> {
    let statuses = statuses(&state);
    let members = member_views(&state, &statuses)
        .iter()
        .map(|(id, m)| Member {
            id: *id,
            raft_addr: m.addr.clone(),
            status: member_status(&state, *id, m).to_string(),
            replication_lag: if *id == state.shards.node_id { Some(0.0) } else { m.max_lag },
            shards_led: m.shards_led,
            shards_hosted: m.shards_hosted,
            is_self: *id == state.shards.node_id,
        })
        .collect();
    Json(MemberList { node_id: state.shards.node_id, members })
}

/// One shard as this node sees it, with its request rates and its last replica move.
#[derive(Serialize, ToSchema)]
struct ShardView {
    #[serde(flatten)]
    status: ShardStatus,
    #[serde(flatten)]
    rates: ShardRates,
    /// The last move's status, or `NONE`.
    #[schema(value_type = String)]
    rebalance_status: RebalanceStatusOrNone,
    #[schema(required = true)]
    rebalance: Option<Rebalance>,
    /// Its replicas as the cluster metadata places them.
    #[schema(required = true)]
    placement: Option<Vec<u64>>,
    /// Whether this node has a replica.
    hosted: bool,
}

/// `PENDING`, `IN_PROGRESS`, `COMPLETE`, `FAILED`, or `NONE` when the shard never moved.
#[derive(Serialize)]
#[serde(untagged)]
enum RebalanceStatusOrNone {
    Status(RebalanceStatus),
    None(&'static str),
}

fn shard_view(state: &AppState, status: ShardStatus) -> ShardView {
    let rates = state.shards.rates(status.shard);
    let meta = state.shards.meta();
    let rebalance = meta.rebalances.get(&status.shard).cloned();
    let hosted = state.shards.group(status.shard).is_ok_and(|g| state.shards.hosts(&g));
    ShardView {
        rebalance_status: rebalance
            .as_ref()
            .map_or(RebalanceStatusOrNone::None("NONE"), |r| RebalanceStatusOrNone::Status(r.status)),
        rebalance,
        placement: meta.placement.get(&status.shard).cloned(),
        hosted,
        rates,
        status,
    }
}

#[derive(Serialize, ToSchema)]
struct ShardList {
    node_id: u64,
    shards: Vec<ShardView>,
}

/// The shards this node hosts a replica of.
#[utoipa::path(get, path = "/cluster/shards", tag = "cluster",
    responses((status = 200, description = "the shards", body = ShardList)))]
async fn shards(State(state): State<AppState>) -> Json<ShardList> {
    let shards = statuses(&state).into_iter().map(|s| shard_view(&state, s)).collect();
    Json(ShardList { node_id: state.shards.node_id, shards })
}

fn parse_shard(state: &AppState, id: &str) -> Result<u16, ApiError> {
    id.parse::<u16>().ok().filter(|s| *s < state.shards.shard_count()).ok_or_else(|| {
        ApiError::new(ErrorCode::UnknownShard, format!("no shard {id:?}; shards are 0..{}", state.shards.shard_count()))
    })
}

errors!(ShardErrors: &[ErrorCode::UnknownShard]);

/// One shard as this node sees it.
#[utoipa::path(get, path = "/cluster/shards/{id}", tag = "cluster",
    params(("id" = String, Path, description = "the shard number")),
    responses((status = 200, description = "the shard", body = ShardView), ShardErrors))]
async fn shard(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ShardView>, ApiError> {
    let shard = parse_shard(&state, &id)?;
    let status = state.shards.status(shard)?;
    Ok(Json(shard_view(&state, status)))
}

/// A digest of one replica.
#[derive(Serialize, ToSchema)]
struct ShardDigest {
    shard: u16,
    node_id: u64,
    applied_index: u64,
    /// Hex.
    digest: String,
    keys: u64,
}

errors!(DigestErrors: crate::api::openapi::STORAGE, &[
    ErrorCode::UnknownShard,
    ErrorCode::NotHosted,
    ErrorCode::ShardBusy,
    ErrorCode::InternalError,
]);

/// A digest of this node's replica of the shard and the applied index it was taken at.
/// Replicas at the same applied index must agree (the chaos harness compares them after every
/// run). 404 `not_hosted` when this node has no replica.
#[utoipa::path(get, path = "/cluster/shards/{id}/digest", tag = "cluster",
    params(("id" = String, Path, description = "the shard number")),
    responses((status = 200, description = "the digest", body = ShardDigest), DigestErrors))]
async fn shard_digest(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ShardDigest>, ApiError> {
    let shard = parse_shard(&state, &id)?;
    let group = state.shards.group(shard)?;
    if !state.shards.hosts(&group) {
        return Err(ApiError::new(
            ErrorCode::NotHosted,
            format!("node {} has no replica of shard {shard}", state.shards.node_id),
        ));
    }
    // A full scan of the shard: off the async workers.
    let reader = group.reader.clone();
    let digest = tokio::task::spawn_blocking(move || reader.digest())
        .await
        .map_err(|e| ApiError::new(ErrorCode::InternalError, e.to_string()))??
        .ok_or_else(|| {
            ApiError::new(ErrorCode::ShardBusy, format!("shard {shard} kept changing during the scan; retry"))
        })?;
    Ok(Json(ShardDigest {
        shard,
        node_id: state.shards.node_id,
        applied_index: digest.applied_index,
        digest: digest.digest,
        keys: digest.keys,
    }))
}

/// Time allowed for one shard's membership change (adding a voter waits for it to catch up).
const MEMBERSHIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AddMemberRequest {
    /// The new node's id (from 1).
    id: u64,
    /// Its `IP:PORT` on 18182.
    raft_addr: String,
}

/// A member's place after an add or a removal.
#[derive(Serialize, ToSchema)]
struct MemberChange {
    id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    raft_addr: Option<String>,
    /// `UP` or `JOINING` after an add; `REMOVED` or `LEAVING` after a removal.
    status: String,
    /// The shards placed on it.
    shards: Vec<u16>,
}

/// What a cluster change through the meta group can answer.
const CHANGE: &[ErrorCode] = &[
    ErrorCode::ClusterNotReady,
    ErrorCode::UnknownMember,
    ErrorCode::MemberConflict,
    ErrorCode::UnknownShard,
    ErrorCode::RebalanceInProgress,
    ErrorCode::NoRebalance,
    ErrorCode::MemberHostsReplicas,
    ErrorCode::InvalidRebalance,
    ErrorCode::LastMember,
];

/// Cluster changes need an admin token when a token is configured (`security.admin_token` or
/// `security.tokens`; with tokens the access middleware has checked the role already). Without
/// one they are open, because members join from other hosts; set one in production.
fn require_token_if_set(state: &AppState, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if !state.access.admin_secured() {
        return Ok(());
    }
    state.require_admin(headers, None)
}

/// Proposes a change of the cluster metadata; refusals become client errors.
async fn change_meta(state: &AppState, command: MetaCommand) -> Result<(), ApiError> {
    let timeout = std::time::Duration::from_millis(state.config.raft.write_timeout_ms);
    state.shards.propose_meta(command, timeout).await?.map_err(ApiError::from)
}

/// Waits until the cluster metadata satisfies `done`, up to `timeout`; returns whether it did.
async fn wait_for_meta(state: &AppState, timeout: std::time::Duration, done: impl Fn(&MetaState) -> bool) -> bool {
    let mut changes = state.shards.meta_changes();
    let wait = async {
        loop {
            if done(&changes.borrow_and_update()) {
                return true;
            }
            if changes.changed().await.is_err() {
                return false;
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or(false)
}

errors!(AddMemberErrors: ADMIN, BODY, PROPOSE, CHANGE, &[ErrorCode::InvalidNodeId, ErrorCode::InvalidRaftAddr]);

/// Adds a node. It is recorded as JOINING, becomes a voter of the meta group, receives its
/// share of replicas (each added as a learner, caught up, then promoted), and is UP once the
/// placement is balanced. Answers 200 when UP, 202 while still JOINING after the wait (watch
/// `GET /cluster/members`). Idempotent.
#[utoipa::path(post, path = "/cluster/members", tag = "cluster", request_body = AddMemberRequest,
    responses((status = 200, description = "UP", body = MemberChange),
        (status = 202, description = "still JOINING", body = MemberChange), AddMemberErrors))]
async fn add_member(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    crate::api::extract::StrictJson(request): crate::api::extract::StrictJson<AddMemberRequest>,
) -> Result<Response, ApiError> {
    require_token_if_set(&state, &headers)?;
    if request.id == 0 {
        return Err(ApiError::new(ErrorCode::InvalidNodeId, "node ids start at 1"));
    }
    if request.raft_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::new(
            ErrorCode::InvalidRaftAddr,
            format!("raft_addr {:?} is not IP:PORT", request.raft_addr),
        ));
    }
    tracing::info!(node = request.id, addr = %request.raft_addr, "adding member");
    change_meta(&state, MetaCommand::AddNode { id: request.id, raft_addr: request.raft_addr.clone() }).await?;
    let id = request.id;
    let up = wait_for_meta(&state, MEMBERSHIP_TIMEOUT, |meta| {
        meta.nodes.get(&id).is_some_and(|n| n.status == NodeStatus::Up)
    })
    .await;
    let shards = state.shards.meta().shards_of(id);
    let status = if up { StatusCode::OK } else { StatusCode::ACCEPTED };
    let body = MemberChange {
        id,
        raft_addr: Some(request.raft_addr),
        status: if up { "UP" } else { "JOINING" }.to_string(),
        shards,
    };
    Ok((status, Json(body)).into_response())
}

errors!(RemoveMemberErrors: ADMIN, PROPOSE, CHANGE, &[ErrorCode::UnknownMember, ErrorCode::LastMember]);

/// Decommissions a node. It is marked LEAVING, its replicas move to other nodes (a replacement
/// is added before each is removed, so shards keep their replication factor where enough nodes
/// remain), then it leaves the meta group and the member list. Answers 200 once removed, 202
/// while still LEAVING after the wait.
#[utoipa::path(delete, path = "/cluster/members/{id}", tag = "cluster",
    params(("id" = String, Path, description = "the node id")),
    responses((status = 200, description = "REMOVED", body = MemberChange),
        (status = 202, description = "still LEAVING", body = MemberChange), RemoveMemberErrors))]
async fn remove_member(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_token_if_set(&state, &headers)?;
    let id: u64 = id.parse().map_err(|_| ApiError::new(ErrorCode::UnknownMember, format!("no member {id:?}")))?;
    let meta = state.shards.meta();
    if !meta.nodes.contains_key(&id) {
        return Err(ApiError::new(ErrorCode::UnknownMember, format!("node {id} is not a member")));
    }
    if meta.active_nodes().all(|other| other == id) {
        return Err(ApiError::new(ErrorCode::LastMember, format!("node {id} is the last member; it cannot leave")));
    }
    tracing::info!(node = id, "decommissioning member");
    change_meta(&state, MetaCommand::SetNodeStatus { id, status: NodeStatus::Leaving }).await?;
    let removed = wait_for_meta(&state, MEMBERSHIP_TIMEOUT * 2, |meta| !meta.nodes.contains_key(&id)).await;
    if removed {
        state.shards.forget_node(id);
    }
    let status = if removed { StatusCode::OK } else { StatusCode::ACCEPTED };
    let remaining = state.shards.meta().shards_of(id);
    let body = MemberChange {
        id,
        raft_addr: None,
        status: if removed { "REMOVED" } else { "LEAVING" }.to_string(),
        shards: remaining,
    };
    Ok((status, Json(body)).into_response())
}

/// A shard or node id given as a number or a string of digits (the runbooks quote them).
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(untagged)]
enum IdField {
    Number(u64),
    Text(String),
}

impl IdField {
    fn parse(&self) -> Option<u64> {
        match self {
            IdField::Number(n) => Some(*n),
            IdField::Text(text) => text.trim().parse().ok(),
        }
    }
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RebalanceRequest {
    shard_id: IdField,
    target_node: IdField,
    /// The replica to move away; default: the one on the node holding the most replicas.
    #[serde(default)]
    from_node: Option<IdField>,
    #[serde(default)]
    reason: Option<String>,
}

/// A replica move that was accepted.
#[derive(Serialize, ToSchema)]
struct MoveStarted {
    shard_id: u16,
    target_node: u64,
    #[schema(required = true)]
    from_node: Option<u64>,
    reason: String,
    /// Always `PENDING`: follow it in `GET /cluster/shards/{id}`.
    rebalance_status: RebalanceStatus,
}

errors!(RebalanceErrors: ADMIN, BODY, PROPOSE, CHANGE, &[
    ErrorCode::UnknownShard,
    ErrorCode::UnknownMember,
    ErrorCode::InvalidRebalance,
    ErrorCode::NoRebalance,
]);

/// Moves one replica of a shard to `target_node`. Answers 202 at once; the meta leader runs the
/// move (add learner, catch up, promote, remove) and `GET /cluster/shards/{id}` reports
/// `rebalance_status` (PENDING, IN_PROGRESS, COMPLETE or FAILED). The balancer never undoes an
/// operator's move.
#[utoipa::path(post, path = "/admin/shards/rebalance", tag = "cluster", request_body = RebalanceRequest,
    responses((status = 202, description = "accepted", body = MoveStarted), RebalanceErrors))]
async fn rebalance(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    crate::api::extract::StrictJson(request): crate::api::extract::StrictJson<RebalanceRequest>,
) -> Result<Response, ApiError> {
    require_token_if_set(&state, &headers)?;
    let shard = request
        .shard_id
        .parse()
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| *s < state.shards.shard_count())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownShard,
                format!("no shard {:?}; shards are 0..{}", request.shard_id, state.shards.shard_count()),
            )
        })?;
    let target = request
        .target_node
        .parse()
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownMember, format!("no member {:?}", request.target_node)))?;
    let meta = state.shards.meta();
    let replicas = meta.placement.get(&shard).cloned().unwrap_or_default();
    let from = match &request.from_node {
        Some(field) => {
            Some(field.parse().ok_or_else(|| ApiError::new(ErrorCode::UnknownMember, format!("no member {field:?}")))?)
        }
        None => {
            let load = meta.load();
            replicas.iter().copied().filter(|id| *id != target).max_by_key(|id| (load.get(id).copied(), *id))
        }
    };
    let reason = request.reason.clone().unwrap_or_else(|| "operator request".into());
    tracing::info!(shard, to = target, from = ?from, reason = %reason, "replica move requested");
    let command = MetaCommand::StartMove {
        shard,
        from,
        to: Some(target),
        cause: MoveCause::Operator,
        reason: reason.clone(),
        pending: true,
    };
    change_meta(&state, command).await?;
    let body = MoveStarted {
        shard_id: shard,
        target_node: target,
        from_node: from,
        reason,
        rebalance_status: RebalanceStatus::Pending,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The cluster metadata.
#[derive(Serialize, ToSchema)]
struct ClusterMeta {
    node_id: u64,
    meta_group: ShardStatus,
    /// By node id (JSON object keys are strings of digits).
    #[schema(value_type = BTreeMap<String, NodeRecord>)]
    nodes: BTreeMap<u64, NodeRecord>,
    /// Each shard's replicas, by shard number.
    #[schema(value_type = BTreeMap<String, Vec<u64>>)]
    placement: BTreeMap<u16, Vec<u64>>,
    /// Each shard's last move, by shard number.
    #[schema(value_type = BTreeMap<String, Rebalance>)]
    rebalances: BTreeMap<u16, Rebalance>,
    /// Replicas per node, by node id.
    #[schema(value_type = BTreeMap<String, usize>)]
    load: BTreeMap<u64, usize>,
}

errors!(MetaErrors: &[ErrorCode::UnknownShard]);

/// The cluster metadata as this node has applied it, and the meta group.
#[utoipa::path(get, path = "/cluster/meta", tag = "cluster",
    responses((status = 200, description = "the metadata", body = ClusterMeta), MetaErrors))]
async fn meta(State(state): State<AppState>) -> Result<Json<ClusterMeta>, ApiError> {
    let meta = state.shards.meta();
    let group = state.shards.status(META_SHARD)?;
    Ok(Json(ClusterMeta {
        node_id: state.shards.node_id,
        meta_group: group,
        nodes: meta.nodes.clone(),
        placement: meta.placement.clone(),
        rebalances: meta.rebalances.clone(),
        load: meta.load(),
    }))
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TransferLeaderRequest {
    target_node: u64,
}

#[derive(Serialize, ToSchema)]
struct LeaderTransferred {
    shard: u16,
    leader: u64,
    #[schema(required = true)]
    previous_leader: Option<u64>,
}

errors!(TransferErrors: ADMIN, BODY, PROPOSE, CHANGE, &[ErrorCode::UnknownShard]);

/// Moves the shard's leadership. Takes about one election timeout (the voters' leader lease
/// must run out first).
#[utoipa::path(post, path = "/admin/shards/{id}/transfer-leader", tag = "cluster",
    params(("id" = String, Path, description = "the shard number")), request_body = TransferLeaderRequest,
    responses((status = 200, description = "transferred", body = LeaderTransferred), TransferErrors))]
async fn transfer_leader(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    crate::api::extract::StrictJson(request): crate::api::extract::StrictJson<TransferLeaderRequest>,
) -> Result<Json<LeaderTransferred>, ApiError> {
    require_token_if_set(&state, &headers)?;
    let shard = parse_shard(&state, &id)?;
    let previous = state.shards.status(shard)?.leader;
    let timeout = std::time::Duration::from_millis(state.config.raft.election_timeout_max_ms * 4 + 2000);
    // The target becomes the shard's preferred leader, so the leader balancer keeps it there.
    let placed = state.shards.meta().placement.get(&shard).is_some_and(|r| r.contains(&request.target_node));
    if placed {
        change_meta(&state, MetaCommand::SetPreferredLeader { shard, node: request.target_node, pinned: true }).await?;
    }
    state.shards.admin_group(shard, GroupAdmin::TransferLeader { target: request.target_node }, timeout).await?;
    Ok(Json(LeaderTransferred { shard, leader: request.target_node, previous_leader: previous }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_operation_documents_the_codes_of_the_layers_in_front_of_it() {
        crate::api::openapi::check_layer_codes(&super::openapi());
    }
}
