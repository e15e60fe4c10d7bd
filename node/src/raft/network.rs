//! Raft transport, client side: one lazily connected gRPC channel per peer address, shared by
//! every group (each message names its group), with tonic reconnecting on failure. The
//! AppendEntries of all groups to one peer go through that peer's [`PeerBatcher`], which sends
//! whatever has queued up while its earlier batches were in flight as one call (letting the
//! other ready tasks of its worker add theirs first, `tasks::yield_while_arriving`), so groups
//! share the per-call cost (HTTP/2 frames, syscalls, wake-ups) the way they share an fsync. A
//! slow or dead peer costs its own requests their timeout and nothing else: every RPC has a
//! deadline and no lock is held across a call. Every AppendEntries a follower accepts renews
//! its part of the group's read lease (`raft::lease`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use parking_lot::Mutex;
use stemedb_proto::raft::frame::Body;
use stemedb_proto::raft::raft_transport_client::RaftTransportClient;
use stemedb_proto::raft::{AppendBatch, AppendBatchItem, AppendReply, AppendRequest, FrameStatus};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::{Channel, Endpoint};

use super::early::EarlyReplication;
use super::frames::{status_frame, status_of_parts, FramePeer};
use super::lease::{self, LeaseClock};
use super::metrics as raft_metrics;
use super::replica_health::ReplicaHealth;
use super::types::{GroupId, NodeId, TypeConfig};
use super::wire::replication as wire;
use super::wire::WireError;
use crate::tasks::yield_while_arriving;

/// Largest gRPC message either side accepts (log batches and snapshot chunks stay far below).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Messages one AppendEntriesBatch carries at most (a receiver refuses more).
pub const MAX_BATCH_MESSAGES: usize = 64;

/// Payload bytes after which a batch takes no more messages (each AppendEntries is itself
/// bounded by `log_store::MAX_APPEND_BYTES` of entries).
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Batches in flight to one peer at once. Messages that arrive meanwhile wait and go together.
const BATCHES_IN_FLIGHT: usize = 2;

/// AppendEntries waiting for a batch to one peer, at most; a group's replication waits for room
/// (within its own deadline) rather than queue without bound.
const BATCH_QUEUE: usize = 1024;

/// How long a peer that does not know batches (an older version, during a rolling upgrade) is
/// sent unbatched AppendEntries before batching is tried again.
const UNBATCHED_RETRY: Duration = Duration::from_secs(30);

/// The gRPC channels to peer nodes, by Raft address.
#[derive(Default)]
pub struct PeerChannels {
    /// Sent with every request (see [`cluster_user_agent`]), so that a node of another
    /// cluster refuses it; `None` sends none (tests).
    cluster_id: Option<String>,
    channels: Mutex<HashMap<String, Channel>>,
    /// The AppendEntries batcher of each peer, by Raft address.
    batchers: Mutex<HashMap<String, PeerBatcher>>,
    /// Addresses dialled through another (fault-injection proxies in tests).
    overrides: HashMap<String, String>,
    /// Mutual TLS with the cluster CA (`cluster.tls_*`); `None`: plain HTTP/2.
    tls: Option<Arc<crate::tls::ClusterTls>>,
    /// The frame connection of each peer, by Raft address (`raft::frames`).
    frames: Mutex<HashMap<String, Arc<FramePeer>>>,
    /// Whether the hot requests go as frames (`cluster.frame_transport`); otherwise all gRPC.
    frames_enabled: std::sync::atomic::AtomicBool,
}

/// Dials a peer (the host and port of the channel's URI) with mutual TLS.
#[derive(Clone)]
struct TlsConnector {
    tls: Arc<crate::tls::ClusterTls>,
}

impl tower::Service<tonic::codegen::http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a peer URI without host:port"))?;
            Ok(hyper_util::rt::TokioIo::new(tls.connect(&authority).await?))
        })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid peer address {0:?}")]
pub struct InvalidPeerAddress(pub String);

impl PeerChannels {
    pub fn new(overrides: HashMap<String, String>, cluster_id: Option<String>) -> Arc<PeerChannels> {
        Self::with_tls(overrides, cluster_id, None)
    }

