//! Early replication (`raft::early`): a shard's leader sends each small append to its caught-up
//! followers as it appends it, before its own fsync. The followers accept those messages in
//! normal operation, a stopped follower gets none (and costs the writes nothing), it catches up
//! when it resumes, a leader that restarts after losing an entry its followers took early
//! never reuses its log id, and `raft.early_replication = false` turns it off.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

const ACCEPTED: &str = "stemedb_raft_early_appends_total{outcome=\"accepted\"}";
const REFUSED: &str = "stemedb_raft_early_appends_total{outcome=\"refused\"}";
/// Writes the crash test tries before one goes early.
const ATTEMPTS: i32 = 20;
const FAILED: &str = "stemedb_raft_early_appends_total{outcome=\"failed\"}";

async fn count(cluster: &TestCluster, node: u64, series: &str) -> anyhow::Result<f64> {
    Ok(cluster.metric(node, series).await?.unwrap_or(0.0))
}

/// The early appends `node` has seen refused and failed, for failure messages.
async fn refusals(cluster: &TestCluster, node: u64) -> anyhow::Result<(f64, f64)> {
    Ok((count(cluster, node, REFUSED).await?, count(cluster, node, FAILED).await?))
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
        if Instant::now() > deadline {
            let (refused, failed) = refusals(cluster, node).await?;
            panic!("node {node}: {series} stayed at {value}, below {at_least} ({refused} refused, {failed} failed)");
        }
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

/// Waits until `node` leads shard 0, moving the leadership there if another node won it.
async fn make_leader(cluster: &TestCluster, node: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leader = cluster.wait_for_leader(0, Duration::from_secs(30)).await?;
        if leader == node {
            return Ok(());
        }
        let moved = cluster.transfer_leader(0, node).await;
        eprintln!("make_leader: node {leader} led shard 0; the transfer to node {node}: {moved:?}");
        if moved.is_ok() {
            return Ok(());
        }
        assert!(Instant::now() < deadline, "node {node} never became shard 0's leader");
        // Refused (the node not caught up yet, a hand-over in progress): ask again shortly.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A leader whose followers took an entry early that it had not written yet, killed and
/// restarted at once, must not lead that term again: it would give its next entry the same log
/// id, and the followers would take the entry they hold for it. It starts as a follower
/// (`LogStore::with_node`) and leads only in a later term, so every replica applies the same
/// writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_never_reuses_the_ids_of_entries_it_lost() -> anyhow::Result<()> {
    // Long election timeouts: the followers do not campaign while the killed leader restarts, so
    // a restarted leader that resumed its term would go on leading it.
    let env = [("STEMEDB_RAFT_ELECTION_TIMEOUT_MIN_MS", "8000"), ("STEMEDB_RAFT_ELECTION_TIMEOUT_MAX_MS", "10000")];
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 1, env, ..Default::default() }).await?;
    let leader = cluster.wait_for_leader(0, Duration::from_secs(30)).await?;
    cluster.assert_value(leader, "lost/before", json!(0)).await?;

    // The leader now holds each write of its log for 1 s before writing and syncing it: long
    // enough to see a follower take an entry early and kill the leader before it writes it.
    cluster.set_env("STEMEDB_TESTING_LOG_SYNC_DELAY_MS", Some("1000"));
    cluster.restart(leader).await?;
    cluster.set_env("STEMEDB_TESTING_LOG_SYNC_DELAY_MS", None);
    make_leader(&cluster, leader).await?;
    cluster.assert_value(leader, "lost/settled", json!(1)).await?;

    // A write a follower takes early and the leader holds unwritten, then the leader dies. (A
    // write goes early only to a follower that has no other entries in flight and answered
    // lately; writes one after another, as in the first test, until one does.)
    let mut taken = None;
    for attempt in 0..ATTEMPTS {
        // openraft 0.9 awaits each of the leader's appends in its core, heartbeats included, so
        // a slow leader may lose the group to a follower's election: take it back first (a write
        // through a follower is forwarded, and nothing goes early from there).
        make_leader(&cluster, leader).await?;
        let before = count(&cluster, leader, ACCEPTED).await?;
        let url = format!("{}/v1/assert", cluster.node(leader).api());
        let body =
            json!({"concept_path": format!("lost/x{attempt}"), "predicate": "p", "value": "x", "agent_id": "test"});
        let started = Instant::now();
        let write = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let sent = client.post(url).json(&body).timeout(Duration::from_secs(10)).send().await;
            (sent.map(|response| response.status().as_u16()).map_err(|e| e.to_string()), started.elapsed())
        });
        let deadline = Instant::now() + Duration::from_millis(400);
        let mut early = false;
        while Instant::now() < deadline && !early {
            early = count(&cluster, leader, ACCEPTED).await? > before;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if early {
            taken = Some(write);
            break;
        }
        // Not early: let it finish before the next.
        let (status, took) = write.await?;
        let (refused, failed) = refusals(&cluster, leader).await?;
        eprintln!("attempt {attempt}: not early; the write answered {status:?} in {took:?} ({refused} refused, {failed} failed)");
    }
    let Some(pending) = taken else {
        let (refused, failed) = refusals(&cluster, leader).await?;
        panic!("no write went early ({refused} refused, {failed} failed)");
    };
    cluster.restart(leader).await?;
    pending.abort();

    // The next write, through the restarted node, is applied by every replica, and the write
    // that was lost with the leader's memory is on all of them or on none.
    cluster.assert_value(leader, "lost/y", json!("y")).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in 1..=3u64 {
        loop {
            let (status, value) = cluster.read_value(id, "lost/y", "stale").await?;
            if status == 200 && value == json!("y") {
                break;
            }
            assert!(Instant::now() < deadline, "node {id} never applied the write after the restart: {status} {value}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut seen = Vec::new();
    for id in 1..=3u64 {
        for attempt in 0..ATTEMPTS {
            let (status, value) = cluster.read_value(id, &format!("lost/x{attempt}"), "stale").await?;
            seen.push((id, attempt, status, value));
        }
    }
    let differs = |a: &(u64, i32, u16, serde_json::Value), b: &(u64, i32, u16, serde_json::Value)| {
        a.1 == b.1 && (a.2, &a.3) != (b.2, &b.3)
    };
    assert!(
        !seen.iter().any(|a| seen.iter().any(|b| differs(a, b))),
        "the replicas disagree about the writes around the crash: {seen:?}"
    );
    Ok(())
}
