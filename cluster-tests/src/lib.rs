//! `TestCluster`: real `stemedb` processes on loopback for multi-node tests.
//!
//! Every node gets its own ports and data dir. Each directed link between two nodes runs through
//! a [`LinkProxy`] (the node dials its peers through `cluster.peer_dial_overrides`), so a test can
//! cut any link in either direction, isolate a node or split the cluster, then heal it: the
//! send filters of TiKV's test_raftstore, over real TCP.
//!
//! The nodes run the `stemedb` binary built from the current code (see [`binary`]; `STEMEDB_BIN`
//! names another) on leased ports (see [`ports`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

pub mod binary;
pub mod ports;
pub mod proxy;
pub use binary::stemedb_binary;
pub use ports::{lease_port, PortLease};
pub use proxy::{LinkFault, LinkProxy};

/// A random id for request ids (process-unique enough for tests).
fn rand_id() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    ((hasher.finish() as u128) << 64) | std::process::id() as u128
}

/// One node of a test cluster.
pub struct TestNode {
    pub id: u64,
    /// Joins through this node's cluster admin instead of forming the cluster.
    pub join_via: Option<u64>,
    pub api_port: u16,
    pub admin_port: u16,
    pub raft_port: u16,
    pub data_dir: PathBuf,
    child: Option<Child>,
    /// Stopped with SIGSTOP.
    paused: bool,
    /// The three ports, held for the node's lifetime so that they stay free while it is down.
    _ports: [PortLease; 3],
}

impl TestNode {
    fn new(id: u64, join_via: Option<u64>, data_dir: PathBuf) -> anyhow::Result<TestNode> {
        let ports = [lease_port()?, lease_port()?, lease_port()?];
        Ok(TestNode {
            id,
            join_via,
            api_port: ports[0].port,
            admin_port: ports[1].port,
            raft_port: ports[2].port,
            data_dir,
            child: None,
            paused: false,
            _ports: ports,
        })
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Options of a test cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    pub nodes: u64,
    pub shards: u16,
    /// Extra `STEMEDB_*` environment for every node.
    pub env: Vec<(String, String)>,
    /// The `stemedb` binary; default: [`stemedb_binary`].
    pub binary: Option<PathBuf>,
    /// Where the data dirs and node logs go; default: a temporary directory removed on drop.
    pub data_root: Option<PathBuf>,
    /// Runs for each founding node before it first starts, with its id, data dir and the
    /// cluster's `--initial-cluster` (a restore builds the data dir there).
    pub prepare: Option<PrepareNode>,
}

/// See [`ClusterOptions::prepare`].
pub type PrepareNode = std::sync::Arc<dyn Fn(u64, &Path, &str) -> anyhow::Result<()> + Send + Sync>;

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions { nodes: 3, shards: 4, env: Vec::new(), binary: None, data_root: None, prepare: None }
    }
}

