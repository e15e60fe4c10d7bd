//! Cluster-wide policy, replicated by the meta group next to the cluster metadata: root
//! authorities, authority grants and per-agent circuit breakers (DESIGN §2). Every node applies
//! the same [`PolicyCommand`]s in the same order, so every node resolves the same authority and
//! enforces the same breakers.
//!
//! This module owns the data, the rules for changing it ([`PolicyStore::apply`], deterministic)
//! and the node's shared, cached view of it ([`Policy`]). Each record is persisted under its
//! own key by the meta group's state machine, so a grant costs one small write however many
//! grants exist.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::quarantine::QuarantineRules;
use crate::error::ErrorCode;
use crate::model::authority::{AgentAuthority, Authorities, Grant, RootSpan, MAX_LEVEL};

/// Grant entries written before the depth was carried in them: the default depth.
fn default_chain_depth() -> usize {
    crate::model::authority::DEFAULT_MAX_CHAIN_DEPTH
}

/// An automatic trip this soon after the breaker last closed counts as consecutive.
pub const CONSECUTIVE_TRIP_WINDOW_US: u64 = 10 * 60 * 1_000_000;

/// Authority results cached per node, cleared on every policy change.
const AUTHORITY_CACHE_ENTRIES: usize = 100_000;

/// Why a breaker opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerCause {
    /// `POST /v1/admin/circuit-breaker/trip`: stays open until reset.
    Manual,
    /// The agent wrote faster than `circuit_breaker.max_writes_per_sec`.
    WriteRate,
    /// The agent sent invalid requests faster than `circuit_breaker.max_invalid_per_sec`.
    InvalidRate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    /// The open period is over: a few probe writes are let through; if they succeed within the
    /// write limit the breaker closes, if the agent exceeds it again it opens for longer.
    HalfOpen,
}

/// One agent's circuit breaker as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerRecord {
    pub agent_id: String,
    pub cause: BreakerCause,
    pub reason: String,
    pub opened_at_us: u64,
    /// End of the open period; `None` (manual trips) means open until reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_until_us: Option<u64>,
    /// Consecutive automatic trips: each doubles the open period.
    pub trips: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_reason: Option<String>,
}

impl BreakerRecord {
    /// The state at `now_us` (wall clock of the node asking; every node derives the same state
    /// from the same record, up to clock skew).
    pub fn state_at(&self, now_us: u64) -> BreakerState {
        if self.closed_at_us.is_some() {
            BreakerState::Closed
        } else if self.open_until_us.is_some_and(|until| now_us >= until) {
            BreakerState::HalfOpen
        } else {
            BreakerState::Open
        }
    }
}

/// A change to the policy: the payload of a meta group log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PolicyCommand {
    /// Makes `agent_id` a root authority at `level`, or (`None`) no longer a root.
    SetRoot { agent_id: String, level: Option<u8> },
    /// Delegates authority; refused unless the grantor holds at least `level` for the prefix
    /// through a chain of at most `max_chain_depth` grants (the proposer's
    /// `authority.max_chain_depth`, carried in the entry so every replica checks the same).
    Grant {
        grantor: String,
        grantee: String,
        concept_prefix: String,
        level: u8,
        #[serde(default = "default_chain_depth")]
        max_chain_depth: usize,
    },
    /// Revokes a grant: by its grantor (`by` = the grantor's agent id) or an admin (`by` None).
    Revoke { grant_id: u64, by: Option<String> },
    /// Opens an agent's breaker (again). `open_for_ms` None: until reset. Automatic trips that
    /// follow one another (the breaker still open or half-open, or closed less than
    /// [`CONSECUTIVE_TRIP_WINDOW_US`] ago) double the period, up to `max_open_ms`.
    TripBreaker {
        agent_id: String,
        cause: BreakerCause,
        reason: String,
        open_for_ms: Option<u64>,
        #[serde(default)]
        max_open_ms: Option<u64>,
    },
    /// Closes an agent's breaker. `opened_at_us` (half-open probes): only the breaker opened
    /// then, and only while half-open, so a reset racing a newer trip cannot close that one.
    ResetBreaker {
        agent_id: String,
        reason: String,
        #[serde(default)]
        opened_at_us: Option<u64>,
    },
}

