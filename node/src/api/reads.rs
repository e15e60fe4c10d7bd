//! Read endpoints: queries through lenses (one concept_path, or a prefix fanned out over every
//! shard and merged), single assertions, and the concept listing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::extract::StrictJson;
use super::openapi::{errors, BODY, QUERY, READ};
use super::AppState;
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::model::assertion::{
    validate_concept_path, validate_concept_prefix, validate_predicate, AgentIdText, ConceptPathText,
    ConceptPrefixText, PredicateText, Status,
};
use crate::model::id::{format_time_us, parse_as_of, AssertionId};
use crate::model::lens::{resolve, Claim, Lens, Resolution};
use crate::model::ModelError;
use crate::shard::claims_cache::{RenderKey, RenderedSlot};
use crate::shard::reader::{ClaimGroup, ClaimsRead, ConceptEntry, ShardRead, ShardReadAnswer};
use crate::shard::ConsensusError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    Linearizable,
    Stale,
}

fn parse_consistency(text: Option<&str>) -> Result<Consistency, ApiError> {
    match text {
        None | Some("linearizable") => Ok(Consistency::Linearizable),
        Some("stale") => Ok(Consistency::Stale),
        Some(other) => Err(ApiError::new(
            ErrorCode::InvalidConsistency,
            format!(
                "consistency {:?}: expected \"linearizable\" or \"stale\"",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

/// A query: exactly one of `concept_path` and `concept_prefix`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// One concept.
    #[serde(default)]
    #[schema(value_type = Option<ConceptPathText>, inline)]
    concept_path: Option<String>,
    /// Every concept under this prefix, over every shard.
    #[serde(default)]
    #[schema(value_type = Option<ConceptPrefixText>, inline)]
    concept_prefix: Option<String>,
    /// Only this predicate.
    #[serde(default)]
    #[schema(value_type = Option<PredicateText>, inline)]
    predicate: Option<String>,
    /// `recency` (default), `authority`, `consensus`, `confidence`, `all` or `history`.
    #[serde(default)]
    lens: Option<String>,
    /// Read as of this time: unix milliseconds, or an RFC 3339 string.
    #[serde(default)]
    #[schema(value_type = Option<TimeInput>)]
    as_of: Option<Value>,
    /// Groups per page: 1 to `query.max_limit` (default `query.default_limit`).
    #[serde(default)]
    #[schema(minimum = 1)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    #[serde(default)]
    cursor: Option<String>,
    /// `linearizable` (default) or `stale`.
    #[serde(default)]
    #[schema(pattern = r"^(linearizable|stale)$")]
    consistency: Option<String>,
    /// Who is asking (recorded in the slow-query log); default `anonymous`.
    #[serde(default)]
    #[schema(value_type = Option<AgentIdText>, inline)]
    agent_id: Option<String>,
}

/// A page position: the last (concept_path, predicate) returned.
fn encode_cursor(concept_path: &str, predicate: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&(concept_path, predicate)).unwrap_or_default())
}

fn decode_cursor(cursor: &str) -> Result<(String, String), ApiError> {
    let invalid = || ApiError::new(ErrorCode::InvalidCursor, "cursor is not one this server returned");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    serde_json::from_slice(&bytes).map_err(|_| invalid())
}

fn page_limit(state: &AppState, limit: Option<usize>) -> Result<usize, ApiError> {
    let max = state.config.query.max_limit;
    match limit {
        None => Ok(state.config.query.default_limit),
        Some(0) => Err(ApiError::new(ErrorCode::InvalidLimit, "limit must be at least 1")),
        Some(n) if n > max => {
            Err(ApiError::new(ErrorCode::InvalidLimit, format!("limit {n} is over query.max_limit ({max})")))
        }
        Some(n) => Ok(n),
    }
}

/// One claim as a query shows it (fields in alphabetical order, as the claims cache renders them).
#[derive(Serialize, ToSchema)]
#[schema(as = QueryClaim)]
struct ClaimView<'a> {
    agent_id: &'a str,
    asserted_at: String,
    /// Only under the authority lens, on the winner: its level (null: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<Option<u8>>,
    confidence: f64,
    id: AssertionId,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    retracted_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, value_type = Option<Object>)]
    source: Option<&'a RawValue>,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    superseded_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    superseded_by: Option<AssertionId>,
    #[schema(value_type = serde_json::Value)]
    value: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    votes: Option<VotesView>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = VoteCounts)]
struct VotesView {
    down: u32,
    score: f64,
    up: u32,
}

