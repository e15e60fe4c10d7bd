//! The frame transport, client side, and its framing: the hot requests of the transport
//! (batched AppendEntries, writes forwarded to a shard leader, read indexes) sent over one
//! long-lived connection per peer on 18182, many at once, each matched to its reply by id.
//!
//! gRPC costs each of those calls an HTTP/2 stream: headers encoded and decoded, a hop
//! through tonic's buffer task and h2's connection task on each side, and a task spawned for
//! it on the receiver; about 157 µs out and 104 µs back on this machine against 12 µs for the
//! loopback round trip itself (docs/performance.md). Here a caller encodes its request and
//! writes it to the socket itself (under the connection's write lock), one task per
//! connection reads the replies and hands each to its caller, and the receiver handles every
//! request of a connection in that connection's task (`rpc::frames`).
//!
//! A connection starts with [`PREFACE`] instead of HTTP/2's, so the receiver tells the two
//! apart on the same port; then each side sends a length-delimited [`Frame`] (4 bytes of
//! length, big-endian, then the protobuf message), the first of them a hello naming the
//! sender's cluster. A peer that answers the preface with bytes that are not a hello (a node of
//! a version before frames: its HTTP/2 settings) is sent gRPC for [`UNSUPPORTED_RETRY`]; one
//! that answers with a refusal, resets, closes or stays silent is a failed dial. Failures read
//! as gRPC's do:
//! every call returns a [`tonic::Status`], with the StemeDB error code of a refusal, so the
//! callers map them as before (a status without one came from the transport and may have
//! followed delivery).
//!
//! Liveness: a connection is closed, its socket with it, when the socket fails, and when
//! nothing at all was received on it for [`SILENT_FOR`]: the dialling side pings a connection
//! it heard nothing on for [`PING_AFTER`], and a healthy peer answers at once (HTTP/2
//! keep-alive did this for gRPC; a peer behind a partition that drops packets is found this
//! way). The next call dials again, at most one dial per peer at a time and none for
//! [`REDIAL_AFTER`] after a failed one (the callers meanwhile get the failure's status).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, SinkExt, StreamExt};
use prost::bytes::Bytes;
use prost::Message;
use stemedb_proto::raft::frame::Body;
use stemedb_proto::raft::{Frame, FrameHello, FramePing, FrameStatus};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::metrics as raft_metrics;
use super::network::MAX_MESSAGE_BYTES;
use crate::error::{ErrorCode, GRPC_CODE_KEY};

/// The first bytes of a frame connection (HTTP/2's preface starts `PRI `, TLS's `0x16`).
pub const PREFACE: &[u8; 8] = b"STMFRM01";

/// Requests one connection carries at once, each way; a caller past it is answered
/// `overloaded` at once, without sending (the sender's own queues are bounded well below it).
pub const MAX_IN_FLIGHT: usize = 4096;

/// How long a dial's TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long the hellos may take, each way.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// After a failed dial, calls fail at once for this long rather than dial again.
const REDIAL_AFTER: Duration = Duration::from_millis(100);

/// How long a peer that does not speak frames is sent gRPC before frames are tried again.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(30);

/// A connection nothing was received on for this long is pinged.
const PING_AFTER: Duration = Duration::from_secs(1);

/// A connection nothing was received on for this long (its pings unanswered) is closed.
const SILENT_FOR: Duration = Duration::from_secs(5);

/// The largest hello either side reads (a hello is a few dozen bytes; the limit keeps a
/// stranger from making a node buffer a large frame before it has named its cluster).
pub const MAX_HELLO_BYTES: usize = 64 << 10;

/// The codec of both sides: a 4-byte big-endian length, then that many bytes.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(MAX_MESSAGE_BYTES).new_codec()
}

/// A frame's bytes.
pub fn encode(id: u64, timeout_us: u64, body: Body) -> Bytes {
    Bytes::from(Frame { id, timeout_us, body: Some(body) }.encode_to_vec())
}

