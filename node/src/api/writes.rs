//! Write endpoints: assert (single and batch), vote, retract. Each validates everything it can
//! before proposing, so bad input never reaches a Raft log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::access::CallerOf;
use super::breakers::Admission;
use super::error::{ApiError, ErrorDetail};
use super::extract::{parse_json, Body, StrictJson};
use super::openapi::{errors, BODY, BREAKER, GROWS, PROPOSE, SIGNATURE};
use super::{peer_of, AppState};
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::model::assertion::{
    validate_agent_id, AssertRequest, AssertionDraft, QuarantineDecision, RetractRequest, Status, VoteRequest,
    DEFAULT_AGENT_ID, MAX_ENTRY_BYTES, MAX_REASON_CHARS,
};
use crate::model::id::{format_time_us, now_us, AssertionId};
use crate::model::signing::{assertion_bytes, retract_bytes, verify, vote_bytes};
use crate::model::ModelError;
use crate::shard::command::{AssertOutcome, ShardCommand, ShardResponse};

/// Counts an invalid request against the agent it claims to come from (when that is a valid
/// agent id at all), for the invalid-request rate of its circuit breaker. With
/// `security.require_signatures` an unverified claim proves nothing, and counting it would let
/// anyone trip another agent's breaker: only refusals of verified writes count then (`settle`).
fn count_invalid(state: &AppState, claimed_agent: Option<&str>) {
    if state.config.security.require_signatures {
        return;
    }
    let agent = claimed_agent.unwrap_or(DEFAULT_AGENT_ID);
    if validate_agent_id(agent).is_ok() {
        state.breakers.record_invalid(agent);
    }
}

/// After a write: a probe's outcome goes to the breaker, a refusal by the state machine (bad
/// reference, not the owner) counts as an invalid request.
fn settle(state: &AppState, agent: &str, admission: Admission, succeeded: bool) {
    if admission == Admission::Probe {
        state.breakers.probe_result(agent, succeeded);
    }
    if !succeeded {
        state.breakers.record_invalid(agent);
    }
}

/// Checks an assertion's signature (required with `security.require_signatures`, checked
/// whenever present). A signed assertion is stored with its value and source in canonical form,
/// so what is stored is exactly what was signed. A refused signature never counts against the
/// claimed agent (it proves nothing about who sent it).
fn check_assertion_signature(state: &AppState, draft: &mut AssertionDraft) -> Result<(), ApiError> {
    let required = state.config.security.require_signatures;
    if draft.signature.is_some() {
        canonicalize(draft)?;
    }
    verify("assertion", &draft.agent_id, draft.signature.as_deref(), || assertion_bytes(draft), required)
        .map_err(ApiError::from)
}

/// Replaces a signed draft's value and source by their canonical JSON (docs/signatures.md), so
/// the stored claim is exactly what the signature covers: whatever a relay changes in the raw
/// text without changing the canonical form (whitespace, key order, a duplicate key, digits
/// beyond a number's precision) cannot make the stored value differ from the signed one.
fn canonicalize(draft: &mut AssertionDraft) -> Result<(), ApiError> {
    for (field, raw) in [("value", Some(&mut draft.value)), ("source", draft.source.as_mut())] {
        let Some(raw) = raw else { continue };
        let refuse = || {
            ApiError::new(
                ErrorCode::ValueNotCanonical,
                format!("{field} of a signed assertion has no canonical JSON form (nested too deeply?)"),
            )
        };
        let parsed: Value = serde_json::from_str(raw.get()).map_err(|_| refuse())?;
        *raw = RawValue::from_string(crate::model::signing::canonical_json(&parsed)).map_err(|_| refuse())?;
    }
    Ok(())
}

fn write_timeout(state: &AppState) -> Duration {
    Duration::from_millis(state.config.raft.write_timeout_ms)
}

