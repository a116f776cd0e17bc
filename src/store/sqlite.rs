//! The SQLite backend: one file in WAL mode with a busy timeout, migrations from
//! `migrations/sqlite`. Times are UTC ISO 8601 text with milliseconds, written by SQLite
//! itself, so that string order is time order and an expired lease is one comparison.
//! SQLite serialises writers, so a claim is a plain `UPDATE ... RETURNING`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::error::DatabaseError;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteError, SqliteJournalMode, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Sqlite, SqlitePool};

use super::dataset::{shape_json, DatasetRecord, StoredRecord};
use super::job::JobRecord;
use super::parts;
use super::weights::{shapes_json, StoredWeightsRecord, WeightsRecord};
use super::{
    Attempt, DatasetRow, Deletion, FinalState, JobRow, ListFilter, Listed, NewDataset, NewJob,
    NewWeights, PointRow, ProgressUpdate, RacePointRow, ReapOutcome, StoreError, StoredDataset,
    StoredWeights, SweepRunRow, WeightsRow,
};

/// The current time as SQLite writes it: UTC ISO 8601 with milliseconds. A macro so that
/// queries stay `&'static str` literals (`concat!`), never strings built at run time.
macro_rules! now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
}

/// The time a lease of `?` (a SQLite date modifier such as `+60.000 seconds`) ends.
macro_rules! lease_end {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)"
    };
}

/// The bytes of every stored dataset and weights file, the sum the quota bounds.
macro_rules! stored_bytes {
    () => {
        "((SELECT coalesce(sum(bytes), 0) FROM dataset)
          + (SELECT coalesce(sum(bytes), 0) FROM weights))"
    };
}

/// The ids of the queued and running jobs whose spec names the dataset `?1` (as training or
/// validation data).
macro_rules! jobs_using_dataset {
    () => {
        "SELECT id FROM job WHERE status IN ('queued', 'running')
             AND (json_extract(spec, '$.data.dataset_id') = ?1
                  OR json_extract(spec, '$.data.validation_dataset_id') = ?1)"
    };
}

/// The ids of the queued and running jobs whose spec starts from the weights `?1`.
macro_rules! jobs_using_weights {
    () => {
        "SELECT id FROM job WHERE status IN ('queued', 'running')
             AND json_extract(spec, '$.init.weights.id') = ?1"
    };
}

/// How long a statement waits for another connection's write lock before it fails with
/// "database is locked". Our own writes hold the lock for milliseconds; waiting longer only
/// makes a request hang while another process holds it, so the API answers 503 instead and
/// the workers retry.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a request waits for a free pooled connection (all of them waiting on a lock).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

// SQLite's primary result codes (the low byte of an extended code).
// https://www.sqlite.org/rescode.html
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_READONLY: i32 = 8;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_NOTADB: i32 = 26;

/// SQLite's primary result code of a SQLite error (the low byte of the extended code).
fn primary_code(error: &dyn DatabaseError) -> Option<i32> {
    error.try_downcast_ref::<SqliteError>()?;
    let code = error.code()?.parse::<i32>().ok()?;
    Some(code & 0xff)
}

/// Locked past the busy timeout, or the file unreadable, unwritable (read-only, or removed
/// under the server: SQLite refuses writes to a file that was unlinked), full or damaged.
pub(super) fn is_unavailable(error: &dyn DatabaseError) -> bool {
    primary_code(error).is_some_and(|code| {
        matches!(
            code,
            SQLITE_BUSY
                | SQLITE_LOCKED
                | SQLITE_READONLY
                | SQLITE_IOERR
                | SQLITE_CORRUPT
                | SQLITE_FULL
                | SQLITE_CANTOPEN
                | SQLITE_NOTADB
        )
    })
}

/// The disk (or file system) holding the database is full.
pub(super) fn is_disk_full(error: &dyn DatabaseError) -> bool {
    primary_code(error) == Some(SQLITE_FULL)
}

