//! Who may do what on the HTTP APIs (18180 and 18181): bearer tokens with roles, the agent ids a
//! token may write as, rate limits per endpoint class and caller, and the audit log of admin
//! actions. One middleware ([`guard`]) runs before every handler of both routers: it sorts the
//! request into an endpoint [`Class`], names its [`Caller`], refuses what the caller's role does
//! not cover (401/403) or what is over its rate (429), and records admin actions in the
//! [`audit::AuditLog`]. Handlers read the caller ([`CallerOf`]) where an agent id is named.
//!
//! With no `security.tokens` configured a node works as before tokens existed: reads and writes
//! are open, and the admin endpoints take `security.admin_token` (or, without one, a loopback
//! peer that names a loopback host: [`loopback_host`]). Tokens and rate limits are reloaded with
//! the config on SIGHUP ([`Access::reload`]).

pub mod audit;
pub mod limits;
pub mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::Digest;

use crate::api::ApiError;
use crate::config::{Config, TokenRole};
use crate::error::ErrorCode;

/// The endpoint classes, each with its own rate limit and the least role it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Health checks and `/metrics`: open to every caller, never limited.
    Open,
    Read,
    Write,
    Admin,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Open => "open",
            Class::Read => "read",
            Class::Write => "write",
            Class::Admin => "admin",
        }
    }

    /// The least role that may call an endpoint of this class (none for open ones).
    fn needs(self) -> Option<TokenRole> {
        match self {
            Class::Open => None,
            Class::Read => Some(TokenRole::Read),
            Class::Write => Some(TokenRole::Write),
            Class::Admin => Some(TokenRole::Admin),
        }
    }
}

/// Sorts a request of either HTTP API into its class by method and path.
pub fn classify(method: &Method, path: &str) -> Class {
    match path {
        "/health" | "/v1/health" | "/metrics" | "/cluster/health" => return Class::Open,
        _ => {}
    }
    // The cluster admin API (18181): its reads are status, its changes are admin.
    if path.starts_with("/cluster/") || path.starts_with("/admin/") {
        return if method == Method::GET || method == Method::HEAD { Class::Read } else { Class::Admin };
    }
    if path.starts_with("/v1/admin/") || path == "/v1/admin" {
        return Class::Admin;
    }
    let writes = matches!(path, "/v1/assert" | "/v1/assert/batch" | "/v1/vote" | "/v1/retract");
    let grants = path == "/v1/authority/grants" || path.starts_with("/v1/authority/grants/");
    if (writes && method == Method::POST) || (grants && (method == Method::POST || method == Method::DELETE)) {
        return Class::Write;
    }
    Class::Read
}

/// Whether a request changes something an audit must name: every admin request but reads, and
/// grants (authority changes).
fn audited(class: Class, method: &Method, path: &str) -> bool {
    let changes = method != Method::GET && method != Method::HEAD;
    changes && (class == Class::Admin || path.starts_with("/v1/authority/grants"))
}

/// Who sent a request, as far as this node can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name; `admin_token` for `security.admin_token`; `anonymous` without one.
    pub name: String,
    /// `None`: no token (no tokens configured, or an open endpoint).
    pub role: Option<TokenRole>,
    /// The agent ids this caller may write as; empty: any.
    pub agents: Vec<String>,
    pub peer: Option<SocketAddr>,
}

impl Caller {
    fn anonymous(peer: Option<SocketAddr>) -> Caller {
        Caller { name: "anonymous".into(), role: None, agents: Vec::new(), peer }
    }

    /// Refuses a write as `agent_id` by a token bound to other agents.
    pub fn may_write_as(&self, agent_id: &str) -> Result<(), ApiError> {
        if self.agents.is_empty() || self.agents.iter().any(|a| a == agent_id) {
            return Ok(());
        }
        metrics::REFUSED.with_label_values(&["agent_not_allowed"]).inc();
        Err(ApiError::new(
            ErrorCode::AgentNotAllowed,
            format!("token {:?} may write only as {}, not as {agent_id:?}", self.name, self.agents.join(", ")),
        )
        .with_details(json!({"token": self.name, "agent_id": agent_id, "allowed": self.agents})))
    }