fn claim_view<'a>(claim: &Claim<'a>, lens: Lens) -> ClaimView<'a> {
    let with_votes = matches!(lens, Lens::Consensus | Lens::All | Lens::History);
    let history = lens == Lens::History;
    ClaimView {
        agent_id: &claim.record.draft.agent_id,
        asserted_at: format_time_us(claim.record.asserted_at_us),
        authority: None,
        confidence: claim.record.draft.confidence,
        id: claim.record.id,
        retracted_at: if history { claim.retracted_at_us.map(format_time_us) } else { None },
        source: if history { claim.record.draft.source.as_deref() } else { None },
        status: claim.status,
        superseded_at: if history { claim.superseded_at_us.map(format_time_us) } else { None },
        superseded_by: if history { claim.superseded_by } else { None },
        value: &claim.record.draft.value,
        votes: with_votes.then_some(VotesView { down: claim.votes_down, score: claim.score, up: claim.votes_up }),
    }
}

/// What a lens shows for one (concept_path, predicate): a winner, or a list of claims.
#[derive(Serialize, ToSchema)]
#[schema(as = QueryGroup)]
struct GroupView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    alternatives: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    assertions: Option<Vec<ClaimView<'a>>>,
    concept_path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    conflict: Option<bool>,
    predicate: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    winner: Option<ClaimView<'a>>,
}

/// Applies the lens to one group; `None` when the lens has nothing to show for it.
fn group_result<'a>(state: &AppState, group: &'a ClaimGroup, lens: Lens, as_of_us: u64) -> Option<GroupView<'a>> {
    let policy = state.shards.policy();
    let path = group.concept_path.as_str();
    let authority = |agent: &str| policy.level(agent, path, as_of_us);
    // DESIGN §2: a vote weighs its voter's authority for the path, 1 where it has none. Only
    // the consensus lens shows scores, so the others skip the lookups.
    let weighted = |agent: &str| authority(agent).map_or(1.0, f64::from);
    let unweighted = |_: &str| 1.0;
    let weight: &dyn Fn(&str) -> f64 =
        if matches!(lens, Lens::Consensus | Lens::All | Lens::History) { &weighted } else { &unweighted };
    let claims: Vec<Claim<'a>> = group.claims.iter().filter_map(|facts| facts.at(as_of_us, weight)).collect();
    let resolution = resolve(lens, claims, &authority)?;
    let mut view = GroupView {
        alternatives: None,
        assertions: None,
        concept_path: path,
        conflict: None,
        predicate: &group.predicate,
        winner: None,
    };
    match resolution {
        Resolution::Winner { winner, alternatives } => {
            let mut winner_view = claim_view(&winner, lens);
            if lens == Lens::Authority {
                winner_view.authority = Some(authority(&winner.record.draft.agent_id));
            }
            view.winner = Some(winner_view);
            view.alternatives = Some(alternatives);
            view.conflict = Some(alternatives > 0);
        }
        Resolution::Listed(claims) => {
            view.assertions = Some(claims.iter().map(|c| claim_view(c, lens)).collect());
        }
    }
    Some(view)
}

// Serialized straight from the claims it borrows: no intermediate JSON tree (this is the
// hottest path of the API).
/// One page of a query's answer.
#[derive(Serialize, ToSchema)]
#[schema(as = QueryResponse)]
struct QueryBody<'a> {
    /// Stale reads: the replica's applied log index.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    applied_index: Option<u64>,
    /// The request's `as_of`, as given.
    #[schema(required = true, value_type = Option<TimeInput>)]
    as_of: &'a Option<Value>,
    consistency: Consistency,
    lens: Lens,
    #[schema(required = true)]
    next_cursor: Option<String>,
    #[schema(value_type = Vec<GroupView>)]
    results: Results<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    shard: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    staleness_ms: Option<u64>,
}

/// The `results` of an answer: rendered now, or as the claims cache kept them.
enum Results<'a> {
    Views(Vec<GroupView<'a>>),
    Rendered(RenderedSlot),
}

impl Results<'_> {
    fn len(&self) -> usize {
        match self {
            Results::Views(views) => views.len(),
            Results::Rendered(slot) => slot.count,
        }
    }
}

impl Serialize for Results<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Results::Views(views) => views.serialize(serializer),
            Results::Rendered(slot) => slot.json.serialize(serializer),
        }
    }
}

/// A serialized query answer and what the slow-query log records of it.
struct QueryAnswer {
    body: Vec<u8>,
    results: usize,
    /// Estimated memory the query held: the claims it read and the answer.
    memory_bytes: usize,
}

fn encoding_failed(error: serde_json::Error) -> ApiError {
    ApiError::new(ErrorCode::InternalError, format!("cannot encode the answer: {error}"))
}

/// What every answer echoes of its request.
#[derive(Clone, Copy)]
struct Echo<'a> {
    as_of: &'a Option<Value>,
    consistency: Consistency,
    lens: Lens,
}

