//! A node whose disk fills up stops itself with an error instead of staying half alive (found by
//! the chaos harness's `disk` scenario: a Raft group that hit the storage error stopped, while
//! the node kept running and claiming leadership of it), and recovers on restart once space is
//! free. Needs root to mount a small filesystem; without it the test says so and passes.

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
        let options =
            ClusterOptions { nodes: 3, shards: 2, data_root: Some(root.path().to_path_buf()), ..Default::default() };
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
