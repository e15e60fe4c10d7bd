//! The short disaster-recovery drill of the default test run: a backup taken while 8 clients
//! write, every node's data destroyed, a new cluster restored from the backup. Every write
//! acknowledged before the backup must come back, none twice, with each shard's digest equal to
//! the manifest's; the report gives the RPO and RTO.

use std::process::Command;

#[test]
fn dr_drill_restores_every_write_acknowledged_before_the_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let stemedb = stemedb_cluster_tests::stemedb_binary().expect("the stemedb binary");
    let status = Command::new(env!("CARGO_BIN_EXE_stemedb-chaos"))
        .args(["dr-drill", "--duration", "12", "--shards", "4", "--seed", "5", "--clients", "6"])
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
    assert!(status.success(), "anomalies: {}", report["anomalies"]);
    assert!(report["acknowledged_before_backup"].as_u64().unwrap_or(0) > 50, "{report}");
    assert_eq!(report["missing_before_backup"], serde_json::json!(0), "{report}");
    assert_eq!(report["duplicates"], serde_json::json!(0), "{report}");
    assert_eq!(report["digests_matching"], serde_json::json!(4), "{report}");
    assert!(
        report["missing_after_backup"].as_u64().unwrap_or(0) > 0,
        "writes after the backup cannot come back: {report}"
    );
    assert!(report["rto_seconds"].as_f64().is_some_and(|s| s > 0.0), "{report}");
    assert_ne!(report["old_cluster_id"], report["new_cluster_id"], "{report}");
}
