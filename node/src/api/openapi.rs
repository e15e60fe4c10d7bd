//! The OpenAPI 3.1 documents of the HTTP APIs, served as `GET /openapi.json`: the client API
//! and node admin on 18180 ([`super::router`]) and the cluster admin on 18181. They are built
//! from the code, so they cannot drift from it:
//! - every route is registered through `utoipa_axum`'s `routes!`, which takes the path, method,
//!   parameters and bodies from the handler's `#[utoipa::path]` and the types it names (a route
//!   added with a plain `.route()` is missing from the document, and a test compares the two);
//! - each operation names the error codes its handler can answer ([`errors!`] sets), and
//!   [`finish`] adds the ones every request of its class can meet, from the functions that decide
//!   them: the access guard ([`super::access::guard_codes`]) and the admission limit of each
//!   port ([`super::always_admitted`]);
//! - an error answer's schema pins `error.code` to exactly the codes documented for that status
//!   on that operation, each with its line of the one code table ([`ErrorCode::description`]),
//!   so a contract test (schemathesis, `scripts/contract-test.sh`) catches an undocumented code.

use std::collections::BTreeMap;

use axum::http::Method;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, InfoBuilder, OpenApi, RefOr};

use crate::error::ErrorCode;

/// The extension on an error response that lists its codes, so [`finish`] can merge sets.
const CODES_EXTENSION: &str = "x-error-codes";

/// The codes of a strictly parsed JSON body (`extract::StrictJson`).
pub const BODY: &[ErrorCode] = &[
    ErrorCode::PayloadTooLarge,
    ErrorCode::UnreadableBody,
    ErrorCode::MalformedJson,
    ErrorCode::UnknownField,
    ErrorCode::MissingField,
    ErrorCode::InvalidField,
];
/// An optional JSON body (`extract::parse_json` over raw bytes; empty means the defaults).
pub const OPTIONAL_BODY: &[ErrorCode] =
    &[ErrorCode::MalformedJson, ErrorCode::UnknownField, ErrorCode::MissingField, ErrorCode::InvalidField];
/// A strictly parsed query string (`extract::query_params`).
pub const QUERY: &[ErrorCode] = &[ErrorCode::InvalidQueryString];
/// A page size (`extract::list_limit`) and an assertion-id cursor (`extract::id_cursor`).
pub const PAGING: &[ErrorCode] = &[ErrorCode::InvalidLimit, ErrorCode::InvalidCursor];
/// Admin rights (`AdminRights`, the cluster admin's token check).
pub const ADMIN: &[ErrorCode] = &[ErrorCode::AdminTokenRequired];
/// A proposal through a shard's Raft group (`ShardSet::propose`).
pub const PROPOSE: &[ErrorCode] = &[
    ErrorCode::NoQuorum,
    ErrorCode::NotLeader,
    ErrorCode::LeaderUnreachable,
    ErrorCode::ShuttingDown,
    ErrorCode::ReplicaCatchingUp,
    ErrorCode::Overloaded,
    ErrorCode::Timeout,
    ErrorCode::OutcomeUnknown,
    ErrorCode::InternalError,
    ErrorCode::MembershipChangeFailed,
    ErrorCode::UnknownShard,
    ErrorCode::UnexpectedResponse,
];
/// A proposal that grows the data (assert, vote, retract), refused below the disk floor.
pub const GROWS: &[ErrorCode] = &[ErrorCode::InsufficientStorage];
/// A read through a shard's group (`Coordinator::read`).
pub const READ: &[ErrorCode] = &[
    ErrorCode::NoQuorum,
    ErrorCode::NotLeader,
    ErrorCode::LeaderUnreachable,
    ErrorCode::ShuttingDown,
    ErrorCode::ReplicaCatchingUp,
    ErrorCode::Overloaded,
    ErrorCode::Timeout,
    ErrorCode::StorageError,
    ErrorCode::InternalError,
    ErrorCode::UnknownShard,
    ErrorCode::UnexpectedResponse,
];
/// A change of the replicated policy (authority, breakers) on the meta group.
pub const POLICY: &[ErrorCode] = &[ErrorCode::PolicyOutsideMetaGroup];
/// An agent's signature check (`signing::verify`).
pub const SIGNATURE: &[ErrorCode] = &[
    ErrorCode::SignatureRequired,
    ErrorCode::AgentIdNotPublicKey,
    ErrorCode::MalformedSignature,
    ErrorCode::InvalidSignature,
];
/// An agent's circuit breaker (`BreakerMonitor::admit`).
pub const BREAKER: &[ErrorCode] = &[ErrorCode::CircuitBreakerOpen, ErrorCode::CircuitBreakerTripped];
/// Local storage (RocksDB) behind a node-local read.
pub const STORAGE: &[ErrorCode] = &[
    ErrorCode::StorageEngineError,
    ErrorCode::StorageDataDirError,
    ErrorCode::StorageCorruptRecord,
    ErrorCode::StorageClosed,
    ErrorCode::StorageError,
];

