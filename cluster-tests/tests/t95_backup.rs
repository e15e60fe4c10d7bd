//! Backups on real clusters (docs/backup.md): a backup taken while writes go on, verified and
//! restored into a new cluster that holds every write acknowledged before the backup began;
//! shared files between backups; a flipped byte named by `verify` and refused by `restore`; a
//! failed backup that leaves no manifest; and the same to a real S3 server (moto, started on
//! loopback from the virtualenv `scripts/setup.sh` makes); and with continuous log archival, a
//! restore that replays the archived log past the backup, to its end or to `--as-of`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use stemedb_cluster_tests::{lease_port, stemedb_binary, ClusterOptions, TestCluster};

/// Runs `stemedb backup ARGS` with `env`; (success, stdout, stderr).
fn backup_cli(args: &[&str], env: &[(String, String)]) -> anyhow::Result<(bool, String, String)> {
    let mut command = Command::new(stemedb_binary()?);
    command.env_remove("STEMEDB_BIN").arg("backup").args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    ))
}

/// Starts a backup through `via` and waits for its end; its final progress.
async fn backup(cluster: &TestCluster, via: u64, destination: &str) -> anyhow::Result<Value> {
    let (status, started) = cluster.post(via, "/v1/admin/backup", &json!({"destination": destination})).await?;
    anyhow::ensure!(status == 202, "{status} {started}");
    let id = started["id"].as_str().unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, progress) = cluster.get(via, &format!("/v1/admin/backup/{id}")).await?;
        anyhow::ensure!(status == 200, "{status} {progress}");
        if progress["state"] != "running" {
            return Ok(progress);
        }
        anyhow::ensure!(Instant::now() < deadline, "backup {id} still running: {progress}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A prepare hook that restores `source` into each node's data dir.
fn restore_hook(source: String, env: Vec<(String, String)>) -> stemedb_cluster_tests::PrepareNode {
    restore_hook_with(source, env, Vec::new())
}

/// [`restore_hook`] with more `stemedb backup restore` arguments.
fn restore_hook_with(
    source: String,
    env: Vec<(String, String)>,
    extra: Vec<String>,
) -> stemedb_cluster_tests::PrepareNode {
    Arc::new(move |id: u64, data_dir: &Path, initial_cluster: &str| {
        let data_dir = data_dir.to_string_lossy().to_string();
        let node_id = id.to_string();
        let args = [
            "restore",
            "--from",
            source.as_str(),
            "--data-dir",
            data_dir.as_str(),
            "--node-id",
            node_id.as_str(),
            "--initial-cluster",
            initial_cluster,
            "--json",
        ];
        let args: Vec<&str> = args.into_iter().chain(extra.iter().map(String::as_str)).collect();
        let (ok, stdout, stderr) = backup_cli(&args, &env)?;
        anyhow::ensure!(ok, "restore of node {id} failed: {stdout} {stderr}");
        eprintln!("node {id}: {}", stdout.trim());
        Ok(())
    })
}

/// Writes `bk/k<i>` through the nodes in turn until `stop`, recording when each was acknowledged.
fn start_writer(
    cluster: &TestCluster,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<(String, Instant)>>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (client, apis) = (cluster.client.clone(), cluster.nodes.values().map(|n| n.api()).collect::<Vec<_>>());
    let record = acked.clone();
    let writer = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut i = 0usize;
        while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
            let path = format!("bk/k{i}");
            let body = json!({"concept_path": path, "predicate": "v", "value": i, "agent_id": "writer", "request_id": format!("w{i}")});
            let sent = client.post(format!("{}/v1/assert", apis[i % apis.len()])).json(&body).send().await;
            if let Ok(response) = sent {
                if response.status().as_u16() == 201 {
                    record.lock().push((path, Instant::now()));
                    i += 1;
                }
            }
        }
    });
    (writer, acked)
}