/// Where a written assertion went: the fields of a single write's answer and of a batch's
/// written item.
#[derive(Serialize, ToSchema)]
pub struct Written {
    pub id: AssertionId,
    pub shard: u16,
    pub log_index: u64,
    /// RFC 3339, UTC, milliseconds.
    pub asserted_at: String,
    /// True when this answers a retry with the same `request_id`: nothing new was written.
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub quarantine: Option<QuarantineDecision>,
}

impl Written {
    fn of(outcome: AssertOutcome) -> Written {
        Written {
            id: outcome.id,
            shard: outcome.shard,
            log_index: outcome.log_index,
            asserted_at: format_time_us(outcome.asserted_at_us),
            duplicate: outcome.duplicate,
            quarantine: outcome.quarantine,
        }
    }
}

/// A written assertion (`201` of `POST /v1/assert`).
#[derive(Serialize, ToSchema)]
pub struct AssertResponse {
    #[serde(flatten)]
    pub written: Written,
    /// `active`, or `quarantined` when the shard leader kept it out of the lenses.
    pub status: Status,
}

impl AssertResponse {
    pub fn of(outcome: AssertOutcome) -> AssertResponse {
        let status = if outcome.quarantine.is_some() { Status::Quarantined } else { Status::Active };
        AssertResponse { written: Written::of(outcome), status }
    }
}

fn unexpected_response() -> ApiError {
    ApiError::new(ErrorCode::UnexpectedResponse, "the state machine answered a different command")
}

/// Splits drafts (with their positions in the request) into runs of at most `limit` estimated
/// bytes, in order; a draft larger than `limit` is a run of its own.
fn chunk_by_bytes(
    positions: Vec<usize>,
    drafts: Vec<AssertionDraft>,
    limit: usize,
) -> Vec<(Vec<usize>, Vec<AssertionDraft>)> {
    let mut chunks: Vec<(Vec<usize>, Vec<AssertionDraft>)> = Vec::new();
    let mut bytes = 0;
    for (position, draft) in positions.into_iter().zip(drafts) {
        let size = draft.estimated_bytes();
        match chunks.last_mut() {
            Some(chunk) if bytes + size <= limit => {
                bytes += size;
                chunk.0.push(position);
                chunk.1.push(draft);
            }
            _ => {
                bytes = size;
                chunks.push((vec![position], vec![draft]));
            }
        }
    }
    chunks
}

/// Proposes validated drafts of one shard and returns one result per draft, in order.
async fn propose_drafts(
    state: &AppState,
    shard: u16,
    drafts: Vec<AssertionDraft>,
) -> Result<Vec<Result<AssertOutcome, ModelError>>, ApiError> {
    let expected = drafts.len();
    let command = ShardCommand::Assert { proposed_at_us: now_us(), items: drafts };
    match state.shards.propose(shard, command, write_timeout(state)).await? {
        ShardResponse::Asserted(results) if results.len() == expected => Ok(results),
        _ => Err(unexpected_response()),
    }
}

errors!(AssertErrors: BODY, PROPOSE, GROWS, SIGNATURE, BREAKER, ASSERT_ITEM, &[
    ErrorCode::CommandTooLarge,
    ErrorCode::IdSpaceExhausted,
]);

/// What one assertion (alone or in a batch) can be refused for, besides the shards' answers.
const ASSERT_ITEM: &[ErrorCode] = &[
    ErrorCode::InvalidConceptPath,
    ErrorCode::InvalidPredicate,
    ErrorCode::ValueTooLarge,
    ErrorCode::ValueTooDeep,
    ErrorCode::InvalidAgentId,
    ErrorCode::InvalidConfidence,
    ErrorCode::TooManySupersedes,
    ErrorCode::InvalidId,
    ErrorCode::SupersedesOtherConcept,
    ErrorCode::SourceTooLarge,
    ErrorCode::InvalidSource,
    ErrorCode::InvalidSignatureFormat,
    ErrorCode::InvalidRequestId,
    ErrorCode::AgentNotAllowed,
    ErrorCode::ValueNotCanonical,
    ErrorCode::AssertionNotFound,
    ErrorCode::Overloaded,
    ErrorCode::ShuttingDown,
];