    /// Channels that dial every peer with mutual TLS when `tls` is given.
    pub fn with_tls(
        overrides: HashMap<String, String>,
        cluster_id: Option<String>,
        tls: Option<Arc<crate::tls::ClusterTls>>,
    ) -> Arc<PeerChannels> {
        Arc::new(PeerChannels {
            cluster_id,
            channels: Mutex::new(HashMap::new()),
            batchers: Mutex::new(HashMap::new()),
            overrides,
            tls,
            frames: Mutex::new(HashMap::new()),
            frames_enabled: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Whether the hot requests go as frames (on by default); set before the first request.
    pub fn set_frames(&self, enabled: bool) {
        self.frames_enabled.store(enabled, std::sync::atomic::Ordering::Relaxed);
    }

    /// The frame connection of the peer at `addr` (`HOST:PORT`), made on first use; `None` when
    /// frames are off (`cluster.frame_transport`).
    pub fn frames(&self, addr: &str) -> Option<Arc<FramePeer>> {
        if !self.frames_enabled.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut frames = self.frames.lock();
        let peer = frames.entry(addr.to_string()).or_insert_with(|| {
            let dial = self.overrides.get(addr).map(String::as_str).unwrap_or(addr);
            Arc::new(FramePeer::new(dial.to_string(), self.cluster_id.clone(), self.tls.clone()))
        });
        Some(peer.clone())
    }

    /// The AppendEntries batcher of the peer at `addr`, started on first use (on the current
    /// runtime; it stops when these channels are dropped).
    pub fn batcher(&self, addr: &str) -> Result<PeerBatcher, InvalidPeerAddress> {
        if let Some(batcher) = self.batchers.lock().get(addr) {
            return Ok(batcher.clone());
        }
        let client = self.client(addr)?;
        let frames = self.frames(addr);
        let mut batchers = self.batchers.lock();
        Ok(batchers.entry(addr.to_string()).or_insert_with(|| PeerBatcher::start(client, frames)).clone())
    }

    /// The channel to `addr` (`HOST:PORT`), created on first use; it connects lazily and
    /// reconnects with backoff by itself.
    pub fn client(&self, addr: &str) -> Result<RaftTransportClient<Channel>, InvalidPeerAddress> {
        Ok(RaftTransportClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The HTTP/2 channel to `addr`, shared by every service of the transport.
    pub fn channel(&self, addr: &str) -> Result<Channel, InvalidPeerAddress> {
        let mut channels = self.channels.lock();
        let channel = match channels.get(addr) {
            Some(channel) => channel.clone(),
            None => {
                let dial = self.overrides.get(addr).map(String::as_str).unwrap_or(addr);
                let mut endpoint = Endpoint::from_shared(format!("http://{dial}"))
                    .map_err(|_| InvalidPeerAddress(addr.to_string()))?
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5));
                if let Some(id) = &self.cluster_id {
                    endpoint = endpoint
                        .user_agent(cluster_user_agent(id))
                        .map_err(|_| InvalidPeerAddress(addr.to_string()))?;
                }
                let channel = match &self.tls {
                    None => endpoint.connect_lazy(),
                    Some(tls) => endpoint.connect_with_connector_lazy(TlsConnector { tls: tls.clone() }),
                };
                channels.insert(addr.to_string(), channel.clone());
                channel
            }
        };
        Ok(channel)
    }
}

/// The `user-agent` of every request a node of cluster `cluster_id` sends on the transport:
/// `stemedb/<version> cluster/<id>`.
pub fn cluster_user_agent(cluster_id: &str) -> String {
    format!("stemedb/{} cluster/{cluster_id}", env!("CARGO_PKG_VERSION"))
}

/// The cluster a transport request's `user-agent` names, if any (tonic appends its own token).
pub fn cluster_of_user_agent(user_agent: &str) -> Option<&str> {
    user_agent.split_ascii_whitespace().find_map(|token| token.strip_prefix("cluster/"))
}

/// Network factory of one group.
#[derive(Clone)]
pub struct GrpcNetwork {
    peers: Arc<PeerChannels>,
    group: GroupId,
    /// The local replica's health: an unchecked or suspect replica sends no snapshot.
    health: Arc<ReplicaHealth>,
    /// The group's read lease: every accepted AppendEntries renews its follower's part.
    lease: Arc<LeaseClock>,
    /// The group's early replication: learns from each AppendEntries where its follower stands.
    early: Arc<EarlyReplication>,
}

impl GrpcNetwork {
    pub fn new(
        peers: Arc<PeerChannels>,
        group: GroupId,
        health: Arc<ReplicaHealth>,
        lease: Arc<LeaseClock>,
        early: Arc<EarlyReplication>,
    ) -> GrpcNetwork {
        GrpcNetwork { peers, group, health, lease, early }
    }
}

pub struct GrpcConnection {
    client: Result<RaftTransportClient<Channel>, InvalidPeerAddress>,
    batcher: Result<PeerBatcher, InvalidPeerAddress>,
    group: GroupId,
    target: NodeId,
    health: Arc<ReplicaHealth>,
    lease: Arc<LeaseClock>,
    early: Arc<EarlyReplication>,
}

/// Why a snapshot was not sent: this replica is unchecked since start or being repaired.
#[derive(Debug, thiserror::Error)]
#[error("group {group}: this replica is not checked since start or is being repaired; it sends no snapshot")]
struct SnapshotsHeld {
    group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GrpcConnection {
            client: self.peers.client(&node.addr),
            batcher: self.peers.batcher(&node.addr),
            group: self.group,
            target,
            health: self.health.clone(),
            lease: self.lease.clone(),
            early: self.early.clone(),
        }
    }
}

/// Which RPC of the transport a call is (its metric label).
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

/// The answer to one of openraft's AppendEntries, for early replication; reported when dropped,
/// so a call openraft abandons counts as a failure rather than staying in flight for good.
struct EarlyOutcome<'a> {
    early: &'a EarlyReplication,
    target: NodeId,
    /// The vote the message went under.
    vote: openraft::Vote<NodeId>,
    with_entries: bool,
    /// `Some(matched)` once the follower accepted.
    accepted: Option<Option<super::types::LogId>>,
}

impl Drop for EarlyOutcome<'_> {
    fn drop(&mut self) {
        self.early.answered(self.target, &self.vote, self.with_entries, self.accepted.take());
    }
}

