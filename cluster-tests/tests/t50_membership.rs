//! Adding a node to a running cluster and removing it again; a data dir refuses to start for
//! another cluster.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

async fn member_ids(cluster: &TestCluster, via: u64) -> anyhow::Result<Vec<(u64, Value)>> {
    let (_, body) = cluster.admin_get(via, "/cluster/members").await?;
    Ok(body["members"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m["id"].as_u64().map(|id| (id, m)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_a_node() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 4, ..Default::default() }).await?;
    for i in 0..10 {
        cluster.assert_value(1, &format!("member/before{i}"), json!(i)).await?;
    }
    let new = cluster.add_joining_node(2).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let members = member_ids(&cluster, 1).await?;
        let joined = members.iter().find(|(id, _)| *id == new).map(|(_, m)| m["shards_hosted"] == json!(4));
        if joined == Some(true) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "node {new} did not join every shard: {members:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The new node serves data written before it joined, and writes through it commit.
    for i in 0..10 {
        let (status, value) = cluster.read_value(new, &format!("member/before{i}"), "linearizable").await?;
        assert_eq!((status, value), (200, json!(i)));
    }
    cluster.assert_value(new, "member/after", json!("via new")).await?;
    let (_, value) = cluster.read_value(3, "member/after", "linearizable").await?;
    assert_eq!(value, json!("via new"));

    // Decommission it again.
    let response = cluster.client.delete(format!("{}/cluster/members/{new}", cluster.node(1).admin())).send().await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await?;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<u64> = member_ids(&cluster, 1).await?.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    cluster.kill(new);
    cluster.assert_value(3, "member/removed", json!(true)).await?;
    let response = cluster.client.delete(format!("{}/cluster/members/42", cluster.node(1).admin())).send().await?;
    assert_eq!(response.status().as_u16(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_refuses_another_cluster() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 2, ..Default::default() }).await?;
    cluster.kill(3);
    let other = format!("{},9=127.0.0.1:1", cluster.initial_cluster());
    let (status, stderr) = tokio::task::block_in_place(|| cluster.run_with_initial_cluster(3, &other))?;
    assert!(!status.success());
    assert!(stderr.contains("belongs to cluster"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_moves_replicas_first() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 5, shards: 4, ..Default::default() }).await?;
    for i in 0..20 {
        cluster.assert_value(1, &format!("decom/k{i}"), json!(i)).await?;
    }
    // Node 3 hosts shards 0, 1 and 2 (replication factor 3 over 5 nodes).
    let response = cluster.client.delete(format!("{}/cluster/members/3", cluster.node(1).admin())).send().await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await?;
    assert_eq!(status, 200, "{body}");
    cluster.kill(3);
    for shard in 0..4u16 {
        let leader = cluster.wait_for_leader(shard, Duration::from_secs(15)).await?;
        let (_, view) = cluster.admin_get(leader, &format!("/cluster/shards/{shard}")).await?;
        let voters: Vec<u64> = view["voters"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
        assert_eq!(voters.len(), 3, "shard {shard} kept three replicas: {view}");
        assert!(!voters.contains(&3), "shard {shard} still on node 3: {view}");
    }
    for via in [1, 2, 4, 5] {
        for i in (0..20).step_by(7) {
            let (status, value) = cluster.read_value(via, &format!("decom/k{i}"), "linearizable").await?;
            assert_eq!((status, value), (200, json!(i)), "via node {via}");
        }
    }
    Ok(())
}
