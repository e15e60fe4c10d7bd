//! Issue 19 §2: `/openapi.json` on the client API (18180) and the cluster admin (18181) is built
//! from the code and describes the routes exactly. (Fuzzing against it: scripts/contract-test.py.)

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::TestNode;
use serde_json::{json, Value};
use stemedb::error::ErrorCode;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

async fn document(node: &TestNode, base: &str) -> Value {
    let response = node.client.get(format!("{base}/openapi.json")).send().await.expect("send");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.expect("a JSON document")
}

/// Every (method, path) a document lists.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                found.push((method.to_string(), path.clone(), operation.clone()));
            }
        }
    }
    found
}

/// The codes an error response of an operation allows (its schema's `error.code` enum).
fn allowed_codes(response: &Value) -> Option<BTreeSet<String>> {
    let codes = &response["content"]["application/json"]["schema"]["properties"]["error"]["properties"]["code"]["enum"];
    codes.as_array().map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
}

/// Checks the shape every operation must have, and returns the operation ids.
fn check_document(doc: &Value, title: &str) -> BTreeSet<String> {
    assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.1")), Some(true), "{title}: OpenAPI 3.1");
    assert_eq!(doc["info"]["title"], title);
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let mut ids = BTreeSet::new();
    for (method, path, operation) in operations(doc) {
        let id = operation["operationId"].as_str().expect("an operation id").to_string();
        assert!(ids.insert(id.clone()), "{method} {path}: operation id {id} is used twice");
        let responses = operation["responses"].as_object().expect("responses");
        assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path}: no success answer");
        for (status, response) in responses {
            assert!(
                !response["description"].as_str().unwrap_or("").is_empty(),
                "{method} {path} {status}: description"
            );
            let Some(codes) = allowed_codes(response) else { continue };
            assert!(!codes.is_empty(), "{method} {path} {status}: an error answer without codes");
            for code in &codes {
                let known =
                    ErrorCode::from_name(code).unwrap_or_else(|| panic!("{method} {path}: unknown code {code}"));
                assert_eq!(known.http_status().to_string(), *status, "{method} {path}: {code} is not a {status}");
            }
            if matches!(status.as_str(), "429" | "503" | "507") {
                assert!(response["headers"].get("Retry-After").is_some(), "{method} {path} {status}: Retry-After");
            }
        }
    }
    assert!(!ids.is_empty());
    let mut refs = Vec::new();
    collect_refs(doc, &mut refs);
    for reference in refs {
        let name = reference.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{title}: {reference}"));
        assert!(doc["components"]["schemas"][name].is_object(), "{title}: {reference} does not resolve");
    }
    ids
}

fn collect_refs(value: &Value, refs: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                refs.push(reference.clone());
            }
            map.values().for_each(|v| collect_refs(v, refs));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, refs)),
        _ => {}
    }
}

/// The request a route check sends: path parameters filled in, a JSON object body for changes.
fn request(node: &TestNode, base: &str, method: &str, path: &str) -> reqwest::RequestBuilder {
    let path = path.replace("{decision}", "release").replace("{agent_id}", "nobody").replace("{id}", "0");
    assert!(!path.contains('{'), "a path parameter this test does not fill: {path}");
    let url = format!("{base}{path}");
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
    let builder = node.client.request(method.clone(), url);
    if method == reqwest::Method::POST {
        builder.json(&json!({}))
    } else {
        builder
    }
}

/// Sends one request per documented operation and checks that the route exists (no router
/// fallback answered) and that the status and error code are documented for it.
async fn check_routes_answer_as_documented(node: &TestNode, base: &str, doc: &Value) {
    for (method, path, operation) in operations(doc) {
        let response = request(node, base, &method, &path).send().await.expect("send");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["error"]["code"].as_str().map(str::to_string);
        let fallback = matches!(code.as_deref(), Some("not_found" | "method_not_allowed"));
        assert!(!fallback, "{method} {path}: documented but the router has no such route ({status} {body})");
        let documented = &operation["responses"][status.to_string()];
        assert!(documented.is_object(), "{method} {path}: answered {status}, which it does not document: {body}");
        if let (Some(code), Some(codes)) = (code, allowed_codes(documented)) {
            assert!(codes.contains(&code), "{method} {path}: {status} {code} is not documented (has {codes:?})");
        }
    }
}

