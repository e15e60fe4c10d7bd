//! Quarantine admin endpoints (DESIGN §2, §3): the claims in quarantine that no admin has
//! decided on, and the two decisions, release and reject, each a replicated log entry of the
//! claim's shard so every replica records the same decision.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::extract::{id_cursor, list_limit, optional_json, query_params};
use super::openapi::{errors, ADMIN, OPTIONAL_BODY, PAGING, PROPOSE, QUERY, READ};
use super::reads::{list_everywhere, ListedAssertion};
use super::AppState;
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::model::assertion::{
    validate_agent_id, validate_concept_prefix, AgentIdText, ConceptPrefixText, MAX_REASON_CHARS,
};
use crate::model::id::{format_time_us, now_us, AssertionId};
use crate::model::ModelError;
use crate::shard::command::{ShardCommand, ShardResponse};
use crate::shard::reader::Listing;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(decide))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only this agent's claims.
    #[param(value_type = Option<AgentIdText>, inline)]
    agent_id: Option<String>,
    /// Only claims under this concept path prefix.
    #[param(value_type = Option<ConceptPrefixText>, inline)]
    concept_prefix: Option<String>,
    /// 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of undecided quarantined claims.
#[derive(Serialize, ToSchema)]
struct QuarantinePage {
    quarantined: Vec<ListedAssertion>,
    #[schema(required = true)]
    next_cursor: Option<String>,
}

errors!(ListErrors: ADMIN, QUERY, PAGING, READ, &[ErrorCode::InvalidAgentId, ErrorCode::InvalidConceptPath]);

/// Undecided quarantined claims, oldest first, from every shard (linearizable: every node
/// lists the same).
#[utoipa::path(get, path = "/v1/admin/quarantine", tag = "quarantine", operation_id = "list_quarantine",
    params(ListParams), responses((status = 200, description = "one page", body = QuarantinePage), ListErrors))]
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
    let quarantined = found.iter().map(ListedAssertion::of).collect();
    Ok(Json(QuarantinePage { quarantined, next_cursor }).into_response())
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DecisionRequest {
    /// Why (at most 1024 characters).
    #[serde(default)]
    reason: Option<String>,
    /// Who decided (recorded with the decision); default `admin`.
    #[serde(default)]
    #[schema(value_type = Option<AgentIdText>, inline)]
    by: Option<String>,
}

/// A decision on a quarantined claim.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum Decision {
    Release,
    Reject,
}

/// The recorded decision.
#[derive(Serialize, ToSchema)]
struct DecisionResponse {
    assertion_id: AssertionId,
    /// `released` or `rejected`.
    decision: String,
    decided_at: String,
    log_index: u64,
}

errors!(DecideErrors: ADMIN, OPTIONAL_BODY, PROPOSE, &[
    ErrorCode::NotFound,
    ErrorCode::InvalidId,
    ErrorCode::ReasonTooLong,
    ErrorCode::InvalidAgentId,
    ErrorCode::AssertionNotFound,
    ErrorCode::NotQuarantined,
]);

/// Releases a quarantined claim into the lenses, or rejects it (retracted); the body is optional.
#[utoipa::path(post, path = "/v1/admin/quarantine/{id}/{decision}", tag = "quarantine",
    params(("id" = inline(AssertionId), Path, description = "the assertion id"),
        ("decision" = inline(Decision), Path, description = "`release` or `reject`")),
    request_body(content = Option<DecisionRequest>, description = "optional"),
    responses((status = 200, description = "decided", body = DecisionResponse), DecideErrors))]
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
    let request: DecisionRequest = optional_json(&body)?;
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
        ShardResponse::Quarantine(Ok(outcome)) => Ok(Json(DecisionResponse {
            assertion_id: outcome.assertion_id,
            decision: if release { "released" } else { "rejected" }.to_string(),
            decided_at: format_time_us(outcome.at_us),
            log_index: outcome.log_index,
        })
        .into_response()),
        ShardResponse::Quarantine(Err(error)) => Err(error.into()),
        _ => Err(ApiError::new(ErrorCode::UnexpectedResponse, "the state machine answered a different command")),
    }
}
