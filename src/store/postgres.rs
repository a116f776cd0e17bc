//! The PostgreSQL backend: one database shared by API replicas and workers on many hosts,
//! migrations from `migrations/postgres`. A claim locks the oldest queued row with
//! `FOR UPDATE SKIP LOCKED`, so concurrent workers never wait on each other nor take the
//! same job; a lease that has run out is taken back by exactly one process, because the
//! guarded `UPDATE` re-reads a row another transaction changed. Changes are announced with
//! NOTIFY on one channel and heard by one LISTEN connection per process.

use std::sync::Arc;
use std::time::Duration;

use sqlx::error::DatabaseError;
use sqlx::postgres::{
    PgConnectOptions, PgDatabaseError, PgListener, PgPool, PgPoolOptions, PgRow, Postgres,
};
use sqlx::{ConnectOptions, Connection, Transaction};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::dataset::{shape_json, DatasetRecord, StoredRecord};
use super::job::JobRecord;
use super::parts;
use super::weights::{shapes_json, StoredWeightsRecord, WeightsRecord};
use super::{
    Attempt, Change, DatasetRow, Deletion, FinalState, JobRow, ListFilter, Listed, NewDataset,
    NewJob, NewWeights, PointRow, ProgressUpdate, RacePointRow, ReapOutcome, StoreError,
    StoredDataset, StoredWeights, SweepRunRow, WeightsRow,
};

/// The NOTIFY channel every process listens on.
const CHANNEL: &str = "lrtune";

/// The advisory lock that makes "count the queued jobs, then insert" one step across
/// connections (an arbitrary constant: "lrtune" in ASCII).
const SUBMIT_LOCK: i64 = 0x6c72_7475_6e65;

/// The advisory lock that makes "sum the stored bytes, then insert" one step across
/// connections ("upload" in ASCII).
const UPLOAD_LOCK: i64 = 0x7570_6c6f_6164;

/// The bytes of every stored dataset and weights file, the sum the quota bounds.
macro_rules! stored_bytes {
    () => {
        "((SELECT coalesce(sum(bytes), 0) FROM dataset)
          + (SELECT coalesce(sum(bytes), 0) FROM weights))::bigint"
    };
}

/// The ids of the queued and running jobs whose spec names the dataset `$1` (as training or
/// validation data). Specs are JSON text.
macro_rules! jobs_using_dataset {
    () => {
        "SELECT id FROM job WHERE status IN ('queued', 'running')
             AND (spec::jsonb -> 'data' ->> 'dataset_id' = $1
                  OR spec::jsonb -> 'data' ->> 'validation_dataset_id' = $1)"
    };
}

/// The ids of the queued and running jobs whose spec starts from the weights `$1`.
macro_rules! jobs_using_weights {
    () => {
        "SELECT id FROM job WHERE status IN ('queued', 'running')
             AND spec::jsonb #>> '{init,weights,id}' = $1"
    };
}

/// How long a request waits for a free pooled connection (or a new one to the server).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A job's columns, times as UTC ISO 8601 text like SQLite's (`iso_time` is in the
/// migration).
macro_rules! job_columns {
    () => {
        "seq, id, kind, name, spec, status, stage, progress_done, progress_total, error, \
         result, attempts, worker, cancel_requested, iso_time(heartbeat_at) AS heartbeat_at, \
         iso_time(lease_until) AS lease_until, iso_time(created_at) AS created_at, \
         iso_time(started_at) AS started_at, iso_time(finished_at) AS finished_at"
    };
}

macro_rules! weights_columns {
    () => {
        "id, name, bytes, sha256, tensors, shapes, iso_time(created_at) AS created_at"
    };
}

macro_rules! dataset_columns {
    () => {
        "id, name, format, target, rows, features, sample_shape, classes, vocabulary, task, \
         sha256, bytes, iso_time(created_at) AS created_at"
    };
}

