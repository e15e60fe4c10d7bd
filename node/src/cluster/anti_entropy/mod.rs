//! Anti-entropy (DESIGN §4): finds replicas whose data differs from their shard's majority and
//! repairs them, without an operator.
//!
//! - **Checks.** Every `anti_entropy.interval_seconds`, the leader of each shard written since
//!   its last check proposes a check entry; each replica records the root of its bucket digests
//!   when it applies it (`shard::apply`), so all compare the same log position. The leader asks
//!   every voter for its root at that index (`CheckReport` on 18182); a root held by a majority
//!   is the truth, and a replica that disagrees is told to repair itself (`Repair`). A leader
//!   that disagrees hands its leadership to a replica of the majority first.
//! - **Scrubs.** An incremental digest reflects what was written, not what the disk holds now.
//!   Each replica is scrubbed every `anti_entropy.scrub_interval_seconds`, at most
//!   `scrub_bytes_per_second` (`shard::repair::scrub`), and right after the node starts; a
//!   scrub that finds buckets whose records on disk do not give the kept digests, or storage it
//!   cannot read, repairs those buckets (or re-seeds every bucket).
//! - **Repairs.** The damaged replica descends its Merkle tree against a healthy one's at the
//!   check index (`TreeNodes`) to the differing buckets, then copies them (`FetchBuckets`): the
//!   copy is read from a snapshot of the healthy replica at its applied index and checked
//!   against that replica's own digests; the damaged replica stops applying right after that
//!   same index (`AppliedProgress::gate`), replaces the buckets in one batch, and goes on. A
//!   repair never touches the Raft log and never writes under a newer applied entry; above
//!   `anti_entropy.reseed_buckets` differing buckets every bucket is copied. A replica being
//!   repaired is suspect: its root is no vote and it is no source.
//!
//! The state each node keeps here is a report (`GET /cluster/sync_status`); what decides is
//! recomputed from the replicas every time.

pub mod metrics;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use stemedb_proto::raft as pb;
use stemedb_proto::raft::anti_entropy_client::AntiEntropyClient;

use crate::error::ErrorCode;
use crate::meta::META_SHARD;
use crate::model::id::now_us;
use crate::raft::types::{GroupAdmin, NodeId, ShardCommand};
use crate::raft::ShardSet;
use crate::shard::digest;
use crate::shard::progress::{AppliedProgress, CheckRecord};
use crate::shard::repair::{self, BucketCopy, ReplaceError};
use crate::shard::ConsensusError;
use crate::storage::Storage;

/// How long the leader waits for a replica to apply a check entry before counting it absent.
const REPORT_WAIT: Duration = Duration::from_secs(3);
/// How long a source waits to reach the index a repairing replica stands at.
const SOURCE_WAIT: Duration = Duration::from_secs(2);
/// How long a repairing replica waits to reach the index its copy was read at.
const CATCH_UP_WAIT: Duration = Duration::from_secs(3);
/// Copy attempts of one repair before it gives up (the next check or scrub tries again).
const COPY_ATTEMPTS: usize = 8;
/// Timeout of one anti-entropy RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest anti-entropy message (a re-seed copies a whole shard).
const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// `[anti_entropy]` as the node runs it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub enabled: bool,
    pub interval: Duration,
    pub scrub_bytes_per_second: u64,
    pub scrub_interval: Duration,
    pub buckets: usize,
    pub reseed_buckets: usize,
    /// `testing.start_up_scrub_delay_ms`: the start-up scrubs wait this long (tests only).
    pub start_up_scrub_delay: Duration,
}

/// Why an anti-entropy step failed.
#[derive(Debug, thiserror::Error)]
pub enum AntiEntropyError {
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("node {node}: {message}")]
    Peer { node: NodeId, message: String },
    #[error("shard {shard}: this replica is being repaired")]
    Suspect { shard: u16 },
    #[error("shard {shard}: {message}")]
    RepairFailed { shard: u16, message: String },
    /// A peer's request this node cannot act on (an unknown group, a bucket count or tree
    /// position out of range).
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

impl AntiEntropyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AntiEntropyError::Consensus(e) => e.code(),
            AntiEntropyError::Peer { .. } => ErrorCode::LeaderUnreachable,
            AntiEntropyError::Suspect { .. } => ErrorCode::ReplicaSuspect,
            AntiEntropyError::RepairFailed { .. } => ErrorCode::RepairFailed,
            AntiEntropyError::Malformed(_) => ErrorCode::MalformedMessage,
            AntiEntropyError::Storage(e) => e.code(),
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        self.code().to_status(self.to_string())
    }
}

/// One replica's root as the leader's last check saw it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReplicaRoot {
    pub node: NodeId,
    /// Its root at the check index (hex), if it reported one.
    #[schema(required = true)]
    pub root: Option<String>,
    pub agrees: bool,
    pub suspect: bool,
}

/// The last check this node ran as the shard's leader.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CheckSummary {
    pub index: u64,
    pub at_us: u64,
    /// `agree`, `mismatch` or `incomplete` (a replica did not report).
    pub result: &'static str,
    pub duration_ms: f64,
    pub replicas: Vec<ReplicaRoot>,
}

/// The last repair of this node's replica.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RepairSummary {
    pub at_us: u64,
    /// `buckets` or `reseed`.
    pub kind: &'static str,
    /// Why: `check` (disagreed with the majority) or `scrub` (disk differs from the digests).
    pub cause: &'static str,
    pub buckets: usize,
    pub written: u64,
    pub deleted: u64,
    #[schema(required = true)]
    pub source: Option<NodeId>,
    pub duration_ms: f64,
    #[schema(required = true)]
    pub error: Option<String>,
}

/// The scrubs of this node's replica.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ScrubSummary {
    pub running: bool,
    /// Bytes the running scrub has read.
    pub bytes_read: u64,
    pub passes: u64,
    #[schema(required = true)]
    pub last_finished_at_us: Option<u64>,
    #[schema(required = true)]
    pub last_applied_index: Option<u64>,
    pub last_records: u64,
    pub last_mismatched_buckets: usize,
    #[schema(required = true)]
    pub last_unreadable: Option<String>,
}

