//! `/v1/datasets`: uploads (CSV and text as the raw body, IDX and NPY pairs as multipart
//! parts `x` and `y`), parsed completely with the engine's readers before anything is stored.

use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiQuery;
use super::{uploads, ApiError, AppState, ErrorBody};
use crate::engine::data::{self, DataError, Task};
use crate::engine::quote::{quoted, shortened};
use crate::store::{new_id, DataFormat, DatasetRow, NewDataset};

pub fn router(max_upload_bytes: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/datasets",
            get(list)
                .post(upload)
                .layer(DefaultBodyLimit::max(max_upload_bytes)),
        )
        .route("/datasets/{id}", get(show).delete(delete))
}

#[derive(Deserialize, ToSchema, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "snake_case")]
pub enum UploadTask {
    #[default]
    Auto,
    Classification,
    Regression,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// `csv` or `text` (the raw body), `idx` or `npy` (multipart parts `x` and `y`).
    pub format: DataFormat,
    /// At most 200 characters, no control characters (as a job's name).
    pub name: Option<String>,
    /// CSV: the target column by name (default: the last column).
    pub target: Option<String>,
    /// CSV and NPY: `auto` (default), `classification` or `regression`.
    pub task: Option<UploadTask>,
}

/// A stored dataset, as validated at upload.
#[derive(Serialize, ToSchema)]
pub struct DatasetView {
    pub id: String,
    pub name: Option<String>,
    #[schema(value_type = String)]
    pub format: DataFormat,
    pub target: Option<String>,
    /// Rows (CSV, NPY), images (IDX) or characters (text).
    pub rows: i64,
    pub features: i64,
    pub sample_shape: Vec<i64>,
    pub classes: Option<i64>,
    /// Distinct characters of a text corpus.
    pub vocabulary: Option<i64>,
    #[schema(value_type = String)]
    pub task: Task,
    pub sha256: String,
    pub bytes: i64,
    pub created_at: String,
}

impl From<DatasetRow> for DatasetView {
    fn from(row: DatasetRow) -> DatasetView {
        DatasetView {
            id: row.id,
            name: row.name,
            format: row.format,
            target: row.target,
            rows: row.rows,
            features: row.features,
            sample_shape: row.sample_shape,
            classes: row.classes,
            vocabulary: row.vocabulary,
            task: row.task,
            sha256: row.sha256,
            bytes: row.bytes,
            created_at: row.created_at,
        }
    }
}

/// Uploads a dataset. It is parsed completely first; an error names the row and column (CSV)
/// or the part and position (other formats). A CSV with more columns than
/// `max_dataset_columns` is refused from its header, before its rows are read. Before the
/// body is read: 503 when `max_concurrent_uploads` uploads are in progress, 507 when the
/// declared length would pass `max_stored_bytes` (checked again as it is stored).
#[utoipa::path(post, path = "/v1/datasets", tag = "datasets", params(UploadQuery),
    request_body(content = String, description = "CSV or UTF-8 text as the raw body; multipart/form-data with parts x and y for idx and npy",
        content_type = "application/octet-stream"),
    responses((status = 201, body = DatasetView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 408, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody,
            description = "Too many uploads in progress (Retry-After), the database is unavailable, or the server is shutting down"),
        (status = 507, body = ErrorBody,
            description = "The stored datasets and weights would pass the server's quota")))]