impl QueryBody<'_> {
    /// The answer, unless it and the `claims_bytes` of claims read for it would hold more
    /// than `limit`.
    fn encode(&self, claims_bytes: usize, limit: Option<u64>, shard: Option<u16>) -> Result<QueryAnswer, ApiError> {
        let body = serde_json::to_vec(self).map_err(encoding_failed)?;
        let memory_bytes = claims_bytes + body.len();
        check_query_memory(memory_bytes, limit, shard)?;
        Ok(QueryAnswer { body, results: self.results.len(), memory_bytes })
    }
}

/// `query.max_memory_per_query_mb` in bytes; `None` when it is 0 (no limit).
fn query_memory_limit(state: &AppState) -> Option<u64> {
    let mb = state.config.query.max_memory_per_query_mb;
    (mb > 0).then_some(mb << 20)
}

fn check_query_memory(memory_bytes: usize, limit: Option<u64>, shard: Option<u16>) -> Result<(), ApiError> {
    match limit {
        Some(limit_bytes) if memory_bytes as u64 > limit_bytes => {
            Err(ConsensusError::QueryMemoryExceeded { shard, limit_bytes }.into())
        }
        _ => Ok(()),
    }
}

/// A time a client gives: unix milliseconds (a number or a string of digits), or RFC 3339.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum TimeInput {
    UnixMillis(u64),
    Text(String),
}

errors!(QueryErrors: BODY, READ, &[
    ErrorCode::InvalidAgentId,
    ErrorCode::UnknownLens,
    ErrorCode::InvalidTime,
    ErrorCode::InvalidConsistency,
    ErrorCode::InvalidLimit,
    ErrorCode::InvalidPredicate,
    ErrorCode::InvalidCursor,
    ErrorCode::InvalidConceptPath,
    ErrorCode::InvalidQuery,
    ErrorCode::QueryTimeout,
    ErrorCode::QueryMemoryExceeded,
]);

/// Reads claims through a lens.
#[utoipa::path(post, path = "/v1/query", tag = "reads", request_body = QueryRequest,
    responses((status = 200, description = "one page of (concept_path, predicate) groups", body = QueryBody), QueryErrors))]
pub async fn query(
    State(state): State<AppState>,
    StrictJson(request): StrictJson<QueryRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    if let Some(agent_id) = &request.agent_id {
        crate::model::assertion::validate_agent_id(agent_id)?;
    }
    let lens: Lens = request.lens.as_deref().unwrap_or("recency").parse()?;
    let as_of_us = match &request.as_of {
        None | Some(Value::Null) => u64::MAX,
        Some(value) => parse_as_of(value).map_err(|e| ModelError::InvalidTime { message: e.to_string() })?,
    };
    let consistency = parse_consistency(request.consistency.as_deref())?;
    let limit = page_limit(&state, request.limit)?;
    if let Some(predicate) = &request.predicate {
        validate_predicate(predicate)?;
    }
    let after = request.cursor.as_deref().map(decode_cursor).transpose()?;
    let timeout = Duration::from_secs(state.config.query.query_timeout_seconds);
    let echo = Echo { as_of: &request.as_of, consistency, lens };
    let work = async {
        match (&request.concept_path, &request.concept_prefix) {
            (Some(path), None) => {
                validate_concept_path(path)?;
                query_path(&state, path, request.predicate.as_deref(), echo, as_of_us, limit, after, timeout).await
            }
            (None, Some(prefix)) => {
                validate_concept_prefix(prefix)?;
                query_prefix(&state, prefix, request.predicate.as_deref(), echo, as_of_us, limit, after, timeout).await
            }
            _ => Err(ApiError::new(ErrorCode::InvalidQuery, "give exactly one of concept_path and concept_prefix")),
        }
    };
    let outcome = match tokio::time::timeout(timeout, work).await {
        Ok(outcome) => outcome,
        Err(_) => {
            crate::metrics::QUERY_TIMEOUTS.with_label_values(&[&state.metrics.node_label]).inc();
            Err(ApiError::new(
                ErrorCode::QueryTimeout,
                format!("query exceeded query.query_timeout_seconds ({}s)", timeout.as_secs()),
            ))
        }
    };
    let elapsed = started.elapsed();
    let logged = match &outcome {
        Ok(answer) => {
            state.metrics.observe_query(lens, elapsed);
            (elapsed.as_millis() as u64 >= state.config.query.slow_query_ms).then_some((
                answer.results,
                answer.memory_bytes as u64,
                None,
            ))
        }
        Err(error) if error.code == ErrorCode::QueryTimeout => Some((0, 0, Some("query_timeout"))),
        Err(error) if error.code == ErrorCode::QueryMemoryExceeded => {
            crate::metrics::QUERY_MEMORY_EXCEEDED.inc();
            Some((0, query_memory_limit(&state).unwrap_or(0), Some("query_memory_exceeded")))
        }
        Err(_) => None,
    };
    if let Some((results, memory_bytes, error)) = logged {
        let agent_id = request.agent_id.clone().unwrap_or_else(|| crate::model::assertion::DEFAULT_AGENT_ID.into());
        let subject = match (&request.concept_path, &request.concept_prefix) {
            (Some(path), _) => path.clone(),
            (None, Some(prefix)) => format!("{prefix}/*"),
            (None, None) => String::new(),
        };
        let memory_mb = memory_bytes as f64 / (1024.0 * 1024.0);
        let duration_ms = elapsed.as_millis() as u64;
        tracing::info!(agent_id = %agent_id, subject = %subject, lens = ?lens, duration_ms, results, memory_mb, error, "slow query");
        if error.is_none() {
            // Refused queries have their own counters (stemedb_query_timeout_total,
            // stemedb_query_memory_exceeded_total); this one keeps its meaning for alerts.
            crate::metrics::SLOW_QUERIES.inc();
        }
        state.slow_queries.record(crate::api::slow_queries::SlowQuery {
            agent_id,
            subject,
            predicate: request.predicate.clone(),
            lens: Lens::NAMES[lens as usize].to_string(),
            consistency: format!("{consistency:?}").to_lowercase(),
            duration_ms,
            memory_mb: (memory_mb * 1000.0).round() / 1000.0,
            results,
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            error,
        });
    }
    let answer = outcome?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], answer.body).into_response())
}

