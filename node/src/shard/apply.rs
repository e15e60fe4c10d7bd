//! Applying a shard's committed commands to its state, independent of consensus. An
//! [`Applier`] owns what applying needs between calls: the shard's clock (so `asserted_at` stays
//! monotonic across leaders), the concept counts it last wrote (so an assertion adds to its
//! concept's count without a read), and for the meta group the cluster metadata and policy it
//! publishes to the rest of the node. [`Applier::apply`] turns a run of committed commands, each
//! at its log [`Position`], into one write batch: data, index entries and the caller's applied
//! record together, so a crash never leaves the indexes and the data apart. Every replica
//! decides the same from the same log: nothing here reads a wall clock or local state other
//! than the shard's ranges. The adapter from openraft's state machine trait (`raft`) calls it
//! and translates its [`ApplyError`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::codec;
use super::command::{AssertOutcome, EventOutcome, GroupId, ProposalToken, ShardCommand, ShardResponse, TOKEN_TTL_US};
use super::digest::{self, Buckets};
use super::keys;
use super::metrics;
use super::progress::{AppliedProgress, CheckRecord, RetractionRecord};
use crate::meta::policy::{Policy, PolicyCommand, PolicyError, PolicyOutcome, PolicyRecord, PolicyStore};
use crate::meta::{MetaCommand, MetaError, MetaState};
use crate::model::assertion::{AssertionDraft, NewAssertion, StoredAssertion};
use crate::model::id::AssertionId;
use crate::model::ModelError;
use crate::storage::{ColumnFamily, Durability, Storage, StorageError, WriteBatch};

/// Votes an agent keeps per assertion (its current one and earlier changes of mind).
pub const MAX_VOTES_PER_AGENT: usize = 16;

/// Where an entry sits in the shard's log: its index and the term of the leader that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub index: u64,
    pub term: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "log index {} (term {})", self.index, self.term)
    }
}

/// Why applying failed, and at which entry (for the batch write, the last entry of the
/// batch). Never an answer to a client: the replica cannot go on applying, and the adapter
/// hands the error to consensus, which stops the group.
#[derive(Debug, thiserror::Error)]
#[error("applying the entry at {at}: {fault}")]
pub struct ApplyError {
    pub at: Position,
    #[source]
    pub fault: Fault,
}

/// What went wrong while applying.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    #[error("reading the shard's state failed: {0}")]
    Read(StorageError),
    #[error("a stored record of the shard is damaged: {0}")]
    Damaged(serde_json::Error),
    #[error("a stored record of the shard is damaged: {0}")]
    DamagedRecord(codec::CodecError),
    #[error("encoding a record failed: {0}")]
    Encode(serde_json::Error),
    #[error("writing the applied batch failed: {0}")]
    Write(StorageError),
    #[error("the replica was retired; nothing more is applied to it")]
    Retired,
}

impl ApplyError {
    /// The entry being applied when it failed.
    pub fn position(&self) -> Position {
        self.at
    }

    /// True when the failure was a write (the batch or a record's encoding), false for a read.
    pub fn is_write(&self) -> bool {
        matches!(self.fault, Fault::Encode(_) | Fault::Write(_))
    }
}

impl Fault {
    fn at(self, at: Position) -> ApplyError {
        ApplyError { at, fault: self }
    }
}