pub struct TestCluster {
    pub nodes: BTreeMap<u64, TestNode>,
    links: HashMap<(u64, u64), LinkProxy>,
    options: ClusterOptions,
    initial_cluster: String,
    pub client: reqwest::Client,
    binary: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TestCluster {
    /// Starts `options.nodes` nodes that form a new cluster and waits until every shard has a
    /// leader. The nodes' ports are leased (see [`ports`]), but a process that takes no leases
    /// may still bind one first: when a node exits with "cannot listen", the cluster is started
    /// again on fresh ports, up to three times.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<TestCluster> {
        let mut attempt = 1;
        loop {
            match Self::start_once(options.clone()).await {
                Err(error) if attempt < 3 && error.to_string().contains("cannot listen") => {
                    eprintln!("test cluster start, attempt {attempt}: {error:#}; retrying on fresh ports");
                    if let Some(root) = &options.data_root {
                        for id in 1..=options.nodes {
                            let _ = std::fs::remove_dir_all(root.join(format!("node{id}")));
                        }
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(options: ClusterOptions) -> anyhow::Result<TestCluster> {
        let binary = match &options.binary {
            Some(binary) => binary.clone(),
            // Off the runtime's threads: the first call may build for minutes.
            None => tokio::task::spawn_blocking(stemedb_binary).await??,
        };
        let dir = match &options.data_root {
            Some(_) => None,
            None => {
                let mut dir = tempfile::tempdir()?;
                // KEEP_TEST_CLUSTER=1 keeps the data dirs and node logs (`nodeN.log`).
                if std::env::var_os("KEEP_TEST_CLUSTER").is_some() {
                    dir.disable_cleanup(true);
                    eprintln!("cluster data dirs and logs kept in {}", dir.path().display());
                }
                Some(dir)
            }
        };
        let root = match (&options.data_root, &dir) {
            (Some(root), _) => root.clone(),
            (None, Some(dir)) => dir.path().to_path_buf(),
            (None, None) => bail!("no data root"),
        };
        std::fs::create_dir_all(&root)?;
        let mut nodes = BTreeMap::new();
        for id in 1..=options.nodes {
            nodes.insert(id, TestNode::new(id, None, root.join(format!("node{id}")))?);
        }
        let mut links = HashMap::new();
        for from in nodes.keys() {
            for (to, node) in &nodes {
                if from != to {
                    links.insert((*from, *to), LinkProxy::start(format!("127.0.0.1:{}", node.raft_port)).await);
                }
            }
        }
        let initial_cluster =
            nodes.values().map(|n| format!("{}=127.0.0.1:{}", n.id, n.raft_port)).collect::<Vec<_>>().join(",");
        let client = reqwest::Client::builder().timeout(Duration::from_secs(15)).build()?;
        let mut cluster = TestCluster { nodes, links, options, initial_cluster, client, binary, _dir: dir };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        if let Some(prepare) = cluster.options.prepare.clone() {
            for id in &ids {
                prepare(*id, &cluster.nodes[id].data_dir, &cluster.initial_cluster)?;
            }
        }
        for id in &ids {
            cluster.spawn(*id)?;
        }
        for id in &ids {
            cluster.wait_api(*id, Duration::from_secs(60)).await?;
        }
        cluster.wait_all_leaders(Duration::from_secs(60)).await?;
        cluster.wait_for_metadata(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let overrides: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.id != id)
            .filter_map(|n| {
                let link = self.links.get(&(id, n.id))?;
                Some(format!("127.0.0.1:{}=127.0.0.1:{}", n.raft_port, link.listen_port))
            })
            .collect();
        let join_admin = self.nodes[&id].join_via.map(|via| format!("127.0.0.1:{}", self.nodes[&via].admin_port));
        let node = self.nodes.get_mut(&id).context("no such node")?;
        std::fs::create_dir_all(&node.data_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(node.data_dir.with_extension("log"))?;
        let mut command = serve_command(&self.binary, node);
        command
            .args(match &join_admin {
                Some(admin) => ["--join", admin.as_str()],
                None => ["--initial-cluster", self.initial_cluster.as_str()],
            })
            .env("STEMEDB_CLUSTER_SHARDS", self.options.shards.to_string())
            .env("STEMEDB_CLUSTER_PEER_DIAL_OVERRIDES", overrides.join(","))
            .env("STEMEDB_STORAGE_MAX_CACHE_SIZE_MB", "16")
            .env("STEMEDB_STORAGE_WRITE_BUFFER_MB", "4")
            .env("STEMEDB_RAFT_WRITE_TIMEOUT_MS", "3000")
            .env("STEMEDB_LOGGING_LEVEL", "info")
            .stdout(log.try_clone()?)
            .stderr(log);
        for (key, value) in &self.options.env {
            command.env(key, value);
        }
        node.child = Some(command.spawn().with_context(|| format!("spawn {}", self.binary.display()))?);
        Ok(())
    }

    /// Starts a new node that joins the running cluster through node `via`; returns its id.
    pub async fn add_joining_node(&mut self, via: u64) -> anyhow::Result<u64> {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        let data_dir = self.nodes[&via].data_dir.with_file_name(format!("node{id}"));
        self.nodes.insert(id, TestNode::new(id, Some(via), data_dir)?);
        self.spawn(id)?;
        self.wait_api(id, Duration::from_secs(60)).await?;
        Ok(id)
    }

    /// Starts `id` again with a different `--initial-cluster` and returns its exit status and
    /// log (for refusal tests). The node must be stopped.
    pub fn run_with_initial_cluster(
        &self,
        id: u64,
        initial_cluster: &str,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let output = serve_command(&self.binary, &self.nodes[&id])
            .args(["--initial-cluster", initial_cluster])
            .env("STEMEDB_CLUSTER_SHARDS", self.options.shards.to_string())
            .output()?;
        Ok((output.status, String::from_utf8_lossy(&output.stderr).to_string()))
    }

    pub fn initial_cluster(&self) -> &str {
        &self.initial_cluster
    }

    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[&id]
    }

    /// The value of one series (its name and labels as exposed, e.g. `name{label="v"}`) in node
    /// `id`'s `/metrics`, if present.
    pub async fn metric(&self, id: u64, series: &str) -> anyhow::Result<Option<f64>> {
        let text = self.client.get(format!("{}/metrics", self.node(id).api())).send().await?.text().await?;
        Ok(text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())))
    }

    /// Waits until the running nodes together report `groups` hibernating shard groups
    /// (`stemedb_shards_hibernating`, which counts the groups a node leads whose heartbeats it
    /// has paused), and returns how long that took. Every shard has one leader, so `groups` equal
    /// to the shard count means that every shard hibernates.
    pub async fn wait_for_hibernation(&self, groups: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let mut hibernating = 0.0;
            for id in self.running() {
                hibernating += self.metric(id, "stemedb_shards_hibernating").await?.unwrap_or(0.0);
            }
            if hibernating == groups as f64 {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("{hibernating} shard groups hibernate, not {groups}, after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.is_running()).map(|n| n.id).collect()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.paused = false;
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Notices nodes whose process exited by itself (a crash): they count as stopped.
    pub fn reap(&mut self) -> Vec<u64> {
        let mut exited = Vec::new();
        for node in self.nodes.values_mut() {
            if let Some(child) = node.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    node.child = None;
                    node.paused = false;
                    exited.push(node.id);
                }
            }
        }
        exited
    }

    /// SIGSTOP: the process freezes with its sockets open (a stalled VM or a long GC pause).
    pub fn pause(&mut self, id: u64) {
        self.signal(id, libc::SIGSTOP, true);
    }

    /// SIGCONT after [`TestCluster::pause`].
    pub fn resume(&mut self, id: u64) {
        self.signal(id, libc::SIGCONT, false);
    }

    fn signal(&mut self, id: u64, signal: libc::c_int, paused: bool) {
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(pid) = node.pid() {
                // SAFETY: sending a signal to our own child process; no memory is involved.
                unsafe {
                    libc::kill(pid as libc::pid_t, signal);
                }
                node.paused = paused;
            }
        }
    }

    /// `DELETE /cluster/members/{id}` through node `via`. A decommission moves every replica
    /// first (leader hand-overs included), so it gets 120 s rather than the client's 15 s.
    pub async fn decommission(&self, via: u64, id: u64) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}/cluster/members/{id}", self.node(via).admin());
        let response = self.client.delete(url).timeout(Duration::from_secs(120)).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Sets the fault of the directed link `from → to` (connections `from` opens to `to`).
    pub fn set_link_fault(&self, from: u64, to: u64, fault: LinkFault) {
        if let Some(link) = self.links.get(&(from, to)) {
            link.set_fault(fault);
        }
    }

    /// The directed links of the cluster.
    pub fn links(&self) -> Vec<(u64, u64)> {
        let mut links: Vec<(u64, u64)> = self.links.keys().copied().collect();
        links.sort();
        links
    }

    /// Kills a node, deletes its data dir and starts it again, empty (it rejoins through `via`).
    pub async fn wipe_and_rejoin(&mut self, id: u64, via: u64) -> anyhow::Result<()> {
        self.kill(id);
        let data_dir = self.nodes[&id].data_dir.clone();
        if data_dir.exists() {
            std::fs::remove_dir_all(&data_dir)?;
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.join_via = Some(via);
        }
        self.spawn(id)?;
        self.wait_api(id, Duration::from_secs(60)).await
    }

    /// Sets (or, with `None`, removes) a `STEMEDB_*` variable for every node started from now on.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.options.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.options.env.push((key.to_string(), value.to_string()));
        }
    }

