//! Authority (DESIGN §2): root authorities and grants, and an agent's authority for a
//! concept_path computed over delegation chains. Pure code over an in-memory set of roots and
//! grants; the meta group replicates the set (`cluster::policy`), the lenses consume the levels.
//!
//! An agent's authority for a path is the best chain `root → grant → … → grant → agent` whose
//! grants all cover the path (their `concept_prefix` is the path or one of its ancestors, the
//! empty prefix covering everything). A chain's level is the minimum of the root's level and
//! every grant's level; the best chain has the highest level, ties going to the shortest.
//! Chains of more than `max_depth` grants do not count. Cycles never help (a walk through a
//! cycle is never better than the walk without it, and is longer), so they are ignored by
//! construction. Roots, grants and revocations carry times, so authority can be evaluated as it
//! stood at any earlier time (`as_of`).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Authority levels run from 0 to 100.
pub const MAX_LEVEL: u8 = 100;

/// `authority.max_chain_depth` unless configured (DESIGN §2).
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 8;

/// One period during which an agent was a root authority at one level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSpan {
    pub level: u8,
    pub since_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_us: Option<u64>,
}

/// A delegation of authority over a concept prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u64,
    pub grantor: String,
    pub grantee: String,
    /// The empty prefix covers every concept_path.
    pub concept_prefix: String,
    pub level: u8,
    pub granted_at_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_us: Option<u64>,
}

impl Grant {
    pub fn active_at(&self, at_us: u64) -> bool {
        self.granted_at_us <= at_us && self.revoked_at_us.is_none_or(|r| r > at_us)
    }
}

/// Whether `prefix` covers `path`: equal, an ancestor by whole segments, or empty.
pub fn prefix_covers(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// An agent's authority for a path and the chain that gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentAuthority {
    pub level: u8,
    /// The root authority the chain starts from.
    pub root: String,
    /// The grants from the root to the agent, in order (empty when the agent is a root).
    pub chain: Vec<u64>,
}

/// Every root and grant, indexed for chain searches.
#[derive(Debug, Clone, Default)]
pub struct Authorities {
    roots: BTreeMap<String, Vec<RootSpan>>,
    grants: BTreeMap<u64, Grant>,
    /// Grant ids by grantee: chain searches walk from the agent back towards the roots.
    by_grantee: HashMap<String, Vec<u64>>,
}

impl Authorities {
    pub fn roots(&self) -> &BTreeMap<String, Vec<RootSpan>> {
        &self.roots
    }

    pub fn grants(&self) -> &BTreeMap<u64, Grant> {
        &self.grants
    }

    pub fn grant(&self, id: u64) -> Option<&Grant> {
        self.grants.get(&id)
    }

    /// The level of `agent` as a root at `at_us`, if it was one.
    pub fn root_level(&self, agent: &str, at_us: u64) -> Option<u8> {
        self.roots
            .get(agent)?
            .iter()
            .find(|s| s.since_us <= at_us && s.until_us.is_none_or(|u| u > at_us))
            .map(|s| s.level)
    }

    /// Makes `agent` a root at `level` from `at_us` (closing its current span, if any); `None`
    /// removes it. Returns false when nothing changes.
    pub fn set_root(&mut self, agent: &str, level: Option<u8>, at_us: u64) -> bool {
        let current = self.root_level(agent, u64::MAX);
        if current == level {
            return false;
        }
        let spans = self.roots.entry(agent.to_string()).or_default();
        if let Some(open) = spans.iter_mut().find(|s| s.until_us.is_none()) {
            open.until_us = Some(at_us);
        }
        if let Some(level) = level {
            spans.push(RootSpan { level, since_us: at_us, until_us: None });
        }
        true
    }

    /// Restores a root's spans as persisted.
    pub fn insert_root_spans(&mut self, agent: String, spans: Vec<RootSpan>) {
        self.roots.insert(agent, spans);
    }

