//! `/v1/jobs`: submit (validated against the limits before anything is queued), list, get,
//! the curve (JSON or CSV), and cancel (heard by whichever process runs the job). The event
//! stream is in `events.rs`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiJson, ApiQuery};
use super::{ApiError, AppState, ErrorBody};
use crate::engine::admission::{admit_job, check_initial_weights};
use crate::engine::quote::quoted;
use crate::engine::spec::{JobKind, WeightsSource};
use crate::engine::{TrialKind, ValidSpec};
use crate::store::{
    new_id, DataFormat, JobError, JobRow, JobStatus, ListFilter, NewJob, PointRow, RacePointRow,
    SweepRunRow, TrialRow, TrialStatus,
};
use crate::worker::planned_shape;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs", post(submit).get(list))
        .route("/jobs/{id}", get(show))
        .route("/jobs/{id}/curve", get(curve))
        .route("/jobs/{id}/trials", get(trials))
        .route("/jobs/{id}/cancel", post(cancel))
}

#[derive(Serialize, ToSchema)]
pub struct Progress {
    /// `range_test` or `sweep` once started.
    pub stage: Option<String>,
    pub done: i64,
    pub total: i64,
    pub fraction: f64,
}

/// A job as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct Job {
    pub id: String,
    #[schema(value_type = String)]
    pub kind: JobKind,
    pub name: Option<String>,
    pub status: JobStatus,
    pub progress: Progress,
    /// Times the job was claimed by a worker.
    pub attempts: i64,
    /// The worker that claimed it last, as `name@host`.
    #[schema(example = "w2@host-b")]
    pub worker: Option<String>,
    pub cancel_requested: bool,
    pub error: Option<JobError>,
    /// The spec with every default filled in.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// The job's result (recommendation, range test, sweep, timing), once succeeded.
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub heartbeat_at: Option<String>,
}

impl Job {
    fn from_row(row: JobRow) -> Job {
        let fraction = if row.progress_total > 0 {
            row.progress_done as f64 / row.progress_total as f64
        } else if row.status == JobStatus::Succeeded {
            1.0
        } else {
            0.0
        };
        Job {
            spec: serde_json::from_str(&row.spec).unwrap_or(serde_json::Value::Null),
            result: row
                .result
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok()),
            id: row.id,
            kind: row.kind,
            name: row.name,
            status: row.status,
            progress: Progress {
                stage: row.stage,
                done: row.progress_done,
                total: row.progress_total,
                fraction,
            },
            attempts: row.attempts,
            worker: row.worker,
            cancel_requested: row.cancel_requested,
            error: row.error,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            heartbeat_at: row.heartbeat_at,
        }
    }
}

/// Queues a job. The spec is checked completely first: unknown fields, values, limits, and
/// that the datasets and weights it names exist.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body(content = Object, description = "A job spec (the README's \"The job spec\")"),
    responses(
        (status = 202, body = Job), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn submit(
    State(state): State<AppState>,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let spec = ValidSpec::from_value(body, &state.limits)?;
    check_data(&state, &spec).await?;
    // What the worker reads back with `ValidSpec::from_stored`.
    let stored = serde_json::to_string(&spec)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("encoding the spec: {e}")))?;
    let new = NewJob {
        id: new_id("job"),
        kind: spec.kind,
        name: spec.name.clone(),
        spec: stored,
    };
    let row = state
        .store
        .insert_job(new, state.settings.max_queued)
        .await?
        .ok_or(ApiError::QueueFull {
            queued: state.settings.max_queued,
        })?;
    tracing::info!(job = %row.id, "job queued");
    let location = format!("/v1/jobs/{}", row.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(Job::from_row(row)),
    )
        .into_response())
}

