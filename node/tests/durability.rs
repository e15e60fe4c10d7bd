//! Acknowledged writes survive `kill -9` of a real `stemedb` process; retries with the same
//! request_id write once; a data dir refuses a different node id.

mod common;

use std::time::Duration;

use common::{get_json, metrics_text, post_json, series_value, ProcessNode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start(dir.path()).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (client, url) = (client.clone(), node.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..40 {
                let body = json!({"concept_path": format!("dur/w{worker}/k{}", i % 5), "predicate": "p", "value": i,
                                  "agent_id": format!("w{worker}"), "request_id": format!("w{worker}-{i}")});
                let (status, response) = post_json(&client, &format!("{url}/v1/assert"), &body).await;
                assert_eq!(status, 201, "{response}");
                acked.push((body, response["id"].as_str().expect("id").to_string()));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("writer"));
    }
    node.kill9();

    let node = ProcessNode::start(dir.path()).await;
    for (_, id) in &acked {
        let (status, body) = get_json(&client, &format!("{}/v1/assertions/{id}", node.url)).await;
        assert_eq!(status, 200, "acknowledged {id} lost after kill -9: {body}");
    }
    // Retrying an acknowledged write after the crash returns the first result and writes nothing.
    let (body, id) = &acked[17];
    let (status, retry) = post_json(&client, &format!("{}/v1/assert", node.url), body).await;
    assert_eq!(status, 201);
    assert_eq!(retry["id"], json!(id));
    assert_eq!(retry["duplicate"], json!(true));
    let (_, history) = post_json(
        &client,
        &format!("{}/v1/query", node.url),
        &json!({"concept_path": body["concept_path"], "lens": "history"}),
    )
    .await;
    assert_eq!(history["results"][0]["assertions"].as_array().map(|a| a.len()), Some(8), "{history}");
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_data_dir_of_another_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start(dir.path()).await;
    drop(node);
    let mut other = ProcessNode::spawn(dir.path(), 2);
    let (status, output) =
        other.wait_exit(Duration::from_secs(30)).await.expect("node with a foreign data dir kept running");
    assert!(!status.success());
    assert!(output.contains("belongs to node 1"), "output: {output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_serves_linearizable_reads_alone_and_they_see_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start(dir.path()).await;
    let client = reqwest::Client::new();
    let write = |url: String, value: i64| {
        let client = client.clone();
        async move {
            let body = json!({"concept_path": "lin/k", "predicate": "p", "value": value, "agent_id": "w"});
            let (status, response) = post_json(&client, &format!("{url}/v1/assert"), &body).await;
            assert_eq!(status, 201, "{response}");
        }
    };
    let read = |url: String| {
        let client = client.clone();
        async move {
            let query = json!({"concept_path": "lin/k", "predicate": "p", "consistency": "linearizable"});
            let (status, response) = post_json(&client, &format!("{url}/v1/query"), &query).await;
            assert_eq!(status, 200, "{response}");
            response["results"][0]["winner"]["value"].clone()
        }
    };
    for value in 0..20 {
        write(node.url.clone(), value).await;
    }
    node.kill9();

    // Straight after the restart, before or after the new term's first entry is applied.
    let node = ProcessNode::start(dir.path()).await;
    assert_eq!(read(node.url.clone()).await, json!(19), "an acknowledged write is missing after kill -9");
    for value in 20..50 {
        write(node.url.clone(), value).await;
        assert_eq!(read(node.url.clone()).await, json!(value), "a read missed the write acknowledged before it");
    }
    let metrics = metrics_text(&client, &node.url).await;
    let alone = series_value(&metrics, "stemedb_read_barriers_total{path=\"sole_voter\"}").unwrap_or(0.0);
    assert!(alone >= 30.0, "the only voter confirmed leadership through a quorum round: {alone} reads alone");
    drop(node);
}
