//! Stateless helpers: `POST /v1/analyze` reads a curve measured elsewhere, `POST
//! /v1/schedules` prints a schedule's learning rate and momentum per step.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{from_json_value, ApiJson};
use super::{ApiError, AppState, ErrorBody};
use crate::engine::schedule::Schedule;
use crate::engine::suggest;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/analyze", post(analyze))
        .route("/schedules", post(schedules))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnalyzeRequest {
    /// Learning rates, rising.
    pub lr: Vec<f64>,
    /// One loss per learning rate; `null` for a non-finite loss at the end.
    pub loss: Vec<Option<f64>>,
    /// The EMA factor (default 0.98, as fastai).
    pub smoothing: Option<f64>,
}

/// Suggestions (`valley`, `steepest`, `minimum`, `edge`) and warnings for a curve.
#[utoipa::path(post, path = "/v1/analyze", tag = "tools", request_body = AnalyzeRequest,
    responses((status = 200, description = "suggestions, warnings, smoothed curve", body = Object),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn analyze(
    State(state): State<AppState>,
    ApiJson(body): ApiJson,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: AnalyzeRequest = from_json_value(body)?;
    let max_points = state.settings.max_schedule_steps;
    if request.lr.len() > max_points {
        return Err(ApiError::limit(
            "lr",
            format!(
                "{} points is above the limit of {max_points} (max_schedule_steps)",
                request.lr.len()
            ),
        ));
    }
    let losses: Vec<f64> = request
        .loss
        .iter()
        .map(|loss| loss.unwrap_or(f64::NAN))
        .collect();
    let analysis = suggest::analyze(&request.lr, &losses, request.smoothing.unwrap_or(0.98))?;
    let value = serde_json::to_value(analysis)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("encoding an analysis: {e}")))?;
    Ok(Json(value))
}

/// Per-step learning rate and momentum of a `one_cycle`, `cyclic`, `cosine_warm_restarts`,
/// `warmup_cosine`, `cosine` or `step` schedule, with PyTorch's semantics; for `reduce_on_plateau`,
/// the learning rate after each `step(metric)` over the given `metrics`.
#[utoipa::path(post, path = "/v1/schedules", tag = "tools",
    request_body(content = Object, description = "`kind` and that kind's parameters (and `metrics` for reduce_on_plateau)"),
    responses((status = 200, description = "{lr: [...], momentum: [...]}", body = Object),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn schedules(
    State(state): State<AppState>,
    ApiJson(body): ApiJson,
) -> Result<Json<serde_json::Value>, ApiError> {
    let schedule: Schedule = from_json_value(body)?;
    schedule
        .validate(state.settings.max_schedule_steps)
        .map_err(|error| ApiError::invalid(error.field, error.message))?;
    let curve = schedule.curve();
    let value = serde_json::to_value(curve)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("encoding a schedule: {e}")))?;
    Ok(Json(value))
}
