//! Running a node: open storage, check the data dir's identity, open the shard groups, serve the
//! client API, and shut down in order when told to (or when start-up fails half-way): see
//! [`Node::stop`] and docs/architecture.md (Shutdown).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::api::{self, NodeContext};
use crate::cluster::identity::{
    cluster_id_of, ensure_identity, identity_recorded, is_recovering, set_recovering, IdentityError,
};
use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::error::ErrorCode;
use crate::listener::{ClosableListener, ListenerCloser};
use crate::metrics::{ComputedGauges, Metrics};
use crate::raft::network::PeerChannels;
use crate::raft::{RaftSettings, ShardSet};
use crate::rpc::RaftService;
use crate::shard::ConsensusError;
use crate::storage::{Storage, StorageError, StorageOptions};
use crate::tasks::NodeTasks;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("server failed: {0}")]
    Serve(String),
    #[error("cannot join the cluster through {addr}: {message}")]
    Join { addr: String, message: String },
    #[error("stopped after a fatal raft error: {0}")]
    Fatal(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl NodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            NodeError::Storage(e) => e.code(),
            NodeError::Identity(e) => e.code(),
            NodeError::Consensus(e) => e.code(),
            NodeError::Listen { .. } => ErrorCode::ListenFailed,
            NodeError::Serve(_) => ErrorCode::ServeFailed,
            NodeError::Join { .. } => ErrorCode::JoinFailed,
            NodeError::Fatal(_) => ErrorCode::RaftFatal,
            NodeError::Tls(e) => e.code(),
        }
    }
}

/// Streams a peer may reset before this node accepts them, per connection (see the gRPC server).
const PEER_MAX_PENDING_RESETS: usize = 4096;

/// The sockets a node serves on; tests bind port 0 and pass them in. The client API's socket is
/// bound but not listening until the node is ready (start-up step 7): until then clients are
/// refused at once, rather than queued by the kernel while the node opens its storage and
/// finds its leaders, so a load balancer or client sends them elsewhere.
pub struct Listeners {
    pub api: TcpSocket,
    pub admin: TcpListener,
    pub raft: TcpListener,
    /// The web dashboard's (`server.dashboard_addr`); `None` when off, or when `auto` found its
    /// port taken.
    pub dashboard: Option<TcpListener>,
}

/// How many connections the kernel queues for the client API before the node accepts them.
const API_BACKLOG: u32 = 1024;

async fn bind(addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr).await.map_err(|e| NodeError::Listen { addr: addr.to_string(), message: e.to_string() })
}

/// Binds `addr` (the first address it resolves to) without listening yet.
async fn bind_only(addr: &str) -> Result<TcpSocket, NodeError> {
    let failed = |message: String| NodeError::Listen { addr: addr.to_string(), message };
    let resolved = tokio::net::lookup_host(addr).await.map_err(|e| failed(e.to_string()))?.next();
    let resolved = resolved.ok_or_else(|| failed("resolves to no address".into()))?;
    let socket = if resolved.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(|e| failed(e.to_string()))?;
    // Like `TcpListener::bind`: a restarted node may bind while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(|e| failed(e.to_string()))?;
    socket.bind(resolved).map_err(|e| failed(e.to_string()))?;
    Ok(socket)
}

