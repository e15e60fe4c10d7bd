//! The client API end to end on one node: every lens, votes, supersession, retraction, as_of,
//! idempotent retries, batches, prefix queries with pagination.

mod common;

use common::{metrics_text, series_value, TestNode};
use serde_json::{json, Value};

async fn assert_ok(node: &TestNode, body: Value) -> Value {
    let (status, response) = node.post("/v1/assert", &body).await;
    assert_eq!(status, 201, "{response}");
    response
}

async fn winner(node: &TestNode, lens: &str, extra: Value) -> Value {
    let mut body = json!({"concept_path": "test/disk", "predicate": "space_ok", "lens": lens});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (status, response) = node.post("/v1/query", &body).await;
    assert_eq!(status, 200, "{response}");
    response["results"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenses_votes_supersession_retraction_and_as_of() {
    let node = TestNode::start().await;
    let a = assert_ok(&node, json!({"concept_path": "test/disk", "predicate": "space_ok", "value": true, "agent_id": "ops-bot", "confidence": 0.9})).await;
    let b = assert_ok(&node, json!({"concept_path": "test/disk", "predicate": "space_ok", "value": false, "agent_id": "monitor", "confidence": 0.5})).await;
    let after_b = b["asserted_at"].as_str().expect("time").to_string();
    let (a_id, b_id) = (a["id"].as_str().expect("id").to_string(), b["id"].as_str().expect("id").to_string());
    assert!(b_id > a_id, "ids sort by time");

    let recency = winner(&node, "recency", json!({})).await;
    assert_eq!(recency["winner"]["id"], json!(b_id));
    assert_eq!(recency["alternatives"], json!(1));
    assert_eq!(recency["conflict"], json!(true));
    assert_eq!(winner(&node, "confidence", json!({})).await["winner"]["id"], json!(a_id));
    // No votes yet: consensus ties resolve by recency.
    assert_eq!(winner(&node, "consensus", json!({})).await["winner"]["id"], json!(b_id));

    for (agent, id, value) in [("v1", &a_id, 1), ("v2", &a_id, 1), ("v3", &b_id, 1), ("v3", &b_id, -1)] {
        let (status, vote) =
            node.post("/v1/vote", &json!({"assertion_id": id, "agent_id": agent, "value": value})).await;
        assert_eq!(status, 200, "{vote}");
    }
    let consensus = winner(&node, "consensus", json!({})).await;
    assert_eq!(consensus["winner"]["id"], json!(a_id));
    assert_eq!(consensus["winner"]["votes"]["score"], json!(2.0));
    let all = winner(&node, "all", json!({})).await;
    let ids: Vec<&str> = all["assertions"].as_array().expect("list").iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, vec![b_id.as_str(), a_id.as_str()], "newest first");

    // Supersede b with c.
    let c = assert_ok(&node, json!({"concept_path": "test/disk", "predicate": "space_ok", "value": false, "agent_id": "monitor", "supersedes": [b_id]})).await;
    let c_id = c["id"].as_str().expect("id").to_string();
    let recency = winner(&node, "recency", json!({})).await;
    assert_eq!(recency["winner"]["id"], json!(c_id));
    assert_eq!(recency["alternatives"], json!(1), "a disagrees, b is superseded");
    let history = winner(&node, "history", json!({})).await;
    let b_entry = history["assertions"]
        .as_array()
        .expect("list")
        .iter()
        .find(|x| x["id"] == json!(b_id))
        .cloned()
        .expect("b in history");
    assert_eq!(b_entry["status"], json!("superseded"));
    assert_eq!(b_entry["superseded_by"], json!(c_id));

    // As of just after b: c did not exist, b was active.
    let then = winner(&node, "recency", json!({"as_of": after_b})).await;
    assert_eq!(then["winner"]["id"], json!(b_id));

    // Retractions: only the owner; retracting c withdraws its supersession of b.
    let (status, _) = node.post("/v1/retract", &json!({"assertion_id": c_id, "agent_id": "ops-bot"})).await;
    assert_eq!(status, 403);
    let (status, retracted) =
        node.post("/v1/retract", &json!({"assertion_id": c_id, "agent_id": "monitor", "reason": "wrong disk"})).await;
    assert_eq!(status, 200, "{retracted}");
    let (status, again) = node.post("/v1/retract", &json!({"assertion_id": c_id, "agent_id": "monitor"})).await;
    assert_eq!((status, again["error"]["code"].clone()), (409, json!("already_retracted")));
    assert_eq!(winner(&node, "recency", json!({})).await["winner"]["id"], json!(b_id));

    let (status, detail) = node.get(&format!("/v1/assertions/{c_id}")).await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["status"], json!("retracted"));
    assert_eq!(detail["retraction"]["reason"], json!("wrong disk"));
    assert_eq!(detail["supersedes"], json!([b_id]));
    let (_, detail) = node.get(&format!("/v1/assertions/{b_id}")).await;
    assert_eq!(detail["votes"]["down"], json!(1), "v3's later vote replaced its earlier one");
    assert_eq!(detail["votes"]["up"], json!(0));

    // Stale reads report the applied index.
    let (_, stale) = node.post("/v1/query", &json!({"concept_path": "test/disk", "consistency": "stale"})).await;
    assert!(stale["applied_index"].as_u64().is_some_and(|i| i > 0), "{stale}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_batches_and_prefix_pages() {
    let node = TestNode::start().await;
    let body = json!({"concept_path": "idem/x", "predicate": "p", "value": 1, "agent_id": "a", "request_id": "req-1"});
    let first = assert_ok(&node, body.clone()).await;
    let second = assert_ok(&node, body.clone()).await;
    assert_eq!(first["id"], second["id"]);
    assert_eq!(second["duplicate"], json!(true));
    // Same request id from another agent is a different write.
    let other = assert_ok(
        &node,
        json!({"concept_path": "idem/x", "predicate": "p", "value": 1, "agent_id": "b", "request_id": "req-1"}),
    )
    .await;
    assert_ne!(other["id"], first["id"]);
    let (_, history) = node.post("/v1/query", &json!({"concept_path": "idem/x", "lens": "history"})).await;
    assert_eq!(history["results"][0]["assertions"].as_array().map(|a| a.len()), Some(2));

    // A batch over many shards, then prefix pages of 3.
    let items: Vec<Value> =
        (0..10).map(|i| json!({"concept_path": format!("page/c{i:02}"), "predicate": "p", "value": i})).collect();
    let (status, batch) = node.post("/v1/assert/batch", &json!({"assertions": items})).await;
    assert_eq!((status, batch["accepted"].clone()), (200, json!(10)), "{batch}");
    assert_ok(&node, json!({"concept_path": "pagex/c", "predicate": "p", "value": 0})).await;
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let (status, page) =
            node.post("/v1/query", &json!({"concept_prefix": "page", "limit": 3, "cursor": cursor})).await;
        assert_eq!(status, 200, "{page}");
        for result in page["results"].as_array().expect("results") {
            seen.push(result["concept_path"].as_str().expect("path").to_string());
            assert_eq!(result["winner"]["value"], json!(seen.len() - 1));
        }
        cursor = page["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    let expected: Vec<String> = (0..10).map(|i| format!("page/c{i:02}")).collect();
    assert_eq!(seen, expected, "every concept once, in order, and pagex/ is not under page/");
    let (_, concepts) = node.get("/v1/concepts?prefix=page&limit=20").await;
    assert_eq!(concepts["concepts"].as_array().map(|a| a.len()), Some(10));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_runbook_names() {
    let node = TestNode::start().await;
    assert_ok(&node, json!({"concept_path": "m/x", "predicate": "p", "value": 1})).await;
    let _ = node.post("/v1/query", &json!({"concept_path": "m/x"})).await;
    let text =
        node.client.get(format!("{}/metrics", node.url)).send().await.expect("metrics").text().await.expect("text");
    for name in [
        "stemedb_query_latency_seconds{quantile=\"0.99\"}",
        "stemedb_query_duration_seconds_bucket",
        "stemedb_query_total{node=\"1\"}",
        "assertions_indexed_total",
        "stemedb_storage_put_duration_seconds_bucket",
        "stemedb_raft_apply_duration_seconds_bucket",
        "stemedb_raft_log_fsync_duration_seconds_bucket",
        "process_resident_memory_bytes",
        "stemedb_read_barriers_total",
        "stemedb_claims_cache_bytes",
        "stemedb_claims_cache_entries",
        "stemedb_claims_cache_rendered_only_entries",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    let (status, stats) = node.get("/v1/admin/storage/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert!(stats["sst_file_count"].is_u64() && stats["cache_memory_bytes"].is_u64());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_queries_are_logged_for_admins() {
    // Every query counts as slow; the log keeps the newest two.
    let node = TestNode::start_with(|config| {
        config.query.slow_query_ms = 0;
        config.query.slow_query_log_size = 2;
        config.security.admin_token = "secret".into();
    })
    .await;
    let (status, _) = node.post("/v1/assert", &json!({"concept_path": "slow/a", "predicate": "p", "value": 1})).await;
    assert_eq!(status, 201);
    for (agent, body) in [
        ("first", json!({"concept_path": "slow/a", "agent_id": "first"})),
        ("second", json!({"concept_prefix": "slow", "predicate": "p", "lens": "history", "agent_id": "second"})),
        ("third", json!({"concept_path": "slow/a", "agent_id": "third", "consistency": "stale"})),
    ] {
        let (status, answer) = node.post("/v1/query", &body).await;
        assert_eq!(status, 200, "{agent}: {answer}");
    }
    // Admin only.
    let (status, answer) = node.get("/v1/admin/slow-queries").await;
    assert_eq!((status, answer["error"]["code"].as_str()), (401, Some("admin_token_required")), "{answer}");
    let url = format!("{}/v1/admin/slow-queries", node.url);
    let answer: serde_json::Value =
        node.client.get(&url).bearer_auth("secret").send().await.expect("send").json().await.expect("json");
    let queries = answer["queries"].as_array().cloned().unwrap_or_default();
    let agents: Vec<&str> = queries.iter().filter_map(|q| q["agent_id"].as_str()).collect();
    assert_eq!(agents, vec!["third", "second"], "newest first, capacity 2: {answer}");
    let second = &queries[1];
    assert_eq!(second["subject"], json!("slow/*"));
    assert_eq!(second["predicate"], json!("p"));
    assert_eq!(second["lens"], json!("history"));
    assert_eq!(second["results"], json!(1));
    assert!(second["duration_ms"].is_u64() && second["memory_mb"].is_f64() && second["at"].is_string(), "{second}");
    let filtered: serde_json::Value = node
        .client
        .get(format!("{url}?agent_id=second&limit=5"))
        .bearer_auth("secret")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(filtered["queries"].as_array().map(Vec::len), Some(1));
    let response = node.client.get(format!("{url}?limit=0")).bearer_auth("secret").send().await.expect("send");
    assert_eq!(response.status().as_u16(), 400);
    let response = node.client.get(format!("{url}?bogus=1")).bearer_auth("secret").send().await.expect("send");
    assert_eq!(response.status().as_u16(), 400);
    node.stop().await;
}

/// Clients that hang up in the middle of linearizable queries (their request futures are
/// dropped wherever they were, including while waiting for a shard's shared read barrier) must
/// not leave any shard's later readers waiting: every key answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_hanging_up_mid_query_do_not_stall_any_shard() {
    use rand::{Rng, SeedableRng};
    let node = TestNode::start().await;
    let keys = 64;
    let items: Vec<Value> = (0..keys)
        .map(|k| json!({"concept_path": format!("hangup/k{k}"), "predicate": "p", "value": k, "agent_id": "a"}))
        .collect();
    let (status, response) = node.post("/v1/assert/batch", &json!({"assertions": items})).await;
    assert_eq!((status, &response["accepted"]), (200, &json!(keys)), "{response}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..30 {
        let mut tasks = Vec::new();
        for k in 0..keys {
            // A fresh client per request, so each hang-up closes its own connection.
            let patience = std::time::Duration::from_micros(rng.random_range(100..4000));
            let client = reqwest::Client::builder().timeout(patience).build().expect("client");
            let url = format!("{}/v1/query", node.url);
            tasks.push(tokio::spawn(async move {
                let _ = client.post(url).json(&json!({"concept_path": format!("hangup/k{k}")})).send().await;
            }));
        }
        for task in tasks {
            task.await.expect("join");
        }
    }
    let patient = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().expect("client");
    for k in 0..keys {
        let url = format!("{}/v1/query", node.url);
        let answer = patient.post(url).json(&json!({"concept_path": format!("hangup/k{k}")})).send().await;
        let status = answer.as_ref().map(|r| r.status().as_u16()).map_err(|e| e.to_string());
        assert_eq!(status, Ok(200), "hangup/k{k}: its shard's linearizable reads are stuck");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claims_cache_stays_within_its_memory_budget() {
    let node = TestNode::start_with(|config| config.query.claims_cache_mb = 1).await;
    let value = |i: usize| format!("{i:04}-{}", "v".repeat(6000));
    for batch in 0..3 {
        let items: Vec<Value> = (batch * 100..batch * 100 + 100)
            .map(|i| json!({"concept_path": format!("mem/k{i}"), "predicate": "p", "value": value(i)}))
            .collect();
        let (status, body) = node.post("/v1/assert/batch", &json!({"assertions": items})).await;
        assert_eq!((status, body["accepted"].clone()), (200, json!(100)), "batch {batch}");
    }
    let gauge = |text: &str, name: &str| series_value(text, name).unwrap_or_else(|| panic!("no {name} in the metrics"));
    // 300 reads of about 6 KB each: 1.8 MB, over the 1 MiB budget. Every answer stays right.
    for round in 0..2 {
        for i in 0..300 {
            let (status, answer) = node.post("/v1/query", &json!({"concept_path": format!("mem/k{i}")})).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["results"][0]["winner"]["value"], json!(value(i)), "round {round}, key {i}");
        }
        let text = metrics_text(&node.client, &node.url).await;
        let (bytes, entries) =
            (gauge(&text, "stemedb_claims_cache_bytes"), gauge(&text, "stemedb_claims_cache_entries"));
        assert!(bytes > 0.0 && bytes <= (1 << 20) as f64, "round {round}: {bytes} bytes cached");
        assert!(entries > 0.0 && entries < 300.0, "round {round}: {entries} reads cached");
    }
    node.stop().await;
}

/// Under memory pressure the claims cache keeps the rendered answers of concepts whose claims
/// it evicts: queries of the present are then answered from them, byte for byte the same as
/// from the claims; other lenses still read the claims; a write drops a kept answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_kept_without_their_claims_are_the_same_and_a_write_drops_them() {
    let node = TestNode::start_with(|config| config.query.claims_cache_mb = 1).await;
    let keys = 300;
    // Five claims of about 400 bytes per concept: its claims take a few KB, its answer under
    // the recency lens a few hundred bytes. The 1 MiB budget holds some of the claims only.
    let items: Vec<Value> = (0..keys)
        .flat_map(|i| {
            (0..5).map(move |j| {
                json!({"concept_path": format!("kept/k{i}"), "predicate": "p", "value": format!("{i:04}-{j}-{}", "v".repeat(400))})
            })
        })
        .collect();
    for chunk in items.chunks(500) {
        let (status, body) = node.post("/v1/assert/batch", &json!({"assertions": chunk})).await;
        assert_eq!(status, 200, "{body}");
    }
    let query = |i: usize, lens: &'static str| {
        let node = &node;
        async move {
            let (status, answer) =
                node.post("/v1/query", &json!({"concept_path": format!("kept/k{i}"), "lens": lens})).await;
            assert_eq!(status, 200, "{answer}");
            answer["results"].clone()
        }
    };
    let mut first = Vec::new();
    for i in 0..keys {
        first.push(query(i, "recency").await);
    }
    for round in 0..2 {
        for (i, expected) in first.iter().enumerate() {
            assert_eq!(&query(i, "recency").await, expected, "round {round}, key {i}");
        }
    }
    let text = metrics_text(&node.client, &node.url).await;
    let gauge = |name: &str| series_value(&text, name).unwrap_or_else(|| panic!("no {name} in the metrics"));
    let rendered_only = gauge("stemedb_claims_cache_rendered_only_entries");
    assert!(rendered_only > 0.0, "no answer was kept without its claims");
    assert!(gauge("stemedb_claims_cache_bytes") <= (1 << 20) as f64);
    // Another lens reads the claims again: all five.
    for i in 0..keys {
        let all = query(i, "all").await;
        assert_eq!(all[0]["assertions"].as_array().map(Vec::len), Some(5), "key {i}: {all}");
    }
    // A sixth claim on every key: every answer shows it.
    let newer: Vec<Value> = (0..keys)
        .map(|i| json!({"concept_path": format!("kept/k{i}"), "predicate": "p", "value": format!("{i:04}-newest")}))
        .collect();
    let (status, body) = node.post("/v1/assert/batch", &json!({"assertions": newer})).await;
    assert_eq!(status, 200, "{body}");
    for i in 0..keys {
        let answer = query(i, "recency").await;
        assert_eq!(answer[0]["winner"]["value"], json!(format!("{i:04}-newest")), "key {i}: {answer}");
    }
    node.stop().await;
}

/// `query.max_memory_per_query_mb`: a query whose claims would hold more than the limit stops
/// reading and answers 422 `query_memory_exceeded`, for a concept_path and for a prefix; the
/// answer counts too (the history lens over claims that fit on their own is refused); narrower
/// queries still answer, and the slow-query log records the memory a query held, claims included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_past_their_memory_limit_are_refused_and_narrower_ones_answer() {
    let node = TestNode::start_with(|config| {
        config.query.max_memory_per_query_mb = 1;
        config.query.slow_query_ms = 0;
    })
    .await;
    let value = "x".repeat(32 * 1024);
    // "big": 40 claims of 32 KiB (1.25 MiB); "mid": 20 of them (640 KiB); "small": one.
    let mut items: Vec<Value> = Vec::new();
    for (predicate, count) in [("big", 40), ("mid", 20)] {
        for i in 0..count {
            items.push(
                json!({"concept_path": "bomb/a", "predicate": predicate, "value": value, "agent_id": format!("a{i}")}),
            );
        }
    }
    items.push(json!({"concept_path": "bomb/a", "predicate": "small", "value": 1, "agent_id": "a0"}));
    let (status, response) = node.post("/v1/assert/batch", &json!({"assertions": items})).await;
    assert_eq!((status, &response["accepted"]), (200, &json!(61)), "{response}");

    for attempt in 0..2 {
        let (status, answer) = node.post("/v1/query", &json!({"concept_path": "bomb/a"})).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some("query_memory_exceeded")),
            "{attempt}: {answer}"
        );
        assert_eq!(answer["error"]["details"]["limit_bytes"], json!(1 << 20), "{answer}");
        assert!(answer["error"]["details"]["shard"].is_u64(), "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("1.0 MiB") && message.contains("query.max_memory_per_query_mb"), "{message}");
    }
    let (status, answer) = node.post("/v1/query", &json!({"concept_prefix": "bomb"})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("query_memory_exceeded")), "{answer}");
    let details = &answer["error"]["details"];
    assert_eq!(
        (&details["shard"], &details["limit_bytes"]),
        (&Value::Null, &json!(1 << 20)),
        "the query's limit: {answer}"
    );
    // Two concepts that fit one at a time do not fit together.
    let mut items: Vec<Value> = Vec::new();
    for path in ["bomb2/x", "bomb2/y"] {
        for i in 0..20 {
            items.push(json!({"concept_path": path, "predicate": "p", "value": value, "agent_id": format!("a{i}")}));
        }
    }
    let (status, response) = node.post("/v1/assert/batch", &json!({"assertions": items})).await;
    assert_eq!((status, &response["accepted"]), (200, &json!(40)), "{response}");
    let (status, answer) = node.post("/v1/query", &json!({"concept_path": "bomb2/x"})).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = node.post("/v1/query", &json!({"concept_prefix": "bomb2"})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("query_memory_exceeded")), "{answer}");

    let (status, answer) = node.post("/v1/query", &json!({"concept_path": "bomb/a", "predicate": "small"})).await;
    assert_eq!((status, answer["results"].as_array().map(Vec::len)), (200, Some(1)), "{answer}");
    let (status, answer) = node.post("/v1/query", &json!({"concept_path": "bomb/a", "predicate": "mid"})).await;
    assert_eq!((status, answer["results"].as_array().map(Vec::len)), (200, Some(1)), "one winner: {answer}");
    let (status, answer) =
        node.post("/v1/query", &json!({"concept_path": "bomb/a", "predicate": "mid", "lens": "history"})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("query_memory_exceeded")), "{answer}");

    // The winner's answer is ~33 KiB; the query held its 640 KiB of claims too.
    let (status, log) = node.get("/v1/admin/slow-queries").await;
    assert_eq!(status, 200, "{log}");
    let queries = log["queries"].as_array().cloned().unwrap_or_default();
    let mid = queries
        .iter()
        .find(|q| q["subject"] == json!("bomb/a") && q["predicate"] == json!("mid") && q["lens"] == json!("recency"))
        .unwrap_or_else(|| panic!("the mid query is logged: {log}"));
    let memory_mb = mid["memory_mb"].as_f64().unwrap_or(0.0);
    assert!((0.6..1.0).contains(&memory_mb), "claims and answer counted: {mid}");
    assert!(mid["error"].is_null(), "{mid}");
    // The refused queries are logged whatever their duration: the query bombs an operator
    // looks for (memory_mb is the limit they passed).
    let refused: Vec<&Value> = queries.iter().filter(|q| q["error"] == json!("query_memory_exceeded")).collect();
    assert_eq!(refused.len(), 5, "{log}");
    assert!(refused.iter().all(|q| q["memory_mb"] == json!(1.0) && q["results"] == json!(0)), "{log}");
    assert_eq!(queries.len(), 8, "{log}");
    node.stop().await;

    // However fast a refused query was, it is logged.
    let node = TestNode::start_with(|config| {
        config.query.max_memory_per_query_mb = 1;
        config.query.slow_query_ms = 3_600_000;
    })
    .await;
    let items: Vec<Value> = (0..40)
        .map(|i| json!({"concept_path": "bomb/b", "predicate": "p", "value": value, "agent_id": format!("a{i}")}))
        .collect();
    let (status, response) = node.post("/v1/assert/batch", &json!({"assertions": items})).await;
    assert_eq!((status, &response["accepted"]), (200, &json!(40)), "{response}");
    for body in [json!({"concept_path": "bomb/b", "agent_id": "bomber"}), json!({"concept_path": "bomb/c"})] {
        node.post("/v1/query", &body).await;
    }
    let (_, log) = node.get("/v1/admin/slow-queries").await;
    let queries = log["queries"].as_array().cloned().unwrap_or_default();
    assert_eq!(queries.len(), 1, "only the refused one: {log}");
    assert_eq!((&queries[0]["agent_id"], &queries[0]["error"]), (&json!("bomber"), &json!("query_memory_exceeded")));
    node.stop().await;
}

