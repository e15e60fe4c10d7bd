//! Forming clusters: 3- and 5-node bootstrap, writes through any node, reads on every node,
//! stale reads, leaders spread over the nodes, cluster admin views.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

async fn write_anywhere_read_everywhere(cluster: &TestCluster) -> anyhow::Result<()> {
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for via in &ids {
        cluster.assert_value(*via, &format!("boot/n{via}"), json!(*via)).await?;
    }
    for writer in &ids {
        for reader in &ids {
            let (status, value) = cluster.read_value(*reader, &format!("boot/n{writer}"), "linearizable").await?;
            assert_eq!((status, value), (200, json!(*writer)), "node {reader} reading node {writer}'s write");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_cluster() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 4, ..Default::default() }).await?;
    write_anywhere_read_everywhere(&cluster).await?;
    // Groups with three voters confirm leadership through their followers for every
    // linearizable read (a read lease or a quorum round): the single-voter shortcut must never
    // apply.
    let mut confirmed = 0.0;
    for id in 1..=3u64 {
        let alone = cluster.metric(id, "stemedb_read_barriers_total{path=\"sole_voter\"}").await?;
        assert_eq!(alone.unwrap_or(0.0), 0.0, "node {id}");
        for path in ["quorum", "lease"] {
            let series = format!("stemedb_read_barriers_total{{path=\"{path}\"}}");
            confirmed += cluster.metric(id, &series).await?.unwrap_or(0.0);
        }
    }
    assert!(confirmed >= 9.0, "9 linearizable reads, {confirmed} confirmed");

    let (status, members) = cluster.admin_get(2, "/cluster/members").await?;
    assert_eq!(status, 200);
    let members = members["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 3, "{members:?}");
    for member in &members {
        assert_eq!(member["shards_hosted"], json!(4), "{member}");
    }
    let (status, health) = cluster.admin_get(3, "/cluster/health").await?;
    assert_eq!((status, health["shards_with_leader"].clone()), (200, json!(4)), "{health}");

    // Leaders spread: shard s prefers node (s mod 3) + 1.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut leaders = std::collections::BTreeSet::new();
        for shard in 0..4 {
            if let Some(leader) = cluster.leader_seen_by(1, shard).await {
                leaders.insert(leader);
            }
        }
        if leaders.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "leaders did not spread: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The leader of shard 0 (node 1) exports every follower's replication lag.
    let metrics = cluster.client.get(format!("{}/metrics", cluster.node(1).api())).send().await?.text().await?;
    for follower in [2, 3] {
        assert!(metrics.contains(&format!("replication_lag_seconds{{node=\"{follower}\"}}")), "no lag for {follower}");
    }
    assert!(metrics.contains("stemedb_shard_replication_lag_seconds{shard=\"0\",node=\"2\"}"));

    // Stale reads on a follower report how far they are applied.
    let path = "boot/stale";
    cluster.assert_value(1, path, json!("fresh")).await?;
    let shard = cluster.shard_of(path);
    let leader = cluster.wait_for_leader(shard, Duration::from_secs(10)).await?;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).expect("follower");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) =
            cluster.post(follower, "/v1/query", &json!({"concept_path": path, "consistency": "stale"})).await?;
        assert_eq!(status, 200, "{body}");
        assert!(body["applied_index"].as_u64().is_some() && body["staleness_ms"].as_u64().is_some(), "{body}");
        if body["results"][0]["winner"]["value"] == json!("fresh") {
            break;
        }
        assert!(Instant::now() < deadline, "follower never applied the write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_form_a_cluster() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 5, shards: 4, ..Default::default() }).await?;
    write_anywhere_read_everywhere(&cluster).await?;
    let (_, health) = cluster.admin_get(5, "/cluster/health").await?;
    assert_eq!(health["nodes_total"], json!(5), "{health}");
    // replication_factor 3: every shard has exactly three voters, on distinct nodes, and each
    // node hosts only its share.
    for shard in 0..4u16 {
        let leader = cluster.wait_for_leader(shard, Duration::from_secs(10)).await?;
        let (_, status) = cluster.admin_get(leader, &format!("/cluster/shards/{shard}")).await?;
        let voters: std::collections::BTreeSet<u64> =
            status["voters"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
        assert_eq!(voters.len(), 3, "shard {shard}: {status}");
    }
    let mut hosted = 0;
    for id in 1..=5u64 {
        // Every node is healthy for a load balancer, though it hosts only some shards.
        let (status, health) = cluster.get(id, "/health").await?;
        assert_eq!(status, 200, "node {id}: {health}");
        let (_, members) = cluster.admin_get(id, "/cluster/members").await?;
        let me = members["members"].as_array().into_iter().flatten().find(|m| m["self"] == json!(true)).cloned();
        let me = me.expect("a member entry for the node itself");
        assert_eq!(me["status"], json!("UP"));
        hosted += me["shards_hosted"].as_u64().unwrap_or(0);
        // Every node knows every member and sees it up through node heartbeats.
        let up = members["members"].as_array().into_iter().flatten().filter(|m| m["status"] == json!("UP")).count();
        assert_eq!(up, 5, "node {id}: {members}");
    }
    assert_eq!(hosted, 12, "4 shards x 3 replicas");
    // Each node gives its whole claims cache budget (64 MiB by default) to the shards it hosts.
    for id in 1..=5u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let budget = cluster.metric(id, "stemedb_claims_cache_budget_bytes").await?.unwrap_or(0.0);
            if budget > (64 << 20) as f64 - 16.0 && budget <= (64 << 20) as f64 {
                break;
            }
            assert!(Instant::now() < deadline, "node {id}: claims cache budget {budget} of its hosted shards");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Stale reads of a shard this node does not host are served by a replica elsewhere.
    let (status, body) =
        cluster.post(5, "/v1/query", &json!({"concept_path": "boot/n1", "consistency": "stale"})).await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}
