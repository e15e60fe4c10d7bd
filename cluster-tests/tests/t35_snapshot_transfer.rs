//! Large catch-up and snapshot installs on real processes (issue 14 §2): a follower cut off
//! while 200 MB of batched assertions were written catches up with bounded memory on both
//! sides, and a follower killed in the middle of installing a snapshot restarts with a complete
//! replica.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

const RSS: &str = "process_resident_memory_bytes";

/// Writes `batches` batches of `items` assertions with `value_bytes`-byte values through
/// `via`, one after the other; every item must be accepted.
async fn write_batches(
    cluster: &TestCluster,
    via: u64,
    batches: usize,
    items: usize,
    value_bytes: usize,
) -> anyhow::Result<()> {
    let filler = "x".repeat(value_bytes);
    for b in 0..batches {
        let assertions: Vec<Value> = (0..items)
            .map(|i| {
                json!({"concept_path": format!("bulk/{}", (b * items + i) % 64), "predicate": "blob", "value": format!("{b}-{i}-{filler}")})
            })
            .collect();
        let (status, body) = cluster.post(via, "/v1/assert/batch", &json!({"assertions": assertions})).await?;
        let first = body["results"][0].to_string();
        anyhow::ensure!(status == 200 && body["accepted"] == json!(items), "batch {b} refused: {status} {first}");
    }
    Ok(())
}

/// Bulk loads write far faster than one agent's breaker allows.
fn bulk_env() -> Vec<(String, String)> {
    vec![("STEMEDB_CIRCUIT_BREAKER_MAX_WRITES_PER_SEC".to_string(), "10000000".to_string())]
}