/// Writes one assertion.
#[utoipa::path(post, path = "/v1/assert", tag = "writes", request_body = AssertRequest,
    responses((status = 201, description = "written (or a retry's first outcome)", body = AssertResponse), AssertErrors))]
pub async fn assert(
    State(state): State<AppState>,
    CallerOf(caller): CallerOf,
    StrictJson(request): StrictJson<AssertRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let claimed_agent = request.agent_id.clone();
    let mut draft = match request.validate(state.config.limits.value_limits(), state.shards.shard_count()) {
        Ok(draft) => draft,
        Err(error) => {
            count_invalid(&state, claimed_agent.as_deref());
            return Err(error.into());
        }
    };
    caller.may_write_as(&draft.agent_id)?;
    check_assertion_signature(&state, &mut draft)?;
    let admission = state.breakers.admit(&draft.agent_id, 1, true)?;
    let agent = draft.agent_id.clone();
    let shard = state.shards.shard_for_path(&draft.concept_path);
    let result = state.write_batchers.assert(shard, draft, write_timeout(&state)).await?;
    state.metrics.observe_write(started.elapsed());
    settle(&state, &agent, admission, result.is_ok());
    match result {
        Ok(outcome) => Ok((StatusCode::CREATED, Json(AssertResponse::of(outcome))).into_response()),
        Err(error) => Err(error.into()),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest<'a> {
    /// 1 to `limits.max_batch_items` assertions, each an `AssertRequest` object. Each is
    /// checked on its own: an invalid item is reported in its result, not refused with the batch.
    /// (Borrowed from the body until each is parsed.)
    #[serde(borrow)]
    #[schema(value_type = Vec<serde_json::Value>, min_items = 1)]
    assertions: Vec<&'a RawValue>,
}

/// The answer to a batch: one result per item, in order.
#[derive(Serialize, ToSchema)]
pub struct BatchResponse {
    pub accepted: usize,
    pub rejected: usize,
    pub results: Vec<BatchItem>,
}

/// One item's result: written (`status` 201) or refused (the error's HTTP status and error).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchItem {
    Written(BatchWritten),
    Refused(BatchRefused),
}

impl BatchItem {
    fn status(&self) -> u16 {
        match self {
            BatchItem::Written(_) => 201,
            BatchItem::Refused(refused) => refused.status,
        }
    }
}

/// A written item of a batch: the fields of a single write's answer, with its position.
#[derive(Serialize, ToSchema)]
pub struct BatchWritten {
    pub index: usize,
    /// Always 201.
    pub status: u16,
    #[serde(flatten)]
    pub written: Written,
}

/// A refused item of a batch.
#[derive(Serialize, ToSchema)]
pub struct BatchRefused {
    pub index: usize,
    /// The HTTP status the error would have alone.
    pub status: u16,
    pub error: ErrorDetail,
}

errors!(BatchErrors: BODY, &[ErrorCode::EmptyBatch, ErrorCode::BatchTooLarge]);

/// Writes up to `limits.max_batch_items` assertions, one result each. Items are independent:
/// an invalid item is reported and the others are written.
#[utoipa::path(post, path = "/v1/assert/batch", tag = "writes", request_body = BatchRequest,
    responses((status = 200, description = "every item's result", body = BatchResponse), BatchErrors))]
