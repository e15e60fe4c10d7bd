//! The short version of the benchmarks in the default test run: `stemedb bench` against a real
//! node, writes and then the authority-lens setup and reads, closed and open loop, must complete
//! without errors.
//! Figures are printed, never asserted (docs/performance.md has the real runs); what is asserted
//! does not depend on the machine's speed.

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

    // Open loop: 4 clients sharing 200 requests/s for 2 s have 400 requests due (each client one
    // every 20 ms, starting 0, 5, 10 and 15 ms in: 100 each before the deadline), whatever the
    // speed of the machine. A request is either sent (then answered, or counted as an error) or,
    // when its client is still waiting at the deadline for an earlier answer, counted as
    // `unsent_at_deadline`: the two add up to the schedule exactly. A closed loop would send
    // thousands.
    let paced =
        bench(&node.url, &["--writers", "0", "--readers", "4", "--rate", "200", "--keys", "30", "--prefix", "smoke-a"]);
    let read = side(&paced, "read");
    println!("open-loop read smoke: {read}");
    let errors = read["errors"].as_object().expect("errors by kind");
    let unsent = errors.get("unsent_at_deadline").map_or(0, |n| n.as_u64().expect("a count"));
    assert!(errors.keys().all(|kind| kind == "unsent_at_deadline"), "{paced}");
    let scheduled = read["ops"].as_u64().expect("ops") + unsent;
    assert_eq!(scheduled, 400, "sent + unsent is the schedule's 400 requests: {paced}");
    assert_eq!(paced["rate"], serde_json::json!(200.0), "{paced}");
    drop(node);
}
