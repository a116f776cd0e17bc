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
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;

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

/// A job that runs in well under a second.
pub fn tiny_spec() -> Value {
    json!({
        "data": {"builtin": "spirals", "samples": 512},
        "model": {"arch": "mlp", "hidden": [16]},
        "batch_size": 32,
        "plan": {"epochs": 2},
        "range_test": {"steps": 30},
        "sweep": {"count": 2, "epochs": 1}
    })
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

/// Reads server-sent events until the stream ends (or `timeout`): (event, data) pairs.
pub async fn read_events(response: Response, timeout: Duration) -> Vec<(String, Value)> {
    use futures_util::StreamExt;
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    let deadline = tokio::time::Instant::now() + timeout;
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, stream.next()).await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.expect("a chunk")));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim().to_string();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim());
                }
            }
            if !name.is_empty() {
                events.push((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
            }
        }
    }
    events
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

pub fn named(name: &str) -> Value {
    let mut spec = tiny_spec();
    spec["name"] = json!(name);
    spec
}

/// The real `lrtune serve` binary on a free loopback port with a fresh SQLite file, under the
/// resource limits given as `prlimit` options (`--nofile=256`); killed when dropped.
pub struct ServerProcess {
    child: std::process::Child,
    pub address: String,
    dir: TempDir,
}

impl ServerProcess {
    pub fn start(limits: &[&str], args: &[&str]) -> ServerProcess {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut command = if limits.is_empty() {
            Command::new(env!("CARGO_BIN_EXE_lrtune"))
        } else {
            let mut command = Command::new("prlimit");
            command
                .args(limits)
                .arg("--")
                .arg(env!("CARGO_BIN_EXE_lrtune"));
            command
        };
        let mut child = command
            .args(["serve", "--addr", "127.0.0.1:0", "--workers", "0"])
            .args(args)
            .arg("--db")
            .arg(dir.path().join("lrtune.db"))
            .env_remove("LRTUNE_API_TOKEN")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("server.log")).expect("a log file"))
            .spawn()
            .expect("lrtune serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints its address");
        let address = line
            .trim()
            .strip_prefix("lrtune listening on http://")
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(dir.path().join("server.log"));
                panic!(
                    "unexpected first line {line:?}; log:\n{}",
                    log.unwrap_or_default()
                )
            })
            .to_string();
        ServerProcess {
            child,
            address,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A line of the process's /proc status (`VmHWM`, `VmRSS`), in kB.
    pub fn status_kb(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server is alive");
        status
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {status}"))
    }

    /// What the server wrote to its standard error.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Whether the process is still running (it has not aborted).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("the child's status").is_none()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
