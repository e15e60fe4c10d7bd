//! Authority endpoints (DESIGN §2): root authorities (admin), grants, and an agent's effective
//! authority for a path with the chain that gives it. Every change goes through the meta group,
//! so every node answers the same; reads use this node's applied copy.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::CallerOf;
use super::error::ApiError;
use super::extract::{list_limit, query_params, StrictJson};
use super::openapi::{errors, ADMIN, BODY, POLICY, PROPOSE, QUERY, SIGNATURE};
use super::{peer_of, AppState};
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::meta::policy::{PolicyCommand, PolicyOutcome};
use crate::model::assertion::{
    validate_agent_id, validate_concept_path, validate_concept_prefix, AgentIdText, ConceptPathText, ConceptPrefixText,
};
use crate::model::authority::{Grant, MAX_LEVEL};
use crate::model::id::format_time_us;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(set_root))
        .routes(routes!(remove_root))
        .routes(routes!(list_roots))
        .routes(routes!(create_grant, list_grants))
        .routes(routes!(get_grant, revoke_grant))
        .routes(routes!(agent_authority))
}

fn policy_timeout(state: &AppState) -> Duration {
    Duration::from_millis(state.config.raft.write_timeout_ms)
}

fn validate_level(level: i64) -> Result<u8, ApiError> {
    u8::try_from(level).ok().filter(|l| *l <= MAX_LEVEL).ok_or_else(|| {
        ApiError::new(ErrorCode::InvalidLevel, format!("level {level} is outside 0-100"))
            .with_details(json!({"level": level}))
    })
}

/// A grant as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct GrantView {
    id: u64,
    grantor: String,
    grantee: String,
    /// The paths it covers (`""`: every path).
    concept_prefix: String,
    /// 0 to 100.
    level: u8,
    granted_at: String,
    #[schema(required = true)]
    revoked_at: Option<String>,
    active: bool,
}

impl GrantView {
    pub fn of(grant: &Grant) -> GrantView {
        GrantView {
            id: grant.id,
            grantor: grant.grantor.clone(),
            grantee: grant.grantee.clone(),
            concept_prefix: grant.concept_prefix.clone(),
            level: grant.level,
            granted_at: format_time_us(grant.granted_at_us),
            revoked_at: grant.revoked_at_us.map(format_time_us),
            active: grant.revoked_at_us.is_none(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RootRequest {
    #[schema(value_type = AgentIdText, inline)]
    agent_id: String,
    /// 0 to 100.
    #[schema(minimum = 0, maximum = 100)]
    level: i64,
}

#[derive(Serialize, ToSchema)]
struct RootSet {
    agent_id: String,
    #[schema(required = true)]
    level: Option<u8>,
    /// False when the agent already was a root at this level.
    changed: bool,
}

errors!(SetRootErrors: ADMIN, BODY, PROPOSE, POLICY, &[ErrorCode::InvalidAgentId, ErrorCode::InvalidLevel]);

/// Makes an agent a root authority (or changes its level).
#[utoipa::path(post, path = "/v1/admin/authority/roots", tag = "authority", request_body = RootRequest,
    responses((status = 200, description = "the root now", body = RootSet), SetRootErrors))]
async fn set_root(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    StrictJson(request): StrictJson<RootRequest>,
) -> Result<Response, ApiError> {
    validate_agent_id(&request.agent_id)?;
    let level = validate_level(request.level)?;
    let command = PolicyCommand::SetRoot { agent_id: request.agent_id, level: Some(level) };
    match state.shards.propose_policy(command, policy_timeout(&state)).await?? {
        PolicyOutcome::Root { agent_id, level, changed } => {
            Ok(Json(RootSet { agent_id, level, changed }).into_response())
        }
        other => Err(unexpected(other)),
    }
}

#[derive(Serialize, ToSchema)]
struct RootRemoved {
    agent_id: String,
    removed: bool,
}

errors!(RemoveRootErrors: ADMIN, PROPOSE, POLICY, &[ErrorCode::InvalidAgentId, ErrorCode::RootNotFound]);

/// The agent is no longer a root (chains from it stop counting; `as_of` reads before now still
/// see it).
#[utoipa::path(delete, path = "/v1/admin/authority/roots/{agent_id}", tag = "authority",
    params(("agent_id" = inline(AgentIdText), Path, description = "the root's agent id")),
    responses((status = 200, description = "removed", body = RootRemoved), RemoveRootErrors))]
