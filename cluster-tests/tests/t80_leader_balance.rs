//! Leaders return to their preferred nodes: after a node restarts, the shards it was the
//! preferred leader of are handed back to it once it has caught up, so a failover does not leave
//! every leader on the survivors.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_returns_to_the_preferred_node() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 3, ..Default::default() }).await?;
    // Bootstrap prefers node s+1 for shard s.
    let (_, meta) = cluster.admin_get(2, "/cluster/meta").await?;
    assert_eq!(meta["placement"]["0"][0], json!(1), "{meta}");
    cluster.kill(1);
    let interim = cluster.wait_for_leader(0, Duration::from_secs(20)).await?;
    assert_ne!(interim, 1);
    cluster.assert_value(2, "balance/while-down", json!(1)).await?;
    cluster.restart(1).await?;
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let leader = cluster.wait_for_leader(0, Duration::from_secs(20)).await?;
        if leader == 1 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "shard 0 is still led by node {leader}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every shard is led by its preferred node again.
    for shard in 0..3u16 {
        assert_eq!(cluster.wait_for_leader(shard, Duration::from_secs(20)).await?, shard as u64 + 1);
    }
    Ok(())
}

/// A leadership hand-over leaves a shard leaderless for a few milliseconds: health reports must
/// not call the shard (or the cluster) unavailable for it, so neither a load balancer nor an
/// operator's check sees a flap. A shard that stays leaderless past the grace still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_overs_do_not_flap_health() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 2, ..Default::default() }).await?;
    cluster.wait_healthy(1, Duration::from_secs(20)).await?;
    let urls: Vec<String> = cluster
        .nodes
        .values()
        .flat_map(|n| [format!("{}/cluster/health", n.admin()), format!("{}/health", n.api())])
        .collect();
    let client = cluster.client.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polling = stop.clone();
    // Polls every health endpoint until told to stop (at most 120 s): (polls, 503 bodies, polls
    // that listed an electing shard).
    let poller = tokio::spawn(async move {
        let (mut polls, mut flaps, mut electing) = (0u64, Vec::new(), 0u64);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !polling.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < deadline {
            for url in &urls {
                let Ok(response) = client.get(url).send().await else { continue };
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                polls += 1;
                if status != 200 {
                    flaps.push(format!("{url}: {status} {body}"));
                }
                if body["shards_electing"].as_array().is_some_and(|a| !a.is_empty()) {
                    electing += 1;
                }
            }
        }
        (polls, flaps, electing)
    });
    // Six hand-overs of shard 0, each to the next node.
    let mut moved = 0;
    for round in 0..6u64 {
        let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
        let target = leader % 3 + 1;
        let url = format!("{}/admin/shards/0/transfer-leader", cluster.node(leader).admin());
        let response = cluster.client.post(url).json(&json!({"target_node": target})).send().await?;
        if response.status().as_u16() == 200 {
            moved += 1;
        } else {
            eprintln!("round {round}: transfer to {target} answered {}", response.status());
        }
    }
    assert!(moved >= 3, "only {moved} of 6 hand-overs happened");
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (polls, flaps, electing) = poller.await?;
    eprintln!("{moved} hand-overs, {polls} health polls, {electing} listed an electing shard");
    assert!(polls > 20, "the poller barely ran: {polls} polls");
    assert!(flaps.is_empty(), "health flapped during hand-overs: {flaps:?}");

    // Past the grace, a shard without a leader is reported: two of three nodes die. The
    // survivor must lead neither shard (a leader keeps its view of itself): the leader balancer
    // hands shard 0 back to node 1 and shard 1 stays with node 2.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.leader_seen_by(3, 0).await == Some(3) || cluster.leader_seen_by(3, 1).await == Some(3) {
        anyhow::ensure!(Instant::now() < deadline, "node 3 still leads a shard");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.kill(1);
    cluster.kill(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, health) = cluster.admin_get(3, "/cluster/health").await?;
        // Both shards lost their leaders at about the same time; one may pass the grace first.
        if health["shards_without_leader"].as_array().map(Vec::len) == Some(2) {
            assert_eq!((status, health["status"].clone()), (503, json!("unavailable")), "{health}");
            assert_eq!(health["shards_electing"], json!([]), "{health}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "still {status} {health} without a quorum");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = cluster.client.get(format!("{}/health", cluster.node(3).api())).send().await?;
    assert_eq!(response.status().as_u16(), 503);
    Ok(())
}