/// SQLSTATEs after which a later try may work: the server unreachable, shutting down or
/// starting, out of resources, a read-only standby, a statement timeout, a serialization
/// failure or deadlock. https://www.postgresql.org/docs/current/errcodes-appendix.html
pub(super) fn is_unavailable(error: &dyn DatabaseError) -> bool {
    let Some(error) = error.try_downcast_ref::<PgDatabaseError>() else {
        return false;
    };
    let code = error.code();
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "25006" | "40001" | "40P01"
        )
}

/// The server's disk is full (SQLSTATE 53100, `disk_full`).
pub(super) fn is_disk_full(error: &dyn DatabaseError) -> bool {
    error
        .try_downcast_ref::<PgDatabaseError>()
        .is_some_and(|error| error.code() == "53100")
}

#[derive(Clone)]
pub(super) struct PgStore {
    pool: PgPool,
    _listening: Arc<ListenTask>,
}

/// The task that turns notifications into [`Change`]s; it ends with the last store handle.
struct ListenTask(JoinHandle<()>);

impl Drop for ListenTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgStore {
    pub(super) async fn connect(
        url: &str,
        changes: broadcast::Sender<Change>,
    ) -> Result<PgStore, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.application_name("lrtune");
        // One connection first, so that an unreachable server or a refused login is reported
        // in the server's words rather than as a pool timeout.
        options.connect().await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        // Its own connection, held for as long as the store lives.
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options)
            .await?;
        let mut listener = PgListener::connect_with(&listen_pool).await?;
        listener.listen(CHANNEL).await?;
        let task = tokio::spawn(listen(listener, changes));
        Ok(PgStore {
            pool,
            _listening: Arc::new(ListenTask(task)),
        })
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    pub(super) async fn notify(&self, change: &Change) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(change.encode())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The server answers a read of the job table within `deadline`, and it takes writes
    /// (not a standby left read-only after a failover).
    pub(super) async fn check_health(&self, deadline: Duration) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(deadline.as_millis().to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT seq FROM job ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
        let read_only: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut *tx)
            .await?;
        tx.rollback().await?;
        if read_only {
            return Err(StoreError::Unavailable(
                "the server is a read-only standby".into(),
            ));
        }
        Ok(())
    }

    pub(super) async fn insert_job(
        &self,
        job: NewJob,
        max_queued: i64,
    ) -> Result<Option<JobRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Submits take turns here, so that each one's count sees the others' inserts.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SUBMIT_LOCK)
            .execute(&mut *tx)
            .await?;
        let sql = concat!(
            "INSERT INTO job (id, kind, name, spec, status, created_at)
             SELECT $1, $2, $3, $4, 'queued', now()
             WHERE (SELECT count(*) FROM job WHERE status = 'queued') < $5
             RETURNING ",
            job_columns!()
        );
        let record: Option<JobRecord> = sqlx::query_as(sql)
            .bind(&job.id)
            .bind(job.kind.as_str())
            .bind(&job.name)
            .bind(&job.spec)
            .bind(max_queued)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        record.map(JobRow::try_from).transpose()
    }

    pub(super) async fn get_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let sql = concat!("SELECT ", job_columns!(), " FROM job WHERE id = $1");
        let record: Option<JobRecord> = sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        record.map(JobRow::try_from).transpose()
    }

    pub(super) async fn list_jobs(&self, filter: &ListFilter) -> Result<Vec<JobRow>, StoreError> {
        let sql = concat!(
            "SELECT ",
            job_columns!(),
            " FROM job
             WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR seq < $2)
             ORDER BY seq DESC LIMIT $3"
        );
        let records: Vec<JobRecord> = sqlx::query_as(sql)
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

    pub(super) async fn claim_job(
        &self,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<JobRow>, StoreError> {
        let sql = concat!(
            "UPDATE job SET status = 'running', attempts = attempts + 1, worker = $1,
                 started_at = now(), heartbeat_at = now(),
                 lease_until = now() + make_interval(secs => $2),
                 finished_at = NULL, stage = NULL, progress_done = 0, progress_total = 0
             WHERE id = (SELECT id FROM job WHERE status = 'queued' ORDER BY seq LIMIT 1
                         FOR UPDATE SKIP LOCKED)
               AND status = 'queued'
             RETURNING ",
            job_columns!()
        );
        let record: Option<JobRecord> = sqlx::query_as(sql)
            .bind(worker)
            .bind(lease.as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
        record.map(JobRow::try_from).transpose()
    }

    pub(super) async fn record_progress(
        &self,
        attempt: &Attempt,
        update: &ProgressUpdate,
        lease: Duration,
    ) -> Result<Option<bool>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let cancel_requested: Option<bool> = sqlx::query_scalar(
            "UPDATE job SET heartbeat_at = now(),
                 lease_until = now() + make_interval(secs => $1),
                 progress_done = $2, progress_total = $3, stage = coalesce($4, stage)
             WHERE id = $5 AND status = 'running' AND attempts = $6
             RETURNING cancel_requested",
        )
        .bind(lease.as_secs_f64())
        .bind(update.done)
        .bind(update.total)
        .bind(&update.stage)
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(cancel_requested) = cancel_requested else {
            tx.rollback().await?;
            return Ok(None);
        };
        insert_outputs(&mut tx, attempt, update).await?;
        tx.commit().await?;
        Ok(Some(cancel_requested))
    }

    pub(super) async fn finish_attempt(
        &self,
        attempt: &Attempt,
        state: &FinalState,
        last: &ProgressUpdate,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let updated = match state {
            FinalState::Succeeded { result, steps } => sqlx::query(
                "UPDATE job SET status = 'succeeded', result = $1, error = NULL,
                     progress_done = $2, progress_total = $2, lease_until = NULL,
                     finished_at = now()
                 WHERE id = $3 AND status = 'running' AND attempts = $4",
            )
            .bind(result)
            .bind(steps),
            FinalState::Failed(error) => {
                let text =
                    serde_json::to_string(error).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                sqlx::query(
                    "UPDATE job SET status = 'failed', error = $1, stage = coalesce($2, stage),
                         progress_done = $3, progress_total = $4, lease_until = NULL,
                         finished_at = now()
                     WHERE id = $5 AND status = 'running' AND attempts = $6",
                )
                .bind(text)
                .bind(&last.stage)
                .bind(last.done)
                .bind(last.total)
            }
            FinalState::Canceled => sqlx::query(
                "UPDATE job SET status = 'canceled', stage = coalesce($1, stage),
                     progress_done = $2, progress_total = $3, lease_until = NULL,
                     finished_at = now()
                 WHERE id = $4 AND status = 'running' AND attempts = $5",
            )
            .bind(&last.stage)
            .bind(last.done)
            .bind(last.total),
            FinalState::Requeue => sqlx::query(
                "UPDATE job SET status = 'queued', attempts = attempts - 1, worker = NULL,
                     started_at = NULL, heartbeat_at = NULL, lease_until = NULL, stage = NULL,
                     progress_done = 0, progress_total = 0
                 WHERE id = $1 AND status = 'running' AND attempts = $2",
            ),
        }
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
            FinalState::Requeue => {
                delete_outputs(&mut tx, std::slice::from_ref(&attempt.job_id)).await?
            }
            _ => insert_outputs(&mut tx, attempt, last).await?,
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn cancel_queued(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE job SET status = 'canceled', cancel_requested = true, finished_at = now()
             WHERE id = $1 AND status = 'queued'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE job SET cancel_requested = true WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn reap_expired(&self, max_attempts: i64) -> Result<ReapOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Where the worker was last seen, as on SQLite; SET reads the row as it was, so the
        // lease's length is there to quote while the lease itself is cleared.
        let failed: Vec<String> = sqlx::query_scalar(
            "UPDATE job SET status = 'failed', finished_at = now(), lease_until = NULL,
                 error = json_build_object('code', 'worker_lost', 'message', format(
                     'the worker died while running this job (attempts: %s; last seen %s; no heartbeat for %s s); it may have been killed for running out of memory: giving up',
                     attempts,
                     CASE WHEN stage IS NULL THEN 'loading the data'
                          ELSE format('in stage %s at step %s of %s', stage, progress_done, progress_total) END,
                     to_char(extract(epoch FROM lease_until - heartbeat_at), 'FM999999990.0')))::text
             WHERE status = 'running' AND attempts >= $1 AND lease_until < now()
             RETURNING id",
        )
        .bind(max_attempts)
        .fetch_all(&mut *tx)
        .await?;
        let requeued: Vec<String> = sqlx::query_scalar(
            "UPDATE job SET status = 'queued', worker = NULL, started_at = NULL,
                 heartbeat_at = NULL, lease_until = NULL, stage = NULL, progress_done = 0,
                 progress_total = 0
             WHERE status = 'running' AND attempts < $1 AND lease_until < now()
             RETURNING id",
        )
        .bind(max_attempts)
        .fetch_all(&mut *tx)
        .await?;
        delete_outputs(&mut tx, &requeued).await?;
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
            "SELECT position, peak_lr, seed, steps, val_loss, val_accuracy, train_loss, diverged
             FROM sweep_run WHERE job_id = $1 AND position >= $2 ORDER BY position",
        )
        .bind(job_id)
        .bind(from_position)
        .fetch_all(&self.pool)
        .await?)
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

    /// Uploads take turns on an advisory lock, so that each one's sum of the stored bytes
    /// sees the others' inserts and together they cannot overshoot the quota.
    pub(super) async fn insert_dataset(
        &self,
        dataset: NewDataset,
        max_stored_bytes: i64,
    ) -> Result<Option<DatasetRow>, StoreError> {
        let row = dataset.row;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(UPLOAD_LOCK)
            .execute(&mut *tx)
            .await?;
        let sql = concat!(
            "INSERT INTO dataset (id, name, format, target, rows, features, sample_shape,
                 classes, vocabulary, task, sha256, bytes, x, y, created_at)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, now()
             WHERE ",
            stored_bytes!(),
            " + $12 <= $15
             RETURNING ",
            dataset_columns!()
        );
        let record: Option<DatasetRecord> = sqlx::query_as(sql)
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
            .bind(max_stored_bytes)
            .fetch_optional(&mut *tx)
            .await?;
        if record.is_some() {
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
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        record.map(DatasetRow::try_from).transpose()
    }

    pub(super) async fn get_dataset(&self, id: &str) -> Result<Option<DatasetRow>, StoreError> {
        let sql = concat!("SELECT ", dataset_columns!(), " FROM dataset WHERE id = $1");
        self.find::<DatasetRecord, _>(sql, id).await
    }

    pub(super) async fn load_dataset(&self, id: &str) -> Result<Option<StoredDataset>, StoreError> {
        let sql = concat!(
            "SELECT ",
            dataset_columns!(),
            ", x, y FROM dataset WHERE id = $1"
        );
        let found: Option<StoredDataset> = self.find::<StoredRecord, _>(sql, id).await?;
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
        let sql = concat!(
            "SELECT seq, ",
            dataset_columns!(),
            " FROM dataset WHERE ($1::bigint IS NULL OR seq < $1) ORDER BY seq DESC LIMIT $2"
        );
        self.page::<DatasetRecord, _>(sql, limit, before).await
    }

    /// Within the quota, taking turns with the other uploads as `insert_dataset` does.
    pub(super) async fn insert_weights(
        &self,
        weights: NewWeights,
        max_stored_bytes: i64,
    ) -> Result<Option<WeightsRow>, StoreError> {
        let row = weights.row;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(UPLOAD_LOCK)
            .execute(&mut *tx)
            .await?;
        let sql = concat!(
            "INSERT INTO weights (id, name, bytes, sha256, tensors, shapes, data, created_at)
             SELECT $1, $2, $3, $4, $5, $6, $7, now()
             WHERE ",
            stored_bytes!(),
            " + $3 <= $8
             RETURNING ",
            weights_columns!()
        );
        let record: Option<WeightsRecord> = sqlx::query_as(sql)
            .bind(&row.id)
            .bind(&row.name)
            .bind(row.bytes)
            .bind(&row.sha256)
            .bind(row.tensors)
            .bind(shapes_json(&row.shapes)?)
            .bind(Vec::<u8>::new())
            .bind(max_stored_bytes)
            .fetch_optional(&mut *tx)
            .await?;
        if record.is_some() {
            for (position, part) in parts::split(&weights.data) {
                sqlx::query(
                    "INSERT INTO weights_part (weights_id, position, bytes) VALUES ($1, $2, $3)",
                )
                .bind(&row.id)
                .bind(position)
                .bind(part)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        record.map(WeightsRow::try_from).transpose()
    }

    pub(super) async fn get_weights(&self, id: &str) -> Result<Option<WeightsRow>, StoreError> {
        let sql = concat!("SELECT ", weights_columns!(), " FROM weights WHERE id = $1");
        self.find::<WeightsRecord, _>(sql, id).await
    }

    pub(super) async fn load_weights(&self, id: &str) -> Result<Option<StoredWeights>, StoreError> {
        let sql = concat!(
            "SELECT ",
            weights_columns!(),
            ", data FROM weights WHERE id = $1"
        );
        let found: Option<StoredWeights> = self.find::<StoredWeightsRecord, _>(sql, id).await?;
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
        let sql = concat!(
            "SELECT seq, ",
            weights_columns!(),
            " FROM weights WHERE ($1::bigint IS NULL OR seq < $1) ORDER BY seq DESC LIMIT $2"
        );
        self.page::<WeightsRecord, _>(sql, limit, before).await
    }

    /// The row `sql` selects by the id it binds, read as `R` and converted.
    pub(super) async fn stored_bytes(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(concat!("SELECT ", stored_bytes!()))
            .fetch_one(&self.pool)
            .await?)
    }

    /// Deletes the dataset unless a queued or running job names it, in one statement.
    pub(super) async fn delete_dataset(&self, id: &str) -> Result<Deletion, StoreError> {
        self.delete_unused(
            concat!(
                "DELETE FROM dataset WHERE id = $1 AND NOT EXISTS (",
                jobs_using_dataset!(),
                ")"
            ),
            "SELECT seq FROM dataset WHERE id = $1",
            concat!(jobs_using_dataset!(), " ORDER BY seq LIMIT 10"),
            id,
        )
        .await
    }

    /// Deletes the weights unless a queued or running job names them, in one statement.
    pub(super) async fn delete_weights(&self, id: &str) -> Result<Deletion, StoreError> {
        self.delete_unused(
            concat!(
                "DELETE FROM weights WHERE id = $1 AND NOT EXISTS (",
                jobs_using_weights!(),
                ")"
            ),
            "SELECT seq FROM weights WHERE id = $1",
            concat!(jobs_using_weights!(), " ORDER BY seq LIMIT 10"),
            id,
        )
        .await
    }

    /// Runs `delete` (which deletes the row `$1` unless a job uses it); when it deleted
    /// nothing, tells a missing row (`exists` finds none) from one in use (`users` lists the
    /// jobs, none if they finished meanwhile).
    async fn delete_unused(
        &self,
        delete: &'static str,
        exists: &'static str,
        users: &'static str,
        id: &str,
    ) -> Result<Deletion, StoreError> {
        let deleted = sqlx::query(delete).bind(id).execute(&self.pool).await?;
        if deleted.rows_affected() == 1 {
            return Ok(Deletion::Deleted);
        }
        let found: Option<i64> = sqlx::query_scalar(exists)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        if found.is_none() {
            return Ok(Deletion::NotFound);
        }
        let jobs = sqlx::query_scalar(users)
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        Ok(Deletion::InUse(jobs))
    }

    async fn find<R, T>(&self, sql: &'static str, id: &str) -> Result<Option<T>, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
        T: TryFrom<R, Error = StoreError>,
    {
        let record: Option<R> = sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        record.map(T::try_from).transpose()
    }

    /// One page of a newest-first list: `sql` binds `before` (a `seq`, or none) and the
    /// limit, and selects `seq` with `R`'s columns.
    async fn page<R, T>(
        &self,
        sql: &'static str,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<(i64, T)>, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
        T: TryFrom<R, Error = StoreError>,
    {
        let records: Vec<Listed<R>> = sqlx::query_as(sql)
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

/// Hands every notification to the process's subscribers. A lost connection is
/// re-established by the listener; what was announced meanwhile is gone, so subscribers are
/// told to read the state again.
async fn listen(mut listener: PgListener, changes: broadcast::Sender<Change>) {
    // While the server is down every reconnection fails: each next try waits twice as long,
    // up to 5 s.
    let mut backoff = Duration::ZERO;
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                backoff = Duration::ZERO;
                let _ = changes.send(Change::decode(notification.payload()));
            }
            Ok(None) => {
                tracing::warn!("the connection listening for changes was lost: reconnecting");
                let _ = changes.send(Change::Unknown);
            }
            Err(error) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
                tracing::warn!(%error, retry_in = ?backoff, "listening for changes");
                let _ = changes.send(Change::Unknown);
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// The update's points and sweep runs, each written once (see the SQLite backend), in one
/// statement each.
async fn insert_outputs(
    tx: &mut Transaction<'_, Postgres>,
    attempt: &Attempt,
    update: &ProgressUpdate,
) -> Result<(), StoreError> {
    if !update.points.is_empty() {
        let points = &update.points;
        sqlx::query(
            "INSERT INTO curve_point (job_id, run, step, lr, loss, smoothed)
             SELECT $1, $2, step, lr, loss, smoothed
             FROM UNNEST($3::bigint[], $4::float8[], $5::float8[], $6::float8[])
                 AS point (step, lr, loss, smoothed)
             ON CONFLICT (job_id, step) DO NOTHING",
        )
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .bind(points.iter().map(|p| p.step).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.lr).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.loss).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.smoothed).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !update.sweep_runs.is_empty() {
        let runs = &update.sweep_runs;
        sqlx::query(
            "INSERT INTO sweep_run (job_id, run, position, peak_lr, seed, steps, val_loss,
                 val_accuracy, train_loss, diverged)
             SELECT $1, $2, position, peak_lr, seed, steps, val_loss, val_accuracy,
                 train_loss, diverged
             FROM UNNEST($3::bigint[], $4::float8[], $5::bigint[], $6::bigint[],
                 $7::float8[], $8::float8[], $9::float8[], $10::boolean[])
                 AS run (position, peak_lr, seed, steps, val_loss, val_accuracy, train_loss,
                         diverged)
             ON CONFLICT (job_id, position) DO NOTHING",
        )
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .bind(runs.iter().map(|r| r.position).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.peak_lr).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.seed).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.steps).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.val_loss).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.val_accuracy).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.train_loss).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.diverged).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !update.race_points.is_empty() {
        let points = &update.race_points;
        sqlx::query(
            "INSERT INTO race_point (job_id, run, position, recipe, seed, step, seconds,
                 val_loss, val_accuracy)
             SELECT $1, $2, position, recipe, seed, step, seconds, val_loss, val_accuracy
             FROM UNNEST($3::bigint[], $4::text[], $5::bigint[], $6::bigint[],
                 $7::float8[], $8::float8[], $9::float8[])
                 AS point (position, recipe, seed, step, seconds, val_loss, val_accuracy)
             ON CONFLICT (job_id, position) DO NOTHING",
        )
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .bind(points.iter().map(|p| p.position).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.recipe.clone()).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.seed).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.step).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.seconds).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.val_loss).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.val_accuracy).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn delete_outputs(
    tx: &mut Transaction<'_, Postgres>,
    job_ids: &[String],
) -> Result<(), StoreError> {
    if job_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM curve_point WHERE job_id = ANY($1)")
        .bind(job_ids)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM sweep_run WHERE job_id = ANY($1)")
        .bind(job_ids)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM race_point WHERE job_id = ANY($1)")
        .bind(job_ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
