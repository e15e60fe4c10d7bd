//! Test helpers: an in-process node on an ephemeral port, a real `stemedb` process, and small
//! HTTP client helpers.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
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
    // Tests that want the dashboard give it an address (port 0).
    config.server.dashboard_addr = "off".into();
    config.cluster.shards = 4;
    config.storage.max_cache_size_mb = 16;
    config.storage.write_buffer_mb = 4;
    config
}

/// A node running inside the test process.
pub struct TestNode {
    pub url: String,
    /// The cluster admin API (18181).
    pub admin_url: String,
    /// The web dashboard (18188), when the test's config enables it.
    pub dashboard_url: Option<String>,
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
        let config = config.validate().expect("a valid test config");
        let listeners = stemedb::Listeners::bind(&config).await.expect("bind");
        let url = format!("http://{}", listeners.api.local_addr().expect("addr"));
        let admin_url = format!("http://{}", listeners.admin.local_addr().expect("addr"));
        let dashboard_url = listeners.dashboard.as_ref().map(|l| format!("http://{}", l.local_addr().expect("addr")));
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(stemedb::run(config, listeners, async move {
            let _ = rx.await;
        }));
        let client = reqwest::Client::new();
        wait_healthy(&client, &url, Duration::from_secs(30)).await;
        TestNode { url, admin_url, dashboard_url, client, dir, shutdown: Some(tx), handle: Some(handle) }
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
    if let Err(why) = wait_healthy_while(client, url, timeout, || Ok(())).await {
        panic!("node at {url} {why}");
    }
}

/// Waits until `url` answers its health check. `alive` says why waiting is pointless (a node
/// process that exited).
async fn wait_healthy_while(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        // Each probe has its own timeout: a node that accepted the connection but is stuck
        // would otherwise hold the probe, and the test, forever.
        let probe = client.get(format!("{url}/health")).timeout(Duration::from_secs(2)).send().await;
        if probe.is_ok_and(|response| response.status().is_success()) {
            return Ok(());
        }
        alive().map_err(|why| format!("stopped before it became healthy: {why}"))?;
        if Instant::now() > deadline {
            return Err(format!("did not become healthy within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How much of a node process's output is kept for failure messages.
const OUTPUT_TAIL_BYTES: usize = 64 << 10;

/// The output (stdout and stderr) of a node process. Each pipe is drained by its own thread, so
/// the node never blocks on a full pipe (64 KiB that nobody reads stall the writer, and a node
/// stalled in a log call stops answering); the last [`OUTPUT_TAIL_BYTES`] are kept, by line.
#[derive(Clone, Default)]
pub struct OutputTail {
    state: Arc<Mutex<TailState>>,
}

#[derive(Default)]
struct TailState {
    lines: VecDeque<String>,
    bytes: usize,
    /// Pipes not yet at end of file.
    open: usize,
}

impl OutputTail {
    fn drain(&self, pipe: impl Read + Send + 'static) {
        self.lock().open += 1;
        let tail = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                tail.push(String::from_utf8_lossy(&line).into_owned());
            }
            tail.lock().open -= 1;
        });
    }

    /// A panicking reader thread cannot leave the tail unreadable: the lines are still valid.
    fn lock(&self) -> std::sync::MutexGuard<'_, TailState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, line: String) {
        let mut state = self.lock();
        state.bytes += line.len() + 1;
        state.lines.push_back(line);
        while state.bytes > OUTPUT_TAIL_BYTES {
            let Some(dropped) = state.lines.pop_front() else { break };
            state.bytes -= dropped.len() + 1;
        }
    }

    /// The first kept line for which `find` gives a value.
    fn find<T>(&self, find: impl FnMut(&String) -> Option<T>) -> Option<T> {
        self.lock().lines.iter().find_map(find)
    }

    fn all_read(&self) -> bool {
        self.lock().open == 0
    }

    /// The kept output, one line per line.
    pub fn text(&self) -> String {
        let state = self.lock();
        state.lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// The URL a start line gives for `what` (`cluster admin`, `dashboard`).
pub fn start_line_url(output: &str, what: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let (_, rest) = line.split_once(" starting: ")?;
        let (_, after) = rest.split_once(&format!("{what} "))?;
        let url = after.split([',', ' ']).next()?.trim_end_matches('/');
        (url.starts_with("http://") || url.starts_with("https://")).then(|| url.to_string())
    })
}