/// Less free space than this where the database file lives fails the health check: any write
/// may then fail with "database or disk is full" (a commit appends pages to the WAL).
const MIN_FREE_BYTES: u64 = 256 * 1024;

/// Bytes free to this process on the file system holding `file`; `None` when it cannot be told.
fn free_bytes(file: &Path) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let folder = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let stats = rustix::fs::statvfs(folder).ok()?;
        Some(stats.f_bavail.saturating_mul(stats.f_frsize))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        None
    }
}

/// A duration as a SQLite date modifier.
fn modifier(duration: Duration) -> String {
    format!("+{:.3} seconds", duration.as_secs_f64())
}

/// A write transaction on a pooled connection, begun with `BEGIN IMMEDIATE` (the write lock at
/// once, so no reader-turned-writer fails half way) and ended by an explicit `COMMIT` whose
/// error is the caller's.
///
/// It does not use sqlx's `Transaction`, whose bookkeeping is a depth counter that SQLite's
/// own state can leave behind: after `SQLITE_FULL` or an I/O error SQLite may roll the whole
/// transaction back by itself, the driver's `ROLLBACK` then fails, the counter stays at 1, and
/// the next `begin()` on that pooled connection issues a `SAVEPOINT` (opening a real
/// transaction) whose `ROLLBACK TO` leaves it open. Every later statement on that connection,
/// a submit's `INSERT` among them, then ran inside a transaction that was never committed,
/// holding the write lock against everyone else. Here a transaction that did not end with a
/// `COMMIT` or `ROLLBACK` that SQLite accepted (an error, a dropped future) takes its
/// connection with it: the connection is closed, which rolls back whatever is open, and the
/// pool opens a fresh one. So no pooled connection is ever left inside a transaction.
///
/// Single-statement writes go through it too: outside a transaction, SQLite commits an
/// `INSERT ... RETURNING` when the statement is reset, after the row was already handed out,
/// and the driver ignores an error at that reset (a full disk), so a submit could answer 202
/// for a row that was never committed.
struct WriteTx {
    connection: Option<PoolConnection<Sqlite>>,
    file: Option<Arc<DatabaseFile>>,
}

impl WriteTx {
    /// Begins, when the database file is still the one opened and writable (checked again at
    /// the commit).
    async fn begin(store: &SqliteStore) -> Result<WriteTx, StoreError> {
        if let Some(file) = &store.file {
            file.check()?;
        }
        let mut tx = WriteTx {
            connection: Some(store.pool.acquire().await?),
            file: store.file.clone(),
        };
        sqlx::query("BEGIN IMMEDIATE").execute(tx.conn()).await?;
        Ok(tx)
    }

    fn conn(&mut self) -> &mut SqliteConnection {
        self.connection
            .as_mut()
            .expect("a transaction's connection is only taken when it ends")
    }

    /// Commits, when the database file is still the one opened and writable (see
    /// [`DatabaseFile`]); else rolls back and says why.
    async fn commit(self) -> Result<(), StoreError> {
        if let Some(file) = &self.file {
            file.check()?;
        }
        self.end("COMMIT").await
    }

    async fn rollback(self) -> Result<(), StoreError> {
        self.end("ROLLBACK").await
    }

    /// Only when SQLite accepted the statement does the connection go back to the pool;
    /// on an error, `drop` closes it.
    async fn end(mut self, statement: &'static str) -> Result<(), StoreError> {
        sqlx::query(statement).execute(self.conn()).await?;
        self.connection.take();
        Ok(())
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let Some(mut connection) = self.connection.take() {
            connection.close_on_drop();
        }
    }
}

#[derive(Clone)]
pub(super) struct SqliteStore {
    pool: SqlitePool,
    /// The database file as it was opened (none in memory).
    file: Option<Arc<DatabaseFile>>,
}

