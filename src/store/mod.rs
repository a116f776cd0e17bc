//! All SQL of the service, on one of two backends with the same meaning: an embedded SQLite
//! file (the default: nothing to install) or a PostgreSQL database shared by API replicas and
//! workers on many hosts. The URL picks the backend; each has its own migrations, applied at
//! start-up. The statements are written once (`sql.rs`), with the few dialect pieces and what
//! only one backend does in `sqlite.rs` and `postgres.rs`, behind the one [`Store`] the rest
//! of the service uses. Nothing outside this module writes a query.
//!
//! A store also tells its processes what changed ([`Change`]): on PostgreSQL every process
//! hears every other through LISTEN/NOTIFY; on SQLite a process hears its own writes, and
//! other processes on the host are seen by polling.

mod dataset;
mod job;
mod parts;
mod postgres;
// Throwaway PostgreSQL databases for the store suite; the integration tests include the same
// file (tests/support).
#[cfg(test)]
mod scratch;
mod sql;
mod sqlite;
#[cfg(test)]
mod tests;
mod weights;

/// A row with its place in a newest-first list (`seq`), for paging.
pub(crate) struct Listed<R> {
    pub(crate) seq: i64,
    pub(crate) record: R,
}

impl<'r, Row, R> sqlx::FromRow<'r, Row> for Listed<R>
where
    Row: sqlx::Row,
    R: sqlx::FromRow<'r, Row>,
    i64: sqlx::Decode<'r, Row::Database> + sqlx::Type<Row::Database>,
    &'static str: sqlx::ColumnIndex<Row>,
{
    fn from_row(row: &'r Row) -> sqlx::Result<Self> {
        Ok(Listed {
            seq: row.try_get("seq")?,
            record: R::from_row(row)?,
        })
    }
}

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::broadcast;

pub use dataset::{DataFormat, DatasetRow, NewDataset, StoredDataset};
pub use job::{
    can_transition, nan_as_null, Attempt, FinalState, JobError, JobRow, JobStatus, ListFilter,
    NewJob, PointRow, ProgressUpdate, RacePointRow, ReapOutcome, SweepRunRow, TrialRow,
    TrialStatus, TrialUpdate,
};
pub use weights::{NewWeights, StoredWeights, TensorShape, WeightsRow};

use postgres::PgStore;
use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database answered, but cannot serve now (a read-only standby, say).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

/// A TEXT column holding one of an enum's names, read into the enum; any other value is a
/// corrupt row, named by `table.column`.
pub(crate) fn parse_column<T>(
    column: &str,
    text: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, StoreError> {
    parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("{column} {text:?} is not a known value")))
}

impl StoreError {
    /// True when the database, not the request, is the problem and a later try may work:
    /// locked past the busy timeout or unreadable (SQLite), unreachable, shutting down,
    /// out of resources or a read-only standby (PostgreSQL), no pooled connection free in
    /// time. The API answers these with 503 and `Retry-After`; the workers retry them.
    pub fn is_unavailable(&self) -> bool {
        let error = match self {
            StoreError::Sqlx(error) => error,
            StoreError::Unavailable(_) => return true,
            StoreError::Migrate(_) | StoreError::Corrupt(_) => return false,
        };
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
            sqlx::Error::Database(database) => {
                sqlite::is_unavailable(database.as_ref())
                    || postgres::is_unavailable(database.as_ref())
            }
            _ => false,
        }
    }

    /// True when the database's disk is full: a write fails until space is freed, and the
    /// API says so (507) rather than calling the database locked or broken.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlx(sqlx::Error::Database(database)) => {
                sqlite::is_disk_full(database.as_ref()) || postgres::is_disk_full(database.as_ref())
            }
            _ => false,
        }
    }

    /// The database's own words for a database error ("database is locked"), else the
    /// error's text.
    pub fn reason(&self) -> String {
        match self {
            StoreError::Sqlx(sqlx::Error::Database(database)) => database.message().to_string(),
            StoreError::Unavailable(reason) => reason.clone(),
            other => other.to_string(),
        }
    }
}