/// Why a policy change was refused. Each has a stable code and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PolicyError {
    #[error("level {level} is outside 0-100")]
    InvalidLevel { level: u32 },
    #[error(
        "grantor {grantor:?} holds {held} for {concept_prefix:?}, below the {level} it tried to grant; a grantor \
         may only delegate up to its own authority on a covering prefix"
    )]
    InsufficientAuthority { grantor: String, concept_prefix: String, level: u8, held: String },
    #[error("an agent cannot grant authority to itself")]
    SelfGrant,
    #[error("grant {id} not found")]
    UnknownGrant { id: u64 },
    #[error("grant {id} is already revoked")]
    AlreadyRevoked { id: u64 },
    #[error("agent {agent_id:?} is not the grantor of grant {id}; only its grantor or an admin may revoke it")]
    NotGrantor { id: u64, agent_id: String },
    #[error("agent {agent_id:?} has no open circuit breaker")]
    BreakerNotOpen { agent_id: String },
    /// A policy command reached a data shard's log: only the meta group applies them (a bug).
    #[error("policy change applied outside the meta group")]
    NotMetaGroup,
}

impl PolicyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            PolicyError::InvalidLevel { .. } => ErrorCode::InvalidLevel,
            PolicyError::InsufficientAuthority { .. } => ErrorCode::InsufficientAuthority,
            PolicyError::SelfGrant => ErrorCode::SelfGrant,
            PolicyError::UnknownGrant { .. } => ErrorCode::GrantNotFound,
            PolicyError::AlreadyRevoked { .. } => ErrorCode::GrantAlreadyRevoked,
            PolicyError::NotGrantor { .. } => ErrorCode::NotGrantor,
            PolicyError::BreakerNotOpen { .. } => ErrorCode::BreakerNotOpen,
            PolicyError::NotMetaGroup => ErrorCode::PolicyOutsideMetaGroup,
        }
    }
}

/// What applying a policy command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PolicyOutcome {
    Root { agent_id: String, level: Option<u8>, changed: bool },
    Grant(Grant),
    Breaker(BreakerRecord),
}

/// A record to persist after a change.
#[derive(Debug, Clone)]
pub enum PolicyRecord {
    Root {
        agent_id: String,
        spans: Vec<RootSpan>,
    },
    Grant(Grant),
    Breaker(BreakerRecord),
    /// The agent's breaker record is deleted.
    BreakerExpired {
        agent_id: String,
    },
}

/// How long a closed (or, automatic, no longer open) breaker is remembered: longer than the
/// window in which trips count as consecutive, so the doubling of open periods still works.
pub const BREAKER_RETENTION_US: u64 = 24 * 3600 * 1_000_000;

/// Bounds the work one policy change does to expire breakers.
pub const MAX_BREAKERS_EXPIRED_PER_CHANGE: usize = 256;

/// Everything the policy holds.
#[derive(Debug, Clone, Default)]
pub struct PolicyStore {
    pub authorities: Authorities,
    pub breakers: BTreeMap<String, BreakerRecord>,
}

impl PolicyStore {
    pub fn restore(&mut self, record: PolicyRecord) {
        match record {
            PolicyRecord::Root { agent_id, spans } => self.authorities.insert_root_spans(agent_id, spans),
            PolicyRecord::Grant(grant) => self.authorities.insert_grant(grant),
            PolicyRecord::Breaker(breaker) => {
                self.breakers.insert(breaker.agent_id.clone(), breaker);
            }
            PolicyRecord::BreakerExpired { agent_id } => {
                self.breakers.remove(&agent_id);
            }
        }
    }

    /// Applies `command` at `at_us` (the meta group's monotonic clock). Deterministic: the
    /// result depends only on the store and the command. On success, also returns the records
    /// to persist, including the breakers that expired ([`BREAKER_RETENTION_US`]).
    pub fn apply(
        &mut self,
        command: PolicyCommand,
        at_us: u64,
    ) -> Result<(PolicyOutcome, Vec<PolicyRecord>), PolicyError> {
        let (outcome, mut records) = self.apply_command(command, at_us)?;
        records.extend(self.expire_breakers(at_us));
        Ok((outcome, records))
    }

