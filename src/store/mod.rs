//! All SQL of the service: the SQLite pool (WAL, busy timeout, migrations applied at start-up),
//! jobs with their guarded state changes, curves, sweep runs and uploaded datasets, and the
//! health check. Nothing outside this module writes a query.

mod dataset;
mod job;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, SqlitePool};

pub use dataset::{DatasetRow, NewDataset, StoredDataset};
pub use job::{
    can_transition, Attempt, FinalState, JobError, JobRow, JobStatus, ListFilter, NewJob, PointRow,
    ProgressUpdate, ReapOutcome, SweepRunRow,
};

/// The current time as SQLite writes it: UTC ISO 8601 with milliseconds. A macro so that
/// queries stay `&'static str` literals (`concat!`), never strings built at run time.
macro_rules! now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
}
pub(crate) use now;

/// How long a statement waits for another connection's write lock before it fails with
/// "database is locked". Our own writes hold the lock for milliseconds; waiting longer only
/// makes a request hang while another process holds it, so the API answers 503 instead and
/// the workers retry.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a request waits for a free pooled connection (all of them waiting on a lock).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

// SQLite's primary result codes (the low byte of an extended code).
// https://www.sqlite.org/rescode.html
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_NOTADB: i32 = 26;

impl StoreError {
    /// True when the database, not the request, is the problem and a later try may work:
    /// locked by another process past the busy timeout, no pooled connection free in time,
    /// the pool closed, the file unreadable, unwritable, full or damaged. The API answers
    /// these with 503 and `Retry-After`; the workers retry them.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Sqlx(error) = self else {
            return false;
        };
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
            sqlx::Error::Database(database) => database
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| {
                    matches!(
                        code & 0xff,
                        SQLITE_BUSY
                            | SQLITE_LOCKED
                            | SQLITE_IOERR
                            | SQLITE_CORRUPT
                            | SQLITE_FULL
                            | SQLITE_CANTOPEN
                            | SQLITE_NOTADB
                    )
                }),
            _ => false,
        }
    }

    /// SQLite's own words for a database error ("database is locked"), else the error's text.
    pub fn reason(&self) -> String {
        match self {
            StoreError::Sqlx(sqlx::Error::Database(database)) => database.message().to_string(),
            other => other.to_string(),
        }
    }
}

/// The job store, cheap to clone (a pool handle).
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating it when missing) the SQLite file and applies the migrations.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        Self::connect(options).await
    }

    /// Opens a database from a URL (`sqlite://...`), for tools and tests.
    pub async fn open_url(url: &str) -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        Self::connect(options).await
    }

    async fn connect(options: SqliteConnectOptions) -> Result<Store, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Proves the database can serve requests now: a fresh connection (an empty page cache,
    /// so pages come from the file, not from memory) reads the job table and takes the write
    /// lock, waiting at most `lock_wait` for it. `SELECT 1` proves none of this: it succeeds
    /// on a locked and on a damaged file.
    pub async fn check_health(&self, lock_wait: Duration) -> Result<(), StoreError> {
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
        Ok(checked?)
    }
}

/// A random id with a readable prefix (`job_3f9a...`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}
