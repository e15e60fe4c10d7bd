//! Per-agent circuit breakers at the API (DESIGN §2): admission of each write against the
//! replicated breaker state, this node's per-agent rates that open breakers automatically,
//! half-open probing, and the admin endpoints (trip, reset, list).
//!
//! The breaker *state* is replicated by the meta group, so every node refuses the same agents.
//! The *rates* are measured per node (each node sees the writes sent through it); the node that
//! sees an agent exceed a limit proposes the trip, and the meta group records it for all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::extract::StrictJson;
use super::openapi::{errors, ADMIN, BODY, POLICY, PROPOSE, QUERY};
use super::AppState;
use crate::config::CircuitBreakerSection;
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::meta::policy::{BreakerCause, BreakerRecord, BreakerState, PolicyCommand, PolicyOutcome};
use crate::model::assertion::{validate_agent_id, AgentIdText};
use crate::model::id::{format_time_us, now_us};
use crate::raft::ShardSet;

/// Agents tracked at once; older windows are dropped beyond this.
const MAX_TRACKED_AGENTS: usize = 100_000;

/// What the node does with a write of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Breaker closed, under the limits.
    Admit,
    /// Breaker half-open: this write is a probe; report its outcome with
    /// [`BreakerMonitor::probe_result`].
    Probe,
}

/// One agent's counters for the current second on this node.
#[derive(Debug, Default)]
struct AgentWindow {
    second: u64,
    writes: u32,
    invalid: u32,
    /// The second of the last probe let through while half-open (one per second per node).
    probe_second: u64,
    probe_successes: u32,
    /// A trip or reset proposal of this node is in flight for the agent.
    proposing: bool,
}

/// This node's view of agents' write and invalid-request rates.
pub struct BreakerMonitor {
    settings: CircuitBreakerSection,
    windows: Arc<Mutex<HashMap<String, AgentWindow>>>,
    shards: Arc<ShardSet>,
    timeout: Duration,
}

/// One agent's breaker as the admin API shows it.
#[derive(Serialize, ToSchema)]
pub struct BreakerView {
    agent_id: String,
    state: BreakerState,
    cause: BreakerCause,
    reason: String,
    opened_at: String,
    /// `null`: open until reset.
    #[schema(required = true)]
    open_until: Option<String>,
    /// Consecutive automatic trips: each doubles the open period.
    trips: u32,
    #[schema(required = true)]
    closed_at: Option<String>,
    #[schema(required = true)]
    closed_reason: Option<String>,
}

impl BreakerView {
    pub fn of(record: &BreakerRecord, now: u64) -> BreakerView {
        BreakerView {
            agent_id: record.agent_id.clone(),
            state: record.state_at(now),
            cause: record.cause,
            reason: record.reason.clone(),
            opened_at: format_time_us(record.opened_at_us),
            open_until: record.open_until_us.map(format_time_us),
            trips: record.trips,
            closed_at: record.closed_at_us.map(format_time_us),
            closed_reason: record.closed_reason.clone(),
        }
    }
}

impl BreakerMonitor {
    pub fn new(settings: CircuitBreakerSection, shards: Arc<ShardSet>, timeout: Duration) -> BreakerMonitor {
        BreakerMonitor { settings, windows: Arc::new(Mutex::new(HashMap::new())), shards, timeout }
    }

    fn quarantines(&self) -> bool {
        self.settings.mode == "quarantine"
    }

