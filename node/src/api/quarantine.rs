//! Quarantine admin endpoints (DESIGN §2, §3): the claims in quarantine that no admin has
//! decided on, and the two decisions, release and reject, each a replicated log entry of the
//! claim's shard so every replica records the same decision.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{id_cursor, list_limit, parse_json, query_params};
use super::reads::{list_everywhere, listed_json};
use super::AppState;
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::model::assertion::{validate_agent_id, validate_concept_prefix, MAX_REASON_CHARS};
use crate::model::id::{format_time_us, now_us, AssertionId};
use crate::model::ModelError;
use crate::shard::command::{ShardCommand, ShardResponse};
use crate::shard::reader::Listing;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/admin/quarantine", get(list)).route("/v1/admin/quarantine/{id}/{decision}", post(decide))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    agent_id: Option<String>,
    concept_prefix: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/admin/quarantine[?agent_id&concept_prefix&limit&cursor]`: undecided quarantined
/// claims, oldest first, from every shard (linearizable: every node lists the same).
async fn list(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query_params(params)?;
    if let Some(agent) = &params.agent_id {
        validate_agent_id(agent)?;
    }
    if let Some(prefix) = &params.concept_prefix {
        validate_concept_prefix(prefix)?;
    }
    let limit = list_limit(params.limit)?;
    let after = id_cursor(params.cursor.as_deref())?;
    let listing = Listing::Quarantined { agent_id: params.agent_id, concept_prefix: params.concept_prefix };
    let (found, more) = list_everywhere(&state, listing, after, limit, true).await?;
    let next_cursor = if more { found.last().map(|f| f.record.id.to_string()) } else { None };
    let claims: Vec<Value> = found.iter().map(listed_json).collect();
    Ok(Json(json!({"quarantined": claims, "next_cursor": next_cursor})).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionRequest {
    #[serde(default)]
    reason: Option<String>,
    /// Who decided (recorded with the decision); default `admin`.
    #[serde(default)]
    by: Option<String>,
}

/// `POST /v1/admin/quarantine/{id}/release` and `…/reject`, optional body `{"reason", "by"}`.
async fn decide(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    Path((id, decision)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let release = match decision.as_str() {
        "release" => true,
        "reject" => false,
        _ => return Err(ApiError::new(ErrorCode::NotFound, "quarantine decisions are /release and /reject")),
    };
    let request: DecisionRequest =
        if body.iter().all(|b| b.is_ascii_whitespace()) { DecisionRequest::default() } else { parse_json(&body)? };
    let assertion_id = AssertionId::parse(&id)
        .map_err(|e| ApiError::from(ModelError::InvalidId { id: e.0.chars().take(64).collect() }))?;
    if request.reason.as_ref().is_some_and(|r| r.chars().count() > MAX_REASON_CHARS) {
        return Err(ModelError::ReasonTooLong.into());
    }
    let by = request.by.unwrap_or_else(|| "admin".to_string());
    validate_agent_id(&by)?;
    if assertion_id.shard() >= state.shards.shard_count() {
        return Err(ModelError::AssertionNotFound { id: assertion_id.to_string() }.into());
    }
    let command =
        ShardCommand::Quarantine { proposed_at_us: now_us(), assertion_id, release, by, reason: request.reason };
    let timeout = Duration::from_millis(state.config.raft.write_timeout_ms);
    match state.shards.propose(assertion_id.shard(), command, timeout).await? {
        ShardResponse::Quarantine(Ok(outcome)) => Ok(Json(json!({
            "assertion_id": outcome.assertion_id,
            "decision": if release { "released" } else { "rejected" },
            "decided_at": format_time_us(outcome.at_us),
            "log_index": outcome.log_index,
        }))
        .into_response()),
        ShardResponse::Quarantine(Err(error)) => Err(error.into()),
        _ => Err(ApiError::new(ErrorCode::UnexpectedResponse, "the state machine answered a different command")),
    }
}
