//! The SQLite backend: one file in WAL mode with a busy timeout, migrations from
//! `migrations/sqlite`. Times are UTC ISO 8601 text with milliseconds, written by SQLite
//! itself, so that string order is time order and an expired lease is one comparison.
//! SQLite serialises writers (every write transaction takes the write lock at once), so a
//! claim is a plain `UPDATE ... RETURNING` and a count before an insert needs no other lock.
//! The statements themselves are shared with PostgreSQL (`sql.rs`); this file holds what is
//! SQLite's own: opening the file, the health check, the checks that the file is still the
//! one opened, and the dialect pieces.

use std::ops::Deref;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::error::DatabaseError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteError, SqliteJournalMode, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Sqlite};

use super::sql::{Backend, SqlStore};
use super::{Attempt, ProgressUpdate, StoreError};

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

#[derive(Clone)]
pub(super) struct SqliteStore {
    core: SqlStore<Sqlite>,
    /// The database file as it was opened (none in memory).
    file: Option<Arc<DatabaseFile>>,
}

/// The shared statements run on this store's pool.
impl Deref for SqliteStore {
    type Target = SqlStore<Sqlite>;

    fn deref(&self) -> &SqlStore<Sqlite> {
        &self.core
    }
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
        let commit_check = file
            .clone()
            .map(|file| -> super::sql::CommitCheck { Arc::new(move || file.check()) });
        Ok(SqliteStore {
            core: SqlStore::new(pool, commit_check),
            file,
        })
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
}

impl Backend for Sqlite {
    const NOW: &'static str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const SKIP_LOCKED: &'static str = "";
    // The message is built per job from its last heartbeat, so it says where the worker was
    // when it died (a process killed for memory leaves no other trace); the lease's length is
    // the time it was given to send the next one.
    const FAIL_EXPIRED: &'static str = "UPDATE job SET status = 'failed', finished_at = {{now}},
         lease_until = NULL, error = json_object('code', 'worker_lost', 'message', printf(
             'the worker died while running this job (attempts: %d; last seen %s; no heartbeat for %.1f s); it may have been killed for running out of memory: giving up',
             attempts,
             CASE WHEN stage IS NULL THEN 'loading the data'
                  ELSE printf('in stage %s at step %d of %d', stage, progress_done, progress_total) END,
             (julianday(lease_until) - julianday(heartbeat_at)) * 86400.0))
         WHERE status = 'running' AND attempts >= $1 AND lease_until < {{now}}
         RETURNING id";

    fn lease_end(param: &str) -> String {
        format!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('+%.3f seconds', {param}))")
    }

    fn time_column(column: &str) -> String {
        column.to_string()
    }

    fn spec_field(path: &str) -> String {
        format!("json_extract(spec, '$.{path}')")
    }

    async fn take_turns(_: &mut SqliteConnection, _: i64) -> Result<(), StoreError> {
        Ok(())
    }

    async fn insert_outputs(
        connection: &mut SqliteConnection,
        attempt: &Attempt,
        update: &ProgressUpdate,
    ) -> Result<(), StoreError> {
        insert_outputs(connection, attempt, update).await
    }
}

/// The update's points, sweep runs and race points, a statement each (SQLite is in-process:
/// a statement costs microseconds).
async fn insert_outputs(
    connection: &mut SqliteConnection,
    attempt: &Attempt,
    update: &ProgressUpdate,
) -> Result<(), StoreError> {
    for point in &update.points {
        sqlx::query(
            "INSERT INTO curve_point (job_id, run, step, lr, loss, smoothed)
             VALUES ($1, $2, $3, $4, $5, $6)
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
                 val_accuracy, train_loss, diverged, spiked)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
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
        .bind(run.spiked)
        .execute(&mut *connection)
        .await?;
    }
    for point in &update.race_points {
        sqlx::query(
            "INSERT INTO race_point (job_id, run, position, recipe, seed, step, seconds,
                 val_loss, val_accuracy)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
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