    /// Admits `writes` writes of `agent`, or refuses them with the breaker named: 429 with
    /// Retry-After while an automatic trip is open, 403 for a manual trip. In quarantine mode
    /// an open breaker admits (the shard leader quarantines the claims) — except for votes and
    /// retractions, which cannot be quarantined (`quarantinable` false).
    pub fn admit(&self, agent: &str, writes: u32, quarantinable: bool) -> Result<Admission, ApiError> {
        let now = now_us();
        let second = now / 1_000_000;
        let breaker = self.shards.policy().open_breaker(agent, now);
        let mut windows = self.windows.lock();
        let mut untracked = AgentWindow { second, ..AgentWindow::default() };
        let window = current_window(&mut windows, agent, second).unwrap_or(&mut untracked);
        match breaker {
            Some((record, BreakerState::Open)) => {
                if self.quarantines() && quarantinable {
                    return Ok(Admission::Admit);
                }
                Err(refusal(&record, now))
            }
            Some((record, BreakerState::HalfOpen)) => {
                if window.probe_second == second {
                    return Err(refusal(&record, now));
                }
                window.probe_second = second;
                Ok(Admission::Probe)
            }
            _ => {
                window.probe_successes = 0;
                window.writes = window.writes.saturating_add(writes);
                if self.settings.enabled && window.writes > self.settings.max_writes_per_sec {
                    let reason = format!(
                        "over circuit_breaker.max_writes_per_sec: {} writes in one second through node {}",
                        window.writes, self.shards.node_id
                    );
                    self.trip_automatically(window, agent, BreakerCause::WriteRate, reason);
                    return Err(ApiError::new(
                        ErrorCode::CircuitBreakerOpen,
                        format!(
                            "circuit breaker of agent {agent:?} is opening: over {} writes per second",
                            self.settings.max_writes_per_sec
                        ),
                    )
                    .with_details(json!({"agent_id": agent, "cause": "write_rate"})));
                }
                Ok(Admission::Admit)
            }
        }
    }

    /// Counts an invalid request of `agent` (refused input); opens its breaker past the limit.
    pub fn record_invalid(&self, agent: &str) {
        if !self.settings.enabled {
            return;
        }
        let now = now_us();
        let second = now / 1_000_000;
        let mut windows = self.windows.lock();
        let Some(window) = current_window(&mut windows, agent, second) else { return };
        window.invalid = window.invalid.saturating_add(1);
        if window.invalid > self.settings.max_invalid_per_sec {
            let reason = format!(
                "over circuit_breaker.max_invalid_per_sec: {} invalid requests in one second through node {}",
                window.invalid, self.shards.node_id
            );
            self.trip_automatically(window, agent, BreakerCause::InvalidRate, reason);
        }
    }

    /// The outcome of a probe write: enough successes close the breaker; a failure keeps it
    /// half-open (the rate limit re-trips misbehaving agents).
    pub fn probe_result(&self, agent: &str, succeeded: bool) {
        let mut windows = self.windows.lock();
        let Some(window) = windows.get_mut(agent) else { return };
        if !succeeded {
            window.probe_successes = 0;
            return;
        }
        window.probe_successes += 1;
        if window.probe_successes >= self.settings.half_open_probes && !window.proposing {
            window.proposing = true;
            window.probe_successes = 0;
            let opened_at_us = self.shards.policy().read(|s| s.breakers.get(agent).map(|b| b.opened_at_us));
            let command = PolicyCommand::ResetBreaker {
                agent_id: agent.to_string(),
                reason: format!("{} probe writes succeeded while half-open", self.settings.half_open_probes),
                opened_at_us,
            };
            self.propose_in_background(agent, command);
        }
    }

    fn trip_automatically(&self, window: &mut AgentWindow, agent: &str, cause: BreakerCause, reason: String) {
        if window.proposing {
            return;
        }
        window.proposing = true;
        // The meta group doubles the period for consecutive trips, up to the maximum.
        tracing::warn!(agent_id = agent, cause = ?cause, reason = %reason, "opening circuit breaker");
        let command = PolicyCommand::TripBreaker {
            agent_id: agent.to_string(),
            cause,
            reason,
            open_for_ms: Some(self.settings.open_seconds.saturating_mul(1000)),
            max_open_ms: Some(self.settings.max_open_seconds.saturating_mul(1000)),
        };
        self.propose_in_background(agent, command);
    }

