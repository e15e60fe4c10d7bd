//! Linearizability of register histories: the Wing–Gong algorithm with Lowe's memoization (as in
//! Porcupine and Knossos), per key (a history is linearizable iff each key's sub-history is).
//!
//! Model: a register holding `Option<i64>`, initially `None`; a write sets it; a read returns
//! it. Writes of a run are unique values. Indeterminate writes may take effect at any point
//! after their invocation or never; an indeterminate write no read ever observed is dropped,
//! which cannot change the verdict (any linearization containing it stays valid without it,
//! since no read returned its value). Failed operations had no effect and are dropped.
//!
//! Besides the yes/no verdict, [`stale_reads`] names the simplest kind of violation directly:
//! a read that returned a value overwritten by a write which completed before the read began.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::history::{Op, OpKind, Outcome};

/// The verdict for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    Linearizable,
    /// No linearization exists. `frontier`: ids of the operations at the point where every
    /// search path failed (the earliest operations that could not be linearized).
    NotLinearizable {
        frontier: Vec<u64>,
    },
    /// The search gave up after its step budget.
    Unknown {
        steps: u64,
    },
}

const NONE: usize = usize::MAX;

/// Checks one key's operations (all of the same key). `budget` bounds the search steps.
pub fn check_key(ops: &[Op], budget: u64) -> Verdict {
    let observed: HashSet<i64> =
        ops.iter().filter(|o| o.kind == OpKind::Read && o.outcome == Outcome::Ok).filter_map(|o| o.value).collect();
    let kept: Vec<&Op> = ops
        .iter()
        .filter(|o| match (o.kind, o.outcome) {
            (_, Outcome::Fail) => false,
            (OpKind::Read, Outcome::Indeterminate) => false,
            (OpKind::Write, Outcome::Indeterminate) => o.value.is_some_and(|v| observed.contains(&v)),
            _ => true,
        })
        .collect();
    if kept.is_empty() {
        return Verdict::Linearizable;
    }
    // Events: (time, is_return, op index). Calls sort before returns at the same time, which
    // treats touching operations as concurrent (the lenient reading of equal timestamps).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(kept.len() * 2);
    for (i, op) in kept.iter().enumerate() {
        events.push((op.invoke_us, false, i));
        events.push((op.complete_us.unwrap_or(u64::MAX), true, i));
    }
    events.sort();
    let n = events.len();
    // A doubly linked list over the events, with a head sentinel at index n.
    let mut next: Vec<usize> = (1..=n).collect();
    next[n - 1] = NONE;
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { n } else { i - 1 }).collect();
    next.push(0);
    prev.push(NONE);
    let mut call_of = vec![0usize; kept.len()];
    let mut return_of = vec![0usize; kept.len()];
    for (position, (_, is_return, op)) in events.iter().enumerate() {
        if *is_return {
            return_of[*op] = position;
        } else {
            call_of[*op] = position;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, q) = (prev[e], next[e]);
        next[p] = q;
        if q != NONE {
            prev[q] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, q) = (prev[e], next[e]);
        next[p] = e;
        if q != NONE {
            prev[q] = e;
        }
    };
    let words = kept.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<i64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<i64>)> = Vec::new();
    let mut state: Option<i64> = None;
    let mut entry = next[n];
    let mut steps = 0u64;
    let mut deepest = 0usize;
    let mut frontier: Vec<u64> = Vec::new();
    loop {
        if next[n] == NONE {
            return Verdict::Linearizable;
        }
        steps += 1;
        if steps > budget {
            return Verdict::Unknown { steps };
        }
        let (_, is_return, op_index) = events[entry];
        if !is_return {
            let op = kept[op_index];
            let (ok, new_state) = match op.kind {
                OpKind::Write => (true, op.value),
                OpKind::Read => (state == op.value, state),
            };
            if ok {
                linearized[op_index / 64] |= 1 << (op_index % 64);
                if cache.insert((linearized.clone(), new_state)) {
                    stack.push((op_index, state));
                    state = new_state;
                    unlink(&mut next, &mut prev, call_of[op_index]);
                    unlink(&mut next, &mut prev, return_of[op_index]);
                    entry = next[n];
                    continue;
                }
                linearized[op_index / 64] &= !(1 << (op_index % 64));
            }
            entry = next[entry];
        } else {
            // An operation returned before anything pending could be linearized: backtrack.
            if stack.len() >= deepest {
                deepest = stack.len();
                frontier = pending_calls(&events, &next, n, entry).into_iter().map(|i| kept[i].id).collect();
                frontier.push(kept[op_index].id);
            }
            let Some((top, previous_state)) = stack.pop() else {
                frontier.sort();
                frontier.dedup();
                return Verdict::NotLinearizable { frontier };
            };
            state = previous_state;
            linearized[top / 64] &= !(1 << (top % 64));
            relink(&mut next, &mut prev, return_of[top]);
            relink(&mut next, &mut prev, call_of[top]);
            entry = next[call_of[top]];
        }
    }
}

