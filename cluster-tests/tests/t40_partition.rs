//! A minority cannot commit: writes through an isolated node fail within the request timeout
//! (never hang) while the majority goes on; after healing, the isolated node has everything.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_minority_cannot_commit() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 2, ..Default::default() }).await?;
    let path = "partition/key";
    let shard = cluster.shard_of(path);
    let leader = cluster.wait_for_leader(shard, Duration::from_secs(10)).await?;
    cluster.assert_value(leader, path, json!("before")).await?;

    cluster.isolate(leader);
    let started = Instant::now();
    let body = json!({"concept_path": path, "predicate": "p", "value": "minority", "agent_id": "test"});
    let (status, response) = cluster.post(leader, "/v1/assert", &body).await?;
    assert!(matches!(status, 503 | 504), "isolated old leader must not commit: {status} {response}");
    assert!(started.elapsed() < Duration::from_secs(10), "answered within the request timeout");
    assert!(response["error"]["code"].is_string(), "{response}");

    // The majority elects a new leader and commits.
    let majority: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match cluster.assert_value(majority[0], path, json!("majority")).await {
            Ok(_) => break,
            Err(error) => assert!(Instant::now() < deadline, "majority never committed: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, value) = cluster.read_value(majority[1], path, "linearizable").await?;
    assert_eq!(value, json!("majority"));
    // A linearizable read on the isolated node must not serve its stale state.
    let (status, _) = cluster.read_value(leader, path, "linearizable").await?;
    assert!(matches!(status, 503 | 504), "isolated node served a linearizable read: {status}");

    cluster.heal();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, value) = cluster.read_value(leader, path, "linearizable").await?;
        if status == 200 && value == json!("majority") {
            break;
        }
        assert!(Instant::now() < deadline, "healed node never caught up: {status} {value}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, history) = cluster.post(leader, "/v1/query", &json!({"concept_path": path, "lens": "history"})).await?;
    let values: Vec<_> = history["results"][0]["assertions"].as_array().cloned().unwrap_or_default();
    assert!(values.iter().all(|a| a["value"] != json!("minority")), "the minority write must not exist: {values:?}");
    Ok(())
}
