//! The shard groups of a node (`ShardSet`): creating them at first start, reopening them on
//! restart, routing a shard to its group and a node to its address, membership changes and
//! leader transfers, vote guards of a rejoining replica, status, rates and follower lags, the
//! claims cache budget, proposals on this node as leader (with the leader's quarantine
//! screening), linearizable read barriers, and asking a shard's leader or replicas over the
//! transport. The request path from any node (forwarding, retries, reads elsewhere) is
//! `coordinator`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};

use super::early::EarlyReplication;
use super::forward::{grpc_call, Campaign, Forward, ReadIndex};
use super::lease::{self, LeaseClock};
use super::log_store::LogStore;
use super::metrics as raft_metrics;
use super::network::{status_to_rpc_error, GrpcNetwork, PeerChannels};
use super::read_barrier::ReadBarrierGroup;
use super::replica_health::ReplicaHealth;
use super::state_machine::ShardStateMachine;
use super::types::{group_of_shard, GroupAdmin, NodeId, Raft, ShardCommand, ShardResponse};
use crate::error::ErrorCode;
use crate::meta::policy::Policy;
use crate::meta::quarantine::RecentClaims;
use crate::meta::{MetaState, META_SHARD};
use crate::model::assertion::QuarantineDecision;
use crate::model::id::shard_for_path;
use crate::shard::claims_cache::RenderedSlot;
use crate::shard::reader::{ClaimsRead, ShardReader};
use crate::shard::ConsensusError;
use crate::storage::{ColumnFamily, Storage};

/// How long a forwarding node waits before sending a proposal again after a failure that did
/// not name a new leader.
pub(crate) const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The answer to a proposal openraft refused with `ForwardToLeader` (`leader`: the leader it
/// named), and the outcome it counts as.
///
/// openraft answers `ForwardToLeader` both to a proposal it refused (this node no longer led:
/// nothing appended) and to one whose appended entry a new leader's log overwrote here. In the
/// second case the entry may live on in another replica's log (with five voters, a leader can
/// be elected without it while one follower keeps it), and a later leader may commit it: a copy
/// proposed again without a token could then apply twice. The log counts its truncations before
/// openraft answers the proposals they removed ([`LogStore::truncations`]), so `truncated` is
/// false only when the entry was never appended. A command that applies once may be proposed
/// again either way; any other, after a truncation, has an unknown outcome.
fn refused(
    shard: u16,
    node: NodeId,
    leader: Option<NodeId>,
    applies_once: bool,
    truncated: bool,
) -> (&'static str, ConsensusError) {
    if truncated && !applies_once {
        return ("outcome_unknown", ConsensusError::OutcomeUnknown { shard, timeout_ms: 0 });
    }
    match leader {
        Some(leader) if leader != node => ("not_leader", ConsensusError::NotLeader { shard, leader: Some(leader) }),
        _ => ("not_leader", ConsensusError::NoQuorum { shard }),
    }
}

/// The answer to a proposal whose group's Raft task stopped (a shutdown, or a storage failure)
/// before answering it: possibly after it appended the entry, which a follower may then commit
/// under a new leader, so only a command that applies once may be proposed again.
fn stopped(shard: u16, applies_once: bool) -> ConsensusError {
    if applies_once {
        ConsensusError::ShuttingDown { shard }
    } else {
        ConsensusError::OutcomeUnknown { shard, timeout_ms: 0 }
    }
}

/// Records the quarantine decisions of an assertion command (forwarded ones included). The
/// command is shared (its proposer keeps it to retry), so it is copied only when a decision
/// differs from the one it carries: most carry none and get none, and a retried command
/// carries those of its first screening. Each draft is decided once.
fn screen(policy: &Policy, reader: &dyn RecentClaims, command: &mut Arc<ShardCommand>) {
    let mut changes = Vec::new();
    changed_decisions(policy, reader, command, &mut 0, &mut changes);
    if !changes.is_empty() {
        record_decisions(Arc::make_mut(command), &mut 0, &mut changes.into_iter().peekable());
    }
}

/// A draft's position among the drafts of a command (parts and tokens walked in order), and
/// its new decision.
type Change = (usize, Option<QuarantineDecision>);

/// The decisions that differ from those the drafts of `command` carry, from draft `next` on.
fn changed_decisions(
    policy: &Policy,
    reader: &dyn RecentClaims,
    command: &ShardCommand,
    next: &mut usize,
    changes: &mut Vec<Change>,
) {
    match command {
        ShardCommand::Assert { proposed_at_us, items } => {
            for draft in items {
                let decision = policy.quarantine_rules().decide(policy, reader, draft, *proposed_at_us);
                if decision != draft.quarantine {
                    changes.push((*next, decision));
                }
                *next += 1;
            }
        }
        ShardCommand::Once { command, .. } => changed_decisions(policy, reader, command, next, changes),
        ShardCommand::Parts { parts } => {
            parts.iter().for_each(|part| changed_decisions(policy, reader, part, next, changes))
        }
        _ => {}
    }
}

/// Writes `changes` into the drafts at their positions (the same walk).
fn record_decisions(
    command: &mut ShardCommand,
    next: &mut usize,
    changes: &mut std::iter::Peekable<std::vec::IntoIter<Change>>,
) {
    match command {
        ShardCommand::Assert { items, .. } => {
            for draft in items {
                if let Some((_, decision)) = changes.next_if(|(at, _)| at == next) {
                    draft.quarantine = decision;
                }
                *next += 1;
            }
        }
        ShardCommand::Once { command, .. } => record_decisions(command, next, changes),
        ShardCommand::Parts { parts } => parts.iter_mut().for_each(|part| record_decisions(part, next, changes)),
        _ => {}
    }
}

/// Bytes of snapshot data in one InstallSnapshot RPC.
const SNAPSHOT_CHUNK_BYTES: u64 = 1 << 20;

/// Re-divides the claims cache budget every second while the shard set lives.
pub fn start_claims_cache_sharing(shards: &Arc<ShardSet>) {
    shards.share_claims_cache();
    let tasks = shards.tasks.clone();
    let shards = Arc::downgrade(shards);
    tasks.spawn_until_stopped(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(shards) = shards.upgrade() else { return };
            shards.share_claims_cache();
        }
    });
}

/// Builds a group's snapshot once its log after the last one holds
/// `raft.snapshot_log_mb_since_last` (openraft 0.9's own policy counts entries only, so a
/// group of large batch entries could otherwise keep tens of GB of log). Checks every group
/// this node holds (the meta group too) once a second while the shard set lives; openraft refuses a trigger while
/// the group is building one, and the snapshot is written beside the applies
/// (`raft::state_machine`).
pub fn start_log_size_snapshots(shards: &Arc<ShardSet>) {
    let limit = shards.settings.snapshot_log_bytes_since_last;
    if limit == 0 {
        return;
    }
    let tasks = shards.tasks.clone();
    let shards = Arc::downgrade(shards);
    tasks.spawn_until_stopped(async move {
        // The snapshot each group was last asked for after: asked again only once it moved. Keyed
        // by the group's instance too: a replica deleted and opened again starts afresh.
        let mut asked: HashMap<u16, (usize, Option<u64>)> = HashMap::new();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(shards) = shards.upgrade() else { return };
            for group in shards.all_groups() {
                let (snapshot, applied) = {
                    let metrics = group.raft.metrics();
                    let metrics = metrics.borrow();
                    (metrics.snapshot.map(|log_id| log_id.index), metrics.last_applied.map(|log_id| log_id.index))
                };
                let coverable = group.log.bytes_between(snapshot, applied);
                let instance = Arc::as_ptr(&group) as usize;
                if coverable < limit || asked.get(&group.shard) == Some(&(instance, snapshot)) {
                    continue;
                }
                asked.insert(group.shard, (instance, snapshot));
                raft_metrics::SNAPSHOTS.with_label_values(&["log_size"]).inc();
                tracing::info!(
                    shard = group.shard,
                    log_bytes = coverable,
                    "the log since the last snapshot reached raft.snapshot_log_mb_since_last: building one"
                );
                let _ = group.raft.trigger().snapshot().await;
            }
        }
    });
}

/// Whether `me` may serve a linearizable read of a group from its own state machine, without
/// confirming leadership (a read index through RaftCore), judging by the group's metrics:
/// - it is the leader, and the group's only member: the only voter, in every half of a joint
///   configuration, and no learners;
/// - that configuration took effect in an earlier term, so in this term no other node has
///   received an entry: an entry committed but not yet applied here cannot have been read
///   anywhere else (a replica being moved away, or a learner, could have applied it);
/// - it has applied an entry of its own term, so every entry of earlier terms is applied too,
///   including those replayed after a restart.
///
/// Every write is acknowledged only once applied here, and no other node can lead without a
/// configuration appended here first, so the read sees every write completed before it.
/// Metrics are published after RaftCore acts; their lag can only send a read through the
/// barrier, or let it overlap a change that no other node can complete without this node.
fn may_read_alone(metrics: &openraft::RaftMetrics<NodeId, BasicNode>, me: NodeId) -> bool {
    let membership = metrics.membership_config.membership();
    let term = metrics.current_term;
    metrics.state == openraft::ServerState::Leader
        && metrics.current_leader == Some(me)
        && metrics.last_applied.is_some_and(|applied| applied.leader_id.get_term() == term)
        && is_only_member(membership, me)
        && metrics.membership_config.log_id().is_none_or(|since| since.leader_id.get_term() < term)
}

/// Whether `node` is the only voter of every half of `membership` and it has no learners.
fn is_only_member(membership: &openraft::Membership<NodeId, BasicNode>, node: NodeId) -> bool {
    let configs = membership.get_joint_config();
    !configs.is_empty()
        && configs.iter().all(|voters| voters.len() == 1 && voters.contains(&node))
        && membership.nodes().count() == 1
}

pub use crate::meta::place_replicas;

/// How long apart two heartbeat answers must say this node was removed before it believes it.
pub(crate) const REMOVED_CONFIRM_MS: u64 = 2_000;

/// Raft tunables from the `[raft]` config section.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_logs_since_last: u64,
    /// `raft.snapshot_log_mb_since_last` in bytes: a snapshot is also built once the log after
    /// the last one holds this much ([`start_log_size_snapshots`]); 0: off.
    pub snapshot_log_bytes_since_last: u64,
    pub logs_to_keep_after_snapshot: u64,
    /// A planted bug (`testing.unsafe_skip_read_barrier`): linearizable reads skip the barrier.
    pub unsafe_skip_read_barrier: bool,
    /// `raft.lease_reads`: a leader whose read lease holds (`raft::lease`) answers read
    /// indexes without a heartbeat round.
    pub lease_reads: bool,
    /// `raft.early_replication`: a leader's appends go to its caught-up followers at once
    /// (`raft::early`).
    pub early_replication: bool,
    /// Memory budget of the claims caches of all shards together (`query.claims_cache_mb`).
    pub claims_cache_bytes: usize,
    /// `testing.snapshot_install_pause_ms`.
    pub snapshot_install_pause_ms: u64,
    /// `anti_entropy.buckets`: digest buckets per replica.
    pub digest_buckets: usize,
    /// `anti_entropy.enabled`: the replicas this node hosts start unchecked (they neither
    /// campaign nor serve until their start-up scrub ends, `raft::replica_health`).
    pub check_before_serving: bool,
    /// `backup.archive_enabled`: no log entry is purged before the archiver says it is
    /// archived (`LogStore::keep_unarchived`).
    pub archive_log: bool,
}