pub async fn upload(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let admitted = match uploads::admit(&state, query.name.as_deref(), request.headers()).await {
        Ok(admitted) => admitted,
        Err(error) => return Err(uploads::refuse(&state, request, error)),
    };
    let limit = state.settings.max_upload_bytes;
    let (x, y) = match query.format {
        DataFormat::Csv | DataFormat::Text => {
            let body = uploads::read_body(request.into_body(), admitted.declared, limit).await?;
            (body, None)
        }
        DataFormat::Idx | DataFormat::Npy => {
            let multipart =
                Multipart::from_request(request, &state)
                    .await
                    .map_err(|rejection| {
                        ApiError::bad_request(format!(
                            "{} uploads are multipart/form-data with parts x and y: {}",
                            query.format.as_str(),
                            rejection.body_text()
                        ))
                    })?;
            let (x, y) = read_parts(multipart, limit).await?;
            (x, Some(y))
        }
    };
    if x.is_empty() {
        return Err(ApiError::invalid("x", "the dataset is empty"));
    }
    let format = query.format;
    let task = match query.task.unwrap_or_default() {
        UploadTask::Auto => None,
        UploadTask::Classification => Some(Task::Classification),
        UploadTask::Regression => Some(Task::Regression),
    };
    let target = query.target.clone();
    let max_columns = state.settings.max_dataset_columns;
    let (x, y, summary) = tokio::task::spawn_blocking(move || {
        let summary = describe(
            format,
            &x,
            y.as_deref(),
            target.as_deref(),
            task,
            max_columns,
        );
        (x, y, summary)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("validating an upload: {e}")))?;
    let summary = summary?;
    let max_rows = state.settings.max_dataset_rows;
    if summary.rows > max_rows {
        return Err(ApiError::limit(
            "rows",
            format!(
                "{} rows is above the limit of {max_rows} (max_dataset_rows)",
                summary.rows
            ),
        ));
    }
    let mut hasher = Sha256::new();
    hasher.update(&x);
    if let Some(y) = &y {
        hasher.update(y);
    }
    let bytes = x.len() + y.as_ref().map_or(0, Vec::len);
    let row = DatasetRow {
        id: new_id("ds"),
        name: query.name,
        format,
        target: query.target,
        rows: summary.rows as i64,
        features: summary.features as i64,
        sample_shape: summary.sample_shape.iter().map(|d| *d as i64).collect(),
        classes: summary.classes.map(|c| c as i64),
        vocabulary: summary.vocabulary.map(|v| v as i64),
        task: summary.task,
        sha256: format!("{:x}", hasher.finalize()),
        bytes: bytes as i64,
        created_at: String::new(),
    };
    let stored = state
        .store
        .insert_dataset(NewDataset { row, x, y }, uploads::quota(&state))
        .await?;
    let Some(stored) = stored else {
        let now = state.store.stored_bytes().await?;
        return Err(uploads::storage_full(&state, now, bytes));
    };
    drop(admitted);
    tracing::info!(dataset = %stored.id, rows = stored.rows, "dataset stored");
    let location = format!("/v1/datasets/{}", stored.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(DatasetView::from(stored)),
    )
        .into_response())
}

async fn read_parts(
    mut multipart: Multipart,
    limit: usize,
) -> Result<(Vec<u8>, Vec<u8>), ApiError> {
    let (mut x, mut y) = (None, None);
    loop {
        let field = multipart.next_field().await.map_err(|error| {
            if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::bad_request(format!("reading the multipart body: {}", error.body_text()))
            }
        })?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|error| {
            if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::bad_request(format!(
                    "reading part {}: {}",
                    quoted(&name),
                    error.body_text()
                ))
            }
        })?;
        // `Vec::from` takes the buffer over, without a copy.
        match name.as_str() {
            "x" => x = Some(Vec::from(bytes)),
            "y" => y = Some(Vec::from(bytes)),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected part {}: give parts x and y",
                    quoted(other)
                )))
            }
        }
    }
    match (x, y) {
        (Some(x), Some(y)) => Ok((x, y)),
        (None, _) => Err(ApiError::bad_request("the part x is missing")),
        (_, None) => Err(ApiError::bad_request("the part y is missing")),
    }
}

struct Summary {
    rows: usize,
    features: usize,
    sample_shape: Vec<usize>,
    classes: Option<usize>,
    vocabulary: Option<usize>,
    task: Task,
}