    /// Adds or replaces a grant (replacing keeps revocations: a grant is never reactivated).
    pub fn insert_grant(&mut self, grant: Grant) {
        let ids = self.by_grantee.entry(grant.grantee.clone()).or_default();
        if !ids.contains(&grant.id) {
            ids.push(grant.id);
        }
        self.grants.insert(grant.id, grant);
    }

    /// Marks a grant revoked at `at_us`; returns the updated grant, `None` if unknown or
    /// already revoked.
    pub fn revoke(&mut self, id: u64, at_us: u64) -> Option<&Grant> {
        let grant = self.grants.get_mut(&id)?;
        if grant.revoked_at_us.is_some() {
            return None;
        }
        grant.revoked_at_us = Some(at_us);
        Some(grant)
    }

    /// The authority of `agent` for `path` as it stood at `at_us`, or `None` when no chain of
    /// at most `max_depth` grants from a root covers the path.
    pub fn authority(&self, agent: &str, path: &str, at_us: u64, max_depth: usize) -> Option<AgentAuthority> {
        // layers[d]: for each agent X, the best level of a walk of exactly d covering grants from
        // X to `agent`, and the first grant of that walk. Levels start unbounded (u8::MAX).
        let mut layers: Vec<HashMap<&str, (u8, Option<u64>)>> = Vec::with_capacity(max_depth + 1);
        layers.push(HashMap::from([(agent, (u8::MAX, None))]));
        // (level, depth, root)
        let mut best: Option<(u8, usize, &str)> = None;
        for depth in 0..=max_depth {
            let layer = &layers[depth];
            for (&who, &(level, _)) in layer {
                if let Some(root_level) = self.root_level(who, at_us) {
                    let level = level.min(root_level);
                    let better = match best {
                        None => true,
                        // Deeper layers only win with a strictly higher level; within a layer,
                        // the name breaks ties so the answer does not depend on hash order.
                        Some((l, d, r)) => level > l || (level == l && d == depth && who < r),
                    };
                    if better {
                        best = Some((level, depth, who));
                    }
                }
            }
            if depth == max_depth {
                break;
            }
            let mut next: HashMap<&str, (u8, Option<u64>)> = HashMap::new();
            for (&who, &(level, _)) in layer {
                // Nothing reached from here can beat the best chain found: prune.
                if best.is_some_and(|(l, _, _)| level <= l) {
                    continue;
                }
                for id in self.by_grantee.get(who).into_iter().flatten() {
                    let Some(grant) = self.grants.get(id) else { continue };
                    if !grant.active_at(at_us) || !prefix_covers(&grant.concept_prefix, path) {
                        continue;
                    }
                    let through = level.min(grant.level);
                    let slot = next.entry(grant.grantor.as_str()).or_insert((0, None));
                    if slot.1.is_none() || through > slot.0 || (through == slot.0 && Some(*id) < slot.1) {
                        *slot = (through, Some(*id));
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            layers.push(next);
        }
        let (level, depth, root) = best?;
        // Walk the chain back from the root: each layer names the grant towards the agent.
        let mut chain = Vec::with_capacity(depth);
        let mut who = root;
        for d in (1..=depth).rev() {
            let (_, via) = layers[d].get(who)?;
            let grant = self.grants.get(&(*via)?)?;
            chain.push(grant.id);
            who = grant.grantee.as_str();
        }
        Some(AgentAuthority { level, root: root.to_string(), chain })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn grant(id: u64, grantor: &str, grantee: &str, prefix: &str, level: u8) -> Grant {
        Grant {
            id,
            grantor: grantor.into(),
            grantee: grantee.into(),
            concept_prefix: prefix.into(),
            level,
            granted_at_us: 10,
            revoked_at_us: None,
        }
    }

    fn with_root(level: u8) -> Authorities {
        let mut a = Authorities::default();
        a.set_root("root", Some(level), 1);
        a
    }

    #[test]
    fn prefixes_cover_by_segment() {
        assert!(prefix_covers("", "a/b"));
        assert!(prefix_covers("a", "a/b"));
        assert!(prefix_covers("a/b", "a/b"));
        assert!(!prefix_covers("a/b", "a"));
        assert!(!prefix_covers("a", "ab/c"));
    }

    #[test]
    fn roots_and_single_grants() {
        let mut a = with_root(90);
        a.insert_grant(grant(1, "root", "alice", "infra", 70));
        let root = a.authority("root", "infra/db", 100, 8).expect("root");
        assert_eq!((root.level, root.chain.len()), (90, 0));
        let alice = a.authority("alice", "infra/db", 100, 8).expect("alice");
        assert_eq!((alice.level, alice.root.as_str(), alice.chain.clone()), (70, "root", vec![1]));
        assert!(a.authority("alice", "finance", 100, 8).is_none(), "prefix does not cover");
        assert!(a.authority("alice", "infra/db", 5, 8).is_none(), "before the grant");
        assert!(a.authority("bob", "infra", 100, 8).is_none());
    }

    #[test]
    fn chain_level_is_the_minimum_and_the_best_chain_wins() {
        let mut a = with_root(80);
        a.insert_grant(grant(1, "root", "x", "", 60));
        a.insert_grant(grant(2, "x", "agent", "p", 90)); // min 60
        a.insert_grant(grant(3, "root", "y", "p", 75));
        a.insert_grant(grant(4, "y", "z", "p", 75));
        a.insert_grant(grant(5, "z", "agent", "p/q", 100)); // min 75, depth 3
        let got = a.authority("agent", "p/q/r", 100, 8).expect("some");
        assert_eq!((got.level, got.chain.clone()), (75, vec![3, 4, 5]));
        // Off p/q only the first chain covers.
        assert_eq!(a.authority("agent", "p/other", 100, 8).map(|g| g.level), Some(60));
    }

    #[test]
    fn depth_limit_and_depths_1_to_9() {
        for depth in 1..=9usize {
            let mut a = with_root(50);
            let names: Vec<String> =
                (0..=depth).map(|i| if i == 0 { "root".into() } else { format!("a{i}") }).collect();
            for i in 0..depth {
                a.insert_grant(grant(i as u64 + 1, &names[i], &names[i + 1], "x", 50));
            }
            let got = a.authority(&names[depth], "x/y", 100, 8);
            if depth <= 8 {
                assert_eq!(got.map(|g| g.chain.len()), Some(depth), "depth {depth}");
            } else {
                assert!(got.is_none(), "a chain of {depth} grants is over the limit");
            }
        }
    }

    #[test]
    fn cycles_are_ignored_and_revocation_cuts_chains() {
        let mut a = with_root(70);
        a.insert_grant(grant(1, "root", "a", "", 70));
        a.insert_grant(grant(2, "a", "b", "", 70));
        a.insert_grant(grant(3, "b", "a", "", 70)); // cycle a <-> b
        a.insert_grant(grant(4, "b", "c", "", 40));
        a.insert_grant(grant(5, "c", "c", "", 99)); // self-loop
        let c = a.authority("c", "k", 100, 8).expect("c");
        assert_eq!((c.level, c.chain.clone()), (40, vec![1, 2, 4]));
        // The cycle alone gives no authority.
        let mut lonely = Authorities::default();
        lonely.insert_grant(grant(1, "p", "q", "", 70));
        lonely.insert_grant(grant(2, "q", "p", "", 70));
        assert!(lonely.authority("q", "k", 100, 8).is_none());
        // Revoking grant 1 at 200 cuts a, b and c off from then on; as_of before still sees it.
        assert!(a.revoke(1, 200).is_some());
        assert!(a.revoke(1, 300).is_none(), "already revoked");
        assert!(a.authority("c", "k", 250, 8).is_none());
        assert_eq!(a.authority("c", "k", 150, 8).map(|g| g.level), Some(40));
    }

    #[test]
    fn roots_change_over_time() {
        let mut a = Authorities::default();
        assert!(a.set_root("r", Some(50), 10));
        assert!(!a.set_root("r", Some(50), 20), "no change");
        assert!(a.set_root("r", Some(90), 30));
        assert!(a.set_root("r", None, 40));
        assert_eq!(a.root_level("r", 15), Some(50));
        assert_eq!(a.root_level("r", 35), Some(90));
        assert_eq!(a.root_level("r", 45), None);
    }

    /// Brute force: every simple path from a root to the agent of at most `max_depth` covering
    /// grants active at `at`; best level, then shortest.
    fn reference(a: &Authorities, agent: &str, path: &str, at: u64, max_depth: usize) -> Option<(u8, usize)> {
        fn walk(
            a: &Authorities,
            who: &str,
            path: &str,
            at: u64,
            left: usize,
            level: u8,
            depth: usize,
            seen: &mut Vec<String>,
            best: &mut Option<(u8, usize)>,
        ) {
            if let Some(root) = a.root_level(who, at) {
                let l = level.min(root);
                if best.is_none_or(|(bl, bd)| l > bl || (l == bl && depth < bd)) {
                    *best = Some((l, depth));
                }
            }
            if left == 0 {
                return;
            }
            for g in a.grants.values() {
                if g.grantee == who && g.active_at(at) && prefix_covers(&g.concept_prefix, path) {
                    if seen.contains(&g.grantor) {
                        continue;
                    }
                    seen.push(g.grantor.clone());
                    walk(a, &g.grantor, path, at, left - 1, level.min(g.level), depth + 1, seen, best);
                    seen.pop();
                }
            }
        }
        let mut best = None;
        walk(a, agent, path, at, max_depth, u8::MAX, 0, &mut vec![agent.to_string()], &mut best);
        best
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// The layered search agrees with a brute-force search over simple paths, on random
        /// graphs with cycles, revocations and prefixes, and its chain is a real chain.
        #[test]
        fn matches_brute_force(
            roots in proptest::collection::vec((0usize..6, 0u8..=100), 1..3),
            edges in proptest::collection::vec((0usize..6, 0usize..6, 0usize..4, 0u8..=100, proptest::option::of(0u64..40)), 0..18),
            agent in 0usize..6,
            path in 0usize..3,
            at in 0u64..40,
            max_depth in 1usize..6,
        ) {
            let names = ["a", "b", "c", "d", "e", "f"];
            let prefixes = ["", "x", "x/y", "z"];
            let paths = ["x/y/w", "x/q", "z"];
            let mut a = Authorities::default();
            for (who, level) in &roots {
                a.set_root(names[*who], Some(*level), 0);
            }
            for (i, (from, to, prefix, level, revoked)) in edges.iter().enumerate() {
                let mut g = grant(i as u64, names[*from], names[*to], prefixes[*prefix], *level);
                g.granted_at_us = (i as u64) % 20;
                g.revoked_at_us = *revoked;
                a.insert_grant(g);
            }
            let got = a.authority(names[agent], paths[path], at, max_depth);
            let want = reference(&a, names[agent], paths[path], at, max_depth);
            prop_assert_eq!(got.as_ref().map(|g| (g.level, g.chain.len())), want);
            if let Some(got) = got {
                // The chain starts at the root, ends at the agent, links up, covers the path.
                let mut who = got.root.clone();
                let mut level = a.root_level(&who, at).unwrap_or(0);
                for id in &got.chain {
                    let g = a.grant(*id).expect("grant");
                    prop_assert_eq!(&g.grantor, &who);
                    prop_assert!(g.active_at(at) && prefix_covers(&g.concept_prefix, paths[path]));
                    level = level.min(g.level);
                    who = g.grantee.clone();
                }
                prop_assert_eq!(who.as_str(), names[agent]);
                prop_assert_eq!(level, got.level);
            }
        }
    }
}
