//! Reads of one shard's applied state: assertions with the facts recorded about them, the
//! claims under a concept_path, and the concept listing. Readers go straight to storage; the
//! state machine writes each apply in one batch, so a reader always sees whole entries.

use std::sync::Arc;

use super::claims_cache::{RenderKey, RenderedResults, RenderedSlot};
use super::command::GroupId;
use super::keys;
use super::progress::{AppliedProgress, RetractionRecord};
use super::ConsensusError;
use crate::model::assertion::StoredAssertion;
use crate::model::id::AssertionId;
use crate::model::lens::{ClaimFacts, SupersessionFact, VoteFact};
use crate::storage::{ColumnFamily, Storage, StorageError};

#[derive(Clone)]
pub struct ShardReader {
    storage: Arc<Storage>,
    pub shard: u16,
    group: GroupId,
    progress: Arc<AppliedProgress>,
}

/// The claims about one concept_path (one predicate, or all of them), as the claims cache
/// shares them between queries. On the wire (forwarded reads, `codec::read`) it is just the
/// groups.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ClaimsRead {
    pub groups: Vec<ClaimGroup>,
    /// Query answers already rendered from these claims (kept on this node only).
    #[serde(skip)]
    pub rendered: RenderedResults,
    /// The estimate of the memory the groups hold, computed once.
    #[serde(skip)]
    memory: std::sync::OnceLock<usize>,
}

impl ClaimsRead {
    pub fn new(groups: Vec<ClaimGroup>) -> ClaimsRead {
        ClaimsRead { groups, ..ClaimsRead::default() }
    }

    /// Claims whose [`Self::memory_bytes`] the reader already added up while reading them.
    pub(crate) fn measured(groups: Vec<ClaimGroup>, memory_bytes: usize) -> ClaimsRead {
        ClaimsRead { groups, memory: memory_bytes.into(), ..ClaimsRead::default() }
    }

    /// The estimated heap memory of the claims (`claims_cache::claims_bytes`): what the claims
    /// cache charges for them and what a query holding them counts against
    /// `query.max_memory_per_query_mb`.
    pub fn memory_bytes(&self) -> usize {
        *self.memory.get_or_init(|| super::claims_cache::claims_bytes(&self.groups))
    }
}

/// The claims about one (concept_path, predicate), in id order (the index's). Each claim is
/// shared: the claims cache adds a new claim to a cached read without copying the others.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClaimGroup {
    pub concept_path: String,
    pub predicate: String,
    pub claims: Vec<Arc<ClaimFacts>>,
}

/// What [`ShardReader::digest`] reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaDigest {
    pub applied_index: u64,
    pub digest: String,
    pub keys: u64,
}

/// One (concept_path, predicate) in the concept listing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ConceptEntry {
    pub concept_path: String,
    pub predicate: String,
    pub assertions: u64,
}

/// A claims read's memory limit in bytes (`None`: no limit).
fn limit_bytes(memory_limit: Option<u64>) -> usize {
    memory_limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX))
}

fn corrupt(message: &str) -> StorageError {
    StorageError::corrupt(ColumnFamily::StateMachine, message)
}

/// Adds one event row of a claim (`rest`: its key after the claim's events prefix) to its
/// facts; a supersession is returned instead, as (by, at), for its superseder's retraction to be
/// looked up.
fn record_event(facts: &mut ClaimFacts, rest: &[u8], value: &[u8]) -> Result<Option<(AssertionId, u64)>, StorageError> {
    match rest.first() {
        Some(b'R') => {
            let retraction = super::codec::decode_event(value).map_err(|e| corrupt(&format!("retraction: {e}")))?;
            facts.retracted_at_us = Some(retraction.at_us);
        }
        Some(b'L') => {
            let release = super::codec::decode_event(value).map_err(|e| corrupt(&format!("release: {e}")))?;
            facts.released_at_us = Some(release.at_us);
        }
        Some(b'S') => {
            let by = AssertionId::from_bytes(&rest[1..]).ok_or_else(|| corrupt("supersession key"))?;
            let at_us = value.try_into().map(u64::from_be_bytes).map_err(|_| corrupt("supersession time"))?;
            return Ok(Some((by, at_us)));
        }
        Some(b'V') => {
            let body = &rest[1..];
            if body.len() < 9 {
                return Err(corrupt("vote key"));
            }
            let (agent, at) = body.split_at(body.len() - 9);
            let agent_id = std::str::from_utf8(agent).map_err(|_| corrupt("vote agent"))?.to_string();
            let at_us = u64::from_be_bytes(at[1..].try_into().map_err(|_| corrupt("vote time"))?);
            let value = *value.first().ok_or_else(|| corrupt("vote value"))? as i8;
            facts.votes.push(VoteFact { agent_id, value, at_us });
        }
        _ => return Err(corrupt("unknown event")),
    }
    Ok(None)
}

