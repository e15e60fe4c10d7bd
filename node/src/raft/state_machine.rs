//! The state machine of one shard: applies assertions, votes and retractions, keeps the
//! secondary indexes, and builds and installs snapshots. Each `apply` call writes its entries'
//! data, index entries and `last_applied` in one write batch, so a crash never leaves the
//! indexes and the data apart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::metrics as raft_metrics;
use super::types::{
    group_of_shard, AssertOutcome, Entry, EventOutcome, GroupId, LogId, NodeId, ProposalToken, ShardCommand,
    ShardResponse, StorageIoError, TypeConfig, TOKEN_TTL_US,
};
use crate::meta::policy::{Policy, PolicyCommand, PolicyError, PolicyOutcome, PolicyRecord, PolicyStore};
use crate::meta::{MetaCommand, MetaError, MetaState, META_SHARD};
use crate::model::assertion::{AssertionDraft, StoredAssertion};
use crate::model::id::AssertionId;
use crate::model::ModelError;
use crate::shard::progress::{AppliedProgress, RetractionRecord};
use crate::shard::{keys, snapshot};
use crate::storage::{ColumnFamily, Durability, Storage, WriteBatch};

/// What the state machine persists about itself, in the same batch as the data it describes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// The last `asserted_at` handed out: keeps time monotonic per shard across leaders.
    clock_us: u64,
}

/// The adapter's side of [`AppliedProgress`]: it knows openraft's log ids.
trait Announce {
    fn announce_applied(&self, log_id: Option<LogId>);
}

