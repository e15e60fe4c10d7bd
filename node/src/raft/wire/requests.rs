//! The request path's messages in their protobuf form (`proto/request.proto`), each answered
//! with its result or the [`ConsensusError`] that refused it: a write forwarded to a shard's
//! leader (Propose), a read barrier asked of it (ReadIndex), the answer of a membership change
//! or a request to campaign (DoneReply; the change itself is in `admin`), and a read of a shard
//! executed by one of its replicas (ShardRead). The shard layer's types inside them are
//! converted by `shard::codec`.

use stemedb_proto::raft as pb;

use super::{missing, WireError};
use crate::raft::types::{GroupId, ShardCommand, ShardResponse};
use crate::shard::codec::errors::{consensus_error_from_proto, consensus_error_to_proto};
use crate::shard::codec::read::{read_from_proto, read_result_from_proto, read_result_to_proto, read_to_proto};
use crate::shard::codec::response::{response_from_proto, response_to_proto};
use crate::shard::codec::{command_from_proto, command_to_proto};
use crate::shard::reader::{ShardRead, ShardReadResult};
use crate::shard::ConsensusError;

pub fn propose_to_proto(group_id: GroupId, command: &ShardCommand) -> pb::ProposeRequest {
    pb::ProposeRequest { group_id, command: Some(command_to_proto(command)) }
}

pub fn propose_from_proto(request: pb::ProposeRequest) -> Result<ShardCommand, WireError> {
    Ok(command_from_proto(missing(request.command, "propose.command")?)?)
}

pub fn propose_reply_to_proto(result: &Result<ShardResponse, ConsensusError>) -> pb::ProposeReply {
    use pb::propose_reply::Result as R;
    pb::ProposeReply {
        result: Some(match result {
            Ok(response) => R::Response(response_to_proto(response)),
            Err(error) => R::Error(consensus_error_to_proto(error)),
        }),
    }
}

pub fn propose_reply_from_proto(reply: pb::ProposeReply) -> Result<Result<ShardResponse, ConsensusError>, WireError> {
    use pb::propose_reply::Result as R;
    Ok(match missing(reply.result, "propose reply")? {
        R::Response(response) => Ok(response_from_proto(response)?),
        R::Error(error) => Err(consensus_error_from_proto(error)?),
    })
}

pub fn read_index_reply_to_proto(result: &Result<u64, ConsensusError>) -> pb::ReadIndexReply {
    use pb::read_index_reply::Result as R;
    pb::ReadIndexReply {
        result: Some(match result {
            Ok(index) => R::Index(*index),
            Err(error) => R::Error(consensus_error_to_proto(error)),
        }),
    }
}

pub fn read_index_reply_from_proto(reply: pb::ReadIndexReply) -> Result<Result<u64, ConsensusError>, WireError> {
    use pb::read_index_reply::Result as R;
    Ok(match missing(reply.result, "read index reply")? {
        R::Index(index) => Ok(index),
        R::Error(error) => Err(consensus_error_from_proto(error)?),
    })
}

/// The answer of AdminGroup and Campaign.
pub fn done_reply_to_proto(result: &Result<(), ConsensusError>) -> pb::DoneReply {
    use pb::done_reply::Result as R;
    pb::DoneReply {
        result: Some(match result {
            Ok(()) => R::Done(pb::Blank {}),
            Err(error) => R::Error(consensus_error_to_proto(error)),
        }),
    }
}

pub fn done_reply_from_proto(reply: pb::DoneReply) -> Result<Result<(), ConsensusError>, WireError> {
    use pb::done_reply::Result as R;
    Ok(match missing(reply.result, "done reply")? {
        R::Done(_) => Ok(()),
        R::Error(error) => Err(consensus_error_from_proto(error)?),
    })
}

pub fn shard_read_to_proto(group_id: GroupId, read: &ShardRead, linearizable: bool) -> pb::ShardReadRequest {
    pb::ShardReadRequest { group_id, read: Some(read_to_proto(read)), linearizable }
}

/// The read and whether it is linearizable.
pub fn shard_read_from_proto(request: pb::ShardReadRequest) -> Result<(ShardRead, bool), WireError> {
    Ok((read_from_proto(missing(request.read, "shard_read.read")?)?, request.linearizable))
}

pub fn shard_read_reply_to_proto(result: &Result<ShardReadResult, ConsensusError>) -> pb::ShardReadReply {
    use pb::shard_read_reply::Result as R;
    pb::ShardReadReply {
        result: Some(match result {
            Ok(answer) => R::Answer(read_result_to_proto(answer)),
            Err(error) => R::Error(consensus_error_to_proto(error)),
        }),
    }
}