/// The dashboard's listener: see [`Listeners::dashboard`].
async fn bind_dashboard(config: &Config) -> Result<Option<TcpListener>, NodeError> {
    let Some((addr, optional)) = config.dashboard_bind() else { return Ok(None) };
    match bind(&addr.to_string()).await {
        Ok(listener) => Ok(Some(listener)),
        Err(error) if optional => {
            tracing::warn!(%error, "no dashboard: its default port is taken (set server.dashboard_addr)");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, NodeError> {
        Ok(Listeners {
            api: bind_only(&config.server.api_addr).await?,
            admin: bind(&config.server.admin_addr).await?,
            raft: bind(&config.server.raft_addr).await?,
            dashboard: bind_dashboard(config).await?,
        })
    }
}

/// `stemedb rebuild --data-dir DIR`: rebuilds the secondary indexes of every shard in a
/// stopped node's data dir from its snapshot and log. Committed log entries the state machine
/// had not applied yet are applied first (exactly what the node does when it starts), then
/// every index is verified against the records and repaired. `on_shard(shard, shards_total,
/// report)` is called after each shard. Fails while a node runs on the data dir (the database
/// lock).
pub async fn rebuild_offline(
    config: &Config,
    mut on_shard: impl FnMut(u16, u16, &crate::shard::index_repair::RepairReport),
) -> Result<crate::shard::index_repair::RepairReport, NodeError> {
    use openraft::storage::{RaftLogStorage, RaftStateMachine};
    use openraft::RaftLogReader;
    let data_dir = config.node.data_dir.as_path();
    if !data_dir.join("db").exists() {
        return Err(NodeError::Serve(format!("{} holds no StemeDB database (no db/ inside)", data_dir.display())));
    }
    // The node's own storage settings: the same caches and memtables it runs with.
    let storage = Storage::open(data_dir, storage_options(config))?;
    let identity = crate::cluster::identity::read_identity(&storage)?.ok_or_else(|| {
        NodeError::Serve(format!("{} has no node identity: not a StemeDB data dir", data_dir.display()))
    })?;
    let scanned = std::sync::atomic::AtomicU64::new(0);
    let mut total = crate::shard::index_repair::RepairReport::default();
    for shard in 0..identity.shards {
        let group = crate::shard::command::group_of_shard(shard);
        let failed = |e: &dyn std::fmt::Display| NodeError::Serve(format!("shard {shard}: {e}"));
        let mut log = crate::raft::log_store::LogStore::new(storage.clone(), group);
        let mut machine = crate::raft::state_machine::ShardStateMachine::open(
            storage.clone(),
            shard,
            group,
            config.anti_entropy.buckets,
        )
        .map_err(|e| failed(&e))?;
        let (applied, _) = machine.applied_state().await.map_err(|e| failed(&e))?;
        let committed = log.read_committed().await.map_err(|e| failed(&e))?;
        let from = applied.map_or(0, |l| l.index + 1);
        let mut replayed = 0;
        if let Some(committed) = committed.filter(|c| c.index >= from) {
            let entries = log.try_get_log_entries(from..=committed.index).await.map_err(|e| failed(&e))?;
            // The log must still hold every entry after the applied index (a purged log means
            // the applied state came from a snapshot this data dir no longer matches).
            if entries.first().map(|e| e.log_id.index) != Some(from)
                || entries.len() as u64 != committed.index + 1 - from
            {
                return Err(failed(&format!(
                    "the log no longer holds entries {from}..={} needed to replay; restore the data dir from a backup",
                    committed.index
                )));
            }
            replayed = entries.len() as u64;
            machine.apply(entries).await.map_err(|e| failed(&e))?;
        }
        let mut report = crate::shard::index_repair::repair_group(&storage, group, None, &scanned)?;
        report.entries_replayed = replayed;
        on_shard(shard, identity.shards, &report);
        total.add(&report);
    }
    storage.close()?;
    Ok(total)
}

pub fn storage_options(config: &Config) -> StorageOptions {
    StorageOptions {
        block_cache_bytes: (config.storage.max_cache_size_mb as usize) << 20,
        write_buffer_bytes: (config.storage.write_buffer_mb as usize) << 20,
        fsync: config.storage.fsync,
        log_sync_delay: std::time::Duration::from_millis(config.testing.log_sync_delay_ms),
        verify_on_start: config.storage.verify_on_start,
        index_cache_bytes: config
            .storage
            .index_eviction_enabled
            .then_some((config.storage.index_max_memory_mb as usize) << 20),
        disk_floor: crate::storage::disk::DiskFloor {
            min_free_bytes: config.storage.min_free_bytes,
            min_free_percent: config.storage.min_free_percent,
        },
    }
}

pub fn raft_settings(config: &Config) -> RaftSettings {
    RaftSettings {
        heartbeat_interval_ms: config.raft.heartbeat_interval_ms,
        election_timeout_min_ms: config.raft.election_timeout_min_ms,
        election_timeout_max_ms: config.raft.election_timeout_max_ms,
        snapshot_logs_since_last: config.raft.snapshot_logs_since_last,
        snapshot_log_bytes_since_last: config.raft.snapshot_log_mb_since_last << 20,
        logs_to_keep_after_snapshot: config.raft.logs_to_keep_after_snapshot,
        unsafe_skip_read_barrier: config.testing.unsafe_skip_read_barrier,
        lease_reads: config.raft.lease_reads,
        early_replication: config.raft.early_replication,
        claims_cache_bytes: (config.query.claims_cache_mb as usize) << 20,
        snapshot_install_pause_ms: config.testing.snapshot_install_pause_ms,
        digest_buckets: config.anti_entropy.buckets,
        check_before_serving: config.anti_entropy.enabled,
        archive_log: config.backup.archive_enabled,
    }
}

/// Runs a node until `shutdown` resolves (or one of its Raft groups stops on a fatal error),
/// then shuts it down in the order [`Node::stop`] describes. If a step of start-up fails,
/// everything the earlier steps started is stopped, in the same order, before the error is
/// returned: no server, task or open database outlives `run`.
pub async fn run(
    config: crate::config::ValidatedConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reloads(config, listeners, shutdown, reloads).await
}

/// [`run`], taking each config that arrives on `reloads` (the binary sends one on SIGHUP) for
/// what can change while the node runs: `security.tokens`, `security.admin_token` and
/// `[rate_limits]` ([`Node::reload`]).
pub async fn run_with_reloads(
    config: crate::config::ValidatedConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reloads: tokio::sync::mpsc::Receiver<crate::config::ValidatedConfig>,
) -> Result<(), NodeError> {
    let config = config.into_inner();
    let mut node = Node::new(&config);
    let mut shutdown = std::pin::pin!(shutdown);
    // A shutdown requested during start-up (which may wait for leaders or for the cluster to
    // join) stops it where it is: whatever the finished steps started is stopped below.
    let started = tokio::select! {
        started = node.start(config, listeners) => Some(started),
        _ = &mut shutdown => None,
    };
    match &started {
        Some(Ok(())) => loop {
            tokio::select! {
                _ = &mut shutdown => {
                    tracing::info!("shutdown requested");
                    break;
                }
                _ = node.fatal.cancelled() => break,
                Some(next) = reloads.recv() => node.reload(next.into_inner()),
            }
        },
        Some(Err(error)) => tracing::error!(error = %error, "start-up failed; stopping what had started"),
        None => tracing::info!("shutdown requested during start-up"),
    }
    let closed = node.stop().await;
    // A fatal error, or a failed start-up, is the cause; a failing close (say, on a full disk)
    // is its consequence.
    if let Some(error) = node.fatal_error.lock().take() {
        return Err(NodeError::Fatal(error));
    }
    started.transpose()?;
    closed
}

/// What start-up has started so far. [`Node::stop`] stops exactly that, so a start-up that
/// fails half-way and a normal shutdown take the same path.
struct Node {
    tasks: NodeTasks,
    /// Loops that change the cluster (placement driver, leader balancer, config roots, the
    /// join request, the start-up index check): the first thing shutdown stops.
    cluster_work: CancellationToken,
    /// Cancelled when a Raft group stops on a fatal error (the node then shuts down).
    fatal: CancellationToken,
    fatal_error: Arc<parking_lot::Mutex<Option<String>>>,
    grace: Duration,
    /// How long handing every leadership over may take (two leases and some).
    handover_bound: Duration,
    storage: Option<Arc<Storage>>,
    shards: Option<Arc<ShardSet>>,
    context: Option<Arc<NodeContext>>,
    grpc: Option<GrpcServer>,
    admin: Option<HttpServer>,
    api: Option<HttpServer>,
    dashboard: Option<HttpServer>,
    /// HTTPS of 18180 and 18181 (`server.tls_*`), reloaded on SIGHUP.
    http_tls: Option<Arc<crate::tls::HttpTls>>,
    /// Mutual TLS of 18182 (`cluster.tls_*`), reloaded on SIGHUP.
    cluster_tls: Option<Arc<crate::tls::ClusterTls>>,
}

/// How long background tasks get to end once told to stop.
const TASKS_BOUND: Duration = Duration::from_secs(5);
/// How long Raft's tasks get to release the storage after the groups stopped.
const STORAGE_RELEASE_BOUND: Duration = Duration::from_secs(2);

impl Node {
    /// Takes what can change while running from a reloaded config (tokens, the admin token,
    /// rate limits) and says which other sections changed: those wait for the next start.
    pub fn reload(&self, config: Config) {
        let Some(context) = &self.context else { return };
        // The addresses bound at start are the ones served: a reload that would leave them open
        // without tokens is refused (the file's own addresses take effect only at a restart).
        let running = &context.config;
        let exposed = running.exposed_http_addr().is_some();
        if exposed && config.security.tokens.is_empty() && !running.security.allow_unauthenticated {
            tracing::error!(
                "config reload refused: it has no security.tokens, and this node listens on a non-loopback address; \
                 keeping the running tokens and limits"
            );
        } else {
            context.access.reload(&config);
        }
        // Certificates: the same files read again (rotated in place); other paths wait. Small
        // file reads, off the async workers all the same.
        crate::storage::blocking(|| {
            if let Some(tls) = &self.http_tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("HTTP certificate reloaded"),
                    Err(error) => tracing::error!(%error, "HTTP certificate not reloaded; serving the previous one"),
                }
            }
            if let Some(tls) = &self.cluster_tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("cluster TLS certificates reloaded"),
                    Err(error) => {
                        tracing::error!(%error, "cluster TLS not reloaded; keeping the previous certificates")
                    }
                }
            }
        });
        let mut later = Vec::new();
        let sections: [(&str, bool); 14] = [
            ("node", running.node == config.node),
            ("server", running.server == config.server),
            ("cluster", running.cluster == config.cluster),
            ("storage", running.storage == config.storage),
            ("raft", running.raft == config.raft),
            ("anti_entropy", running.anti_entropy == config.anti_entropy),
            ("limits", running.limits == config.limits),
            ("query", running.query == config.query),
            ("authority", running.authority == config.authority),
            ("quarantine", running.quarantine == config.quarantine),
            ("circuit_breaker", running.circuit_breaker == config.circuit_breaker),
            ("logging", running.logging == config.logging),
            ("backup", running.backup == config.backup),
            (
                "security (but tokens and admin_token)",
                (running.security.require_signatures, running.security.allow_unauthenticated)
                    == (config.security.require_signatures, config.security.allow_unauthenticated),
            ),
        ];
        for (section, same) in sections {
            if !same {
                later.push(section);
            }
        }
        if !later.is_empty() {
            tracing::warn!(sections = ?later, "config reloaded: these sections changed and take effect at the next start");
        }
    }

    fn new(config: &Config) -> Node {
        let tasks = NodeTasks::new();
        Node {
            cluster_work: tasks.child_token(),
            tasks,
            fatal: CancellationToken::new(),
            fatal_error: Default::default(),
            grace: Duration::from_secs(config.server.shutdown_grace_seconds),
            handover_bound: Duration::from_millis(config.raft.election_timeout_max_ms) * 2 + Duration::from_secs(2),
            storage: None,
            shards: None,
            context: None,
            grpc: None,
            admin: None,
            api: None,
            dashboard: None,
            http_tls: None,
            cluster_tls: None,
        }
    }

    /// Start-up, in order; each step records what it started before the next can fail.
    async fn start(&mut self, config: Config, listeners: Listeners) -> Result<(), NodeError> {
        let started_at = Instant::now();
        let mut config = config;
        if !config.server.tls_cert_file.is_empty() {
            let (cert, key) = (&config.server.tls_cert_file, &config.server.tls_key_file);
            self.http_tls = Some(crate::tls::HttpTls::load(cert.as_ref(), key.as_ref())?);
        }
        if !config.cluster.tls_ca_file.is_empty() {
            self.cluster_tls = Some(crate::tls::ClusterTls::load(crate::tls::ClusterTlsFiles {
                ca: config.cluster.tls_ca_file.clone().into(),
                cert: config.cluster.tls_cert_file.clone().into(),
                key: config.cluster.tls_key_file.clone().into(),
            })?);
        }
        let joining = !config.cluster.join.is_empty();
        // Founding nodes derive the cluster id from the initial cluster; a joining node learns
        // it (and the shard count) from the member it joins through.
        let (members, cluster_id) = if joining {
            let (cluster_id, shards) = join_target_info(&config).await?;
            config.cluster.shards = shards;
            (std::collections::BTreeMap::new(), Some(cluster_id))
        } else {
            let members = config.initial_members().map_err(|e| NodeError::Serve(e.to_string()))?;
            let cluster_id = (members.len() > 1).then(|| cluster_id_of(&members));
            (members, cluster_id)
        };
        let single_node = !joining && members.len() == 1;
        if config.testing.unsafe_skip_read_barrier {
            tracing::error!("testing.unsafe_skip_read_barrier is on: linearizable reads are NOT linearizable");
        }
        if config.testing.start_up_scrub_delay_ms > 0 {
            tracing::error!(
                delay_ms = config.testing.start_up_scrub_delay_ms,
                "testing.start_up_scrub_delay_ms is on: replicas stay unchecked (neither leading nor serving) that long after start"
            );
        }
        if config.testing.log_sync_delay_ms > 0 {
            tracing::error!(
                delay_ms = config.testing.log_sync_delay_ms,
                "testing.log_sync_delay_ms is on: every raft log write and fsync waits that long"
            );
        }
        let addr_of = |addr: std::io::Result<SocketAddr>| addr.map_err(|e| NodeError::Serve(e.to_string()));
        let api_addr = addr_of(listeners.api.local_addr())?;
        let (admin_addr, raft_addr) = (addr_of(listeners.admin.local_addr())?, addr_of(listeners.raft.local_addr())?);

        // 1. Storage and the data dir's identity. A restore that did not finish left a data dir
        //    that must not be started (some groups staged, no identity).
        let restoring = config.node.data_dir.join(crate::cluster::backup::restore::RESTORING_MARKER);
        if restoring.exists() {
            return Err(NodeError::Serve(format!(
                "{} holds an unfinished restore ({} exists): move it aside and run `stemedb backup restore` again into an empty data dir",
                config.node.data_dir.display(),
                restoring.display()
            )));
        }
        // Opening reads every table file (`storage.verify_on_start`): off the async workers.
        let storage = crate::storage::blocking(|| Storage::open(&config.node.data_dir, storage_options(&config)))?;
        self.storage = Some(storage.clone());
        let fresh_data_dir = !identity_recorded(&storage)?;
        let identity = ensure_identity(&storage, config.node.id, config.cluster.shards, cluster_id.as_deref())?;

        // 2. The Raft groups.
        let peers = PeerChannels::with_tls(
            config.dial_overrides().map_err(|e| NodeError::Serve(e.to_string()))?,
            Some(identity.cluster_id.clone()),
            self.cluster_tls.clone(),
        );
        peers.set_frames(config.cluster.frame_transport);
        let policy = crate::meta::policy::Policy::new(
            config.authority.max_chain_depth,
            crate::meta::quarantine::QuarantineRules::from_config(&config),
        );
        let shards = Arc::new(
            ShardSet::open(
                storage.clone(),
                config.node.id,
                members,
                config.cluster.shards,
                config.cluster.replication_factor,
                &raft_settings(&config),
                peers,
                policy,
                self.tasks.clone(),
            )
            .await?,
        );
        self.shards = Some(shards.clone());
        // A node on an empty data dir, or one whose damaged replicas were dropped at start, has
        // forgotten entries it acknowledged: it holds its votes back until it caught up.
        let recovering = if (joining && fresh_data_dir) || !shards.damaged_at_start.is_empty() {
            set_recovering(&storage, true)?;
            true
        } else {
            is_recovering(&storage)?
        };
        if recovering {
            shards.arm_vote_guards();
        }

        // 3. What requests need, and the background tasks.
        let write_timeout = Duration::from_millis(config.raft.write_timeout_ms);
        let anti_entropy = crate::cluster::anti_entropy::AntiEntropy::new(
            shards.clone(),
            crate::cluster::anti_entropy::Settings {
                enabled: config.anti_entropy.enabled,
                interval: Duration::from_secs(config.anti_entropy.interval_seconds),
                scrub_bytes_per_second: config.anti_entropy.scrub_bytes_per_second,
                scrub_interval: Duration::from_secs(config.anti_entropy.scrub_interval_seconds),
                buckets: config.anti_entropy.buckets,
                reseed_buckets: config.anti_entropy.reseed_buckets,
                start_up_scrub_delay: Duration::from_millis(config.testing.start_up_scrub_delay_ms),
            },
        );
        let audit = crate::api::access::audit::AuditLog::open(storage.clone(), config.node.id)?;
        let context = Arc::new(NodeContext {
            cluster_id: identity.cluster_id.clone(),
            config: config.clone(),
            shards: shards.clone(),
            write_batchers: crate::coordinator::batch::WriteBatchers::start(
                &shards,
                config.limits.max_queued_writes_per_shard,
            ),
            storage: storage.clone(),
            metrics: Metrics::new(
                config.node.id,
                crate::storage::metrics::collectors()
                    .into_iter()
                    .chain(crate::shard::metrics::collectors())
                    .chain(crate::raft::metrics::collectors())
                    .chain(crate::cluster::anti_entropy::metrics::collectors())
                    .chain(crate::cluster::backup::metrics::collectors())
                    .chain(crate::api::access::metrics::collectors())
                    .collect(),
            ),
            started_at,
            slow_queries: crate::api::slow_queries::SlowQueryLog::new(config.query.slow_query_log_size),
            breakers: crate::api::breakers::BreakerMonitor::new(
                config.circuit_breaker.clone(),
                shards.clone(),
                write_timeout,
            ),
            indexes: Default::default(),
            anti_entropy: anti_entropy.clone(),
            backups: Arc::new(crate::cluster::backup::Backups::new(
                shards.clone(),
                storage.clone(),
                config.backup.clone(),
                identity.cluster_id.clone(),
            )),
            heap_profiler: start_heap_profiler(&config),
            access: crate::api::access::Access::new(&config, audit),
        });
        self.context = Some(context.clone());
        register_node_gauges(&context);
        crate::raft::shards::start_claims_cache_sharing(&shards);
        crate::raft::shards::start_log_size_snapshots(&shards);
        shards.start_leadership_clocks();
        crate::raft::hibernation::start(
            &shards,
            Duration::from_millis(config.raft.heartbeat_interval_ms),
            Duration::from_millis(config.raft.election_timeout_max_ms),
        );
        crate::raft::takeover::start(&shards, Duration::from_millis(config.raft.heartbeat_interval_ms));
        crate::cluster::placement::start(
            &shards,
            crate::cluster::placement::PlacementSettings {
                interval: Duration::from_millis(500),
                auto_rebalance: config.cluster.auto_rebalance,
                move_timeout: Duration::from_secs(config.cluster.rebalance_move_timeout_seconds.max(1)),
                dead_node_timeout: (config.cluster.dead_node_timeout_seconds > 0)
                    .then(|| Duration::from_secs(config.cluster.dead_node_timeout_seconds)),
            },
            self.cluster_work.clone(),
        );
        crate::cluster::placement::start_replica_cleanup(&shards, Duration::from_secs(2), self.cluster_work.clone());
        if config.cluster.auto_rebalance {
            crate::cluster::placement::start_leader_balancer(
                &shards,
                Duration::from_secs(2),
                self.cluster_work.clone(),
            );
        }
        record_config_roots(&shards, &config.authority.roots, self.cluster_work.clone());
        if config.storage.rebuild_indexes_on_start {
            rebuild_indexes_when_placed(&context, self.cluster_work.clone());
        }
        self.watch_for_fatal_errors(&shards, &storage, recovering);
        anti_entropy.start();
        crate::cluster::backup::archive::Archiver::start(
            shards.clone(),
            &config.backup,
            config.raft.logs_to_keep_after_snapshot,
            identity.cluster_id.clone(),
        )
        .map_err(|e| NodeError::Serve(format!("raft log archival: {e}")))?;

        // 4. The transport, before waiting for leaders: elections need the peers' votes.
        self.grpc = Some(GrpcServer::start(
            &self.tasks,
            RaftService::new(shards.clone(), context.write_batchers.clone(), write_timeout),
            crate::rpc::anti_entropy::AntiEntropyService::server(anti_entropy.clone()),
            crate::rpc::backup::BackupService::server(context.backups.clone()),
            identity.cluster_id.clone(),
            listeners.raft,
            self.cluster_tls.clone(),
        ));

        // 5. The cluster admin.
        let https = self.http_tls.as_ref().map(|tls| tls.acceptor());
        let admin_permits = api::request_permits(&context);
        let admin_router = crate::admin::router(context.clone(), admin_permits.clone());
        self.admin = Some(HttpServer::start(&self.tasks, listeners.admin, admin_router, https.clone()));

        // 6. Joining the cluster, or waiting for the groups' leaders.
        if joining {
            let (node_id, raft_addr) = (config.node.id, config.server.raft_addr.clone());
            let (base, client) = join_client(&config, Duration::from_secs(300))?;
            let token = config.security.admin_token.clone();
            let stop = self.cluster_work.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = request_membership(&base, client, node_id, &raft_addr, &token) => {}
                    _ = stop.cancelled() => {}
                }
            });
        } else if single_node {
            shards.wait_for_leaders(Duration::from_secs(30)).await?;
        } else if shards.wait_for_leaders(Duration::from_secs(5)).await.is_err() {
            tracing::info!("not every shard has a leader yet; waiting for peers in the background");
        }

        // 7. The client API, last: requests find the node ready.
        let api_listener = listeners
            .api
            .listen(API_BACKLOG)
            .map_err(|e| NodeError::Listen { addr: api_addr.to_string(), message: e.to_string() })?;
        let permits = api::request_permits(&context);
        self.api = Some(HttpServer::start(
            &self.tasks,
            api_listener,
            api::router(context.clone(), permits.clone()),
            https.clone(),
        ));
        let dashboard_addr = listeners.dashboard.as_ref().and_then(|listener| listener.local_addr().ok());
        if let Some(listener) = listeners.dashboard {
            let app = crate::dashboard::router(context, permits, admin_permits);
            self.dashboard = Some(HttpServer::start(&self.tasks, listener, app, https));
        }
        tracing::info!(
            node_id = config.node.id,
            cluster_id = %identity.cluster_id,
            api = %api_addr,
            admin = %admin_addr,
            dashboard = ?dashboard_addr,
            raft = %raft_addr,
            data_dir = %config.node.data_dir.display(),
            shards = config.cluster.shards,
            startup_ms = started_at.elapsed().as_millis() as u64,
            "node ready"
        );
        Ok(())
    }

    /// A group whose Raft stopped on a fatal error (a storage failure such as a full disk) would
    /// leave the node half alive, still claiming leadership it cannot exercise. The node stops
    /// instead, with an error, so its supervisor restarts it once the cause is fixed; RocksDB and
    /// the Raft log recover on restart. The same task notices when a node that started on an
    /// empty data dir has caught up with every group.
    fn watch_for_fatal_errors(&self, shards: &Arc<ShardSet>, storage: &Arc<Storage>, recovering: bool) {
        let (shards, fatal, fatal_error) = (Arc::downgrade(shards), self.fatal.clone(), self.fatal_error.clone());
        let storage = Arc::downgrade(storage);
        let mut recovering = recovering;
        self.tasks.spawn_until_stopped(async move {
            loop {
                let (Some(shards), Some(storage)) = (shards.upgrade(), storage.upgrade()) else { return };
                // The vote guards are all satisfied: forget that this node was rebuilding.
                if recovering && !shards.recovering() && set_recovering(&storage, false).is_ok() {
                    recovering = false;
                    tracing::info!("caught up with every group; this node votes normally again");
                }
                if let Some(error) = shards.fatal_error() {
                    tracing::error!(error = %error, "raft group stopped on a fatal error; stopping the node");
                    *fatal_error.lock() = Some(error);
                    fatal.cancel();
                    return;
                }
                drop((shards, storage));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    /// Shuts down what started, in this order (docs/architecture.md, Shutdown):
    ///
    /// 1. stop the loops that change the cluster, and start leaving: this node refuses to
    ///    campaign and tells its peers, so nothing hands it a leadership back;
    /// 2. stop accepting client and cluster-admin connections (requests already received go on);
    /// 3. hand every group this node leads to a caught-up voter; writes that arrive meanwhile
    ///    wait a moment, then go to the new leader;
    /// 4. let in-flight HTTP requests finish (at most `server.shutdown_grace_seconds`);
    /// 5. stop the gRPC server, letting the requests peers forwarded here finish (forwarded on
    ///    to the new leaders);
    /// 6. stop every Raft group;
    /// 7. stop every background task and wait for them (bounded);
    /// 8. sync the WAL, flush the memtables and close RocksDB, on the blocking pool.
    async fn stop(&mut self) -> Result<(), NodeError> {
        let started = Instant::now();
        self.cluster_work.cancel();
        if let Some(shards) = &self.shards {
            shards.begin_leaving();
        }
        let (api, admin, dashboard) = (self.api.take(), self.admin.take(), self.dashboard.take());
        let stop_accepting = |server: &Option<HttpServer>| {
            let closer = server.as_ref().map(|s| s.closer.clone());
            async move {
                if let Some(closer) = closer {
                    closer.close(Duration::from_secs(1)).await;
                }
            }
        };
        futures::future::join3(stop_accepting(&api), stop_accepting(&admin), stop_accepting(&dashboard)).await;
        tracing::info!("no longer accepting connections");
        if let Some(shards) = &self.shards {
            let (moved, kept) = shards.hand_over_leaderships(self.handover_bound).await;
            if moved + kept > 0 {
                tracing::info!(moved, kept, took_ms = started.elapsed().as_millis() as u64, "leaderships handed over");
            }
        }
        let grace = self.grace;
        let drain = |server: Option<HttpServer>, name: &'static str| async move {
            if let Some(server) = server {
                server.drain(grace, name).await;
            }
        };
        futures::future::join3(drain(api, "client api"), drain(admin, "cluster admin"), drain(dashboard, "dashboard"))
            .await;
        if let Some(grpc) = self.grpc.take() {
            grpc.stop(grace).await;
        }
        if let Some(shards) = &self.shards {
            shards.shutdown().await;
        }
        let abandoned = self.tasks.stop_and_wait(TASKS_BOUND).await;
        if abandoned > 0 {
            tracing::warn!(tasks = abandoned, "background tasks still running at shutdown were abandoned");
        }
        self.context = None;
        self.shards = None;
        let closed = match self.storage.take() {
            Some(storage) => close_storage(storage).await,
            None => Ok(()),
        };
        tracing::info!(shutdown_ms = started.elapsed().as_millis() as u64, "node stopped");
        closed
    }
}

/// Syncs and closes the database once nothing else holds it (Raft's tasks release it as they
/// end; up to [`STORAGE_RELEASE_BOUND`]), on the blocking pool: a flush writes files.
async fn close_storage(storage: Arc<Storage>) -> Result<(), NodeError> {
    let deadline = Instant::now() + STORAGE_RELEASE_BOUND;
    while Arc::strong_count(&storage) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let holders = Arc::strong_count(&storage) - 1;
    if holders > 0 {
        tracing::warn!(holders, "storage still in use at shutdown; flushed, closed when the last user ends");
    }
    let closing = tokio::task::spawn_blocking(move || {
        let result = storage.close();
        // The last reference closes RocksDB (releasing its lock) here, off the async workers.
        drop(storage);
        result
    });
    match closing.await {
        Ok(result) => Ok(result?),
        Err(error) => Err(NodeError::Serve(format!("closing storage: {error}"))),
    }
}

/// An HTTP server (client API or cluster admin) with the two halves of its shutdown: stop
/// accepting, then let the requests in flight finish.
struct HttpServer {
    closer: ListenerCloser,
    drain: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl HttpServer {
    fn start(
        tasks: &NodeTasks,
        listener: TcpListener,
        app: axum::Router,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> HttpServer {
        use axum::serve::ListenerExt;
        let (listener, closer) = ClosableListener::new(listener);
        let listener = listener.with_tls(tls);
        let drain = CancellationToken::new();
        // `tap_io` only so that handlers see the peer address (admin rights of loopback peers).
        let serve = axum::serve(listener.tap_io(|_| {}), app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(drain.clone().cancelled_owned());
        let task = tasks.spawn(async move { serve.await });
        HttpServer { closer, drain, task }
    }

    /// Closes idle connections and waits for requests in flight, up to `grace`; then abandons
    /// them (a decommission may wait minutes).
    async fn drain(self, grace: Duration, name: &'static str) {
        // A connection accepted just before the close may not have been read yet; a graceful
        // shutdown would close it unread (resetting the client) instead of answering.
        self.closer.wait_until_read(Duration::from_secs(1)).await;
        self.drain.cancel();
        let mut task = self.task;
        match tokio::time::timeout(grace, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(server = name, error = %error, "server failed"),
            Ok(Err(error)) => tracing::warn!(server = name, error = %error, "server task failed"),
            Err(_) => {
                tracing::warn!(
                    server = name,
                    grace_seconds = grace.as_secs(),
                    "requests still running after the grace period were abandoned"
                );
                task.abort();
            }
        }
    }
}

/// Concurrent TLS handshakes (and first reads) of the transport at most; more connections wait
/// for a slot.
const TRANSPORT_HANDSHAKES: usize = 256;

/// A transport connection's stream: plain, or mutual TLS over it.
enum TransportStream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// A transport connection handed to the gRPC server: its stream, and the first bytes read from
/// it to tell it from a frame connection, which it reads again before the rest.
struct TransportIo {
    stream: TransportStream,
    first: Vec<u8>,
    replayed: usize,
}

impl tonic::transport::server::Connected for TransportIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match &self.stream {
            TransportStream::Plain(stream) => stream.connect_info(),
            TransportStream::Tls(stream) => stream.get_ref().0.connect_info(),
        }
    }
}

impl tokio::io::AsyncRead for TransportStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TransportStream::Plain(io) => std::pin::Pin::new(io).poll_read(cx, buf),
            TransportStream::Tls(io) => std::pin::Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for TransportStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            TransportStream::Plain(io) => std::pin::Pin::new(io).poll_write(cx, buf),
            TransportStream::Tls(io) => std::pin::Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TransportStream::Plain(io) => std::pin::Pin::new(io).poll_flush(cx),
            TransportStream::Tls(io) => std::pin::Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TransportStream::Plain(io) => std::pin::Pin::new(io).poll_shutdown(cx),
            TransportStream::Tls(io) => std::pin::Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tokio::io::AsyncRead for TransportIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.first.len() {
            let rest = &this.first[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TransportIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Reads a connection's first bytes, as far as they match the frame preface (an HTTP/2
/// client's first byte already differs, so gRPC connections wait for nothing).
async fn first_bytes(stream: &mut TransportStream) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let preface = crate::raft::frames::PREFACE;
    let mut first = Vec::with_capacity(preface.len());
    let mut buf = [0u8; 8];
    while first.len() < preface.len() && preface.starts_with(&first) {
        let n = stream.read(&mut buf[..preface.len() - first.len()]).await?;
        if n == 0 {
            break;
        }
        first.extend_from_slice(&buf[..n]);
    }
    Ok(first)
}

/// How long a transport connection may take to send its first bytes (a gRPC client sends its
/// preface at once; a silent connection must not hold an accept slot for long).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(1);

/// Frame connections served at once at most (normally one from each peer); one more is
/// closed at once, and its node tries again.
const MAX_FRAME_CONNECTIONS: usize = 1024;

/// Where the transport sends the connections that start with the frame preface.
#[derive(Clone)]
struct FrameServing {
    service: Arc<RaftService>,
    cluster_id: String,
    stop: CancellationToken,
    /// Ends the connections still open after the shutdown's grace period.
    abort: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    permits: Arc<tokio::sync::Semaphore>,
}

/// The transport's accepted connections: TCP_NODELAY on each (Raft messages are small and
/// latency-bound: Nagle's algorithm and delayed ACKs added ~40 ms to replication round trips),
/// and with cluster TLS, only those whose handshake proved a certificate of the cluster CA (at
/// most [`TRANSPORT_HANDSHAKES`] at once, each within `tls::HANDSHAKE_TIMEOUT`; a failed one
/// is logged and dropped, never handed to the server). A connection whose first bytes are the
/// frame preface is served by `rpc::frames` (a task of its own); the others go to gRPC.
fn transport_incoming(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ClusterTls>>,
    frames: FrameServing,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = Result<TransportIo, std::io::Error>> + Send>> {
    use futures::StreamExt;
    let accepted = tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(|conn| async move {
        match conn {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Some(stream)
            }
            Err(error) => {
                tracing::debug!(%error, "transport accept failed");
                None
            }
        }
    });
    Box::pin(
        accepted
            .map(move |stream| {
                let (tls, frames) = (tls.clone(), frames.clone());
                async move {
                    let peer = stream.peer_addr().ok();
                    let mut stream = match tls {
                        None => TransportStream::Plain(stream),
                        Some(tls) => {
                            match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream))
                                .await
                            {
                                Ok(Ok(tls)) => TransportStream::Tls(Box::new(tls)),
                                Ok(Err(error)) => {
                                    crate::raft::metrics::TLS_REFUSED.inc();
                                    tracing::warn!(peer = ?peer, %error, "transport TLS handshake refused");
                                    return None;
                                }
                                Err(_) => {
                                    crate::raft::metrics::TLS_REFUSED.inc();
                                    tracing::warn!(peer = ?peer, "transport TLS handshake timed out");
                                    return None;
                                }
                            }
                        }
                    };
                    let first = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, first_bytes(&mut stream))
                        .await
                    {
                        Ok(Ok(first)) => first,
                        Ok(Err(error)) => {
                            tracing::debug!(peer = ?peer, %error, "transport connection failed before its first bytes");
                            return None;
                        }
                        Err(_) => {
                            tracing::debug!(peer = ?peer, "transport connection sent nothing; closed");
                            return None;
                        }
                    };
                    if first == crate::raft::frames::PREFACE {
                        let FrameServing { service, cluster_id, stop, abort, tracker, permits } = frames;
                        if stop.is_cancelled() {
                            return None;
                        }
                        let Ok(permit) = permits.try_acquire_owned() else {
                            tracing::warn!(peer = ?peer, limit = MAX_FRAME_CONNECTIONS, "too many frame connections; closed one");
                            return None;
                        };
                        tracker.spawn(async move {
                            crate::rpc::frames::serve(Box::new(stream), service, cluster_id, stop, abort).await;
                            drop(permit);
                        });
                        return None;
                    }
                    Some(Ok(TransportIo { stream, first, replayed: 0 }))
                }
            })
            .buffer_unordered(TRANSPORT_HANDSHAKES)
            .filter_map(|io| async move { io }),
    )
}

/// The gRPC server on the Raft port.
struct GrpcServer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// The frame connections being served (`rpc::frames`); they stop with `stop` too, and end
    /// with `abort_frames` after the grace period.
    frames: tokio_util::task::TaskTracker,
    abort_frames: CancellationToken,
}

