//! Early replication (`raft::early`): a shard's leader sends each small append to its caught-up
//! followers as it appends it, before its own fsync. The followers accept those messages in
//! normal operation, a stopped follower gets none (and costs the writes nothing), it catches up
//! when it resumes, and `raft.early_replication = false` turns it off.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

const ACCEPTED: &str = "stemedb_raft_early_appends_total{outcome=\"accepted\"}";
const REFUSED: &str = "stemedb_raft_early_appends_total{outcome=\"refused\"}";
const FAILED: &str = "stemedb_raft_early_appends_total{outcome=\"failed\"}";

async fn count(cluster: &TestCluster, node: u64, series: &str) -> anyhow::Result<f64> {
    Ok(cluster.metric(node, series).await?.unwrap_or(0.0))
}

/// Waits until `series` on `node` is at least `at_least` (the early sends are counted when their
/// answer arrives, after the write that caused them may have been acknowledged).
async fn wait_count(cluster: &TestCluster, node: u64, series: &str, at_least: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = count(cluster, node, series).await?;
        if value >= at_least {
            return Ok(value);
        }
        assert!(Instant::now() < deadline, "node {node}: {series} stayed at {value}, below {at_least}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_accept_early_appends_and_a_stopped_one_catches_up() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 1, ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    cluster.assert_value(leader, "early/warm", json!(0)).await?;
    let before = count(&cluster, leader, ACCEPTED).await?;

    // One write at a time: after each, both followers are idle and hold the whole log, so each
    // write's entry goes to both early.
    let writes = 20;
    for i in 0..writes {
        cluster.assert_value(leader, &format!("early/k{i}"), json!(i)).await?;
    }
    let accepted = wait_count(&cluster, leader, ACCEPTED, before + f64::from(writes)).await?;
    assert_eq!(count(&cluster, leader, REFUSED).await?, 0.0, "a follower refused an early append");
    assert_eq!(count(&cluster, leader, FAILED).await?, 0.0, "an early append failed");
    // Followers send nothing early.
    for id in cluster.nodes.keys().copied().filter(|id| *id != leader) {
        assert_eq!(count(&cluster, id, ACCEPTED).await?, 0.0, "follower {id} sent early appends");
    }

    // A stopped follower is not caught up, so it gets nothing early; the writes commit with the
    // other follower, and the stopped one receives them from openraft when it resumes.
    let stopped = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    cluster.pause(stopped);
    for i in 0..5 {
        cluster.assert_value(leader, &format!("early/p{i}"), json!(i)).await?;
    }
    cluster.resume(stopped);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, value) = cluster.read_value(stopped, "early/p4", "stale").await?;
        if status == 200 && value == json!(4) {
            break;
        }
        assert!(Instant::now() < deadline, "the resumed follower never applied the last write: {status} {value}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..writes {
        let (status, value) = cluster.read_value(stopped, &format!("early/k{i}"), "stale").await?;
        assert_eq!((status, value), (200, json!(i)), "early/k{i} on the resumed follower");
    }
    // Once it answers again, it is sent appends early again.
    let accepted_after = count(&cluster, leader, ACCEPTED).await?;
    cluster.assert_value(leader, "early/after", json!("x")).await?;
    cluster.assert_value(leader, "early/after", json!("y")).await?;
    wait_count(&cluster, leader, ACCEPTED, accepted_after.max(accepted) + 1.0).await?;
    assert_eq!(count(&cluster, leader, REFUSED).await?, 0.0, "a follower refused an early append");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_early_replication_nothing_is_sent_early() -> anyhow::Result<()> {
    let env = vec![("STEMEDB_RAFT_EARLY_REPLICATION".to_string(), "false".to_string())];
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 1, env, ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    for i in 0..10 {
        cluster.assert_value(leader, &format!("off/k{i}"), json!(i)).await?;
    }
    for id in 1..=3u64 {
        for series in [ACCEPTED, REFUSED, FAILED] {
            assert_eq!(count(&cluster, id, series).await?, 0.0, "node {id}: {series}");
        }
    }
    Ok(())
}
