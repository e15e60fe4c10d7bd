//! The state machine of one shard: applies assertions, votes and retractions, keeps the
//! secondary indexes, and builds and installs snapshots. Each `apply` call writes its entries'
//! data, index entries and `last_applied` in one write batch, so a crash never leaves the
//! indexes and the data apart.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::keys;
use super::metrics as raft_metrics;
use super::types::{
    group_of_shard, AssertOutcome, Entry, EventOutcome, GroupId, LogId, NodeId, ShardCommand, ShardResponse,
    StorageIoError, TypeConfig,
};
use crate::cluster::meta::{MetaCommand, MetaError, MetaState, META_SHARD};
use crate::cluster::policy::{Policy, PolicyCommand, PolicyError, PolicyOutcome, PolicyRecord, PolicyStore};
use crate::model::assertion::{AssertionDraft, StoredAssertion};
use crate::model::id::AssertionId;
use crate::model::ModelError;
use crate::storage::{ColumnFamily, Durability, Storage, WriteBatch};

/// What the state machine persists about itself, in the same batch as the data it describes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// The last `asserted_at` handed out: keeps time monotonic per shard across leaders.
    clock_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetractionRecord {
    pub at_us: u64,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Progress shared between the state machine task and the readers of a shard.
#[derive(Debug, Default)]
pub struct AppliedProgress {
    pub applied_index: AtomicU64,
    /// Wall-clock time (µs) of the last apply, for staleness reports.
    pub applied_at_us: AtomicU64,
    /// Held by `apply` and by each chunk of an online index repair, so they never interleave.
    pub index_lock: parking_lot::Mutex<()>,
    /// Claims read by queries, dropped per path by the applies that touch it.
    pub claims_cache: super::claims_cache::ClaimsCache,
}

impl AppliedProgress {
    /// Announces that everything up to `log_id` is applied. Called last by apply and snapshot
    /// install: a read barrier that sees the index (ShardSet::read_barrier) reads everything
    /// applied so far, the published metadata and policy included.
    fn announce_applied(&self, log_id: Option<LogId>) {
        self.applied_index.store(log_id.map(|l| l.index).unwrap_or(0), Ordering::Release);
        self.applied_at_us.store(crate::model::id::now_us(), Ordering::Release);
    }
}

pub struct ShardStateMachine {
    storage: Arc<Storage>,
    shard: u16,
    group: GroupId,
    state: AppliedState,
    progress: Arc<AppliedProgress>,
    /// The meta group's state machine also holds the cluster metadata.
    meta: Option<MetaSlot>,
    /// Concept paths the current `apply` call changed (for the claims cache).
    touched: Vec<String>,
}

/// The cluster metadata as applied, and where it is published to the rest of the node.
struct MetaSlot {
    state: MetaState,
    publish: tokio::sync::watch::Sender<Arc<MetaState>>,
    /// The cluster-wide policy, shared with the rest of the node.
    policy: Policy,
}

fn sm_read_error(e: impl std::error::Error + 'static) -> StorageIoError {
    StorageIOError::new(ErrorSubject::StateMachine, ErrorVerb::Read, openraft::AnyError::new(&e)).into()
}

fn sm_write_error(e: impl std::error::Error + 'static) -> StorageIoError {
    StorageIOError::new(ErrorSubject::StateMachine, ErrorVerb::Write, openraft::AnyError::new(&e)).into()
}

/// Reads through the pending write batch of the current `apply` call, then storage.
struct Overlay<'a> {
    storage: &'a Storage,
    pending: HashMap<(ColumnFamily, Vec<u8>), Vec<u8>>,
    deleted: std::collections::HashSet<(ColumnFamily, Vec<u8>)>,
    batch: WriteBatch,
}

impl<'a> Overlay<'a> {
    fn get(&self, cf: ColumnFamily, key: &[u8]) -> Result<Option<Vec<u8>>, StorageIoError> {
        if let Some(v) = self.pending.get(&(cf, key.to_vec())) {
            return Ok(Some(v.clone()));
        }
        if self.deleted.contains(&(cf, key.to_vec())) {
            return Ok(None);
        }
        self.storage.get(cf, key).map_err(sm_read_error)
    }

