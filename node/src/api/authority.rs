//! Authority endpoints (DESIGN §2): root authorities (admin), grants, and an agent's effective
//! authority for a path with the chain that gives it. Every change goes through the meta group,
//! so every node answers the same; reads use this node's applied copy.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::CallerOf;
use super::error::ApiError;
use super::extract::{list_limit, query_params, StrictJson};
use super::{peer_of, AppState};
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::meta::policy::{PolicyCommand, PolicyOutcome};
use crate::model::assertion::{validate_agent_id, validate_concept_path, validate_concept_prefix};
use crate::model::authority::{Grant, MAX_LEVEL};
use crate::model::id::format_time_us;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/authority/roots", post(set_root))
        .route("/v1/admin/authority/roots/{agent_id}", delete(remove_root))
        .route("/v1/authority/roots", get(list_roots))
        .route("/v1/authority/grants", post(create_grant).get(list_grants))
        .route("/v1/authority/grants/{id}", get(get_grant).delete(revoke_grant))
        .route("/v1/authority/agents/{agent_id}", get(agent_authority))
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

pub fn grant_json(grant: &Grant) -> Value {
    json!({
        "id": grant.id,
        "grantor": grant.grantor,
        "grantee": grant.grantee,
        "concept_prefix": grant.concept_prefix,
        "level": grant.level,
        "granted_at": format_time_us(grant.granted_at_us),
        "revoked_at": grant.revoked_at_us.map(format_time_us),
        "active": grant.revoked_at_us.is_none(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootRequest {
    agent_id: String,
    level: i64,
}

/// `POST /v1/admin/authority/roots` `{"agent_id", "level"}`: makes an agent a root authority
/// (or changes its level).
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
            Ok(Json(json!({"agent_id": agent_id, "level": level, "changed": changed})).into_response())
        }
        other => Err(unexpected(other)),
    }
}

/// `DELETE /v1/admin/authority/roots/{agent_id}`: the agent is no longer a root (chains from
/// it stop counting; `as_of` reads before now still see it).
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
            Ok(Json(json!({"agent_id": agent_id, "removed": changed})).into_response())
        }
        other => Err(unexpected(other)),
    }
}

/// `GET /v1/authority/roots`: the current root authorities.
async fn list_roots(State(state): State<AppState>) -> Response {
    let roots: Vec<Value> = state.shards.policy().read(|s| {
        s.authorities
            .roots()
            .iter()
            .filter_map(|(agent, spans)| {
                let span = spans.iter().find(|s| s.until_us.is_none())?;
                Some(json!({"agent_id": agent, "level": span.level, "since": format_time_us(span.since_us)}))
            })
            .collect()
    });
    Json(json!({"roots": roots})).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantRequest {
    grantor: String,
    grantee: String,
    #[serde(default)]
    concept_prefix: String,
    level: i64,
    /// The grantor's hex Ed25519 signature over the canonical grant bytes (docs/signatures.md).
    #[serde(default)]
    signature: Option<String>,
}

/// `POST /v1/authority/grants`: 201 with the grant, or 403 unless the grantor holds at least
/// `level` on a prefix covering `concept_prefix` (checked when the meta group applies it).
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
        PolicyOutcome::Grant(grant) => Ok((StatusCode::CREATED, Json(grant_json(&grant))).into_response()),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListGrantsParams {
    grantor: Option<String>,
    grantee: Option<String>,
    /// Grants whose prefix covers this path.
    concept_path: Option<String>,
    #[serde(default)]
    include_revoked: bool,
    limit: Option<usize>,
    /// The last grant id of the previous page.
    after: Option<u64>,
}

/// `GET /v1/authority/grants[?grantor&grantee&concept_path&include_revoked&limit&after]`.
async fn list_grants(
    State(state): State<AppState>,
    params: Result<Query<ListGrantsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query_params(params)?;
    let limit = list_limit(params.limit)?;
    if let Some(path) = &params.concept_path {
        validate_concept_path(path)?;
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
        let page: Vec<Value> = matching.by_ref().take(limit).map(grant_json).collect();
        (page, matching.next().is_some())
    });
    let next = if more { grants.last().map(|g| g["id"].clone()) } else { None };
    Ok(Json(json!({"grants": grants, "next_after": next})).into_response())
}

fn parse_grant_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::new(ErrorCode::InvalidGrantId, format!("grant id {text:?} is not a number")))
}

/// `GET /v1/authority/grants/{id}`
async fn get_grant(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_grant_id(&id)?;
    let grant = state.shards.policy().read(|s| s.authorities.grant(id).cloned());
    match grant {
        Some(grant) => Ok(Json(grant_json(&grant)).into_response()),
        None => Err(ApiError::new(ErrorCode::GrantNotFound, format!("grant {id} not found"))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeParams {
    /// The grantor revoking its own grant; without it the admin token is required.
    agent_id: Option<String>,
    /// With `agent_id`: its hex Ed25519 signature over the canonical revocation bytes.
    signature: Option<String>,
}

/// `DELETE /v1/authority/grants/{id}[?agent_id=GRANTOR]`: revokes a grant (its grantor, or an
/// admin). Chains through it stop counting from now on.
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
        PolicyOutcome::Grant(grant) => Ok(Json(grant_json(&grant)).into_response()),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentAuthorityParams {
    concept_path: Option<String>,
    as_of: Option<String>,
}

/// `GET /v1/authority/agents/{agent_id}?concept_path=P[&as_of=T]`: the agent's authority for
/// the path and the chain of grants that gives it (`authority: null` when it has none).
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
    let body = policy.read(|s| match &found {
        None => json!({
            "agent_id": agent_id,
            "concept_path": path,
            "authority": null,
            "root": null,
            "chain": [],
            "max_chain_depth": policy.max_chain_depth(),
        }),
        Some(found) => json!({
            "agent_id": agent_id,
            "concept_path": path,
            "authority": found.level,
            "root": found.root,
            "root_level": s.authorities.root_level(&found.root, as_of_us),
            "chain": found.chain.iter().filter_map(|id| s.authorities.grant(*id)).map(grant_json).collect::<Vec<_>>(),
            "max_chain_depth": policy.max_chain_depth(),
        }),
    });
    Ok(Json(body).into_response())
}

fn unexpected(outcome: PolicyOutcome) -> ApiError {
    ApiError::new(ErrorCode::UnexpectedResponse, format!("the meta group answered {outcome:?}"))
}
