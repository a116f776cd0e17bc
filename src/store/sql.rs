//! The SQL both backends run, written once. Each statement is a template whose few dialect
//! pieces are tokens that the backend fills in ([`Backend`]): `{{now}}`, `{{lease_end $N}}`
//! (now plus `$N` seconds), `{{time COLUMN}}` (a timestamp read as UTC ISO 8601 text),
//! `{{spec PATH}}` (a field of a job's JSON spec) and `{{skip_locked}}`. One generic
//! [`SqlStore`] runs them on either sqlx database, every write in one [`WriteTx`]. What
//! really differs stays in `sqlite.rs` and `postgres.rs`: opening, the health check, change
//! notification, how a batch of outputs is inserted, how writers take turns, and the
//! reaper's message.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool,
    Type,
};

use super::dataset::{shape_json, DatasetRecord, StoredRecord};
use super::job::{JobRecord, TrialRecord};
use super::parts;
use super::weights::{shapes_json, StoredWeightsRecord, WeightsRecord};
use super::{
    Attempt, DatasetRow, Deletion, FinalState, JobRow, ListFilter, Listed, NewDataset, NewJob,
    NewWeights, PointRow, ProgressUpdate, RacePointRow, ReapOutcome, StoreError, StoredDataset,
    StoredWeights, SweepRunRow, TrialRow, TrialStatus, TrialUpdate, WeightsRow,
};

/// What one database needs beyond the shared statements.
pub(super) trait Backend: Database {
    /// The current time, as the tables store it.
    const NOW: &'static str;
    /// Starts a write transaction (SQLite: with the write lock at once).
    const BEGIN: &'static str;
    /// Empty, or PostgreSQL's `FOR UPDATE SKIP LOCKED`: concurrent claims skip a row another
    /// transaction holds instead of waiting for it.
    const SKIP_LOCKED: &'static str;
    /// Fails the running jobs whose lease ran out on their last attempt (`attempts >= $1`),
    /// with a `worker_lost` error saying where the worker was last seen; returns their ids.
    const FAIL_EXPIRED: &'static str;

    /// The time `$N` (`param`) seconds from now.
    fn lease_end(param: &str) -> String;
    /// A timestamp column read as UTC ISO 8601 text with milliseconds, under its own name.
    fn time_column(column: &str) -> String;
    /// The text at `path` (`data.dataset_id`) of the job's JSON spec.
    fn spec_field(path: &str) -> String;

    /// Makes the writers of `lock` take turns within their transactions, so that a read and
    /// the write it decides (count the queued jobs, sum the stored bytes) are one step.
    /// SQLite: nothing, a write transaction already holds the database's one write lock.
    fn take_turns(
        connection: &mut Self::Connection,
        lock: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes the update's points, sweep runs and race points, each once: a retried write
    /// (its first try committed, but the answer was lost) finds them there and leaves them.
    fn insert_outputs(
        connection: &mut Self::Connection,
        attempt: &Attempt,
        update: &ProgressUpdate,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What makes submits take turns (PostgreSQL: an advisory lock; "lrtune" in ASCII).
pub(super) const SUBMIT_LOCK: i64 = 0x6c72_7475_6e65;
/// What makes uploads take turns ("upload" in ASCII).
pub(super) const UPLOAD_LOCK: i64 = 0x7570_6c6f_6164;

/// A check a commit must pass (SQLite: the database file is still the one opened).
pub(super) type CommitCheck = Arc<dyn Fn() -> Result<(), StoreError> + Send + Sync>;

/// The pool and the statements rendered for its backend.
pub(super) struct SqlStore<DB: Database> {
    pub(super) pool: Pool<DB>,
    commit_check: Option<CommitCheck>,
    rendered: Arc<RwLock<HashMap<&'static str, Arc<str>>>>,
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            commit_check: self.commit_check.clone(),
            rendered: self.rendered.clone(),
        }
    }
}

/// A write transaction on a pooled connection, begun with [`Backend::BEGIN`] and ended by an
/// explicit `COMMIT` whose error is the caller's.
///
/// It does not use sqlx's `Transaction`, whose bookkeeping is a depth counter that SQLite's
/// own state can leave behind: after `SQLITE_FULL` or an I/O error SQLite may roll the whole
/// transaction back by itself, the driver's `ROLLBACK` then fails, the counter stays at 1, and
/// the next `begin()` on that pooled connection issues a `SAVEPOINT` (opening a real
/// transaction) whose `ROLLBACK TO` leaves it open. Every later statement on that connection,
/// a submit's `INSERT` among them, then ran inside a transaction that was never committed,
/// holding the write lock against everyone else. Here a transaction that did not end with a
/// `COMMIT` or `ROLLBACK` the database accepted (an error, a dropped future) takes its
/// connection with it: the connection is closed, which rolls back whatever is open, and the
/// pool opens a fresh one. So no pooled connection is ever left inside a transaction.
///
/// Single-statement writes go through it too: outside a transaction, SQLite commits an
/// `INSERT ... RETURNING` when the statement is reset, after the row was already handed out,
/// and the driver ignores an error at that reset (a full disk), so a submit could answer 202
/// for a row that was never committed.
pub(super) struct WriteTx<DB: Database> {
    connection: Option<PoolConnection<DB>>,
    commit_check: Option<CommitCheck>,
}

impl<DB: Backend> WriteTx<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
{
    pub(super) fn conn(&mut self) -> &mut DB::Connection {
        self.connection
            .as_mut()
            .expect("a transaction's connection is only taken when it ends")
    }

