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

async fn wait_for_root(node: &TestNode, agent: &str) {
    for _ in 0..100 {
        let (_, roots) = node.get("/v1/authority/roots").await;
        if roots["roots"].as_array().is_some_and(|r| r.iter().any(|x| x["agent_id"] == json!(agent))) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("root {agent} never recorded");
}

async fn quarantined_list(node: &TestNode, filter: &str) -> Vec<Value> {
    let (status, body) = node.get(&format!("/v1/admin/quarantine{filter}")).await;
    assert_eq!(status, 200, "{body}");
    body["quarantined"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_triggers_release_and_reject() {
    let node = TestNode::start_with(|c| {
        c.authority.roots = vec![stemedb::config::RootAuthority { agent_id: "cto".into(), level: 90 }];
        c.quarantine.require_authority_prefixes = vec!["finance".into()];
        c.quarantine.protect_authority_level = 80;
        c.circuit_breaker.mode = "quarantine".into();
    })
    .await;
    wait_for_root(&node, "cto").await;

    // Trigger 2: finance needs authority; the intern has none.
    let budget = created(
        &node,
        "/v1/assert",
        json!({"concept_path": "finance/budget", "predicate": "total", "value": 1000, "agent_id": "intern"}),
    )
    .await;
    assert_eq!(budget["status"], json!("quarantined"), "the answer says so: {budget}");
    assert_eq!(budget["quarantine"]["reason"], json!("authority_required"));
    let id = budget["id"].as_str().expect("id");
    let (status, one) = node.get(&format!("/v1/assertions/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["status"], json!("quarantined"), "{one}");
    assert_eq!(one["quarantine"]["reason"], json!("authority_required"), "the claim says why: {one}");
    assert_eq!(one["released_at"], json!(null), "{one}");
    let (status, empty) = node.post("/v1/query", &json!({"concept_path": "finance/budget"})).await;
    assert_eq!(status, 200);
    assert_eq!(empty["results"], json!([]), "a quarantined claim is in no lens: {empty}");
    let history = query(&node, json!({"concept_path": "finance/budget", "lens": "history"})).await;
    assert_eq!(history["assertions"][0]["status"], json!("quarantined"), "{history}");
    // The cto has authority there: not quarantined.
    let owner = created(
        &node,
        "/v1/assert",
        json!({"concept_path": "finance/budget", "predicate": "owner", "value": "cfo", "agent_id": "cto"}),
    )
    .await;
    assert_eq!(owner["status"], json!("active"), "{owner}");

    // Trigger 3: contradicting the cto (90 >= 80) on the same path and predicate.
    let protected = created(
        &node,
        "/v1/assert",
        json!({"concept_path": "infra/x", "predicate": "state", "value": "ok", "agent_id": "cto"}),
    )
    .await;
    let contradiction = created(&node, "/v1/assert", json!({"concept_path": "infra/x", "predicate": "state", "value": "down", "agent_id": "intern", "supersedes": [protected["id"]]})).await;
    created(
        &node,
        "/v1/assert",
        json!({"concept_path": "infra/x", "predicate": "state", "value": "ok", "agent_id": "agreeing-bot"}),
    )
    .await;
    let winner = query(&node, json!({"concept_path": "infra/x", "predicate": "state", "lens": "all"})).await;
    let agents: Vec<&str> =
        winner["assertions"].as_array().expect("list").iter().filter_map(|c| c["agent_id"].as_str()).collect();
    assert_eq!(agents, vec!["agreeing-bot", "cto"], "the contradiction is quarantined and supersedes nothing yet");

    // Trigger 1: an open breaker in quarantine mode.
    let (status, tripped) =
        node.post("/v1/admin/circuit-breaker/trip", &json!({"agent_id": "spammer", "reason": "test"})).await;
    assert_eq!(status, 200, "{tripped}");
    let spam = created(
        &node,
        "/v1/assert",
        json!({"concept_path": "misc/a", "predicate": "p", "value": 1, "agent_id": "spammer"}),
    )
    .await;
    // Votes cannot be quarantined: refused, naming the breaker.
    let (status, refused) =
        node.post("/v1/vote", &json!({"assertion_id": protected["id"], "agent_id": "spammer", "value": 1})).await;
    assert_eq!((status, refused["error"]["code"].clone()), (403, json!("circuit_breaker_tripped")), "{refused}");

    let listed = quarantined_list(&node, "").await;
    let reasons: Vec<(&Value, &Value)> = listed.iter().map(|c| (&c["id"], &c["quarantine"]["reason"])).collect();
    assert_eq!(
        reasons,
        vec![
            (&budget["id"], &json!("authority_required")),
            (&contradiction["id"], &json!("contradicts_protected_claim")),
            (&spam["id"], &json!("circuit_breaker_open")),
        ],
        "{listed:?}"
    );
    assert_eq!(quarantined_list(&node, "?agent_id=intern").await.len(), 2);
    assert_eq!(quarantined_list(&node, "?concept_prefix=infra").await.len(), 1);
    let page = node.get("/v1/admin/quarantine?limit=2").await.1;
    assert_eq!(page["quarantined"].as_array().map(Vec::len), Some(2));
    let rest =
        node.get(&format!("/v1/admin/quarantine?cursor={}", page["next_cursor"].as_str().expect("cursor"))).await.1;
    assert_eq!(rest["quarantined"][0]["id"], spam["id"], "{rest}");

    // Release the contradiction: it joins the lenses and its supersession takes effect now.
    let contradiction_id = contradiction["id"].as_str().expect("id");
    let (status, released) =
        node.post(&format!("/v1/admin/quarantine/{contradiction_id}/release"), &json!({"reason": "verified"})).await;
    assert_eq!(status, 200, "{released}");
    let all = query(&node, json!({"concept_path": "infra/x", "predicate": "state", "lens": "all"})).await;
    let agents: Vec<&str> =
        all["assertions"].as_array().expect("list").iter().filter_map(|c| c["agent_id"].as_str()).collect();
    assert_eq!(agents, vec!["agreeing-bot", "intern"], "released, and the cto's claim is now superseded");
    let (status, again) = node.post(&format!("/v1/admin/quarantine/{contradiction_id}/release"), &json!({})).await;
    assert_eq!((status, again["error"]["code"].clone()), (409, json!("not_quarantined")));
    // Reject the budget claim: retracted, never in a lens.
    let budget_id = budget["id"].as_str().expect("id");
    let (status, rejected) = node.post_raw(&format!("/v1/admin/quarantine/{budget_id}/reject"), "").await;
    assert_eq!(status, 200, "{rejected}");
    let (_, fetched) = node.get(&format!("/v1/assertions/{budget_id}")).await;
    assert_eq!(fetched["status"], json!("retracted"), "{fetched}");
    assert_eq!(quarantined_list(&node, "").await.len(), 1, "only the spam is left");
    let (status, bad) = node.post("/v1/admin/quarantine/nope/release", &json!({})).await;
    assert_eq!(status, 400, "{bad}");
    let (status, bad) =
        node.post(&format!("/v1/admin/quarantine/{budget_id}/release"), &json!({"resaon": "typo"})).await;
    assert_eq!((status, bad["error"]["code"].clone()), (400, json!("unknown_field")));

    // The by-agent index lists every claim of the intern, any status.
    let (status, by_agent) = node.get("/v1/assertions?agent_id=intern").await;
    assert_eq!(status, 200, "{by_agent}");
    let statuses: Vec<&Value> = by_agent["assertions"].as_array().expect("list").iter().map(|c| &c["status"]).collect();
    assert_eq!(statuses, vec![&json!("retracted"), &json!("active")]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_manual_automatic_and_half_open() {
    let node = TestNode::start_with(|c| {
        c.circuit_breaker.max_writes_per_sec = 5;
        c.circuit_breaker.max_invalid_per_sec = 3;
        c.circuit_breaker.open_seconds = 1;
        c.circuit_breaker.half_open_probes = 2;
    })
    .await;
    let claim =
        |agent: &str, n: usize| json!({"concept_path": "cb/test", "predicate": "p", "value": n, "agent_id": agent});

    // Manual trip: 403 naming the breaker, until reset.
    let (status, tripped) =
        node.post("/v1/admin/circuit-breaker/trip", &json!({"agent_id": "bad-bot", "reason": "runbook step 2"})).await;
    assert_eq!((status, tripped["state"].clone()), (200, json!("open")), "{tripped}");
    let (status, refused) = node.post("/v1/assert", &claim("bad-bot", 0)).await;
    assert_eq!((status, refused["error"]["code"].clone()), (403, json!("circuit_breaker_tripped")), "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("bad-bot") && m.contains("runbook step 2")));
    let (_, open) = node.get("/v1/admin/circuit-breaker").await;
    assert_eq!(open["breakers"][0]["agent_id"], json!("bad-bot"), "{open}");
    let (status, _) = node.post("/v1/admin/circuit-breaker/reset", &json!({"agent_id": "bad-bot"})).await;
    assert_eq!(status, 200);
    let (status, _) = node.post("/v1/assert", &claim("bad-bot", 1)).await;
    assert_eq!(status, 201);
    let (status, again) = node.post("/v1/admin/circuit-breaker/reset", &json!({"agent_id": "bad-bot"})).await;
    assert_eq!((status, again["error"]["code"].clone()), (409, json!("breaker_not_open")));
    let (status, _) = node.post("/v1/admin/circuit-breaker/trip", &json!({"agent_id": ""})).await;
    assert_eq!(status, 422);

    // Automatic: over 5 writes per second opens the breaker; refusals are 429 with Retry-After.
    let mut saw_429 = false;
    for n in 0..30 {
        let response =
            node.client.post(format!("{}/v1/assert", node.url)).json(&claim("fast-bot", n)).send().await.expect("send");
        if response.status().as_u16() == 429 {
            assert!(response.headers().get("retry-after").is_some());
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"]["code"], json!("circuit_breaker_open"), "{body}");
            saw_429 = true;
        }
    }
    assert!(saw_429, "30 writes in well under a second went through a limit of 5 per second");
    let mut recorded = Value::Null;
    for _ in 0..50 {
        recorded = node.get("/v1/admin/circuit-breaker?agent_id=fast-bot&state=all").await.1;
        if recorded["breakers"][0]["cause"] == json!("write_rate") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(recorded["breakers"][0]["cause"], json!("write_rate"), "{recorded}");
    // Half-open after the open period: probes (one per second) close it after 2 successes.
    let mut closed = false;
    for _ in 0..80 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let _ = node.post("/v1/assert", &claim("fast-bot", 99)).await;
        let (_, state) = node.get("/v1/admin/circuit-breaker?agent_id=fast-bot&state=all").await;
        if state["breakers"][0]["state"] == json!("closed") {
            assert!(state["breakers"][0]["closed_reason"].as_str().is_some_and(|r| r.contains("probe")), "{state}");
            closed = true;
            break;
        }
    }
    assert!(closed, "the half-open breaker closed after successful probes");

    // Invalid requests: over 3 per second opens the breaker too.
    for _ in 0..6 {
        let (status, _) = node.post("/v1/assert", &json!({"concept_path": "cb/test", "predicate": "p", "value": 1, "agent_id": "sloppy", "confidence": 7})).await;
        assert_eq!(status, 422);
    }
    let mut cause = Value::Null;
    for _ in 0..50 {
        cause = node.get("/v1/admin/circuit-breaker?agent_id=sloppy").await.1["breakers"][0]["cause"].clone();
        if !cause.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(cause, json!("invalid_rate"));
    let (status, _) = node.post("/v1/assert", &claim("sloppy", 1)).await;
    assert_eq!(status, 429);
    let (status, bad) = node.get("/v1/admin/circuit-breaker?state=ajar").await;
    assert_eq!((status, bad["error"]["code"].clone()), (400, json!("invalid_state")));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_required_and_checked() {
    use ed25519_dalek::Signer;
    let node = TestNode::start_with(|c| {
        c.security.require_signatures = true;
        c.circuit_breaker.max_invalid_per_sec = 3;
    })
    .await;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let agent = hex::encode(key.verifying_key().as_bytes());
    let body = json!({"concept_path": "signed/claims", "predicate": "p", "value": {"b": 2, "a": [1, "x"]}, "agent_id": agent, "confidence": 0.75, "request_id": "r-1"});
    let draft = serde_json::from_value::<stemedb::model::assertion::AssertRequest>(body.clone())
        .expect("parse")
        .validate(stemedb::model::assertion::ValueLimits { max_bytes: 65536, max_depth: 64 }, 4)
        .expect("valid");
    let signature = hex::encode(key.sign(&stemedb::model::signing::assertion_bytes(&draft)).to_bytes());

    // Unsigned requests naming the agent prove nothing: many of them must not trip its breaker.
    for _ in 0..10 {
        let (status, unsigned) = node.post("/v1/assert", &body).await;
        assert_eq!((status, unsigned["error"]["code"].clone()), (401, json!("signature_required")), "{unsigned}");
    }
    let mut upper = body.clone();
    upper["agent_id"] = json!(agent.to_uppercase());
    upper["signature"] = json!(signature);
    let (status, bad) = node.post("/v1/assert", &upper).await;
    assert_eq!(
        (status, bad["error"]["code"].clone()),
        (401, json!("agent_id_not_public_key")),
        "one spelling per key: {bad}"
    );
    let mut tampered = body.clone();
    tampered["value"] = json!({"a": [1, "x"], "b": 3});
    tampered["signature"] = json!(signature);
    let (status, bad) = node.post("/v1/assert", &tampered).await;
    assert_eq!((status, bad["error"]["code"].clone()), (401, json!("invalid_signature")), "{bad}");
    let mut not_a_key = body.clone();
    not_a_key["agent_id"] = json!("ops-bot");
    not_a_key["signature"] = json!(signature);
    let (status, bad) = node.post("/v1/assert", &not_a_key).await;
    assert_eq!((status, bad["error"]["code"].clone()), (401, json!("agent_id_not_public_key")), "{bad}");
    // Key order and whitespace of the value do not matter: the signature covers canonical JSON.
    let signed_raw = format!(
        r#"{{"concept_path":"signed/claims","predicate":"p","value":{{ "a" : [1,"x"], "b":2 }},"agent_id":"{agent}","confidence":0.75,"request_id":"r-1","signature":"{signature}"}}"#
    );
    let (status, created_claim) = node.post_raw("/v1/assert", &signed_raw).await;
    assert_eq!(status, 201, "{created_claim}");
    let (status, listed) = node.get(&format!("/v1/assertions?agent_id={agent}")).await;
    assert_eq!(status, 200);
    assert_eq!(listed["assertions"].as_array().map(Vec::len), Some(1));

    // Votes: signed by the voter over (assertion_id, agent_id, value).
    let id = created_claim["id"].as_str().expect("id");
    let (status, unsigned_vote) =
        node.post("/v1/vote", &json!({"assertion_id": id, "agent_id": agent, "value": 1})).await;
    assert_eq!(status, 401, "{unsigned_vote}");
    let vote_signature = hex::encode(key.sign(&stemedb::model::signing::vote_bytes(id, &agent, 1)).to_bytes());
    let (status, vote) = node
        .post("/v1/vote", &json!({"assertion_id": id, "agent_id": agent, "value": 1, "signature": vote_signature}))
        .await;
    assert_eq!(status, 200, "{vote}");
    let (status, replayed) = node
        .post("/v1/vote", &json!({"assertion_id": id, "agent_id": agent, "value": -1, "signature": vote_signature}))
        .await;
    assert_eq!(status, 401, "a signature for +1 does not sign -1: {replayed}");
    node.stop().await;
}
