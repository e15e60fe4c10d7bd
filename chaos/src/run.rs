//! One chaos run: cluster up, workloads and nemesis for the duration, everything healed, then
//! the checks and the report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::{json, Value};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

use crate::failover::{self, Failover};
use crate::history::{Op, OpCounts, OpKind, Outcome};
use crate::linearizability::{self, StaleRead, Verdict};
use crate::nemesis::{FaultKind, FaultRecord, Nemesis};
use crate::probe::{Probe, ProbeRecord};
use crate::scenario::Scenario;
use crate::workload::{self, Clients, History, SetClientLog, Targets};

/// The nodes' `raft.election_timeout_max_ms` when the run's environment does not set it (the
/// node's default; the harness leaves it alone).
const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 1200;

pub struct RunOptions {
    pub scenario: &'static Scenario,
    pub duration: Duration,
    pub nodes: u64,
    pub shards: u16,
    pub seed: u64,
    pub register_clients: u32,
    pub set_clients: u32,
    /// Unkeyed-set clients (0: none).
    pub unkeyed_clients: u32,
    /// Register keys, and keys of the unkeyed set.
    pub keys: u32,
    pub stemedb: PathBuf,
    pub data_root: Option<PathBuf>,
    /// Extra node environment (planted bugs, tunables).
    pub env: Vec<(String, String)>,
}

/// One anomaly with the operations that show it.
#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    pub kind: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<Op>,
}

#[derive(Debug, Serialize)]
pub struct SetCheck {
    pub paths: usize,
    pub acknowledged: usize,
    pub lost: Vec<(String, i64)>,
    pub duplicated: Vec<(String, i64, usize)>,
    pub unexpected: Vec<(String, i64)>,
    pub unknown_outcomes: usize,
    /// Paths that could not be read back within 60 s of healing, with the last answer.
    pub unreadable: Vec<(String, String)>,
}

