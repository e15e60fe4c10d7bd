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

/// A peer whose replication lag stays under this is reported UP.
const UP_LAG_SECONDS: f64 = 5.0;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/cluster/health", get(health))
        .route("/cluster/members", get(members))
        .route("/cluster/shards", get(shards))
        .route("/cluster/shards/{id}", get(shard))
        .fallback(|| async { ApiError::not_found("no such cluster admin endpoint; see docs/api.md") })
        .with_state(state)
}

fn statuses(state: &AppState) -> Vec<ShardStatus> {
    state.shards.groups().iter().filter_map(|g| state.shards.status(g.shard).ok()).collect()
}

struct MemberView {
    addr: String,
    shards_led: usize,
    shards_hosted: usize,
    max_lag: Option<f64>,
}

fn member_views(state: &AppState, statuses: &[ShardStatus]) -> BTreeMap<u64, MemberView> {
    let mut members: BTreeMap<u64, MemberView> = BTreeMap::new();
    for group in state.shards.groups() {
        let metrics = group.raft.metrics().borrow().clone();
        for (id, node) in metrics.membership_config.membership().nodes() {
            members.entry(*id).or_insert_with(|| MemberView {
                addr: node.addr.clone(),
                shards_led: 0,
                shards_hosted: 0,
                max_lag: None,
            });
        }
    }
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

/// UP when it is this node, leads a shard, or keeps up with a shard this node leads.
fn member_up(state: &AppState, id: u64, member: &MemberView) -> bool {
    id == state.shards.node_id || member.shards_led > 0 || member.max_lag.is_some_and(|lag| lag < UP_LAG_SECONDS)
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
        "nodes_total": members.len(),
        "nodes_up": up,
        "shards_total": statuses.len(),
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