/// The client API URL in the line `stemedb serve` prints once its listeners are bound
/// (`stemedb node 1 starting: client API http://127.0.0.1:PORT, cluster admin ...`).
fn client_api_url(line: &str) -> Option<String> {
    let (_, rest) = line.split_once(" starting: client API ")?;
    let url = rest.split(',').next()?.trim();
    (url.starts_with("http://") || url.starts_with("https://")).then(|| url.to_string())
}

/// A `stemedb serve` process, started but not necessarily listening (or still running).
///
/// It binds port 0 for every listener and the test reads back the ports it got from its output:
/// a port picked free by the test and released for the node to bind could be taken in between
/// (by another test's node, or as the local port of any outgoing connection).
pub struct NodeProcess {
    child: Child,
    output: OutputTail,
}

impl NodeProcess {
    pub fn spawn(data_dir: &Path, node_id: u64, env: &[(&str, &str)]) -> NodeProcess {
        Self::spawn_with_args(data_dir, node_id, &[], env)
    }

    /// [`NodeProcess::spawn`] with more `serve` arguments (`--config FILE`, say).
    pub fn spawn_with_args(data_dir: &Path, node_id: u64, args: &[&str], env: &[(&str, &str)]) -> NodeProcess {
        // Every listener on an ephemeral loopback port, unless `args` names its address.
        let addresses = ["--api-addr", "--raft-addr", "--admin-addr", "--dashboard-addr"]
            .into_iter()
            .filter(|flag| !args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}="))))
            .flat_map(|flag| [flag, "127.0.0.1:0"]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_stemedb"))
            .arg("serve")
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--node-id", &node_id.to_string()])
            .args(addresses)
            .env("STEMEDB_CLUSTER_SHARDS", "4")
            .env("STEMEDB_STORAGE_MAX_CACHE_SIZE_MB", "16")
            .env("STEMEDB_LOGGING_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stemedb");
        let output = OutputTail::default();
        output.drain(child.stdout.take().expect("piped stdout"));
        output.drain(child.stderr.take().expect("piped stderr"));
        NodeProcess { child, output }
    }

    /// The end of the process's output so far.
    pub fn output(&self) -> String {
        self.output.text()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGHUP (reload the config) and waits until the output holds `says`, up to 10 s.
    pub async fn reload_until(&self, says: &str) {
        // SAFETY: kill(2) with a child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output().contains(says) {
            assert!(Instant::now() < deadline, "no {says:?} after SIGHUP; output:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `Err` with the exit status once the process has exited.
    fn running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("exited ({status})")),
            Err(error) => Err(format!("cannot wait for it: {error}")),
        }
    }

    /// Waits until the node prints the address of its client API and returns its URL.
    pub async fn wait_listening(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(url) = self.output.find(|line| client_api_url(line)) {
                return url;
            }
            if let Err(why) = self.running() {
                panic!("stemedb stopped before listening: {why}; output:\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "stemedb did not listen within {timeout:?}; output:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the process exits by itself and its output is read to the end; `None` if it
    /// is still running at the deadline (it is then killed on drop).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for stemedb") {
                // The pipes close when the process exits; the readers get there just after.
                if self.output.all_read() || Instant::now() >= deadline {
                    return Some((status, self.output()));
                }
            } else if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `stemedb serve` process, listening and healthy.
pub struct ProcessNode {
    pub url: String,
    pub data_dir: PathBuf,
    process: NodeProcess,
}

impl ProcessNode {
    /// Starts node `node_id` on `data_dir` without waiting for it (for tests of what it refuses).
    pub fn spawn(data_dir: &Path, node_id: u64) -> NodeProcess {
        NodeProcess::spawn(data_dir, node_id, &[])
    }

    pub async fn start(data_dir: &Path) -> ProcessNode {
        Self::start_with_env(data_dir, &[]).await
    }

    pub async fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> ProcessNode {
        let mut process = NodeProcess::spawn(data_dir, 1, env);
        let url = process.wait_listening(Duration::from_secs(60)).await;
        let healthy =
            wait_healthy_while(&reqwest::Client::new(), &url, Duration::from_secs(60), || process.running()).await;
        if let Err(why) = healthy {
            panic!("node at {url} {why}; output:\n{}", process.output());
        }
        ProcessNode { url, data_dir: data_dir.to_path_buf(), process }
    }

    /// The end of the node's output so far, for failure messages.
    pub fn output(&self) -> String {
        self.process.output()
    }

    /// SIGTERM, then waits for the process to exit (graceful shutdown).
    pub fn stop(mut self) {
        // SAFETY: kill(2) with a child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.process.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.process.child.wait();
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.process.child.kill().expect("kill");
        let _ = self.process.child.wait();
    }
}