impl Announce for AppliedProgress {
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
    /// The policy as the current `apply` call changed it, published after its write.
    pending_policy: Option<PolicyStore>,
    /// `<data_dir>/snapshots`: the group's last snapshot and any being received.
    snapshot_dir: PathBuf,
    /// The file openraft is writing a snapshot from the leader into.
    receiving: Option<PathBuf>,
    /// `testing.snapshot_install_pause_ms`: a pause after an install's first data batch.
    install_pause: std::time::Duration,
    #[cfg(test)]
    inject: Injected,
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

/// Votes an agent keeps per assertion (its current one and earlier changes of mind).
pub const MAX_VOTES_PER_AGENT: usize = 16;

/// Reads through the pending write batch of the current `apply` call, then storage.
struct Overlay<'a> {
    storage: &'a Storage,
    pending: HashMap<(ColumnFamily, Vec<u8>), Vec<u8>>,
    deleted: std::collections::HashSet<(ColumnFamily, Vec<u8>)>,
    /// Vote keys written by this call, in key order, for [`Overlay::votes_with_prefix`].
    pending_votes: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
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
        self.deleted.remove(&(cf, key.clone()));
        self.pending.insert((cf, key.clone()), value.clone());
        self.batch.put(cf, key, value);
    }

    fn put(&mut self, cf: ColumnFamily, key: Vec<u8>, value: Vec<u8>) {
        self.batch.put(cf, key, value);
    }

    /// A vote, visible to later [`Overlay::votes_with_prefix`] calls of this apply.
    fn put_vote(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending_votes.insert(key.clone(), value.clone());
        self.put_visible(ColumnFamily::StateMachine, key, value);
    }

    /// The vote records under `prefix` (one agent on one assertion), oldest first: stored
    /// ones not deleted by this call, and this call's.
    fn votes_with_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageIoError> {
        let end = keys::prefix_end(prefix);
        let mut rows: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = self
            .storage
            .scan(ColumnFamily::StateMachine, prefix, &end, usize::MAX)
            .map_err(sm_read_error)?
            .into_iter()
            .collect();
        for (key, value) in self.pending_votes.range(prefix.to_vec()..end) {
            rows.insert(key.clone(), value.clone());
        }
        rows.retain(|key, _| !self.deleted.contains(&(ColumnFamily::StateMachine, key.clone())));
        Ok(rows.into_iter().collect())
    }

    fn delete_visible(&mut self, cf: ColumnFamily, key: Vec<u8>) {
        if cf == ColumnFamily::StateMachine {
            self.pending_votes.remove(&key);
        }
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
        let snapshot_dir = storage.data_dir().join("snapshots");
        let mut machine = ShardStateMachine {
            storage,
            shard,
            group,
            state,
            progress,
            meta: None,
            touched: Vec::new(),
            pending_policy: None,
            snapshot_dir,
            receiving: None,
            install_pause: std::time::Duration::ZERO,
            #[cfg(test)]
            inject: Injected::default(),
        };
        machine.recover_snapshot()?;
        Ok(machine)
    }

    /// Pauses every snapshot install after its first data batch (`testing.snapshot_install_pause_ms`).
    pub fn with_install_pause(mut self, pause: std::time::Duration) -> ShardStateMachine {
        self.install_pause = pause;
        self
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
        // Applied to a copy that is published only after this call's write batch is on disk
        // (`apply`): a reader must never act on a grant or breaker a crash could undo.
        let store = self.pending_policy.get_or_insert_with(|| slot.policy.read(PolicyStore::clone));
        let result = store.apply(command, at_us);
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
                PolicyRecord::BreakerExpired { agent_id } => {
                    let key = keys::policy_key(self.group, keys::POLICY_BREAKER, agent_id.as_bytes());
                    overlay.delete_visible(ColumnFamily::StateMachine, key);
                    continue;
                }
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

    /// Applies `entries` in one write batch (see [`ShardStateMachine::apply`]).
    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<Vec<ShardResponse>, StorageIoError> {
        let progress = self.progress.clone();
        // Held through the batch write, so an index repair chunk never interleaves with it.
        let _index_guard = progress.index_lock.lock();
        self.pending_policy = None;
        let storage = self.storage.clone();
        let mut overlay = Overlay {
            storage: &storage,
            pending: HashMap::new(),
            deleted: Default::default(),
            pending_votes: Default::default(),
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
                EntryPayload::Normal(command) => self.apply_command(&mut overlay, index, command)?,
            };
            responses.push(response);
            // Forget expired proposal tokens every 256 entries, whatever the entry: the same
            // range on every replica, since it depends only on the log index and the clock.
            if index % 256 == 0 {
                let horizon = self.state.clock_us.saturating_sub(TOKEN_TTL_US);
                overlay.batch.delete_range(
                    ColumnFamily::StateMachine,
                    keys::token_key(self.group, 0, 0),
                    keys::token_key(self.group, horizon, 0),
                );
            }
        }
        let state_bytes = serde_json::to_vec(&self.state).map_err(sm_write_error)?;
        overlay.batch.put(ColumnFamily::StateMachine, keys::applied_key(self.group), state_bytes);
        // The log is the write-ahead log: applied state need not be synced, a crash re-applies.
        self.storage.write(overlay.batch, Durability::Buffered).map_err(sm_write_error)?;
        if let (Some(store), Some(slot)) = (self.pending_policy.take(), &self.meta) {
            slot.policy.update(|current| *current = store);
        }
        // After the write, so a reader that misses the cache from now on reads the new state.
        progress.claims_cache.invalidate(self.touched.iter().map(String::as_str));
        self.touched.clear();
        if let Some(slot) = &self.meta {
            if **slot.publish.borrow() != slot.state {
                slot.publish.send_replace(Arc::new(slot.state.clone()));
            }
        }
        self.progress.announce_applied(self.state.last_applied);
        Ok(responses)
    }

    /// Applies one command of the entry at `index`.
    fn apply_command(
        &mut self,
        overlay: &mut Overlay<'_>,
        index: u64,
        command: ShardCommand,
    ) -> Result<ShardResponse, StorageIoError> {
        Ok(match command {
            ShardCommand::Assert { proposed_at_us, items } => {
                if let Some(refusal) = refuse_numbering(index, items.len()) {
                    return Ok(ShardResponse::Refused(refusal));
                }
                ShardResponse::Asserted(self.apply_assert(overlay, index, proposed_at_us, items)?)
            }
            ShardCommand::Vote { proposed_at_us, assertion_id, agent_id, value } => {
                ShardResponse::Voted(self.apply_vote(overlay, index, proposed_at_us, assertion_id, &agent_id, value)?)
            }
            ShardCommand::Meta { proposed_at_us, command } => {
                ShardResponse::Meta(self.apply_meta(overlay, proposed_at_us, command)?)
            }
            ShardCommand::Quarantine { proposed_at_us, assertion_id, release, by, reason } => {
                ShardResponse::Quarantine(self.apply_quarantine_decision(
                    overlay,
                    index,
                    proposed_at_us,
                    assertion_id,
                    release,
                    by,
                    reason,
                )?)
            }
            ShardCommand::Policy { proposed_at_us, command } => {
                ShardResponse::Policy(self.apply_policy(overlay, proposed_at_us, command)?)
            }
            ShardCommand::Retract { proposed_at_us, assertion_id, agent_id, admin, reason } => {
                ShardResponse::Retracted(self.apply_retract(
                    overlay,
                    index,
                    proposed_at_us,
                    assertion_id,
                    agent_id,
                    admin,
                    reason,
                )?)
            }
            ShardCommand::Once { token, command } => self.apply_once(overlay, index, token, *command)?,
        })
    }

    /// Applies a forwarded proposal once per token: a later copy answers what the first one
    /// produced and changes nothing. Tokens are remembered for [`TOKEN_TTL_US`] of the shard's
    /// clock; a copy older than that is refused rather than risk a second application.
    fn apply_once(
        &mut self,
        overlay: &mut Overlay<'_>,
        index: u64,
        token: ProposalToken,
        command: ShardCommand,
    ) -> Result<ShardResponse, StorageIoError> {
        let key = keys::token_key(self.group, token.issued_at_us, token.nonce);
        if let Some(bytes) = overlay.get(ColumnFamily::StateMachine, &key)? {
            raft_metrics::DEDUPLICATED_PROPOSALS.inc();
            return serde_json::from_slice(&bytes).map_err(sm_read_error);
        }
        if token.issued_at_us.saturating_add(TOKEN_TTL_US) < self.state.clock_us {
            return Ok(ShardResponse::TokenExpired);
        }
        if matches!(command, ShardCommand::Once { .. }) {
            // Never built by this code; refused rather than recursing on a peer's word.
            return Ok(ShardResponse::TokenExpired);
        }
        let response = self.apply_command(overlay, index, command)?;
        overlay.put_visible(ColumnFamily::StateMachine, key, serde_json::to_vec(&response).map_err(sm_write_error)?);
        Ok(response)
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
        let prefix = keys::agent_votes_prefix(self.group, assertion_id, agent_id);
        let history = overlay.votes_with_prefix(&prefix)?;
        // A repeat of the agent's current vote changes no lens at any time: nothing is written,
        // and the answer gives the time that vote took effect.
        if let Some((key, current)) = history.last() {
            if current.first() == Some(&(value as u8)) {
                let since = key.get(prefix.len()..).and_then(|t| t.try_into().ok()).map(u64::from_be_bytes);
                return Ok(Ok(EventOutcome { assertion_id, at_us: since.unwrap_or(0), log_index }));
            }
        }
        // Changes of mind keep their history for `as_of` reads, up to MAX_VOTES_PER_AGENT: an
        // agent flipping its vote cannot make every read of the assertion scan without bound.
        let excess = (history.len() + 1).saturating_sub(MAX_VOTES_PER_AGENT);
        for (key, _) in history.into_iter().take(excess) {
            overlay.delete_visible(ColumnFamily::StateMachine, key);
        }
        self.touched.push(record.draft.concept_path);
        let at_us = self.next_time(proposed_at_us);
        overlay.put_vote(keys::vote_key(self.group, assertion_id, agent_id, at_us), vec![value as u8]);
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

    /// Writes this shard's state machine and index ranges, as applied now, to the group's
    /// snapshot file, record by record. Runs on the state machine task, so no apply interleaves.
    fn write_snapshot(&self, meta: &SnapshotMeta<NodeId, openraft::BasicNode>) -> Result<PathBuf, StorageIoError> {
        let signature = Some(meta.signature());
        let write_failed =
            |e: std::io::Error| StorageIoError::from(StorageIOError::write_snapshot(signature.clone(), &e));
        #[cfg(test)]
        if self.inject.fail_build {
            return Err(write_failed(std::io::Error::other("injected snapshot build failure")));
        }
        let meta_bytes = serde_json::to_vec(meta).map_err(sm_write_error)?;
        let mut writer =
            snapshot::SnapshotWriter::create(&self.snapshot_dir, self.group, &meta_bytes).map_err(write_failed)?;
        let mut failure = None;
        for (tag, cf) in [(0u8, ColumnFamily::StateMachine), (1u8, ColumnFamily::Index)] {
            let scanned = self.storage.for_each_in_range(
                cf,
                &keys::group_prefix(self.group),
                &keys::group_end(self.group),
                |k, v| match writer.record(tag, k, v) {
                    Ok(()) => true,
                    Err(error) => {
                        failure = Some(error);
                        false
                    }
                },
            );
            if let Err(error) = scanned {
                writer.abandon();
                return Err(sm_read_error(error));
            }
            if let Some(error) = failure.take() {
                writer.abandon();
                return Err(write_failed(error));
            }
        }
        #[cfg(test)]
        if self.inject.fail_persist {
            writer.abandon();
            return Err(write_failed(std::io::Error::other("injected snapshot persist failure")));
        }
        writer.finish().map_err(write_failed)
    }

    /// Replaces this shard's ranges by the snapshot in `path` (already verified), in bounded
    /// write batches. Crash-safe: the install marker, written first and synced, names the
    /// snapshot; until the last batch (synced, with the new applied state) removes it, opening
    /// the node finishes the install from the file ([`ShardStateMachine::open`]). Readers are
    /// turned away meanwhile (`AppliedProgress::installing`).
    fn install_file(
        &mut self,
        path: &Path,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
    ) -> Result<(), StorageIoError> {
        let signature = Some(meta.signature());
        let read_failed =
            |e: std::io::Error| StorageIoError::from(StorageIOError::read_snapshot(signature.clone(), &e));
        let progress = self.progress.clone();
        let _index_guard = progress.index_lock.lock();
        progress.installs.fetch_add(1, Ordering::AcqRel);
        let _done = InstallingFlag(&progress);
        let marker = keys::install_marker_key(self.group);
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::Meta, marker.clone(), serde_json::to_vec(meta).map_err(sm_write_error)?);
        for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
            batch.delete_range(cf, keys::group_prefix(self.group), keys::group_end(self.group));
        }
        self.storage.write(batch, Durability::Synced).map_err(sm_write_error)?;
        let (mut reader, _) = snapshot::SnapshotReader::open(path).map_err(read_failed)?;
        let applied_key = keys::applied_key(self.group);
        let mut clock_us = 0;
        let mut batch = WriteBatch::new();
        let mut batch_bytes = 0usize;
        let mut written = 0u64;
        while let Some((tag, key, value)) = reader.next_record().map_err(read_failed)? {
            let cf = if tag == 0 { ColumnFamily::StateMachine } else { ColumnFamily::Index };
            if cf == ColumnFamily::StateMachine && key == applied_key {
                // Only its clock is taken: the applied state is written last, below.
                clock_us = serde_json::from_slice::<AppliedState>(&value).map(|s| s.clock_us).unwrap_or(0);
                continue;
            }
            if !key.starts_with(&keys::group_prefix(self.group)) {
                return Err(read_failed(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "snapshot holds a key of another group",
                )));
            }
            batch_bytes += key.len() + value.len();
            batch.put(cf, key, value);
            if batch_bytes >= INSTALL_BATCH_BYTES {
                self.storage
                    .write(std::mem::replace(&mut batch, WriteBatch::new()), Durability::Buffered)
                    .map_err(sm_write_error)?;
                batch_bytes = 0;
                written += 1;
                if !self.install_pause.is_zero() && written == 1 {
                    // testing.snapshot_install_pause_ms: a window for tests to kill the node.
                    std::thread::sleep(self.install_pause);
                }
            }
        }
        let state = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), clock_us };
        batch.put(ColumnFamily::StateMachine, applied_key, serde_json::to_vec(&state).map_err(sm_write_error)?);
        batch.delete(ColumnFamily::Meta, marker);
        // The data batches were buffered: this synced write makes them durable too (one WAL).
        self.storage.write(batch, Durability::Synced).map_err(sm_write_error)?;
        progress.claims_cache.clear();
        self.state = state;
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
        Ok(())
    }

    /// Finishes an install a stop interrupted, and converts a snapshot kept in the old format
    /// (one RocksDB value) into a file.
    fn recover_snapshot(&mut self) -> Result<(), StorageIoError> {
        snapshot::remove_partial(&self.snapshot_dir, self.group);
        let marker = keys::install_marker_key(self.group);
        if let Some(bytes) = self.storage.get(ColumnFamily::Meta, &marker).map_err(sm_read_error)? {
            let meta: SnapshotMeta<NodeId, openraft::BasicNode> =
                serde_json::from_slice(&bytes).map_err(sm_read_error)?;
            let path = snapshot::snapshot_path(&self.snapshot_dir, self.group);
            tracing::warn!(shard = self.shard, snapshot = %meta.snapshot_id, "finishing a snapshot install a stop interrupted");
            self.install_file(&path, &meta)?;
        }
        let legacy = keys::snapshot_key(self.group);
        if let Some(bytes) = self.storage.get(ColumnFamily::Meta, &legacy).map_err(sm_read_error)? {
            let converted = convert_legacy(&bytes, &self.snapshot_dir, self.group);
            if let Err(error) = converted {
                tracing::warn!(shard = self.shard, error = %error, "old-format snapshot dropped; the next snapshot replaces it");
            }
            let mut batch = WriteBatch::new();
            batch.delete(ColumnFamily::Meta, legacy);
            self.storage.write(batch, Durability::Synced).map_err(sm_write_error)?;
        }
        Ok(())
    }
}