/// The applied index of shard 0 on `node`, from its cluster admin.
async fn applied_index(cluster: &TestCluster, node: u64) -> Option<u64> {
    let (status, body) = cluster.admin_get(node, "/cluster/shards/0").await.ok()?;
    (status == 200).then(|| body["applied_index"].as_u64()).flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_200_mb_catches_up_with_bounded_memory() -> anyhow::Result<()> {
    let cluster =
        TestCluster::start(ClusterOptions { nodes: 3, shards: 1, env: bulk_env(), ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    let lagging = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    // Warm every node first (RocksDB's block cache and memtables, the allocator's arenas), so
    // the follower's baseline is a node at work, not a process that just started.
    write_batches(&cluster, leader, 10, 500, 4096).await?;
    let warm = applied_index(&cluster, leader).await.expect("the leader's applied index");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !applied_index(&cluster, lagging).await.is_some_and(|i| i >= warm) {
        anyhow::ensure!(Instant::now() < deadline, "node {lagging} did not keep up before the cut");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Cut the follower off (it keeps running), write about 200 MB without it, then heal.
    cluster.isolate(lagging);
    let started = Instant::now();
    write_batches(&cluster, leader, 100, 500, 4096).await?;
    println!("wrote 200 MB in {:.1} s", started.elapsed().as_secs_f64());
    let target = applied_index(&cluster, leader).await.expect("the leader's applied index");
    let leader_before = cluster.metric(leader, RSS).await?.unwrap_or(0.0);
    let follower_before = cluster.metric(lagging, RSS).await?.unwrap_or(0.0);
    let (mut leader_peak, mut follower_peak) = (leader_before, follower_before);
    let caught_up = Instant::now();
    cluster.heal();
    let deadline = caught_up + Duration::from_secs(240);
    loop {
        leader_peak = leader_peak.max(cluster.metric(leader, RSS).await?.unwrap_or(0.0));
        follower_peak = follower_peak.max(cluster.metric(lagging, RSS).await?.unwrap_or(0.0));
        if applied_index(&cluster, lagging).await.is_some_and(|i| i >= target) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {lagging} did not catch up: {}",
            cluster.log_tail(lagging, 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let (leader_growth, follower_growth) = (mib(leader_peak - leader_before), mib(follower_peak - follower_before));
    println!(
        "caught up in {:.1} s; resident memory growth during catch-up: leader {leader_growth:.1} MiB \
         ({:.1} -> {:.1}), follower {follower_growth:.1} MiB ({:.1} -> {:.1})",
        caught_up.elapsed().as_secs_f64(),
        mib(leader_before),
        mib(leader_peak),
        mib(follower_before),
        mib(follower_peak)
    );
    let snapshots = cluster.metric(lagging, "stemedb_raft_snapshots_total{event=\"installed\"}").await?.unwrap_or(0.0);
    println!("snapshots installed by the follower: {snapshots}");
    anyhow::ensure!(leader_growth < 64.0, "leader memory grew {leader_growth:.1} MiB");
    anyhow::ensure!(follower_growth < 64.0, "follower memory grew {follower_growth:.1} MiB");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_during_a_snapshot_install_restarts_complete() -> anyhow::Result<()> {
    // Snapshot every 10 entries, keep 2: a follower that misses more catches up by snapshot.
    let mut env = bulk_env();
    env.push(("STEMEDB_RAFT_SNAPSHOT_LOGS_SINCE_LAST".to_string(), "10".to_string()));
    env.push(("STEMEDB_RAFT_LOGS_TO_KEEP_AFTER_SNAPSHOT".to_string(), "2".to_string()));
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 1, env, ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    let lagging = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    cluster.kill(lagging);
    // 40 batches of 100 items of 4 KB (16 MB): the install writes several 4 MiB batches.
    write_batches(&cluster, leader, 40, 100, 4096).await?;
    let target = applied_index(&cluster, leader).await.expect("the leader's applied index");
    // The restarted follower pauses 30 s after the first batch of its install.
    cluster.set_env("STEMEDB_TESTING_SNAPSHOT_INSTALL_PAUSE_MS", Some("30000"));
    cluster.restart(lagging).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) =
            cluster.post(lagging, "/v1/query", &json!({"concept_path": "bulk/1", "consistency": "stale"})).await?;
        if status == 503 && body["error"]["code"] == json!("replica_catching_up") {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "node {lagging} never started installing: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Mid-install: half the ranges are new. Kill it there, restart it without the pause.
    cluster.kill(lagging);
    cluster.set_env("STEMEDB_TESTING_SNAPSHOT_INSTALL_PAUSE_MS", None);
    cluster.restart(lagging).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !applied_index(&cluster, lagging).await.is_some_and(|i| i >= target) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {lagging} did not catch up: {}",
            cluster.log_tail(lagging, 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Same applied index, same digest on every replica: nothing lost, nothing half-installed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut digests = Vec::new();
        for id in cluster.running() {
            let (status, body) = cluster.admin_get(id, "/cluster/shards/0/digest").await?;
            anyhow::ensure!(status == 200, "digest of node {id}: {status} {body}");
            digests.push((body["applied_index"].clone(), body["digest"].clone()));
        }
        if digests.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "replicas differ: {digests:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = cluster
        .post(lagging, "/v1/query", &json!({"concept_path": "bulk/1", "lens": "all", "consistency": "stale"}))
        .await?;
    anyhow::ensure!(status == 200, "{status} {body}");
    Ok(())
}

/// A group whose log since the last snapshot reaches `raft.snapshot_log_mb_since_last` builds
/// a snapshot on every node, long before `raft.snapshot_logs_since_last` entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_reaches_its_size_limit_gets_a_snapshot() -> anyhow::Result<()> {
    let mut env = bulk_env();
    env.push(("STEMEDB_RAFT_SNAPSHOT_LOG_MB_SINCE_LAST".to_string(), "4".to_string()));
    env.push(("STEMEDB_RAFT_SNAPSHOT_LOGS_SINCE_LAST".to_string(), "1000000".to_string()));
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 1, env, ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    const BUILT: &str = "stemedb_raft_snapshots_total{event=\"built\"}";
    const ASKED: &str = "stemedb_raft_snapshots_total{event=\"log_size\"}";
    for id in cluster.running() {
        anyhow::ensure!(cluster.metric(id, BUILT).await?.unwrap_or(0.0) == 0.0, "node {id} built a snapshot already");
    }
    // About 10 MB of log: 5 batches of 500 assertions with 4 KiB values.
    write_batches(&cluster, leader, 5, 500, 4096).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in cluster.running() {
        loop {
            let asked = cluster.metric(id, ASKED).await?.unwrap_or(0.0);
            let built = cluster.metric(id, BUILT).await?.unwrap_or(0.0);
            if asked >= 1.0 && built >= 1.0 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {id}: {asked} snapshots asked for by log size, {built} built\n{}",
                cluster.log_tail(id, 30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