    /// Commits after the store's check (see [`CommitCheck`]); else rolls back and says why.
    pub(super) async fn commit(self) -> Result<(), StoreError> {
        if let Some(check) = &self.commit_check {
            check()?;
        }
        self.end("COMMIT").await
    }

    pub(super) async fn rollback(self) -> Result<(), StoreError> {
        self.end("ROLLBACK").await
    }

    /// Only when the database accepted the statement does the connection go back to the
    /// pool; on an error, `drop` closes it.
    async fn end(mut self, statement: &'static str) -> Result<(), StoreError> {
        sqlx::query(statement).execute(self.conn()).await?;
        self.connection.take();
        Ok(())
    }
}

impl<DB: Database> Drop for WriteTx<DB> {
    fn drop(&mut self) {
        if let Some(mut connection) = self.connection.take() {
            connection.close_on_drop();
        }
    }
}

/// A job's columns, its times as ISO text.
const JOB_COLUMNS: &str = "seq, id, kind, name, spec, status, stage, progress_done, \
     progress_total, error, result, attempts, worker, cancel_requested, {{time heartbeat_at}}, \
     {{time lease_until}}, {{time created_at}}, {{time started_at}}, {{time finished_at}}";

/// A dataset's description (not its bytes).
const DATASET_COLUMNS: &str = "id, name, format, target, rows, features, sample_shape, \
     classes, vocabulary, task, sha256, bytes, {{time created_at}}";

/// Weights' description (not their bytes).
const WEIGHTS_COLUMNS: &str = "id, name, bytes, sha256, tensors, shapes, {{time created_at}}";

/// The bytes of every stored dataset and weights file, the sum the quota bounds.
const STORED_BYTES: &str = "CAST((SELECT coalesce(sum(bytes), 0) FROM dataset)
     + (SELECT coalesce(sum(bytes), 0) FROM weights) AS BIGINT)";

/// The ids of the queued and running jobs whose spec names the dataset `$1` (as training or
/// validation data).
const JOBS_USING_DATASET: &str = "SELECT id FROM job WHERE status IN ('queued', 'running')
     AND ({{spec data.dataset_id}} = $1 OR {{spec data.validation_dataset_id}} = $1)";

/// The ids of the queued and running jobs whose spec starts from the weights `$1`.
const JOBS_USING_WEIGHTS: &str = "SELECT id FROM job WHERE status IN ('queued', 'running')
     AND {{spec init.weights.id}} = $1";

/// Fills in a template's tokens for `DB`.
fn render<DB: Backend>(template: &str) -> String {
    let mut sql = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        sql.push_str(&rest[..start]);
        let end = start
            + rest[start..]
                .find("}}")
                .unwrap_or_else(|| panic!("an unclosed token in {template:?}"));
        let token = &rest[start + 2..end];
        let (name, argument) = token.split_once(' ').unwrap_or((token, ""));
        match name {
            "now" => sql.push_str(DB::NOW),
            "lease_end" => sql.push_str(&DB::lease_end(argument)),
            "time" => sql.push_str(&DB::time_column(argument)),
            "spec" => sql.push_str(&DB::spec_field(argument)),
            "skip_locked" => sql.push_str(DB::SKIP_LOCKED),
            "job_columns" => sql.push_str(&render::<DB>(JOB_COLUMNS)),
            "dataset_columns" => sql.push_str(&render::<DB>(DATASET_COLUMNS)),
            "weights_columns" => sql.push_str(&render::<DB>(WEIGHTS_COLUMNS)),
            "stored_bytes" => sql.push_str(STORED_BYTES),
            "jobs_using_dataset" => sql.push_str(&render::<DB>(JOBS_USING_DATASET)),
            "jobs_using_weights" => sql.push_str(&render::<DB>(JOBS_USING_WEIGHTS)),
            other => panic!("unknown token {other:?} in {template:?}"),
        }
        rest = &rest[end + 2..];
    }
    sql.push_str(rest);
    sql
}

