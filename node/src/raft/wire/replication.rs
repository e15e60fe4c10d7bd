//! Replication, elections and snapshot chunks in their protobuf form: openraft's
//! AppendEntries, Vote and InstallSnapshot requests, and their answers, errors included (a
//! group that stopped, panicked or failed its storage; a snapshot chunk out of order).

use openraft::error::{Fatal, InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{AnyError, ErrorSubject, ErrorVerb, SnapshotMeta, SnapshotSegmentId, StorageError, StorageIOError};
use stemedb_proto::raft as pb;

use super::{
    entry_from_proto, entry_to_proto, log_id_from_proto, log_id_to_proto, missing, stored_membership_from_proto,
    stored_membership_to_proto, vote_from_proto, vote_to_proto, WireError,
};
use crate::raft::types::{GroupId, NodeId, TypeConfig};

use pb::raft_failure::Kind as FailureKind;

pub fn append_to_proto(group_id: GroupId, request: &AppendEntriesRequest<TypeConfig>) -> pb::AppendRequest {
    pb::AppendRequest {
        group_id,
        vote: Some(vote_to_proto(&request.vote)),
        prev_log_id: request.prev_log_id.as_ref().map(log_id_to_proto),
        entries: request.entries.iter().map(entry_to_proto).collect(),
        leader_commit: request.leader_commit.as_ref().map(log_id_to_proto),
    }
}

pub fn append_from_proto(request: pb::AppendRequest) -> Result<AppendEntriesRequest<TypeConfig>, WireError> {
    Ok(AppendEntriesRequest {
        vote: vote_from_proto(request.vote)?,
        prev_log_id: request.prev_log_id.map(log_id_from_proto),
        entries: request.entries.into_iter().map(entry_from_proto).collect::<Result<_, _>>()?,
        leader_commit: request.leader_commit.map(log_id_from_proto),
    })
}

pub fn append_reply_to_proto(result: &Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>) -> pb::AppendReply {
    use pb::append_reply::Result as R;
    let result = match result {
        Ok(AppendEntriesResponse::Success) => R::Success(pb::Blank {}),
        Ok(AppendEntriesResponse::PartialSuccess(matching)) => {
            R::PartialSuccess(pb::PartialSuccess { matching: matching.as_ref().map(log_id_to_proto) })
        }
        Ok(AppendEntriesResponse::Conflict) => R::Conflict(pb::Blank {}),
        Ok(AppendEntriesResponse::HigherVote(vote)) => R::HigherVote(vote_to_proto(vote)),
        Err(RaftError::Fatal(fatal)) => R::Failure(fatal_to_proto(fatal)),
        Err(RaftError::APIError(never)) => match *never {},
    };
    pb::AppendReply { result: Some(result), lease_ms: 0 }
}

pub fn append_reply_from_proto(
    reply: pb::AppendReply,
) -> Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, WireError> {
    use pb::append_reply::Result as R;
    Ok(match missing(reply.result, "append entries reply")? {
        R::Success(_) => Ok(AppendEntriesResponse::Success),
        R::PartialSuccess(p) => Ok(AppendEntriesResponse::PartialSuccess(p.matching.map(log_id_from_proto))),
        R::Conflict(_) => Ok(AppendEntriesResponse::Conflict),
        R::HigherVote(vote) => Ok(AppendEntriesResponse::HigherVote(vote_from_proto(Some(vote))?)),
        R::Failure(failure) => Err(RaftError::Fatal(fatal_from_proto(failure))),
    })
}

pub fn vote_request_to_proto(group_id: GroupId, request: &VoteRequest<NodeId>) -> pb::VoteRequest {
    pb::VoteRequest {
        group_id,
        vote: Some(vote_to_proto(&request.vote)),
        last_log_id: request.last_log_id.as_ref().map(log_id_to_proto),
    }
}

pub fn vote_request_from_proto(request: pb::VoteRequest) -> Result<VoteRequest<NodeId>, WireError> {
    Ok(VoteRequest { vote: vote_from_proto(request.vote)?, last_log_id: request.last_log_id.map(log_id_from_proto) })
}

pub fn vote_reply_to_proto(result: &Result<VoteResponse<NodeId>, RaftError<NodeId>>) -> pb::VoteReply {
    use pb::vote_reply::Result as R;
    let result = match result {
        Ok(response) => R::Answer(pb::VoteGranted {
            vote: Some(vote_to_proto(&response.vote)),
            vote_granted: response.vote_granted,
            last_log_id: response.last_log_id.as_ref().map(log_id_to_proto),
        }),
        Err(RaftError::Fatal(fatal)) => R::Failure(fatal_to_proto(fatal)),
        Err(RaftError::APIError(never)) => match *never {},
    };
    pb::VoteReply { result: Some(result) }
}

pub fn vote_reply_from_proto(
    reply: pb::VoteReply,
) -> Result<Result<VoteResponse<NodeId>, RaftError<NodeId>>, WireError> {
    use pb::vote_reply::Result as R;
    Ok(match missing(reply.result, "vote reply")? {
        R::Answer(answer) => Ok(VoteResponse {
            vote: vote_from_proto(answer.vote)?,
            vote_granted: answer.vote_granted,
            last_log_id: answer.last_log_id.map(log_id_from_proto),
        }),
        R::Failure(failure) => Err(RaftError::Fatal(fatal_from_proto(failure))),
    })
}

pub fn snapshot_to_proto(group_id: GroupId, request: InstallSnapshotRequest<TypeConfig>) -> pb::InstallSnapshotRequest {
    pb::InstallSnapshotRequest {
        group_id,
        vote: Some(vote_to_proto(&request.vote)),
        meta: Some(pb::SnapshotMeta {
            last_log_id: request.meta.last_log_id.as_ref().map(log_id_to_proto),
            last_membership: Some(stored_membership_to_proto(&request.meta.last_membership)),
            snapshot_id: request.meta.snapshot_id,
        }),
        offset: request.offset,
        data: request.data,
        done: request.done,
    }
}

pub fn snapshot_from_proto(
    request: pb::InstallSnapshotRequest,
) -> Result<InstallSnapshotRequest<TypeConfig>, WireError> {
    let meta = missing(request.meta, "snapshot meta")?;
    Ok(InstallSnapshotRequest {
        vote: vote_from_proto(request.vote)?,
        meta: SnapshotMeta {
            last_log_id: meta.last_log_id.map(log_id_from_proto),
            last_membership: stored_membership_from_proto(meta.last_membership)?,
            snapshot_id: meta.snapshot_id,
        },
        offset: request.offset,
        data: request.data,
        done: request.done,
    })
}

type SnapshotResult = Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

pub fn snapshot_reply_to_proto(result: &SnapshotResult) -> pb::InstallSnapshotReply {
    use pb::install_snapshot_reply::Result as R;
    let result = match result {
        Ok(response) => R::Vote(vote_to_proto(&response.vote)),
        Err(RaftError::Fatal(fatal)) => R::Failure(fatal_to_proto(fatal)),
        Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch))) => R::Failure(pb::RaftFailure {
            kind: FailureKind::SnapshotMismatch as i32,
            message: mismatch.to_string(),
            expect: Some(segment_to_proto(&mismatch.expect)),
            got: Some(segment_to_proto(&mismatch.got)),
        }),
    };
    pb::InstallSnapshotReply { result: Some(result) }
}

