//! Cluster admin on port 18181 (HTTP/JSON): cluster health, members, shards and leader
//! transfer, computed from this node's view of every shard group. JSON shapes follow the
//! operations runbooks (`.members[]` with `id`, `status`, `replication_lag`; `.shards[]` with
//! `query_rate`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::BTreeMap;

use crate::api::{ApiError, AppState};
use crate::raft::shards::ShardStatus;
use crate::raft::types::GroupAdmin;

/// A peer whose replication lag stays under this is reported UP.
const UP_LAG_SECONDS: f64 = 5.0;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/cluster/health", get(health))
        .route("/cluster/members", get(members).post(add_member))
        .route("/cluster/members/{id}", axum::routing::delete(remove_member))
        .route("/cluster/shards", get(shards))
        .route("/cluster/shards/{id}", get(shard))
        .route("/admin/shards/{id}/transfer-leader", axum::routing::post(transfer_leader))
        .fallback(|| async { ApiError::not_found("no such cluster admin endpoint; see docs/api.md") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(405, "method_not_allowed", "this endpoint does not accept that HTTP method; see docs/api.md")
        })
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
    shards_led: usize,
    shards_hosted: usize,
    max_lag: Option<f64>,
}

fn member_views(state: &AppState, statuses: &[ShardStatus]) -> BTreeMap<u64, MemberView> {
    let mut members: BTreeMap<u64, MemberView> = state
        .shards
        .known_nodes()
        .into_iter()
        .map(|(id, addr)| (id, MemberView { addr, shards_led: 0, shards_hosted: 0, max_lag: None }))
        .collect();
    for status in statuses {
        for id in status.voters.iter().chain(&status.learners) {
            if let Some(member) = members.get_mut(id) {
                member.shards_hosted += 1;
            }
        }
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

/// UP when it is this node, its node heartbeats arrive, or it keeps up with a shard this node
/// leads.
fn member_up(state: &AppState, id: u64, member: &MemberView) -> bool {
    id == state.shards.node_id
        || state.shards.heard_from(id, std::time::Duration::from_secs_f64(UP_LAG_SECONDS))
        || member.max_lag.is_some_and(|lag| lag < UP_LAG_SECONDS)
}

async fn health(State(state): State<AppState>) -> Response {
    let statuses = statuses(&state);
    let members = member_views(&state, &statuses);
    let up = members.iter().filter(|(id, m)| member_up(&state, **id, m)).count();
    let without_leader: Vec<u16> = statuses.iter().filter(|s| s.leader.is_none()).map(|s| s.shard).collect();
    let status = if !without_leader.is_empty() {
        "unavailable"
    } else if up < members.len() {
        "degraded"
    } else {
        "healthy"
    };
    let body = json!({
        "status": status,
        "node_id": state.shards.node_id,
        "cluster_id": state.cluster_id,
        "nodes_total": members.len(),
        "nodes_up": up,
        "shards_total": state.shards.shard_count(),
        "shards_hosted": statuses.len(),
        "shards_with_leader": statuses.len() - without_leader.len(),
        "shards_without_leader": without_leader,
    });
    let code = if status == "unavailable" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, Json(body)).into_response()
}

async fn members(State(state): State<AppState>) -> Json<Value> {
    let statuses = statuses(&state);
    let members: Vec<Value> = member_views(&state, &statuses)
        .iter()
        .map(|(id, m)| {
            json!({
                "id": id,
                "raft_addr": m.addr,
                "status": if member_up(&state, *id, m) { "UP" } else { "DOWN" },
                "replication_lag": if *id == state.shards.node_id { Some(0.0) } else { m.max_lag },
                "shards_led": m.shards_led,
                "shards_hosted": m.shards_hosted,
                "self": *id == state.shards.node_id,
            })
        })
        .collect();
    Json(json!({"node_id": state.shards.node_id, "members": members}))
}

fn shard_json(state: &AppState, status: &ShardStatus) -> Value {
    let mut value = serde_json::to_value(status).unwrap_or(Value::Null);
    let rates = state.shards.rates(status.shard);
    value["query_rate"] = json!(rates.query_rate);
    value["write_rate"] = json!(rates.write_rate);
    value["queries_total"] = json!(rates.queries_total);
    value["writes_total"] = json!(rates.writes_total);
    value["rebalance_status"] = json!("NONE");
    value["hosted"] =
        json!(status.voters.contains(&state.shards.node_id) || status.learners.contains(&state.shards.node_id));
    value
}

async fn shards(State(state): State<AppState>) -> Json<Value> {
    let shards: Vec<Value> = statuses(&state).iter().map(|s| shard_json(&state, s)).collect();
    Json(json!({"node_id": state.shards.node_id, "shards": shards}))
}

fn parse_shard(state: &AppState, id: &str) -> Result<u16, ApiError> {
    id.parse::<u16>().ok().filter(|s| *s < state.shards.shard_count()).ok_or_else(|| {
        ApiError::new(404, "unknown_shard", format!("no shard {id:?}; shards are 0..{}", state.shards.shard_count()))
    })
}

async fn shard(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let shard = parse_shard(&state, &id)?;
    let status = state.shards.status(shard)?;
    Ok(Json(shard_json(&state, &status)))
}

/// Time allowed for one shard's membership change (adding a voter waits for it to catch up).
const MEMBERSHIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMemberRequest {
    id: u64,
    raft_addr: String,
}

/// Runs one membership change on every shard, in shard order, and reports each result.
async fn change_every_shard(state: &AppState, change: impl Fn() -> GroupAdmin) -> (bool, Vec<Value>) {
    let mut all_ok = true;
    let mut results = Vec::new();
    for group in state.shards.groups() {
        match state.shards.admin_group(group.shard, change(), MEMBERSHIP_TIMEOUT).await {
            Ok(()) => results.push(json!({"shard": group.shard, "result": "ok"})),
            Err(error) => {
                all_ok = false;
                let error = ApiError::from(error);
                results.push(json!({"shard": group.shard, "result": "error", "error": error.body()["error"].clone()}));
            }
        }
    }
    (all_ok, results)
}

/// `POST /cluster/members`: adds a node to every shard (as a learner until it has caught up,
/// then as a voter). Idempotent: a node that is already a voter stays one.
/// Membership changes need the admin token when one is configured. Without a token they are
/// open, because members join from other hosts; set `security.admin_token` in production.
fn require_token_if_set(state: &AppState, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if state.config.security.admin_token.is_empty() {
        return Ok(());
    }
    state.require_admin(headers, None)
}

async fn add_member(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    crate::api::extract::StrictJson(request): crate::api::extract::StrictJson<AddMemberRequest>,
) -> Result<Response, ApiError> {
    require_token_if_set(&state, &headers)?;
    if request.id == 0 {
        return Err(ApiError::new(422, "invalid_node_id", "node ids start at 1"));
    }
    if request.raft_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::new(
            422,
            "invalid_raft_addr",
            format!("raft_addr {:?} is not IP:PORT", request.raft_addr),
        ));
    }
    tracing::info!(node = request.id, addr = %request.raft_addr, "adding member");
    let (ok, results) =
        change_every_shard(&state, || GroupAdmin::AddVoter { node: request.id, addr: request.raft_addr.clone() }).await;
    let status = if ok { StatusCode::OK } else { StatusCode::CONFLICT };
    Ok((status, Json(json!({"id": request.id, "raft_addr": request.raft_addr, "status": if ok { "UP" } else { "JOINING" }, "shards": results}))).into_response())
}