    /// The rate-limit key: the token's name, else the client's address.
    fn limit_key(&self) -> String {
        match (&self.role, self.peer) {
            (Some(_), _) => format!("token:{}", self.name),
            (None, Some(peer)) => format!("addr:{}", peer.ip().to_canonical()),
            (None, None) => "anonymous".into(),
        }
    }
}

/// The caller of a request, as [`guard`] named it (anonymous where it did not run).
pub struct CallerOf(pub Caller);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for CallerOf {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let caller =
            parts.extensions.get::<Caller>().cloned().unwrap_or_else(|| {
                Caller::anonymous(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0))
            });
        Ok(CallerOf(caller))
    }
}

/// A configured token, found by the SHA-256 of what a client presents.
#[derive(Debug, Clone)]
struct Token {
    name: String,
    role: TokenRole,
    agents: Vec<String>,
}

/// The reloadable part: tokens and limits.
struct Settings {
    tokens: HashMap<[u8; 32], Token>,
    /// SHA-256 of `security.admin_token` (empty: none).
    admin_token: Option<[u8; 32]>,
    limits: limits::RateLimits,
    /// `security.allow_unauthenticated`: the operator opened the node to the network without
    /// tokens, so loopback is not what protects it.
    open_to_network: bool,
}

impl Settings {
    fn from_config(config: &Config) -> Settings {
        let tokens = config
            .security
            .tokens
            .iter()
            .filter_map(|t| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(t.sha256.to_ascii_lowercase(), &mut hash).ok()?;
                Some((hash, Token { name: t.name.trim().to_string(), role: t.role, agents: t.agents.clone() }))
            })
            .collect();
        let admin_token = (!config.security.admin_token.is_empty()).then(|| sha256(&config.security.admin_token));
        Settings {
            tokens,
            admin_token,
            limits: limits::RateLimits::new(&config.rate_limits),
            open_to_network: config.security.allow_unauthenticated,
        }
    }
}

