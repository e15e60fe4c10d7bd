//! Issue 20 §2, §3, §6: bearer tokens with roles on both HTTP APIs, tokens bound to agent ids,
//! rate limits per endpoint class and caller, the audit log of admin actions, the refusal to
//! serve a network address without tokens, and the SIGHUP reload of tokens and limits.

mod common;

use std::time::{Duration, Instant};

use common::{NodeProcess, TestNode};
use serde_json::{json, Value};
use sha2::Digest;
use stemedb::config::{Config, TokenConfig, TokenRole};

fn token(name: &str, secret: &str, role: TokenRole, agents: &[&str]) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        sha256: hex::encode(sha2::Sha256::digest(secret.as_bytes())),
        role,
        agents: agents.iter().map(|a| a.to_string()).collect(),
    }
}

fn with_tokens(config: &mut Config) {
    config.security.tokens = vec![
        token("reader", "r-secret", TokenRole::Read, &[]),
        token("writer", "w-secret", TokenRole::Write, &[]),
        token("ops", "a-secret", TokenRole::Admin, &[]),
        token("bot", "b-secret", TokenRole::Write, &["ops-bot"]),
    ];
    config.security.admin_token = "legacy-admin".into();
}

/// Sends `method url` with `body` and the bearer `secret` (none: no header).
async fn call(node: &TestNode, method: &str, url: &str, body: Option<Value>, secret: Option<&str>) -> (u16, Value) {
    let mut request = node.client.request(method.parse().expect("method"), url);
    if let Some(secret) = secret {
        request = request.bearer_auth(secret);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn claim(path: &str, agent: &str) -> Value {
    json!({"concept_path": path, "predicate": "p", "value": 1, "agent_id": agent})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_allowed_and_refused_on_each_endpoint_class() {
    let node = TestNode::start_with(with_tokens).await;
    let (api, admin) = (node.url.clone(), node.admin_url.clone());
    // (class, method, url, body): one or two endpoints of each class on both APIs.
    let endpoints: Vec<(&str, &str, String, Option<Value>)> = vec![
        ("read", "POST", format!("{api}/v1/query"), Some(json!({"concept_path": "roles/x"}))),
        ("read", "GET", format!("{api}/v1/concepts?prefix=roles"), None),
        ("read", "GET", format!("{admin}/cluster/members"), None),
        ("write", "POST", format!("{api}/v1/assert"), Some(claim("roles/x", "anyone"))),
        (
            "write",
            "POST",
            format!("{api}/v1/authority/grants"),
            Some(json!({"grantor": "g", "grantee": "h", "concept_prefix": "roles", "level": 10})),
        ),
        ("admin", "GET", format!("{api}/v1/admin/storage/stats"), None),
        ("admin", "POST", format!("{api}/v1/admin/circuit-breaker/reset"), Some(json!({"agent_id": "nobody"}))),
        ("admin", "POST", format!("{admin}/admin/shards/rebalance"), Some(json!({"shard_id": 99}))),
    ];
    let rank = |class: &str| ["read", "write", "admin"].iter().position(|c| *c == class).expect("class");
    for (secret, held) in
        [("r-secret", "read"), ("w-secret", "write"), ("a-secret", "admin"), ("legacy-admin", "admin")]
    {
        for (class, method, url, body) in &endpoints {
            let (status, answer) = call(&node, method, url, body.clone(), Some(secret)).await;
            if rank(held) >= rank(class) {
                let code = answer["error"]["code"].as_str().unwrap_or("");
                assert!(
                    !["token_required", "invalid_token", "role_insufficient"].contains(&code),
                    "{held} token on {method} {url}: {status} {answer}"
                );
            } else {
                assert_eq!(status, 403, "{held} token on {method} {url}: {answer}");
                assert_eq!(answer["error"]["code"], json!("role_insufficient"), "{answer}");
                assert_eq!(answer["error"]["details"]["needs"], json!(class));
            }
        }
    }
    for (_, method, url, body) in &endpoints {
        let (status, answer) = call(&node, method, url, body.clone(), None).await;
        assert_eq!((status, answer["error"]["code"].clone()), (401, json!("token_required")), "{method} {url}");
        let (status, answer) = call(&node, method, url, body.clone(), Some("guessed")).await;
        assert_eq!((status, answer["error"]["code"].clone()), (401, json!("invalid_token")), "{method} {url}");
    }
    // Health checks and metrics stay open to load balancers and Prometheus.
    for url in [
        format!("{api}/health"),
        format!("{api}/v1/health"),
        format!("{api}/metrics"),
        format!("{admin}/cluster/health"),
    ] {
        let status = node.client.get(&url).send().await.expect("send").status().as_u16();
        assert_eq!(status, 200, "{url}");
    }
    let metrics = node.client.get(format!("{api}/metrics")).send().await.expect("send").text().await.expect("text");
    assert!(
        common::series_value(&metrics, "stemedb_http_auth_refused_total{reason=\"role_insufficient\"}").unwrap_or(0.0)
            > 0.0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_token_writes_only_as_its_agents() {
    let node = TestNode::start_with(with_tokens).await;
    let api = node.url.clone();
    let (status, mine) =
        call(&node, "POST", &format!("{api}/v1/assert"), Some(claim("bound/a", "ops-bot")), Some("b-secret")).await;
    assert_eq!(status, 201, "{mine}");
    let (status, answer) =
        call(&node, "POST", &format!("{api}/v1/assert"), Some(claim("bound/b", "cto")), Some("b-secret")).await;
    assert_eq!((status, answer["error"]["code"].clone()), (403, json!("agent_not_allowed")), "{answer}");
    assert_eq!(answer["error"]["details"]["allowed"], json!(["ops-bot"]));
    // A batch: items are independent, the other agent's item alone is refused.
    let batch = json!({"assertions": [claim("bound/c", "ops-bot"), claim("bound/d", "cto")]});
    let (status, answer) = call(&node, "POST", &format!("{api}/v1/assert/batch"), Some(batch), Some("b-secret")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["results"][0]["status"].clone(), answer["results"][1]["status"].clone()),
        (json!(201), json!(403))
    );
    assert_eq!(answer["results"][1]["error"]["code"], json!("agent_not_allowed"));
    let id = mine["id"].clone();
    let (status, answer) = call(
        &node,
        "POST",
        &format!("{api}/v1/vote"),
        Some(json!({"assertion_id": id, "agent_id": "cto", "value": 1})),
        Some("b-secret"),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let (status, _) = call(
        &node,
        "POST",
        &format!("{api}/v1/retract"),
        Some(json!({"assertion_id": id, "agent_id": "cto"})),
        Some("b-secret"),
    )
    .await;
    assert_eq!(status, 403);
    let grant = json!({"grantor": "cto", "grantee": "ops-bot", "concept_prefix": "bound", "level": 10});
    let (status, _) = call(&node, "POST", &format!("{api}/v1/authority/grants"), Some(grant), Some("b-secret")).await;
    assert_eq!(status, 403);
    // Nothing refused was written; the unbound writer may write as anyone.
    let (_, read) =
        call(&node, "POST", &format!("{api}/v1/query"), Some(json!({"concept_path": "bound/b"})), Some("r-secret"))
            .await;
    assert_eq!(read["results"].as_array().map_or(0, Vec::len), 0, "{read}");
    let (status, _) =
        call(&node, "POST", &format!("{api}/v1/assert"), Some(claim("bound/b", "cto")), Some("w-secret")).await;
    assert_eq!(status, 201);
    let (status, _) = call(
        &node,
        "POST",
        &format!("{api}/v1/vote"),
        Some(json!({"assertion_id": id, "agent_id": "ops-bot", "value": 1})),
        Some("b-secret"),
    )
    .await;
    assert_eq!(status, 200);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_per_caller_and_recover() {
    let node = TestNode::start_with(|config| {
        with_tokens(config);
        config.rate_limits.write_per_second = 5;
    })
    .await;
    let url = format!("{}/v1/assert", node.url);
    let mut limited = None;
    for i in 0..50 {
        let response = node
            .client
            .post(&url)
            .bearer_auth("w-secret")
            .json(&claim(&format!("rate/{i}"), "w"))
            .send()
            .await
            .expect("send");
        if response.status().as_u16() == 429 {
            let retry_after: u64 = response.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
            let body: Value = response.json().await.expect("json");
            limited = Some((retry_after, body));
            break;
        }
        assert_eq!(response.status().as_u16(), 201);
    }
    let (retry_after, body) = limited.expect("50 writes at once went over 5/s");
    assert_eq!(body["error"]["code"], json!("rate_limited"), "{body}");
    assert_eq!(body["error"]["details"]["class"], json!("write"));
    assert!(retry_after >= 1);
    // Another caller has its own bucket, and reads have no limit here.
    let (status, _) = call(&node, "POST", &url, Some(claim("rate/other", "x")), Some("a-secret")).await;
    assert_eq!(status, 201);
    for _ in 0..20 {
        let (status, _) = call(
            &node,
            "POST",
            &format!("{}/v1/query", node.url),
            Some(json!({"concept_path": "rate/1"})),
            Some("w-secret"),
        )
        .await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, answer) = call(&node, "POST", &url, Some(claim("rate/after", "w")), Some("w-secret")).await;
    assert_eq!(status, 201, "recovered after Retry-After: {answer}");
    let metrics =
        node.client.get(format!("{}/metrics", node.url)).send().await.expect("send").text().await.expect("text");
    assert!(common::series_value(&metrics, "stemedb_http_rate_limited_total{class=\"write\"}").unwrap_or(0.0) >= 1.0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_are_audited_with_who_did_them() {
    let node = TestNode::start_with(with_tokens).await;
    let (api, admin) = (node.url.clone(), node.admin_url.clone());
    let trip = json!({"agent_id": "noisy", "reason": "audit test"});
    let (status, _) =
        call(&node, "POST", &format!("{api}/v1/admin/circuit-breaker/trip"), Some(trip.clone()), Some("a-secret"))
            .await;
    assert_eq!(status, 200);
    let (status, _) =
        call(&node, "POST", &format!("{api}/v1/admin/circuit-breaker/trip"), Some(trip), Some("w-secret")).await;
    assert_eq!(status, 403);
    let grant = json!({"grantor": "cto", "grantee": "ops-bot", "concept_prefix": "audit", "level": 10});
    call(&node, "POST", &format!("{api}/v1/authority/grants"), Some(grant), Some("w-secret")).await;
    let (status, _) = call(
        &node,
        "POST",
        &format!("{admin}/cluster/members"),
        Some(json!({"id": 0, "raft_addr": "x"})),
        Some("a-secret"),
    )
    .await;
    assert_eq!(status, 422);
    // Reads are not actions; attempts without a valid token are logged, not stored (they could
    // otherwise push the real entries out).
    call(&node, "GET", &format!("{api}/v1/admin/storage/stats"), None, Some("a-secret")).await;
    for secret in [None, Some("guessed")] {
        let (status, _) = call(
            &node,
            "POST",
            &format!("{api}/v1/admin/circuit-breaker/trip"),
            Some(json!({"agent_id": "x"})),
            secret,
        )
        .await;
        assert_eq!(status, 401);
    }

    let (status, page) = call(&node, "GET", &format!("{api}/v1/admin/audit?limit=2"), None, Some("a-secret")).await;
    assert_eq!(status, 200, "{page}");
    let (_, rest) = call(
        &node,
        "GET",
        &format!("{api}/v1/admin/audit?cursor={}", page["next_cursor"].as_str().expect("more")),
        None,
        Some("a-secret"),
    )
    .await;
    let entries: Vec<Value> = page["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(rest["entries"].as_array().into_iter().flatten())
        .cloned()
        .collect();
    let seen: Vec<(String, String, u64, String)> = entries
        .iter()
        .map(|e| {
            (
                e["caller"].as_str().unwrap_or_default().to_string(),
                e["path"].as_str().unwrap_or_default().to_string(),
                e["status"].as_u64().unwrap_or_default(),
                e["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expected = vec![
        ("ops".to_string(), "/cluster/members".to_string(), 422, "refused".to_string()),
        (
            "writer".into(),
            "/v1/authority/grants".into(),
            entries[1]["status"].as_u64().unwrap_or(0),
            entries[1]["outcome"].as_str().unwrap_or("").into(),
        ),
        ("writer".into(), "/v1/admin/circuit-breaker/trip".into(), 403, "refused".into()),
        ("ops".into(), "/v1/admin/circuit-breaker/trip".into(), 200, "done".into()),
    ];
    assert_eq!(seen, expected, "newest first: {entries:?}");
    assert_eq!(entries[3]["request"]["agent_id"], json!("noisy"), "what it changed");
    assert_eq!(entries[3]["role"], json!("admin"));
    assert_eq!(entries[3]["node"], json!(1));
    // Listing it needs admin rights.
    let (status, _) = call(&node, "GET", &format!("{api}/v1/admin/audit"), None, Some("w-secret")).await;
    assert_eq!(status, 403);
    let (status, answer) =
        call(&node, "GET", &format!("{api}/v1/admin/audit?cursor=nope"), None, Some("a-secret")).await;
    assert_eq!((status, answer["error"]["code"].clone()), (400, json!("invalid_cursor")));
    node.stop().await;
}

/// Without tokens, a loopback node works as before: reads and writes open, admin by loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_a_loopback_node_works_as_before() {
    let node = TestNode::start().await;
    let (status, _) = node.post("/v1/assert", &claim("open/a", "anyone")).await;
    assert_eq!(status, 201);
    let (status, _) = node.get("/v1/admin/storage/stats").await;
    assert_eq!(status, 200, "admin from loopback without a token");
    let (status, page) = node.get("/v1/admin/audit").await;
    assert_eq!(status, 200, "{page}");
    // A page that reached the node through DNS rebinding names its own host: it reads nothing,
    // changes nothing and has no admin rights; the same requests naming localhost are served,
    // and health checks stay open.
    let rebound = |method: &str, path: &str, host: &str| {
        node.client.request(method.parse().expect("method"), format!("{}{path}", node.url)).header("host", host)
    };
    for (method, path) in [("GET", "/v1/admin/storage/stats"), ("GET", "/v1/concepts"), ("POST", "/v1/assert")] {
        let response = rebound(method, path, "evil.example:18180")
            .header("origin", "http://evil.example:18180")
            .json(&claim("open/b", "anyone"))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 403, "{method} {path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "loopback_host_required", "{method} {path}: {body}");
        assert_eq!(body["error"]["details"]["host"], "evil.example:18180");
    }
    let (status, _) = node.get("/v1/concepts").await;
    assert_eq!(status, 200, "a read naming a loopback address");
    let stats = rebound("GET", "/v1/admin/storage/stats", "localhost:18180").send().await.expect("send");
    assert_eq!(stats.status().as_u16(), 200, "the same admin read naming localhost");
    let health = rebound("GET", "/health", "evil.example:18180").send().await.expect("send");
    assert_eq!(health.status().as_u16(), 200, "health checks stay open");
    let refusals = node.client.get(format!("{}/metrics", node.url)).send().await.expect("send");
    let text = refusals.text().await.expect("text");
    assert!(text.contains("stemedb_http_auth_refused_total{reason=\"loopback_host\"} 3"), "three refusals counted");
    node.stop().await;
}

#[tokio::test]
async fn a_node_on_a_network_address_refuses_to_start_without_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("stemedb.toml");
    std::fs::write(&config, "[server]\napi_addr = \"0.0.0.0:0\"\n").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stemedb"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a loopback address") && stderr.contains("security.allow_unauthenticated"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_tokens_and_rate_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("stemedb.toml");
    let table = |name: &str, secret: &str| {
        format!(
            "[[security.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"admin\"\n",
            hex::encode(sha2::Sha256::digest(secret.as_bytes()))
        )
    };
    std::fs::write(&file, table("old", "old-secret")).expect("write");
    let config_arg = file.to_str().expect("utf-8").to_string();
    let mut process = NodeProcess::spawn_with_args(&dir.path().join("data"), 1, &["--config", &config_arg], &[]);
    let url = process.wait_listening(Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    common::wait_healthy(&client, &url, Duration::from_secs(60)).await;
    let status_with = |secret: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .get(format!("{url}/v1/admin/storage/stats"))
                .bearer_auth(secret)
                .send()
                .await
                .expect("send")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status_with("old-secret").await, 200);
    assert_eq!(status_with("new-secret").await, 401);

    std::fs::write(&file, format!("{}[rate_limits]\nadmin_per_second = 1\n", table("new", "new-secret")))
        .expect("write");
    // SAFETY: kill(2) with a child's pid has no memory-safety preconditions.
    unsafe { libc::kill(process.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_with("new-secret").await != 200 {
        assert!(Instant::now() < deadline, "the new token never worked; output:\n{}", process.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_with("old-secret").await, 401, "the old token is gone");
    let statuses: Vec<u16> = futures_statuses(&status_with).await;
    assert!(statuses.contains(&429), "the new admin limit of 1/s applies: {statuses:?}");

    // An invalid config is refused and the running one kept.
    std::fs::write(&file, "[[security.tokens]]\nname = \"broken\"\n").expect("write");
    process.reload_until("keeping the running one").await;
    // Past the 1/s limit's wait (the refused reload changed nothing), the token still works.
    let deadline = Instant::now() + Duration::from_secs(10);
    let still = loop {
        match status_with("new-secret").await {
            429 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            status => break status,
        }
    };
    assert_eq!(still, 200, "still the reloaded token");
}

#[tokio::test]
async fn an_admin_action_whose_client_went_away_is_audited_as_cancelled() {
    let node = TestNode::start_with(with_tokens).await;
    // Adding a node that never answers waits for it to come UP (up to 120 s); this client gives up
    // after half a second, while the request is still running.
    // (A node just started may answer 503 until its cluster metadata is bootstrapped.)
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().expect("client");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = impatient
            .post(format!("{}/cluster/members", node.admin_url))
            .bearer_auth("a-secret")
            .json(&json!({"id": 7, "raft_addr": "127.0.0.1:1"}))
            .send()
            .await;
        match sent {
            Err(error) if error.is_timeout() => break,
            Ok(answer) if answer.status() == 503 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => panic!("the request should still be running: {other:?}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let entry = loop {
        let (status, page) = call(&node, "GET", &format!("{}/v1/admin/audit", node.url), None, Some("a-secret")).await;
        assert_eq!(status, 200, "{page}");
        let found = page["entries"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["path"] == "/cluster/members" && e["outcome"] == "cancelled"))
            .cloned();
        if let Some(entry) = found {
            break entry;
        }
        assert!(Instant::now() < deadline, "no audit entry of the abandoned request: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((entry["outcome"].as_str(), entry["status"].as_u64()), (Some("cancelled"), Some(499)), "{entry}");
    assert_eq!(entry["caller"], json!("ops"), "{entry}");
    node.stop().await;
}

#[tokio::test]
async fn a_reload_without_tokens_is_refused_on_a_node_open_to_the_network() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("stemedb.toml");
    let table = format!(
        "[[security.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nrole = \"admin\"\n",
        hex::encode(sha2::Sha256::digest(b"ops-secret"))
    );
    std::fs::write(&file, &table).expect("write");
    let config_arg = file.to_str().expect("utf-8").to_string();
    // The dashboard (which serves both APIs) on every address: the node is open to the network.
    let args = ["--config", &config_arg, "--dashboard-addr", "0.0.0.0:0"];
    let mut process = NodeProcess::spawn_with_args(&dir.path().join("data"), 1, &args, &[]);
    let url = process.wait_listening(Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    common::wait_healthy(&client, &url, Duration::from_secs(60)).await;
    let status_with = |secret: Option<&'static str>| {
        let mut request = client.get(format!("{url}/v1/admin/storage/stats"));
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        async move { request.send().await.expect("send").status().as_u16() }
    };
    assert_eq!((status_with(Some("ops-secret")).await, status_with(None).await), (200, 401));
    // The same file without its tokens: refused (the config check names the open address), the
    // running tokens kept.
    std::fs::write(&file, "[logging]\nlevel = \"warn\"\n").expect("write");
    process.reload_until("keeping the running one error=config error: server.dashboard_addr is 0.0.0.0:0").await;
    assert_eq!((status_with(Some("ops-secret")).await, status_with(None).await), (200, 401), "still guarded");
}

async fn futures_statuses<F, Fut>(status_with: &F) -> Vec<u16>
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let mut out = Vec::new();
    for _ in 0..5 {
        out.push(status_with("new-secret").await);
    }
    out
}

/// `server.max_concurrent_requests` bounds each HTTP port on its own: with the only permit of
/// a port held by a request whose body never ends, the next request there is `503 overloaded`
/// with `Retry-After` at once, its health check still answers, and the other port still serves.
#[tokio::test]
async fn each_port_sheds_requests_beyond_its_concurrency_limit_but_not_health_checks() {
    use tokio::io::AsyncWriteExt;
    let node = TestNode::start_with(|c| c.server.max_concurrent_requests = 1).await;
    let ports = [(&node.url, "/v1/assert", "/v1/health"), (&node.admin_url, "/cluster/sync", "/cluster/health")];
    for (i, (base, slow_path, health)) in ports.iter().enumerate() {
        let other = ports[1 - i].0;
        let addr = base.trim_start_matches("http://");
        let mut held = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!("POST {slow_path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 100\r\n\r\n{{");
        held.write_all(head.as_bytes()).await.expect("send the start of a request");
        let deadline = Instant::now() + Duration::from_secs(10);
        let shed = loop {
            let response = node.client.get(format!("{base}/openapi.json")).send().await.expect("send");
            if response.status().as_u16() == 503 {
                break response;
            }
            assert!(Instant::now() < deadline, "{base}: never shed a request beyond the limit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(shed.headers()["retry-after"], "1");
        let body: Value = shed.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "overloaded", "{base}");
        let health = node.client.get(format!("{base}{health}")).send().await.expect("send");
        assert_eq!(health.status().as_u16(), 200, "{base}: health checks pass the limit");
        let elsewhere = node.client.get(format!("{other}/openapi.json")).send().await.expect("send");
        assert_eq!(elsewhere.status().as_u16(), 200, "{other} has its own permits");
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.client.get(format!("{base}/openapi.json")).send().await.expect("send").status().as_u16() != 200 {
            assert!(Instant::now() < deadline, "{base}: the permit came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    node.stop().await;
}
