//! A per-shard cache of the claims about a concept_path, as [`ShardReader::claims`] reads them
//! from storage (index scan, records, events). Queries of hot keys then skip the storage reads.
//!
//! Correctness rests on one rule: an entry never survives an apply that changed its path
//! unless the apply brings it up to date. The state machine writes its batch, then, under the
//! cache lock, drops the entries of the paths whose existing claims it changed (votes,
//! retractions, supersessions, quarantine decisions), adds each new claim that changes no
//! other to the entries of its path ([`ClaimsCache::apply_changes`]), and bumps the generation.
//! A reader notes the generation before reading storage and inserts only if it is unchanged,
//! under the same lock: a read that started before the previous apply's write can never be
//! inserted after it. What a reader inserts between an apply's write and its update has all
//! the earlier applies and all or none of this one's new claims, so adding them (those it
//! lacks, by id) brings its claims up to date too; its renderings, possibly carried over from
//! a rendered-only entry made before the write, are dropped with the old read.
//!
//! Each entry also keeps the query answers rendered from it ([`RenderedResults`]), so a hot
//! key's answer under a lens is computed once per change of its claims or of the policy
//! rather than once per query. They live and die with the entry, and carry the policy version
//! they were rendered under.
//!
//! Under memory pressure an entry first loses its claims and keeps its renderings (the
//! "rendered-only" entries, [`ClaimsCache::rendered`]): a rendering is small whatever the number
//! of claims behind it, so a concept with many claims stays cheap to read for the lenses
//! already asked of it. Such an entry is evicted for good the next time it is the oldest.
//!
//! [`ShardReader::claims`]: super::reader::ShardReader::claims

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use serde_json::value::RawValue;

use super::reader::{ClaimGroup, ClaimsRead};
use crate::model::assertion::NewAssertion;
use crate::model::lens::{ClaimFacts, Lens, SupersessionFact, VoteFact};

thread_local! {
    /// `stemedb_claims_cache_lookups_total` by result: miss, hit, rendered (resolved once per
    /// thread: lookups are on every query).
    static LOOKUPS: [prometheus::IntCounter; 3] = ["miss", "hit", "rendered"]
        .map(|result| super::metrics::CLAIMS_CACHE_LOOKUPS.with_label_values(&[result]));
}

/// Groups with more claims than this are not cached (one read of them is already large).
const MAX_CLAIMS_PER_ENTRY: usize = 256;
/// Rendered answers longer than this are not kept (memory: they are re-rendered instead).
pub const MAX_RENDERED_BYTES: usize = 4096;
/// Budget of a cache nobody configured (tests, tools): 4 MiB.
const DEFAULT_BUDGET_BYTES: usize = 4 << 20;

/// Per path, the cached reads of it by predicate filter (`None`: all predicates). A path has
/// few filters, so a list searched in place, which a lookup by `&str` needs no allocation for.
/// foldhash (randomly seeded per map): this lookup is on every query.
type Entries = HashMap<String, Vec<Entry>, foldhash::fast::RandomState>;

struct Entry {
    predicate: Option<String>,
    read: Arc<ClaimsRead>,
    /// What the claims themselves were charged (renderings are counted by `read.rendered`).
    claims_bytes: usize,
    /// The claims were evicted and `read` holds only the renderings: [`ClaimsCache::get`]
    /// skips the entry, [`ClaimsCache::rendered`] still answers from it.
    rendered_only: bool,
    /// Insertion number: names the entry in the eviction order.
    seq: u64,
}

/// The `results` of a query answer as JSON, by lens, for the present (no `as_of`) and a whole
/// page, each with the policy version it was rendered under (authority levels and vote
/// weights come from the policy).
#[derive(Debug, Default)]
pub struct RenderedResults {
    slots: Mutex<RenderedSlots>,
    /// Set while the read is in a cache, whose budget then counts the renderings.
    cached: AtomicBool,
}

#[derive(Debug, Default)]
struct RenderedSlots {
    slots: Vec<RenderedSlot>,
    /// Bytes of the renderings held.
    bytes: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RenderedSlot {
    pub lens: Lens,
    pub policy_version: u64,
    /// How many results the JSON array holds.
    pub count: usize,
    /// How many groups (predicates) the read rendered had: the rendering answers a query whose
    /// page holds that many.
    pub groups: usize,
    /// The estimated memory of the claims it was rendered from: a query under a smaller
    /// `query.max_memory_per_query_mb` is refused as if it had read them.
    pub claims_bytes: usize,
    pub json: Arc<RawValue>,
}

/// Which rendering a query can use: its lens, the policy version it reads under, and the most
/// groups its page holds (its `limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderKey {
    pub lens: Lens,
    pub policy_version: u64,
    pub max_groups: usize,
}

impl RenderedSlot {
    fn bytes(&self) -> usize {
        std::mem::size_of::<RenderedSlot>() + self.json.get().len()
    }
}

impl RenderedResults {
    pub fn get(&self, lens: Lens, policy_version: u64) -> Option<RenderedSlot> {
        self.slots.lock().slots.iter().find(|s| s.lens == lens && s.policy_version == policy_version).cloned()
    }

    /// Keeps a rendering (replacing one of the same lens), unless it is too long to keep.
    /// Returns the change in bytes held. Reads in a cache go through [`ClaimsCache::render`],
    /// which charges that change to the cache's budget.
    pub fn put(&self, slot: RenderedSlot) -> isize {
        if slot.json.get().len() > MAX_RENDERED_BYTES {
            return 0;
        }
        let mut held = self.slots.lock();
        let before = held.bytes;
        held.slots.retain(|s| s.lens != slot.lens);
        held.slots.push(slot);
        held.bytes = held.slots.iter().map(RenderedSlot::bytes).sum();
        held.bytes as isize - before as isize
    }

