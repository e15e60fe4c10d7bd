//! The inter-node gRPC server on port 18182: Raft messages for every local group, writes
//! forwarded to a shard leader, read-index requests from followers, membership changes and
//! campaigns asked of a group's replica, and reads of a shard from nodes that do not host it.
//! It decodes the typed protobuf message (`raft::wire`), hands it to the group's Raft or to the
//! shard set, and encodes the answer; it owns no state. A message that does not decode is
//! refused with `malformed_message` before anything is done. Beside it, on the same port, the
//! anti-entropy service (`anti_entropy`), the backup service (`backup`), and the frame
//! connections that carry the hot requests of this service without gRPC (`frames`). At most
//! `limit::MAX_RUNNING` gRPC requests other than Raft's own messages run at once; one more is
//! refused `overloaded` (`limit`).

pub mod anti_entropy;
pub mod backup;
pub mod frames;
pub mod limit;

/// Refuses (`wrong_cluster`) a request whose `user-agent` names another cluster than
/// `cluster_id` (`raft::network::cluster_user_agent`): a node of an old cluster whose data was
/// restored elsewhere, or of a cluster sharing addresses by mistake, never reaches a group
/// here. A request that names no cluster (a node of a version before this check, a tool) is
/// served.
pub fn cluster_check(cluster_id: String) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let named = request
            .metadata()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::raft::network::cluster_of_user_agent);
        match named {
            Some(other) if other != cluster_id => {
                crate::raft::metrics::WRONG_CLUSTER.inc();
                tracing::debug!(from_cluster = other, "refused a transport request from another cluster");
                Err(crate::error::ErrorCode::WrongCluster
                    .to_status(format!("this node belongs to cluster {cluster_id}, not to cluster {other}")))
            }
            _ => Ok(request),
        }
    }
}

use std::sync::Arc;
use std::time::Duration;

use stemedb_proto::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
use stemedb_proto::raft::{
    AdminGroupRequest, AppendBatch, AppendBatchReply, AppendReply, AppendRequest, CampaignRequest, DoneReply,
    Heartbeat, HeartbeatAck, InstallSnapshotReply, InstallSnapshotRequest, ProposeReply, ProposeRequest,
    ReadIndexReply, ReadIndexRequest, ShardReadReply, ShardReadRequest, VoteReply, VoteRequest,
};
use tonic::{Request, Response, Status};

use crate::coordinator::batch::WriteBatchers;
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::model::id::MAX_ITEMS_PER_ENTRY;
use crate::model::ModelError;
use crate::raft::network::{batch_reply, MAX_BATCH_MESSAGES, MAX_MESSAGE_BYTES};
use crate::raft::types::Raft;
use crate::raft::wire::heartbeat::heartbeat_from_proto;
use crate::raft::wire::replication as wire;
use crate::raft::wire::{admin, requests};
use crate::raft::ShardSet;
use crate::shard::command::ShardCommand;
use crate::shard::ConsensusError;

/// The gRPC service over this node's shard set.
pub struct RaftService {
    shards: Arc<ShardSet>,
    /// Forwarded batches of assertions join the leader's own batch here.
    batchers: WriteBatchers,
    write_timeout: Duration,
}

impl RaftService {
    pub fn new(shards: Arc<ShardSet>, batchers: WriteBatchers, write_timeout: Duration) -> Arc<RaftService> {
        Arc::new(RaftService { shards, batchers, write_timeout })
    }

