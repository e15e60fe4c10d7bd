//! The anti-entropy service on 18182, beside Raft (`proto/antientropy.proto`): decodes each
//! request, hands it to the node's `cluster::anti_entropy::AntiEntropy`, and encodes the answer.

use std::sync::Arc;
use std::time::Duration;

use stemedb_proto::raft::anti_entropy_server::{AntiEntropy as AntiEntropyRpc, AntiEntropyServer};
use stemedb_proto::raft::{
    CheckReportReply, CheckReportRequest, FetchBucketsReply, FetchBucketsRequest, RepairReply, RepairRequest,
    TreeNodesReply, TreeNodesRequest,
};
use tonic::{Request, Response, Status};

use crate::cluster::anti_entropy::AntiEntropy;

/// Largest anti-entropy message either side accepts (a re-seed copies a whole shard).
const MAX_MESSAGE_BYTES: usize = 1 << 30;

pub struct AntiEntropyService {
    anti_entropy: Arc<AntiEntropy>,
}

impl AntiEntropyService {
    pub fn server(anti_entropy: Arc<AntiEntropy>) -> AntiEntropyServer<AntiEntropyService> {
        AntiEntropyServer::new(AntiEntropyService { anti_entropy })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl AntiEntropyRpc for AntiEntropyService {
    async fn check_report(&self, request: Request<CheckReportRequest>) -> Result<Response<CheckReportReply>, Status> {
        let r = request.into_inner();
        let wait = Duration::from_millis(u64::from(r.wait_ms));
        self.anti_entropy.report(r.group, r.index, wait).await.map(Response::new).map_err(|e| e.to_status())
    }

    async fn tree_nodes(&self, request: Request<TreeNodesRequest>) -> Result<Response<TreeNodesReply>, Status> {
        let r = request.into_inner();
        self.anti_entropy
            .tree_nodes(r.group, r.index, r.level as usize, r.positions)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn fetch_buckets(
        &self,
        request: Request<FetchBucketsRequest>,
    ) -> Result<Response<FetchBucketsReply>, Status> {
        self.anti_entropy.fetch_buckets(request.into_inner()).await.map(Response::new).map_err(|e| e.to_status())
    }

    async fn repair(&self, request: Request<RepairRequest>) -> Result<Response<RepairReply>, Status> {
        let r = request.into_inner();
        let started = self
            .anti_entropy
            .repair_ordered(r.group, r.check_index, r.sources, r.check_now)
            .map_err(|e| e.to_status())?;
        let detail = if started { "repair started" } else { "a repair of this replica is already running" };
        Ok(Response::new(RepairReply { started, detail: detail.into() }))
    }
}
