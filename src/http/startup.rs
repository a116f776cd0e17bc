//! Builds a process of the service from its settings: `lrtune serve` (the store, the
//! workers, the router and a bound listener, port 0 in tests) and `lrtune worker` (the store
//! and the workers, with an optional metrics listener), each run until a shutdown signal and
//! then drained.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::connections::{self, ConnectionLimits};
use super::drain::{self, Phase};
use super::{health, router, AppState};
use crate::config::{ApiConfig, ConnectionConfig, QueueConfig};
use crate::engine::Limits;
use crate::store::{DatabaseUrl, Store};
use crate::telemetry::Telemetry;
use crate::worker::{worker_name, EngineRunner, JobRunner, WorkerPool, WorkerSettings};

/// Everything `lrtune serve` can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    pub db: DatabaseUrl,
    pub api: ApiConfig,
    pub queue: QueueConfig,
    pub limits: Limits,
    /// Jobs run at the same time in this process; 0 for an API replica that runs none.
    pub workers: usize,
    /// Threads of the compute pool the jobs train on (none: one per core).
    pub threads: Option<usize>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            db: DatabaseUrl::SqlitePath("lrtune.db".into()),
            api: ApiConfig::default(),
            queue: QueueConfig::default(),
            limits: Limits::default(),
            workers: 1,
            threads: None,
        }
    }
}

/// How long the runtime waits, as the process exits, for tasks still running (uploads being
/// parsed on blocking threads): the drain has already waited what it should.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(200);

/// The shortest drain: with a grace period under this, jobs are stopped at once, and this long
/// is still given to queue them again and close the connections.
const MIN_DRAIN: Duration = Duration::from_secs(1);

/// The last part of the drain, after the workers have stopped: open connections get it to
/// send their last bytes (event streams their final status), then the store is closed. A
/// client that stopped reading, or a database that does not answer, does not keep the process
/// alive past the deadline.
const CLOSE_RESERVE: Duration = Duration::from_millis(500);

/// When a drain started now must have ended: the grace period (at least [`MIN_DRAIN`]).
fn drain_deadline(grace: Duration) -> Instant {
    Instant::now() + grace.max(MIN_DRAIN)
}

/// Waits for the server task until shortly before `deadline`, then closes the store, waiting
/// at most what is left.
async fn close_by(
    deadline: Instant,
    server: Option<&mut tokio::task::JoinHandle<()>>,
    store: &Store,
) -> anyhow::Result<()> {
    if let Some(server) = server {
        let until = deadline.checked_sub(CLOSE_RESERVE / 2).unwrap_or(deadline);
        match tokio::time::timeout_at(until.into(), &mut *server).await {
            Ok(served) => served.context("the server task")?,
            Err(_) => {
                tracing::warn!("connections still open after the drain: closing them");
                server.abort();
            }
        }
    }
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(50));
    if tokio::time::timeout(left, store.close()).await.is_err() {
        tracing::warn!("the database's connections did not close in time: exiting without them");
    }
    Ok(())
}

async fn open_store(db: &DatabaseUrl) -> anyhow::Result<Store> {
    Store::open(db.clone())
        .await
        .with_context(|| format!("opening the database {db}"))
}

/// The file limit raised to its hard maximum, and the connections allowed below it.
fn connection_limits(config: &ConnectionConfig) -> ConnectionLimits {
    let file_limit = connections::raise_file_limit();
    let configured = usize::try_from(config.max_connections).unwrap_or(usize::MAX);
    let max_connections = connections::connection_cap(configured, file_limit);
    if max_connections < configured {
        tracing::info!(
            max_connections,
            file_limit,
            "connections capped below the file limit"
        );
    }
    ConnectionLimits {
        header_read_timeout: config.header_read_timeout,
        max_connections,
    }
}

pub struct Application {
    listener: TcpListener,
    connections: ConnectionLimits,
    address: SocketAddr,
    state: AppState,
    workers: WorkerPool,
    phase: watch::Sender<Phase>,
    grace: Duration,
}

