//! Raft transport between nodes. A single node has no peers, so every RPC to another node
//! reports the peer unreachable; the gRPC transport on port 18182 replaces this factory when
//! nodes form a cluster. Nothing above this module assumes there is only one node.

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;

use super::types::{NodeId, TypeConfig};

#[derive(Debug, thiserror::Error)]
#[error("no transport to node {0}: this node runs without peers")]
struct NoTransport(NodeId);

/// Network factory of a node that has no peers yet.
#[derive(Debug, Clone, Default)]
pub struct LocalOnlyNetwork;

pub struct LocalOnlyConnection {
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for LocalOnlyNetwork {
    type Network = LocalOnlyConnection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        LocalOnlyConnection { target }
    }
}

impl LocalOnlyConnection {
    fn error<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        RPCError::Network(NetworkError::new(&NoTransport(self.target)))
    }
}

impl RaftNetwork<TypeConfig> for LocalOnlyConnection {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(self.error())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        Err(self.error())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(self.error())
    }
}
