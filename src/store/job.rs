//! A job's rows and their meaning, the same on every backend: the status and the allowed
//! changes between statuses ([`can_transition`]), the attempt that fences a worker's writes,
//! progress with its new curve points and sweep runs, and how an attempt ends. The SQL that
//! reads and writes them is in `sql.rs`.

use serde::{Deserialize, Serialize};

use super::{parse_column, StoreError};
use crate::engine::spec::JobKind;
use crate::engine::{TrialEvent, TrialKind, TrialState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        )
    }
}

/// The allowed state changes of a job. `running -> queued` is a retry: the worker's lease
/// ran out (it died) or its process shut down before the job could finish.
pub fn can_transition(from: JobStatus, to: JobStatus) -> bool {
    use JobStatus::*;
    matches!(
        (from, to),
        (Queued, Running)
            | (Queued, Canceled)
            | (Running, Succeeded)
            | (Running, Failed)
            | (Running, Canceled)
            | (Running, Queued)
    )
}

pub(crate) fn check_transition(from: JobStatus, to: JobStatus) -> Result<(), StoreError> {
    if can_transition(from, to) {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "job transition {} -> {} is not allowed",
            from.as_str(),
            to.as_str()
        )))
    }
}

/// Why a job failed, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub seq: i64,
    pub id: String,
    pub kind: JobKind,
    pub name: Option<String>,
    pub spec: String,
    pub status: JobStatus,
    pub stage: Option<String>,
    pub progress_done: i64,
    pub progress_total: i64,
    pub error: Option<JobError>,
    pub result: Option<String>,
    pub attempts: i64,
    /// `name@host` of the worker that claimed the job last.
    pub worker: Option<String>,
    pub cancel_requested: bool,
    /// Times are UTC ISO 8601 with milliseconds on every backend.
    pub heartbeat_at: Option<String>,
    pub lease_until: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// A job row as both backends return it (each selects its times as ISO 8601 text).
#[derive(sqlx::FromRow)]
pub(crate) struct JobRecord {
    seq: i64,
    id: String,
    kind: String,
    name: Option<String>,
    spec: String,
    status: String,
    stage: Option<String>,
    progress_done: i64,
    progress_total: i64,
    error: Option<String>,
    result: Option<String>,
    attempts: i64,
    worker: Option<String>,
    cancel_requested: bool,
    heartbeat_at: Option<String>,
    lease_until: Option<String>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

impl TryFrom<JobRecord> for JobRow {
    type Error = StoreError;

    fn try_from(record: JobRecord) -> Result<JobRow, StoreError> {
        let status = JobStatus::parse(&record.status)
            .ok_or_else(|| StoreError::Corrupt(format!("job status {:?}", record.status)))?;
        let error = record
            .error
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("job error JSON: {e}")))
            })
            .transpose()?;
        Ok(JobRow {
            kind: parse_column("job.kind", &record.kind, JobKind::parse)?,
            seq: record.seq,
            id: record.id,
            name: record.name,
            spec: record.spec,
            status,
            stage: record.stage,
            progress_done: record.progress_done,
            progress_total: record.progress_total,
            error,
            result: record.result,
            attempts: record.attempts,
            worker: record.worker,
            cancel_requested: record.cancel_requested,
            heartbeat_at: record.heartbeat_at,
            lease_until: record.lease_until,
            created_at: record.created_at,
            started_at: record.started_at,
            finished_at: record.finished_at,
        })
    }
}

impl JobRow {
    /// The fencing token of the attempt this row is in.
    pub fn attempt(&self) -> Attempt {
        Attempt {
            job_id: self.id.clone(),
            number: self.attempts,
        }
    }
}

/// One claim of a job by a worker: writes succeed only while the job is still running this
/// attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub job_id: String,
    pub number: i64,
}