/// The unkeyed set: writes without a `request_id`, each sent once, read back at the end.
#[derive(Debug, Serialize)]
pub struct UnkeyedCheck {
    pub keys: usize,
    pub sent: usize,
    pub acknowledged: usize,
    pub refused: usize,
    /// Writes whose outcome the client never learned (timeouts, 5xx, dropped connections).
    pub unknown: usize,
    /// Of the unknown writes, those found (once) in the read-back: applied after all, fine.
    pub unknown_landed: usize,
    /// Values found more than once: applied twice although sent once.
    pub duplicates: usize,
    /// `[key, value, times found]` of each duplicated value.
    pub duplicated: Vec<(String, i64, usize)>,
    /// Acknowledged values missing from the read-back.
    pub lost: Vec<(String, i64)>,
    /// Values found that were refused or never sent.
    pub unexpected: Vec<(String, i64)>,
    /// Keys that could not be read back within 60 s of healing, with the last answer.
    pub unreadable: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
pub struct ReplicaCheck {
    pub shards_checked: usize,
    pub diverged: Vec<Value>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes: u64,
    pub shards: u16,
    pub duration_s: f64,
    pub faults: Vec<FaultRecord>,
    /// Nodes whose process exited by itself.
    pub crashed: Vec<u64>,
    pub register_ops: OpCounts,
    pub register_keys: BTreeMap<String, Verdict>,
    pub stale_reads: Vec<StaleRead>,
    pub set: SetCheck,
    pub unkeyed: UnkeyedCheck,
    /// The stale-read probes run around partitions (see `probe.rs`).
    pub probes: Vec<ProbeRecord>,
    /// How long requests through the nodes each fault did not hit waited.
    pub failover: Failover,
    pub replicas: ReplicaCheck,
    pub anomalies: Vec<Anomaly>,
    pub result: &'static str,
}

pub async fn run(options: RunOptions) -> anyhow::Result<Report> {
    // Disk-full faults need node 1's data dir on a small filesystem of its own, mounted before
    // the node starts.
    let wants_small_disk = options.scenario.faults.contains(&FaultKind::DiskFull);
    let own_root = wants_small_disk && options.data_root.is_none();
    let data_root = match (&options.data_root, own_root) {
        (Some(root), _) => Some(root.clone()),
        (None, true) => {
            Some(std::env::temp_dir().join(format!("stemedb-chaos-{}-{}", options.seed, std::process::id())))
        }
        (None, false) => None,
    };
    let small_disk = match (&data_root, wants_small_disk) {
        (Some(root), true) => mount_small_disk(&root.join("node1")),
        _ => None,
    };
    let cluster_options = ClusterOptions {
        nodes: options.nodes,
        shards: options.shards,
        env: options.env.clone(),
        binary: Some(options.stemedb.clone()),
        data_root: data_root.clone(),
        prepare: None,
    };
    println!(
        "starting {} nodes ({} shards), scenario {}, seed {}",
        options.nodes, options.shards, options.scenario.name, options.seed
    );
    let mut cluster = TestCluster::start(cluster_options).await?;
    let targets: Targets = Arc::new(std::sync::RwLock::new(
        cluster.nodes.values().map(|n| (n.id, n.api())).collect::<BTreeMap<u64, String>>(),
    ));
    let run_tag = format!("{:x}", options.seed);
    let keys: Arc<Vec<String>> = Arc::new((0..options.keys).map(|k| format!("chaos/{run_tag}/register/{k}")).collect());
    let history = Arc::new(History::default());
    let client = reqwest::Client::builder().pool_max_idle_per_host(4).build()?;
    let started = Instant::now();
    let deadline = started + options.duration;
    let registers = Clients {
        keys,
        targets: targets.clone(),
        history: history.clone(),
        started,
        deadline,
        seed: options.seed,
        client: client.clone(),
    };
    let unkeyed_set = Clients {
        keys: Arc::new((0..options.keys).map(|k| format!("chaos/{run_tag}/unkeyed/{k}")).collect()),
        history: Arc::new(History::default()),
        ..registers.clone()
    };
    let register_tasks = spawn_clients(options.register_clients, |p| workload::register_client(p, registers.clone()));
    let unkeyed_tasks = spawn_clients(options.unkeyed_clients, |p| workload::unkeyed_client(p, unkeyed_set.clone()));
    let mut sets = Vec::new();
    for process in 0..options.set_clients {
        let path = format!("chaos/{run_tag}/set/{process}");
        sets.push(tokio::spawn(workload::set_client(
            process,
            path,
            targets.clone(),
            deadline,
            options.seed,
            client.clone(),
        )));
    }
    let mut nemesis =
        Nemesis::new(&mut cluster, targets.clone(), StdRng::seed_from_u64(options.seed), started, options.shards);
    if small_disk.is_some() {
        nemesis.small_disks.push(1);
    }
    nemesis.probe = Some(Probe::new(history.clone(), client.clone(), run_tag.clone(), started));
    nemesis.run(options.scenario.faults, deadline).await;
    nemesis.heal_all().await;
    let faults = std::mem::take(&mut nemesis.records);
    let crashed = std::mem::take(&mut nemesis.crashed);
    let probes = nemesis.probe.take().map(|p| p.records).unwrap_or_default();
    let small_disks = nemesis.small_disks.clone();
    drop(nemesis);
    for task in register_tasks.into_iter().chain(unkeyed_tasks) {
        let _ = task.await;
    }
    let mut set_logs = Vec::new();
    for task in sets {
        if let Ok(log) = task.await {
            set_logs.push(log);
        }
    }
    println!("[{:7.1}s] workload done; waiting for the cluster to settle", started.elapsed().as_secs_f64());
    cluster.wait_all_leaders(Duration::from_secs(60)).await?;

    let ops = history.take();
    let register_ops = OpCounts::of(&ops);
    let mut anomalies = Vec::new();
    let register_keys = linearizability::check(&ops, 20_000_000);
    for (key, verdict) in &register_keys {
        match verdict {
            Verdict::NotLinearizable { frontier } => anomalies.push(Anomaly {
                kind: "not_linearizable",
                message: format!("no linearization of key {key}; the search failed at these operations"),
                ops: ops.iter().filter(|o| frontier.contains(&o.id)).cloned().collect(),
            }),
            Verdict::Unknown { steps } => {
                println!("key {key}: linearizability search gave up after {steps} steps (not counted as an anomaly)")
            }
            Verdict::Linearizable => {}
        }
    }
    let stale_reads = linearizability::stale_reads(&ops);
    for stale in stale_reads.iter().take(20) {
        anomalies.push(Anomaly {
            kind: "stale_read",
            message: format!(
                "linearizable read {} of {} returned {:?} after write {} of {:?} had completed",
                stale.read, stale.key, stale.returned, stale.missed_write, stale.missed_value
            ),
            ops: ops.iter().filter(|o| o.id == stale.read || o.id == stale.missed_write).cloned().collect(),
        });
    }
    let set = check_sets(&cluster, &set_logs).await;
    for (path, last_answer) in &set.unreadable {
        anomalies.push(Anomaly {
            kind: "unavailable_after_heal",
            message: format!(
                "{path} could not be read for 60 s after every fault was healed; last answer: {last_answer}"
            ),
            ops: vec![],
        });
    }
    for (path, value) in &set.lost {
        anomalies.push(Anomaly {
            kind: "lost_write",
            message: format!("acknowledged value {value} of {path} is missing"),
            ops: vec![],
        });
    }
    for (path, value, count) in &set.duplicated {
        anomalies.push(Anomaly {
            kind: "duplicate_write",
            message: format!("value {value} of {path} appears {count} times"),
            ops: vec![],
        });
    }
    for (path, value) in &set.unexpected {
        anomalies.push(Anomaly {
            kind: "unexpected_write",
            message: format!("value {value} of {path} appears but was refused or never written"),
            ops: vec![],
        });
    }
    for id in &crashed {
        // A node may stop itself when its disk is full; any other exit is a crash.
        if !small_disks.contains(id) {
            anomalies.push(Anomaly {
                kind: "node_crashed",
                message: format!("node {id} exited by itself"),
                ops: vec![],
            });
        }
    }
    let unkeyed_ops = unkeyed_set.history.take();
    let unkeyed = check_unkeyed(&cluster, &unkeyed_set.keys, &unkeyed_ops).await;
    for (key, last_answer) in &unkeyed.unreadable {
        anomalies.push(Anomaly {
            kind: "unavailable_after_heal",
            message: format!(
                "{key} could not be read for 60 s after every fault was healed; last answer: {last_answer}"
            ),
            ops: vec![],
        });
    }
    let sent_op = |key: &str, value: i64| {
        unkeyed_ops.iter().filter(|o| o.key == key && o.value == Some(value)).cloned().collect::<Vec<_>>()
    };
    for (key, value, count) in &unkeyed.duplicated {
        anomalies.push(Anomaly {
            kind: "duplicate_write",
            message: format!("value {value} of {key} appears {count} times; it was sent once, without a request_id"),
            ops: sent_op(key, *value),
        });
    }
    for (key, value) in &unkeyed.lost {
        anomalies.push(Anomaly {
            kind: "lost_write",
            message: format!("acknowledged value {value} of {key} is missing"),
            ops: sent_op(key, *value),
        });
    }
    for (key, value) in &unkeyed.unexpected {
        anomalies.push(Anomaly {
            kind: "unexpected_write",
            message: format!("value {value} of {key} appears but was refused or never sent"),
            ops: sent_op(key, *value),
        });
    }
    let election_timeout_max_ms = options
        .env
        .iter()
        .find(|(name, _)| name == "STEMEDB_RAFT_ELECTION_TIMEOUT_MAX_MS")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MAX_MS);
    let all_ops: Vec<&Op> = ops.iter().chain(&unkeyed_ops).collect();
    let failover = failover::measure(&faults, &all_ops, election_timeout_max_ms);
    let replicas = check_replicas(&cluster, options.shards).await;
    for divergence in &replicas.diverged {
        anomalies.push(Anomaly { kind: "replicas_diverged", message: divergence.to_string(), ops: vec![] });
    }
    drop(cluster);
    if let Some(mountpoint) = &small_disk {
        let _ = std::process::Command::new("umount").arg(mountpoint).status();
    }
    if own_root {
        if let Some(root) = &data_root {
            let _ = std::fs::remove_dir_all(root);
        }
    }
    let inconclusive = register_keys.values().any(|v| matches!(v, Verdict::Unknown { .. }));
    let result = match (anomalies.is_empty(), inconclusive) {
        (false, _) => "fail",
        (true, true) => "inconclusive",
        (true, false) => "pass",
    };
    Ok(Report {
        scenario: options.scenario.name.to_string(),
        seed: options.seed,
        nodes: options.nodes,
        shards: options.shards,
        duration_s: options.duration.as_secs_f64(),
        faults,
        crashed,
        register_ops,
        register_keys,
        stale_reads,
        set,
        unkeyed,
        probes,
        failover,
        replicas,
        anomalies,
        result,
    })
}

