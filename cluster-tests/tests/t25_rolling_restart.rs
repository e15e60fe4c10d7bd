//! A rolling restart of every node of a 3-node cluster under a continuous write load through
//! all nodes: SIGTERM, wait for the exit, restart, wait until the cluster is healthy again and
//! the node leads shards again (the leader balancer hands them back), next node. No acknowledged write is lost or duplicated, no client sees an error other than a
//! refused connection to the node being restarted (retried at once on another node), and the
//! longest write latency of each phase is printed (timings are reported, not asserted).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

/// Concurrent clients; each writes every [`PACE`], to the nodes in turn.
const WRITERS: u64 = 6;
const PACE: Duration = Duration::from_millis(20);
/// Bounds each client's loop whatever happens to the roll.
const MAX_WRITES_PER_WRITER: u64 = 10_000;

/// One acknowledged write, or one client error.
struct Write {
    /// The node that answered.
    via: u64,
    started: Instant,
    path: String,
    id: String,
    phase: usize,
    latency: Duration,
}

#[derive(Default)]
struct Record {
    acked: Vec<Write>,
    /// Every client error but a refused connection to the node being restarted.
    errors: Vec<String>,
    /// Connections refused by the node being restarted (each retried on the next node).
    refused: u64,
}

struct Load {
    record: Mutex<Record>,
    /// The node being restarted (0: none): the only one allowed to refuse connections.
    restarting: AtomicU64,
    /// Index into the phase names; each write counts in the phase it started in.
    phase: AtomicUsize,
    stop: AtomicBool,
}

async fn writer(load: Arc<Load>, client: reqwest::Client, nodes: Vec<(u64, String)>, writer: u64) {
    let mut pace = tokio::time::interval(PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..MAX_WRITES_PER_WRITER {
        pace.tick().await;
        if load.stop.load(Ordering::Acquire) {
            return;
        }
        let path = format!("roll/w{writer}/{n}");
        let body = json!({"concept_path": path, "predicate": "p", "value": n, "agent_id": format!("writer-{writer}"),
                          "request_id": format!("w{writer}-{n}")});
        let phase = load.phase.load(Ordering::Acquire);
        let started = Instant::now();
        let mut target = (writer + n) as usize % nodes.len();
        // Each refusal moves on to the next node, so a few attempts always reach a live one.
        for _attempt in 0..(2 * nodes.len()) {
            let (node, url) = &nodes[target];
            match client.post(format!("{url}/v1/assert")).json(&body).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let answer: Value = response.json().await.unwrap_or(Value::Null);
                    let mut record = load.record.lock();
                    match (status, answer["id"].as_str()) {
                        (201, Some(id)) => record.acked.push(Write {
                            via: *node,
                            started,
                            path: path.clone(),
                            id: id.to_string(),
                            phase,
                            latency: started.elapsed(),
                        }),
                        _ => record.errors.push(format!("{path} via node {node}: {status} {answer}")),
                    }
                    break;
                }
                Err(error) if error.is_connect() && load.restarting.load(Ordering::Acquire) == *node => {
                    load.record.lock().refused += 1;
                    target = (target + 1) % nodes.len();
                }
                Err(error) => {
                    load.record.lock().errors.push(format!("{path} via node {node}: {error:?}"));
                    break;
                }
            }
        }
    }
}

