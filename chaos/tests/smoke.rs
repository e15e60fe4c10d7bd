//! The harness in the default test run: a short `smoke` scenario must pass, and the same
//! harness must fail when a bug is planted in the nodes (linearizable reads served from a
//! follower's local state), or a passing run would prove nothing.
//!
//! Catching the planted bug does not depend on timing: faults come in rounds (each of the
//! scenario's kinds once, shuffled, before any repeats), so 40 s always include a
//! `partition-leader` or `majority-minority` fault, and each of those runs the stale-read probe
//! (write through the node about to be cut off, cut it off, write through the majority, read
//! through the cut-off node), after which a read that skips the barrier cannot help being
//! stale.

use std::path::PathBuf;
use std::process::Command;

fn chaos() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stemedb-chaos"));
    // Built from the current code first: cargo builds stemedb-chaos for this test, not stemedb.
    let stemedb = stemedb_cluster_tests::stemedb_binary().expect("the stemedb binary");
    command.arg("run").arg("--stemedb").arg(stemedb);
    command
}

fn report(path: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(path).expect("report written");
    serde_json::from_slice(&bytes).expect("report is JSON")
}

/// Runs the `smoke` scenario with `args` into a fresh directory named `name`; asserts that it
/// passed with faults injected and with enough register writes and reads, and returns its
/// report for further checks.
fn passing_smoke_run(name: &str, args: &[&str]) -> serde_json::Value {
    let dir = tempfile_dir(name);
    let report_path = dir.join("report.json");
    let status = chaos()
        .args(["--scenario", "smoke", "--shards", "4"])
        .args(args)
        .arg("--report")
        .arg(&report_path)
        .status()
        .expect("run stemedb-chaos");
    let report = report(&report_path);
    assert!(status.success(), "anomalies: {}", report["anomalies"]);
    assert!(report["faults"].as_array().is_some_and(|f| !f.is_empty()), "no fault was injected");
    assert!(report["register_ops"]["writes_ok"].as_u64().unwrap_or(0) > 50, "{}", report["register_ops"]);
    assert!(report["register_ops"]["reads_ok"].as_u64().unwrap_or(0) > 50, "{}", report["register_ops"]);
    let _ = std::fs::remove_dir_all(dir);
    report
}

#[test]
fn smoke_scenario_passes() {
    let report = passing_smoke_run("smoke", &["--duration", "40", "--seed", "42"]);
    assert!(report["unkeyed"]["acknowledged"].as_u64().unwrap_or(0) > 50, "{}", report["unkeyed"]);
    assert_eq!(report["unkeyed"]["duplicates"].as_u64(), Some(0), "{}", report["unkeyed"]);
}

/// Issue 20: the same smoke run with the transport on mutual TLS (faults cut and restore links
/// and kill nodes, so connections are made again and again through handshakes).
#[test]
fn smoke_scenario_passes_with_mutual_tls() {
    passing_smoke_run("smoke-tls", &["--duration", "30", "--seed", "43", "--mutual-tls"]);
}

#[test]
fn planted_stale_read_bug_is_caught() {
    let dir = tempfile_dir("planted");
    let report_path = dir.join("report.json");
    // The unkeyed set has nothing to do with this bug: left out to spare the machine.
    let status = chaos()
        .args(["--scenario", "smoke", "--duration", "40", "--seed", "7", "--shards", "4"])
        .args(["--unkeyed-clients", "0", "--plant-bug", "stale-reads"])
        .arg("--report")
        .arg(&report_path)
        .status()
        .expect("run stemedb-chaos");
    let report = report(&report_path);
    assert!(!status.success(), "the planted bug went unnoticed: {}", report["register_keys"]);
    let kinds: Vec<&str> =
        report["anomalies"].as_array().into_iter().flatten().filter_map(|a| a["kind"].as_str()).collect();
    assert!(kinds.iter().any(|k| *k == "not_linearizable" || *k == "stale_read"), "{kinds:?}");
    // Not luck: a probe set the trap and the checkers (not the probe) caught it on its key.
    let probes = report["probes"].as_array().cloned().unwrap_or_default();
    let stale_probe = probes.iter().find(|p| p["result"] == "stale");
    let key =
        stale_probe.and_then(|p| p["key"].as_str()).unwrap_or_else(|| panic!("no probe saw a stale read: {probes:?}"));
    assert_eq!(report["register_keys"][key]["verdict"], "not_linearizable", "{}", report["register_keys"]);
    let stale_reads = report["stale_reads"].as_array().cloned().unwrap_or_default();
    assert!(stale_reads.iter().any(|s| s["key"] == key), "the stale-read detector missed {key}: {stale_reads:?}");
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stemedb-chaos-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