impl Application {
    /// Opens the database (migrating it), starts the workers and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        Self::build_with_runner(settings, Arc::new(EngineRunner)).await
    }

    /// Like `build`, with the job runner given (tests inject failures this way).
    pub async fn build_with_runner(
        settings: Settings,
        runner: Arc<dyn JobRunner>,
    ) -> anyhow::Result<Application> {
        if settings.api.metrics_token_required
            && settings
                .api
                .api_token
                .as_deref()
                .unwrap_or_default()
                .is_empty()
        {
            anyhow::bail!("--metrics-token-required needs a token: set --api-token");
        }
        let connections = connection_limits(&settings.api.connections);
        let store = open_store(&settings.db).await?;
        let listener = TcpListener::bind(&settings.api.addr)
            .await
            .with_context(|| format!("binding {}", settings.api.addr))?;
        let address = listener.local_addr()?;
        let telemetry = Telemetry::new();
        let grace = settings.queue.grace;
        let workers = WorkerPool::start(
            store.clone(),
            WorkerSettings {
                threads: settings.threads,
                ..WorkerSettings::new(
                    settings.workers,
                    worker_name(None),
                    settings.queue,
                    settings.limits.clone(),
                )
            },
            runner,
            telemetry.clone(),
        );
        let (phase, phases) = watch::channel(Phase::Serving);
        let mut api = settings.api;
        api.api_token = api.api_token.filter(|token| !token.is_empty());
        let uploads = Arc::new(tokio::sync::Semaphore::new(
            api.max_concurrent_uploads as usize,
        ));
        let state = AppState {
            store,
            uploads,
            settings: Arc::new(api),
            limits: Arc::new(settings.limits),
            telemetry,
            phase: phases,
        };
        Ok(Application {
            listener,
            connections,
            address,
            state,
            workers,
            phase,
            grace,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    pub fn store(&self) -> Store {
        self.state.store.clone()
    }

    /// Serves until `shutdown` resolves, then drains: the listener stays open but new
    /// requests get 503, no job is claimed, running jobs get the grace period to finish (the
    /// rest are queued again), event streams follow their job to that end; then it closes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = router(self.state.clone());
        let workers_stopped = drain::reached(self.state.phase.clone(), Phase::WorkersStopped);
        let mut server = tokio::spawn(connections::serve(
            self.listener,
            app,
            self.connections,
            workers_stopped,
        ));
        shutdown.await;
        tracing::info!("shutting down: new requests get 503 and no new jobs are claimed");
        let deadline = drain_deadline(self.grace);
        self.phase.send_replace(Phase::Draining);
        self.workers.shutdown(deadline, CLOSE_RESERVE).await;
        tracing::info!("workers stopped: closing the open connections");
        self.phase.send_replace(Phase::WorkersStopped);
        close_by(deadline, Some(&mut server), &self.state.store).await
    }
}

/// Everything `lrtune worker` can be told.
#[derive(Debug, Clone)]
pub struct WorkerProcessSettings {
    pub db: DatabaseUrl,
    pub queue: QueueConfig,
    pub limits: Limits,
    pub workers: usize,
    /// `NAME@HOST` as jobs show it.
    pub name: String,
    /// Where to serve `/metrics` and `/healthz`; none by default.
    pub metrics_addr: Option<String>,
    /// Threads of the compute pool the jobs train on (none: one per core).
    pub threads: Option<usize>,
}

/// A worker process: claims and runs jobs from the shared database, no API.
pub struct WorkerProcess {
    store: Store,
    telemetry: Arc<Telemetry>,
    workers: WorkerPool,
    metrics: Option<(TcpListener, SocketAddr)>,
    grace: Duration,
}

#[derive(Clone)]
struct MetricsState {
    store: Store,
    telemetry: Arc<Telemetry>,
}

impl WorkerProcess {
    pub async fn build(settings: WorkerProcessSettings) -> anyhow::Result<WorkerProcess> {
        Self::build_with_runner(settings, Arc::new(EngineRunner)).await
    }

    pub async fn build_with_runner(
        settings: WorkerProcessSettings,
        runner: Arc<dyn JobRunner>,
    ) -> anyhow::Result<WorkerProcess> {
        let store = open_store(&settings.db).await?;
        let metrics = match &settings.metrics_addr {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let address = listener.local_addr()?;
                Some((listener, address))
            }
            None => None,
        };
        let telemetry = Telemetry::new();
        let grace = settings.queue.grace;
        let workers = WorkerPool::start(
            store.clone(),
            WorkerSettings {
                threads: settings.threads,
                ..WorkerSettings::new(
                    settings.workers,
                    settings.name,
                    settings.queue,
                    settings.limits,
                )
            },
            runner,
            telemetry.clone(),
        );
        Ok(WorkerProcess {
            store,
            telemetry,
            workers,
            metrics,
            grace,
        })
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, address)| *address)
    }

    /// Runs jobs until `shutdown` resolves, then drains as `serve` does: no new claim,
    /// running jobs get the grace period, the rest go back to the queue.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stopped, stop) = watch::channel(false);
        let server = self.metrics.map(|(listener, _)| {
            let app = Router::new()
                .route("/metrics", get(worker_metrics))
                .route("/healthz", get(worker_health))
                .with_state(MetricsState {
                    store: self.store.clone(),
                    telemetry: self.telemetry.clone(),
                });
            let mut stop = stop.clone();
            tokio::spawn(connections::serve(
                listener,
                app,
                connection_limits(&ConnectionConfig::default()),
                async move {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                },
            ))
        });
        shutdown.await;
        tracing::info!("shutting down: no new jobs are claimed");
        let deadline = drain_deadline(self.grace);
        self.workers.shutdown(deadline, CLOSE_RESERVE).await;
        let _ = stopped.send(true);
        let mut server = server;
        close_by(deadline, server.as_mut(), &self.store).await
    }
}

async fn worker_metrics(State(state): State<MetricsState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match health::render_metrics(&state.store, &state.telemetry).await {
        Ok(metrics) => metrics.into_response(),
        Err(error) => error.into_response(),
    }
}

async fn worker_health(State(state): State<MetricsState>) -> impl axum::response::IntoResponse {
    health::check(&state.store).await
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