/// What this node knows of one shard's anti-entropy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardSync {
    pub last_check: Option<CheckSummary>,
    /// Buckets the last check or scrub found differing on this node's replica (0 once repaired).
    pub mismatched_buckets: usize,
    pub repairs: u64,
    pub repaired_keys: u64,
    pub last_repair: Option<RepairSummary>,
    pub scrub: ScrubSummary,
    /// Being repaired now.
    pub suspect: bool,
}

/// What a repair starts from.
#[derive(Debug, Clone)]
pub enum Plan {
    /// The replica disagreed with the majority at a check entry: descend against `sources`.
    AtCheck { index: u64, sources: Vec<NodeId> },
    /// The scrub found these buckets damaged (all of them: storage unreadable).
    Buckets { buckets: BTreeSet<usize>, unreadable: bool },
}

/// Anti-entropy of the shards this node hosts.
pub struct AntiEntropy {
    shards: Arc<ShardSet>,
    settings: Settings,
    status: Mutex<BTreeMap<u16, ShardSync>>,
    /// Shards being repaired on this node.
    repairing: Mutex<HashSet<u16>>,
    /// Shards whose next check runs now, written or not (`POST /cluster/sync` with `force`).
    forced: Mutex<HashSet<u16>>,
    /// Shards whose next scrub runs now, unpaced.
    scrub_now: Mutex<HashSet<u16>>,
    /// When each shard's leader last proposed a check (this node).
    last_proposed: Mutex<BTreeMap<u16, Instant>>,
    /// When each replica's last scrub started.
    last_scrub: Mutex<BTreeMap<u16, Instant>>,
    /// Replicas whose start-up scrub has not ended (nor the repair it started): they neither
    /// lead nor serve until it has (`raft::replica_health`).
    unchecked: Mutex<HashSet<u16>>,
}