async fn remove_root(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    Path(agent_id): Path<String>,
) -> Result<Response, ApiError> {
    validate_agent_id(&agent_id)?;
    if state.shards.policy().read(|s| s.authorities.root_level(&agent_id, u64::MAX)).is_none() {
        return Err(ApiError::new(ErrorCode::RootNotFound, format!("agent {agent_id:?} is not a root authority")));
    }
    let command = PolicyCommand::SetRoot { agent_id, level: None };
    match state.shards.propose_policy(command, policy_timeout(&state)).await?? {
        PolicyOutcome::Root { agent_id, changed, .. } => {
            Ok(Json(RootRemoved { agent_id, removed: changed }).into_response())
        }
        other => Err(unexpected(other)),
    }
}

#[derive(Serialize, ToSchema)]
struct RootList {
    roots: Vec<RootEntry>,
}

#[derive(Serialize, ToSchema)]
struct RootEntry {
    agent_id: String,
    level: u8,
    since: String,
}

/// The current root authorities.
#[utoipa::path(get, path = "/v1/authority/roots", tag = "authority",
    responses((status = 200, description = "the roots", body = RootList)))]
async fn list_roots(State(state): State<AppState>) -> Response {
    let roots: Vec<RootEntry> = state.shards.policy().read(|s| {
        s.authorities
            .roots()
            .iter()
            .filter_map(|(agent, spans)| {
                let span = spans.iter().find(|s| s.until_us.is_none())?;
                Some(RootEntry { agent_id: agent.clone(), level: span.level, since: format_time_us(span.since_us) })
            })
            .collect()
    });
    Json(RootList { roots }).into_response()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GrantRequest {
    #[schema(value_type = AgentIdText, inline)]
    grantor: String,
    #[schema(value_type = AgentIdText, inline)]
    grantee: String,
    /// The paths it covers (default `""`: every path).
    #[serde(default)]
    #[schema(value_type = ConceptPrefixText, inline)]
    concept_prefix: String,
    /// 0 to 100, at most what the grantor holds there.
    #[schema(minimum = 0, maximum = 100)]
    level: i64,
    /// The grantor's hex Ed25519 signature over the canonical grant bytes (docs/signatures.md).
    #[serde(default)]
    signature: Option<String>,
}

errors!(GrantErrors: BODY, PROPOSE, POLICY, SIGNATURE, &[
    ErrorCode::InvalidAgentId,
    ErrorCode::AgentNotAllowed,
    ErrorCode::InvalidConceptPath,
    ErrorCode::InvalidLevel,
    ErrorCode::InsufficientAuthority,
    ErrorCode::SelfGrant,
]);

/// Grants authority on a prefix: refused unless the grantor holds at least `level` on a prefix
/// covering `concept_prefix` (checked when the meta group applies it).
#[utoipa::path(post, path = "/v1/authority/grants", tag = "authority", request_body = GrantRequest,
    responses((status = 201, description = "granted", body = GrantView), GrantErrors))]