    /// Forgets breakers closed (or, automatic ones, past their open period) more than
    /// [`BREAKER_RETENTION_US`] ago, at most [`MAX_BREAKERS_EXPIRED_PER_CHANGE`] per change.
    /// Any agent id can trip a breaker, so without this every id that ever did would stay in
    /// the replicated state forever. Manual trips stay until reset.
    fn expire_breakers(&mut self, at_us: u64) -> Vec<PolicyRecord> {
        let horizon = at_us.saturating_sub(BREAKER_RETENTION_US);
        let expired: Vec<String> = self
            .breakers
            .iter()
            .filter(|(_, record)| record.closed_at_us.or(record.open_until_us).is_some_and(|at| at < horizon))
            .map(|(agent, _)| agent.clone())
            .take(MAX_BREAKERS_EXPIRED_PER_CHANGE)
            .collect();
        for agent in &expired {
            self.breakers.remove(agent);
        }
        expired.into_iter().map(|agent_id| PolicyRecord::BreakerExpired { agent_id }).collect()
    }

    fn apply_command(
        &mut self,
        command: PolicyCommand,
        at_us: u64,
    ) -> Result<(PolicyOutcome, Vec<PolicyRecord>), PolicyError> {
        match command {
            PolicyCommand::SetRoot { agent_id, level } => {
                if let Some(level) = level.filter(|l| *l > MAX_LEVEL) {
                    return Err(PolicyError::InvalidLevel { level: level as u32 });
                }
                let changed = self.authorities.set_root(&agent_id, level, at_us);
                let spans = self.authorities.roots().get(&agent_id).cloned().unwrap_or_default();
                let records =
                    if changed { vec![PolicyRecord::Root { agent_id: agent_id.clone(), spans }] } else { vec![] };
                Ok((PolicyOutcome::Root { agent_id, level, changed }, records))
            }
            PolicyCommand::Grant { grantor, grantee, concept_prefix, level, max_chain_depth } => {
                if level > MAX_LEVEL {
                    return Err(PolicyError::InvalidLevel { level: level as u32 });
                }
                if grantor == grantee {
                    return Err(PolicyError::SelfGrant);
                }
                let held = self.authorities.authority(&grantor, &concept_prefix, u64::MAX, max_chain_depth);
                if held.as_ref().is_none_or(|h| h.level < level) {
                    return Err(PolicyError::InsufficientAuthority {
                        grantor,
                        concept_prefix,
                        level,
                        held: held.map(|h| format!("level {}", h.level)).unwrap_or_else(|| "no authority".into()),
                    });
                }
                let id = self.authorities.grants().keys().next_back().map(|id| id + 1).unwrap_or(1);
                let grant =
                    Grant { id, grantor, grantee, concept_prefix, level, granted_at_us: at_us, revoked_at_us: None };
                self.authorities.insert_grant(grant.clone());
                Ok((PolicyOutcome::Grant(grant.clone()), vec![PolicyRecord::Grant(grant)]))
            }
            PolicyCommand::Revoke { grant_id, by } => {
                let grant = self.authorities.grant(grant_id).ok_or(PolicyError::UnknownGrant { id: grant_id })?;
                if grant.revoked_at_us.is_some() {
                    return Err(PolicyError::AlreadyRevoked { id: grant_id });
                }
                if let Some(agent_id) = by.filter(|agent| *agent != grant.grantor) {
                    return Err(PolicyError::NotGrantor { id: grant_id, agent_id });
                }
                let grant = self
                    .authorities
                    .revoke(grant_id, at_us)
                    .cloned()
                    .ok_or(PolicyError::AlreadyRevoked { id: grant_id })?;
                Ok((PolicyOutcome::Grant(grant.clone()), vec![PolicyRecord::Grant(grant)]))
            }
            PolicyCommand::TripBreaker { agent_id, cause, reason, open_for_ms, max_open_ms } => {
                let previous = self.breakers.get(&agent_id);
                // An automatic trip never replaces an operator's trip, nor an open period still
                // running (nodes measure rates separately and may all report the same burst).
                if let Some(p) = previous.filter(|p| cause != BreakerCause::Manual && p.closed_at_us.is_none()) {
                    if p.cause == BreakerCause::Manual || p.state_at(at_us) == BreakerState::Open {
                        return Ok((PolicyOutcome::Breaker(p.clone()), Vec::new()));
                    }
                }
                let consecutive = previous.is_some_and(|p| {
                    p.closed_at_us.is_none_or(|closed| at_us.saturating_sub(closed) < CONSECUTIVE_TRIP_WINDOW_US)
                });
                let trips = match previous {
                    Some(p) if consecutive && cause != BreakerCause::Manual => p.trips.saturating_add(1),
                    _ => 1,
                };
                let open_ms = open_for_ms.map(|base| {
                    let doubled = base.saturating_mul(1u64 << (trips - 1).min(30));
                    max_open_ms.map_or(doubled, |max| doubled.min(max.max(base)))
                });
                let record = BreakerRecord {
                    agent_id: agent_id.clone(),
                    cause,
                    reason,
                    opened_at_us: at_us,
                    open_until_us: open_ms.map(|ms| at_us.saturating_add(ms.saturating_mul(1000))),
                    trips,
                    closed_at_us: None,
                    closed_reason: None,
                };
                self.breakers.insert(agent_id, record.clone());
                Ok((PolicyOutcome::Breaker(record.clone()), vec![PolicyRecord::Breaker(record)]))
            }
            PolicyCommand::ResetBreaker { agent_id, reason, opened_at_us } => {
                let record = match self.breakers.get_mut(&agent_id) {
                    Some(record) if record.closed_at_us.is_none() => record,
                    _ => return Err(PolicyError::BreakerNotOpen { agent_id }),
                };
                if let Some(opened) = opened_at_us {
                    if record.opened_at_us != opened || record.state_at(at_us) != BreakerState::HalfOpen {
                        return Err(PolicyError::BreakerNotOpen { agent_id });
                    }
                }
                record.closed_at_us = Some(at_us);
                record.closed_reason = Some(reason);
                let record = record.clone();
                Ok((PolicyOutcome::Breaker(record.clone()), vec![PolicyRecord::Breaker(record)]))
            }
        }
    }
}

