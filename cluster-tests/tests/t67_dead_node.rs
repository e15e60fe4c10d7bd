//! A node that dies and stays dead is replaced (issue 16 §6): past
//! `cluster.dead_node_timeout_seconds` its replicas are re-created on the live nodes and it is
//! decommissioned, so every shard is back at the replication factor without an operator; when
//! it comes back it is told it was removed and deletes its replicas.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

const SHARDS: u16 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_has_its_replicas_recreated_on_live_nodes() -> anyhow::Result<()> {
    let env = vec![("STEMEDB_CLUSTER_DEAD_NODE_TIMEOUT_SECONDS".to_string(), "5".to_string())];
    let mut cluster =
        TestCluster::start(ClusterOptions { nodes: 4, shards: SHARDS, env, ..Default::default() }).await?;
    let mut written = Vec::new();
    for i in 0..40 {
        let path = format!("dead/c{}", i % 8);
        cluster.assert_value(1, &path, json!(i)).await?;
        written.push((path, i));
    }
    let (_, meta) = cluster.admin_get(1, "/cluster/meta").await?;
    let hosted_by_4 = placement(&meta).iter().filter(|(_, r)| r.contains(&4)).count();
    anyhow::ensure!(hosted_by_4 > 0, "node 4 hosts no replica: {meta}");

    cluster.kill(4);
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(120);
    let meta = loop {
        let (status, meta) = cluster.admin_get(1, "/cluster/meta").await?;
        let placement = placement(&meta);
        let replaced = status == 200
            && meta["nodes"].get("4").is_none()
            && placement.len() == SHARDS as usize
            && placement.iter().all(|(_, r)| r.len() == 3 && !r.contains(&4));
        if replaced {
            break meta;
        }
        anyhow::ensure!(Instant::now() < deadline, "node 4's replicas were not re-created: {meta}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "node 4 ({hosted_by_4} replicas) replaced {:.1} s after it was killed (timeout 5 s): {}",
        killed.elapsed().as_secs_f64(),
        meta["placement"]
    );
    // Every shard's Raft group has three voters on live nodes, and nothing acknowledged is lost.
    for shard in 0..SHARDS {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, view) = cluster.admin_get(1, &format!("/cluster/shards/{shard}")).await?;
            let voters: Vec<u64> =
                view["voters"].as_array().map(|v| v.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
            if voters.len() == 3 && !voters.contains(&4) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "shard {shard}: voters {voters:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    cluster.wait_healthy(1, Duration::from_secs(30)).await?;
    for (path, value) in written.iter().rev().take(8) {
        let (status, _) = cluster.read_value(2, path, "linearizable").await?;
        anyhow::ensure!(status == 200, "reading {path} (last written {value}): {status}");
    }

    // It comes back with its old data dir: the meta group's leader tells it it was removed. It
    // reports so on /health (503, for load balancers), serves nothing of its stale replicas
    // (reads through it are answered by the shards' replicas), and deletes them; the cluster
    // stays healthy.
    cluster.restart(4).await?;
    let back = Instant::now();
    let deadline = back + Duration::from_secs(60);
    loop {
        let (status, health) = cluster.get(4, "/health").await?;
        let retired = cluster.metric(4, "stemedb_retired_replicas_total").await?.unwrap_or(0.0);
        if health["status"] == "removed" && retired >= hosted_by_4 as f64 {
            assert_eq!(status, 503, "{health}");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node 4 back: /health {status} {health}, {retired} replicas deleted"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "node 4, back, told it was removed and deleted its {hosted_by_4} replicas in {:.1} s",
        back.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(cluster.node(4).data_dir.with_extension("log"))?;
    anyhow::ensure!(log.contains("this node was removed from the cluster"), "node 4 does not say it was removed");
    let last: std::collections::BTreeMap<&String, i64> = written.iter().map(|(p, v)| (p, *v)).collect();
    for (path, value) in last {
        let (status, got) = cluster.read_value(4, path, "stale").await?;
        assert_eq!((status, got), (200, json!(value)), "{path} read through the removed node");
    }
    cluster.wait_healthy(1, Duration::from_secs(30)).await?;
    Ok(())
}

fn placement(meta: &Value) -> Vec<(String, Vec<u64>)> {
    meta["placement"]
        .as_object()
        .map(|p| {
            p.iter()
                .map(|(s, r)| {
                    (s.clone(), r.as_array().map(|r| r.iter().filter_map(Value::as_u64).collect()).unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default()
}
