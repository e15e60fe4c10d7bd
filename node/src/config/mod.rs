//! Configuration: one serde tree, layered defaults → TOML file → `STEMEDB_<SECTION>_<KEY>`
//! environment variables → command-line flags, with unknown keys rejected at every layer, then
//! validated into the values the node runs with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::error::ErrorCode;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/stemedb/stemedb.toml";

/// The largest size a `*_mb` key may have: 1 TiB. The node turns them into bytes with
/// `(mb as usize) << 20`, which then cannot overflow.
pub const MAX_SIZE_MB: u64 = 1 << 20;

/// The longest timeout or period a `*_ms` or `*_seconds` key may have: one day. The node adds
/// them to `Instant::now()`, which panics on overflow, and nothing it waits for should take
/// longer.
pub const MAX_DURATION_SECONDS: u64 = 24 * 60 * 60;

/// Anti-entropy digest buckets per replica (`anti_entropy.buckets`): the default and the bounds
/// (a power of two: the Merkle tree over them is then full; see `shard::digest`).
pub const DEFAULT_DIGEST_BUCKETS: usize = 4096;
pub const MIN_DIGEST_BUCKETS: usize = 16;
pub const MAX_DIGEST_BUCKETS: usize = 65536;

/// Whether `count` is a digest bucket count anti-entropy accepts.
pub fn valid_digest_bucket_count(count: usize) -> bool {
    count.is_power_of_two() && (MIN_DIGEST_BUCKETS..=MAX_DIGEST_BUCKETS).contains(&count)
}

/// The largest `query.max_limit`: queries read `limit + 1` results per shard.
pub const MAX_PAGE_LIMIT: usize = 1_000_000;

// `MAX_SIZE_MB << 20` bytes (2^40) must fit in a usize.
const _: () = assert!(usize::BITS >= 64, "StemeDB needs a 64-bit target");

/// A [`Config`] that passed [`Config::validate`], the only kind a node runs with. It is read
/// through `Deref` and cannot be changed, so its values stay within the checked bounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ValidatedConfig(Config);

impl ValidatedConfig {
    /// The config itself, for changes the validation no longer covers.
    pub fn into_inner(self) -> Config {
        self.0
    }
}

impl std::ops::Deref for ValidatedConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config error: {0}")]
    Invalid(String),
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

impl ConfigError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ConfigError::Invalid(_) => ErrorCode::ConfigInvalid,
            ConfigError::File { .. } => ErrorCode::ConfigFileError,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeSection,
    pub server: ServerSection,
    pub cluster: ClusterSection,
    pub storage: StorageSection,
    pub raft: RaftSection,
    pub anti_entropy: AntiEntropySection,
    pub limits: LimitsSection,
    pub query: QuerySection,
    pub security: SecuritySection,
    pub rate_limits: RateLimitsSection,
    pub authority: AuthoritySection,
    pub quarantine: QuarantineSection,
    pub circuit_breaker: CircuitBreakerSection,
    pub logging: LoggingSection,
    pub debug: DebugSection,
    pub backup: BackupSection,
    pub testing: TestingSection,
}

/// Authority (DESIGN §2): root authorities and the chain depth limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthoritySection {
    /// Root authorities recorded in the cluster at startup (`[[authority.roots]]` tables with
    /// `agent_id` and `level`); admins add more with `POST /v1/admin/authority/roots`.
    pub roots: Vec<RootAuthority>,
    /// Chains of more grants than this do not count. Must be the same on every node.
    pub max_chain_depth: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootAuthority {
    pub agent_id: String,
    pub level: u8,
}

/// Quarantine triggers (DESIGN §2). The shard leader decides before proposing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineSection {
    /// Concept prefixes where an agent needs authority to be heard: claims there by agents
    /// without authority for the path are quarantined.
    pub require_authority_prefixes: Vec<String>,
    /// A claim that contradicts an active claim (same concept_path and predicate, another value)
    /// by an agent at or above this level is quarantined, unless its own agent is at or above
    /// it too. 0 turns this trigger off.
    pub protect_authority_level: u8,
}

/// Per-agent circuit breakers (DESIGN §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerSection {
    /// Open breakers automatically on the rates below (manual trips work either way).
    pub enabled: bool,
    /// Writes (assertions, votes, retractions) per second one agent may send through one node.
    pub max_writes_per_sec: u32,
    /// Invalid requests per second one agent may send through one node.
    pub max_invalid_per_sec: u32,
    /// How long an automatically opened breaker stays open; doubles on each consecutive trip.
    pub open_seconds: u64,
    /// The longest open period the doubling reaches.
    pub max_open_seconds: u64,
    /// Successful writes a half-open breaker lets through (one per second per node) before it
    /// closes again.
    pub half_open_probes: u32,
    /// What happens to writes of an agent whose breaker is open: `reject` (429 for automatic
    /// trips, 403 for manual ones) or `quarantine` (stored, kept out of the lenses).
    pub mode: String,
}

impl Default for AuthoritySection {
    fn default() -> Self {
        AuthoritySection { roots: Vec::new(), max_chain_depth: crate::model::authority::DEFAULT_MAX_CHAIN_DEPTH }
    }
}

impl Default for QuarantineSection {
    fn default() -> Self {
        QuarantineSection { require_authority_prefixes: Vec::new(), protect_authority_level: 80 }
    }
}

impl Default for CircuitBreakerSection {
    fn default() -> Self {
        CircuitBreakerSection {
            enabled: true,
            max_writes_per_sec: 2_000,
            max_invalid_per_sec: 50,
            open_seconds: 30,
            max_open_seconds: 600,
            half_open_probes: 5,
            mode: "reject".into(),
        }
    }
}

/// Deliberate bugs, for proving that the chaos harness catches them. Never set in production:
/// the node logs an error at startup while any is on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingSection {
    /// Serve `linearizable` reads from the local replica without a read barrier (a follower
    /// answers from whatever it has applied), breaking linearizability.
    pub unsafe_skip_read_barrier: bool,
    /// Pause every snapshot install this long after its first data batch, so a test can kill
    /// the node in the middle of one. 0: no pause.
    pub snapshot_install_pause_ms: u64,
    /// Delay the start-up scrub of every replica this long, so a test can watch a replica that
    /// is not checked yet (it must neither lead nor serve). 0: no delay.
    pub start_up_scrub_delay_ms: u64,
    /// Hold every group-commit round of the Raft log this long before its write and fsync, so a
    /// test can kill a leader whose entries its followers have and it has not. 0: no delay.
    pub log_sync_delay_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// This node's id in the cluster (1 and up); remembered by the data dir.
    pub id: u64,
    /// Where the node keeps its database (`<data_dir>/db`).
    pub data_dir: PathBuf,
}

/// Whether `addr` is `IP:PORT` with a loopback IP (IPv4-mapped ones included).
fn is_loopback(addr: &str) -> bool {
    addr.parse::<SocketAddr>().is_ok_and(|a| a.ip().to_canonical().is_loopback())
}

