//! The frame transport, receiving side: serves one frame connection from a peer
//! (`raft::frames` has the format and the dialling side). The server hands a connection here
//! when its first bytes are `raft::frames::PREFACE`. After the hellos, every request of the
//! connection runs in this connection's task, at most `MAX_IN_FLIGHT` at once (one more is
//! refused `overloaded` at once, and the socket is read on, so pings are always answered),
//! each within its sender's deadline, and each answer is written as soon as it is ready, all
//! those ready together in one write.
//!
//! Requests are handled by the same [`RaftService`] methods as their gRPC calls ([`Handler`]);
//! pings are answered at once. A peer of another cluster is answered `wrong_cluster` at its
//! hello, and anything but a hello first `malformed_message`; either way the connection
//! closes. A frame that does not decode, answers that cannot be written within
//! [`WRITE_TIMEOUT`], or nothing read for [`IDLE_TIMEOUT`] close the connection too (its
//! sender's calls fail as on a lost connection). On shutdown the connection stops reading,
//! answers what it has in flight, closes its side and waits briefly for the peer to close
//! its own; the server abandons what is left after its grace period.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use prost::bytes::Bytes;
use prost::Message;
use stemedb_proto::raft::frame::Body;
use stemedb_proto::raft::{Frame, FramePing};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::RaftService;
use crate::error::ErrorCode;
use crate::raft::frames::{codec, encode, hello, status_frame, Io, HELLO_TIMEOUT, MAX_HELLO_BYTES, MAX_IN_FLIGHT};
use crate::raft::metrics as raft_metrics;
use crate::raft::network::MAX_MESSAGE_BYTES;

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

/// What answers a connection's requests: the [`RaftService`] (tests bring their own).
pub trait Handler: Send + Sync + 'static {
    /// The request's id and its answer: its reply, or the status it failed with.
    fn handle(self: Arc<Self>, frame: Frame) -> impl Future<Output = (u64, Body)> + Send;
}

impl Handler for RaftService {
    async fn handle(self: Arc<Self>, frame: Frame) -> (u64, Body) {
        let timeout = (frame.timeout_us > 0).then(|| Duration::from_micros(frame.timeout_us));
        let answer = match frame.body {
            Some(Body::AppendBatch(batch)) => self.append_batch(batch).await.map(Body::AppendBatchReply),
            Some(Body::Propose(message)) => self.propose_message(message, timeout).await.map(Body::ProposeReply),
            Some(Body::ReadIndex(message)) => self.read_index_message(message).await.map(Body::ReadIndexReply),
            _ => Err(ErrorCode::MalformedMessage.to_status("not a request the frame transport carries")),
        };
        (frame.id, answer.unwrap_or_else(|status| Body::Status(status_frame(&status))))
    }
}

/// How long writing the answers may take before the connection is given up (a peer that
/// stopped reading, or one behind a partition).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection nothing was read from for this long is closed (the dialling side pings one
/// it heard nothing on for a second).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// After its last answer on shutdown, how long the connection waits for the peer to close
/// its side (closing first, with requests unread, would reset the connection and could
/// discard the answers just written).
const CLOSING: Duration = Duration::from_secs(1);

/// Serves the frame connection `io`, whose preface was read, until the peer closes it, it
/// fails, or `stop` fires and what was in flight has been answered; at once when `abort`
/// fires.
pub async fn serve<H: Handler>(
    io: Box<dyn Io>,
    handler: Arc<H>,
    cluster_id: String,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let _open = Open::new();
    tokio::select! {
        _ = abort.cancelled() => {}
        _ = serve_until_closed(io, handler, cluster_id, stop) => {}
    }
}

