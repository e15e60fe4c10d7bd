//! The requests one node sends another about a shard over the transport (`ShardSet::ask_leader`
//! and `ask_replicas`): each kind ([`Forward`]) knows its protobuf message, the rpc that carries
//! it (and whether the frame transport carries it, `raft::frames`) and how to read the answer,
//! so the sending, the deadline, the metrics and the mapping of
//! transport failures to [`ConsensusError`]s are written once for all of them.

use std::future::Future;

use stemedb_proto::raft as pb;
use stemedb_proto::raft::frame::Body;
use stemedb_proto::raft::raft_transport_client::RaftTransportClient;
use tonic::transport::Channel;

use super::types::{GroupAdmin, GroupId, NodeId, ShardCommand, ShardResponse};
use super::wire::{admin, requests, WireError};
use crate::shard::reader::{ShardRead, ShardReadResult};
use crate::shard::ConsensusError;

/// The transport's client of one peer.
pub type Client = RaftTransportClient<Channel>;

/// A request about a shard that one node sends another.
pub trait Forward {
    /// The `kind` label of `raft_metrics::FORWARDED`.
    const KIND: &'static str;
    /// What the peer's handler returns when the request succeeds.
    type Output;
    type Message: Send + 'static;
    type Reply;

    /// The request's message, about `group_id`.
    fn message(&self, group_id: GroupId) -> Self::Message;

    /// Sends the message with the rpc of this kind.
    fn call(
        client: Client,
        request: tonic::Request<Self::Message>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Reply>, tonic::Status>> + Send;

    /// What the peer's handler returned, or why its answer does not decode.
    fn answer(reply: Self::Reply) -> Result<Result<Self::Output, ConsensusError>, WireError>;

    /// Whether the frame transport (`raft::frames`) carries this kind, when the peer speaks it.
    const FRAMED: bool = false;

    /// The message as a frame's body; a kind the frames do not carry gives it back.
    fn to_frame(message: Self::Message) -> Result<Body, Self::Message> {
        Err(message)
    }

    /// The reply a frame's body holds, if it is this kind's.
    fn from_frame(_body: Body) -> Option<Self::Reply> {
        None
    }
}

/// Sends `message` with the gRPC call of its kind, within `timeout`.
pub async fn grpc_call<F: Forward>(
    client: Client,
    message: F::Message,
    timeout: std::time::Duration,
) -> Result<F::Reply, tonic::Status> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    F::call(client, request).await.map(tonic::Response::into_inner)
}

/// A write forwarded to the shard's leader (the Propose rpc).
impl Forward for ShardCommand {
    const KIND: &'static str = "write";
    type Output = ShardResponse;
    type Message = pb::ProposeRequest;
    type Reply = pb::ProposeReply;

    fn message(&self, group_id: GroupId) -> pb::ProposeRequest {
        requests::propose_to_proto(group_id, self)
    }

    fn call(
        mut client: Client,
        request: tonic::Request<pb::ProposeRequest>,
    ) -> impl Future<Output = Result<tonic::Response<pb::ProposeReply>, tonic::Status>> + Send {
        async move { client.propose(request).await }
    }

    fn answer(reply: pb::ProposeReply) -> Result<Result<ShardResponse, ConsensusError>, WireError> {
        requests::propose_reply_from_proto(reply)
    }

    const FRAMED: bool = true;

    fn to_frame(message: pb::ProposeRequest) -> Result<Body, pb::ProposeRequest> {
        Ok(Body::Propose(message))
    }

    fn from_frame(body: Body) -> Option<pb::ProposeReply> {
        match body {
            Body::ProposeReply(reply) => Some(reply),
            _ => None,
        }
    }
}

/// A membership change run by the shard's leader (the AdminGroup rpc).
impl Forward for GroupAdmin {
    const KIND: &'static str = "admin";
    type Output = ();
    type Message = pb::AdminGroupRequest;
    type Reply = pb::DoneReply;