impl<DB: Backend> SqlStore<DB> {
    pub(super) fn new(pool: Pool<DB>, commit_check: Option<CommitCheck>) -> SqlStore<DB> {
        SqlStore {
            pool,
            commit_check,
            rendered: Arc::default(),
        }
    }

    /// The template rendered for this backend (once per process and statement).
    fn sql(&self, template: &'static str) -> AssertSqlSafe<Arc<str>> {
        let cached = self
            .rendered
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(template)
            .cloned();
        let sql = cached.unwrap_or_else(|| {
            let sql: Arc<str> = render::<DB>(template).into();
            self.rendered
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(template, sql.clone());
            sql
        });
        AssertSqlSafe(sql)
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

/// The shared statements. The bounds say, once for all of them, what they need of a
/// database's types: both sqlx databases have every one.
impl<DB> SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> f64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<f64>: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<Vec<u8>>: Encode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
    for<'r> String: Decode<'r, DB>,
    for<'r> i64: Decode<'r, DB>,
    for<'r> bool: Decode<'r, DB> + Type<DB>,
    for<'r> Vec<u8>: Decode<'r, DB>,
    for<'r> (String, i64): FromRow<'r, DB::Row>,
    for<'r> JobRecord: FromRow<'r, DB::Row>,
    for<'r> DatasetRecord: FromRow<'r, DB::Row>,
    for<'r> StoredRecord: FromRow<'r, DB::Row>,
    for<'r> WeightsRecord: FromRow<'r, DB::Row>,
    for<'r> StoredWeightsRecord: FromRow<'r, DB::Row>,
    for<'r> Listed<DatasetRecord>: FromRow<'r, DB::Row>,
    for<'r> Listed<WeightsRecord>: FromRow<'r, DB::Row>,
    for<'r> PointRow: FromRow<'r, DB::Row>,
    for<'r> SweepRunRow: FromRow<'r, DB::Row>,
    for<'r> RacePointRow: FromRow<'r, DB::Row>,
    for<'r> TrialRecord: FromRow<'r, DB::Row>,
{
    /// Begins a write transaction, after the store's check.
    pub(super) async fn begin_write(&self) -> Result<WriteTx<DB>, StoreError> {
        if let Some(check) = &self.commit_check {
            check()?;
        }
        let mut tx = WriteTx {
            connection: Some(self.pool.acquire().await?),
            commit_check: self.commit_check.clone(),
        };
        sqlx::query(DB::BEGIN).execute(tx.conn()).await?;
        Ok(tx)
    }

    /// Queues a job unless `max_queued` are waiting: submits take turns, so that each count
    /// sees the others' inserts.
    pub(super) async fn insert_job(
        &self,
        job: NewJob,
        max_queued: i64,
    ) -> Result<Option<JobRow>, StoreError> {
        let mut tx = self.begin_write().await?;
        DB::take_turns(tx.conn(), SUBMIT_LOCK).await?;
        let record: Option<JobRecord> = sqlx::query_as(self.sql(
            "INSERT INTO job (id, kind, name, spec, status, created_at)
             SELECT $1, $2, $3, $4, 'queued', {{now}}
             WHERE (SELECT count(*) FROM job WHERE status = 'queued') < $5
             RETURNING {{job_columns}}",
        ))
        .bind(&job.id)
        .bind(job.kind.as_str())
        .bind(&job.name)
        .bind(&job.spec)
        .bind(max_queued)
        .fetch_optional(tx.conn())
        .await?;
        tx.commit().await?;
        record.map(JobRow::try_from).transpose()
    }

    pub(super) async fn get_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        self.find::<JobRecord, _>("SELECT {{job_columns}} FROM job WHERE id = $1", id)
            .await
    }

    pub(super) async fn list_jobs(&self, filter: &ListFilter) -> Result<Vec<JobRow>, StoreError> {
        let records: Vec<JobRecord> = sqlx::query_as(self.sql(
            "SELECT {{job_columns}} FROM job
             WHERE (CAST($1 AS TEXT) IS NULL OR status = $1)
               AND (CAST($2 AS BIGINT) IS NULL OR seq < $2)
             ORDER BY seq DESC LIMIT $3",
        ))
        .bind(filter.status.map(|status| status.as_str()))
        .bind(filter.before)
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        records.into_iter().map(JobRow::try_from).collect()
    }

    pub(super) async fn count_jobs_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT status, count(*) FROM job GROUP BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The oldest queued job, claimed in one statement.
    pub(super) async fn claim_job(
        &self,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<JobRow>, StoreError> {
        let mut tx = self.begin_write().await?;
        let record: Option<JobRecord> = sqlx::query_as(self.sql(
            "UPDATE job SET status = 'running', attempts = attempts + 1, worker = $1,
                 started_at = {{now}}, heartbeat_at = {{now}}, lease_until = {{lease_end $2}},
                 finished_at = NULL, stage = NULL, progress_done = 0, progress_total = 0
             WHERE id = (SELECT id FROM job WHERE status = 'queued' ORDER BY seq LIMIT 1
                         {{skip_locked}})
               AND status = 'queued'
             RETURNING {{job_columns}}",
        ))
        .bind(worker)
        .bind(lease.as_secs_f64())
        .fetch_optional(tx.conn())
        .await?;
        tx.commit().await?;
        record.map(JobRow::try_from).transpose()
    }

    pub(super) async fn record_progress(
        &self,
        attempt: &Attempt,
        update: &ProgressUpdate,
        lease: Duration,
    ) -> Result<Option<bool>, StoreError> {
        let mut tx = self.begin_write().await?;
        let cancel_requested: Option<bool> = sqlx::query_scalar(self.sql(
            "UPDATE job SET heartbeat_at = {{now}}, lease_until = {{lease_end $1}},
                 progress_done = $2, progress_total = $3, stage = coalesce($4, stage)
             WHERE id = $5 AND status = 'running' AND attempts = $6
             RETURNING cancel_requested",
        ))
        .bind(lease.as_secs_f64())
        .bind(update.done)
        .bind(update.total)
        .bind(&update.stage)
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .fetch_optional(tx.conn())
        .await?;
        let Some(cancel_requested) = cancel_requested else {
            tx.rollback().await?;
            return Ok(None);
        };
        DB::insert_outputs(tx.conn(), attempt, update).await?;
        self.write_trials(tx.conn(), attempt, &update.trials)
            .await?;
        tx.commit().await?;
        Ok(Some(cancel_requested))
    }

    pub(super) async fn finish_attempt(
        &self,
        attempt: &Attempt,
        state: &FinalState,
        last: &ProgressUpdate,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        // The guarded update comes first, and returns the job's id when it still belonged
        // to this attempt.
        let updated: Option<String> = match state {
            FinalState::Succeeded { result, steps } => sqlx::query_scalar(self.sql(
                "UPDATE job SET status = 'succeeded', result = $1, error = NULL,
                     progress_done = $2, progress_total = $2, lease_until = NULL,
                     finished_at = {{now}}
                 WHERE id = $3 AND status = 'running' AND attempts = $4
                 RETURNING id",
            ))
            .bind(result)
            .bind(steps),
            FinalState::Failed(error) => {
                let text =
                    serde_json::to_string(error).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                sqlx::query_scalar(self.sql(
                    "UPDATE job SET status = 'failed', error = $1, stage = coalesce($2, stage),
                         progress_done = $3, progress_total = $4, lease_until = NULL,
                         finished_at = {{now}}
                     WHERE id = $5 AND status = 'running' AND attempts = $6
                     RETURNING id",
                ))
                .bind(text)
                .bind(&last.stage)
                .bind(last.done)
                .bind(last.total)
            }
            FinalState::Canceled => sqlx::query_scalar(self.sql(
                "UPDATE job SET status = 'canceled', stage = coalesce($1, stage),
                     progress_done = $2, progress_total = $3, lease_until = NULL,
                     finished_at = {{now}}
                 WHERE id = $4 AND status = 'running' AND attempts = $5
                 RETURNING id",
            ))
            .bind(&last.stage)
            .bind(last.done)
            .bind(last.total),
            FinalState::Requeue => sqlx::query_scalar(
                "UPDATE job SET status = 'queued', attempts = attempts - 1, worker = NULL,
                     started_at = NULL, heartbeat_at = NULL, lease_until = NULL, stage = NULL,
                     progress_done = 0, progress_total = 0
                 WHERE id = $1 AND status = 'running' AND attempts = $2
                 RETURNING id",
            ),
        }
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .fetch_optional(tx.conn())
        .await?;
        if updated.is_none() {
            tx.rollback().await?;
            return Ok(false);
        }
        match state {
            FinalState::Requeue => delete_outputs(tx.conn(), &attempt.job_id).await?,
            _ => {
                DB::insert_outputs(tx.conn(), attempt, last).await?;
                self.write_trials(tx.conn(), attempt, &last.trials).await?;
                // A trial the engine was stopped in without reporting its end (a panic, a
                // computation abandoned) ends with its job.
                let ended = match state {
                    FinalState::Canceled => TrialStatus::Canceled,
                    _ => TrialStatus::Failed,
                };
                self.end_running_trials(tx.conn(), &attempt.job_id, ended)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn cancel_queued(&self, id: &str) -> Result<bool, StoreError> {
        self.update_one(
            "UPDATE job SET status = 'canceled', cancel_requested = true, finished_at = {{now}}
             WHERE id = $1 AND status = 'queued' RETURNING id",
            id,
        )
        .await
    }

    pub(super) async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        self.update_one(
            "UPDATE job SET cancel_requested = true WHERE id = $1 AND status = 'running'
             RETURNING id",
            id,
        )
        .await
    }

    /// Runs an `UPDATE` of the job `$1` that returns its id: true when it changed it.
    async fn update_one(&self, template: &'static str, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let updated: Option<String> = sqlx::query_scalar(self.sql(template))
            .bind(id)
            .fetch_optional(tx.conn())
            .await?;
        tx.commit().await?;
        Ok(updated.is_some())
    }

    /// Running jobs whose lease ran out: failed on their last attempt, queued again (their
    /// outputs deleted) before it.
    pub(super) async fn reap_expired(&self, max_attempts: i64) -> Result<ReapOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let failed: Vec<String> = sqlx::query_scalar(self.sql(DB::FAIL_EXPIRED))
            .bind(max_attempts)
            .fetch_all(tx.conn())
            .await?;
        let requeued: Vec<String> = sqlx::query_scalar(self.sql(
            "UPDATE job SET status = 'queued', worker = NULL, started_at = NULL,
                 heartbeat_at = NULL, lease_until = NULL, stage = NULL, progress_done = 0,
                 progress_total = 0
             WHERE status = 'running' AND attempts < $1 AND lease_until < {{now}}
             RETURNING id",
        ))
        .bind(max_attempts)
        .fetch_all(tx.conn())
        .await?;
        for id in &requeued {
            delete_outputs(tx.conn(), id).await?;
        }
        for id in &failed {
            self.end_running_trials(tx.conn(), id, TrialStatus::Failed)
                .await?;
        }
        tx.commit().await?;
        Ok(ReapOutcome { requeued, failed })
    }

    pub(super) async fn curve(
        &self,
        job_id: &str,
        after_step: i64,
    ) -> Result<Vec<PointRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT step, lr, loss, smoothed FROM curve_point
             WHERE job_id = $1 AND step > $2 ORDER BY step",
        )
        .bind(job_id)
        .bind(after_step)
        .fetch_all(&self.pool)
        .await?)
    }