/// The node's view of the replicated policy: written by the meta group's state machine, read
/// by every request. Authority results for the present are cached until the next change.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<PolicyInner>,
}

struct PolicyInner {
    store: RwLock<PolicyStore>,
    version: AtomicU64,
    max_chain_depth: usize,
    quarantine: QuarantineRules,
    cache: Mutex<AuthorityCache>,
}

/// Cached results for the present: path → agent → authority. Nested so a lookup by `&str`
/// allocates nothing. Every claim a query resolves looks its agent up here, so the maps use
/// foldhash (randomly seeded per map) rather than SipHash, which was a third of the lookup.
#[derive(Default)]
struct AuthorityCache {
    by_path: HashMap<String, HashMap<String, Option<AgentAuthority>, FastHash>, FastHash>,
    entries: usize,
}

type FastHash = foldhash::fast::RandomState;

impl AuthorityCache {
    fn clear(&mut self) {
        self.by_path.clear();
        self.entries = 0;
    }
}

impl Policy {
    pub fn new(max_chain_depth: usize, quarantine: QuarantineRules) -> Policy {
        Policy {
            inner: Arc::new(PolicyInner {
                store: RwLock::new(PolicyStore::default()),
                version: AtomicU64::new(0),
                max_chain_depth,
                quarantine,
                cache: Mutex::new(AuthorityCache::default()),
            }),
        }
    }

    pub fn max_chain_depth(&self) -> usize {
        self.inner.max_chain_depth
    }