    fn bytes(&self) -> usize {
        self.slots.lock().bytes
    }

    /// Copies of the renderings held.
    fn copies(&self) -> Vec<RenderedSlot> {
        self.slots.lock().slots.clone()
    }

    /// Renderings held, keeping those already here when a lens is in both.
    fn adopt(&self, slots: Vec<RenderedSlot>) {
        let mut held = self.slots.lock();
        for slot in slots {
            if !held.slots.iter().any(|s| s.lens == slot.lens) {
                held.slots.push(slot);
            }
        }
        held.bytes = held.slots.iter().map(RenderedSlot::bytes).sum();
    }
}

/// `groups` (in the index's order: by predicate, then by id) with `claims` added in their
/// places, and the estimated memory that adds (none for a claim they hold already); `None` as
/// soon as they would hold more than `max` claims. One copy of `groups` for all of `claims`.
fn with_claims(groups: &[ClaimGroup], claims: &[&Arc<ClaimFacts>], max: usize) -> Option<(Vec<ClaimGroup>, usize)> {
    // Claim keys hold the predicate followed by a 0 byte: groups sort as those bytes do.
    fn key(predicate: &str) -> impl Iterator<Item = u8> + '_ {
        predicate.bytes().chain(std::iter::once(0u8))
    }
    let mut groups = groups.to_vec();
    let mut count: usize = groups.iter().map(|g| g.claims.len()).sum();
    let mut more_bytes = 0;
    for facts in claims {
        let draft = &facts.record.draft;
        match groups.binary_search_by(|g| key(&g.predicate).cmp(key(&draft.predicate))) {
            Ok(at) => {
                let held = &mut groups[at].claims;
                match held.binary_search_by_key(&facts.record.id, |c| c.record.id) {
                    Ok(_) => continue,
                    Err(place) => held.insert(place, Arc::clone(facts)),
                }
                more_bytes += claim_bytes(facts);
            }
            Err(at) => {
                groups.insert(
                    at,
                    ClaimGroup {
                        concept_path: draft.concept_path.clone(),
                        predicate: draft.predicate.clone(),
                        claims: vec![Arc::clone(facts)],
                    },
                );
                more_bytes += claim_bytes(facts) + group_bytes(&draft.concept_path, &draft.predicate);
            }
        }
        count += 1;
        if count > max {
            return None;
        }
    }
    Some((groups, more_bytes))
}

/// An estimate of the heap memory a read of claims holds: the structures and their strings.
pub(crate) fn claims_bytes(groups: &[ClaimGroup]) -> usize {
    groups
        .iter()
        .map(|g| group_bytes(&g.concept_path, &g.predicate) + g.claims.iter().map(|c| claim_bytes(c)).sum::<usize>())
        .sum()
}

/// The estimated memory of one group of claims, without its claims.
pub(crate) fn group_bytes(concept_path: &str, predicate: &str) -> usize {
    std::mem::size_of::<ClaimGroup>() + concept_path.len() + predicate.len()
}

/// The estimated memory of one claim: its facts and their strings.
pub(crate) fn claim_bytes(facts: &ClaimFacts) -> usize {
    use std::mem::size_of;
    let draft = &facts.record.draft;
    size_of::<ClaimFacts>()
        + draft.concept_path.len()
        + draft.predicate.len()
        + draft.value.get().len()
        + draft.agent_id.len()
        + draft.source.as_ref().map_or(0, |s| s.get().len())
        + draft.signature.as_ref().map_or(0, String::len)
        + draft.request_id.as_ref().map_or(0, String::len)
        + draft.quarantine.as_ref().map_or(0, |q| q.reason.len() + q.detail.len())
        + draft.supersedes.len() * 16
        + facts.supersessions.len() * size_of::<SupersessionFact>()
        + facts.votes.iter().map(|v| size_of::<VoteFact>() + v.agent_id.len()).sum::<usize>()
}

/// The cache of one shard's claims reads, bounded by an estimate of the memory it holds.
pub struct ClaimsCache {
    inner: Mutex<Inner>,
    generation: AtomicU64,
}

/// An entry's name in an eviction order: path, predicate filter and insertion number. Names of
/// entries since invalidated, replaced or stripped no longer match an entry's number and are
/// skipped.
type Name = (String, Option<String>, u64);

struct Inner {
    entries: Entries,
    /// Entries with their claims, in insertion order: the oldest is stripped (or evicted, if it
    /// has no renderings) first.
    order: VecDeque<Name>,
    /// Rendered-only entries, in the order they lost their claims: the oldest is evicted first,
    /// once they hold more than half the budget or no entry with claims is left.
    rendered_order: VecDeque<Name>,
    /// Estimated bytes held: every entry's claims and renderings, plus its keys.
    bytes: usize,
    /// Of `bytes`, what the rendered-only entries hold.
    rendered_bytes: usize,
    budget: usize,
    /// Entries held.
    live: usize,
    /// Of `live`, the rendered-only entries.
    rendered_live: usize,
    next_seq: u64,
}