/// `storage.index_eviction_enabled`: the secondary indexes are read through a cache of their
/// own, which the storage stats and `stemedb_index_memory_bytes` count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_eviction_gives_the_indexes_their_own_counted_cache() {
    let node = TestNode::start_with(|config| {
        config.storage.index_eviction_enabled = true;
        config.storage.index_max_memory_mb = 8;
        config.query.claims_cache_mb = 0; // every query reads RocksDB
    })
    .await;
    let items: Vec<Value> =
        (0..200).map(|k| json!({"concept_path": format!("evict/k{k}"), "predicate": "p", "value": k})).collect();
    let (status, response) = node.post("/v1/assert/batch", &json!({"assertions": items})).await;
    assert_eq!((status, &response["accepted"]), (200, &json!(200)), "{response}");
    // Memtables flushed to tables, whose blocks go through the caches.
    let stats = compacted(&node, "/v1/admin/storage/compact", json!({"force": true})).await;
    assert!(stats["index"]["sst_bytes"].as_u64().unwrap_or(0) > 0, "the index family was never flushed: {stats}");
    for k in 0..200 {
        let (status, answer) = node.post("/v1/query", &json!({"concept_path": format!("evict/k{k}")})).await;
        assert_eq!((status, &answer["results"][0]["winner"]["value"]), (200, &json!(k)), "{answer}");
    }
    let (status, stats) = node.get("/v1/admin/storage/stats").await;
    assert_eq!(status, 200, "{stats}");
    let own = stats["index_cache_memory_bytes"].as_u64().unwrap_or(0);
    assert!(own > 0 && own <= 9 << 20, "index blocks in their own cache: {stats}");
    assert!(stats["index"]["memory_bytes"].as_u64().unwrap_or(0) >= own, "{stats}");
    let text = metrics_text(&node.client, &node.url).await;
    let index_memory = series_value(&text, "stemedb_index_memory_bytes").unwrap_or(0.0);
    assert!(index_memory >= own as f64, "{index_memory} < {own}");
    assert_eq!(series_value(&text, "stemedb_index_cache_size_bytes"), Some((8 << 20) as f64));
    node.stop().await;
}

