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
        let joined = members.iter().find(|(id, _)| *id == new).map(|(_, m)| m["status"] == json!("UP"));
        if joined == Some(true) {
            // 4 shards x 3 replicas over 4 nodes: the balancer gives every node 3.
            for (id, member) in &members {
                assert_eq!(member["shards_hosted"], json!(3), "node {id} after the join: {members:?}");
            }
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "node {new} did not become UP: {members:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every node holds the same cluster metadata (once each has applied the meta group's last
    // change: a follower may be an entry behind), and each shard's voters match its placement.
    let deadline = Instant::now() + Duration::from_secs(15);
    let reference = loop {
        let (_, reference) = cluster.admin_get(1, "/cluster/meta").await?;
        let mut differing = Vec::new();
        for via in [2, 3, new] {
            let (_, meta) = cluster.admin_get(via, "/cluster/meta").await?;
            if meta["placement"] != reference["placement"] || meta["nodes"] != reference["nodes"] {
                differing.push((via, meta));
            }
        }
        if differing.is_empty() {
            break reference;
        }
        anyhow::ensure!(Instant::now() < deadline, "metadata differs from node 1's {reference}: {differing:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for shard in 0..4u16 {
        let leader = cluster.wait_for_leader(shard, Duration::from_secs(15)).await?;
        let (_, view) = cluster.admin_get(leader, &format!("/cluster/shards/{shard}")).await?;
        let mut voters: Vec<u64> = view["voters"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
        let mut placed: Vec<u64> = reference["placement"][shard.to_string()]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_u64())
            .collect();
        voters.sort();
        placed.sort();
        assert_eq!(voters, placed, "shard {shard}: {view}");
    }
    // The new node serves data written before it joined, and writes through it commit.
    for i in 0..10 {
        let (status, value) = cluster.read_value(new, &format!("member/before{i}"), "linearizable").await?;
        assert_eq!((status, value), (200, json!(i)));
    }
    cluster.assert_value(new, "member/after", json!("via new")).await?;
    let (_, value) = cluster.read_value(3, "member/after", "linearizable").await?;
    assert_eq!(value, json!("via new"));

    // Move a replica of a shard the new node does not hold onto it, as an operator would.
    let (_, meta) = cluster.admin_get(1, "/cluster/meta").await?;
    let shard = (0..4u16)
        .find(|s| !meta["placement"][s.to_string()].as_array().into_iter().flatten().any(|v| v.as_u64() == Some(new)))
        .expect("with 3 of 4 shards on the new node, one shard lacks it");
    let url = format!("{}/admin/shards/rebalance", cluster.node(1).admin());
    let body = json!({"shard_id": shard.to_string(), "target_node": new.to_string(), "reason": "hotspot_mitigation"});
    let response = cluster.client.post(&url).json(&body).send().await?;
    assert_eq!(response.status().as_u16(), 202, "{}", response.text().await?);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, view) = cluster.admin_get(2, &format!("/cluster/shards/{shard}")).await?;
        if view["rebalance_status"] == json!("COMPLETE") {
            let placed = view["placement"].as_array().cloned().unwrap_or_default();
            assert!(placed.contains(&json!(new)), "{view}");
            assert_eq!(placed.len(), 3, "{view}");
            break;
        }
        assert_ne!(view["rebalance_status"], json!("FAILED"), "{view}");
        anyhow::ensure!(Instant::now() < deadline, "the move did not complete: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Bad rebalance requests are refused with a clear error.
    for (body, status, code) in [
        (json!({"shard_id": 99, "target_node": new}), 404, "unknown_shard"),
        (json!({"shard_id": shard, "target_node": new}), 422, "invalid_rebalance"),
        (json!({"shard_id": shard, "target_node": 77}), 404, "unknown_member"),
        (json!({"shard_id": shard, "target": new}), 400, "unknown_field"),
    ] {
        let response = cluster.client.post(&url).json(&body).send().await?;
        let got = response.status().as_u16();
        let answer: Value = response.json().await?;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{body}: {answer}");
    }

    // Decommission it again.
    let (status, body) = cluster.decommission(1, new).await?;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<u64> = member_ids(&cluster, 1).await?.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    cluster.kill(new);
    cluster.assert_value(3, "member/removed", json!(true)).await?;
    let (status, _) = cluster.decommission(1, 42).await?;
    assert_eq!(status, 404);
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
    let (status, body) = cluster.decommission(1, 3).await?;
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
