//! The disaster-recovery drill (`stemedb-chaos dr-drill`): a cluster takes keyed writes from
//! several clients, with continuous log archival on (unless `--no-archive`); at a random moment
//! a backup is taken, online; at a later random moment every node is killed and its data dir
//! destroyed; a **new** cluster is restored from the backup and the archived log (`stemedb
//! backup restore` on each new node) and started. The drill then checks:
//!
//! - every write acknowledged before the backup began reads back from the restored cluster;
//! - no write appears twice (each write is sent with its own `request_id`, retried with it);
//! - without archival, each restored shard's anti-entropy root, once the new cluster has
//!   checked it, equals the digest root the backup's manifest recorded; with archival (the
//!   restored shards hold more than the backup), `stemedb backup verify` recomputes every
//!   shard's digest from the backup and the archived segments, and every restored shard's
//!   replicas agree;
//! - the restored cluster has a new cluster id;
//!
//! and measures the **RPO** (the span of acknowledged writes lost: from the acknowledgement of
//! the oldest acknowledged write missing after the restore to the destruction; every write
//! acknowledged before it came back. Without log archival it is about the time since the
//! backup; with it, about one archive interval) and the **RTO** (destruction to the restored
//! cluster answering a linearizable read).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

pub struct DrillOptions {
    /// From the first write to the destruction, about.
    pub duration: Duration,
    pub shards: u16,
    pub seed: u64,
    pub clients: u32,
    pub stemedb: PathBuf,
    /// Data dirs, node logs and the backup store; default: a temporary directory.
    pub data_root: Option<PathBuf>,
    /// Continuous log archival at this interval; `None`: off.
    pub archive_interval: Option<Duration>,
}

#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub seed: u64,
    pub writes_acknowledged: usize,
    pub acknowledged_before_backup: usize,
    pub missing_before_backup: usize,
    pub missing_after_backup: usize,
    /// Writes acknowledged after the backup began that came back (from the archived log).
    pub restored_after_backup: usize,
    pub archive: bool,
    pub present_unacknowledged: usize,
    pub duplicates: usize,
    pub backup_id: String,
    pub backup_seconds: f64,
    pub backup_began_s: f64,
    pub destroyed_at_s: f64,
    pub restore_seconds: f64,
    pub rpo_seconds: f64,
    pub rto_seconds: f64,
    pub shards_checked: usize,
    pub digests_matching: usize,
    pub old_cluster_id: String,
    pub new_cluster_id: String,
    pub anomalies: Vec<String>,
}

/// One write and what the client learned about it.
#[derive(Debug, Clone)]
struct Write {
    key: String,
    /// When it was acknowledged (`None`: never, as far as the client knows).
    acked: Option<Instant>,
}

fn writer(
    client: reqwest::Client,
    apis: Vec<String>,
    id: u32,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Write>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Acquire) {
            let key = format!("dr/c{id}/n{n}");
            let body = json!({"concept_path": key, "predicate": "v", "value": n, "agent_id": format!("dr-client-{id}"), "request_id": format!("dr-{id}-{n}")});
            let mut acked = None;
            // The same request_id on every try: a retry of a write that was applied is a no-op.
            for attempt in 0..3u64 {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let api = &apis[((n + attempt) as usize + id as usize) % apis.len()];
                let sent = client.post(format!("{api}/v1/assert")).json(&body).send().await;
                if sent.is_ok_and(|r| r.status().as_u16() == 201) {
                    acked = Some(Instant::now());
                    break;
                }
            }
            if let Ok(mut log) = log.lock() {
                log.push(Write { key, acked });
            }
            n += 1;
        }
    })
}