pub async fn assert_batch(
    State(state): State<AppState>,
    CallerOf(caller): CallerOf,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let request: BatchRequest = parse_json(&body)?;
    let limit = state.config.limits.max_batch_items;
    if request.assertions.is_empty() {
        return Err(ApiError::new(ErrorCode::EmptyBatch, "assertions must hold at least one item"));
    }
    if request.assertions.len() > limit {
        return Err(ApiError::new(
            ErrorCode::BatchTooLarge,
            format!("batch holds {} items; at most {limit} are allowed", request.assertions.len()),
        )
        .with_details(json!({"items": request.assertions.len(), "limit": limit})));
    }
    let total = request.assertions.len();
    let mut results: Vec<Option<BatchItem>> = (0..total).map(|_| None).collect();
    // Per item: its agent and how its breaker admitted it (settled once the item is written).
    let mut admissions: Vec<Option<(String, Admission)>> = vec![None; total];
    // shard -> (item positions, drafts)
    let mut by_shard: BTreeMap<u16, (Vec<usize>, Vec<AssertionDraft>)> = BTreeMap::new();
    for (position, raw) in request.assertions.into_iter().enumerate() {
        let validated = parse_json::<AssertRequest>(raw.get().as_bytes()).and_then(|item| {
            let claimed_agent = item.agent_id.clone();
            let mut draft = item
                .validate(state.config.limits.value_limits(), state.shards.shard_count())
                .inspect_err(|_| count_invalid(&state, claimed_agent.as_deref()))?;
            caller.may_write_as(&draft.agent_id)?;
            check_assertion_signature(&state, &mut draft)?;
            Ok((state.breakers.admit(&draft.agent_id, 1, true)?, draft))
        });
        match validated {
            Ok((admission, draft)) => {
                admissions[position] = Some((draft.agent_id.clone(), admission));
                let shard = state.shards.shard_for_path(&draft.concept_path);
                let entry = by_shard.entry(shard).or_default();
                entry.0.push(position);
                entry.1.push(draft);
            }
            Err(error) => results[position] = Some(item_error(position, &error)),
        }
    }
    // Shards in parallel; within a shard, entries of at most MAX_ENTRY_BYTES in item order.
    let proposals = by_shard.into_iter().map(|(shard, (positions, drafts))| {
        let state = state.clone();
        async move {
            let mut outcomes = Vec::new();
            for (positions, drafts) in chunk_by_bytes(positions, drafts, MAX_ENTRY_BYTES) {
                outcomes.push((positions, propose_drafts(&state, shard, drafts).await));
            }
            outcomes
        }
    });
    let outcomes = futures::future::join_all(proposals).await.into_iter().flatten();
    for (positions, outcome) in outcomes {
        match outcome {
            Ok(shard_results) => {
                for (position, result) in positions.into_iter().zip(shard_results) {
                    results[position] = Some(match result {
                        Ok(outcome) => BatchItem::Written(BatchWritten {
                            index: position,
                            status: 201,
                            written: Written::of(outcome),
                        }),
                        Err(error) => item_error(position, &ApiError::from(error)),
                    });
                }
            }
            Err(error) => {
                for position in positions {
                    results[position] = Some(item_error(position, &error));
                }
            }
        }
    }
    for (position, admitted) in admissions.into_iter().enumerate() {
        if let Some((agent, admission)) = admitted {
            // Refused input counts against the agent; an unavailable shard does not.
            match results[position].as_ref().map(BatchItem::status) {
                Some(201) => settle(&state, &agent, admission, true),
                Some(status) if (400..500).contains(&status) => settle(&state, &agent, admission, false),
                _ if admission == Admission::Probe => state.breakers.probe_result(&agent, false),
                _ => {}
            }
        }
    }
    // Every position got a result above; one without would be a bug, reported as refused.
    let results: Vec<BatchItem> = results
        .into_iter()
        .enumerate()
        .map(|(position, r)| r.unwrap_or_else(|| item_error(position, &unexpected_response())))
        .collect();
    let accepted = results.iter().filter(|r| r.status() == 201).count();
    state.metrics.observe_write(started.elapsed());
    Ok(Json(BatchResponse { accepted, rejected: total - accepted, results }).into_response())
}

