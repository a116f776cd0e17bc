//! `lrtune-dev bench-api`: the API's latency under load, the figure behind "the API stays responsive
//! while jobs train". Starts `lrtune serve` as a child on a loopback port and sends a mix of
//! reads and `/v1/analyze` calls at a fixed rate over many keep-alive connections, first with no
//! job and then with a tune job training. Exit 0 when both phases' p99 is under `--max-p99-ms`
//! and every response was 2xx, 1 when not, 2 on an error.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Outcome;

/// Run to the end before the idle phase, so that `GET /v1/jobs/{id}` and the list show a
/// finished job with its result (well under a second).
const SMALL_JOB: &str = r#"{"name": "bench-api-small",
    "data": {"builtin": "spirals", "samples": 512}, "model": {"arch": "mlp", "hidden": [16]},
    "batch_size": 32, "plan": {"epochs": 2}, "range_test": {"steps": 30},
    "sweep": {"count": 2, "epochs": 1}}"#;
/// The training phase's job: a CNN on mnist10k keeps both cores busy (its matrix products use
/// every core) for longer than the default phase; the sweep's 4 epochs per candidate instead of
/// 2 make it about twice as long as the default spec. When it ends early, another takes over.
const TRAINING_JOB: &str = r#"{"name": "bench-api-training",
    "data": {"builtin": "mnist10k"}, "model": {"arch": "cnn"}, "batch_size": 128,
    "sweep": {"epochs": 4}}"#;

const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// A response slower than this counts as an error (and as this much latency).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A submitted job is claimed by a worker within a poll interval; this is far above that.
const JOB_START_TIMEOUT: Duration = Duration::from_secs(60);
const SMALL_JOB_TIMEOUT: Duration = Duration::from_secs(120);
const JOB_POLL: Duration = Duration::from_millis(50);
/// How often the training phase checks that its job is still running (not measured).
const KEEPER_POLL: Duration = Duration::from_millis(250);
/// The timeline starts this long after the connections are open, so that spawning the senders
/// is not part of the first requests' latency.
const TIMELINE_DELAY: Duration = Duration::from_millis(100);
/// tokio's timer fires on the millisecond tick at or after a deadline, up to a millisecond
/// late: a sender wakes this much before a request is due, so that the timer's slack is not
/// reported as the server's latency.
const TIMER_SLACK: Duration = Duration::from_millis(1);

#[derive(Debug, Args)]
pub struct BenchApiArgs {
    /// Requests per second in each phase, sent on a fixed timeline (open loop).
    #[arg(long, default_value_t = 200.0, value_parser = positive)]
    pub rate: f64,
    /// Seconds each phase sends for.
    #[arg(long, default_value_t = 10.0, value_parser = positive)]
    pub seconds: f64,
    /// HTTP/1.1 connections, all opened before the timeline starts and kept alive; request i
    /// goes to connection i mod N.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub connections: u16,
    /// Exit 1 when a phase's p99 latency is not under this many milliseconds.
    #[arg(long, default_value_t = 50.0, value_parser = positive)]
    pub max_p99_ms: f64,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Load a server that is already running (its base URL) instead of starting one: one
    /// phase of `--seconds`, with no job of the bench's own. It passes when every answer was
    /// 2xx or a 503 with `Retry-After` (the database unavailable), whatever the latency: the
    /// load a fault test runs through a database outage.
    #[arg(long)]
    pub server: Option<String>,
    /// The `lrtune` binary whose `serve` it starts (without --server). Default: the `lrtune`
    /// beside this binary, as cargo builds them into one target folder.
    #[arg(long, env = "LRTUNE_BIN")]
    pub lrtune: Option<PathBuf>,
}

/// `--lrtune`, or the `lrtune` binary in this binary's folder.
fn lrtune_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("finding this binary")?;
    let beside = exe.with_file_name(format!("lrtune{}", std::env::consts::EXE_SUFFIX));
    if !beside.is_file() {
        bail!(
            "no lrtune binary at {} to start a server with: build it (`cargo build -p lrtune`, \
             in the same profile) or name one with --lrtune",
            beside.display()
        );
    }
    Ok(beside)
}

fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        Ok(value) => Err(format!("must be positive and finite, got {value}")),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

pub fn run(args: BenchApiArgs) -> anyhow::Result<Outcome> {
    let requests = (args.rate * args.seconds).round();
    if !(1.0..=10_000_000.0).contains(&requests) {
        bail!("--rate x --seconds is {requests} requests per phase; give between 1 and 10 million");
    }
    let plan = Plan {
        rate: args.rate,
        requests: requests as usize,
        connections: usize::from(args.connections),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let phases = match &args.server {
        Some(base) => runtime.block_on(load_running_server(base, &plan, args.seconds))?,
        None => {
            // Declared before the server, so dropped after it: the server's database lives
            // in it.
            let scratch = tempfile::Builder::new()
                .prefix("lrtune-bench-api-")
                .tempdir()
                .context("creating a temporary folder")?;
            let lrtune = lrtune_binary(args.lrtune.as_deref())?;
            let server = ServerProcess::start(&lrtune, scratch.path())?;
            runtime.block_on(bench(&server, &plan, args.seconds))?
        }
    };

    let failures = failures(&phases, args.max_p99_ms);
    let report = Report {
        cpu: lrtune::engine::simd::cpu_model(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rate: args.rate,
        seconds: args.seconds,
        connections: plan.connections,
        max_p99_ms: args.max_p99_ms,
        passed: failures.is_empty(),
        failures,
        phases,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(if report.passed {
        Outcome::Ok
    } else {
        Outcome::CheckFailed
    })
}

/// What one phase sends: `requests` on a timeline of `rate` per second over `connections`.
struct Plan {
    rate: f64,
    requests: usize,
    connections: usize,
}

/// `--server`: one phase against a server the bench did not start, following its newest job
/// (or a small one it submits when there is none).
async fn load_running_server(base: &str, plan: &Plan, seconds: f64) -> anyhow::Result<Phases> {
    let base = base.trim_end_matches('/').to_string();
    let target = Target::of(&base)?;
    let control = Control::new(&base)?;
    let job = match control.newest_job().await? {
        Some(id) => id,
        None => control.submit(SMALL_JOB).await?,
    };
    eprintln!(
        "{base}: {} requests at {}/s over {} connections ({seconds} s)",
        plan.requests, plan.rate, plan.connections
    );
    let (_, job) = watch::channel(job);
    let server = measure(&target, plan, job).await?;
    Ok(Phases {
        idle: None,
        training: None,
        server: Some(server),
    })
}

/// Where the load goes: the base URL, and the port whose connections are counted.
struct Target {
    base_url: String,
    port: Option<u16>,
}

impl Target {
    fn of(base_url: &str) -> anyhow::Result<Target> {
        let url = reqwest::Url::parse(base_url).with_context(|| format!("--server {base_url}"))?;
        Ok(Target {
            base_url: base_url.to_string(),
            port: url.port_or_known_default(),
        })
    }
}

async fn bench(server: &ServerProcess, plan: &Plan, seconds: f64) -> anyhow::Result<Phases> {
    let target = Target {
        base_url: server.base_url.clone(),
        port: Some(server.address.port()),
    };
    let control = Control::new(&server.base_url)?;
    let small = control.submit(SMALL_JOB).await?;
    let job = control
        .wait_while(&small, |status| status != "succeeded", SMALL_JOB_TIMEOUT)
        .await?;
    if job.status != "succeeded" {
        bail!("the warm-up job {small} ended {}", job.describe());
    }

    eprintln!(
        "idle: {} requests at {}/s over {} connections ({seconds} s)",
        plan.requests, plan.rate, plan.connections
    );
    let (_, idle_job) = watch::channel(small);
    let idle = measure(&target, plan, idle_job).await?;

    let first = start_training(&control).await?;
    eprintln!(
        "training (job {first}): {} requests at {}/s over {} connections ({seconds} s)",
        plan.requests, plan.rate, plan.connections
    );
    let (current_job, training_job) = watch::channel(first);
    let mut coverage = Coverage::default();
    let measured = tokio::select! {
        measured = measure(&target, plan, training_job) => measured,
        error = keep_training(&control, &current_job, &mut coverage) => Err(error),
    };
    let last = current_job.borrow().clone();
    let canceled = control.cancel(&last).await;
    let mut training = measured?;
    canceled?;
    training.training = Some(coverage.report());
    Ok(Phases {
        idle: Some(idle),
        training: Some(training),
        server: None,
    })
}

// ---------------------------------------------------------------------------------------------
// The load

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    GetJob,
    ListJobs,
    Analyze,
    Health,
}

impl RequestKind {
    const ALL: [RequestKind; 4] = [
        RequestKind::GetJob,
        RequestKind::ListJobs,
        RequestKind::Analyze,
        RequestKind::Health,
    ];

    fn label(self) -> &'static str {
        match self {
            RequestKind::GetJob => "GET /v1/jobs/{id}",
            RequestKind::ListJobs => "GET /v1/jobs?limit=20",
            RequestKind::Analyze => "POST /v1/analyze",
            RequestKind::Health => "GET /healthz",
        }
    }
}

/// Equal shares of each kind in a fixed shuffled order: every connection sends every kind, and
/// two runs send the same sequence.
fn request_mix(requests: usize) -> Vec<RequestKind> {
    let mut kinds: Vec<RequestKind> = (0..requests)
        .map(|index| RequestKind::ALL[index % RequestKind::ALL.len()])
        .collect();
    kinds.shuffle(&mut rand::rngs::StdRng::seed_from_u64(14));
    kinds
}

/// A 100-point range-test curve for `/v1/analyze`: flat, a descent, a valley, then divergence.
fn analyze_body() -> String {
    let points = 100;
    let lr: Vec<f64> = (0..points)
        .map(|step| 1e-6 * 1e7f64.powf(step as f64 / (points - 1) as f64))
        .collect();
    let loss: Vec<f64> = (0..points)
        .map(|step| {
            let x = step as f64 / (points - 1) as f64;
            let descent = 1.8 / (1.0 + (12.0 * (x - 0.45)).exp());
            let divergence = 40.0 * (x - 0.8).max(0.0).powi(2);
            0.5 + descent + divergence + 0.02 * (step as f64 * 1.7).sin()
        })
        .collect();
    serde_json::json!({ "lr": lr, "loss": loss }).to_string()
}

enum Response {
    Ok,
    /// Not 2xx: the status, whether it said when to retry, and the start of the body.
    Status {
        status: u16,
        retry_after: bool,
        text: String,
    },
    /// No response: connection error or timeout.
    Failed(String),
}

struct Sample {
    kind: RequestKind,
    /// From the due time (or the actual send, when that was earlier) to the response's last
    /// byte.
    latency: Duration,
    /// From the due time to the actual send, zero when sent early: the bench's own lateness (a
    /// connection still waiting on its previous response, a starved bench process).
    send_lag: Duration,
    /// From the start of the timeline to the response's last byte.
    done_at: Duration,
    response: Response,
}

/// Opens `plan.connections` connections, then sends the plan's requests on its timeline.
///
/// Each connection is its own `reqwest::Client` used by one task with one request in flight, so
/// it holds exactly one keep-alive connection; all are opened (a `GET /healthz` each) before the
/// clock starts. Request i is due at i / rate seconds and goes to connection i mod N, as wrk2
/// does; latency counts from the due time, so a stalled server shows up as latency rather than
/// as a lower request rate. A sender wakes up to TIMER_SLACK early and then sends at once; its
/// latency then counts from the actual send.
async fn measure(
    target: &Target,
    plan: &Plan,
    job_id: watch::Receiver<String>,
) -> anyhow::Result<PhaseReport> {
    let base = target.base_url.clone();
    let port = target.port;
    let clients = (0..plan.connections)
        .map(|_| one_connection_client())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let before = port.and_then(established_connections);
    // Any answer opens the connection (a server whose database is down answers 503).
    let warm_up = clients.iter().map(|client| {
        let url = format!("{base}/healthz");
        async move { client.get(&url).send().await?.bytes().await }
    });
    for result in futures_util::future::join_all(warm_up).await {
        result.context("opening the connections (GET /healthz)")?;
    }
    let open_connections = match (before, port.and_then(established_connections)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };

    let kinds: Arc<[RequestKind]> = request_mix(plan.requests).into();
    let analyze: Arc<str> = analyze_body().into();
    let start = Instant::now() + TIMELINE_DELAY;
    let mut senders = Vec::with_capacity(plan.connections);
    for (connection, client) in clients.into_iter().enumerate() {
        let (kinds, analyze, base, job_id) =
            (kinds.clone(), analyze.clone(), base.clone(), job_id.clone());
        let (rate, requests, stride) = (plan.rate, plan.requests, plan.connections);
        senders.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(requests / stride + 1);
            for index in (connection..requests).step_by(stride) {
                let due = start + Duration::from_secs_f64(index as f64 / rate);
                tokio::time::sleep_until(due - TIMER_SLACK).await;
                let sent = Instant::now();
                let id = job_id.borrow().clone();
                let kind = kinds[index];
                let response = send(&client, &base, kind, &id, &analyze).await;
                let done = Instant::now();
                samples.push(Sample {
                    kind,
                    latency: done - sent.min(due),
                    send_lag: sent.saturating_duration_since(due),
                    done_at: done - start,
                    response,
                });
            }
            samples
        }));
    }
    let mut samples = Vec::with_capacity(plan.requests);
    for sender in senders {
        samples.extend(sender.await.context("a sender task panicked")?);
    }
    Ok(PhaseReport::of(&samples, open_connections))
}