/// Every `dr/` key the cluster holds, with its number of assertions.
async fn stored_keys(cluster: &TestCluster, via: u64) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut keys = BTreeMap::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100_000 {
        let mut url = format!("{}/v1/concepts?prefix=dr&limit=1000", cluster.node(via).api());
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = cluster.client.get(url).send().await?.json().await?;
        for concept in page["concepts"].as_array().into_iter().flatten() {
            let key = concept["concept_path"].as_str().unwrap_or_default().to_string();
            *keys.entry(key).or_insert(0) += concept["assertions"].as_u64().unwrap_or(0);
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return Ok(keys),
        }
    }
    anyhow::bail!("listing dr/ keys did not end")
}

async fn backup(cluster: &TestCluster, via: u64, destination: &str) -> anyhow::Result<Value> {
    let (status, started) = cluster.post(via, "/v1/admin/backup", &json!({"destination": destination})).await?;
    anyhow::ensure!(status == 202, "backup refused: {status} {started}");
    let id = started["id"].as_str().unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, progress) = cluster.get(via, &format!("/v1/admin/backup/{id}")).await?;
        if progress["state"] != "running" {
            return Ok(progress);
        }
        anyhow::ensure!(Instant::now() < deadline, "backup {id} still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the drill; the report's `anomalies` are empty when every promise held.
pub async fn dr_drill(options: DrillOptions) -> anyhow::Result<DrillReport> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let temp = tempfile::tempdir()?;
    let root = options.data_root.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let store = root.join("backup-store");
    let store_text = store.to_string_lossy().to_string();
    std::fs::create_dir_all(&store)?;
    let env = match options.archive_interval {
        Some(interval) => vec![
            ("STEMEDB_BACKUP_DESTINATION".to_string(), store_text.clone()),
            ("STEMEDB_BACKUP_ARCHIVE_ENABLED".to_string(), "true".to_string()),
            ("STEMEDB_BACKUP_ARCHIVE_INTERVAL_MS".to_string(), interval.as_millis().to_string()),
        ],
        None => Vec::new(),
    };
    let mut old = TestCluster::start(ClusterOptions {
        nodes: 3,
        shards: options.shards,
        binary: Some(options.stemedb.clone()),
        data_root: Some(root.join("old")),
        env,
        ..Default::default()
    })
    .await
    .context("starting the cluster")?;
    let (_, health) = old.admin_get(1, "/cluster/health").await?;
    let old_cluster_id = health["cluster_id"].as_str().unwrap_or_default().to_string();
    let started = Instant::now();
    let backup_at = options.duration.mul_f64(rng.random_range(0.2..0.45));
    let destroy_at = options.duration.mul_f64(rng.random_range(0.6..0.9));
    println!(
        "dr-drill: seed {}, backup at {backup_at:.1?}, destruction at {destroy_at:.1?}, log archival {}",
        options.seed,
        options.archive_interval.map(|i| format!("every {i:?}")).unwrap_or_else(|| "off".into())
    );

    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let apis: Vec<String> = old.nodes.values().map(|n| n.api()).collect();
    let writers: Vec<_> =
        (0..options.clients).map(|c| writer(old.client.clone(), apis.clone(), c, stop.clone(), log.clone())).collect();

    tokio::time::sleep(backup_at).await;
    let via = rng.random_range(1..=3u64);
    let backup_began = Instant::now();
    let progress = backup(&old, via, &store_text).await?;
    let backup_seconds = backup_began.elapsed().as_secs_f64();
    let mut anomalies = Vec::new();
    if progress["state"] != "succeeded" {
        anyhow::bail!("the backup failed: {progress}");
    }
    let backup_id = progress["id"].as_str().unwrap_or_default().to_string();
    println!("dr-drill: backup {backup_id} through node {via} in {backup_seconds:.2}s");

    if let Some(rest) = destroy_at.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    // The disaster: every node killed, every data dir gone.
    stop.store(true, Ordering::Release);
    let ids: Vec<u64> = old.nodes.keys().copied().collect();
    for id in &ids {
        old.kill(*id);
    }
    let destroyed = Instant::now();
    for id in &ids {
        std::fs::remove_dir_all(&old.node(*id).data_dir).with_context(|| format!("destroying node {id}'s data dir"))?;
    }
    for writer in writers {
        let _ = writer.await;
    }
    println!("dr-drill: every node killed and its data dir destroyed at {:.1?}", destroyed - started);

    // With archival, the backup and every archived segment after it are checked first: each
    // file and segment against its checksum, each shard's records against the manifest's digest.
    if options.archive_interval.is_some() {
        let output = std::process::Command::new(&options.stemedb)
            .env_remove("STEMEDB_BIN")
            .args(["backup", "verify", "--from", &store_text, "--backup", &backup_id, "--json"])
            .output()?;
        let verified: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if !output.status.success() || verified["ok"] != json!(true) || verified["log_segments"].as_u64() == Some(0) {
            anomalies.push(format!(
                "verify of the backup and its archived log: {} {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        println!("dr-drill: verify: {} archived segments after the backup", verified["log_segments"]);
    }

    // The recovery: a new cluster restored from the backup (and the archived log).
    let stemedb = options.stemedb.clone();
    let source = store_text.clone();
    let restore_log = root.join("restore.log");
    let prepare: stemedb_cluster_tests::PrepareNode = Arc::new(move |id: u64, dir: &Path, initial: &str| {
        let output = std::process::Command::new(&stemedb)
            .env_remove("STEMEDB_BIN")
            .args(["backup", "restore", "--from", &source, "--json", "--node-id", &id.to_string()])
            .arg("--data-dir")
            .arg(dir)
            .args(["--initial-cluster", initial])
            .output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&restore_log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
        anyhow::ensure!(output.status.success(), "restore of node {id}: {text}");
        Ok(())
    });
    let restore_began = Instant::now();
    let new = TestCluster::start(ClusterOptions {
        nodes: 3,
        shards: options.shards,
        binary: Some(options.stemedb.clone()),
        data_root: Some(root.join("new")),
        prepare: Some(prepare),
        ..Default::default()
    })
    .await
    .context("starting the restored cluster")?;
    // Serving: a linearizable read answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = new.read_value(1, "dr/probe", "linearizable").await?;
        if status == 200 || status == 404 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the restored cluster does not answer reads ({status})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rto = destroyed.elapsed();
    let restore_seconds = restore_began.elapsed().as_secs_f64();
    println!("dr-drill: restored cluster serving {rto:.2?} after the destruction");

    // What came back.
    let stored = stored_keys(&new, 2).await?;
    let writes = log.lock().map(|l| l.clone()).unwrap_or_default();
    let acked: Vec<&Write> = writes.iter().filter(|w| w.acked.is_some()).collect();
    let before: Vec<&&Write> = acked.iter().filter(|w| w.acked < Some(backup_began)).collect();
    let missing_before: Vec<&str> =
        before.iter().filter(|w| !stored.contains_key(&w.key)).map(|w| w.key.as_str()).collect();
    let missing: Vec<&&Write> = acked.iter().filter(|w| !stored.contains_key(&w.key)).collect();
    let restored_after_backup =
        acked.iter().filter(|w| w.acked >= Some(backup_began) && stored.contains_key(&w.key)).count();
    // Every write acknowledged before the oldest missing one came back: the data lost is what
    // was acknowledged from then to the destruction.
    let oldest_missing = missing.iter().filter_map(|w| w.acked).min();
    let rpo = oldest_missing.map(|at| destroyed.saturating_duration_since(at)).unwrap_or_default();
    let duplicates: Vec<(&String, &u64)> = stored.iter().filter(|(_, n)| **n > 1).collect();
    let present_unacknowledged = writes.iter().filter(|w| w.acked.is_none() && stored.contains_key(&w.key)).count();
    if !missing_before.is_empty() {
        anomalies.push(format!(
            "{} writes acknowledged before the backup began are missing, e.g. {:?}",
            missing_before.len(),
            &missing_before[..missing_before.len().min(5)]
        ));
    }
    if !duplicates.is_empty() {
        anomalies.push(format!(
            "{} keys hold more than one assertion, e.g. {:?}",
            duplicates.len(),
            &duplicates[..duplicates.len().min(5)]
        ));
    }
    let (_, health) = new.admin_get(1, "/cluster/health").await?;
    let new_cluster_id = health["cluster_id"].as_str().unwrap_or_default().to_string();
    if new_cluster_id == old_cluster_id || new_cluster_id.is_empty() {
        anomalies.push(format!("the restored cluster's id {new_cluster_id:?} is not new"));
    }

    // Each restored shard, as the new cluster's anti-entropy checks it, against the manifest.
    let manifest: Value = serde_json::from_slice(&std::fs::read(store.join(format!("manifests/{backup_id}.json")))?)?;
    let expected: BTreeMap<u64, String> = manifest["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["shard"].as_u64().is_some_and(|s| s < u64::from(options.shards)))
        .filter_map(|g| Some((g["shard"].as_u64()?, g["digest_root"].as_str()?.to_string())))
        .collect();
    for node in 1..=3u64 {
        let url = format!("{}/cluster/sync", new.node(1).admin());
        let response = new.client.post(url).json(&json!({"target_node": node, "force": true})).send().await?;
        let status = response.status().as_u16();
        if status != 200 && status != 202 {
            let body = response.text().await.unwrap_or_default();
            anomalies.push(format!("POST /cluster/sync for node {node}: {status} {body}"));
        }
    }
    let mut matching = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    let checked = loop {
        let (_, sync) = new.admin_get(1, "/cluster/sync_status").await?;
        let shards: Vec<&Value> = sync["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["shard"].as_u64().is_some_and(|n| expected.contains_key(&n)))
            .collect();
        let agreed: Vec<&&Value> = shards.iter().filter(|s| s["agreement"] == "agree").collect();
        if agreed.len() == expected.len() || Instant::now() > deadline {
            let checked = agreed.len();
            for shard in &agreed {
                let n = shard["shard"].as_u64().unwrap_or(u64::MAX);
                let roots: Vec<&str> =
                    shard["replicas"].as_array().into_iter().flatten().filter_map(|r| r["root"].as_str()).collect();
                let agree = match options.archive_interval {
                    // The replay added to the backup: the replicas must agree with each other.
                    Some(_) => roots.len() > 1 && roots.iter().all(|r| Some(r) == roots.first()),
                    None => !roots.is_empty() && roots.iter().all(|r| Some(*r) == expected.get(&n).map(String::as_str)),
                };
                if agree {
                    matching += 1;
                } else if options.archive_interval.is_some() {
                    anomalies.push(format!("shard {n}: restored replicas disagree: roots {roots:?}"));
                } else {
                    anomalies
                        .push(format!("shard {n}: restored roots {roots:?}, the manifest says {:?}", expected.get(&n)));
                }
            }
            if checked < expected.len() {
                anomalies.push(format!("only {checked} of {} shards were checked after the restore", expected.len()));
            }
            break checked;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let report = DrillReport {
        seed: options.seed,
        writes_acknowledged: acked.len(),
        acknowledged_before_backup: before.len(),
        missing_before_backup: missing_before.len(),
        missing_after_backup: missing.len() - missing_before.len(),
        restored_after_backup,
        archive: options.archive_interval.is_some(),
        present_unacknowledged,
        duplicates: duplicates.len(),
        backup_id,
        backup_seconds,
        backup_began_s: (backup_began - started).as_secs_f64(),
        destroyed_at_s: (destroyed - started).as_secs_f64(),
        restore_seconds,
        rpo_seconds: rpo.as_secs_f64(),
        rto_seconds: rto.as_secs_f64(),
        shards_checked: checked,
        digests_matching: matching,
        old_cluster_id,
        new_cluster_id,
        anomalies,
    };
    drop(new);
    drop(old);
    Ok(report)
}
