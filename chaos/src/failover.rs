//! The failover measurement: how long clients of the nodes a fault did *not* hit (healthy nodes)
//! waited while it lasted. Such a node should notice no more than a leader election of the
//! shards whose leader was hit, so the target is `raft.election_timeout_max_ms` + 1 s. It is
//! reported, never asserted: timings on a loaded machine are not a verdict.
//!
//! Per fault, over the register and unkeyed-set operations through healthy nodes:
//!
//! * **longest wait**: the longest any request (read or write, whatever its outcome; one that
//!   timed out counts what it waited) invoked between the previous fault's heal and this
//!   fault's heal, and still waiting when this fault started, waited for its answer;
//! * **write gap**: per key, the time from the first write invoked after the fault started to
//!   the first of those writes that was acknowledged; the largest over the keys. Observation
//!   ends when the next fault starts (or at the last answer of the run): a key still without an
//!   acknowledged write then gives a lower bound (`gap_open`).
//!
//! The probe's operations are left out: its write retries on purpose through one partition.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::history::{Op, OpKind, Outcome};
use crate::nemesis::FaultRecord;
use crate::probe::PROBE_PROCESS;

/// What one fault cost the healthy nodes' clients.
#[derive(Debug, Clone, Serialize)]
pub struct FaultWindow {
    pub kind: String,
    pub at_s: f64,
    pub healed_at_s: Option<f64>,
    /// The nodes the fault hit (requests through them are not counted).
    pub nodes: Vec<u64>,
    /// Requests through healthy nodes in the window.
    pub requests: usize,
    pub longest_wait_s: Option<f64>,
    /// The request that waited longest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_wait_op: Option<String>,
    pub write_gap_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_gap_key: Option<String>,
    /// The key of `write_gap_s` had no acknowledged write before observation ended: the gap is
    /// a lower bound.
    pub gap_open: bool,
}