/// openraft 0.9's election timer, as (`election_timeout_min`, `election_timeout_max`), for the
/// configured window.
///
/// A follower of openraft 0.9 that knows a leader campaigns only after the leader lease *plus* its
/// own random timeout, and the lease is openraft's `election_timeout_max`: given (600, 1200) it
/// would wait 1.8-2.4 s, twice what `raft.election_timeout_*_ms` promise, and a voter refuses
/// any candidate within one lease of its last heartbeat. Here the lease is half the configured
/// maximum, and the random part fills the rest, so a follower that hears nothing campaigns after
/// `max(min, max/2 + heartbeat + 1, 2/3 max)` to `max` ms, and every voter's lease has expired
/// by then. (`raft::takeover` usually campaigns first, one lease and 50-100 ms after the leader
/// went silent.)
/// `Config::validate` keeps `heartbeat + 1 < max / 2`, so the window is never empty.
pub fn openraft_election_timeouts(heartbeat_ms: u64, min_ms: u64, max_ms: u64) -> (u64, u64) {
    let lease = max_ms / 2;
    // At least a third of the lease: `raft::takeover` campaigns one lease and a little after the
    // leader went silent, and openraft's timer is its fallback, not its rival.
    let random_min = min_ms.saturating_sub(lease).max(heartbeat_ms + 1).max(lease / 3);
    if random_min < lease {
        (random_min, lease)
    } else {
        // Unreachable after validation; openraft's own timer is the safe fallback.
        (min_ms, max_ms)
    }
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_interval_ms: 150,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            snapshot_logs_since_last: 20_000,
            snapshot_log_bytes_since_last: 1 << 30,
            logs_to_keep_after_snapshot: 1_000,
            unsafe_skip_read_barrier: false,
            lease_reads: true,
            early_replication: true,
            claims_cache_bytes: 64 << 20,
            snapshot_install_pause_ms: 0,
            digest_buckets: crate::shard::digest::DEFAULT_BUCKETS,
            check_before_serving: false,
            archive_log: false,
        }
    }
}

/// One shard: its Raft group and a reader over its applied state.
pub struct ShardGroup {
    pub shard: u16,
    read_barriers: ReadBarrierGroup<ConsensusError>,
    pub raft: Raft,
    pub reader: ShardReader,
    log: LogStore,
    pub writes: AtomicU64,
    /// Leader side: this group's own heartbeats are paused (see `raft::hibernation`).
    pub(crate) hibernating: std::sync::atomic::AtomicBool,
    /// Follower side: elections paused while the leader's node heartbeats say it hibernates.
    pub(crate) elections_paused: std::sync::atomic::AtomicBool,
    /// When this node last proposed to or read-indexed this group as leader (µs).
    pub(crate) last_proposal_us: AtomicU64,
    pub queries: AtomicU64,
    rate_sample: Mutex<RateSample>,
    /// The term in which this node last led the group, and when it first saw itself leader in
    /// it: a new leader does not know what its followers hold until they answer.
    led_since: Mutex<Option<(u64, Instant)>>,
    /// Vote guard of a node that joined with an empty data dir: 0 = may vote; `u64::MAX` =
    /// waiting for a leader's first AppendEntries; otherwise the commit index that leader
    /// reported, which this replica must apply before it votes (see [`ShardSet::may_vote`]).
    vote_guard: AtomicU64,
    /// When this replica last received an AppendEntries (`takeover::monotonic_ms`).
    pub(crate) last_append_ms: AtomicU64,
    /// The term in which this node last campaigned on its own (`raft::takeover`).
    pub(crate) campaigned_term: AtomicU64,
    /// Checked since start, suspect (`raft::replica_health`); shared with the transport.
    pub health: Arc<ReplicaHealth>,
    /// This node's read lease while it leads the group (`raft::lease`); the transport renews it.
    pub(crate) lease: Arc<LeaseClock>,
    /// Held while the election timer is set from its inputs ([`ShardGroup::update_elections`]),
    /// so a stale setting never lands last.
    elections: Mutex<()>,
    /// `takeover::monotonic_ms` when this node last lost sight of the group's leader; 0 while
    /// it knows one, [`NEVER_LED`] until it first knows one (see [`ShardGroup::leaderless_for`]).
    leader_lost_ms: Arc<AtomicU64>,
}

/// `ShardGroup::leader_lost_ms` of a group that had no known leader since this node started.
const NEVER_LED: u64 = u64::MAX;

impl ShardGroup {
    /// Starts the Raft group of `shard` over `state_machine`. `voters` (node id → Raft address):
    /// this node creates the group with them unless it exists already.
    async fn start(
        storage: Arc<Storage>,
        node_id: NodeId,
        shard: u16,
        config: Arc<openraft::Config>,
        peers: Arc<PeerChannels>,
        state_machine: ShardStateMachine,
        voters: Option<BTreeMap<NodeId, String>>,
        checked: bool,
        settings: &RaftSettings,
        tasks: &crate::tasks::NodeTasks,
    ) -> Result<ShardGroup, ConsensusError> {
        let group = group_of_shard(shard);
        let startup = |e: &dyn std::fmt::Display| ConsensusError::Startup(format!("group {group}: {e}"));
        let early = Arc::new(EarlyReplication::new(group, settings.early_replication));
        let log_store = LogStore::new(storage.clone(), group).with_node(node_id).with_early_replication(early.clone());
        let log_store = if settings.archive_log { log_store.keep_unarchived() } else { log_store };
        let log = log_store.clone();
        let reader = ShardReader::new(storage.clone(), shard, group, state_machine.progress());
        let health = Arc::new(ReplicaHealth::new(checked));
        let lease = Arc::new(LeaseClock::default());
        let network = GrpcNetwork::new(peers, group, health.clone(), lease.clone(), early);
        let raft = Raft::new(node_id, config, network, log_store, state_machine).await.map_err(|e| startup(&e))?;
        // An unchecked replica does not campaign (its data may be damaged).
        raft.runtime_config().elect(checked);
        let initialized = raft.is_initialized().await.map_err(|e| startup(&e))?;
        if let (false, Some(voters)) = (initialized, voters) {
            let count = voters.len();
            let voters: BTreeMap<NodeId, BasicNode> =
                voters.into_iter().map(|(id, addr)| (id, BasicNode::new(addr))).collect();
            raft.initialize(voters).await.map_err(|e| startup(&e))?;
            tracing::info!(group, voters = count, "raft group created");
        }
        // Count leader changes as this node sees them. Server metrics change only with
        // leadership and membership, unlike the full metrics, which change on every write.
        // Also note when the leader was lost, for `leaderless_for`.
        let mut watch = raft.server_metrics();
        let label = if shard == META_SHARD { "meta".to_string() } else { shard.to_string() };
        let leader_lost_ms = Arc::new(AtomicU64::new(NEVER_LED));
        let lost = leader_lost_ms.clone();
        tasks.spawn_until_stopped(async move {
            let mut leader = watch.borrow().current_leader;
            if leader.is_some() {
                lost.store(0, Ordering::Release);
            }
            while watch.changed().await.is_ok() {
                let now = watch.borrow().current_leader;
                if now != leader && now.is_some() {
                    raft_metrics::LEADER_CHANGES.with_label_values(&[&label]).inc();
                }
                match (leader, now) {
                    (_, Some(_)) => lost.store(0, Ordering::Release),
                    (Some(_), None) => lost.store(super::takeover::monotonic_ms().max(1), Ordering::Release),
                    (None, None) => {}
                }
                leader = now;
            }
        });
        Ok(ShardGroup {
            shard,
            read_barriers: ReadBarrierGroup::default(),
            raft,
            reader,
            log,
            writes: AtomicU64::new(0),
            hibernating: std::sync::atomic::AtomicBool::new(false),
            elections_paused: std::sync::atomic::AtomicBool::new(false),
            last_proposal_us: AtomicU64::new(crate::model::id::now_us()),
            queries: AtomicU64::new(0),
            vote_guard: AtomicU64::new(0),
            last_append_ms: AtomicU64::new(super::takeover::monotonic_ms()),
            campaigned_term: AtomicU64::new(0),
            health,
            lease,
            elections: Mutex::new(()),
            leader_lost_ms,
            led_since: Mutex::new(None),
            rate_sample: Mutex::new(RateSample {
                at: Instant::now(),
                writes: 0,
                queries: 0,
                write_rate: 0.0,
                query_rate: 0.0,
            }),
        })
    }
}

impl ShardGroup {
    /// The group's log, for the archiver (`cluster::backup::archive`): its stored entries and
    /// the purge floor.
    pub fn log(&self) -> &LogStore {
        &self.log
    }

    /// `None` while this node knows the group's leader; otherwise for how long it has not
    /// known one: since it lost sight of the last leader, or [`Duration::MAX`] when it has known
    /// none since it started. A hand-over or an election leaves a group leaderless for a few
    /// milliseconds; health reports count a shard as without leader only past a grace period.
    pub fn leaderless_for(&self) -> Option<Duration> {
        if self.raft.metrics().borrow().current_leader.is_some() {
            return None;
        }
        match self.leader_lost_ms.load(Ordering::Acquire) {
            NEVER_LED => Some(Duration::MAX),
            // The watcher has not seen the loss yet: it has just happened.
            0 => Some(Duration::ZERO),
            since => Some(Duration::from_millis(super::takeover::monotonic_ms().saturating_sub(since))),
        }
    }

    /// Turns openraft's election timer on or off: off while elections are paused (the leader
    /// hibernates the group, `raft::hibernation`) or the replica is unchecked.
    pub(crate) fn update_elections(&self) {
        let _setting = self.elections.lock();
        let on = !self.elections_paused.load(Ordering::Acquire) && self.health.checked();
        self.raft.runtime_config().elect(on);
    }
}

/// Whether this node's replica of `group` was once dropped as damaged (`raft::damage`).
fn reseed_marked(storage: &Storage, group: u32) -> Result<bool, ConsensusError> {
    crate::storage::blocking(|| {
        storage.get(crate::storage::ColumnFamily::Meta, &crate::shard::keys::reseed_marker_key(group))
    })
    .map(|v| v.is_some())
    .map_err(|e| ConsensusError::Startup(format!("group {group}: {e}")))
}

/// Totals at the last sample and the rates computed then.
#[derive(Debug, Clone, Copy)]
struct RateSample {
    at: Instant,
    writes: u64,
    queries: u64,
    write_rate: f64,
    query_rate: f64,
}

/// Request rates of one shard on this node, per second over the last sampling interval.
#[derive(Debug, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
pub struct ShardRates {
    pub write_rate: f64,
    pub query_rate: f64,
    pub writes_total: u64,
    pub queries_total: u64,
}