type RaftRpcError<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl GrpcConnection {
    fn client(&mut self) -> Result<&mut RaftTransportClient<Channel>, InvalidPeerAddress> {
        self.client.as_mut().map_err(|e| e.clone())
    }

    /// Times the call, counts its failure, and turns the peer's answer into openraft's: a
    /// transport failure is the network's, a failure the peer's group reported is remote.
    async fn finish<T, R, E>(
        &self,
        rpc: Rpc,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
        decode: impl FnOnce(T) -> Result<Result<R, RaftError<NodeId, E>>, WireError>,
    ) -> Result<R, RaftRpcError<E>>
    where
        E: std::error::Error,
    {
        let started = Instant::now();
        let result = call.await;
        raft_metrics::PEER_RPC_DURATION.with_label_values(&[rpc.label()]).observe(started.elapsed().as_secs_f64());
        let reply = result.map_err(|status| {
            raft_metrics::PEER_RPC_ERRORS.with_label_values(&[rpc.label(), &self.target.to_string()]).inc();
            status_to_rpc_error(status)
        })?;
        let answer = decode(reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// An AppendEntries waiting for its batch.
struct Pending {
    message: AppendRequest,
    /// The message's encoded size (what a batch is bounded by).
    bytes: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<AppendReply, tonic::Status>>,
}

/// Sends the AppendEntries of every group to one peer, batched: up to [`BATCHES_IN_FLIGHT`]
/// calls at once, each carrying what queued up while the earlier ones were in flight (at most
/// [`MAX_BATCH_MESSAGES`] messages, about [`MAX_BATCH_BYTES`]). A lone message, or any message to
/// a peer that does not know batches, goes as a plain AppendEntries. Each message keeps its
/// own deadline and its own answer: a batch answers message by message, as separate calls would.
#[derive(Clone)]
pub struct PeerBatcher {
    queue: mpsc::Sender<Pending>,
}

impl PeerBatcher {
    fn start(client: RaftTransportClient<Channel>, frames: Option<Arc<FramePeer>>) -> PeerBatcher {
        let (queue, waiting) = mpsc::channel(BATCH_QUEUE);
        tokio::spawn(run_batches(client, frames, waiting));
        PeerBatcher { queue }
    }

    /// A batcher whose peer never answers (unit tests that need one and send nothing).
    #[cfg(test)]
    pub(crate) fn detached() -> PeerBatcher {
        let (queue, _) = mpsc::channel(1);
        PeerBatcher { queue }
    }

    /// Sends `message` in the next batch and returns the peer's answer.
    pub(crate) async fn append(&self, message: AppendRequest, timeout: Duration) -> Result<AppendReply, tonic::Status> {
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        let bytes = prost::Message::encoded_len(&message);
        let sent = async {
            self.queue
                .send(Pending { message, bytes, deadline, reply })
                .await
                .map_err(|_| tonic::Status::unavailable("the peer's batcher has stopped"))?;
            answer.await.map_err(|_| tonic::Status::unavailable("the batch was dropped"))?
        };
        match tokio::time::timeout_at(deadline.into(), sent).await {
            Ok(result) => result,
            Err(_) => Err(tonic::Status::deadline_exceeded("append entries: no answer within its deadline")),
        }
    }
}

/// The batcher of one peer: takes what is waiting whenever a slot for a call is free.
async fn run_batches(
    client: RaftTransportClient<Channel>,
    frames: Option<Arc<FramePeer>>,
    mut waiting: mpsc::Receiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let unbatched_until: Arc<Mutex<Option<Instant>>> = Arc::default();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(first) = waiting.recv().await else { return };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        // Other groups' replication tasks that are ready to run add theirs before the call.
        yield_while_arriving(MAX_BATCH_MESSAGES, || {
            while batch.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
                match waiting.try_recv() {
                    Ok(pending) => {
                        bytes += pending.bytes;
                        batch.push(pending);
                    }
                    Err(_) => break,
                }
            }
            // A batch full by bytes is as full as one at the message bound: no more turns.
            if bytes >= MAX_BATCH_BYTES {
                MAX_BATCH_MESSAGES
            } else {
                batch.len()
            }
        })
        .await;
        // A caller past its deadline has stopped waiting: its message is not sent.
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        raft_metrics::APPEND_BATCH_MESSAGES.observe(batch.len() as f64);
        let (client, frames, unbatched_until) = (client.clone(), frames.clone(), unbatched_until.clone());
        tokio::spawn(async move {
            send_batch(client, frames.as_ref(), batch, &unbatched_until).await;
            drop(slot);
        });
    }
}

/// Sends one batch and hands each caller its answer: as a frame when the peer speaks them (a
/// lone message too), otherwise over gRPC.
async fn send_batch(
    mut client: RaftTransportClient<Channel>,
    frames: Option<&Arc<FramePeer>>,
    batch: Vec<Pending>,
    unbatched_until: &Mutex<Option<Instant>>,
) {
    let deadline = batch.iter().map(|pending| pending.deadline).max().unwrap_or_else(Instant::now);
    if let Some(peer) = frames {
        match peer.connect(deadline).await {
            Ok(Some(conn)) => {
                let (messages, waiters): (Vec<AppendRequest>, Vec<_>) =
                    batch.into_iter().map(|pending| (pending.message, pending.reply)).unzip();
                let answer = match conn.call(Body::AppendBatch(AppendBatch { messages }), deadline).await {
                    Ok(Body::AppendBatchReply(reply)) => Ok(reply.replies),
                    Ok(_) => Err(tonic::Status::internal("the peer answered a batch with another kind of frame")),
                    Err(status) => Err(status),
                };
                answer_batch(answer, waiters);
                return;
            }
            // The peer does not speak frames: gRPC below.
            Ok(None) => {}
            Err(status) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(status.clone()));
                }
                return;
            }
        }
    }
    let unbatched = unbatched_until.lock().is_some_and(|until| Instant::now() < until);
    if batch.len() == 1 || unbatched {
        futures::future::join_all(batch.into_iter().map(|pending| {
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(pending.message);
                request.set_timeout(pending.deadline.saturating_duration_since(Instant::now()));
                let result = client.append_entries(request).await.map(tonic::Response::into_inner);
                let _ = pending.reply.send(result);
            }
        }))
        .await;
        return;
    }
    let (messages, waiters): (Vec<AppendRequest>, Vec<_>) =
        batch.into_iter().map(|pending| (pending.message, pending.reply)).unzip();
    let mut request = tonic::Request::new(AppendBatch { messages });
    request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    let answer = client.append_entries_batch(request).await.map(|response| response.into_inner().replies);
    if let Err(status) = &answer {
        if status.code() == tonic::Code::Unimplemented {
            // An older peer: its groups' replication retries, unbatched for a while.
            *unbatched_until.lock() = Some(Instant::now() + UNBATCHED_RETRY);
            tracing::info!("a peer does not accept batched append entries; sending them one by one");
        }
    }
    answer_batch(answer, waiters);
}