/// One fault class (`kill`, `pause`, ...): the worst of its faults, and each fault's numbers in
/// the order they were injected.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClassFailover {
    pub faults: usize,
    pub longest_wait_s: Option<f64>,
    pub longest_write_gap_s: Option<f64>,
    pub waits_s: Vec<f64>,
    pub write_gaps_s: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    /// The nodes' `raft.election_timeout_max_ms`.
    pub election_timeout_max_ms: u64,
    /// `election_timeout_max_ms` + 1 s: what a healthy node's client should wait at most.
    pub target_s: f64,
    pub by_class: BTreeMap<String, ClassFailover>,
    pub windows: Vec<FaultWindow>,
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Measures every fault of `faults` (in injection order) over `ops` (any histories' operations).
pub fn measure(faults: &[FaultRecord], ops: &[&Op], election_timeout_max_ms: u64) -> Failover {
    let ops: Vec<&Op> = ops.iter().copied().filter(|o| o.process != PROBE_PROCESS).collect();
    let last_answer_us = ops.iter().map(|o| o.answered_us).max().unwrap_or(0);
    let to_us = |s: f64| (s * 1e6) as u64;
    let mut windows = Vec::new();
    for (i, fault) in faults.iter().enumerate() {
        let at = to_us(fault.at_s);
        let healed = fault.healed_at_s.map(to_us).unwrap_or(u64::MAX);
        let after_previous = if i == 0 { 0 } else { faults[i - 1].healed_at_s.map(to_us).unwrap_or(0) };
        let observed_until = faults.get(i + 1).map(|next| to_us(next.at_s)).unwrap_or(last_answer_us);
        let healthy: Vec<&Op> = ops.iter().copied().filter(|o| !fault.nodes.contains(&o.node)).collect();

        let waiting: Vec<&Op> = healthy
            .iter()
            .copied()
            .filter(|o| o.invoke_us >= after_previous && o.invoke_us < healed && o.answered_us > at)
            .collect();
        let longest = waiting.iter().max_by_key(|o| o.answered_us.saturating_sub(o.invoke_us));

        // Per key: (first write invoked after the fault, first acknowledged completion of those).
        let mut per_key: BTreeMap<&str, (u64, Option<u64>)> = BTreeMap::new();
        for op in
            healthy.iter().filter(|o| o.kind == OpKind::Write && o.invoke_us >= at && o.invoke_us < observed_until)
        {
            let entry = per_key.entry(op.key.as_str()).or_insert((op.invoke_us, None));
            entry.0 = entry.0.min(op.invoke_us);
            if op.outcome == Outcome::Ok {
                let acked = op.complete_us.unwrap_or(op.answered_us);
                entry.1 = Some(entry.1.map_or(acked, |first| first.min(acked)));
            }
        }
        let gap = per_key
            .iter()
            .map(|(key, (first, acked))| match acked {
                Some(acked) => (acked.saturating_sub(*first), *key, false),
                None => (observed_until.saturating_sub(*first), *key, true),
            })
            .max_by_key(|(gap, _, _)| *gap);

        windows.push(FaultWindow {
            kind: fault.kind.name(),
            at_s: fault.at_s,
            healed_at_s: fault.healed_at_s,
            nodes: fault.nodes.clone(),
            requests: waiting.len(),
            longest_wait_s: longest.map(|o| secs(o.answered_us - o.invoke_us)),
            longest_wait_op: longest.map(|o| {
                format!(
                    "{:?} of {} through node {} at {:.3} s: {:?}{}",
                    o.kind,
                    o.key,
                    o.node,
                    secs(o.invoke_us),
                    o.outcome,
                    o.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                )
            }),
            write_gap_s: gap.map(|(g, _, _)| secs(g)),
            write_gap_key: gap.map(|(_, key, _)| key.to_string()),
            gap_open: gap.is_some_and(|(_, _, open)| open),
        });
    }
    let mut by_class: BTreeMap<String, ClassFailover> = BTreeMap::new();
    for window in &windows {
        let class = by_class.entry(window.kind.clone()).or_default();
        class.faults += 1;
        if let Some(wait) = window.longest_wait_s {
            class.waits_s.push(wait);
            class.longest_wait_s = Some(class.longest_wait_s.map_or(wait, |w| w.max(wait)));
        }
        if let Some(gap) = window.write_gap_s {
            class.write_gaps_s.push(gap);
            class.longest_write_gap_s = Some(class.longest_write_gap_s.map_or(gap, |g| g.max(gap)));
        }
    }
    Failover { election_timeout_max_ms, target_s: (election_timeout_max_ms + 1000) as f64 / 1000.0, by_class, windows }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nemesis::FaultKind;

    fn op(key: &str, kind: OpKind, node: u64, invoke_s: f64, answered_s: f64, outcome: Outcome) -> Op {
        let answered_us = (answered_s * 1e6) as u64;
        Op {
            id: 0,
            process: 0,
            key: key.into(),
            kind,
            value: Some(1),
            invoke_us: (invoke_s * 1e6) as u64,
            complete_us: (outcome != Outcome::Indeterminate).then_some(answered_us),
            answered_us,
            outcome,
            node,
            error: None,
        }
    }

    fn fault(kind: FaultKind, at_s: f64, healed_s: f64, nodes: Vec<u64>) -> FaultRecord {
        FaultRecord { kind, at_s, healed_at_s: Some(healed_s), detail: String::new(), nodes }
    }

    #[test]
    fn measures_healthy_nodes_only() {
        use OpKind::*;
        use Outcome::*;
        let ops = [
            // Before the fault: not counted.
            op("a", Write, 1, 1.0, 1.1, Ok),
            // Through the killed node 3: not counted, however long.
            op("a", Write, 3, 10.1, 15.1, Indeterminate),
            // Key a: first write after the fault at 10.2 waits until 12.0 and times out; the
            // next is acknowledged at 12.5: the key waited 2.3 s.
            op("a", Write, 1, 10.2, 12.0, Indeterminate),
            op("a", Write, 2, 12.1, 12.5, Ok),
            // Key b was not affected.
            op("b", Write, 2, 10.3, 10.31, Ok),
            op("b", Read, 1, 10.4, 10.5, Ok),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        let failover = measure(&[fault(FaultKind::Kill, 10.0, 20.0, vec![3])], &refs, 1200);
        assert_eq!(failover.target_s, 2.2);
        let window = &failover.windows[0];
        assert_eq!(window.requests, 4);
        assert!((window.longest_wait_s.unwrap() - 1.8).abs() < 1e-6, "{window:?}");
        assert!((window.write_gap_s.unwrap() - 2.3).abs() < 1e-6, "{window:?}");
        assert_eq!(window.write_gap_key.as_deref(), Some("a"));
        assert!(!window.gap_open);
        let kill = &failover.by_class["kill"];
        assert_eq!((kill.faults, kill.waits_s.len()), (1, 1));
    }

    #[test]
    fn a_key_never_acknowledged_again_is_a_lower_bound() {
        let ops = [op("a", OpKind::Write, 1, 10.5, 13.5, Outcome::Indeterminate)];
        let refs: Vec<&Op> = ops.iter().collect();
        let faults = [fault(FaultKind::Pause, 10.0, 14.0, vec![2]), fault(FaultKind::Kill, 16.0, 20.0, vec![1])];
        let failover = measure(&faults, &refs, 1200);
        let window = &failover.windows[0];
        assert!(window.gap_open);
        assert!((window.write_gap_s.unwrap() - 5.5).abs() < 1e-6, "observed until the next fault: {window:?}");
        assert_eq!(failover.windows[1].requests, 0, "node 1 was the one killed");
    }
}