async fn wait_for_acks(acked: &Mutex<Vec<(String, Instant)>>, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = acked.lock().len();
        if done >= count {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {done} writes acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every path reads back its value on `cluster` (linearizable, through the nodes in turn).
async fn assert_all_present(cluster: &TestCluster, paths: &[String]) -> anyhow::Result<()> {
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for (n, path) in paths.iter().enumerate() {
        let i: u64 = path.trim_start_matches("bk/k").parse()?;
        let (status, value) = cluster.read_value(ids[n % ids.len()], path, "linearizable").await?;
        assert_eq!((status, value), (200, json!(i)), "{path} after restore");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_writing_then_restore_a_new_cluster() -> anyhow::Result<()> {
    let old = TestCluster::start(ClusterOptions { nodes: 3, shards: 4, ..Default::default() }).await?;
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store").to_string_lossy().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, acked) = start_writer(&old, stop.clone());
    wait_for_acks(&acked, 150).await?;
    let began = Instant::now();
    let first = backup(&old, 2, &store).await?;
    assert_eq!(first["state"], json!("succeeded"), "{first}");
    let so_far = acked.lock().len();
    wait_for_acks(&acked, so_far + 30).await?;
    stop.store(true, Ordering::Release);
    writer.await?;
    let (before, all): (Vec<String>, usize) = {
        let acked = acked.lock();
        (acked.iter().filter(|(_, at)| *at < began).map(|(p, _)| p.clone()).collect(), acked.len())
    };
    eprintln!("{} writes acknowledged before the backup began, {all} in all; first backup {first}", before.len());

    // A second backup shares the files nothing changed (the meta group's at least).
    let second = backup(&old, 1, &store).await?;
    assert_eq!(second["state"], json!("succeeded"), "{second}");
    let (ok, listed, stderr) = backup_cli(&["list", "--from", &store, "--json"], &[])?;
    assert!(ok, "{stderr}");
    let listed: Value = serde_json::from_str(&listed)?;
    assert_eq!(listed["backups"].as_array().map(Vec::len), Some(2), "{listed}");
    let first_id = first["id"].as_str().unwrap_or_default();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(format!("store/manifests/{first_id}.json")))?)?;
    let second_id = second["id"].as_str().unwrap_or_default();
    let manifest2: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(format!("store/manifests/{second_id}.json")))?)?;
    let names = |m: &Value| -> std::collections::BTreeSet<String> {
        m["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["files"].as_array().cloned().unwrap_or_default())
            .filter_map(|f| f["sha256"].as_str().map(str::to_string))
            .collect()
    };
    let shared = names(&manifest).intersection(&names(&manifest2)).count();
    assert!(shared >= 1, "no file shared between two backups");
    assert!(
        manifest2["uploaded_bytes"].as_u64() < manifest2["bytes"].as_u64(),
        "the second backup uploaded everything: {manifest2}"
    );

    // Verify without restoring.
    let (ok, report, stderr) = backup_cli(&["verify", "--from", &store, "--backup", first_id, "--json"], &[])?;
    assert!(ok, "{report} {stderr}");
    let report: Value = serde_json::from_str(&report)?;
    assert_eq!((report["ok"].clone(), report["groups"].clone()), (json!(true), json!(5)), "{report}");

    // Restore the first backup into a new cluster on other ports.
    let restored_at = Instant::now();
    let new = TestCluster::start(ClusterOptions {
        nodes: 3,
        shards: 4,
        prepare: Some(restore_hook(format!("{store}"), Vec::new())),
        ..Default::default()
    })
    .await;
    let new = match new {
        Ok(cluster) => cluster,
        Err(error) => anyhow::bail!("restored cluster did not start: {error:#}"),
    };
    eprintln!("restored cluster serving after {:?}", restored_at.elapsed());
    // The newest backup was restored (no --backup): the second one, which holds all of `before`.
    assert_all_present(&new, &before).await?;
    // A new cluster: its own id, and it takes writes.
    let (_, old_health) = old.admin_get(1, "/cluster/health").await?;
    let (_, new_health) = new.admin_get(1, "/cluster/health").await?;
    assert_ne!(old_health["cluster_id"], new_health["cluster_id"], "{old_health} {new_health}");
    new.assert_value(3, "bk/after-restore", json!("new")).await?;
    // Every write appears once: the history of a sample of keys holds one assertion each.
    for path in before.iter().step_by(25) {
        let (status, body) = new.post(2, "/v1/query", &json!({"concept_path": path, "lens": "history"})).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][0]["assertions"].as_array().map(Vec::len), Some(1), "{path}: {body}");
    }
    Ok(())
}