pub struct NewJob {
    pub id: String,
    pub kind: JobKind,
    pub name: Option<String>,
    /// The job's spec as JSON, stored as given: the store does not read it.
    pub spec: String,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub limit: i64,
    /// Only jobs older than this `seq` (the previous page's cursor).
    pub before: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PointRow {
    pub step: i64,
    pub lr: f64,
    pub loss: Option<f64>,
    pub smoothed: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SweepRunRow {
    /// The run's place in the sweep, from 0, in the order the engine finished them.
    pub position: i64,
    pub peak_lr: f64,
    pub seed: i64,
    /// The run's length in steps (NULL for runs stored before it was recorded).
    pub steps: Option<i64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub train_loss: Option<f64>,
    pub diverged: bool,
    /// The training loss spiked mid-run (NULL for runs stored before it was recorded).
    pub spiked: Option<bool>,
}

/// One validation point of a compare job's full run, as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RacePointRow {
    /// The point's place among the job's race points, from 0, in the order measured.
    pub position: i64,
    pub recipe: String,
    pub seed: i64,
    pub step: i64,
    /// Training seconds since the run's start.
    pub seconds: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
}

/// Where a trial is, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrialStatus {
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl TrialStatus {
    pub const ALL: [TrialStatus; 4] = [
        TrialStatus::Running,
        TrialStatus::Succeeded,
        TrialStatus::Failed,
        TrialStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TrialStatus::Running => "running",
            TrialStatus::Succeeded => "succeeded",
            TrialStatus::Failed => "failed",
            TrialStatus::Canceled => "canceled",
        }
    }

    pub fn parse(text: &str) -> Option<TrialStatus> {
        TrialStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }
}

/// A trial as the engine reported it: written as it starts, and again as it ends (the row's
/// one change). What a finished trial measured is `None` while it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialUpdate {
    pub position: i64,
    pub kind: TrialKind,
    pub lr: Option<f64>,
    pub recipe: Option<String>,
    pub seed: i64,
    pub steps: i64,
    pub status: TrialStatus,
    pub seconds: Option<f64>,
    pub steps_run: Option<i64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub diverged_at: Option<i64>,
}

impl TrialUpdate {
    pub fn from_event(event: &TrialEvent) -> TrialUpdate {
        let info = &event.info;
        let (status, seconds, outcome) = match event.state {
            TrialState::Running => (TrialStatus::Running, None, None),
            TrialState::Succeeded(outcome) => {
                (TrialStatus::Succeeded, Some(outcome.seconds), Some(outcome))
            }
            TrialState::Failed { seconds } => (TrialStatus::Failed, Some(seconds), None),
            TrialState::Canceled { seconds } => (TrialStatus::Canceled, Some(seconds), None),
        };
        TrialUpdate {
            position: event.index as i64,
            kind: info.kind,
            lr: info.lr,
            recipe: info.recipe.clone(),
            seed: info.seed as i64,
            steps: info.steps as i64,
            status,
            seconds,
            steps_run: outcome.map(|o| o.steps_run as i64),
            val_loss: outcome.and_then(|o| o.val_loss).and_then(nan_as_null),
            val_accuracy: outcome.and_then(|o| o.val_accuracy).and_then(nan_as_null),
            diverged_at: outcome.and_then(|o| o.diverged_at).map(|step| step as i64),
        }
    }
}

/// A stored trial: what it was, where it ran and how it went.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialRow {
    pub position: i64,
    /// The job's attempt that ran it.
    pub run: i64,
    pub kind: TrialKind,
    pub lr: Option<f64>,
    pub recipe: Option<String>,
    pub seed: i64,
    pub steps: i64,
    pub status: TrialStatus,
    pub worker: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub seconds: Option<f64>,
    pub steps_run: Option<i64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub diverged_at: Option<i64>,
}

/// A trial row as read, before its kind and status are checked.
#[derive(sqlx::FromRow)]
pub(crate) struct TrialRecord {
    position: i64,
    run: i64,
    kind: String,
    lr: Option<f64>,
    recipe: Option<String>,
    seed: i64,
    steps: i64,
    status: String,
    worker: Option<String>,
    started_at: String,
    finished_at: Option<String>,
    seconds: Option<f64>,
    steps_run: Option<i64>,
    val_loss: Option<f64>,
    val_accuracy: Option<f64>,
    diverged_at: Option<i64>,
}