/// The last line of node `id`'s log that contains `needle`.
fn last_log_line(cluster: &TestCluster, id: u64, needle: &str) -> String {
    let text = std::fs::read_to_string(cluster.node(id).data_dir.with_extension("log")).unwrap_or_default();
    text.lines().rev().find(|l| l.contains(needle)).unwrap_or("(none)").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_write_load_loses_nothing() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 4, ..Default::default() }).await?;
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for id in &ids {
        cluster.wait_healthy(*id, Duration::from_secs(30)).await?;
    }
    let nodes: Vec<(u64, String)> = ids.iter().map(|id| (*id, cluster.node(*id).api())).collect();
    // A fresh connection per request: a refused connect is then the only way a stopping node
    // can turn a client away (a pooled keep-alive connection can be closed under a request).
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(15)).build()?;
    let load = Arc::new(Load {
        record: Mutex::new(Record::default()),
        restarting: AtomicU64::new(0),
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });
    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(writer(load.clone(), client.clone(), nodes.clone(), w))).collect();

    let mut phases = vec!["before the roll".to_string()];
    let wait_for_acks = |count: usize| {
        let load = load.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while load.record.lock().acked.len() < count {
                anyhow::ensure!(Instant::now() < deadline, "the load stalled below {count} acknowledged writes");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }
    };
    wait_for_acks(200).await?;
    let roll_started = Instant::now();
    for id in &ids {
        load.restarting.store(*id, Ordering::Release);
        phases.push(format!("node {id} shutting down"));
        load.phase.store(phases.len() - 1, Ordering::Release);
        let stopping = Instant::now();
        let status = cluster.terminate(*id, Duration::from_secs(60)).await?;
        let shutdown_ms = stopping.elapsed().as_millis();
        assert!(status.success(), "node {id} exited with {status} after SIGTERM: {}", cluster.log_tail(*id, 5));
        println!(
            "node {id}: SIGTERM {} ms into the roll, exited ({status}) {shutdown_ms} ms later",
            stopping.duration_since(roll_started).as_millis()
        );
        println!("  {}", last_log_line(&cluster, *id, "leaderships handed over"));

        phases.push(format!("node {id} restarting"));
        load.phase.store(phases.len() - 1, Ordering::Release);
        let restarting = Instant::now();
        cluster.restart(*id).await?;
        for via in &ids {
            cluster.wait_healthy(*via, Duration::from_secs(60)).await?;
        }
        println!("node {id}: healthy again {} ms after the restart", restarting.elapsed().as_millis());
        load.restarting.store(0, Ordering::Release);
        // As after any restart, the leader balancer hands the node its preferred shards back
        // (a hand-over under load too); the next node is stopped once that has happened.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, members) = cluster.admin_get(*id, "/cluster/members").await?;
            let me = members["members"].as_array().and_then(|m| m.iter().find(|m| m["id"] == json!(id)).cloned());
            let led = me.as_ref().and_then(|m| m["shards_led"].as_u64()).unwrap_or(0);
            if led > 0 {
                println!(
                    "node {id}: leads {led} groups again {} ms after the restart",
                    restarting.elapsed().as_millis()
                );
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "node {id} was never handed a leadership back: {members}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The restarted node takes writes again before the next one stops.
        let acked = load.record.lock().acked.len();
        wait_for_acks(acked + 100).await?;
    }
    let roll = roll_started.elapsed();
    phases.push("after the roll".to_string());
    load.phase.store(phases.len() - 1, Ordering::Release);
    let acked = load.record.lock().acked.len();
    wait_for_acks(acked + 100).await?;
    load.stop.store(true, Ordering::Release);
    for writer in writers {
        writer.await?;
    }

    let record = std::mem::take(&mut *load.record.lock());
    println!(
        "rolling restart of {} nodes took {} ms: {} writes acknowledged, {} connections refused by the node \
         being restarted (retried elsewhere), {} other client errors",
        ids.len(),
        roll.as_millis(),
        record.acked.len(),
        record.refused,
        record.errors.len()
    );
    for (index, name) in phases.iter().enumerate() {
        let mut latencies: Vec<Duration> =
            record.acked.iter().filter(|w| w.phase == index).map(|w| w.latency).collect();
        latencies.sort();
        if let Some(longest) = latencies.last() {
            let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
            println!(
                "  {name:<24} {:>6} writes  p99 {:>4} ms  longest {:>4} ms",
                latencies.len(),
                p99.as_millis(),
                longest.as_millis()
            );
        }
    }
    let during_roll = record.acked.iter().filter(|w| w.phase > 0 && w.phase < phases.len() - 1);
    let longest = during_roll.map(|w| w.latency).max().unwrap_or_default();
    println!("longest write latency during the roll: {} ms", longest.as_millis());
    // The slowest writes of the roll, with the node each went through, to tell a hand-over
    // from a restart when reading a node's log.
    let mut slowest: Vec<&Write> = record.acked.iter().filter(|w| w.phase > 0 && w.phase < phases.len() - 1).collect();
    slowest.sort_by_key(|w| std::cmp::Reverse(w.latency));
    for write in slowest.iter().take(5) {
        println!(
            "  {:>4} ms  {} via node {}, {} ms into the roll ({})",
            write.latency.as_millis(),
            write.path,
            write.via,
            write.started.saturating_duration_since(roll_started).as_millis(),
            phases[write.phase]
        );
    }
    assert!(record.errors.is_empty(), "client errors: {:#?}", &record.errors[..record.errors.len().min(20)]);

    // Every acknowledged write is there exactly once (one write per concept path), read back
    // linearizably through the nodes in turn.
    let failures = Arc::new(Mutex::new(Vec::new()));
    let acked = Arc::new(record.acked);
    let next = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..8)
        .map(|r| {
            let (acked, next, failures, client, nodes) =
                (acked.clone(), next.clone(), failures.clone(), client.clone(), nodes.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(write) = acked.get(i) else { return };
                    let url = format!("{}/v1/query", nodes[(i + r) % nodes.len()].1);
                    let query = json!({"concept_path": write.path, "lens": "history"});
                    // A read that finds no leader (503) or times out (504) says nothing about the
                    // write: it is asked again, a bounded number of times.
                    let mut answer = Value::Null;
                    for _attempt in 0..20 {
                        let (status, body) = match client.post(&url).json(&query).send().await {
                            Ok(response) => {
                                (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
                            }
                            Err(error) => (0, json!({"error": error.to_string()})),
                        };
                        answer = body;
                        if !matches!(status, 0 | 503 | 504) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    let ids: Vec<&str> = answer["results"][0]["assertions"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x["id"].as_str()).collect())
                        .unwrap_or_default();
                    if ids != [write.id.as_str()] {
                        failures.lock().push(format!("{} (acknowledged as {}): {answer}", write.path, write.id));
                    }
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await?;
    }
    let failures = failures.lock();
    println!("read back {} acknowledged writes: {} lost or duplicated", acked.len(), failures.len());
    assert!(failures.is_empty(), "lost or duplicated: {:#?}", &failures[..failures.len().min(20)]);
    Ok(())
}
