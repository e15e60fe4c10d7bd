//! The `rot` fault in the default test run (issue 16 §7): bit rot in a stopped node's table files
//! (bytes flipped in every file, a run of blocks zeroed) must never keep it from starting; it
//! sets the damaged files aside, its peers re-seed the replicas that had keys in them, and the
//! run's checkers find every acknowledged write, linearizable histories and equal replicas.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn rotten_table_files_are_set_aside_and_their_replicas_re_seeded() {
    let dir = std::env::temp_dir().join(format!("stemedb-chaos-test-rot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let report_path: PathBuf = dir.join("report.json");
    let stemedb = stemedb_cluster_tests::stemedb_binary().expect("the stemedb binary");
    let status = Command::new(env!("CARGO_BIN_EXE_stemedb-chaos"))
        .arg("run")
        .arg("--stemedb")
        .arg(stemedb)
        .args(["--scenario", "rot", "--duration", "30", "--seed", "11", "--shards", "2"])
        .args(["--unkeyed-clients", "0"])
        .arg("--report")
        .arg(&report_path)
        .status()
        .expect("run stemedb-chaos");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report written")).expect("JSON");
    let _ = std::fs::remove_dir_all(dir);
    let rotted = report["faults"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["detail"].as_str().is_some_and(|d| d.starts_with("rotted")))
        .count();
    assert!(rotted >= 1, "no table file was rotted: {}", report["faults"]);
    assert!(status.success(), "anomalies: {}", report["anomalies"]);
    assert!(report["replicas"]["shards_checked"].as_u64().unwrap_or(0) >= 2, "{}", report["replicas"]);
}
