//! The node's lifecycle in-process: a shutdown releases every port and the database, and a
//! start-up that fails at a late step stops what the earlier steps started before `run`
//! returns its error (no server, task or open database is left behind in the process).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use stemedb::config::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Listeners on port 0 for a node in `dir`, the config (after `adjust`, which sees the
/// addresses: api, admin, raft) and the addresses.
async fn bind(
    dir: &Path,
    adjust: impl FnOnce(&mut Config, &[SocketAddr; 3]),
) -> (Config, stemedb::Listeners, [SocketAddr; 3]) {
    // STEMEDB_TEST_LOG=info shows the node's logs (the shutdown steps) in the test output.
    if let Ok(filter) = std::env::var("STEMEDB_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let mut config = common::test_config(dir);
    let listeners = stemedb::Listeners::bind(&config).await.expect("bind");
    let addrs = [
        listeners.api.local_addr().expect("api addr"),
        listeners.admin.local_addr().expect("admin addr"),
        listeners.raft.local_addr().expect("raft addr"),
    ];
    adjust(&mut config, &addrs);
    (config, listeners, addrs)
}

/// A node running `stemedb::run` in this process until told to stop.
struct InProcess {
    addrs: [SocketAddr; 3],
    stop: oneshot::Sender<()>,
    node: tokio::task::JoinHandle<Result<(), stemedb::NodeError>>,
}

impl InProcess {
    async fn start(dir: &Path, adjust: impl FnOnce(&mut Config, &[SocketAddr; 3])) -> InProcess {
        let (config, listeners, addrs) = bind(dir, adjust).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let config = config.validate().expect("a valid test config");
        let node = tokio::spawn(stemedb::run(config, listeners, async move {
            let _ = stopped.await;
        }));
        InProcess { addrs, stop, node }
    }

    /// Shuts the node down; `run` must return `Ok` within a bound and release everything.
    async fn stop_and_check(self, dir: &Path) {
        let started = Instant::now();
        let _ = self.stop.send(());
        let result =
            tokio::time::timeout(Duration::from_secs(30), self.node).await.expect("run returned").expect("join");
        assert!(result.is_ok(), "clean shutdown: {result:?}");
        eprintln!("shutdown took {} ms", started.elapsed().as_millis());
        assert_released(&self.addrs, dir).await;
    }
}

/// Every address can be listened on again (nothing in the process still listens there) and the
/// data dir's database can be opened (RocksDB was closed, releasing its lock).
async fn assert_released(addrs: &[SocketAddr], data_dir: &Path) {
    for addr in addrs {
        let rebound = TcpListener::bind(addr).await;
        assert!(rebound.is_ok(), "{addr} is still in use after run returned: {rebound:?}");
    }
    let reopened = stemedb::storage::Storage::open(data_dir, stemedb::storage::StorageOptions::default());
    assert!(reopened.is_ok(), "the database is still open after run returned: {reopened:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_ports_and_the_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = InProcess::start(dir.path(), |_, _| {}).await;
    let url = format!("http://{}", node.addrs[0]);
    let client = reqwest::Client::new();
    common::wait_healthy(&client, &url, Duration::from_secs(30)).await;
    let body = json!({"concept_path": "life/cycle", "predicate": "p", "value": 1, "request_id": "r1"});
    let (status, answer) = common::post_json(&client, &format!("{url}/v1/assert"), &body).await;
    assert_eq!(status, 201, "{answer}");
    node.stop_and_check(dir.path()).await;

    // What was acknowledged is there after a restart on the same data dir.
    let node = common::TestNode::start_with(|c| c.node.data_dir = dir.path().to_path_buf()).await;
    let (status, answer) = node.post("/v1/query", &json!({"concept_path": "life/cycle"})).await;
    assert_eq!((status, &answer["results"][0]["winner"]["value"]), (200, &json!(1)), "{answer}");
    node.stop().await;
}

/// Start-up fails at its last step (the client API cannot listen: another socket took its
/// port between the bind and the listen), after the storage, the Raft groups, the background
/// tasks, the gRPC server and the cluster admin server had started: `run` must stop them all
/// before it returns the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_up_that_fails_late_stops_what_it_had_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, listeners, addrs) = bind(dir.path(), |_, _| {}).await;
    // The API socket is bound but not listening yet; a listener on the same port makes the
    // node's own listen fail (EADDRINUSE) when it gets there.
    let squatter = TcpListener::bind(addrs[0]).await.expect("squat on the api port");
    let started = Instant::now();
    let config = config.validate().expect("a valid test config");
    let result = tokio::time::timeout(Duration::from_secs(60), stemedb::run(config, listeners, std::future::pending()))
        .await
        .expect("run returned instead of serving");
    let error = result.expect_err("start-up must fail");
    assert!(error.to_string().contains("cannot listen"), "{error}");
    eprintln!("start-up failed after {} ms: {error}", started.elapsed().as_millis());
    drop(squatter);
    assert_released(&addrs, dir.path()).await;
}

/// A node whose groups cannot elect a leader (its two peers never come) shuts down at once when
/// told to, here while its start-up still waits for leaders: nothing waits for a quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_quorum_shuts_down_promptly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The two peers' addresses: bound, never listening (connections are refused), and held for
    // the whole test so nothing else can take them.
    let peer = || {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        socket
    };
    let peers = [peer(), peer()];
    let peer_addrs: Vec<SocketAddr> = peers.iter().map(|p| p.local_addr().expect("addr")).collect();
    let node = InProcess::start(dir.path(), |config, addrs| {
        config.cluster.initial_cluster = format!("1={},2={},3={}", addrs[2], peer_addrs[0], peer_addrs[1]);
    })
    .await;
    // Up once the cluster admin answers (the client API waits up to 5 s for leaders first).
    let client = reqwest::Client::new();
    let health = format!("http://{}/cluster/health", node.addrs[1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(&health).send().await.is_err() {
        assert!(Instant::now() < deadline, "the cluster admin never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop_and_check(dir.path()).await;
}