    /// Proposes a breaker change without holding up the request; clears the agent's
    /// in-flight mark when the meta group has answered.
    fn propose_in_background(&self, agent: &str, command: PolicyCommand) {
        let shards = self.shards.clone();
        let windows = self.windows.clone();
        let timeout = self.timeout;
        let agent = agent.to_string();
        let tasks = shards.tasks.clone();
        tasks.spawn(async move {
            match shards.propose_policy(command, timeout).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::debug!(agent_id = %agent, error = %error, "breaker change refused"),
                Err(error) => tracing::warn!(agent_id = %agent, error = %error, "breaker change not recorded"),
            }
            if let Some(window) = windows.lock().get_mut(&agent) {
                window.proposing = false;
            }
        });
    }
}

/// The agent's counters for `second`, started afresh when the second changed. Beyond
/// [`MAX_TRACKED_AGENTS`], windows idle for two seconds are dropped; if the map is still full of
/// agents active right now, the agent is not tracked (`None`) rather than growing the map.
fn current_window<'a>(
    windows: &'a mut HashMap<String, AgentWindow>,
    agent: &str,
    second: u64,
) -> Option<&'a mut AgentWindow> {
    if windows.len() >= MAX_TRACKED_AGENTS && !windows.contains_key(agent) {
        windows.retain(|_, w| w.second + 2 >= second || w.proposing);
        if windows.len() >= MAX_TRACKED_AGENTS {
            return None;
        }
    }
    let window = windows.entry(agent.to_string()).or_default();
    if window.second != second {
        window.second = second;
        window.writes = 0;
        window.invalid = 0;
    }
    Some(window)
}

fn refusal(record: &BreakerRecord, now: u64) -> ApiError {
    let agent = &record.agent_id;
    match record.cause {
        BreakerCause::Manual => ApiError::new(ErrorCode::CircuitBreakerTripped, format!("circuit breaker of agent {agent:?} was tripped by an operator: {}", record.reason),
        ),
        _ => {
            let retry_after = record.open_until_us.map_or(1, |until| until.saturating_sub(now).div_ceil(1_000_000).max(1));
            ApiError::new(ErrorCode::CircuitBreakerOpen, format!("circuit breaker of agent {agent:?} is open: {}", record.reason),
            )
            .with_retry_after(retry_after)
        }
    }
    .with_details(json!({"agent_id": agent, "cause": record.cause, "state": record.state_at(now), "open_until": record.open_until_us.map(format_time_us)}))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(trip)).routes(routes!(reset))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TripRequest {
    #[schema(value_type = AgentIdText, inline)]
    agent_id: String,
    /// Why (at most 1024 characters).
    #[serde(default)]
    reason: Option<String>,
    /// Open for this long, then half-open; without it the breaker stays open until reset.
    #[serde(default)]
    duration_seconds: Option<u64>,
}

errors!(ChangeErrors: ADMIN, BODY, PROPOSE, POLICY, &[ErrorCode::InvalidAgentId, ErrorCode::ReasonTooLong]);
errors!(ResetErrors: ADMIN, BODY, PROPOSE, POLICY, &[ErrorCode::InvalidAgentId, ErrorCode::ReasonTooLong, ErrorCode::BreakerNotOpen]);

/// Opens an agent's breaker by hand (refusals are `403 circuit_breaker_tripped`).
#[utoipa::path(post, path = "/v1/admin/circuit-breaker/trip", tag = "circuit breakers", request_body = TripRequest,
    responses((status = 200, description = "the breaker now", body = BreakerView), ChangeErrors))]