/// What can be checked about the data before a job is queued.
async fn check_data(state: &AppState, spec: &ValidSpec) -> Result<(), ApiError> {
    let weights = match spec.init.as_ref().map(|init| &init.weights) {
        Some(WeightsSource::Path(_)) => {
            return Err(ApiError::invalid(
                "init.weights.path",
                "the server does not read local files: upload the file with POST /v1/weights and give init.weights.id",
            ));
        }
        Some(WeightsSource::Id(id)) => {
            Some(state.store.get_weights(id).await?.ok_or_else(|| {
                ApiError::invalid(
                    "init.weights.id",
                    format!(
                        "no weights {}: upload them with POST /v1/weights",
                        quoted(id)
                    ),
                )
            })?)
        }
        None => None,
    };
    let data = &spec.data;
    if data.path.is_some() {
        return Err(ApiError::invalid(
            "data.path",
            "the server does not read local files: upload the file with POST /v1/datasets and give data.dataset_id",
        ));
    }
    let mut rows = Vec::new();
    for (field, id) in [
        ("data.dataset_id", &data.dataset_id),
        ("data.validation_dataset_id", &data.validation_dataset_id),
    ] {
        let Some(id) = id else { continue };
        let dataset = state.store.get_dataset(id).await?.ok_or_else(|| {
            ApiError::invalid(
                field,
                format!(
                    "no dataset {}: upload it with POST /v1/datasets",
                    quoted(id)
                ),
            )
        })?;
        let wants_text = spec.model.context().is_some();
        if (dataset.format == DataFormat::Text) != wants_text {
            return Err(ApiError::invalid(
                "model.arch",
                if wants_text {
                    format!(
                        "dataset {id} is {} data: a language model (a transformer, or a layer list with a context) needs a text dataset",
                        dataset.format.as_str()
                    )
                } else {
                    format!(
                        "dataset {id} is a text corpus: use arch \"transformer\", or a layer list starting with an embedding and a model.context"
                    )
                },
            ));
        }
        rows.push(dataset);
    }
    // The job's cost and every check of the spec against the data's shape, with the
    // messages the worker would give, before anything is queued.
    let (train, validation) = (rows.first(), rows.get(1));
    if let Some(shape) = planned_shape(spec, train, validation)? {
        admit_job(spec, &shape, &state.limits)?;
        if let Some(weights) = weights {
            // The tensors' names and shapes as stored at upload, against the model's.
            let tensors = weights
                .shapes
                .into_iter()
                .map(|tensor| (tensor.name, tensor.shape))
                .collect();
            check_initial_weights(spec, &shape, &tensors)?;
        }
    }
    Ok(())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs with this status.
    pub status: Option<JobStatus>,
    /// At most this many (1..=100, default 20).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<JobList>, ApiError> {
    let (limit, before) = super::paging::page(query.limit, query.cursor.as_deref())?;
    let rows = state
        .store
        .list_jobs(&ListFilter {
            status: query.status,
            limit,
            before,
        })
        .await?;
    let next_cursor = super::paging::next_cursor(rows.len(), limit, rows.last().map(|row| row.seq));
    Ok(Json(JobList {
        jobs: rows.into_iter().map(Job::from_row).collect(),
        next_cursor,
    }))
}

pub(super) async fn find(state: &AppState, id: &str) -> Result<JobRow, ApiError> {
    state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {}", quoted(id))))
}

/// A job: spec, status, progress, timings, attempts, error and result.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(Job::from_row(find(&state, &id).await?)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CurveQuery {
    /// `json` (default) or `csv`.
    pub format: Option<CurveFormat>,
}

#[derive(Deserialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CurveFormat {
    Json,
    Csv,
}

/// One range-test step.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CurvePoint {
    pub step: i64,
    pub lr: f64,
    /// Null when the loss was not a number.
    pub loss: Option<f64>,
    pub smoothed: Option<f64>,
}

impl From<PointRow> for CurvePoint {
    fn from(row: PointRow) -> CurvePoint {
        CurvePoint {
            step: row.step,
            lr: row.lr,
            loss: row.loss,
            smoothed: row.smoothed,
        }
    }
}

/// One training run of the sweep at a candidate peak learning rate.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SweepRun {
    pub peak_lr: f64,
    pub seed: i64,
    /// The run's length in optimizer steps.
    pub steps: Option<i64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub train_loss: Option<f64>,
    pub diverged: bool,
    /// The training loss spiked mid-run (gave back more than half of what it had gained): a
    /// sign of the stability edge even when the run recovered. Null for runs stored before it
    /// was recorded.
    pub spiked: Option<bool>,
}

impl From<SweepRunRow> for SweepRun {
    fn from(row: SweepRunRow) -> SweepRun {
        SweepRun {
            peak_lr: row.peak_lr,
            seed: row.seed,
            steps: row.steps,
            val_loss: row.val_loss,
            val_accuracy: row.val_accuracy,
            train_loss: row.train_loss,
            diverged: row.diverged,
            spiked: row.spiked,
        }
    }
}

/// One validation point of a race's full run (a `compare` job): the recipe and seed it
/// belongs to, the step and training seconds since the run's start.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RacePoint {
    pub recipe: String,
    pub seed: i64,
    pub step: i64,
    pub seconds: f64,
    /// Null once the run has diverged.
    pub val_loss: Option<f64>,
    /// Null for regression, or once the run has diverged.
    pub val_accuracy: Option<f64>,
}