impl Default for ClaimsCache {
    fn default() -> Self {
        ClaimsCache {
            inner: Mutex::new(Inner {
                entries: Entries::default(),
                order: VecDeque::new(),
                rendered_order: VecDeque::new(),
                bytes: 0,
                rendered_bytes: 0,
                budget: DEFAULT_BUDGET_BYTES,
                live: 0,
                rendered_live: 0,
                next_seq: 0,
            }),
            generation: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for ClaimsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("ClaimsCache").field("paths", &inner.entries.len()).field("bytes", &inner.bytes).finish()
    }
}

/// Bytes charged for an entry's keys besides its claims.
fn key_bytes(path: &str, predicate: Option<&str>) -> usize {
    std::mem::size_of::<Entry>() + path.len() + predicate.map_or(0, str::len)
}

impl Inner {
    /// Removes one entry (only if it has insertion number `seq`, when given) and releases
    /// everything it was charged.
    fn remove(&mut self, path: &str, predicate: Option<&str>, seq: Option<u64>) {
        let Some(filters) = self.entries.get_mut(path) else { return };
        let found = filters.iter().position(|e| e.predicate.as_deref() == predicate && seq.is_none_or(|s| s == e.seq));
        let Some(at) = found else { return };
        let entry = filters.swap_remove(at);
        if filters.is_empty() {
            self.entries.remove(path);
        }
        self.release(path, &entry);
    }

    fn release(&mut self, path: &str, entry: &Entry) {
        // Under the cache lock, like every `render`: a rendering kept after this is not
        // charged to a cache that no longer holds the read.
        entry.read.rendered.cached.store(false, Ordering::Release);
        let charged = entry.claims_bytes + entry.read.rendered.bytes() + key_bytes(path, entry.predicate.as_deref());
        self.bytes = self.bytes.saturating_sub(charged);
        if entry.rendered_only {
            self.rendered_bytes = self.rendered_bytes.saturating_sub(charged);
            self.rendered_live = self.rendered_live.saturating_sub(1);
        }
        self.live = self.live.saturating_sub(1);
    }

    /// Adds new claims of `path` (ones that change no other) to its cached reads: each claim to
    /// the reads of all predicates and those of its own. Each read that gains a claim becomes a
    /// new read without renderings (one already holding the claims, read from storage after
    /// the write, too); a rendered-only read is dropped, and so is a read the claims would take
    /// past [`MAX_CLAIMS_PER_ENTRY`] or an eighth of the budget. The claims of one apply are
    /// added together: each read is copied once, however many of them it gains.
    fn add_claims(&mut self, path: &str, claims: &[Arc<ClaimFacts>]) {
        let Some(slot) = self.entries.get_mut(path) else { return };
        let filters = std::mem::take(slot);
        let mut kept = Vec::with_capacity(filters.len());
        for entry in filters {
            let gained: Vec<&Arc<ClaimFacts>> = claims
                .iter()
                .filter(|facts| entry.predicate.as_deref().is_none_or(|p| p == facts.record.draft.predicate))
                .collect();
            if gained.is_empty() {
                kept.push(entry);
                continue;
            }
            self.release(path, &entry);
            if entry.rendered_only {
                continue; // its renderings no longer describe the claims
            }
            // A new read even when this one holds the claims already (a reader read storage
            // after the write and inserted before this update): renderings it carried over from
            // a rendered-only entry were made without them.
            let Some((groups, more_bytes)) = with_claims(&entry.read.groups, &gained, MAX_CLAIMS_PER_ENTRY) else {
                continue;
            };
            let claims_bytes = entry.claims_bytes + more_bytes;
            let charge = claims_bytes + key_bytes(path, entry.predicate.as_deref());
            if charge > self.budget / 8 {
                continue;
            }
            let read = ClaimsRead::measured(groups, claims_bytes);
            read.rendered.cached.store(true, Ordering::Release);
            let seq = self.next_seq;
            self.next_seq += 1;
            self.order.push_back((path.to_string(), entry.predicate.clone(), seq));
            self.bytes += charge;
            self.live += 1;
            super::metrics::CLAIMS_CACHE_READS_UPDATED.inc();
            kept.push(Entry {
                predicate: entry.predicate,
                read: Arc::new(read),
                claims_bytes,
                rendered_only: false,
                seq,
            });
        }
        if kept.is_empty() {
            self.entries.remove(path);
        } else if let Some(slot) = self.entries.get_mut(path) {
            *slot = kept;
        }
    }

    fn remove_path(&mut self, path: &str) {
        if let Some(filters) = self.entries.remove(path) {
            for entry in &filters {
                self.release(path, entry);
            }
        }
    }

    /// Strips or evicts the oldest entries until the estimate fits the budget. Entries with
    /// claims go first: a rendering answers many queries for little memory. But renderings may
    /// not take more than half the budget, so that the claims of a new read stay cached long
    /// enough to be rendered.
    fn evict_to_budget(&mut self) {
        while self.bytes > self.budget {
            let name = if self.rendered_bytes > self.budget / 2 {
                self.rendered_order.pop_front().or_else(|| self.order.pop_front())
            } else {
                self.order.pop_front().or_else(|| self.rendered_order.pop_front())
            };
            let Some((path, predicate, seq)) = name else {
                // Nothing left to evict: the estimate drifted; start over from empty.
                self.clear();
                return;
            };
            if !self.strip(&path, predicate.as_deref(), seq) {
                self.remove(&path, predicate.as_deref(), Some(seq));
            }
        }
        self.compact_order();
    }