impl GrpcServer {
    fn start(
        tasks: &NodeTasks,
        service: Arc<RaftService>,
        anti_entropy: stemedb_proto::raft::anti_entropy_server::AntiEntropyServer<
            crate::rpc::anti_entropy::AntiEntropyService,
        >,
        backup: stemedb_proto::raft::backup_server::BackupServer<crate::rpc::backup::BackupService>,
        cluster_id: String,
        listener: TcpListener,
        tls: Option<Arc<crate::tls::ClusterTls>>,
    ) -> GrpcServer {
        let stop = CancellationToken::new();
        let frames = tokio_util::task::TaskTracker::new();
        let abort_frames = CancellationToken::new();
        let serving = FrameServing {
            service: service.clone(),
            cluster_id: cluster_id.clone(),
            stop: stop.clone(),
            abort: abort_frames.clone(),
            tracker: frames.clone(),
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_FRAME_CONNECTIONS)),
        };
        let incoming = transport_incoming(listener, tls, serving);
        let serve = tonic::transport::Server::builder()
            // Peers cancel requests whose deadline passed; after a partition heals, hundreds of
            // queued forwards and heartbeats are reset at once before this server accepts them.
            // h2's default (20 such streams) then answers GOAWAY "too_many_resets" and tears down
            // the connection every heal. The transport only serves cluster peers.
            .http2_max_pending_accept_reset_streams(Some(PEER_MAX_PENDING_RESETS))
            // Nodes of another cluster are refused before any service sees their request.
            .layer(tonic::service::InterceptorLayer::new(crate::rpc::cluster_check(cluster_id)))
            // Past this many running requests, one more is refused `overloaded` at once.
            .layer(crate::rpc::limit::RunningLimit::new(crate::rpc::limit::MAX_RUNNING))
            .add_service(RaftService::server(service))
            .add_service(anti_entropy)
            .add_service(backup)
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        GrpcServer { stop, task: tasks.spawn(serve), frames, abort_frames }
    }

    /// Stops accepting, lets the requests in flight finish (up to `grace`), then abandons them.
    async fn stop(self, grace: Duration) {
        self.stop.cancel();
        let started = std::time::Instant::now();
        self.frames.close();
        if tokio::time::timeout(grace, self.frames.wait()).await.is_err() {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                "frame requests still running after the grace period were abandoned"
            );
        }
        // Ends what is left, and any connection accepted as the server was stopping.
        self.abort_frames.cancel();
        self.frames.wait().await;
        let mut task = self.task;
        match tokio::time::timeout(grace.saturating_sub(started.elapsed()), &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(error = %error, "grpc server failed"),
            Ok(Err(error)) => tracing::warn!(error = %error, "grpc server task failed"),
            Err(_) => {
                tracing::warn!(
                    grace_seconds = grace.as_secs(),
                    "grpc requests still running after the grace period were abandoned"
                );
                task.abort();
            }
        }
    }
}

