//! Everything the transport on port 18182 carries, in its protobuf form (`proto/log.proto`,
//! `proto/raft.proto`, `proto/request.proto`), one module per message family: openraft's shared
//! pieces and log entries here, replication, votes and snapshot chunks in `replication`, node
//! heartbeats in `heartbeat`, the request path's messages (forwarded writes, read barriers,
//! reads of a shard, and their answers) in `requests`, and a group's membership changes in
//! `admin`. Commands, answers, reads and errors of the shard layer are converted by
//! `shard::codec`. A stored log entry is one version byte ([`ENTRY_V1`]) and the protobuf
//! `Entry`; entries written before the binary form are JSON and start with `{`, and still read.

pub mod admin;
pub mod heartbeat;
pub mod replication;
pub mod requests;

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, EntryPayload, LeaderId, Membership, StoredMembership};
use stemedb_proto::raft as pb;

use super::types::{Entry, LogId, NodeId};
use crate::error::ErrorCode;
use crate::shard::codec::{command_from_proto, command_to_proto, direct, CodecError};

/// The version byte of a stored log entry in the protobuf form.
pub const ENTRY_V1: u8 = 1;

/// Why a message or a stored entry could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("not a protobuf message: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("a JSON log entry (the earlier format) that does not decode: {0}")]
    LegacyJson(#[from] serde_json::Error),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("unknown log entry format {0} (this version reads 1, and JSON)")]
    UnknownVersion(u8),
    #[error("an empty log entry")]
    Empty,
}

impl WireError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::MalformedMessage
    }

    pub fn to_status(&self) -> tonic::Status {
        self.code().to_status(self.to_string())
    }
}

fn missing<T>(value: Option<T>, field: &'static str) -> Result<T, WireError> {
    value.ok_or(WireError::Missing(field))
}

pub fn log_id_to_proto(id: &LogId) -> pb::LogId {
    pb::LogId { term: id.leader_id.term, node_id: id.leader_id.node_id, index: id.index }
}

pub fn log_id_from_proto(id: pb::LogId) -> LogId {
    openraft::LogId::new(LeaderId::new(id.term, id.node_id), id.index)
}

pub fn vote_to_proto(vote: &openraft::Vote<NodeId>) -> pb::Vote {
    pb::Vote { term: vote.leader_id.term, node_id: vote.leader_id.node_id, committed: vote.committed }
}

pub fn vote_from_proto(vote: Option<pb::Vote>) -> Result<openraft::Vote<NodeId>, WireError> {
    let vote = missing(vote, "vote")?;
    Ok(if vote.committed {
        openraft::Vote::new_committed(vote.term, vote.node_id)
    } else {
        openraft::Vote::new(vote.term, vote.node_id)
    })
}

pub fn membership_to_proto(membership: &Membership<NodeId, BasicNode>) -> pb::Membership {
    pb::Membership {
        configs: membership
            .get_joint_config()
            .iter()
            .map(|config| pb::NodeIds { ids: config.iter().copied().collect() })
            .collect(),
        nodes: membership.nodes().map(|(id, node)| (*id, node.addr.clone())).collect(),
    }
}

pub fn membership_from_proto(membership: Option<pb::Membership>) -> Result<Membership<NodeId, BasicNode>, WireError> {
    let membership = missing(membership, "membership")?;
    let configs: Vec<BTreeSet<NodeId>> =
        membership.configs.into_iter().map(|config| config.ids.into_iter().collect()).collect();
    let nodes: BTreeMap<NodeId, BasicNode> =
        membership.nodes.into_iter().map(|(id, addr)| (id, BasicNode { addr })).collect();
    Ok(Membership::new(configs, nodes))
}

pub fn stored_membership_to_proto(stored: &StoredMembership<NodeId, BasicNode>) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: stored.log_id().as_ref().map(log_id_to_proto),
        membership: Some(membership_to_proto(stored.membership())),
    }
}

pub fn stored_membership_from_proto(
    stored: Option<pb::StoredMembership>,
) -> Result<StoredMembership<NodeId, BasicNode>, WireError> {
    let stored = missing(stored, "stored membership")?;
    Ok(StoredMembership::new(stored.log_id.map(log_id_from_proto), membership_from_proto(stored.membership)?))
}

pub fn entry_to_proto(entry: &Entry) -> pb::Entry {
    use pb::entry::Payload;
    pb::Entry {
        log_id: Some(log_id_to_proto(&entry.log_id)),
        payload: Some(match &entry.payload {
            EntryPayload::Blank => Payload::Blank(pb::Blank {}),
            EntryPayload::Normal(command) => Payload::Command(command_to_proto(command)),
            EntryPayload::Membership(membership) => Payload::Membership(membership_to_proto(membership)),
        }),
    }
}

pub fn entry_from_proto(entry: pb::Entry) -> Result<Entry, WireError> {
    use pb::entry::Payload;
    Ok(Entry {
        log_id: log_id_from_proto(missing(entry.log_id, "entry.log_id")?),
        payload: match missing(entry.payload, "entry.payload")? {
            Payload::Blank(_) => EntryPayload::Blank,
            Payload::Command(command) => EntryPayload::Normal(std::sync::Arc::new(command_from_proto(command)?)),
            Payload::Membership(membership) => EntryPayload::Membership(membership_from_proto(Some(membership))?),
        },
    })
}