    /// The gRPC server over `service` (which the frame connections share, `frames`).
    pub fn server(service: Arc<RaftService>) -> RaftTransportServer<RaftService> {
        RaftTransportServer::from_arc(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn raft(&self, group_id: u32) -> Result<Raft, Status> {
        let shard = self.shard(group_id)?;
        self.shards
            .group(shard)
            .map(|g| g.raft.clone())
            .map_err(|_| ErrorCode::UnknownShard.to_status(format!("group {group_id} is not hosted here")))
    }

    /// The shard of a group id (the meta group: `META_SHARD`).
    fn shard(&self, group_id: u32) -> Result<u16, Status> {
        crate::shard::command::shard_of_group(group_id)
            .ok_or_else(|| ErrorCode::UnknownShard.to_status(format!("group {group_id} is not a raft group")))
    }
}

/// The deadline a gRPC client set (the `grpc-timeout` header: digits and a unit letter).
fn request_timeout<T>(request: &Request<T>) -> Option<Duration> {
    parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)
}

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl RaftService {
    /// The AppendEntries of many groups (a gRPC batch or a frame), each answered by its own.
    pub async fn append_batch(&self, batch: AppendBatch) -> Result<AppendBatchReply, Status> {
        let messages = batch.messages;
        if messages.len() > MAX_BATCH_MESSAGES {
            return Err(ErrorCode::BatchTooLarge.to_status(format!(
                "a batch of {} messages; at most {}",
                messages.len(),
                MAX_BATCH_MESSAGES
            )));
        }
        // Each group's Raft handles its own message; they wait on their own log flushes, so
        // they run together and the batch answers when the slowest has.
        let replies = futures::future::join_all(messages.into_iter().map(|message| async move {
            let group_id = message.group_id;
            batch_reply(group_id, self.append_one(message).await)
        }))
        .await;
        Ok(AppendBatchReply { replies })
    }

    /// A forwarded write, within the sender's deadline when it sent one. The sender's deadline
    /// bounds the proposal here too: an answer nobody waits for any more is work for nothing,
    /// and the sender has already sent the token elsewhere.
    pub async fn propose_message(
        &self,
        message: ProposeRequest,
        timeout: Option<Duration>,
    ) -> Result<ProposeReply, Status> {
        let timeout = timeout.unwrap_or(self.write_timeout).min(self.write_timeout);
        let shard = self.shard(message.group_id)?;
        let command = requests::propose_from_proto(message).map_err(|e| e.to_status())?;
        // Checked before proposing: an entry whose items cannot be numbered is refused whole.
        let items = command.item_count();
        let result = if items > MAX_ITEMS_PER_ENTRY {
            Err(ConsensusError::Refused {
                shard,
                error: ModelError::CommandTooLarge { items, limit: MAX_ITEMS_PER_ENTRY },
            })
        } else {
            // Forwarded writes are proposed here or refused: never forwarded a second time. A
            // batch of assertions joins the leader's own batch in one entry when this node leads.
            match command {
                // Only a leader builds an entry of parts, from proposals that reached it.
                ShardCommand::Parts { .. } => {
                    return Err(ErrorCode::MalformedMessage
                        .to_status("an entry of several parts is built by the shard's leader, never forwarded"));
                }
                command if self.shards.leads(shard) => match self.batchers.forwarded(shard, command, timeout).await {
                    Ok(result) => result,
                    Err(command) => self.shards.propose_local(shard, Arc::new(command), timeout).await,
                },
                command => self.shards.propose_local(shard, Arc::new(command), timeout).await,
            }
        };
        Ok(requests::propose_reply_to_proto(&result))
    }

    /// A read barrier asked of this node as the shard's leader.
    pub async fn read_index_message(&self, message: ReadIndexRequest) -> Result<ReadIndexReply, Status> {
        let shard = self.shard(message.group_id)?;
        let result = self.shards.local_read_index(shard).await;
        Ok(requests::read_index_reply_to_proto(&result))
    }

    /// One AppendRequest, batched or not.
    async fn append_one(&self, message: AppendRequest) -> Result<AppendReply, Status> {
        let group_id = message.group_id;
        let raft = self.raft(group_id)?;
        let request = wire::append_from_proto(message).map_err(|e| e.to_status())?;
        self.shards.note_leader_commit(self.shard(group_id)?, request.leader_commit.map(|l| l.index));
        let result = raft.append_entries(request).await;
        let mut reply = wire::append_reply_to_proto(&result);
        // What this node promises the leader's read lease (`raft::lease`).
        reply.lease_ms = self.shards.promised_lease_ms();
        Ok(reply)
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(&self, request: Request<AppendRequest>) -> Result<Response<AppendReply>, Status> {
        self.append_one(request.into_inner()).await.map(Response::new)
    }

    async fn append_entries_batch(&self, request: Request<AppendBatch>) -> Result<Response<AppendBatchReply>, Status> {
        self.append_batch(request.into_inner()).await.map(Response::new)
    }

    async fn vote(&self, request: Request<VoteRequest>) -> Result<Response<VoteReply>, Status> {
        let message = request.into_inner();
        let raft = self.raft(message.group_id)?;
        if !self.shards.may_vote(self.shard(message.group_id)?) {
            return Err(ErrorCode::ReplicaCatchingUp
                .to_status("this node lost its data and is catching up; it does not vote until it has"));
        }
        let shard = self.shard(message.group_id)?;
        let request = wire::vote_request_from_proto(message).map_err(|e| e.to_status())?;
        // Before openraft may grant it: a read lease never outlives this node's vote for another.
        self.shards.fence_read_lease(shard, request.vote.leader_id.term);
        let result = raft.vote(request).await;
        Ok(Response::new(wire::vote_reply_to_proto(&result)))
    }

    async fn install_snapshot(
        &self,
        request: Request<InstallSnapshotRequest>,
    ) -> Result<Response<InstallSnapshotReply>, Status> {
        let message = request.into_inner();
        let raft = self.raft(message.group_id)?;
        let result = raft.install_snapshot(wire::snapshot_from_proto(message).map_err(|e| e.to_status())?).await;
        Ok(Response::new(wire::snapshot_reply_to_proto(&result)))
    }

    async fn propose(&self, request: Request<ProposeRequest>) -> Result<Response<ProposeReply>, Status> {
        let timeout = request_timeout(&request);
        self.propose_message(request.into_inner(), timeout).await.map(Response::new)
    }

    async fn admin_group(&self, request: Request<AdminGroupRequest>) -> Result<Response<DoneReply>, Status> {
        let message = request.into_inner();
        let shard = self.shard(message.group_id)?;
        let change = admin::admin_from_proto(message).map_err(|e| e.to_status())?;
        let result = self.shards.admin_group_local(shard, change).await;
        Ok(Response::new(requests::done_reply_to_proto(&result)))
    }

    async fn campaign(&self, request: Request<CampaignRequest>) -> Result<Response<DoneReply>, Status> {
        let message = request.into_inner();
        let shard = self.shard(message.group_id)?;
        let asked_by = (message.term != 0).then_some((message.term, message.leader));
        let result = self.shards.campaign_local(shard, asked_by).await;
        Ok(Response::new(requests::done_reply_to_proto(&result)))
    }

    async fn node_heartbeat(&self, request: Request<Heartbeat>) -> Result<Response<HeartbeatAck>, Status> {
        let heartbeat = heartbeat_from_proto(request.into_inner());
        self.shards.on_node_heartbeat(&heartbeat);
        Ok(Response::new(HeartbeatAck { removed: self.shards.was_removed(heartbeat.from).await }))
    }

    async fn shard_read(&self, request: Request<ShardReadRequest>) -> Result<Response<ShardReadReply>, Status> {
        let message = request.into_inner();
        let shard = self.shard(message.group_id)?;
        let (read, linearizable) = requests::shard_read_from_proto(message).map_err(|e| e.to_status())?;
        let result = self.shards.read_local(shard, read, linearizable, self.write_timeout).await;
        Ok(Response::new(requests::shard_read_reply_to_proto(&result)))
    }

    async fn read_index(&self, request: Request<ReadIndexRequest>) -> Result<Response<ReadIndexReply>, Status> {
        self.read_index_message(request.into_inner()).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_grpc_timeout;

    #[test]
    fn grpc_timeouts_parse_by_their_unit() {
        assert_eq!(parse_grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("250000u"), Some(Duration::from_millis(250)));
        for bad in ["", "m", "12", "123456789S", "5x", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
