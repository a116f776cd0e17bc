//! `spawn_app()`: the whole service on a free port with its own database, and a typed client.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use lrtune::config::{ApiConfig, QueueConfig};
use lrtune::engine::{EngineError, Event, Limits, LoadedData, ValidSpec};
use lrtune::http::startup::{Application, Settings};
use lrtune::worker::{EngineRunner, JobRunner, RunOutput};
use reqwest::{Response, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;

pub use crate::support::fixtures::{named, tiny_spec};
pub use crate::support::sse::read_events;

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
    pub db_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Quiet unless TEST_LOG is set.
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                .with_test_writer()
                .try_init();
        }
    });
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}, Arc::new(EngineRunner)).await
}

pub async fn spawn_app_configured(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(configure, Arc::new(EngineRunner)).await
}

pub async fn spawn_app_with(
    configure: impl FnOnce(&mut Settings),
    runner: Arc<dyn JobRunner>,
) -> TestApp {
    init_logging();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db_path = dir.path().join("lrtune.db");
    let mut settings = Settings {
        db: db_path.clone().into(),
        api: ApiConfig {
            addr: "127.0.0.1:0".into(),
            static_dir: Some(dir.path().join("static")),
            ..ApiConfig::default()
        },
        queue: QueueConfig {
            stale_after: Duration::from_secs(2),
            grace: Duration::from_secs(2),
            ..QueueConfig::default()
        },
        ..Settings::default()
    };
    configure(&mut settings);
    let token = settings.api.api_token.clone();
    let app = Application::build_with_runner(settings, runner)
        .await
        .expect("the application builds");
    let address = format!("http://{}", app.address());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        token,
        db_path,
        stop: Some(stop),
        server: Some(server),
        _dir: dir,
    }
}

impl TestApp {
    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.authorize(self.client.get(format!("{}{path}", self.address)))
            .send()
            .await
            .expect("the request is sent")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.authorize(self.client.post(format!("{}{path}", self.address)))
            .json(body)
            .send()
            .await
            .expect("the request is sent")
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Response {
        self.authorize(self.client.post(format!("{}{path}", self.address)))
            .body(body)
            .send()
            .await
            .expect("the request is sent")
    }

    pub async fn post_multipart(&self, path: &str, form: reqwest::multipart::Form) -> Response {
        self.authorize(self.client.post(format!("{}{path}", self.address)))
            .multipart(form)
            .send()
            .await
            .expect("the request is sent")
    }

