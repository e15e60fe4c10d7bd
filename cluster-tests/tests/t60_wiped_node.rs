//! A node that lost its data dir rejoins: leaders must not crash on its empty log, it must not
//! vote before it has caught up, and it must end up with the same data as the other replicas.
//! (Found by the chaos harness's `wipe` scenario: openraft's leader panicked on the follower's
//! log reverting, which took every shard it led down.)

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_rejoins_and_catches_up() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 2, ..Default::default() }).await?;
    for i in 0..20 {
        cluster.assert_value(1, &format!("wipe/k{i}"), json!(i)).await?;
    }
    // The groups go idle and hibernate, so catching up depends on the rejoining node waking them.
    cluster.wait_for_hibernation(2, Duration::from_secs(20)).await?;
    cluster.wipe_and_rejoin(3, 1).await?;
    // Every shard keeps (or regains) a leader and takes writes through every node.
    for via in [1, 2, 3] {
        cluster.assert_value(via, &format!("wipe/after{via}"), json!(via)).await?;
    }
    // Node 3 catches up: its replicas reach the others' applied index with the same digest.
    let deadline = Instant::now() + Duration::from_secs(30);
    for shard in 0..2u16 {
        loop {
            let mut digests = Vec::new();
            for via in [1, 2, 3] {
                let (status, body) = cluster.admin_get(via, &format!("/cluster/shards/{shard}/digest")).await?;
                if status == 200 {
                    digests.push((body["applied_index"].clone(), body["digest"].clone()));
                }
            }
            if digests.len() == 3 && digests.iter().all(|d| *d == digests[0]) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "shard {shard} replicas differ: {digests:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    for i in (0..20).step_by(5) {
        let (status, value) = cluster.read_value(3, &format!("wipe/k{i}"), "stale").await?;
        assert_eq!((status, value), (200, json!(i)));
    }
    Ok(())
}
