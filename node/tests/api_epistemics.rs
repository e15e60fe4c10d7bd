//! Epistemics end to end on one node: root authorities and grants with delegation chains, the
//! authority lens and authority-weighted consensus, revocation and `as_of`.

mod common;

use common::TestNode;
use serde_json::{json, Value};

async fn created(node: &TestNode, path: &str, body: Value) -> Value {
    let (status, response) = node.post(path, &body).await;
    assert!(status == 201 || status == 200, "{path} {body}: {status} {response}");
    response
}

async fn query(node: &TestNode, body: Value) -> Value {
    let (status, response) = node.post("/v1/query", &body).await;
    assert_eq!(status, 200, "{response}");
    response["results"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_chains_lens_and_weighted_consensus() {
    let node = TestNode::start_with(|c| {
        c.authority.roots = vec![stemedb::config::RootAuthority { agent_id: "cto".into(), level: 90 }];
    })
    .await;
    // The config root is recorded by the meta group shortly after start.
    let mut roots = Value::Null;
    for _ in 0..100 {
        roots = node.get("/v1/authority/roots").await.1;
        if roots["roots"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(roots["roots"][0]["agent_id"], json!("cto"), "{roots}");
    created(&node, "/v1/admin/authority/roots", json!({"agent_id": "auditor", "level": 40})).await;

    // cto (90) -> lead (80 on infra) -> sre (70 on infra/db): sre's chain has depth 2.
    let g1 = created(
        &node,
        "/v1/authority/grants",
        json!({"grantor": "cto", "grantee": "lead", "concept_prefix": "infra", "level": 80}),
    )
    .await;
    let g2 = created(
        &node,
        "/v1/authority/grants",
        json!({"grantor": "lead", "grantee": "sre", "concept_prefix": "infra/db", "level": 70}),
    )
    .await;
    assert_eq!(g1["active"], json!(true));
    // Over the grantor's own level, or outside its prefix: 403.
    for bad in [
        json!({"grantor": "lead", "grantee": "x", "concept_prefix": "infra", "level": 81}),
        json!({"grantor": "lead", "grantee": "x", "concept_prefix": "finance", "level": 10}),
        json!({"grantor": "nobody", "grantee": "x", "concept_prefix": "infra", "level": 1}),
    ] {
        let (status, body) = node.post("/v1/authority/grants", &bad).await;
        assert_eq!(status, 403, "{bad}: {body}");
        assert_eq!(body["error"]["code"], json!("insufficient_authority"));
    }
    for (bad, code) in [
        (json!({"grantor": "cto", "grantee": "x", "level": 101}), "invalid_level"),
        (json!({"grantor": "cto", "grantee": "x", "concept_prefix": "a//b", "level": 1}), "invalid_concept_path"),
        (json!({"grantor": "cto", "grantee": "x", "level": 1, "levle": 2}), "unknown_field"),
    ] {
        let (status, body) = node.post("/v1/authority/grants", &bad).await;
        assert!(status == 400 || status == 422, "{bad}: {status} {body}");
        assert_eq!(body["error"]["code"], json!(code), "{body}");
    }

    let (status, sre) = node.get("/v1/authority/agents/sre?concept_path=infra/db/primary").await;
    assert_eq!(status, 200, "{sre}");
    assert_eq!(sre["authority"], json!(70));
    assert_eq!(sre["root"], json!("cto"));
    let chain: Vec<&Value> = sre["chain"].as_array().expect("chain").iter().map(|g| &g["id"]).collect();
    assert_eq!(chain, vec![&g1["id"], &g2["id"]]);
    let (_, outside) = node.get("/v1/authority/agents/sre?concept_path=infra/web").await;
    assert_eq!(outside["authority"], Value::Null, "infra/db does not cover infra/web");
    let (status, missing) = node.get("/v1/authority/agents/sre").await;
    assert_eq!((status, missing["error"]["code"].clone()), (400, json!("missing_concept_path")));

    // Claims: the authority lens picks sre (70) over the newer claim of an agent without
    // authority, and over the auditor root (40).
    let path = "infra/db/primary";
    for (agent, value) in [("sre", "healthy"), ("auditor", "degraded"), ("random-bot", "down")] {
        created(
            &node,
            "/v1/assert",
            json!({"concept_path": path, "predicate": "state", "value": value, "agent_id": agent}),
        )
        .await;
    }
    let by_authority = query(&node, json!({"concept_path": path, "predicate": "state", "lens": "authority"})).await;
    assert_eq!(by_authority["winner"]["agent_id"], json!("sre"), "{by_authority}");
    assert_eq!(by_authority["winner"]["authority"], json!(70));
    assert_eq!(by_authority["alternatives"], json!(2));
    let by_recency = query(&node, json!({"concept_path": path, "predicate": "state"})).await;
    assert_eq!(by_recency["winner"]["agent_id"], json!("random-bot"));

    // Weighted consensus: three anonymous up-votes (weight 1 each) lose to one vote of the
    // auditor (weight 40).
    let all = query(&node, json!({"concept_path": path, "predicate": "state", "lens": "all"})).await;
    let id_of = |agent: &str| {
        all["assertions"].as_array().expect("list").iter().find(|c| c["agent_id"] == json!(agent)).expect("claim")["id"]
            .clone()
    };
    for voter in ["v1", "v2", "v3"] {
        created(&node, "/v1/vote", json!({"assertion_id": id_of("random-bot"), "agent_id": voter, "value": 1})).await;
    }
    created(&node, "/v1/vote", json!({"assertion_id": id_of("sre"), "agent_id": "auditor", "value": 1})).await;
    let consensus = query(&node, json!({"concept_path": path, "predicate": "state", "lens": "consensus"})).await;
    assert_eq!(consensus["winner"]["agent_id"], json!("sre"), "{consensus}");
    assert_eq!(consensus["winner"]["votes"]["score"], json!(40.0));
    let before_revocation = chrono::Utc::now().to_rfc3339();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;

    // Revoking lead's grant cuts sre's chain: only the grantor or an admin may revoke.
    let g1_id = g1["id"].as_u64().expect("id");
    let (status, body) = node.delete(&format!("/v1/authority/grants/{g1_id}?agent_id=sre")).await;
    assert_eq!((status, body["error"]["code"].clone()), (403, json!("not_grantor")), "{body}");
    let (status, revoked) = node.delete(&format!("/v1/authority/grants/{g1_id}?agent_id=cto")).await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["active"], json!(false));
    let (status, again) = node.delete(&format!("/v1/authority/grants/{g1_id}")).await;
    assert_eq!((status, again["error"]["code"].clone()), (409, json!("grant_already_revoked")));
    let (status, unknown) = node.delete("/v1/authority/grants/999").await;
    assert_eq!(status, 404, "{unknown}");
    let (_, sre) = node.get("/v1/authority/agents/sre?concept_path=infra/db/primary").await;
    assert_eq!(sre["authority"], Value::Null);
    let by_authority = query(&node, json!({"concept_path": path, "predicate": "state", "lens": "authority"})).await;
    assert_eq!(by_authority["winner"]["agent_id"], json!("auditor"), "{by_authority}");
    // As of before the revocation, sre still wins.
    let earlier = query(
        &node,
        json!({"concept_path": path, "predicate": "state", "lens": "authority", "as_of": before_revocation}),
    )
    .await;
    assert_eq!(earlier["winner"]["agent_id"], json!("sre"), "{earlier}");
    let (_, sre_then) = node
        .get(&format!("/v1/authority/agents/sre?concept_path=infra/db&as_of={}", urlencode(&before_revocation)))
        .await;
    assert_eq!(sre_then["authority"], json!(70), "{sre_then}");

    // Listing: active grants by default, revoked ones on request.
    let (_, active) = node.get("/v1/authority/grants").await;
    assert_eq!(active["grants"].as_array().map(Vec::len), Some(1), "{active}");
    let (_, everything) = node.get("/v1/authority/grants?include_revoked=true&concept_path=infra/db/x").await;
    assert_eq!(everything["grants"].as_array().map(Vec::len), Some(2), "{everything}");
    node.stop().await;
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}