    /// The quarantine triggers this node screens with when it leads a shard.
    pub fn quarantine_rules(&self) -> &QuarantineRules {
        &self.inner.quarantine
    }

    /// Changes the store (the meta group's state machine only) and drops cached results.
    pub fn update<T>(&self, change: impl FnOnce(&mut PolicyStore) -> T) -> T {
        let result = change(&mut self.inner.store.write());
        self.inner.version.fetch_add(1, Ordering::AcqRel);
        self.inner.cache.lock().clear();
        result
    }

    /// Read access to the store.
    pub fn read<T>(&self, look: impl FnOnce(&PolicyStore) -> T) -> T {
        look(&self.inner.store.read())
    }

    /// Bumped on every change.
    pub fn version(&self) -> u64 {
        self.inner.version.load(Ordering::Acquire)
    }

    /// The authority of `agent` for `path` at `as_of_us` (`u64::MAX`: now, cached).
    pub fn authority(&self, agent: &str, path: &str, as_of_us: u64) -> Option<AgentAuthority> {
        self.lookup(agent, path, as_of_us, |found| found.cloned())
    }

    /// Only the level of [`Policy::authority`]: what the lenses need, without copying chains.
    pub fn level(&self, agent: &str, path: &str, as_of_us: u64) -> Option<u8> {
        self.lookup(agent, path, as_of_us, |found| found.map(|a| a.level))
    }

    fn lookup<T>(&self, agent: &str, path: &str, as_of_us: u64, take: impl Fn(Option<&AgentAuthority>) -> T) -> T {
        let depth = self.inner.max_chain_depth;
        if as_of_us != u64::MAX {
            return take(self.read(|s| s.authorities.authority(agent, path, as_of_us, depth)).as_ref());
        }
        if let Some(hit) = self.inner.cache.lock().by_path.get(path).and_then(|agents| agents.get(agent)) {
            return take(hit.as_ref());
        }
        // Computed under the read lock, so a change cannot slip in between computing and caching
        // (changes clear the cache under the write lock).
        let store = self.inner.store.read();
        let result = store.authorities.authority(agent, path, u64::MAX, depth);
        let answer = take(result.as_ref());
        let mut cache = self.inner.cache.lock();
        if cache.entries >= AUTHORITY_CACHE_ENTRIES {
            cache.clear();
        }
        cache.entries += 1;
        cache.by_path.entry(path.to_string()).or_default().insert(agent.to_string(), result);
        answer
    }

    /// An estimate of the memory the policy holds (records, indexes and cached results).
    pub fn memory_bytes(&self) -> u64 {
        let store = self.read(|s| {
            let grants: usize = s
                .authorities
                .grants()
                .values()
                .map(|g| 96 + g.grantor.len() * 2 + g.grantee.len() * 2 + g.concept_prefix.len())
                .sum();
            let roots: usize = s.authorities.roots().iter().map(|(a, spans)| 48 + a.len() + spans.len() * 32).sum();
            let breakers: usize = s.breakers.values().map(|b| 160 + b.agent_id.len() * 2 + b.reason.len()).sum();
            grants + roots + breakers
        });
        let cache: usize = self
            .inner
            .cache
            .lock()
            .by_path
            .iter()
            .map(|(path, agents)| {
                48 + path.len()
                    + agents
                        .iter()
                        .map(|(a, v)| 96 + a.len() + v.as_ref().map_or(0, |v| 48 + v.chain.len() * 8))
                        .sum::<usize>()
            })
            .sum();
        (store + cache) as u64
    }

    /// Whether any root exists (no root means no agent has authority anywhere).
    pub fn has_authorities(&self) -> bool {
        self.read(|s| !s.authorities.roots().is_empty())
    }