async fn trip(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    StrictJson(request): StrictJson<TripRequest>,
) -> Result<Response, ApiError> {
    validate_agent_id(&request.agent_id)?;
    let reason = request.reason.unwrap_or_else(|| "tripped by an operator".into());
    if reason.chars().count() > crate::model::assertion::MAX_REASON_CHARS {
        return Err(crate::model::ModelError::ReasonTooLong.into());
    }
    let command = PolicyCommand::TripBreaker {
        agent_id: request.agent_id,
        cause: BreakerCause::Manual,
        reason,
        open_for_ms: request.duration_seconds.map(|s| s.saturating_mul(1000)),
        max_open_ms: None,
    };
    breaker_change(&state, command).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResetRequest {
    #[schema(value_type = AgentIdText, inline)]
    agent_id: String,
    /// Why (at most 1024 characters).
    #[serde(default)]
    reason: Option<String>,
}

/// Closes an agent's breaker.
#[utoipa::path(post, path = "/v1/admin/circuit-breaker/reset", tag = "circuit breakers", request_body = ResetRequest,
    responses((status = 200, description = "the breaker now", body = BreakerView), ResetErrors))]
async fn reset(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    StrictJson(request): StrictJson<ResetRequest>,
) -> Result<Response, ApiError> {
    validate_agent_id(&request.agent_id)?;
    let reason = request.reason.unwrap_or_else(|| "reset by an operator".into());
    if reason.chars().count() > crate::model::assertion::MAX_REASON_CHARS {
        return Err(crate::model::ModelError::ReasonTooLong.into());
    }
    breaker_change(&state, PolicyCommand::ResetBreaker { agent_id: request.agent_id, reason, opened_at_us: None }).await
}

async fn breaker_change(state: &AppState, command: PolicyCommand) -> Result<Response, ApiError> {
    let timeout = Duration::from_millis(state.config.raft.write_timeout_ms);
    match state.shards.propose_policy(command, timeout).await?? {
        PolicyOutcome::Breaker(record) => Ok(Json(BreakerView::of(&record, now_us())).into_response()),
        other => Err(ApiError::new(ErrorCode::UnexpectedResponse, format!("the meta group answered {other:?}"))),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// `open`, `half_open`, `closed` or `all`; default: every breaker that is not closed.
    #[param(pattern = r"^(open|half_open|closed|all)$")]
    state: Option<String>,
    /// Only this agent's breaker.
    #[param(value_type = Option<AgentIdText>, inline)]
    agent_id: Option<String>,
}

/// The breakers and the mode they work in.
#[derive(Serialize, ToSchema)]
struct BreakerList {
    breakers: Vec<BreakerView>,
    /// `circuit_breaker.mode`: `reject` or `quarantine`.
    mode: String,
}

errors!(ListErrors: ADMIN, QUERY, &[ErrorCode::InvalidState, ErrorCode::InvalidAgentId]);

/// The circuit breakers, from the replicated policy.
#[utoipa::path(get, path = "/v1/admin/circuit-breaker", tag = "circuit breakers", operation_id = "list_breakers",
    params(ListParams), responses((status = 200, description = "the breakers", body = BreakerList), ListErrors))]
async fn list(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = super::extract::query_params(params)?;
    let wanted: Option<Vec<BreakerState>> = match params.state.as_deref() {
        None => Some(vec![BreakerState::Open, BreakerState::HalfOpen]),
        Some("all") => None,
        Some("open") => Some(vec![BreakerState::Open]),
        Some("half_open") => Some(vec![BreakerState::HalfOpen]),
        Some("closed") => Some(vec![BreakerState::Closed]),
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "state {:?}: expected open, half_open, closed or all",
                    other.chars().take(32).collect::<String>()
                ),
            ))
        }
    };
    if let Some(agent_id) = &params.agent_id {
        validate_agent_id(agent_id)?;
    }
    let now = now_us();
    let breakers: Vec<BreakerView> = state.shards.policy().read(|s| {
        s.breakers
            .values()
            .filter(|r| params.agent_id.as_ref().is_none_or(|a| *a == r.agent_id))
            .filter(|r| wanted.as_ref().is_none_or(|w| w.contains(&r.state_at(now))))
            .map(|r| BreakerView::of(r, now))
            .collect()
    });
    Ok(Json(BreakerList { breakers, mode: state.config.circuit_breaker.mode.clone() }).into_response())
}