/// One follower's replication state as the shard leader sees it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct FollowerProgress {
    pub node: NodeId,
    #[schema(required = true)]
    pub matched_index: Option<u64>,
    /// Age of the oldest entry this follower has not matched (0 when caught up), in seconds.
    pub lag_seconds: f64,
}

/// What this node knows about one shard.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ShardStatus {
    pub shard: u16,
    pub group: u32,
    #[schema(required = true)]
    pub leader: Option<NodeId>,
    /// See [`ShardGroup::leaderless_for`]. Not part of the API's shard view (health reports
    /// use it).
    #[serde(skip)]
    #[schema(required = true)]
    pub leaderless_for: Option<Duration>,
    pub term: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub applied_index: u64,
    #[schema(required = true)]
    pub last_log_index: Option<u64>,
    /// Only on the shard leader: every follower's progress.
    pub replication: Vec<FollowerProgress>,
}

/// Every shard group this node hosts.
pub struct ShardSet {
    pub node_id: NodeId,
    /// How long a voter refuses to vote after hearing from a leader (openraft's leader lease,
    /// the maximum election timeout).
    pub(super) leader_lease: Duration,
    /// How long one forwarded attempt of a proposal may take before it is sent again (with the
    /// same token): two maximum election timeouts, at least a second.
    pub(crate) forward_attempt_timeout: Duration,
    pub(crate) liveness: super::hibernation::PeerLiveness,
    /// The node heartbeat send to each peer still in flight (at most one per known node).
    pub(crate) heartbeats_in_flight: Mutex<HashMap<NodeId, tokio::task::JoinHandle<()>>>,
    /// Raft addresses of every node this node knows of (founding members and shard memberships).
    directory: Mutex<BTreeMap<NodeId, String>>,
    /// The founding members and bootstrap placement, when this node founded the cluster: the
    /// meta group's first leader records them.
    founding: Option<(BTreeMap<NodeId, String>, BTreeMap<u16, Vec<NodeId>>)>,
    pub replication_factor: u16,
    pub(crate) unsafe_skip_read_barrier: bool,
    /// `raft.lease_reads`: a leader answers read indexes from its read lease while it holds
    /// (`raft::lease`).
    lease_reads: bool,
    /// `query.claims_cache_mb` in bytes, shared by the shards this node hosts.
    claims_cache_bytes: usize,
    shards: u16,
    /// One slot per data shard. A slot's group is replaced when this node's replica is deleted
    /// after a move took it away ([`ShardSet::retire_replica`]); callers hold an `Arc` of the
    /// group they work on, so a replaced one lives until they are done with it.
    groups: Vec<Mutex<Arc<ShardGroup>>>,
    /// The meta group (group 0): cluster nodes, shard placement, rebalances.
    meta: Arc<ShardGroup>,
    meta_state: tokio::sync::watch::Receiver<Arc<MetaState>>,
    /// Authority grants and circuit breakers, applied by the meta group.
    policy: Policy,
    peers: Arc<PeerChannels>,
    /// Every task the node runs in the background, stopped and awaited at shutdown.
    pub tasks: crate::tasks::NodeTasks,
    /// Leader hand-overs and the requests that arrive during one (`raft::handoff`).
    pub(super) handoff: super::handoff::Handoff,
    /// Shards (and [`META_SHARD`]) whose replica here was dropped at start because a damaged
    /// table file held their keys (`raft::damage`); their leaders re-seed them.
    pub damaged_at_start: Vec<u16>,
    /// The node (the meta group's leader) that said this node was removed from the cluster,
    /// answering its node heartbeat; 0: none did ([`ShardSet::removed_by`]).
    pub(crate) removed_by: Arc<AtomicU64>,
    /// When (`takeover::monotonic_ms`) a heartbeat answer first said so: it must be said again
    /// at least [`REMOVED_CONFIRM_MS`] later before this node believes it.
    pub(crate) removed_first_ms: Arc<AtomicU64>,
    /// What a group needs to be opened again ([`ShardSet::retire_replica`]).
    raft_config: Arc<openraft::Config>,
    settings: RaftSettings,
    storage: Arc<Storage>,
}