fn unexpected_answer() -> ApiError {
    ApiError::new(ErrorCode::UnexpectedResponse, "a replica answered a different read")
}

#[allow(clippy::too_many_arguments)]
async fn query_path(
    state: &AppState,
    path: &str,
    predicate: Option<&str>,
    echo: Echo<'_>,
    as_of_us: u64,
    limit: usize,
    after: Option<(String, String)>,
    timeout: Duration,
) -> Result<QueryAnswer, ApiError> {
    let shard = state.shards.shard_for_path(path);
    let memory_limit = query_memory_limit(state);
    // A query for the present from the first page can use a rendering kept by the claims cache
    // of this node's replica, which answers without its claims when it has one (see
    // claims_cache): its cost is then the same whatever the number of claims.
    let policy_version = state.shards.policy().version();
    let render = (as_of_us == u64::MAX && after.is_none()).then_some(RenderKey {
        lens: echo.lens,
        policy_version,
        max_groups: limit,
    });
    let read = ShardRead::Claims {
        concept_path: path.to_string(),
        predicate: predicate.map(str::to_string),
        memory_limit,
        render,
    };
    let linearizable = echo.consistency == Consistency::Linearizable;
    let result = state.shards.read(shard, read, linearizable, timeout).await?;
    // The claims the answer's views borrow, when the replica sent claims.
    let claims;
    let (results, next_cursor, claims_bytes) = match result.answer {
        ShardReadAnswer::Rendered(slot) if render.is_some() => {
            let claims_bytes = slot.claims_bytes;
            (Results::Rendered(slot), None, claims_bytes)
        }
        ShardReadAnswer::Claims(read) => {
            claims = read;
            let page = Page { lens: echo.lens, as_of_us, limit, after: &after, policy_version };
            let (results, next_cursor) = claims_page(state, shard, &claims, &page)?;
            (results, next_cursor, claims.memory_bytes())
        }
        _ => return Err(unexpected_answer()),
    };
    QueryBody {
        applied_index: (!linearizable).then_some(result.applied_index),
        as_of: echo.as_of,
        consistency: echo.consistency,
        lens: echo.lens,
        next_cursor,
        results,
        shard: Some(shard),
        staleness_ms: (!linearizable).then_some(result.staleness_ms),
    }
    .encode(claims_bytes, memory_limit, Some(shard))
}

/// Which page of a concept_path's claims a query wants, and under what.
struct Page<'a> {
    lens: Lens,
    as_of_us: u64,
    limit: usize,
    after: &'a Option<(String, String)>,
    policy_version: u64,
}

/// A page of results from the claims of one concept_path, and the cursor to the next.
fn claims_page<'a>(
    state: &AppState,
    shard: u16,
    read: &'a ClaimsRead,
    page: &Page<'_>,
) -> Result<(Results<'a>, Option<String>), ApiError> {
    let Page { lens, as_of_us, limit, after, policy_version } = *page;
    let groups = &read.groups;
    let remaining: Vec<&ClaimGroup> = groups
        .iter()
        .filter(|g| match after {
            Some((p, q)) => (g.concept_path.as_str(), g.predicate.as_str()) > (p.as_str(), q.as_str()),
            None => true,
        })
        .collect();
    let shown = &remaining[..remaining.len().min(limit)];
    let next_cursor =
        if remaining.len() > limit { shown.last().map(|g| encode_cursor(&g.concept_path, &g.predicate)) } else { None };
    // An answer for the present covering every group is the same for every query of the key
    // until its claims or the policy change: render it once (see claims_cache).
    let whole = as_of_us == u64::MAX && shown.len() == groups.len();
    if let Some(slot) = if whole { read.rendered.get(lens, policy_version) } else { None } {
        return Ok((Results::Rendered(slot), next_cursor));
    }
    let views: Vec<GroupView<'a>> = shown.iter().filter_map(|g| group_result(state, g, lens, as_of_us)).collect();
    if !whole {
        return Ok((Results::Views(views), next_cursor));
    }
    let count = views.len();
    let json = serde_json::value::to_raw_value(&views).map_err(encoding_failed)?;
    let slot = RenderedSlot {
        lens,
        policy_version,
        count,
        groups: groups.len(),
        claims_bytes: read.memory_bytes(),
        json: Arc::from(json),
    };
    state.shards.keep_rendering(shard, read, slot.clone());
    Ok((Results::Rendered(slot), next_cursor))
}

