//! Key layout of the Raft groups in the node's column families. Every key starts with the
//! big-endian group id so a group's data is one contiguous range in each family.
//!
//! | family        | key                                             | value                  |
//! |---------------|-------------------------------------------------|------------------------|
//! | raft_log      | group, index(8)                                 | entry (JSON)           |
//! | raft_state    | group, `v` / `c` / `p`                          | vote / committed / purged |
//! | state_machine | group, `A`, id(16)                              | assertion (JSON)       |
//! | state_machine | group, `E`, id(16), `R`                         | retraction (JSON)      |
//! | state_machine | group, `E`, id(16), `S`, superseder id(16)      | at_us(8)               |
//! | state_machine | group, `E`, id(16), `V`, agent, 0, at_us(8)     | vote (1, i8)           |
//! | state_machine | group, `E`, id(16), `L`                         | quarantine release (JSON) |
//! | state_machine | group, `Q`, agent, 0, request_id                | outcome (JSON)         |
//! | state_machine | group, `M`                                      | applied state (JSON)   |
//! | state_machine | group, `T`, issued_at_us(8), nonce(8)           | response to a forwarded proposal (JSON) |
//! | state_machine | 0 (meta group), `N`                             | cluster metadata (JSON)|
//! | state_machine | 0 (meta group), `O`, agent                      | root spans (JSON)      |
//! | state_machine | 0 (meta group), `G`, grant id(8)                | grant (JSON)           |
//! | state_machine | 0 (meta group), `B`, agent                      | circuit breaker (JSON) |
//! | index         | group, `P`, path, 0, predicate, 0, id(16)       | empty                  |
//! | index         | group, `C`, path, 0, predicate                  | assertion count (8)    |
//! | index         | group, `q`, id(16)                              | quarantined, undecided |
//! | index         | group, `a`, agent, 0, id(16)                    | empty (by agent)       |
//! | meta          | `snapshot/`, group                              | last snapshot (old format, converted to a file) |
//! | meta          | `install/`, group                               | snapshot install in progress (meta JSON) |
//! | meta          | `reseed/`, group                                | replica dropped as damaged, never re-bootstrapped |
//! | meta          | `vote/`, group                                  | copy of the group's vote (JSON) |
//! | meta          | `recovering`                                    | votes held back until caught up |

use super::command::GroupId;
use crate::model::id::AssertionId;

pub fn group_prefix(group: GroupId) -> Vec<u8> {
    group.to_be_bytes().to_vec()
}

/// The first key after every key of `group`.
pub fn group_end(group: GroupId) -> Vec<u8> {
    (group as u64 + 1).to_be_bytes()[4..].to_vec()
}

pub fn log_key(group: GroupId, index: u64) -> Vec<u8> {
    let mut key = group_prefix(group);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

pub fn state_key(group: GroupId, tag: u8) -> Vec<u8> {
    let mut key = group_prefix(group);
    key.push(tag);
    key
}

fn tagged(group: GroupId, tag: u8, capacity: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + capacity);
    key.extend_from_slice(&group.to_be_bytes());
    key.push(tag);
    key
}

/// The response recorded for a forwarded proposal's idempotency token. Keys sort by the time
/// the token was issued, so expired ones are one range.
pub fn token_key(group: GroupId, issued_at_us: u64, nonce: u64) -> Vec<u8> {
    let mut key = tagged(group, b'T', 16);
    key.extend_from_slice(&issued_at_us.to_be_bytes());
    key.extend_from_slice(&nonce.to_be_bytes());
    key
}

pub fn assertion_key(group: GroupId, id: AssertionId) -> Vec<u8> {
    let mut key = tagged(group, b'A', 16);
    key.extend_from_slice(&id.to_bytes());
    key
}

pub fn events_prefix(group: GroupId, id: AssertionId) -> Vec<u8> {
    let mut key = tagged(group, b'E', 17);
    key.extend_from_slice(&id.to_bytes());
    key
}

pub fn retraction_key(group: GroupId, id: AssertionId) -> Vec<u8> {
    let mut key = events_prefix(group, id);
    key.push(b'R');
    key
}

pub fn supersession_key(group: GroupId, id: AssertionId, by: AssertionId) -> Vec<u8> {
    let mut key = events_prefix(group, id);
    key.push(b'S');
    key.extend_from_slice(&by.to_bytes());
    key
}

pub fn release_key(group: GroupId, id: AssertionId) -> Vec<u8> {
    let mut key = events_prefix(group, id);
    key.push(b'L');
    key
}

/// Claims in quarantine that no admin has decided on yet.
pub fn quarantine_key(group: GroupId, id: AssertionId) -> Vec<u8> {
    let mut key = tagged(group, b'q', 16);
    key.extend_from_slice(&id.to_bytes());
    key
}

pub fn quarantine_prefix(group: GroupId) -> Vec<u8> {
    tagged(group, b'q', 0)
}

/// The by-agent index: every assertion of an agent, in id (time) order. (The by-time index is
/// the `A` records themselves: ids sort by time.)
pub fn agent_key(group: GroupId, agent_id: &str, id: AssertionId) -> Vec<u8> {
    let mut key = agent_prefix(group, agent_id);
    key.extend_from_slice(&id.to_bytes());
    key
}