async fn serve_until_closed<H: Handler>(io: Box<dyn Io>, handler: Arc<H>, cluster_id: String, stop: CancellationToken) {
    let (read, write) = tokio::io::split(io);
    let mut reader = FramedRead::new(read, codec());
    reader.decoder_mut().set_max_frame_length(MAX_HELLO_BYTES);
    let mut writer = FramedWrite::new(write, codec());
    let first = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(bytes))) => Frame::decode(bytes.freeze()).ok().and_then(|frame| frame.body),
        _ => return,
    };
    let refusal =
        match first {
            // A hello that names no cluster is served, as a gRPC request that names none is.
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
        let refused = writer.send(encode(0, 0, Body::Status(status_frame(&status))));
        let _ = tokio::time::timeout(WRITE_TIMEOUT, refused).await;
        return;
    }
    match tokio::time::timeout(WRITE_TIMEOUT, writer.send(hello(&cluster_id))).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    reader.decoder_mut().set_max_frame_length(MAX_MESSAGE_BYTES);
    let mut running = FuturesUnordered::new();
    let mut reading = true;
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            Some((id, body)) = running.next(), if !running.is_empty() => {
                // Every answer ready now goes in one write.
                let mut ready = vec![encode(id, 0, body)];
                while let Some(Some((id, body))) = running.next().now_or_never() {
                    ready.push(encode(id, 0, body));
                }
                let written = async {
                    for frame in ready {
                        writer.feed(frame).await?;
                    }
                    SinkExt::<Bytes>::flush(&mut writer).await
                };
                match tokio::time::timeout(WRITE_TIMEOUT, written).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
            next = reader.next(), if reading => {
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                match next {
                    Some(Ok(bytes)) => match Frame::decode(bytes.freeze()) {
                        Ok(Frame { id, body: Some(Body::Ping(_)), .. }) => {
                            running.push(async move { (id, Body::Pong(FramePing {})) }.boxed());
                        }
                        // Refused at once, before anything is done (so the connection stays
                        // readable and its pings answered).
                        Ok(Frame { id, .. }) if running.len() >= MAX_IN_FLIGHT => {
                            crate::metrics::REQUESTS_SHED.with_label_values(&["transport"]).inc();
                            let status = ErrorCode::Overloaded
                                .to_status(format!("{MAX_IN_FLIGHT} requests already running on this connection"));
                            running.push(async move { (id, Body::Status(status_frame(&status))) }.boxed());
                        }
                        Ok(frame) => running.push(within_deadline(handler.clone(), frame).boxed()),
                        // The connection closes: its callers see it lost.
                        Err(_) => return,
                    },
                    // The peer closed the connection (or it failed): answers have nowhere to go.
                    _ => return,
                }
            }
            _ = &mut idle, if reading => return,
            _ = stop.cancelled(), if reading => reading = false,
        }
        if !reading && running.is_empty() {
            break;
        }
    }
    // Shutdown: the answers are written; close this side and let the peer close its own.
    let _ = tokio::time::timeout(CLOSING, async {
        let _ = writer.get_mut().shutdown().await;
        while let Some(Ok(_)) = reader.next().await {}
    })
    .await;
}

