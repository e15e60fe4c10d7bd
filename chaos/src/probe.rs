//! The stale-read probe: partition faults built so that a linearizable read which skips the read
//! barrier *must* return a stale value, whatever the timing.
//!
//! Around a fault that cuts node `n` off from the majority (`partition-leader`,
//! `majority-minority`), on a shard `n` hosts and a key of the probe's own (no client writes it):
//!
//! 1. before the fault, write `a` through `n` and wait until `n`'s own replica shows `a`;
//! 2. cut `n` off (the fault itself);
//! 3. write `b` through a node of the majority, retried with its `request_id` until acknowledged
//!    (the majority elects a leader if `n` led the shard);
//! 4. read the key through `n` at `linearizable` consistency.
//!
//! `n` cannot have `b`, so the read must fail (it cannot reach a quorum or the leader); a node
//! that answers from its replica without the barrier returns `a`. All three operations go into
//! the register history, so the checkers (not the probe) must find the stale read: `a`
//! completed before `b` was invoked, and `b` completed before the read was invoked. The probe
//! only records what it saw, so a run can show that the situation was constructed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use stemedb_cluster_tests::TestCluster;

use crate::history::{Op, OpKind, Outcome};
use crate::nemesis::FaultKind;
use crate::workload::{self, History, Sent};

/// The process id of the probe's operations in the register history (clients count from 0).
pub const PROBE_PROCESS: u32 = u32::MAX;

/// How long the majority gets to acknowledge the probe's write: an election (the election
/// timeout is at most 1.2 s by default) and a few retries, with room for a loaded machine.
const WRITE_WINDOW: Duration = Duration::from_secs(15);

/// One probe: where, and how far it got.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeRecord {
    pub fault: FaultKind,
    /// Seconds since the run started.
    pub at_s: f64,
    pub shard: u16,
    /// The node cut off from the majority, which the read went through.
    pub node: u64,
    pub key: String,
    /// `stale` (the read returned the value written before the fault: the bug the probe sets a
    /// trap for), `read_failed` (what a correct node answers), `current` (it returned the
    /// majority's value: the node was not cut off after all), `unexpected` (another value),
    /// `not_prepared` or `not_written` (the probe could not set up the situation; nothing was
    /// shown either way).
    pub result: &'static str,
    pub detail: String,
}

/// A probe whose first write is visible on the node about to be cut off.
pub struct Prepared {
    fault: FaultKind,
    at_s: f64,
    shard: u16,
    node: u64,
    key: String,
    before: i64,
}

pub struct Probe {
    history: Arc<History>,
    client: reqwest::Client,
    run_tag: String,
    started: Instant,
    /// The probe's key on each shard.
    keys: BTreeMap<u16, String>,
    counter: i64,
    pub records: Vec<ProbeRecord>,
}

impl Probe {
    pub fn new(history: Arc<History>, client: reqwest::Client, run_tag: String, started: Instant) -> Probe {
        Probe { history, client, run_tag, started, keys: BTreeMap::new(), counter: 0, records: Vec::new() }
    }

