//! The disk-space floor (issue 20 §4): below `storage.min_free_bytes` a node refuses writes
//! with `507 insufficient_storage`, keeps serving reads and admin, and takes writes again by
//! itself once space is freed, losing nothing. Past the floor, a node whose disk fills up stops
//! itself with an error instead of staying half alive (found by the chaos harness's `disk`
//! scenario: a Raft group that hit the storage error stopped, while the node kept running and
//! claiming leadership of it), and recovers on restart once space is free. Both need root to
//! mount a small filesystem; without it each test says so and passes.

use std::time::{Duration, Instant};

use serde_json::json;
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_stops_the_node_and_restart_recovers() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let disk = root.path().join("node1");
    std::fs::create_dir_all(&disk)?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&disk)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small filesystem here (needs root)");
        return Ok(());
    }
    let outcome = async {
        // The floor off: this test is about what happens past it.
        let env = [("STEMEDB_STORAGE_MIN_FREE_BYTES", "0"), ("STEMEDB_STORAGE_MIN_FREE_PERCENT", "0")];
        let options = ClusterOptions {
            nodes: 3,
            shards: 2,
            data_root: Some(root.path().to_path_buf()),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        let mut cluster = TestCluster::start(options).await?;
        cluster.assert_value(2, "disk/before", json!(1)).await?;
        // Fill node 1's disk, then keep writing until node 1 notices and stops.
        let ballast = disk.join("ballast");
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&ballast)?;
            let chunk = vec![0u8; 1 << 20];
            while file.write_all(&chunk).is_ok() {}
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0;
        while !cluster.reap().contains(&1) {
            anyhow::ensure!(Instant::now() < deadline, "node 1 kept running on a full disk");
            i += 1;
            let _ = cluster.assert_once(2, &format!("disk/during{i}"), json!(i)).await;
        }
        let log = std::fs::read_to_string(root.path().join("node1.log"))?;
        assert!(log.contains("stopping the node"), "node 1's log says why it stopped");
        // The other two keep serving.
        cluster.assert_value(2, "disk/while-down", json!(2)).await?;
        // Space freed: node 1 restarts, catches up and serves.
        std::fs::remove_file(&ballast)?;
        cluster.restart(1).await?;
        cluster.assert_value(1, "disk/after", json!(3)).await?;
        for key in ["disk/before", "disk/while-down", "disk/after"] {
            let (status, _) = cluster.read_value(1, key, "linearizable").await?;
            assert_eq!(status, 200, "{key}");
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = std::process::Command::new("umount").arg(&disk).status();
    outcome
}

/// Mounts a tmpfs of `size` at `dir`; false where this is not allowed (not root).
fn mount_tmpfs(dir: &std::path::Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).is_ok()
        && std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Bytes free on the filesystem of `dir`, as `df` reports them.
fn free_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output()?;
    let text = String::from_utf8(out.stdout)?;
    let line = text.lines().nth(1).ok_or_else(|| anyhow::anyhow!("df printed {text:?}"))?;
    Ok(line.trim().parse()?)
}