/// Where the store is: a SQLite file (a path, or a `sqlite:` URL) or a PostgreSQL URL.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    SqlitePath(PathBuf),
    SqliteUrl(String),
    Postgres(String),
}

impl DatabaseUrl {
    /// `lrtune.db` or `sqlite://...` for SQLite, `postgres://...` (or `postgresql://`) for
    /// PostgreSQL; any other scheme is refused.
    pub fn parse(text: &str) -> Result<DatabaseUrl, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the database is empty: give a SQLite file or a postgres:// URL".into());
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(text.to_string()));
        }
        if text.starts_with("sqlite:") {
            return Ok(DatabaseUrl::SqliteUrl(text.to_string()));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "unsupported database URL scheme {scheme:?}: give a SQLite file (lrtune.db or \
                 sqlite://PATH) or postgres://USER@HOST/DATABASE"
            ));
        }
        Ok(DatabaseUrl::SqlitePath(PathBuf::from(text)))
    }

    /// `sqlite` or `postgres`, as `/healthz` names it.
    pub fn backend(&self) -> &'static str {
        match self {
            DatabaseUrl::SqlitePath(_) | DatabaseUrl::SqliteUrl(_) => "sqlite",
            DatabaseUrl::Postgres(_) => "postgres",
        }
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<DatabaseUrl, String> {
        DatabaseUrl::parse(text)
    }
}

/// The URL with its password hidden, fit for logs and error messages.
impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::SqlitePath(path) => write!(f, "{}", path.display()),
            DatabaseUrl::SqliteUrl(url) => f.write_str(url),
            DatabaseUrl::Postgres(url) => f.write_str(&without_password(url)),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

impl From<&Path> for DatabaseUrl {
    fn from(path: &Path) -> DatabaseUrl {
        DatabaseUrl::SqlitePath(path.to_path_buf())
    }
}

impl From<&PathBuf> for DatabaseUrl {
    fn from(path: &PathBuf) -> DatabaseUrl {
        DatabaseUrl::SqlitePath(path.clone())
    }
}

impl From<PathBuf> for DatabaseUrl {
    fn from(path: PathBuf) -> DatabaseUrl {
        DatabaseUrl::SqlitePath(path)
    }
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Every status of `all` with its count from `counted` (the rows of a `GROUP BY status`), 0
/// for a status no row has; a status `parse` does not know is a corrupt row.
fn every_status<S: Copy + PartialEq, const N: usize>(
    all: [S; N],
    counted: Vec<(String, i64)>,
    parse: impl Fn(&str) -> Result<S, StoreError>,
) -> Result<Vec<(S, i64)>, StoreError> {
    let mut counts: Vec<(S, i64)> = all.into_iter().map(|status| (status, 0)).collect();
    for (text, count) in counted {
        let status = parse(&text)?;
        if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == status) {
            slot.1 = count;
        }
    }
    Ok(counts)
}

/// What a delete of an upload (a dataset, weights) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    Deleted,
    NotFound,
    /// Kept: these queued or running jobs (the first ten) name it. Empty when they finished
    /// between the delete and the look that found them.
    InUse(Vec<String>),
}

/// What another process (or this one) changed, for whoever waits on it: idle workers wait
/// for `Queued`, a worker running a job for its `CancelRequested`, event streams for `Job`.
/// `Unknown` says that changes may have been missed (a lost connection, a slow reader):
/// read the state again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Queued,
    Job(String),
    CancelRequested(String),
    Unknown,
}

impl Change {
    /// The change as a NOTIFY payload.
    fn encode(&self) -> String {
        match self {
            Change::Queued => "queued".to_string(),
            Change::Job(id) => format!("job:{id}"),
            Change::CancelRequested(id) => format!("cancel:{id}"),
            Change::Unknown => "unknown".to_string(),
        }
    }

