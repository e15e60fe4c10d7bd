//! Issue 20 §1: a 3-node cluster whose transport (18182) runs mutual TLS with a cluster CA
//! replicates, forwards and fails over as without it, while a peer without a certificate, with
//! one of another CA, or with an expired one is refused at the handshake.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use stemedb::raft::network::PeerChannels;
use stemedb::tls::{ClusterTls, ClusterTlsFiles};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

/// A CA in `dir/<ca>` and a certificate `name` it signed.
fn issue(dir: &Path, ca: &str, name: &str, expired: bool) -> anyhow::Result<ClusterTlsFiles> {
    let ca_dir = dir.join(ca);
    if !ca_dir.join("ca.pem").exists() {
        stemedb::tls::create_ca(&ca_dir, ca, 30)?;
    }
    let written = stemedb::tls::create_node(&ca_dir, &dir.join("certs"), name, &["127.0.0.1".into()], 30, expired)?;
    Ok(ClusterTlsFiles { ca: ca_dir.join("ca.pem"), cert: written.cert, key: written.key })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_mutual_tls_works_and_refuses_peers_without_a_cluster_certificate() -> anyhow::Result<()> {
    let pki = tempfile::tempdir()?;
    let node = issue(pki.path(), "cluster-ca", "node", false)?;
    let path = |p: &Path| p.to_string_lossy().to_string();
    let env = vec![
        ("STEMEDB_CLUSTER_TLS_CA_FILE".to_string(), path(&node.ca)),
        ("STEMEDB_CLUSTER_TLS_CERT_FILE".to_string(), path(&node.cert)),
        ("STEMEDB_CLUSTER_TLS_KEY_FILE".to_string(), path(&node.key)),
    ];
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 4, env, ..Default::default() }).await?;
    cluster.wait_all_leaders(Duration::from_secs(30)).await?;
    // Writes through every node (forwarded to the leaders over mutual TLS), read back from all.
    let mut written = Vec::new();
    for i in 0..12u64 {
        let key = format!("tls/{i}");
        cluster.assert_value(1 + i % 3, &key, json!(i)).await?;
        written.push((key, json!(i)));
    }
    for via in 1..=3 {
        for (key, value) in &written {
            let (status, read) = cluster.read_value(via, key, "linearizable").await?;
            assert_eq!((status, &read), (200, value), "{key} through node {via}");
        }
    }
    // A leader dies: the others elect over mutual TLS and go on.
    let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
    cluster.kill(leader);
    let survivor = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let key = (0..).map(|i| format!("tls/after/{i}")).find(|k| cluster.shard_of(k) == 0).unwrap_or_default();
    cluster.assert_value(survivor, &key, json!("after")).await?;
    cluster.restart(leader).await?;
    let (status, read) = cluster.read_value(leader, &key, "linearizable").await?;
    assert_eq!((status, read), (200, json!("after")), "the restarted node caught up over mutual TLS");

    // Peers that cannot prove a certificate of the cluster CA are refused at the handshake.
    let addr = format!("127.0.0.1:{}", cluster.node(survivor).raft_port);
    let heartbeat = || stemedb_proto::raft::Heartbeat { from: 99, ..Default::default() };
    let plain = PeerChannels::new(Default::default(), None).client(&addr)?.node_heartbeat(heartbeat()).await;
    assert!(plain.is_err(), "a plain transport call got through: {plain:?}");
    for (what, files) in [
        ("another CA", issue(pki.path(), "other-ca", "intruder", false)?),
        ("an expired certificate", issue(pki.path(), "cluster-ca", "old", true)?),
    ] {
        let tls = ClusterTls::load(files)?;
        let answer = PeerChannels::with_tls(Default::default(), None, Some(tls))
            .client(&addr)?
            .node_heartbeat(heartbeat())
            .await;
        assert!(answer.is_err(), "{what}: {answer:?}");
    }
    let ours = ClusterTls::load(issue(pki.path(), "cluster-ca", "tool", false)?)?;
    let answer =
        PeerChannels::with_tls(Default::default(), None, Some(ours)).client(&addr)?.node_heartbeat(heartbeat()).await;
    assert!(answer.is_ok(), "a certificate of the cluster CA: {answer:?}");
    let refused = cluster.metric(survivor, "stemedb_transport_tls_refused_total").await?.unwrap_or(0.0);
    assert!(refused >= 3.0, "handshakes refused and counted: {refused}");
    Ok(())
}
