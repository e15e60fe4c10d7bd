//! A per-shard cache of the claims about a concept_path, as [`ShardReader::claims`] reads them
//! from storage (index scan, records, events). Queries of hot keys then skip the storage reads.
//!
//! Correctness rests on one rule: an entry never survives an apply that touched its path. The
//! state machine writes its batch, then invalidates the paths it touched and bumps the
//! generation, under the cache lock. A reader notes the generation before reading storage and
//! inserts only if it is unchanged, under the same lock: a read that started before a write
//! can never be inserted after that write's invalidation.
//!
//! Each entry also keeps the query answers rendered from it ([`RenderedResults`]), so a hot
//! key's answer under a lens is computed once per change of its claims or of the policy
//! rather than once per query. They live and die with the entry, and carry the policy version
//! they were rendered under.
//!
//! [`ShardReader::claims`]: super::reader::ShardReader::claims

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use serde_json::value::RawValue;

use super::reader::ClaimsRead;
use crate::model::lens::Lens;

/// Paths cached per shard before the cache starts over.
const MAX_PATHS: usize = 4096;
/// Groups with more claims than this are not cached (memory).
const MAX_CLAIMS_PER_ENTRY: usize = 256;
/// Rendered answers longer than this are not kept (memory: they are re-rendered instead).
pub const MAX_RENDERED_BYTES: usize = 4096;

/// Per path, the cached reads of it by predicate filter (`None`: all predicates). A path has
/// few filters, so a list searched in place, which a lookup by `&str` needs no allocation for.
/// foldhash (randomly seeded per map): this lookup is on every query.
type Entries = HashMap<String, Vec<(Option<String>, Arc<ClaimsRead>)>, foldhash::fast::RandomState>;

/// The `results` of a query answer as JSON, by lens, for the present (no `as_of`) and a whole
/// page, each with the policy version it was rendered under (authority levels and vote
/// weights come from the policy).
#[derive(Debug, Default)]
pub struct RenderedResults {
    slots: Mutex<Vec<RenderedSlot>>,
}

#[derive(Debug, Clone)]
pub struct RenderedSlot {
    pub lens: Lens,
    pub policy_version: u64,
    /// How many results the JSON array holds.
    pub count: usize,
    pub json: Arc<RawValue>,
}

impl RenderedResults {
    pub fn get(&self, lens: Lens, policy_version: u64) -> Option<RenderedSlot> {
        self.slots.lock().iter().find(|s| s.lens == lens && s.policy_version == policy_version).cloned()
    }

    /// Keeps a rendering (replacing one of the same lens), unless it is too long to keep.
    pub fn put(&self, slot: RenderedSlot) {
        if slot.json.get().len() > MAX_RENDERED_BYTES {
            return;
        }
        let mut slots = self.slots.lock();
        slots.retain(|s| s.lens != slot.lens);
        slots.push(slot);
    }
}

#[derive(Debug, Default)]
pub struct ClaimsCache {
    entries: Mutex<Entries>,
    generation: AtomicU64,
}

impl ClaimsCache {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, path: &str, predicate: Option<&str>) -> Option<Arc<ClaimsRead>> {
        let entries = self.entries.lock();
        entries.get(path)?.iter().find(|(filter, _)| filter.as_deref() == predicate).map(|(_, groups)| groups.clone())
    }

    /// Caches what a reader read from storage, unless an apply invalidated anything since the
    /// reader noted `generation`.
    pub fn insert_if_current(&self, generation: u64, path: &str, predicate: Option<&str>, groups: &Arc<ClaimsRead>) {
        if groups.groups.iter().map(|g| g.claims.len()).sum::<usize>() > MAX_CLAIMS_PER_ENTRY {
            return;
        }
        let mut entries = self.entries.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.len() >= MAX_PATHS && !entries.contains_key(path) {
            entries.clear();
        }
        let filters = entries.entry(path.to_string()).or_default();
        match filters.iter_mut().find(|(filter, _)| filter.as_deref() == predicate) {
            Some((_, cached)) => *cached = groups.clone(),
            None => filters.push((predicate.map(str::to_string), groups.clone())),
        }
    }

    /// Called by the state machine after writing an apply's batch: drops the touched paths.
    pub fn invalidate<'a>(&self, paths: impl IntoIterator<Item = &'a str>) {
        let mut entries = self.entries.lock();
        for path in paths {
            entries.remove(path);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops everything (snapshot installed, indexes repaired).
    pub fn clear(&self) {
        let mut entries = self.entries.lock();
        entries.clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(path: &str) -> ClaimsRead {
        ClaimsRead {
            groups: vec![super::super::reader::ClaimGroup {
                concept_path: path.into(),
                predicate: "p".into(),
                claims: Vec::new(),
            }],
            rendered: RenderedResults::default(),
        }
    }

    #[test]
    fn renderings_are_kept_per_lens_and_policy_version() {
        let rendered = RenderedResults::default();
        let slot = |lens, policy_version, text: &str| RenderedSlot {
            lens,
            policy_version,
            count: 1,
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
}