fn sha256(text: &str) -> [u8; 32] {
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// The bearer token of a request, if it carries one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Tokens, limits and the audit log of one node.
pub struct Access {
    settings: parking_lot::RwLock<Arc<Settings>>,
    pub audit: audit::AuditLog,
}

impl Access {
    pub fn new(config: &Config, audit: audit::AuditLog) -> Arc<Access> {
        let access =
            Arc::new(Access { settings: parking_lot::RwLock::new(Arc::new(Settings::from_config(config))), audit });
        limits::start_cleanup(&access);
        access
    }

    /// Takes the tokens and rate limits of a reloaded (and validated) config. Limits whose
    /// rates did not change keep their callers' state.
    pub fn reload(&self, config: &Config) {
        let mut next = Settings::from_config(config);
        let current = self.settings.read().clone();
        next.limits.keep_unchanged(&current.limits);
        tracing::info!(
            tokens = next.tokens.len(),
            read_per_second = config.rate_limits.read_per_second,
            write_per_second = config.rate_limits.write_per_second,
            admin_per_second = config.rate_limits.admin_per_second,
            "tokens and rate limits reloaded"
        );
        *self.settings.write() = Arc::new(next);
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }

    /// Whether tokens are configured (then every non-open request needs one).
    pub fn tokens_required(&self) -> bool {
        !self.settings().tokens.is_empty()
    }

    /// The caller a request's token names (anonymous without a known one), whatever it may do:
    /// for the audit entry of a refused request.
    pub fn identify(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Caller {
        self.authenticate(headers, peer, Class::Open).unwrap_or_else(|_| Caller::anonymous(peer))
    }

    /// Names the caller of a request, or refuses it: with tokens configured, a missing or
    /// unknown token on a non-open endpoint is 401 and a role below the class's is 403.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
        class: Class,
    ) -> Result<Caller, ApiError> {
        let settings = self.settings();
        let presented = bearer(headers).map(sha256);
        let known = presented.and_then(|hash| {
            if let Some(token) = settings.tokens.get(&hash) {
                return Some(Caller {
                    name: token.name.clone(),
                    role: Some(token.role),
                    agents: token.agents.clone(),
                    peer,
                });
            }
            (settings.admin_token == Some(hash)).then(|| Caller {
                name: "admin_token".into(),
                role: Some(TokenRole::Admin),
                agents: Vec::new(),
                peer,
            })
        });
        if settings.tokens.is_empty() {
            // As before tokens: the admin endpoints check `admin_token` themselves.
            return Ok(known.unwrap_or_else(|| Caller::anonymous(peer)));
        }
        let Some(needs) = class.needs() else {
            return Ok(known.unwrap_or_else(|| Caller::anonymous(peer)));
        };
        let caller = match (presented, known) {
            (_, Some(caller)) => caller,
            (None, None) => {
                metrics::REFUSED.with_label_values(&["token_required"]).inc();
                return Err(ApiError::new(
                    ErrorCode::TokenRequired,
                    "this node requires a bearer token (security.tokens): Authorization: Bearer <token>",
                ));
            }
            (Some(_), None) => {
                metrics::REFUSED.with_label_values(&["invalid_token"]).inc();
                return Err(ApiError::new(
                    ErrorCode::InvalidToken,
                    "the bearer token is not one of this node's tokens",
                ));
            }
        };
        match caller.role {
            Some(role) if role >= needs => Ok(caller),
            role => {
                metrics::REFUSED.with_label_values(&["role_insufficient"]).inc();
                let held = role.map_or("none", TokenRole::as_str);
                Err(ApiError::new(
                    ErrorCode::RoleInsufficient,
                    format!(
                        "token {:?} has the role {held}; {} endpoints need {}",
                        caller.name,
                        class.as_str(),
                        needs.as_str()
                    ),
                )
                .with_details(json!({"token": caller.name, "role": held, "needs": needs.as_str()})))
            }
        }
    }

    /// Refuses a request that reached a node protected only by its loopback address under
    /// another host's name: a web page whose name an attacker made resolve to 127.0.0.1 (DNS
    /// rebinding) is same-origin by its own headers, so neither `Origin` nor CORS stops it from
    /// reading, and without tokens nothing else would. Applies to a node without `security.tokens`
    /// and without `security.allow_unauthenticated`, to requests from a loopback peer whose
    /// `Host` is not loopback ([`loopback_host`]); health checks and `/metrics` stay open.
    fn rebound(&self, class: Class, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<ApiError> {
        let settings = self.settings();
        if class == Class::Open
            || !settings.tokens.is_empty()
            || settings.open_to_network
            || !loopback_peer(peer)
            || loopback_host(headers)
        {
            return None;
        }
        let host = host_header(headers);
        metrics::REFUSED.with_label_values(&["loopback_host"]).inc();
        Some(
            ApiError::new(
                ErrorCode::LoopbackHostRequired,
                format!(
                    "this node has no tokens and serves loopback clients that name a loopback host; this request \
                     named {host:?} (open the node as localhost or 127.0.0.1, or set security.tokens)"
                ),
            )
            .with_details(json!({"host": host})),
        )
    }

    /// Whether the request carries admin rights on an admin endpoint: an admin token when tokens
    /// are configured; else `security.admin_token`, or, when there is none, a loopback peer
    /// whose request names a loopback host ([`loopback_host`]).
    pub fn is_admin(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> bool {
        let settings = self.settings();
        let presented = bearer(headers).map(sha256);
        if !settings.tokens.is_empty() {
            return presented.is_some_and(|hash| {
                settings.tokens.get(&hash).is_some_and(|t| t.role == TokenRole::Admin)
                    || settings.admin_token == Some(hash)
            });
        }
        match settings.admin_token {
            None => loopback_peer(peer) && loopback_host(headers),
            Some(admin) => presented.is_some_and(|hash| constant_time_eq(&hash, &admin)),
        }
    }

    /// Whether `security.admin_token` or tokens guard this node's admin endpoints.
    pub fn admin_secured(&self) -> bool {
        let settings = self.settings();
        settings.admin_token.is_some() || !settings.tokens.is_empty()
    }

    /// Admits the request under its class's rate for its caller, or answers 429.
    fn admit(&self, class: Class, caller: &Caller) -> Result<(), ApiError> {
        self.settings().limits.check(class, &caller.limit_key())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The largest request body an admin request may carry (the audit entry keeps at most
/// `audit::KEPT_BODY_BYTES` of it).
const AUDITED_BODY_BYTES: usize = 64 << 10;

/// Records the action when the handler's future is dropped before it answered (the client
/// went away mid-request: the action may still have happened), as `cancelled`.
struct RecordIfDropped {
    access: Arc<Access>,
    entry: Option<(Caller, Method, String, axum::body::Bytes)>,
}

impl Drop for RecordIfDropped {
    fn drop(&mut self) {
        if let Some((caller, method, path, body)) = self.entry.take() {
            let access = self.access.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    access.audit.record(&caller, &method, &path, audit::CANCELLED, Some(&body)).await;
                });
            }
        }
    }
}

/// Whether a request's `Host` names this machine's loopback: `localhost` (or a name under
/// `.localhost`, which browsers resolve to loopback themselves), a loopback address (`127.0.0.0/8`,
/// `[::1]`), with or without a port. A request without `Host` counts as loopback: HTTP/1.0, or
/// HTTP/2, where the authority is not a header and which browsers speak only over TLS (a rebound
/// name fails the certificate check there).
///
/// Loopback rights must not reach a web page through DNS rebinding: a page of `evil.example`
/// whose name is made to resolve to 127.0.0.1 sends its requests from a loopback peer, as its own
/// origin (so [`cross_origin`] lets them through), but with `Host: evil.example`.
pub fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(axum::http::header::HOST) else { return true };
    let Ok(host) = host.to_str() else { return false };
    // Every request of a node without tokens comes here: no allocation.
    let name = match host.strip_prefix('[') {
        // "[::1]:18181" or "[::1]"
        Some(bracketed) => match bracketed.split_once(']') {
            Some((address, "")) => address,
            Some((address, port)) if port.strip_prefix(':').is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) => {
                address
            }
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let name = name.trim_end_matches('.');
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return ip.to_canonical().is_loopback();
    }
    const SUFFIX: &str = ".localhost";
    name.eq_ignore_ascii_case("localhost")
        || name
            .len()
            .checked_sub(SUFFIX.len())
            .and_then(|at| name.get(at..))
            .is_some_and(|end| end.eq_ignore_ascii_case(SUFFIX))
}

/// Whether the request's peer is on this machine's loopback.
pub fn loopback_peer(peer: Option<SocketAddr>) -> bool {
    peer.is_some_and(|p| p.ip().to_canonical().is_loopback())
}

/// The request's `Host` header, or "" when it has none (or one that is not text).
pub fn host_header(headers: &HeaderMap) -> &str {
    headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("")
}

/// Whether a request may change something: every method but GET, HEAD and OPTIONS (the ones a
/// browser sends cross-origin without asking).
fn changes(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Refuses a change a browser sends from another origin: a web page the operator visits could
/// otherwise POST to a node on loopback without tokens (a form or a "simple" request needs no
/// preflight), and with tokens it could not attach one anyway. Browsers name the page's origin
/// in `Origin`; other clients send none, and the dashboard's own requests name its host.
fn cross_origin(method: &Method, headers: &HeaderMap) -> Option<ApiError> {
    if !changes(method) {
        return None;
    }
    let origin = headers.get(axum::http::header::ORIGIN)?;
    let host = host_header(headers);
    let origin_text = origin.to_str().unwrap_or("");
    let origin_host = origin_text.split_once("://").map(|(_, rest)| rest.trim_end_matches('/')).unwrap_or("");
    if !origin_host.is_empty() && !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        return None;
    }
    metrics::REFUSED.with_label_values(&["cross_origin"]).inc();
    Some(
        ApiError::new(
            ErrorCode::CrossOriginRefused,
            format!(
                "a change sent from the web page {origin_text:?} to {host:?}: only same-origin pages may change things"
            ),
        )
        .with_details(json!({"origin": origin_text, "host": host})),
    )
}

/// Every code [`guard`] can answer a request with, for the OpenAPI documents: keep it beside the
/// function it describes.
pub fn guard_codes(method: &Method, path: &str) -> Vec<ErrorCode> {
    let mut codes = Vec::new();
    if changes(method) {
        codes.push(ErrorCode::CrossOriginRefused);
    }
    let class = classify(method, path);
    if class != Class::Open {
        // Tokens when `security.tokens` is set; a rate when `[security.rate_limits]` sets one;
        // without tokens, a loopback host.
        codes.extend([ErrorCode::TokenRequired, ErrorCode::InvalidToken, ErrorCode::RoleInsufficient]);
        codes.push(ErrorCode::LoopbackHostRequired);
        codes.push(ErrorCode::RateLimited);
    }
    if audited(class, method, path) {
        codes.push(ErrorCode::PayloadTooLarge);
    }
    codes
}

/// The middleware of both HTTP routers (see the module doc).
pub async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0);
    if let Some(refusal) = cross_origin(request.method(), request.headers()) {
        tracing::warn!(peer = ?peer, method = %request.method(), path = request.uri().path(), "cross-origin change refused");
        return refusal.into_response();
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let class = classify(&method, &path);
    if let Some(refusal) = access.rebound(class, request.headers(), peer) {
        tracing::warn!(peer = ?peer, method = %method, path = %path, "request naming a host that is not loopback refused");
        return refusal.into_response();
    }
    // The audit names the query too (a revocation's `agent_id` is there).
    let target = request.uri().path_and_query().map_or_else(|| path.clone(), |p| p.as_str().to_string());
    let audit = audited(class, &method, &path);
    let caller = match access.authenticate(request.headers(), peer, class) {
        Ok(caller) => caller,
        Err(error) => {
            let caller = access.identify(request.headers(), peer);
            // A holder of a valid token refused for its role is recorded (within its rate);
            // attempts without a valid token are only logged and counted, so that nobody
            // without a token can push the real entries out of the log.
            if audit && caller.role.is_some() && access.admit(class, &caller).is_ok() {
                access.audit.record(&caller, &method, &target, error.status().as_u16(), None).await;
            } else if audit {
                tracing::warn!(peer = ?peer, method = %method, path, status = error.status().as_u16(), "admin request refused without a valid token");
            }
            return error.into_response();
        }
    };
    if class != Class::Open {
        if let Err(error) = access.admit(class, &caller) {
            return error.into_response();
        }
    }
    if !audit {
        let mut request = request;
        request.extensions_mut().insert(caller);
        return next.run(request).await;
    }
    // An admin action: keep its body (what it asked to change) for the audit log.
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, AUDITED_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("an admin request's body may hold at most {AUDITED_BODY_BYTES} bytes"),
            )
            .into_response()
        }
    };
    let mut request = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
    request.extensions_mut().insert(caller.clone());
    let mut pending = RecordIfDropped {
        access: access.clone(),
        entry: Some((caller.clone(), method.clone(), target.clone(), bytes.clone())),
    };
    let response = next.run(request).await;
    pending.entry = None;
    let status = response.status().as_u16();
    // Refusals by the handler of a caller without a token (no tokens configured, no admin
    // token given) are logged, not stored, for the same reason as above.
    if caller.role.is_some() || (200..300).contains(&status) {
        let body = (200..300).contains(&status).then_some(&bytes[..]);
        access.audit.record(&caller, &method, &target, status, body).await;
    } else {
        tracing::warn!(peer = ?peer, method = %method, path, status, "admin request refused without a valid token");
    }
    response
}