/// `server.dashboard_addr`: port [`DASHBOARD_PORT`] on the IP of the more private of the client
/// API and the cluster admin, if free.
pub const DASHBOARD_AUTO: &str = "auto";
/// `server.dashboard_addr`: no dashboard.
pub const DASHBOARD_OFF: &str = "off";
/// The dashboard's default port.
pub const DASHBOARD_PORT: u16 = 18188;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Client API, `/metrics` and node admin (HTTP/JSON).
    pub api_addr: String,
    /// Cluster admin (HTTP/JSON).
    pub admin_addr: String,
    /// Inter-node gRPC (Raft, forwarding, anti-entropy).
    pub raft_addr: String,
    /// The web dashboard (`HOST:PORT`); `auto` (the default): port 18188 on the IP of the more
    /// private of `api_addr` and `admin_addr`, skipped with a warning when that port is taken
    /// (several test nodes on one address); `off`: none.
    pub dashboard_addr: String,
    /// Seconds to wait for in-flight requests at shutdown.
    pub shutdown_grace_seconds: u64,
    /// Requests each HTTP port (client API, cluster admin) serves at once; more are answered
    /// `503 overloaded` with `Retry-After` at once rather than queued without bound.
    pub max_concurrent_requests: usize,
    /// PEM certificate chain of the HTTP ports (client API and cluster admin): with
    /// `tls_key_file`, they speak HTTPS only. Reloaded on SIGHUP.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// PEM CA certificate(s) this node trusts, besides the system's roots, for the other nodes'
    /// HTTPS (a joining node's requests to `cluster.join`).
    pub tls_ca_file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Number of shards, fixed when the data dir is first created.
    pub shards: u16,
    /// Replicas per shard (fewer only while the cluster has fewer nodes).
    pub replication_factor: u16,
    /// Forms a new cluster: `1=HOST:18182,2=HOST:18182,3=HOST:18182` (node id = Raft address),
    /// the same on every founding node. Empty: a single-node cluster of this node.
    pub initial_cluster: String,
    /// Dial some peer Raft addresses through others: `ADDR=VIA,...`. For fault injection: test
    /// harnesses put a proxy on each link to drop, delay or partition it.
    pub peer_dial_overrides: String,
    /// Send the transport's hot requests (batched AppendEntries, forwarded writes, read
    /// indexes) as frames on one connection per peer (`raft::frames`); false: all gRPC.
    pub frame_transport: bool,
    /// Joins a running cluster through this cluster-admin address (`HOST:18181` of any member)
    /// instead of forming one. Exclusive with `initial_cluster`.
    pub join: String,
    /// Balance replica counts across nodes automatically (the meta leader moves one replica at a
    /// time). Repairs and decommissions run either way.
    pub auto_rebalance: bool,
    /// Seconds allowed for one replica move (the new replica catching up included).
    pub rebalance_move_timeout_seconds: u64,
    /// A node unreachable this long has its replicas re-created on live nodes (when enough
    /// live nodes remain) and is decommissioned. 0: never.
    pub dead_node_timeout_seconds: u64,
    /// Mutual TLS on the transport (18182): the cluster CA's PEM certificate. With
    /// `tls_cert_file` and `tls_key_file` (this node's certificate from that CA, carrying the
    /// DNS name `stemedb-node`), only nodes with a certificate from the CA get through.
    /// Reloaded on SIGHUP.
    pub tls_ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// RocksDB block cache shared by all column families (env alias `STEMEDB_CACHE_SIZE_MB`).
    pub max_cache_size_mb: u64,
    /// Memtable budget per column family. 16 MiB: a smaller skip list costs an apply fewer cache
    /// misses per insert and lookup (docs/performance.md, "smaller memtables").
    pub write_buffer_mb: u64,
    /// fsync the Raft log before acknowledging writes. Turn off only for throwaway benchmarks.
    pub fsync: bool,
    /// Verify and repair the secondary indexes in the background after every start (as
    /// `POST /v1/admin/indexes/rebuild` does; writes and reads go on meanwhile).
    pub rebuild_indexes_on_start: bool,
    /// Read every table file (checksums verified) before the node opens its Raft groups. A
    /// damaged file is set aside by a RocksDB repair and the replicas whose keys it held are
    /// re-seeded from their peers, instead of a read failing later and stopping a group.
    pub verify_on_start: bool,
    /// Give the `index` column family its own block cache of `index_max_memory_mb`, whose
    /// blocks are evicted (least recently used first) past that size, instead of sharing the
    /// block cache with the claims data.
    pub index_eviction_enabled: bool,
    /// Size of the index family's own block cache, with `index_eviction_enabled`.
    pub index_max_memory_mb: u64,
    /// The free-space floor, with `min_free_percent` (the greater applies): below it on the
    /// data dir's filesystem the node refuses writes with `507 insufficient_storage` and keeps
    /// serving reads and admin; the space it keeps free is Raft's own reserve. 0 and 0: off.
    pub min_free_bytes: u64,
    /// The floor as a percent (0-50) of the filesystem's size.
    pub min_free_percent: f64,
}

/// Anti-entropy (`cluster::anti_entropy`): check entries, the scrub, and automatic repair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AntiEntropySection {
    /// Run checks, scrubs and repairs. Digests are kept either way.
    pub enabled: bool,
    /// Seconds between check entries of a shard that was written since its last check.
    pub interval_seconds: u64,
    /// Bytes per second one scrub reads from disk to recompute the digests (0: unlimited).
    pub scrub_bytes_per_second: u64,
    /// Seconds between the starts of two scrubs of a replica.
    pub scrub_interval_seconds: u64,
    /// Digest buckets per replica: a power of two from 16 to 65536. Every replica of a shard
    /// compares only with replicas that have the same count; a change rebuilds them at start.
    pub buckets: usize,
    /// Differing buckets above which a replica is re-seeded whole rather than bucket by bucket.
    pub reseed_buckets: usize,
}