    /// A key of the probe's own on `shard`: the first `chaos/<run>/probe/<i>` that hashes there.
    fn key_on(&mut self, cluster: &TestCluster, shard: u16) -> Option<String> {
        if let Some(key) = self.keys.get(&shard) {
            return Some(key.clone());
        }
        // Paths hash uniformly over the shards, so a few dozen candidates find every shard.
        let key = (0..100_000)
            .map(|i| format!("chaos/{}/probe/{i}", self.run_tag))
            .find(|path| cluster.shard_of(path) == shard)?;
        self.keys.insert(shard, key.clone());
        Some(key)
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Step 1, before the fault: writes a new value through `node` and waits until `node`'s
    /// replica of `shard` shows it. `None` (and a `not_prepared` record) when it cannot.
    pub async fn prepare(
        &mut self,
        cluster: &TestCluster,
        fault: FaultKind,
        shard: u16,
        node: u64,
    ) -> Option<Prepared> {
        let at_s = self.started.elapsed().as_secs_f64();
        let key = self.key_on(cluster, shard)?;
        let base = cluster.node(node).api();
        let before = self.write(&base, node, &key, Instant::now() + Duration::from_secs(10)).await;
        let prepared = Prepared { fault, at_s, shard, node, key, before: before.unwrap_or_default() };
        if before.is_none() {
            self.record(&prepared, "not_prepared", format!("write through node {node} not acknowledged"));
            return None;
        }
        // Acknowledged means applied on the leader; `node` may be a follower that applies it a
        // moment later, so poll its own replica (a stale read) until it has it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = workload::read_register(&self.client, &base, &prepared.key, "stale").await;
            if seen.as_ref().ok().and_then(Value::as_i64) == Some(prepared.before) {
                return Some(prepared);
            }
            if Instant::now() > deadline {
                self.record(&prepared, "not_prepared", format!("node {node} did not show it within 5 s: {seen:?}"));
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Steps 3 and 4, once the node is cut off: a write through `majority_node`, then the read
    /// through the cut-off node.
    pub async fn finish(&mut self, cluster: &TestCluster, prepared: Prepared, majority_node: u64) {
        let base = cluster.node(majority_node).api();
        let Some(after) = self.write(&base, majority_node, &prepared.key, Instant::now() + WRITE_WINDOW).await else {
            let detail = format!("write through node {majority_node} not acknowledged within {WRITE_WINDOW:?}");
            self.record(&prepared, "not_written", detail);
            return;
        };
        let sent = Sent { process: PROBE_PROCESS, node: prepared.node, key: prepared.key.clone(), value: 0 };
        let base = cluster.node(prepared.node).api();
        let (outcome, returned) = workload::read_recorded(&self.client, &base, sent, &self.history, self.started).await;
        let (result, detail) = match (outcome, returned) {
            (Outcome::Ok, Some(v)) if v == prepared.before => {
                ("stale", format!("returned {v}, written before the fault; {after} was acknowledged since"))
            }
            (Outcome::Ok, Some(v)) if v == after => ("current", format!("returned {v}, written through the majority")),
            (Outcome::Ok, other) => ("unexpected", format!("returned {other:?}, neither value the probe wrote")),
            _ => ("read_failed", format!("the read through node {} failed, as it must", prepared.node)),
        };
        self.record(&prepared, result, detail);
    }

    /// Writes a new value of `key` through `base` (retried with one `request_id` until `until`)
    /// and records it in the register history as one operation; the value when acknowledged.
    async fn write(&mut self, base: &str, node: u64, key: &str, until: Instant) -> Option<i64> {
        self.counter += 1;
        let value = PROBE_PROCESS as i64 * 1_000_000_000 + self.counter;
        let body = workload::assertion(key, value, "chaos-probe", Some(&format!("probe-{}", self.counter)));
        let id = self.history.next_id();
        let invoke_us = self.now_us();
        let target = (node, base.to_string());
        let outcome = workload::write_until_settled(&self.client, &body, until, || Some(target.clone())).await;
        let answered_us = self.now_us();
        self.history.record(Op {
            id,
            process: PROBE_PROCESS,
            key: key.to_string(),
            kind: OpKind::Write,
            value: Some(value),
            invoke_us,
            complete_us: (outcome != Outcome::Indeterminate).then_some(answered_us),
            answered_us,
            outcome,
            node,
            error: None,
        });
        (outcome == Outcome::Ok).then_some(value)
    }

    fn record(&mut self, prepared: &Prepared, result: &'static str, detail: String) {
        self.records.push(ProbeRecord {
            fault: prepared.fault,
            at_s: prepared.at_s,
            shard: prepared.shard,
            node: prepared.node,
            key: prepared.key.clone(),
            result,
            detail,
        });
    }
}
