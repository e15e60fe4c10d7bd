//! The backup service on 18182 (`proto/backup.proto`): a peer coordinating a backup asks this
//! node to copy its replicas of some shards into the backup store (`cluster::backup`).

use std::sync::Arc;

use stemedb_proto::raft::backup_server::{Backup as BackupRpc, BackupServer};
use stemedb_proto::raft::{CopyReplicasReply, CopyReplicasRequest};
use tonic::{Request, Response, Status};

use crate::cluster::backup::Backups;
use crate::error::ErrorCode;

/// Largest backup message either side accepts.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

pub struct BackupService {
    backups: Arc<Backups>,
}

impl BackupService {
    pub fn server(backups: Arc<Backups>) -> BackupServer<BackupService> {
        BackupServer::new(BackupService { backups })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl BackupRpc for BackupService {
    async fn copy_replicas(
        &self,
        request: Request<CopyReplicasRequest>,
    ) -> Result<Response<CopyReplicasReply>, Status> {
        let r = request.into_inner();
        let shards = r
            .shards
            .iter()
            .map(|s| u16::try_from(*s))
            .collect::<Result<Vec<u16>, _>>()
            .map_err(|_| ErrorCode::MalformedMessage.to_status("shards: a shard number out of range"))?;
        let reply = self
            .backups
            .copy_for_peer(&r.backup_id, &r.destination, &shards, r.compress)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(reply))
    }
}