impl Default for AntiEntropySection {
    fn default() -> Self {
        AntiEntropySection {
            enabled: true,
            interval_seconds: 10,
            scrub_bytes_per_second: 16 << 20,
            scrub_interval_seconds: 30,
            buckets: DEFAULT_DIGEST_BUCKETS,
            reseed_buckets: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Also build one once the log since the last snapshot holds this many MiB (as appended
    /// since the node started); 0: by entry count only.
    pub snapshot_log_mb_since_last: u64,
    /// Log entries kept after a snapshot so that slow followers can catch up by log.
    pub logs_to_keep_after_snapshot: u64,
    /// How long a write waits for its shard to commit and apply it before answering 504.
    pub write_timeout_ms: u64,
    /// Let a shard's leader answer linearizable reads from its read lease (every voter accepted
    /// its AppendEntries recently, so no other node can be elected) instead of a heartbeat round
    /// to a quorum per read barrier. Off: every barrier takes the round.
    pub lease_reads: bool,
    /// Let a shard's leader send its new entries to its caught-up followers as it appends them,
    /// so that their fsyncs overlap its own (`raft::early`). Off: the followers receive them
    /// after the leader's fsync, from openraft's replication.
    pub early_replication: bool,
}

impl RaftSection {
    /// How long a shard may have no known leader before health reports count it as without
    /// one: a hand-over or an election ends within one maximum election timeout.
    pub fn leaderless_grace(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.election_timeout_max_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest encoded assertion value.
    pub max_value_bytes: usize,
    /// Deepest nesting of arrays and objects in a value or `source` (1-1024): deeper JSON
    /// defeats common clients' parsers when read back.
    pub max_value_depth: usize,
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Most items in one `/v1/assert/batch`.
    pub max_batch_items: usize,
    /// Single-assertion writes that may wait per shard for the next coalesced entry (on the
    /// shard's leader, batches other nodes forwarded count one each); more are answered `503
    /// overloaded` with `Retry-After`.
    pub max_queued_writes_per_shard: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuerySection {
    /// Results per page when a query gives no `limit`.
    pub default_limit: usize,
    /// Largest `limit` a query may ask for.
    pub max_limit: usize,
    /// A query taking longer than this answers 504.
    pub query_timeout_seconds: u64,
    /// Queries slower than this are logged.
    pub slow_query_ms: u64,
    /// Slow queries kept for `GET /v1/admin/slow-queries` (oldest dropped first; 0 keeps none).
    pub slow_query_log_size: usize,
    /// Memory budget (MiB, estimated) of the per-shard caches of claims read by queries, for
    /// all shards together; 0 disables the cache.
    pub claims_cache_mb: u64,
    /// Most memory (MiB, estimated) one query may hold: the claims it reads and the answer it
    /// builds. A query past it stops reading and answers 422 `query_memory_exceeded`; 0 means
    /// no limit.
    pub max_memory_per_query_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySection {
    /// Token for `/v1/admin/*` and admin retractions (`Authorization: Bearer <token>`). When
    /// empty, admin endpoints only answer requests from loopback addresses. With `tokens`, it
    /// is one more admin token (named `admin_token`), the one a joining node presents.
    pub admin_token: String,
    /// Require an Ed25519 signature on every write.
    pub require_signatures: bool,
    /// Bearer tokens of the HTTP APIs (`[[security.tokens]]`: `name`, `sha256`, `role`,
    /// `agents`). With any, every request but health checks and `/metrics` needs one with a
    /// role that covers its endpoint class. Reloaded on SIGHUP.
    pub tokens: Vec<TokenConfig>,
    /// Let a node whose client API or cluster admin listens on a non-loopback address start
    /// without `tokens`: anyone who reaches it may then read and write, `/v1/admin/*` needs
    /// `admin_token` (no one when it is empty but loopback clients), and the cluster admin's
    /// changes on 18181 are open to anyone unless `admin_token` is set.
    pub allow_unauthenticated: bool,
}

/// One bearer token: its holder's name (in logs, metrics and the audit log; the token itself
/// never is), the SHA-256 of the token in hex (`stemedb token create` makes both), its role,
/// and the agent ids it may write as (empty: any).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub sha256: String,
    pub role: TokenRole,
    #[serde(default)]
    pub agents: Vec<String>,
}

/// What a token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Queries, listings, authority lookups, cluster status.
    Read,
    /// Claims, votes, retractions of one's own claims, grants.
    Write,
    /// `/v1/admin/*`, admin retractions, cluster changes on 18181.
    Admin,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Read => "read",
            TokenRole::Write => "write",
            TokenRole::Admin => "admin",
        }
    }
}

/// Request rates per endpoint class and caller (a token's name, else the client's address),
/// answered `429 rate_limited` with `Retry-After` past them. 0: no limit. Reloaded on SIGHUP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsSection {
    /// Reads (queries, listings, authority lookups, cluster status) per second per caller.
    pub read_per_second: u32,
    /// Writes (claims, batches, votes, retractions, grants) per second per caller.
    pub write_per_second: u32,
    /// Admin requests per second per caller.
    pub admin_per_second: u32,
    /// A caller may send this many seconds' worth of its rate at once (at least one request).
    pub burst_seconds: u32,
}

impl Default for RateLimitsSection {
    fn default() -> Self {
        RateLimitsSection { read_per_second: 0, write_per_second: 0, admin_per_second: 0, burst_seconds: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

/// Backups (`stemedb backup`, `POST /v1/admin/backup`; docs/backup.md). S3 credentials come
/// from the usual `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`); the `s3_*` keys here override them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupSection {
    /// Where `stemedb backup create` and the backup timer write when no `--to` is given: a
    /// directory or `s3://bucket/prefix`. Empty: `--to` is required.
    pub destination: String,
    /// After each successful backup, manifests older than this many days are deleted (the
    /// newest backup is always kept), then the files no kept backup uses. 0 keeps everything.
    pub retention_days: u64,
    /// Compress backup files (LZ4).
    pub compression_enabled: bool,
    /// S3 endpoint (for S3-compatible stores); empty: AWS's, or `AWS_ENDPOINT`.
    pub s3_endpoint: String,
    /// S3 region; empty: `AWS_REGION`, else `us-east-1`.
    pub s3_region: String,
    /// Allow a plain-HTTP S3 endpoint (a local S3-compatible server).
    pub s3_allow_http: bool,
    /// Files uploaded at the same time by one node.
    pub max_concurrent_uploads: usize,
    /// Bytes of replica records one node reads for backups per second, in MiB (0: no limit):
    /// a backup reads whole replicas, and this keeps it from taking the cores writes need.
    pub max_read_mb_per_second: u64,
    /// The same pace while the node is taking writes (its Raft log appended within the last
    /// second), in MiB per second (0: `max_read_mb_per_second` also then): a backup that overlaps
    /// writes yields to them and takes longer. Never faster than `max_read_mb_per_second`.
    pub busy_read_mb_per_second: u64,
    /// Continuous Raft log archival to `destination` (`cluster::backup::archive`): each group's
    /// leader ships its committed entries there, and no replica purges a log entry before it is
    /// archived. It gives `stemedb backup restore --as-of` and an RPO of seconds.
    pub archive_enabled: bool,
    /// How often a leader ships what its groups committed since the last segment (ms).
    pub archive_interval_ms: u64,
}

impl Default for BackupSection {
    fn default() -> Self {
        BackupSection {
            destination: String::new(),
            retention_days: 7,
            compression_enabled: true,
            s3_endpoint: String::new(),
            s3_region: String::new(),
            s3_allow_http: false,
            max_concurrent_uploads: 8,
            max_read_mb_per_second: 16,
            busy_read_mb_per_second: 2,
            archive_enabled: false,
            archive_interval_ms: 2000,
        }
    }
}

/// Diagnostics: the heap profiler (`/v1/admin/debug/heap-profile`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugSection {
    /// Sample allocations for heap profiles from start-up (one sample per 512 KiB allocated, on
    /// average). When off, the first `POST /v1/admin/debug/heap-profile` switches it on.
    pub heap_profiling: bool,
    /// Heap profiles kept in `<data_dir>/heap-profiles/`; older ones are deleted.
    pub heap_profiles_kept: usize,
}

impl Default for DebugSection {
    fn default() -> Self {
        DebugSection { heap_profiling: true, heap_profiles_kept: 8 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: NodeSection::default(),
            server: ServerSection::default(),
            cluster: ClusterSection::default(),
            storage: StorageSection::default(),
            raft: RaftSection::default(),
            anti_entropy: AntiEntropySection::default(),
            limits: LimitsSection::default(),
            query: QuerySection::default(),
            security: SecuritySection::default(),
            rate_limits: RateLimitsSection::default(),
            authority: AuthoritySection::default(),
            quarantine: QuarantineSection::default(),
            circuit_breaker: CircuitBreakerSection::default(),
            logging: LoggingSection::default(),
            debug: DebugSection::default(),
            backup: BackupSection::default(),
            testing: TestingSection::default(),
        }
    }
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection { id: 1, data_dir: PathBuf::from("./stemedb-data") }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            api_addr: "127.0.0.1:18180".into(),
            admin_addr: "127.0.0.1:18181".into(),
            raft_addr: "127.0.0.1:18182".into(),
            dashboard_addr: DASHBOARD_AUTO.into(),
            shutdown_grace_seconds: 10,
            max_concurrent_requests: 4096,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_ca_file: String::new(),
        }
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            shards: 16,
            replication_factor: 3,
            initial_cluster: String::new(),
            peer_dial_overrides: String::new(),
            frame_transport: true,
            join: String::new(),
            auto_rebalance: true,
            rebalance_move_timeout_seconds: 120,
            dead_node_timeout_seconds: 300,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// `storage.min_free_bytes` by default: 256 MiB.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 << 20;

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            max_cache_size_mb: 1024,
            write_buffer_mb: 16,
            fsync: true,
            rebuild_indexes_on_start: true,
            verify_on_start: true,
            index_eviction_enabled: false,
            index_max_memory_mb: 1024,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            min_free_percent: 1.0,
        }
    }
}

/// The largest `raft.snapshot_log_mb_since_last`: 1 TiB of log per group.
const MAX_SNAPSHOT_LOG_MB: u64 = 1 << 20;

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            // Idle groups hibernate (raft::hibernation), so idle cost does not depend on this;
            // it sets how fast a dead leader is replaced. See docs/performance.md.
            heartbeat_interval_ms: 150,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            snapshot_logs_since_last: 20_000,
            snapshot_log_mb_since_last: 1_024,
            logs_to_keep_after_snapshot: 1_000,
            write_timeout_ms: 5_000,
            lease_reads: true,
            early_replication: true,
        }
    }
}

impl LimitsSection {
    pub fn value_limits(&self) -> crate::model::assertion::ValueLimits {
        crate::model::assertion::ValueLimits { max_bytes: self.max_value_bytes, max_depth: self.max_value_depth }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_value_bytes: 64 * 1024,
            max_value_depth: 64,
            max_request_bytes: 32 * 1024 * 1024,
            max_batch_items: 1000,
            max_queued_writes_per_shard: 4096,
        }
    }
}

impl Default for QuerySection {
    fn default() -> Self {
        QuerySection {
            default_limit: 100,
            max_limit: 1000,
            query_timeout_seconds: 30,
            slow_query_ms: 100,
            slow_query_log_size: 1000,
            claims_cache_mb: 64,
            max_memory_per_query_mb: 256,
        }
    }
}

impl Default for SecuritySection {
    fn default() -> Self {
        SecuritySection {
            admin_token: String::new(),
            require_signatures: false,
            tokens: Vec::new(),
            allow_unauthenticated: false,
        }
    }
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection { level: "info".into(), format: "text".into() }
    }
}

const SECTIONS: [&str; 17] = [
    "node",
    "server",
    "cluster",
    "storage",
    "raft",
    "anti_entropy",
    "limits",
    "query",
    "security",
    "rate_limits",
    "authority",
    "quarantine",
    "circuit_breaker",
    "logging",
    "debug",
    "backup",
    "testing",
];

/// Environment variables the runbooks use that do not follow `STEMEDB_<SECTION>_<KEY>`.
const ENV_ALIASES: [(&str, &str); 1] = [("cache_size_mb", "storage.max_cache_size_mb")];

const COMPACTS_ON_ITS_OWN: &str =
    "RocksDB compacts in the background on its own; POST /v1/admin/storage/compact runs a manual compaction";

