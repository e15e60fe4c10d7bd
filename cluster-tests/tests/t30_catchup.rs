//! A follower that was down catches up by log, and by snapshot once the log it missed is purged.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

/// Snapshots a node installed since it started.
const INSTALLED: &str = "stemedb_raft_snapshots_total{event=\"installed\"}";

async fn wait_follower_has(cluster: &TestCluster, node: u64, path: &str, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = cluster
            .post(node, "/v1/query", &json!({"concept_path": path, "lens": "history", "consistency": "stale"}))
            .await?;
        let seen = body["results"][0]["assertions"].as_array().map(|a| a.len()).unwrap_or(0);
        if status == 200 && seen == count {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "node {node} has {seen} of {count} assertions of {path}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_follower_catches_up_by_log_and_by_snapshot() -> anyhow::Result<()> {
    // Snapshot every 20 entries and keep only 5 after it, so a follower that misses 60 entries
    // can only catch up through a snapshot.
    let env = vec![
        ("STEMEDB_RAFT_SNAPSHOT_LOGS_SINCE_LAST".to_string(), "20".to_string()),
        ("STEMEDB_RAFT_LOGS_TO_KEEP_AFTER_SNAPSHOT".to_string(), "5".to_string()),
    ];
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 2, env, ..Default::default() }).await?;
    let by_log = "catchup/log";
    let shard = cluster.shard_of(by_log);
    let leader = cluster.wait_for_leader(shard, Duration::from_secs(10)).await?;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).expect("follower");

    cluster.kill(follower);
    for i in 0..5 {
        cluster.assert_value(leader, by_log, json!(i)).await?;
    }
    cluster.restart(follower).await?;
    wait_follower_has(&cluster, follower, by_log, 5).await?;
    // Five entries behind is well within the leader's log: no snapshot was needed.
    let installed = cluster.metric(follower, INSTALLED).await?.unwrap_or(0.0);
    assert_eq!(installed, 0.0, "node {follower} caught up by snapshot, not by log");

    // Leadership may have moved while the follower was away: pick again.
    let leader = cluster.wait_for_leader(shard, Duration::from_secs(10)).await?;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).expect("follower");
    cluster.kill(follower);
    let by_snapshot = "catchup/snapshot";
    for i in 0..60 {
        cluster.assert_value(leader, &format!("{by_snapshot}{}", i % 3), json!(i)).await?;
    }
    cluster.restart(follower).await?;
    for k in 0..3 {
        wait_follower_has(&cluster, follower, &format!("{by_snapshot}{k}"), 20).await?;
    }
    wait_follower_has(&cluster, follower, by_log, 5).await?;
    // The leader purged the entries the follower missed, so it can only have caught up by
    // installing a snapshot (the counter started at zero with the restarted process). Counted
    // once the install has returned, which may be just after the data became readable.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let installed = cluster.metric(follower, INSTALLED).await?.unwrap_or(0.0);
        if installed >= 1.0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "node {follower} installed no snapshot: {installed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