fn one_connection_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(1)
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()
        .context("building an HTTP client")
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    kind: RequestKind,
    job_id: &str,
    analyze: &str,
) -> Response {
    let request = match kind {
        RequestKind::GetJob => client.get(format!("{base}/v1/jobs/{job_id}")),
        RequestKind::ListJobs => client.get(format!("{base}/v1/jobs?limit=20")),
        RequestKind::Analyze => client
            .post(format!("{base}/v1/analyze"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(analyze.to_string()),
        RequestKind::Health => client.get(format!("{base}/healthz")),
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return Response::Failed(format!("{}: {}", kind.label(), chain(&error))),
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .contains_key(reqwest::header::RETRY_AFTER);
    // The whole body: latency runs to its last byte.
    match response.bytes().await {
        Ok(_) if status.is_success() => Response::Ok,
        Ok(body) => Response::Status {
            status: status.as_u16(),
            retry_after,
            text: format!(
                "{}: {status}: {}",
                kind.label(),
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        },
        Err(error) => Response::Failed(format!("{}: {}", kind.label(), chain(&error))),
    }
}

/// An error with its causes ("error sending request" alone does not say what happened).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Client sockets connected to this loopback port (Linux; `None` elsewhere). The difference
/// before and after opening a phase's connections shows that they are really open.
fn established_connections(port: u16) -> Option<usize> {
    const ESTABLISHED: &str = "01";
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let count = table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|address| address.rsplit_once(':'))
                .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
            remote_port == Some(port) && fields.get(3) == Some(&ESTABLISHED)
        })
        .count();
    Some(count)
}

// ---------------------------------------------------------------------------------------------
// Jobs: the warm-up job, and one kept running through the training phase

/// The bench's own requests (submit, poll, cancel), on a connection of their own and not
/// measured.
struct Control {
    http: reqwest::Client,
    base: String,
}

struct JobState {
    status: String,
    error: Option<String>,
}

impl JobState {
    fn describe(&self) -> String {
        match &self.error {
            Some(error) => format!("{}: {error}", self.status),
            None => self.status.clone(),
        }
    }
}

impl Control {
    fn new(base: &str) -> anyhow::Result<Control> {
        Ok(Control {
            http: one_connection_client()?,
            base: base.to_string(),
        })
    }

    async fn submit(&self, spec: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(spec.to_string())
            .send()
            .await
            .context("POST /v1/jobs")?;
        let status = response.status();
        let body: Value = response.json().await.context("POST /v1/jobs: reading")?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("POST /v1/jobs answered {status}: {body}");
        }
        match body["id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => bail!("POST /v1/jobs answered without an id: {body}"),
        }
    }

    /// The id of the newest job, if there is one.
    async fn newest_job(&self) -> anyhow::Result<Option<String>> {
        let response = self
            .http
            .get(format!("{}/v1/jobs?limit=1", self.base))
            .send()
            .await
            .context("GET /v1/jobs")?;
        let status = response.status();
        let body: Value = response.json().await.context("GET /v1/jobs: reading")?;
        if !status.is_success() {
            bail!("GET /v1/jobs answered {status}: {body}");
        }
        Ok(body["jobs"][0]["id"].as_str().map(str::to_string))
    }

    async fn job(&self, id: &str) -> anyhow::Result<JobState> {
        let response = self
            .http
            .get(format!("{}/v1/jobs/{id}", self.base))
            .send()
            .await
            .with_context(|| format!("GET /v1/jobs/{id}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("GET /v1/jobs/{id}: reading"))?;
        if !status.is_success() {
            bail!("GET /v1/jobs/{id} answered {status}: {body}");
        }
        Ok(JobState {
            status: body["status"].as_str().unwrap_or("").to_string(),
            error: body["error"]["message"].as_str().map(str::to_string),
        })
    }

    /// Polls the job until `waiting(status)` is false.
    async fn wait_while(
        &self,
        id: &str,
        waiting: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<JobState> {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id).await?;
            if !waiting(&job.status) || is_finished(&job.status) {
                return Ok(job);
            }
            if Instant::now() > deadline {
                bail!("job {id} was still {} after {timeout:?}", job.status);
            }
            tokio::time::sleep(JOB_POLL).await;
        }
    }

    /// Stops the job; one that already finished is fine (409).
    async fn cancel(&self, id: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}/v1/jobs/{id}/cancel", self.base))
            .send()
            .await
            .with_context(|| format!("POST /v1/jobs/{id}/cancel"))?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            Ok(())
        } else {
            let body = response.text().await.unwrap_or_default();
            bail!("POST /v1/jobs/{id}/cancel answered {status}: {body}")
        }
    }
}