pub fn agent_prefix(group: GroupId, agent_id: &str) -> Vec<u8> {
    let mut key = tagged(group, b'a', agent_id.len() + 17);
    key.extend_from_slice(agent_id.as_bytes());
    key.push(0);
    key
}

/// The first key of the assertion records (`A`): scanning from here walks them in time order.
pub fn assertions_prefix(group: GroupId) -> Vec<u8> {
    tagged(group, b'A', 0)
}

/// Every vote of `agent_id` on `id`, oldest first.
pub fn agent_votes_prefix(group: GroupId, id: AssertionId, agent_id: &str) -> Vec<u8> {
    let mut key = events_prefix(group, id);
    key.push(b'V');
    key.extend_from_slice(agent_id.as_bytes());
    key.push(0);
    key
}

pub fn vote_key(group: GroupId, id: AssertionId, agent_id: &str, at_us: u64) -> Vec<u8> {
    let mut key = agent_votes_prefix(group, id, agent_id);
    key.extend_from_slice(&at_us.to_be_bytes());
    key
}

pub fn request_key(group: GroupId, agent_id: &str, request_id: &str) -> Vec<u8> {
    let mut key = tagged(group, b'Q', agent_id.len() + request_id.len() + 1);
    key.extend_from_slice(agent_id.as_bytes());
    key.push(0);
    key.extend_from_slice(request_id.as_bytes());
    key
}

pub fn applied_key(group: GroupId) -> Vec<u8> {
    tagged(group, b'M', 0)
}

/// The cluster metadata document of the meta group.
pub fn meta_state_key(group: GroupId) -> Vec<u8> {
    tagged(group, b'N', 0)
}

/// Tags of the policy records the meta group keeps (see `cluster::policy`).
pub const POLICY_ROOT: u8 = b'O';
pub const POLICY_GRANT: u8 = b'G';
pub const POLICY_BREAKER: u8 = b'B';

/// The key of one policy record: `group, tag, name`.
pub fn policy_key(group: GroupId, tag: u8, name: &[u8]) -> Vec<u8> {
    let mut key = tagged(group, tag, name.len());
    key.extend_from_slice(name);
    key
}

/// `group, P, path, 0` or, with a predicate, `group, P, path, 0, predicate, 0`.
pub fn claims_prefix(group: GroupId, concept_path: &str, predicate: Option<&str>) -> Vec<u8> {
    let mut key = tagged(group, b'P', concept_path.len() + 2);
    key.extend_from_slice(concept_path.as_bytes());
    key.push(0);
    if let Some(predicate) = predicate {
        key.extend_from_slice(predicate.as_bytes());
        key.push(0);
    }
    key
}

pub fn claim_key(group: GroupId, concept_path: &str, predicate: &str, id: AssertionId) -> Vec<u8> {
    let mut key = claims_prefix(group, concept_path, Some(predicate));
    key.extend_from_slice(&id.to_bytes());
    key
}

pub fn concept_key(group: GroupId, concept_path: &str, predicate: &str) -> Vec<u8> {
    let mut key = tagged(group, b'C', concept_path.len() + predicate.len() + 1);
    key.extend_from_slice(concept_path.as_bytes());
    key.push(0);
    key.extend_from_slice(predicate.as_bytes());
    key
}

pub fn concept_tag_prefix(group: GroupId) -> Vec<u8> {
    tagged(group, b'C', 0)
}

/// Splits a concept key into (concept_path, predicate).
pub fn parse_concept_key(key: &[u8]) -> Option<(&str, &str)> {
    let body = key.get(5..)?;
    let split = body.iter().position(|&b| b == 0)?;
    let path = std::str::from_utf8(&body[..split]).ok()?;
    let predicate = std::str::from_utf8(&body[split + 1..]).ok()?;
    Some((path, predicate))
}

/// Set while a snapshot of `group` is being installed (its metadata, JSON): a node that stops
/// in the middle finishes the install from the snapshot file when it opens again.
pub fn install_marker_key(group: GroupId) -> Vec<u8> {
    let mut key = b"install/".to_vec();
    key.extend_from_slice(&group.to_be_bytes());
    key
}

/// The node's recovering flag (meta family): set while it holds its votes back because it
/// forgot entries it acknowledged (an empty data dir, or replicas dropped as damaged).
pub const RECOVERING_KEY: &[u8] = b"recovering";

/// Set (meta family) when this node's replica of `group` was dropped as damaged: the group
/// never bootstraps itself here again; its leader re-seeds it.
pub fn reseed_marker_key(group: GroupId) -> Vec<u8> {
    let mut key = b"reseed/".to_vec();
    key.extend_from_slice(&group.to_be_bytes());
    key
}

/// A copy of `group`'s vote (meta family), written with it: a table file lost from the
/// `raft_state` family cannot take the vote with it (`raft::damage`).
pub fn vote_copy_key(group: GroupId) -> Vec<u8> {
    let mut key = b"vote/".to_vec();
    key.extend_from_slice(&group.to_be_bytes());
    key
}

/// Where versions before streamed snapshots kept a group's last snapshot (read to convert it).
pub fn snapshot_key(group: GroupId) -> Vec<u8> {
    let mut key = b"snapshot/".to_vec();
    key.extend_from_slice(&group.to_be_bytes());
    key
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xFF; prefix.len() + 1]
}