/// The base URL of the member's cluster admin a joining node asks (`cluster.join`), and a client
/// for it: HTTPS when this node's own HTTP ports are (`server.tls_*`; a cluster's nodes share that
/// setting), trusting `server.tls_ca_file` besides the system's roots.
fn join_client(config: &Config, timeout: Duration) -> Result<(String, reqwest::Client), NodeError> {
    let addr = &config.cluster.join;
    let scheme = if config.server.tls_cert_file.is_empty() { "http" } else { "https" };
    let ca = (!config.server.tls_ca_file.is_empty()).then(|| std::path::Path::new(&config.server.tls_ca_file));
    let client = crate::tls::http_client(ca, timeout)?
        .build()
        .map_err(|e| NodeError::Join { addr: addr.clone(), message: e.to_string() })?;
    Ok((format!("{scheme}://{addr}"), client))
}

/// Asks the member at `cluster.join` for the cluster id and shard count.
async fn join_target_info(config: &Config) -> Result<(String, u16), NodeError> {
    let admin_addr = config.cluster.join.as_str();
    let failed = |message: String| NodeError::Join { addr: admin_addr.to_string(), message };
    let (base, client) = join_client(config, Duration::from_secs(5))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let response = client.get(format!("{base}/cluster/health")).send().await?;
            response.json::<serde_json::Value>().await
        };
        match attempt.await {
            Ok(body) => {
                let cluster_id = body["cluster_id"].as_str().map(str::to_string);
                let shards = body["shards_total"].as_u64().and_then(|s| u16::try_from(s).ok());
                return match (cluster_id, shards) {
                    (Some(id), Some(shards)) if shards > 0 => Ok((id, shards)),
                    _ => Err(failed(format!("unexpected /cluster/health answer: {body}"))),
                };
            }
            Err(error) if Instant::now() < deadline => {
                tracing::info!(addr = admin_addr, error = %error, "cluster to join not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(failed(error.to_string())),
        }
    }
}

