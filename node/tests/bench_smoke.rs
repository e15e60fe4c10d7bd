//! The short version of the benchmarks in the default test run: `stemedb bench` against a real
//! node, writes and then the authority-lens setup and reads, closed and open loop, must complete
//! without errors.
//! Figures are printed, never asserted (docs/performance.md has the real runs).

mod common;

use std::process::Command;

use common::ProcessNode;
use serde_json::Value;

fn bench(url: &str, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_stemedb"))
        .args(["bench", "--url", url, "--json", "--duration", "2"])
        .args(args)
        .output()
        .expect("run stemedb bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stemedb bench failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let start = stdout.find('{').expect("a JSON report");
    serde_json::from_str(&stdout[start..]).expect("a JSON report")
}

fn side<'a>(report: &'a Value, name: &str) -> &'a Value {
    let results = report["results"].as_array().expect("results");
    results.iter().find(|side| side["name"] == name).unwrap_or_else(|| panic!("no {name} side: {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_writes_and_authority_reads_complete_without_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start(dir.path()).await;

    let writes = bench(&node.url, &["--writers", "4", "--readers", "0", "--keys", "50", "--prefix", "smoke-w"]);
    let write = side(&writes, "write");
    println!("write smoke: {write}");
    assert!(write["ops"].as_u64().unwrap_or(0) > 0, "{writes}");
    assert_eq!(write["errors"], serde_json::json!({}), "{writes}");

    let reads = bench(
        &node.url,
        &[
            "--writers",
            "0",
            "--readers",
            "8",
            "--lens",
            "authority",
            "--authority-grants",
            "40",
            "--authority-depth",
            "4",
            "--preload",
            "--keys",
            "30",
            "--prefix",
            "smoke-a",
        ],
    );
    let read = side(&reads, "read");
    println!("authority read smoke: {read}");
    assert!(read["ops"].as_u64().unwrap_or(0) > 0, "{reads}");
    assert_eq!(read["errors"], serde_json::json!({}), "{reads}");
    let (p50, p99) = (read["p50_ms"].as_f64().unwrap_or(0.0), read["p99_ms"].as_f64().unwrap_or(0.0));
    assert!(p50 > 0.0 && p99 >= p50, "percentiles are measured: {read}");

    // Open loop: 4 clients sharing 200 requests/s for 2 s send the 400 requests of their
    // schedule, no more (a closed loop would send thousands) and no fewer.
    let paced =
        bench(&node.url, &["--writers", "0", "--readers", "4", "--rate", "200", "--keys", "30", "--prefix", "smoke-a"]);
    let read = side(&paced, "read");
    println!("open-loop read smoke: {read}");
    // A client held up at the very end (a busy CI machine) leaves its last requests unsent;
    // they are counted, not lost.
    let unsent = read["errors"]["unsent_at_deadline"].as_u64().unwrap_or(0);
    let other_errors = read["errors"].as_object().map_or(0, |e| e.len()) - usize::from(unsent > 0);
    assert_eq!(other_errors, 0, "{paced}");
    let scheduled = read["ops"].as_u64().unwrap_or(0) + unsent;
    assert!((396..=404).contains(&scheduled), "the schedule's 400 requests: {paced}");
    assert_eq!(paced["rate"], serde_json::json!(200.0), "{paced}");
    drop(node);
}
