//! Killing a shard leader elects a new one and loses no acknowledged write; the killed node
//! catches up when it returns.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 4, ..Default::default() }).await?;
    let path = "failover/key";
    let shard = cluster.shard_of(path);
    let old_leader = cluster.wait_for_leader(shard, Duration::from_secs(10)).await?;
    let via = *cluster.nodes.keys().find(|id| **id != old_leader).expect("other node");
    let mut acked = Vec::new();
    for i in 0..30 {
        acked.push(cluster.assert_value(via, path, json!(i)).await?);
    }
    cluster.kill(old_leader);
    let new_leader = cluster.wait_for_leader(shard, Duration::from_secs(15)).await?;
    assert_ne!(new_leader, old_leader);
    let metrics =
        cluster.client.get(format!("{}/metrics", cluster.node(new_leader).api())).send().await?.text().await?;
    assert!(
        metrics.contains(&format!("stemedb_raft_leader_changes_total{{shard=\"{shard}\"}}")),
        "leader change not counted"
    );

    for id in &acked {
        let (status, body) = cluster.get(via, &format!("/v1/assertions/{id}")).await?;
        assert_eq!(status, 200, "acknowledged {id} lost: {body}");
    }
    // Writes go on with the new leader, through either survivor.
    for survivor in cluster.running() {
        cluster.assert_value(survivor, path, json!(format!("after-{survivor}"))).await?;
    }
    let (status, history) = cluster.post(via, "/v1/query", &json!({"concept_path": path, "lens": "history"})).await?;
    assert_eq!(status, 200);
    assert_eq!(history["results"][0]["assertions"].as_array().map(|a| a.len()), Some(32), "no loss, no duplicates");

    // The old leader returns and catches up.
    cluster.restart(old_leader).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = cluster
            .post(old_leader, "/v1/query", &json!({"concept_path": path, "lens": "history", "consistency": "stale"}))
            .await?;
        if status == 200 && body["results"][0]["assertions"].as_array().map(|a| a.len()) == Some(32) {
            break;
        }
        assert!(Instant::now() < deadline, "restarted node did not catch up: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_can_be_transferred() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 2, ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    let target = *cluster.nodes.keys().find(|id| **id != leader).expect("other node");
    cluster.transfer_leader(0, target).await?;
    let path = (0..100).map(|i| format!("transfer/k{i}")).find(|p| cluster.shard_of(p) == 0).expect("a key on shard 0");
    cluster.assert_value(leader, &path, json!("after transfer")).await?;
    let response = cluster
        .client
        .post(format!("{}/admin/shards/0/transfer-leader", cluster.node(1).admin()))
        .json(&json!({"target_node": 99}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 409, "not a voter");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernating_groups_still_fail_over_and_wake_on_writes() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 3, ..Default::default() }).await?;
    // Idle for longer than raft::hibernation::IDLE_AFTER (3 s): every leader pauses its groups.
    cluster.wait_for_hibernation(3, Duration::from_secs(20)).await?;
    // A write and a linearizable read wake a hibernating group.
    let path = (0..100).map(|i| format!("hib/k{i}")).find(|p| cluster.shard_of(p) == 0).expect("a key on shard 0");
    cluster.assert_value(2, &path, json!("awake")).await?;
    assert_eq!(cluster.read_value(3, &path, "linearizable").await?.1, json!("awake"));
    // Idle again, shard 0 goes back to sleep: the failover below starts from a hibernating group.
    cluster.wait_for_hibernation(3, Duration::from_secs(20)).await?;
    // The leader of a hibernating group dies: its followers resume elections and replace it.
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    cluster.kill(leader);
    let new_leader = cluster.wait_for_leader(0, Duration::from_secs(20)).await?;
    assert_ne!(new_leader, leader);
    let survivor = cluster.running()[0];
    cluster.assert_value(survivor, &path, json!("after failover")).await?;
    assert_eq!(cluster.read_value(survivor, &path, "linearizable").await?.1, json!("after failover"));
    Ok(())
}
