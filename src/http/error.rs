//! The API's one error type and its one JSON shape, `{"error": {"code", "message", "field"?}}`,
//! and the extractors whose rejections use it. A 500 is logged once here and its details
//! never reach the client; a 503 or 429 says when to try again (`Retry-After`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::AppState;
use crate::engine::json::JsonError;
use crate::engine::quote;
use crate::engine::SpecError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: not JSON, a bad query string, a missing part; `field` names
    /// the query parameter when one is at fault.
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: String,
        field: Option<String>,
    },
    #[error("a valid `Authorization: Bearer <token>` header is required")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body stopped arriving: send it without pauses")]
    BodyTimeout,
    /// Well-formed, but a value is invalid or above a limit; `field` names it.
    #[error("{message}")]
    Unprocessable {
        code: &'static str,
        field: Option<String>,
        message: String,
    },
    #[error("{queued} jobs are already queued (the limit): retry later")]
    QueueFull { queued: i64 },
    /// Every upload permit is taken; answered before the body is read.
    #[error("{limit} uploads are already in progress (the limit): retry later")]
    UploadsBusy { limit: u32 },
    /// Storing the upload would pass `--max-stored-bytes`.
    #[error("the server stores {stored} bytes of datasets and weights; {adding} more would pass its quota of {quota} bytes: delete some (DELETE /v1/datasets/{{id}}, DELETE /v1/weights/{{id}})")]
    StorageFull {
        stored: u64,
        adding: u64,
        quota: u64,
    },
    /// The database is locked by another process, out of connections, or unusable.
    #[error("the database is unavailable ({}): retry later", .0.reason())]
    Unavailable(StoreError),
    /// The database's disk is full: nothing can be written until space is freed.
    #[error("the database's disk is full ({}): nothing can be stored until space is freed on the server; retry later", .0.reason())]
    DiskFull(StoreError),
    /// The server is draining before it stops: another instance, or this one restarted,
    /// will answer.
    #[error("the server is shutting down: retry later")]
    ShuttingDown,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_json`, `invalid_spec`, `limit_exceeded`, ...
    pub code: String,
    pub message: String,
    /// The offending field by its path (`range_test.start_lr`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `Retry-After` of a 503 for database trouble (a lock is held for a moment) and for a
/// server shutting down (a restart takes a few seconds); `/healthz` says the same.
pub const RETRY_UNAVAILABLE: u64 = 2;
pub const RETRY_SHUTTING_DOWN: u64 = 5;
pub const RETRY_DISK_FULL: u64 = 10;
/// `Retry-After` of a 503 for an upload refused while the others are read.
pub const RETRY_UPLOAD: u64 = 1;

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code: "bad_request",
            message: message.into(),
            field: None,
        }
    }

    /// A query parameter that cannot be served (`limit=0`), named in `field`.
    pub fn bad_parameter(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code: "bad_request",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Unprocessable {
            code: "invalid_input",
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// A configured limit: the message names the limit and its value.
    pub fn limit(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Unprocessable {
            code: "limit_exceeded",
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::DiskFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::StorageFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable(_) | ApiError::ShuttingDown | ApiError::UploadsBusy { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds a client should wait before trying again, for the errors that pass.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            // A lock is held for a moment; a restart takes a few seconds; a full queue drains
            // as jobs finish, which takes longer.
            ApiError::Unavailable(_) => Some(RETRY_UNAVAILABLE),
            // Space is freed by a person, not in a moment.
            ApiError::DiskFull(_) => Some(RETRY_DISK_FULL),
            ApiError::ShuttingDown => Some(RETRY_SHUTTING_DOWN),
            ApiError::QueueFull { .. } => Some(10),
            // An upload takes a second or so to read and store.
            ApiError::UploadsBusy { .. } => Some(RETRY_UPLOAD),
            _ => None,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::BodyTimeout => "request_timeout",
            ApiError::Unprocessable { code, .. } => code,
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::UploadsBusy { .. } => "too_many_uploads",
            ApiError::StorageFull { .. } => "storage_full",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DiskFull(_) => "disk_full",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(error: SpecError) -> ApiError {
        ApiError::Unprocessable {
            code: "invalid_spec",
            field: Some(error.field),
            message: error.message,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        if error.is_disk_full() {
            ApiError::DiskFull(error)
        } else if error.is_unavailable() {
            ApiError::Unavailable(error)
        } else {
            ApiError::Internal(anyhow::Error::new(error).context("database"))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            ApiError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed");
                "internal error: see the server log".to_string()
            }
            ApiError::Unavailable(error) => {
                tracing::warn!(%error, "request refused: the database is unavailable");
                self.to_string()
            }
            ApiError::DiskFull(error) => {
                tracing::error!(%error, "request refused: the database's disk is full");
                self.to_string()
            }
            // Whoever wrote the message, a value it quotes is cut to its first characters.
            other => quote::bounded(&other.to_string()).into_owned(),
        };
        let field = match &self {
            ApiError::Unprocessable { field, .. } | ApiError::BadRequest { field, .. } => field
                .as_deref()
                .map(|field| quote::shortened(field).into_owned()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message,
                field,
            },
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The body as bytes, with a too-large body reported as 413 and one that stopped arriving
/// as 408, in the API's shape.
pub fn body_rejection(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        super::uploads::body_error(&rejection)
    }
}

/// A JSON body parsed to a `serde_json::Value`: a syntax error is a 400, a key given twice
/// in one object a 422 naming it, the typed checks (and their 422s naming the field) are the
/// handler's. The content type is not checked.
pub struct ApiJson(pub serde_json::Value);

impl FromRequest<AppState> for ApiJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.settings.max_json_bytes;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| body_rejection(rejection, limit))?;
        crate::engine::json::parse(&bytes)
            .map(ApiJson)
            .map_err(|error| {
                let message = error.to_string();
                match error {
                    JsonError::Syntax(_) => ApiError::BadRequest {
                        code: "invalid_json",
                        message: format!("the body is not valid JSON: {message}"),
                        field: None,
                    },
                    JsonError::DuplicateKey { field, .. } => ApiError::Unprocessable {
                        code: "duplicate_key",
                        field: Some(field),
                        message,
                    },
                }
            })
    }
}

/// Deserializes a JSON value, naming the offending field by its path.
pub fn from_json_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        ApiError::Unprocessable {
            code: "invalid_input",
            field: (path != ".").then_some(path),
            message: error.inner().to_string(),
        }
    })
}

/// A query string, with a bad one reported as 400 in the API's shape.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection| {
                ApiError::bad_request(format!("invalid query: {}", rejection.body_text()))
            })
    }
}
