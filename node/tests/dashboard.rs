//! Issue 19: the web dashboard server (server.dashboard_addr). Its page and assets come from the
//! binary with headers that keep other origins out; under /api and /cluster-api it serves this
//! node's own client API and cluster admin with the same tokens and roles; /session tells the page
//! whether to ask for a token. (The page itself, in a browser: scripts/dashboard-test.py.)

mod common;

use common::TestNode;
use serde_json::Value;
use sha2::Digest;
use stemedb::config::{TokenConfig, TokenRole};

async fn get(node: &TestNode, path: &str, token: Option<&str>) -> (u16, reqwest::header::HeaderMap, String) {
    let base = node.dashboard_url.as_ref().expect("the dashboard is on");
    let mut request = node.client.get(format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("send");
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    (status, headers, response.text().await.expect("body"))
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).expect("JSON")
}

#[tokio::test]
async fn the_dashboard_serves_its_embedded_page_and_this_nodes_apis() {
    let node = TestNode::start_with(|c| c.server.dashboard_addr = "127.0.0.1:0".into()).await;
    let (status, headers, page) = get(&node, "/", None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>StemeDB</title>") && page.contains("src=\"app.js\""), "{page}");
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let policy = headers["content-security-policy"].to_str().expect("ascii");
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    for (asset, kind) in [("/app.js", "text/javascript"), ("/app.css", "text/css")] {
        let (status, headers, body) = get(&node, asset, None).await;
        assert_eq!(status, 200, "{asset}");
        assert!(headers["content-type"].to_str().expect("ascii").starts_with(kind), "{asset}");
        assert!(body.len() > 1000, "{asset} is the embedded file");
    }
    let (status, _, session) = get(&node, "/session", None).await;
    assert_eq!(status, 200);
    let session = json(&session);
    assert_eq!(session["tokens_required"], false);
    assert_eq!(session["node_id"], 1);
    // The node's own APIs, as on 18180 and 18181.
    let (status, _, health) = get(&node, "/cluster-api/cluster/health", None).await;
    assert_eq!((status, json(&health)["status"].as_str()), (200, Some("healthy")));
    let (status, _, list) = get(&node, "/api/v1/admin/quarantine", None).await;
    assert_eq!((status, json(&list)["quarantined"].as_array().map(Vec::len)), (200, Some(0)));
    let (status, _, metrics) = get(&node, "/api/metrics", None).await;
    assert!(status == 200 && metrics.contains("stemedb_write_duration_seconds"), "{status}");
    // Anything else is a JSON 404 that names where things are.
    let (status, headers, body) = get(&node, "/nowhere", None).await;
    assert_eq!((status, json(&body)["error"]["code"].as_str()), (404, Some("not_found")));
    assert!(headers.contains_key("content-security-policy"), "every answer carries the headers");
    node.stop().await;
}

#[tokio::test]
async fn the_dashboards_apis_need_the_same_tokens() {
    let node = TestNode::start_with(|c| {
        c.server.dashboard_addr = "127.0.0.1:0".into();
        c.security.tokens = vec![
            TokenConfig {
                name: "ops".into(),
                sha256: hex::encode(sha2::Sha256::digest(b"ops-secret")),
                role: TokenRole::Admin,
                agents: vec![],
            },
            TokenConfig {
                name: "reader".into(),
                sha256: hex::encode(sha2::Sha256::digest(b"read-secret")),
                role: TokenRole::Read,
                agents: vec![],
            },
        ];
    })
    .await;
    let (_, _, session) = get(&node, "/session", None).await;
    assert_eq!(json(&session)["tokens_required"], true);
    // The page and its assets need no token; the APIs do.
    assert_eq!(get(&node, "/", None).await.0, 200);
    let (status, _, body) = get(&node, "/api/v1/admin/quarantine", None).await;
    assert_eq!((status, json(&body)["error"]["code"].as_str()), (401, Some("token_required")));
    let (status, _, body) = get(&node, "/api/v1/admin/quarantine", Some("read-secret")).await;
    assert_eq!((status, json(&body)["error"]["code"].as_str()), (403, Some("role_insufficient")));
    assert_eq!(get(&node, "/api/v1/admin/quarantine", Some("ops-secret")).await.0, 200);
    let (status, _, body) = get(&node, "/cluster-api/cluster/members", None).await;
    assert_eq!((status, json(&body)["error"]["code"].as_str()), (401, Some("token_required")));
    assert_eq!(get(&node, "/cluster-api/cluster/members", Some("read-secret")).await.0, 200);
    node.stop().await;
}

#[tokio::test]
async fn a_dashboard_address_in_use_fails_the_start_but_auto_steps_aside() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::test_config(dir.path());
    config.server.dashboard_addr = addr.to_string();
    let config = config.validate().expect("valid");
    let refused = stemedb::Listeners::bind(&config).await.err().expect("an explicit address in use is an error");
    assert!(refused.to_string().contains(&addr.to_string()), "{refused}");
    // `auto` uses the client API's IP and port 18188, and steps aside when that is taken.
    let mut config = common::test_config(dir.path());
    config.server.dashboard_addr = "auto".into();
    let config = config.validate().expect("valid");
    assert_eq!(config.dashboard_bind().map(|(a, optional)| (a.port(), optional)), Some((18188, true)));
    // Held here, or already by something else on this machine: either way taken.
    let _holder = std::net::TcpListener::bind("127.0.0.1:18188");
    let listeners = stemedb::Listeners::bind(&config).await.expect("auto never fails the start");
    assert!(listeners.dashboard.is_none(), "auto serves no dashboard when its port is taken");
}

#[tokio::test]
async fn a_change_from_another_sites_page_is_refused_the_dashboards_own_goes_through() {
    // A loopback node without tokens: the kind another site's page could reach through a browser.
    let node = TestNode::start_with(|c| c.server.dashboard_addr = "127.0.0.1:0".into()).await;
    let base = node.dashboard_url.clone().expect("the dashboard is on");
    let trip = |origin: &str| {
        node.client
            .post(format!("{base}/api/v1/admin/circuit-breaker/trip"))
            .header("origin", origin)
            .json(&serde_json::json!({"agent_id": "victim", "reason": "csrf test"}))
            .send()
    };
    let answer = trip("https://evil.example").await.expect("send");
    assert_eq!(answer.status().as_u16(), 403);
    let body: Value = answer.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "cross_origin_refused", "{body}");
    let (_, _, list) = get(&node, "/api/v1/admin/circuit-breaker?state=all", None).await;
    assert_eq!(json(&list)["breakers"].as_array().map(Vec::len), Some(0), "nothing was tripped: {list}");
    // The same change from the dashboard's own page, and from a client that sends no Origin.
    assert_eq!(trip(&base).await.expect("send").status().as_u16(), 200);
    let (status, _) = common::post_json(
        &node.client,
        &format!("{}/v1/admin/circuit-breaker/reset", node.url),
        &serde_json::json!({"agent_id": "victim"}),
    )
    .await;
    assert_eq!(status, 200);
    node.stop().await;
}
