//! Backups through the node admin API (`cluster::backup`): `POST /v1/admin/backup` starts a
//! backup of the whole cluster coordinated by this node, `GET /v1/admin/backup/{id}` follows
//! it, `GET /v1/admin/backup` lists the runs this node remembers.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::extract::optional_json;
use super::openapi::{errors, ADMIN, OPTIONAL_BODY};
use super::AppState;
use crate::cluster::backup::{BackupError, BackupProgress};
use crate::error::ErrorCode;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(start, list)).routes(routes!(progress))
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

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// A directory or `s3://bucket/prefix`; default `backup.destination`.
    destination: Option<String>,
}

errors!(StartErrors: ADMIN, OPTIONAL_BODY, &[
    ErrorCode::BackupDestinationInvalid,
    ErrorCode::BackupInProgress,
    ErrorCode::BackupStoreFailed,
]);

/// Starts a backup of the whole cluster, coordinated by this node, in the background.
#[utoipa::path(post, path = "/v1/admin/backup", tag = "backup",
    request_body(content = Option<StartRequest>, description = "optional"),
    responses((status = 202, description = "started: follow it by its `id`", body = BackupProgress), StartErrors))]
async fn start(State(state): State<AppState>, _admin: super::AdminRights, body: Bytes) -> Result<Response, ApiError> {
    let request: StartRequest = optional_json(&body)?;
    let progress = state.backups.start(request.destination.as_deref())?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(progress)).into_response())
}

errors!(ProgressErrors: ADMIN, &[ErrorCode::BackupNotFound]);

/// One backup's progress.
#[utoipa::path(get, path = "/v1/admin/backup/{id}", tag = "backup",
    params(("id" = String, Path, description = "the backup's id")),
    responses((status = 200, description = "its progress", body = BackupProgress), ProgressErrors))]
async fn progress(
    State(state): State<AppState>,
    _admin: super::AdminRights,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.backups.progress(&id)?).into_response())
}

#[derive(Serialize, ToSchema)]
struct BackupList {
    /// Newest first.
    backups: Vec<BackupProgress>,
}

errors!(ListErrors: ADMIN);

/// The backups this node coordinated since it started.
#[utoipa::path(get, path = "/v1/admin/backup", tag = "backup", operation_id = "list_backups",
    responses((status = 200, description = "the runs", body = BackupList), ListErrors))]
async fn list(State(state): State<AppState>, _admin: super::AdminRights) -> Response {
    Json(BackupList { backups: state.backups.runs() }).into_response()
}