/// The hello a node sends first.
pub fn hello(cluster_id: &str) -> Bytes {
    encode(
        0,
        0,
        Body::Hello(FrameHello { cluster_id: cluster_id.to_string(), version: env!("CARGO_PKG_VERSION").to_string() }),
    )
}

/// A failed request's status as a frame (the inverse of [`status_of_frame`]).
pub fn status_frame(status: &tonic::Status) -> FrameStatus {
    FrameStatus {
        code: status.code() as i32,
        message: status.message().to_string(),
        error_code: ErrorCode::of_status(status).map(|c| c.as_str().to_string()).unwrap_or_default(),
    }
}

/// The status a request failed with, its StemeDB error code included, as a gRPC call would
/// have returned it.
pub fn status_of_frame(status: FrameStatus) -> tonic::Status {
    status_of_parts(status.code, status.message, &status.error_code)
}

/// A status from its code, message and StemeDB error code (empty: none).
pub fn status_of_parts(code: i32, message: String, error_code: &str) -> tonic::Status {
    let mut status = tonic::Status::new(tonic::Code::from(code), message);
    let code = Some(error_code).filter(|code| !code.is_empty());
    if let Some(value) = code.and_then(|code| tonic::metadata::MetadataValue::try_from(code).ok()) {
        status.metadata_mut().insert(GRPC_CODE_KEY, value);
    }
    status
}

/// A stream a frame connection runs over: TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

type Reader = FramedRead<ReadHalf<Box<dyn Io>>, LengthDelimitedCodec>;
type Writer = FramedWrite<WriteHalf<Box<dyn Io>>, LengthDelimitedCodec>;

/// The frame connection to one peer: dialled on first use, and again after it closes.
pub struct FramePeer {
    /// The address dialled (a test's fault-injection proxy stands in for the peer's).
    dial: String,
    cluster_id: String,
    tls: Option<Arc<crate::tls::ClusterTls>>,
    live: parking_lot::Mutex<Option<Arc<FrameConn>>>,
    /// The dial under way, if any: callers that find one wait for it.
    dialling: parking_lot::Mutex<Option<Shared<BoxFuture<'static, DialOutcome>>>>,
    /// The last dial's failure, and when: repeated to callers for [`REDIAL_AFTER`].
    failed: parking_lot::Mutex<Option<(Instant, tonic::Status)>>,
    unsupported_until: parking_lot::Mutex<Option<Instant>>,
    /// Cancelled when this peer is dropped: its connections close.
    dropped: CancellationToken,
}

impl Drop for FramePeer {
    fn drop(&mut self) {
        self.dropped.cancel();
    }
}

/// What a dial gives its callers: the connection, `None` for a peer without frames, or why
/// it failed.
type DialOutcome = Result<Option<Arc<FrameConn>>, tonic::Status>;

/// How a dial ended, when the socket connected.
enum Dialled {
    Ready(Arc<FrameConn>),
    /// The peer answered the preface with something other than a hello.
    Unsupported,
}

impl FramePeer {
    pub fn new(dial: String, cluster_id: Option<String>, tls: Option<Arc<crate::tls::ClusterTls>>) -> FramePeer {
        FramePeer {
            dial,
            cluster_id: cluster_id.unwrap_or_default(),
            tls,
            live: parking_lot::Mutex::new(None),
            dialling: parking_lot::Mutex::new(None),
            failed: parking_lot::Mutex::new(None),
            unsupported_until: parking_lot::Mutex::new(None),
            dropped: CancellationToken::new(),
        }
    }

    fn open(&self) -> Option<Arc<FrameConn>> {
        self.live.lock().as_ref().filter(|conn| !conn.closed.is_cancelled()).cloned()
    }

    fn unsupported(&self) -> bool {
        self.unsupported_until.lock().is_some_and(|until| Instant::now() < until)
    }