/// The path of one stored file of the backup in `store`.
fn some_file(store: &Path) -> anyhow::Result<PathBuf> {
    for fan in std::fs::read_dir(store.join("files"))? {
        if let Some(file) = std::fs::read_dir(fan?.path())?.next() {
            return Ok(file?.path());
        }
    }
    anyhow::bail!("no file in {}", store.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_is_named_and_refused_and_a_failed_backup_does_not_exist() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 1, shards: 2, ..Default::default() }).await?;
    for i in 0..40 {
        cluster.assert_value(1, &format!("bk/k{i}"), json!(i)).await?;
    }
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("store");
    let store = store_dir.to_string_lossy().to_string();

    // A backup whose files cannot be written fails, leaves no manifest, and the next succeeds.
    for fan in 0..=255u8 {
        let path = store_dir.join("files").join(format!("{fan:02x}"));
        std::fs::create_dir_all(path.parent().expect("parent"))?;
        std::fs::write(&path, b"in the way")?;
    }
    let failed = backup(&cluster, 1, &store).await?;
    assert_eq!(failed["state"], json!("failed"), "{failed}");
    assert_eq!(failed["error_code"], json!("backup_store_failed"), "{failed}");
    assert!(!store_dir.join("manifests").exists() || std::fs::read_dir(store_dir.join("manifests"))?.next().is_none());
    let (ok, listed, _) = backup_cli(&["list", "--from", &store, "--json"], &[])?;
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&listed)?["backups"], json!([]));
    std::fs::remove_dir_all(store_dir.join("files"))?;
    let done = backup(&cluster, 1, &store).await?;
    assert_eq!(done["state"], json!("succeeded"), "{done}");

    // One flipped byte in any file: verify names the file (and exits 1); restore refuses.
    let file = some_file(&store_dir)?;
    let mut bytes = std::fs::read(&file)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&file, &bytes)?;
    let name = file.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let (ok, out, stderr) = backup_cli(&["verify", "--from", &store], &[])?;
    assert!(!ok, "verify passed a damaged backup: {out}");
    assert!(out.contains("DAMAGED") && out.contains(&name), "{out} {stderr}");
    let (ok, out, stderr) = backup_cli(&["verify", "--from", &store, "--json"], &[])?;
    assert!(!ok);
    let report: Value = serde_json::from_str(&out)?;
    let damage = report["damage"].as_array().cloned().unwrap_or_default();
    assert_eq!(damage.len(), 1, "{report} {stderr}");
    assert!(damage[0]["file"].as_str().is_some_and(|f| f.ends_with(&name)), "{report}");
    assert!(damage[0]["group"].as_str().is_some_and(|g| g.starts_with("shard ") || g == "meta"), "{report}");

    let target = dir.path().join("restored");
    let target_text = target.to_string_lossy().to_string();
    let (ok, out, stderr) = backup_cli(
        &["restore", "--from", &store, "--data-dir", &target_text, "--node-id", "1", "--raft-addr", "127.0.0.1:1"],
        &[],
    )?;
    assert!(!ok, "restore took a damaged backup: {out}");
    assert!(stderr.contains("damaged backup") && stderr.contains(&name), "{stderr}");
    Ok(())
}