/// Declares a set of error answers for a `#[utoipa::path]`'s `responses(...)`:
/// `errors!(AssertErrors: BODY, PROPOSE, &[ErrorCode::InvalidConceptPath]);`.
macro_rules! errors {
    ($name:ident: $($set:expr),* $(,)?) => {
        pub struct $name;
        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
            > {
                let mut codes: Vec<$crate::error::ErrorCode> = Vec::new();
                $(codes.extend_from_slice($set);)*
                $crate::api::openapi::error_responses(&codes)
            }
        }
    };
}
pub(crate) use errors;

/// One response per status the codes have, each pinning `error.code` to that status's codes.
pub fn error_responses(codes: &[ErrorCode]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for code in codes {
        let listed = by_status.entry(code.http_status()).or_default();
        if !listed.contains(code) {
            listed.push(*code);
        }
    }
    by_status
        .into_iter()
        .map(|(status, mut codes)| {
            codes.sort_by_key(|c| c.as_str());
            (status.to_string(), RefOr::T(error_response(status, &codes)))
        })
        .collect()
}

/// The codes an error answer lists; `None` for other answers (a success, or a health check's
/// 503 with its own body).
fn listed_codes(response: &RefOr<Response>) -> Option<Vec<ErrorCode>> {
    let RefOr::T(response) = response else { return None };
    let listed = response.extensions.as_ref()?.get(CODES_EXTENSION)?;
    Some(listed.as_array()?.iter().filter_map(|v| v.as_str().and_then(ErrorCode::from_name)).collect())
}

/// The codes the layers in front of every handler can answer a request with: the access guard
/// and the port's admission limit.
fn layer_codes(method: &Method, path: &str) -> Vec<ErrorCode> {
    let mut codes = super::access::guard_codes(method, path);
    if !super::always_admitted(path) {
        codes.push(ErrorCode::Overloaded);
    }
    codes
}

/// A path's operations by method.
fn operations_mut(item: &mut PathItem) -> [(Method, &mut Option<Operation>); 5] {
    [
        (Method::GET, &mut item.get),
        (Method::POST, &mut item.post),
        (Method::PUT, &mut item.put),
        (Method::DELETE, &mut item.delete),
        (Method::PATCH, &mut item.patch),
    ]
}

fn error_response(status: u16, codes: &[ErrorCode]) -> Response {
    let lines: Vec<String> = codes.iter().map(|c| format!("- `{}`: {}", c.as_str(), c.description().trim())).collect();
    let code = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(codes.iter().map(|c| c.as_str())))
        .description(Some("the stable error code (docs/api.md)"));
    let detail = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("code", code)
        .required("code")
        .property("message", ObjectBuilder::new().schema_type(Type::String).description(Some("for people")))
        .required("message")
        .property(
            "details",
            ObjectBuilder::new().schema_type(Type::Object).description(Some("the code's fields (docs/api.md)")),
        )
        .required("details");
    let body = ObjectBuilder::new().schema_type(Type::Object).property("error", detail).required("error");
    let mut response = ResponseBuilder::new()
        .description(lines.join("\n"))
        .content("application/json", ContentBuilder::new().schema(Some(Schema::Object(body.build()))).build());
    if matches!(status, 429 | 503 | 507) {
        let header = HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)))
            .description(Some("seconds to wait before retrying"))
            .build();
        response = response.header("Retry-After", header);
    }
    let mut response = response.build();
    let listed = serde_json::Value::from(codes.iter().map(|c| c.as_str()).collect::<Vec<_>>());
    response.extensions = Some(Extensions::from_iter([(CODES_EXTENSION, listed)]));
    response
}