/// The database file the store opened. SQLite goes on writing to an open file after it was
/// removed or replaced (to an inode that nothing names any more, lost at the next start), and
/// after it was made read-only (through connections opened before), so every commit first
/// checks that the path still names the same, writable file.
struct DatabaseFile {
    path: PathBuf,
    device: u64,
    inode: u64,
}

impl DatabaseFile {
    fn of(path: &Path) -> Option<DatabaseFile> {
        let metadata = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
        Some(DatabaseFile {
            path: path.to_path_buf(),
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }

    /// The file is still there, the same one, and writable.
    fn check(&self) -> Result<(), StoreError> {
        let same = std::fs::metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.device && m.ino() == self.inode);
        if !same {
            return Err(StoreError::Unavailable(format!(
                "the database file {} was removed or replaced while the server had it open: \
                 nothing is written until it is back (or the server is restarted on a new one)",
                self.path.display()
            )));
        }
        if !writable(&self.path) {
            return Err(StoreError::Unavailable(format!(
                "the database file {} is read-only: nothing is written until it is writable",
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// Whether this process may write the file (the kernel's answer: an immutable file is not
/// writable even by root).
fn writable(path: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::access(path, rustix::fs::Access::WRITE_OK).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        std::fs::metadata(path).is_ok_and(|m| !m.permissions().readonly())
    }
}

impl SqliteStore {
    /// Opens (creating it when missing) the SQLite file.
    pub(super) async fn open_path(path: &Path) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        Self::connect(options).await
    }

    /// Opens a database from a `sqlite:` URL (its own options, such as `?mode=ro`, kept).
    pub(super) async fn open_url(url: &str) -> Result<SqliteStore, StoreError> {
        Self::connect(SqliteConnectOptions::from_str(url)?).await
    }

    async fn connect(options: SqliteConnectOptions) -> Result<SqliteStore, StoreError> {
        // FULL: a commit is on disk before it is answered (a 202 survives a power cut, not
        // only a crash of the process); NORMAL would leave the last commits to the next
        // checkpoint.
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        // The file is created (when allowed) and migrated once, here. The pool never creates
        // it: a file removed under the server must not come back empty when a connection is
        // opened again, answering "no such table" instead of "the file is gone".
        let mut first = options.connect().await?;
        let migrated = sqlx::migrate!("./migrations/sqlite").run(&mut first).await;
        first.close().await?;
        migrated?;
        let file = DatabaseFile::of(options.get_filename()).map(Arc::new);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.create_if_missing(false))
            .await?;
        Ok(SqliteStore { pool, file })
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    /// A fresh connection (an empty page cache, so pages come from the file, not from
    /// memory) reads the job table and takes the write lock, waiting at most `lock_wait` for
    /// it. `SELECT 1` proves none of this: it succeeds on a locked and on a damaged file.
    pub(super) async fn check_health(&self, lock_wait: Duration) -> Result<(), StoreError> {
        let options = (*self.pool.connect_options())
            .clone()
            .create_if_missing(false)
            .busy_timeout(lock_wait);
        let mut connection = options.connect().await?;
        let checked = async {
            let mut transaction = connection.begin_with("BEGIN IMMEDIATE").await?;
            sqlx::query("SELECT seq FROM job ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *transaction)
                .await?;
            transaction.rollback().await
        }
        .await;
        let _ = connection.close().await;
        checked?;
        if let Some(file) = &self.file {
            file.check()?;
            if let Some(free) = free_bytes(&file.path) {
                if free < MIN_FREE_BYTES {
                    return Err(StoreError::Unavailable(format!(
                        "disk full: {free} bytes free for the database file {}",
                        file.path.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The count and the insert are one statement, and SQLite runs one writer at a time, so
    /// concurrent submits cannot overshoot the limit.
    pub(super) async fn insert_job(
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
        let mut tx = WriteTx::begin(self).await?;
        let record: Option<JobRecord> = sqlx::query_as(sql)
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
        let record: Option<JobRecord> = sqlx::query_as("SELECT * FROM job WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        record.map(JobRow::try_from).transpose()
    }

    pub(super) async fn list_jobs(&self, filter: &ListFilter) -> Result<Vec<JobRow>, StoreError> {
        let records: Vec<JobRecord> = sqlx::query_as(
            "SELECT * FROM job
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR seq < ?2)
             ORDER BY seq DESC LIMIT ?3",
        )
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
            "UPDATE job SET status = 'running', attempts = attempts + 1, worker = ?,
                 started_at = ",
            now!(),
            ", heartbeat_at = ",
            now!(),
            ", lease_until = ",
            lease_end!(),
            ", finished_at = NULL, stage = NULL, progress_done = 0, progress_total = 0
             WHERE id = (SELECT id FROM job WHERE status = 'queued' ORDER BY seq LIMIT 1)
               AND status = 'queued'
             RETURNING *"
        );
        let mut tx = WriteTx::begin(self).await?;
        let record: Option<JobRecord> = sqlx::query_as(sql)
            .bind(worker)
            .bind(modifier(lease))
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
        let mut tx = WriteTx::begin(self).await?;
        let sql = concat!(
            "UPDATE job SET heartbeat_at = ",
            now!(),
            ", lease_until = ",
            lease_end!(),
            ", progress_done = ?, progress_total = ?, stage = coalesce(?, stage)
             WHERE id = ? AND status = 'running' AND attempts = ?
             RETURNING cancel_requested"
        );
        let cancel_requested: Option<bool> = sqlx::query_scalar(sql)
            .bind(modifier(lease))
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
        insert_outputs(tx.conn(), attempt, update).await?;
        tx.commit().await?;
        Ok(Some(cancel_requested))
    }

    pub(super) async fn finish_attempt(
        &self,
        attempt: &Attempt,
        state: &FinalState,
        last: &ProgressUpdate,
    ) -> Result<bool, StoreError> {
        let mut tx = WriteTx::begin(self).await?;
        // The guarded UPDATE comes first so the transaction takes the write lock at once.
        let updated = match state {
            FinalState::Succeeded { result, steps } => {
                let sql = concat!(
                    "UPDATE job SET status = 'succeeded', result = ?, error = NULL,
                         progress_done = ?, progress_total = ?, lease_until = NULL,
                         finished_at = ",
                    now!(),
                    " WHERE id = ? AND status = 'running' AND attempts = ?"
                );
                sqlx::query(sql).bind(result).bind(steps).bind(steps)
            }
            FinalState::Failed(error) => {
                let sql = concat!(
                    "UPDATE job SET status = 'failed', error = ?, stage = coalesce(?, stage),
                         progress_done = ?, progress_total = ?, lease_until = NULL,
                         finished_at = ",
                    now!(),
                    " WHERE id = ? AND status = 'running' AND attempts = ?"
                );
                let text =
                    serde_json::to_string(error).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                sqlx::query(sql)
                    .bind(text)
                    .bind(&last.stage)
                    .bind(last.done)
                    .bind(last.total)
            }
            FinalState::Canceled => {
                let sql = concat!(
                    "UPDATE job SET status = 'canceled', stage = coalesce(?, stage),
                         progress_done = ?, progress_total = ?, lease_until = NULL,
                         finished_at = ",
                    now!(),
                    " WHERE id = ? AND status = 'running' AND attempts = ?"
                );
                sqlx::query(sql)
                    .bind(&last.stage)
                    .bind(last.done)
                    .bind(last.total)
            }
            FinalState::Requeue => sqlx::query(
                "UPDATE job SET status = 'queued', attempts = attempts - 1, worker = NULL,
                     started_at = NULL, heartbeat_at = NULL, lease_until = NULL, stage = NULL,
                     progress_done = 0, progress_total = 0
                 WHERE id = ? AND status = 'running' AND attempts = ?",
            ),
        }
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .execute(tx.conn())
        .await?
        .rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        match state {
            FinalState::Requeue => delete_outputs(tx.conn(), &attempt.job_id).await?,
            _ => insert_outputs(tx.conn(), attempt, last).await?,
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn cancel_queued(&self, id: &str) -> Result<bool, StoreError> {
        let sql = concat!(
            "UPDATE job SET status = 'canceled', cancel_requested = 1, finished_at = ",
            now!(),
            " WHERE id = ? AND status = 'queued'"
        );
        let mut tx = WriteTx::begin(self).await?;
        let done = sqlx::query(sql).bind(id).execute(tx.conn()).await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = WriteTx::begin(self).await?;
        let done =
            sqlx::query("UPDATE job SET cancel_requested = 1 WHERE id = ? AND status = 'running'")
                .bind(id)
                .execute(tx.conn())
                .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn reap_expired(&self, max_attempts: i64) -> Result<ReapOutcome, StoreError> {
        let mut tx = WriteTx::begin(self).await?;
        // The message is built per job from its last heartbeat, so it says where the worker
        // was when it died (a process killed for memory leaves no other trace); the lease's
        // length is the time it was given to send the next one.
        let failed_sql = concat!(
            "UPDATE job SET status = 'failed', finished_at = ",
            now!(),
            ", lease_until = NULL, error = json_object('code', 'worker_lost', 'message', printf(
                 'the worker died while running this job (attempts: %d; last seen %s; no heartbeat for %.1f s); it may have been killed for running out of memory: giving up',
                 attempts,
                 CASE WHEN stage IS NULL THEN 'loading the data'
                      ELSE printf('in stage %s at step %d of %d', stage, progress_done, progress_total) END,
                 (julianday(lease_until) - julianday(heartbeat_at)) * 86400.0))
             WHERE status = 'running' AND attempts >= ? AND lease_until < ",
            now!(),
            " RETURNING id"
        );
        let failed: Vec<String> = sqlx::query_scalar(failed_sql)
            .bind(max_attempts)
            .fetch_all(tx.conn())
            .await?;
        let requeue_sql = concat!(
            "UPDATE job SET status = 'queued', worker = NULL, started_at = NULL,
                 heartbeat_at = NULL, lease_until = NULL, stage = NULL, progress_done = 0,
                 progress_total = 0
             WHERE status = 'running' AND attempts < ? AND lease_until < ",
            now!(),
            " RETURNING id"
        );
        let requeued: Vec<String> = sqlx::query_scalar(requeue_sql)
            .bind(max_attempts)
            .fetch_all(tx.conn())
            .await?;
        for id in &requeued {
            delete_outputs(tx.conn(), id).await?;
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
             WHERE job_id = ? AND step > ? ORDER BY step",
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
             FROM sweep_run WHERE job_id = ? AND position >= ? ORDER BY position",
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
             FROM race_point WHERE job_id = ? AND position >= ? ORDER BY position",
        )
        .bind(job_id)
        .bind(from_position)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The quota's sum and the insert in one transaction that holds the write lock from its
    /// start, so concurrent uploads cannot overshoot the quota. (Not one `INSERT ... SELECT
    /// ... WHERE sum < quota` statement: reading the table it inserts into, SQLite would
    /// stage the row, bytes and all, in a temporary table first.) Only the description comes
    /// back, not the bytes, which `RETURNING *` would copy out again.
    pub(super) async fn insert_dataset(
        &self,
        dataset: NewDataset,
        max_stored_bytes: i64,
    ) -> Result<Option<DatasetRow>, StoreError> {
        let row = dataset.row;
        let mut tx = WriteTx::begin(self).await?;
        if !within_quota(tx.conn(), row.bytes, max_stored_bytes).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        let sql = concat!(
            "INSERT INTO dataset (id, name, format, target, rows, features, sample_shape,
                 classes, vocabulary, task, sha256, bytes, x, y, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ",
            now!(),
            ") RETURNING id, name, format, target, rows, features, sample_shape, classes,
                 vocabulary, task, sha256, bytes, created_at"
        );
        let record: DatasetRecord = sqlx::query_as(sql)
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
                     VALUES (?, ?, ?, ?)",
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
        self.find::<DatasetRecord, _>(
            "SELECT seq, id, name, format, target, rows, features, sample_shape, classes,
                 vocabulary, task, sha256, bytes, created_at
             FROM dataset WHERE id = ?",
            id,
        )
        .await
    }

    pub(super) async fn load_dataset(&self, id: &str) -> Result<Option<StoredDataset>, StoreError> {
        let found: Option<StoredDataset> = self
            .find::<StoredRecord, _>("SELECT * FROM dataset WHERE id = ?", id)
            .await?;
        let Some(mut dataset) = found else {
            return Ok(None);
        };
        let capacity = usize::try_from(dataset.row.bytes).unwrap_or(0);
        let part_sql = "SELECT bytes FROM dataset_part
                        WHERE dataset_id = ? AND part = ? ORDER BY position";
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
            "SELECT seq, id, name, format, target, rows, features, sample_shape, classes,
                 vocabulary, task, sha256, bytes, created_at
             FROM dataset WHERE (?1 IS NULL OR seq < ?1) ORDER BY seq DESC LIMIT ?2",
            limit,
            before,
        )
        .await
    }

    /// Within the quota, as `insert_dataset`.
    pub(super) async fn insert_weights(
        &self,
        weights: NewWeights,
        max_stored_bytes: i64,
    ) -> Result<Option<WeightsRow>, StoreError> {
        let row = weights.row;
        let mut tx = WriteTx::begin(self).await?;
        if !within_quota(tx.conn(), row.bytes, max_stored_bytes).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        let sql = concat!(
            "INSERT INTO weights (id, name, bytes, sha256, tensors, shapes, data, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ",
            now!(),
            ") RETURNING id, name, bytes, sha256, tensors, shapes, created_at"
        );
        let record: WeightsRecord = sqlx::query_as(sql)
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
            sqlx::query("INSERT INTO weights_part (weights_id, position, bytes) VALUES (?, ?, ?)")
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
        self.find::<WeightsRecord, _>(
            "SELECT id, name, bytes, sha256, tensors, shapes, created_at
             FROM weights WHERE id = ?",
            id,
        )
        .await
    }

    pub(super) async fn load_weights(&self, id: &str) -> Result<Option<StoredWeights>, StoreError> {
        let found: Option<StoredWeights> = self
            .find::<StoredWeightsRecord, _>(
                "SELECT id, name, bytes, sha256, tensors, shapes, data, created_at
                 FROM weights WHERE id = ?",
                id,
            )
            .await?;
        let Some(mut weights) = found else {
            return Ok(None);
        };
        let data = std::mem::take(&mut weights.data);
        let data_parts = sqlx::query_scalar(
            "SELECT bytes FROM weights_part WHERE weights_id = ? ORDER BY position",
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
            "SELECT seq, id, name, bytes, sha256, tensors, shapes, created_at
             FROM weights WHERE (?1 IS NULL OR seq < ?1) ORDER BY seq DESC LIMIT ?2",
            limit,
            before,
        )
        .await
    }

    pub(super) async fn stored_bytes(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(concat!("SELECT ", stored_bytes!()))
            .fetch_one(&self.pool)
            .await?)
    }

    /// Deletes the dataset unless a queued or running job names it, in one statement.
    pub(super) async fn delete_dataset(&self, id: &str) -> Result<Deletion, StoreError> {
        self.delete_unused(
            concat!(
                "DELETE FROM dataset WHERE id = ?1 AND NOT EXISTS (",
                jobs_using_dataset!(),
                ")"
            ),
            "SELECT seq FROM dataset WHERE id = ?1",
            concat!(jobs_using_dataset!(), " ORDER BY seq LIMIT 10"),
            id,
        )
        .await
    }

    /// Deletes the weights unless a queued or running job names them, in one statement.
    pub(super) async fn delete_weights(&self, id: &str) -> Result<Deletion, StoreError> {
        self.delete_unused(
            concat!(
                "DELETE FROM weights WHERE id = ?1 AND NOT EXISTS (",
                jobs_using_weights!(),
                ")"
            ),
            "SELECT seq FROM weights WHERE id = ?1",
            concat!(jobs_using_weights!(), " ORDER BY seq LIMIT 10"),
            id,
        )
        .await
    }

    /// Runs `delete` (which deletes the row `?1` unless a job uses it); when it deleted
    /// nothing, tells a missing row (`exists` finds none) from one in use (`users` lists the
    /// jobs, none if they finished meanwhile).
    async fn delete_unused(
        &self,
        delete: &'static str,
        exists: &'static str,
        users: &'static str,
        id: &str,
    ) -> Result<Deletion, StoreError> {
        let mut tx = WriteTx::begin(self).await?;
        let deleted = sqlx::query(delete).bind(id).execute(tx.conn()).await?;
        tx.commit().await?;
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

    /// The row `sql` selects by the id it binds, read as `R` and converted.
    async fn find<R, T>(&self, sql: &'static str, id: &str) -> Result<Option<T>, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, SqliteRow> + Send + Unpin,
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
        R: for<'r> sqlx::FromRow<'r, SqliteRow> + Send + Unpin,
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

/// The update's points and sweep runs, each written once: a retried write (its first try
/// committed, but the answer was lost) finds them there and leaves them.
async fn insert_outputs(
    connection: &mut SqliteConnection,
    attempt: &Attempt,
    update: &ProgressUpdate,
) -> Result<(), StoreError> {
    for point in &update.points {
        sqlx::query(
            "INSERT INTO curve_point (job_id, run, step, lr, loss, smoothed)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (job_id, step) DO NOTHING",
        )
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .bind(point.step)
        .bind(point.lr)
        .bind(point.loss)
        .bind(point.smoothed)
        .execute(&mut *connection)
        .await?;
    }
    for run in &update.sweep_runs {
        sqlx::query(
            "INSERT INTO sweep_run (job_id, run, position, peak_lr, seed, steps, val_loss,
                 val_accuracy, train_loss, diverged)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (job_id, position) DO NOTHING",
        )
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .bind(run.position)
        .bind(run.peak_lr)
        .bind(run.seed)
        .bind(run.steps)
        .bind(run.val_loss)
        .bind(run.val_accuracy)
        .bind(run.train_loss)
        .bind(run.diverged)
        .execute(&mut *connection)
        .await?;
    }
    for point in &update.race_points {
        sqlx::query(
            "INSERT INTO race_point (job_id, run, position, recipe, seed, step, seconds,
                 val_loss, val_accuracy)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (job_id, position) DO NOTHING",
        )
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .bind(point.position)
        .bind(&point.recipe)
        .bind(point.seed)
        .bind(point.step)
        .bind(point.seconds)
        .bind(point.val_loss)
        .bind(point.val_accuracy)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// Whether `adding` bytes more fit under the quota, read in the transaction that will add
/// them.
async fn within_quota(
    connection: &mut SqliteConnection,
    adding: i64,
    max_stored_bytes: i64,
) -> Result<bool, StoreError> {
    let stored: i64 = sqlx::query_scalar(concat!("SELECT ", stored_bytes!()))
        .fetch_one(&mut *connection)
        .await?;
    Ok(stored.saturating_add(adding) <= max_stored_bytes)
}

async fn delete_outputs(connection: &mut SqliteConnection, job_id: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM curve_point WHERE job_id = ?")
        .bind(job_id)
        .execute(&mut *connection)
        .await?;
    sqlx::query("DELETE FROM sweep_run WHERE job_id = ?")
        .bind(job_id)
        .execute(&mut *connection)
        .await?;
    sqlx::query("DELETE FROM race_point WHERE job_id = ?")
        .bind(job_id)
        .execute(&mut *connection)
        .await?;
    Ok(())
}
