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
