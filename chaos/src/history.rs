//! What the workloads record: every operation with its invoke and complete times and its
//! outcome. An operation whose outcome is unknown (a timeout, a dropped connection, a 5xx that
//! does not prove the write was refused) is *indeterminate*: it may have taken effect at any
//! time after its invocation, or never.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Write,
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged (write) or answered (read).
    Ok,
    /// Definitely without effect (refused as bad input, or a read that failed).
    Fail,
    /// Unknown: may or may not have taken effect.
    Indeterminate,
}

/// One operation on a register (a (concept_path, predicate) key).
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub id: u64,
    pub process: u32,
    pub key: String,
    pub kind: OpKind,
    /// The value written, or the value a read returned (`None`: the register was empty).
    pub value: Option<i64>,
    /// Microseconds since the run started.
    pub invoke_us: u64,
    /// `None` for indeterminate operations (they never completed as far as we know).
    pub complete_us: Option<u64>,
    /// When the client had its answer or gave up, whatever the outcome: what the client waited
    /// (the failover measurement), unlike `complete_us`, which is what the checkers may assume.
    pub answered_us: u64,
    pub outcome: Outcome,
    /// The node the client sent the request to.
    pub node: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Operations by kind and outcome.
#[derive(Debug, Default, Clone, Serialize)]
pub struct OpCounts {
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub writes_indeterminate: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
}

impl OpCounts {
    pub fn of(ops: &[Op]) -> OpCounts {
        let mut counts = OpCounts::default();
        for op in ops {
            let slot = match (op.kind, op.outcome) {
                (OpKind::Write, Outcome::Ok) => &mut counts.writes_ok,
                (OpKind::Write, Outcome::Fail) => &mut counts.writes_failed,
                (OpKind::Write, Outcome::Indeterminate) => &mut counts.writes_indeterminate,
                (OpKind::Read, Outcome::Ok) => &mut counts.reads_ok,
                (OpKind::Read, _) => &mut counts.reads_failed,
            };
            *slot += 1;
        }
        counts
    }
}
