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