    /// Drops the claims of the entry named and keeps its renderings, as a younger entry;
    /// `false` (nothing done) when it is already rendered-only, has no renderings, or is gone.
    fn strip(&mut self, path: &str, predicate: Option<&str>, seq: u64) -> bool {
        let Some(filters) = self.entries.get_mut(path) else { return false };
        let Some(entry) = filters.iter_mut().find(|e| e.seq == seq && e.predicate.as_deref() == predicate) else {
            return false;
        };
        if entry.rendered_only {
            return false;
        }
        let slots = entry.read.rendered.copies();
        if slots.is_empty() {
            return false;
        }
        // Under the cache lock: renderings put into the old read from now on are not charged.
        entry.read.rendered.cached.store(false, Ordering::Release);
        let before = entry.claims_bytes + entry.read.rendered.bytes();
        let kept = ClaimsRead::default();
        kept.rendered.adopt(slots);
        kept.rendered.cached.store(true, Ordering::Release);
        let after = kept.rendered.bytes();
        entry.read = Arc::new(kept);
        entry.claims_bytes = 0;
        entry.rendered_only = true;
        entry.seq = self.next_seq;
        self.next_seq += 1;
        self.rendered_order.push_back((path.to_string(), predicate.map(str::to_string), entry.seq));
        self.bytes = self.bytes.saturating_sub(before) + after;
        self.rendered_bytes += after + key_bytes(path, predicate);
        self.rendered_live += 1;
        true
    }

    /// Invalidations, replacements and strips leave stale names behind: drop them once they
    /// outnumber the live entries, so the orders stay within a constant factor of the entries
    /// held.
    fn compact_order(&mut self) {
        if self.order.len() + self.rendered_order.len() <= 2 * self.live + 64 {
            return;
        }
        let entries = &self.entries;
        let current = |(path, predicate, seq): &Name| {
            entries.get(path).is_some_and(|f| f.iter().any(|e| e.seq == *seq && e.predicate == *predicate))
        };
        self.order.retain(current);
        self.rendered_order.retain(current);
    }

    fn clear(&mut self) {
        for (path, filters) in std::mem::take(&mut self.entries) {
            for entry in &filters {
                self.release(&path, entry);
            }
        }
        self.order.clear();
        self.rendered_order.clear();
        self.bytes = 0;
        self.rendered_bytes = 0;
        self.live = 0;
        self.rendered_live = 0;
    }
}

impl ClaimsCache {
    /// Sets the memory budget (estimated bytes) and evicts down to it.
    pub fn set_budget(&self, bytes: usize) {
        let mut inner = self.inner.lock();
        if inner.budget == bytes {
            return;
        }
        inner.budget = bytes;
        inner.evict_to_budget();
    }

    /// The memory budget (estimated bytes).
    pub fn budget(&self) -> usize {
        self.inner.lock().budget
    }

    /// Estimated bytes held, and the number of cached reads.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.bytes, inner.live)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The cached claims of `path` (under `predicate`), if held.
    pub fn get(&self, path: &str, predicate: Option<&str>) -> Option<Arc<ClaimsRead>> {
        let found = {
            let inner = self.inner.lock();
            let entry = inner.entries.get(path).and_then(|f| f.iter().find(|e| e.predicate.as_deref() == predicate));
            entry.filter(|e| !e.rendered_only).map(|e| e.read.clone())
        };
        LOOKUPS.with(|lookups| lookups[usize::from(found.is_some())].inc());
        found
    }

    /// A rendering of the claims of `path` (under `predicate`) that a query with `key` can
    /// answer with, from an entry with or without its claims; `memory_limit` as the query's.
    pub fn rendered(
        &self,
        path: &str,
        predicate: Option<&str>,
        key: &RenderKey,
        memory_limit: usize,
    ) -> Option<RenderedSlot> {
        let inner = self.inner.lock();
        let entry = inner.entries.get(path)?.iter().find(|e| e.predicate.as_deref() == predicate)?;
        let slot = entry.read.rendered.get(key.lens, key.policy_version)?;
        let usable = slot.groups <= key.max_groups && slot.claims_bytes <= memory_limit;
        if usable {
            LOOKUPS.with(|lookups| lookups[2].inc());
        }
        usable.then_some(slot)
    }

    /// Entries held with their claims, and entries holding only renderings.
    pub fn entry_kinds(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.live - inner.rendered_live, inner.rendered_live)
    }

    /// Caches what a reader read from storage, unless an apply invalidated anything since the
    /// reader noted `generation`, or it is too large for the budget.
    pub fn insert_if_current(&self, generation: u64, path: &str, predicate: Option<&str>, read: &Arc<ClaimsRead>) {
        if read.groups.iter().map(|g| g.claims.len()).sum::<usize>() > MAX_CLAIMS_PER_ENTRY {
            return;
        }
        let claims_bytes = read.memory_bytes();
        let mut inner = self.inner.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let charge = claims_bytes + read.rendered.bytes() + key_bytes(path, predicate);
        if charge > inner.budget / 8 {
            return; // one entry may not crowd out most of the others
        }
        // A rendered-only entry of the path is as current as this read (an apply that touched
        // the path would have dropped it): its renderings carry over.
        let carried = inner.entries.get(path).and_then(|filters| {
            filters
                .iter()
                .find(|e| e.predicate.as_deref() == predicate && e.rendered_only)
                .map(|e| e.read.rendered.copies())
        });
        inner.remove(path, predicate, None);
        let charge = match carried {
            Some(slots) => {
                let before = read.rendered.bytes();
                read.rendered.adopt(slots);
                charge + read.rendered.bytes() - before
            }
            None => charge,
        };
        read.rendered.cached.store(true, Ordering::Release);
        inner.bytes += charge;
        inner.live += 1;
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.entries.entry(path.to_string()).or_default().push(Entry {
            predicate: predicate.map(str::to_string),
            read: read.clone(),
            claims_bytes,
            rendered_only: false,
            seq,
        });
        inner.order.push_back((path.to_string(), predicate.map(str::to_string), seq));
        inner.evict_to_budget();
    }