/// Which HTTP API a document describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// 18180: the client API and node admin.
    Client,
    /// 18181: the cluster admin.
    Cluster,
}

/// Completes a document gathered from the routers: its title, the bearer token, and on every
/// operation the answers of the layers in front of its handler.
pub fn finish(mut doc: OpenApi, api: Api) -> OpenApi {
    let (title, description) = match api {
        Api::Client => (
            "StemeDB client API",
            "Assertions, votes, retractions, queries through lenses, and the node's admin endpoints (port 18180). \
             Errors are `{\"error\": {\"code\", \"message\", \"details\"}}` with a stable code from docs/api.md.",
        ),
        Api::Cluster => {
            ("StemeDB cluster admin API", "Members, shards, leaders, rebalancing and anti-entropy (port 18181).")
        }
    };
    doc.info =
        InfoBuilder::new().title(title).version(env!("CARGO_PKG_VERSION")).description(Some(description)).build();
    let components = doc.components.get_or_insert_with(Default::default);
    components
        .add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    // A token is needed only when `security.tokens` or an admin token is configured.
    doc.security = Some(vec![SecurityRequirement::default(), SecurityRequirement::new("bearer", Vec::<String>::new())]);
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, operation) in operations_mut(item) {
            let Some(operation) = operation.as_mut() else { continue };
            merge_codes(&mut operation.responses.responses, &layer_codes(&method, path));
        }
    }
    doc
}

/// Adds `extra` to an operation's error answers, rebuilding each status's response with the
/// union of its codes.
fn merge_codes(responses: &mut BTreeMap<String, RefOr<Response>>, extra: &[ErrorCode]) {
    let mut codes: Vec<ErrorCode> = extra.to_vec();
    responses.retain(|_, response| match listed_codes(response) {
        Some(listed) => {
            codes.extend(listed);
            false
        }
        None => true,
    });
    for (status, response) in error_responses(&codes) {
        responses.entry(status).or_insert(response);
    }
}

/// `ErrorCode` in a schema: the string enum of the table.
impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
                .build(),
        ))
    }
}

impl utoipa::ToSchema for ErrorCode {}

/// The JSON text of a finished document, as `GET /openapi.json` serves it.
pub fn to_json(doc: &OpenApi) -> axum::body::Bytes {
    // A document of our own types always serializes; an empty one is the harmless fallback.
    axum::body::Bytes::from(serde_json::to_vec(doc).unwrap_or_default())
}

/// A handler serving a finished document.
pub fn serve(json: axum::body::Bytes) -> axum::routing::MethodRouter<super::AppState> {
    axum::routing::get(move || {
        let json = json.clone();
        async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], json) }
    })
}

/// Checks that every operation of `doc` keeps every code of the layers in front of it (none
/// lost to a non-error answer at the same status) and that every error answer's codes have its
/// status (a test helper for both documents: `admin` runs it on the cluster admin's).
#[cfg(test)]
pub(crate) fn check_layer_codes(doc: &OpenApi) {
    assert!(!doc.paths.paths.is_empty());
    let mut doc = doc.clone();
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, operation) in operations_mut(item) {
            let Some(operation) = operation else { continue };
            let mut documented = Vec::new();
            for (status, response) in &operation.responses.responses {
                for code in listed_codes(response).unwrap_or_default() {
                    assert_eq!(code.http_status().to_string(), *status, "{method} {path}: {code}");
                    documented.push(code);
                }
            }
            for code in layer_codes(&method, path) {
                assert!(documented.contains(&code), "{method} {path}: {code} is not documented");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_operation_documents_the_codes_of_the_layers_in_front_of_it() {
        super::check_layer_codes(&crate::api::openapi());
    }
}