/// `DELETE /cluster/members/{id}`: removes a node from every shard it hosts. Every shard keeps
/// a replica on each remaining node, so no data moves; a shard refuses to lose its last voter.
async fn remove_member(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_token_if_set(&state, &headers)?;
    let id: u64 = id.parse().map_err(|_| ApiError::new(404, "unknown_member", format!("no member {id:?}")))?;
    let statuses = statuses(&state);
    if !member_views(&state, &statuses).contains_key(&id) {
        return Err(ApiError::new(404, "unknown_member", format!("node {id} is not a member")));
    }
    tracing::info!(node = id, "removing member");
    let (ok, results) = change_every_shard(&state, || GroupAdmin::RemoveNode { node: id }).await;
    if ok {
        state.shards.forget_node(id);
    }
    let status = if ok { StatusCode::OK } else { StatusCode::CONFLICT };
    Ok((status, Json(json!({"id": id, "status": if ok { "REMOVED" } else { "LEAVING" }, "shards": results})))
        .into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferLeaderRequest {
    target_node: u64,
}

/// `POST /admin/shards/{id}/transfer-leader {"target_node": N}`: moves the shard's leadership.
/// Takes about one election timeout (the voters' leader lease must run out first).
async fn transfer_leader(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    crate::api::extract::StrictJson(request): crate::api::extract::StrictJson<TransferLeaderRequest>,
) -> Result<Json<Value>, ApiError> {
    require_token_if_set(&state, &headers)?;
    let shard = parse_shard(&state, &id)?;
    let previous = state.shards.status(shard)?.leader;
    let timeout = std::time::Duration::from_millis(state.config.raft.election_timeout_max_ms * 4 + 2000);
    state.shards.admin_group(shard, GroupAdmin::TransferLeader { target: request.target_node }, timeout).await?;
    Ok(Json(json!({"shard": shard, "leader": request.target_node, "previous_leader": previous})))
}