pub fn shard_read_reply_from_proto(
    reply: pb::ShardReadReply,
) -> Result<Result<ShardReadResult, ConsensusError>, WireError> {
    use pb::shard_read_reply::Result as R;
    Ok(match missing(reply.result, "shard read reply")? {
        R::Answer(answer) => Ok(read_result_from_proto(answer)?),
        R::Error(error) => Err(consensus_error_from_proto(error)?),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::shard::codec::errors::tests::consensus_error;
    use crate::shard::codec::read::tests::{read_result, shard_read};
    use crate::shard::codec::response::tests::response;
    use crate::shard::codec::tests::{command, round_trip, same};

    fn result<T: std::fmt::Debug>(
        answer: impl Strategy<Value = T>,
    ) -> impl Strategy<Value = Result<T, ConsensusError>> {
        prop_oneof![answer.prop_map(Ok::<T, ConsensusError>), consensus_error().prop_map(Err::<T, ConsensusError>)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn proposals_round_trip(command in command(), group in any::<u32>(), reply in result(response())) {
            let message = round_trip(&propose_to_proto(group, &command));
            prop_assert_eq!(message.group_id, group);
            let decoded = propose_from_proto(message).expect("a command");
            prop_assert!(same(&command, &decoded), "{:?} came back as {:?}", command, decoded);
            let decoded = propose_reply_from_proto(round_trip(&propose_reply_to_proto(&reply))).expect("a reply");
            prop_assert!(same(&reply, &decoded), "{:?} came back as {:?}", reply, decoded);
        }

        #[test]
        fn read_index_and_done_replies_round_trip(index in result(any::<u64>()), done in result(Just(()))) {
            let decoded = read_index_reply_from_proto(round_trip(&read_index_reply_to_proto(&index))).expect("a reply");
            prop_assert!(same(&index, &decoded), "{:?} came back as {:?}", index, decoded);
            let decoded = done_reply_from_proto(round_trip(&done_reply_to_proto(&done))).expect("a reply");
            prop_assert!(same(&done, &decoded), "{:?} came back as {:?}", done, decoded);
        }

        #[test]
        fn shard_reads_round_trip(
            read in shard_read(),
            linearizable in any::<bool>(),
            group in any::<u32>(),
            reply in result(read_result()),
        ) {
            let message = round_trip(&shard_read_to_proto(group, &read, linearizable));
            prop_assert_eq!(message.group_id, group);
            let (decoded, decoded_linearizable) = shard_read_from_proto(message).expect("a read");
            prop_assert!(same(&read, &decoded), "{:?} came back as {:?}", read, decoded);
            prop_assert_eq!(linearizable, decoded_linearizable);
            let decoded = shard_read_reply_from_proto(round_trip(&shard_read_reply_to_proto(&reply))).expect("a reply");
            prop_assert!(same(&reply, &decoded), "{:?} came back as {:?}", reply, decoded);
        }

        /// Arbitrary bytes never panic the decoders of the five rpcs' messages.
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(message) = <pb::ProposeRequest as prost::Message>::decode(bytes.as_slice()) {
                let _ = propose_from_proto(message);
            }
            if let Ok(message) = <pb::ProposeReply as prost::Message>::decode(bytes.as_slice()) {
                let _ = propose_reply_from_proto(message);
            }
            if let Ok(message) = <pb::ReadIndexReply as prost::Message>::decode(bytes.as_slice()) {
                let _ = read_index_reply_from_proto(message);
            }
            if let Ok(message) = <pb::DoneReply as prost::Message>::decode(bytes.as_slice()) {
                let _ = done_reply_from_proto(message);
            }
            if let Ok(message) = <pb::ShardReadRequest as prost::Message>::decode(bytes.as_slice()) {
                let _ = shard_read_from_proto(message);
            }
            if let Ok(message) = <pb::ShardReadReply as prost::Message>::decode(bytes.as_slice()) {
                let _ = shard_read_reply_from_proto(message);
            }
        }
    }

    #[test]
    fn missing_parts_are_named() {
        let request = pb::ProposeRequest { group_id: 1, command: None };
        assert!(matches!(propose_from_proto(request), Err(WireError::Missing("propose.command"))));
        assert!(matches!(
            propose_reply_from_proto(pb::ProposeReply { result: None }),
            Err(WireError::Missing("propose reply"))
        ));
        let read = pb::ShardReadRequest { group_id: 1, read: None, linearizable: true };
        assert!(matches!(shard_read_from_proto(read), Err(WireError::Missing("shard_read.read"))));
        // An error inside a reply that does not decode is the reply's error, named.
        let bad = pb::DoneReply {
            result: Some(pb::done_reply::Result::Error(pb::ConsensusError {
                kind: Some(pb::consensus_error::Kind::CatchingUp(pb::consensus_error::CatchingUp { shard: 1 << 20 })),
            })),
        };
        assert!(matches!(
            done_reply_from_proto(bad),
            Err(WireError::Codec(crate::shard::codec::CodecError::Invalid { field: "catching_up.shard", .. }))
        ));
    }
}