impl From<RacePointRow> for RacePoint {
    fn from(row: RacePointRow) -> RacePoint {
        RacePoint {
            recipe: row.recipe,
            seed: row.seed,
            step: row.step,
            seconds: row.seconds,
            val_loss: row.val_loss,
            val_accuracy: row.val_accuracy,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct Curve {
    pub job_id: String,
    pub status: JobStatus,
    /// One point per range-test step (empty for a `compare` job).
    pub points: Vec<CurvePoint>,
    pub sweep_runs: Vec<SweepRun>,
    /// A `compare` job's race points (so far while running), in the order measured; empty
    /// for other kinds.
    pub race_points: Vec<RacePoint>,
}

/// The range-test curve `{step, lr, loss, smoothed}` (points so far while running) and the
/// sweep's runs; for a `compare` job, its race points (in CSV, one row per race point:
/// `recipe,seed,step,seconds,val_loss,val_accuracy`).
#[utoipa::path(get, path = "/v1/jobs/{id}/curve", tag = "jobs",
    params(("id" = String, Path), CurveQuery),
    responses((status = 200, body = Curve), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn curve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<CurveQuery>,
) -> Result<Response, ApiError> {
    let job = find(&state, &id).await?;
    let race_points = state.store.race_points(&id, 0).await?;
    let cell = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    if query.format == Some(CurveFormat::Csv) && job.kind == JobKind::Compare {
        let mut text = String::from("recipe,seed,step,seconds,val_loss,val_accuracy\n");
        for point in &race_points {
            text.push_str(&format!(
                "{},{},{},{},{},{}\n",
                point.recipe,
                point.seed,
                point.step,
                point.seconds,
                cell(point.val_loss),
                cell(point.val_accuracy)
            ));
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response());
    }
    let points = state.store.curve(&id, None).await?;
    if query.format == Some(CurveFormat::Csv) {
        let mut text = String::from("step,lr,loss,smoothed\n");
        for point in &points {
            text.push_str(&format!(
                "{},{},{},{}\n",
                point.step,
                point.lr,
                cell(point.loss),
                cell(point.smoothed)
            ));
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response());
    }
    let sweep_runs = state.store.sweep_runs(&id, 0).await?;
    Ok(Json(Curve {
        job_id: id,
        status: job.status,
        points: points.into_iter().map(CurvePoint::from).collect(),
        sweep_runs: sweep_runs.into_iter().map(SweepRun::from).collect(),
        race_points: race_points.into_iter().map(RacePoint::from).collect(),
    })
    .into_response())
}

/// What kind of training a trial is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrialKindView {
    /// The range test's ramp.
    RangeTest,
    /// One OneCycle run of the sweep at a candidate peak.
    Sweep,
    /// One full run of a race's recipe (a `compare` job).
    Race,
}

impl From<TrialKind> for TrialKindView {
    fn from(kind: TrialKind) -> TrialKindView {
        match kind {
            TrialKind::RangeTest => TrialKindView::RangeTest,
            TrialKind::Sweep => TrialKindView::Sweep,
            TrialKind::Race => TrialKindView::Race,
        }
    }
}

/// One training run of a job: its range test, a sweep run at a candidate peak, or a race
/// run of a recipe.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Trial {
    /// Its place in the job, in the order the trials started (from 0).
    pub index: i64,
    pub kind: TrialKindView,
    /// A sweep run's peak learning rate, a race run's rate; null for the range test.
    pub lr: Option<f64>,
    /// The recipe a compare job's trial belongs to; null for other jobs.
    pub recipe: Option<String>,
    pub seed: i64,
    /// Its planned length in optimizer steps.
    pub steps: i64,
    pub status: TrialStatus,
    /// The worker that ran it.
    pub worker: Option<String>,
    /// The job's attempt it ran in.
    pub attempt: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Wall seconds from its start to its end (validation included); null while it runs.
    pub seconds: Option<f64>,
    /// The steps it took: fewer than `steps` when its loss stopped being finite.
    pub steps_run: Option<i64>,
    /// Its final validation loss; null while it runs, for the range test, or once diverged.
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// The step its loss stopped being finite at (the range test: where it stopped early).
    pub diverged_at: Option<i64>,
}

impl From<TrialRow> for Trial {
    fn from(row: TrialRow) -> Trial {
        Trial {
            index: row.position,
            kind: row.kind.into(),
            lr: row.lr,
            recipe: row.recipe,
            seed: row.seed,
            steps: row.steps,
            status: row.status,
            worker: row.worker,
            attempt: row.run,
            started_at: row.started_at,
            finished_at: row.finished_at,
            seconds: row.seconds,
            steps_run: row.steps_run,
            val_loss: row.val_loss,
            val_accuracy: row.val_accuracy,
            diverged_at: row.diverged_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TrialList {
    pub job_id: String,
    pub status: JobStatus,
    /// Every trial of the job's current attempt so far, in the order they started.
    pub trials: Vec<Trial>,
}

/// The job's trials: each training run (range test, sweep run, race run) with its seed,
/// length, status, worker, seconds and final validation loss.
#[utoipa::path(get, path = "/v1/jobs/{id}/trials", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = TrialList), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn trials(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TrialList>, ApiError> {
    let job = find(&state, &id).await?;
    let trials = state.store.trials(&id).await?;
    Ok(Json(TrialList {
        job_id: id,
        status: job.status,
        trials: trials.into_iter().map(Trial::from).collect(),
    }))
}

/// Stops a queued or running job: a running one within a step, in whichever process runs it
/// (it hears of the cancel at once on PostgreSQL, within a second on SQLite).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 202, body = Job), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    // A job can move from queued to running between the two tries; a few rounds settle it.
    for _ in 0..5 {
        if state.store.cancel_queued(&id).await? || state.store.request_cancel(&id).await? {
            break;
        }
        let job = find(&state, &id).await?;
        if job.status.is_finished() {
            return Err(ApiError::Conflict(format!(
                "job {id} has already {}",
                job.status.as_str()
            )));
        }
    }
    let job = find(&state, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(Job::from_row(job))).into_response())
}