/// (concept_path, predicate) pairs under `prefix` on every shard, merged in key order, at most
/// `limit + 1` (the extra one tells whether another page exists), and the worst staleness seen.
async fn fan_out_concepts(
    state: &AppState,
    prefix: &str,
    predicate: Option<&str>,
    consistency: Consistency,
    limit: usize,
    after: &Option<(String, String)>,
    timeout: Duration,
) -> Result<(Vec<(u16, ConceptEntry)>, u64), ApiError> {
    let linearizable = consistency == Consistency::Linearizable;
    let groups = state.shards.groups();
    let per_shard = groups.iter().map(|group| async move {
        let mut cursor = after.clone();
        let mut collected = Vec::new();
        let mut staleness = 0;
        // With a predicate filter, keep paging until this shard gives limit + 1 matches.
        loop {
            let read = ShardRead::Concepts { prefix: prefix.to_string(), after: cursor.clone(), limit: limit + 1 };
            let result = state.shards.read(group.shard, read, linearizable, timeout).await?;
            staleness = staleness.max(result.staleness_ms);
            let ShardReadAnswer::Concepts(page) = result.answer else { return Err(unexpected_answer()) };
            let exhausted = page.len() < limit + 1;
            cursor = page.last().map(|e| (e.concept_path.clone(), e.predicate.clone()));
            collected.extend(
                page.into_iter().filter(|e| predicate.is_none_or(|p| p == e.predicate)).map(|e| (group.shard, e)),
            );
            if exhausted || collected.len() > limit {
                return Ok::<_, ApiError>((collected, staleness));
            }
        }
    });
    let mut merged = Vec::new();
    let mut staleness = 0;
    for result in futures::future::join_all(per_shard).await {
        let (entries, shard_staleness) = result?;
        merged.extend(entries);
        staleness = staleness.max(shard_staleness);
    }
    merged.sort_by(|a, b| a.1.cmp(&b.1));
    merged.truncate(limit + 1);
    Ok((merged, staleness))
}

#[allow(clippy::too_many_arguments)]
async fn query_prefix(
    state: &AppState,
    prefix: &str,
    predicate: Option<&str>,
    echo: Echo<'_>,
    as_of_us: u64,
    limit: usize,
    after: Option<(String, String)>,
    timeout: Duration,
) -> Result<QueryAnswer, ApiError> {
    let consistency = echo.consistency;
    let (mut entries, mut staleness) =
        fan_out_concepts(state, prefix, predicate, consistency, limit, &after, timeout).await?;
    let next_cursor = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|(_, e)| encode_cursor(&e.concept_path, &e.predicate))
    } else {
        None
    };
    let linearizable = consistency == Consistency::Linearizable;
    // The claims of the page's concepts, PREFIX_READS_IN_FLIGHT reads at a time. Each read may
    // hold a share (1/16, or 1/n of the last n reads) of the allowance not yet committed:
    // held by finished reads or promised to reads in flight. A finished read commits what it
    // holds instead of its share (never more), so the commitments never pass the limit.
    let memory_limit = query_memory_limit(state);
    let committed = std::sync::atomic::AtomicU64::new(0);
    let committed = &committed;
    let wanted: Vec<(u16, String, String)> =
        entries.iter().map(|(shard, e)| (*shard, e.concept_path.clone(), e.predicate.clone())).collect();
    let mut not_started = wanted.len();
    let mut reads = futures::stream::iter(wanted)
        .map(|(shard, concept_path, predicate)| {
            let sharing = not_started.min(PREFIX_READS_IN_FLIGHT) as u64;
            not_started -= 1;
            let share = memory_limit.map(|limit| {
                let share = limit.saturating_sub(committed.load(Ordering::Relaxed)) / sharing.max(1);
                committed.fetch_add(share, Ordering::Relaxed);
                share
            });
            let read =
                ShardRead::Claims { concept_path, predicate: Some(predicate), memory_limit: share, render: None };
            let read = state.shards.read(shard, read, linearizable, timeout);
            async move { (share, read.await) }
        })
        .buffered(PREFIX_READS_IN_FLIGHT);
    let mut answers = Vec::new();
    while let Some((share, result)) = reads.next().await {
        let result = result.map_err(|error| match error {
            // A read refused for its share: the query as a whole is what passed the limit.
            ConsensusError::QueryMemoryExceeded { .. } => {
                ConsensusError::QueryMemoryExceeded { shard: None, limit_bytes: memory_limit.unwrap_or(u64::MAX) }
            }
            other => other,
        })?;
        staleness = staleness.max(result.staleness_ms);
        let ShardReadAnswer::Claims(read) = result.answer else { return Err(unexpected_answer()) };
        if let Some(share) = share {
            committed.fetch_sub(share.saturating_sub(read.memory_bytes() as u64), Ordering::Relaxed);
        }
        answers.push(read);
    }
    let claims_bytes = answers.iter().map(|read| read.memory_bytes()).sum();
    QueryBody {
        applied_index: None,
        as_of: echo.as_of,
        consistency,
        lens: echo.lens,
        next_cursor,
        results: Results::Views(
            answers
                .iter()
                .flat_map(|read| read.groups.iter())
                .filter_map(|g| group_result(state, g, echo.lens, as_of_us))
                .collect(),
        ),
        shard: None,
        staleness_ms: (!linearizable).then_some(staleness),
    }
    .encode(claims_bytes, memory_limit, None)
}