impl AntiEntropy {
    pub fn new(shards: Arc<ShardSet>, settings: Settings) -> Arc<AntiEntropy> {
        metrics::initialize(shards.all_groups().map(|g| shard_label(g.shard)));
        Arc::new(AntiEntropy {
            shards,
            settings,
            status: Mutex::new(BTreeMap::new()),
            repairing: Mutex::new(HashSet::new()),
            forced: Mutex::new(HashSet::new()),
            scrub_now: Mutex::new(HashSet::new()),
            last_proposed: Mutex::new(BTreeMap::new()),
            last_scrub: Mutex::new(BTreeMap::new()),
            unchecked: Mutex::new(HashSet::new()),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Starts the check and scrub loops (with `anti_entropy.enabled`). The first scrub of every
    /// replica runs at once, unpaced; until it (and the repair it starts) ends, the replica
    /// neither leads nor serves. Replicas this node does not host need no check.
    pub fn start(self: &Arc<Self>) {
        if !self.settings.enabled {
            return;
        }
        let local = self.local_shards();
        for group in self.shards.all_groups().filter(|g| !local.contains(&g.shard)) {
            self.shards.mark_checked(group.shard);
        }
        self.unchecked.lock().extend(local.iter().copied());
        self.scrub_now.lock().extend(local);
        // A leadership openraft restored at start is handed to a peer rather than held
        // unchecked (its requests would wait for the check).
        let me = self.clone();
        self.shards.tasks.spawn(async move { me.hand_over_unchecked_leaderships().await });
        let me = self.clone();
        self.shards.tasks.spawn_until_stopped(async move { me.check_loop().await });
        let me = self.clone();
        self.shards.tasks.spawn_until_stopped(async move { me.ask_leaders_to_check().await });
        let me = self.clone();
        self.shards.tasks.spawn_until_stopped(async move { me.scrub_loop().await });
    }

    /// Hands over every group this node leads while its replica is unchecked (openraft restores
    /// a committed leadership at start), to the most caught-up other voter. A group with no
    /// other voter, or whose hand-over fails, keeps its leader; its requests wait for the check.
    async fn hand_over_unchecked_leaderships(self: Arc<Self>) {
        // The groups' leadership shows once their Raft has started.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let unchecked: Vec<u16> = self.unchecked.lock().iter().copied().collect();
        for shard in unchecked {
            if !self.shards.leads(shard) || self.shards.checked(shard) {
                continue;
            }
            match self.shards.hand_over_shard(shard).await {
                Ok(to) => {
                    tracing::info!(shard, to, "leadership restored at start handed over until this replica is checked")
                }
                Err(error) => {
                    tracing::info!(shard, error = %error, "leadership restored at start kept; requests wait for the check")
                }
            }
        }
    }

    /// After start, asks each shard's leader for a check, so this node's replicas are compared
    /// with their peers' soon whether or not the shard is being written.
    async fn ask_leaders_to_check(self: Arc<Self>) {
        let shards: BTreeSet<u16> = self.local_shards().into_iter().collect();
        self.request_checks(shards).await;
    }

    /// Asks the leaders of `shards` for a check now, retrying until each shard had a leader
    /// that took the request (or a minute passed).
    async fn request_checks(&self, mut pending: BTreeSet<u16>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for shard in pending.clone() {
                let Ok(group) = self.shards.group(shard) else {
                    pending.remove(&shard);
                    continue;
                };
                let leader = group.raft.metrics().borrow().current_leader;
                let asked = match leader {
                    None => false,
                    Some(leader) if leader == self.shards.node_id => {
                        self.forced.lock().insert(shard);
                        true
                    }
                    Some(leader) => match self.addr_of(shard, leader) {
                        Ok(addr) => self.ask_sync(shard, leader, &addr, true).await.unwrap_or(false),
                        Err(_) => false,
                    },
                };
                if asked {
                    pending.remove(&shard);
                }
            }
        }
    }

    /// Every shard this node hosts a replica of, the meta group included.
    fn local_shards(&self) -> Vec<u16> {
        self.shards.all_groups().filter(|g| self.shards.hosts(g)).map(|g| g.shard).collect()
    }

    fn progress(&self, shard: u16) -> Result<(Arc<AppliedProgress>, Arc<Storage>, u32), AntiEntropyError> {
        let group = self.shards.group(shard)?;
        Ok((group.reader.progress().clone(), group.reader.storage().clone(), group.reader.group()))
    }

    fn shard_of(&self, group: u32) -> Result<u16, AntiEntropyError> {
        crate::shard::command::shard_of_group(group)
            .ok_or_else(|| AntiEntropyError::Malformed(format!("group {group} is not a raft group")))
    }

    fn update(&self, shard: u16, change: impl FnOnce(&mut ShardSync)) {
        change(self.status.lock().entry(shard).or_default());
    }

    /// What this node knows of every shard's anti-entropy (`GET /cluster/sync_status`).
    pub fn status(&self) -> BTreeMap<u16, ShardSync> {
        let mut status = self.status.lock().clone();
        for shard in self.local_shards() {
            status.entry(shard).or_default();
        }
        status
    }

    /// This node's replica's last check record of `shard` (index, root), for status reports.
    pub fn local_check(&self, shard: u16) -> Option<Arc<CheckRecord>> {
        self.progress(shard).ok().and_then(|(p, _, _)| p.digest.lock().last_check.clone())
    }

    fn is_suspect(&self, shard: u16) -> bool {
        self.repairing.lock().contains(&shard)
    }

    fn client(&self, addr: &str) -> Option<AntiEntropyClient<tonic::transport::Channel>> {
        self.shards.peer_channel(addr).map(|channel| {
            AntiEntropyClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        })
    }

    fn addr_of(&self, shard: u16, node: NodeId) -> Result<String, AntiEntropyError> {
        self.shards
            .voters(shard)?
            .into_iter()
            .find(|(id, _)| *id == node)
            .map(|(_, addr)| addr)
            .ok_or_else(|| AntiEntropyError::Peer { node, message: format!("not a voter of shard {shard}") })
    }

    /// Runs a check and repair now (`POST /cluster/sync`): this node's replica of `shard` (or
    /// every replica here) is scrubbed at once, unpaced; a shard this node leads proposes a
    /// check at once, written since the last one or not; on the others the replica compares
    /// its last check with its peers' and repairs itself if the majority disagrees.
    pub fn sync_now(self: &Arc<Self>, shard: Option<u16>) -> Vec<u16> {
        let shards: Vec<u16> =
            self.local_shards().into_iter().filter(|s| shard.is_none_or(|only| only == *s)).collect();
        self.scrub_now.lock().extend(shards.iter().copied());
        for &shard in &shards {
            if self.shards.leads(shard) {
                self.forced.lock().insert(shard);
            } else {
                let me = self.clone();
                self.shards.tasks.spawn(async move {
                    if let Err(error) = me.verify_last_check(shard).await {
                        tracing::debug!(shard, error = %error, "comparing the last check with the peers failed");
                    }
                });
            }
        }
        shards
    }

    /// Compares this replica's last check with its peers' at the same index and repairs it if
    /// a majority of them agree on another root.
    async fn verify_last_check(self: &Arc<Self>, shard: u16) -> Result<(), AntiEntropyError> {
        let (progress, _, group) = self.progress(shard)?;
        let Some(own) = progress.digest.lock().last_check.clone() else { return Ok(()) };
        let index = own.index;
        let voters = self.shards.voters(shard)?;
        let peers: Vec<(NodeId, String)> =
            voters.iter().filter(|(id, _)| *id != self.shards.node_id).cloned().collect();
        let reports = futures::future::join_all(
            peers.iter().map(|(node, addr)| async move { (*node, self.remote_report(addr, group, index).await) }),
        )
        .await;
        let mut reports = reports;
        reports.push((self.shards.node_id, Some((own.root.to_vec(), own.buckets.count(), false))));
        if let Some((root, sources)) = majority(&reports, own.buckets.count(), voters.len()) {
            if root != own.root.to_vec() {
                self.start_repair(shard, Plan::AtCheck { index: own.index, sources }, "check");
            }
        }
        Ok(())
    }

    // ---- checks (as shard leader) ----

    async fn check_loop(self: Arc<Self>) {
        let tick = self.settings.interval.min(Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            for shard in self.local_shards() {
                if !self.shards.leads(shard) {
                    continue;
                }
                let forced = self.forced.lock().remove(&shard);
                if !forced && !self.check_due(shard) {
                    continue;
                }
                self.last_proposed.lock().insert(shard, Instant::now());
                if let Err(error) = self.check(shard).await {
                    metrics::CHECKS.with_label_values(&["failed"]).inc();
                    tracing::debug!(shard, error = %error, "anti-entropy check failed");
                }
            }
        }
    }

    /// Whether the interval has passed and the shard was written since its last check.
    fn check_due(&self, shard: u16) -> bool {
        let waited = self.last_proposed.lock().get(&shard).is_none_or(|at| at.elapsed() >= self.settings.interval);
        let Ok((progress, _, _)) = self.progress(shard) else { return false };
        let applied = progress.applied_index.load(Ordering::Acquire);
        let checked = progress.digest.lock().last_check.as_ref().map_or(0, |c| c.index);
        // A check entry itself moves the applied index by one.
        waited && applied > checked
    }

    /// Proposes a check entry of `shard` and compares every voter's root at it.
    pub async fn check(self: &Arc<Self>, shard: u16) -> Result<CheckSummary, AntiEntropyError> {
        let started = Instant::now();
        let timeout = REPORT_WAIT;
        let check = Arc::new(ShardCommand::Check { proposed_at_us: now_us() });
        self.shards.propose_local(shard, check, timeout).await?;
        let (progress, _, group) = self.progress(shard)?;
        let Some(record) = progress.digest.lock().last_check.clone() else {
            return Err(AntiEntropyError::RepairFailed { shard, message: "no check recorded".into() });
        };
        let voters = self.shards.voters(shard)?;
        let reports = futures::future::join_all(voters.iter().map(|(node, addr)| {
            let record = record.clone();
            async move {
                if *node == self.shards.node_id {
                    return (*node, Some((record.root.to_vec(), record.buckets.count(), self.is_suspect(shard))));
                }
                (*node, self.remote_report(addr, group, record.index).await)
            }
        }))
        .await;
        let majority = majority(&reports, record.buckets.count(), voters.len()).map(|(root, _)| root);
        let mut replicas = Vec::with_capacity(reports.len());
        let mut disagreeing = Vec::new();
        let mut agreeing = Vec::new();
        let mut complete = true;
        for (node, report) in &reports {
            let (root, suspect) = match report {
                Some((root, _, suspect)) => (Some(root.clone()), *suspect),
                None => (None, false),
            };
            let agrees = majority.is_some() && root == majority;
            match (&root, agrees) {
                (None, _) => complete = false,
                (Some(_), true) => agreeing.push(*node),
                (Some(_), false) if !suspect => disagreeing.push(*node),
                _ => {}
            }
            replicas.push(ReplicaRoot { node: *node, root: root.map(hex::encode), agrees, suspect });
        }
        let result = match (&majority, disagreeing.is_empty(), complete) {
            (Some(_), false, _) => "mismatch",
            (Some(_), true, true) => "agree",
            _ => "incomplete",
        };
        let elapsed = started.elapsed();
        metrics::CHECKS.with_label_values(&[result]).inc();
        metrics::CHECK_DURATION.observe(elapsed.as_secs_f64());
        metrics::LAST_CHECK.set(now_us() as f64 / 1e6);
        let summary = CheckSummary {
            index: record.index,
            at_us: now_us(),
            result,
            duration_ms: elapsed.as_secs_f64() * 1e3,
            replicas,
        };
        self.update(shard, |s| s.last_check = Some(summary.clone()));
        if result == "mismatch" {
            tracing::warn!(shard, index = record.index, nodes = ?disagreeing, "replicas disagree with the majority at a check entry");
            for node in disagreeing {
                self.order_repair(shard, node, record.index, &agreeing).await;
            }
        }
        Ok(summary)
    }

    /// A replica's root at check `index`: (root, bucket count, suspect), or `None` if it has
    /// none (not applied that far in time, unreachable, or a later check already).
    async fn remote_report(&self, addr: &str, group: u32, index: u64) -> Report {
        let mut client = self.client(addr)?;
        let mut request =
            tonic::Request::new(pb::CheckReportRequest { group, index, wait_ms: REPORT_WAIT.as_millis() as u32 });
        request.set_timeout(REPORT_WAIT + Duration::from_secs(1));
        let reply = client.check_report(request).await.ok()?.into_inner();
        reply.found.then_some((reply.root, reply.buckets as usize, reply.suspect))
    }

    /// Tells `node` to repair its replica of `shard` from `sources`; if `node` is this node
    /// (the leader disagrees), hands the leadership to a source first.
    async fn order_repair(self: &Arc<Self>, shard: u16, node: NodeId, index: u64, sources: &[NodeId]) {
        if node == self.shards.node_id {
            if let Some(target) = sources.first() {
                let moved = self.shards.admin_group_local(shard, GroupAdmin::TransferLeader { target: *target }).await;
                if let Err(error) = moved {
                    tracing::warn!(shard, error = %error, "could not hand leadership over before repairing");
                }
            }
            self.start_repair(shard, Plan::AtCheck { index, sources: sources.to_vec() }, "check");
            return;
        }
        let Ok(addr) = self.addr_of(shard, node) else { return };
        let Some(mut client) = self.client(&addr) else { return };
        let Ok((_, _, group)) = self.progress(shard) else { return };
        let mut request = tonic::Request::new(pb::RepairRequest {
            group,
            check_index: index,
            sources: sources.to_vec(),
            check_now: false,
        });
        request.set_timeout(RPC_TIMEOUT);
        if let Err(status) = client.repair(request).await {
            tracing::warn!(shard, node, error = %status.message(), "could not ask a replica to repair itself");
        }
    }

    // ---- what peers ask of this node ----

    /// `CheckReport`: this replica's check at `index`, waiting up to `wait` to apply it.
    pub async fn report(
        &self,
        group: u32,
        index: u64,
        wait: Duration,
    ) -> Result<pb::CheckReportReply, AntiEntropyError> {
        let shard = self.shard_of(group)?;
        let (progress, _, _) = self.progress(shard)?;
        wait_applied(&progress, index, wait.min(Duration::from_secs(10))).await;
        let record = progress.digest.lock().last_check.clone();
        let applied_index = progress.applied_index.load(Ordering::Acquire);
        let suspect = self.is_suspect(shard);
        Ok(match record {
            Some(r) => pb::CheckReportReply {
                found: r.index == index,
                index: r.index,
                term: r.term,
                root: r.root.to_vec(),
                buckets: r.buckets.count() as u32,
                applied_index,
                proposed_at_us: r.proposed_at_us,
                suspect,
            },
            None => pb::CheckReportReply { applied_index, suspect, ..Default::default() },
        })
    }

    /// `TreeNodes`: nodes of this replica's tree at check `index` (built on a blocking thread).
    pub async fn tree_nodes(
        &self,
        group: u32,
        index: u64,
        level: usize,
        positions: Vec<u32>,
    ) -> Result<pb::TreeNodesReply, AntiEntropyError> {
        let shard = self.shard_of(group)?;
        if self.is_suspect(shard) {
            return Err(AntiEntropyError::Suspect { shard });
        }
        let (progress, _, _) = self.progress(shard)?;
        let record = progress.digest.lock().last_check.clone();
        let Some(record) = record.filter(|r| r.index == index) else {
            return Ok(pb::TreeNodesReply { found: false, nodes: Vec::new() });
        };
        if positions.len() > record.buckets.count() {
            return Err(AntiEntropyError::Malformed(format!("shard {shard}: more tree positions than nodes")));
        }
        let nodes = tokio::task::spawn_blocking(move || {
            let tree = record.buckets.tree();
            positions.iter().map(|p| tree.node(level, *p as usize).map(|n| n.to_vec()).unwrap_or_default()).collect()
        })
        .await
        .map_err(|e| AntiEntropyError::RepairFailed { shard, message: e.to_string() })?;
        Ok(pb::TreeNodesReply { found: true, nodes })
    }

    /// `FetchBuckets`: the records of some buckets, once this replica has applied `min_applied`.
    pub async fn fetch_buckets(
        &self,
        request: pb::FetchBucketsRequest,
    ) -> Result<pb::FetchBucketsReply, AntiEntropyError> {
        let shard = self.shard_of(request.group)?;
        if self.is_suspect(shard) {
            return Err(AntiEntropyError::Suspect { shard });
        }
        let (progress, storage, group) = self.progress(shard)?;
        wait_applied(
            &progress,
            request.min_applied,
            Duration::from_millis(u64::from(request.wait_ms)).min(SOURCE_WAIT * 5),
        )
        .await;
        let count = request.bucket_count as usize;
        if !digest::valid_bucket_count(count) {
            return Err(AntiEntropyError::Malformed(format!("shard {shard}: {count} is no bucket count")));
        }
        let buckets: BTreeSet<usize> = request.buckets.iter().map(|b| *b as usize).filter(|b| *b < count).collect();
        let copy =
            tokio::task::spawn_blocking(move || repair::read_buckets(&storage, &progress, group, count, &buckets))
                .await
                .map_err(|e| AntiEntropyError::RepairFailed { shard, message: e.to_string() })??;
        Ok(pb::FetchBucketsReply {
            applied_index: copy.applied_index,
            records: copy.records.into_iter().map(|(key, value)| pb::BucketRecord { key, value }).collect(),
            digests: copy.digests.into_iter().map(|(_, d)| d).collect(),
        })
    }

    /// `Repair`: the leader found this replica disagreeing at check `index`; index 0 asks for
    /// a sync now ([`AntiEntropy::sync_now`]).
    pub fn repair_ordered(
        self: &Arc<Self>,
        group: u32,
        index: u64,
        sources: Vec<NodeId>,
        check_now: bool,
    ) -> Result<bool, AntiEntropyError> {
        let shard = self.shard_of(group)?;
        self.progress(shard)?;
        if check_now {
            let leads = self.shards.leads(shard);
            if leads {
                self.forced.lock().insert(shard);
            }
            return Ok(leads);
        }
        if index == 0 {
            return Ok(!self.sync_now(Some(shard)).is_empty());
        }
        Ok(self.start_repair(shard, Plan::AtCheck { index, sources }, "check"))
    }

    /// Asks the node at `addr` to sync its replica of `shard` now (a `Repair` at index 0), or
    /// with `check_now`, to propose a check now if it leads the shard.
    pub async fn ask_sync(
        &self,
        shard: u16,
        node: NodeId,
        addr: &str,
        check_now: bool,
    ) -> Result<bool, AntiEntropyError> {
        let (_, _, group) = self.progress(shard)?;
        let mut client =
            self.client(addr).ok_or_else(|| AntiEntropyError::Peer { node, message: format!("bad address {addr}") })?;
        let mut request =
            tonic::Request::new(pb::RepairRequest { group, check_index: 0, sources: Vec::new(), check_now });
        request.set_timeout(RPC_TIMEOUT);
        let reply = client
            .repair(request)
            .await
            .map_err(|s| AntiEntropyError::Peer { node, message: s.message().to_string() })?;
        Ok(reply.into_inner().started)
    }

    /// Every voter's last check of `shard` (node, check index, root, suspect), asked live.
    pub async fn replica_roots(
        &self,
        shard: u16,
    ) -> Result<Vec<(NodeId, Option<(u64, String, bool)>)>, AntiEntropyError> {
        let (_, _, group) = self.progress(shard)?;
        let voters = self.shards.voters(shard)?;
        Ok(futures::future::join_all(voters.into_iter().map(|(node, addr)| async move {
            if node == self.shards.node_id {
                let own = self.local_check(shard);
                return (node, own.map(|c| (c.index, hex::encode(c.root), self.is_suspect(shard))));
            }
            let Some(mut client) = self.client(&addr) else { return (node, None) };
            let mut request = tonic::Request::new(pb::CheckReportRequest { group, index: 0, wait_ms: 0 });
            request.set_timeout(Duration::from_secs(2));
            let reply = client.check_report(request).await.ok().map(|r| r.into_inner());
            (node, reply.filter(|r| r.index > 0).map(|r| (r.index, hex::encode(&r.root), r.suspect)))
        }))
        .await)
    }

    // ---- scrubs ----

    async fn scrub_loop(self: Arc<Self>) {
        tokio::time::sleep(self.settings.start_up_scrub_delay).await;
        loop {
            let local = self.local_shards();
            // A replica that stopped being hosted before its first scrub needs no check.
            let gone: Vec<u16> = self.unchecked.lock().iter().copied().filter(|s| !local.contains(s)).collect();
            for shard in gone {
                self.end_start_up_check(shard);
            }
            // Replicas this node leads first: their requests wait for their check.
            let mut local = local;
            local.sort_by_key(|shard| !self.shards.leads(*shard));
            for shard in local {
                let now = self.scrub_now.lock().remove(&shard);
                let due =
                    self.last_scrub.lock().get(&shard).is_none_or(|at| at.elapsed() >= self.settings.scrub_interval);
                if !(now || due) || self.is_suspect(shard) {
                    continue;
                }
                self.last_scrub.lock().insert(shard, Instant::now());
                let pace = if now { 0 } else { self.settings.scrub_bytes_per_second };
                if let Err(error) = self.scrub(shard, pace).await {
                    metrics::SCRUBS.with_label_values(&["failed"]).inc();
                    tracing::warn!(shard, error = %error, "scrub failed");
                }
                // The start-up check ends with the scrub, or with the repair it started.
                if !self.is_suspect(shard) {
                    self.end_start_up_check(shard);
                }
            }
            self.update_digest_memory();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn update_digest_memory(&self) {
        let mut bytes = 0usize;
        for group in self.shards.all_groups() {
            let digests = group.reader.progress().digest.lock();
            bytes += digests.buckets.as_ref().map_or(0, |b| b.memory_bytes());
            bytes += digests.last_check.as_ref().map_or(0, |c| c.buckets.memory_bytes());
        }
        metrics::DIGEST_BYTES.set(bytes as i64);
    }

    /// Scrubs this node's replica of `shard` (at most `bytes_per_second`, 0: unpaced) and
    /// starts a repair of what it finds.
    pub async fn scrub(
        self: &Arc<Self>,
        shard: u16,
        bytes_per_second: u64,
    ) -> Result<repair::ScrubReport, AntiEntropyError> {
        let (progress, storage, group) = self.progress(shard)?;
        let read = Arc::new(AtomicU64::new(0));
        self.update(shard, |s| {
            s.scrub.running = true;
            s.scrub.bytes_read = 0;
        });
        let stop = self.shards.tasks.child_token();
        let counter = read.clone();
        let mut scrub = tokio::task::spawn_blocking(move || {
            repair::scrub(&storage, &progress, group, bytes_per_second, &|| stop.is_cancelled(), &counter)
        });
        // Report the bytes read while it runs.
        let report = loop {
            tokio::select! {
                done = &mut scrub => break done,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let bytes = read.load(Ordering::Relaxed);
                    self.update(shard, |s| s.scrub.bytes_read = bytes);
                }
            }
        };
        let report = report.map_err(|e| AntiEntropyError::RepairFailed { shard, message: e.to_string() });
        self.update(shard, |s| s.scrub.running = false);
        let report = report??;
        metrics::SCRUB_BYTES.inc_by(report.bytes);
        if report.stopped {
            return Ok(report);
        }
        let result = match (&report.unreadable, report.mismatched.is_empty()) {
            (Some(_), _) => "unreadable",
            (None, false) => "mismatch",
            (None, true) => "clean",
        };
        metrics::SCRUBS.with_label_values(&[result]).inc();
        self.update(shard, |s| {
            s.scrub.passes += 1;
            s.scrub.bytes_read = report.bytes;
            s.scrub.last_finished_at_us = Some(now_us());
            s.scrub.last_applied_index = Some(report.applied_index);
            s.scrub.last_records = report.records;
            s.scrub.last_mismatched_buckets = report.mismatched.len();
            s.scrub.last_unreadable = report.unreadable.clone();
        });
        if let Some(error) = &report.unreadable {
            tracing::error!(shard, error = %error, "scrub: storage of this replica is unreadable; re-seeding it from a peer");
            let count = self.settings.buckets;
            self.start_repair(shard, Plan::Buckets { buckets: (0..count).collect(), unreadable: true }, "scrub");
        } else if !report.mismatched.is_empty() {
            tracing::error!(
                shard,
                buckets = report.mismatched.len(),
                "scrub: records on disk differ from the digests; repairing from a peer"
            );
            metrics::MISMATCHED_BUCKETS.with_label_values(&[&shard_label(shard)]).set(report.mismatched.len() as i64);
            self.update(shard, |s| s.mismatched_buckets = report.mismatched.len());
            let buckets = report.mismatched.iter().copied().collect();
            self.start_repair(shard, Plan::Buckets { buckets, unreadable: false }, "scrub");
        }
        Ok(report)
    }

    // ---- repairs (of this node's replica) ----

    /// Starts a repair of this node's replica of `shard` unless one runs. Returns whether it
    /// started.
    fn start_repair(self: &Arc<Self>, shard: u16, plan: Plan, cause: &'static str) -> bool {
        if !self.repairing.lock().insert(shard) {
            return false;
        }
        self.update(shard, |s| s.suspect = true);
        self.shards.set_suspect(shard, true);
        let me = self.clone();
        self.shards.tasks.spawn(async move {
            let started = Instant::now();
            let mut summary = match me.repair(shard, plan, cause).await {
                Ok(summary) => summary,
                Err(error) => RepairSummary {
                    at_us: now_us(),
                    kind: "buckets",
                    cause,
                    buckets: 0,
                    written: 0,
                    deleted: 0,
                    source: None,
                    duration_ms: 0.0,
                    error: Some(error.to_string()),
                },
            };
            summary.duration_ms = started.elapsed().as_secs_f64() * 1e3;
            let repaired = summary.error.is_none() && summary.buckets > 0;
            me.finish_repair(shard, summary);
            if repaired {
                // A snapshot built before the repair holds the damage: build a fresh one.
                if let Ok(group) = me.shards.group(shard) {
                    let _ = group.raft.trigger().snapshot().await;
                }
                me.confirm_repair(shard);
            }
        });
        true
    }

    fn finish_repair(&self, shard: u16, summary: RepairSummary) {
        let ok = summary.error.is_none();
        metrics::REPAIRS.with_label_values(&[summary.kind, if ok { "ok" } else { "failed" }]).inc();
        if ok {
            metrics::REPAIRED_KEYS.inc_by(summary.written + summary.deleted);
            metrics::MISMATCHED_BUCKETS.with_label_values(&[&shard_label(shard)]).set(0);
            tracing::info!(
                shard,
                kind = summary.kind,
                cause = summary.cause,
                buckets = summary.buckets,
                written = summary.written,
                deleted = summary.deleted,
                source = ?summary.source,
                duration_ms = summary.duration_ms,
                "replica repaired"
            );
        } else {
            tracing::warn!(shard, error = ?summary.error, "replica repair failed; the next check or scrub tries again");
        }
        self.update(shard, |s| {
            s.suspect = false;
            if ok {
                s.repairs += 1;
                s.repaired_keys += summary.written + summary.deleted;
                s.mismatched_buckets = 0;
            }
            s.last_repair = Some(summary);
        });
        self.shards.set_suspect(shard, false);
        self.repairing.lock().remove(&shard);
        // A replica repaired (or whose repair failed) after its start-up scrub may lead and
        // serve now: a failed repair is tried again by the next check or scrub, and holding
        // the replica back for good could leave its shard without a leader. (A repair that a
        // peer's check started before that scrub ran leaves the scrub to end the check.)
        if !self.scrub_now.lock().contains(&shard) {
            self.end_start_up_check(shard);
        }
    }

    /// Ends the start-up check of this node's replica of `shard`, if it was still running.
    fn end_start_up_check(&self, shard: u16) {
        if self.unchecked.lock().remove(&shard) {
            self.shards.mark_checked(shard);
        }
    }

    /// After a repair, the leader checks again so every replica is compared at a fresh entry.
    fn confirm_repair(self: &Arc<Self>, shard: u16) {
        let me = self.clone();
        self.shards.tasks.spawn(async move { me.request_checks([shard].into()).await });
    }

    /// Repairs this node's replica of `shard`: finds the differing buckets (`plan`), copies
    /// them from a healthy replica at one applied index, and verifies the indexes after.
    async fn repair(&self, shard: u16, plan: Plan, cause: &'static str) -> Result<RepairSummary, AntiEntropyError> {
        let (progress, storage, group) = self.progress(shard)?;
        let count = progress.digest.lock().buckets.as_ref().map_or(self.settings.buckets, |b| b.count());
        let me = self.shards.node_id;
        let voters = self.shards.voters(shard)?;
        let (mut buckets, sources, unreadable): (BTreeSet<usize>, Vec<(NodeId, String)>, bool) = match &plan {
            Plan::AtCheck { index, sources } => {
                let sources: Vec<(NodeId, String)> =
                    voters.iter().filter(|(id, _)| sources.contains(id) && *id != me).cloned().collect();
                let own = progress.digest.lock().last_check.clone();
                let own = own.filter(|c| c.index == *index).ok_or_else(|| AntiEntropyError::RepairFailed {
                    shard,
                    message: format!("this replica recorded no check at index {index}"),
                })?;
                let mut found = None;
                for (node, addr) in &sources {
                    match self.descend(&own, group, addr).await {
                        Ok(differing) => {
                            found = Some(differing);
                            break;
                        }
                        Err(error) => tracing::debug!(shard, node, error = %error, "descent against a replica failed"),
                    }
                }
                let differing = found.ok_or_else(|| AntiEntropyError::RepairFailed {
                    shard,
                    message: "no healthy replica answered the descent".into(),
                })?;
                (differing, sources, false)
            }
            Plan::Buckets { buckets, unreadable } => {
                (buckets.clone(), voters.into_iter().filter(|(id, _)| *id != me).collect(), *unreadable)
            }
        };
        metrics::MISMATCHED_BUCKETS.with_label_values(&[&shard_label(shard)]).set(buckets.len() as i64);
        self.update(shard, |s| s.mismatched_buckets = buckets.len());
        let mut kind = "buckets";
        if unreadable || buckets.len() > self.settings.reseed_buckets {
            buckets = (0..count).collect();
            kind = "reseed";
        }
        let mut summary = RepairSummary {
            at_us: now_us(),
            kind,
            cause,
            buckets: buckets.len(),
            written: 0,
            deleted: 0,
            source: None,
            duration_ms: 0.0,
            error: None,
        };
        if buckets.is_empty() {
            return Ok(summary);
        }
        if sources.is_empty() {
            return Err(AntiEntropyError::RepairFailed { shard, message: "no other replica to copy from".into() });
        }
        // A damaged leader hands its leadership over first (best effort).
        if self.shards.leads(shard) {
            if let Some((target, _)) = sources.first() {
                let moved = self.shards.admin_group_local(shard, GroupAdmin::TransferLeader { target: *target }).await;
                if let Err(error) = moved {
                    tracing::warn!(shard, error = %error, "could not hand leadership over before repairing");
                }
            }
        }
        let mut last_error = String::from("no attempt");
        for attempt in 0..COPY_ATTEMPTS {
            for (node, addr) in &sources {
                match self.copy_from(shard, &progress, &storage, group, count, &buckets, addr).await {
                    Ok(replaced) => {
                        summary.written = replaced.written;
                        summary.deleted = replaced.deleted;
                        summary.source = Some(*node);
                        self.verify_indexes(shard, &progress, &storage, group).await;
                        return Ok(summary);
                    }
                    Err(error) => {
                        tracing::debug!(shard, node, attempt, error = %error, "bucket copy attempt failed");
                        last_error = format!("node {node}: {error}");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
        }
        Err(AntiEntropyError::RepairFailed { shard, message: last_error })
    }

    /// The buckets where this replica's check record differs from the one of the replica at
    /// `addr` at the same index, found by descending the two trees from the root.
    async fn descend(&self, own: &CheckRecord, group: u32, addr: &str) -> Result<BTreeSet<usize>, String> {
        let mut client = self.client(addr).ok_or("no channel")?;
        let tree = own.buckets.tree();
        let mut positions: Vec<u32> = vec![0];
        for level in (0..tree.levels()).rev() {
            let mut request = tonic::Request::new(pb::TreeNodesRequest {
                group,
                index: own.index,
                level: level as u32,
                positions: positions.clone(),
            });
            request.set_timeout(RPC_TIMEOUT);
            let reply = client.tree_nodes(request).await.map_err(|s| s.message().to_string())?.into_inner();
            if !reply.found || reply.nodes.len() != positions.len() {
                return Err(format!("no check record at index {}", own.index));
            }
            let differing: Vec<u32> = positions
                .iter()
                .zip(&reply.nodes)
                .filter(|(p, theirs)| tree.node(level, **p as usize).map(|n| n.to_vec()).as_ref() != Some(*theirs))
                .map(|(p, _)| *p)
                .collect();
            if level == 0 || differing.is_empty() {
                return Ok(differing.into_iter().map(|b| b as usize).collect());
            }
            positions = differing.iter().flat_map(|p| [2 * p, 2 * p + 1]).collect();
        }
        Ok(BTreeSet::new())
    }

    /// One copy attempt: reads `buckets` from the replica at `addr` (at or past this replica's
    /// applied index), stops this replica's applies right after the copy's index, and
    /// replaces the buckets once it stands exactly there.
    #[allow(clippy::too_many_arguments)]
    async fn copy_from(
        &self,
        shard: u16,
        progress: &Arc<AppliedProgress>,
        storage: &Arc<Storage>,
        group: u32,
        count: usize,
        buckets: &BTreeSet<usize>,
        addr: &str,
    ) -> Result<repair::Replaced, String> {
        let mut client = self.client(addr).ok_or("no channel")?;
        // Applies stop where this replica stands now, before the copy is asked for: the source
        // answers at or past this index, so this replica can always reach the copy's index
        // (it is let on to exactly there below) and never overshoots it under load.
        let min_applied = progress.applied_index.load(Ordering::Acquire);
        progress.gate.pause_at(min_applied);
        let mut request = tonic::Request::new(pb::FetchBucketsRequest {
            group,
            bucket_count: count as u32,
            buckets: buckets.iter().map(|b| *b as u32).collect(),
            min_applied,
            wait_ms: SOURCE_WAIT.as_millis() as u32,
        });
        request.set_timeout(RPC_TIMEOUT + SOURCE_WAIT);
        let reply = match client.fetch_buckets(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                progress.gate.release();
                return Err(status.message().to_string());
            }
        };
        let copy = BucketCopy {
            applied_index: reply.applied_index,
            records: reply.records.into_iter().map(|r| (r.key, r.value)).collect(),
            digests: buckets.iter().copied().zip(reply.digests).collect(),
        };
        if copy.digests.len() != buckets.len() || !copy.consistent(group, count) {
            progress.gate.release();
            return Err("the source's records do not match its own digests".into());
        }
        let at = progress.applied_index.load(Ordering::Acquire);
        if copy.applied_index < at {
            progress.gate.release();
            return Err(format!("the source stands at {}, behind this replica's {at}", copy.applied_index));
        }
        progress.gate.pause_at(copy.applied_index);
        wait_applied(progress, copy.applied_index, CATCH_UP_WAIT).await;
        let (p, st, b) = (progress.clone(), storage.clone(), buckets.clone());
        let replaced = tokio::task::spawn_blocking(move || repair::replace_buckets(&st, &p, group, &b, &copy)).await;
        progress.gate.release();
        match replaced {
            Ok(Ok(replaced)) => Ok(replaced),
            Ok(Err(ReplaceError::NotAtIndex { at, expected })) => {
                Err(format!("this replica stood at {at}, not at the copy's {expected}"))
            }
            Ok(Err(error)) => Err(error.to_string()),
            Err(error) => Err(format!("shard {shard}: {error}")),
        }
    }

    /// After records were replaced, the secondary indexes are verified (and fixed) against them.
    async fn verify_indexes(&self, shard: u16, progress: &Arc<AppliedProgress>, storage: &Arc<Storage>, group: u32) {
        let (p, st) = (progress.clone(), storage.clone());
        let verified = tokio::task::spawn_blocking(move || {
            let repaired = crate::shard::index_repair::repair_group(&st, group, Some(p.as_ref()), &AtomicU64::new(0));
            // Reads cached since the records were replaced may lack the claims the indexes
            // gained, and applies update cached reads in place rather than drop them.
            p.claims_cache.clear();
            repaired
        })
        .await;
        match verified {
            Ok(Ok(report)) if report.missing_added + report.stale_removed + report.counts_fixed > 0 => {
                tracing::info!(shard, ?report, "indexes fixed after a replica repair")
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(shard, error = %error, "index verification after a repair failed"),
            Err(error) => tracing::warn!(shard, error = %error, "index verification after a repair failed"),
        }
    }
}

/// A voter's report at a check index: (root, bucket count, suspect), `None` if it had none.
type Report = Option<(Vec<u8>, usize, bool)>;

/// The root a majority of the `voters` hold among the reports of non-suspect replicas with
/// `count` buckets, and the nodes that hold it.
fn majority(reports: &[(NodeId, Report)], count: usize, voters: usize) -> Option<(Vec<u8>, Vec<NodeId>)> {
    let mut votes: BTreeMap<&[u8], Vec<NodeId>> = BTreeMap::new();
    for (node, report) in reports {
        if let Some((root, buckets, false)) = report {
            if *buckets == count {
                votes.entry(root.as_slice()).or_default().push(*node);
            }
        }
    }
    votes.into_iter().find(|(_, nodes)| nodes.len() * 2 > voters).map(|(root, nodes)| (root.to_vec(), nodes))
}

/// Waits (polling, at most `wait`) until the replica has applied `index`.
async fn wait_applied(progress: &AppliedProgress, index: u64, wait: Duration) {
    let deadline = Instant::now() + wait;
    while progress.applied_index.load(Ordering::Acquire) < index && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The `shard` label of a metric (the meta group: `meta`).
fn shard_label(shard: u16) -> String {
    if shard == META_SHARD {
        "meta".into()
    } else {
        shard.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The majority root counts only non-suspect replicas with the same bucket count, and needs
    /// more than half of all voters (absent ones included).
    #[test]
    fn the_majority_root_needs_more_than_half_of_the_voters() {
        let good = |root: u8| Some((vec![root], 4096, false));
        let reports = vec![(1, good(7)), (2, good(7)), (3, good(9))];
        assert_eq!(majority(&reports, 4096, 3), Some((vec![7], vec![1, 2])));
        let reports = vec![(1, good(7)), (2, Some((vec![7], 4096, true))), (3, good(9))];
        assert_eq!(majority(&reports, 4096, 3), None, "a suspect replica is no vote");
        let reports = vec![(1, good(7)), (2, Some((vec![7], 1024, false))), (3, None)];
        assert_eq!(majority(&reports, 4096, 3), None, "another bucket count is no vote");
        assert_eq!(majority(&[(1, good(7)), (2, good(7))], 4096, 5), None, "two of five voters");
    }
}