    /// The agent's breaker, if it is open or half-open at `now_us`.
    pub fn open_breaker(&self, agent: &str, now_us: u64) -> Option<(BreakerRecord, BreakerState)> {
        self.read(|s| {
            let record = s.breakers.get(agent)?;
            match record.state_at(now_us) {
                BreakerState::Closed => None,
                state => Some((record.clone(), state)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(
        store: &mut PolicyStore,
        grantor: &str,
        grantee: &str,
        prefix: &str,
        level: u8,
        at: u64,
    ) -> Result<u64, PolicyError> {
        let command = PolicyCommand::Grant {
            grantor: grantor.into(),
            grantee: grantee.into(),
            concept_prefix: prefix.into(),
            level,
            max_chain_depth: 8,
        };
        match store.apply(command, at)? {
            (PolicyOutcome::Grant(g), _) => Ok(g.id),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn grants_need_the_grantors_authority() {
        let mut store = PolicyStore::default();
        store.apply(PolicyCommand::SetRoot { agent_id: "root".into(), level: Some(80) }, 1).expect("root");
        assert_eq!(grant(&mut store, "root", "a", "infra", 80, 2), Ok(1));
        // Over the grantor's own level, or on a prefix it does not cover, or from nobody: 403.
        for (grantor, prefix, level) in
            [("root", "infra", 81), ("a", "finance", 10), ("a", "", 10), ("nobody", "infra", 1)]
        {
            let error = grant(&mut store, grantor, "b", prefix, level, 3).expect_err("refused");
            assert_eq!(error.code().http_status(), 403, "{error}");
        }
        // A narrower prefix under the grantor's is fine.
        assert_eq!(grant(&mut store, "a", "b", "infra/db", 50, 4), Ok(2));
        assert_eq!(grant(&mut store, "a", "a", "infra", 1, 5), Err(PolicyError::SelfGrant));
        assert!(matches!(
            store.apply(PolicyCommand::SetRoot { agent_id: "r".into(), level: Some(101) }, 6),
            Err(PolicyError::InvalidLevel { .. })
        ));
    }

    #[test]
    fn revocation_rules() {
        let mut store = PolicyStore::default();
        store.apply(PolicyCommand::SetRoot { agent_id: "root".into(), level: Some(80) }, 1).expect("root");
        let id = grant(&mut store, "root", "a", "", 50, 2).expect("grant");
        let by_other = PolicyCommand::Revoke { grant_id: id, by: Some("a".into()) };
        assert!(matches!(store.apply(by_other, 3), Err(PolicyError::NotGrantor { .. })));
        store.apply(PolicyCommand::Revoke { grant_id: id, by: Some("root".into()) }, 4).expect("revoke");
        assert!(matches!(
            store.apply(PolicyCommand::Revoke { grant_id: id, by: None }, 5),
            Err(PolicyError::AlreadyRevoked { .. })
        ));
        assert!(matches!(
            store.apply(PolicyCommand::Revoke { grant_id: 99, by: None }, 5),
            Err(PolicyError::UnknownGrant { .. })
        ));
        // Grant ids keep growing after revocations.
        assert_eq!(grant(&mut store, "root", "b", "", 50, 6), Ok(id + 1));
    }

    #[test]
    fn breakers_open_half_open_and_close() {
        let mut store = PolicyStore::default();
        let trip = |cause| PolicyCommand::TripBreaker {
            agent_id: "bot".into(),
            cause,
            reason: "too fast".into(),
            open_for_ms: Some(1000),
            max_open_ms: Some(3000),
        };
        let reset = |reason: &str| PolicyCommand::ResetBreaker {
            agent_id: "bot".into(),
            reason: reason.into(),
            opened_at_us: None,
        };
        let (outcome, _) = store.apply(trip(BreakerCause::WriteRate), 1_000_000).expect("trip");
        let PolicyOutcome::Breaker(record) = outcome else { panic!("breaker") };
        assert_eq!(record.state_at(1_500_000), BreakerState::Open);
        assert_eq!(record.state_at(2_000_000), BreakerState::HalfOpen);
        // Another node's report of the same burst, while open: no change.
        store.apply(trip(BreakerCause::WriteRate), 1_200_000).expect("same burst");
        assert_eq!((store.breakers["bot"].trips, store.breakers["bot"].opened_at_us), (1, 1_000_000));
        // A probe's reset for another opening, or before half-open, is refused.
        let probe_reset = |opened| PolicyCommand::ResetBreaker {
            agent_id: "bot".into(),
            reason: "probes".into(),
            opened_at_us: Some(opened),
        };
        assert!(store.apply(probe_reset(999), 2_050_000).is_err());
        assert!(store.apply(probe_reset(1_000_000), 1_500_000).is_err());
        // Re-tripped while half-open: the count goes up and the period doubles.
        store.apply(trip(BreakerCause::WriteRate), 2_100_000).expect("trip again");
        assert_eq!((store.breakers["bot"].trips, store.breakers["bot"].open_until_us), (2, Some(4_100_000)));
        store.apply(reset("ok"), 5_000_000).expect("reset");
        assert_eq!(store.breakers["bot"].state_at(5_000_001), BreakerState::Closed);
        assert!(matches!(store.apply(reset("again"), 5_000_002), Err(PolicyError::BreakerNotOpen { .. })));
        // Tripped again soon after closing: still consecutive, capped at the maximum.
        store.apply(trip(BreakerCause::WriteRate), 6_000_000).expect("third trip");
        assert_eq!((store.breakers["bot"].trips, store.breakers["bot"].open_until_us), (3, Some(9_000_000)));
        store.apply(reset("ok"), 10_000_000).expect("reset");
        // Long after closing: starts over.
        let later = 10_000_000 + CONSECUTIVE_TRIP_WINDOW_US;
        store.apply(trip(BreakerCause::WriteRate), later).expect("fresh trip");
        assert_eq!(store.breakers["bot"].trips, 1);
        // A manual trip stays open until reset.
        let manual = PolicyCommand::TripBreaker {
            agent_id: "bot".into(),
            cause: BreakerCause::Manual,
            reason: "operator".into(),
            open_for_ms: None,
            max_open_ms: None,
        };
        store.apply(manual, later + 1).expect("manual");
        assert_eq!(store.breakers["bot"].trips, 1);
        assert_eq!(store.breakers["bot"].state_at(u64::MAX - 1), BreakerState::Open);
        // Automatic trips and probe resets leave an operator's trip alone.
        store.apply(trip(BreakerCause::InvalidRate), later + 2).expect("ignored");
        assert_eq!(store.breakers["bot"].cause, BreakerCause::Manual);
        assert!(store.apply(probe_reset(later + 1), later + 3).is_err());
        store.apply(reset("operator"), later + 4).expect("an operator's reset closes it");
    }

    #[test]
    fn breakers_closed_long_ago_are_forgotten_by_a_later_change() {
        let hour = 3600 * 1_000_000u64;
        let mut store = PolicyStore::default();
        let trip = |agent: &str| PolicyCommand::TripBreaker {
            agent_id: agent.into(),
            cause: BreakerCause::WriteRate,
            reason: "fast".into(),
            open_for_ms: Some(1000),
            max_open_ms: None,
        };
        let manual = PolicyCommand::TripBreaker {
            agent_id: "held".into(),
            cause: BreakerCause::Manual,
            reason: "operator".into(),
            open_for_ms: None,
            max_open_ms: None,
        };
        store.apply(trip("noisy-1"), hour).expect("trip");
        store.apply(manual, hour).expect("trip");
        let reset = PolicyCommand::ResetBreaker { agent_id: "noisy-1".into(), reason: "ok".into(), opened_at_us: None };
        store.apply(reset, 2 * hour).expect("reset");
        store.apply(trip("noisy-2"), 3 * hour).expect("trip");
        assert_eq!(store.breakers.len(), 3);
        // A day later, any change forgets the closed breaker and the long-expired automatic
        // one, and keeps the operator's trip.
        let (_, records) = store.apply(trip("noisy-3"), 4 * hour + BREAKER_RETENTION_US).expect("trip");
        let forgotten: Vec<&str> = records
            .iter()
            .filter_map(|r| match r {
                PolicyRecord::BreakerExpired { agent_id } => Some(agent_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(forgotten, vec!["noisy-1", "noisy-2"]);
        assert_eq!(store.breakers.keys().collect::<Vec<_>>(), vec!["held", "noisy-3"]);
    }
}