/// Hands each message of a batch its answer: its own reply, or the status the whole batch
/// failed with (a batch answered with another number of replies fails whole).
fn answer_batch(
    answer: Result<Vec<AppendBatchItem>, tonic::Status>,
    waiters: Vec<oneshot::Sender<Result<AppendReply, tonic::Status>>>,
) {
    let count = waiters.len();
    let answer = answer.and_then(|replies| {
        if replies.len() == count {
            Ok(replies)
        } else {
            Err(tonic::Status::internal(format!(
                "the peer answered a batch of {count} messages with {} replies",
                replies.len()
            )))
        }
    });
    match answer {
        Ok(replies) => {
            for (reply, waiter) in replies.into_iter().zip(waiters) {
                let _ = waiter.send(reply_result(reply));
            }
        }
        Err(status) => {
            for waiter in waiters {
                let _ = waiter.send(Err(status.clone()));
            }
        }
    }
}

/// A batch's answer to one message (the receiver's side): its reply, or the status an
/// unbatched call would have failed with, its StemeDB error code included.
pub fn batch_reply(group_id: u32, result: Result<AppendReply, tonic::Status>) -> AppendBatchItem {
    match result {
        Ok(reply) => AppendBatchItem { group_id, reply: Some(reply), ..AppendBatchItem::default() },
        Err(status) => {
            let FrameStatus { code, message, error_code } = status_frame(&status);
            AppendBatchItem { group_id, reply: None, status_code: code, status_message: message, error_code }
        }
    }
}