impl ShardSet {
    /// Opens (and on first start creates) the shard groups. `members` are the voters of every
    /// group at bootstrap (node id → Raft address); member `s mod n` (by id order) initializes
    /// shard `s`'s group, the others wait to hear from it. Empty `members`: a joining node.
    pub async fn open(
        storage: Arc<Storage>,
        node_id: NodeId,
        members: BTreeMap<NodeId, String>,
        shards: u16,
        replication_factor: u16,
        settings: &RaftSettings,
        peers: Arc<PeerChannels>,
        policy: Policy,
        tasks: crate::tasks::NodeTasks,
    ) -> Result<ShardSet, ConsensusError> {
        let placement = place_replicas(&members, shards, replication_factor);
        // Groups are created from the bootstrap placement only while the cluster is being
        // founded. Once this node has applied the bootstrap, an empty group here is a replica
        // moved away (and deleted) or never placed: it waits for a leader to add it, and must
        // never create a group of its own from the founding placement (it would campaign with a
        // membership the cluster left long ago and disturb the real group).
        let founded = crate::storage::blocking(|| {
            storage.get(ColumnFamily::StateMachine, &crate::shard::keys::meta_state_key(group_of_shard(META_SHARD)))
        })
        .ok()
        .flatten()
        .and_then(|bytes| serde_json::from_slice::<MetaState>(&bytes).ok())
        .is_some_and(|meta| meta.is_bootstrapped());
        let (election_timeout_min, election_timeout_max) = openraft_election_timeouts(
            settings.heartbeat_interval_ms,
            settings.election_timeout_min_ms,
            settings.election_timeout_max_ms,
        );
        let config = openraft::Config {
            cluster_name: "stemedb".into(),
            heartbeat_interval: settings.heartbeat_interval_ms,
            election_timeout_min,
            election_timeout_max,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_logs_since_last),
            // With log archival, openraft purges only when the archiver asks (what is archived,
            // `cluster::backup::archive`): its own idea of the log then matches what is kept,
            // and a follower that lags is sent entries, not a snapshot that would wipe them.
            max_in_snapshot_log_to_keep: if settings.archive_log {
                u64::MAX
            } else {
                settings.logs_to_keep_after_snapshot
            },
            // AppendEntries are bounded by bytes in the log store (`limited_get_log_entries`);
            // this bounds the count of small entries.
            max_payload_entries: 256,
            // Snapshots stream in chunks of this size; each chunk's RPC may take this long (the
            // last one includes the follower's install of the whole snapshot).
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            install_snapshot_timeout: 60_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::Startup(e.to_string()))?;
        let config = Arc::new(config);
        // Replicas whose keys were in a damaged table file: dropped, to be re-seeded by peers.
        let damaged = super::damage::damaged_groups(storage.lost_files(), shards);
        for (group, files) in &damaged {
            crate::storage::blocking(|| super::damage::drop_replica(&storage, *group, files))
                .map_err(|e| ConsensusError::Startup(format!("dropping damaged group {group}: {e}")))?;
        }
        let mut groups = Vec::with_capacity(shards as usize);
        for shard in 0..shards {
            // Opening reads RocksDB and may finish an interrupted snapshot install: off the workers.
            let state_machine = crate::storage::blocking(|| {
                ShardStateMachine::open(storage.clone(), shard, group_of_shard(shard), settings.digest_buckets)
            })
            .map_err(|e| ConsensusError::Startup(format!("shard {shard}: {e}")))?
            .with_install_pause(Duration::from_millis(settings.snapshot_install_pause_ms));
            // The replicas of shard s are replication_factor members starting at member s mod n
            // (by id); the first is the preferred leader: it initializes the group and so becomes
            // its first leader, spreading leaders over the founding nodes.
            let replicas = placement.get(&shard).cloned().unwrap_or_default();
            // A dropped replica never bootstraps its group again: its leader re-seeds it.
            let reseeding =
                damaged.contains_key(&group_of_shard(shard)) || reseed_marked(&storage, group_of_shard(shard))?;
            let voters = (replicas.first() == Some(&node_id) && !reseeding && !founded)
                .then(|| replicas.iter().filter_map(|id| members.get(id).map(|addr| (*id, addr.clone()))).collect());
            groups.push(Mutex::new(Arc::new(
                ShardGroup::start(
                    storage.clone(),
                    node_id,
                    shard,
                    config.clone(),
                    peers.clone(),
                    state_machine,
                    voters,
                    !settings.check_before_serving,
                    settings,
                    &tasks,
                )
                .await?,
            )));
        }
        // The meta group has every founding member as a voter; the lowest id creates it.
        let (meta_publish, meta_state) = tokio::sync::watch::channel(Arc::new(MetaState::default()));
        let meta_machine = crate::storage::blocking(|| {
            ShardStateMachine::open_meta(storage.clone(), meta_publish, policy.clone(), settings.digest_buckets)
        })
        .map_err(|e| ConsensusError::Startup(format!("meta group: {e}")))?;
        let meta_reseeding = damaged.contains_key(&0) || reseed_marked(&storage, 0)?;
        let meta_voters = (members.keys().next() == Some(&node_id) && !meta_reseeding).then(|| members.clone());
        let meta = Arc::new(
            ShardGroup::start(
                storage.clone(),
                node_id,
                META_SHARD,
                config.clone(),
                peers.clone(),
                meta_machine,
                meta_voters,
                !settings.check_before_serving,
                settings,
                &tasks,
            )
            .await?,
        );
        Ok(ShardSet {
            node_id,
            // openraft's lease: how long a voter that heard the leader refuses other candidates.
            leader_lease: Duration::from_millis(election_timeout_max),
            forward_attempt_timeout: Duration::from_millis(settings.election_timeout_max_ms.saturating_mul(2))
                .max(Duration::from_secs(1)),
            liveness: Default::default(),
            heartbeats_in_flight: Default::default(),
            directory: Mutex::new(members.clone()),
            founding: (!members.is_empty()).then_some((members, placement)),
            replication_factor,
            unsafe_skip_read_barrier: settings.unsafe_skip_read_barrier,
            lease_reads: settings.lease_reads,
            claims_cache_bytes: settings.claims_cache_bytes,
            shards,
            groups,
            meta,
            meta_state,
            policy,
            peers,
            tasks,
            handoff: super::handoff::Handoff::new(shards),
            damaged_at_start: damaged.keys().filter_map(|g| crate::shard::command::shard_of_group(*g)).collect(),
            removed_by: Arc::new(AtomicU64::new(0)),
            removed_first_ms: Arc::new(AtomicU64::new(0)),
            raft_config: config,
            settings: settings.clone(),
            storage,
        })
    }

    /// Waits until every shard has a leader, up to `timeout`.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> Result<(), ConsensusError> {
        for group in self.all_groups() {
            group
                .raft
                .wait(Some(timeout))
                .metrics(|m| m.current_leader.is_some(), "shard has a leader")
                .await
                .map_err(|_| ConsensusError::NoQuorum { shard: group.shard })?;
        }
        Ok(())
    }

    pub fn shard_count(&self) -> u16 {
        self.shards
    }

    pub fn shard_for_path(&self, concept_path: &str) -> u16 {
        shard_for_path(concept_path, self.shards)
    }

    /// A data shard's group, or the meta group for [`META_SHARD`].
    pub fn group(&self, shard: u16) -> Result<Arc<ShardGroup>, ConsensusError> {
        if shard == META_SHARD {
            return Ok(self.meta.clone());
        }
        self.groups.get(shard as usize).map(|slot| slot.lock().clone()).ok_or(ConsensusError::UnknownShard { shard })
    }

    /// Arms the vote guard of every group: called when a node starts on an empty data dir to
    /// join a running cluster (for instance after losing its disk). Such a node may still be a
    /// voter in the groups' membership, yet it has forgotten entries it acknowledged; voting
    /// with an empty log could elect a leader that lacks committed entries. So it refuses votes
    /// until it has applied what a leader reported committed when it first heard from one.
    pub fn arm_vote_guards(&self) {
        for group in self.all_groups() {
            group.vote_guard.store(u64::MAX, Ordering::Release);
        }
        tracing::warn!("this node forgot entries it acknowledged (an empty data dir, or replicas dropped as damaged): votes held back until caught up");
    }

    /// Records that this node's replica of `shard` ended its start-up check
    /// (`raft::replica_health`): it may campaign and serve from now on.
    pub fn mark_checked(&self, shard: u16) {
        if let Ok(group) = self.group(shard) {
            if group.health.mark_checked() {
                group.update_elections();
                tracing::info!(shard, "replica checked since start; it may lead and serve");
            }
        }
    }

    /// Hands the leadership of `shard`, which this node leads, to the most caught-up other
    /// voter (see `raft::handoff`); returns the new leader.
    pub async fn hand_over_shard(&self, shard: u16) -> Result<NodeId, ConsensusError> {
        let group = self.group(shard)?;
        self.hand_over(&group, &[]).await
    }

    /// Whether this node's replica of `shard` ended its start-up check.
    pub fn checked(&self, shard: u16) -> bool {
        self.group(shard).is_ok_and(|g| g.health.checked())
    }

    /// Marks this node's replica of `shard` suspect (being repaired) or not: a suspect replica
    /// sends no snapshot.
    pub fn set_suspect(&self, shard: u16, suspect: bool) {
        if let Ok(group) = self.group(shard) {
            group.health.set_suspect(suspect);
        }
    }

    /// Waits until `group`'s replica is checked (`raft::replica_health`), up to `deadline`.
    pub(crate) async fn until_checked(&self, group: &ShardGroup, deadline: Instant) -> Result<(), ConsensusError> {
        if group.health.checked() || group.health.until_checked(deadline).await {
            return Ok(());
        }
        Err(ConsensusError::CatchingUp { shard: group.shard })
    }

    /// Whether any group still holds back its votes after an empty-data-dir join.
    /// Only the meta group and the shards placed on this node count: the others never hear
    /// from a leader.
    pub fn recovering(&self) -> bool {
        // A group this node leads hears no leader's AppendEntries; it has a log a majority chose.
        let waiting = |shard: u16| {
            self.group(shard).is_ok_and(|g| {
                g.vote_guard.load(Ordering::Acquire) != 0
                    && g.raft.metrics().borrow().current_leader != Some(self.node_id)
            }) && !self.may_vote(shard)
        };
        waiting(META_SHARD) || self.meta().shards_of(self.node_id).into_iter().any(waiting)
    }

    /// Records an AppendEntries to `shard`: when it came (`raft::takeover`) and the commit
    /// index the leader reported. While the vote guard is up, its target only grows: a stale
    /// leader's lower commit index must not lower it.
    pub fn note_leader_commit(&self, shard: u16, leader_commit: Option<u64>) {
        if let Ok(group) = self.group(shard) {
            group.last_append_ms.store(super::takeover::monotonic_ms(), Ordering::Release);
            let reported = leader_commit.unwrap_or(0).min(u64::MAX - 1);
            let _ = group.vote_guard.fetch_update(Ordering::AcqRel, Ordering::Acquire, |guard| match guard {
                0 => None,
                // Nothing committed yet (0): nothing to have forgotten, the guard drops.
                u64::MAX => Some(reported),
                target => Some(target.max(reported)),
            });
        }
    }

    /// How long after accepting a leader's AppendEntries this node refuses other candidates
    /// (openraft's lease, ms): sent back with every answer for the leader's read lease.
    pub fn promised_lease_ms(&self) -> u64 {
        u64::try_from(self.leader_lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// A candidate of `term` asks this node's vote in `shard`: this node's read lease of any term
    /// up to it ends before openraft sees the request (`raft::lease`).
    pub fn fence_read_lease(&self, shard: u16, term: u64) {
        if let Ok(group) = self.group(shard) {
            group.lease.fence(term);
        }
    }

    /// Whether this replica of `shard` may grant votes (its vote guard is down or satisfied).
    pub fn may_vote(&self, shard: u16) -> bool {
        let Ok(group) = self.group(shard) else { return true };
        match group.vote_guard.load(Ordering::Acquire) {
            0 => true,
            u64::MAX => false,
            target if group.reader.applied_index() >= target => {
                group.vote_guard.store(0, Ordering::Release);
                tracing::info!(shard, caught_up_to = target, "caught up; votes allowed again");
                true
            }
            _ => false,
        }
    }

    /// The first fatal error among the groups (a Raft that stopped on a storage failure or a
    /// panic, not a normal shutdown).
    pub fn fatal_error(&self) -> Option<String> {
        self.all_groups().find_map(|group| match &group.raft.metrics().borrow().running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(error) => Some(format!("group {}: {error}", group_of_shard(group.shard))),
        })
    }

    /// Whether this node leads `shard` (or, for [`META_SHARD`], the meta group).
    pub fn leads(&self, shard: u16) -> bool {
        self.group(shard).is_ok_and(|g| g.raft.metrics().borrow().current_leader == Some(self.node_id))
    }

    /// The cluster metadata as this node's replica of the meta group has applied it.
    pub fn meta(&self) -> Arc<MetaState> {
        self.meta_state.borrow().clone()
    }

    /// A receiver that sees every change of the cluster metadata.
    pub fn meta_changes(&self) -> tokio::sync::watch::Receiver<Arc<MetaState>> {
        self.meta_state.clone()
    }

    /// The founding members and bootstrap placement, if this node founded the cluster.
    pub fn founding(&self) -> Option<&(BTreeMap<NodeId, String>, BTreeMap<u16, Vec<NodeId>>)> {
        self.founding.as_ref()
    }

    /// The cluster-wide policy as this node has applied it.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The data shards' groups, in shard order.
    pub fn groups(&self) -> Vec<Arc<ShardGroup>> {
        self.groups.iter().map(|slot| slot.lock().clone()).collect()
    }

    /// The shard groups and the meta group.
    pub fn all_groups(&self) -> impl Iterator<Item = Arc<ShardGroup>> {
        self.groups().into_iter().chain(std::iter::once(self.meta.clone()))
    }

    /// Waits (until `deadline`) for `shard` to have a leader and returns it.
    pub(crate) async fn wait_for_leader(
        &self,
        group: &ShardGroup,
        deadline: Instant,
    ) -> Result<NodeId, ConsensusError> {
        let mut metrics = group.raft.metrics();
        loop {
            if let Some(leader) = metrics.borrow_and_update().current_leader {
                return Ok(leader);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, metrics.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(ConsensusError::ShuttingDown { shard: group.shard }),
                Err(_) => return Err(ConsensusError::NoQuorum { shard: group.shard }),
            }
        }
    }

    /// The Raft address of `node` as the group's membership records it.
    /// The voters of `shard` as this node's replica knows them, with their Raft addresses.
    pub fn voters(&self, shard: u16) -> Result<Vec<(NodeId, String)>, ConsensusError> {
        let group = self.group(shard)?;
        let membership = group.raft.metrics().borrow().membership_config.membership().clone();
        Ok(membership.voter_ids().filter_map(|id| self.addr_of(&group, id).map(|addr| (id, addr))).collect())
    }

    /// The transport's channel to the node at `addr` (for services beside Raft on 18182).
    pub fn peer_channel(&self, addr: &str) -> Option<tonic::transport::Channel> {
        self.peers.channel(addr).ok()
    }

    fn node_addr(group: &ShardGroup, node: NodeId) -> Option<String> {
        group.raft.metrics().borrow().membership_config.membership().get_node(&node).map(|n| n.addr.clone())
    }

    /// Sends a request to another node about a shard over the transport and returns its answer
    /// (see `forward` for the kinds of request).
    pub(crate) async fn ask_leader<F: Forward>(
        &self,
        group: &ShardGroup,
        leader: NodeId,
        request: &F,
        deadline: Instant,
    ) -> Result<F::Output, ConsensusError> {
        let shard = group.shard;
        let kind = F::KIND;
        let unreachable = |message: String| {
            raft_metrics::FORWARDED.with_label_values(&[kind, "unreachable"]).inc();
            ConsensusError::LeaderUnreachable { shard, leader, message }
        };
        let addr = self.addr_of(group, leader).ok_or_else(|| unreachable("no address known for this node".into()))?;
        let client = self.peers.client(&addr).map_err(|e| unreachable(e.to_string()))?;
        // The kinds the frames carry go as a frame when the peer speaks them.
        let framed = match self.peers.frames(&addr).filter(|_| F::FRAMED) {
            Some(peer) => peer.connect(deadline).await,
            None => Ok(None),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = request.message(group_of_shard(shard));
        let response = match framed {
            Ok(Some(conn)) => match F::to_frame(message) {
                Ok(body) => conn.call(body, deadline).await.and_then(|body| {
                    F::from_frame(body)
                        .ok_or_else(|| tonic::Status::internal("the peer answered with another kind of frame"))
                }),
                Err(message) => grpc_call::<F>(client, message, remaining).await,
            },
            Ok(None) => grpc_call::<F>(client, message, remaining).await,
            Err(status) => Err(status),
        };
        let response = response.map_err(|status| {
            // A status with an error code was answered by the peer's handler before it did
            // anything: a definite refusal. Anything else came from the transport and may
            // have followed delivery.
            match ErrorCode::of_status(&status) {
                Some(ErrorCode::UnknownShard | ErrorCode::ShuttingDown) => {
                    raft_metrics::FORWARDED.with_label_values(&[kind, "error"]).inc();
                    return ConsensusError::NotLeader { shard, leader: None };
                }
                // A frame connection's receiver with too many requests running.
                Some(ErrorCode::Overloaded) => {
                    raft_metrics::FORWARDED.with_label_values(&[kind, "error"]).inc();
                    return ConsensusError::Overloaded { shard, queued: crate::raft::frames::MAX_IN_FLIGHT };
                }
                Some(code) => {
                    raft_metrics::FORWARDED.with_label_values(&[kind, "error"]).inc();
                    return ConsensusError::Internal { shard, message: format!("node {leader} refused: {code}") };
                }
                None => {}
            }
            if status.code() == tonic::Code::DeadlineExceeded {
                raft_metrics::FORWARDED.with_label_values(&[kind, "timeout"]).inc();
                return ConsensusError::Timeout { shard, timeout_ms: remaining.as_millis() as u64 };
            }
            let error: openraft::error::RPCError<NodeId, BasicNode, ConsensusError> = status_to_rpc_error(status);
            unreachable(error.to_string())
        })?;
        let answer = F::answer(response).map_err(|e| unreachable(e.to_string()))?;
        raft_metrics::FORWARDED.with_label_values(&[kind, if answer.is_ok() { "ok" } else { "error" }]).inc();
        answer
    }

    /// Returns once this node's replica of `group` names a leader other than `leader`, or at
    /// `deadline`.
    pub(crate) async fn await_leader_change(&self, group: &ShardGroup, leader: NodeId, deadline: Instant) {
        let mut metrics = group.raft.server_metrics();
        loop {
            let current = metrics.borrow_and_update().current_leader;
            if current.is_some_and(|now| now != leader) {
                return;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, metrics.changed()).await {
                Ok(Ok(())) => continue,
                _ => return,
            }
        }
    }

    /// Proposes `command` on this node, which must lead the shard (used for forwarded writes:
    /// they are never forwarded a second time). The command is shared, not copied: a caller
    /// that keeps it may propose it again after `not_leader` or `no_quorum`, which mean nothing
    /// was appended, or that the command applies once ([`ShardCommand::applies_once`]). A
    /// command without tokens that may have been appended is answered `outcome_unknown`.
    pub async fn propose_local(
        &self,
        shard: u16,
        command: Arc<ShardCommand>,
        timeout: Duration,
    ) -> Result<ShardResponse, ConsensusError> {
        let group = self.group(shard)?;
        let started = Instant::now();
        let deadline = started + timeout;
        // A leader restored at start applies nothing new before its replica is checked; it waits
        // before the hand-over gate, which a hand-over must be able to close meanwhile.
        if group.raft.metrics().borrow().current_leader == Some(self.node_id) {
            self.until_checked(&group, deadline).await?;
        }
        // Waits while this node hands the group over (then it answers `not_leader`, below).
        let _gate = self.admit(&group, deadline).await?;
        let leader = self.wait_for_leader(&group, deadline).await?;
        self.wake(&group);
        if leader != self.node_id {
            raft_metrics::PROPOSALS.with_label_values(&["not_leader"]).inc();
            return Err(ConsensusError::NotLeader { shard, leader: Some(leader) });
        }
        // The leader's own disk: a write forwarded from a node with space still needs room here.
        if command.grows_data() {
            self.check_disk_floor(shard)?;
        }
        // DESIGN §2: the leader decides quarantine before proposing and records it in the entry.
        // Screening that reads the shard's claims from RocksDB runs on the storage read pool;
        // without the protected-claim rule it reads nothing and runs here (a hop to the pool
        // per proposal cost a tenth of the write throughput).
        let command = if self.policy.quarantine_rules().reads_claims(&self.policy) {
            let (policy, reader) = (self.policy.clone(), group.reader.clone());
            crate::storage::pool::read_pool()
                .run(move || {
                    let mut command = command;
                    screen(&policy, &reader, &mut command);
                    command
                })
                .await
                .map_err(|_| ConsensusError::ReadsOverloaded { shard, queued: crate::storage::pool::READ_QUEUE })?
        } else {
            let mut command = command;
            screen(&self.policy, &group.reader, &mut command);
            command
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        // A copy proposed again (by the caller, or by a node that forwarded it) must not apply
        // twice: see the `ForwardToLeader` and `Fatal` arms.
        let applies_once = command.applies_once();
        let truncations = group.log.truncations();
        match tokio::time::timeout(remaining, group.raft.client_write(command)).await {
            Err(_) => {
                raft_metrics::PROPOSALS.with_label_values(&["timeout"]).inc();
                Err(ConsensusError::Timeout { shard, timeout_ms: timeout.as_millis() as u64 })
            }
            Ok(Ok(response)) => {
                raft_metrics::PROPOSALS.with_label_values(&["ok"]).inc();
                raft_metrics::PROPOSE_DURATION.observe(started.elapsed().as_secs_f64());
                Ok(response.data)
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                let truncated = group.log.truncations() != truncations;
                let (outcome, error) = refused(shard, self.node_id, forward.leader_id, applies_once, truncated);
                raft_metrics::PROPOSALS.with_label_values(&[outcome]).inc();
                Err(error)
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(ConsensusError::MembershipChange { shard, message: e.to_string() })
            }
            Ok(Err(RaftError::Fatal(_))) => {
                raft_metrics::PROPOSALS.with_label_values(&["fatal"]).inc();
                Err(stopped(shard, applies_once))
            }
        }
    }

    /// Refuses a write that grows the data while this node's data dir is below its free-space
    /// floor (`storage::disk`).
    pub fn check_disk_floor(&self, shard: u16) -> Result<(), ConsensusError> {
        self.storage.check_floor().map_err(|below| ConsensusError::InsufficientStorage {
            shard,
            node: self.node_id,
            free_bytes: below.free_bytes,
            floor_bytes: below.floor_bytes,
        })
    }

    /// A linearizable read barrier: returns once this node's copy of `shard` reflects every write
    /// acknowledged before the call. The leader confirms its leadership with its read lease or
    /// a quorum (read index); a follower asks the leader for that index and waits until it has
    /// applied it.
    pub async fn read_barrier(&self, shard: u16, timeout: Duration) -> Result<(), ConsensusError> {
        let group = self.group(shard)?;
        if self.leads_alone(&group) {
            raft_metrics::SOLE_VOTER_READS.inc();
            return Ok(());
        }
        // The reader's time counts from its arrival: the gate, waiting for a barrier another
        // reader leads, and this reader's own turn at leading share the one timeout. A barrier
        // itself gets the whole timeout from its start, because it serves every reader waiting
        // behind it, not only the one leading it (whose time may be nearly spent).
        let deadline = Instant::now() + timeout;
        // A leader holding its read lease needs no round, so no barrier to share either.
        if self.lease_reads && self.is_leader(&group) {
            let gate = self.admit(&group, deadline.min(Instant::now() + self.leader_lease * 2)).await?;
            let read_index = self.lease_read_index(&group);
            drop(gate);
            if let Some(read_index) = read_index {
                raft_metrics::LEASE_READS.inc();
                return self.wait_applied(&group, read_index, deadline, timeout).await;
            }
        }
        raft_metrics::QUORUM_READS.inc();
        // Concurrent readers share one barrier that started after they arrived.
        let shared = group.read_barriers.run_until(deadline.into(), || self.read_barrier_once(shard, timeout));
        match shared.await {
            Some(result) => result.map(|_| ()),
            None => Err(ConsensusError::Timeout { shard, timeout_ms: timeout.as_millis() as u64 }),
        }
    }

    /// Keeps a rendered answer of a claims read of `shard`; while the read is in this node's
    /// claims cache, the rendering counts against the cache's budget.
    pub fn keep_rendering(&self, shard: u16, read: &ClaimsRead, slot: RenderedSlot) {
        match self.group(shard) {
            Ok(group) => group.reader.claims_cache().render(read, slot),
            Err(_) => {
                read.rendered.put(slot);
            }
        }
    }

    /// Divides the claims cache budget evenly between the shards this node hosts now; the
    /// others get none (their reads are served elsewhere). Hosting changes with joins, moves
    /// and decommissions, so the node calls this periodically ([`start_claims_cache_sharing`]).
    pub fn share_claims_cache(&self) {
        let groups = self.groups();
        let data_groups = || groups.iter().filter(|g| g.shard != META_SHARD);
        let hosted: Vec<bool> = data_groups().map(|g| self.hosts(g)).collect();
        let share = self.claims_cache_bytes / hosted.iter().filter(|h| **h).count().max(1);
        for (group, hosted) in data_groups().zip(hosted) {
            group.reader.claims_cache().set_budget(if hosted { share } else { 0 });
        }
    }

    /// The claims cache budgets of this node's shards, together.
    pub fn claims_cache_budget(&self) -> usize {
        let groups = self.groups();
        let hosted = groups.iter().filter(|g| g.shard != META_SHARD && self.hosts(g));
        hosted.map(|g| g.reader.claims_cache().budget()).sum()
    }

    /// Estimated bytes held by this node's claims caches, and the reads they hold.
    pub fn claims_cache_usage(&self) -> (usize, usize) {
        self.groups().iter().map(|g| g.reader.claims_cache().usage()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Of the claims caches' entries, how many hold only rendered answers (their claims evicted).
    pub fn claims_cache_rendered_only(&self) -> usize {
        self.groups().iter().map(|g| g.reader.claims_cache().entry_kinds().1).sum()
    }

    /// Whether a linearizable read of `group` may skip the barrier: see [`may_read_alone`].
    fn leads_alone(&self, group: &ShardGroup) -> bool {
        let metrics = group.raft.metrics();
        let metrics = metrics.borrow();
        may_read_alone(&metrics, self.node_id)
    }

    /// One barrier for the readers waiting on `shard`, within `timeout` of its start.
    async fn read_barrier_once(&self, shard: u16, timeout: Duration) -> Result<(), ConsensusError> {
        let group = self.group(shard)?;
        let deadline = Instant::now() + timeout;
        let read_index = loop {
            let leader = self.wait_for_leader(&group, deadline).await?;
            let attempt_deadline = deadline.min(Instant::now() + self.forward_attempt_timeout);
            // Bounded like every other step: a leader cut off from its followers must answer
            // within the request's time, not whenever its heartbeats give up. A read index
            // changes nothing, so when the leader changes (a paused or isolated one never
            // answers) the next one is simply asked.
            let attempt = async {
                if leader == self.node_id {
                    self.local_read_index(shard).await
                } else {
                    self.ask_leader(&group, leader, &ReadIndex, attempt_deadline).await
                }
            };
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(attempt_deadline.saturating_duration_since(Instant::now()), attempt) => {
                    outcome.ok()
                }
                _ = self.await_leader_change(&group, leader, attempt_deadline) => None,
            };
            match outcome {
                Some(Ok(index)) => break index,
                // The leader moved, or could not be reached: ask again (the new one, if known).
                Some(Err(ConsensusError::NotLeader { .. } | ConsensusError::LeaderUnreachable { .. }))
                    if Instant::now() < deadline =>
                {
                    self.await_leader_change(&group, leader, deadline.min(Instant::now() + RETRY_PAUSE)).await
                }
                // A definite answer (no quorum behind the leader, ...) is the reader's at once.
                Some(Err(error)) => return Err(error),
                None if Instant::now() >= deadline => {
                    return Err(ConsensusError::Timeout { shard, timeout_ms: timeout.as_millis() as u64 })
                }
                None => {}
            }
        };
        self.wait_applied(&group, read_index, deadline, timeout).await
    }

    /// Waits until this replica of `group` applied `read_index`, until `deadline` (a read of
    /// `timeout`).
    async fn wait_applied(
        &self,
        group: &ShardGroup,
        read_index: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), ConsensusError> {
        // Usually applied already: skip openraft's Wait, which clones the metrics to check.
        if group.reader.applied_index() >= read_index {
            return Ok(());
        }
        let shard = group.shard;
        let remaining = deadline.saturating_duration_since(Instant::now());
        group
            .raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(read_index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(..) => {
                    ConsensusError::Timeout { shard, timeout_ms: timeout.as_millis() as u64 }
                }
                openraft::metrics::WaitError::ShuttingDown => ConsensusError::ShuttingDown { shard },
            })
    }

    /// Whether openraft's metrics say this node leads `group` under its own vote.
    fn is_leader(&self, group: &ShardGroup) -> bool {
        let metrics = group.raft.metrics();
        let metrics = metrics.borrow();
        metrics.current_leader == Some(self.node_id) && metrics.vote.leader_id.node_id == self.node_id
    }

    /// The read index of `group` from this node's read lease, when `raft.lease_reads` is on, it
    /// leads the group and the lease holds (`raft::lease`): the last index of its log, which is
    /// at or past every committed entry. `None` when a heartbeat round must confirm the
    /// leadership instead. The caller holds the hand-over gate, as for a heartbeat round.
    fn lease_read_index(&self, group: &ShardGroup) -> Option<u64> {
        if !self.lease_reads {
            return None;
        }
        let holds = {
            let metrics = group.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            metrics.current_leader == Some(self.node_id)
                && membership.get_joint_config().len() == 1
                && group.lease.holds(&metrics.vote, self.node_id, membership.voter_ids(), lease::now())
        };
        if !holds {
            return None;
        }
        // Read once the lease is known to hold, so at or past everything committed when it was
        // checked (a leader's log holds every committed entry, and none is ever truncated). Read
        // before the check, a tail from before this node's election could be older than
        // entries committed since, were the task delayed between the two for longer than a
        // lease.
        let read_index = group.log.last_appended_index()?;
        self.wake(group);
        raft_metrics::READ_INDEX_CONFIRMATIONS_LEASE.inc();
        Some(read_index)
    }

    /// The read index of `shard` on this node, which must lead it: confirms leadership with its
    /// read lease or else a heartbeat round to a quorum, and returns the log index a
    /// linearizable read must wait for.
    pub async fn local_read_index(&self, shard: u16) -> Result<u64, ConsensusError> {
        let group = self.group(shard)?;
        // Waits while this node hands the group over (then openraft answers `not_leader`).
        let _gate = self.admit(&group, Instant::now() + self.leader_lease * 2).await?;
        if let Some(read_index) = self.lease_read_index(&group) {
            return Ok(read_index);
        }
        self.wake(&group);
        match group.raft.get_read_log_id().await {
            Ok((read_log_id, _applied)) => {
                raft_metrics::READ_INDEX_CONFIRMATIONS_HEARTBEATS.inc();
                Ok(read_log_id.map(|l| l.index).unwrap_or(0))
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => match forward.leader_id {
                Some(leader) if leader != self.node_id => {
                    Err(ConsensusError::NotLeader { shard, leader: Some(leader) })
                }
                _ => Err(ConsensusError::NoQuorum { shard }),
            },
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Err(ConsensusError::NoQuorum { shard }),
            Err(RaftError::Fatal(_)) => Err(ConsensusError::ShuttingDown { shard }),
        }
    }

    /// This node's view of a shard; on the leader, with every follower's lag.
    pub fn status(&self, shard: u16) -> Result<ShardStatus, ConsensusError> {
        let group = self.group(shard)?;
        let metrics = group.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let mut replication = Vec::new();
        if let Some(progress) = &metrics.replication {
            let last = metrics.last_log_index.unwrap_or(0);
            // Until a follower answers, a new leader does not know what it holds: its lag is
            // at most the time this node has led (not the age of the log's first entries).
            let leading_for = {
                let mut since = group.led_since.lock();
                match *since {
                    Some((term, at)) if term == metrics.current_term => at.elapsed(),
                    _ => {
                        *since = Some((metrics.current_term, Instant::now()));
                        Duration::ZERO
                    }
                }
            };
            for (node, matched) in progress {
                if *node == self.node_id {
                    continue;
                }
                let matched_index = matched.map(|l| l.index);
                let lag_seconds = match matched_index {
                    Some(index) => self.unmatched_age(&group, index, last),
                    None => self.unmatched_age(&group, 0, last).min(leading_for.as_secs_f64()),
                };
                replication.push(FollowerProgress { node: *node, matched_index, lag_seconds });
            }
        }
        Ok(ShardStatus {
            shard,
            group: group_of_shard(shard),
            leader: metrics.current_leader,
            leaderless_for: group.leaderless_for(),
            term: metrics.current_term,
            voters,
            learners,
            applied_index: group.reader.applied_index(),
            last_log_index: metrics.last_log_index,
            replication,
        })
    }

    /// (shard, follower, lag seconds) for every shard this node leads.
    pub fn follower_lags(&self) -> Vec<(u16, NodeId, f64)> {
        self.groups()
            .iter()
            .filter_map(|g| self.status(g.shard).ok())
            .flat_map(|status| status.replication.into_iter().map(move |f| (status.shard, f.node, f.lag_seconds)))
            .collect()
    }

    /// Seconds since the first entry after `matched` was proposed (0 when `matched >= last`).
    fn unmatched_age(&self, group: &ShardGroup, matched: u64, last: u64) -> f64 {
        if matched >= last {
            return 0.0;
        }
        // Blank and membership entries carry no time; the next client entry bounds the age.
        for index in matched + 1..=last.min(matched + 8) {
            if let Ok(Some(proposed_at_us)) = group.log.proposed_at_us(index) {
                return crate::model::id::now_us().saturating_sub(proposed_at_us) as f64 / 1e6;
            }
        }
        0.0
    }

    /// Write and query rates of `shard` on this node; rates are recomputed at most every 10 s.
    pub fn rates(&self, shard: u16) -> ShardRates {
        let Ok(group) = self.group(shard) else {
            return ShardRates { write_rate: 0.0, query_rate: 0.0, writes_total: 0, queries_total: 0 };
        };
        let (writes, queries) = (group.writes.load(Ordering::Relaxed), group.queries.load(Ordering::Relaxed));
        let mut sample = group.rate_sample.lock();
        let elapsed = sample.at.elapsed().as_secs_f64();
        if elapsed >= 10.0 {
            sample.write_rate = (writes - sample.writes) as f64 / elapsed;
            sample.query_rate = (queries - sample.queries) as f64 / elapsed;
            *sample = RateSample { at: Instant::now(), writes, queries, ..*sample };
        }
        ShardRates {
            write_rate: sample.write_rate,
            query_rate: sample.query_rate,
            writes_total: writes,
            queries_total: queries,
        }
    }

    /// Runs a membership change of `shard` on its leader (here or forwarded). Follows a leader
    /// change (a leader asked to remove itself hands leadership over first) up to twice.
    pub async fn admin_group(&self, shard: u16, change: GroupAdmin, timeout: Duration) -> Result<(), ConsensusError> {
        let deadline = Instant::now() + timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.admin_group_once(shard, change.clone(), deadline).await {
                Err(ConsensusError::NotLeader { leader: Some(_), .. }) if attempts < 3 => continue,
                other => return other,
            }
        }
    }

    async fn admin_group_once(&self, shard: u16, change: GroupAdmin, deadline: Instant) -> Result<(), ConsensusError> {
        let group = self.group(shard)?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        if !self.hosts(&group) {
            return self.ask_replicas(&group, &change, deadline).await;
        }
        let leader = self.wait_for_leader(&group, deadline).await?;
        if leader == self.node_id {
            let remaining = deadline.saturating_duration_since(Instant::now());
            return match tokio::time::timeout(remaining, self.admin_group_local(shard, change)).await {
                Ok(result) => result,
                Err(_) => Err(ConsensusError::Timeout { shard, timeout_ms: timeout.as_millis() as u64 }),
            };
        }
        self.ask_leader(&group, leader, &change, deadline).await
    }

    /// Runs a membership change on this node, which must lead `shard`.
    pub async fn admin_group_local(&self, shard: u16, change: GroupAdmin) -> Result<(), ConsensusError> {
        let group = self.group(shard)?;
        let (leader, mut voters) = {
            let metrics = group.raft.metrics();
            let metrics = metrics.borrow();
            let voters: std::collections::BTreeSet<NodeId> =
                metrics.membership_config.membership().voter_ids().collect();
            (metrics.current_leader, voters)
        };
        if leader != Some(self.node_id) {
            return Err(ConsensusError::NotLeader { shard, leader });
        }
        // A membership change is activity: a hibernating group resumes its heartbeats.
        self.wake(&group);
        let failed = |e: &dyn std::fmt::Display| ConsensusError::MembershipChange { shard, message: e.to_string() };
        match change {
            GroupAdmin::TransferLeader { target } => return self.hand_over(&group, &[target]).await.map(|_| ()),
            GroupAdmin::AddVoter { node, addr } => {
                if voters.contains(&node) {
                    return Ok(());
                }
                group.raft.add_learner(node, BasicNode::new(addr), true).await.map_err(|e| failed(&e))?;
                voters.insert(node);
            }
            GroupAdmin::RemoveNode { node } if node == self.node_id && voters.len() > 1 => {
                // A leader that removed itself would leave the shard leaderless for an election
                // timeout. It hands leadership to the most caught-up other voter instead; the
                // caller retries the removal there.
                let target = self.hand_over(&group, &[]).await?;
                return Err(ConsensusError::NotLeader { shard, leader: Some(target) });
            }
            GroupAdmin::RemoveNode { node } => {
                if !voters.remove(&node) {
                    // A learner (say, from an interrupted join) is removed as a node.
                    let is_learner =
                        group.raft.metrics().borrow().membership_config.membership().get_node(&node).is_some();
                    if is_learner {
                        let change = openraft::ChangeMembers::RemoveNodes(std::collections::BTreeSet::from([node]));
                        group.raft.change_membership(change, false).await.map_err(|e| failed(&e))?;
                    } else {
                        // "Not a member" is this leader's view: a quorum confirms it still leads
                        // (so no newer leader has added the node since) before it says so.
                        group
                            .raft
                            .ensure_linearizable()
                            .await
                            .map_err(|_| ConsensusError::NotLeader { shard, leader: None })?;
                    }
                    return Ok(());
                }
                if voters.is_empty() {
                    return Err(failed(&"cannot remove the last voter"));
                }
            }
        }
        group.raft.change_membership(voters, false).await.map_err(|e| failed(&e))?;
        Ok(())
    }

    /// Whether this node serves the shard's requests: it is in the group's membership and, once
    /// the cluster metadata exists, the shard is placed on it. A replica that was moved away
    /// never hears of the membership that excludes it (its leader stops replicating to it), so
    /// its own view of the membership is not enough; a replica still being added is not served
    /// from until its move completes.
    pub fn hosts(&self, group: &ShardGroup) -> bool {
        // A node removed from the cluster hosts no data shard, whatever its stale metadata says.
        if group.shard != META_SHARD && self.removed_by().is_some() {
            return false;
        }
        let member = group.raft.metrics().borrow().membership_config.membership().get_node(&self.node_id).is_some();
        if !member || group.shard == META_SHARD {
            return member;
        }
        let meta = self.meta();
        !meta.is_bootstrapped() || meta.placement.get(&group.shard).is_some_and(|r| r.contains(&self.node_id))
    }

    /// The Raft address of `node`: from the group's membership, else the cluster metadata, else
    /// the directory.
    fn addr_of(&self, group: &ShardGroup, node: NodeId) -> Option<String> {
        Self::node_addr(group, node)
            .or_else(|| self.meta().nodes.get(&node).map(|n| n.raft_addr.clone()))
            .or_else(|| self.directory.lock().get(&node).cloned())
    }

    /// Whether a node heartbeat from `node` arrived within `window`.
    /// How long ago the last node heartbeat from `node` arrived, whether or not it said it was
    /// leaving (`None`: none since this process started).
    pub fn unheard_for(&self, node: NodeId) -> Option<Duration> {
        self.liveness.since_heard(node)
    }

    pub fn heard_from(&self, node: NodeId, window: Duration) -> bool {
        self.liveness.heard_within(node, window)
    }

    /// Drops a removed node from the directory.
    pub fn forget_node(&self, node: NodeId) {
        self.directory.lock().remove(&node);
    }

    /// Every node this node knows of, with its Raft address.
    pub fn known_nodes(&self) -> BTreeMap<NodeId, String> {
        let mut nodes = self.directory.lock().clone();
        for (id, record) in &self.meta().nodes {
            nodes.insert(*id, record.raft_addr.clone());
        }
        for group in self.groups() {
            for (id, node) in group.raft.metrics().borrow().membership_config.membership().nodes() {
                nodes.entry(*id).or_insert_with(|| node.addr.clone());
            }
        }
        nodes
    }

    /// Sends a request about a shard this node does not host to its replicas: the first that
    /// answers, following a "not the leader" answer to the leader it names.
    pub(crate) async fn ask_replicas<F: Forward>(
        &self,
        group: &ShardGroup,
        request: &F,
        deadline: Instant,
    ) -> Result<F::Output, ConsensusError> {
        let shard = group.shard;
        let placed = self.meta().placement.get(&shard).cloned();
        let founding = self.founding.as_ref().and_then(|(_, placement)| placement.get(&shard).cloned());
        let mut candidates: Vec<NodeId> = match placed.or(founding) {
            Some(replicas) => replicas,
            None => self.known_nodes().into_keys().collect(),
        };
        candidates.retain(|id| *id != self.node_id);
        let mut last = ConsensusError::NoQuorum { shard };
        let mut tried = std::collections::BTreeSet::new();
        while let Some(candidate) = candidates.first().copied() {
            candidates.remove(0);
            if !tried.insert(candidate) {
                continue;
            }
            match self.ask_leader(group, candidate, request, deadline).await {
                Err(ConsensusError::NotLeader { leader: Some(leader), .. }) if !tried.contains(&leader) => {
                    candidates.insert(0, leader);
                }
                Err(error @ (ConsensusError::LeaderUnreachable { .. } | ConsensusError::NotLeader { .. })) => {
                    last = error
                }
                other => return other,
            }
        }
        Err(last)
    }

    /// Marks a group active and, if it hibernates, resumes its heartbeats.
    pub(crate) fn wake(&self, group: &ShardGroup) {
        group.last_proposal_us.store(crate::model::id::now_us(), Ordering::Release);
        if group.hibernating.swap(false, Ordering::AcqRel) {
            group.raft.runtime_config().heartbeat(true);
        }
    }

    pub(crate) fn peers(&self) -> &PeerChannels {
        &self.peers
    }

    /// Groups whose heartbeats this node has paused.
    pub fn hibernating_count(&self) -> usize {
        self.groups().iter().filter(|g| g.hibernating.load(Ordering::Acquire)).count()
    }

    /// Asks this node's replica of `shard` to campaign for leadership now.
    ///
    /// With `asked_by` (the asking leader's term and id), only while this replica still follows
    /// that leader in that term: a request delivered after the leadership moved on would start
    /// an election nobody asked for, and a campaigning follower stops refusing other candidates
    /// (`raft::lease`).
    pub async fn campaign_local(&self, shard: u16, asked_by: Option<(u64, NodeId)>) -> Result<(), ConsensusError> {
        let group = self.group(shard)?;
        // A node shutting down hands its leaderships away; it must not take one back.
        if self.is_leaving() {
            return Err(ConsensusError::ShuttingDown { shard });
        }
        // An unchecked replica does not lead (`raft::replica_health`).
        if !group.health.checked() {
            return Err(ConsensusError::CatchingUp { shard });
        }
        if let Some((term, leader)) = asked_by {
            let vote = group.raft.metrics().borrow().vote;
            if !(vote.committed && vote.leader_id.term == term && vote.leader_id.node_id == leader) {
                return Err(ConsensusError::MembershipChange {
                    shard,
                    message: format!(
                        "asked to campaign by node {leader} in term {term}, but this replica's vote is for node {} in \
                         term {}; not campaigning",
                        vote.leader_id.node_id, vote.leader_id.term
                    ),
                });
            }
        }
        if group.elections_paused.swap(false, Ordering::AcqRel) {
            group.update_elections();
        }
        group.raft.trigger().elect().await.map_err(|_| ConsensusError::ShuttingDown { shard })
    }

    /// Leader transfer by waiting out the voters' leases, run on the current leader with the
    /// group's gate closed (the slow path of `raft::handoff`, for groups of more than three
    /// voters): voters refuse to vote while their leader lease runs, so the leader stops
    /// heartbeating this group, waits one lease, and asks `target` to campaign; `target`'s log
    /// is as long as a quorum's, so it wins unless another follower's election timer fires
    /// first (then the answer says who leads and the caller may retry).
    pub(super) async fn transfer_leader_local(
        &self,
        group: &ShardGroup,
        target: NodeId,
        voters: &std::collections::BTreeSet<NodeId>,
    ) -> Result<(), ConsensusError> {
        let shard = group.shard;
        if target == self.node_id {
            return Ok(());
        }
        if !voters.contains(&target) {
            return Err(ConsensusError::MembershipChange { shard, message: format!("node {target} is not a voter") });
        }
        self.wake(group);
        group.raft.runtime_config().heartbeat(false);
        // Heartbeats come back however this ends, even if the caller is cancelled mid-transfer.
        let _resume = ResumeHeartbeats(&group.raft);
        let outcome = async {
            tokio::time::sleep(self.leader_lease + Duration::from_millis(100)).await;
            let deadline = Instant::now() + self.leader_lease * 2;
            let campaign = Campaign { term: group.raft.metrics().borrow().current_term, leader: self.node_id };
            self.ask_leader(group, target, &campaign, deadline).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let _ = group
                .raft
                .wait(Some(remaining))
                .metrics(|m| m.current_leader == Some(target), "leader transferred")
                .await;
            match group.raft.metrics().borrow().current_leader {
                Some(leader) if leader == target => Ok(()),
                other => Err(ConsensusError::MembershipChange {
                    shard,
                    message: format!("leadership went to {other:?} instead of node {target}; retry"),
                }),
            }
        }
        .await;
        outcome
    }

    /// Deletes this node's replica of data shard `shard` (Raft log and hard state but the vote,
    /// records, indexes, digests, snapshot) and opens the group again empty, as on a node that
    /// never held it: a leader can add it back later like any new replica. Only for a replica
    /// that a move took away, once its group's leader confirmed this node is no member
    /// (`cluster::placement` does both).
    pub async fn retire_replica(&self, shard: u16) -> Result<(), ConsensusError> {
        let slot = self.groups.get(shard as usize).ok_or(ConsensusError::UnknownShard { shard })?;
        let group = group_of_shard(shard);
        let startup = |e: &dyn std::fmt::Display| ConsensusError::Storage { shard, message: e.to_string() };
        let old = slot.lock().clone();
        // Its Raft stops first: nothing may read or write the replica while it is deleted.
        old.raft.shutdown().await.map_err(|e| startup(&e))?;
        // Its log store writes no committed id after this (the node's shutdown would otherwise
        // write one over the deleted log, should this be cut short before `fresh` replaces it).
        old.log.retire();
        // openraft's shutdown does not wait for the state machine: an apply it handed to the
        // apply pool may still be queued there. Marked retired under the lock every apply
        // writes under, the replica takes no write from one after this (`Fault::Retired`).
        let progress = old.reader.progress().clone();
        crate::storage::blocking(|| {
            let _applying = progress.index_lock.lock();
            progress.retired.store(true, std::sync::atomic::Ordering::Release);
        });
        let storage = self.storage.clone();
        // As for a damaged replica: should the group still count this node a voter (a membership
        // change the leader has not told it of), it must not vote before it has caught up. Its
        // vote goes (see `damage::clear_replica`).
        crate::storage::blocking(|| super::damage::clear_replica(&storage, group, true, false))
            .map_err(|e| startup(&e))?;
        let buckets = self.settings.digest_buckets;
        let state_machine =
            crate::storage::blocking(|| ShardStateMachine::open(storage.clone(), shard, group, buckets))
                .map_err(|e| startup(&e))?
                .with_install_pause(Duration::from_millis(self.settings.snapshot_install_pause_ms));
        let fresh = ShardGroup::start(
            storage,
            self.node_id,
            shard,
            self.raft_config.clone(),
            self.peers.clone(),
            state_machine,
            None,
            true,
            &self.settings,
            &self.tasks,
        )
        .await?;
        fresh.vote_guard.store(u64::MAX, Ordering::Release);
        *slot.lock() = Arc::new(fresh);
        raft_metrics::RETIRED_REPLICAS.inc();
        tracing::info!(shard, group, "replica moved away: its data and raft state are deleted from this node");
        Ok(())
    }

    /// Whether `node` was removed from the cluster, as this node can tell: it leads the meta
    /// group (whose metadata holds every committed removal) and the metadata no longer lists
    /// `node`. A node that only follows says nothing (its metadata may lag).
    pub async fn was_removed(&self, node: NodeId) -> bool {
        let unlisted = |meta: &MetaState| meta.is_bootstrapped() && !meta.nodes.contains_key(&node);
        if node == self.node_id || !self.leads(META_SHARD) || !self.checked(META_SHARD) || !unlisted(&self.meta()) {
            return false;
        }
        // Said only by a leader a quorum confirms, with its metadata applied up to that point (a
        // deposed leader, or one that has not applied a recent addition, must not say it).
        let confirmed = tokio::time::timeout(Duration::from_millis(300), self.meta.raft.ensure_linearizable()).await;
        matches!(confirmed, Ok(Ok(_))) && unlisted(&self.meta())
    }

    /// The meta leader that told this node it was removed from the cluster, if one did.
    pub fn removed_by(&self) -> Option<NodeId> {
        Some(self.removed_by.load(Ordering::Acquire)).filter(|id| *id != 0)
    }

    /// Stops every group's Raft task, then writes each group's newest committed log id (a
    /// restart then re-applies everything committed before it serves).
    pub async fn shutdown(&self) {
        for group in self.all_groups() {
            if let Err(error) = group.raft.shutdown().await {
                tracing::warn!(shard = group.shard, error = %error, "raft shutdown failed");
            }
            if let Err(error) = group.log.save_latest_committed() {
                tracing::warn!(shard = group.shard, error = %error, "saving the committed log id failed");
            }
        }
    }
}

/// Turns a group's heartbeats back on when dropped.
struct ResumeHeartbeats<'a>(&'a Raft);

impl Drop for ResumeHeartbeats<'_> {
    fn drop(&mut self) {
        self.0.runtime_config().heartbeat(true);
    }
}

