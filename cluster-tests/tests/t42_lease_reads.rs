//! Read leases (`raft::lease`): a shard's leader answers linearizable reads without a heartbeat
//! round while every voter has recently accepted its AppendEntries; the lease ends with the
//! leadership (a hand-over), a Campaign request delivered late starts no election, and
//! `raft.lease_reads = false` turns it off. That an isolated
//! leader stops serving linearizable reads is `t40_partition`'s.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb::raft::types::group_of_shard;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};
use stemedb_proto::raft::raft_transport_client::RaftTransportClient;
use stemedb_proto::raft::{done_reply, CampaignRequest};

const LEASE: &str = "stemedb_read_index_confirmations_total{by=\"lease\"}";
const HEARTBEATS: &str = "stemedb_read_index_confirmations_total{by=\"heartbeats\"}";

/// Reads `path` linearizably through `via` until `series` on `node` grows past `before`; returns
/// the value read last.
async fn read_until_counted(
    cluster: &TestCluster,
    via: u64,
    path: &str,
    node: u64,
    series: &str,
    before: f64,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, value) = cluster.read_value(via, path, "linearizable").await?;
        assert_eq!(status, 200, "read through node {via}: {value}");
        if cluster.metric(node, series).await?.unwrap_or(0.0) > before {
            return Ok(value);
        }
        assert!(Instant::now() < deadline, "node {node} never counted {series}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_reads_from_its_lease_until_it_hands_over() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 1, ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    let path = "lease/key";
    cluster.assert_value(leader, path, json!("v1")).await?;

    // The leader's own reads, and a follower's read index, come from the lease.
    let value = read_until_counted(&cluster, leader, path, leader, LEASE, 0.0).await?;
    assert_eq!(value, json!("v1"));
    let follower = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    let before = cluster.metric(leader, LEASE).await?.unwrap_or(0.0);
    assert_eq!(read_until_counted(&cluster, follower, path, leader, LEASE, before).await?, json!("v1"));
    let reads = cluster.metric(leader, "stemedb_read_barriers_total{path=\"lease\"}").await?.unwrap_or(0.0);
    assert!(reads >= 1.0, "the leader's reads took the lease path: {reads}");

    // Hand the shard over: the old leader's lease ends with its leadership, so a write the new
    // leader acknowledged is what the old one reads next.
    cluster.transfer_leader(0, follower).await?;
    cluster.assert_value(follower, path, json!("v2")).await?;
    let (status, value) = cluster.read_value(leader, path, "linearizable").await?;
    assert_eq!((status, value), (200, json!("v2")), "the old leader read after the hand-over");
    // A Campaign request that arrives after the leadership moved on (naming the old leader and
    // its first term) starts no election: a campaigning follower would stop refusing other
    // candidates while the leader's lease runs.
    for id in cluster.nodes.keys().copied().filter(|id| *id != follower) {
        let url = format!("http://127.0.0.1:{}", cluster.node(id).raft_port);
        let mut client = RaftTransportClient::connect(url).await?;
        let request = CampaignRequest { group_id: group_of_shard(0), term: 1, leader };
        let reply = client.campaign(request).await?.into_inner();
        assert!(matches!(reply.result, Some(done_reply::Result::Error(_))), "node {id} campaigned: {reply:?}");
    }
    assert_eq!(cluster.wait_for_leader(0, Duration::from_secs(10)).await?, follower);
    // And the new leader serves from its own lease once its followers answered it.
    let before = cluster.metric(follower, LEASE).await?.unwrap_or(0.0);
    assert_eq!(read_until_counted(&cluster, follower, path, follower, LEASE, before).await?, json!("v2"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_lease_reads_every_read_index_takes_a_round() -> anyhow::Result<()> {
    let env = vec![("STEMEDB_RAFT_LEASE_READS".to_string(), "false".to_string())];
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 1, env, ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    let path = "lease/off";
    cluster.assert_value(leader, path, json!("v1")).await?;
    assert_eq!(read_until_counted(&cluster, leader, path, leader, HEARTBEATS, 0.0).await?, json!("v1"));
    for id in 1..=3u64 {
        assert_eq!(cluster.metric(id, LEASE).await?.unwrap_or(0.0), 0.0, "node {id} confirmed by lease");
    }
    Ok(())
}
