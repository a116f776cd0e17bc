//! `/v1/weights`: initial weights for layer-list models, uploaded as a safetensors file (the
//! raw body) and parsed completely with the engine's reader before anything is stored. A job
//! names them with `init.weights.id`.

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiQuery;
use super::{uploads, ApiError, AppState, ErrorBody};
use crate::engine::model::inspect_safetensors;
use crate::engine::quote::quoted;
use crate::store::{new_id, NewWeights, TensorShape, WeightsRow};

pub fn router(max_upload_bytes: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/weights",
            get(list)
                .post(upload)
                .layer(DefaultBodyLimit::max(max_upload_bytes)),
        )
        .route("/weights/{id}", get(show).delete(delete))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WeightsUploadQuery {
    /// At most 200 characters, no control characters (as a job's name).
    pub name: Option<String>,
}

/// Stored initial weights, as validated at upload.
#[derive(Serialize, ToSchema)]
pub struct WeightsView {
    pub id: String,
    pub name: Option<String>,
    pub bytes: i64,
    pub sha256: String,
    /// How many tensors the file holds.
    pub tensors: i64,
    /// Every tensor's `state_dict()` name and shape, sorted by name.
    pub shapes: Vec<TensorView>,
    pub created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct TensorView {
    pub name: String,
    pub shape: Vec<u64>,
}

impl From<WeightsRow> for WeightsView {
    fn from(row: WeightsRow) -> WeightsView {
        WeightsView {
            id: row.id,
            name: row.name,
            bytes: row.bytes,
            sha256: row.sha256,
            tensors: row.tensors,
            shapes: row
                .shapes
                .into_iter()
                .map(|tensor| TensorView {
                    name: tensor.name,
                    shape: tensor.shape,
                })
                .collect(),
            created_at: row.created_at,
        }
    }
}

/// Uploads initial weights: the `state_dict()` of the equivalent `torch.nn.Sequential`,
/// saved with safetensors. The file is read completely first; whether its tensors fit a
/// model is checked when a job names them. Before the body is read: 503 when
/// `max_concurrent_uploads` uploads are in progress, 507 when the declared length would pass
/// `max_stored_bytes` (checked again as it is stored).
#[utoipa::path(post, path = "/v1/weights", tag = "weights", params(WeightsUploadQuery),
    request_body(content = String, description = "A safetensors file as the raw body",
        content_type = "application/octet-stream"),
    responses((status = 201, body = WeightsView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 408, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody,
            description = "Too many uploads in progress (Retry-After), the database is unavailable, or the server is shutting down"),
        (status = 507, body = ErrorBody,
            description = "The stored datasets and weights would pass the server's quota")))]
pub async fn upload(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<WeightsUploadQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let admitted = match uploads::admit(&state, query.name.as_deref(), request.headers()).await {
        Ok(admitted) => admitted,
        Err(error) => return Err(uploads::refuse(&state, request, error)),
    };
    let limit = state.settings.max_upload_bytes;
    let body = uploads::read_body(request.into_body(), admitted.declared, limit).await?;
    if body.is_empty() {
        return Err(ApiError::invalid("body", "the weights file is empty"));
    }
    let (body, shapes) = tokio::task::spawn_blocking(move || {
        let shapes = describe(&body);
        (body, shapes)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("validating an upload: {e}")))?;
    let shapes = shapes?;
    let row = WeightsRow {
        id: new_id("weights"),
        name: query.name,
        bytes: body.len() as i64,
        sha256: format!("{:x}", Sha256::digest(&body)),
        tensors: shapes.len() as i64,
        shapes,
        created_at: String::new(),
    };
    let bytes = body.len();
    let stored = state
        .store
        .insert_weights(NewWeights { row, data: body }, uploads::quota(&state))
        .await?;
    let Some(stored) = stored else {
        let now = state.store.stored_bytes().await?;
        return Err(uploads::storage_full(&state, now, bytes));
    };
    drop(admitted);
    tracing::info!(weights = %stored.id, tensors = stored.tensors, "weights stored");
    let location = format!("/v1/weights/{}", stored.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(WeightsView::from(stored)),
    )
        .into_response())
}

/// Every tensor's name and shape, sorted by name, from a file checked completely, in place.
fn describe(body: &[u8]) -> Result<Vec<TensorShape>, ApiError> {
    let tensors = inspect_safetensors(body).map_err(|error| ApiError::Unprocessable {
        code: "invalid_data",
        field: Some("body".to_string()),
        message: error.message,
    })?;
    if tensors.is_empty() {
        return Err(ApiError::Unprocessable {
            code: "invalid_data",
            field: Some("body".to_string()),
            message: "the safetensors file holds no tensors".to_string(),
        });
    }
    Ok(tensors
        .into_iter()
        .map(|(name, dims)| TensorShape {
            name,
            shape: dims.iter().map(|&dim| dim as u64).collect(),
        })
        .collect())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WeightsListQuery {
    /// At most this many (1..=100, default 20).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct WeightsList {
    pub weights: Vec<WeightsView>,
    pub next_cursor: Option<String>,
}

/// Uploaded weights, newest first.
#[utoipa::path(get, path = "/v1/weights", tag = "weights", params(WeightsListQuery),
    responses((status = 200, body = WeightsList), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<WeightsListQuery>,
) -> Result<Json<WeightsList>, ApiError> {
    let (limit, before) = super::paging::page(query.limit, query.cursor.as_deref())?;
    let rows = state.store.list_weights(limit, before).await?;
    let next_cursor =
        super::paging::next_cursor(rows.len(), limit, rows.last().map(|(seq, _)| *seq));
    Ok(Json(WeightsList {
        weights: rows.into_iter().map(|(_, row)| row.into()).collect(),
        next_cursor,
    }))
}

/// Uploaded weights' description: their tensors' names and shapes.
#[utoipa::path(get, path = "/v1/weights/{id}", tag = "weights", params(("id" = String, Path)),
    responses((status = 200, body = WeightsView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WeightsView>, ApiError> {
    let row = state
        .store
        .get_weights(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("weights {}", quoted(&id))))?;
    Ok(Json(row.into()))
}

/// Deletes uploaded weights, making room under `max_stored_bytes`; refused while a queued or
/// running job starts from them (`init.weights.id`).
#[utoipa::path(delete, path = "/v1/weights/{id}", tag = "weights", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A queued or running job uses them")))]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let deletion = state.store.delete_weights(&id).await?;
    uploads::deleted(deletion, "weights", &id)
}