#[cfg(test)]
mod screening_tests {
    use std::sync::Arc;

    use super::screen;
    use crate::meta::policy::Policy;
    use crate::meta::quarantine::{QuarantineRules, RecentClaims};
    use crate::model::assertion::AssertionDraft;
    use crate::model::lens::ClaimFacts;
    use crate::shard::command::{ProposalToken, ShardCommand};
    use crate::storage::StorageError;

    struct NoClaims;

    impl RecentClaims for NoClaims {
        fn recent_claims(&self, _: &str, _: &str, _: usize) -> Result<Vec<ClaimFacts>, StorageError> {
            Ok(Vec::new())
        }
    }

    fn policy() -> Policy {
        let rules = QuarantineRules {
            require_authority_prefixes: vec!["guarded".into()],
            protect_authority_level: 0,
            breaker_quarantines: false,
        };
        Policy::new(8, rules)
    }

    /// An entry of parts, each an assertion command in a token.
    fn command(parts: &[&[&str]]) -> ShardCommand {
        let parts = parts
            .iter()
            .map(|paths| {
                let items = paths.iter().map(|path| AssertionDraft::for_test(path, "status", "writer", "1")).collect();
                let assert = ShardCommand::Assert { proposed_at_us: 1, items };
                ShardCommand::Once { token: ProposalToken::new(), command: Box::new(assert) }
            })
            .collect();
        ShardCommand::Parts { parts }
    }

