//! Test helpers: an in-process node on an ephemeral port, a real `stemedb` process, and small
//! HTTP client helpers.

#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stemedb::config::Config;
use tokio::sync::oneshot;

pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.node.data_dir = data_dir.to_path_buf();
    config.server.api_addr = "127.0.0.1:0".into();
    config.server.admin_addr = "127.0.0.1:0".into();
    config.server.raft_addr = "127.0.0.1:0".into();
    config.cluster.shards = 4;
    config.storage.max_cache_size_mb = 16;
    config.storage.write_buffer_mb = 4;
    config
}

/// A node running inside the test process.
pub struct TestNode {
    pub url: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), stemedb::NodeError>>>,
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestNode {
        // STEMEDB_TEST_LOG=debug shows the node's logs in failing tests.
        if let Ok(filter) = std::env::var("STEMEDB_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let listeners = stemedb::Listeners::bind(&config).await.expect("bind");
        let url = format!("http://{}", listeners.api.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(stemedb::run(config, listeners, async move {
            let _ = rx.await;
        }));
        let client = reqwest::Client::new();
        wait_healthy(&client, &url, Duration::from_secs(30)).await;
        TestNode { url, client, dir, shutdown: Some(tx), handle: Some(handle) }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("join").expect("node stopped cleanly");
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post_json(&self.client, &format!("{}{path}", self.url), body).await
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let response =
            self.client.post(format!("{}{path}", self.url)).body(body.to_string()).send().await.expect("send");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        get_json(&self.client, &format!("{}{path}", self.url)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self.client.delete(format!("{}{path}", self.url)).send().await.expect("send");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// The value of one series (its name and labels as exposed, e.g. `name{label="v"}`) in a
/// Prometheus text exposition, if present.
pub fn series_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

/// A node's `/metrics` text.
pub async fn metrics_text(client: &reqwest::Client, url: &str) -> String {
    client.get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("text")
}

pub async fn post_json(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn wait_healthy(client: &reqwest::Client, url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = client.get(format!("{url}/health")).send().await {
            if response.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "node at {url} did not become healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A real `stemedb serve` process.
pub struct ProcessNode {
    pub url: String,
    pub data_dir: PathBuf,
    child: Child,
}

impl ProcessNode {
    pub fn spawn(data_dir: &Path, node_id: u64) -> (Child, String) {
        Self::spawn_with_env(data_dir, node_id, &[])
    }

    /// Like [`ProcessNode::spawn`], with extra environment variables for the process.
    pub fn spawn_with_env(data_dir: &Path, node_id: u64, env: &[(&str, &str)]) -> (Child, String) {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_stemedb"))
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args(["--node-id", &node_id.to_string(), "--api-addr", &format!("127.0.0.1:{port}")])
            .args(["--raft-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
            .env("STEMEDB_CLUSTER_SHARDS", "4")
            .env("STEMEDB_STORAGE_MAX_CACHE_SIZE_MB", "16")
            .env("STEMEDB_LOGGING_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stemedb");
        (child, url)
    }

    pub async fn start(data_dir: &Path) -> ProcessNode {
        Self::start_with_env(data_dir, &[]).await
    }

    pub async fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> ProcessNode {
        let (child, url) = Self::spawn_with_env(data_dir, 1, env);
        wait_healthy(&reqwest::Client::new(), &url, Duration::from_secs(60)).await;
        ProcessNode { url, data_dir: data_dir.to_path_buf(), child }
    }

    /// SIGTERM, then waits for the process to exit (graceful shutdown).
    pub fn stop(mut self) {
        // SAFETY: kill(2) with a child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill");
        let _ = self.child.wait();
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
