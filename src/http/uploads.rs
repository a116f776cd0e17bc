//! What the upload routes (`POST /v1/datasets`, `POST /v1/weights`) share, so that uploads
//! cannot exhaust the server's memory or disk:
//!
//! - before the body is read: the name (a job name's rules), the length the request declares
//!   (413 above `--max-upload-bytes`), room for it under `--max-stored-bytes` (507) and a
//!   permit among `--max-concurrent-uploads` (503 with `Retry-After` when none is free);
//! - the body read into one buffer of the declared length, which is then moved, never
//!   copied, through validation into the store (the store checks the quota again as it
//!   inserts, so concurrent uploads cannot overshoot it together).
//!
//! A refused upload is answered at once; its body is then read and dropped piece by piece in
//! the background, so that a client still sending reads the answer rather than a reset
//! connection.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use futures_util::StreamExt;
use tokio::sync::OwnedSemaphorePermit;

use super::{ApiError, AppState};
use crate::engine::quote::quoted;
use crate::engine::spec::check_name;
use crate::store::Deletion;

/// An upload allowed to read its body: it holds one of the permits until it is dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    /// The body's length as the request declares it (`Content-Length`).
    pub declared: Option<usize>,
}

/// Everything checked before an upload's body is read, cheapest first.
pub async fn admit(
    state: &AppState,
    name: Option<&str>,
    headers: &HeaderMap,
) -> Result<Admitted, ApiError> {
    if let Some(name) = name {
        check_name(name).map_err(|message| ApiError::invalid("name", message))?;
    }
    let limit = state.settings.max_upload_bytes;
    let declared = declared_length(headers);
    if declared.is_some_and(|declared| declared > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // The quota first: when it is full, retrying later will not help.
    if let Some(declared) = declared {
        let stored = state.store.stored_bytes().await?;
        if stored.saturating_add(declared as i64) > quota(state) {
            return Err(storage_full(state, stored, declared));
        }
    }
    let permit = state
        .uploads
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::UploadsBusy {
            limit: state.settings.max_concurrent_uploads,
        })?;
    Ok(Admitted {
        _permit: permit,
        declared,
    })
}

/// The answer to an upload refused before its body was read. The body is read and dropped in
/// the background (at most `--max-upload-bytes` of it, each piece within the body read
/// timeout), unless the client waits for `100 Continue` and so has not sent it.
pub fn refuse(state: &AppState, request: Request, error: ApiError) -> ApiError {
    let waits_to_send = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|expect| expect.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if waits_to_send || matches!(error, ApiError::PayloadTooLarge { .. }) {
        return error;
    }
    let limit = state.settings.max_upload_bytes;
    let mut body = request.into_body().into_data_stream();
    tokio::spawn(async move {
        let mut read = 0;
        while let Some(Ok(piece)) = body.next().await {
            read += piece.len();
            if read > limit {
                break;
            }
        }
    });
    error
}

/// The body in one buffer, allocated once when its length is declared, with the limit kept
/// as it arrives (413 above it) and a body that stops sending answered 408.
pub async fn read_body(
    body: Body,
    declared: Option<usize>,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let mut data = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    let mut body = body.into_data_stream();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|error| body_error(&error))?;
        if data.len() + piece.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        data.extend_from_slice(&piece);
    }
    Ok(data)
}

/// A body that could not be read: 408 when it stopped sending for the body read timeout,
/// else 400.
pub fn body_error(error: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::BodyTimeout;
        }
        cause = error.source();
    }
    ApiError::bad_request(format!("could not read the request body: {error}"))
}

/// `--max-stored-bytes` as the store takes it.
pub fn quota(state: &AppState) -> i64 {
    i64::try_from(state.settings.max_stored_bytes).unwrap_or(i64::MAX)
}

/// 507: storing `adding` bytes more than the `stored` would pass the quota.
pub fn storage_full(state: &AppState, stored: i64, adding: usize) -> ApiError {
    ApiError::StorageFull {
        stored: stored.max(0) as u64,
        adding: adding as u64,
        quota: state.settings.max_stored_bytes,
    }
}

/// A delete's answer: 204, 404, or 409 naming the jobs that keep the upload.
pub fn deleted(deletion: Deletion, what: &str, id: &str) -> Result<StatusCode, ApiError> {
    match deletion {
        Deletion::Deleted => {
            tracing::info!(id, "{what} deleted");
            Ok(StatusCode::NO_CONTENT)
        }
        Deletion::NotFound => Err(ApiError::NotFound(format!("{what} {}", quoted(id)))),
        Deletion::InUse(jobs) if jobs.is_empty() => Err(ApiError::Conflict(format!(
            "{what} {id} is used by a job that was just running: try again"
        ))),
        Deletion::InUse(jobs) => Err(ApiError::Conflict(format!(
            "{what} {id} is used by queued or running jobs ({}): cancel them or wait until they end",
            jobs.join(", ")
        ))),
    }
}

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse().ok())
}