    fn drafts_mut(command: &mut ShardCommand) -> Vec<&mut AssertionDraft> {
        let ShardCommand::Parts { parts } = command else { panic!("parts") };
        parts
            .iter_mut()
            .flat_map(|part| {
                let ShardCommand::Once { command, .. } = part else { panic!("once") };
                let ShardCommand::Assert { items, .. } = &mut **command else { panic!("assert") };
                items.iter_mut()
            })
            .collect()
    }

    fn decisions(command: &ShardCommand) -> Vec<Option<String>> {
        drafts_mut(&mut command.clone()).iter().map(|d| d.quarantine.as_ref().map(|q| q.reason.clone())).collect()
    }

    /// A shared command that screening leaves as it is stays shared (no copy); one that gets a
    /// decision is copied, each decision lands on its own draft across the parts, and the
    /// proposer's copy keeps what it had.
    #[test]
    fn a_command_is_copied_only_when_a_decision_changes() {
        let policy = policy();
        let kept = Arc::new(command(&[&["open/a", "open/b"], &["open/c"]]));
        let mut screened = Arc::clone(&kept);
        screen(&policy, &NoClaims, &mut screened);
        assert!(Arc::ptr_eq(&kept, &screened), "nothing to decide: the same command");
        assert_eq!(decisions(&screened), vec![None, None, None]);

        let kept = Arc::new(command(&[&["open/a", "guarded/b"], &["open/c", "guarded/d"]]));
        let mut screened = Arc::clone(&kept);
        screen(&policy, &NoClaims, &mut screened);
        assert!(!Arc::ptr_eq(&kept, &screened), "a decision: a copy");
        let required = Some("authority_required".to_string());
        assert_eq!(decisions(&screened), vec![None, required.clone(), None, required.clone()]);
        assert_eq!(decisions(&kept), vec![None, None, None, None], "the proposer's copy is untouched");

        // Screened again (a retry of the decided copy): nothing changes, nothing is copied.
        let again = Arc::clone(&screened);
        let mut rescreened = Arc::clone(&again);
        screen(&policy, &NoClaims, &mut rescreened);
        assert!(Arc::ptr_eq(&again, &rescreened));

        // A decision the rules no longer make is taken away.
        let mut stale = command(&[&["open/a"], &["guarded/b", "open/c"]]);
        for draft in drafts_mut(&mut stale) {
            draft.quarantine = Some(crate::model::assertion::QuarantineDecision {
                reason: "authority_required".into(),
                detail: "an earlier screening".into(),
            });
        }
        let mut stale = Arc::new(stale);
        screen(&policy, &NoClaims, &mut stale);
        assert_eq!(decisions(&stale), vec![None, required, None]);
    }
}