/// Claims reads a prefix query has in flight at once.
const PREFIX_READS_IN_FLIGHT: usize = 16;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AssertionParams {
    /// `linearizable` (default) or `stale`.
    #[serde(default)]
    #[param(pattern = r"^(linearizable|stale)$")]
    consistency: Option<String>,
}

/// One assertion with everything known about it now.
#[derive(Serialize, ToSchema)]
pub struct AssertionDetail {
    id: AssertionId,
    concept_path: String,
    predicate: String,
    #[schema(value_type = serde_json::Value)]
    value: Box<RawValue>,
    agent_id: String,
    confidence: f64,
    #[schema(required = true, value_type = Option<Object>)]
    source: Option<Box<RawValue>>,
    #[schema(required = true)]
    signature: Option<String>,
    #[schema(required = true)]
    request_id: Option<String>,
    supersedes: Vec<AssertionId>,
    asserted_at: String,
    shard: u16,
    log_index: u64,
    status: Status,
    /// The claims that replace this one (and are not retracted).
    superseded_by: Vec<SupersededBy>,
    #[schema(required = true)]
    retraction: Option<RetractionView>,
    #[schema(required = true)]
    quarantine: Option<crate::model::assertion::QuarantineDecision>,
    #[schema(required = true)]
    released_at: Option<String>,
    votes: VoteSummary,
}

#[derive(Serialize, ToSchema)]
pub struct SupersededBy {
    id: AssertionId,
    at: String,
}

#[derive(Serialize, ToSchema)]
pub struct RetractionView {
    at: String,
    /// The retracting agent, or the operator.
    by: String,
    #[schema(required = true)]
    reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct VoteSummary {
    up: u32,
    down: u32,
    score: f64,
    history: Vec<VoteEntry>,
}

#[derive(Serialize, ToSchema)]
pub struct VoteEntry {
    agent_id: String,
    value: i8,
    at: String,
}

errors!(AssertionErrors: QUERY, READ, &[ErrorCode::InvalidId, ErrorCode::AssertionNotFound, ErrorCode::InvalidConsistency]);

/// One assertion with its status, supersession, retraction and votes.
#[utoipa::path(get, path = "/v1/assertions/{id}", tag = "reads",
    params(("id" = inline(AssertionId), Path, description = "the assertion id"), AssertionParams),
    responses((status = 200, description = "the assertion", body = AssertionDetail), AssertionErrors))]
