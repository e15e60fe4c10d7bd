//! Raft transport, client side: one lazily connected gRPC channel per peer address, shared by
//! every group (each message names its group), with tonic reconnecting on failure. A slow or dead
//! peer costs its own requests their timeout and nothing else: every RPC has a deadline and no
//! lock is held across a call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use stemedb_proto::raft::raft_transport_client::RaftTransportClient;
use stemedb_proto::raft::GroupMessage;
use tonic::transport::{Channel, Endpoint};

use super::metrics as raft_metrics;
use super::types::{GroupId, NodeId, TypeConfig};

/// Largest gRPC message either side accepts (log batches and snapshot chunks stay far below).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// The gRPC channels to peer nodes, by Raft address.
#[derive(Default)]
pub struct PeerChannels {
    channels: Mutex<HashMap<String, Channel>>,
    /// Addresses dialled through another (fault-injection proxies in tests).
    overrides: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid peer address {0:?}")]
pub struct InvalidPeerAddress(pub String);

impl PeerChannels {
    pub fn new(overrides: HashMap<String, String>) -> Arc<PeerChannels> {
        Arc::new(PeerChannels { channels: Mutex::new(HashMap::new()), overrides })
    }

    /// The channel to `addr` (`HOST:PORT`), created on first use; it connects lazily and
    /// reconnects with backoff by itself.
    pub fn client(&self, addr: &str) -> Result<RaftTransportClient<Channel>, InvalidPeerAddress> {
        let mut channels = self.channels.lock();
        let channel = match channels.get(addr) {
            Some(channel) => channel.clone(),
            None => {
                let dial = self.overrides.get(addr).map(String::as_str).unwrap_or(addr);
                let endpoint = Endpoint::from_shared(format!("http://{dial}"))
                    .map_err(|_| InvalidPeerAddress(addr.to_string()))?
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5));
                let channel = endpoint.connect_lazy();
                channels.insert(addr.to_string(), channel.clone());
                channel
            }
        };
        Ok(RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// Network factory of one group.
#[derive(Clone)]
pub struct GrpcNetwork {
    peers: Arc<PeerChannels>,
    group: GroupId,
}

impl GrpcNetwork {
    pub fn new(peers: Arc<PeerChannels>, group: GroupId) -> GrpcNetwork {
        GrpcNetwork { peers, group }
    }
}

pub struct GrpcConnection {
    client: Result<RaftTransportClient<Channel>, InvalidPeerAddress>,
    group: GroupId,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GrpcConnection { client: self.peers.client(&node.addr), group: self.group, target }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CodecError(String);

/// Which RPC of the transport to call.
#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl Rpc {
    fn label(self) -> &'static str {
        match self {
            Rpc::AppendEntries => "append_entries",
            Rpc::Vote => "vote",
            Rpc::InstallSnapshot => "install_snapshot",
        }
    }
}

impl GrpcConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(client) => client,
            Err(error) => return Err(RPCError::Unreachable(Unreachable::new(error))),
        };
        let payload = serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut message = tonic::Request::new(GroupMessage { group_id: self.group, payload });
        message.set_timeout(timeout);
        let started = std::time::Instant::now();
        let result = match rpc {
            Rpc::AppendEntries => client.append_entries(message).await,
            Rpc::Vote => client.vote(message).await,
            Rpc::InstallSnapshot => client.install_snapshot(message).await,
        };
        raft_metrics::PEER_RPC_DURATION.with_label_values(&[rpc.label()]).observe(started.elapsed().as_secs_f64());
        let response = result.map_err(|status| {
            raft_metrics::PEER_RPC_ERRORS.with_label_values(&[rpc.label(), &self.target.to_string()]).inc();
            status_to_rpc_error(status)
        })?;
        let decoded: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&response.into_inner().payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&CodecError(e.to_string()))))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

pub(crate) fn status_to_rpc_error<E: std::error::Error>(status: tonic::Status) -> RPCError<NodeId, BasicNode, E> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

impl RaftNetwork<TypeConfig> for GrpcConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::AppendEntries, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(Rpc::InstallSnapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}