/// Starts `count` clients, numbered from 0, as tasks.
fn spawn_clients<F, T>(count: u32, client: impl Fn(u32) -> F) -> Vec<tokio::task::JoinHandle<T>>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    (0..count).map(|process| tokio::spawn(client(process))).collect()
}

/// Reads every set path back (linearizable, retried while the cluster recovers) and compares
/// with what the clients were told.
async fn check_sets(cluster: &TestCluster, logs: &[SetClientLog]) -> SetCheck {
    let mut check = SetCheck {
        paths: logs.len(),
        acknowledged: logs.iter().map(|l| l.acknowledged.len()).sum(),
        lost: vec![],
        duplicated: vec![],
        unexpected: vec![],
        unknown_outcomes: logs.iter().map(|l| l.unknown.len()).sum(),
        unreadable: vec![],
    };
    for log in logs {
        let values = match read_all_values(cluster, &log.concept_path).await {
            Ok(values) => values,
            Err(last_answer) => {
                check.unreadable.push((log.concept_path.clone(), last_answer));
                continue;
            }
        };
        let counts = tally(values);
        for value in &log.acknowledged {
            if !counts.contains_key(value) {
                check.lost.push((log.concept_path.clone(), *value));
            }
        }
        let attempted: BTreeSet<i64> = log.acknowledged.iter().chain(&log.unknown).copied().collect();
        for (value, count) in counts {
            if count > 1 {
                check.duplicated.push((log.concept_path.clone(), value, count));
            }
            if !attempted.contains(&value) {
                check.unexpected.push((log.concept_path.clone(), value));
            }
        }
    }
    check
}

