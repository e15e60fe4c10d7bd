//! Epistemics on three real nodes: authority grants, circuit breakers and quarantine decisions
//! are replicated, so every node resolves the same authority, refuses the same agents and lists
//! the same quarantined claims, whichever node took the request.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

/// Polls `check` on every node until it holds on all of them (policy is applied by each node's
/// meta group replica, so a follower may lag the leader by a moment).
async fn on_every_node(
    cluster: &TestCluster,
    what: &str,
    check: impl Fn(u16, &Value) -> bool,
    request: impl Fn(u64) -> (String, Option<Value>),
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    'retry: loop {
        let mut answers = Vec::new();
        for id in cluster.running() {
            let (path, body) = request(id);
            let (status, answer) = match &body {
                Some(body) => cluster.post(id, &path, body).await?,
                None => cluster.get(id, &path).await?,
            };
            if !check(status, &answer) {
                anyhow::ensure!(Instant::now() < deadline, "{what}: node {id} answered {status} {answer}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'retry;
            }
            answers.push(answer);
        }
        return Ok(answers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_quarantine_are_the_same_on_every_node() -> anyhow::Result<()> {
    let env = vec![
        ("STEMEDB_AUTHORITY_ROOTS".to_string(), r#"[{agent_id="cto",level=90}]"#.to_string()),
        ("STEMEDB_QUARANTINE_REQUIRE_AUTHORITY_PREFIXES".to_string(), "[finance]".to_string()),
    ];
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, shards: 4, env, ..Default::default() }).await?;
    on_every_node(
        &cluster,
        "config root recorded",
        |s, a| s == 200 && a["roots"][0]["agent_id"] == json!("cto"),
        |_| ("/v1/authority/roots".into(), None),
    )
    .await?;

    // A grant made through node 2 gives the same authority and chain on every node.
    let (status, grant) = cluster
        .post(
            2,
            "/v1/authority/grants",
            &json!({"grantor": "cto", "grantee": "lead", "concept_prefix": "infra", "level": 80}),
        )
        .await?;
    assert_eq!(status, 201, "{grant}");
    let views = on_every_node(
        &cluster,
        "grant replicated",
        |s, a| s == 200 && a["authority"] == json!(80),
        |_| ("/v1/authority/agents/lead?concept_path=infra/db".into(), None),
    )
    .await?;
    assert!(views.iter().all(|v| v["chain"][0]["id"] == grant["id"]), "{views:?}");
    // A grant beyond the grantor's authority is refused through any node.
    let (status, refused) = cluster
        .post(
            3,
            "/v1/authority/grants",
            &json!({"grantor": "lead", "grantee": "x", "concept_prefix": "infra", "level": 81}),
        )
        .await?;
    assert_eq!(status, 403, "{refused}");

    // A breaker tripped through node 1 refuses the agent's writes on every node.
    let (status, tripped) = cluster
        .post(1, "/v1/admin/circuit-breaker/trip", &json!({"agent_id": "bad-bot", "reason": "chaos drill"}))
        .await?;
    assert_eq!(status, 200, "{tripped}");
    on_every_node(
        &cluster,
        "breaker enforced",
        |s, a| s == 403 && a["error"]["code"] == json!("circuit_breaker_tripped"),
        |id| {
            let claim =
                json!({"concept_path": format!("bots/{id}"), "predicate": "p", "value": 1, "agent_id": "bad-bot"});
            ("/v1/assert".into(), Some(claim))
        },
    )
    .await?;
    let lists = on_every_node(
        &cluster,
        "breaker listed",
        |s, a| s == 200 && a["breakers"].as_array().is_some_and(|b| b.len() == 1),
        |_| ("/v1/admin/circuit-breaker".into(), None),
    )
    .await?;
    assert!(lists.iter().all(|l| l["breakers"] == lists[0]["breakers"]), "{lists:?}");

    // Quarantine: decided by the shard leader, the same claim listed everywhere.
    let mut quarantined = Vec::new();
    for via in [1u64, 2, 3] {
        let claim = json!({"concept_path": format!("finance/q{via}"), "predicate": "total", "value": via, "agent_id": "intern"});
        let (status, created) = cluster.post(via, "/v1/assert", &claim).await?;
        assert_eq!(status, 201, "{created}");
        quarantined.push(created["id"].clone());
    }
    let lists = on_every_node(
        &cluster,
        "quarantine listed",
        |s, a| s == 200 && a["quarantined"].as_array().is_some_and(|q| q.len() == 3),
        |_| ("/v1/admin/quarantine".into(), None),
    )
    .await?;
    for list in &lists {
        let ids: Vec<&Value> = list["quarantined"].as_array().expect("list").iter().map(|c| &c["id"]).collect();
        assert_eq!(ids, quarantined.iter().collect::<Vec<_>>(), "{list}");
        assert!(list["quarantined"]
            .as_array()
            .expect("list")
            .iter()
            .all(|c| c["quarantine"]["reason"] == json!("authority_required")));
    }
    // Released through node 3: in the lenses on every node; the others stay out.
    let released = quarantined[0].as_str().expect("id").to_string();
    let (status, answer) =
        cluster.post(3, &format!("/v1/admin/quarantine/{released}/release"), &json!({"reason": "checked"})).await?;
    assert_eq!(status, 200, "{answer}");
    on_every_node(
        &cluster,
        "release visible",
        |s, a| s == 200 && a["results"][0]["winner"]["id"] == json!(released),
        |_| ("/v1/query".into(), Some(json!({"concept_path": "finance/q1", "consistency": "linearizable"}))),
    )
    .await?;
    on_every_node(
        &cluster,
        "still quarantined",
        |s, a| s == 200 && a["results"] == json!([]),
        |_| ("/v1/query".into(), Some(json!({"concept_path": "finance/q2"}))),
    )
    .await?;
    on_every_node(
        &cluster,
        "quarantine list after release",
        |s, a| s == 200 && a["quarantined"].as_array().is_some_and(|q| q.len() == 2),
        |_| ("/v1/admin/quarantine".into(), None),
    )
    .await?;
    Ok(())
}