async fn create_grant(
    State(state): State<AppState>,
    CallerOf(caller): CallerOf,
    StrictJson(request): StrictJson<GrantRequest>,
) -> Result<Response, ApiError> {
    validate_agent_id(&request.grantor)?;
    caller.may_write_as(&request.grantor)?;
    validate_agent_id(&request.grantee)?;
    validate_concept_prefix(&request.concept_prefix)?;
    let level = validate_level(request.level)?;
    crate::model::signing::verify(
        "grant",
        &request.grantor,
        request.signature.as_deref(),
        || crate::model::signing::grant_bytes(&request.grantor, &request.grantee, &request.concept_prefix, level),
        state.config.security.require_signatures,
    )?;
    let command = PolicyCommand::Grant {
        grantor: request.grantor,
        grantee: request.grantee,
        concept_prefix: request.concept_prefix,
        level,
        max_chain_depth: state.config.authority.max_chain_depth,
    };
    match state.shards.propose_policy(command, policy_timeout(&state)).await?? {
        PolicyOutcome::Grant(grant) => Ok((StatusCode::CREATED, Json(GrantView::of(&grant))).into_response()),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListGrantsParams {
    #[param(value_type = Option<AgentIdText>, inline)]
    grantor: Option<String>,
    #[param(value_type = Option<AgentIdText>, inline)]
    grantee: Option<String>,
    /// Grants whose prefix covers this path.
    #[param(value_type = Option<ConceptPathText>, inline)]
    concept_path: Option<String>,
    #[serde(default)]
    include_revoked: bool,
    /// 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The last grant id of the previous page.
    after: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct GrantPage {
    grants: Vec<GrantView>,
    /// `after` of the next page.
    #[schema(required = true)]
    next_after: Option<u64>,
}

errors!(ListGrantErrors: QUERY, &[ErrorCode::InvalidLimit, ErrorCode::InvalidConceptPath, ErrorCode::InvalidAgentId]);

/// Grants, in id order.
#[utoipa::path(get, path = "/v1/authority/grants", tag = "authority", params(ListGrantsParams),
    responses((status = 200, description = "one page", body = GrantPage), ListGrantErrors))]
async fn list_grants(
    State(state): State<AppState>,
    params: Result<Query<ListGrantsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query_params(params)?;
    let limit = list_limit(params.limit)?;
    if let Some(path) = &params.concept_path {
        validate_concept_path(path)?;
    }
    for agent_id in [&params.grantor, &params.grantee].into_iter().flatten() {
        validate_agent_id(agent_id)?;
    }
    let (grants, more) = state.shards.policy().read(|s| {
        let mut matching = s
            .authorities
            .grants()
            .range(params.after.map_or(0, |a| a.saturating_add(1))..)
            .map(|(_, g)| g)
            .filter(|g| params.include_revoked || g.revoked_at_us.is_none())
            .filter(|g| params.grantor.as_ref().is_none_or(|x| *x == g.grantor))
            .filter(|g| params.grantee.as_ref().is_none_or(|x| *x == g.grantee))
            .filter(|g| {
                params
                    .concept_path
                    .as_ref()
                    .is_none_or(|p| crate::model::authority::prefix_covers(&g.concept_prefix, p))
            });
        let page: Vec<GrantView> = matching.by_ref().take(limit).map(GrantView::of).collect();
        (page, matching.next().is_some())
    });
    let next_after = if more { grants.last().map(|g| g.id) } else { None };
    Ok(Json(GrantPage { grants, next_after }).into_response())
}

fn parse_grant_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::new(ErrorCode::InvalidGrantId, format!("grant id {text:?} is not a number")))
}

errors!(GetGrantErrors: &[ErrorCode::InvalidGrantId, ErrorCode::GrantNotFound]);

/// One grant.
#[utoipa::path(get, path = "/v1/authority/grants/{id}", tag = "authority",
    params(("id" = String, Path, description = "the grant's number")),
    responses((status = 200, description = "the grant", body = GrantView), GetGrantErrors))]
async fn get_grant(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_grant_id(&id)?;
    let grant = state.shards.policy().read(|s| s.authorities.grant(id).cloned());
    match grant {
        Some(grant) => Ok(Json(GrantView::of(&grant)).into_response()),
        None => Err(ApiError::new(ErrorCode::GrantNotFound, format!("grant {id} not found"))),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RevokeParams {
    /// The grantor revoking its own grant; without it the admin token is required.
    #[param(value_type = Option<AgentIdText>, inline)]
    agent_id: Option<String>,
    /// With `agent_id`: its hex Ed25519 signature over the canonical revocation bytes.
    signature: Option<String>,
}

errors!(RevokeErrors: QUERY, ADMIN, PROPOSE, POLICY, SIGNATURE, &[
    ErrorCode::InvalidGrantId,
    ErrorCode::InvalidAgentId,
    ErrorCode::AgentNotAllowed,
    ErrorCode::GrantNotFound,
    ErrorCode::GrantAlreadyRevoked,
    ErrorCode::NotGrantor,
]);

/// Revokes a grant (its grantor, or an admin). Chains through it stop counting from now on.
#[utoipa::path(delete, path = "/v1/authority/grants/{id}", tag = "authority",
    params(("id" = String, Path, description = "the grant's number"), RevokeParams),
    responses((status = 200, description = "the revoked grant", body = GrantView), RevokeErrors))]