    /// A put that later reads in the same `apply` call must see.
    fn put_visible(&mut self, cf: ColumnFamily, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert((cf, key.clone()), value.clone());
        self.batch.put(cf, key, value);
    }

    fn put(&mut self, cf: ColumnFamily, key: Vec<u8>, value: Vec<u8>) {
        self.batch.put(cf, key, value);
    }

    fn delete_visible(&mut self, cf: ColumnFamily, key: Vec<u8>) {
        self.pending.remove(&(cf, key.clone()));
        self.deleted.insert((cf, key.clone()));
        self.batch.delete(cf, key);
    }
}

impl ShardStateMachine {
    pub fn open(storage: Arc<Storage>, shard: u16, group: GroupId) -> Result<ShardStateMachine, StorageIoError> {
        let state = match storage.get(ColumnFamily::StateMachine, &keys::applied_key(group)).map_err(sm_read_error)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(sm_read_error)?,
            None => AppliedState::default(),
        };
        let progress = Arc::new(AppliedProgress::default());
        progress.announce_applied(state.last_applied);
        Ok(ShardStateMachine { storage, shard, group, state, progress, meta: None, touched: Vec::new() })
    }

    /// Opens the meta group's state machine; every applied change of the cluster metadata is
    /// published on `publish`.
    pub fn open_meta(
        storage: Arc<Storage>,
        publish: tokio::sync::watch::Sender<Arc<MetaState>>,
        policy: Policy,
    ) -> Result<ShardStateMachine, StorageIoError> {
        let mut machine = ShardStateMachine::open(storage, META_SHARD, group_of_shard(META_SHARD))?;
        let state = machine.load_meta()?;
        publish.send_replace(Arc::new(state.clone()));
        let store = machine.load_policy()?;
        policy.update(|current| *current = store);
        machine.meta = Some(MetaSlot { state, publish, policy });
        Ok(machine)
    }

    /// Reads every policy record of the meta group.
    fn load_policy(&self) -> Result<PolicyStore, StorageIoError> {
        let mut store = PolicyStore::default();
        for tag in [keys::POLICY_ROOT, keys::POLICY_GRANT, keys::POLICY_BREAKER] {
            let prefix = keys::policy_key(self.group, tag, b"");
            let rows = self
                .storage
                .scan(ColumnFamily::StateMachine, &prefix, &keys::prefix_end(&prefix), usize::MAX)
                .map_err(sm_read_error)?;
            for (key, value) in rows {
                let record = match tag {
                    keys::POLICY_ROOT => PolicyRecord::Root {
                        agent_id: String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
                        spans: serde_json::from_slice(&value).map_err(sm_read_error)?,
                    },
                    keys::POLICY_GRANT => PolicyRecord::Grant(serde_json::from_slice(&value).map_err(sm_read_error)?),
                    _ => PolicyRecord::Breaker(serde_json::from_slice(&value).map_err(sm_read_error)?),
                };
                store.restore(record);
            }
        }
        Ok(store)
    }

    fn apply_policy(
        &mut self,
        overlay: &mut Overlay<'_>,
        proposed_at_us: u64,
        command: PolicyCommand,
    ) -> Result<Result<PolicyOutcome, PolicyError>, StorageIoError> {
        let at_us = self.next_time(proposed_at_us);
        let Some(slot) = self.meta.as_ref() else {
            return Ok(Err(PolicyError::NotMetaGroup));
        };
        let result = slot.policy.update(|store| store.apply(command, at_us));
        let (outcome, records) = match result {
            Ok(done) => done,
            Err(error) => return Ok(Err(error)),
        };
        for record in records {
            let (key, bytes) = match &record {
                PolicyRecord::Root { agent_id, spans } => {
                    (keys::policy_key(self.group, keys::POLICY_ROOT, agent_id.as_bytes()), serde_json::to_vec(spans))
                }
                PolicyRecord::Grant(grant) => (
                    keys::policy_key(self.group, keys::POLICY_GRANT, &grant.id.to_be_bytes()),
                    serde_json::to_vec(grant),
                ),
                PolicyRecord::Breaker(breaker) => (
                    keys::policy_key(self.group, keys::POLICY_BREAKER, breaker.agent_id.as_bytes()),
                    serde_json::to_vec(breaker),
                ),
            };
            overlay.put(ColumnFamily::StateMachine, key, bytes.map_err(sm_write_error)?);
        }
        Ok(Ok(outcome))
    }

    fn load_meta(&self) -> Result<MetaState, StorageIoError> {
        match self.storage.get(ColumnFamily::StateMachine, &keys::meta_state_key(self.group)).map_err(sm_read_error)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(sm_read_error),
            None => Ok(MetaState::default()),
        }
    }

    fn apply_meta(
        &mut self,
        overlay: &mut Overlay<'_>,
        proposed_at_us: u64,
        command: MetaCommand,
    ) -> Result<Result<(), MetaError>, StorageIoError> {
        let at_us = self.next_time(proposed_at_us);
        let Some(slot) = self.meta.as_mut() else {
            // A data shard never receives these (the node proposes them to group 0 only).
            return Ok(Ok(()));
        };
        let result = slot.state.apply(command, at_us);
        if result.is_ok() {
            let bytes = serde_json::to_vec(&slot.state).map_err(sm_write_error)?;
            overlay.put(ColumnFamily::StateMachine, keys::meta_state_key(self.group), bytes);
        }
        Ok(result)
    }

    pub fn progress(&self) -> Arc<AppliedProgress> {
        self.progress.clone()
    }

    fn next_time(&mut self, proposed_at_us: u64) -> u64 {
        let at = proposed_at_us.max(self.state.clock_us.saturating_add(1));
        self.state.clock_us = at;
        at
    }

    fn load_assertion(
        &self,
        overlay: &Overlay<'_>,
        id: AssertionId,
    ) -> Result<Option<StoredAssertion>, StorageIoError> {
        if id.shard() != self.shard {
            return Ok(None);
        }
        match overlay.get(ColumnFamily::StateMachine, &keys::assertion_key(self.group, id))? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(sm_read_error),
            None => Ok(None),
        }
    }

    fn apply_assert(
        &mut self,
        overlay: &mut Overlay<'_>,
        log_index: u64,
        proposed_at_us: u64,
        items: Vec<AssertionDraft>,
    ) -> Result<Vec<Result<AssertOutcome, ModelError>>, StorageIoError> {
        let mut results = Vec::with_capacity(items.len());
        let mut indexed = 0u64;
        for (position, draft) in items.into_iter().enumerate() {
            if let Some(request_id) = &draft.request_id {
                let key = keys::request_key(self.group, &draft.agent_id, request_id);
                if let Some(bytes) = overlay.get(ColumnFamily::StateMachine, &key)? {
                    let mut outcome: AssertOutcome = serde_json::from_slice(&bytes).map_err(sm_read_error)?;
                    outcome.duplicate = true;
                    results.push(Ok(outcome));
                    continue;
                }
            }
            if let Some(error) = self.check_supersedes(overlay, &draft)? {
                results.push(Err(error));
                continue;
            }
            let asserted_at_us = self.next_time(proposed_at_us);
            let id = AssertionId::new(asserted_at_us, self.shard, log_index, position as u16);
            let quarantined = draft.quarantine.is_some();
            if quarantined {
                // A quarantined claim supersedes nothing until an admin releases it (the
                // supersessions are written then).
                overlay.put(ColumnFamily::Index, keys::quarantine_key(self.group, id), Vec::new());
                raft_metrics::QUARANTINED.inc();
            } else {
                for &old in &draft.supersedes {
                    overlay.put(
                        ColumnFamily::StateMachine,
                        keys::supersession_key(self.group, old, id),
                        asserted_at_us.to_be_bytes().to_vec(),
                    );
                }
            }
            overlay.put(ColumnFamily::Index, keys::agent_key(self.group, &draft.agent_id, id), Vec::new());
            self.touched.push(draft.concept_path.clone());
            let concept_key = keys::concept_key(self.group, &draft.concept_path, &draft.predicate);
            let count = match overlay.get(ColumnFamily::Index, &concept_key)? {
                Some(bytes) => bytes.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0),
                None => 0,
            };
            overlay.put_visible(ColumnFamily::Index, concept_key, (count + 1).to_be_bytes().to_vec());
            overlay.put(
                ColumnFamily::Index,
                keys::claim_key(self.group, &draft.concept_path, &draft.predicate, id),
                Vec::new(),
            );
            let outcome = AssertOutcome {
                id,
                shard: self.shard,
                log_index,
                asserted_at_us,
                duplicate: false,
                quarantine: draft.quarantine.clone(),
            };
            if let Some(request_id) = &draft.request_id {
                let key = keys::request_key(self.group, &draft.agent_id, request_id);
                overlay.put_visible(
                    ColumnFamily::StateMachine,
                    key,
                    serde_json::to_vec(&outcome).map_err(sm_write_error)?,
                );
            }
            let record = StoredAssertion { id, asserted_at_us, log_index, draft, quarantined };
            overlay.put_visible(
                ColumnFamily::StateMachine,
                keys::assertion_key(self.group, id),
                serde_json::to_vec(&record).map_err(sm_write_error)?,
            );
            indexed += 1;
            results.push(Ok(outcome));
        }
        raft_metrics::ASSERTIONS_INDEXED.inc_by(indexed);
        Ok(results)
    }

    fn check_supersedes(
        &self,
        overlay: &Overlay<'_>,
        draft: &AssertionDraft,
    ) -> Result<Option<ModelError>, StorageIoError> {
        for &old in &draft.supersedes {
            match self.load_assertion(overlay, old)? {
                None => return Ok(Some(ModelError::AssertionNotFound { id: old.to_string() })),
                Some(record) if record.draft.concept_path != draft.concept_path => {
                    return Ok(Some(ModelError::SupersedesOtherConcept { id: old.to_string() }))
                }
                Some(_) => {}
            }
        }
        Ok(None)
    }

    fn apply_vote(
        &mut self,
        overlay: &mut Overlay<'_>,
        log_index: u64,
        proposed_at_us: u64,
        assertion_id: AssertionId,
        agent_id: &str,
        value: i8,
    ) -> Result<Result<EventOutcome, ModelError>, StorageIoError> {
        let Some(record) = self.load_assertion(overlay, assertion_id)? else {
            return Ok(Err(ModelError::AssertionNotFound { id: assertion_id.to_string() }));
        };
        self.touched.push(record.draft.concept_path);
        let at_us = self.next_time(proposed_at_us);
        overlay.put(
            ColumnFamily::StateMachine,
            keys::vote_key(self.group, assertion_id, agent_id, at_us),
            vec![value as u8],
        );
        Ok(Ok(EventOutcome { assertion_id, at_us, log_index }))
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_retract(
        &mut self,
        overlay: &mut Overlay<'_>,
        log_index: u64,
        proposed_at_us: u64,
        assertion_id: AssertionId,
        agent_id: String,
        admin: bool,
        reason: Option<String>,
    ) -> Result<Result<EventOutcome, ModelError>, StorageIoError> {
        let Some(record) = self.load_assertion(overlay, assertion_id)? else {
            return Ok(Err(ModelError::AssertionNotFound { id: assertion_id.to_string() }));
        };
        if !admin && record.draft.agent_id != agent_id {
            return Ok(Err(ModelError::NotAssertionOwner { id: assertion_id.to_string(), agent_id }));
        }
        // A retraction also withdraws the supersessions this claim made, which changes the
        // claims it superseded: all on the same concept_path.
        self.touched.push(record.draft.concept_path.clone());
        let key = keys::retraction_key(self.group, assertion_id);
        if overlay.get(ColumnFamily::StateMachine, &key)?.is_some() {
            return Ok(Err(ModelError::AlreadyRetracted { id: assertion_id.to_string() }));
        }
        let at_us = self.next_time(proposed_at_us);
        // A retracted claim needs no quarantine decision any more.
        overlay.delete_visible(ColumnFamily::Index, keys::quarantine_key(self.group, assertion_id));
        let retraction = RetractionRecord { at_us, by: agent_id, reason };
        overlay.put_visible(ColumnFamily::StateMachine, key, serde_json::to_vec(&retraction).map_err(sm_write_error)?);
        Ok(Ok(EventOutcome { assertion_id, at_us, log_index }))
    }

    /// An admin's decision on a quarantined claim. Release: the claim joins the lenses and its
    /// supersessions take effect now. Reject: it is retracted.
    #[allow(clippy::too_many_arguments)]
    fn apply_quarantine_decision(
        &mut self,
        overlay: &mut Overlay<'_>,
        log_index: u64,
        proposed_at_us: u64,
        assertion_id: AssertionId,
        release: bool,
        by: String,
        reason: Option<String>,
    ) -> Result<Result<EventOutcome, ModelError>, StorageIoError> {
        let Some(record) = self.load_assertion(overlay, assertion_id)? else {
            return Ok(Err(ModelError::AssertionNotFound { id: assertion_id.to_string() }));
        };
        let pending = keys::quarantine_key(self.group, assertion_id);
        if !record.quarantined || overlay.get(ColumnFamily::Index, &pending)?.is_none() {
            return Ok(Err(ModelError::NotQuarantined { id: assertion_id.to_string() }));
        }
        self.touched.push(record.draft.concept_path.clone());
        let at_us = self.next_time(proposed_at_us);
        overlay.delete_visible(ColumnFamily::Index, pending);
        let decision = RetractionRecord { at_us, by, reason };
        if release {
            for &old in &record.draft.supersedes {
                overlay.put(
                    ColumnFamily::StateMachine,
                    keys::supersession_key(self.group, old, assertion_id),
                    at_us.to_be_bytes().to_vec(),
                );
            }
            let key = keys::release_key(self.group, assertion_id);
            overlay.put(ColumnFamily::StateMachine, key, serde_json::to_vec(&decision).map_err(sm_write_error)?);
        } else {
            let key = keys::retraction_key(self.group, assertion_id);
            let rejection = RetractionRecord {
                reason: Some(format!(
                    "rejected from quarantine{}",
                    decision.reason.map(|r| format!(": {r}")).unwrap_or_default()
                )),
                ..decision
            };
            overlay.put_visible(
                ColumnFamily::StateMachine,
                key,
                serde_json::to_vec(&rejection).map_err(sm_write_error)?,
            );
        }
        Ok(Ok(EventOutcome { assertion_id, at_us, log_index }))
    }

    /// Every key/value of this shard in the state machine and index families.
    fn dump(&self) -> Result<Vec<u8>, StorageIoError> {
        let mut out = Vec::new();
        for (tag, cf) in [(0u8, ColumnFamily::StateMachine), (1u8, ColumnFamily::Index)] {
            self.storage
                .for_each_in_range(cf, &keys::group_prefix(self.group), &keys::group_end(self.group), |k, v| {
                    out.push(tag);
                    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
                    out.extend_from_slice(k);
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v);
                    true
                })
                .map_err(sm_read_error)?;
        }
        Ok(out)
    }

    fn persist_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), StorageIoError> {
        let mut batch = WriteBatch::new();
        let meta = serde_json::to_vec(&snapshot.meta).map_err(sm_write_error)?;
        let mut bytes = Vec::with_capacity(4 + meta.len() + snapshot.data.len());
        bytes.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&meta);
        bytes.extend_from_slice(&snapshot.data);
        batch.put(ColumnFamily::Meta, keys::snapshot_key(self.group), bytes);
        self.storage.write(batch, Durability::Buffered).map_err(sm_write_error)
    }
}