fn is_finished(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "canceled")
}

/// Submits the training job and returns its id once a worker runs it.
async fn start_training(control: &Control) -> anyhow::Result<String> {
    for _ in 0..3 {
        let id = control.submit(TRAINING_JOB).await?;
        let job = control
            .wait_while(&id, |status| status == "queued", JOB_START_TIMEOUT)
            .await?;
        match job.status.as_str() {
            "running" => return Ok(id),
            // Finished between two polls: only on a machine far faster than this job expects.
            "succeeded" => continue,
            _ => bail!("the training job {id} ended {}", job.describe()),
        }
    }
    bail!("the training job finished three times before it could be seen running")
}

/// How much of the training phase a job was seen running, and which jobs ran.
#[derive(Default)]
struct Coverage {
    jobs: Vec<String>,
    polls: usize,
    running: usize,
}

impl Coverage {
    fn report(&self) -> TrainingReport {
        TrainingReport {
            jobs: self.jobs.clone(),
            running_fraction: if self.polls == 0 {
                0.0
            } else {
                round3(self.running as f64 / self.polls as f64)
            },
        }
    }
}

/// Checks the job every KEEPER_POLL and submits another when it has finished, until dropped
/// (the phase is over). Returns only on an error: a job that failed or was canceled.
async fn keep_training(
    control: &Control,
    current: &watch::Sender<String>,
    coverage: &mut Coverage,
) -> anyhow::Error {
    coverage.jobs.push(current.borrow().clone());
    loop {
        let id = current.borrow().clone();
        let job = match control.job(&id).await {
            Ok(job) => job,
            Err(error) => return error.context("following the training job"),
        };
        coverage.polls += 1;
        match job.status.as_str() {
            "running" => coverage.running += 1,
            "queued" => {}
            "succeeded" => match control.submit(TRAINING_JOB).await {
                Ok(next) => {
                    coverage.jobs.push(next.clone());
                    current.send_replace(next);
                }
                Err(error) => return error.context("submitting the next training job"),
            },
            _ => return anyhow::anyhow!("the training job {id} ended {}", job.describe()),
        }
        tokio::time::sleep(KEEPER_POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The server

/// `lrtune serve` on a free loopback port with a fresh database; killed when dropped.
struct ServerProcess {
    child: Child,
    address: SocketAddr,
    base_url: String,
}

impl ServerProcess {
    fn start(lrtune: &Path, scratch: &Path) -> anyhow::Result<ServerProcess> {
        let static_dir = scratch.join("static");
        std::fs::create_dir(&static_dir)
            .with_context(|| format!("creating {}", static_dir.display()))?;
        let log_path = scratch.join("server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = Command::new(lrtune)
            .args(["serve", "--addr", "127.0.0.1:0", "--db"])
            .arg(scratch.join("bench.db"))
            .arg("--static-dir")
            .arg(&static_dir)
            .env_remove("LRTUNE_API_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} serve", lrtune.display()))?;
        let stdout = child.stdout.take();
        // From here on a failure kills the child (Drop).
        let mut server = ServerProcess {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_url: String::new(),
        };
        let stdout = stdout.context("lrtune serve's standard output")?;
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            let _ = sender.send(first);
            // Keep reading so that a later line can never block the server on a full pipe.
            lines.for_each(drop);
        });
        let line = receiver
            .recv_timeout(SERVER_START_TIMEOUT)
            .unwrap_or_default();
        let Some(url) = line.trim().strip_prefix("lrtune listening on ") else {
            bail!(
                "lrtune serve did not start (first line {line:?}); its log:\n{}",
                log_tail(&log_path)
            );
        };
        let address: SocketAddr = url
            .strip_prefix("http://")
            .and_then(|address| address.parse().ok())
            .with_context(|| format!("lrtune serve printed an address that is not one: {url}"))?;
        if !address.ip().is_loopback() {
            bail!("lrtune serve listens on {address}, not on loopback");
        }
        server.address = address;
        server.base_url = format!("http://{address}");
        Ok(server)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The report

#[derive(Serialize)]
struct Report {
    cpu: String,
    cores: usize,
    rate: f64,
    seconds: f64,
    connections: usize,
    max_p99_ms: f64,
    /// Both phases' p99 under `max_p99_ms`, every response 2xx.
    passed: bool,
    failures: Vec<String>,
    phases: Phases,
}

#[derive(Serialize)]
struct Phases {
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<PhaseReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    training: Option<PhaseReport>,
    /// `--server`'s one phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<PhaseReport>,
}

impl Phases {
    fn named(&self) -> Vec<(&'static str, &PhaseReport)> {
        [
            ("idle", &self.idle),
            ("training", &self.training),
            ("server", &self.server),
        ]
        .into_iter()
        .filter_map(|(name, phase)| phase.as_ref().map(|phase| (name, phase)))
        .collect()
    }
}

#[derive(Serialize)]
struct PhaseReport {
    requests: usize,
    /// `non_2xx` + `failed`.
    errors: usize,
    non_2xx: usize,
    /// No response (connection error, timeout).
    failed: usize,
    /// Answers by status code (`200`, `503`, ...; `none` for no answer).
    by_status: std::collections::BTreeMap<String, usize>,
    /// 503 answers without `Retry-After`.
    unavailable_without_retry_after: usize,
    first_error: Option<String>,
    /// Responses per second, from the start of the timeline to the last response.
    achieved_rate: f64,
    /// Client connections to the server opened for this phase (Linux: from /proc/net/tcp).
    open_connections: Option<usize>,
    latency_ms: Latency,
    send_lag_ms: Latency,
    by_request: Vec<KindReport>,
    /// The training phase only.
    #[serde(skip_serializing_if = "Option::is_none")]
    training: Option<TrainingReport>,
}

#[derive(Serialize)]
struct TrainingReport {
    jobs: Vec<String>,
    /// Share of the checks during the phase that found a job running.
    running_fraction: f64,
}

#[derive(Serialize)]
struct KindReport {
    request: &'static str,
    requests: usize,
    errors: usize,
    latency_ms: Latency,
}

#[derive(Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    p99_9: f64,
    max: f64,
}

impl Latency {
    fn of(durations: impl Iterator<Item = Duration>) -> Latency {
        let mut ms: Vec<f64> = durations.map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Latency {
            p50: round3(percentile(&ms, 50.0)),
            p90: round3(percentile(&ms, 90.0)),
            p99: round3(percentile(&ms, 99.0)),
            p99_9: round3(percentile(&ms, 99.9)),
            max: round3(ms.last().copied().unwrap_or(0.0)),
        }
    }
}

/// Nearest rank: the smallest value with at least `p` % of the values at or below it.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // The epsilon keeps 99.9 % of 1000 at rank 999 despite 99.9 not being exact in binary.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(value: f64) -> f64 {
    (value * 1e3).round() / 1e3
}

impl PhaseReport {
    fn of(samples: &[Sample], open_connections: Option<usize>) -> PhaseReport {
        let non_2xx = samples
            .iter()
            .filter(|s| matches!(s.response, Response::Status { .. }))
            .count();
        let mut by_status = std::collections::BTreeMap::new();
        for sample in samples {
            let status = match &sample.response {
                Response::Ok => "2xx".to_string(),
                Response::Status { status, .. } => status.to_string(),
                Response::Failed(_) => "none".to_string(),
            };
            *by_status.entry(status).or_insert(0) += 1;
        }
        let unavailable_without_retry_after = samples
            .iter()
            .filter(|s| {
                matches!(
                    s.response,
                    Response::Status {
                        status: 503,
                        retry_after: false,
                        ..
                    }
                )
            })
            .count();
        let failed = samples
            .iter()
            .filter(|s| matches!(s.response, Response::Failed(_)))
            .count();
        let first_error = samples
            .iter()
            .filter(|s| !matches!(s.response, Response::Ok))
            .min_by_key(|s| s.done_at)
            .map(|s| match &s.response {
                Response::Status { text, .. } | Response::Failed(text) => text.clone(),
                Response::Ok => String::new(),
            });
        let wall = samples.iter().map(|s| s.done_at).max().unwrap_or_default();
        let by_request = RequestKind::ALL
            .iter()
            .map(|&kind| {
                let of_kind: Vec<&Sample> = samples.iter().filter(|s| s.kind == kind).collect();
                KindReport {
                    request: kind.label(),
                    requests: of_kind.len(),
                    errors: of_kind
                        .iter()
                        .filter(|s| !matches!(s.response, Response::Ok))
                        .count(),
                    latency_ms: Latency::of(of_kind.iter().map(|s| s.latency)),
                }
            })
            .collect();
        PhaseReport {
            requests: samples.len(),
            errors: non_2xx + failed,
            non_2xx,
            failed,
            by_status,
            unavailable_without_retry_after,
            first_error,
            achieved_rate: if wall.is_zero() {
                0.0
            } else {
                round3(samples.len() as f64 / wall.as_secs_f64())
            },
            open_connections,
            latency_ms: Latency::of(samples.iter().map(|s| s.latency)),
            send_lag_ms: Latency::of(samples.iter().map(|s| s.send_lag)),
            by_request,
            training: None,
        }
    }
}

fn failures(phases: &Phases, max_p99_ms: f64) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some(phase) = &phases.server {
        let others = phase
            .by_status
            .iter()
            .filter(|(status, _)| !matches!(status.as_str(), "2xx" | "503"));
        for (status, count) in others {
            failures.push(format!("server: {count} answers {status}"));
        }
        if phase.unavailable_without_retry_after > 0 {
            failures.push(format!(
                "server: {} answers 503 without Retry-After",
                phase.unavailable_without_retry_after
            ));
        }
        return failures;
    }
    for (name, phase) in phases.named() {
        if phase.latency_ms.p99 >= max_p99_ms {
            failures.push(format!(
                "{name}: p99 {:.2} ms is not under {max_p99_ms} ms",
                phase.latency_ms.p99
            ));
        }
        if phase.errors > 0 {
            failures.push(format!(
                "{name}: {} of {} requests failed (first: {})",
                phase.errors,
                phase.requests,
                phase.first_error.as_deref().unwrap_or("?")
            ));
        }
    }
    failures
}