/// How many times each value occurs.
fn tally(values: Vec<i64>) -> BTreeMap<i64, usize> {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for value in values {
        *counts.entry(value).or_default() += 1;
    }
    counts
}

/// Reads every unkeyed-set key back and compares with what was sent to it (`ops`: the unkeyed
/// clients' writes).
async fn check_unkeyed(cluster: &TestCluster, keys: &[String], ops: &[Op]) -> UnkeyedCheck {
    let count = |outcome: Outcome| ops.iter().filter(|o| o.outcome == outcome).count();
    let mut check = UnkeyedCheck {
        keys: keys.len(),
        sent: ops.len(),
        acknowledged: count(Outcome::Ok),
        refused: count(Outcome::Fail),
        unknown: count(Outcome::Indeterminate),
        unknown_landed: 0,
        duplicates: 0,
        duplicated: vec![],
        lost: vec![],
        unexpected: vec![],
        unreadable: vec![],
    };
    if ops.is_empty() {
        return check;
    }
    for key in keys {
        let counts = match read_all_values(cluster, key).await {
            Ok(values) => tally(values),
            Err(last_answer) => {
                check.unreadable.push((key.clone(), last_answer));
                continue;
            }
        };
        let sent: BTreeMap<i64, Outcome> = ops
            .iter()
            .filter(|o| o.kind == OpKind::Write && o.key == *key)
            .filter_map(|o| Some((o.value?, o.outcome)))
            .collect();
        for (value, outcome) in &sent {
            if *outcome == Outcome::Ok && !counts.contains_key(value) {
                check.lost.push((key.clone(), *value));
            }
        }
        for (value, found) in counts {
            if found > 1 {
                check.duplicated.push((key.clone(), value, found));
            }
            match sent.get(&value) {
                Some(Outcome::Ok) => {}
                Some(Outcome::Indeterminate) => check.unknown_landed += 1,
                Some(Outcome::Fail) | None => check.unexpected.push((key.clone(), value)),
            }
        }
    }
    check.duplicates = check.duplicated.len();
    check
}

