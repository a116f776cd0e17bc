//! Builds the whole service from its settings: the store, the workers, the router and a bound
//! listener (port 0 in tests), and runs it until a shutdown signal, then drains it.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::drain::{self, Phase};
use super::{metrics::HttpMetrics, router, ApiSettings, AppState};
use crate::engine::Limits;
use crate::store::Store;
use crate::worker::{EngineRunner, Hub, JobRunner, WorkerPool, WorkerSettings};

/// Everything `lrtune serve` can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: String,
    pub db: PathBuf,
    pub workers: usize,
    pub api_token: Option<String>,
    pub limits: Limits,
    pub max_queued: i64,
    pub max_json_bytes: usize,
    pub max_upload_bytes: usize,
    pub max_dataset_rows: usize,
    pub max_dataset_columns: usize,
    pub max_schedule_steps: usize,
    pub stale_after: Duration,
    pub max_attempts: i64,
    pub grace: Duration,
    /// Dashboard files found here replace the built-in ones (for editing the dashboard
    /// without rebuilding); empty: only the built-in ones.
    pub static_dir: PathBuf,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            addr: "127.0.0.1:8080".into(),
            db: "lrtune.db".into(),
            workers: 1,
            api_token: None,
            limits: Limits::default(),
            max_queued: 100,
            max_json_bytes: 1 << 20,
            max_upload_bytes: 64 << 20,
            max_dataset_rows: 1_000_000,
            max_dataset_columns: 100_000,
            max_schedule_steps: 100_000,
            stale_after: Duration::from_secs(60),
            max_attempts: 3,
            grace: Duration::from_secs(30),
            static_dir: PathBuf::new(),
        }
    }
}

/// After the workers have stopped, how long open connections get to send their last bytes
/// (event streams their final status) before the server closes them: a client that stopped
/// reading must not keep the process alive.
const CLOSE_CONNECTIONS_WITHIN: Duration = Duration::from_secs(5);

pub struct Application {
    listener: TcpListener,
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
        let store = Store::open(&settings.db)
            .await
            .with_context(|| format!("opening the database {}", settings.db.display()))?;
        let listener = TcpListener::bind(&settings.addr)
            .await
            .with_context(|| format!("binding {}", settings.addr))?;
        let address = listener.local_addr()?;
        let hub = Hub::new();
        let workers = WorkerPool::start(
            store.clone(),
            hub.clone(),
            WorkerSettings {
                workers: settings.workers,
                limits: settings.limits.clone(),
                stale_after: settings.stale_after,
                max_attempts: settings.max_attempts,
                flush_every: Duration::from_millis(250),
                poll_every: Duration::from_millis(500),
            },
            runner,
        );
        let (phase, phases) = watch::channel(Phase::Serving);
        let state = AppState {
            store,
            hub,
            settings: Arc::new(ApiSettings {
                limits: settings.limits,
                api_token: settings.api_token.filter(|token| !token.is_empty()),
                max_queued: settings.max_queued,
                max_json_bytes: settings.max_json_bytes,
                max_upload_bytes: settings.max_upload_bytes,
                max_dataset_rows: settings.max_dataset_rows,
                max_dataset_columns: settings.max_dataset_columns,
                max_schedule_steps: settings.max_schedule_steps,
                static_dir: settings.static_dir,
            }),
            metrics: Arc::new(HttpMetrics::default()),
            phase: phases,
        };
        Ok(Application {
            listener,
            address,
            state,
            workers,
            phase,
            grace: settings.grace,
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
        let mut server = tokio::spawn(
            axum::serve(self.listener, app)
                .with_graceful_shutdown(workers_stopped)
                .into_future(),
        );
        shutdown.await;
        tracing::info!("shutting down: new requests get 503 and no new jobs are claimed");
        self.phase.send_replace(Phase::Draining);
        self.workers.shutdown(self.grace).await;
        tracing::info!("workers stopped: closing the open connections");
        self.phase.send_replace(Phase::WorkersStopped);
        match tokio::time::timeout(CLOSE_CONNECTIONS_WITHIN, &mut server).await {
            Ok(served) => served.context("the server task")??,
            Err(_) => {
                tracing::warn!("connections still open after the drain: closing them");
                server.abort();
            }
        }
        Ok(())
    }
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