/// Asks the cluster to add this node (recorded as JOINING; it receives its share of replicas),
/// retrying until the request is accepted.
async fn request_membership(base: &str, client: reqwest::Client, node_id: u64, raft_addr: &str, admin_token: &str) {
    loop {
        let body = serde_json::json!({"id": node_id, "raft_addr": raft_addr});
        let mut request = client.post(format!("{base}/cluster/members")).json(&body);
        if !admin_token.is_empty() {
            request = request.bearer_auth(admin_token);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                tracing::info!(via = base, "joined the cluster");
                return;
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                tracing::warn!(%status, answer = %text, "join refused; retrying");
            }
            Err(error) => tracing::warn!(error = %error, "join request failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn register_node_gauges(context: &Arc<NodeContext>) {
    // Replication lag (DESIGN §4): on each shard leader, per follower, the age of the oldest entry
    // that follower has not matched. Per node: the worst over the shards this node leads.
    let weak = Arc::downgrade(context);
    context.metrics.register(Box::new(ComputedGauges::new(
        "replication_lag_seconds",
        "Per follower node: age of the oldest log entry it has not matched, worst over shards this node leads",
        "node",
        Box::new(move || {
            let Some(context) = weak.upgrade() else { return Vec::new() };
            let mut worst: std::collections::BTreeMap<u64, f64> = Default::default();
            for (_, node, lag) in context.shards.follower_lags() {
                let slot = worst.entry(node).or_default();
                *slot = slot.max(lag);
            }
            worst.into_iter().map(|(node, lag)| (node.to_string(), lag)).collect()
        }),
    )));
    let weak = Arc::downgrade(context);
    context.metrics.register(Box::new(ComputedGauges::with_labels(
        "stemedb_shard_replication_lag_seconds",
        "Per shard this node leads and follower node: age of the oldest log entry the follower has not matched",
        vec!["shard", "node"],
        Box::new(move || {
            let Some(context) = weak.upgrade() else { return Vec::new() };
            let lags = context.shards.follower_lags();
            lags.into_iter().map(|(shard, node, lag)| (vec![shard.to_string(), node.to_string()], lag)).collect()
        }),
    )));
    shard_counter(
        context,
        "stemedb_shard_writes_total",
        "Write requests for each shard that reached this node (served here or sent on to the shard's leader)",
        |g| g.writes.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    shard_counter(
        context,
        "stemedb_shard_queries_total",
        "Shard reads for each shard that reached this node (served here or sent on to a replica)",
        |g| g.queries.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    shard_gauge(context, "stemedb_raft_term", "Current Raft term of each shard on this node", |g| {
        g.raft.metrics().borrow().current_term as f64
    });
    shard_gauge(
        context,
        "stemedb_shard_applied_index",
        "Last log index applied by this node's replica of each shard",
        |g| g.reader.applied_index() as f64,
    );
    shard_gauge(
        context,
        "stemedb_quarantine_pending",
        "Claims waiting in quarantine for a release or reject, per shard, as this node's replica counts them (0 without a replica)",
        |g| g.reader.quarantine_pending() as f64,
    );
    node_gauge(context, "stemedb_cache_memory_bytes", "Bytes held by the RocksDB block cache", |c| {
        c.storage.cache_memory_bytes() as f64
    });
    let traffic = |pick: fn(&crate::storage::CacheTraffic) -> u64| {
        move |c: &Arc<NodeContext>| pick(&c.storage.cache_traffic()) as f64
    };
    node_counter(
        context,
        "stemedb_cache_hits_total",
        "Block reads the RocksDB block caches answered",
        traffic(|t| t.hits),
    );
    node_counter(
        context,
        "stemedb_cache_misses_total",
        "Block reads the RocksDB block caches missed (read from disk)",
        traffic(|t| t.misses),
    );
    node_counter(
        context,
        "stemedb_cache_inserted_bytes_total",
        "Bytes of blocks inserted into the RocksDB block caches",
        traffic(|t| t.inserted_bytes),
    );
    node_counter(
        context,
        "stemedb_cache_evicted_bytes_total",
        "Bytes of blocks that left the RocksDB block caches (evicted for room, or dropped with their table file): \
         inserted less held",
        traffic(|t| t.evicted_bytes),
    );
    node_gauge(
        context,
        "stemedb_cache_size_bytes",
        "Capacity of the RocksDB block cache (storage.max_cache_size_mb, env STEMEDB_CACHE_SIZE_MB)",
        |c| c.storage.block_cache_capacity_bytes() as f64,
    );
    node_gauge(
        context,
        "stemedb_compaction_progress_ratio",
        "Share done (0-1) of the running manual compaction (POST /v1/admin/storage/compact), or of the last one; \
         RocksDB's own background compactions are in stemedb_lsm_*",
        |c| c.storage.manual_compaction().progress,
    );
    node_gauge(
        context,
        "stemedb_compaction_running",
        "1 while a manual compaction (POST /v1/admin/compact) runs",
        |c| f64::from(u8::from(c.storage.manual_compaction().running)),
    );
    node_gauge(
        context,
        "stemedb_storage_write_amplification",
        "Bytes RocksDB wrote to disk (write-ahead log, flushes, compactions) per byte of keys and values written, \
         over the node's whole run",
        |c| c.storage.write_amplification(),
    );
    node_gauge(
        context,
        "stemedb_index_cache_size_bytes",
        "Capacity of the index family's own block cache (storage.index_max_memory_mb with storage.index_eviction_enabled; 0 when off)",
        |c| c.storage.index_cache_capacity_bytes() as f64,
    );
    node_gauge(
        context,
        "stemedb_lsm_pending_compaction_bytes",
        "Bytes RocksDB estimates compaction still has to rewrite, over all column families",
        |c| c.storage.pending_compaction_bytes() as f64,
    );
    let weak = Arc::downgrade(context);
    context.metrics.register(Box::new(crate::metrics::ComputedSummary::new(
        "stemedb_lsm_compaction_duration_seconds",
        "Durations of RocksDB compactions since the node started (quantiles over all of them)",
        Box::new(move || {
            let durations = weak.upgrade()?.storage.compaction_durations();
            Some((durations.count, durations.sum_seconds, durations.quantiles.to_vec()))
        }),
    )));
    let allocator = |name: &str, help: &str, field: fn(&crate::metrics::heap_profile::AllocatorStats) -> u64| {
        let value = move |_: &Arc<NodeContext>| {
            crate::metrics::heap_profile::allocator_stats().map(|s| field(&s) as f64).unwrap_or(0.0)
        };
        node_gauge(context, name, help, value);
    };
    allocator(
        "stemedb_allocator_allocated_bytes",
        "Bytes the process has allocated and not freed (jemalloc stats.allocated)",
        |s| s.allocated,
    );
    allocator(
        "stemedb_allocator_active_bytes",
        "Bytes in the allocator's pages that hold allocations (jemalloc stats.active)",
        |s| s.active,
    );
    allocator(
        "stemedb_allocator_resident_bytes",
        "Bytes of physically resident pages the allocator maps (jemalloc stats.resident)",
        |s| s.resident,
    );
    allocator(
        "stemedb_allocator_metadata_bytes",
        "Bytes of the allocator's own metadata, heap-profile samples included (jemalloc stats.metadata)",
        |s| s.metadata,
    );
    node_gauge(
        context,
        "stemedb_claims_cache_bytes",
        "Estimated memory held by the claims caches of this node's shards (budget: query.claims_cache_mb)",
        |c| c.shards.claims_cache_usage().0 as f64,
    );
    node_gauge(
        context,
        "stemedb_claims_cache_budget_bytes",
        "Memory budget of the claims caches of the shards this node hosts (query.claims_cache_mb)",
        |c| c.shards.claims_cache_budget() as f64,
    );
    node_gauge(context, "stemedb_claims_cache_entries", "Claims reads held by this node's claims caches", |c| {
        c.shards.claims_cache_usage().1 as f64
    });
    node_gauge(
        context,
        "stemedb_claims_cache_rendered_only_entries",
        "Of the claims caches' entries, those that hold only rendered answers (their claims evicted for memory)",
        |c| c.shards.claims_cache_rendered_only() as f64,
    );
    node_gauge(
        context,
        "stemedb_index_memory_bytes",
        "Memory held by indexes: the RocksDB index family's memtables and table readers, and the authority graph",
        |c| crate::api::indexes::index_memory_bytes(c) as f64,
    );
    node_gauge(
        context,
        "stemedb_index_entries",
        "Estimated entries in the secondary indexes (claims, concepts, by agent, quarantine)",
        |c| c.storage.index_stats().estimated_keys as f64,
    );
    node_gauge(
        context,
        "stemedb_index_size_bytes",
        "Bytes of the secondary indexes on disk (SST files of the index family)",
        |c| c.storage.index_stats().sst_bytes as f64,
    );
    node_gauge(context, "stemedb_authority_grants", "Active authority grants in the replicated policy", |c| {
        c.shards.policy().read(|s| s.authorities.grants().values().filter(|g| g.revoked_at_us.is_none()).count()) as f64
    });
    node_gauge(context, "stemedb_circuit_breakers_open", "Agents whose circuit breaker is open or half-open", |c| {
        let now = crate::model::id::now_us();
        c.shards.policy().read(|s| {
            s.breakers.values().filter(|b| b.state_at(now) != crate::meta::policy::BreakerState::Closed).count()
        }) as f64
    });
    node_gauge(
        context,
        "stemedb_shards_hibernating",
        "Shards this node leads whose Raft heartbeats are paused while idle",
        |c| c.shards.hibernating_count() as f64,
    );
    node_gauge(context, "stemedb_shards_led", "Shards whose Raft leader is this node", |c| {
        let leader = |g: &&std::sync::Arc<crate::raft::ShardGroup>| {
            g.raft.metrics().borrow().current_leader == Some(c.shards.node_id)
        };
        c.shards.groups().iter().filter(leader).count() as f64
    });
}

/// The heap profiler, with sampling switched on or off as `debug.heap_profiling` says. A
/// process whose allocator has no profiler (`MALLOC_CONF=prof:false`) runs without one.
fn start_heap_profiler(config: &Config) -> crate::metrics::heap_profile::HeapProfiler {
    use crate::metrics::heap_profile::HeapProfiler;
    let profiler = HeapProfiler::new(config.node.data_dir.join("heap-profiles"), config.debug.heap_profiles_kept);
    if !HeapProfiler::available() {
        tracing::info!("heap profiling unavailable: the allocator's profiler is off");
    } else if let Err(error) = profiler.set_sampling(config.debug.heap_profiling) {
        tracing::warn!(error = %error, "heap profile sampling not switched");
    }
    profiler
}

/// The start-up index verification (`storage.rebuild_indexes_on_start`): waits until the
/// cluster metadata says which shards this node hosts (up to a minute), then starts it.
fn rebuild_indexes_when_placed(context: &Arc<NodeContext>, stop: tokio_util::sync::CancellationToken) {
    let context = context.clone();
    let tasks = context.shards.tasks.clone();
    tasks.spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !context.shards.meta().is_bootstrapped() && Instant::now() < deadline {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        if let Err(error) = crate::api::indexes::start_rebuild(&context, "start-up") {
            tracing::warn!(error = %error.message, "start-up index rebuild not started");
        }
    });
}

/// Registers a gauge with one series per data shard, labelled `shard`, computed from each shard
/// group at each scrape (a shard this node holds no replica of reports its empty replica).
fn shard_gauge(
    context: &Arc<NodeContext>,
    name: &str,
    help: &str,
    value: impl Fn(&crate::raft::shards::ShardGroup) -> f64 + Send + Sync + 'static,
) {
    context.metrics.register(Box::new(shard_family(context, name, help, value)));
}

/// [`shard_gauge`] for a counter.
fn shard_counter(
    context: &Arc<NodeContext>,
    name: &str,
    help: &str,
    value: impl Fn(&crate::raft::shards::ShardGroup) -> f64 + Send + Sync + 'static,
) {
    context.metrics.register(Box::new(shard_family(context, name, help, value).into_counter()));
}

fn shard_family(
    context: &Arc<NodeContext>,
    name: &str,
    help: &str,
    value: impl Fn(&crate::raft::shards::ShardGroup) -> f64 + Send + Sync + 'static,
) -> ComputedGauges {
    let weak = Arc::downgrade(context);
    ComputedGauges::new(
        name,
        help,
        "shard",
        Box::new(move || {
            weak.upgrade()
                .map(|c| c.shards.groups().iter().map(|g| (g.shard.to_string(), value(g))).collect())
                .unwrap_or_default()
        }),
    )
}

/// An unlabelled counter of the node, read when scraped (`value` never goes down).
fn node_counter(
    context: &Arc<NodeContext>,
    name: &str,
    help: &str,
    value: impl Fn(&Arc<NodeContext>) -> f64 + Send + Sync + 'static,
) {
    context.metrics.register(Box::new(node_family(context, name, help, value).into_counter()));
}

/// Registers a gauge without labels computed from the node context at each scrape.
fn node_gauge(
    context: &Arc<NodeContext>,
    name: &str,
    help: &str,
    value: impl Fn(&Arc<NodeContext>) -> f64 + Send + Sync + 'static,
) {
    context.metrics.register(Box::new(node_family(context, name, help, value)));
}

fn node_family(
    context: &Arc<NodeContext>,
    name: &str,
    help: &str,
    value: impl Fn(&Arc<NodeContext>) -> f64 + Send + Sync + 'static,
) -> ComputedGauges {
    let weak = Arc::downgrade(context);
    ComputedGauges::new(
        name,
        help,
        "",
        Box::new(move || weak.upgrade().map(|c| vec![(String::new(), value(&c))]).unwrap_or_default()),
    )
}

/// Records the root authorities of `[authority] roots` in the meta group (once each: a root
/// already at its configured level is left alone), retrying until the meta group answers.
fn record_config_roots(
    shards: &Arc<ShardSet>,
    roots: &[crate::config::RootAuthority],
    stop: tokio_util::sync::CancellationToken,
) {
    if roots.is_empty() {
        return;
    }
    let shards = shards.clone();
    let roots = roots.to_vec();
    let tasks = shards.tasks.clone();
    let record = async move {
        for root in roots {
            loop {
                if shards.policy().read(|s| s.authorities.root_level(&root.agent_id, u64::MAX)) == Some(root.level) {
                    break;
                }
                let command = crate::meta::policy::PolicyCommand::SetRoot {
                    agent_id: root.agent_id.clone(),
                    level: Some(root.level),
                };
                match shards.propose_policy(command, Duration::from_secs(5)).await {
                    Ok(Ok(_)) => {
                        tracing::info!(agent_id = %root.agent_id, level = root.level, "root authority from config recorded");
                        break;
                    }
                    Ok(Err(error)) => {
                        tracing::error!(agent_id = %root.agent_id, error = %error, "config root authority refused");
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(error = %error, "config root authority not recorded yet; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    };
    // Shutdown stops it at any point, a proposal in flight included: the next start resumes.
    tasks.spawn(async move {
        tokio::select! {
            _ = record => {}
            _ = stop.cancelled() => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_runbooks_index_budget_reaches_storage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.toml");
        std::fs::write(&path, crate::config::MEMORY_RUNBOOK_SETTINGS).expect("write");
        let config = Config::check_file(&path).expect("valid");
        assert_eq!(storage_options(&config).index_cache_bytes, Some(1 << 30));
        assert_eq!(storage_options(&Config::default()).index_cache_bytes, None, "off by default");
    }

    #[test]
    fn a_joining_node_asks_over_https_when_its_cluster_speaks_it_trusting_its_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.cluster.join = "10.0.0.1:18181".into();
        let (base, _) = join_client(&config, Duration::from_secs(1)).expect("client");
        assert_eq!(base, "http://10.0.0.1:18181");
        crate::tls::create_ca(&dir.path().join("ca"), "test CA", 1).expect("ca");
        config.server.tls_cert_file = "web.pem".into();
        config.server.tls_ca_file = dir.path().join("ca/ca.pem").display().to_string();
        let (base, _) = join_client(&config, Duration::from_secs(1)).expect("client");
        assert_eq!(base, "https://10.0.0.1:18181");
        config.server.tls_ca_file = dir.path().join("missing.pem").display().to_string();
        let error = join_client(&config, Duration::from_secs(1)).err().expect("a missing CA file is an error");
        assert!(error.to_string().contains("missing.pem"), "{error}");
    }

    #[test]
    fn sizes_at_their_bounds_reach_storage_and_raft_without_overflow() {
        let config = crate::config::config_at_the_bounds().validate().expect("every value at its bound is valid");
        let storage = storage_options(&config);
        assert_eq!((storage.block_cache_bytes, storage.index_cache_bytes), (1 << 40, Some(1 << 40)));
        assert_eq!(raft_settings(&config).claims_cache_bytes, 1 << 40);
    }
}