fn item_error(position: usize, error: &ApiError) -> BatchItem {
    BatchItem::Refused(BatchRefused { index: position, status: error.code.http_status(), error: error.detail() })
}

fn parse_assertion_id(text: &str) -> Result<AssertionId, ApiError> {
    AssertionId::parse(text).map_err(|e| ModelError::InvalidId { id: e.0.chars().take(64).collect() }.into())
}

/// A recorded vote.
#[derive(Serialize, ToSchema)]
pub struct VoteResponse {
    pub assertion_id: AssertionId,
    pub log_index: u64,
    /// RFC 3339, UTC, milliseconds.
    pub voted_at: String,
    pub agent_id: String,
    /// 1 or -1.
    pub value: i8,
}

/// A recorded retraction.
#[derive(Serialize, ToSchema)]
pub struct RetractResponse {
    pub assertion_id: AssertionId,
    pub log_index: u64,
    /// RFC 3339, UTC, milliseconds.
    pub retracted_at: String,
}

errors!(VoteErrors: BODY, PROPOSE, GROWS, SIGNATURE, BREAKER, EVENT, &[ErrorCode::InvalidVote]);

/// What a vote or a retraction can be refused for, besides the shards' answers.
const EVENT: &[ErrorCode] =
    &[ErrorCode::InvalidId, ErrorCode::InvalidAgentId, ErrorCode::AgentNotAllowed, ErrorCode::AssertionNotFound];

/// Votes a claim up or down (one vote per agent and claim; a new vote replaces the agent's last).
#[utoipa::path(post, path = "/v1/vote", tag = "writes", request_body = VoteRequest,
    responses((status = 200, description = "recorded", body = VoteResponse), VoteErrors))]
pub async fn vote(
    State(state): State<AppState>,
    CallerOf(caller): CallerOf,
    StrictJson(request): StrictJson<VoteRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let assertion_id = parse_assertion_id(&request.assertion_id)?;
    let value: i8 = match request.value {
        1 => 1,
        -1 => -1,
        other => return Err(ModelError::InvalidVote { value: other }.into()),
    };
    let agent_id = request.agent_id.unwrap_or_else(|| DEFAULT_AGENT_ID.to_string());
    validate_agent_id(&agent_id)?;
    caller.may_write_as(&agent_id)?;
    if assertion_id.shard() >= state.shards.shard_count() {
        count_invalid(&state, Some(&agent_id));
        return Err(ModelError::AssertionNotFound { id: assertion_id.to_string() }.into());
    }
    let required = state.config.security.require_signatures;
    verify(
        "vote",
        &agent_id,
        request.signature.as_deref(),
        || vote_bytes(&assertion_id.to_string(), &agent_id, value),
        required,
    )?;
    let admission = state.breakers.admit(&agent_id, 1, false)?;
    let command = ShardCommand::Vote { proposed_at_us: now_us(), assertion_id, agent_id: agent_id.clone(), value };
    let response = state.shards.propose(assertion_id.shard(), command, write_timeout(&state)).await?;
    state.metrics.observe_write(started.elapsed());
    settle(&state, &agent_id, admission, matches!(response, ShardResponse::Voted(Ok(_))));
    match response {
        ShardResponse::Voted(Ok(outcome)) => Ok(Json(VoteResponse {
            assertion_id: outcome.assertion_id,
            log_index: outcome.log_index,
            voted_at: format_time_us(outcome.at_us),
            agent_id,
            value,
        })
        .into_response()),
        ShardResponse::Voted(Err(error)) => Err(error.into()),
        _ => Err(unexpected_response()),
    }
}

errors!(RetractErrors: BODY, PROPOSE, GROWS, SIGNATURE, BREAKER, EVENT, &[
    ErrorCode::ReasonTooLong,
    ErrorCode::NotAssertionOwner,
    ErrorCode::AlreadyRetracted,
]);

