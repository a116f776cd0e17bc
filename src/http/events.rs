//! `GET /v1/jobs/{id}/events`: server-sent events of a job, whichever process runs it. The
//! stream follows the store, not the worker: it reads the job's row and its new points and
//! sweep runs each time the store announces a change to the job (at once on PostgreSQL,
//! from any host; at once for this process's writes on SQLite) and on a short poll (other
//! processes on one SQLite file, notifications lost with a connection). So any API replica
//! streams any job, and a client that connects late gets the curve so far first.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::drain::{self, Phase};
use super::jobs::{find, CurvePoint, RacePoint, SweepRun, Trial};
use super::{ApiError, AppState, ErrorBody};
use crate::store::{Change, JobError, JobRow, JobStatus, StoreError, TrialStatus};

pub fn router() -> axum::Router<AppState> {
    Router::new().route("/jobs/{id}/events", get(events))
}

/// What a stream sends; the SSE event name is the variant's name, the data its fields.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum JobEvent {
    Status {
        status: JobStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
    },
    Progress {
        stage: Option<String>,
        done: i64,
        total: i64,
    },
    Point(CurvePoint),
    SweepRun(SweepRun),
    RacePoint(RacePoint),
    Trial(Box<Trial>),
}

impl JobEvent {
    fn name(&self) -> &'static str {
        match self {
            JobEvent::Status { .. } => "status",
            JobEvent::Progress { .. } => "progress",
            JobEvent::Point(_) => "point",
            JobEvent::SweepRun(_) => "sweep_run",
            JobEvent::RacePoint(_) => "race_point",
            JobEvent::Trial(_) => "trial",
        }
    }

    fn status(job: &JobRow) -> JobEvent {
        JobEvent::Status {
            status: job.status,
            error: job.error.clone(),
        }
    }

    fn progress(job: &JobRow) -> JobEvent {
        JobEvent::Progress {
            stage: job.stage.clone(),
            done: job.progress_done,
            total: job.progress_total,
        }
    }

    fn to_sse(&self) -> SseEvent {
        let data = serde_json::to_string(self).unwrap_or_else(|_| "null".to_string());
        SseEvent::default().event(self.name()).data(data)
    }
}

/// Server-sent events: `status` first, then `progress`; the `point`s, `sweep_run`s and (for
/// a `compare` job) `race_point`s stored so far and then new ones as the job runs, with `progress` as it changes; and a final
/// `status`, after which the stream ends. The job may run in any process sharing the
/// database. A stream open when the server shuts down follows its job through the grace
/// period and ends with `succeeded` (or the like), or `queued` when the job was put back for
/// the next start.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, description = "text/event-stream", content_type = "text/event-stream"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    // Subscribed before the first read: a change in between is then seen either in the row
    // or as an announcement.
    let changes = state.store.subscribe();
    let job = find(&state, &id).await?;
    let (sender, receiver) = mpsc::channel::<SseEvent>(256);
    tokio::spawn(async move {
        if let Err(error) = follow(&state, job, changes, &sender).await {
            tracing::warn!(%error, "event stream: the job could not be read");
        }
    });
    let stream = ReceiverStream::new(receiver).map(Ok::<_, Infallible>);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

/// What a stream has sent of its job.
struct Cursor {
    attempt: i64,
    status: JobStatus,
    progress: (Option<String>, i64, i64),
    last_step: i64,
    sweep_runs: i64,
    race_points: i64,
    /// The status each trial was last sent with, by its index (none: not sent yet).
    trials: Vec<Option<TrialStatus>>,
}

/// Whether the stream goes on.
enum Next {
    Follow,
    End,
}