/// A new random token and its `[[security.tokens]]` table, for `stemedb token create`.
pub fn create_token(name: &str, role: TokenRole, agents: &[String]) -> (String, String) {
    let secret: [u8; 32] = rand::random();
    let token = format!("stm_{}", hex::encode(secret));
    let hash = hex::encode(sha256(&token));
    let agents = agents.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    let table = format!(
        "[[security.tokens]]\nname = {name:?}\nsha256 = \"{hash}\"\nrole = \"{}\"\nagents = [{agents}]\n",
        role.as_str()
    );
    (token, table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    #[test]
    fn changes_from_other_origins_are_refused_same_origin_and_non_browser_ones_pass() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, value.parse().expect("header"));
            }
            map
        };
        let post = Method::POST;
        // No Origin: curl, the CLI, other nodes.
        assert!(cross_origin(&post, &headers(&[("host", "127.0.0.1:18180")])).is_none());
        // The dashboard's own requests (same origin), in any letter case, with or without a port.
        let same = headers(&[("host", "127.0.0.1:18188"), ("origin", "http://127.0.0.1:18188")]);
        assert!(cross_origin(&post, &same).is_none());
        let named = headers(&[("host", "DB.example.com"), ("origin", "https://db.example.com")]);
        assert!(cross_origin(&Method::DELETE, &named).is_none());
        // Another site's page, a sandboxed one ("null"), a port that differs: refused.
        for origin in ["https://evil.example", "null", "http://127.0.0.1:8080", "http://127.0.0.1:18188.evil"] {
            let refused = cross_origin(&post, &headers(&[("host", "127.0.0.1:18188"), ("origin", origin)]));
            let error = refused.expect(origin);
            assert_eq!(error.code, ErrorCode::CrossOriginRefused, "{origin}");
            assert_eq!(error.details["origin"], origin);
        }
        // Reads are not changes (and a browser cannot read another origin's answers).
        let foreign = headers(&[("host", "127.0.0.1:18180"), ("origin", "https://evil.example")]);
        assert!(cross_origin(&Method::GET, &foreign).is_none());
    }

    fn config_with(tokens: &[(&str, &str, TokenRole, &[&str])]) -> Config {
        let mut config = Config::default();
        config.security.tokens = tokens
            .iter()
            .map(|(name, token, role, agents)| TokenConfig {
                name: name.to_string(),
                sha256: hex::encode(sha256(token)),
                role: *role,
                agents: agents.iter().map(|a| a.to_string()).collect(),
            })
            .collect();
        config
    }

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert(axum::http::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("header"));
        }
        headers
    }

    fn access(config: &Config) -> Arc<Access> {
        Arc::new(Access {
            settings: parking_lot::RwLock::new(Arc::new(Settings::from_config(config))),
            audit: audit::AuditLog::in_memory(1),
        })
    }

    #[test]
    fn endpoints_fall_into_their_classes() {
        let cases = [
            (Method::GET, "/health", Class::Open),
            (Method::GET, "/metrics", Class::Open),
            (Method::GET, "/cluster/health", Class::Open),
            (Method::POST, "/v1/query", Class::Read),
            (Method::GET, "/v1/assertions/x", Class::Read),
            (Method::GET, "/v1/authority/grants", Class::Read),
            (Method::POST, "/v1/assert", Class::Write),
            (Method::POST, "/v1/assert/batch", Class::Write),
            (Method::POST, "/v1/vote", Class::Write),
            (Method::POST, "/v1/retract", Class::Write),
            (Method::POST, "/v1/authority/grants", Class::Write),
            (Method::DELETE, "/v1/authority/grants/7", Class::Write),
            (Method::GET, "/v1/admin/quarantine", Class::Admin),
            (Method::POST, "/v1/admin/circuit-breaker/trip", Class::Admin),
            (Method::GET, "/cluster/members", Class::Read),
            (Method::POST, "/cluster/members", Class::Admin),
            (Method::DELETE, "/cluster/members/3", Class::Admin),
            (Method::POST, "/admin/shards/rebalance", Class::Admin),
        ];
        for (method, path, class) in cases {
            assert_eq!(classify(&method, path), class, "{method} {path}");
        }
        assert!(audited(Class::Admin, &Method::POST, "/v1/admin/quarantine/x/release"));
        assert!(!audited(Class::Admin, &Method::GET, "/v1/admin/quarantine"));
        assert!(audited(Class::Write, &Method::POST, "/v1/authority/grants"));
        assert!(!audited(Class::Write, &Method::POST, "/v1/assert"));
    }

    #[test]
    fn each_role_is_allowed_and_refused_by_class() {
        let config = config_with(&[
            ("reader", "r-token", TokenRole::Read, &[]),
            ("writer", "w-token", TokenRole::Write, &[]),
            ("ops", "a-token", TokenRole::Admin, &[]),
        ]);
        let access = access(&config);
        let classes = [Class::Read, Class::Write, Class::Admin];
        for (token, allowed) in [("r-token", 1), ("w-token", 2), ("a-token", 3)] {
            for (i, class) in classes.into_iter().enumerate() {
                let result = access.authenticate(&headers(Some(token)), None, class);
                if i < allowed {
                    assert!(result.is_ok(), "{token} on {class:?}");
                } else {
                    assert_eq!(result.expect_err(token).code, ErrorCode::RoleInsufficient, "{token} on {class:?}");
                }
            }
        }
        let missing = access.authenticate(&headers(None), None, Class::Read).expect_err("no token");
        assert_eq!(missing.code, ErrorCode::TokenRequired);
        let wrong = access.authenticate(&headers(Some("guess")), None, Class::Read).expect_err("unknown token");
        assert_eq!(wrong.code, ErrorCode::InvalidToken);
        assert!(access.authenticate(&headers(None), None, Class::Open).is_ok(), "health checks stay open");
        assert!(access.is_admin(&headers(Some("a-token")), None));
        assert!(!access.is_admin(&headers(Some("w-token")), None));
        let loopback: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        assert!(!access.is_admin(&headers(None), Some(loopback)), "with tokens, loopback is no credential");
    }

    /// The rebinding refusal applies only where loopback is the node's protection: no tokens and
    /// not opened to the network, a loopback peer naming another host, an endpoint that is not
    /// open.
    #[test]
    fn requests_naming_another_host_from_loopback_are_refused_only_without_tokens() {
        let loopback: Option<SocketAddr> = Some("127.0.0.1:5000".parse().expect("addr"));
        let remote: Option<SocketAddr> = Some("10.1.2.3:5000".parse().expect("addr"));
        let named = |host: &str| {
            let mut headers = headers(None);
            headers.insert(axum::http::header::HOST, host.parse().expect("header"));
            headers
        };
        let evil = named("evil.example:18180");
        let open = access(&Config::default());
        let refused = open.rebound(Class::Read, &evil, loopback).expect("refused");
        assert_eq!(refused.code, ErrorCode::LoopbackHostRequired);
        assert_eq!(refused.details["host"], "evil.example:18180");
        assert!(open.rebound(Class::Admin, &evil, loopback).is_some());
        assert!(open.rebound(Class::Open, &evil, loopback).is_none(), "health checks stay open");
        assert!(open.rebound(Class::Read, &evil, remote).is_none(), "a remote peer is not loopback");
        assert!(open.rebound(Class::Write, &named("127.0.0.1:18180"), loopback).is_none());
        assert!(open.rebound(Class::Write, &headers(None), loopback).is_none(), "no Host: not a browser");
        let mut config = Config::default();
        config.security.allow_unauthenticated = true;
        assert!(access(&config).rebound(Class::Read, &evil, loopback).is_none(), "opened to the network");
        let tokens = access(&config_with(&[("r", "r-token", TokenRole::Read, &[])]));
        assert!(tokens.rebound(Class::Read, &evil, loopback).is_none(), "tokens protect the node");
    }

    #[test]
    fn without_tokens_the_node_works_as_before() {
        let access = access(&Config::default());
        let loopback: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let remote: SocketAddr = "10.1.2.3:5000".parse().expect("addr");
        for class in [Class::Read, Class::Write, Class::Admin] {
            assert!(access.authenticate(&headers(None), Some(remote), class).is_ok());
        }
        assert!(access.is_admin(&headers(None), Some(loopback)));
        assert!(!access.is_admin(&headers(None), Some(remote)));
        // Loopback rights go only to requests that name a loopback host: not to a page whose
        // name was rebound to 127.0.0.1.
        for (host, admin) in [
            ("127.0.0.1:18181", true),
            ("127.0.0.3:18181", true),
            ("localhost:18181", true),
            ("LOCALHOST", true),
            ("dashboard.localhost:18181", true),
            ("[::1]:18181", true),
            ("[::ffff:127.0.0.1]:18181", true),
            ("localhost.:18181", true),
            ("evil.example:18181", false),
            ("evil.example", false),
            ("127.0.0.1.evil.example:18181", false),
            ("localhost.evil.example", false),
            ("10.1.2.3:18181", false),
            ("[::2]:18181", false),
            ("[::1]evil.example", false),
            ("[::1]:18181x", false),
            ("", false),
        ] {
            let mut with_host = headers(None);
            with_host.insert(axum::http::header::HOST, host.parse().expect("header"));
            assert_eq!(access.is_admin(&with_host, Some(loopback)), admin, "Host: {host}");
            assert!(!access.is_admin(&with_host, Some(remote)), "Host: {host} from a remote peer");
        }
        let mut config = Config::default();
        config.security.admin_token = "secret".into();
        let access = self::access(&config);
        assert!(access.is_admin(&headers(Some("secret")), Some(remote)));
        assert!(!access.is_admin(&headers(None), Some(loopback)));
        let caller = access.authenticate(&headers(Some("secret")), None, Class::Admin).expect("admin token");
        assert_eq!(caller.name, "admin_token");
    }

    #[test]
    fn a_bound_token_writes_only_as_its_agents() {
        let config = config_with(&[("bot", "b-token", TokenRole::Write, &["ops-bot"])]);
        let caller = access(&config).authenticate(&headers(Some("b-token")), None, Class::Write).expect("known");
        assert!(caller.may_write_as("ops-bot").is_ok());
        assert_eq!(caller.may_write_as("someone-else").expect_err("bound").code, ErrorCode::AgentNotAllowed);
        assert!(Caller::anonymous(None).may_write_as("anyone").is_ok());
    }

    #[test]
    fn reload_swaps_the_tokens() {
        let access = access(&config_with(&[("old", "old-token", TokenRole::Read, &[])]));
        assert!(access.authenticate(&headers(Some("old-token")), None, Class::Read).is_ok());
        access.reload(&config_with(&[("new", "new-token", TokenRole::Read, &[])]));
        let refused = access.authenticate(&headers(Some("old-token")), None, Class::Read).expect_err("revoked");
        assert_eq!(refused.code, ErrorCode::InvalidToken);
        assert!(access.authenticate(&headers(Some("new-token")), None, Class::Read).is_ok());
    }

    #[test]
    fn a_created_token_matches_its_table() {
        let (token, table) = create_token("ops-bot", TokenRole::Write, &["ops-bot".into()]);
        let parsed: toml::Value = toml::from_str(&table).expect("toml");
        let entry = &parsed["security"]["tokens"][0];
        assert_eq!(entry["sha256"].as_str(), Some(hex::encode(sha256(&token)).as_str()));
        assert_eq!(entry["role"].as_str(), Some("write"));
        assert!(token.starts_with("stm_") && token.len() == 68);
    }
}