    pub(super) async fn sweep_runs(
        &self,
        job_id: &str,
        from_position: i64,
    ) -> Result<Vec<SweepRunRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT position, peak_lr, seed, steps, val_loss, val_accuracy, train_loss, diverged,
                 spiked
             FROM sweep_run WHERE job_id = $1 AND position >= $2 ORDER BY position",
        )
        .bind(job_id)
        .bind(from_position)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Writes each trial as it started or ended. A trial's row is inserted as it starts and
    /// changed once, as it ends; a retried write (its first try committed) changes nothing,
    /// since an ended trial is not written over.
    async fn write_trials(
        &self,
        connection: &mut DB::Connection,
        attempt: &Attempt,
        trials: &[TrialUpdate],
    ) -> Result<(), StoreError> {
        for trial in trials {
            sqlx::query(self.sql(
                "INSERT INTO trial (job_id, run, position, kind, lr, recipe, seed, steps,
                     status, worker, started_at, finished_at, seconds, steps_run, val_loss,
                     val_accuracy, diverged_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                     (SELECT worker FROM job WHERE id = $1), {{now}},
                     CASE WHEN $10 THEN {{now}} END, $11, $12, $13, $14, $15)
                 ON CONFLICT (job_id, position) DO UPDATE SET status = excluded.status,
                     finished_at = excluded.finished_at, seconds = excluded.seconds,
                     steps_run = excluded.steps_run, val_loss = excluded.val_loss,
                     val_accuracy = excluded.val_accuracy, diverged_at = excluded.diverged_at
                 WHERE trial.status = 'running'",
            ))
            .bind(&attempt.job_id)
            .bind(attempt.number)
            .bind(trial.position)
            .bind(trial.kind.as_str())
            .bind(trial.lr)
            .bind(trial.recipe.as_deref())
            .bind(trial.seed)
            .bind(trial.steps)
            .bind(trial.status.as_str())
            .bind(trial.status != TrialStatus::Running)
            .bind(trial.seconds)
            .bind(trial.steps_run)
            .bind(trial.val_loss)
            .bind(trial.val_accuracy)
            .bind(trial.diverged_at)
            .execute(&mut *connection)
            .await?;
        }
        Ok(())
    }

    /// Ends the job's trials still marked running, as `status`.
    async fn end_running_trials(
        &self,
        connection: &mut DB::Connection,
        job_id: &str,
        status: TrialStatus,
    ) -> Result<(), StoreError> {
        sqlx::query(self.sql(
            "UPDATE trial SET status = $1, finished_at = {{now}}
             WHERE job_id = $2 AND status = 'running'",
        ))
        .bind(status.as_str())
        .bind(job_id)
        .execute(&mut *connection)
        .await?;
        Ok(())
    }

    pub(super) async fn trials(&self, job_id: &str) -> Result<Vec<TrialRow>, StoreError> {
        let records: Vec<TrialRecord> = sqlx::query_as(self.sql(
            "SELECT position, run, kind, lr, recipe, seed, steps, status, worker,
                 {{time started_at}}, {{time finished_at}}, seconds, steps_run, val_loss,
                 val_accuracy, diverged_at
             FROM trial WHERE job_id = $1 ORDER BY position",
        ))
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        records.into_iter().map(TrialRow::try_from).collect()
    }

    pub(super) async fn count_trials_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT status, count(*) FROM trial GROUP BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub(super) async fn race_points(
        &self,
        job_id: &str,
        from_position: i64,
    ) -> Result<Vec<RacePointRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT position, recipe, seed, step, seconds, val_loss, val_accuracy
             FROM race_point WHERE job_id = $1 AND position >= $2 ORDER BY position",
        )
        .bind(job_id)
        .bind(from_position)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Stores a dataset unless it would pass the quota: uploads take turns, so that each
    /// one's sum sees the others' inserts. The bytes go in parts (see `parts`); only the
    /// description comes back.
    pub(super) async fn insert_dataset(
        &self,
        dataset: NewDataset,
        max_stored_bytes: i64,
    ) -> Result<Option<DatasetRow>, StoreError> {
        let row = dataset.row;
        let mut tx = self.begin_write().await?;
        if !self
            .within_quota(&mut tx, row.bytes, max_stored_bytes)
            .await?
        {
            tx.rollback().await?;
            return Ok(None);
        }
        let record: DatasetRecord = sqlx::query_as(self.sql(
            "INSERT INTO dataset (id, name, format, target, rows, features, sample_shape,
                 classes, vocabulary, task, sha256, bytes, x, y, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, {{now}})
             RETURNING {{dataset_columns}}",
        ))
        .bind(&row.id)
        .bind(&row.name)
        .bind(row.format.as_str())
        .bind(&row.target)
        .bind(row.rows)
        .bind(row.features)
        .bind(shape_json(&row.sample_shape)?)
        .bind(row.classes)
        .bind(row.vocabulary)
        .bind(row.task.as_str())
        .bind(&row.sha256)
        .bind(row.bytes)
        .bind(Vec::<u8>::new())
        .bind(parts::inline_placeholder(dataset.y.as_ref()))
        .fetch_one(tx.conn())
        .await?;
        let named_parts = [("x", Some(&dataset.x)), ("y", dataset.y.as_ref())];
        for (name, bytes) in named_parts {
            for (position, part) in parts::split(bytes.map_or(&[][..], Vec::as_slice)) {
                sqlx::query(
                    "INSERT INTO dataset_part (dataset_id, part, position, bytes)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&row.id)
                .bind(name)
                .bind(position)
                .bind(part)
                .execute(tx.conn())
                .await?;
            }
        }
        tx.commit().await?;
        record.try_into().map(Some)
    }

    pub(super) async fn get_dataset(&self, id: &str) -> Result<Option<DatasetRow>, StoreError> {
        self.find::<DatasetRecord, _>("SELECT {{dataset_columns}} FROM dataset WHERE id = $1", id)
            .await
    }

    pub(super) async fn load_dataset(&self, id: &str) -> Result<Option<StoredDataset>, StoreError> {
        let found: Option<StoredDataset> = self
            .find::<StoredRecord, _>(
                "SELECT {{dataset_columns}}, x, y FROM dataset WHERE id = $1",
                id,
            )
            .await?;
        let Some(mut dataset) = found else {
            return Ok(None);
        };
        let capacity = usize::try_from(dataset.row.bytes).unwrap_or(0);
        let part_sql = "SELECT bytes FROM dataset_part
                        WHERE dataset_id = $1 AND part = $2 ORDER BY position";
        let x = std::mem::take(&mut dataset.x);
        let x_parts = sqlx::query_scalar(part_sql)
            .bind(id)
            .bind("x")
            .fetch(&self.pool);
        dataset.x = parts::gather(x, x_parts, capacity).await?;
        if let Some(y) = dataset.y.take() {
            let y_parts = sqlx::query_scalar(part_sql)
                .bind(id)
                .bind("y")
                .fetch(&self.pool);
            let left = capacity.saturating_sub(dataset.x.len());
            dataset.y = Some(parts::gather(y, y_parts, left).await?);
        }
        Ok(Some(dataset))
    }

    pub(super) async fn list_datasets(
        &self,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<(i64, DatasetRow)>, StoreError> {
        self.page::<DatasetRecord, _>(
            "SELECT seq, {{dataset_columns}} FROM dataset
             WHERE (CAST($1 AS BIGINT) IS NULL OR seq < $1) ORDER BY seq DESC LIMIT $2",
            limit,
            before,
        )
        .await
    }

    /// Stores weights within the quota, as `insert_dataset` does.
    pub(super) async fn insert_weights(
        &self,
        weights: NewWeights,
        max_stored_bytes: i64,
    ) -> Result<Option<WeightsRow>, StoreError> {
        let row = weights.row;
        let mut tx = self.begin_write().await?;
        if !self
            .within_quota(&mut tx, row.bytes, max_stored_bytes)
            .await?
        {
            tx.rollback().await?;
            return Ok(None);
        }
        let record: WeightsRecord = sqlx::query_as(self.sql(
            "INSERT INTO weights (id, name, bytes, sha256, tensors, shapes, data, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, {{now}})
             RETURNING {{weights_columns}}",
        ))
        .bind(&row.id)
        .bind(&row.name)
        .bind(row.bytes)
        .bind(&row.sha256)
        .bind(row.tensors)
        .bind(shapes_json(&row.shapes)?)
        .bind(Vec::<u8>::new())
        .fetch_one(tx.conn())
        .await?;
        for (position, part) in parts::split(&weights.data) {
            sqlx::query(
                "INSERT INTO weights_part (weights_id, position, bytes) VALUES ($1, $2, $3)",
            )
            .bind(&row.id)
            .bind(position)
            .bind(part)
            .execute(tx.conn())
            .await?;
        }
        tx.commit().await?;
        record.try_into().map(Some)
    }

    pub(super) async fn get_weights(&self, id: &str) -> Result<Option<WeightsRow>, StoreError> {
        self.find::<WeightsRecord, _>("SELECT {{weights_columns}} FROM weights WHERE id = $1", id)
            .await
    }

    pub(super) async fn load_weights(&self, id: &str) -> Result<Option<StoredWeights>, StoreError> {
        let found: Option<StoredWeights> = self
            .find::<StoredWeightsRecord, _>(
                "SELECT {{weights_columns}}, data FROM weights WHERE id = $1",
                id,
            )
            .await?;
        let Some(mut weights) = found else {
            return Ok(None);
        };
        let data = std::mem::take(&mut weights.data);
        let data_parts = sqlx::query_scalar(
            "SELECT bytes FROM weights_part WHERE weights_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch(&self.pool);
        let capacity = usize::try_from(weights.row.bytes).unwrap_or(0);
        weights.data = parts::gather(data, data_parts, capacity).await?;
        Ok(Some(weights))
    }

    pub(super) async fn list_weights(
        &self,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<(i64, WeightsRow)>, StoreError> {
        self.page::<WeightsRecord, _>(
            "SELECT seq, {{weights_columns}} FROM weights
             WHERE (CAST($1 AS BIGINT) IS NULL OR seq < $1) ORDER BY seq DESC LIMIT $2",
            limit,
            before,
        )
        .await
    }

    pub(super) async fn stored_bytes(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(self.sql("SELECT {{stored_bytes}}"))
            .fetch_one(&self.pool)
            .await?)
    }

    /// Whether `adding` bytes more fit under the quota, read in the transaction that will
    /// add them, after taking turns with the other uploads.
    async fn within_quota(
        &self,
        tx: &mut WriteTx<DB>,
        adding: i64,
        max_stored_bytes: i64,
    ) -> Result<bool, StoreError> {
        DB::take_turns(tx.conn(), UPLOAD_LOCK).await?;
        let stored: i64 = sqlx::query_scalar(self.sql("SELECT {{stored_bytes}}"))
            .fetch_one(tx.conn())
            .await?;
        Ok(stored.saturating_add(adding) <= max_stored_bytes)
    }

    /// Deletes the dataset unless a queued or running job names it, in one statement.
    pub(super) async fn delete_dataset(&self, id: &str) -> Result<Deletion, StoreError> {
        self.delete_unused(
            "DELETE FROM dataset WHERE id = $1 AND NOT EXISTS ({{jobs_using_dataset}})
             RETURNING id",
            "SELECT seq FROM dataset WHERE id = $1",
            "{{jobs_using_dataset}} ORDER BY seq LIMIT 10",
            id,
        )
        .await
    }

    /// Deletes the weights unless a queued or running job names them, in one statement.
    pub(super) async fn delete_weights(&self, id: &str) -> Result<Deletion, StoreError> {
        self.delete_unused(
            "DELETE FROM weights WHERE id = $1 AND NOT EXISTS ({{jobs_using_weights}})
             RETURNING id",
            "SELECT seq FROM weights WHERE id = $1",
            "{{jobs_using_weights}} ORDER BY seq LIMIT 10",
            id,
        )
        .await
    }

    /// Runs `delete` (which deletes the row `$1` unless a job uses it, returning its id; its
    /// parts go with it);
    /// when it deleted nothing, tells a missing row (`exists` finds none) from one in use
    /// (`users` lists the jobs, none if they finished meanwhile).
    async fn delete_unused(
        &self,
        delete: &'static str,
        exists: &'static str,
        users: &'static str,
        id: &str,
    ) -> Result<Deletion, StoreError> {
        let mut tx = self.begin_write().await?;
        let deleted: Option<String> = sqlx::query_scalar(self.sql(delete))
            .bind(id)
            .fetch_optional(tx.conn())
            .await?;
        tx.commit().await?;
        if deleted.is_some() {
            return Ok(Deletion::Deleted);
        }
        let found: Option<i64> = sqlx::query_scalar(exists)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        if found.is_none() {
            return Ok(Deletion::NotFound);
        }
        let jobs = sqlx::query_scalar(self.sql(users))
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        Ok(Deletion::InUse(jobs))
    }

    /// The row `template` selects by the id it binds, read as `R` and converted.
    async fn find<R, T>(&self, template: &'static str, id: &str) -> Result<Option<T>, StoreError>
    where
        R: for<'r> FromRow<'r, DB::Row> + Send + Unpin,
        T: TryFrom<R, Error = StoreError>,
    {
        let record: Option<R> = sqlx::query_as(self.sql(template))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        record.map(T::try_from).transpose()
    }

    /// One page of a newest-first list: `template` binds `before` (a `seq`, or none) and the
    /// limit, and selects `seq` with `R`'s columns.
    async fn page<R, T>(
        &self,
        template: &'static str,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<(i64, T)>, StoreError>
    where
        R: Send + Unpin,
        Listed<R>: for<'r> FromRow<'r, DB::Row>,
        T: TryFrom<R, Error = StoreError>,
    {
        let records: Vec<Listed<R>> = sqlx::query_as(self.sql(template))
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        records
            .into_iter()
            .map(|listed| Ok((listed.seq, T::try_from(listed.record)?)))
            .collect()
    }
}

/// Deletes an attempt's outputs (a requeue: the next attempt writes its own).
async fn delete_outputs<DB>(connection: &mut DB::Connection, job_id: &str) -> Result<(), StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    for table in [
        "DELETE FROM curve_point WHERE job_id = $1",
        "DELETE FROM sweep_run WHERE job_id = $1",
        "DELETE FROM race_point WHERE job_id = $1",
        "DELETE FROM trial WHERE job_id = $1",
    ] {
        sqlx::query(table)
            .bind(job_id)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_their_dialect_pieces_for_each_backend() {
        let template = "SELECT {{job_columns}} FROM job WHERE lease_until < {{lease_end $2}}
                        AND {{spec init.weights.id}} = $1 {{skip_locked}}";
        let sqlite = render::<sqlx::Sqlite>(template);
        assert!(
            sqlite.contains("cancel_requested, heartbeat_at, lease_until,"),
            "{sqlite}"
        );
        assert!(
            sqlite.contains("json_extract(spec, '$.init.weights.id') = $1"),
            "{sqlite}"
        );
        assert!(
            !sqlite.contains("{{") && !sqlite.contains("FOR UPDATE"),
            "{sqlite}"
        );
        let postgres = render::<sqlx::Postgres>(template);
        assert!(
            postgres.contains("iso_time(heartbeat_at) AS heartbeat_at"),
            "{postgres}"
        );
        assert!(
            postgres.contains("now() + make_interval(secs => $2)"),
            "{postgres}"
        );
        assert!(
            postgres.contains("spec::jsonb #>> '{init,weights,id}' = $1 FOR UPDATE SKIP LOCKED"),
            "{postgres}"
        );
    }

    #[test]
    #[should_panic(expected = "unknown token \"nope\"")]
    fn an_unknown_token_is_a_programming_error() {
        render::<sqlx::Sqlite>("SELECT {{nope}}");
    }
}