    fn message(&self, group_id: GroupId) -> pb::AdminGroupRequest {
        admin::admin_to_proto(group_id, self)
    }

    fn call(
        mut client: Client,
        request: tonic::Request<pb::AdminGroupRequest>,
    ) -> impl Future<Output = Result<tonic::Response<pb::DoneReply>, tonic::Status>> + Send {
        async move { client.admin_group(request).await }
    }

    fn answer(reply: pb::DoneReply) -> Result<Result<(), ConsensusError>, WireError> {
        requests::done_reply_from_proto(reply)
    }
}

/// A linearizable read barrier: the leader's read index (the ReadIndex rpc).
pub struct ReadIndex;

impl Forward for ReadIndex {
    const KIND: &'static str = "read_index";
    type Output = u64;
    type Message = pb::ReadIndexRequest;
    type Reply = pb::ReadIndexReply;

    fn message(&self, group_id: GroupId) -> pb::ReadIndexRequest {
        pb::ReadIndexRequest { group_id }
    }

    fn call(
        mut client: Client,
        request: tonic::Request<pb::ReadIndexRequest>,
    ) -> impl Future<Output = Result<tonic::Response<pb::ReadIndexReply>, tonic::Status>> + Send {
        async move { client.read_index(request).await }
    }

    fn answer(reply: pb::ReadIndexReply) -> Result<Result<u64, ConsensusError>, WireError> {
        requests::read_index_reply_from_proto(reply)
    }

    const FRAMED: bool = true;

    fn to_frame(message: pb::ReadIndexRequest) -> Result<Body, pb::ReadIndexRequest> {
        Ok(Body::ReadIndex(message))
    }

    fn from_frame(body: Body) -> Option<pb::ReadIndexReply> {
        match body {
            Body::ReadIndexReply(reply) => Some(reply),
            _ => None,
        }
    }
}

/// Asks the receiving node to campaign for leadership of the group now (the Campaign rpc), on
/// behalf of `leader`, which leads the group in `term`.
pub struct Campaign {
    pub term: u64,
    pub leader: NodeId,
}

impl Forward for Campaign {
    const KIND: &'static str = "campaign";
    type Output = ();
    type Message = pb::CampaignRequest;
    type Reply = pb::DoneReply;

    fn message(&self, group_id: GroupId) -> pb::CampaignRequest {
        pb::CampaignRequest { group_id, term: self.term, leader: self.leader }
    }

    fn call(
        mut client: Client,
        request: tonic::Request<pb::CampaignRequest>,
    ) -> impl Future<Output = Result<tonic::Response<pb::DoneReply>, tonic::Status>> + Send {
        async move { client.campaign(request).await }
    }

    fn answer(reply: pb::DoneReply) -> Result<Result<(), ConsensusError>, WireError> {
        requests::done_reply_from_proto(reply)
    }
}

/// A read of a shard this node does not host, executed by a replica (the ShardRead rpc).
pub struct ReplicaRead {
    pub read: ShardRead,
    /// After a read barrier.
    pub linearizable: bool,
}

impl Forward for ReplicaRead {
    const KIND: &'static str = "read";
    type Output = ShardReadResult;
    type Message = pb::ShardReadRequest;
    type Reply = pb::ShardReadReply;

    fn message(&self, group_id: GroupId) -> pb::ShardReadRequest {
        requests::shard_read_to_proto(group_id, &self.read, self.linearizable)
    }

    fn call(
        mut client: Client,
        request: tonic::Request<pb::ShardReadRequest>,
    ) -> impl Future<Output = Result<tonic::Response<pb::ShardReadReply>, tonic::Status>> + Send {
        async move { client.shard_read(request).await }
    }

    fn answer(reply: pb::ShardReadReply) -> Result<Result<ShardReadResult, ConsensusError>, WireError> {
        requests::shard_read_reply_from_proto(reply)
    }
}
