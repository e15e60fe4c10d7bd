//! The slow-query log: queries that took at least `query.slow_query_ms`, and queries refused
//! for passing `query.query_timeout_seconds` or `query.max_memory_per_query_mb` (the query
//! bombs the memory runbook looks for), kept in a bounded in-memory ring
//! (`query.slow_query_log_size`, oldest dropped first) for `GET /v1/admin/slow-queries`, as the
//! runbooks read it (`.queries[]` with `agent_id`, `subject`, `predicate`, `lens`,
//! `duration_ms`, `memory_mb`, `results`, `at`, and `error`).

use std::collections::VecDeque;

use parking_lot::Mutex;
use serde::Serialize;

/// One slow query.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SlowQuery {
    /// Who asked (the query's `agent_id`, or `anonymous`).
    pub agent_id: String,
    /// The concept_path, or the concept_prefix followed by `/*`.
    pub subject: String,
    #[schema(required = true)]
    pub predicate: Option<String>,
    pub lens: String,
    pub consistency: String,
    pub duration_ms: u64,
    /// Estimated memory the query held, in MiB: the claims it read and the answer it built.
    /// For a query refused with `query_memory_exceeded`, the limit it passed (a lower bound).
    pub memory_mb: f64,
    /// (concept_path, predicate) results returned (0 for a refused query).
    pub results: usize,
    /// When it finished, RFC 3339.
    pub at: String,
    /// The error code a refused query answered (`query_timeout`, `query_memory_exceeded`);
    /// `null` for a query that answered.
    #[schema(required = true)]
    pub error: Option<&'static str>,
}

pub struct SlowQueryLog {
    capacity: usize,
    entries: Mutex<VecDeque<SlowQuery>>,
}

impl SlowQueryLog {
    pub fn new(capacity: usize) -> SlowQueryLog {
        SlowQueryLog { capacity, entries: Mutex::new(VecDeque::with_capacity(capacity.min(1024))) }
    }

    pub fn record(&self, query: SlowQuery) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(query);
    }

    /// Newest first, at most `limit`, optionally only one agent's.
    pub fn list(&self, limit: usize, agent_id: Option<&str>) -> Vec<SlowQuery> {
        self.entries
            .lock()
            .iter()
            .rev()
            .filter(|q| agent_id.is_none_or(|a| q.agent_id == a))
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(agent: &str, n: u64) -> SlowQuery {
        SlowQuery {
            agent_id: agent.into(),
            subject: format!("p/{n}"),
            predicate: None,
            lens: "recency".into(),
            consistency: "linearizable".into(),
            duration_ms: n,
            memory_mb: 0.0,
            results: 0,
            at: String::new(),
            error: None,
        }
    }

    #[test]
    fn keeps_the_newest_within_capacity() {
        let log = SlowQueryLog::new(3);
        for n in 0..5 {
            log.record(query(if n % 2 == 0 { "a" } else { "b" }, n));
        }
        let all: Vec<u64> = log.list(10, None).iter().map(|q| q.duration_ms).collect();
        assert_eq!(all, vec![4, 3, 2]);
        let only_a: Vec<u64> = log.list(10, Some("a")).iter().map(|q| q.duration_ms).collect();
        assert_eq!(only_a, vec![4, 2]);
        assert_eq!(log.list(1, None).len(), 1);
        let off = SlowQueryLog::new(0);
        off.record(query("a", 1));
        assert!(off.list(10, None).is_empty());
    }
}