const FLOOR: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_disk_floor_writes_are_refused_reads_go_on_and_writes_resume() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let disk = root.path().join("node1");
    if !mount_tmpfs(&disk, "256m") {
        eprintln!("skipped: cannot mount a small filesystem here (needs root)");
        return Ok(());
    }
    let outcome = async {
        let env =
            [("STEMEDB_STORAGE_MIN_FREE_BYTES", FLOOR.to_string()), ("STEMEDB_STORAGE_MIN_FREE_PERCENT", "0".into())];
        let options = ClusterOptions {
            nodes: 3,
            shards: 2,
            data_root: Some(root.path().to_path_buf()),
            env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            ..Default::default()
        };
        let cluster = TestCluster::start(options).await?;
        cluster.wait_all_leaders(Duration::from_secs(20)).await?;
        // Node 1 leads shard 0 (so a write through another node meets node 1 as the leader).
        let path_on_0 =
            (0..).map(|i| format!("floor/led-by-1/{i}")).find(|p| cluster.shard_of(p) == 0).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.leader_seen_by(1, 0).await != Some(1) {
            anyhow::ensure!(Instant::now() < deadline, "node 1 never took the leadership of shard 0");
            let leader = cluster.wait_for_leader(0, Duration::from_secs(10)).await?;
            if leader != 1 {
                let _ = cluster
                    .client
                    .post(format!("{}/admin/shards/0/transfer-leader", cluster.node(leader).admin()))
                    .json(&json!({"target_node": 1}))
                    .send()
                    .await?;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut acknowledged = Vec::new();
        for i in 0..10 {
            let path = format!("floor/before/{i}");
            cluster.assert_value(1 + i % 3, &path, json!(i)).await?;
            acknowledged.push((path, json!(i)));
        }
        assert_eq!(cluster.metric(1, "stemedb_storage_below_disk_floor").await?, Some(0.0));
        assert_eq!(cluster.metric(1, "stemedb_storage_disk_floor_bytes").await?, Some(FLOOR as f64));

        // Leave half the floor free on node 1's disk.
        let ballast = disk.join("ballast");
        let fill = free_bytes(&disk)?.saturating_sub(FLOOR / 2);
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&ballast)?;
            let chunk = vec![0u8; 1 << 20];
            let mut written = 0u64;
            while written < fill {
                let n = chunk.len().min((fill - written) as usize);
                file.write_all(&chunk[..n])?;
                written += n as u64;
            }
            file.sync_all()?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.metric(1, "stemedb_storage_below_disk_floor").await? != Some(1.0) {
            anyhow::ensure!(Instant::now() < deadline, "node 1 never reported being below its floor");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // A write through node 1 is refused with 507, the floor named, and Retry-After.
        let response = cluster
            .client
            .post(format!("{}/v1/assert", cluster.node(1).api()))
            .json(&json!({"concept_path": "floor/during/1", "predicate": "p", "value": 1, "agent_id": "test"}))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 507);
        assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("30"));
        let body: serde_json::Value = response.json().await?;
        assert_eq!(body["error"]["code"], json!("insufficient_storage"), "{body}");
        assert_eq!(body["error"]["details"]["node"], json!(1), "{body}");
        assert_eq!(body["error"]["details"]["floor_bytes"], json!(FLOOR), "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("storage.min_free_bytes") && message.contains("64.0 MiB"), "{message}");
        // A batch's items too (items are independent: each carries its own status).
        let item = json!({"concept_path": "floor/during/2", "predicate": "p", "value": 2, "agent_id": "test"});
        let (status, body) = cluster.post(1, "/v1/assert/batch", &json!({"assertions": [item]})).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][0]["status"], json!(507), "{body}");
        assert_eq!(body["results"][0]["error"]["code"], json!("insufficient_storage"), "{body}");
        // Through node 2, a write to the shard node 1 leads: refused by the leader.
        let (status, body) = cluster.assert_once(2, &path_on_0, json!(1)).await?;
        assert_eq!((status, body["error"]["code"].clone()), (507, json!("insufficient_storage")), "{body}");
        assert_eq!(body["error"]["details"]["node"], json!(1), "the leader named itself: {body}");
        // Through node 2, a write to the shard node 2 or 3 leads: node 1 is only a follower.
        let path_on_1 =
            (0..).map(|i| format!("floor/elsewhere/{i}")).find(|p| cluster.shard_of(p) == 1).unwrap_or_default();
        if cluster.leader_seen_by(2, 1).await != Some(1) {
            cluster.assert_value(2, &path_on_1, json!("follower")).await?;
            acknowledged.push((path_on_1.clone(), json!("follower")));
        }
        // Reads go on through node 1, both kinds.
        for (path, value) in &acknowledged {
            for consistency in ["linearizable", "stale"] {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let (status, read) = cluster.read_value(1, path, consistency).await?;
                    if status == 200 && &read == value {
                        break;
                    }
                    anyhow::ensure!(Instant::now() < deadline, "{path} {consistency}: {status} {read}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Admin goes on: storage statistics, and a compaction (which gives space back).
        let (status, _) = cluster.get(1, "/v1/admin/storage/stats").await?;
        assert_eq!(status, 200);
        assert!(cluster.metric(1, "stemedb_storage_floor_refused_writes_total").await?.unwrap_or(0.0) >= 3.0);

        // Space freed: writes through node 1 resume by themselves.
        std::fs::remove_file(&ballast)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut i = 0;
        loop {
            i += 1;
            let (status, body) = cluster.assert_once(1, &format!("floor/after/{i}"), json!(i)).await?;
            if status == 201 {
                acknowledged.push((format!("floor/after/{i}"), json!(i)));
                break;
            }
            assert_eq!(status, 507, "only the floor refuses: {body}");
            anyhow::ensure!(Instant::now() < deadline, "writes never resumed after space was freed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(cluster.metric(1, "stemedb_storage_below_disk_floor").await?, Some(0.0));
        cluster.assert_value(2, &path_on_0, json!(2)).await?;
        acknowledged.push((path_on_0.clone(), json!(2)));
        // Nothing lost, nothing refused appeared.
        for (path, value) in &acknowledged {
            let (status, read) = cluster.read_value(3, path, "linearizable").await?;
            assert_eq!((status, &read), (200, value), "{path}");
        }
        for refused in ["floor/during/1", "floor/during/2"] {
            let (status, body) = cluster.post(1, "/v1/query", &json!({"concept_path": refused})).await?;
            assert_eq!(status, 200);
            assert_eq!(body["results"].as_array().map_or(0, |r| r.len()), 0, "a refused write left nothing: {body}");
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = std::process::Command::new("umount").arg(&disk).status();
    outcome
}
