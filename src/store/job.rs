//! A job's rows and their meaning, the same on every backend: the status and the allowed
//! changes between statuses ([`can_transition`]), the attempt that fences a worker's writes,
//! progress with its new curve points and sweep runs, and how an attempt ends. The SQL that
//! reads and writes them is in `sql.rs`.

use serde::{Deserialize, Serialize};

use super::{parse_column, StoreError};
use crate::engine::spec::JobKind;

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
}

impl ProgressUpdate {
    /// The points, sweep runs and race points it carries.
    pub fn rows(&self) -> usize {
        self.points.len() + self.sweep_runs.len() + self.race_points.len()
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