#[cfg(test)]
mod sole_voter_tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use openraft::{BasicNode, CommittedLeaderId, LogId, Membership, RaftMetrics, ServerState, StoredMembership};

    use super::{is_only_member, may_read_alone};

    fn config(voters: &[u64]) -> BTreeSet<u64> {
        voters.iter().copied().collect()
    }

    fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    /// Node 1 leading alone in term 3 since a configuration of term 1, its term-3 entry applied.
    fn leading_alone() -> RaftMetrics<u64, BasicNode> {
        let mut metrics = RaftMetrics::new_initial(1);
        metrics.state = ServerState::Leader;
        metrics.current_leader = Some(1);
        metrics.current_term = 3;
        metrics.last_applied = Some(log_id(3, 40));
        let membership = Membership::new(vec![config(&[1])], None);
        metrics.membership_config = Arc::new(StoredMembership::new(Some(log_id(1, 1)), membership));
        metrics
    }

    #[test]
    fn only_a_single_member_configuration_that_names_the_node_counts() {
        let alone: Membership<u64, BasicNode> = Membership::new(vec![config(&[1])], None);
        assert!(is_only_member(&alone, 1));
        assert!(!is_only_member(&alone, 2), "another node's single-voter group");
        let three: Membership<u64, BasicNode> = Membership::new(vec![config(&[1, 2, 3])], None);
        assert!(!is_only_member(&three, 1));
        let joint: Membership<u64, BasicNode> = Membership::new(vec![config(&[1]), config(&[1, 2])], None);
        assert!(!is_only_member(&joint, 1), "while voter 2 joins, node 1 needs its acknowledgements");
        let learner: Membership<u64, BasicNode> = Membership::new(vec![config(&[1])], Some(config(&[2])));
        assert!(!is_only_member(&learner, 1), "a learner may have applied what the leader has not");
    }

    #[test]
    fn a_sole_leader_reads_alone_only_once_its_term_and_configuration_are_settled() {
        assert!(may_read_alone(&leading_alone(), 1));
        assert!(!may_read_alone(&leading_alone(), 2), "not the leader");

        let mut follower = leading_alone();
        follower.state = ServerState::Follower;
        assert!(!may_read_alone(&follower, 1));

        let mut replaying = leading_alone();
        replaying.last_applied = Some(log_id(2, 35));
        assert!(!may_read_alone(&replaying, 1), "entries of earlier terms may still be unapplied");
        replaying.last_applied = None;
        assert!(!may_read_alone(&replaying, 1));

        let mut just_shrunk = leading_alone();
        let membership = Membership::new(vec![config(&[1])], None);
        just_shrunk.membership_config = Arc::new(StoredMembership::new(Some(log_id(3, 38)), membership));
        assert!(!may_read_alone(&just_shrunk, 1), "a replica removed this term may have applied more");

        let mut initial = leading_alone();
        let membership = Membership::new(vec![config(&[1])], None);
        initial.membership_config = Arc::new(StoredMembership::new(None, membership));
        assert!(may_read_alone(&initial, 1), "the configuration a group was created with");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{openraft_election_timeouts, refused, stopped};
    use crate::shard::ConsensusError;

    /// A refused proposal may be proposed again (`not_leader`, `no_quorum`) unless its entry
    /// may have been appended (a truncation since it was proposed) and a second copy could
    /// apply too (no tokens): then its outcome is unknown.
    #[test]
    fn a_proposal_is_proposed_again_only_when_a_second_copy_cannot_apply_twice() {
        let retried = |applies_once, truncated| refused(3, 1, Some(2), applies_once, truncated);
        let named = |answer: (&str, ConsensusError)| {
            answer.0 == "not_leader" && matches!(answer.1, ConsensusError::NotLeader { shard: 3, leader: Some(2) })
        };
        assert!(named(retried(false, false)), "never appended");
        assert!(named(retried(true, false)));
        assert!(named(retried(true, true)), "tokens make a second copy a no-op");
        let (outcome, error) = retried(false, true);
        assert_eq!(outcome, "outcome_unknown", "appended, then lost with the leadership");
        assert!(matches!(error, ConsensusError::OutcomeUnknown { shard: 3, timeout_ms: 0 }));
        assert!(matches!(refused(3, 1, None, false, false), ("not_leader", ConsensusError::NoQuorum { shard: 3 })));
        assert!(matches!(refused(3, 1, Some(1), true, true).1, ConsensusError::NoQuorum { shard: 3 }), "named itself");
        assert!(matches!(stopped(3, true), ConsensusError::ShuttingDown { shard: 3 }));
        assert!(matches!(stopped(3, false), ConsensusError::OutcomeUnknown { shard: 3, timeout_ms: 0 }));
    }

    /// When a follower that last heard its leader at 0 campaigns: openraft's lease plus its
    /// random timeout, from the lowest to the highest it can draw.
    fn campaign_window(heartbeat: u64, min: u64, max: u64) -> (u64, u64) {
        let (random_min, lease) = openraft_election_timeouts(heartbeat, min, max);
        (lease + random_min, lease + lease)
    }

    #[test]
    fn the_default_window_campaigns_within_the_configured_maximum() {
        assert_eq!(openraft_election_timeouts(150, 600, 1200), (200, 600));
        assert_eq!(campaign_window(150, 600, 1200), (800, 1200));
        // Handing openraft the configured values would campaign at 1.8-2.4 s.
        assert_eq!(campaign_window(150, 1000, 1200), (1000, 1200));
    }

    proptest! {
        #[test]
        fn every_valid_configuration_campaigns_inside_its_window(
            heartbeat in 1u64..10_000,
            extra_min in 1u64..100_000,
            extra_max in 1u64..100_000,
        ) {
            let min = heartbeat + extra_min;
            let max = min + extra_max;
            prop_assume!(heartbeat + 1 < max / 2);
            let (random_min, lease) = openraft_election_timeouts(heartbeat, min, max);
            // What openraft::Config::validate requires.
            prop_assert!(heartbeat < random_min && random_min < lease);
            let (first, last) = campaign_window(heartbeat, min, max);
            prop_assert!(last <= max, "campaigns at {last} ms, after the maximum {max}");
            prop_assert!(
                first >= min || random_min == heartbeat + 1 || random_min == lease / 3,
                "campaigns at {first} ms, before {min}"
            );
            // After raft::takeover's own campaign, one lease and its margin past the silence.
            prop_assert!(first >= lease + lease / 3);
            // Every voter's lease has run out when the earliest candidate asks.
            prop_assert!(first > lease);
        }
    }
}
