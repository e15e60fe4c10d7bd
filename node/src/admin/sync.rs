//! `GET /cluster/sync_status` and `POST /cluster/sync`: anti-entropy as this node sees it, and
//! a check and repair started now (`cluster::anti_entropy`).

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::openapi::{errors, ADMIN, BODY};
use crate::api::{ApiError, AppState};
use crate::cluster::anti_entropy::{CheckSummary, RepairSummary, ScrubSummary};
use crate::error::ErrorCode;
use crate::meta::META_SHARD;

/// Anti-entropy as this node sees it.
#[derive(Serialize, ToSchema)]
pub struct SyncStatus {
    node_id: u64,
    enabled: bool,
    interval_seconds: u64,
    scrub_interval_seconds: u64,
    scrub_bytes_per_second: u64,
    buckets: usize,
    summary: SyncSummary,
    shards: Vec<ShardSyncView>,
}

#[derive(Serialize, ToSchema)]
pub struct SyncSummary {
    shards: usize,
    agreeing: usize,
    suspect: usize,
    unchecked: usize,
    mismatched_buckets: usize,
    repairs: u64,
}

/// A shard number, or `meta` for the meta group.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum ShardName {
    Data(u16),
    Meta(String),
}

#[derive(Serialize, ToSchema)]
pub struct ShardSyncView {
    shard: ShardName,
    #[schema(required = true)]
    leader: Option<u64>,
    #[schema(required = true)]
    applied_index: Option<u64>,
    /// `agree`, `differ`, `pending` (not every replica checked the newest index yet) or
    /// `unchecked`.
    agreement: String,
    #[schema(required = true)]
    check_index: Option<u64>,
    replicas: Vec<ReplicaCheck>,
    #[schema(required = true)]
    last_check: Option<CheckSummary>,
    mismatched_buckets: usize,
    repairs: u64,
    repaired_keys: u64,
    #[schema(required = true)]
    last_repair: Option<RepairSummary>,
    scrub: ScrubSummary,
    suspect: bool,
    /// Checked since this node started (until then its replica neither leads nor serves).
    checked: bool,
}

/// One replica's last check root, asked live (all `null` when it did not answer).
#[derive(Serialize, ToSchema)]
pub struct ReplicaCheck {
    node: u64,
    #[schema(required = true)]
    check_index: Option<u64>,
    #[schema(required = true)]
    root: Option<String>,
    #[schema(required = true)]
    suspect: Option<bool>,
}

/// Per shard this node hosts, the last check it ran as leader, every replica's last check root
/// (asked live), whether they agree, what the scrub and the repairs of this node's replica did.
#[utoipa::path(get, path = "/cluster/sync_status", tag = "anti-entropy",
    responses((status = 200, description = "the status", body = SyncStatus)))]
pub async fn sync_status(State(state): State<AppState>) -> Result<Json<SyncStatus>, ApiError> {
    let anti_entropy = &state.anti_entropy;
    let status = anti_entropy.status();
    let mut shards = Vec::with_capacity(status.len());
    let (mut agreeing, mut suspect, mut repairs, mut mismatched) = (0usize, 0usize, 0u64, 0usize);
    let mut unchecked = 0usize;
    // Every shard's replicas are asked at once: a down peer costs one timeout, not one per shard.
    let all_roots = futures::future::join_all(status.keys().map(|shard| anti_entropy.replica_roots(*shard))).await;
    for ((shard, sync), roots) in status.into_iter().zip(all_roots) {
        let roots = roots.unwrap_or_default();
        // Replicas that recorded the same (newest) check index must have the same root.
        let newest = roots.iter().filter_map(|(_, r)| r.as_ref().map(|(i, _, _)| *i)).max();
        let at_newest: Vec<&String> = roots
            .iter()
            .filter_map(|(_, r)| r.as_ref().filter(|(i, _, _)| Some(*i) == newest).map(|(_, root, _)| root))
            .collect();
        let agreement = match newest {
            None => "unchecked",
            Some(_) if at_newest.windows(2).any(|w| w[0] != w[1]) => "differ",
            Some(_) if at_newest.len() == roots.len() => "agree",
            Some(_) => "pending",
        };
        if agreement == "agree" {
            agreeing += 1;
        }
        if sync.suspect {
            suspect += 1;
        }
        repairs += sync.repairs;
        mismatched += sync.mismatched_buckets;
        let replicas: Vec<ReplicaCheck> = roots
            .iter()
            .map(|(node, r)| match r {
                Some((index, root, suspect)) => ReplicaCheck {
                    node: *node,
                    check_index: Some(*index),
                    root: Some(root.clone()),
                    suspect: Some(*suspect),
                },
                None => ReplicaCheck { node: *node, check_index: None, root: None, suspect: None },
            })
            .collect();
        let group = state.shards.group(shard).ok();
        // Checked since start: until then this replica neither leads nor serves.
        let checked = group.as_ref().is_none_or(|g| g.health.checked());
        if !checked {
            unchecked += 1;
        }
        shards.push(ShardSyncView {
            shard: if shard == META_SHARD { ShardName::Meta("meta".into()) } else { ShardName::Data(shard) },
            leader: group.as_ref().and_then(|g| g.raft.metrics().borrow().current_leader),
            applied_index: group.as_ref().map(|g| g.reader.applied_index()),
            agreement: agreement.to_string(),
            check_index: newest,
            replicas,
            last_check: sync.last_check,
            mismatched_buckets: sync.mismatched_buckets,
            repairs: sync.repairs,
            repaired_keys: sync.repaired_keys,
            last_repair: sync.last_repair,
            scrub: sync.scrub,
            suspect: sync.suspect,
            checked,
        });
    }
    let settings = anti_entropy.settings();
    Ok(Json(SyncStatus {
        node_id: state.shards.node_id,
        enabled: settings.enabled,
        interval_seconds: settings.interval.as_secs(),
        scrub_interval_seconds: settings.scrub_interval.as_secs(),
        scrub_bytes_per_second: settings.scrub_bytes_per_second,
        buckets: settings.buckets,
        summary: SyncSummary {
            shards: shards.len(),
            agreeing,
            suspect,
            unchecked,
            mismatched_buckets: mismatched,
            repairs,
        },
        shards,
    }))
}