impl Report {
    fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "CPU: {} ({} cores); {}/s for {} s per phase over {} connections",
            self.cpu, self.cores, self.rate, self.seconds, self.connections
        );
        let _ = writeln!(
            out,
            "{:<9} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
            "phase", "sent", "errors", "rate/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let phases = self.phases.named();
        for &(name, phase) in &phases {
            let latency = &phase.latency_ms;
            let _ = writeln!(
                out,
                "{name:<9} {:>6} {:>6} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8.2}",
                phase.requests,
                phase.errors,
                phase.achieved_rate,
                latency.p50,
                latency.p90,
                latency.p99,
                latency.p99_9,
                latency.max
            );
        }
        for &(name, phase) in &phases {
            let by_status: Vec<String> = phase
                .by_status
                .iter()
                .map(|(status, count)| format!("{status} x{count}"))
                .collect();
            let _ = writeln!(out, "{name} answers: {}", by_status.join(", "));
            let by_request: Vec<String> = phase
                .by_request
                .iter()
                .map(|kind| format!("{} {:.2}", kind.request, kind.latency_ms.p99))
                .collect();
            let _ = writeln!(out, "{name} p99 ms by request: {}", by_request.join(", "));
            let connections = phase
                .open_connections
                .map_or_else(|| "?".to_string(), |n| n.to_string());
            let _ = writeln!(
                out,
                "{name}: {connections} connections open; send lag p99 {:.2} ms (the bench's own lateness)",
                phase.send_lag_ms.p99
            );
        }
        let training = self
            .phases
            .training
            .as_ref()
            .and_then(|t| t.training.as_ref());
        if let Some(training) = training {
            let _ = writeln!(
                out,
                "training: job {} running for {:.0} % of the phase",
                training.jobs.join(", then "),
                training.running_fraction * 100.0
            );
        }
        if self.passed && self.phases.server.is_some() {
            let _ = writeln!(out, "ok: every answer 2xx or 503 with Retry-After");
        } else if self.passed {
            let _ = writeln!(
                out,
                "ok: p99 under {} ms in both phases, every response 2xx",
                self.max_p99_ms
            );
        } else {
            let _ = writeln!(out, "failed: {}", self.failures.join("; "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 500.0);
        assert_eq!(percentile(&values, 99.0), 990.0);
        assert_eq!(percentile(&values, 99.9), 999.0);
        assert_eq!(percentile(&values, 100.0), 1000.0);
        assert_eq!(percentile(&[7.0], 50.0), 7.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }

    #[test]
    fn the_request_mix_has_equal_shares_of_each_kind() {
        let mix = request_mix(2000);
        for kind in RequestKind::ALL {
            assert_eq!(mix.iter().filter(|&&k| k == kind).count(), 500, "{kind:?}");
        }
        assert_eq!(mix, request_mix(2000));
    }

    #[test]
    fn the_analyze_curve_is_one_the_suggestion_rules_accept() {
        let body: Value = serde_json::from_str(&analyze_body()).unwrap();
        let lr: Vec<f64> = serde_json::from_value(body["lr"].clone()).unwrap();
        let loss: Vec<f64> = serde_json::from_value(body["loss"].clone()).unwrap();
        assert_eq!((lr.len(), loss.len()), (100, 100));
        assert!(lrtune::engine::suggest::analyze(&lr, &loss, 0.98).is_ok());
    }
}