/// The operations whose calls are still in the list before `until`.
fn pending_calls(events: &[(u64, bool, usize)], next: &[usize], head: usize, until: usize) -> Vec<usize> {
    let mut calls = Vec::new();
    let mut e = next[head];
    while e != NONE && e != until {
        if !events[e].1 {
            calls.push(events[e].2);
        }
        e = next[e];
    }
    calls
}

/// Splits a history by key and checks each.
pub fn check(ops: &[Op], budget_per_key: u64) -> BTreeMap<String, Verdict> {
    let mut by_key: BTreeMap<String, Vec<Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.clone()).or_default().push(op.clone());
    }
    by_key.into_iter().map(|(key, ops)| (key.clone(), check_key(&ops, budget_per_key))).collect()
}

/// A read that returned a value older than one a completed write had replaced before the read
/// began.
#[derive(Debug, Clone, Serialize)]
pub struct StaleRead {
    pub key: String,
    pub read: u64,
    pub returned: Option<i64>,
    /// The acknowledged write, completed before the read was invoked, that the read missed.
    pub missed_write: u64,
    pub missed_value: Option<i64>,
}

/// Reads (acknowledged) that returned a value that was already overwritten in real time: the
/// returned value's write (if any) completed before an acknowledged write `w` was invoked, and
/// `w` completed before the read was invoked. Every such read is a linearizability violation.
pub fn stale_reads(ops: &[Op]) -> Vec<StaleRead> {
    let mut found = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        let writes: Vec<&Op> = ops.iter().copied().filter(|o| o.kind == OpKind::Write).collect();
        let write_of = |value: i64| writes.iter().find(|w| w.value == Some(value)).copied();
        for read in ops.iter().filter(|o| o.kind == OpKind::Read && o.outcome == Outcome::Ok) {
            // When the returned value's write ended (None: the empty register, "before time").
            let returned_done = match read.value {
                None => Some(0),
                Some(v) => match write_of(v) {
                    Some(w) => w.complete_us,
                    None => continue, // a value nobody wrote: the linearizability check reports it
                },
            };
            let Some(returned_done) = returned_done else { continue };
            let missed = writes.iter().find(|w| {
                w.outcome == Outcome::Ok
                    && w.value != read.value
                    && w.invoke_us > returned_done
                    && w.complete_us.is_some_and(|c| c < read.invoke_us)
            });
            if let Some(w) = missed {
                found.push(StaleRead {
                    key: key.to_string(),
                    read: read.id,
                    returned: read.value,
                    missed_write: w.id,
                    missed_value: w.value,
                });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op(id: u64, kind: OpKind, value: Option<i64>, invoke: u64, complete: Option<u64>, outcome: Outcome) -> Op {
        Op {
            id,
            process: id as u32,
            key: "k".into(),
            kind,
            value,
            invoke_us: invoke,
            complete_us: complete,
            answered_us: complete.unwrap_or(invoke),
            outcome,
            node: 1,
            error: None,
        }
    }

    fn w(id: u64, v: i64, a: u64, b: u64) -> Op {
        op(id, OpKind::Write, Some(v), a, Some(b), Outcome::Ok)
    }

    fn r(id: u64, v: Option<i64>, a: u64, b: u64) -> Op {
        op(id, OpKind::Read, v, a, Some(b), Outcome::Ok)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let ops = vec![r(1, None, 0, 1), w(2, 10, 2, 3), r(3, Some(10), 4, 5), w(4, 20, 6, 7), r(5, Some(20), 8, 9)];
        assert_eq!(check_key(&ops, 1_000_000), Verdict::Linearizable);
        assert!(stale_reads(&ops).is_empty());
    }

    #[test]
    fn stale_read_is_caught() {
        let ops = vec![w(1, 10, 0, 1), w(2, 20, 2, 3), r(3, Some(10), 4, 5)];
        assert!(matches!(check_key(&ops, 1_000_000), Verdict::NotLinearizable { .. }));
        let stale = stale_reads(&ops);
        assert_eq!(stale.len(), 1);
        assert_eq!((stale[0].read, stale[0].missed_write), (3, 2));
    }

    #[test]
    fn concurrent_reads_may_see_either_value() {
        let ops = vec![w(1, 10, 0, 1), w(2, 20, 2, 10), r(3, Some(10), 3, 4), r(4, Some(20), 5, 6)];
        assert_eq!(check_key(&ops, 1_000_000), Verdict::Linearizable);
        // ...but not go back once the newer value was seen.
        let ops = vec![w(1, 10, 0, 1), w(2, 20, 2, 10), r(3, Some(20), 3, 4), r(4, Some(10), 5, 6)];
        assert!(matches!(check_key(&ops, 1_000_000), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn indeterminate_writes_may_land_late_or_never() {
        let lost = op(2, OpKind::Write, Some(20), 2, None, Outcome::Indeterminate);
        let ops = vec![w(1, 10, 0, 1), lost.clone(), r(3, Some(10), 5, 6), r(4, Some(20), 100, 101)];
        assert_eq!(check_key(&ops, 1_000_000), Verdict::Linearizable, "it landed late");
        let ops = vec![w(1, 10, 0, 1), lost, r(3, Some(10), 5, 6)];
        assert_eq!(check_key(&ops, 1_000_000), Verdict::Linearizable, "it never landed");
    }

    #[test]
    fn a_value_never_written_is_a_violation() {
        let ops = vec![w(1, 10, 0, 1), r(2, Some(99), 2, 3)];
        assert!(matches!(check_key(&ops, 1_000_000), Verdict::NotLinearizable { .. }));
    }

    /// Brute force: some permutation consistent with real time and the register model.
    fn brute_force(ops: &[Op]) -> bool {
        let ops: Vec<&Op> = ops.iter().filter(|o| o.outcome == Outcome::Ok).collect();
        fn search(ops: &[&Op], used: &mut Vec<bool>, state: Option<i64>) -> bool {
            if used.iter().all(|u| *u) {
                return true;
            }
            for i in 0..ops.len() {
                if used[i] {
                    continue;
                }
                // i may go next only if no unused op completed before i was invoked.
                let blocked = (0..ops.len())
                    .any(|j| !used[j] && j != i && ops[j].complete_us.is_some_and(|c| c < ops[i].invoke_us));
                if blocked {
                    continue;
                }
                let (ok, next) = match ops[i].kind {
                    OpKind::Write => (true, ops[i].value),
                    OpKind::Read => (state == ops[i].value, state),
                };
                if ok {
                    used[i] = true;
                    if search(ops, used, next) {
                        return true;
                    }
                    used[i] = false;
                }
            }
            false
        }
        search(&ops, &mut vec![false; ops.len()], None)
    }

    proptest! {
        /// The checker agrees with brute force on small random histories of acknowledged ops.
        #[test]
        fn agrees_with_brute_force(specs in proptest::collection::vec((any::<bool>(), 0u64..20, 1u64..8, 0i64..4), 1..7)) {
            let mut ops = Vec::new();
            for (i, (is_write, start, length, value)) in specs.into_iter().enumerate() {
                let id = i as u64 + 1;
                let value = if is_write { Some(id as i64 * 100) } else if value == 0 { None } else { Some(value * 100) };
                ops.push(op(id, if is_write { OpKind::Write } else { OpKind::Read }, value, start, Some(start + length), Outcome::Ok));
            }
            let expected = brute_force(&ops);
            let verdict = check_key(&ops, 10_000_000);
            prop_assert_eq!(verdict == Verdict::Linearizable, expected, "{:?}", ops);
        }
    }
}