    /// The open connection, dialled if need be; `None` when the peer does not speak frames
    /// (send gRPC). Fails `unavailable` when the peer cannot be reached. The dial runs in a
    /// task of its own, bounded by its own timeouts, not the caller's deadline (a heartbeat's
    /// is 150 ms): a caller stops waiting at its deadline, and the dial goes on for the next.
    pub async fn connect(self: &Arc<Self>, deadline: Instant) -> Result<Option<Arc<FrameConn>>, tonic::Status> {
        let dial = {
            let mut dialling = self.dialling.lock();
            if let Some(known) = self.known() {
                return known;
            }
            match dialling.as_ref() {
                Some(dial) => dial.clone(),
                None => {
                    let peer = self.clone();
                    let task = tokio::spawn(async move {
                        let outcome = peer.dial_and_record().await;
                        *peer.dialling.lock() = None;
                        outcome
                    });
                    let dial = async move {
                        task.await.unwrap_or_else(|_| Err(tonic::Status::unavailable("the dial task failed")))
                    }
                    .boxed()
                    .shared();
                    *dialling = Some(dial.clone());
                    dial
                }
            }
        };
        match tokio::time::timeout_at(deadline.into(), dial).await {
            Ok(outcome) => outcome,
            Err(_) => Err(tonic::Status::deadline_exceeded("no connection to the peer within the request's deadline")),
        }
    }

    /// What is known without dialling: the open connection, a peer without frames, or the
    /// failure of a dial within [`REDIAL_AFTER`].
    fn known(&self) -> Option<Result<Option<Arc<FrameConn>>, tonic::Status>> {
        if let Some(conn) = self.open() {
            return Some(Ok(Some(conn)));
        }
        if self.unsupported() {
            return Some(Ok(None));
        }
        match self.failed.lock().as_ref() {
            Some((at, status)) if at.elapsed() < REDIAL_AFTER => Some(Err(status.clone())),
            _ => None,
        }
    }

    /// Dials and records the outcome for the callers to come.
    async fn dial_and_record(&self) -> Result<Option<Arc<FrameConn>>, tonic::Status> {
        let failed = |result: &str, status: tonic::Status| {
            raft_metrics::FRAME_DIALS.with_label_values(&[result]).inc();
            *self.failed.lock() = Some((Instant::now(), status.clone()));
            Err(status)
        };
        match self.dial().await {
            Ok(Dialled::Ready(conn)) => {
                raft_metrics::FRAME_DIALS.with_label_values(&["ok"]).inc();
                *self.failed.lock() = None;
                if let Some(old) = self.live.lock().replace(conn.clone()) {
                    old.close("replaced");
                }
                Ok(Some(conn))
            }
            Ok(Dialled::Unsupported) => {
                raft_metrics::FRAME_DIALS.with_label_values(&["unsupported"]).inc();
                tracing::info!(peer = %self.dial, "the peer does not speak frames; sending it grpc for a while");
                *self.unsupported_until.lock() = Some(Instant::now() + UNSUPPORTED_RETRY);
                Ok(None)
            }
            Err(DialError::Refused(status)) => failed("refused", status),
            Err(DialError::Io(error)) => {
                failed("failed", tonic::Status::unavailable(format!("dialling {}: {error}", self.dial)))
            }
        }
    }