    fn decode(payload: &str) -> Change {
        if payload == "queued" {
            Change::Queued
        } else if let Some(id) = payload.strip_prefix("job:") {
            Change::Job(id.to_string())
        } else if let Some(id) = payload.strip_prefix("cancel:") {
            Change::CancelRequested(id.to_string())
        } else {
            Change::Unknown
        }
    }
}

/// How many changes a slow subscriber may fall behind before it is told `Lagged` (and reads
/// the state again).
const CHANGE_BUFFER: usize = 1024;

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// The job store, cheap to clone (a pool handle and a change feed).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    changes: broadcast::Sender<Change>,
}

/// Calls the same method on whichever backend the store has.
macro_rules! dispatch {
    ($self:ident, $backend:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($backend) => $call,
            Backend::Postgres($backend) => $call,
        }
    };
}

impl Store {
    /// Opens (creating a missing SQLite file) the database and applies its migrations.
    pub async fn open(url: impl Into<DatabaseUrl>) -> Result<Store, StoreError> {
        let url = url.into();
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        let backend = match &url {
            DatabaseUrl::SqlitePath(path) => Backend::Sqlite(SqliteStore::open_path(path).await?),
            DatabaseUrl::SqliteUrl(url) => Backend::Sqlite(SqliteStore::open_url(url).await?),
            DatabaseUrl::Postgres(url) => {
                Backend::Postgres(PgStore::connect(url, changes.clone()).await?)
            }
        };
        Ok(Store { backend, changes })
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Changes as they are announced (see [`Change`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// How often a reader waiting on changes should also look at the database: on SQLite
    /// other processes are only seen this way; on PostgreSQL it covers notifications lost
    /// with a connection.
    pub fn poll_every(&self) -> Duration {
        match self.backend {
            Backend::Sqlite(_) => Duration::from_millis(500),
            Backend::Postgres(_) => Duration::from_secs(2),
        }
    }

    /// Tells this process (SQLite) or every process (PostgreSQL) about a write that has
    /// committed. A lost announcement delays a reader until its next poll; it never loses
    /// data, so it is logged, not returned.
    async fn announce(&self, change: Change) {
        match &self.backend {
            Backend::Sqlite(_) => {
                let _ = self.changes.send(change);
            }
            Backend::Postgres(store) => {
                if let Err(error) = store.notify(&change).await {
                    tracing::warn!(%error, ?change, "announcing a change");
                }
            }
        }
    }

    /// Proves the database can serve requests now. SQLite: a fresh connection reads the job
    /// table from the file and takes the write lock within `lock_wait`. PostgreSQL: the
    /// server answers a read of the job table within `lock_wait` and accepts writes.
    pub async fn check_health(&self, lock_wait: Duration) -> Result<(), StoreError> {
        dispatch!(self, store => store.check_health(lock_wait).await)
    }

    /// Queues a job unless `max_queued` jobs are already waiting (then `None`).
    pub async fn insert_job(
        &self,
        job: NewJob,
        max_queued: i64,
    ) -> Result<Option<JobRow>, StoreError> {
        let row = dispatch!(self, store => store.insert_job(job, max_queued).await)?;
        if row.is_some() {
            self.announce(Change::Queued).await;
        }
        Ok(row)
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        dispatch!(self, store => store.get_job(id).await)
    }

    /// Newest first.
    pub async fn list_jobs(&self, filter: &ListFilter) -> Result<Vec<JobRow>, StoreError> {
        dispatch!(self, store => store.list_jobs(filter).await)
    }

    /// Every status with its number of jobs (0 included).
    pub async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let counted = dispatch!(self, store => store.count_jobs_by_status().await)?;
        every_status(JobStatus::ALL, counted, |status| {
            JobStatus::parse(status)
                .ok_or_else(|| StoreError::Corrupt(format!("job status {status:?}")))
        })
    }

    /// Claims the oldest queued job for `worker` in one statement, with a lease of `lease`
    /// that the worker's heartbeats extend.
    pub async fn claim_job(
        &self,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<JobRow>, StoreError> {
        job::check_transition(JobStatus::Queued, JobStatus::Running)?;
        let row = dispatch!(self, store => store.claim_job(worker, lease).await)?;
        if let Some(row) = &row {
            self.announce(Change::Job(row.id.clone())).await;
        }
        Ok(row)
    }

    /// Progress, new curve points and sweep runs, the heartbeat and a renewed lease in one
    /// short transaction. Returns `None` when the attempt no longer owns the job, else
    /// whether a cancel was requested.
    pub async fn record_progress(
        &self,
        attempt: &Attempt,
        update: &ProgressUpdate,
        lease: Duration,
    ) -> Result<Option<bool>, StoreError> {
        let recorded =
            dispatch!(self, store => store.record_progress(attempt, update, lease).await)?;
        if recorded.is_some() {
            self.announce(Change::Job(attempt.job_id.clone())).await;
        }
        Ok(recorded)
    }

    /// Ends an attempt: the status, the result and the last update's points and sweep runs
    /// in one transaction (a requeue deletes the attempt's outputs instead). Returns false
    /// (and writes nothing) when the attempt no longer owns the job.
    pub async fn finish_attempt(
        &self,
        attempt: &Attempt,
        state: &FinalState,
        last: &ProgressUpdate,
    ) -> Result<bool, StoreError> {
        job::check_transition(JobStatus::Running, state.status())?;
        let finished = dispatch!(self, store => store.finish_attempt(attempt, state, last).await)?;
        if finished {
            self.announce(Change::Job(attempt.job_id.clone())).await;
            if matches!(state, FinalState::Requeue) {
                self.announce(Change::Queued).await;
            }
        }
        Ok(finished)
    }

    /// Cancels a job that has not started. True when it was queued.
    pub async fn cancel_queued(&self, id: &str) -> Result<bool, StoreError> {
        job::check_transition(JobStatus::Queued, JobStatus::Canceled)?;
        let canceled = dispatch!(self, store => store.cancel_queued(id).await)?;
        if canceled {
            self.announce(Change::Job(id.to_string())).await;
        }
        Ok(canceled)
    }

    /// Flags a running job for cancelation; the process running it hears of it at once
    /// (PostgreSQL, or this process), or at its next heartbeat. True when it was running.
    pub async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let requested = dispatch!(self, store => store.request_cancel(id).await)?;
        if requested {
            self.announce(Change::CancelRequested(id.to_string())).await;
            self.announce(Change::Job(id.to_string())).await;
        }
        Ok(requested)
    }

    /// Running jobs whose lease has run out: queued again (their partial outputs deleted in
    /// the same transaction, the attempt counted) or, after `max_attempts` claims, failed
    /// with where the worker was last seen. Each such job is taken by exactly one caller,
    /// whichever process it runs in.
    pub async fn reap_expired(&self, max_attempts: i64) -> Result<ReapOutcome, StoreError> {
        job::check_transition(JobStatus::Running, JobStatus::Failed)?;
        job::check_transition(JobStatus::Running, JobStatus::Queued)?;
        let outcome = dispatch!(self, store => store.reap_expired(max_attempts).await)?;
        for id in outcome.requeued.iter().chain(&outcome.failed) {
            self.announce(Change::Job(id.clone())).await;
        }
        if !outcome.requeued.is_empty() {
            self.announce(Change::Queued).await;
        }
        Ok(outcome)
    }

    /// The curve's points after `after_step` (all of them for `None`), in step order.
    pub async fn curve(
        &self,
        job_id: &str,
        after_step: Option<i64>,
    ) -> Result<Vec<PointRow>, StoreError> {
        dispatch!(self, store => store.curve(job_id, after_step.unwrap_or(-1)).await)
    }

    /// The sweep's runs from `position` on, in the order they finished.
    pub async fn sweep_runs(
        &self,
        job_id: &str,
        from_position: i64,
    ) -> Result<Vec<SweepRunRow>, StoreError> {
        dispatch!(self, store => store.sweep_runs(job_id, from_position).await)
    }

    /// A job's trials, in the order they started.
    pub async fn trials(&self, job_id: &str) -> Result<Vec<TrialRow>, StoreError> {
        dispatch!(self, store => store.trials(job_id).await)
    }

    /// How many trials of all jobs are in each status (every status listed, zeros included).
    pub async fn count_trials_by_status(&self) -> Result<Vec<(TrialStatus, i64)>, StoreError> {
        let counted = dispatch!(self, store => store.count_trials_by_status().await)?;
        every_status(TrialStatus::ALL, counted, |text| {
            parse_column("trial.status", text, TrialStatus::parse)
        })
    }

    /// A compare job's race points from `position` on, in the order they were measured.
    pub async fn race_points(
        &self,
        job_id: &str,
        from_position: i64,
    ) -> Result<Vec<RacePointRow>, StoreError> {
        dispatch!(self, store => store.race_points(job_id, from_position).await)
    }

    /// Stores a dataset unless the stored datasets and weights would then hold more than
    /// `max_stored_bytes` (then `None`); concurrent uploads cannot overshoot it together.
    pub async fn insert_dataset(
        &self,
        dataset: NewDataset,
        max_stored_bytes: i64,
    ) -> Result<Option<DatasetRow>, StoreError> {
        dispatch!(self, store => store.insert_dataset(dataset, max_stored_bytes).await)
    }

    /// Deletes a dataset no queued or running job names.
    pub async fn delete_dataset(&self, id: &str) -> Result<Deletion, StoreError> {
        dispatch!(self, store => store.delete_dataset(id).await)
    }

    /// The bytes of every stored dataset and weights file: what `--max-stored-bytes` bounds.
    pub async fn stored_bytes(&self) -> Result<i64, StoreError> {
        dispatch!(self, store => store.stored_bytes().await)
    }

    pub async fn get_dataset(&self, id: &str) -> Result<Option<DatasetRow>, StoreError> {
        dispatch!(self, store => store.get_dataset(id).await)
    }

    pub async fn load_dataset(&self, id: &str) -> Result<Option<StoredDataset>, StoreError> {
        dispatch!(self, store => store.load_dataset(id).await)
    }

    /// Newest first, with each one's place in the list (the paging cursor).
    pub async fn list_datasets(
        &self,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<(i64, DatasetRow)>, StoreError> {
        dispatch!(self, store => store.list_datasets(limit, before).await)
    }

    /// Stores weights within `max_stored_bytes`, as `insert_dataset`.
    pub async fn insert_weights(
        &self,
        weights: NewWeights,
        max_stored_bytes: i64,
    ) -> Result<Option<WeightsRow>, StoreError> {
        dispatch!(self, store => store.insert_weights(weights, max_stored_bytes).await)
    }

    /// Deletes weights no queued or running job starts from.
    pub async fn delete_weights(&self, id: &str) -> Result<Deletion, StoreError> {
        dispatch!(self, store => store.delete_weights(id).await)
    }

    pub async fn get_weights(&self, id: &str) -> Result<Option<WeightsRow>, StoreError> {
        dispatch!(self, store => store.get_weights(id).await)
    }

    pub async fn load_weights(&self, id: &str) -> Result<Option<StoredWeights>, StoreError> {
        dispatch!(self, store => store.load_weights(id).await)
    }

    /// Newest first, with each one's place in the list (the paging cursor).
    pub async fn list_weights(
        &self,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<(i64, WeightsRow)>, StoreError> {
        dispatch!(self, store => store.list_weights(limit, before).await)
    }

    /// Closes the pool (and PostgreSQL's listening connection).
    pub async fn close(&self) {
        dispatch!(self, store => store.close().await)
    }
}

/// A random id with a readable prefix (`job_3f9a...`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}