    /// Submits a spec and returns the job id (asserting 202).
    pub async fn submit(&self, spec: &Value) -> String {
        let response = self.post_json("/v1/jobs", spec).await;
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["id"].as_str().expect("a job id").to_string()
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, body) = json_of(self.get(&format!("/v1/jobs/{id}")).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Polls until the job has one of `statuses`, at most `timeout`.
    pub async fn wait_for(&self, id: &str, statuses: &[&str], timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let job = self.job(id).await;
            if statuses.contains(&job["status"].as_str().unwrap_or_default()) {
                return job;
            }
            assert!(
                started.elapsed() < timeout,
                "job {id} is still {} after {timeout:?}: {job}",
                job["status"]
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_until_finished(&self, id: &str) -> Value {
        self.wait_for(
            id,
            &["succeeded", "failed", "canceled"],
            Duration::from_secs(60),
        )
        .await
    }

    /// Starts the shutdown SIGTERM starts, without waiting for it (see `stop`).
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Polls `/healthz` until the server says it is shutting down (after `signal_stop`).
    pub async fn wait_until_draining(&self) {
        let started = Instant::now();
        loop {
            let (status, body) = json_of(self.get("/healthz").await).await;
            if body["status"] == "shutting_down" {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "not draining: {body}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Shuts the server down the way SIGTERM does and waits for it.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.signal_stop();
        match self.server.take() {
            Some(server) => server.await?,
            None => Ok(()),
        }
    }
}

pub async fn json_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// Asserts the API's error shape and returns the error object.
pub fn assert_error(body: &Value, code: &str) -> Value {
    let error = body["error"].clone();
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    error
}

/// An app whose jobs wait for the returned flag before they run (so a test can subscribe
/// first).
pub async fn spawn_gated_app() -> (TestApp, Arc<AtomicBool>) {
    let release = Arc::new(AtomicBool::new(false));
    let runner = Arc::new(GatedRunner {
        release: release.clone(),
    });
    (spawn_app_with(|_| {}, runner).await, release)
}

/// Runs the engine only once `release` is raised (so a test can subscribe first).
pub struct GatedRunner {
    pub release: Arc<AtomicBool>,
}

impl JobRunner for GatedRunner {
    fn run(
        &self,
        spec: &ValidSpec,
        loaded: LoadedData,
        limits: &Limits,
        cancel: &AtomicBool,
        observer: &mut dyn FnMut(Event),
    ) -> Result<RunOutput, EngineError> {
        let started = Instant::now();
        while !self.release.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        EngineRunner.run(spec, loaded, limits, cancel, observer)
    }
}

/// A job named "endless" steps until canceled; "boom" panics; "stall" hangs without checking
/// its cancel flag; others run the engine.
pub struct FaultyRunner;

impl JobRunner for FaultyRunner {
    fn run(
        &self,
        spec: &ValidSpec,
        loaded: LoadedData,
        limits: &Limits,
        cancel: &AtomicBool,
        observer: &mut dyn FnMut(Event),
    ) -> Result<RunOutput, EngineError> {
        match spec.name.as_deref() {
            Some("boom") => panic!("injected failure in job boom"),
            Some("endless") => {
                let started = Instant::now();
                let mut done = 0;
                while started.elapsed() < Duration::from_secs(60) {
                    if cancel.load(Ordering::SeqCst) {
                        return Err(EngineError::Canceled);
                    }
                    done += 1;
                    observer(Event::Progress {
                        done,
                        total: 1_000_000,
                    });
                    std::thread::sleep(Duration::from_millis(2));
                }
                panic!("the endless job was never canceled");
            }
            // Reports a step, then hangs in a computation that never checks its cancel flag.
            Some("stall") => {
                observer(Event::Stage("range_test"));
                observer(Event::Progress {
                    done: 3,
                    total: 100,
                });
                std::thread::sleep(Duration::from_secs(20));
                Err(EngineError::Canceled)
            }
            _ => EngineRunner.run(spec, loaded, limits, cancel, observer),
        }
    }
}

/// The engine, counting the curve points it reports and taking a millisecond over each event
/// (a job long enough to hold the database away from).
pub struct CountingRunner {
    pub points: Arc<std::sync::atomic::AtomicUsize>,
}

impl JobRunner for CountingRunner {
    fn run(
        &self,
        spec: &ValidSpec,
        loaded: LoadedData,
        limits: &Limits,
        cancel: &AtomicBool,
        observer: &mut dyn FnMut(Event),
    ) -> Result<RunOutput, EngineError> {
        let mut counting = |event: Event| {
            if matches!(event, Event::Point(_)) {
                self.points.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(1));
            observer(event);
        };
        EngineRunner.run(spec, loaded, limits, cancel, &mut counting)
    }
}

/// Another process's hold on the database: a connection of its own that has taken the write
/// lock (`BEGIN IMMEDIATE`) and keeps it until `release`. SQLite's locks work between
/// connections of one process as between processes.
pub struct ForeignWriteLock {
    connection: sqlx::SqliteConnection,
}

impl ForeignWriteLock {
    pub async fn take(db: &Path) -> ForeignWriteLock {
        use sqlx::ConnectOptions;
        let mut connection = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .busy_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("a second connection to the database");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut connection)
            .await
            .expect("the write lock");
        ForeignWriteLock { connection }
    }

    pub async fn release(mut self) {
        use sqlx::Connection;
        sqlx::query("ROLLBACK")
            .execute(&mut self.connection)
            .await
            .expect("the lock is released");
        self.connection
            .close()
            .await
            .expect("the connection closes");
    }
}