/// One message's answer in a batch (the sender's side), as an unbatched call would have
/// returned it: the inverse of [`batch_reply`].
fn reply_result(reply: AppendBatchItem) -> Result<AppendReply, tonic::Status> {
    if reply.status_code == 0 {
        return reply.reply.ok_or_else(|| tonic::Status::internal("a batch reply without its answer"));
    }
    Err(status_of_parts(reply.status_code, reply.status_message, &reply.error_code))
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
    ) -> Result<AppendEntriesResponse<NodeId>, RaftRpcError> {
        let message = wire::append_to_proto(self.group, &rpc);
        let timeout = option.hard_ttl();
        // Before the send: the follower receives it later, and its lease runs from then.
        let sent = lease::now();
        let mut promise = Duration::ZERO;
        let with_entries = !rpc.entries.is_empty();
        // Tells early replication the outcome, also when openraft drops this call (its own
        // timeout, a shutdown): then as a failure.
        let mut outcome = self.batcher.as_ref().ok().map(|batcher| {
            self.early.sending(self.target, batcher, &rpc.vote, rpc.leader_commit, with_entries, timeout);
            EarlyOutcome { early: &self.early, target: self.target, vote: rpc.vote, with_entries, accepted: None }
        });
        let call = async {
            match &self.batcher {
                Ok(batcher) => batcher.append(message, timeout).await,
                Err(error) => Err(tonic::Status::unavailable(error.to_string())),
            }
        };
        let decode = |reply: AppendReply| {
            promise = Duration::from_millis(reply.lease_ms);
            wire::append_reply_from_proto(reply)
        };
        let reply = self.finish(Rpc::AppendEntries, call, decode).await;
        // A success or a log conflict: either way the follower took this leader's vote, and
        // refuses other candidates for a lease.
        if let Ok(
            AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_) | AppendEntriesResponse::Conflict,
        ) = &reply
        {
            self.lease.acked(&rpc.vote, self.target, sent, promise);
        }
        if let Some(outcome) = &mut outcome {
            outcome.accepted = match &reply {
                Ok(AppendEntriesResponse::Success) => {
                    Some(rpc.entries.last().map(|entry| entry.log_id).or(rpc.prev_log_id))
                }
                Ok(AppendEntriesResponse::PartialSuccess(matching)) => Some(*matching),
                _ => None,
            };
        }
        drop(outcome);
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RaftRpcError<InstallSnapshotError>> {
        // Never a snapshot of data that may be damaged; openraft tries again after a while.
        if !self.health.sends_snapshots() {
            raft_metrics::SNAPSHOTS.with_label_values(&["held"]).inc();
            return Err(RPCError::Unreachable(Unreachable::new(&SnapshotsHeld { group: self.group })));
        }
        let mut client = self.client().map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?.clone();
        let mut request = tonic::Request::new(wire::snapshot_to_proto(self.group, rpc));
        request.set_timeout(option.hard_ttl());
        let call = async { client.install_snapshot(request).await.map(tonic::Response::into_inner) };
        self.finish(Rpc::InstallSnapshot, call, wire::snapshot_reply_from_proto).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RaftRpcError> {
        let mut client = self.client().map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?.clone();
        let mut request = tonic::Request::new(wire::vote_request_to_proto(self.group, &rpc));
        request.set_timeout(option.hard_ttl());
        let call = async { client.vote(request).await.map(tonic::Response::into_inner) };
        self.finish(Rpc::Vote, call, wire::vote_reply_from_proto).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use stemedb_proto::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
    use stemedb_proto::raft::{
        AdminGroupRequest, AppendBatchReply, CampaignRequest, DoneReply, Heartbeat, HeartbeatAck, InstallSnapshotReply,
        InstallSnapshotRequest as PbSnapshot, PartialSuccess, ProposeReply, ProposeRequest, ReadIndexReply,
        ReadIndexRequest, ShardReadReply, ShardReadRequest, VoteReply, VoteRequest as PbVote,
    };
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::error::ErrorCode;

    /// A peer that answers each AppendEntries with a partial success at 7 times its group id, refuses group 404 as
    /// an unknown shard, records the size of every batch, and holds every call until the test
    /// opens its gate.
    struct FakePeer {
        batches: Arc<Mutex<Vec<usize>>>,
        singles: Arc<Mutex<usize>>,
        /// Calls that reached the peer (before its gate).
        arrived: Arc<std::sync::atomic::AtomicUsize>,
        gate: tokio::sync::watch::Receiver<bool>,
        knows_batches: bool,
    }

    impl FakePeer {
        async fn wait_for_gate(&self) {
            self.arrived.fetch_add(1, Ordering::SeqCst);
            let mut gate = self.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
        }

        fn answer(message: &AppendRequest) -> Result<AppendReply, Status> {
            if message.group_id == 404 {
                return Err(ErrorCode::UnknownShard.to_status("group 404 is not hosted here"));
            }
            Ok(expected(message.group_id))
        }
    }

    fn unused<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl RaftTransport for FakePeer {
        async fn append_entries(&self, request: Request<AppendRequest>) -> Result<Response<AppendReply>, Status> {
            self.wait_for_gate().await;
            *self.singles.lock() += 1;
            FakePeer::answer(request.get_ref()).map(Response::new)
        }
        async fn append_entries_batch(
            &self,
            request: Request<AppendBatch>,
        ) -> Result<Response<AppendBatchReply>, Status> {
            if !self.knows_batches {
                return unused();
            }
            self.wait_for_gate().await;
            let messages = request.into_inner().messages;
            self.batches.lock().push(messages.len());
            let replies =
                messages.iter().map(|message| batch_reply(message.group_id, FakePeer::answer(message))).collect();
            Ok(Response::new(AppendBatchReply { replies }))
        }
        async fn vote(&self, _: Request<PbVote>) -> Result<Response<VoteReply>, Status> {
            unused()
        }
        async fn install_snapshot(&self, _: Request<PbSnapshot>) -> Result<Response<InstallSnapshotReply>, Status> {
            unused()
        }
        async fn propose(&self, _: Request<ProposeRequest>) -> Result<Response<ProposeReply>, Status> {
            unused()
        }
        async fn read_index(&self, _: Request<ReadIndexRequest>) -> Result<Response<ReadIndexReply>, Status> {
            unused()
        }
        async fn admin_group(&self, _: Request<AdminGroupRequest>) -> Result<Response<DoneReply>, Status> {
            unused()
        }
        async fn campaign(&self, _: Request<CampaignRequest>) -> Result<Response<DoneReply>, Status> {
            unused()
        }
        async fn node_heartbeat(&self, _: Request<Heartbeat>) -> Result<Response<HeartbeatAck>, Status> {
            unused()
        }
        async fn shard_read(&self, _: Request<ShardReadRequest>) -> Result<Response<ShardReadReply>, Status> {
            unused()
        }
    }

    /// The peer's answer to a message of `group`.
    fn expected(group: u32) -> AppendReply {
        use stemedb_proto::raft::append_reply::Result as R;
        let matching = stemedb_proto::raft::LogId { term: 1, node_id: 2, index: u64::from(group) * 7 };
        AppendReply { result: Some(R::PartialSuccess(PartialSuccess { matching: Some(matching) })), lease_ms: 0 }
    }

    struct Harness {
        peers: Arc<PeerChannels>,
        addr: String,
        batches: Arc<Mutex<Vec<usize>>>,
        singles: Arc<Mutex<usize>>,
        arrived: Arc<std::sync::atomic::AtomicUsize>,
        gate: tokio::sync::watch::Sender<bool>,
    }

    async fn harness(knows_batches: bool) -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (gate, gate_rx) = tokio::sync::watch::channel(false);
        let batches = Arc::new(Mutex::new(Vec::new()));
        let singles = Arc::new(Mutex::new(0));
        let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peer = FakePeer {
            batches: batches.clone(),
            singles: singles.clone(),
            arrived: arrived.clone(),
            gate: gate_rx,
            knows_batches,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Harness { peers: PeerChannels::new(HashMap::new(), None), addr, batches, singles, arrived, gate }
    }

    /// Sends one message at a time until both call slots are held at the peer.
    async fn fill_slots(
        h: &Harness,
        batcher: &PeerBatcher,
    ) -> Vec<tokio::task::JoinHandle<(u32, Result<AppendReply, Status>)>> {
        let mut held = Vec::new();
        for group in 0..BATCHES_IN_FLIGHT as u32 {
            held.extend(sends(batcher, group..group + 1));
            let deadline = Instant::now() + Duration::from_secs(30);
            while h.arrived.load(Ordering::SeqCst) <= group as usize {
                assert!(Instant::now() < deadline, "call {group} never reached the peer");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        held
    }

    /// Polls until `count` messages wait in the batcher's queue.
    async fn until_queued(batcher: &PeerBatcher, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while BATCH_QUEUE - batcher.queue.capacity() < count {
            assert!(Instant::now() < deadline, "{count} messages never queued");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn sends(
        batcher: &PeerBatcher,
        groups: std::ops::Range<u32>,
    ) -> Vec<tokio::task::JoinHandle<(u32, Result<AppendReply, Status>)>> {
        groups
            .map(|group| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    let message = AppendRequest { group_id: group, ..AppendRequest::default() };
                    (group, batcher.append(message, Duration::from_secs(30)).await)
                })
            })
            .collect()
    }

    /// Messages that queue up while calls are in flight go in one batch, and every caller gets
    /// its own message's answer, errors included (with their StemeDB code).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_messages_go_in_one_batch_and_each_caller_gets_its_answer() {
        let h = harness(true).await;
        let batcher = h.peers.batcher(&h.addr).expect("batcher");
        // The first messages take both call slots and are held at the peer; the rest queue.
        let mut calls = fill_slots(&h, &batcher).await;
        let mut rest = sends(&batcher, 2..40);
        rest.extend(sends(&batcher, 404..405));
        until_queued(&batcher, 39).await;
        h.gate.send_replace(true);
        calls.extend(rest);
        for call in calls {
            let (group, result) = call.await.expect("join");
            if group == 404 {
                let status = result.expect_err("group 404 is refused");
                assert_eq!(ErrorCode::of_status(&status), Some(ErrorCode::UnknownShard));
                assert_eq!(status.code(), tonic::Code::NotFound);
            } else {
                assert_eq!(result.expect("answered"), expected(group), "group {group} got another's answer");
            }
        }
        let largest = h.batches.lock().iter().copied().max().unwrap_or(0);
        assert!(largest >= 39, "the 39 waiting messages went in one batch: {:?}", h.batches.lock());
    }

    /// A peer without batches (an older version) fails the batch once; from then on its
    /// messages go one by one, and they are answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_without_batches_gets_single_calls() {
        let h = harness(false).await;
        let batcher = h.peers.batcher(&h.addr).expect("batcher");
        let held = fill_slots(&h, &batcher).await;
        let batched = sends(&batcher, 2..10);
        until_queued(&batcher, 8).await;
        h.gate.send_replace(true);
        for call in held {
            assert!(call.await.expect("join").1.is_ok(), "a lone message goes unbatched");
        }
        let mut refused = false;
        for call in batched {
            if let Err(status) = call.await.expect("join").1 {
                assert_eq!(status.code(), tonic::Code::Unimplemented);
                refused = true;
            }
        }
        assert!(refused, "the batch reached the peer and was refused");
        let before = *h.singles.lock();
        for call in sends(&batcher, 10..20) {
            assert!(call.await.expect("join").1.is_ok());
        }
        assert_eq!(*h.singles.lock(), before + 10, "after the refusal, one call per message");
    }
}