/// Every value asserted on `concept_path` (history lens), or the last answer when it cannot be
/// read within 60 s.
async fn read_all_values(cluster: &TestCluster, concept_path: &str) -> Result<Vec<i64>, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = json!({"concept_path": concept_path, "predicate": workload::PREDICATE, "lens": "history", "consistency": "linearizable"});
    let mut last_answer = String::new();
    loop {
        for via in cluster.running() {
            let answer = cluster.post(via, "/v1/query", &body).await;
            if let Ok((200, answer)) = answer {
                let assertions = answer["results"].as_array().and_then(|r| r.first()).map(|r| r["assertions"].clone());
                return Ok(assertions
                    .and_then(|a| a.as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|a| a["value"].as_i64())
                    .collect());
            }
            last_answer = match answer {
                Ok((status, body)) => format!("node {via}: {status} {body}"),
                Err(error) => format!("node {via}: {error}"),
            };
        }
        if Instant::now() > deadline {
            return Err(last_answer);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the replicas of each shard reach the same applied index, then compares digests.
async fn check_replicas(cluster: &TestCluster, shards: u16) -> ReplicaCheck {
    let mut diverged = Vec::new();
    let mut checked = 0;
    for shard in 0..shards {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut digests = BTreeMap::new();
            for via in cluster.running() {
                if let Ok((200, answer)) = cluster.admin_get(via, &format!("/cluster/shards/{shard}/digest")).await {
                    digests.insert(via, (answer["applied_index"].as_u64(), answer["digest"].clone()));
                }
            }
            let listing = || {
                digests
                    .iter()
                    .map(|(id, (i, d))| json!({"node": id, "applied_index": i, "digest": d}))
                    .collect::<Vec<_>>()
            };
            let indexes: BTreeSet<Option<u64>> = digests.values().map(|(i, _)| *i).collect();
            if indexes.len() == 1 && digests.len() >= 2 {
                let distinct: BTreeSet<String> = digests.values().map(|(_, d)| d.to_string()).collect();
                checked += 1;
                if distinct.len() > 1 {
                    diverged.push(json!({"shard": shard, "replicas": listing()}));
                }
                break;
            }
            if Instant::now() > deadline {
                diverged.push(json!({"shard": shard, "error": "replicas did not reach the same applied index within 60 s", "replicas": listing()}));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    ReplicaCheck { shards_checked: checked, diverged }
}

/// The readable summary printed at the end of a run.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "scenario {} · seed {} · {} nodes · {} shards · {:.0} s\n",
        report.scenario, report.seed, report.nodes, report.shards, report.duration_s
    ));
    out.push_str(&format!("faults injected: {}\n", report.faults.len()));
    for fault in &report.faults {
        out.push_str(&format!(
            "  {:7.1}s - {:7.1}s  {:<18} {}\n",
            fault.at_s,
            fault.healed_at_s.unwrap_or(f64::NAN),
            fault.kind.name(),
            fault.detail
        ));
    }
    let ops = &report.register_ops;
    out.push_str(&format!(
        "register ops: writes {} ok / {} failed / {} indeterminate, reads {} ok / {} failed\n",
        ops.writes_ok, ops.writes_failed, ops.writes_indeterminate, ops.reads_ok, ops.reads_failed
    ));
    let linearizable = report.register_keys.values().filter(|v| **v == Verdict::Linearizable).count();
    out.push_str(&format!("linearizable keys: {linearizable}/{}\n", report.register_keys.len()));
    out.push_str(&format!(
        "set: {} acknowledged over {} paths, {} lost, {} duplicated, {} unexpected, {} left unknown, {} unreadable\n",
        report.set.acknowledged,
        report.set.paths,
        report.set.lost.len(),
        report.set.duplicated.len(),
        report.set.unexpected.len(),
        report.set.unknown_outcomes,
        report.set.unreadable.len()
    ));
    let u = &report.unkeyed;
    if u.sent > 0 {
        out.push_str(&format!(
            "unkeyed set (no request_id, each write sent once): {} sent to {} keys, {} acknowledged / {} refused / {} unknown ({} of them landed); duplicates: {}, lost: {}, unexpected: {}, unreadable: {}\n",
            u.sent,
            u.keys,
            u.acknowledged,
            u.refused,
            u.unknown,
            u.unknown_landed,
            u.duplicates,
            u.lost.len(),
            u.unexpected.len(),
            u.unreadable.len()
        ));
    }
    if !report.probes.is_empty() {
        let mut results: BTreeMap<&str, usize> = BTreeMap::new();
        for probe in &report.probes {
            *results.entry(probe.result).or_default() += 1;
        }
        let results: Vec<String> = results.iter().map(|(r, n)| format!("{n} {r}")).collect();
        out.push_str(&format!("stale-read probes: {}\n", results.join(", ")));
    }
    out.push_str(&failover_summary(&report.failover));
    out.push_str(&format!(
        "replicas: {} shards compared, {} diverged\n",
        report.replicas.shards_checked,
        report.replicas.diverged.len()
    ));
    if report.result == "inconclusive" {
        out.push_str("result: INCONCLUSIVE (no anomaly found, but a key's history exceeded the search budget)\n");
    } else if report.anomalies.is_empty() {
        out.push_str("result: PASS (no anomaly)\n");
    } else {
        out.push_str(&format!("result: FAIL ({} anomalies)\n", report.anomalies.len()));
        for anomaly in report.anomalies.iter().take(10) {
            out.push_str(&format!("  [{}] {}\n", anomaly.kind, anomaly.message));
            for op in anomaly.ops.iter().take(6) {
                out.push_str(&format!(
                    "      op {} p{} {:?} {:?} on node {} invoked {:.3}s completed {} {:?}\n",
                    op.id,
                    op.process,
                    op.kind,
                    op.value,
                    op.node,
                    op.invoke_us as f64 / 1e6,
                    op.complete_us.map(|c| format!("{:.3}s", c as f64 / 1e6)).unwrap_or_else(|| "never".into()),
                    op.outcome
                ));
            }
        }
    }
    out
}

/// The failover part of the summary: per fault class, the worst wait and write gap through
/// healthy nodes, each fault's, and the target.
fn failover_summary(failover: &Failover) -> String {
    if failover.by_class.is_empty() {
        return String::new();
    }
    let list = |values: &[f64]| values.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(" ");
    let worst = |value: Option<f64>| value.map(|v| format!("{v:.2} s")).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "failover through healthy nodes (target < {:.1} s = raft.election_timeout_max_ms {} ms + 1 s; reported, not checked):\n",
        failover.target_s, failover.election_timeout_max_ms
    );
    for (class, numbers) in &failover.by_class {
        out.push_str(&format!(
            "  {class:<18} {} faults  longest wait {}  longest write gap {}  waits [{}]  gaps [{}]\n",
            numbers.faults,
            worst(numbers.longest_wait_s),
            worst(numbers.longest_write_gap_s),
            list(&numbers.waits_s),
            list(&numbers.write_gaps_s)
        ));
    }
    out
}

/// Mounts a 1 GiB tmpfs at `dir` (root only; above the default free-space floor of 256 MiB);
/// `None` when the environment does not allow it.
fn mount_small_disk(dir: &std::path::Path) -> Option<PathBuf> {
    std::fs::create_dir_all(dir).ok()?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1g", "tmpfs"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    if status.success() {
        println!("node 1's data dir is a 1 GiB filesystem at {}", dir.display());
        Some(dir.to_path_buf())
    } else {
        println!("cannot mount a small filesystem here (needs root): disk-full faults are skipped");
        None
    }
}