pub fn snapshot_reply_from_proto(reply: pb::InstallSnapshotReply) -> Result<SnapshotResult, WireError> {
    use pb::install_snapshot_reply::Result as R;
    Ok(match missing(reply.result, "install snapshot reply")? {
        R::Vote(vote) => Ok(InstallSnapshotResponse { vote: vote_from_proto(Some(vote))? }),
        R::Failure(failure) if failure.kind == FailureKind::SnapshotMismatch as i32 => {
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                expect: segment_from_proto(missing(failure.expect, "snapshot mismatch expect")?),
                got: segment_from_proto(missing(failure.got, "snapshot mismatch got")?),
            })))
        }
        R::Failure(failure) => Err(RaftError::Fatal(fatal_from_proto(failure))),
    })
}

fn segment_to_proto(segment: &SnapshotSegmentId) -> pb::SnapshotSegment {
    pb::SnapshotSegment { id: segment.id.clone(), offset: segment.offset }
}

fn segment_from_proto(segment: pb::SnapshotSegment) -> SnapshotSegmentId {
    SnapshotSegmentId { id: segment.id, offset: segment.offset }
}

fn fatal_to_proto(fatal: &Fatal<NodeId>) -> pb::RaftFailure {
    let kind = match fatal {
        Fatal::Stopped => FailureKind::Stopped,
        Fatal::Panicked => FailureKind::Panicked,
        Fatal::StorageError(_) => FailureKind::Storage,
    };
    pb::RaftFailure { kind: kind as i32, message: fatal.to_string(), expect: None, got: None }
}

