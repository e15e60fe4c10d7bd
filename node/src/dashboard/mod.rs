//! The web dashboard on 18188 (`server.dashboard_addr`): one page, its script and its style,
//! embedded in the binary (no CDN: operators' networks are often closed), and under `/api` and
//! `/cluster-api` this node's own client API and cluster admin routers (the same handlers,
//! tokens, roles and rate limits as on 18180 and 18181), so the page talks to one origin and
//! works through a load balancer. The page keeps the admin token in the browser's session
//! storage and sends it as a bearer token; it holds no state on the node.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::{ApiError, AppState};
use crate::error::ErrorCode;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// Only this origin's script, style and API; nothing inline; no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's router over `state`; its `/api` shares the client API's `permits` and its
/// `/cluster-api` the cluster admin's (`server.max_concurrent_requests` counts both on each).
pub fn router(
    state: AppState,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    admin_permits: std::sync::Arc<tokio::sync::Semaphore>,
) -> Router {
    Router::new()
        .route("/", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/app.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
        .route("/session", get(session).with_state(state.clone()))
        .nest("/api", crate::api::router(state.clone(), permits))
        .nest("/cluster-api", crate::admin::router(state, admin_permits))
        .fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "no such dashboard page; the dashboard is at /, its APIs under /api and /cluster-api",
            )
        })
        .layer(axum::middleware::map_response(secure))
}

/// What the page needs before it asks anything else: which node it is, and whether it must ask
/// for a token first (open: it says no more than a 401 would).
async fn session(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "node_id": state.shards.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "tokens_required": state.access.tokens_required(),
        "admin_secured": state.access.admin_secured(),
    }))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Headers that keep the page from being framed, sniffed or fed other origins' scripts.
async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(INDEX.contains("src=\"app.js\""), "the page loads the embedded script");
        assert!(INDEX.contains("href=\"app.css\""), "the page loads the embedded style");
        for external in ["http://", "https://", "//cdn", "<script>"] {
            assert!(!INDEX.contains(external), "the page must not load {external:?}");
        }
        assert!(!SCRIPT.contains("innerHTML"), "data is rendered as text, never as markup");
    }
}
