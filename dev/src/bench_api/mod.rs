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

mod jobs;
mod load;
mod report;

use jobs::*;
use load::*;
use report::*;

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