#[tokio::test]
async fn both_apis_serve_their_documents_and_every_documented_route_exists() {
    let node = TestNode::start().await;
    let client_doc = document(&node, &node.url).await;
    let cluster_doc = document(&node, &node.admin_url).await;
    check_document(&client_doc, "StemeDB client API");
    check_document(&cluster_doc, "StemeDB cluster admin API");
    // The routes the runbooks and docs/api.md name, in the right document.
    for (doc, path, method) in [
        (&client_doc, "/v1/assert", "post"),
        (&client_doc, "/v1/query", "post"),
        (&client_doc, "/health", "get"),
        (&client_doc, "/v1/admin/quarantine/{id}/{decision}", "post"),
        (&client_doc, "/v1/admin/compact", "post"),
        (&cluster_doc, "/cluster/members/{id}", "delete"),
        (&cluster_doc, "/admin/shards/{id}/transfer-leader", "post"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} is documented");
    }
    assert!(cluster_doc["paths"].get("/v1/assert").is_none(), "each document describes its own port");
    // The layers in front of the handlers are in every operation: the admission limit on the
    // client API (but not on health checks), the access guard's codes on every guarded route.
    let assert_op = &client_doc["paths"]["/v1/assert"]["post"]["responses"];
    let codes_503 = allowed_codes(&assert_op["503"]).expect("503");
    assert!(codes_503.contains("overloaded") && codes_503.contains("no_quorum"), "{codes_503:?}");
    for code in ["token_required", "invalid_token"] {
        assert!(allowed_codes(&assert_op["401"]).expect("401").contains(code), "{code}");
    }
    assert!(allowed_codes(&assert_op["403"]).expect("403").contains("cross_origin_refused"));
    assert!(allowed_codes(&assert_op["429"]).expect("429").contains("rate_limited"));
    let health = &client_doc["paths"]["/health"]["get"]["responses"];
    assert!(allowed_codes(&health["503"]).is_none(), "a degraded node's 503 is its health, not an error");
    let audit = &client_doc["paths"]["/v1/admin/compact"]["post"]["responses"];
    assert!(allowed_codes(&audit["413"]).expect("413").contains("payload_too_large"), "audited bodies are capped");
    // Typed bodies: a request and a response schema from the handlers' types.
    let schemas = &client_doc["components"]["schemas"];
    for name in ["AssertRequest", "AssertResponse", "BatchResponse", "QueryResponse", "AssertionDetail", "GrantView"] {
        assert!(schemas[name].is_object(), "schema {name}");
    }
    assert_eq!(schemas["AssertRequest"]["required"], json!(["concept_path", "predicate", "value"]));
    check_routes_answer_as_documented(&node, &node.url, &client_doc).await;
    check_routes_answer_as_documented(&node, &node.admin_url, &cluster_doc).await;
    node.stop().await;
}

/// Every route goes through `utoipa_axum::routes!` (which documents it): a plain `.route()` in
/// the API modules would serve an undocumented endpoint. `/openapi.json` itself is the exception.
#[test]
fn no_route_bypasses_the_document() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for dir in ["api", "admin"] {
        collect(&src.join(dir), &mut files);
    }
    let mut bypasses = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        for (n, line) in text.lines().enumerate() {
            let code = !line.trim_start().starts_with("//");
            if code && line.contains(".route(") && !line.contains("\"/openapi.json\"") {
                bypasses.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(files.len() > 10, "found the API modules");
    assert!(bypasses.is_empty(), "routes outside the OpenAPI documents:\n{}", bypasses.join("\n"));
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}
