//! The node heartbeat (`raft::hibernation::NodeHeartbeat`) in its protobuf form.

use stemedb_proto::raft as pb;

use crate::raft::hibernation::NodeHeartbeat;

pub fn heartbeat_to_proto(heartbeat: &NodeHeartbeat) -> pb::Heartbeat {
    pb::Heartbeat {
        from: heartbeat.from,
        hibernating: heartbeat.hibernating.clone(),
        recovering: heartbeat.recovering,
        leaving: heartbeat.leaving,
        logs: heartbeat
            .logs
            .iter()
            .map(|(group_id, last_index)| pb::GroupLogIndex { group_id: *group_id, last_index: *last_index })
            .collect(),
    }
}

pub fn heartbeat_from_proto(heartbeat: pb::Heartbeat) -> NodeHeartbeat {
    NodeHeartbeat {
        from: heartbeat.from,
        hibernating: heartbeat.hibernating,
        recovering: heartbeat.recovering,
        leaving: heartbeat.leaving,
        logs: heartbeat.logs.into_iter().map(|log| (log.group_id, log.last_index)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn heartbeats_round_trip(
            from in any::<u64>(),
            hibernating in proptest::collection::vec(any::<u32>(), 0..8),
            recovering in any::<bool>(),
            leaving in any::<bool>(),
            logs in proptest::collection::vec((any::<u32>(), any::<u64>()), 0..8),
        ) {
            let heartbeat = NodeHeartbeat { from, hibernating, recovering, leaving, logs };
            let bytes = prost::Message::encode_to_vec(&heartbeat_to_proto(&heartbeat));
            let decoded = heartbeat_from_proto(prost::Message::decode(bytes.as_slice()).expect("decode"));
            prop_assert_eq!(format!("{heartbeat:?}"), format!("{decoded:?}"));
        }
    }
}