/// A snapshot as persisted: `meta_len(4) | meta (JSON) | dump`.
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

fn decode_dump(data: &[u8]) -> Option<Vec<(ColumnFamily, &[u8], &[u8])>> {
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let cf = match rest.first()? {
            0 => ColumnFamily::StateMachine,
            1 => ColumnFamily::Index,
            _ => return None,
        };
        let key_len = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
        let key = rest.get(5..5 + key_len)?;
        let at = 5 + key_len;
        let value_len = u32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?) as usize;
        let value = rest.get(at + 4..at + 4 + value_len)?;
        records.push((cf, key, value));
        rest = &rest[at + 4 + value_len..];
    }
    Some(records)
}

pub struct ShardSnapshotBuilder {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

impl RaftSnapshotBuilder<TypeConfig> for ShardSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageIoError> {
        Ok(Snapshot { meta: self.meta.clone(), snapshot: Box::new(Cursor::new(std::mem::take(&mut self.data))) })
    }
}

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotBuilder = ShardSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, openraft::BasicNode>), StorageIoError> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ShardResponse>, StorageIoError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = Instant::now();
        let progress = self.progress.clone();
        // No await below: the guard is held through the batch write only on this thread.
        let _index_guard = progress.index_lock.lock();
        let storage = self.storage.clone();
        let mut overlay = Overlay {
            storage: &storage,
            pending: HashMap::new(),
            deleted: Default::default(),
            batch: WriteBatch::new(),
        };
        let mut responses = Vec::new();
        for entry in entries {
            self.state.last_applied = Some(entry.log_id);
            let index = entry.log_id.index;
            let response = match entry.payload {
                EntryPayload::Blank => ShardResponse::Empty,
                EntryPayload::Membership(membership) => {
                    self.state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    ShardResponse::Empty
                }
                EntryPayload::Normal(command) => match command {
                    ShardCommand::Assert { proposed_at_us, items } => {
                        ShardResponse::Asserted(self.apply_assert(&mut overlay, index, proposed_at_us, items)?)
                    }
                    ShardCommand::Vote { proposed_at_us, assertion_id, agent_id, value } => ShardResponse::Voted(
                        self.apply_vote(&mut overlay, index, proposed_at_us, assertion_id, &agent_id, value)?,
                    ),
                    ShardCommand::Meta { proposed_at_us, command } => {
                        ShardResponse::Meta(self.apply_meta(&mut overlay, proposed_at_us, command)?)
                    }
                    ShardCommand::Quarantine { proposed_at_us, assertion_id, release, by, reason } => {
                        ShardResponse::Quarantine(self.apply_quarantine_decision(
                            &mut overlay,
                            index,
                            proposed_at_us,
                            assertion_id,
                            release,
                            by,
                            reason,
                        )?)
                    }
                    ShardCommand::Policy { proposed_at_us, command } => {
                        ShardResponse::Policy(self.apply_policy(&mut overlay, proposed_at_us, command)?)
                    }
                    ShardCommand::Retract { proposed_at_us, assertion_id, agent_id, admin, reason } => {
                        ShardResponse::Retracted(self.apply_retract(
                            &mut overlay,
                            index,
                            proposed_at_us,
                            assertion_id,
                            agent_id,
                            admin,
                            reason,
                        )?)
                    }
                },
            };
            responses.push(response);
        }
        let state_bytes = serde_json::to_vec(&self.state).map_err(sm_write_error)?;
        overlay.batch.put(ColumnFamily::StateMachine, keys::applied_key(self.group), state_bytes);
        // The log is the write-ahead log: applied state need not be synced, a crash re-applies.
        self.storage.write(overlay.batch, Durability::Buffered).map_err(sm_write_error)?;
        // After the write, so a reader that misses the cache from now on reads the new state.
        progress.claims_cache.invalidate(self.touched.iter().map(String::as_str));
        self.touched.clear();
        if let Some(slot) = &self.meta {
            if **slot.publish.borrow() != slot.state {
                slot.publish.send_replace(Arc::new(slot.state.clone()));
            }
        }
        self.progress.announce_applied(self.state.last_applied);
        raft_metrics::APPLY_DURATION.observe(started.elapsed().as_secs_f64());
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The dump is taken here, on the state machine task, so no apply can interleave with it.
        let data = match self.dump() {
            Ok(data) => data,
            Err(error) => {
                tracing::error!(shard = self.shard, error = %error, "snapshot dump failed");
                Vec::new()
            }
        };
        let last = self.state.last_applied;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: self.state.membership.clone(),
            snapshot_id: format!(
                "{}-{}-{}",
                self.group,
                last.map(|l| l.leader_id.term).unwrap_or(0),
                last.map(|l| l.index).unwrap_or(0)
            ),
        };
        let stored = StoredSnapshot { meta: meta.clone(), data: data.clone() };
        if let Err(error) = self.persist_snapshot(&stored) {
            tracing::error!(shard = self.shard, error = %error, "persisting snapshot failed");
        }
        ShardSnapshotBuilder { meta, data }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageIoError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageIoError> {
        let data = snapshot.into_inner();
        let records = decode_dump(&data).ok_or_else(|| {
            StorageIoError::from(StorageIOError::new(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                openraft::AnyError::error("malformed snapshot data"),
            ))
        })?;
        let progress = self.progress.clone();
        let _index_guard = progress.index_lock.lock();
        let mut batch = WriteBatch::new();
        for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
            batch.delete_range(cf, keys::group_prefix(self.group), keys::group_end(self.group));
        }
        for (cf, key, value) in records {
            batch.put(cf, key.to_vec(), value.to_vec());
        }
        let mut state: AppliedState = match storage_applied_from(&data, self.group) {
            Some(state) => state,
            None => AppliedState::default(),
        };
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        batch.put(
            ColumnFamily::StateMachine,
            keys::applied_key(self.group),
            serde_json::to_vec(&state).map_err(sm_write_error)?,
        );
        self.storage.write(batch, Durability::Synced).map_err(sm_write_error)?;
        progress.claims_cache.clear();
        self.state = state;
        self.persist_snapshot(&StoredSnapshot { meta: meta.clone(), data })?;
        if self.meta.is_some() {
            let state = self.load_meta()?;
            let store = self.load_policy()?;
            if let Some(slot) = self.meta.as_mut() {
                slot.publish.send_replace(Arc::new(state.clone()));
                slot.state = state;
                slot.policy.update(|current| *current = store);
            }
        }
        self.progress.announce_applied(meta.last_log_id);
        raft_metrics::SNAPSHOTS.with_label_values(&["installed"]).inc();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageIoError> {
        let Some(bytes) =
            self.storage.get(ColumnFamily::Meta, &keys::snapshot_key(self.group)).map_err(sm_read_error)?
        else {
            return Ok(None);
        };
        let corrupt = || sm_read_error(crate::storage::StorageError::corrupt(ColumnFamily::Meta, "truncated snapshot"));
        let meta_len =
            bytes.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).ok_or_else(corrupt)? as usize;
        let meta_bytes = bytes.get(4..4 + meta_len).ok_or_else(corrupt)?;
        let meta = serde_json::from_slice(meta_bytes).map_err(sm_read_error)?;
        let data = bytes[4 + meta_len..].to_vec();
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

/// The applied state recorded inside a snapshot dump (for its clock).
fn storage_applied_from(data: &[u8], group: GroupId) -> Option<AppliedState> {
    let key = keys::applied_key(group);
    decode_dump(data)?
        .into_iter()
        .find(|(cf, k, _)| *cf == ColumnFamily::StateMachine && *k == key.as_slice())
        .and_then(|(_, _, v)| serde_json::from_slice(v).ok())
}
