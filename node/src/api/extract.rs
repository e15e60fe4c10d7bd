//! Strict JSON request bodies. Malformed JSON, unknown fields, wrong types and oversized bodies
//! each get their own 4xx error code naming what was wrong; nothing reaches a handler half-parsed.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use crate::error::ErrorCode;

/// A JSON body parsed strictly (the target types use `deny_unknown_fields`). The Content-Type
/// header is not required: operators' curl commands often omit it.
pub struct StrictJson<T>(pub T);

impl<S, T> FromRequest<S> for StrictJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Body(bytes) = Body::from_request(request, state).await?;
        parse_json(&bytes).map(StrictJson)
    }
}

/// A request's body, within `limits.max_request_bytes`, for a handler that parses it itself
/// ([`parse_json`]) into a type that borrows from it.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(request, state).await.map(Body).map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge, "request body exceeds limits.max_request_bytes")
            } else {
                ApiError::new(ErrorCode::UnreadableBody, rejection.body_text())
            }
        })
    }
}

/// Parses JSON with the error classes of DESIGN §3.
pub fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Err(ApiError::new(ErrorCode::MalformedJson, "request body is empty; expected a JSON object")),
        // serde reads a struct from an array too (`[]` would be every default): refuse any
        // other JSON than an object, after telling malformed text from a wrong type.
        Some(b'{') => serde_json::from_slice(bytes).map_err(json_error),
        Some(_) => match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Err(error) => Err(json_error(error)),
            Ok(_) => Err(ApiError::new(ErrorCode::InvalidField, "the request body must be a JSON object")),
        },
    }
}

/// An optional JSON body: empty (or only whitespace) means the request type's defaults.
pub fn optional_json<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    parse_json(bytes)
}

pub fn json_error(error: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let message = error.to_string();
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::new(ErrorCode::MalformedJson, format!("malformed JSON: {message}"))
                .with_details(json!({"line": error.line(), "column": error.column()}))
        }
        Category::Data => {
            if let Some(field) = quoted_after(&message, "unknown field `") {
                ApiError::new(ErrorCode::UnknownField, format!("unknown field {field:?} in request body"))
                    .with_details(json!({"field": field}))
            } else if let Some(field) = quoted_after(&message, "missing field `") {
                ApiError::new(ErrorCode::MissingField, format!("required field {field:?} is missing"))
                    .with_details(json!({"field": field}))
            } else {
                ApiError::new(ErrorCode::InvalidField, format!("invalid request body: {message}"))
                    .with_details(json!({"line": error.line(), "column": error.column()}))
            }
        }
    }
}

fn quoted_after(message: &str, marker: &str) -> Option<String> {
    let start = message.find(marker)? + marker.len();
    let end = message[start..].find('`')?;
    Some(message[start..start + end].to_string())
}

/// Query-string parameters parsed strictly (unknown parameters are refused with 400).
pub fn query_params<T>(
    params: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    params.map(|axum::extract::Query(p)| p).map_err(|e| ApiError::new(ErrorCode::InvalidQueryString, e.body_text()))
}

/// The page size of an admin or policy listing: default 100, at most 1000.
pub fn list_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidLimit, format!("limit {limit} is not in 1..=1000")));
    }
    Ok(limit)
}

/// An assertion-id cursor of a listing.
pub fn id_cursor(cursor: Option<&str>) -> Result<Option<crate::model::id::AssertionId>, ApiError> {
    cursor
        .map(|c| {
            crate::model::id::AssertionId::parse(c)
                .map_err(|_| ApiError::new(ErrorCode::InvalidCursor, "cursor is not one this server returned"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::parse_json;
    use crate::error::ErrorCode;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Optional {
        #[serde(default)]
        force: bool,
    }

    #[test]
    fn a_body_must_be_an_object_even_when_every_field_is_optional() {
        // serde reads a struct from a sequence: `[]` would silently be every default.
        for body in ["[]", " [true]", "1", "\"x\"", "null"] {
            let refused = parse_json::<Optional>(body.as_bytes()).expect_err(body);
            assert_eq!(refused.code, ErrorCode::InvalidField, "{body}");
        }
        for body in ["[", "{", "]"] {
            assert_eq!(parse_json::<Optional>(body.as_bytes()).expect_err(body).code, ErrorCode::MalformedJson);
        }
        assert!(parse_json::<Optional>(b" {\"force\": true}").expect("an object").force);
        assert!(!parse_json::<Optional>(b"{}").expect("an object").force);
    }
}