/// The stored form of a log entry: [`ENTRY_V1`], then the protobuf `Entry`.
/// A client command's entry is written straight from its command (`codec::direct`); the bytes
/// are those of `entry_to_proto`'s message either way.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let EntryPayload::Normal(command) = &entry.payload else {
        let message = entry_to_proto(entry);
        let mut bytes = Vec::with_capacity(1 + prost::Message::encoded_len(&message));
        bytes.push(ENTRY_V1);
        prost::Message::encode_raw(&message, &mut bytes);
        return bytes;
    };
    let log_id = log_id_to_proto(&entry.log_id);
    let command = direct::Measured::new(command);
    let len = prost::encoding::message::encoded_len(1, &log_id) + command.field_len(3);
    let mut bytes = Vec::with_capacity(1 + len);
    bytes.push(ENTRY_V1);
    prost::encoding::message::encode(1, &log_id, &mut bytes);
    command.write_field(3, &mut bytes);
    bytes
}

/// A stored log entry, in either form.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, WireError> {
    match bytes.first() {
        Some(&ENTRY_V1) => entry_from_proto(prost::Message::decode(&bytes[1..])?),
        Some(b'{') => Ok(serde_json::from_slice(bytes)?),
        Some(version) => Err(WireError::UnknownVersion(*version)),
        None => Err(WireError::Empty),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::shard::codec::tests::same;

    pub(crate) fn log_id() -> impl Strategy<Value = LogId> {
        (any::<u64>(), 0u64..8, any::<u64>())
            .prop_map(|(term, node, index)| openraft::LogId::new(LeaderId::new(term, node), index))
    }

    pub(crate) fn vote() -> impl Strategy<Value = openraft::Vote<NodeId>> {
        (any::<u64>(), 0u64..8, any::<bool>()).prop_map(|(term, node, committed)| {
            if committed {
                openraft::Vote::new_committed(term, node)
            } else {
                openraft::Vote::new(term, node)
            }
        })
    }

    pub(crate) fn membership() -> impl Strategy<Value = Membership<NodeId, BasicNode>> {
        (
            proptest::collection::vec(proptest::collection::btree_set(0u64..8, 1..4), 1..3),
            proptest::collection::btree_map(0u64..12, "[a-z0-9.:]{0,16}", 0..6),
        )
            .prop_map(|(configs, nodes)| {
                Membership::new(
                    configs,
                    nodes.into_iter().map(|(id, addr)| (id, BasicNode { addr })).collect::<BTreeMap<_, _>>(),
                )
            })
    }

    pub(crate) fn entry() -> impl Strategy<Value = Entry> {
        let payload = prop_oneof![
            Just(EntryPayload::Blank),
            crate::shard::codec::tests::command()
                .prop_map(|command| EntryPayload::Normal(std::sync::Arc::new(command))),
            membership().prop_map(EntryPayload::Membership),
        ];
        (log_id(), payload).prop_map(|(log_id, payload)| Entry { log_id, payload })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_entry_round_trips_through_its_stored_form(entry in entry()) {
            let bytes = encode_entry(&entry);
            prop_assert_eq!(bytes[0], ENTRY_V1);
            let decoded = decode_entry(&bytes).expect("decodes");
            prop_assert!(same(&entry, &decoded), "{:?} came back as {:?}", entry, decoded);
        }

        /// The stored form written straight from an assertion command is the message's own
        /// bytes. (Other payloads are compared decoded above: some hold maps, which prost writes
        /// in a `HashMap`'s order.)
        #[test]
        fn stored_assertion_commands_are_the_bytes_of_their_message(
            log_id in log_id(),
            command in crate::shard::codec::direct::tests::assertion_command(),
        ) {
            let entry = Entry { log_id, payload: EntryPayload::Normal(std::sync::Arc::new(command)) };
            let mut message = vec![ENTRY_V1];
            prost::Message::encode_raw(&entry_to_proto(&entry), &mut message);
            prop_assert_eq!(encode_entry(&entry), message);
        }

        /// An entry stored as JSON by an earlier version reads back as that version read it.
        #[test]
        fn json_entries_of_earlier_versions_still_read(entry in entry()) {
            let json = serde_json::to_vec(&entry).expect("json");
            let before: Entry = serde_json::from_slice(&json).expect("the earlier version read it");
            let decoded = decode_entry(&json).expect("decodes");
            prop_assert!(same(&before, &decoded));
        }

        #[test]
        fn damaged_entries_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_entry(&bytes);
            let mut framed = vec![ENTRY_V1];
            framed.extend_from_slice(&bytes);
            let _ = decode_entry(&framed);
        }
    }

    #[test]
    fn unknown_versions_and_empty_bytes_are_named() {
        assert!(matches!(decode_entry(&[7, 1, 2]), Err(WireError::UnknownVersion(7))));
        assert!(matches!(decode_entry(&[]), Err(WireError::Empty)));
    }
}
