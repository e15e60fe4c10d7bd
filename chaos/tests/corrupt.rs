//! The `corrupt` fault in the default test run: a stopped node's replica damaged (a record
//! changed, another deleted) must be found and repaired by anti-entropy by itself, so the run's
//! replica check finds every replica equal; with anti-entropy off (`--plant-bug
//! no-anti-entropy`) the same damage must fail the run, or passing would prove nothing.

use std::path::PathBuf;
use std::process::Command;

fn chaos() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stemedb-chaos"));
    let stemedb = stemedb_cluster_tests::stemedb_binary().expect("the stemedb binary");
    command.arg("run").arg("--stemedb").arg(stemedb);
    command
}

fn run(name: &str, extra: &[&str]) -> (bool, serde_json::Value) {
    let dir = std::env::temp_dir().join(format!("stemedb-chaos-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let report_path: PathBuf = dir.join("report.json");
    let status = chaos()
        .args(["--scenario", "corrupt", "--duration", "30", "--seed", "11", "--shards", "2"])
        .args(["--unkeyed-clients", "0"])
        .args(extra)
        .arg("--report")
        .arg(&report_path)
        .status()
        .expect("run stemedb-chaos");
    let report = serde_json::from_slice(&std::fs::read(&report_path).expect("report written")).expect("JSON");
    let _ = std::fs::remove_dir_all(dir);
    (status.success(), report)
}

fn damaged(report: &serde_json::Value) -> usize {
    report["faults"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["detail"].as_str().is_some_and(|d| d.starts_with("changed one and deleted one")))
        .count()
}

#[test]
fn damaged_replicas_are_repaired_by_anti_entropy() {
    let (passed, report) = run("corrupt", &[]);
    assert!(damaged(&report) >= 1, "no replica was damaged: {}", report["faults"]);
    assert!(passed, "anomalies: {}", report["anomalies"]);
    assert!(report["replicas"]["shards_checked"].as_u64().unwrap_or(0) >= 2, "{}", report["replicas"]);
}

#[test]
fn damage_without_anti_entropy_fails_the_run() {
    let (passed, report) = run("corrupt-planted", &["--plant-bug", "no-anti-entropy"]);
    assert!(damaged(&report) >= 1, "no replica was damaged: {}", report["faults"]);
    assert!(!passed, "damaged replicas went unnoticed without anti-entropy: {}", report["replicas"]);
    let kinds: Vec<&str> =
        report["anomalies"].as_array().into_iter().flatten().filter_map(|a| a["kind"].as_str()).collect();
    assert!(kinds.contains(&"replicas_diverged"), "{kinds:?}");
}
