//! The short disaster-recovery drills of the default test run: a backup taken while clients
//! write, every node's data destroyed, a new cluster restored from the backup, with continuous
//! log archival (the writes after the backup come back from the archived log, the restored
//! replicas agree) and without (each shard's digest equals the manifest's). Every write
//! acknowledged before the backup must come back, none twice; the report gives the RPO and RTO.

use std::process::Command;

/// One drill at a time: each runs two 3-node clusters, and the suite runs tests two at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn drill(extra: &[&str]) -> (std::process::ExitStatus, serde_json::Value) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let stemedb = stemedb_cluster_tests::stemedb_binary().expect("the stemedb binary");
    let status = Command::new(env!("CARGO_BIN_EXE_stemedb-chaos"))
        .args(["dr-drill", "--duration", "12", "--shards", "4", "--seed", "5", "--clients", "6"])
        .args(extra)
        .arg("--stemedb")
        .arg(stemedb)
        .arg("--data-dir")
        .arg(dir.path().join("drill"))
        .arg("--report")
        .arg(&report_path)
        .status()
        .expect("run stemedb-chaos dr-drill");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report written")).expect("report is JSON");
    (status, report)
}

/// What every drill must show: no anomaly, every write acknowledged before the backup back,
/// none twice, all four shards checked, a new cluster id, an RTO measured.
fn assert_recovered(status: std::process::ExitStatus, report: &serde_json::Value) {
    assert!(status.success(), "anomalies: {}", report["anomalies"]);
    assert!(report["acknowledged_before_backup"].as_u64().unwrap_or(0) > 50, "{report}");
    assert_eq!(report["missing_before_backup"], serde_json::json!(0), "{report}");
    assert_eq!(report["duplicates"], serde_json::json!(0), "{report}");
    assert_eq!(report["digests_matching"], serde_json::json!(4), "{report}");
    assert!(report["rto_seconds"].as_f64().is_some_and(|s| s > 0.0), "{report}");
    assert_ne!(report["old_cluster_id"], report["new_cluster_id"], "{report}");
}

#[test]
fn dr_drill_with_log_archival_restores_writes_after_the_backup() {
    let (status, report) = drill(&["--archive-interval-ms", "500"]);
    assert_recovered(status, &report);
    assert!(
        report["restored_after_backup"].as_u64().unwrap_or(0) > 0,
        "no write after the backup came back from the archived log: {report}"
    );
}

#[test]
fn dr_drill_restores_every_write_acknowledged_before_the_backup() {
    let (status, report) = drill(&["--no-archive"]);
    assert_recovered(status, &report);
    assert!(
        report["missing_after_backup"].as_u64().unwrap_or(0) > 0,
        "writes after the backup cannot come back: {report}"
    );
}