async fn follow(
    state: &AppState,
    job: JobRow,
    mut changes: broadcast::Receiver<Change>,
    sender: &mpsc::Sender<SseEvent>,
) -> Result<(), StoreError> {
    let id = job.id.clone();
    let sent = |event: JobEvent| async move { sender.send(event.to_sse()).await.is_ok() };
    if !sent(JobEvent::status(&job)).await || job.status.is_finished() {
        return Ok(());
    }
    if !sent(JobEvent::progress(&job)).await {
        return Ok(());
    }
    let mut cursor = Cursor {
        attempt: job.attempts,
        status: job.status,
        progress: (job.stage.clone(), job.progress_done, job.progress_total),
        last_step: -1,
        sweep_runs: 0,
        race_points: 0,
        trials: Vec::new(),
    };
    if let Next::End = catch_up(state, &id, job, &mut cursor, sender).await? {
        return Ok(());
    }
    let workers_stopped = drain::reached(state.phase.clone(), Phase::WorkersStopped);
    tokio::pin!(workers_stopped);
    let mut poll = tokio::time::interval(state.store.poll_every());
    poll.tick().await;
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Ok(Change::Job(changed)) if changed == id => {}
                Ok(Change::Unknown) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            _ = poll.tick() => {}
            _ = sender.closed() => return Ok(()),
            _ = &mut workers_stopped => {
                // Every job of this process has finished or is queued again: the row is the
                // last this server will see of the job (a job still queued included).
                let Some(job) = state.store.get_job(&id).await? else {
                    return Ok(());
                };
                if let Next::Follow = catch_up(state, &id, job.clone(), &mut cursor, sender).await? {
                    sent(JobEvent::status(&job)).await;
                }
                return Ok(());
            }
        }
        let Some(job) = state.store.get_job(&id).await? else {
            return Ok(());
        };
        if let Next::End = catch_up(state, &id, job, &mut cursor, sender).await? {
            return Ok(());
        }
    }
}

/// Sends what changed since the cursor: a new status (a job that started, or went back to
/// the queue), the points and sweep runs stored since, the progress, and the final status
/// after everything else. The row is read before the points, so that a finished job's
/// points, written in the same transaction as its status, are all there.
async fn catch_up(
    state: &AppState,
    id: &str,
    job: JobRow,
    cursor: &mut Cursor,
    sender: &mpsc::Sender<SseEvent>,
) -> Result<Next, StoreError> {
    let sent = |event: JobEvent| async move { sender.send(event.to_sse()).await.is_ok() };
    if job.attempts != cursor.attempt {
        // Another attempt started over: its curve is written from step 0 again.
        cursor.attempt = job.attempts;
        cursor.last_step = -1;
        cursor.sweep_runs = 0;
        cursor.race_points = 0;
        cursor.trials.clear();
    }
    if job.status.is_finished() && cursor.status == JobStatus::Queued && job.started_at.is_some() {
        // It started and finished between two reads: say it ran before its points do.
        cursor.status = JobStatus::Running;
        let running = JobEvent::Status {
            status: JobStatus::Running,
            error: None,
        };
        if !sent(running).await {
            return Ok(Next::End);
        }
    }
    if job.status != cursor.status && !job.status.is_finished() {
        cursor.status = job.status;
        if !sent(JobEvent::status(&job)).await {
            return Ok(Next::End);
        }
        // A job put back in the queue while this server drains will not run here again:
        // that is its last status for this stream.
        if job.status == JobStatus::Queued && *state.phase.borrow() != Phase::Serving {
            return Ok(Next::End);
        }
    }
    for point in state.store.curve(id, Some(cursor.last_step)).await? {
        cursor.last_step = point.step;
        if !sent(JobEvent::Point(point.into())).await {
            return Ok(Next::End);
        }
    }
    for run in state.store.sweep_runs(id, cursor.sweep_runs).await? {
        cursor.sweep_runs = run.position + 1;
        if !sent(JobEvent::SweepRun(run.into())).await {
            return Ok(Next::End);
        }
    }
    for point in state.store.race_points(id, cursor.race_points).await? {
        cursor.race_points = point.position + 1;
        if !sent(JobEvent::RacePoint(point.into())).await {
            return Ok(Next::End);
        }
    }
    for trial in state.store.trials(id).await? {
        let Ok(index) = usize::try_from(trial.position) else {
            continue;
        };
        if cursor.trials.get(index) == Some(&Some(trial.status)) {
            continue;
        }
        if cursor.trials.len() <= index {
            // Side by side, a later trial's row may be written before an earlier one's.
            cursor.trials.resize(index + 1, None);
        }
        cursor.trials[index] = Some(trial.status);
        if !sent(JobEvent::Trial(Box::new(trial.into()))).await {
            return Ok(Next::End);
        }
    }
    let progress = (job.stage.clone(), job.progress_done, job.progress_total);
    if progress != cursor.progress {
        cursor.progress = progress;
        if !sent(JobEvent::progress(&job)).await {
            return Ok(Next::End);
        }
    }
    if job.status.is_finished() {
        sent(JobEvent::status(&job)).await;
        return Ok(Next::End);
    }
    Ok(Next::Follow)
}
