//! Index verification and repair: online (`POST /v1/admin/indexes/rebuild`, status) on a healthy
//! node finds nothing to fix; offline (`stemedb rebuild --data-dir`) repairs deliberately
//! damaged indexes of a stopped node, and refuses to run while the node does.

mod common;

use std::time::Duration;

use common::{get_json, post_json, ProcessNode};
use serde_json::{json, Value};
use stemedb::shard::command::group_of_shard;
use stemedb::shard::keys;
use stemedb::storage::{ColumnFamily, Durability, Storage, WriteBatch};

fn run_rebuild(dir: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_stemedb"))
        .args(["rebuild", "--data-dir"])
        .arg(dir)
        .output()
        .expect("run stemedb rebuild")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_verification_and_offline_repair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start(dir.path()).await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..30 {
        let body = json!({"concept_path": format!("idx/c{}", i % 6), "predicate": "p", "value": i, "agent_id": format!("agent{}", i % 2)});
        let (status, created) = post_json(&client, &format!("{}/v1/assert", node.url), &body).await;
        assert_eq!(status, 201, "{created}");
        ids.push((format!("idx/c{}", i % 6), created["id"].as_str().expect("id").to_string()));
    }

    // The start-up verification (storage.rebuild_indexes_on_start) ran when the node started.
    let mut at_start = Value::Null;
    for _ in 0..200 {
        at_start = get_json(&client, &format!("{}/v1/admin/indexes/status", node.url)).await.1;
        if at_start["started_at"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(at_start["started_at"].is_string(), "{at_start}");
    // Online: nothing to fix on a healthy node (409 while the start-up run is still going).
    let mut accepted = false;
    for _ in 0..100 {
        let response = client.post(format!("{}/v1/admin/indexes/rebuild", node.url)).send().await.expect("send");
        match response.status().as_u16() {
            202 => {
                accepted = true;
                break;
            }
            409 => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("rebuild answered {other}"),
        }
    }
    assert!(accepted);
    let mut status = Value::Null;
    for _ in 0..100 {
        status = get_json(&client, &format!("{}/v1/admin/indexes/status", node.url)).await.1;
        if status["status"] == json!("ready") && status["report"].is_object() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["status"], json!("ready"), "{status}");
    assert!(status["last_rebuild"].is_string(), "{status}");
    assert_eq!(status["report"]["assertions"], json!(30), "{status}");
    assert_eq!(status["report"]["claim_entries"], json!(30));
    assert_eq!(status["report"]["agent_entries"], json!(30));
    for field in ["missing_added", "stale_removed", "counts_fixed"] {
        assert_eq!(status["report"][field], json!(0), "{field}: {status}");
    }
    let metrics =
        client.get(format!("{}/metrics", node.url)).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("stemedb_index_memory_bytes"), "metric missing");
    assert!(metrics.contains("stemedb_index_entries"));

    // The offline tool refuses while the node holds the database.
    let busy = run_rebuild(dir.path());
    assert!(!busy.status.success(), "rebuild ran beside a live node");

    node.stop();
    // Damage the indexes: drop the claim entry of one assertion, add an entry for an assertion
    // that does not exist, and falsify a concept count.
    let (path, id_text) = ids[7].clone();
    let id = stemedb::model::id::AssertionId::parse(&id_text).expect("id");
    let group = group_of_shard(id.shard());
    {
        let storage = Storage::open(dir.path(), Default::default()).expect("open");
        let mut batch = WriteBatch::new();
        batch.delete(ColumnFamily::Index, keys::claim_key(group, &path, "p", id));
        let ghost = stemedb::model::id::AssertionId::new(1, id.shard(), 999_999, 0);
        batch.put(ColumnFamily::Index, keys::agent_key(group, "ghost", ghost), Vec::new());
        batch.put(ColumnFamily::Index, keys::concept_key(group, &path, "p"), 99u64.to_be_bytes().to_vec());
        // And lose applied state in another shard: its applied index and one record. The log
        // still holds the committed entries, which the rebuild applies again.
        let (_, lost_text) = ids
            .iter()
            .find(|(_, i)| stemedb::model::id::AssertionId::parse(i).expect("id").shard() != id.shard())
            .expect("a second shard");
        let lost = stemedb::model::id::AssertionId::parse(lost_text).expect("id");
        let lost_group = group_of_shard(lost.shard());
        batch.delete(ColumnFamily::StateMachine, keys::applied_key(lost_group));
        batch.delete(ColumnFamily::StateMachine, keys::assertion_key(lost_group, lost));
        storage.write(batch, Durability::Synced).expect("write");
        storage.close().expect("close");
    }
    let repaired = run_rebuild(dir.path());
    assert!(repaired.status.success(), "{}", String::from_utf8_lossy(&repaired.stderr));
    let report: Value = serde_json::from_slice(&repaired.stdout).expect("report json");
    assert_eq!(report["assertions"], json!(30), "{report}");
    assert_eq!(report["missing_added"], json!(1), "{report}");
    assert_eq!(report["stale_removed"], json!(1), "{report}");
    assert!(report["entries_replayed"].as_u64().is_some_and(|n| n > 0), "{report}");
    // The falsified count, and the counts the replay of the other shard counted twice.
    assert!(report["counts_fixed"].as_u64().is_some_and(|n| n >= 1), "{report}");
    // A second pass finds nothing; this one takes the data dir and the storage settings from
    // the node's config file.
    let config_file = dir.path().join("node.toml");
    let config_text = format!(
        "[node]\ndata_dir = {:?}\n[storage]\nmax_cache_size_mb = 32\nindex_eviction_enabled = true\nindex_max_memory_mb = 8\n",
        dir.path().display().to_string()
    );
    std::fs::write(&config_file, config_text).expect("write config");
    let by_config = std::process::Command::new(env!("CARGO_BIN_EXE_stemedb"))
        .arg("rebuild")
        .arg("--config")
        .arg(&config_file)
        .output()
        .expect("run stemedb rebuild --config");
    assert!(by_config.status.success(), "{}", String::from_utf8_lossy(&by_config.stderr));
    let again: Value = serde_json::from_slice(&by_config.stdout).expect("report json");
    assert_eq!(
        (again["missing_added"].clone(), again["stale_removed"].clone(), again["counts_fixed"].clone()),
        (json!(0), json!(0), json!(0))
    );

    let node = ProcessNode::start(dir.path()).await;
    let (_, all) =
        post_json(&client, &format!("{}/v1/query", node.url), &json!({"concept_path": path, "lens": "all"})).await;
    let listed: Vec<&str> =
        all["results"][0]["assertions"].as_array().expect("list").iter().filter_map(|c| c["id"].as_str()).collect();
    assert!(listed.contains(&id_text.as_str()), "repaired claim entry: {all}");
    let (_, concepts) = get_json(&client, &format!("{}/v1/concepts?prefix={path}", node.url)).await;
    assert_eq!(concepts["concepts"][0]["assertions"], json!(5), "{concepts}");
    for (concept_path, id) in &ids {
        let (status, body) = get_json(&client, &format!("{}/v1/assertions/{id}", node.url)).await;
        assert_eq!(status, 200, "{id} after the rebuild: {body}");
        let (_, concepts) = get_json(&client, &format!("{}/v1/concepts?prefix={concept_path}", node.url)).await;
        assert_eq!(concepts["concepts"][0]["assertions"], json!(5), "{concepts}");
    }
    let (_, by_agent) = get_json(&client, &format!("{}/v1/assertions?agent_id=ghost", node.url)).await;
    assert_eq!(by_agent["assertions"], json!([]), "{by_agent}");
    let (_, by_agent) = get_json(&client, &format!("{}/v1/assertions?agent_id=agent1&limit=100", node.url)).await;
    assert_eq!(by_agent["assertions"].as_array().map(Vec::len), Some(15));
    drop(node);
    let missing = run_rebuild(&dir.path().join("nope"));
    assert!(!missing.status.success());
    std::fs::write(&config_file, "[storage]\nindex_eviction = true\n").expect("write config");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_stemedb"))
        .args(["rebuild", "--data-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&config_file)
        .output()
        .expect("run stemedb rebuild");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("index_eviction"), "a bad config is refused by name: {stderr}");
}