/// A request's answer, or `deadline_exceeded` once its sender's deadline has passed (with a
/// little margin, so that a handler that keeps its own deadline answers first).
async fn within_deadline<H: Handler>(handler: Arc<H>, frame: Frame) -> (u64, Body) {
    let id = frame.id;
    if frame.timeout_us == 0 {
        return handler.handle(frame).await;
    }
    let allowed = Duration::from_micros(frame.timeout_us) + Duration::from_millis(50);
    match tokio::time::timeout(allowed, handler.handle(frame)).await {
        Ok(answer) => answer,
        Err(_) => {
            let status = tonic::Status::deadline_exceeded("the request's deadline passed before it was answered");
            (id, Body::Status(status_frame(&status)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use stemedb_proto::raft::{read_index_reply, ReadIndexReply, ReadIndexRequest};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::raft::frames::{FramePeer, PREFACE};
    use futures::SinkExt;

    /// Answers a read index request for group `g` with index `g`, after `g` ms when `slow`
    /// (so the answers come back in another order than the requests), and group 0 with a
    /// refusal; anything else it never answers.
    struct Echo {
        slow: bool,
    }

    impl Handler for Echo {
        async fn handle(self: Arc<Self>, frame: Frame) -> (u64, Body) {
            let body = match frame.body {
                Some(Body::ReadIndex(ReadIndexRequest { group_id: 0 })) => {
                    Body::Status(status_frame(&ErrorCode::UnknownShard.to_status("no such group here")))
                }
                Some(Body::ReadIndex(ReadIndexRequest { group_id })) => {
                    if self.slow {
                        tokio::time::sleep(Duration::from_millis(u64::from(50 - group_id.min(50)))).await;
                    }
                    Body::ReadIndexReply(ReadIndexReply {
                        result: Some(read_index_reply::Result::Index(u64::from(group_id))),
                    })
                }
                _ => std::future::pending().await,
            };
            (frame.id, body)
        }
    }

    /// The tasks of a test server's connections, which a test can end.
    type Served = Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>;

    /// A listener serving frame connections of cluster `cluster` with `handler`, counting the
    /// connections it accepted.
    async fn frame_server<H: Handler>(handler: Arc<H>, cluster: &str) -> (String, Arc<AtomicUsize>, Served) {
        let cluster = cluster.to_string();
        counting_server(move |mut stream| {
            let (handler, cluster) = (handler.clone(), cluster.clone());
            async move {
                let mut preface = [0u8; 8];
                stream.read_exact(&mut preface).await.expect("preface");
                assert_eq!(&preface, PREFACE);
                let (stop, abort) = (CancellationToken::new(), CancellationToken::new());
                serve(Box::new(stream), handler, cluster, stop, abort).await;
            }
        })
        .await
    }

    /// A listener that runs `on_accept` on each connection in a task of its own, counting them.
    async fn counting_server<F, Fut>(on_accept: F) -> (String, Arc<AtomicUsize>, Served)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let served = Served::default();
        let (count, tasks) = (accepted.clone(), served.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tasks.lock().push(tokio::spawn(on_accept(stream)));
            }
        });
        (addr, accepted, served)
    }

    fn index_of(body: Body) -> Option<u64> {
        match body {
            Body::ReadIndexReply(ReadIndexReply { result: Some(read_index_reply::Result::Index(index)) }) => {
                Some(index)
            }
            _ => None,
        }
    }

    fn read_index(group_id: u32) -> Body {
        Body::ReadIndex(ReadIndexRequest { group_id })
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn many_calls_share_one_connection_and_each_gets_its_own_answer() {
        let (addr, accepted, _) = frame_server(Arc::new(Echo { slow: true }), "c1").await;
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        let calls = (1..=40u32).map(|group| {
            let peer = peer.clone();
            tokio::spawn(async move {
                let conn = peer.connect(soon()).await.expect("connect").expect("the server speaks frames");
                (group, conn.call(read_index(group), soon()).await)
            })
        });
        for call in futures::future::join_all(calls).await {
            let (group, answer) = call.expect("task");
            match answer {
                Ok(body) => assert_eq!(index_of(body), Some(u64::from(group))),
                Err(status) => panic!("group {group}: {status}"),
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, dialled once");
    }

    #[tokio::test]
    async fn a_refusal_keeps_its_error_code() {
        let (addr, _, _) = frame_server(Arc::new(Echo { slow: false }), "c1").await;
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        let conn = peer.connect(soon()).await.expect("connect").expect("frames");
        let status = conn.call(read_index(0), soon()).await.expect_err("refused");
        assert_eq!(ErrorCode::of_status(&status), Some(ErrorCode::UnknownShard));
    }

    #[tokio::test]
    async fn a_node_of_another_cluster_is_refused_at_its_hello() {
        let (addr, _, _) = frame_server(Arc::new(Echo { slow: false }), "c1").await;
        let peer = Arc::new(FramePeer::new(addr, Some("c2".into()), None));
        let status = peer.connect(soon()).await.err().expect("refused");
        assert_eq!(ErrorCode::of_status(&status), Some(ErrorCode::WrongCluster));
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_times_out_and_the_connection_stays() {
        let (addr, accepted, _) = frame_server(Arc::new(Echo { slow: false }), "c1").await;
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        let conn = peer.connect(soon()).await.expect("connect").expect("frames");
        // Echo never answers an append batch.
        let never = Body::AppendBatch(Default::default());
        let status = conn.call(never, Instant::now() + Duration::from_millis(50)).await.expect_err("no answer");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        let conn = peer.connect(soon()).await.expect("connect").expect("frames");
        assert_eq!(index_of(conn.call(read_index(7), soon()).await.expect("answered")), Some(7));
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "heard from recently: the connection was kept");
    }

    #[tokio::test]
    async fn a_lost_connection_fails_its_callers_and_the_next_call_dials_again() {
        let (addr, accepted, served) = frame_server(Arc::new(Echo { slow: false }), "c1").await;
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        let conn = peer.connect(soon()).await.expect("connect").expect("frames");
        // Echo never answers an append batch: the call waits until the connection is lost.
        let waiting = tokio::spawn(async move { conn.call(Body::AppendBatch(Default::default()), soon()).await });
        while accepted.load(Ordering::SeqCst) == 0 || served.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        // The peer's process dies: its connections close.
        for task in served.lock().drain(..) {
            task.abort();
        }
        let status = waiting.await.expect("task").expect_err("lost");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(ErrorCode::of_status(&status), None, "a transport failure names no error code");
        let conn = peer.connect(soon()).await.expect("dialled again").expect("frames");
        assert_eq!(index_of(conn.call(read_index(3), soon()).await.expect("answered")), Some(3));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_peer_without_frames_is_sent_grpc_for_a_while() {
        // What an older node's HTTP/2 server does with the preface: its settings, then close.
        let (addr, accepted, _) = counting_server(|mut stream| async move {
            let _ = stream.write_all(&[0, 0, 0x12, 4, 0, 0, 0, 0, 0]).await;
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf).await;
        })
        .await;
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        assert!(peer.connect(soon()).await.expect("no failure").is_none(), "gRPC, not frames");
        assert!(peer.connect(soon()).await.expect("no failure").is_none());
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "not dialled again within the retry period");
    }

    #[tokio::test]
    async fn an_unreachable_peer_fails_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        let status = peer.connect(soon()).await.err().expect("unreachable");
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_peer_that_closes_without_a_word_is_a_failed_dial_not_an_older_node() {
        let (addr, accepted, _) = counting_server(|stream| async move { drop(stream) }).await;
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        let first = peer.connect(soon()).await.err().expect("a failed dial");
        assert_eq!(first.code(), tonic::Code::Unavailable);
        // Within the redial pause the same failure comes back without a dial.
        let again = peer.connect(soon()).await.err().expect("the same failure");
        assert_eq!(again.message(), first.message());
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// A peer that stops answering anything (a partition that drops packets) loses its
    /// connection after the silence allowed, pings unanswered, and its callers learn it.
    #[tokio::test]
    async fn a_silent_peer_is_found_by_its_unanswered_pings() {
        let (addr, _, _) = counting_server(|mut stream| async move {
            // Answers the hello, then reads everything and answers nothing.
            let mut preface = [0u8; 8];
            stream.read_exact(&mut preface).await.expect("preface");
            let mut framed = tokio_util::codec::Framed::new(stream, codec());
            let _ = framed.next().await;
            framed.send(hello("c1")).await.expect("hello");
            while let Some(Ok(_)) = framed.next().await {}
        })
        .await;
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        let conn = peer.connect(soon()).await.expect("connect").expect("frames");
        // Far beyond the silence allowed: an answer past it would be `deadline_exceeded`.
        let status = conn
            .call(read_index(1), Instant::now() + Duration::from_secs(20))
            .await
            .expect_err("the connection is closed");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    }

    /// A request still running past its sender's deadline is answered `deadline_exceeded`,
    /// so it does not hold a slot for ever.
    #[tokio::test]
    async fn the_receiver_ends_a_request_past_its_deadline() {
        let frame = Frame { id: 9, timeout_us: 10_000, body: Some(Body::AppendBatch(Default::default())) };
        let (id, body) = within_deadline(Arc::new(Echo { slow: false }), frame).await;
        assert_eq!(id, 9);
        match body {
            Body::Status(status) => assert_eq!(status.code, tonic::Code::DeadlineExceeded as i32),
            other => panic!("{other:?}"),
        }
    }

    /// A caller whose deadline is too short for a dial (a heartbeat's) stops waiting; the dial
    /// goes on, and the next caller finds the connection open.
    #[tokio::test]
    async fn a_dial_outlives_a_caller_with_a_short_deadline() {
        // A peer slow to answer the hello (200 ms).
        let (addr, accepted, _) = counting_server(|mut stream| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut preface = [0u8; 8];
            stream.read_exact(&mut preface).await.expect("preface");
            let (stop, abort) = (CancellationToken::new(), CancellationToken::new());
            serve(Box::new(stream), Arc::new(Echo { slow: false }), "c1".into(), stop, abort).await;
        })
        .await;
        let peer = Arc::new(FramePeer::new(addr, Some("c1".into()), None));
        let short = Instant::now() + Duration::from_millis(20);
        let status = peer.connect(short).await.err().expect("no time to dial");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        let conn = peer.connect(soon()).await.expect("connect").expect("frames");
        assert_eq!(index_of(conn.call(read_index(5), soon()).await.expect("answered")), Some(5));
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the first dial was not abandoned");
    }
}