/// Settings of the runbooks StemeDB was started from that it does not take, with what does their
/// job here. They are still errors, like every unknown key, but the error says where to go.
const RUNBOOK_SETTINGS_REPLACED: [(&str, &str); 9] = [
    (
        "wal",
        "there is no separate write-ahead log: each shard's Raft log in RocksDB is its log, \
         truncated after each snapshot (raft.snapshot_logs_since_last, raft.logs_to_keep_after_snapshot)",
    ),
    ("storage.compaction_enabled", COMPACTS_ON_ITS_OWN),
    ("storage.compaction_interval_hours", COMPACTS_ON_ITS_OWN),
    ("storage.compaction_threshold_mb", COMPACTS_ON_ITS_OWN),
    ("storage.enable_auto_compaction", COMPACTS_ON_ITS_OWN),
    ("storage.compaction_trigger_mb", COMPACTS_ON_ITS_OWN),
    (
        "runtime.memory_ballast_mb",
        "StemeDB has no garbage collector, so a ballast has nothing to do; memory is bounded by \
         storage.max_cache_size_mb, storage.write_buffer_mb, query.claims_cache_mb and query.max_memory_per_query_mb (docs/sizing.md)",
    ),
    ("runtime", "StemeDB has no [runtime] section"),
    (
        "resources",
        "the budgets are storage.max_cache_size_mb (cache_limit_mb) and storage.index_max_memory_mb with \
         storage.index_eviction_enabled (index_limit_mb); for a hard cap on the process (max_memory_mb), \
         use the service manager's (systemd MemoryMax=)",
    ),
];

/// The first setting of the runbooks that StemeDB replaces found in `figment`, as an error.
fn replaced_runbook_setting(figment: &Figment) -> Option<String> {
    RUNBOOK_SETTINGS_REPLACED.iter().find(|(path, _)| figment.find_value(path).is_ok()).map(|(path, instead)| {
        format!("`{path}` is a setting of the runbooks StemeDB was started from, not of StemeDB: {instead}")
    })
}

/// Maps `STEMEDB_<SECTION>_<KEY>` (prefix already stripped, lowercased) to `section.key`.
fn env_key_path(key: &str) -> String {
    let key = key.to_ascii_lowercase();
    let key = key.as_str();
    if let Some((_, path)) = ENV_ALIASES.iter().find(|(alias, _)| *alias == key) {
        return path.to_string();
    }
    // The runbooks' own sections map the same way, so that their errors can name them.
    let runbook_sections = RUNBOOK_SETTINGS_REPLACED.iter().map(|(path, _)| path).filter(|path| !path.contains('.'));
    for section in SECTIONS.iter().chain(runbook_sections) {
        if let Some(rest) = key.strip_prefix(section).and_then(|r| r.strip_prefix('_')) {
            return format!("{section}.{rest}");
        }
    }
    // Not a known section: left as a top-level key, which the strict parser rejects by name.
    key.to_string()
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raft_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dashboard_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_cluster: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
}

impl FlagOverrides {
    fn as_figment(&self) -> Figment {
        let mut figment = Figment::new();
        if let Some(v) = &self.data_dir {
            figment = figment.merge(Serialized::default("node.data_dir", v));
        }
        if let Some(v) = self.node_id {
            figment = figment.merge(Serialized::default("node.id", v));
        }
        if let Some(v) = &self.api_addr {
            figment = figment.merge(Serialized::default("server.api_addr", v));
        }
        if let Some(v) = &self.admin_addr {
            figment = figment.merge(Serialized::default("server.admin_addr", v));
        }
        if let Some(v) = &self.raft_addr {
            figment = figment.merge(Serialized::default("server.raft_addr", v));
        }
        if let Some(v) = &self.dashboard_addr {
            figment = figment.merge(Serialized::default("server.dashboard_addr", v));
        }
        if let Some(v) = &self.initial_cluster {
            figment = figment.merge(Serialized::default("cluster.initial_cluster", v));
        }
        if let Some(v) = &self.join {
            figment = figment.merge(Serialized::default("cluster.join", v));
        }
        figment
    }
}