/// The path of the snapshot data in `handle`: the receiving file when `handle` is that file,
/// else a copy of `handle`'s content (from its start) in a new receiving file.
fn adopt_snapshot_file(
    mut handle: std::fs::File,
    receiving: Option<PathBuf>,
    dir: &Path,
    group: GroupId,
) -> std::io::Result<PathBuf> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let opened = handle.metadata()?;
    if let Some(path) = receiving {
        match std::fs::metadata(&path) {
            Ok(meta) if meta.dev() == opened.dev() && meta.ino() == opened.ino() => return Ok(path),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    std::fs::create_dir_all(dir)?;
    let path = snapshot::receiving_path(dir, group);
    let mut copy = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    handle.seek(SeekFrom::Start(0))?;
    std::io::copy(&mut handle, &mut copy)?;
    copy.sync_all()?;
    Ok(path)
}

/// Write batches of a snapshot install are cut at about this many bytes.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

/// Ends the install in `AppliedProgress::installs` however the install ends.
struct InstallingFlag<'a>(&'a AppliedProgress);

impl Drop for InstallingFlag<'_> {
    fn drop(&mut self) {
        self.0.installs.fetch_add(1, Ordering::AcqRel);
    }
}

/// Failures a test can inject into snapshot building.
#[cfg(test)]
#[derive(Default)]
struct Injected {
    fail_build: bool,
    fail_persist: bool,
}

