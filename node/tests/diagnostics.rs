//! The node's diagnostics as the memory runbook uses them: heap profiles taken, listed and
//! downloaded from a running `stemedb` binary, and the allocator, block-cache and compaction
//! metrics.

mod common;

use common::{get_json, metrics_text, post_json, series_value, ProcessNode, TestNode};
use serde_json::{json, Value};

async fn download(client: &reqwest::Client, url: &str) -> (u16, Vec<u8>) {
    let response = client.get(url).send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("body").to_vec())
}

/// Writes `count` assertions with `value_bytes`-long values, so the node holds memory worth
/// profiling (memtables and claims caches).
async fn write_load(client: &reqwest::Client, url: &str, count: usize, value_bytes: usize) {
    let value = "v".repeat(value_bytes);
    for i in 0..count {
        let (status, answer) = post_json(
            client,
            &format!("{url}/v1/assert"),
            &json!({"concept_path": format!("heap/k{i}"), "predicate": "p", "value": value, "agent_id": "loader"}),
        )
        .await;
        assert_eq!(status, 201, "{answer}");
        let (status, answer) =
            post_json(client, &format!("{url}/v1/query"), &json!({"concept_path": format!("heap/k{i}")})).await;
        assert_eq!(status, 200, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_profiles_are_taken_listed_and_downloaded_from_a_running_binary() {
    let dir = tempfile::tempdir().unwrap();
    // A 1 KiB sampling interval (instead of 512 KiB) makes every profile hold samples, and
    // checks that MALLOC_CONF in the node's environment reaches the allocator.
    let node = ProcessNode::start_with_env(dir.path(), &[("MALLOC_CONF", "lg_prof_sample:10")]).await;
    let client = reqwest::Client::new();
    let base = format!("{}/v1/admin/debug/heap-profile", node.url);

    let (status, answer) = get_json(&client, &base).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["available"], json!(true), "{answer}");
    assert_eq!(answer["sampling"], json!(true), "debug.heap_profiling defaults to on: {answer}");
    assert_eq!(answer["sample_interval_bytes"], json!(1024), "{answer}");
    assert_eq!(answer["profiles"], json!([]), "{answer}");
    let (status, body) = download(&client, &format!("{base}/download")).await;
    assert_eq!(status, 404);
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "no_heap_profile", "{error}");

    write_load(&client, &node.url, 100, 4096).await;
    let (status, taken) = post_json(&client, &base, &Value::Null).await;
    assert_eq!(status, 200, "{taken}");
    assert_eq!(taken["sampling_was_on"], json!(true), "{taken}");
    let name = taken["profile"]["name"].as_str().expect("profile name").to_string();
    let path = std::path::Path::new(taken["profile"]["path"].as_str().unwrap()).to_path_buf();
    assert!(path.starts_with(dir.path().join("heap-profiles")), "{taken}");
    assert_eq!(taken["download"], json!(format!("/v1/admin/debug/heap-profile/download?name={name}")));

    let (status, profile) = download(&client, &format!("{base}/download")).await;
    assert_eq!(status, 200);
    assert_eq!(profile, std::fs::read(&path).unwrap(), "the newest profile is the one just taken");
    let text = String::from_utf8_lossy(&profile);
    assert!(text.starts_with("heap_v2/1024"), "{}", &text[..text.len().min(100)]);
    assert!(text.contains("\nMAPPED_LIBRARIES:\n"), "jeprof needs the mappings to name functions");
    let stacks = text.lines().filter(|l| l.starts_with("@ 0x")).count();
    assert!(stacks > 10, "sampled stacks in the profile: {stacks}");

    // jeprof (package libjemalloc-dev) names the functions from the binary.
    if let Ok(output) =
        std::process::Command::new("jeprof").args(["--text", env!("CARGO_BIN_EXE_stemedb")]).arg(&path).output()
    {
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "jeprof failed: {}", String::from_utf8_lossy(&output.stderr));
        assert!(report.contains("Total:"), "{report}");
        assert!(report.contains("rocksdb") || report.contains("stemedb"), "{report}");
    }

    // Sampling off, then a dump switches it back on and says so.
    let (status, answer) = post_json(&client, &format!("{base}/sampling"), &json!({"enabled": false})).await;
    assert_eq!((status, &answer["sampling"]), (200, &json!(false)), "{answer}");
    let (status, taken_again) = post_json(&client, &base, &Value::Null).await;
    assert_eq!(status, 200, "{taken_again}");
    assert_eq!(taken_again["sampling_was_on"], json!(false), "{taken_again}");
    let (_, answer) = get_json(&client, &base).await;
    assert_eq!(answer["sampling"], json!(true), "{answer}");
    let listed: Vec<&str> =
        answer["profiles"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), 2, "{answer}");
    assert_eq!(listed[1], name, "newest first: {answer}");

    let (status, older) = download(&client, &format!("{base}/download?name={name}")).await;
    assert_eq!((status, older), (200, profile), "a named profile");
    for (query, code, expected) in [
        ("name=../db/CURRENT", "invalid_heap_profile_name", 400),
        ("name=heap-20200101T000000.000Z.prof", "heap_profile_not_found", 404),
        ("nmae=x", "invalid_query_string", 400),
    ] {
        let (status, body) = download(&client, &format!("{base}/download?{query}")).await;
        let error: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!((status, error["error"]["code"].as_str()), (expected, Some(code)), "{query}: {error}");
    }
    let (status, answer) = post_json(&client, &format!("{base}/sampling"), &json!({"enabled": "yes"})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("invalid_field")), "{answer}");

    // The allocator's own figures are exported next to the process RSS.
    let metrics = metrics_text(&client, &node.url).await;
    let allocated = series_value(&metrics, "stemedb_allocator_allocated_bytes").expect("allocated bytes");
    let resident = series_value(&metrics, "stemedb_allocator_resident_bytes").expect("resident bytes");
    assert!(allocated > 1e6 && resident >= allocated, "allocated {allocated}, resident {resident}");
    node.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_profile_endpoints_need_admin_rights() {
    let node = TestNode::start_with(|config| config.security.admin_token = "secret".into()).await;
    for (method, path) in [
        ("GET", "/v1/admin/debug/heap-profile"),
        ("POST", "/v1/admin/debug/heap-profile"),
        ("GET", "/v1/admin/debug/heap-profile/download"),
        ("POST", "/v1/admin/debug/heap-profile/sampling"),
    ] {
        let url = format!("{}{path}", node.url);
        let request = if method == "GET" { node.client.get(&url) } else { node.client.post(&url).body("{}") };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("admin_token_required")), "{method} {path}");
    }
    let response = node
        .client
        .post(format!("{}/v1/admin/debug/heap-profile", node.url))
        .bearer_auth("secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_storage_metrics_are_exported() {
    let node = TestNode::start().await;
    write_load(&node.client, &node.url, 20, 100).await;
    let metrics = metrics_text(&node.client, &node.url).await;
    // test_config sets storage.max_cache_size_mb = 16.
    assert_eq!(series_value(&metrics, "stemedb_cache_size_bytes"), Some((16u64 << 20) as f64));
    assert!(series_value(&metrics, "stemedb_lsm_pending_compaction_bytes").is_some(), "pending compaction");
    // Per-shard request counters: the 20 writes and 20 reads, summed over the shards.
    let per_shard = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{shard=")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(per_shard("stemedb_shard_writes_total"), 20.0, "writes per shard");
    assert_eq!(per_shard("stemedb_shard_queries_total"), 20.0, "reads per shard");
    for counter in ["stemedb_cache_hits_total", "stemedb_cache_misses_total", "stemedb_cache_evicted_bytes_total"] {
        assert!(series_value(&metrics, counter).is_some(), "{counter}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_logging_more_than_a_pipe_holds_keeps_answering() {
    // A pipe holds 64 KiB, and a node blocked writing to a full one stops answering. At trace
    // level the node logs more than that within these requests; the test harness drains its
    // output, so every request is answered (the client gives up after 10 s otherwise).
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start_with_env(dir.path(), &[("STEMEDB_LOG", "trace")]).await;
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build().expect("client");
    write_load(&client, &node.url, 200, 100).await;
    let output = node.output();
    assert!(output.len() > 60 << 10, "the node logged only {} bytes, less than a pipe holds", output.len());
}