/// Parses an upload completely. A CSV's header is read first, and a file wider than
/// `max_columns` is refused before any of its rows is parsed.
fn describe(
    format: DataFormat,
    x: &[u8],
    y: Option<&[u8]>,
    target: Option<&str>,
    task: Option<Task>,
    max_columns: usize,
) -> Result<Summary, ApiError> {
    let y = y.unwrap_or_default();
    let info = match format {
        DataFormat::Csv => {
            // Counted before the header is read: the reader keeps an entry per cell.
            let columns = data::CsvFile::header_width(x);
            if columns > max_columns {
                return Err(ApiError::limit(
                    "columns",
                    format!(
                        "{columns} columns is above the limit of {max_columns} (max_dataset_columns)"
                    ),
                ));
            }
            // Checked without keeping the features: the body stays the one copy held.
            data::CsvFile::open(x).and_then(|file| file.check(target, task))
        }
        DataFormat::Idx => data::read_idx(x, y).map(|dataset| dataset.info()),
        DataFormat::Npy => data::read_npy(x, y, task).map(|dataset| dataset.info()),
        DataFormat::Text => return describe_text(x).map_err(data_error),
    };
    let info = info.map_err(data_error)?;
    Ok(Summary {
        rows: info.rows,
        features: info.features,
        sample_shape: info.sample_shape,
        classes: info.classes,
        vocabulary: None,
        task: info.task,
    })
}

/// A text corpus: the context is a job's choice, so only the corpus is checked here.
fn describe_text(x: &[u8]) -> Result<Summary, DataError> {
    let vocabulary = data::text_vocabulary(x)?;
    let characters = std::str::from_utf8(x).map_or(0, |text| text.chars().count());
    if characters < 2 {
        return Err(DataError::Invalid {
            part: "text".into(),
            message: "a corpus needs at least 2 characters".into(),
        });
    }
    Ok(Summary {
        rows: characters,
        features: 0,
        sample_shape: Vec::new(),
        classes: None,
        vocabulary: Some(vocabulary.len()),
        task: Task::LanguageModel,
    })
}

fn data_error(error: DataError) -> ApiError {
    let field = match &error {
        DataError::Csv { column, .. } if !column.is_empty() => shortened(column).into_owned(),
        DataError::Csv { .. } => "csv".to_string(),
        DataError::Invalid { part, .. } => part.clone(),
    };
    ApiError::Unprocessable {
        code: "invalid_data",
        field: Some(field),
        message: error.to_string(),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DatasetListQuery {
    /// At most this many (1..=100, default 20).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DatasetList {
    pub datasets: Vec<DatasetView>,
    pub next_cursor: Option<String>,
}

/// Datasets, newest first.
#[utoipa::path(get, path = "/v1/datasets", tag = "datasets", params(DatasetListQuery),
    responses((status = 200, body = DatasetList), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<DatasetListQuery>,
) -> Result<Json<DatasetList>, ApiError> {
    let (limit, before) = super::paging::page(query.limit, query.cursor.as_deref())?;
    let rows = state.store.list_datasets(limit, before).await?;
    let next_cursor =
        super::paging::next_cursor(rows.len(), limit, rows.last().map(|(seq, _)| *seq));
    Ok(Json(DatasetList {
        datasets: rows.into_iter().map(|(_, row)| row.into()).collect(),
        next_cursor,
    }))
}

/// A dataset's description: rows, features, classes, task.
#[utoipa::path(get, path = "/v1/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, body = DatasetView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DatasetView>, ApiError> {
    let row = state
        .store
        .get_dataset(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("dataset {}", quoted(&id))))?;
    Ok(Json(row.into()))
}

/// Deletes a dataset and its bytes, making room under `max_stored_bytes`; refused while a
/// queued or running job names it (as `data.dataset_id` or `data.validation_dataset_id`).
#[utoipa::path(delete, path = "/v1/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A queued or running job uses it")))]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let deletion = state.store.delete_dataset(&id).await?;
    uploads::deleted(deletion, "dataset", &id)
}