    /// SIGTERM, then waits (up to `timeout`) for the process to exit: a graceful shutdown.
    /// Returns its exit status.
    pub async fn terminate(&mut self, id: u64, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(id, libc::SIGTERM, false);
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.nodes.get_mut(&id).context("no such node")?;
            let Some(child) = node.child.as_mut() else { bail!("node {id} is not running") };
            if let Some(status) = child.try_wait()? {
                node.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("node {id} did not exit within {timeout:?} of SIGTERM: {}", self.log_tail(id, 5));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until node `via` reports the cluster `healthy` (every member up, every shard with a
    /// leader) on `/cluster/health`.
    pub async fn wait_healthy(&self, via: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.admin_get(via, "/cluster/health").await;
            if let Ok((200, body)) = &seen {
                if body["status"] == "healthy" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("node {via} does not report the cluster healthy: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Damages node `id`'s replica of `shard` behind its back, the way bit rot and a lost
    /// record would: stops the node (SIGTERM), changes one assertion record's bytes and deletes
    /// another through StemeDB's own storage layer, and starts it again. Returns what it did.
    /// Nothing in a release build's API can do this: the test harness is the hook.
    pub async fn damage_records(&mut self, id: u64, shard: u16, pick: u64) -> anyhow::Result<String> {
        use stemedb::storage::{ColumnFamily, Durability, Storage, StorageOptions, WriteBatch};
        self.terminate(id, Duration::from_secs(30)).await?;
        let data_dir = self.node(id).data_dir.clone();
        let detail = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let storage = Storage::open(&data_dir, StorageOptions::default())?;
            let group = stemedb::shard::command::group_of_shard(shard);
            let prefix = stemedb::shard::keys::assertions_prefix(group);
            let end = stemedb::shard::keys::prefix_end(&prefix);
            let records = storage.scan(ColumnFamily::StateMachine, &prefix, &end, usize::MAX)?;
            let detail = if records.len() < 2 {
                format!("shard {shard} holds {} assertion(s) on node {id}: nothing damaged", records.len())
            } else {
                let changed = &records[pick as usize % records.len()];
                let deleted = &records[(pick as usize + 1 + records.len() / 2) % records.len()];
                let mut rotten = changed.1.clone();
                if let Some(last) = rotten.last_mut() {
                    *last ^= 0x5a;
                }
                let mut batch = WriteBatch::new();
                batch.put(ColumnFamily::StateMachine, changed.0.clone(), rotten);
                if deleted.0 != changed.0 {
                    batch.delete(ColumnFamily::StateMachine, deleted.0.clone());
                }
                storage.write(batch, Durability::Synced)?;
                format!(
                    "changed one and deleted one of {} assertion records of shard {shard} on node {id}",
                    records.len()
                )
            };
            storage.close()?;
            Ok(detail)
        })
        .await??;
        self.restart(id).await?;
        Ok(detail)
    }

    /// Bit rot in node `id`'s table files: stops it (SIGTERM), flips `ranges` 16-byte ranges
    /// spread over every table file and zeroes a 4 KiB run in the largest
    /// ([`rot_table_files`]), and starts it again. Returns what it did.
    pub async fn rot_tables(&mut self, id: u64, ranges: usize) -> anyhow::Result<String> {
        self.terminate(id, Duration::from_secs(30)).await?;
        let data_dir = self.node(id).data_dir.clone();
        let (files, bytes) = tokio::task::spawn_blocking(move || rot_table_files(&data_dir, ranges)).await??;
        self.restart(id).await?;
        Ok(format!("rotted {files} table files of node {id} ({bytes} bytes changed)"))
    }

    /// Restarts a stopped or killed node with its data dir.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.kill(id);
        self.spawn(id)?;
        self.wait_api(id, Duration::from_secs(60)).await
    }

    /// Cuts both directions of every link between `a` and `b`.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for x in a {
            for y in b {
                for key in [(*x, *y), (*y, *x)] {
                    if let Some(link) = self.links.get(&key) {
                        link.block();
                    }
                }
            }
        }
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&self, id: u64) {
        let others: Vec<u64> = self.nodes.keys().copied().filter(|n| *n != id).collect();
        self.partition(&[id], &others);
    }

    pub fn heal(&self) {
        for link in self.links.values() {
            link.unblock();
        }
    }

    /// Waits until the meta group has recorded the cluster's bootstrap (as node 1 sees it).
    pub async fn wait_for_metadata(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let first = self.nodes.keys().next().copied().context("no nodes")?;
        loop {
            if let Ok((200, meta)) = self.admin_get(first, "/cluster/meta").await {
                if meta["nodes"].as_object().is_some_and(|nodes| !nodes.is_empty()) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster metadata was not bootstrapped");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_api(&mut self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/v1/health", self.node(id).api());
        loop {
            if self.client.get(&url).send().await.is_ok() {
                return Ok(());
            }
            let exited = match self.nodes.get_mut(&id).and_then(|n| n.child.as_mut()) {
                Some(child) => child.try_wait()?.map(|status| status.to_string()),
                None => Some("not running".into()),
            };
            if let Some(status) = exited {
                bail!("node {id} exited before listening ({status}): {}", self.log_tail(id, 5));
            }
            if Instant::now() > deadline {
                bail!("node {id} did not start listening: {}", self.log_tail(id, 5));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of a node's log, for error messages.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let path = self.node(id).data_dir.with_extension("log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }

    /// The leader of `shard` as node `via` sees it.
    pub async fn leader_seen_by(&self, via: u64, shard: u16) -> Option<u64> {
        self.shard_view(via, shard).await.and_then(|(_, leader)| leader)
    }

    /// Whether node `via` hosts `shard`, and the leader it sees.
    pub async fn shard_view(&self, via: u64, shard: u16) -> Option<(bool, Option<u64>)> {
        let url = format!("{}/cluster/shards/{shard}", self.node(via).admin());
        let response = self.client.get(url).timeout(Duration::from_secs(2)).send().await.ok()?;
        let body: Value = response.json().await.ok()?;
        Some((body["hosted"].as_bool().unwrap_or(true), body["leader"].as_u64()))
    }

    /// Hands the leadership of `shard` to `target` (`POST /admin/shards/{id}/transfer-leader`
    /// through the target's admin port), up to three attempts: a follower's election timer may
    /// win the race. Then waits until every running node agrees that `target` leads.
    pub async fn transfer_leader(&self, shard: u16, target: u64) -> anyhow::Result<()> {
        let url = format!("{}/admin/shards/{shard}/transfer-leader", self.node(target).admin());
        let mut answers = Vec::new();
        for _ in 0..3 {
            let response = self.client.post(&url).json(&json!({"target_node": target})).send().await?;
            if response.status().as_u16() == 200 {
                let leader = self.wait_for_leader(shard, Duration::from_secs(10)).await?;
                anyhow::ensure!(leader == target, "shard {shard} moved to node {leader}, not {target}");
                return Ok(());
            }
            answers.push(response.status().as_u16());
        }
        bail!("transfer of shard {shard} to node {target} never succeeded: {answers:?}")
    }

    /// Waits until the running nodes that host `shard` agree on a leader that is itself running.
    pub async fn wait_for_leader(&self, shard: u16, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running();
            let mut seen = Vec::new();
            for id in &running {
                match self.shard_view(*id, shard).await {
                    Some((false, _)) => {}
                    Some((true, leader)) => seen.push(leader),
                    None => seen.push(None),
                }
            }
            if let Some(Some(leader)) = seen.first() {
                if seen.iter().all(|s| *s == Some(*leader)) && running.contains(leader) {
                    return Ok(*leader);
                }
            }
            if Instant::now() > deadline {
                bail!("shard {shard} has no agreed leader: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_all_leaders(&self, timeout: Duration) -> anyhow::Result<()> {
        for shard in 0..self.options.shards {
            self.wait_for_leader(shard, timeout).await?;
        }
        Ok(())
    }

    pub async fn post(&self, via: u64, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self.client.post(format!("{}{path}", self.node(via).api())).json(body).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    pub async fn get(&self, via: u64, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self.client.get(format!("{}{path}", self.node(via).api())).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    pub async fn admin_get(&self, via: u64, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self.client.get(format!("{}{path}", self.node(via).admin())).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Writes one assertion through node `via`, as a client should: with a request id, retrying
    /// on 503/504 (no leader yet, leader just died) for up to 20 s. Returns its id on 201.
    pub async fn assert_value(&self, via: u64, concept_path: &str, value: Value) -> anyhow::Result<String> {
        let request_id = format!("{:032x}", rand_id());
        let body = json!({"concept_path": concept_path, "predicate": "p", "value": value, "agent_id": "test", "request_id": request_id});
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, response) = self.post(via, "/v1/assert", &body).await?;
            match status {
                201 => return Ok(response["id"].as_str().context("id")?.to_string()),
                503 | 504 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                _ => bail!("assert via node {via}: {status} {response}"),
            }
        }
    }

    /// Writes once, without retrying: for tests about what a single attempt does.
    pub async fn assert_once(&self, via: u64, concept_path: &str, value: Value) -> anyhow::Result<(u16, Value)> {
        let body = json!({"concept_path": concept_path, "predicate": "p", "value": value, "agent_id": "test"});
        self.post(via, "/v1/assert", &body).await
    }

    /// The recency winner's value of `concept_path` read through node `via`.
    pub async fn read_value(&self, via: u64, concept_path: &str, consistency: &str) -> anyhow::Result<(u16, Value)> {
        let (status, body) =
            self.post(via, "/v1/query", &json!({"concept_path": concept_path, "consistency": consistency})).await?;
        Ok((status, if status == 200 { body["results"][0]["winner"]["value"].clone() } else { body }))
    }

    /// The shard of a concept path, as the cluster computes it.
    pub fn shard_of(&self, concept_path: &str) -> u16 {
        stemedb::model::id::shard_for_path(concept_path, self.options.shards)
    }
}

/// `stemedb serve` with a node's id, data dir and addresses.
fn serve_command(binary: &Path, node: &TestNode) -> Command {
    let mut command = Command::new(binary);
    command
        // The harness's own variable, not a node setting (nodes refuse unknown STEMEDB_*).
        .env_remove("STEMEDB_BIN")
        .arg("serve")
        .args(["--node-id", &node.id.to_string()])
        .arg("--data-dir")
        .arg(&node.data_dir)
        .args(["--api-addr", &format!("127.0.0.1:{}", node.api_port)])
        .args(["--admin-addr", &format!("127.0.0.1:{}", node.admin_port)])
        .args(["--raft-addr", &format!("127.0.0.1:{}", node.raft_port)]);
    command
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// Flips `ranges` 16-byte ranges spread over every table file of a stopped node, and zeroes a
/// 4 KiB run of blocks in the largest one. Returns (files, bytes changed).
pub fn rot_table_files(data_dir: &std::path::Path, ranges: usize) -> anyhow::Result<(usize, usize)> {
    let db = data_dir.join("db");
    let mut tables: Vec<(std::path::PathBuf, u64)> = std::fs::read_dir(&db)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "sst"))
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect();
    anyhow::ensure!(!tables.is_empty(), "no table file in {}", db.display());
    tables.sort_by_key(|(_, len)| std::cmp::Reverse(*len));
    let mut changed = 0;
    for i in 0..ranges {
        let (path, _) = &tables[i % tables.len()];
        let mut bytes = std::fs::read(path)?;
        // Inside the data blocks: the first 80% of the file, a different place each round.
        let span = (bytes.len() * 4 / 5).saturating_sub(16).max(1);
        let at = (span / (ranges + 1)) * (i + 1) % span;
        let end = (at + 16).min(bytes.len());
        for b in &mut bytes[at..end] {
            *b ^= 0xa5;
            changed += 1;
        }
        std::fs::write(path, bytes)?;
    }
    let (largest, len) = &tables[0];
    let mut bytes = std::fs::read(largest)?;
    let at = (*len as usize / 3).min(bytes.len().saturating_sub(4096));
    let end = (at + 4096).min(bytes.len());
    bytes[at..end].fill(0);
    changed += end - at;
    std::fs::write(largest, bytes)?;
    Ok((tables.len(), changed))
}