/// Writes an old-format snapshot (`meta_len(4) | meta | records`) as a snapshot file.
fn convert_legacy(bytes: &[u8], dir: &Path, group: GroupId) -> std::io::Result<()> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed old-format snapshot");
    let meta_len = u32::from_be_bytes(bytes.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(bad)?) as usize;
    let meta = bytes.get(4..4 + meta_len).ok_or_else(bad)?;
    let records = decode_dump(&bytes[4 + meta_len..]).ok_or_else(bad)?;
    let mut writer = snapshot::SnapshotWriter::create(dir, group, meta)?;
    for (cf, key, value) in records {
        let tag = if cf == ColumnFamily::StateMachine { 0 } else { 1 };
        if let Err(error) = writer.record(tag, key, value) {
            writer.abandon();
            return Err(error);
        }
    }
    writer.finish().map(|_| ())
}

/// Why an assertion entry at `index` with `items` items cannot be numbered (ids pack the log
/// index into 36 bits and the position into 12), or `None`. Decided in apply from the entry
/// alone, so every replica refuses the same entries.
fn refuse_numbering(index: u64, items: usize) -> Option<ModelError> {
    if items > crate::model::id::MAX_ITEMS_PER_ENTRY {
        return Some(ModelError::CommandTooLarge { items, limit: crate::model::id::MAX_ITEMS_PER_ENTRY });
    }
    if index > crate::model::id::MAX_LOG_INDEX {
        return Some(ModelError::IdSpaceExhausted { index, limit: crate::model::id::MAX_LOG_INDEX });
    }
    None
}