pub async fn get_assertion(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<AssertionParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = super::extract::query_params(params)?;
    let id = AssertionId::parse(&id)
        .map_err(|e| ApiError::from(ModelError::InvalidId { id: e.0.chars().take(64).collect() }))?;
    let not_found = || ApiError::from(ModelError::AssertionNotFound { id: id.to_string() });
    if id.shard() >= state.shards.shard_count() {
        return Err(not_found());
    }
    let consistency = parse_consistency(params.consistency.as_deref())?;
    let timeout = Duration::from_secs(state.config.query.query_timeout_seconds);
    let result = state
        .shards
        .read(id.shard(), ShardRead::Assertion { id }, consistency == Consistency::Linearizable, timeout)
        .await?;
    let ShardReadAnswer::Assertion(found) = result.answer else { return Err(unexpected_answer()) };
    let (facts, retraction) = found.ok_or_else(not_found)?;
    let Some(now) = facts.at(u64::MAX, &|_| 1.0) else { return Err(not_found()) };
    let record = &facts.record;
    let body = AssertionDetail {
        id: record.id,
        concept_path: record.draft.concept_path.clone(),
        predicate: record.draft.predicate.clone(),
        value: record.draft.value.clone(),
        agent_id: record.draft.agent_id.clone(),
        confidence: record.draft.confidence,
        source: record.draft.source.clone(),
        signature: record.draft.signature.clone(),
        request_id: record.draft.request_id.clone(),
        supersedes: record.draft.supersedes.clone(),
        asserted_at: format_time_us(record.asserted_at_us),
        shard: id.shard(),
        log_index: record.log_index,
        status: now.status,
        superseded_by: facts
            .supersessions
            .iter()
            .filter(|s| s.by_retracted_at_us.is_none())
            .map(|s| SupersededBy { id: s.by, at: format_time_us(s.at_us) })
            .collect(),
        retraction: retraction.map(|r| RetractionView { at: format_time_us(r.at_us), by: r.by, reason: r.reason }),
        quarantine: record.draft.quarantine.clone(),
        released_at: facts.released_at_us.map(format_time_us),
        votes: VoteSummary {
            up: now.votes_up,
            down: now.votes_down,
            score: now.score,
            history: facts
                .votes
                .iter()
                .map(|v| VoteEntry { agent_id: v.agent_id.clone(), value: v.value, at: format_time_us(v.at_us) })
                .collect(),
        },
    };
    Ok(Json(body).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConceptParams {
    /// A concept path prefix (default: every concept).
    #[serde(default)]
    #[param(value_type = Option<ConceptPrefixText>, inline)]
    prefix: Option<String>,
    /// 1 to `query.max_limit`.
    #[serde(default)]
    #[param(minimum = 1)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    /// `linearizable` (default) or `stale`.
    #[serde(default)]
    #[param(pattern = r"^(linearizable|stale)$")]
    consistency: Option<String>,
}

/// A page of concepts.
#[derive(Serialize, ToSchema)]
pub struct ConceptPage {
    prefix: String,
    concepts: Vec<ConceptCount>,
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// One (concept_path, predicate) and how many assertions it has.
#[derive(Serialize, ToSchema)]
pub struct ConceptCount {
    concept_path: String,
    predicate: String,
    assertions: u64,
    shard: u16,
}

errors!(ConceptErrors: QUERY, READ, &[
    ErrorCode::InvalidConceptPath,
    ErrorCode::InvalidLimit,
    ErrorCode::InvalidConsistency,
    ErrorCode::InvalidCursor,
]);

/// (concept_path, predicate) pairs under a prefix with their assertion counts.
#[utoipa::path(get, path = "/v1/concepts", tag = "reads", params(ConceptParams),
    responses((status = 200, description = "one page", body = ConceptPage), ConceptErrors))]
pub async fn concepts(
    State(state): State<AppState>,
    params: Result<Query<ConceptParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = super::extract::query_params(params)?;
    let prefix = params.prefix.unwrap_or_default();
    validate_concept_prefix(&prefix)?;
    let limit = page_limit(&state, params.limit)?;
    let consistency = parse_consistency(params.consistency.as_deref())?;
    let after = params.cursor.as_deref().map(decode_cursor).transpose()?;
    let timeout = Duration::from_secs(state.config.query.query_timeout_seconds);
    let (mut entries, _) = fan_out_concepts(&state, &prefix, None, consistency, limit, &after, timeout).await?;
    let next_cursor = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|(_, e)| encode_cursor(&e.concept_path, &e.predicate))
    } else {
        None
    };
    let concepts = entries
        .into_iter()
        .map(|(shard, e)| ConceptCount {
            concept_path: e.concept_path,
            predicate: e.predicate,
            assertions: e.assertions,
            shard,
        })
        .collect();
    Ok(Json(ConceptPage { prefix, concepts, next_cursor }).into_response())
}

/// One assertion in a listing (by agent, by time, quarantine): the record, its status now, and
/// why it was quarantined, if it was.
#[derive(Serialize, ToSchema)]
pub struct ListedAssertion {
    id: AssertionId,
    concept_path: String,
    predicate: String,
    #[schema(value_type = serde_json::Value)]
    value: Box<RawValue>,
    agent_id: String,
    confidence: f64,
    asserted_at: String,
    #[schema(required = true)]
    status: Option<Status>,
    #[schema(required = true)]
    quarantine: Option<crate::model::assertion::QuarantineDecision>,
    #[schema(required = true)]
    released_at: Option<String>,
    #[schema(required = true)]
    retracted_at: Option<String>,
}

