//! Every class of bad input gets the right 4xx status and error code, and writes nothing.

mod common;

use common::TestNode;
use serde_json::{json, Value};

fn expect_error(result: &(u16, Value), status: u16, code: &str) {
    assert_eq!(result.0, status, "status for {code}: body {}", result.1);
    assert_eq!(result.1["error"]["code"], json!(code), "body {}", result.1);
    assert!(result.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "message present");
}

async fn concept_count(node: &TestNode, prefix: &str) -> usize {
    let (status, body) = node.get(&format!("/v1/concepts?prefix={prefix}")).await;
    assert_eq!(status, 200, "{body}");
    body["concepts"].as_array().map(|a| a.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_writes_are_rejected_and_write_nothing() {
    let node = TestNode::start_with(|c| {
        c.limits.max_value_bytes = 1024;
        c.limits.max_request_bytes = 64 * 1024;
        c.limits.max_batch_items = 10;
    })
    .await;

    expect_error(&node.post_raw("/v1/assert", "{not json").await, 400, "malformed_json");
    expect_error(&node.post_raw("/v1/assert", "").await, 400, "malformed_json");
    expect_error(
        &node.post_raw("/v1/assert", r#"{"concept_path":"bad/a","predicate":"p","value":1"#).await,
        400,
        "malformed_json",
    );
    let unknown =
        node.post("/v1/assert", &json!({"concept_path": "bad/b", "predicate": "p", "value": 1, "valeu": 2})).await;
    expect_error(&unknown, 400, "unknown_field");
    assert_eq!(unknown.1["error"]["details"]["field"], json!("valeu"));
    expect_error(
        &node
            .post("/v1/assert", &json!({"concept_path": "bad/c", "predicate": "p", "value": 1, "confidence": "high"}))
            .await,
        422,
        "invalid_field",
    );
    expect_error(
        &node.post("/v1/assert", &json!({"concept_path": 7, "predicate": "p", "value": 1})).await,
        422,
        "invalid_field",
    );
    expect_error(&node.post("/v1/assert", &json!({"concept_path": "bad/d", "value": 1})).await, 422, "missing_field");
    expect_error(
        &node.post("/v1/assert", &json!({"concept_path": "bad/e", "predicate": "p"})).await,
        422,
        "missing_field",
    );
    expect_error(&node.post("/v1/assert", &json!([1, 2])).await, 422, "invalid_field");
    expect_error(
        &node.post("/v1/assert", &json!({"concept_path": "bad/f", "predicate": "p", "value": "x".repeat(2000)})).await,
        413,
        "value_too_large",
    );
    expect_error(
        &node
            .post("/v1/assert", &json!({"concept_path": "bad/g", "predicate": "p", "value": "x".repeat(100_000)}))
            .await,
        413,
        "payload_too_large",
    );
    // Nesting deeper than limits.max_value_depth (64): refused before anything is written,
    // whatever the depth (20,000 levels fit in the default 64 KiB and once defeated clients;
    // this node's value limit is 1 KiB, so 500 here).
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    for (depth, path) in [(65, "bad/deep65"), (500, "bad/deep500")] {
        let body = format!(r#"{{"concept_path":"{path}","predicate":"p","value":{}}}"#, nested(depth));
        let refused = node.post_raw("/v1/assert", &body).await;
        expect_error(&refused, 400, "value_too_deep");
        assert_eq!(refused.1["error"]["details"]["depth"], json!(depth), "{}", refused.1);
    }
    let deep_source =
        format!(r#"{{"concept_path":"bad/deepsource","predicate":"p","value":1,"source":{{"a":{}}}}}"#, nested(80));
    expect_error(&node.post_raw("/v1/assert", &deep_source).await, 400, "value_too_deep");
    let batch = format!(
        r#"{{"assertions":[{{"concept_path":"ok/batchok","predicate":"p","value":1}},{{"concept_path":"bad/batchdeep","predicate":"p","value":{}}}]}}"#,
        nested(100)
    );
    // A batch refuses the item alone (each item has its own outcome).
    let (status, answer) = node.post_raw("/v1/assert/batch", &batch).await;
    assert_eq!((status, answer["accepted"].clone(), answer["rejected"].clone()), (200, json!(1), json!(1)), "{answer}");
    assert_eq!(answer["results"][1]["status"], json!(400), "{answer}");
    assert_eq!(answer["results"][1]["error"]["code"], json!("value_too_deep"), "{answer}");
    let at_limit = format!(r#"{{"concept_path":"ok/deep64","predicate":"p","value":{}}}"#, nested(64));
    assert_eq!(node.post_raw("/v1/assert", &at_limit).await.0, 201, "64 levels are within the limit");
    for path in ["", "/bad", "bad/", "bad//h", "bad/h i", "bad/é", &"x".repeat(129)] {
        expect_error(
            &node.post("/v1/assert", &json!({"concept_path": path, "predicate": "p", "value": 1})).await,
            422,
            "invalid_concept_path",
        );
    }
    expect_error(
        &node.post("/v1/assert", &json!({"concept_path": "bad/i", "predicate": "has space", "value": 1})).await,
        422,
        "invalid_predicate",
    );
    expect_error(
        &node
            .post("/v1/assert", &json!({"concept_path": "bad/j", "predicate": "p", "value": 1, "confidence": 1.5}))
            .await,
        422,
        "invalid_confidence",
    );
    expect_error(
        &node.post("/v1/assert", &json!({"concept_path": "bad/k", "predicate": "p", "value": 1, "agent_id": ""})).await,
        422,
        "invalid_agent_id",
    );
    expect_error(
        &node
            .post("/v1/assert", &json!({"concept_path": "bad/l", "predicate": "p", "value": 1, "source": "web"}))
            .await,
        422,
        "invalid_source",
    );
    expect_error(
        &node
            .post("/v1/assert", &json!({"concept_path": "bad/m", "predicate": "p", "value": 1, "supersedes": ["nope"]}))
            .await,
        400,
        "invalid_id",
    );
    let too_many: Vec<String> = (0..65).map(|_| "0".repeat(26)).collect();
    expect_error(
        &node
            .post("/v1/assert", &json!({"concept_path": "bad/n", "predicate": "p", "value": 1, "supersedes": too_many}))
            .await,
        422,
        "too_many_supersedes",
    );

    // Superseding an id that does not exist (on the right shard) is refused at apply time, with
    // nothing written.
    let (status, first) =
        node.post("/v1/assert", &json!({"concept_path": "ok/one", "predicate": "p", "value": 1})).await;
    assert_eq!(status, 201, "{first}");
    let real_id = first["id"].as_str().expect("id").to_string();
    let mut fake = real_id.clone();
    fake.replace_range(20..26, "ZZZZZZ");
    expect_error(
        &node
            .post("/v1/assert", &json!({"concept_path": "ok/one", "predicate": "p", "value": 2, "supersedes": [fake]}))
            .await,
        404,
        "assertion_not_found",
    );

    // Batches: envelope errors reject everything; item errors reject only the item.
    expect_error(&node.post("/v1/assert/batch", &json!({"assertions": []})).await, 422, "empty_batch");
    expect_error(&node.post("/v1/assert/batch", &json!({"items": []})).await, 400, "unknown_field");
    let eleven: Vec<Value> =
        (0..11).map(|i| json!({"concept_path": format!("bad/batch{i}"), "predicate": "p", "value": i})).collect();
    expect_error(&node.post("/v1/assert/batch", &json!({"assertions": eleven})).await, 413, "batch_too_large");
    let (status, batch) = node
        .post(
            "/v1/assert/batch",
            &json!({"assertions": [
                {"concept_path": "ok/batch", "predicate": "p", "value": 1},
                {"concept_path": "bad/batch", "predicate": "p", "value": 1, "confidence": 9},
                {"concept_path": "bad//batch", "predicate": "p", "value": 1},
                {"concept_path": "bad/batch2", "predicate": "p"},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["accepted"], json!(1));
    assert_eq!(batch["results"][0]["status"], json!(201));
    assert_eq!(batch["results"][1]["error"]["code"], json!("invalid_confidence"));
    assert_eq!(batch["results"][2]["error"]["code"], json!("invalid_concept_path"));
    assert_eq!(batch["results"][3]["error"]["code"], json!("missing_field"));

    // Votes and retractions.
    expect_error(&node.post("/v1/vote", &json!({"assertion_id": real_id, "value": 2})).await, 422, "invalid_vote");
    expect_error(&node.post("/v1/vote", &json!({"assertion_id": "short", "value": 1})).await, 400, "invalid_id");
    expect_error(
        &node.post("/v1/vote", &json!({"assertion_id": fake_id(&real_id), "value": 1})).await,
        404,
        "assertion_not_found",
    );
    expect_error(&node.post("/v1/vote", &json!({"assertion_id": real_id, "value": "up"})).await, 422, "invalid_field");
    expect_error(
        &node.post("/v1/retract", &json!({"assertion_id": fake_id(&real_id)})).await,
        404,
        "assertion_not_found",
    );
    expect_error(
        &node.post("/v1/retract", &json!({"assertion_id": real_id, "agent_id": "someone-else"})).await,
        403,
        "not_assertion_owner",
    );

    // Reads.
    expect_error(&node.get("/v1/assertions/not-an-id").await, 400, "invalid_id");
    expect_error(&node.get(&format!("/v1/assertions/{}", fake_id(&real_id))).await, 404, "assertion_not_found");
    expect_error(
        &node.post("/v1/query", &json!({"concept_path": "ok/one", "lens": "vibes"})).await,
        400,
        "unknown_lens",
    );
    expect_error(
        &node.post("/v1/query", &json!({"concept_path": "ok/one", "as_of": "yesterday"})).await,
        400,
        "invalid_time",
    );
    expect_error(
        &node.post("/v1/query", &json!({"concept_path": "ok/one", "concept_prefix": "ok"})).await,
        422,
        "invalid_query",
    );
    expect_error(&node.post("/v1/query", &json!({})).await, 422, "invalid_query");
    expect_error(&node.post("/v1/query", &json!({"concept_path": "ok/one", "limit": 0})).await, 400, "invalid_limit");
    expect_error(
        &node.post("/v1/query", &json!({"concept_path": "ok/one", "consistency": "eventual"})).await,
        400,
        "invalid_consistency",
    );
    expect_error(
        &node.post("/v1/query", &json!({"concept_path": "ok/one", "cursor": "%%%"})).await,
        400,
        "invalid_cursor",
    );
    expect_error(
        &node.post("/v1/query", &json!({"concept_path": "ok/one", "lense": "recency"})).await,
        400,
        "unknown_field",
    );
    expect_error(&node.get("/v1/concepts?prefix=a//b").await, 422, "invalid_concept_path");
    expect_error(&node.get("/v1/nope").await, 404, "not_found");
    let response = node.client.delete(format!("{}/v1/assert", node.url)).send().await.expect("send");
    let status = response.status().as_u16();
    expect_error(&(status, response.json().await.unwrap_or(Value::Null)), 405, "method_not_allowed");

    // Nothing from any rejected request was written; the two valid writes were.
    assert_eq!(concept_count(&node, "bad").await, 0);
    assert_eq!(concept_count(&node, "ok").await, 4);
    let (_, one) = node.post("/v1/query", &json!({"concept_path": "ok/one", "lens": "history"})).await;
    assert_eq!(one["results"][0]["assertions"].as_array().map(|a| a.len()), Some(1), "{one}");

    // The node is still healthy after all of it.
    assert_eq!(node.get("/health").await.0, 200);
    node.stop().await;
}

/// An id on the same shard as `id` that was never assigned.
fn fake_id(id: &str) -> String {
    let mut fake = id.to_string();
    fake.replace_range(20..26, "ZZZZZZ");
    fake
}