/// The records of an old-format snapshot.
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

/// A snapshot built (or failed) on the state machine task, handed to openraft.
pub struct ShardSnapshotBuilder {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    built: Option<Result<PathBuf, StorageIoError>>,
}

impl RaftSnapshotBuilder<TypeConfig> for ShardSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageIoError> {
        // Every failure reaches openraft, which then purges no log: the last durable snapshot
        // and the log after it stay.
        let built = self.built.take().unwrap_or_else(|| {
            Err(StorageIOError::write_snapshot(Some(self.meta.signature()), &std::io::Error::other("built twice"))
                .into())
        });
        let path = built.inspect_err(|_| raft_metrics::SNAPSHOTS.with_label_values(&["build_failed"]).inc())?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| StorageIoError::from(StorageIOError::read_snapshot(Some(self.meta.signature()), &e)))?;
        raft_metrics::SNAPSHOTS.with_label_values(&["built"]).inc();
        Ok(Snapshot { meta: self.meta.clone(), snapshot: Box::new(file) })
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        // RocksDB reads and the batch write: off the async workers.
        let responses = crate::storage::blocking(|| self.apply_entries(entries))?;
        raft_metrics::APPLY_DURATION.observe(started.elapsed().as_secs_f64());
        Ok(responses)
    }
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
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
        // Written here, on the state machine task, so no apply can interleave with it; streamed
        // to a file on a blocking thread, so memory stays a buffer whatever the shard's size.
        let built = crate::storage::blocking(|| self.write_snapshot(&meta));
        if let Err(error) = &built {
            tracing::error!(shard = self.shard, error = %error, "building a snapshot failed; the log is kept");
        }
        ShardSnapshotBuilder { meta, built: Some(built) }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageIoError> {
        let failed = |e: std::io::Error| StorageIoError::from(StorageIOError::write_snapshot(None, &e));
        let dir = self.snapshot_dir.clone();
        let path = snapshot::receiving_path(&dir, self.group);
        let file = crate::storage::blocking(|| {
            snapshot::remove_partial(&dir, self.group);
            std::fs::create_dir_all(&dir)?;
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)
        })
        .map_err(failed)?;
        self.receiving = Some(path);
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageIoError> {
        let signature = Some(meta.signature());
        let failed = |e: std::io::Error| StorageIoError::from(StorageIOError::write_snapshot(signature.clone(), &e));
        snapshot.sync_all().await.map_err(failed)?;
        let handle = snapshot.into_std().await;
        let dir = self.snapshot_dir.clone();
        let group = self.group;
        let receiving = self.receiving.take();
        // Normally openraft hands back the file `begin_receiving_snapshot` opened; any other
        // handle (a snapshot passed on directly) is copied into a file of our own first.
        let received =
            crate::storage::blocking(|| adopt_snapshot_file(handle, receiving, &dir, group)).map_err(failed)?;
        let result = crate::storage::blocking(|| {
            // Checked whole before anything changes: a damaged transfer leaves the old state.
            snapshot::verify(&received).map_err(failed)?;
            let path = snapshot::snapshot_path(&self.snapshot_dir, self.group);
            std::fs::rename(&received, &path).map_err(failed)?;
            snapshot::sync_dir(&self.snapshot_dir).map_err(failed)?;
            self.install_file(&path, meta)
        });
        match &result {
            Ok(()) => raft_metrics::SNAPSHOTS.with_label_values(&["installed"]).inc(),
            Err(_) => {
                let _ = std::fs::remove_file(&received);
                raft_metrics::SNAPSHOTS.with_label_values(&["install_failed"]).inc()
            }
        }
        result
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageIoError> {
        let path = snapshot::snapshot_path(&self.snapshot_dir, self.group);
        let opened = crate::storage::blocking(|| match snapshot::SnapshotReader::open(&path) {
            Ok((_, meta)) => std::fs::File::open(&path).map(|file| Some((meta, file))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        })
        .map_err(|e| StorageIoError::from(StorageIOError::read_snapshot(None, &e)))?;
        let Some((meta, file)) = opened else { return Ok(None) };
        let meta = serde_json::from_slice(&meta).map_err(sm_read_error)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::storage::StorageOptions;

    fn draft(value: u32) -> AssertionDraft {
        AssertionDraft::for_test("test/set", "member", "writer", &value.to_string())
    }

    fn entry(index: u64, command: ShardCommand) -> Entry {
        Entry {
            log_id: openraft::LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    fn machine() -> (tempfile::TempDir, Arc<Storage>, ShardStateMachine) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open storage");
        let machine = ShardStateMachine::open(storage.clone(), 2, 3).expect("open state machine");
        (dir, storage, machine)
    }

    fn stored_assertions(storage: &Storage) -> usize {
        let prefix = keys::state_key(3, b'A');
        storage.scan(ColumnFamily::StateMachine, &prefix, &keys::prefix_end(&prefix), usize::MAX).expect("scan").len()
    }

    fn assert_once(token: ProposalToken, value: u32) -> ShardCommand {
        ShardCommand::Once {
            token,
            command: Box::new(ShardCommand::Assert { proposed_at_us: token.issued_at_us, items: vec![draft(value)] }),
        }
    }

    fn outcomes(response: &ShardResponse) -> Vec<AssertOutcome> {
        match response {
            ShardResponse::Asserted(results) => results.iter().map(|r| r.clone().expect("applied")).collect(),
            other => panic!("unexpected response {other:?}"),
        }
    }

    /// A forwarded proposal retried after an ambiguous failure lands twice in the log, in the
    /// same apply call or a later one; each copy must answer the first one's result and write
    /// nothing. Without tokens, both copies were applied (issue 14 §1).
    #[tokio::test]
    async fn copies_of_a_tokened_proposal_apply_once() {
        let (_dir, storage, mut machine) = machine();
        let token = ProposalToken::new();
        let other = ProposalToken::new();
        let responses = machine
            .apply(vec![
                entry(1, assert_once(token, 1)),
                entry(2, assert_once(token, 1)),
                entry(3, assert_once(other, 2)),
            ])
            .await
            .expect("apply");
        assert_eq!(outcomes(&responses[0]), outcomes(&responses[1]), "the copy answers the first result");
        assert_ne!(outcomes(&responses[0]), outcomes(&responses[2]), "another token is another write");
        let later = machine.apply(vec![entry(4, assert_once(token, 1))]).await.expect("apply");
        assert_eq!(outcomes(&later[0]), outcomes(&responses[0]));
        assert_eq!(stored_assertions(&storage), 2, "one assertion per token");
        // The same command without a token is applied every time: that was the bug.
        let untokened = ShardCommand::Assert { proposed_at_us: token.issued_at_us, items: vec![draft(1)] };
        machine.apply(vec![entry(5, untokened.clone()), entry(6, untokened)]).await.expect("apply");
        assert_eq!(stored_assertions(&storage), 4);
    }

    #[tokio::test]
    async fn an_expired_token_is_refused_not_applied() {
        let (_dir, storage, mut machine) = machine();
        let now = crate::model::id::now_us();
        let fresh = ShardCommand::Assert { proposed_at_us: now, items: vec![draft(1)] };
        machine.apply(vec![entry(1, fresh)]).await.expect("apply");
        let stale = ProposalToken { issued_at_us: now - TOKEN_TTL_US - 1_000_000, nonce: 7 };
        let responses = machine.apply(vec![entry(2, assert_once(stale, 2))]).await.expect("apply");
        assert!(matches!(responses[0], ShardResponse::TokenExpired), "{:?}", responses[0]);
        assert_eq!(stored_assertions(&storage), 1);
    }

    /// Assertion ids number an entry's items in 12 bits: a longer command is refused whole, by
    /// every replica alike, instead of wrapping ids into each other.
    #[tokio::test]
    async fn an_entry_with_more_items_than_ids_can_number_is_refused_whole() {
        let (_dir, storage, mut machine) = machine();
        let items: Vec<AssertionDraft> = (0..crate::model::id::MAX_ITEMS_PER_ENTRY as u32 + 1).map(draft).collect();
        let command = ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items };
        let responses = machine.apply(vec![entry(1, command)]).await.expect("apply");
        assert!(
            matches!(responses[0], ShardResponse::Refused(ModelError::CommandTooLarge { items: 4097, limit: 4096 })),
            "{:?}",
            responses[0]
        );
        assert_eq!(stored_assertions(&storage), 0);
    }

    fn shard_rows(storage: &Storage) -> Vec<(ColumnFamily, Vec<u8>, Vec<u8>)> {
        let mut rows = Vec::new();
        for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
            for (k, v) in storage.scan(cf, &keys::group_prefix(3), &keys::group_end(3), usize::MAX).expect("scan") {
                if cf == ColumnFamily::StateMachine && k == keys::applied_key(3) {
                    continue;
                }
                rows.push((cf, k, v));
            }
        }
        rows
    }

    /// A leader's machine with `count` assertions applied.
    async fn leader_with(count: u32) -> (tempfile::TempDir, Arc<Storage>, ShardStateMachine) {
        let (dir, storage, mut machine) = machine();
        let items: Vec<AssertionDraft> = (0..count).map(draft).collect();
        let command = ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items };
        machine.apply(vec![entry(1, command)]).await.expect("apply");
        (dir, storage, machine)
    }

    /// Sends `snapshot` to `follower` the way openraft does: into the file it opens for
    /// receiving, in chunks, then installs it.
    async fn transfer(snapshot: Snapshot<TypeConfig>, follower: &mut ShardStateMachine) -> Result<(), StorageIoError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut source = snapshot.snapshot;
        let mut sink = follower.begin_receiving_snapshot().await.expect("begin receiving");
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = source.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            sink.write_all(&chunk[..n]).await.expect("write");
        }
        sink.shutdown().await.expect("flush");
        follower.install_snapshot(&snapshot.meta, sink).await
    }

    #[tokio::test]
    async fn a_snapshot_streams_from_leader_to_follower_and_replaces_its_range() {
        let (_a, leader_storage, mut leader) = leader_with(300).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let (_b, follower_storage, mut follower) = machine();
        // Something the snapshot does not hold must go.
        let stray = ShardCommand::Assert { proposed_at_us: 1, items: vec![draft(99_999)] };
        follower.apply(vec![entry(1, stray)]).await.expect("apply");
        transfer(snapshot, &mut follower).await.expect("install");
        assert_eq!(shard_rows(&follower_storage), shard_rows(&leader_storage));
        assert_eq!(follower.state.last_applied, leader.state.last_applied);
        assert_eq!(follower.state.clock_us, leader.state.clock_us, "the shard clock travels with the snapshot");
        // The installed snapshot is the follower's current one now, and survives a reopen.
        let current = follower.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert_eq!(current.meta.last_log_id, leader.state.last_applied);
    }

    #[tokio::test]
    async fn a_failed_build_or_persist_is_an_error_and_keeps_the_last_snapshot() {
        let (_a, _storage, mut leader) = leader_with(10).await;
        let first = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let more = ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items: vec![draft(11)] };
        leader.apply(vec![entry(2, more)]).await.expect("apply");
        for (fail_build, fail_persist) in [(true, false), (false, true)] {
            leader.inject = Injected { fail_build, fail_persist };
            let built = leader.get_snapshot_builder().await.build_snapshot().await;
            assert!(built.is_err(), "openraft must see the failure (build {fail_build}, persist {fail_persist})");
            let current = leader.get_current_snapshot().await.expect("current").expect("a snapshot");
            assert_eq!(current.meta.last_log_id, first.meta.last_log_id, "the last durable snapshot stays");
        }
        let leftovers = std::fs::read_dir(&leader.snapshot_dir).expect("dir").count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
    }

    #[tokio::test]
    async fn a_damaged_transfer_is_refused_and_leaves_the_follower_intact() {
        let (_a, _leader_storage, mut leader) = leader_with(50).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let (_b, follower_storage, mut follower) = leader_with(5).await;
        let before = shard_rows(&follower_storage);
        let path = snapshot::snapshot_path(&leader.snapshot_dir, 3);
        let mut bytes = std::fs::read(&path).expect("read");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        let damaged = leader.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert!(transfer(damaged, &mut follower).await.is_err());
        assert_eq!(shard_rows(&follower_storage), before, "nothing changed");
        drop(snapshot);
    }

    /// A node killed between the first and the last batch of an install finishes it from the
    /// snapshot file when it opens again: it never serves a half-installed range.
    #[tokio::test]
    async fn an_install_interrupted_by_a_crash_is_finished_on_reopen() {
        let (_a, leader_storage, mut leader) = leader_with(200).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let meta = snapshot.meta.clone();
        let (_b, follower_storage, mut follower) = machine();
        transfer(snapshot, &mut follower).await.expect("install");
        // The state right after the first batch of an install: marker set, ranges emptied,
        // part of the data written, no applied state.
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::Meta, keys::install_marker_key(3), serde_json::to_vec(&meta).expect("meta"));
        for cf in [ColumnFamily::StateMachine, ColumnFamily::Index] {
            batch.delete_range(cf, keys::group_prefix(3), keys::group_end(3));
        }
        batch.put(ColumnFamily::StateMachine, keys::assertion_key(3, AssertionId::new(1, 2, 1, 0)), b"{}".to_vec());
        follower_storage.write(batch, Durability::Synced).expect("write");
        drop(follower);
        let reopened = ShardStateMachine::open(follower_storage.clone(), 2, 3).expect("reopen");
        assert_eq!(shard_rows(&follower_storage), shard_rows(&leader_storage));
        assert_eq!(reopened.state.last_applied, meta.last_log_id);
        assert!(follower_storage.get(ColumnFamily::Meta, &keys::install_marker_key(3)).expect("get").is_none());
    }

    /// An agent repeating or flipping its vote forever must not make the assertion's events grow
    /// without bound: repeats write nothing, flips keep the last MAX_VOTES_PER_AGENT.
    #[tokio::test]
    async fn an_agents_votes_on_an_assertion_stay_bounded() {
        let (_dir, storage, mut machine) = leader_with(1).await;
        let prefix = keys::assertions_prefix(3);
        let (key, _) = storage
            .scan(ColumnFamily::StateMachine, &prefix, &keys::prefix_end(&prefix), 1)
            .expect("scan")
            .pop()
            .expect("one assertion");
        let id = AssertionId::from_bytes(&key[prefix.len()..]).expect("an assertion id");
        let vote = |value: i8| ShardCommand::Vote {
            proposed_at_us: crate::model::id::now_us(),
            assertion_id: id,
            agent_id: "voter".into(),
            value,
        };
        let votes_prefix = keys::agent_votes_prefix(3, id, "voter");
        let stored = |storage: &Storage| {
            storage
                .scan(ColumnFamily::StateMachine, &votes_prefix, &keys::prefix_end(&votes_prefix), usize::MAX)
                .expect("scan")
        };
        // Repeats, in one apply call and across calls.
        machine.apply((2..12).map(|i| entry(i, vote(1))).collect::<Vec<_>>()).await.expect("apply");
        machine.apply(vec![entry(12, vote(1))]).await.expect("apply");
        assert_eq!(stored(&storage).len(), 1, "a repeated vote writes nothing");
        // Flips, in one call and across calls.
        let flips: Vec<Entry> = (13..53).map(|i| entry(i, vote(if i % 2 == 0 { 1 } else { -1 }))).collect();
        machine.apply(flips).await.expect("apply");
        for i in 53..60 {
            machine.apply(vec![entry(i, vote(if i % 2 == 0 { 1 } else { -1 }))]).await.expect("apply");
        }
        let kept = stored(&storage);
        assert_eq!(kept.len(), MAX_VOTES_PER_AGENT);
        assert_eq!(
            kept.last().map(|(_, v)| v.clone()),
            Some(vec![(-1i8) as u8]),
            "the current vote (entry 59: -1) is kept"
        );
    }
}
