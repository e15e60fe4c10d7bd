//! Backups through the node admin API (`cluster::backup`): `POST /v1/admin/backup` starts a
//! backup of the whole cluster coordinated by this node, `GET /v1/admin/backup/{id}` follows
//! it, `GET /v1/admin/backup` lists the runs this node remembers.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::extract::parse_json;
use super::AppState;
use crate::cluster::backup::BackupError;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/admin/backup", post(start).get(list)).route("/v1/admin/backup/{id}", get(progress))
}

impl From<BackupError> for ApiError {
    fn from(error: BackupError) -> ApiError {
        let details = match &error {
            BackupError::InProgress(id) => Some(json!({"id": id})),
            BackupError::Failed { shard, .. } => Some(json!({"shard": shard})),
            _ => None,
        };
        let api = ApiError::new(error.code(), error.to_string());
        match details {
            Some(details) => api.with_details(details),
            None => api,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// A directory or `s3://bucket/prefix`; default `backup.destination`.
    destination: Option<String>,
}

/// `POST /v1/admin/backup`: `202` with the backup's progress (its `id`).
async fn start(State(state): State<AppState>, _admin: super::AdminRights, body: Bytes) -> Result<Response, ApiError> {
    let request: StartRequest =
        if body.iter().all(|b| b.is_ascii_whitespace()) { StartRequest::default() } else { parse_json(&body)? };
    let progress = state.backups.start(request.destination.as_deref())?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(progress)).into_response())
}

/// `GET /v1/admin/backup/{id}`.
async fn progress(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.backups.progress(&id)?).into_response())
}

/// `GET /v1/admin/backup`: the runs this node coordinated since it started, newest first.
async fn list(State(state): State<AppState>, _admin: super::AdminRights) -> Response {
    Json(json!({"backups": state.backups.runs()})).into_response()
}