impl ListedAssertion {
    pub fn of(facts: &crate::model::lens::ClaimFacts) -> ListedAssertion {
        let record = &facts.record;
        ListedAssertion {
            id: record.id,
            concept_path: record.draft.concept_path.clone(),
            predicate: record.draft.predicate.clone(),
            value: record.draft.value.clone(),
            agent_id: record.draft.agent_id.clone(),
            confidence: record.draft.confidence,
            asserted_at: format_time_us(record.asserted_at_us),
            status: facts.at(u64::MAX, &|_| 1.0).map(|c| c.status),
            quarantine: record.draft.quarantine.clone(),
            released_at: facts.released_at_us.map(format_time_us),
            retracted_at: facts.retracted_at_us.map(format_time_us),
        }
    }
}

/// Runs `listing` on every shard and merges the pages in id (time) order: up to `limit`
/// assertions after `after`, and whether more follow.
pub async fn list_everywhere(
    state: &AppState,
    listing: crate::shard::reader::Listing,
    after: Option<AssertionId>,
    limit: usize,
    linearizable: bool,
) -> Result<(Vec<crate::model::lens::ClaimFacts>, bool), ApiError> {
    let timeout = Duration::from_secs(state.config.query.query_timeout_seconds);
    let reads = (0..state.shards.shard_count()).map(|shard| {
        let read = ShardRead::List { listing: listing.clone(), after, limit: limit + 1 };
        state.shards.read(shard, read, linearizable, timeout)
    });
    let mut merged = Vec::new();
    for result in futures::future::join_all(reads).await {
        let ShardReadAnswer::Listed(found) = result?.answer else { return Err(unexpected_answer()) };
        merged.extend(found);
    }
    merged.sort_by_key(|f| f.record.id);
    let more = merged.len() > limit;
    merged.truncate(limit);
    Ok((merged, more))
}

pub fn parse_time_param(name: &str, text: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(text) = text else { return Ok(None) };
    let value = text.parse::<u64>().map(Value::from).unwrap_or_else(|_| Value::from(text));
    parse_as_of(&value).map(Some).map_err(|e| ModelError::InvalidTime { message: format!("{name}: {e}") }.into())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Assertions of this agent.
    #[param(value_type = Option<AgentIdText>, inline)]
    agent_id: Option<String>,
    /// From this time (RFC 3339 or unix ms), inclusive.
    since: Option<String>,
    /// Until this time, exclusive.
    until: Option<String>,
    /// 1 to `query.max_limit`.
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// `linearizable` (default) or `stale`.
    #[param(pattern = r"^(linearizable|stale)$")]
    consistency: Option<String>,
}

/// A page of listed assertions.
#[derive(Serialize, ToSchema)]
pub struct AssertionPage {
    assertions: Vec<ListedAssertion>,
    #[schema(required = true)]
    next_cursor: Option<String>,
}

errors!(ListErrors: QUERY, READ, &[
    ErrorCode::InvalidTime,
    ErrorCode::MissingFilter,
    ErrorCode::InvalidAgentId,
    ErrorCode::InvalidLimit,
    ErrorCode::InvalidCursor,
    ErrorCode::InvalidConsistency,
]);

/// Assertions of one agent (the by-agent index) or within a time range (the by-time order of
/// ids), oldest first, every status included.
#[utoipa::path(get, path = "/v1/assertions", tag = "reads", params(ListParams),
    responses((status = 200, description = "one page", body = AssertionPage), ListErrors))]
pub async fn list_assertions(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = super::extract::query_params(params)?;
    // Both bounds at millisecond precision: since inclusive from the start of its millisecond,
    // until exclusive (parse_as_of gives the last microsecond of a millisecond, for as_of).
    let floor_ms = |t: u64| t - t % 1000;
    let since_us = parse_time_param("since", params.since.as_deref())?.map_or(0, floor_ms);
    let until_us = parse_time_param("until", params.until.as_deref())?.map_or(u64::MAX, floor_ms);
    if params.agent_id.is_none() && params.since.is_none() && params.until.is_none() {
        return Err(ApiError::new(
            ErrorCode::MissingFilter,
            "give agent_id, or a time range with since and/or until (RFC 3339 or unix ms)",
        ));
    }
    let listing = match params.agent_id {
        Some(agent_id) => {
            crate::model::assertion::validate_agent_id(&agent_id)?;
            crate::shard::reader::Listing::ByAgent { agent_id, since_us, until_us }
        }
        None => crate::shard::reader::Listing::ByTime { since_us, until_us },
    };
    let limit = page_limit(&state, params.limit)?;
    let after = super::extract::id_cursor(params.cursor.as_deref())?;
    let linearizable = parse_consistency(params.consistency.as_deref())? == Consistency::Linearizable;
    let (found, more) = list_everywhere(&state, listing, after, limit, linearizable).await?;
    let next_cursor = if more { found.last().map(|f| f.record.id.to_string()) } else { None };
    let assertions = found.iter().map(ListedAssertion::of).collect();
    Ok(Json(AssertionPage { assertions, next_cursor }).into_response())
}