    /// Connects, sends the preface and the hello, and reads the peer's hello.
    async fn dial(&self) -> Result<Dialled, DialError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.dial))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(stream),
            Some(tls) => Box::new(tls.handshake(stream).await?),
        };
        let (read, write) = tokio::io::split(io);
        let mut reader = FramedRead::new(read, codec());
        reader.decoder_mut().set_max_frame_length(MAX_HELLO_BYTES);
        let mut writer = FramedWrite::new(write, codec());
        let answer = tokio::time::timeout(HELLO_TIMEOUT, async {
            writer.get_mut().write_all(PREFACE).await?;
            writer.send(hello(&self.cluster_id)).await?;
            Ok::<_, io::Error>(reader.next().await)
        })
        .await;
        // Bytes that are not a hello mean a node without frames: an older node's HTTP/2 server
        // answers the preface with its settings frame and closes the connection. Nothing at all
        // (a reset, the connection closed, silence) is a failed dial, tried again later.
        let answered = !reader.read_buffer().is_empty();
        let body = match answer {
            Ok(Ok(Some(Ok(bytes)))) => match Frame::decode(bytes.freeze()) {
                Ok(frame) => frame.body,
                Err(_) => return Ok(Dialled::Unsupported),
            },
            Ok(Ok(Some(Err(_)))) if answered => return Ok(Dialled::Unsupported),
            Err(_) if answered => return Ok(Dialled::Unsupported),
            Ok(Ok(Some(Err(error)))) | Ok(Err(error)) => return Err(DialError::Io(error)),
            Ok(Ok(None)) => {
                return Err(DialError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before its hello")))
            }
            Err(_) => return Err(DialError::Io(io::Error::new(io::ErrorKind::TimedOut, "no hello from the peer"))),
        };
        match body {
            Some(Body::Hello(_)) => {}
            Some(Body::Status(status)) => return Err(DialError::Refused(status_of_frame(status))),
            _ => return Ok(Dialled::Unsupported),
        }
        reader.decoder_mut().set_max_frame_length(MAX_MESSAGE_BYTES);
        let conn = Arc::new(FrameConn {
            writer: tokio::sync::Mutex::new(Some(writer)),
            pending: parking_lot::Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            opened: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
            closed: self.dropped.child_token(),
        });
        tokio::spawn(read_replies(conn.clone(), reader));
        Ok(Dialled::Ready(conn))
    }
}

enum DialError {
    Io(io::Error),
    /// The peer answered the hello with a refusal (another cluster).
    Refused(tonic::Status),
}

impl From<io::Error> for DialError {
    fn from(error: io::Error) -> DialError {
        DialError::Io(error)
    }
}

/// One open frame connection.
pub struct FrameConn {
    /// `None` once the connection is closed (the socket is then closed too).
    writer: tokio::sync::Mutex<Option<Writer>>,
    /// The callers waiting for a reply, by request id.
    pending: parking_lot::Mutex<HashMap<u64, oneshot::Sender<Body>>>,
    next_id: AtomicU64,
    opened: Instant,
    /// When a frame last arrived, in ms since `opened`.
    last_heard_ms: AtomicU64,
    closed: CancellationToken,
}

/// Removes a caller's id from the pending map when it stops waiting.
struct Waiting<'a> {
    conn: &'a FrameConn,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.conn.pending.lock().remove(&self.id);
    }
}

impl FrameConn {
    fn close(&self, why: &str) {
        if !self.closed.is_cancelled() {
            tracing::debug!(why, "frame connection closed");
            self.closed.cancel();
        }
        // The callers still waiting see their sender dropped: `unavailable`.
        self.pending.lock().clear();
    }

    fn silent_for(&self) -> Duration {
        self.opened.elapsed().saturating_sub(Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed)))
    }

    /// Sends `body` and returns the peer's answer, or the status the request failed with.
    pub async fn call(&self, body: Body, deadline: Instant) -> Result<Body, tonic::Status> {
        let lost = || tonic::Status::unavailable("the frame connection to the peer closed before it answered");
        let expired = || tonic::Status::deadline_exceeded("no answer within the request's deadline");
        if self.closed.is_cancelled() {
            return Err(lost());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = self.pending.lock();
            if pending.len() >= MAX_IN_FLIGHT {
                // Not sent: a definite refusal, with its code (as the receiver's own).
                return Err(
                    ErrorCode::Overloaded.to_status(format!("{MAX_IN_FLIGHT} requests already in flight to this peer"))
                );
            }
            pending.insert(id, reply);
        }
        let _waiting = Waiting { conn: self, id };
        // Closing cancels before it clears the waiting callers: one that registered after the
        // clear sees the cancellation here.
        if self.closed.is_cancelled() {
            return Err(lost());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let frame = encode(id, (remaining.as_micros() as u64).max(1), body);
        if frame.len() > MAX_MESSAGE_BYTES {
            // Refused before anything was sent: this call fails alone.
            return Err(tonic::Status::resource_exhausted(format!(
                "a frame of {} bytes; at most {MAX_MESSAGE_BYTES}",
                frame.len()
            )));
        }
        let sent = async {
            // A send cut short by the deadline leaves the rest of its bytes in the writer's
            // buffer, which the next send flushes first: frames are never interleaved.
            let mut writer = self.writer.lock().await;
            match writer.as_mut() {
                // Nothing more is sent on a closed connection, even before its socket closes.
                Some(writer) if !self.closed.is_cancelled() => writer.send(frame).await.map_err(Some),
                _ => Err(None),
            }
        };
        match tokio::time::timeout_at(deadline.into(), sent).await {
            Ok(Ok(())) => {}
            Ok(Err(Some(error))) => {
                self.close("write failed");
                return Err(tonic::Status::unavailable(format!("sending to the peer: {error}")));
            }
            Ok(Err(None)) => return Err(lost()),
            Err(_) => return Err(expired()),
        }
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(Body::Status(status))) => Err(status_of_frame(status)),
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(lost()),
            Err(_) => Err(expired()),
        }
    }
}