    /// Keeps a rendering of `read` and, while the read is cached here, charges it to the budget.
    pub fn render(&self, read: &ClaimsRead, slot: RenderedSlot) {
        let mut inner = self.inner.lock();
        let delta = read.rendered.put(slot);
        if read.rendered.cached.load(Ordering::Acquire) {
            inner.bytes = inner.bytes.saturating_add_signed(delta);
            inner.evict_to_budget();
        }
    }

    /// Drops the reads of `paths`, as an apply that changed their claims does.
    #[cfg(test)]
    pub fn invalidate<'a>(&self, paths: impl IntoIterator<Item = &'a str>) {
        self.apply_changes(paths, &[]);
    }

    /// Called by the state machine after writing an apply's batch. The reads of the paths in
    /// `touched` are dropped (a claim of theirs changed: a vote, a retraction, a supersession,
    /// a quarantine decision). The assertions in `added` changed nothing but their own claim:
    /// each joins the cached reads of its path in place, at its place in id order, so the next
    /// read of a concept being written does not load every claim from storage again. A read
    /// that gains a claim loses its renderings (they no longer describe it); a read of another
    /// predicate of the path keeps everything.
    pub fn apply_changes<'a>(&self, touched: impl IntoIterator<Item = &'a str>, added: &[NewAssertion<'_>]) {
        let mut touched: Vec<&str> = touched.into_iter().collect();
        touched.sort_unstable();
        touched.dedup();
        let mut inner = self.inner.lock();
        for path in &touched {
            inner.remove_path(path);
        }
        // The new claims of cached paths, grouped by path (a stable sort keeps each path's in
        // the order applied). Only these are copied out of the entry.
        let mut cached = Vec::new();
        for new in added {
            let path = new.draft.concept_path.as_str();
            if touched.binary_search(&path).is_ok() || !inner.entries.contains_key(path) {
                continue;
            }
            cached.push(Arc::new(ClaimFacts::new(new.to_stored())));
        }
        cached.sort_by(|a, b| a.record.draft.concept_path.cmp(&b.record.draft.concept_path));
        for claims in cached.chunk_by(|a, b| a.record.draft.concept_path == b.record.draft.concept_path) {
            inner.add_claims(&claims[0].record.draft.concept_path, claims);
        }
        inner.evict_to_budget();
        // Readers that read storage before the write must not insert what they read.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops everything (snapshot installed, indexes repaired).
    pub fn clear(&self) {
        let mut inner = self.inner.lock();
        inner.clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::assertion::StoredAssertion;
    use crate::model::id::AssertionId;

    fn group(path: &str) -> ClaimsRead {
        ClaimsRead::new(vec![super::super::reader::ClaimGroup {
            concept_path: path.into(),
            predicate: "p".into(),
            claims: Vec::new(),
        }])
    }

    #[test]
    fn renderings_are_kept_per_lens_and_policy_version() {
        let rendered = RenderedResults::default();
        let slot = |lens, policy_version, text: &str| RenderedSlot {
            lens,
            policy_version,
            count: 1,
            groups: 1,
            claims_bytes: 0,
            json: Arc::from(RawValue::from_string(text.to_string()).expect("json")),
        };
        rendered.put(slot(Lens::Authority, 3, "[1]"));
        assert!(rendered.get(Lens::Authority, 4).is_none(), "a policy change invalidates");
        assert!(rendered.get(Lens::Recency, 3).is_none(), "per lens");
        assert_eq!(rendered.get(Lens::Authority, 3).map(|s| s.json.get().to_string()), Some("[1]".into()));
        rendered.put(slot(Lens::Authority, 4, "[2]"));
        assert!(rendered.get(Lens::Authority, 3).is_none(), "replaced");
        assert_eq!(rendered.get(Lens::Authority, 4).map(|s| s.json.get().to_string()), Some("[2]".into()));
        let long = format!("[\"{}\"]", "x".repeat(MAX_RENDERED_BYTES));
        rendered.put(slot(Lens::Recency, 4, &long));
        assert!(rendered.get(Lens::Recency, 4).is_none(), "too long to keep");
    }

    #[test]
    fn a_read_that_raced_an_apply_is_not_cached() {
        let cache = ClaimsCache::default();
        let before = cache.generation();
        cache.invalidate(["a"]);
        cache.insert_if_current(before, "a", None, &Arc::new(group("a")));
        assert!(cache.get("a", None).is_none(), "read started before the apply");
        let now = cache.generation();
        cache.insert_if_current(now, "a", None, &Arc::new(group("a")));
        assert!(cache.get("a", None).is_some());
        assert!(cache.get("a", Some("p")).is_none(), "per predicate");
        cache.invalidate(["b"]);
        assert!(cache.get("a", None).is_some(), "other paths stay");
        cache.invalidate(["a"]);
        assert!(cache.get("a", None).is_none());
    }

    fn charge_of(path: &str) -> usize {
        claims_bytes(&group(path).groups) + key_bytes(path, None)
    }

    #[test]
    fn the_estimated_memory_stays_within_the_budget_and_the_oldest_reads_go_first() {
        let cache = ClaimsCache::default();
        let one = charge_of("k00");
        cache.set_budget(10 * one);
        for i in 0..25 {
            let path = format!("k{i:02}");
            cache.insert_if_current(cache.generation(), &path, None, &Arc::new(group(&path)));
            let (bytes, _) = cache.usage();
            assert!(bytes <= 10 * one, "{bytes} bytes held over a budget of {}", 10 * one);
        }
        assert_eq!(cache.usage(), (10 * one, 10));
        assert!(cache.get("k14", None).is_none(), "the oldest were evicted");
        assert!(cache.get("k15", None).is_some() && cache.get("k24", None).is_some(), "the newest stay");
        cache.set_budget(4 * one);
        assert_eq!(cache.usage(), (4 * one, 4), "a smaller budget evicts at once");
        cache.invalidate(["k24", "k23"]);
        assert_eq!(cache.usage(), (2 * one, 2), "invalidation gives the memory back");
        cache.clear();
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn renderings_count_against_the_budget_only_while_their_read_is_cached() {
        let cache = ClaimsCache::default();
        let read = Arc::new(group("a"));
        cache.insert_if_current(cache.generation(), "a", None, &read);
        let (before, _) = cache.usage();
        let json: Arc<RawValue> =
            Arc::from(RawValue::from_string(format!("[\"{}\"]", "x".repeat(1000))).expect("json"));
        let slot =
            RenderedSlot { lens: Lens::Authority, policy_version: 1, count: 1, groups: 1, claims_bytes: 0, json };
        cache.render(&read, slot.clone());
        let (after, _) = cache.usage();
        assert_eq!(after - before, slot.bytes(), "the rendering is charged");
        cache.render(&read, slot.clone());
        assert_eq!(cache.usage().0, after, "replacing a rendering charges the difference only");
        cache.invalidate(["a"]);
        assert_eq!(cache.usage(), (0, 0), "claims and renderings released together");
        cache.render(&read, RenderedSlot { lens: Lens::Recency, ..slot });
        assert_eq!(cache.usage(), (0, 0), "a read no longer cached charges nothing");
        assert!(read.rendered.get(Lens::Recency, 1).is_some(), "but still keeps its rendering");
    }

    #[test]
    fn a_zero_budget_caches_nothing_and_one_read_may_not_take_most_of_it() {
        let cache = ClaimsCache::default();
        cache.set_budget(0);
        cache.insert_if_current(cache.generation(), "a", None, &Arc::new(group("a")));
        assert!(cache.get("a", None).is_none());
        let one = charge_of("a");
        cache.set_budget(7 * one);
        cache.insert_if_current(cache.generation(), "a", None, &Arc::new(group("a")));
        assert!(cache.get("a", None).is_none(), "over an eighth of the budget");
        cache.set_budget(8 * one);
        cache.insert_if_current(cache.generation(), "a", None, &Arc::new(group("a")));
        assert!(cache.get("a", None).is_some());
    }

    #[test]
    fn stale_names_neither_evict_fresh_entries_nor_pile_up() {
        let cache = ClaimsCache::default();
        let one = charge_of("a");
        cache.set_budget(8 * one);
        let insert = |path: &str| cache.insert_if_current(cache.generation(), path, None, &Arc::new(group(path)));
        insert("a");
        insert("b");
        for filler in ["d", "e", "f", "g", "h", "i"] {
            insert(filler);
        }
        cache.invalidate(["a"]);
        insert("a");
        insert("c");
        assert!(cache.get("b", None).is_none(), "b is now the oldest entry");
        assert!(cache.get("a", None).is_some() && cache.get("c", None).is_some(), "a was cached again after b");
        // A hot path written and read in a loop: one live entry, a bounded queue of names.
        for _ in 0..10_000 {
            cache.invalidate(["hot"]);
            insert("hot");
        }
        let inner = cache.inner.lock();
        assert_eq!(inner.live, 8);
        assert!(inner.order.len() <= 2 * inner.live + 65, "{} names for {} entries", inner.order.len(), inner.live);
    }

    fn rendering(lens: Lens, text: &str, claims_bytes: usize) -> RenderedSlot {
        RenderedSlot {
            lens,
            policy_version: 1,
            count: 1,
            groups: 1,
            claims_bytes,
            json: Arc::from(RawValue::from_string(format!("[\"{text}\"]")).expect("json")),
        }
    }

    fn key(lens: Lens) -> RenderKey {
        RenderKey { lens, policy_version: 1, max_groups: 10 }
    }

    /// A read whose claims take `filler` bytes more than an empty group's.
    fn big_group(path: &str, filler: usize) -> ClaimsRead {
        let read = group(path);
        let bytes = claims_bytes(&read.groups) + filler;
        ClaimsRead::measured(read.groups, bytes)
    }

    #[test]
    fn under_pressure_a_read_loses_its_claims_before_its_renderings() {
        let cache = ClaimsCache::default();
        let big = 10_000;
        // Room for eight such reads (one read may take at most an eighth of the budget).
        cache.set_budget(8 * (big + charge_of("k0")));
        let a = Arc::new(big_group("a", big));
        cache.insert_if_current(cache.generation(), "a", None, &a);
        cache.render(&a, rendering(Lens::Recency, "a wins", 5_000));
        assert!(cache.rendered("a", None, &key(Lens::Recency), usize::MAX).is_some(), "a full entry answers too");
        for i in 0..8 {
            let path = format!("k{i}");
            cache.insert_if_current(cache.generation(), &path, None, &Arc::new(big_group(&path, big)));
            assert!(cache.usage().0 <= cache.budget(), "within the budget");
        }
        assert!(cache.get("a", None).is_none(), "the claims were evicted");
        let kept = cache.rendered("a", None, &key(Lens::Recency), usize::MAX).expect("the rendering stays");
        assert_eq!(kept.json.get(), "[\"a wins\"]");
        assert_eq!(cache.entry_kinds(), (7, 1), "seven reads with claims (k0 went whole), one rendered-only");
        assert!(cache.get("k0", None).is_none() && cache.get("k7", None).is_some());
        // Only what the query could have answered with the claims themselves.
        assert!(cache.rendered("a", None, &key(Lens::Authority), usize::MAX).is_none(), "another lens");
        assert!(cache.rendered("a", Some("p"), &key(Lens::Recency), usize::MAX).is_none(), "another filter");
        let stale = RenderKey { policy_version: 2, ..key(Lens::Recency) };
        assert!(cache.rendered("a", None, &stale, usize::MAX).is_none(), "another policy version");
        let narrow = RenderKey { max_groups: 0, ..key(Lens::Recency) };
        assert!(cache.rendered("a", None, &narrow, usize::MAX).is_none(), "a page too small for all the groups");
        assert!(cache.rendered("a", None, &key(Lens::Recency), 4_999).is_none(), "the claims pass the memory limit");
        // A fresh read of "a" takes the renderings over, a write drops them.
        let again = Arc::new(big_group("a", big));
        cache.insert_if_current(cache.generation(), "a", None, &again);
        assert!(again.rendered.get(Lens::Recency, 1).is_some(), "carried over to the new read");
        assert!(cache.get("a", None).is_some());
        assert!(cache.usage().0 <= cache.budget());
        cache.invalidate(["a"]);
        assert!(cache.rendered("a", None, &key(Lens::Recency), usize::MAX).is_none(), "an apply drops it");
    }

    #[test]
    fn renderings_take_at_most_half_the_budget_and_the_oldest_go_first() {
        let cache = ClaimsCache::default();
        let big = 10_000;
        cache.set_budget(8 * (big + charge_of("k000")));
        for i in 0..600 {
            let path = format!("k{i:03}");
            let read = Arc::new(big_group(&path, big));
            cache.insert_if_current(cache.generation(), &path, None, &read);
            cache.render(&read, rendering(Lens::Recency, &path, 0));
            let (bytes, live) = cache.usage();
            assert!(bytes <= cache.budget(), "{bytes} bytes held over a budget of {}", cache.budget());
            let (full, rendered_only) = cache.entry_kinds();
            assert_eq!(full + rendered_only, live);
            assert!(full >= 1, "the newest read keeps its claims");
            let inner = cache.inner.lock();
            let counted = inner.entries.values().flatten().filter(|e| e.rendered_only).count();
            assert_eq!(rendered_only, counted, "the count of rendered-only entries is kept exact");
            // Half the budget, plus at most the entry stripped last (a few hundred bytes here).
            let most = inner.budget / 2 + 1_000;
            assert!(inner.rendered_bytes <= most, "renderings hold {} of {}", inner.rendered_bytes, inner.budget);
        }
        let (full, rendered_only) = cache.entry_kinds();
        assert!(rendered_only > 50, "{full} full, {rendered_only} rendered-only");
        assert!(cache.rendered("k000", None, &key(Lens::Recency), usize::MAX).is_none(), "the oldest went");
        assert!(cache.rendered("k598", None, &key(Lens::Recency), usize::MAX).is_some(), "recent ones stay");
        let inner = cache.inner.lock();
        let names = inner.order.len() + inner.rendered_order.len();
        assert!(names <= 2 * inner.live + 65, "{names} names for {} entries", inner.live);
        drop(inner);
        cache.clear();
        let inner = cache.inner.lock();
        assert_eq!((inner.bytes, inner.rendered_bytes, inner.live), (0, 0, 0));
    }

    /// An apply's new claims, and nothing touched.
    fn add(cache: &ClaimsCache, records: Vec<StoredAssertion>) {
        cache.apply_changes([], &records.iter().map(StoredAssertion::as_new).collect::<Vec<_>>());
    }

    fn record(path: &str, predicate: &str, n: u64) -> StoredAssertion {
        let draft = crate::model::assertion::AssertionDraft::for_test(path, predicate, "w", "1");
        StoredAssertion { id: AssertionId::new(n, 0, n, 0), asserted_at_us: n, log_index: n, draft, quarantined: false }
    }

    #[test]
    fn a_new_claim_drops_rendered_only_and_oversized_reads_and_keeps_the_counts() {
        let cache = ClaimsCache::default();
        let big = 10_000;
        cache.set_budget(8 * (big + charge_of("k0")));
        let a = Arc::new(big_group("a", big));
        cache.insert_if_current(cache.generation(), "a", None, &a);
        cache.render(&a, rendering(Lens::Recency, "a wins", 0));
        for i in 0..7 {
            let path = format!("k{i}");
            cache.insert_if_current(cache.generation(), &path, None, &Arc::new(big_group(&path, big)));
        }
        assert_eq!(cache.entry_kinds(), (7, 1), "a holds only its rendering");
        cache.insert_if_current(cache.generation(), "s", None, &Arc::new(group("s")));
        add(&cache, vec![record("a", "p", 1), record("s", "p", 2), record("s", "o", 3)]);
        assert!(cache.rendered("a", None, &key(Lens::Recency), usize::MAX).is_none(), "a stale rendering is dropped");
        assert_eq!(cache.entry_kinds().1, 0, "no rendered-only entry left");
        assert!(cache.usage().0 <= cache.budget());
        let s = cache.get("s", None).expect("updated in place");
        let groups: Vec<(&str, usize)> = s.groups.iter().map(|g| (g.predicate.as_str(), g.claims.len())).collect();
        assert_eq!(groups, vec![("o", 1), ("p", 1)], "a new predicate's group in predicate order");
        // A read the claim would take past the most claims an entry may hold is dropped.
        let full = ClaimsRead::new(vec![ClaimGroup {
            concept_path: "m".into(),
            predicate: "p".into(),
            claims: (0..MAX_CLAIMS_PER_ENTRY as u64)
                .map(|n| Arc::new(ClaimFacts::new(record("m", "p", 10 + n))))
                .collect(),
        }]);
        cache.set_budget(1 << 30);
        cache.insert_if_current(cache.generation(), "m", None, &Arc::new(full));
        assert!(cache.get("m", None).is_some());
        // Its own claim again (a reader read storage after the write and inserted before the
        // update, with renderings carried over from a rendered-only entry made without it).
        let m = cache.get("m", None).expect("cached");
        cache.render(&m, rendering(Lens::Recency, "without the claim", 0));
        add(&cache, vec![record("m", "p", 10)]);
        let again = cache.get("m", None).expect("a read holding the claim already stays cached");
        assert_eq!(again.groups[0].claims.len(), MAX_CLAIMS_PER_ENTRY, "not added twice");
        assert!(cache.rendered("m", None, &key(Lens::Recency), usize::MAX).is_none(), "but loses its renderings");
        add(&cache, vec![record("m", "p", 5)]);
        assert!(cache.get("m", None).is_none(), "past MAX_CLAIMS_PER_ENTRY");
        let inner = cache.inner.lock();
        let counted: usize = inner
            .entries
            .values()
            .flatten()
            .map(|e| e.claims_bytes + e.read.rendered.bytes() + key_bytes("", e.predicate.as_deref()))
            .sum();
        let paths: usize = inner.entries.iter().map(|(path, f)| path.len() * f.len()).sum();
        assert_eq!(inner.bytes, counted + paths, "the estimate is every entry's charge");
        assert_eq!(inner.live, inner.entries.values().flatten().count());
    }

    /// The claims of one apply join each read in one copy, and leave the cache as adding them
    /// one apply at a time would: every read of the path in id order, per predicate, the same
    /// charge; past the most claims an entry may hold, the read is dropped.
    #[test]
    fn the_claims_of_one_apply_join_a_read_together_as_one_at_a_time_would() {
        let ids = [(5, "p"), (2, "p"), (3, "o"), (9, "p"), (2, "p")];
        let fill = |cache: &ClaimsCache| {
            cache.insert_if_current(cache.generation(), "s", None, &Arc::new(group("s")));
            cache.insert_if_current(cache.generation(), "s", Some("p"), &Arc::new(group("s")));
            cache.insert_if_current(cache.generation(), "s", Some("q"), &Arc::new(group("s")));
        };
        let together = ClaimsCache::default();
        fill(&together);
        add(&together, ids.iter().map(|&(n, p)| record("s", p, n)).collect());
        let one_at_a_time = ClaimsCache::default();
        fill(&one_at_a_time);
        for &(n, p) in &ids {
            add(&one_at_a_time, vec![record("s", p, n)]);
        }
        let shape = |cache: &ClaimsCache, predicate: Option<&str>| -> Vec<(String, Vec<u64>)> {
            let read = cache.get("s", predicate).expect("cached");
            read.groups
                .iter()
                .map(|g| (g.predicate.clone(), g.claims.iter().map(|c| c.record.log_index).collect()))
                .collect()
        };
        let all = vec![("o".to_string(), vec![3]), ("p".to_string(), vec![2, 5, 9])];
        assert_eq!(shape(&together, None), all, "by predicate, then id; the repeated claim once");
        assert_eq!(shape(&one_at_a_time, None), all);
        for predicate in [Some("p"), Some("q")] {
            assert_eq!(shape(&together, predicate), shape(&one_at_a_time, predicate), "{predicate:?}");
        }
        assert_eq!(together.usage(), one_at_a_time.usage(), "the same charge");
        assert_eq!(together.inner.lock().live, 3);
        // Two claims past a read one short of the most it may hold: dropped, as the second of
        // two applies would drop it.
        let full = |n: usize| {
            ClaimsRead::new(vec![ClaimGroup {
                concept_path: "m".into(),
                predicate: "p".into(),
                claims: (0..n as u64).map(|i| Arc::new(ClaimFacts::new(record("m", "p", 10 + i)))).collect(),
            }])
        };
        let cache = ClaimsCache::default();
        cache.set_budget(1 << 30);
        cache.insert_if_current(cache.generation(), "m", None, &Arc::new(full(MAX_CLAIMS_PER_ENTRY - 1)));
        add(&cache, vec![record("m", "p", 1), record("m", "p", 2)]);
        assert!(cache.get("m", None).is_none(), "past MAX_CLAIMS_PER_ENTRY");
        cache.insert_if_current(cache.generation(), "m", None, &Arc::new(full(MAX_CLAIMS_PER_ENTRY - 1)));
        add(&cache, vec![record("m", "p", 1), record("m", "p", 10)]);
        let m = cache.get("m", None).expect("one new claim and one held already fit");
        assert_eq!(m.groups[0].claims.len(), MAX_CLAIMS_PER_ENTRY);
    }

    #[test]
    fn a_read_without_renderings_is_evicted_whole() {
        let cache = ClaimsCache::default();
        let one = charge_of("k0");
        cache.set_budget(8 * one);
        for i in 0..9 {
            let path = format!("k{i}");
            cache.insert_if_current(cache.generation(), &path, None, &Arc::new(group(&path)));
        }
        assert_eq!(cache.entry_kinds(), (8, 0));
        assert!(cache.rendered("k0", None, &key(Lens::Recency), usize::MAX).is_none());
    }
}
