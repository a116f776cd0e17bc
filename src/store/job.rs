//! The job table: submit, claim, progress and heartbeat, the final write, cancel, and the
//! recovery of jobs whose worker died. Every state change is a guarded
//! `UPDATE ... WHERE status = <expected>` and goes through [`can_transition`]; a worker's
//! writes are also fenced by its attempt number, so a worker presumed dead cannot write over
//! the attempt that replaced it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};

use super::{now, Store, StoreError};

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

/// The allowed state changes of a job. `running -> queued` is a retry: the worker died (stale
/// heartbeat) or the server shut down before the job could finish.
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

fn check_transition(from: JobStatus, to: JobStatus) -> Result<(), StoreError> {
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
    pub kind: String,
    pub name: Option<String>,
    pub spec: String,
    pub status: JobStatus,
    pub stage: Option<String>,
    pub progress_done: i64,
    pub progress_total: i64,
    pub error: Option<JobError>,
    pub result: Option<String>,
    pub attempts: i64,
    pub worker: Option<String>,
    pub cancel_requested: bool,
    pub heartbeat_at: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl JobRow {
    fn from_row(row: &SqliteRow) -> Result<JobRow, StoreError> {
        let status: String = row.try_get("status")?;
        let error: Option<String> = row.try_get("error")?;
        Ok(JobRow {
            seq: row.try_get("seq")?,
            id: row.try_get("id")?,
            kind: row.try_get("kind")?,
            name: row.try_get("name")?,
            spec: row.try_get("spec")?,
            status: JobStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("job status {status:?}")))?,
            stage: row.try_get("stage")?,
            progress_done: row.try_get("progress_done")?,
            progress_total: row.try_get("progress_total")?,
            error: error
                .map(|text| {
                    serde_json::from_str(&text)
                        .map_err(|e| StoreError::Corrupt(format!("job error JSON: {e}")))
                })
                .transpose()?,
            result: row.try_get("result")?,
            attempts: row.try_get("attempts")?,
            worker: row.try_get("worker")?,
            cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
            heartbeat_at: row.try_get("heartbeat_at")?,
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
        })
    }

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
    pub kind: String,
    pub name: Option<String>,
    pub spec: String,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub limit: i64,
    /// Only jobs older than this `seq` (the previous page's cursor).
    pub before: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PointRow {
    pub step: i64,
    pub lr: f64,
    pub loss: Option<f64>,
    pub smoothed: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepRunRow {
    pub peak_lr: f64,
    pub seed: i64,
    /// The run's length in steps (NULL for runs stored before it was recorded).
    pub steps: Option<i64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub train_loss: Option<f64>,
    pub diverged: bool,
}

/// What a running worker writes every few hundred milliseconds.
#[derive(Debug, Clone, Default)]
pub struct ProgressUpdate {
    pub stage: Option<String>,
    pub done: i64,
    pub total: i64,
    /// Curve points measured since the last update.
    pub points: Vec<PointRow>,
}

/// How an attempt ends.
#[derive(Clone)]
pub enum FinalState {
    Succeeded {
        result: String,
        /// Steps taken (progress ends at done of done).
        steps: i64,
        curve: Vec<PointRow>,
        sweep: Vec<SweepRunRow>,
    },
    Failed(JobError),
    Canceled,
    /// Back to the queue without counting the attempt (the server is shutting down).
    Requeue,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReapOutcome {
    pub requeued: Vec<String>,
    pub failed: Vec<String>,
}

fn not_null(value: f64) -> Option<f64> {
    // SQLite stores NaN as NULL; say so explicitly so reads match writes.
    (!value.is_nan()).then_some(value)
}

impl PointRow {
    pub fn new(step: usize, lr: f64, loss: f64, smoothed: f64) -> PointRow {
        PointRow {
            step: step as i64,
            lr,
            loss: not_null(loss),
            smoothed: not_null(smoothed),
        }
    }
}

impl SweepRunRow {
    pub fn new(run: &crate::engine::SweepRun) -> SweepRunRow {
        SweepRunRow {
            peak_lr: run.peak_lr,
            seed: run.seed as i64,
            steps: Some(run.steps as i64),
            val_loss: not_null(run.val_loss),
            val_accuracy: run.val_accuracy.and_then(not_null),
            train_loss: not_null(run.train_loss),
            diverged: run.diverged,
        }
    }
}

impl Store {
    /// Queues a job unless `max_queued` jobs are already waiting (then `None`); the count and
    /// the insert are one statement, so concurrent submits cannot overshoot the limit.
    pub async fn insert_job(
        &self,
        job: NewJob,
        max_queued: i64,
    ) -> Result<Option<JobRow>, StoreError> {
        let sql = concat!(
            "INSERT INTO job (id, kind, name, spec, status, created_at)
             SELECT ?, ?, ?, ?, 'queued', ",
            now!(),
            " WHERE (SELECT count(*) FROM job WHERE status = 'queued') < ?
             RETURNING *"
        );
        let row = sqlx::query(sql)
            .bind(&job.id)
            .bind(&job.kind)
            .bind(&job.name)
            .bind(&job.spec)
            .bind(max_queued)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(JobRow::from_row).transpose()
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM job WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(JobRow::from_row).transpose()
    }

    /// Newest first.
    pub async fn list_jobs(&self, filter: &ListFilter) -> Result<Vec<JobRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM job
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR seq < ?2)
             ORDER BY seq DESC LIMIT ?3",
        )
        .bind(filter.status.map(JobStatus::as_str))
        .bind(filter.before)
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(JobRow::from_row).collect()
    }

    pub async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows = sqlx::query("SELECT status, count(*) AS n FROM job GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut counts: Vec<(JobStatus, i64)> = JobStatus::ALL
            .into_iter()
            .map(|status| (status, 0))
            .collect();
        for row in rows {
            let status: String = row.try_get("status")?;
            let count: i64 = row.try_get("n")?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| s.as_str() == status) {
                slot.1 = count;
            }
        }
        Ok(counts)
    }

    /// Claims the oldest queued job for `worker` in one statement.
    pub async fn claim_job(&self, worker: &str) -> Result<Option<JobRow>, StoreError> {
        check_transition(JobStatus::Queued, JobStatus::Running)?;
        let sql = concat!(
            "UPDATE job SET status = 'running', attempts = attempts + 1, worker = ?,
                 started_at = ",
            now!(),
            ", heartbeat_at = ",
            now!(),
            ", finished_at = NULL, stage = NULL, progress_done = 0, progress_total = 0
             WHERE id = (SELECT id FROM job WHERE status = 'queued' ORDER BY seq LIMIT 1)
               AND status = 'queued'
             RETURNING *"
        );
        let row = sqlx::query(sql)
            .bind(worker)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(JobRow::from_row).transpose()
    }

    /// Progress, new curve points and the heartbeat in one short transaction. Returns
    /// `None` when the attempt no longer owns the job, else whether a cancel was requested.
    pub async fn record_progress(
        &self,
        attempt: &Attempt,
        update: &ProgressUpdate,
    ) -> Result<Option<bool>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let sql = concat!(
            "UPDATE job SET heartbeat_at = ",
            now!(),
            ", progress_done = ?, progress_total = ?, stage = coalesce(?, stage)
             WHERE id = ? AND status = 'running' AND attempts = ?
             RETURNING cancel_requested"
        );
        let row = sqlx::query(sql)
            .bind(update.done)
            .bind(update.total)
            .bind(&update.stage)
            .bind(&attempt.job_id)
            .bind(attempt.number)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let cancel_requested = row.try_get::<i64, _>("cancel_requested")? != 0;
        insert_points(&mut tx, attempt, &update.points).await?;
        tx.commit().await?;
        Ok(Some(cancel_requested))
    }

    /// Ends an attempt: status, result, curve and sweep runs in one transaction. Returns
    /// false (and writes nothing) when the attempt no longer owns the job.
    pub async fn finish_attempt(
        &self,
        attempt: &Attempt,
        state: FinalState,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The guarded UPDATE comes first so the transaction takes the write lock at once.
        let (to, sql) = match &state {
            FinalState::Succeeded { .. } => (
                JobStatus::Succeeded,
                concat!(
                    "UPDATE job SET status = ?, result = ?, error = NULL,
                         progress_done = ?, progress_total = ?, finished_at = ",
                    now!(),
                    " WHERE id = ? AND status = 'running' AND attempts = ?"
                ),
            ),
            FinalState::Failed(_) => (
                JobStatus::Failed,
                concat!(
                    "UPDATE job SET status = ?, error = ?, finished_at = ",
                    now!(),
                    " WHERE id = ? AND status = 'running' AND attempts = ?"
                ),
            ),
            FinalState::Canceled => (
                JobStatus::Canceled,
                concat!(
                    "UPDATE job SET status = ?, finished_at = ",
                    now!(),
                    " WHERE id = ? AND status = 'running' AND attempts = ?"
                ),
            ),
            FinalState::Requeue => (
                JobStatus::Queued,
                "UPDATE job SET status = ?, attempts = attempts - 1, worker = NULL,
                     started_at = NULL, heartbeat_at = NULL, stage = NULL,
                     progress_done = 0, progress_total = 0
                 WHERE id = ? AND status = 'running' AND attempts = ?",
            ),
        };
        check_transition(JobStatus::Running, to)?;
        let mut query = sqlx::query(sql).bind(to.as_str());
        match &state {
            FinalState::Succeeded { result, steps, .. } => {
                query = query.bind(result).bind(steps).bind(steps)
            }
            FinalState::Failed(error) => {
                let text =
                    serde_json::to_string(error).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                query = query.bind(text)
            }
            FinalState::Canceled | FinalState::Requeue => {}
        }
        let updated = query
            .bind(&attempt.job_id)
            .bind(attempt.number)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        match state {
            FinalState::Succeeded { curve, sweep, .. } => {
                // Replace whatever was streamed during the run with the engine's final curve,
                // so the stored curve is exactly one point per step.
                delete_outputs(&mut tx, &attempt.job_id).await?;
                insert_points(&mut tx, attempt, &curve).await?;
                for (position, run) in sweep.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO sweep_run (job_id, run, position, peak_lr, seed, steps,
                             val_loss, val_accuracy, train_loss, diverged)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&attempt.job_id)
                    .bind(attempt.number)
                    .bind(position as i64)
                    .bind(run.peak_lr)
                    .bind(run.seed)
                    .bind(run.steps)
                    .bind(run.val_loss)
                    .bind(run.val_accuracy)
                    .bind(run.train_loss)
                    .bind(run.diverged)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            FinalState::Requeue => delete_outputs(&mut tx, &attempt.job_id).await?,
            FinalState::Failed(_) | FinalState::Canceled => {}
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Cancels a job that has not started. True when it was queued.
    pub async fn cancel_queued(&self, id: &str) -> Result<bool, StoreError> {
        check_transition(JobStatus::Queued, JobStatus::Canceled)?;
        let sql = concat!(
            "UPDATE job SET status = 'canceled', cancel_requested = 1, finished_at = ",
            now!(),
            " WHERE id = ? AND status = 'queued'"
        );
        let done = sqlx::query(sql).bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Flags a running job for cancelation; its worker sees the flag at its next heartbeat
    /// (any process), or at once through the in-process flag. True when it was running.
    pub async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE job SET cancel_requested = 1 WHERE id = ? AND status = 'running'")
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Finds running jobs whose heartbeat is older than `stale_after`: queued again (their
    /// partial curve deleted in the same transaction) or, after `max_attempts` claims,
    /// failed with the reason.
    pub async fn reap_stale(
        &self,
        stale_after: Duration,
        max_attempts: i64,
    ) -> Result<ReapOutcome, StoreError> {
        check_transition(JobStatus::Running, JobStatus::Failed)?;
        check_transition(JobStatus::Running, JobStatus::Queued)?;
        // A SQLite date modifier, bound as a parameter.
        let age = format!("-{:.3} seconds", stale_after.as_secs_f64());
        let mut tx = self.pool.begin().await?;
        // The message is built per job from its last heartbeat, so it says where the worker
        // was when it died (a process killed for memory leaves no other trace).
        let failed_sql = concat!(
            "UPDATE job SET status = 'failed', finished_at = ",
            now!(),
            ", error = json_object('code', 'worker_lost', 'message', printf(
                 'the worker died while running this job (attempts: %d; last seen %s; no heartbeat for %s s); it may have been killed for running out of memory: giving up',
                 attempts,
                 CASE WHEN stage IS NULL THEN 'loading the data'
                      ELSE printf('in stage %s at step %d of %d', stage, progress_done, progress_total) END,
                 ?))
             WHERE status = 'running' AND attempts >= ?
               AND heartbeat_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)
             RETURNING id"
        );
        let failed: Vec<String> = sqlx::query_scalar(failed_sql)
            .bind(format!("{:.1}", stale_after.as_secs_f64()))
            .bind(max_attempts)
            .bind(&age)
            .fetch_all(&mut *tx)
            .await?;
        let requeue_sql = "UPDATE job SET status = 'queued', worker = NULL, started_at = NULL,
                 heartbeat_at = NULL, stage = NULL, progress_done = 0, progress_total = 0
             WHERE status = 'running' AND attempts < ?
               AND heartbeat_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)
             RETURNING id";
        let requeued: Vec<String> = sqlx::query_scalar(requeue_sql)
            .bind(max_attempts)
            .bind(&age)
            .fetch_all(&mut *tx)
            .await?;
        for id in &requeued {
            delete_outputs(&mut tx, id).await?;
        }
        tx.commit().await?;
        Ok(ReapOutcome { requeued, failed })
    }

    pub async fn curve(&self, job_id: &str) -> Result<Vec<PointRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT step, lr, loss, smoothed FROM curve_point WHERE job_id = ? ORDER BY step",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(PointRow {
                    step: row.try_get("step")?,
                    lr: row.try_get("lr")?,
                    loss: row.try_get("loss")?,
                    smoothed: row.try_get("smoothed")?,
                })
            })
            .collect()
    }

    pub async fn sweep_runs(&self, job_id: &str) -> Result<Vec<SweepRunRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT peak_lr, seed, steps, val_loss, val_accuracy, train_loss, diverged
             FROM sweep_run WHERE job_id = ? ORDER BY position",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SweepRunRow {
                    peak_lr: row.try_get("peak_lr")?,
                    seed: row.try_get("seed")?,
                    steps: row.try_get("steps")?,
                    val_loss: row.try_get("val_loss")?,
                    val_accuracy: row.try_get("val_accuracy")?,
                    train_loss: row.try_get("train_loss")?,
                    diverged: row.try_get("diverged")?,
                })
            })
            .collect()
    }
}

async fn insert_points(
    tx: &mut Transaction<'_, Sqlite>,
    attempt: &Attempt,
    points: &[PointRow],
) -> Result<(), StoreError> {
    for point in points {
        sqlx::query(
            "INSERT OR REPLACE INTO curve_point (job_id, run, step, lr, loss, smoothed)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .bind(point.step)
        .bind(point.lr)
        .bind(point.loss)
        .bind(point.smoothed)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn delete_outputs(tx: &mut Transaction<'_, Sqlite>, job_id: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM curve_point WHERE job_id = ?")
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM sweep_run WHERE job_id = ?")
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
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