/// `target_node`: a node id, as a number or a string of digits (the runbooks write it quoted).
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(untagged)]
enum NodeRef {
    Id(u64),
    Text(String),
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    target_node: NodeRef,
    #[serde(default)]
    shard_id: Option<u16>,
    #[serde(default)]
    force: bool,
}

/// The shards a sync was started on.
#[derive(Serialize, ToSchema)]
pub struct SyncStarted {
    target_node: u64,
    force: bool,
    /// `started`, or `partly_started` when some shards could not be asked.
    status: String,
    shards: Vec<u16>,
    failed: Vec<SyncFailure>,
    /// Where to follow it.
    progress: String,
}

#[derive(Serialize, ToSchema)]
pub struct SyncFailure {
    shard: u16,
    code: ErrorCode,
    error: String,
}

errors!(SyncErrors: ADMIN, BODY, &[ErrorCode::InvalidNodeId, ErrorCode::UnknownShard, ErrorCode::UnknownMember]);

/// The target node scrubs its replicas (of `shard_id`, or all) now and compares its last checks
/// with its peers, repairing what differs; with `force`, each shard's leader also proposes a
/// fresh check now. Answers at once with the shards asked; `GET /cluster/sync_status` shows the
/// progress.
#[utoipa::path(post, path = "/cluster/sync", tag = "anti-entropy", request_body = SyncRequest,
    responses((status = 200, description = "started", body = SyncStarted), SyncErrors))]
pub async fn sync(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    crate::api::extract::StrictJson(request): crate::api::extract::StrictJson<SyncRequest>,
) -> Result<Json<SyncStarted>, ApiError> {
    super::require_token_if_set(&state, &headers)?;
    let target = match &request.target_node {
        NodeRef::Id(id) => *id,
        NodeRef::Text(text) => text.trim().parse::<u64>().map_err(|_| {
            ApiError::new(ErrorCode::InvalidNodeId, format!("target_node {text:?} is not a node id (a number)"))
        })?,
    };
    if let Some(shard) = request.shard_id {
        if shard >= state.shards.shard_count() {
            return Err(ApiError::new(
                ErrorCode::UnknownShard,
                format!("no shard {shard}; shards are 0..{}", state.shards.shard_count()),
            ));
        }
    }
    let nodes = state.shards.known_nodes();
    let Some(target_addr) = nodes.get(&target).cloned() else {
        return Err(ApiError::new(ErrorCode::UnknownMember, format!("node {target} is not a member of this cluster")));
    };
    let meta = state.shards.meta();
    let shards: Vec<u16> = (0..state.shards.shard_count())
        .filter(|s| request.shard_id.is_none_or(|only| only == *s))
        .filter(|s| !meta.is_bootstrapped() || meta.placement.get(s).is_some_and(|r| r.contains(&target)))
        .collect();
    let mut started = Vec::new();
    let mut failed = Vec::new();
    for &shard in &shards {
        let asked = if target == state.shards.node_id {
            Ok(!state.anti_entropy.sync_now(Some(shard)).is_empty())
        } else {
            state.anti_entropy.ask_sync(shard, target, &target_addr, false).await
        };
        match asked {
            Ok(_) => started.push(shard),
            Err(error) => failed.push(SyncFailure { shard, code: error.code(), error: error.to_string() }),
        }
        if request.force {
            // The leader's fresh check compares every replica at the current index.
            let leader = state.shards.group(shard).ok().and_then(|g| g.raft.metrics().borrow().current_leader);
            if let Some((leader, addr)) = leader.filter(|l| *l != target).and_then(|l| nodes.get(&l).map(|a| (l, a))) {
                if let Err(error) = state.anti_entropy.ask_sync(shard, leader, addr, true).await {
                    tracing::debug!(shard, error = %error, "asking the leader for a fresh check failed");
                }
            }
        }
    }
    Ok(Json(SyncStarted {
        target_node: target,
        force: request.force,
        status: if failed.is_empty() { "started" } else { "partly_started" }.to_string(),
        shards: started,
        failed,
        progress: "GET /cluster/sync_status".to_string(),
    }))
}