/// Retracts a claim: by the asserting agent, or by anyone holding the admin token.
#[utoipa::path(post, path = "/v1/retract", tag = "writes", request_body = RetractRequest,
    responses((status = 200, description = "retracted", body = RetractResponse), RetractErrors))]
pub async fn retract(
    State(state): State<AppState>,
    headers: HeaderMap,
    connect_info: ConnectInfo<SocketAddr>,
    CallerOf(caller): CallerOf,
    StrictJson(request): StrictJson<RetractRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let assertion_id = parse_assertion_id(&request.assertion_id)?;
    let agent_id = request.agent_id.unwrap_or_else(|| DEFAULT_AGENT_ID.to_string());
    validate_agent_id(&agent_id)?;
    if request.reason.as_ref().is_some_and(|r| r.chars().count() > MAX_REASON_CHARS) {
        return Err(ModelError::ReasonTooLong.into());
    }
    if assertion_id.shard() >= state.shards.shard_count() {
        return Err(ModelError::AssertionNotFound { id: assertion_id.to_string() }.into());
    }
    // Admin rights only count when a token is configured: a loopback client is not an admin
    // retracting other agents' claims unless the operator said so.
    let admin = state.access.admin_secured() && state.is_admin(&headers, peer_of(connect_info));
    if !admin {
        caller.may_write_as(&agent_id)?;
    }
    let admission = if admin {
        // An admin retraction speaks for the operator, not for the agent: no agent signature.
        Admission::Admit
    } else {
        let required = state.config.security.require_signatures;
        let reason = request.reason.as_deref();
        verify(
            "retraction",
            &agent_id,
            request.signature.as_deref(),
            || retract_bytes(&assertion_id.to_string(), &agent_id, reason),
            required,
        )?;
        state.breakers.admit(&agent_id, 1, false)?
    };
    let command = ShardCommand::Retract {
        proposed_at_us: now_us(),
        assertion_id,
        agent_id: agent_id.clone(),
        admin,
        reason: request.reason,
    };
    let response = state.shards.propose(assertion_id.shard(), command, write_timeout(&state)).await?;
    state.metrics.observe_write(started.elapsed());
    settle(&state, &agent_id, admission, matches!(response, ShardResponse::Retracted(Ok(_))));
    match response {
        ShardResponse::Retracted(Ok(outcome)) => Ok(Json(RetractResponse {
            assertion_id: outcome.assertion_id,
            log_index: outcome.log_index,
            retracted_at: format_time_us(outcome.at_us),
        })
        .into_response()),
        ShardResponse::Retracted(Err(error)) => Err(error.into()),
        _ => Err(unexpected_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_by_bytes;
    use crate::model::assertion::AssertionDraft;

    fn draft(value_bytes: usize) -> AssertionDraft {
        AssertionDraft::for_test("a/b", "p", "agent", &format!("\"{}\"", "x".repeat(value_bytes)))
    }

    #[test]
    fn batches_split_into_entries_under_the_byte_limit_in_order() {
        let drafts: Vec<AssertionDraft> = (0..500).map(|_| draft(4096)).collect();
        let limit = 1 << 20;
        let chunks = chunk_by_bytes((0..500).collect(), drafts, limit);
        assert!(chunks.len() >= 2, "500 items of 4 KB need more than one entry");
        let positions: Vec<usize> = chunks.iter().flat_map(|c| c.0.clone()).collect();
        assert_eq!(positions, (0..500).collect::<Vec<_>>(), "every item once, in order");
        for (positions, drafts) in &chunks {
            assert_eq!(positions.len(), drafts.len());
            assert!(drafts.iter().map(AssertionDraft::estimated_bytes).sum::<usize>() <= limit);
        }
        let huge = chunk_by_bytes(vec![0, 1], vec![draft(2 << 20), draft(1)], limit);
        assert_eq!(huge.len(), 2, "an item over the limit travels alone");
    }
}