/// The peer's failure as openraft's error. A storage failure keeps the peer's words; a kind
/// this version does not know is taken for a storage failure (the group cannot take the
/// message either way).
fn fatal_from_proto(failure: pb::RaftFailure) -> Fatal<NodeId> {
    match FailureKind::try_from(failure.kind) {
        Ok(FailureKind::Stopped) => Fatal::Stopped,
        Ok(FailureKind::Panicked) => Fatal::Panicked,
        _ => Fatal::StorageError(StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, AnyError::error(failure.message)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::tests::{entry, log_id, membership, vote};
    use super::*;
    use crate::shard::codec::tests::{round_trip, same};

    fn append() -> impl Strategy<Value = AppendEntriesRequest<TypeConfig>> {
        (
            vote(),
            proptest::option::of(log_id()),
            proptest::collection::vec(entry(), 0..4),
            proptest::option::of(log_id()),
        )
            .prop_map(|(vote, prev_log_id, entries, leader_commit)| AppendEntriesRequest {
                vote,
                prev_log_id,
                entries,
                leader_commit,
            })
    }

    fn fatal() -> impl Strategy<Value = Fatal<NodeId>> {
        prop_oneof![Just(Fatal::Stopped), Just(Fatal::Panicked)]
    }

    fn append_result() -> impl Strategy<Value = Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
        (0u8..5, proptest::option::of(log_id()), vote(), fatal()).prop_map(|(kind, matching, vote, fatal)| match kind {
            0 => Ok(AppendEntriesResponse::Success),
            1 => Ok(AppendEntriesResponse::PartialSuccess(matching)),
            2 => Ok(AppendEntriesResponse::Conflict),
            3 => Ok(AppendEntriesResponse::HigherVote(vote)),
            _ => Err(RaftError::Fatal(fatal)),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn append_entries_round_trip(request in append(), group in any::<u32>()) {
            let message = round_trip(&append_to_proto(group, &request));
            prop_assert_eq!(message.group_id, group);
            let decoded = append_from_proto(message).expect("decodes");
            prop_assert!(same(&request, &decoded));
        }

        #[test]
        fn append_entries_replies_round_trip(result in append_result()) {
            let decoded = append_reply_from_proto(round_trip(&append_reply_to_proto(&result))).expect("decodes");
            prop_assert!(same(&result, &decoded), "{:?} came back as {:?}", result, decoded);
        }

        #[test]
        fn votes_round_trip(v in vote(), last in proptest::option::of(log_id()), granted in any::<bool>(), fail in proptest::option::of(fatal())) {
            let request = VoteRequest { vote: v, last_log_id: last };
            let decoded = vote_request_from_proto(round_trip(&vote_request_to_proto(3, &request))).expect("decodes");
            prop_assert!(same(&request, &decoded));
            let result = match fail {
                Some(f) => Err(RaftError::Fatal(f)),
                None => Ok(VoteResponse { vote: v, vote_granted: granted, last_log_id: last }),
            };
            let decoded = vote_reply_from_proto(round_trip(&vote_reply_to_proto(&result))).expect("decodes");
            prop_assert!(same(&result, &decoded));
        }

        #[test]
        fn snapshot_chunks_round_trip(
            v in vote(),
            last in proptest::option::of(log_id()),
            members in membership(),
            member_log in proptest::option::of(log_id()),
            id in "[a-z0-9-]{0,24}",
            offset in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..512),
            done in any::<bool>(),
        ) {
            let request = InstallSnapshotRequest::<TypeConfig> {
                vote: v,
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: openraft::StoredMembership::new(member_log, members),
                    snapshot_id: id.clone(),
                },
                offset,
                data,
                done,
            };
            let decoded = snapshot_from_proto(round_trip(&snapshot_to_proto(9, request.clone()))).expect("decodes");
            prop_assert!(same(&request, &decoded));
            for result in [
                Ok(InstallSnapshotResponse { vote: v }),
                Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                    expect: SnapshotSegmentId { id: id.clone(), offset },
                    got: SnapshotSegmentId { id: "other".into(), offset: 0 },
                }))),
                Err(RaftError::Fatal(Fatal::Stopped)),
            ] {
                let decoded = snapshot_reply_from_proto(round_trip(&snapshot_reply_to_proto(&result))).expect("decodes");
                prop_assert!(same(&result, &decoded));
            }
        }
    }

    /// A storage failure's words reach the sender (the error itself is rebuilt there).
    #[test]
    fn storage_failures_keep_their_message() {
        let error = StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, AnyError::error("disk full")),
        };
        let reply = append_reply_to_proto(&Err(RaftError::Fatal(Fatal::StorageError(error))));
        match append_reply_from_proto(reply).expect("decodes") {
            Err(RaftError::Fatal(Fatal::StorageError(e))) => assert!(e.to_string().contains("disk full"), "{e}"),
            other => panic!("not a storage failure: {other:?}"),
        }
    }
}
