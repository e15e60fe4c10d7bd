//! The bound on gRPC requests running at once on port 18182, whatever connection they came on.
//! The frame connections have their own bounds (`frames`); without this one, a peer (or anything
//! that can reach the port) could keep any number of gRPC requests running, each holding its
//! message in memory. A request past the bound is answered at once with `overloaded`
//! (`Unavailable`, retryable, the code in the status's metadata), before its service sees it,
//! and counted in `stemedb_requests_shed_total{limit="transport"}`. A request holds its place
//! until its handler returns (every transport RPC is unary).
//!
//! The bound covers the requests that clients' load drives: forwarded writes, read indexes,
//! shard reads, anti-entropy and backup copies. Raft's own messages (votes, AppendEntries,
//! snapshots, node heartbeats, campaigns and membership changes of a group) are not counted:
//! they are bounded by the groups and peers, and refusing them under load would start elections
//! and make the overload worse.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::codegen::http;

use crate::error::ErrorCode;

/// gRPC requests that may run at once on the transport port: as many as one frame connection
/// may have running.
pub const MAX_RUNNING: usize = crate::raft::frames::MAX_IN_FLIGHT;

/// A tower layer that refuses requests past `limit` running at once.
#[derive(Clone)]
pub struct RunningLimit {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl RunningLimit {
    pub fn new(limit: usize) -> RunningLimit {
        RunningLimit { permits: Arc::new(Semaphore::new(limit)), limit }
    }
}

impl<S> tower::Layer<S> for RunningLimit {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited { inner, permits: self.permits.clone(), limit: self.limit }
    }
}

/// A service behind [`RunningLimit`].
#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl<S, Req, ResBody> tower::Service<http::Request<Req>> for Limited<S>
where
    S: tower::Service<http::Request<Req>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Req>) -> Self::Future {
        if consensus(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let call = self.inner.call(request);
                Box::pin(async move {
                    let response = call.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                crate::metrics::REQUESTS_SHED.with_label_values(&["transport"]).inc();
                let status = ErrorCode::Overloaded
                    .to_status(format!("{} transport requests already running on this node", self.limit));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Whether `path` is one of Raft's own RPCs, which the bound does not count.
fn consensus(path: &str) -> bool {
    const RAFT: &str = "/stemedb.raft.v1.RaftTransport/";
    path.strip_prefix(RAFT).is_some_and(|method| {
        matches!(
            method,
            "AppendEntries"
                | "AppendEntriesBatch"
                | "Vote"
                | "InstallSnapshot"
                | "AdminGroup"
                | "Campaign"
                | "NodeHeartbeat"
        )
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// Past the limit, a request is answered `overloaded` at once, with the code in its
    /// metadata; once a running request finishes, its place serves the next one.
    #[tokio::test]
    async fn requests_past_the_limit_are_refused_overloaded_and_places_come_back() {
        // Each call waits for a permit of `release`, then answers "served".
        let release = Arc::new(Semaphore::new(0));
        let held = tower::service_fn({
            let release = release.clone();
            move |_request: http::Request<()>| {
                let release = release.clone();
                async move {
                    release.acquire().await.expect("open").forget();
                    Ok::<_, Infallible>(http::Response::new("served".to_string()))
                }
            }
        });
        let mut service = RunningLimit::new(2).layer(held);
        let shed = crate::metrics::REQUESTS_SHED.with_label_values(&["transport"]);
        let shed_before = shed.get();
        // A call takes its place when made (`Service::call`), before its future runs.
        macro_rules! call {
            () => {
                service.ready().await.expect("ready").call(http::Request::new(()))
            };
        }
        let first = tokio::spawn(call!());
        let second = tokio::spawn(call!());
        let refused =
            tokio::time::timeout(Duration::from_secs(5), call!()).await.expect("refused at once").expect("answered");
        let status = tonic::Status::from_header_map(refused.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(ErrorCode::of_status(&status), Some(ErrorCode::Overloaded));
        assert_eq!(shed.get(), shed_before + 1, "the refusal is counted");
        // One running request finishes: its place serves a new request.
        release.add_permits(1);
        let done = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                done = first => done,
                done = second => done,
            }
        })
        .await
        .expect("a request finished")
        .expect("joined")
        .expect("answered");
        assert_eq!(done.body(), "served");
        let next = tokio::spawn(call!());
        // Raft's own messages are not counted: one goes through while both places are taken.
        let vote = http::Request::builder().uri("/stemedb.raft.v1.RaftTransport/Vote").body(()).expect("request");
        let vote = tokio::spawn(service.ready().await.expect("ready").call(vote));
        release.add_permits(3);
        let next = tokio::time::timeout(Duration::from_secs(5), next).await.expect("served").expect("joined");
        assert_eq!(next.expect("answered").body(), "served", "the freed place served the next request");
        let vote = tokio::time::timeout(Duration::from_secs(5), vote).await.expect("served").expect("joined");
        assert_eq!(vote.expect("answered").body(), "served", "a vote is never refused");
        assert_eq!(shed.get(), shed_before + 1, "nothing else was refused");
    }
}