impl Config {
    /// Loads and validates the layered configuration. `file` of `None` uses
    /// [`DEFAULT_CONFIG_PATH`] if present.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<ValidatedConfig, ConfigError> {
        Self::load_with_env(file, flags, Env::prefixed("STEMEDB_"))
    }

    fn load_with_env(file: Option<&Path>, flags: &FlagOverrides, env: Env) -> Result<ValidatedConfig, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::File { path: path.to_path_buf(), message: "no such file".into() });
                }
                figment = figment.merge(Toml::file(path));
            }
            None => {
                if Path::new(DEFAULT_CONFIG_PATH).exists() {
                    figment = figment.merge(Toml::file(DEFAULT_CONFIG_PATH));
                }
            }
        }
        // STEMEDB_LOG is the log filter read by the binary, not a config key.
        let env = env
            .filter_map(|key| (!key.as_str().eq_ignore_ascii_case("log")).then(|| env_key_path(key.as_str()).into()));
        figment = figment.merge(env).merge(flags.as_figment());
        if let Some(message) = replaced_runbook_setting(&figment) {
            return Err(ConfigError::Invalid(message));
        }
        let config: Config = figment.extract().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()
    }

    /// Parses and validates one TOML file on its own (for `stemedb check-config`).
    pub fn check_file(path: &Path) -> Result<ValidatedConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File { path: path.to_path_buf(), message: e.to_string() })?;
        let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(&text));
        if let Some(message) = replaced_runbook_setting(&figment) {
            return Err(ConfigError::File { path: path.to_path_buf(), message });
        }
        let config: Config =
            figment.extract().map_err(|e| ConfigError::File { path: path.to_path_buf(), message: e.to_string() })?;
        config.validate()
    }

    /// Checks the values that types alone do not; the error names the key and what it must be.
    pub fn validate(self) -> Result<ValidatedConfig, ConfigError> {
        self.check()?;
        Ok(ValidatedConfig(self))
    }

    fn check(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        self.check_bounds()?;
        if self.node.id == 0 {
            return fail("node.id must be 1 or more".into());
        }
        for (name, addr) in [
            ("server.api_addr", &self.server.api_addr),
            ("server.admin_addr", &self.server.admin_addr),
            ("server.raft_addr", &self.server.raft_addr),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                return fail(format!("{name} = {addr:?} is not HOST:PORT with an IP address"));
            }
        }
        let dashboard = &self.server.dashboard_addr;
        if ![DASHBOARD_AUTO, DASHBOARD_OFF].contains(&dashboard.as_str()) && dashboard.parse::<SocketAddr>().is_err() {
            return fail(format!(
                "server.dashboard_addr = {dashboard:?} is not HOST:PORT with an IP address, \"{DASHBOARD_AUTO}\" or \"{DASHBOARD_OFF}\""
            ));
        }
        if !valid_digest_bucket_count(self.anti_entropy.buckets) {
            return fail(format!(
                "anti_entropy.buckets = {}: must be a power of two from {} to {}",
                self.anti_entropy.buckets, MIN_DIGEST_BUCKETS, MAX_DIGEST_BUCKETS
            ));
        }
        if self.anti_entropy.interval_seconds == 0 {
            return fail("anti_entropy.interval_seconds must be 1 or more".into());
        }
        if self.cluster.shards == 0 || self.cluster.shards > 4096 {
            return fail("cluster.shards must be between 1 and 4096".into());
        }
        self.check_security()?;
        let percent = self.storage.min_free_percent;
        if !(0.0..=50.0).contains(&percent) {
            return fail(format!(
                "storage.min_free_percent is {percent}: expected 0 to 50 (0 with min_free_bytes 0: no floor)"
            ));
        }
        if self.storage.write_buffer_mb == 0 {
            return fail(
                "storage.write_buffer_mb is 0: it must be at least 1 (each column family's memtable; the write-ahead log is kept under 4 × this)".into(),
            );
        }
        if self.storage.index_eviction_enabled && self.storage.index_max_memory_mb == 0 {
            return fail(
                "storage.index_max_memory_mb is 0: with storage.index_eviction_enabled it must be at least 1".into(),
            );
        }
        self.dial_overrides()?;
        let members = self.initial_members()?;
        if !self.cluster.join.is_empty() {
            if !self.cluster.initial_cluster.is_empty() {
                return fail("cluster.join and cluster.initial_cluster exclude each other: join a running cluster or form a new one".into());
            }
            if self.cluster.join.parse::<SocketAddr>().is_err() {
                return fail(format!(
                    "cluster.join = {:?} is not HOST:PORT of a cluster admin endpoint",
                    self.cluster.join
                ));
            }
        } else if !members.contains_key(&self.node.id) {
            return fail(format!("cluster.initial_cluster does not list this node (node.id = {})", self.node.id));
        }
        if self.cluster.replication_factor == 0 {
            return fail("cluster.replication_factor must be at least 1".into());
        }
        if self.raft.election_timeout_min_ms <= self.raft.heartbeat_interval_ms
            || self.raft.election_timeout_max_ms <= self.raft.election_timeout_min_ms
        {
            return fail("raft: need heartbeat_interval_ms < election_timeout_min_ms < election_timeout_max_ms".into());
        }
        // The leader lease is half the maximum and the random part of the timeout must exceed a
        // heartbeat (`raft::shards::openraft_election_timeouts`).
        if self.raft.heartbeat_interval_ms.saturating_add(1) >= self.raft.election_timeout_max_ms / 2 {
            return fail(format!(
                "raft: need heartbeat_interval_ms + 1 < election_timeout_max_ms / 2 (heartbeat {} ms, maximum election timeout {} ms)",
                self.raft.heartbeat_interval_ms, self.raft.election_timeout_max_ms
            ));
        }
        if self.raft.snapshot_log_mb_since_last > MAX_SNAPSHOT_LOG_MB {
            return fail(format!(
                "raft.snapshot_log_mb_since_last is {}: expected 0 (off) to {MAX_SNAPSHOT_LOG_MB}",
                self.raft.snapshot_log_mb_since_last
            ));
        }
        if !(1..=1024).contains(&self.limits.max_value_depth) {
            return fail(format!("limits.max_value_depth is {}: expected 1-1024", self.limits.max_value_depth));
        }
        if self.limits.max_value_bytes == 0 || self.limits.max_value_bytes > self.limits.max_request_bytes {
            return fail("limits.max_value_bytes must be positive and at most limits.max_request_bytes".into());
        }
        if self.limits.max_batch_items == 0 || self.limits.max_batch_items > crate::model::id::MAX_ITEMS_PER_ENTRY {
            return fail(format!(
                "limits.max_batch_items must be between 1 and {}",
                crate::model::id::MAX_ITEMS_PER_ENTRY
            ));
        }
        if !(1..=1 << 20).contains(&self.limits.max_queued_writes_per_shard) {
            return fail("limits.max_queued_writes_per_shard must be between 1 and 1048576".into());
        }
        if !(1..=1 << 20).contains(&self.server.max_concurrent_requests) {
            return fail("server.max_concurrent_requests must be between 1 and 1048576".into());
        }
        if self.query.default_limit == 0 || self.query.default_limit > self.query.max_limit {
            return fail("query.default_limit must be between 1 and query.max_limit".into());
        }
        if !(1..=16).contains(&self.authority.max_chain_depth) {
            return fail("authority.max_chain_depth must be between 1 and 16".into());
        }
        for root in &self.authority.roots {
            if crate::model::assertion::validate_agent_id(&root.agent_id).is_err() || root.level > 100 {
                return fail(format!(
                    "authority.roots entry {:?}: agent_id must be 1-128 characters and level 0-100",
                    root.agent_id
                ));
            }
        }
        for prefix in &self.quarantine.require_authority_prefixes {
            if crate::model::assertion::validate_concept_prefix(prefix).is_err() {
                return fail(format!("quarantine.require_authority_prefixes entry {prefix:?} is not a concept prefix"));
            }
        }
        if self.quarantine.protect_authority_level > 100 {
            return fail("quarantine.protect_authority_level must be 0-100".into());
        }
        if !matches!(self.circuit_breaker.mode.as_str(), "reject" | "quarantine") {
            return fail(format!(
                "circuit_breaker.mode = {:?}: expected \"reject\" or \"quarantine\"",
                self.circuit_breaker.mode
            ));
        }
        if self.circuit_breaker.max_writes_per_sec == 0
            || self.circuit_breaker.max_invalid_per_sec == 0
            || self.circuit_breaker.open_seconds == 0
            || self.circuit_breaker.max_open_seconds < self.circuit_breaker.open_seconds
            || self.circuit_breaker.half_open_probes == 0
        {
            return fail("circuit_breaker: rates, open_seconds and half_open_probes must be positive, max_open_seconds at least open_seconds".into());
        }
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            return fail(format!("logging.format = {:?}: expected \"text\" or \"json\"", self.logging.format));
        }
        if !(1..=1000).contains(&self.debug.heap_profiles_kept) {
            return fail(format!("debug.heap_profiles_kept is {}: expected 1-1000", self.debug.heap_profiles_kept));
        }
        if !(1..=64).contains(&self.backup.max_concurrent_uploads) {
            return fail(format!(
                "backup.max_concurrent_uploads is {}: expected 1-64",
                self.backup.max_concurrent_uploads
            ));
        }
        if self.backup.retention_days > 36_500 {
            return fail(format!(
                "backup.retention_days is {}: at most 36500 (0 keeps every backup)",
                self.backup.retention_days
            ));
        }
        if self.backup.archive_enabled && self.backup.destination.is_empty() {
            return fail("backup.archive_enabled needs backup.destination (where the log is archived)".into());
        }
        if self.backup.archive_enabled && self.backup.archive_interval_ms < 100 {
            return fail(format!("backup.archive_interval_ms is {}: at least 100", self.backup.archive_interval_ms));
        }
        Ok(())
    }

    /// The first HTTP API address (`server.api_addr`, `server.admin_addr`,
    /// `server.dashboard_addr`, which serves both APIs) that is not a loopback address, with its
    /// key: where a node without tokens would be open to a network.
    pub fn exposed_http_addr(&self) -> Option<(&'static str, &str)> {
        let dashboard = match self.server.dashboard_addr.as_str() {
            DASHBOARD_OFF => None,
            DASHBOARD_AUTO => Some(("server.dashboard_addr", self.dashboard_auto_host())),
            addr => Some(("server.dashboard_addr", addr)),
        };
        [("server.api_addr", self.server.api_addr.as_str()), ("server.admin_addr", self.server.admin_addr.as_str())]
            .into_iter()
            .chain(dashboard)
            .find(|(_, addr)| !is_loopback(addr))
    }

    /// The address whose IP `auto` gives the dashboard, which serves both HTTP APIs: the more
    /// private of `server.api_addr` and `server.admin_addr` (a loopback one if either is), so
    /// the dashboard never opens the cluster admin, or the client API, wider than it is.
    fn dashboard_auto_host(&self) -> &str {
        let (api, admin) = (self.server.api_addr.as_str(), self.server.admin_addr.as_str());
        if is_loopback(admin) || !is_loopback(api) {
            admin
        } else {
            api
        }
    }

    /// Where the dashboard listens: `None` when `off`; for `auto`, port [`DASHBOARD_PORT`] on the
    /// IP of the more private of `server.api_addr` and `server.admin_addr`, and `true` (skip it if
    /// the port is taken).
    pub fn dashboard_bind(&self) -> Option<(SocketAddr, bool)> {
        match self.server.dashboard_addr.as_str() {
            DASHBOARD_OFF => None,
            DASHBOARD_AUTO => {
                let host: SocketAddr = self.dashboard_auto_host().parse().ok()?;
                Some((SocketAddr::new(host.ip(), DASHBOARD_PORT), true))
            }
            addr => addr.parse().ok().map(|addr| (addr, false)),
        }
    }

    /// Tokens well formed and unique, and no HTTP API open to the network without them (unless
    /// `security.allow_unauthenticated`).
    fn check_security(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        let mut names = std::collections::BTreeSet::new();
        let mut hashes = std::collections::BTreeSet::new();
        for token in &self.security.tokens {
            let name = token.name.trim();
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return fail(format!(
                    "security.tokens: name {:?} must be 1-64 characters of letters, digits, '-', '_' and '.'",
                    token.name
                ));
            }
            if name == "admin_token" {
                return fail("security.tokens: the name admin_token is kept for security.admin_token".into());
            }
            if !names.insert(name.to_string()) {
                return fail(format!("security.tokens: the name {name:?} is used twice"));
            }
            let hash = token.sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                return fail(format!(
                    "security.tokens: {name}: sha256 must be the 64 hex digits of the token's SHA-256 \
                     (stemedb token create prints it), never the token itself"
                ));
            }
            if !hashes.insert(hash) {
                return fail(format!("security.tokens: {name}: the same sha256 as another token"));
            }
            if token.agents.iter().any(|a| a.trim().is_empty()) {
                return fail(format!("security.tokens: {name}: an empty agent id in agents"));
            }
        }
        if self.security.tokens.is_empty() && !self.security.allow_unauthenticated {
            if let Some((key, addr)) = self.exposed_http_addr() {
                return fail(format!(
                    "{key} is {addr}, not a loopback address, and security.tokens is empty: anyone who \
                     reaches it could write and read everything. Add [[security.tokens]] (stemedb token \
                     create), or set security.allow_unauthenticated = true to accept that"
                ));
            }
        }
        let server = &self.server;
        if server.tls_cert_file.is_empty() != server.tls_key_file.is_empty() {
            return fail("server.tls_cert_file and server.tls_key_file go together: set both or neither".into());
        }
        let cluster = &self.cluster;
        let set = [&cluster.tls_ca_file, &cluster.tls_cert_file, &cluster.tls_key_file]
            .iter()
            .filter(|f| !f.is_empty())
            .count();
        if set != 0 && set != 3 {
            return fail(
                "cluster.tls_ca_file, cluster.tls_cert_file and cluster.tls_key_file go together: set all three or none"
                    .into(),
            );
        }
        let limits = &self.rate_limits;
        if limits.burst_seconds == 0 || limits.burst_seconds > 3600 {
            return fail(format!("rate_limits.burst_seconds is {}: expected 1-3600", limits.burst_seconds));
        }
        Ok(())
    }

    /// The upper bounds of sizes, timeouts and periods, so that turning them into bytes or
    /// deadlines cannot overflow.
    fn check_bounds(&self) -> Result<(), ConfigError> {
        const TIB: (u64, &str) = (MAX_SIZE_MB, "1 TiB");
        const DAY_MS: (u64, &str) = (MAX_DURATION_SECONDS * 1000, "1 day");
        const DAY_SECONDS: (u64, &str) = (MAX_DURATION_SECONDS, "1 day");
        let (storage, query, raft, breaker) = (&self.storage, &self.query, &self.raft, &self.circuit_breaker);
        let bounds = [
            ("storage.max_cache_size_mb", storage.max_cache_size_mb, TIB),
            ("storage.write_buffer_mb", storage.write_buffer_mb, TIB),
            ("storage.index_max_memory_mb", storage.index_max_memory_mb, TIB),
            ("storage.min_free_bytes", storage.min_free_bytes, (MAX_SIZE_MB << 20, "1 TiB")),
            ("query.claims_cache_mb", query.claims_cache_mb, TIB),
            ("query.max_memory_per_query_mb", query.max_memory_per_query_mb, TIB),
            ("backup.max_read_mb_per_second", self.backup.max_read_mb_per_second, TIB),
            ("backup.busy_read_mb_per_second", self.backup.busy_read_mb_per_second, TIB),
            ("backup.archive_interval_ms", self.backup.archive_interval_ms, DAY_MS),
            ("limits.max_request_bytes", self.limits.max_request_bytes as u64, (MAX_SIZE_MB << 20, "1 TiB")),
            ("raft.heartbeat_interval_ms", raft.heartbeat_interval_ms, DAY_MS),
            ("raft.election_timeout_min_ms", raft.election_timeout_min_ms, DAY_MS),
            ("raft.election_timeout_max_ms", raft.election_timeout_max_ms, DAY_MS),
            ("raft.write_timeout_ms", raft.write_timeout_ms, DAY_MS),
            ("query.slow_query_ms", query.slow_query_ms, DAY_MS),
            ("testing.snapshot_install_pause_ms", self.testing.snapshot_install_pause_ms, DAY_MS),
            ("testing.start_up_scrub_delay_ms", self.testing.start_up_scrub_delay_ms, DAY_MS),
            ("testing.log_sync_delay_ms", self.testing.log_sync_delay_ms, DAY_MS),
            ("server.shutdown_grace_seconds", self.server.shutdown_grace_seconds, DAY_SECONDS),
            ("cluster.rebalance_move_timeout_seconds", self.cluster.rebalance_move_timeout_seconds, DAY_SECONDS),
            ("cluster.dead_node_timeout_seconds", self.cluster.dead_node_timeout_seconds, DAY_SECONDS),
            ("query.query_timeout_seconds", query.query_timeout_seconds, DAY_SECONDS),
            ("circuit_breaker.open_seconds", breaker.open_seconds, DAY_SECONDS),
            ("anti_entropy.interval_seconds", self.anti_entropy.interval_seconds, DAY_SECONDS),
            ("anti_entropy.scrub_interval_seconds", self.anti_entropy.scrub_interval_seconds, DAY_SECONDS),
            ("circuit_breaker.max_open_seconds", breaker.max_open_seconds, DAY_SECONDS),
            ("query.max_limit", query.max_limit as u64, (MAX_PAGE_LIMIT as u64, "results in one page")),
        ];
        match bounds.into_iter().find(|(_, value, (max, _))| value > max) {
            Some((key, value, (max, what))) => {
                Err(ConfigError::Invalid(format!("{key} is {value}: at most {max} ({what})")))
            }
            None => Ok(()),
        }
    }

    /// `cluster.peer_dial_overrides` as a map from peer address to the address to dial instead.
    pub fn dial_overrides(&self) -> Result<std::collections::HashMap<String, String>, ConfigError> {
        let mut overrides = std::collections::HashMap::new();
        for part in self.cluster.peer_dial_overrides.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (from, via) = part.split_once('=').ok_or_else(|| {
                ConfigError::Invalid(format!("cluster.peer_dial_overrides entry {part:?}: expected ADDR=VIA"))
            })?;
            overrides.insert(from.trim().to_string(), via.trim().to_string());
        }
        Ok(overrides)
    }

    /// The founding members (node id → Raft address): `cluster.initial_cluster`, or this node
    /// alone when it is empty.
    pub fn initial_members(&self) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
        let mut members = std::collections::BTreeMap::new();
        if self.cluster.initial_cluster.trim().is_empty() {
            members.insert(self.node.id, self.server.raft_addr.clone());
            return Ok(members);
        }
        for part in self.cluster.initial_cluster.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let invalid =
                || ConfigError::Invalid(format!("cluster.initial_cluster entry {part:?}: expected ID=HOST:PORT"));
            let (id, addr) = part.split_once('=').ok_or_else(invalid)?;
            let id: u64 = id.trim().parse().map_err(|_| invalid())?;
            let addr = addr.trim();
            if id == 0 || addr.parse::<SocketAddr>().is_err() {
                return Err(invalid());
            }
            if members.insert(id, addr.to_string()).is_some() {
                return Err(ConfigError::Invalid(format!("cluster.initial_cluster lists node {id} twice")));
            }
        }
        Ok(members)
    }

    /// The default configuration as commented TOML, for `stemedb print-sample-config`.
    pub fn sample_toml() -> String {
        let body = toml::to_string_pretty(&Config::default()).unwrap_or_default();
        format!(
            "# StemeDB configuration. Every key is optional; these are the defaults.\n\
             # Environment variables override the file: STEMEDB_<SECTION>_<KEY>, e.g. STEMEDB_CLUSTER_SHARDS=32.\n\
             # Command-line flags override both. Unknown keys are errors.\n\n{body}"
        )
    }
}