/// moto's S3 server from the virtualenv of `scripts/setup.sh` (or `MOTO_VENV`).
struct Moto {
    child: std::process::Child,
    endpoint: String,
    _port: stemedb_cluster_tests::PortLease,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_moto(bucket: &str) -> anyhow::Result<Moto> {
    let venv = std::env::var_os("MOTO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/stemedb-venv"));
    let server = venv.join("bin/moto_server");
    anyhow::ensure!(server.exists(), "{} is missing: run scripts/setup.sh", server.display());
    let port = lease_port()?;
    let child = Command::new(&server)
        .args(["-H", "127.0.0.1", "-p", &port.port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let endpoint = format!("http://127.0.0.1:{}", port.port);
    let moto = Moto { child, endpoint: endpoint.clone(), _port: port };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.put(format!("{endpoint}/{bucket}")).send().await {
            if response.status().is_success() {
                return Ok(moto);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "moto did not start on {endpoint}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_to_s3_and_restore_from_it() -> anyhow::Result<()> {
    let moto = start_moto("stemedb-backups").await?;
    let s3_env: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("STEMEDB_BACKUP_S3_ENDPOINT", moto.endpoint.as_str()),
        ("STEMEDB_BACKUP_S3_REGION", "us-east-1"),
        ("STEMEDB_BACKUP_S3_ALLOW_HTTP", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let old =
        TestCluster::start(ClusterOptions { nodes: 3, shards: 4, env: s3_env.clone(), ..Default::default() }).await?;
    let paths: Vec<String> = (0..60).map(|i| format!("bk/k{i}")).collect();
    for (i, path) in paths.iter().enumerate() {
        old.assert_value((i % 3) as u64 + 1, path, json!(i)).await?;
    }
    let store = "s3://stemedb-backups/prod/cluster-a";
    let done = backup(&old, 3, store).await?;
    assert_eq!(done["state"], json!("succeeded"), "{done}");
    let (ok, report, stderr) = backup_cli(&["verify", "--from", store, "--json"], &s3_env)?;
    assert!(ok, "{report} {stderr}");
    assert_eq!(serde_json::from_str::<Value>(&report)?["ok"], json!(true));
    let new = TestCluster::start(ClusterOptions {
        nodes: 3,
        shards: 4,
        env: s3_env.clone(),
        prepare: Some(restore_hook(store.to_string(), s3_env.clone())),
        ..Default::default()
    })
    .await?;
    assert_all_present(&new, &paths).await?;
    Ok(())
}

/// Transport messages name their cluster: a node refuses one from another cluster (a node of
/// the cluster a backup was taken from, say), and serves its own cluster's and unnamed ones. A
/// node refuses to copy replicas into a directory the coordinator's marker is not in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_refuse_messages_from_another_cluster() -> anyhow::Result<()> {
    use stemedb::error::ErrorCode;
    use stemedb::raft::network::PeerChannels;
    let cluster = TestCluster::start(ClusterOptions { nodes: 1, shards: 1, ..Default::default() }).await?;
    let (_, health) = cluster.admin_get(1, "/cluster/health").await?;
    let ours = health["cluster_id"].as_str().unwrap_or_default().to_string();
    let addr = format!("127.0.0.1:{}", cluster.node(1).raft_port);
    let heartbeat = || stemedb_proto::raft::Heartbeat { from: 99, ..Default::default() };
    for (name, id) in [("ours", Some(ours.clone())), ("unnamed", None)] {
        let mut client = PeerChannels::new(Default::default(), id).client(&addr)?;
        let answer = client.node_heartbeat(heartbeat()).await;
        assert!(answer.is_ok(), "{name}: {answer:?}");
    }
    let mut stranger = PeerChannels::new(Default::default(), Some("0123456789abcdef".into())).client(&addr)?;
    let refused = stranger.node_heartbeat(heartbeat()).await.expect_err("another cluster");
    assert_eq!(ErrorCode::of_status(&refused), Some(ErrorCode::WrongCluster), "{refused:?}");
    let counted = cluster.metric(1, "stemedb_transport_wrong_cluster_total").await?;
    assert_eq!(counted, Some(1.0));

    // A peer asked to copy into a directory where it does not see the backup's pending marker
    // (a directory that is not shared between the nodes) refuses, and copies nothing there.
    let elsewhere = tempfile::tempdir()?;
    let mut backups = stemedb_proto::raft::backup_client::BackupClient::connect(format!("http://{addr}")).await?;
    let request = stemedb_proto::raft::CopyReplicasRequest {
        backup_id: "20261204T000000Z-0001".into(),
        destination: elsewhere.path().to_string_lossy().to_string(),
        shards: vec![0],
        compress: true,
    };
    let refused = backups.copy_replicas(request).await.expect_err("no pending marker there");
    assert_eq!(ErrorCode::of_status(&refused), Some(ErrorCode::BackupDestinationInvalid), "{refused:?}");
    assert!(std::fs::read_dir(elsewhere.path())?.next().is_none(), "the refused copy wrote into the directory");
    Ok(())
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Sums a series over the running nodes of `cluster`.
async fn metric_sum(cluster: &TestCluster, series: &str) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for id in cluster.running() {
        sum += cluster.metric(id, series).await?.unwrap_or(0.0);
    }
    Ok(sum)
}

/// Waits until every leader has archived what it applied: no node reports entries to archive,
/// twice, with more than an archive interval between the two polls (so a whole round ran).
async fn wait_archived(cluster: &TestCluster, interval: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut caught_up_once = false;
    loop {
        let lag = metric_sum(cluster, "stemedb_backup_archive_lag_entries").await?;
        if lag == 0.0 && caught_up_once {
            return Ok(());
        }
        caught_up_once = lag == 0.0;
        anyhow::ensure!(Instant::now() < deadline, "the archive still lags by {lag} entries");
        tokio::time::sleep(interval * 3).await;
    }
}

/// With archival on, a restore replays the archived log past the backup: to `--as-of` (every
/// write acknowledged before it back, none sent after it), and, once the old cluster is gone,
/// to the archive's end (every acknowledged write back, each once). Fails without archival
/// (writes after the backup are missing) or without the as-of cut (later writes appear).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_log_restores_past_the_backup_and_as_of_a_time() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store").to_string_lossy().to_string();
    std::fs::create_dir_all(&store)?;
    let interval = Duration::from_millis(200);
    let env = vec![
        ("STEMEDB_BACKUP_DESTINATION".to_string(), store.clone()),
        ("STEMEDB_BACKUP_ARCHIVE_ENABLED".to_string(), "true".to_string()),
        ("STEMEDB_BACKUP_ARCHIVE_INTERVAL_MS".to_string(), interval.as_millis().to_string()),
        // Snapshots and purges often, so the purge floor is exercised.
        ("STEMEDB_RAFT_SNAPSHOT_LOGS_SINCE_LAST".to_string(), "40".to_string()),
        ("STEMEDB_RAFT_LOGS_TO_KEEP_AFTER_SNAPSHOT".to_string(), "5".to_string()),
    ];
    let mut old = TestCluster::start(ClusterOptions { nodes: 3, shards: 4, env, ..Default::default() }).await?;
    // (path, sent, acknowledged), times in µs since the epoch.
    let mut writes: Vec<(String, u64, u64)> = Vec::new();
    let ids: Vec<u64> = old.nodes.keys().copied().collect();
    let write = |i: usize| {
        let (client, api) = (old.client.clone(), old.node(ids[i % ids.len()]).api());
        async move {
            let path = format!("bk/k{i}");
            let body = json!({"concept_path": path, "predicate": "v", "value": i, "agent_id": "writer", "request_id": format!("a{i}")});
            let sent = unix_us();
            let response = client.post(format!("{api}/v1/assert")).json(&body).send().await?;
            anyhow::ensure!(response.status().as_u16() == 201, "write {i}: {}", response.status());
            Ok::<_, anyhow::Error>((path, sent, unix_us()))
        }
    };
    for i in 0..60 {
        writes.push(write(i).await?);
    }
    let backed_up = backup(&old, 1, &store).await?;
    assert_eq!(backed_up["state"], json!("succeeded"), "{backed_up}");
    for i in 60..180 {
        writes.push(write(i).await?);
    }
    let cut = unix_us();
    for i in 180..260 {
        writes.push(write(i).await?);
    }
    wait_archived(&old, interval).await?;
    let segments = metric_sum(&old, "stemedb_backup_archive_segments_total{result=\"uploaded\"}").await?;
    assert!(segments > 0.0, "no segment was archived");
    let (ok, report, stderr) = backup_cli(&["verify", "--from", &store, "--json"], &[])?;
    assert!(ok, "{report} {stderr}");
    let report: Value = serde_json::from_str(&report)?;
    assert!(report["log_segments"].as_u64() > Some(0), "verify read no segment: {report}");

    // As of `cut`, while the old cluster still runs (the archive may grow meanwhile).
    let as_of = format!("{}", cut as f64 / 1e6);
    let past = TestCluster::start(ClusterOptions {
        nodes: 3,
        shards: 4,
        prepare: Some(restore_hook_with(store.clone(), Vec::new(), vec!["--as-of".into(), as_of])),
        ..Default::default()
    })
    .await?;
    let before: Vec<String> = writes.iter().filter(|(_, _, acked)| *acked <= cut).map(|(p, _, _)| p.clone()).collect();
    let after: Vec<&String> = writes.iter().filter(|(_, sent, _)| *sent > cut).map(|(p, _, _)| p).collect();
    assert!(before.len() >= 180 && after.len() >= 80, "{} before, {} after", before.len(), after.len());
    assert_all_present(&past, &before).await?;
    // The three nodes replayed the same entries: the first one's plan, which the others read.
    let plans = std::fs::read_dir(dir.path().join("store/restores"))?.count();
    assert_eq!(plans, 1, "one restore plan for the new cluster");
    for path in after.iter().step_by(7) {
        let (status, value) = past.read_value(1, path, "linearizable").await?;
        assert_eq!((status, value), (200, Value::Null), "{path} was written after --as-of");
    }
    drop(past);

    // The old cluster is lost; the whole archive is replayed.
    for id in ids.clone() {
        old.kill(id);
    }
    let latest = TestCluster::start(ClusterOptions {
        nodes: 3,
        shards: 4,
        prepare: Some(restore_hook(store.clone(), Vec::new())),
        ..Default::default()
    })
    .await?;
    let all: Vec<String> = writes.iter().map(|(p, _, _)| p.clone()).collect();
    assert_all_present(&latest, &all).await?;
    for path in all.iter().step_by(20) {
        let (status, body) = latest.post(2, "/v1/query", &json!({"concept_path": path, "lens": "history"})).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][0]["assertions"].as_array().map(Vec::len), Some(1), "{path}: {body}");
    }
    latest.assert_value(3, "bk/after-restore", json!("new")).await?;

    // One flipped byte in an archived segment: verify names it, a restore refuses it.
    let mut segments = Vec::new();
    let mut dirs = vec![dir.path().join("store/archive")];
    while let Some(next) = dirs.pop() {
        for entry in std::fs::read_dir(next)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "seg") && !path.to_string_lossy().contains("/65535/") {
                segments.push(path);
            }
        }
    }
    segments.sort();
    let victim = segments.last().ok_or_else(|| anyhow::anyhow!("no archived segment"))?.clone();
    let mut bytes = std::fs::read(&victim)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&victim, bytes)?;
    let name = victim.strip_prefix(dir.path().join("store"))?.to_string_lossy().to_string();
    let (ok, report, _) = backup_cli(&["verify", "--from", &store], &[])?;
    assert!(!ok, "verify passed a damaged segment: {report}");
    assert!(report.contains(&name) && report.contains("DAMAGED"), "{name} not named: {report}");
    let target = dir.path().join("refused");
    let target = target.to_string_lossy().to_string();
    let (ok, out, err) = backup_cli(
        &["restore", "--from", &store, "--data-dir", &target, "--node-id", "1", "--raft-addr", "127.0.0.1:1"],
        &[],
    )?;
    assert!(!ok && err.contains(&name), "restore did not refuse the damaged segment: {out} {err}");

    // A segment missing in the middle of a shard's archived log: verify names the gap.
    let first_shard: Vec<&PathBuf> = segments.iter().filter(|p| p.to_string_lossy().contains("/00000/")).collect();
    assert!(
        first_shard.len() >= 3,
        "shard 0 has {} segments; the writes span many archive intervals",
        first_shard.len()
    );
    std::fs::remove_file(first_shard[first_shard.len() - 2])?;
    let (ok, report, _) = backup_cli(&["verify", "--from", &store], &[])?;
    assert!(!ok && report.contains("misses entries"), "verify did not name the gap: {report}");
    Ok(())
}