/// Whether `path` is `prefix` or below it, segment-wise (`a/b` is under `a`, `ab` is not).
pub fn path_under_prefix(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

impl ShardReader {
    pub fn new(storage: Arc<Storage>, shard: u16, group: GroupId, progress: Arc<AppliedProgress>) -> ShardReader {
        ShardReader { storage, shard, group, progress }
    }

    /// A digest of this replica's data (state machine and index families, the applied-state
    /// record left out), with the applied index it was taken at: replicas of a shard at the
    /// same applied index must have the same digest. Retries (up to 5 times) while applies
    /// interleave; `None` when the shard kept changing (ask again when it is quieter).
    pub fn digest(&self) -> Result<Option<ReplicaDigest>, StorageError> {
        for _ in 0..5 {
            let before = self.applied_index();
            let applied_key = keys::applied_key(self.group);
            let mut hash = crate::model::id::fnv1a64(&[]);
            let mut keys_total = 0u64;
            for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
                self.storage.for_each_in_range(
                    cf,
                    &keys::group_prefix(self.group),
                    &keys::group_end(self.group),
                    |key, value| {
                        if key != applied_key.as_slice() {
                            keys_total += 1;
                            // Order-dependent combination: both replicas iterate in key order.
                            for part in [
                                &(key.len() as u32).to_be_bytes()[..],
                                key,
                                &(value.len() as u32).to_be_bytes()[..],
                                value,
                            ] {
                                hash = (hash ^ crate::model::id::fnv1a64(part)).wrapping_mul(0x100_0000_01b3);
                            }
                        }
                        true
                    },
                )?;
            }
            if self.applied_index() == before {
                return Ok(Some(ReplicaDigest {
                    applied_index: before,
                    digest: format!("{hash:016x}"),
                    keys: keys_total,
                }));
            }
        }
        Ok(None)
    }

    /// Drops this shard's cached claims (after its indexes were repaired).
    pub fn clear_cache(&self) {
        self.progress.claims_cache.clear();
    }

    pub fn group_id(&self) -> GroupId {
        self.group
    }

    /// Claims of this replica waiting in quarantine for a decision.
    pub fn quarantine_pending(&self) -> u64 {
        self.progress.quarantine_pending.load(std::sync::atomic::Ordering::Acquire)
    }

    /// What the state machine shares with this replica's readers.
    pub fn progress(&self) -> &Arc<AppliedProgress> {
        &self.progress
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    pub fn applied_index(&self) -> u64 {
        self.progress.applied_index.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn applied_at_us(&self) -> u64 {
        self.progress.applied_at_us.load(std::sync::atomic::Ordering::Acquire)
    }

    fn decode_assertion(bytes: &[u8]) -> Result<StoredAssertion, StorageError> {
        super::codec::decode_assertion(bytes).map_err(|e| corrupt(&format!("assertion record: {e}")))
    }

    /// An assertion and everything recorded about it, or `None` if this shard has no such id.
    pub fn facts(&self, id: AssertionId) -> Result<Option<ClaimFacts>, StorageError> {
        let Some(bytes) = self.storage.get(ColumnFamily::StateMachine, &keys::assertion_key(self.group, id))? else {
            return Ok(None);
        };
        let record = Self::decode_assertion(&bytes)?;
        Ok(self.facts_of_records(vec![record])?.pop())
    }

    /// The records with everything recorded about each: their events through one iterator,
    /// then the retractions of the assertions that superseded them in one multi-get.
    fn facts_of_records(&self, records: Vec<StoredAssertion>) -> Result<Vec<ClaimFacts>, StorageError> {
        let mut all: Vec<ClaimFacts> = records.into_iter().map(ClaimFacts::new).collect();
        let prefixes: Vec<Vec<u8>> = all.iter().map(|f| keys::events_prefix(self.group, f.record.id)).collect();
        // (claim, superseded by, at): completed once the superseders' retractions are known.
        let mut superseded: Vec<(usize, AssertionId, u64)> = Vec::new();
        let mut failure = None;
        self.storage.for_each_with_prefixes(ColumnFamily::StateMachine, &prefixes, |i, key, value| {
            let rest = key.get(prefixes[i].len()..).unwrap_or_default();
            match record_event(&mut all[i], rest, value) {
                Ok(Some((by, at_us))) => superseded.push((i, by, at_us)),
                Ok(None) => {}
                Err(error) => {
                    failure = Some(error);
                    return false;
                }
            }
            true
        })?;
        if let Some(error) = failure {
            return Err(error);
        }
        if !superseded.is_empty() {
            let keys: Vec<Vec<u8>> =
                superseded.iter().map(|(_, by, _)| keys::retraction_key(self.group, *by)).collect();
            let found = self.storage.multi_get(ColumnFamily::StateMachine, &keys)?;
            for ((i, by, at_us), retraction) in superseded.into_iter().zip(found) {
                let by_retracted_at_us = match retraction {
                    Some(bytes) => Some(
                        super::codec::decode_event(&bytes).map_err(|e| corrupt(&format!("retraction: {e}")))?.at_us,
                    ),
                    None => None,
                };
                all[i].supersessions.push(SupersessionFact { by, at_us, by_retracted_at_us });
            }
        }
        Ok(all)
    }

    /// The retraction of an assertion, if any.
    pub fn retraction(&self, id: AssertionId) -> Result<Option<RetractionRecord>, StorageError> {
        match self.storage.get(ColumnFamily::StateMachine, &keys::retraction_key(self.group, id))? {
            Some(bytes) => {
                super::codec::decode_event(&bytes).map(Some).map_err(|e| corrupt(&format!("retraction: {e}")))
            }
            None => Ok(None),
        }
    }

    /// This shard's claims cache.
    pub fn claims_cache(&self) -> &super::claims_cache::ClaimsCache {
        &self.progress.claims_cache
    }

    /// Every claim about `concept_path` (and `predicate`, if given), grouped by predicate in
    /// predicate order; `Ok(None)` when they would hold more than `memory_limit` bytes
    /// (estimated; `None` for no limit): reading stops there, so a concept with millions of
    /// claims cannot take the node's memory with it.
    pub fn claims(
        &self,
        concept_path: &str,
        predicate: Option<&str>,
        memory_limit: Option<u64>,
    ) -> Result<Option<Arc<ClaimsRead>>, StorageError> {
        let limit = limit_bytes(memory_limit);
        let cache = &self.progress.claims_cache;
        if let Some(hit) = cache.get(concept_path, predicate) {
            return Ok((hit.memory_bytes() <= limit).then_some(hit));
        }
        let generation = cache.generation();
        let Some((groups, bytes)) = self.claims_from_storage(concept_path, predicate, limit)? else { return Ok(None) };
        let groups = Arc::new(ClaimsRead::measured(groups, bytes));
        cache.insert_if_current(generation, concept_path, predicate, &groups);
        Ok(Some(groups))
    }

    /// The claims as [`Self::claims`] reads them with their estimated memory
    /// (`claims_cache::claims_bytes`), or `None` once that passes `limit` bytes: the index rows
    /// are charged as they are scanned, then each claim's facts as they are loaded, a chunk at
    /// a time.
    fn claims_from_storage(
        &self,
        concept_path: &str,
        predicate: Option<&str>,
        limit: usize,
    ) -> Result<Option<(Vec<ClaimGroup>, usize)>, StorageError> {
        use super::claims_cache::{claim_bytes, group_bytes};
        /// Claims whose facts are loaded with one multi-get.
        const FACTS_CHUNK: usize = 1024;
        let prefix = keys::claims_prefix(self.group, concept_path, predicate);
        let path_prefix_len = keys::claims_prefix(self.group, concept_path, None).len();
        let mut groups: Vec<ClaimGroup> = Vec::new();
        let mut ids_by_group: Vec<Vec<AssertionId>> = Vec::new();
        // Each claim is charged its facts' fixed size at the scan; its strings when loaded.
        let fixed = std::mem::size_of::<ClaimFacts>();
        let mut charged = 0usize;
        let mut bad_key = None;
        self.storage.for_each_in_range(ColumnFamily::Index, &prefix, &keys::prefix_end(&prefix), |key, _| {
            let Some(body) = key.get(path_prefix_len..).filter(|body| body.len() >= 17) else {
                bad_key = Some("claim key");
                return false;
            };
            let (predicate_bytes, id_bytes) = body.split_at(body.len() - 17);
            let Ok(predicate) = std::str::from_utf8(predicate_bytes) else {
                bad_key = Some("claim predicate");
                return false;
            };
            let Some(id) = AssertionId::from_bytes(&id_bytes[1..]) else {
                bad_key = Some("claim id");
                return false;
            };
            if groups.last().map(|g| g.predicate.as_str()) != Some(predicate) {
                charged += group_bytes(concept_path, predicate);
                groups.push(ClaimGroup {
                    concept_path: concept_path.to_string(),
                    predicate: predicate.to_string(),
                    claims: Vec::new(),
                });
                ids_by_group.push(Vec::new());
            }
            if let Some(ids) = ids_by_group.last_mut() {
                ids.push(id);
            }
            charged += fixed;
            charged <= limit
        })?;
        if let Some(what) = bad_key {
            return Err(StorageError::corrupt(ColumnFamily::Index, what));
        }
        if charged > limit {
            return Ok(None);
        }
        for (group, ids) in groups.iter_mut().zip(ids_by_group) {
            group.claims.reserve_exact(ids.len());
            for chunk in ids.chunks(FACTS_CHUNK) {
                for facts in self.facts_of_ids(chunk)? {
                    charged += claim_bytes(&facts) - fixed;
                    group.claims.push(Arc::new(facts));
                }
                if charged > limit {
                    return Ok(None);
                }
            }
        }
        // What the claims cache and the queries charge for these claims, added up as read.
        debug_assert_eq!(charged, super::claims_cache::claims_bytes(&groups));
        Ok(Some((groups, charged)))
    }

    /// The claims as storage holds them, past the claims cache (tests compare the two).
    #[cfg(test)]
    pub(crate) fn claims_uncached(&self, concept_path: &str, predicate: Option<&str>) -> Vec<ClaimGroup> {
        let read = self.claims_from_storage(concept_path, predicate, usize::MAX).expect("read claims");
        read.map(|(groups, _)| groups).unwrap_or_default()
    }

    /// The newest `limit` claims about (concept_path, predicate), newest first, with their facts.
    pub fn recent_claims(
        &self,
        concept_path: &str,
        predicate: &str,
        limit: usize,
    ) -> Result<Vec<ClaimFacts>, StorageError> {
        let prefix = keys::claims_prefix(self.group, concept_path, Some(predicate));
        let rows = self.storage.scan_reverse(ColumnFamily::Index, &prefix, &keys::prefix_end(&prefix), limit)?;
        let ids = rows
            .iter()
            .map(|(key, _)| {
                key.get(prefix.len()..)
                    .and_then(AssertionId::from_bytes)
                    .ok_or_else(|| StorageError::corrupt(ColumnFamily::Index, "claim key"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.facts_of_ids(&ids)
    }

    /// The facts of the assertions `ids` that exist, in that order: their records in one
    /// multi-get, then each one's events.
    fn facts_of_ids(&self, ids: &[AssertionId]) -> Result<Vec<ClaimFacts>, StorageError> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| keys::assertion_key(self.group, *id)).collect();
        let records = self.storage.multi_get(ColumnFamily::StateMachine, &keys)?;
        let records = records.into_iter().flatten().map(|bytes| Self::decode_assertion(&bytes));
        self.facts_of_records(records.collect::<Result<_, _>>()?)
    }

    /// (concept_path, predicate) pairs under `prefix`, in key order, strictly after `after`,
    /// at most `limit`.
    pub fn concepts(
        &self,
        prefix: &str,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<ConceptEntry>, StorageError> {
        let tag = keys::concept_tag_prefix(self.group);
        let mut start = tag.clone();
        start.extend_from_slice(prefix.as_bytes());
        if let Some((path, predicate)) = after {
            let mut after_key = keys::concept_key(self.group, path, predicate);
            after_key.push(0); // strictly after
            if after_key > start {
                start = after_key;
            }
        }
        let mut end = tag.clone();
        end.extend_from_slice(prefix.as_bytes());
        let end = if prefix.is_empty() { keys::prefix_end(&tag) } else { keys::prefix_end(&end) };
        let mut out = Vec::new();
        let mut failure = None;
        self.storage.for_each_in_range(ColumnFamily::Index, &start, &end, |key, value| {
            let Some((path, predicate)) = keys::parse_concept_key(key) else {
                failure = Some(StorageError::corrupt(ColumnFamily::Index, "concept key"));
                return false;
            };
            if !path_under_prefix(path, prefix) {
                return true;
            }
            let assertions = value.try_into().map(u64::from_be_bytes).unwrap_or(0);
            out.push(ConceptEntry { concept_path: path.to_string(), predicate: predicate.to_string(), assertions });
            out.len() < limit
        })?;
        match failure {
            Some(error) => Err(error),
            None => Ok(out),
        }
    }
}

/// Which assertions a listing walks: an index, with filters, in id (time) order.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Listing {
    /// Quarantined claims no admin has decided on yet (the `q` index).
    Quarantined { agent_id: Option<String>, concept_prefix: Option<String> },
    /// Every assertion of one agent (the `a` index), optionally within a time range.
    ByAgent { agent_id: String, since_us: u64, until_us: u64 },
    /// Every assertion within a time range (the records themselves, keyed by time-sorted ids).
    ByTime { since_us: u64, until_us: u64 },
}

impl ShardReader {
    /// Up to `limit` assertions of `listing` with ids after `after`, with their facts.
    pub fn list(
        &self,
        listing: &Listing,
        after: Option<AssertionId>,
        limit: usize,
    ) -> Result<Vec<ClaimFacts>, StorageError> {
        let (family, prefix, floor) = match listing {
            Listing::Quarantined { .. } => (ColumnFamily::Index, keys::quarantine_prefix(self.group), None),
            Listing::ByAgent { agent_id, since_us, .. } => {
                (ColumnFamily::Index, keys::agent_prefix(self.group, agent_id), Some(*since_us))
            }
            Listing::ByTime { since_us, .. } => {
                (ColumnFamily::StateMachine, keys::assertions_prefix(self.group), Some(*since_us))
            }
        };
        let until_us = match listing {
            Listing::ByAgent { until_us, .. } | Listing::ByTime { until_us, .. } => *until_us,
            Listing::Quarantined { .. } => u64::MAX,
        };
        // Ids start with their time: the first id at or after `since` bounds the scan.
        let mut start = prefix.clone();
        let from_time = floor.map(|t| AssertionId::new(t, 0, 0, 0));
        match (after, from_time) {
            (Some(a), Some(f)) if f > a => start.extend_from_slice(&f.to_bytes()),
            (Some(a), _) => {
                start.extend_from_slice(&a.to_bytes());
                start.push(0);
            }
            (None, Some(f)) => start.extend_from_slice(&f.to_bytes()),
            (None, None) => {}
        }
        let end = keys::prefix_end(&prefix);
        let mut out = Vec::new();
        let mut failure = None;
        self.storage.for_each_in_range(family, &start, &end, |key, _| {
            let Some(id) = key.get(prefix.len()..).and_then(AssertionId::from_bytes) else {
                failure = Some(StorageError::corrupt(family, "listing key"));
                return false;
            };
            if id.asserted_at_us() >= until_us {
                return false;
            }
            let facts = match self.facts(id) {
                Ok(Some(facts)) => facts,
                Ok(None) => return true,
                Err(error) => {
                    failure = Some(error);
                    return false;
                }
            };
            if let Listing::Quarantined { agent_id, concept_prefix } = listing {
                if agent_id.as_ref().is_some_and(|a| *a != facts.record.draft.agent_id)
                    || concept_prefix.as_ref().is_some_and(|p| !path_under_prefix(&facts.record.draft.concept_path, p))
                {
                    return true;
                }
            }
            out.push(facts);
            out.len() < limit
        })?;
        if let Some(error) = failure {
            return Err(error);
        }
        Ok(out)
    }
}

/// A read of one shard's state, executed where a replica of the shard lives.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ShardRead {
    Claims {
        concept_path: String,
        predicate: Option<String>,
        /// Most memory (estimated bytes) the claims may hold, set by the node the client asked
        /// (`query.max_memory_per_query_mb`); past it the read fails with
        /// `query_memory_exceeded`. Absent from older nodes' requests: no limit.
        #[serde(default)]
        memory_limit: Option<u64>,
        /// Set by the node the client asked, for its own replicas only (never on the wire):
        /// the query could use a rendering kept by the claims cache, and a replica holding one
        /// answers [`ShardReadAnswer::Rendered`] instead of the claims.
        #[serde(skip)]
        render: Option<RenderKey>,
    },
    Assertion {
        id: AssertionId,
    },
    Concepts {
        prefix: String,
        after: Option<(String, String)>,
        limit: usize,
    },
    List {
        listing: Listing,
        after: Option<AssertionId>,
        limit: usize,
    },
}

/// What a [`ShardRead`] found, and how fresh the replica that answered was.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ShardReadResult {
    pub answer: ShardReadAnswer,
    pub applied_index: u64,
    pub staleness_ms: u64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum ShardReadAnswer {
    /// Shared with the claims cache: a hit costs a reference count, not a copy.
    Claims(Arc<ClaimsRead>),
    Assertion(Option<(ClaimFacts, Option<RetractionRecord>)>),
    Concepts(Vec<ConceptEntry>),
    Listed(Vec<ClaimFacts>),
    /// A rendering the claims cache kept, for a claims read that named a [`RenderKey`].
    /// Serialized for tests and logs only: no node decodes it from JSON.
    #[serde(skip_deserializing)]
    Rendered(RenderedSlot),
}

impl ShardReader {
    /// Executes a read against this replica.
    /// Runs `read` against this replica. A read that overlaps a snapshot install (which leaves
    /// the ranges half old, half new until it ends) answers `CatchingUp` instead.
    pub fn execute(&self, read: &ShardRead) -> Result<ShardReadAnswer, ConsensusError> {
        let installs = self.progress.installs.load(std::sync::atomic::Ordering::Acquire);
        let catching_up = ConsensusError::CatchingUp { shard: self.shard };
        if installs % 2 == 1 {
            return Err(catching_up);
        }
        let storage_error = |e: StorageError| ConsensusError::Storage { shard: self.shard, message: e.to_string() };
        let answer = self.execute_on_storage(read);
        if self.progress.installs.load(std::sync::atomic::Ordering::Acquire) != installs {
            return Err(catching_up);
        }
        answer.map_err(storage_error)?.ok_or_else(|| {
            let limit_bytes = match read {
                ShardRead::Claims { memory_limit, .. } => memory_limit.unwrap_or(u64::MAX),
                _ => u64::MAX,
            };
            ConsensusError::QueryMemoryExceeded { shard: Some(self.shard), limit_bytes }
        })
    }

    /// [`Self::execute`]; `Ok(None)` when a claims read passed its memory limit.
    fn execute_on_storage(&self, read: &ShardRead) -> Result<Option<ShardReadAnswer>, StorageError> {
        Ok(Some(match read {
            ShardRead::Claims { concept_path, predicate, memory_limit, render } => {
                if let Some(key) = render {
                    let limit = limit_bytes(*memory_limit);
                    let cache = &self.progress.claims_cache;
                    if let Some(slot) = cache.rendered(concept_path, predicate.as_deref(), key, limit) {
                        return Ok(Some(ShardReadAnswer::Rendered(slot)));
                    }
                }
                match self.claims(concept_path, predicate.as_deref(), *memory_limit)? {
                    Some(read) => ShardReadAnswer::Claims(read),
                    None => return Ok(None),
                }
            }
            ShardRead::Assertion { id } => match self.facts(*id)? {
                Some(facts) => ShardReadAnswer::Assertion(Some((facts, self.retraction(*id)?))),
                None => ShardReadAnswer::Assertion(None),
            },
            ShardRead::Concepts { prefix, after, limit } => ShardReadAnswer::Concepts(self.concepts(
                prefix,
                after.as_ref().map(|(p, q)| (p.as_str(), q.as_str())),
                *limit,
            )?),
            ShardRead::List { listing, after, limit } => ShardReadAnswer::Listed(self.list(listing, *after, *limit)?),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::ShardRead;

    #[test]
    fn a_claims_read_from_a_node_that_sends_no_memory_limit_has_none() {
        let old = r#"{"Claims":{"concept_path":"a/b","predicate":null}}"#;
        let read: ShardRead = serde_json::from_str(old).expect("an older node's request still parses");
        assert!(matches!(read, ShardRead::Claims { memory_limit: None, .. }), "{read:?}");
        let new = ShardRead::Claims {
            concept_path: "a/b".into(),
            predicate: None,
            memory_limit: Some(1 << 20),
            render: None,
        };
        let round_trip: ShardRead = serde_json::from_slice(&serde_json::to_vec(&new).expect("encode")).expect("decode");
        assert!(matches!(round_trip, ShardRead::Claims { memory_limit: Some(1048576), .. }), "{round_trip:?}");
    }
}

impl crate::meta::quarantine::RecentClaims for ShardReader {
    fn recent_claims(
        &self,
        concept_path: &str,
        predicate: &str,
        limit: usize,
    ) -> Result<Vec<ClaimFacts>, StorageError> {
        ShardReader::recent_claims(self, concept_path, predicate, limit)
    }
}