/// The settings the memory runbook tells operators to write (tests: here and in `server`).
#[cfg(test)]
pub(crate) const MEMORY_RUNBOOK_SETTINGS: &str = "[storage]\nmax_cache_size_mb = 512\nindex_eviction_enabled = true\n\
    index_max_memory_mb = 1024\n[query]\nmax_memory_per_query_mb = 256\nquery_timeout_seconds = 30\n";

/// Every size, timeout and period at its largest valid value (tests: here and in `server`).
#[cfg(test)]
pub(crate) fn config_at_the_bounds() -> Config {
    const DAY_MS: u64 = MAX_DURATION_SECONDS * 1000;
    let mut config = Config::default();
    config.storage.max_cache_size_mb = MAX_SIZE_MB;
    config.storage.write_buffer_mb = MAX_SIZE_MB;
    config.storage.index_eviction_enabled = true;
    config.storage.index_max_memory_mb = MAX_SIZE_MB;
    config.storage.min_free_bytes = MAX_SIZE_MB << 20;
    config.query.claims_cache_mb = MAX_SIZE_MB;
    config.query.max_memory_per_query_mb = MAX_SIZE_MB;
    config.backup.max_read_mb_per_second = MAX_SIZE_MB;
    config.backup.busy_read_mb_per_second = MAX_SIZE_MB;
    config.backup.archive_interval_ms = DAY_MS;
    // Heartbeat < minimum < maximum election timeout must still hold.
    config.raft.heartbeat_interval_ms = DAY_MS / 2 - 2;
    config.raft.election_timeout_min_ms = DAY_MS - 1;
    config.raft.election_timeout_max_ms = DAY_MS;
    config.raft.write_timeout_ms = DAY_MS;
    config.query.slow_query_ms = DAY_MS;
    config.testing.snapshot_install_pause_ms = DAY_MS;
    config.testing.start_up_scrub_delay_ms = DAY_MS;
    config.testing.log_sync_delay_ms = DAY_MS;
    config.server.shutdown_grace_seconds = MAX_DURATION_SECONDS;
    config.cluster.rebalance_move_timeout_seconds = MAX_DURATION_SECONDS;
    config.cluster.dead_node_timeout_seconds = MAX_DURATION_SECONDS;
    config.query.query_timeout_seconds = MAX_DURATION_SECONDS;
    config.circuit_breaker.open_seconds = MAX_DURATION_SECONDS;
    config.circuit_breaker.max_open_seconds = MAX_DURATION_SECONDS;
    config.anti_entropy.interval_seconds = MAX_DURATION_SECONDS;
    config.anti_entropy.scrub_interval_seconds = MAX_DURATION_SECONDS;
    config.limits.max_request_bytes = (MAX_SIZE_MB << 20) as usize;
    config.query.max_limit = MAX_PAGE_LIMIT;
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(vars: &[(&str, &str)]) -> Env {
        let owned: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        // figment reads the process environment; scope the test's variables by a unique prefix.
        let prefix = format!("STEMEDBTEST{}_", rand::random::<u32>());
        for (k, v) in &owned {
            // SAFETY: tests set variables with a unique random prefix that nothing else reads.
            unsafe { std::env::set_var(format!("{prefix}{k}"), v) };
        }
        Env::prefixed(&prefix)
    }

    #[test]
    fn the_dashboard_address_auto_off_or_explicit() {
        let mut config = Config::default();
        assert_eq!(config.server.dashboard_addr, DASHBOARD_AUTO);
        assert_eq!(config.dashboard_bind(), Some(("127.0.0.1:18188".parse().expect("addr"), true)));
        config.server.admin_addr = "127.0.0.2:18181".into();
        assert_eq!(config.dashboard_bind(), Some(("127.0.0.2:18188".parse().expect("addr"), true)));
        // The client API open to the network, the cluster admin not: the dashboard stays private.
        config.server.api_addr = "0.0.0.0:18180".into();
        assert_eq!(config.dashboard_bind(), Some(("127.0.0.2:18188".parse().expect("addr"), true)));
        config.server.api_addr = "127.0.0.2:18180".into();
        config.server.admin_addr = "10.0.0.1:18181".into();
        assert_eq!(config.dashboard_bind(), Some(("127.0.0.2:18188".parse().expect("addr"), true)));
        config.server.api_addr = "10.0.0.1:18180".into();
        assert_eq!(config.dashboard_bind(), Some(("10.0.0.1:18188".parse().expect("addr"), true)));
        config.server.admin_addr = "127.0.0.2:18181".into();
        config.server.api_addr = "127.0.0.2:18180".into();
        config.server.dashboard_addr = "127.0.0.3:9000".into();
        assert_eq!(config.dashboard_bind(), Some(("127.0.0.3:9000".parse().expect("addr"), false)));
        assert_eq!(config.exposed_http_addr(), None);
        config.server.dashboard_addr = "10.0.0.1:18188".into();
        assert_eq!(config.exposed_http_addr(), Some(("server.dashboard_addr", "10.0.0.1:18188")));
        config.server.dashboard_addr = DASHBOARD_OFF.into();
        assert_eq!((config.dashboard_bind(), config.exposed_http_addr()), (None, None));
    }

    #[test]
    fn tokens_and_rate_limits_from_env_and_their_checks() {
        let hash = "ab".repeat(32);
        let tokens = format!(r#"[{{name="ops-bot",sha256="{hash}",role="write",agents=["ops-bot"]}}]"#);
        let env = env_with(&[("SECURITY_TOKENS", &tokens), ("RATE_LIMITS_WRITE_PER_SECOND", "50")]);
        let config = Config::load_with_env(None, &FlagOverrides::default(), env).expect("load");
        assert_eq!(config.security.tokens[0].role, TokenRole::Write);
        assert_eq!(config.security.tokens[0].agents, vec!["ops-bot".to_string()]);
        assert_eq!(config.rate_limits.write_per_second, 50);
        let refused = |toml: &str, says: &str| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("c.toml");
            std::fs::write(&path, toml).expect("write");
            let error = Config::check_file(&path).expect_err(toml).to_string();
            assert!(error.contains(says), "{toml}: {error}");
        };
        refused(&format!("[[security.tokens]]\nname = \"a\"\nsha256 = \"{hash}\"\nrole = \"root\"\n"), "role");
        refused(
            "[[security.tokens]]\nname = \"a\"\nsha256 = \"my-secret\"\nrole = \"read\"\n",
            "never the token itself",
        );
        refused(
            &format!("[[security.tokens]]\nname = \"a\"\nsha256 = \"{hash}\"\nrole = \"read\"\n[[security.tokens]]\nname = \"a\"\nsha256 = \"{}\"\nrole = \"read\"\n", "cd".repeat(32)),
            "used twice",
        );
        refused("[server]\napi_addr = \"0.0.0.0:18180\"\n", "not a loopback address");
        refused("[server]\nadmin_addr = \"10.0.0.1:18181\"\n", "security.allow_unauthenticated");
        refused("[server]\ndashboard_addr = \"0.0.0.0:18188\"\n", "server.dashboard_addr");
        refused("[server]\ndashboard_addr = \"localhost\"\n", "\"auto\" or \"off\"");
        refused("[rate_limits]\nburst_seconds = 0\n", "rate_limits.burst_seconds");
        for fine in [
            "[server]\napi_addr = \"0.0.0.0:18180\"\n[security]\nallow_unauthenticated = true\n".to_string(),
            format!("[server]\napi_addr = \"0.0.0.0:18180\"\n[[security.tokens]]\nname = \"a\"\nsha256 = \"{hash}\"\nrole = \"admin\"\n"),
            "[server]\napi_addr = \"127.0.0.2:18180\"\n".to_string(),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("c.toml");
            std::fs::write(&path, &fine).expect("write");
            Config::check_file(&path).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }
    }

    #[test]
    fn epistemics_sections_from_env() {
        let env = env_with(&[
            ("AUTHORITY_ROOTS", r#"[{agent_id="cto",level=90}]"#),
            ("QUARANTINE_REQUIRE_AUTHORITY_PREFIXES", r#"[finance, "hr/payroll"]"#),
            ("CIRCUIT_BREAKER_MODE", "quarantine"),
            ("CIRCUIT_BREAKER_MAX_WRITES_PER_SEC", "10"),
        ]);
        let config = Config::load_with_env(None, &FlagOverrides::default(), env).expect("load");
        assert_eq!(config.authority.roots, vec![RootAuthority { agent_id: "cto".into(), level: 90 }]);
        assert_eq!(config.quarantine.require_authority_prefixes, vec!["finance".to_string(), "hr/payroll".to_string()]);
        assert_eq!(
            (config.circuit_breaker.mode.as_str(), config.circuit_breaker.max_writes_per_sec),
            ("quarantine", 10)
        );
        let bad = env_with(&[("CIRCUIT_BREAKER_MODE", "explode")]);
        assert!(Config::load_with_env(None, &FlagOverrides::default(), bad).is_err());
        let bad = env_with(&[("QUARANTINE_REQUIRE_AUTHORITY_PREFIXES", r#"["a//b"]"#)]);
        assert!(Config::load_with_env(None, &FlagOverrides::default(), bad).is_err());
    }

    #[test]
    fn layering_file_env_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[cluster]\nshards = 8\n[limits]\nmax_value_bytes = 1000\n").expect("write");
        let env = env_with(&[("CLUSTER_SHARDS", "32"), ("CACHE_SIZE_MB", "2048"), ("CIRCUIT_X", "")]);
        let flags = FlagOverrides { node_id: Some(7), ..Default::default() };
        let result = Config::load_with_env(Some(&path), &flags, env);
        // CIRCUIT_X is not a known section: rejected by name.
        assert!(result.is_err());
        let env = env_with(&[("CLUSTER_SHARDS", "32"), ("CACHE_SIZE_MB", "2048")]);
        let config = Config::load_with_env(Some(&path), &flags, env).expect("load");
        assert_eq!(config.cluster.shards, 32, "env overrides file");
        assert_eq!(config.limits.max_value_bytes, 1000, "file overrides defaults");
        assert_eq!(config.storage.max_cache_size_mb, 2048, "runbook alias");
        assert_eq!(config.node.id, 7, "flags override all");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[cluster]\nshardz = 8\n").expect("write");
        let error = Config::check_file(&path).expect_err("unknown key");
        assert!(error.to_string().contains("shardz"), "{error}");
        std::fs::write(&path, "[server]\napi_addr = \"nowhere\"\n").expect("write");
        assert!(Config::check_file(&path).is_err());
        std::fs::write(&path, "[typo]\nx = 1\n").expect("write");
        assert!(Config::check_file(&path).is_err());
    }

    #[test]
    fn the_memory_runbooks_settings_are_taken_as_it_writes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.toml");
        std::fs::write(&path, MEMORY_RUNBOOK_SETTINGS).expect("write");
        let config = Config::check_file(&path).expect("valid");
        assert!(config.storage.index_eviction_enabled);
        assert_eq!((config.storage.index_max_memory_mb, config.query.max_memory_per_query_mb), (1024, 256));
        for bad in [
            "[storage]\nindex_eviction_enabled = true\nindex_max_memory_mb = 0\n",
            "[query]\nmax_memory_per_query_mb = 1048577\n",
            "[storage]\nwrite_buffer_mb = 0\n",
        ] {
            std::fs::write(&path, bad).expect("write");
            let error = Config::check_file(&path).expect_err(bad);
            assert!(error.to_string().contains("_mb"), "{error}");
        }
        let env = env_with(&[("STORAGE_INDEX_EVICTION_ENABLED", "true"), ("QUERY_MAX_MEMORY_PER_QUERY_MB", "0")]);
        let config = Config::load_with_env(None, &FlagOverrides::default(), env).expect("load");
        assert!(config.storage.index_eviction_enabled);
        assert_eq!(config.query.max_memory_per_query_mb, 0, "0: no limit");
    }

    #[test]
    fn runbook_settings_stemedb_replaces_say_what_replaces_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        for (toml, says) in [
            ("[wal]\nretention_days = 7\n", "raft.snapshot_logs_since_last"),
            ("[storage]\ncompaction_enabled = true\n", "/v1/admin/storage/compact"),
            ("[runtime]\nmemory_ballast_mb = 100\n", "no garbage collector"),
            ("[resources]\nmax_memory_mb = 8192\n", "MemoryMax="),
        ] {
            std::fs::write(&path, toml).expect("write");
            let error = Config::check_file(&path).expect_err(toml).to_string();
            assert!(error.contains(says) && error.contains("runbooks"), "{toml}: {error}");
        }
        let env = env_with(&[("WAL_RETENTION_DAYS", "7")]);
        let error = Config::load_with_env(None, &FlagOverrides::default(), env).expect_err("the runbook's env var");
        assert!(error.to_string().contains("`wal`"), "{error}");
    }

    #[test]
    fn sizes_and_durations_at_their_bounds_convert_without_overflow() {
        let config = config_at_the_bounds().validate().expect("every value at its bound is valid");
        let now = std::time::Instant::now();
        for ms in [config.raft.write_timeout_ms, config.raft.election_timeout_max_ms] {
            assert!(now.checked_add(std::time::Duration::from_millis(ms)).is_some());
        }
        assert!(now.checked_add(std::time::Duration::from_secs(config.query.query_timeout_seconds)).is_some());
    }

    #[test]
    fn sizes_and_durations_past_their_bounds_are_refused_by_name() {
        type Set = fn(&mut Config);
        let over: [(&str, u64, Set); 26] = [
            ("storage.max_cache_size_mb", MAX_SIZE_MB, |c| c.storage.max_cache_size_mb += 1),
            ("storage.write_buffer_mb", MAX_SIZE_MB, |c| c.storage.write_buffer_mb += 1),
            ("storage.index_max_memory_mb", MAX_SIZE_MB, |c| c.storage.index_max_memory_mb += 1),
            ("storage.min_free_bytes", MAX_SIZE_MB << 20, |c| c.storage.min_free_bytes += 1),
            ("query.claims_cache_mb", MAX_SIZE_MB, |c| c.query.claims_cache_mb += 1),
            ("query.max_memory_per_query_mb", MAX_SIZE_MB, |c| c.query.max_memory_per_query_mb += 1),
            ("backup.max_read_mb_per_second", MAX_SIZE_MB, |c| c.backup.max_read_mb_per_second += 1),
            ("backup.busy_read_mb_per_second", MAX_SIZE_MB, |c| c.backup.busy_read_mb_per_second += 1),
            ("backup.archive_interval_ms", 86_400_000, |c| c.backup.archive_interval_ms += 1),
            ("raft.heartbeat_interval_ms", 86_400_000, |c| c.raft.heartbeat_interval_ms = 86_400_001),
            ("raft.election_timeout_min_ms", 86_400_000, |c| c.raft.election_timeout_min_ms += 2),
            ("raft.election_timeout_max_ms", 86_400_000, |c| c.raft.election_timeout_max_ms += 1),
            ("raft.write_timeout_ms", 86_400_000, |c| c.raft.write_timeout_ms += 1),
            ("query.slow_query_ms", 86_400_000, |c| c.query.slow_query_ms += 1),
            ("testing.snapshot_install_pause_ms", 86_400_000, |c| c.testing.snapshot_install_pause_ms += 1),
            ("testing.start_up_scrub_delay_ms", 86_400_000, |c| c.testing.start_up_scrub_delay_ms += 1),
            ("testing.log_sync_delay_ms", 86_400_000, |c| c.testing.log_sync_delay_ms += 1),
            ("server.shutdown_grace_seconds", 86_400, |c| c.server.shutdown_grace_seconds += 1),
            ("cluster.rebalance_move_timeout_seconds", 86_400, |c| c.cluster.rebalance_move_timeout_seconds += 1),
            ("cluster.dead_node_timeout_seconds", 86_400, |c| c.cluster.dead_node_timeout_seconds += 1),
            ("query.query_timeout_seconds", 86_400, |c| c.query.query_timeout_seconds += 1),
            ("circuit_breaker.max_open_seconds", 86_400, |c| c.circuit_breaker.max_open_seconds += 1),
            ("limits.max_request_bytes", 1 << 40, |c| c.limits.max_request_bytes += 1),
            ("query.max_limit", MAX_PAGE_LIMIT as u64, |c| c.query.max_limit += 1),
            ("anti_entropy.interval_seconds", 86_400, |c| c.anti_entropy.interval_seconds += 1),
            ("anti_entropy.scrub_interval_seconds", 86_400, |c| c.anti_entropy.scrub_interval_seconds += 1),
        ];
        for (key, bound, past) in over {
            let mut config = config_at_the_bounds();
            past(&mut config);
            let error = config.validate().expect_err(key).to_string();
            assert!(error.contains(key) && error.contains(&format!("at most {bound} (")), "{key}: {error}");
        }
        // open_seconds past the bound is refused before it could exceed max_open_seconds.
        let mut config = config_at_the_bounds();
        config.circuit_breaker.open_seconds += 1;
        let error = config.validate().expect_err("open_seconds").to_string();
        assert!(error.contains("circuit_breaker.open_seconds is 86401: at most 86400 (1 day)"), "{error}");
        // From the environment too, as an operator would set it.
        let env = env_with(&[("RAFT_WRITE_TIMEOUT_MS", "18446744073709551615")]);
        let error = Config::load_with_env(None, &FlagOverrides::default(), env).expect_err("u64::MAX ms");
        assert!(
            error.to_string().contains("raft.write_timeout_ms is 18446744073709551615: at most 86400000"),
            "{error}"
        );
    }

    #[test]
    fn a_heartbeat_of_half_the_maximum_election_timeout_is_refused() {
        let mut config = Config::default();
        (config.raft.heartbeat_interval_ms, config.raft.election_timeout_min_ms) = (599, 1000);
        let error = config.clone().validate().expect_err("heartbeat 599 of 1200").to_string();
        assert!(error.contains("heartbeat_interval_ms + 1 < election_timeout_max_ms / 2"), "{error}");
        config.raft.heartbeat_interval_ms = 598;
        config.validate().expect("heartbeat 598 of 1200");
    }

    #[test]
    fn sample_config_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sample.toml");
        std::fs::write(&path, Config::sample_toml()).expect("write");
        assert_eq!(Config::check_file(&path).expect("valid").into_inner(), Config::default());
    }
}