async fn revoke_grant(
    State(state): State<AppState>,
    headers: HeaderMap,
    connect_info: ConnectInfo<SocketAddr>,
    CallerOf(caller): CallerOf,
    Path(id): Path<String>,
    params: Result<Query<RevokeParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_grant_id(&id)?;
    let params = query_params(params)?;
    let by = match params.agent_id {
        Some(agent) => {
            validate_agent_id(&agent)?;
            caller.may_write_as(&agent)?;
            crate::model::signing::verify(
                "revocation",
                &agent,
                params.signature.as_deref(),
                || crate::model::signing::revoke_bytes(id, &agent),
                state.config.security.require_signatures,
            )?;
            Some(agent)
        }
        None => {
            state.require_admin(&headers, peer_of(connect_info))?;
            None
        }
    };
    match state.shards.propose_policy(PolicyCommand::Revoke { grant_id: id, by }, policy_timeout(&state)).await?? {
        PolicyOutcome::Grant(grant) => Ok(Json(GrantView::of(&grant)).into_response()),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AgentAuthorityParams {
    /// The path to evaluate.
    #[param(required = true, value_type = Option<ConceptPathText>, inline)]
    concept_path: Option<String>,
    /// Unix milliseconds or RFC 3339 (default: now).
    as_of: Option<String>,
}

/// An agent's authority for a path.
#[derive(Serialize, ToSchema)]
struct AgentAuthority {
    agent_id: String,
    concept_path: String,
    /// `null`: none.
    #[schema(required = true)]
    authority: Option<u8>,
    /// The root authority at the head of the chain.
    #[schema(required = true)]
    root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    root_level: Option<u8>,
    /// The grants from the root to the agent.
    chain: Vec<GrantView>,
    max_chain_depth: usize,
}

errors!(AgentAuthorityErrors: QUERY, &[
    ErrorCode::InvalidAgentId,
    ErrorCode::MissingConceptPath,
    ErrorCode::InvalidConceptPath,
    ErrorCode::InvalidTime,
]);

/// The agent's authority for the path and the chain of grants that gives it (`authority: null`
/// when it has none).
#[utoipa::path(get, path = "/v1/authority/agents/{agent_id}", tag = "authority",
    params(("agent_id" = inline(AgentIdText), Path, description = "the agent"), AgentAuthorityParams),
    responses((status = 200, description = "its authority", body = AgentAuthority), AgentAuthorityErrors))]
async fn agent_authority(
    State(state): State<AppState>,
    Path(agent_id): Path<String>,
    params: Result<Query<AgentAuthorityParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    validate_agent_id(&agent_id)?;
    let params = query_params(params)?;
    let path = params
        .concept_path
        .ok_or_else(|| ApiError::new(ErrorCode::MissingConceptPath, "concept_path is required: ?concept_path=a/b"))?;
    validate_concept_path(&path)?;
    // Unix milliseconds or RFC 3339, as in queries.
    let as_of_us = super::reads::parse_time_param("as_of", params.as_of.as_deref())?.unwrap_or(u64::MAX);
    let policy = state.shards.policy();
    let found = policy.authority(&agent_id, &path, as_of_us);
    let body = policy.read(|s| AgentAuthority {
        agent_id: agent_id.clone(),
        concept_path: path.clone(),
        authority: found.as_ref().map(|f| f.level),
        root: found.as_ref().map(|f| f.root.clone()),
        root_level: found.as_ref().and_then(|f| s.authorities.root_level(&f.root, as_of_us)),
        chain: found
            .iter()
            .flat_map(|f| f.chain.iter())
            .filter_map(|id| s.authorities.grant(*id))
            .map(GrantView::of)
            .collect(),
        max_chain_depth: policy.max_chain_depth(),
    });
    Ok(Json(body).into_response())
}

fn unexpected(outcome: PolicyOutcome) -> ApiError {
    ApiError::new(ErrorCode::UnexpectedResponse, format!("the meta group answered {outcome:?}"))
}