/// The connection's reader: hands each reply to its caller until the socket fails or the
/// connection is closed. Twice a second it checks what it heard: after [`PING_AFTER`] of
/// silence it pings the peer, after [`SILENT_FOR`] it closes the connection (a healthy peer
/// answers a ping at once; HTTP/2 keep-alive did this for gRPC). Then it closes the socket.
async fn read_replies(conn: Arc<FrameConn>, mut reader: Reader) {
    let mut checks = tokio::time::interval(PING_AFTER / 2);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            _ = conn.closed.cancelled() => break,
            _ = checks.tick() => {
                let silent = conn.silent_for();
                if silent >= SILENT_FOR {
                    conn.close("nothing received from the peer, pings included");
                    break;
                }
                if silent >= PING_AFTER {
                    // Written now, or by the next send if the socket is full (never waited for
                    // here: a writer stuck on a full socket is what the silence will catch).
                    if let Ok(mut writer) = conn.writer.try_lock() {
                        if let Some(writer) = writer.as_mut() {
                            let _ = writer.send(encode(0, 0, Body::Ping(FramePing {}))).now_or_never();
                        }
                    }
                }
                continue;
            }
            next = reader.next() => next,
        };
        let bytes = match next {
            Some(Ok(bytes)) => bytes,
            Some(Err(error)) => {
                tracing::debug!(%error, "frame connection read failed");
                conn.close("read failed");
                break;
            }
            None => {
                conn.close("the peer closed the connection");
                break;
            }
        };
        conn.last_heard_ms.store(conn.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        let Ok(frame) = Frame::decode(bytes.freeze()) else {
            conn.close("a frame that does not decode");
            break;
        };
        let waiter = conn.pending.lock().remove(&frame.id);
        if let (Some(waiter), Some(body)) = (waiter, frame.body) {
            let _ = waiter.send(body);
        }
    }
    conn.close("reader stopped");
    // Closes the socket (the read half goes with this task). A caller still writing holds the
    // lock until its deadline at most.
    conn.writer.lock().await.take();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal's error code survives the frame, as it does an unbatched gRPC call.
    #[test]
    fn statuses_keep_their_code_and_error_code() {
        let refused = ErrorCode::WrongCluster.to_status("another cluster");
        let back = status_of_frame(status_frame(&refused));
        assert_eq!(back.code(), refused.code());
        assert_eq!(back.message(), "another cluster");
        assert_eq!(ErrorCode::of_status(&back), Some(ErrorCode::WrongCluster));
        let transport = tonic::Status::unavailable("reset");
        let back = status_of_frame(status_frame(&transport));
        assert_eq!(back.code(), tonic::Code::Unavailable);
        assert_eq!(ErrorCode::of_status(&back), None, "a transport failure names no error code");
    }

    /// The preface cannot be mistaken for HTTP/2's or a TLS record's first bytes.
    #[test]
    fn the_preface_differs_from_http2_and_tls() {
        assert!(!b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".starts_with(&PREFACE[..1]));
        assert_ne!(PREFACE[0], 0x16);
    }
}
