//! The PostgreSQL backend: one database shared by API replicas and workers on many hosts,
//! migrations from `migrations/postgres`. A claim locks the oldest queued row with
//! `FOR UPDATE SKIP LOCKED`, so concurrent workers never wait on each other nor take the
//! same job; a lease that has run out is taken back by exactly one process, because the
//! guarded `UPDATE` re-reads a row another transaction changed. Changes are announced with
//! NOTIFY on one channel and heard by one LISTEN connection per process. The statements
//! are shared with SQLite (`sql.rs`); this file holds what is PostgreSQL's own.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use sqlx::error::DatabaseError;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgDatabaseError, PgListener, PgPoolOptions, Postgres,
};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::sql::{Backend, SqlStore};
use super::{Attempt, Change, ProgressUpdate, StoreError};

/// The NOTIFY channel every process listens on.
const CHANNEL: &str = "lrtune";

/// How long a request waits for a free pooled connection (or a new one to the server).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

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
    core: SqlStore<Postgres>,
    _listening: Arc<ListenTask>,
}

/// The shared statements run on this store's pool.
impl Deref for PgStore {
    type Target = SqlStore<Postgres>;

    fn deref(&self) -> &SqlStore<Postgres> {
        &self.core
    }
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
            core: SqlStore::new(pool, None),
            _listening: Arc::new(ListenTask(task)),
        })
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
}

impl Backend for Postgres {
    const NOW: &'static str = "now()";
    const BEGIN: &'static str = "BEGIN";
    const SKIP_LOCKED: &'static str = "FOR UPDATE SKIP LOCKED";
    // Where the worker was last seen, as on SQLite; SET reads the row as it was, so the
    // lease's length is there to quote while the lease itself is cleared.
    const FAIL_EXPIRED: &'static str = "UPDATE job SET status = 'failed', finished_at = now(),
         lease_until = NULL, error = json_build_object('code', 'worker_lost', 'message', format(
             'the worker died while running this job (attempts: %s; last seen %s; no heartbeat for %s s); it may have been killed for running out of memory: giving up',
             attempts,
             CASE WHEN stage IS NULL THEN 'loading the data'
                  ELSE format('in stage %s at step %s of %s', stage, progress_done, progress_total) END,
             to_char(extract(epoch FROM lease_until - heartbeat_at), 'FM999999990.0')))::text
         WHERE status = 'running' AND attempts >= $1 AND lease_until < now()
         RETURNING id";

    fn lease_end(param: &str) -> String {
        format!("now() + make_interval(secs => {param})")
    }

    /// `iso_time` is in the first migration.
    fn time_column(column: &str) -> String {
        format!("iso_time({column}) AS {column}")
    }

    fn spec_field(path: &str) -> String {
        format!("spec::jsonb #>> '{{{}}}'", path.replace('.', ","))
    }

    async fn take_turns(connection: &mut PgConnection, lock: i64) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock)
            .execute(connection)
            .await?;
        Ok(())
    }

    async fn insert_outputs(
        connection: &mut PgConnection,
        attempt: &Attempt,
        update: &ProgressUpdate,
    ) -> Result<(), StoreError> {
        insert_outputs(connection, attempt, update).await
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
    connection: &mut PgConnection,
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
        .execute(&mut *connection)
        .await?;
    }
    if !update.sweep_runs.is_empty() {
        let runs = &update.sweep_runs;
        sqlx::query(
            "INSERT INTO sweep_run (job_id, run, position, peak_lr, seed, steps, val_loss,
                 val_accuracy, train_loss, diverged, spiked)
             SELECT $1, $2, position, peak_lr, seed, steps, val_loss, val_accuracy,
                 train_loss, diverged, spiked
             FROM UNNEST($3::bigint[], $4::float8[], $5::bigint[], $6::bigint[],
                 $7::float8[], $8::float8[], $9::float8[], $10::boolean[], $11::boolean[])
                 AS run (position, peak_lr, seed, steps, val_loss, val_accuracy, train_loss,
                         diverged, spiked)
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
        .bind(runs.iter().map(|r| r.spiked).collect::<Vec<_>>())
        .execute(&mut *connection)
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
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}