/// Reading the meta group's state at open or after a snapshot install failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading the meta group's state failed: {0}")]
    Read(#[source] StorageError),
    #[error("a stored record of the meta group is damaged: {0}")]
    Damaged(#[source] serde_json::Error),
    #[error("a stored record is damaged: {0}")]
    DamagedRecord(#[source] codec::CodecError),
}

impl Fault {
    /// A failed load of the meta group's state, as a fault of the apply that needed it.
    fn from_load(error: LoadError) -> Fault {
        match error {
            LoadError::Read(error) => Fault::Read(error),
            LoadError::Damaged(error) => Fault::Damaged(error),
            LoadError::DamagedRecord(error) => Fault::DamagedRecord(error),
        }
    }
}

impl From<Fault> for LoadError {
    fn from(fault: Fault) -> LoadError {
        match fault {
            Fault::Read(error) | Fault::Write(error) => LoadError::Read(error),
            Fault::Damaged(error) | Fault::Encode(error) => LoadError::Damaged(error),
            Fault::DamagedRecord(error) => LoadError::DamagedRecord(error),
            Fault::Retired => LoadError::Read(StorageError::Closed),
        }
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;
/// Reads through the pending write batch of the current `apply` call, then storage.
struct Overlay {
    storage: Arc<Storage>,
    /// This call's puts that its later reads must see, per family (indexed by
    /// [`ColumnFamily::ordinal`], so a lookup needs no key of its own).
    pending: [FastMap<Vec<u8>, Vec<u8>>; ColumnFamily::COUNT],
    /// This call's deletes, per family.
    deleted: [FastSet<Vec<u8>>; ColumnFamily::COUNT],
    /// Vote keys written by this call, in key order, for [`Overlay::votes_with_prefix`].
    pending_votes: BTreeMap<Vec<u8>, Vec<u8>>,
    batch: WriteBatch,
    /// The XOR this call's record changes make to each touched digest bucket.
    digest_delta: HashMap<usize, u64>,
    /// The replica's bucket count (0: digests not kept).
    buckets: usize,
    /// The first failed read of an old value for the digests: fails the whole call.
    digest_fault: Option<Fault>,
}

impl Overlay {
    fn new(storage: Arc<Storage>) -> Overlay {
        Overlay {
            storage,
            pending: std::array::from_fn(|_| FastMap::default()),
            deleted: std::array::from_fn(|_| FastSet::default()),
            pending_votes: BTreeMap::new(),
            batch: WriteBatch::new(),
            digest_delta: HashMap::new(),
            buckets: 0,
            digest_fault: None,
        }
    }

    /// Whether a change to `key` in `cf` moves the digests.
    fn digested(&self, cf: ColumnFamily, key: &[u8]) -> bool {
        cf == ColumnFamily::StateMachine && self.buckets != 0 && digest::digested(key)
    }

    /// Keeps the digests of a digested record changing from what it holds now to `new`.
    fn track(&mut self, cf: ColumnFamily, key: &[u8], new: Option<&[u8]>) {
        if !self.digested(cf, key) {
            return;
        }
        let old = match self.get(cf, key) {
            Ok(old) => old,
            Err(fault) => {
                self.digest_fault.get_or_insert(fault);
                return;
            }
        };
        self.track_change(key, old.as_deref(), new);
    }

    /// Keeps the digests of a digested record changing from `old` to `new`.
    fn track_change(&mut self, key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        let mut change = 0u64;
        if let Some(old) = old {
            change ^= digest::record_hash(key, old);
        }
        if let Some(new) = new {
            change ^= digest::record_hash(key, new);
        }
        if change != 0 {
            *self.digest_delta.entry(digest::bucket_of(key, self.buckets)).or_insert(0) ^= change;
        }
    }

    /// Whether this call has put or deleted `key` in `cf` (visibly).
    fn touches(&self, cf: ColumnFamily, key: &[u8]) -> bool {
        self.pending[cf.ordinal()].contains_key(key) || self.deleted[cf.ordinal()].contains(key)
    }

    fn get(&self, cf: ColumnFamily, key: &[u8]) -> Result<Option<Vec<u8>>, Fault> {
        if let Some(v) = self.pending[cf.ordinal()].get(key) {
            return Ok(Some(v.clone()));
        }
        if self.deleted[cf.ordinal()].contains(key) {
            return Ok(None);
        }
        self.storage.get(cf, key).map_err(Fault::Read)
    }

    /// A put that later reads in the same `apply` call must see.
    fn put_visible(&mut self, cf: ColumnFamily, key: Vec<u8>, value: Vec<u8>) {
        self.track(cf, &key, Some(&value));
        self.stage(cf, key, value);
    }

    /// [`Overlay::put_visible`] of a key that holds nothing: one this call has just read as
    /// absent, or an assertion's, whose id is new with its entry's log index. Its digest change
    /// needs no read of an old value (two reads of four, per assertion).
    fn put_absent(&mut self, cf: ColumnFamily, key: Vec<u8>, value: Vec<u8>) {
        if self.digested(cf, &key) {
            self.track_change(&key, None, Some(&value));
        }
        self.stage(cf, key, value);
    }

    /// Puts `value` into the batch, visible to this call's later reads.
    fn stage(&mut self, cf: ColumnFamily, key: Vec<u8>, value: Vec<u8>) {
        self.deleted[cf.ordinal()].remove(&key);
        self.pending[cf.ordinal()].insert(key.clone(), value.clone());
        self.batch.put(cf, key, value);
    }

    fn put(&mut self, cf: ColumnFamily, key: Vec<u8>, value: Vec<u8>) {
        if cf == ColumnFamily::StateMachine {
            // Records are digested against their old value: later puts must see this one.
            return self.put_visible(cf, key, value);
        }
        self.batch.put(cf, key, value);
    }

    /// A vote, visible to later [`Overlay::votes_with_prefix`] calls of this apply.
    fn put_vote(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending_votes.insert(key.clone(), value.clone());
        self.put_visible(ColumnFamily::StateMachine, key, value);
    }

    /// The vote records under `prefix` (one agent on one assertion), oldest first: stored
    /// ones not deleted by this call, and this call's.
    fn votes_with_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Fault> {
        let end = keys::prefix_end(prefix);
        let mut rows: BTreeMap<Vec<u8>, Vec<u8>> = self
            .storage
            .scan(ColumnFamily::StateMachine, prefix, &end, usize::MAX)
            .map_err(Fault::Read)?
            .into_iter()
            .collect();
        for (key, value) in self.pending_votes.range(prefix.to_vec()..end) {
            rows.insert(key.clone(), value.clone());
        }
        rows.retain(|key, _| !self.deleted[ColumnFamily::StateMachine.ordinal()].contains(key));
        Ok(rows.into_iter().collect())
    }

    fn delete_visible(&mut self, cf: ColumnFamily, key: Vec<u8>) {
        self.track(cf, &key, None);
        if cf == ColumnFamily::StateMachine {
            self.pending_votes.remove(&key);
        }
        self.pending[cf.ordinal()].remove(&key);
        self.deleted[cf.ordinal()].insert(key.clone());
        self.batch.delete(cf, key);
    }
}

/// The cluster metadata as applied, and where it is published to the rest of the node.
struct MetaSlot {
    state: MetaState,
    publish: tokio::sync::watch::Sender<Arc<MetaState>>,
    /// The cluster-wide policy, shared with the rest of the node.
    policy: Policy,
}

/// One entry of a run to apply: its position, and its command (`None` for entries that carry
/// none, such as a new leader's blank entry or a membership change).
pub type Applicable = (Position, Option<Arc<ShardCommand>>);

/// Applies a shard's committed commands (see the module doc).
pub struct Applier {
    storage: Arc<Storage>,
    shard: u16,
    group: GroupId,
    /// The last `asserted_at` handed out (µs): keeps time monotonic per shard across leaders.
    clock_us: u64,
    progress: Arc<AppliedProgress>,
    /// The meta group's applier also holds the cluster metadata.
    meta: Option<MetaSlot>,
    /// Concept paths whose existing claims the current `apply` call changed (for the claims
    /// cache, which drops their reads).
    touched: Vec<String>,
    /// The policy as the current `apply` call changed it, published after its write.
    pending_policy: Option<PolicyStore>,
    /// Claims the current `apply` call put into quarantine, less those it took out.
    quarantine_delta: i64,
    /// The check the current `apply` call recorded, published after its write.
    pending_check: Option<CheckRecord>,
    /// Concept counts as stored, so that an assertion adds to its concept's count without a
    /// read (a read per assertion was a tenth of one node's batch throughput).
    counts: CountCache,
    /// The concept counts the current `apply` call wrote, in order: they join `counts` once
    /// its batch is written.
    written_counts: Vec<(Vec<u8>, u64)>,
}

/// Concept counts (`keys::concept_key` to its value) as this replica's index family holds them.
/// Only the applier writes them while it holds the index lock; anything else that takes the
/// lock may write the index family (`IndexLock`), so the cache is emptied when another holder
/// took it since the applier's last apply. At most [`COUNT_CACHE_BYTES`] as charged (key
/// bytes plus [`COUNT_ENTRY_OVERHEAD`] each); emptied when an insert would pass it.
#[derive(Default)]
struct CountCache {
    counts: FastMap<Vec<u8>, u64>,
    /// What the counts held are charged.
    bytes: usize,
    /// The index lock's count of other holders when the cache was last known to be current.
    others_seen: u64,
}

/// The charge bound of an applier's concept counts: about 2,000 counts with 60-byte paths, and
/// at most about 0.55 MiB per group with the table itself (the smallest keys, 4,600 of them).
const COUNT_CACHE_BYTES: usize = 256 * 1024;

/// What a count costs besides its key's bytes: the value, the key's vector and the table slot.
const COUNT_ENTRY_OVERHEAD: usize = 48;

impl CountCache {
    /// Empties the cache if someone else held the index lock since `others` was last seen.
    fn check(&mut self, others: u64) {
        if others != self.others_seen {
            self.clear();
            self.others_seen = others;
        }
    }

    fn clear(&mut self) {
        self.counts.clear();
        self.bytes = 0;
    }

    fn insert(&mut self, key: Vec<u8>, count: u64) {
        if let Some(held) = self.counts.get_mut(&key) {
            *held = count;
            return;
        }
        let charge = key.len() + COUNT_ENTRY_OVERHEAD;
        if self.bytes + charge > COUNT_CACHE_BYTES {
            self.clear();
        }
        self.bytes += charge;
        self.counts.insert(key, count);
    }
}

impl Applier {
    /// An applier for `shard` (group `group`) whose clock last handed out `clock_us`.
    pub fn new(
        storage: Arc<Storage>,
        shard: u16,
        group: GroupId,
        progress: Arc<AppliedProgress>,
        clock_us: u64,
    ) -> Applier {
        let applier = Applier {
            storage,
            shard,
            group,
            clock_us,
            progress,
            meta: None,
            touched: Vec::new(),
            pending_policy: None,
            quarantine_delta: 0,
            pending_check: None,
            counts: CountCache::default(),
            written_counts: Vec::new(),
        };
        applier.count_quarantine();
        applier
    }

    /// Makes this the meta group's applier: loads the cluster metadata and policy, publishes
    /// them, and publishes every applied change from now on.
    pub fn attach_meta(
        &mut self,
        publish: tokio::sync::watch::Sender<Arc<MetaState>>,
        policy: Policy,
    ) -> Result<(), LoadError> {
        let state = self.load_meta()?;
        publish.send_replace(Arc::new(state.clone()));
        let store = self.load_policy()?;
        policy.update(|current| *current = store);
        self.meta = Some(MetaSlot { state, publish, policy });
        Ok(())
    }

    /// Counts the replica's quarantine index into `AppliedProgress::quarantine_pending` (at open
    /// and after a snapshot install; applies keep it up to date). A failed count leaves 0 and
    /// is logged: the gauge is a report, and applying does not depend on it.
    fn count_quarantine(&self) {
        let prefix = keys::quarantine_prefix(self.group);
        let mut count = 0u64;
        let counted =
            self.storage.for_each_in_range(ColumnFamily::Index, &prefix, &keys::prefix_end(&prefix), |_, _| {
                count += 1;
                true
            });
        if let Err(error) = counted {
            tracing::warn!(shard = self.shard, error = %error, "counting quarantined claims failed");
        }
        self.progress.quarantine_pending.store(count, std::sync::atomic::Ordering::Release);
    }

    /// The last `asserted_at` handed out, for the caller's applied record.
    pub fn clock_us(&self) -> u64 {
        self.clock_us
    }

    /// Takes up the state a snapshot install just wrote: its clock, and (meta group) the
    /// metadata and policy it holds, which are published. (The install itself drops the claims
    /// cache when it ends, however it ends.)
    pub fn installed(&mut self, clock_us: u64) -> Result<(), LoadError> {
        self.clock_us = clock_us;
        self.count_quarantine();
        self.reload_meta()
    }

    /// Applies `entries` in one write batch, together with `applied`'s record (the caller's
    /// account of how far it has applied, built from the clock after the run) under
    /// `applied_key`. After the write, publishes changed policy and metadata and brings the
    /// claims cache up to date (`ClaimsCache::apply_changes`). Returns one response per entry. The
    /// caller announces the new applied index afterwards.
    pub fn apply(
        &mut self,
        entries: Vec<Applicable>,
        applied_key: Vec<u8>,
        applied: impl FnOnce(u64) -> Result<Vec<u8>, serde_json::Error>,
        announce: impl FnOnce(),
    ) -> Result<Vec<ShardResponse>, ApplyError> {
        let Some(last) = entries.last().map(|(at, _)| *at) else {
            return Ok(Vec::new());
        };
        let progress = self.progress.clone();
        // Held through the batch write and the announcement, so an index repair chunk or an
        // anti-entropy repair never interleaves with it and always sees the applied index of
        // what is stored.
        let index_guard = progress.index_lock.lock_for_apply();
        self.counts.check(*index_guard);
        self.written_counts.clear();
        if progress.retired.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Fault::Retired.at(last));
        }
        if progress.reload_meta.swap(false, std::sync::atomic::Ordering::AcqRel) {
            // An anti-entropy repair rewrote the meta group's records: take them up.
            self.reload_meta().map_err(|error| Fault::from_load(error).at(last))?;
        }
        self.pending_policy = None;
        self.touched.clear();
        self.quarantine_delta = 0;
        self.pending_check = None;
        let mut overlay = Overlay::new(self.storage.clone());
        overlay.buckets = progress.digest.lock().buckets.as_ref().map_or(0, Buckets::count);
        let mut responses = Vec::with_capacity(entries.len());
        // The assertions this call adds that change no other claim (for the claims cache, which
        // adds them to its reads), their drafts borrowed from the entries.
        let mut added = Vec::new();
        for (at, command) in &entries {
            let at = *at;
            let response = match command.as_deref() {
                None => ShardResponse::Empty,
                Some(ShardCommand::Check { proposed_at_us }) => {
                    self.record_check(&overlay, at, *proposed_at_us);
                    ShardResponse::Empty
                }
                Some(command) => {
                    self.apply_command(&mut overlay, &mut added, at.index, command, 0).map_err(|f| f.at(at))?
                }
            };
            responses.push(response);
            // Forget expired proposal tokens every 256 entries, whatever the entry: the same
            // range on every replica, since it depends only on the log index and the clock.
            if at.index % 256 == 0 {
                let horizon = self.clock_us.saturating_sub(TOKEN_TTL_US);
                overlay.batch.delete_range(
                    ColumnFamily::StateMachine,
                    keys::token_key(self.group, 0, 0),
                    keys::token_key(self.group, horizon, 0),
                );
            }
        }
        if let Some(fault) = overlay.digest_fault.take() {
            return Err(fault.at(last));
        }
        let record = applied(self.clock_us).map_err(|error| Fault::Encode(error).at(last))?;
        overlay.batch.put(ColumnFamily::StateMachine, applied_key, record);
        // The touched buckets' new digests, in the same batch as the records they cover. The
        // digest lock is not held across the write (readers on async workers take it); the
        // index lock keeps every other writer of the digests out meanwhile.
        {
            let digests = progress.digest.lock();
            if let Some(buckets) = digests.buckets.as_ref() {
                for (&bucket, &change) in &overlay.digest_delta {
                    digest::put_bucket(&mut overlay.batch, self.group, bucket, buckets.get(bucket) ^ change);
                }
            }
        }
        // The log is the write-ahead log: applied state need not be synced, a crash re-applies.
        self.storage
            .write(std::mem::take(&mut overlay.batch), Durability::Buffered)
            .map_err(|error| Fault::Write(error).at(last))?;
        for (key, count) in self.written_counts.drain(..) {
            self.counts.insert(key, count);
        }
        {
            let mut digests = progress.digest.lock();
            if let Some(buckets) = digests.buckets.as_mut() {
                for (&bucket, &change) in &overlay.digest_delta {
                    buckets.xor(bucket, change);
                }
            }
            if let Some(check) = self.pending_check.take() {
                digests.last_check = Some(Arc::new(check));
            }
        }
        if let (Some(store), Some(slot)) = (self.pending_policy.take(), &self.meta) {
            slot.policy.update(|current| *current = store);
        }
        let pending = &progress.quarantine_pending;
        let delta = std::mem::take(&mut self.quarantine_delta);
        let now = (pending.load(std::sync::atomic::Ordering::Acquire) as i64).saturating_add(delta).max(0);
        pending.store(now as u64, std::sync::atomic::Ordering::Release);
        // After the write, so a reader that misses the cache from now on reads the new state.
        progress.claims_cache.apply_changes(self.touched.iter().map(String::as_str), &added);
        self.touched.clear();
        if let Some(slot) = &self.meta {
            if **slot.publish.borrow() != slot.state {
                slot.publish.send_replace(Arc::new(slot.state.clone()));
            }
        }
        announce();
        Ok(responses)
    }

    /// Reloads (and publishes) the meta group's metadata and policy from storage, after a
    /// snapshot install or an anti-entropy repair rewrote their records. Nothing for a data
    /// shard.
    fn reload_meta(&mut self) -> Result<(), LoadError> {
        if self.meta.is_none() {
            return Ok(());
        }
        let state = self.load_meta()?;
        let store = self.load_policy()?;
        if let Some(slot) = self.meta.as_mut() {
            slot.publish.send_replace(Arc::new(state.clone()));
            slot.state = state;
            slot.policy.update(|current| *current = store);
        }
        Ok(())
    }

    /// Records the replica's digests as of the check entry at `at`: those applied so far, with
    /// this call's changes up to here.
    fn record_check(&mut self, overlay: &Overlay, at: Position, proposed_at_us: u64) {
        let Some(mut buckets) = self.progress.digest.lock().buckets.clone() else {
            return;
        };
        for (&bucket, &change) in &overlay.digest_delta {
            buckets.xor(bucket, change);
        }
        let root = buckets.tree().root();
        self.pending_check = Some(CheckRecord { index: at.index, term: at.term, proposed_at_us, root, buckets });
    }

    fn next_time(&mut self, proposed_at_us: u64) -> u64 {
        let at = proposed_at_us.max(self.clock_us.saturating_add(1));
        self.clock_us = at;
        at
    }

    fn load_assertion(&self, overlay: &Overlay, id: AssertionId) -> Result<Option<StoredAssertion>, Fault> {
        if id.shard() != self.shard {
            return Ok(None);
        }
        match overlay.get(ColumnFamily::StateMachine, &keys::assertion_key(self.group, id))? {
            Some(bytes) => codec::decode_assertion(&bytes).map(Some).map_err(Fault::DamagedRecord),
            None => Ok(None),
        }
    }

    /// Reads every policy record of the meta group.
    fn load_policy(&self) -> Result<PolicyStore, Fault> {
        let mut store = PolicyStore::default();
        for tag in [keys::POLICY_ROOT, keys::POLICY_GRANT, keys::POLICY_BREAKER] {
            let prefix = keys::policy_key(self.group, tag, b"");
            let rows = self
                .storage
                .scan(ColumnFamily::StateMachine, &prefix, &keys::prefix_end(&prefix), usize::MAX)
                .map_err(Fault::Read)?;
            for (key, value) in rows {
                let record = match tag {
                    keys::POLICY_ROOT => PolicyRecord::Root {
                        agent_id: String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
                        spans: serde_json::from_slice(&value).map_err(Fault::Damaged)?,
                    },
                    keys::POLICY_GRANT => PolicyRecord::Grant(serde_json::from_slice(&value).map_err(Fault::Damaged)?),
                    _ => PolicyRecord::Breaker(serde_json::from_slice(&value).map_err(Fault::Damaged)?),
                };
                store.restore(record);
            }
        }
        Ok(store)
    }

    fn apply_policy(
        &mut self,
        overlay: &mut Overlay,
        proposed_at_us: u64,
        command: PolicyCommand,
    ) -> Result<Result<PolicyOutcome, PolicyError>, Fault> {
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
            overlay.put(ColumnFamily::StateMachine, key, bytes.map_err(Fault::Encode)?);
        }
        Ok(Ok(outcome))
    }

    fn load_meta(&self) -> Result<MetaState, Fault> {
        match self.storage.get(ColumnFamily::StateMachine, &keys::meta_state_key(self.group)).map_err(Fault::Read)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(Fault::Damaged),
            None => Ok(MetaState::default()),
        }
    }

    fn apply_meta(
        &mut self,
        overlay: &mut Overlay,
        proposed_at_us: u64,
        command: MetaCommand,
    ) -> Result<Result<(), MetaError>, Fault> {
        let at_us = self.next_time(proposed_at_us);
        let Some(slot) = self.meta.as_mut() else {
            // A data shard never receives these (the node proposes them to group 0 only).
            return Ok(Ok(()));
        };
        let result = slot.state.apply(command, at_us);
        if result.is_ok() {
            let bytes = serde_json::to_vec(&slot.state).map_err(Fault::Encode)?;
            overlay.put(ColumnFamily::StateMachine, keys::meta_state_key(self.group), bytes);
        }
        Ok(result)
    }

    /// Applies the items of an assertion command at positions from `first` of the entry at
    /// `log_index` (a part of a [`ShardCommand::Parts`] starts after the parts before it).
    #[allow(clippy::too_many_arguments)]
    fn apply_assert<'a>(
        &mut self,
        overlay: &mut Overlay,
        added: &mut Vec<NewAssertion<'a>>,
        log_index: u64,
        first: usize,
        proposed_at_us: u64,
        items: &'a [AssertionDraft],
    ) -> Result<Vec<Result<AssertOutcome, ModelError>>, Fault> {
        let mut results = Vec::with_capacity(items.len());
        let mut indexed = 0u64;
        for (offset, draft) in items.iter().enumerate() {
            let position = first + offset;
            if let Some(request_id) = &draft.request_id {
                let key = keys::request_key(self.group, &draft.agent_id, request_id);
                if let Some(bytes) = overlay.get(ColumnFamily::StateMachine, &key)? {
                    let mut outcome = codec::decode_outcome(&bytes).map_err(Fault::DamagedRecord)?;
                    outcome.duplicate = true;
                    results.push(Ok(outcome));
                    continue;
                }
            }
            if let Some(error) = self.check_supersedes(overlay, draft)? {
                results.push(Err(error));
                continue;
            }
            let asserted_at_us = self.next_time(proposed_at_us);
            let id = AssertionId::new(asserted_at_us, self.shard, log_index, position as u16);
            let quarantined = draft.quarantine.is_some();
            if quarantined {
                // A quarantined claim supersedes nothing until an admin releases it (the
                // supersessions are written then).
                overlay.put_visible(ColumnFamily::Index, keys::quarantine_key(self.group, id), Vec::new());
                self.quarantine_delta += 1;
                metrics::QUARANTINED.inc();
            } else {
                for &old in &draft.supersedes {
                    overlay.put(
                        ColumnFamily::StateMachine,
                        keys::supersession_key(self.group, old, id),
                        asserted_at_us.to_be_bytes().to_vec(),
                    );
                }
            }
            // Supersessions change the claims superseded (on the same path): its reads are
            // dropped. Otherwise the claim joins them (below).
            let changes_others = !quarantined && !draft.supersedes.is_empty();
            if changes_others {
                self.touched.push(draft.concept_path.clone());
            }
            overlay.put(ColumnFamily::Index, keys::agent_key(self.group, &draft.agent_id, id), Vec::new());
            let concept_key = keys::concept_key(self.group, &draft.concept_path, &draft.predicate);
            // The stored count as the cache remembers it, unless this call wrote it already.
            let remembered = if overlay.touches(ColumnFamily::Index, &concept_key) {
                None
            } else {
                self.counts.counts.get(&concept_key).copied()
            };
            let count = match remembered {
                Some(count) => count,
                None => match overlay.get(ColumnFamily::Index, &concept_key)? {
                    Some(bytes) => bytes.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0),
                    None => 0,
                },
            };
            self.written_counts.push((concept_key.clone(), count + 1));
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
                // Read as absent at the top of this item.
                let key = keys::request_key(self.group, &draft.agent_id, request_id);
                overlay.put_absent(ColumnFamily::StateMachine, key, codec::encode_outcome(&outcome));
            }
            let record = NewAssertion { id, asserted_at_us, log_index, draft, quarantined };
            overlay.put_absent(
                ColumnFamily::StateMachine,
                keys::assertion_key(self.group, id),
                codec::direct::encode_record(&record),
            );
            if !changes_others {
                added.push(record);
            }
            indexed += 1;
            results.push(Ok(outcome));
        }
        metrics::ASSERTIONS_INDEXED.inc_by(indexed);
        Ok(results)
    }

    /// Applies one command of the entry at `index`; its assertions, if any, are numbered from
    /// position `first` of the entry.
    fn apply_command<'a>(
        &mut self,
        overlay: &mut Overlay,
        added: &mut Vec<NewAssertion<'a>>,
        index: u64,
        command: &'a ShardCommand,
        first: usize,
    ) -> Result<ShardResponse, Fault> {
        Ok(match command {
            ShardCommand::Assert { proposed_at_us, items } => {
                if let Some(refusal) = refuse_numbering(index, first + items.len()) {
                    return Ok(ShardResponse::Refused(refusal));
                }
                ShardResponse::Asserted(self.apply_assert(overlay, added, index, first, *proposed_at_us, items)?)
            }
            ShardCommand::Parts { parts } => {
                let items = parts.iter().map(ShardCommand::item_count).sum::<usize>();
                if let Some(refusal) = refuse_numbering(index, first + items) {
                    return Ok(ShardResponse::Refused(refusal));
                }
                let mut responses = Vec::with_capacity(parts.len());
                let mut next = first;
                for part in parts {
                    let count = part.item_count();
                    // Never built by this code (parts are assertion commands and never nest):
                    // refused, not applied, rather than numbered on a peer's word.
                    let response = if part.is_assertion_part() {
                        self.apply_command(overlay, added, index, part, next)?
                    } else {
                        ShardResponse::TokenExpired
                    };
                    responses.push(response);
                    next += count;
                }
                ShardResponse::Parts(responses)
            }
            ShardCommand::Vote { proposed_at_us, assertion_id, agent_id, value } => ShardResponse::Voted(
                self.apply_vote(overlay, index, *proposed_at_us, *assertion_id, agent_id, *value)?,
            ),
            ShardCommand::Meta { proposed_at_us, command } => {
                ShardResponse::Meta(self.apply_meta(overlay, *proposed_at_us, command.clone())?)
            }
            ShardCommand::Quarantine { proposed_at_us, assertion_id, release, by, reason } => {
                ShardResponse::Quarantine(self.apply_quarantine_decision(
                    overlay,
                    index,
                    *proposed_at_us,
                    *assertion_id,
                    *release,
                    by.clone(),
                    reason.clone(),
                )?)
            }
            ShardCommand::Policy { proposed_at_us, command } => {
                ShardResponse::Policy(self.apply_policy(overlay, *proposed_at_us, command.clone())?)
            }
            ShardCommand::Retract { proposed_at_us, assertion_id, agent_id, admin, reason } => {
                ShardResponse::Retracted(self.apply_retract(
                    overlay,
                    index,
                    *proposed_at_us,
                    *assertion_id,
                    agent_id.clone(),
                    *admin,
                    reason.clone(),
                )?)
            }
            ShardCommand::Once { token, command } => self.apply_once(overlay, added, index, *token, command, first)?,
            // Recorded by `apply`, which knows the entry's term; inside a token it records nothing.
            ShardCommand::Check { .. } => ShardResponse::Empty,
        })
    }

    /// Applies a forwarded proposal once per token: a later copy answers what the first one
    /// produced and changes nothing. Tokens are remembered for [`TOKEN_TTL_US`] of the shard's
    /// clock; a copy older than that is refused rather than risk a second application.
    fn apply_once<'a>(
        &mut self,
        overlay: &mut Overlay,
        added: &mut Vec<NewAssertion<'a>>,
        index: u64,
        token: ProposalToken,
        command: &'a ShardCommand,
        first: usize,
    ) -> Result<ShardResponse, Fault> {
        let key = keys::token_key(self.group, token.issued_at_us, token.nonce);
        if let Some(bytes) = overlay.get(ColumnFamily::StateMachine, &key)? {
            metrics::DEDUPLICATED_PROPOSALS.inc();
            return codec::decode_response(&bytes).map_err(Fault::DamagedRecord);
        }
        if token.issued_at_us.saturating_add(TOKEN_TTL_US) < self.clock_us {
            return Ok(ShardResponse::TokenExpired);
        }
        if matches!(command, ShardCommand::Once { .. } | ShardCommand::Parts { .. }) {
            // Never built by this code; refused rather than recursing on a peer's word.
            return Ok(ShardResponse::TokenExpired);
        }
        let response = self.apply_command(overlay, added, index, command, first)?;
        overlay.put_visible(ColumnFamily::StateMachine, key, codec::encode_response(&response));
        Ok(response)
    }

    fn check_supersedes(&self, overlay: &Overlay, draft: &AssertionDraft) -> Result<Option<ModelError>, Fault> {
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
        overlay: &mut Overlay,
        log_index: u64,
        proposed_at_us: u64,
        assertion_id: AssertionId,
        agent_id: &str,
        value: i8,
    ) -> Result<Result<EventOutcome, ModelError>, Fault> {
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
        overlay: &mut Overlay,
        log_index: u64,
        proposed_at_us: u64,
        assertion_id: AssertionId,
        agent_id: String,
        admin: bool,
        reason: Option<String>,
    ) -> Result<Result<EventOutcome, ModelError>, Fault> {
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
        let pending = keys::quarantine_key(self.group, assertion_id);
        if record.quarantined && overlay.get(ColumnFamily::Index, &pending)?.is_some() {
            self.quarantine_delta -= 1;
        }
        overlay.delete_visible(ColumnFamily::Index, pending);
        let retraction = RetractionRecord { at_us, by: agent_id, reason };
        overlay.put_visible(ColumnFamily::StateMachine, key, codec::encode_event(&retraction));
        Ok(Ok(EventOutcome { assertion_id, at_us, log_index }))
    }

    /// An admin's decision on a quarantined claim. Release: the claim joins the lenses and its
    /// supersessions take effect now. Reject: it is retracted.
    #[allow(clippy::too_many_arguments)]
    fn apply_quarantine_decision(
        &mut self,
        overlay: &mut Overlay,
        log_index: u64,
        proposed_at_us: u64,
        assertion_id: AssertionId,
        release: bool,
        by: String,
        reason: Option<String>,
    ) -> Result<Result<EventOutcome, ModelError>, Fault> {
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
        self.quarantine_delta -= 1;
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
            overlay.put(ColumnFamily::StateMachine, key, codec::encode_event(&decision));
        } else {
            let key = keys::retraction_key(self.group, assertion_id);
            let rejection = RetractionRecord {
                reason: Some(format!(
                    "rejected from quarantine{}",
                    decision.reason.map(|r| format!(": {r}")).unwrap_or_default()
                )),
                ..decision
            };
            overlay.put_visible(ColumnFamily::StateMachine, key, codec::encode_event(&rejection));
        }
        Ok(Ok(EventOutcome { assertion_id, at_us, log_index }))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageOptions;

    const SHARD: u16 = 2;
    const GROUP: GroupId = 3;

    fn draft(value: u32) -> AssertionDraft {
        AssertionDraft::for_test("test/set", "member", "writer", &value.to_string())
    }

    fn applier() -> (tempfile::TempDir, Arc<Storage>, Applier) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open storage");
        let progress = Arc::new(AppliedProgress::default());
        progress.digest.lock().buckets = Some(digest::Buckets::empty(64));
        let applier = Applier::new(storage.clone(), SHARD, GROUP, progress, 0);
        (dir, storage, applier)
    }

    fn at(index: u64) -> Position {
        Position { index, term: 1 }
    }

    /// Applies `commands` at consecutive positions from `first`, with an applied record that
    /// holds the clock.
    fn run(applier: &mut Applier, first: u64, commands: Vec<ShardCommand>) -> Vec<ShardResponse> {
        let entries =
            commands.into_iter().enumerate().map(|(i, c)| (at(first + i as u64), Some(Arc::new(c)))).collect();
        applier
            .apply(entries, keys::applied_key(GROUP), |clock_us| serde_json::to_vec(&clock_us), || {})
            .expect("apply")
    }

    fn stored_assertions(storage: &Storage) -> usize {
        let prefix = keys::assertions_prefix(GROUP);
        storage.scan(ColumnFamily::StateMachine, &prefix, &keys::prefix_end(&prefix), usize::MAX).expect("scan").len()
    }

    fn assert_once(token: ProposalToken, value: u32) -> ShardCommand {
        ShardCommand::Once {
            token,
            command: Box::new(ShardCommand::Assert { proposed_at_us: token.issued_at_us, items: vec![draft(value)] }),
        }
    }

    fn assert_once_items(token: ProposalToken, items: Vec<AssertionDraft>) -> ShardCommand {
        ShardCommand::Once {
            token,
            command: Box::new(ShardCommand::Assert { proposed_at_us: token.issued_at_us, items }),
        }
    }

    fn outcomes(response: &ShardResponse) -> Vec<AssertOutcome> {
        match response {
            ShardResponse::Asserted(results) => results.iter().map(|r| r.clone().expect("applied")).collect(),
            other => panic!("unexpected response {other:?}"),
        }
    }

    /// What the claims-cache test does next.
    #[derive(Debug, Clone)]
    enum Step {
        /// Items (path, predicate, quarantined, supersede one of the path's claims) in one entry.
        Assert(Vec<(usize, usize, bool, Option<usize>)>),
        Vote(usize, bool),
        Retract(usize),
        /// Read (path, predicate filter): caches it.
        Read(usize, Option<usize>),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let item = (0..3usize, 0..3usize, proptest::bool::weighted(0.15), proptest::option::weighted(0.15, 0..64usize));
        prop_oneof![
            4 => proptest::collection::vec(item, 1..4).prop_map(Step::Assert),
            1 => (0..64usize, any::<bool>()).prop_map(|(i, up)| Step::Vote(i, up)),
            1 => (0..64usize).prop_map(Step::Retract),
            4 => (0..3usize, proptest::option::of(0..3usize)).prop_map(|(p, f)| Step::Read(p, f)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Applies bring the claims cache up to date or drop what they change: after every step
        /// each cached read equals the claims as storage holds them, new claims included in
        /// their place, whether they came from an apply that only added claims (kept and
        /// updated) or one that changed others (dropped).
        #[test]
        fn cached_claims_equal_the_stored_ones_after_every_apply(steps in proptest::collection::vec(step(), 1..40)) {
            let reads = steps.iter().any(|s| matches!(s, Step::Read(..)));
            let (_dir, storage, mut applier) = applier();
            let reader = super::super::reader::ShardReader::new(storage, SHARD, GROUP, applier.progress.clone());
            let paths = ["c/0", "c/1", "c/2"];
            let predicates = ["p", "pq", "q"];
            let mut ids: Vec<(usize, AssertionId)> = Vec::new();
            let mut index = 1;
            let mut compared = 0;
            for step in steps {
                let command = match step {
                    Step::Read(path, filter) => {
                        reader.claims(paths[path], filter.map(|f| predicates[f]), None).expect("read");
                        None
                    }
                    Step::Assert(items) => {
                        let drafts = items.iter().map(|&(path, predicate, quarantined, supersede)| {
                            let mut draft = AssertionDraft::for_test(paths[path], predicates[predicate], "writer", "1");
                            let same_path: Vec<AssertionId> = ids.iter().filter(|(p, _)| *p == path).map(|(_, id)| *id).collect();
                            if let Some(pick) = supersede.filter(|_| !same_path.is_empty()) {
                                draft.supersedes = vec![same_path[pick % same_path.len()]];
                            }
                            if quarantined {
                                draft.quarantine = Some(crate::model::assertion::QuarantineDecision { reason: "circuit_breaker_open".into(), detail: "test".into() });
                            }
                            (path, draft)
                        }).collect::<Vec<_>>();
                        let (owners, items): (Vec<usize>, Vec<AssertionDraft>) = drafts.into_iter().unzip();
                        let response = run(&mut applier, index, vec![ShardCommand::Assert { proposed_at_us: 0, items }]);
                        let ShardResponse::Asserted(results) = &response[0] else { panic!("{response:?}") };
                        for (owner, result) in owners.into_iter().zip(results) {
                            if let Ok(outcome) = result {
                                ids.push((owner, outcome.id));
                            }
                        }
                        index += 1;
                        None
                    }
                    Step::Vote(pick, up) if !ids.is_empty() => Some(ShardCommand::Vote {
                        proposed_at_us: 0,
                        assertion_id: ids[pick % ids.len()].1,
                        agent_id: "voter".into(),
                        value: if up { 1 } else { -1 },
                    }),
                    Step::Retract(pick) if !ids.is_empty() => Some(ShardCommand::Retract {
                        proposed_at_us: 0,
                        assertion_id: ids[pick % ids.len()].1,
                        agent_id: "admin".into(),
                        admin: true,
                        reason: None,
                    }),
                    Step::Vote(..) | Step::Retract(_) => None,
                };
                if let Some(command) = command {
                    run(&mut applier, index, vec![command]);
                    index += 1;
                }
                let cache = &applier.progress.claims_cache;
                for path in paths {
                    for filter in std::iter::once(None).chain(predicates.iter().map(|p| Some(*p))) {
                        let Some(cached) = cache.get(path, filter) else { continue };
                        let stored = reader.claims_uncached(path, filter);
                        proptest::prop_assert_eq!(
                            serde_json::to_string(&cached.groups).expect("json"),
                            serde_json::to_string(&stored).expect("json"),
                            "{} {:?}", path, filter
                        );
                        proptest::prop_assert_eq!(cached.memory_bytes(), crate::shard::claims_cache::claims_bytes(&stored));
                        compared += 1;
                    }
                }
            }
            proptest::prop_assert!(compared > 0 || !reads, "a read is cached at once: something was compared");
        }
    }

    /// A write adds its claim to the cached reads of its concept instead of dropping them: the
    /// next read is served from the cache (no storage read), with the new claim.
    #[test]
    fn a_new_claim_joins_the_cached_reads_of_its_concept() {
        let (_dir, storage, mut applier) = applier();
        let reader = super::super::reader::ShardReader::new(storage, SHARD, GROUP, applier.progress.clone());
        run(&mut applier, 1, vec![ShardCommand::Assert { proposed_at_us: 0, items: vec![draft(1), draft(2)] }]);
        let before = reader.claims("test/set", None, None).expect("read").expect("claims");
        let filtered = reader.claims("test/set", Some("member"), None).expect("read").expect("claims");
        let other = reader.claims("test/set", Some("owner"), None).expect("read").expect("claims");
        let generation = applier.progress.claims_cache.generation();
        let added =
            outcomes(&run(&mut applier, 2, vec![ShardCommand::Assert { proposed_at_us: 0, items: vec![draft(3)] }])[0]);
        assert!(applier.progress.claims_cache.generation() > generation, "readers of the old state may not insert");
        let progress = applier.progress.clone();
        let cache = &progress.claims_cache;
        let after = cache.get("test/set", None).expect("still cached");
        assert!(!Arc::ptr_eq(&before, &after), "a new read, not the old one changed");
        assert_eq!(before.groups[0].claims.len(), 2, "a read already handed out stays as it was");
        let claims = &after.groups[0].claims;
        assert_eq!(claims.len(), 3);
        assert_eq!(claims[2].record.id, added[0].id);
        assert!(Arc::ptr_eq(&claims[0], &before.groups[0].claims[0]), "the other claims are shared, not copied");
        assert_eq!(cache.get("test/set", Some("member")).expect("cached").groups[0].claims.len(), 3);
        assert!(!Arc::ptr_eq(&filtered, &cache.get("test/set", Some("member")).expect("cached")));
        let untouched = cache.get("test/set", Some("owner")).expect("another predicate's read stays");
        assert!(Arc::ptr_eq(&other, &untouched), "and is the same read, renderings and all");
        // A supersession changes the claim superseded: the path's reads are dropped.
        let mut superseding = draft(4);
        superseding.supersedes = vec![added[0].id];
        run(&mut applier, 3, vec![ShardCommand::Assert { proposed_at_us: 0, items: vec![superseding] }]);
        assert!(cache.get("test/set", None).is_none() && cache.get("test/set", Some("owner")).is_none());
    }

    /// A leader's entry of several proposals (its own batch and forwarded ones in their tokens):
    /// every item gets its own position, so its own id; each part answers on its own; a copy of
    /// a forwarded part in a later entry answers the first copy's result and writes nothing; and
    /// a part that is not an assertion command is refused without touching the others.
    #[test]
    fn parts_number_their_items_apart_and_keep_their_tokens() {
        let (_dir, storage, mut applier) = applier();
        let token = ProposalToken::new();
        let own = ShardCommand::Assert { proposed_at_us: token.issued_at_us, items: vec![draft(1), draft(2)] };
        let forwarded = ShardCommand::Once {
            token,
            command: Box::new(ShardCommand::Assert {
                proposed_at_us: token.issued_at_us,
                items: vec![draft(3), draft(4)],
            }),
        };
        let responses = run(&mut applier, 1, vec![ShardCommand::Parts { parts: vec![own, forwarded] }]);
        let ShardResponse::Parts(parts) = &responses[0] else { panic!("unexpected response {responses:?}") };
        assert_eq!(parts.len(), 2);
        let ids: Vec<AssertionId> = parts.iter().flat_map(outcomes).map(|o| o.id).collect();
        assert_eq!(ids.len(), 4);
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), 4, "each item of the entry has its own id: {ids:?}");
        assert_eq!(stored_assertions(&storage), 4);
        // The forwarded part sent again (its node did not hear the answer) changes nothing.
        let again = run(&mut applier, 2, vec![assert_once_items(token, vec![draft(3), draft(4)])]);
        assert_eq!(outcomes(&again[0]), outcomes(&parts[1]));
        assert_eq!(stored_assertions(&storage), 4);
        // A part no leader builds (a vote) is refused; the assertion beside it is applied.
        let vote = ShardCommand::Vote {
            proposed_at_us: token.issued_at_us,
            assertion_id: ids[0],
            agent_id: "agent".into(),
            value: 1,
        };
        let own = ShardCommand::Assert { proposed_at_us: token.issued_at_us, items: vec![draft(5)] };
        let mixed = run(&mut applier, 3, vec![ShardCommand::Parts { parts: vec![vote, own] }]);
        let ShardResponse::Parts(mixed) = &mixed[0] else { panic!("unexpected response {mixed:?}") };
        assert!(matches!(mixed[0], ShardResponse::TokenExpired), "{:?}", mixed[0]);
        assert_eq!(outcomes(&mixed[1]).len(), 1);
        assert_eq!(stored_assertions(&storage), 5);
    }

    /// A forwarded proposal retried after an ambiguous failure lands twice in the log, in the
    /// same apply call or a later one; each copy must answer the first one's result and write
    /// nothing. Without tokens, both copies were applied (issue 14 §1).
    #[test]
    fn copies_of_a_tokened_proposal_apply_once() {
        let (_dir, storage, mut applier) = applier();
        let token = ProposalToken::new();
        let other = ProposalToken::new();
        let responses = run(&mut applier, 1, vec![assert_once(token, 1), assert_once(token, 1), assert_once(other, 2)]);
        assert_eq!(outcomes(&responses[0]), outcomes(&responses[1]), "the copy answers the first result");
        assert_ne!(outcomes(&responses[0]), outcomes(&responses[2]), "another token is another write");
        let later = run(&mut applier, 4, vec![assert_once(token, 1)]);
        assert_eq!(outcomes(&later[0]), outcomes(&responses[0]));
        assert_eq!(stored_assertions(&storage), 2, "one assertion per token");
        // The same command without a token is applied every time: that was the bug.
        let untokened = ShardCommand::Assert { proposed_at_us: token.issued_at_us, items: vec![draft(1)] };
        run(&mut applier, 5, vec![untokened.clone(), untokened]);
        assert_eq!(stored_assertions(&storage), 4);
    }

    #[test]
    fn an_expired_token_is_refused_not_applied() {
        let (_dir, storage, mut applier) = applier();
        let now = crate::model::id::now_us();
        run(&mut applier, 1, vec![ShardCommand::Assert { proposed_at_us: now, items: vec![draft(1)] }]);
        let stale = ProposalToken { issued_at_us: now - TOKEN_TTL_US - 1_000_000, nonce: 7 };
        let responses = run(&mut applier, 2, vec![assert_once(stale, 2)]);
        assert!(matches!(responses[0], ShardResponse::TokenExpired), "{:?}", responses[0]);
        assert_eq!(stored_assertions(&storage), 1);
    }

    /// Assertion ids number an entry's items in 12 bits: a longer command is refused whole, by
    /// every replica alike, instead of wrapping ids into each other.
    #[test]
    fn an_entry_with_more_items_than_ids_can_number_is_refused_whole() {
        let (_dir, storage, mut applier) = applier();
        let items: Vec<AssertionDraft> = (0..crate::model::id::MAX_ITEMS_PER_ENTRY as u32 + 1).map(draft).collect();
        let responses =
            run(&mut applier, 1, vec![ShardCommand::Assert { proposed_at_us: crate::model::id::now_us(), items }]);
        assert!(
            matches!(responses[0], ShardResponse::Refused(ModelError::CommandTooLarge { items: 4097, limit: 4096 })),
            "{:?}",
            responses[0]
        );
        assert_eq!(stored_assertions(&storage), 0);
    }

    /// The shard clock never runs backwards, whatever the proposers' clocks say, and the
    /// caller's applied record is written with the clock after the run, in the same batch.
    #[test]
    fn the_clock_is_monotonic_and_lands_in_the_applied_record() {
        let (_dir, storage, mut applier) = applier();
        let assert_at = |t: u64| ShardCommand::Assert { proposed_at_us: t, items: vec![draft(t as u32)] };
        let responses = run(&mut applier, 1, vec![assert_at(1_000), assert_at(500), assert_at(2_000)]);
        let times: Vec<u64> = responses.iter().flat_map(outcomes).map(|o| o.asserted_at_us).collect();
        assert_eq!(times, vec![1_000, 1_001, 2_000]);
        let record = storage.get(ColumnFamily::StateMachine, &keys::applied_key(GROUP)).expect("get").expect("record");
        assert_eq!(serde_json::from_slice::<u64>(&record).expect("clock"), 2_000);
        assert_eq!(applier.clock_us(), 2_000);
    }

    /// A failure to write the batch names the last entry of the run; nothing of it is applied.
    #[test]
    fn a_failed_applied_record_fails_the_run_and_writes_nothing() {
        let (_dir, storage, mut applier) = applier();
        let command = ShardCommand::Assert { proposed_at_us: 1, items: vec![draft(1)] };
        let entries = vec![(at(7), Some(Arc::new(command))), (at(8), None)];
        let error = applier
            .apply(entries, keys::applied_key(GROUP), |_| Err(serde::ser::Error::custom("injected")), || {})
            .expect_err("the record fails");
        assert_eq!(error.position(), at(8));
        assert!(error.is_write());
        assert_eq!(stored_assertions(&storage), 0);
    }

    /// Concept counts come from the applier's cache once it has written them: right across
    /// applies and within one, not taken from an apply that failed, and read again from storage
    /// after anything else held the index lock (where an index repair writes them).
    #[test]
    fn concept_counts_stay_right_across_applies_failures_and_other_writers() {
        let (_dir, storage, mut applier) = applier();
        let key = keys::concept_key(GROUP, "test/set", "member");
        let other = keys::concept_key(GROUP, "test/other", "member");
        let count = |key: &[u8]| {
            storage.get(ColumnFamily::Index, key).expect("get").map(|v| u64::from_be_bytes(v.try_into().expect("8")))
        };
        let assert = |values: &[u32]| ShardCommand::Assert {
            proposed_at_us: 1,
            items: values.iter().map(|&v| draft(v)).collect(),
        };
        run(&mut applier, 1, vec![assert(&[1, 2, 3])]);
        let elsewhere = AssertionDraft::for_test("test/other", "member", "writer", "7");
        run(&mut applier, 2, vec![assert(&[4]), ShardCommand::Assert { proposed_at_us: 1, items: vec![elsewhere] }]);
        run(&mut applier, 4, vec![assert(&[5])]);
        assert_eq!((count(&key), count(&other)), (Some(5), Some(1)));
        assert_eq!(applier.counts.counts.get(&key), Some(&5), "remembered");
        // Remembered, not read: a count written behind the applier's back without the lock
        // (which nothing does) is not seen, and two claims in one apply add two.
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::Index, key.clone(), 1000u64.to_be_bytes().to_vec());
        storage.write(batch, Durability::Buffered).expect("write");
        run(&mut applier, 5, vec![assert(&[6, 7])]);
        assert_eq!(count(&key), Some(7));
        // A failed apply writes nothing, and none of its counts is remembered.
        let elsewhere = AssertionDraft::for_test("test/other", "member", "writer", "8");
        let failed = applier.apply(
            vec![
                (at(6), Some(Arc::new(assert(&[8, 9])))),
                (at(7), Some(Arc::new(ShardCommand::Assert { proposed_at_us: 1, items: vec![elsewhere] }))),
            ],
            keys::applied_key(GROUP),
            |_| Err(serde::ser::Error::custom("injected")),
            || {},
        );
        assert!(failed.is_err());
        run(&mut applier, 6, vec![assert(&[10])]);
        let elsewhere = AssertionDraft::for_test("test/other", "member", "writer", "9");
        run(&mut applier, 7, vec![ShardCommand::Assert { proposed_at_us: 1, items: vec![elsewhere] }]);
        assert_eq!((count(&key), count(&other)), (Some(8), Some(2)));
        // Another holder of the index lock (an index repair) writes a count.
        {
            let _repair = applier.progress.index_lock.lock();
            let mut batch = WriteBatch::new();
            batch.put(ColumnFamily::Index, key.clone(), 100u64.to_be_bytes().to_vec());
            storage.write(batch, Durability::Buffered).expect("write");
        }
        run(&mut applier, 8, vec![assert(&[11])]);
        assert_eq!((count(&key), count(&other)), (Some(101), Some(2)));
        // A holder that only reads (a scrub) leaves what the applier remembers.
        drop(applier.progress.index_lock.lock_to_read());
        assert_eq!(applier.counts.counts.get(&key), Some(&101));
        run(&mut applier, 9, vec![assert(&[12])]);
        assert_eq!(applier.counts.counts.get(&key), Some(&102));
    }

    /// The cache of concept counts never holds more than its bound.
    #[test]
    fn the_count_cache_is_bounded() {
        let mut cache = CountCache::default();
        let (charge, mut most) = (8 + COUNT_ENTRY_OVERHEAD, 0);
        for i in 0..(COUNT_CACHE_BYTES as u64 / 8) {
            cache.insert(i.to_be_bytes().to_vec(), i);
            assert!(cache.bytes <= COUNT_CACHE_BYTES);
            assert_eq!(cache.bytes, cache.counts.len() * charge);
            most = most.max(cache.counts.len());
        }
        assert_eq!(most, COUNT_CACHE_BYTES / charge, "it fills up to its bound");
        // A key it holds is replaced in place, even when full.
        let held = cache.counts.keys().next().cloned().expect("a key");
        let before = cache.counts.len();
        cache.insert(held.clone(), 7);
        assert_eq!((cache.counts.len(), cache.counts.get(&held)), (before, Some(&7)));
        cache.check(1);
        assert!(cache.counts.is_empty() && cache.bytes == 0);
    }

    /// An apply that reaches a retired replica (queued on the apply pool while the replica was
    /// deleted) fails and writes nothing.
    #[test]
    fn a_retired_replica_applies_nothing() {
        let (_dir, storage, mut applier) = applier();
        applier.progress.retired.store(true, std::sync::atomic::Ordering::Release);
        let command = ShardCommand::Assert { proposed_at_us: 1, items: vec![draft(1)] };
        let error = applier
            .apply(vec![(at(7), Some(Arc::new(command)))], keys::applied_key(GROUP), |_| Ok(b"applied".to_vec()), || {})
            .expect_err("retired");
        assert!(matches!(error.fault, Fault::Retired), "{error}");
        assert_eq!(stored_assertions(&storage), 0);
        assert_eq!(storage.get(ColumnFamily::StateMachine, &keys::applied_key(GROUP)).expect("read"), None);
    }

    /// The replica's count of claims awaiting a quarantine decision follows every way in and
    /// out (quarantined assert, release, reject, retraction) and is recounted from storage by a
    /// new applier.
    #[test]
    fn the_quarantine_backlog_is_counted() {
        let (_dir, storage, mut applier) = applier();
        let pending =
            |applier: &Applier| applier.progress.quarantine_pending.load(std::sync::atomic::Ordering::Acquire);
        let quarantined = |value: u32| {
            let mut draft = draft(value);
            draft.quarantine = Some(crate::model::assertion::QuarantineDecision {
                reason: "authority_required".into(),
                detail: "test".into(),
            });
            draft
        };
        let asserted = run(
            &mut applier,
            1,
            vec![ShardCommand::Assert {
                proposed_at_us: 1,
                items: (1..=4).map(quarantined).chain([draft(9)]).collect(),
            }],
        );
        let ids: Vec<AssertionId> = outcomes(&asserted[0]).iter().map(|o| o.id).collect();
        assert_eq!(pending(&applier), 4, "four quarantined, one not");
        let decide = |id, release| ShardCommand::Quarantine {
            proposed_at_us: 2,
            assertion_id: id,
            release,
            by: "admin".into(),
            reason: None,
        };
        let retract = |id| ShardCommand::Retract {
            proposed_at_us: 3,
            assertion_id: id,
            agent_id: "writer".into(),
            admin: true,
            reason: None,
        };
        run(&mut applier, 2, vec![decide(ids[0], true), decide(ids[1], false), retract(ids[4])]);
        assert_eq!(pending(&applier), 2, "a release and a reject leave two; retracting a free claim changes nothing");
        run(&mut applier, 5, vec![retract(ids[2]), decide(ids[2], true)]);
        assert_eq!(pending(&applier), 1, "a retraction takes a claim out; a decision on it is refused");
        let reopened = Applier::new(storage.clone(), SHARD, GROUP, Arc::new(AppliedProgress::default()), 0);
        assert_eq!(pending(&reopened), 1, "recounted from the index");
    }

    /// An agent repeating or flipping its vote forever must not make the assertion's events grow
    /// without bound: repeats write nothing, flips keep the last MAX_VOTES_PER_AGENT.
    #[test]
    fn an_agents_votes_on_an_assertion_stay_bounded() {
        let (_dir, storage, mut applier) = applier();
        let asserted = run(&mut applier, 1, vec![ShardCommand::Assert { proposed_at_us: 1, items: vec![draft(1)] }]);
        let id = outcomes(&asserted[0])[0].id;
        let vote = |value: i8| ShardCommand::Vote {
            proposed_at_us: crate::model::id::now_us(),
            assertion_id: id,
            agent_id: "voter".into(),
            value,
        };
        let votes_prefix = keys::agent_votes_prefix(GROUP, id, "voter");
        let stored = |storage: &Storage| {
            storage
                .scan(ColumnFamily::StateMachine, &votes_prefix, &keys::prefix_end(&votes_prefix), usize::MAX)
                .expect("scan")
        };
        // Repeats, in one apply call and across calls.
        run(&mut applier, 2, (2..12).map(|_| vote(1)).collect());
        run(&mut applier, 12, vec![vote(1)]);
        assert_eq!(stored(&storage).len(), 1, "a repeated vote writes nothing");
        // Flips, in one call and across calls.
        run(&mut applier, 13, (13..53).map(|i| vote(if i % 2 == 0 { 1 } else { -1 })).collect());
        for i in 53..60 {
            run(&mut applier, i, vec![vote(if i % 2 == 0 { 1 } else { -1 })]);
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

#[cfg(test)]
mod digest_tests {
    use super::*;
    use crate::storage::StorageOptions;

    const GROUP: GroupId = 5;

    /// Whatever the commands (inserts, vote flips that delete old votes, retractions,
    /// quarantine decisions, tokened copies), the digests the applier keeps equal the ones
    /// recomputed from what it stored, stored ones included; a check entry records the digests
    /// as of its own position in a batch.
    #[test]
    fn kept_digests_equal_the_stored_records_and_checks_record_their_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open storage");
        let progress = Arc::new(AppliedProgress::default());
        progress.digest.lock().buckets = Some(digest::load_or_rebuild(&storage, GROUP, 64).expect("digests"));
        let mut applier = Applier::new(storage.clone(), 4, GROUP, progress.clone(), 0);
        let index = std::cell::Cell::new(0u64);
        let apply = |applier: &mut Applier, commands: Vec<ShardCommand>| {
            let entries: Vec<Applicable> = commands
                .into_iter()
                .map(|c| {
                    index.set(index.get() + 1);
                    (Position { index: index.get(), term: 2 }, Some(Arc::new(c)))
                })
                .collect();
            applier.apply(entries, keys::applied_key(GROUP), |clock| serde_json::to_vec(&clock), || {}).expect("apply")
        };
        let draft = |n: u32| AssertionDraft::for_test("digest/set", "member", "writer", &n.to_string());
        // Every other draft carries a request id, stored with its outcome; item 16 repeats
        // item 0's (request-0) in the same entry.
        let tokened = |n: u32| {
            let mut draft = draft(n);
            if n % 2 == 0 {
                draft.request_id = Some(format!("request-{}", n % 16));
            }
            draft
        };
        let asserted = apply(
            &mut applier,
            vec![ShardCommand::Assert { proposed_at_us: 1, items: (0..18).map(tokened).collect() }],
        );
        let ShardResponse::Asserted(results) = &asserted[0] else { panic!("not an assert response") };
        let first: Vec<&AssertOutcome> = results.iter().map(|r| r.as_ref().expect("asserted")).collect();
        assert_eq!(first.iter().filter(|o| o.duplicate).count(), 1, "request-0 again, as item 16");
        let ids: Vec<AssertionId> = first.iter().filter(|o| !o.duplicate).map(|o| o.id).collect();
        // A later entry repeats a stored request id and asserts anew.
        let fresh = {
            let mut draft = draft(40);
            draft.request_id = Some("request-new".into());
            draft
        };
        let again =
            apply(&mut applier, vec![ShardCommand::Assert { proposed_at_us: 2, items: vec![tokened(2), fresh] }]);
        let ShardResponse::Asserted(again) = &again[0] else { panic!("not an assert response") };
        let duplicates: Vec<bool> = again.iter().map(|r| r.as_ref().expect("asserted").duplicate).collect();
        assert_eq!(duplicates, [true, false]);
        let before_check = progress.digest.lock().buckets.clone().expect("kept");
        // A batch: a write, a check, another write. The check sees the first write only.
        let vote = |n: usize, value: i8| ShardCommand::Vote {
            proposed_at_us: crate::model::id::now_us(),
            assertion_id: ids[n],
            agent_id: "voter".into(),
            value,
        };
        apply(&mut applier, vec![vote(0, 1), ShardCommand::Check { proposed_at_us: 7 }, vote(1, 1)]);
        let check = progress.digest.lock().last_check.clone().expect("a check was recorded");
        assert_eq!((check.index, check.term, check.proposed_at_us), (index.get() - 1, 2, 7));
        assert_ne!(check.buckets, before_check, "the vote before the check is in it");
        assert_ne!(Some(&check.buckets), progress.digest.lock().buckets.as_ref(), "the vote after it is not");
        assert_eq!(check.root, check.buckets.tree().root());
        // Vote flips past the per-agent bound delete the oldest votes.
        for round in 0..(MAX_VOTES_PER_AGENT as i8 + 4) {
            apply(&mut applier, vec![vote(2, if round % 2 == 0 { 1 } else { -1 })]);
        }
        let retract = |n: usize| ShardCommand::Retract {
            proposed_at_us: 9,
            assertion_id: ids[n],
            agent_id: "writer".into(),
            admin: false,
            reason: Some("digest".into()),
        };
        apply(&mut applier, vec![retract(3), retract(3).once(), retract(4)]);
        let kept = progress.digest.lock().buckets.clone().expect("kept");
        assert_eq!(kept, digest::rebuild(&storage, GROUP, 64).expect("rebuild"), "kept = recomputed");
        assert_eq!(digest::load(&storage, GROUP, 64).expect("load"), Some(kept), "kept = stored");
    }
}
