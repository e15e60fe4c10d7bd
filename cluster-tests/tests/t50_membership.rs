//! Adding a node to a running cluster and removing it again; a data dir refuses to start for
//! another cluster; a replica moved away from a node is deleted there and can come back.

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

/// Asks node 1 to move `shard`'s replica from `from` to `to` and waits until the move completes.
async fn move_replica(cluster: &TestCluster, shard: u16, from: u64, to: u64) -> anyhow::Result<()> {
    let url = format!("{}/admin/shards/rebalance", cluster.node(1).admin());
    let body = json!({"shard_id": shard, "target_node": to, "from_node": from, "reason": "test"});
    let response = cluster.client.post(&url).json(&body).send().await?;
    anyhow::ensure!(response.status().as_u16() == 202, "{}", response.text().await?);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, view) = cluster.admin_get(1, &format!("/cluster/shards/{shard}")).await?;
        let placed: Vec<u64> = view["placement"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
        if view["rebalance_status"] == json!("COMPLETE") && placed.contains(&to) && !placed.contains(&from) {
            return Ok(());
        }
        anyhow::ensure!(view["rebalance_status"] != json!("FAILED"), "the move failed: {view}");
        anyhow::ensure!(Instant::now() < deadline, "the move did not complete: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What node `id`'s data dir (stopped) holds of `group`: Raft log entries, assertion records,
/// index entries (an empty group's own bookkeeping, such as its empty digests, not counted).
fn group_keys(cluster: &TestCluster, id: u64, group: u32) -> anyhow::Result<(usize, usize, usize)> {
    use stemedb::shard::keys;
    use stemedb::storage::{ColumnFamily, Storage, StorageOptions};
    let storage = Storage::open(&cluster.node(id).data_dir, StorageOptions::default())?;
    let (from, to) = (keys::group_prefix(group), keys::group_end(group));
    let assertions = keys::assertions_prefix(group);
    let counts = (
        storage.scan(ColumnFamily::RaftLog, &from, &to, usize::MAX)?.len(),
        storage.scan(ColumnFamily::StateMachine, &assertions, &keys::prefix_end(&assertions), usize::MAX)?.len(),
        storage.scan(ColumnFamily::Index, &from, &to, usize::MAX)?.len(),
    );
    storage.close()?;
    Ok(counts)
}

/// Issue 16 §6: a replica that a move took away from a node is deleted from it (log, state,
/// records; `stemedb_retired_replicas_total`) once the metadata has placed it elsewhere for a
/// while and the shard's leader confirms the node is no member; the group reopens empty, and a
/// later move brings the replica back like any new one, with every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moved_away_is_deleted_and_can_come_back() -> anyhow::Result<()> {
    let env = vec![("STEMEDB_CLUSTER_AUTO_REBALANCE".to_string(), "false".to_string())];
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 4, shards: 2, env, ..Default::default() }).await?;
    let shard = cluster.shard_of("retire/k0");
    let paths: Vec<String> = (0..40).map(|i| format!("retire/k{i}")).filter(|p| cluster.shard_of(p) == shard).collect();
    for (i, path) in paths.iter().enumerate() {
        cluster.assert_value(1, path, json!(i)).await?;
    }
    let (_, meta) = cluster.admin_get(1, "/cluster/meta").await?;
    let placed: Vec<u64> =
        meta["placement"][shard.to_string()].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
    let from = *placed.last().expect("replicas");
    let to = (1..=4).find(|n| !placed.contains(n)).expect("a node without the shard");

    move_replica(&cluster, shard, from, to).await?;
    // Deleted from `from` by itself, after the metadata placed it elsewhere for 10 s.
    let moved_at = Instant::now();
    let deadline = moved_at + Duration::from_secs(60);
    while cluster.metric(from, "stemedb_retired_replicas_total").await?.unwrap_or(0.0) < 1.0 {
        anyhow::ensure!(Instant::now() < deadline, "node {from} kept the replica of shard {shard} it no longer holds");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "replica of shard {shard} deleted from node {from} {:.1} s after the move",
        moved_at.elapsed().as_secs_f64()
    );
    let (_, view) = cluster.admin_get(from, &format!("/cluster/shards/{shard}")).await?;
    assert_eq!(view["hosted"], json!(false), "{view}");
    // Nothing of the group is left on its disk.
    cluster.terminate(from, Duration::from_secs(20)).await?;
    let group = stemedb::shard::command::group_of_shard(shard);
    let held = group_keys(&cluster, from, group)?;
    assert_eq!(held, (0, 0, 0), "node {from} still holds (log entries, records, index entries) of group {group}");
    cluster.restart(from).await?;

    // A move brings it back like any new replica, with every write; nothing is deleted again.
    move_replica(&cluster, shard, to, from).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, path) in paths.iter().enumerate() {
        loop {
            let (status, value) = cluster.read_value(from, path, "stale").await?;
            if (status, &value) == (200, &json!(i)) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {from} lacks {path} after the move back: {status} {value}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The node it moved away from in turn deletes its copy (10 s after the move at the
    // earliest), and by then the node it moved back to has not deleted the one it holds again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.metric(to, "stemedb_retired_replicas_total").await?.unwrap_or(0.0) < 1.0 {
        anyhow::ensure!(Instant::now() < deadline, "node {to} kept the replica of shard {shard} moved back");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let retired_again = cluster.metric(from, "stemedb_retired_replicas_total").await?.unwrap_or(0.0);
    assert_eq!(retired_again, 0.0, "the restarted node deleted a replica it holds again");
    let (status, value) = cluster.read_value(from, &paths[0], "stale").await?;
    assert_eq!((status, value), (200, json!(0)), "node {from} still serves the shard");
    Ok(())
}
