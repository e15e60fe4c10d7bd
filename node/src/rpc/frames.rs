//! The frame transport, receiving side: serves one frame connection from a peer
//! (`raft::frames` has the format and the dialling side). The server hands a connection here
//! when its first bytes are `raft::frames::PREFACE`. After the hellos, every request of the
//! connection runs in this connection's task, at most `MAX_IN_FLIGHT` at once (past that the
//! socket is not read, so the sender's writes wait), and each answer is written as soon as it
//! is ready, all those ready together in one write.
//!
//! Requests are handled by the same [`RaftService`] methods as their gRPC calls. A request the
//! frames do not carry, or a frame that does not decode, is answered `malformed_message`; a
//! peer of another cluster is answered `wrong_cluster` at its hello and the connection closed.
//! On shutdown the connection stops reading, finishes what it has in flight, and closes.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use prost::bytes::Bytes;
use prost::Message;
use stemedb_proto::raft::frame::Body;
use stemedb_proto::raft::Frame;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::RaftService;
use crate::error::ErrorCode;
use crate::raft::frames::{codec, encode, hello, status_frame, Io, HELLO_TIMEOUT, MAX_IN_FLIGHT};
use crate::raft::metrics as raft_metrics;

/// Counts the connection in `stemedb_transport_frame_connections` while it lives.
struct Open;

impl Open {
    fn new() -> Open {
        raft_metrics::FRAME_CONNECTIONS.inc();
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        raft_metrics::FRAME_CONNECTIONS.dec();
    }
}

/// Serves the frame connection `io`, whose preface was read, until the peer closes it or
/// `stop` fires and what was in flight has been answered.
pub async fn serve(io: Box<dyn Io>, service: Arc<RaftService>, cluster_id: String, stop: CancellationToken) {
    let _open = Open::new();
    let (read, write) = tokio::io::split(io);
    let (mut reader, mut writer) = (FramedRead::new(read, codec()), FramedWrite::new(write, codec()));
    let first = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(bytes))) => Frame::decode(bytes.freeze()).ok().and_then(|frame| frame.body),
        _ => return,
    };
    let refusal =
        match first {
            Some(Body::Hello(peer)) if peer.cluster_id.is_empty() || peer.cluster_id == cluster_id => None,
            Some(Body::Hello(peer)) => {
                raft_metrics::WRONG_CLUSTER.inc();
                tracing::debug!(from_cluster = %peer.cluster_id, "refused a frame connection from another cluster");
                Some(ErrorCode::WrongCluster.to_status(format!(
                    "this node belongs to cluster {cluster_id}, not to cluster {}",
                    peer.cluster_id
                )))
            }
            _ => Some(ErrorCode::MalformedMessage.to_status("a frame connection starts with a hello")),
        };
    if let Some(status) = refusal {
        let _ = writer.send(encode(0, 0, Body::Status(status_frame(&status)))).await;
        return;
    }
    if writer.send(hello(&cluster_id)).await.is_err() {
        return;
    }
    let mut running = FuturesUnordered::new();
    let mut reading = true;
    loop {
        tokio::select! {
            Some((id, body)) = running.next(), if !running.is_empty() => {
                // Every answer ready now goes in one write.
                let mut ready = vec![encode(id, 0, body)];
                while let Some(Some((id, body))) = running.next().now_or_never() {
                    ready.push(encode(id, 0, body));
                }
                for frame in ready {
                    if writer.feed(frame).await.is_err() {
                        return;
                    }
                }
                if SinkExt::<Bytes>::flush(&mut writer).await.is_err() {
                    return;
                }
            }
            next = reader.next(), if reading && running.len() < MAX_IN_FLIGHT => match next {
                Some(Ok(bytes)) => match Frame::decode(bytes.freeze()) {
                    Ok(frame) => running.push(handle(service.clone(), frame)),
                    Err(_) => {
                        let status = ErrorCode::MalformedMessage.to_status("a frame that does not decode");
                        let _ = writer.send(encode(0, 0, Body::Status(status_frame(&status)))).await;
                        return;
                    }
                },
                // The peer closed the connection (or it failed): answers have nowhere to go.
                _ => return,
            },
            _ = stop.cancelled(), if reading => reading = false,
        }
        if !reading && running.is_empty() {
            return;
        }
    }
}

/// One request's answer: its reply, or the status it failed with.
async fn handle(service: Arc<RaftService>, frame: Frame) -> (u64, Body) {
    let timeout = (frame.timeout_us > 0).then(|| Duration::from_micros(frame.timeout_us));
    let answer = match frame.body {
        Some(Body::AppendBatch(batch)) => service.append_batch(batch).await.map(Body::AppendBatchReply),
        Some(Body::Propose(message)) => service.propose_message(message, timeout).await.map(Body::ProposeReply),
        Some(Body::ReadIndex(message)) => service.read_index_message(message).await.map(Body::ReadIndexReply),
        _ => Err(ErrorCode::MalformedMessage.to_status("not a request the frame transport carries")),
    };
    (frame.id, answer.unwrap_or_else(|status| Body::Status(status_frame(&status))))
}