impl TryFrom<TrialRecord> for TrialRow {
    type Error = StoreError;

    fn try_from(record: TrialRecord) -> Result<TrialRow, StoreError> {
        Ok(TrialRow {
            position: record.position,
            run: record.run,
            kind: parse_column("trial.kind", &record.kind, TrialKind::parse)?,
            lr: record.lr,
            recipe: record.recipe,
            seed: record.seed,
            steps: record.steps,
            status: parse_column("trial.status", &record.status, TrialStatus::parse)?,
            worker: record.worker,
            started_at: record.started_at,
            finished_at: record.finished_at,
            seconds: record.seconds,
            steps_run: record.steps_run,
            val_loss: record.val_loss,
            val_accuracy: record.val_accuracy,
            diverged_at: record.diverged_at,
        })
    }
}

/// What a running worker writes every few hundred milliseconds, and once more with the
/// attempt's end: each curve point and sweep run is in exactly one update, so it is written
/// once.
#[derive(Debug, Clone, Default)]
pub struct ProgressUpdate {
    pub stage: Option<String>,
    pub done: i64,
    pub total: i64,
    /// Curve points measured since the last update.
    pub points: Vec<PointRow>,
    /// Sweep runs finished since the last update.
    pub sweep_runs: Vec<SweepRunRow>,
    /// Race points measured since the last update (`compare` jobs).
    pub race_points: Vec<RacePointRow>,
    /// Trials that started or ended since the last update, in that order.
    pub trials: Vec<TrialUpdate>,
}

impl ProgressUpdate {
    /// The points, sweep runs and race points it carries.
    pub fn rows(&self) -> usize {
        self.points.len() + self.sweep_runs.len() + self.race_points.len() + self.trials.len()
    }
}

/// How an attempt ends.
#[derive(Debug, Clone)]
pub enum FinalState {
    Succeeded {
        result: String,
        /// Steps taken (progress ends at done of done).
        steps: i64,
    },
    Failed(JobError),
    Canceled,
    /// Back to the queue without counting the attempt (the process is shutting down).
    Requeue,
}

impl FinalState {
    pub fn status(&self) -> JobStatus {
        match self {
            FinalState::Succeeded { .. } => JobStatus::Succeeded,
            FinalState::Failed(_) => JobStatus::Failed,
            FinalState::Canceled => JobStatus::Canceled,
            FinalState::Requeue => JobStatus::Queued,
        }
    }
}

/// What one pass of the reaper did: jobs whose lease ran out, queued again or failed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReapOutcome {
    pub requeued: Vec<String>,
    pub failed: Vec<String>,
}

/// NaN as NULL: SQLite stores NaN as NULL, so every backend is given NULL and reads match
/// writes everywhere.
pub fn nan_as_null(value: f64) -> Option<f64> {
    (!value.is_nan()).then_some(value)
}

impl PointRow {
    pub fn new(step: usize, lr: f64, loss: f64, smoothed: f64) -> PointRow {
        PointRow {
            step: step as i64,
            lr,
            loss: nan_as_null(loss),
            smoothed: nan_as_null(smoothed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_status_changes_are_allowed() {
        use JobStatus::*;
        let allowed = [
            (Queued, Running),
            (Queued, Canceled),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Canceled),
            (Running, Queued),
        ];
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                assert_eq!(
                    can_transition(from, to),
                    allowed.contains(&(from, to)),
                    "{} -> {}",
                    from.as_str(),
                    to.as_str()
                );
            }
        }
        for finished in [Succeeded, Failed, Canceled] {
            assert!(JobStatus::ALL
                .into_iter()
                .all(|to| !can_transition(finished, to)));
        }
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(JobStatus::parse("done"), None);
    }
}