/// Starts a manual compaction through `path` and waits for it to finish: the storage stats then.
async fn compacted(node: &TestNode, path: &str, body: Value) -> Value {
    let (status, answer) = node.post(path, &body).await;
    assert_eq!((status, &answer["status"]), (202, &json!("started")), "{answer}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, stats) = node.get("/v1/admin/storage/stats").await;
        if stats["manual_compaction"]["running"] == json!(false) {
            return stats;
        }
        assert!(std::time::Instant::now() < deadline, "the compaction never finished: {stats}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The disk runbook's manual compaction: `POST /v1/admin/compact` starts it, progress shows in
/// `stemedb_compaction_progress_ratio` and the storage stats, and write amplification is a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_compaction_reports_progress_and_write_amplification() {
    let node = TestNode::start().await;
    let items: Vec<Value> =
        (0..300).map(|k| json!({"concept_path": format!("compact/k{k}"), "predicate": "p", "value": k})).collect();
    let (status, response) = node.post("/v1/assert/batch", &json!({"assertions": items})).await;
    assert_eq!(status, 200, "{response}");
    let (_, stats) = node.get("/v1/admin/storage/stats").await;
    assert_eq!(stats["manual_compaction"]["runs"], json!(0), "{stats}");
    let stats = compacted(&node, "/v1/admin/compact", json!({"aggressive": false})).await;
    let run = &stats["manual_compaction"];
    assert_eq!((&run["runs"], &run["progress"], &run["last_error"]), (&json!(1), &json!(1.0), &Value::Null), "{run}");
    assert!(run["last_finished_at_us"].as_u64() >= run["last_started_at_us"].as_u64(), "{run}");
    assert!(stats["write_amplification"].as_f64().unwrap_or(0.0) > 1.0, "WAL and flush at least: {stats}");
    let text = metrics_text(&node.client, &node.url).await;
    assert_eq!(series_value(&text, "stemedb_compaction_progress_ratio"), Some(1.0), "{text}");
    assert_eq!(series_value(&text, "stemedb_compaction_running"), Some(0.0));
    assert!(series_value(&text, "stemedb_storage_write_amplification").unwrap_or(0.0) > 1.0);
    node.stop().await;
}
