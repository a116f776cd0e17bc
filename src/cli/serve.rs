//! `lrtune serve`: the HTTP service with its workers on a SQLite file. Every flag can also be
//! given as an `LRTUNE_*` environment variable.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::Outcome;
use crate::engine::{admission, Limits};
use crate::http::startup::{shutdown_signal, Application, Settings};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "LRTUNE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// SQLite database file, created on first start.
    #[arg(long, env = "LRTUNE_DB", default_value = "lrtune.db")]
    pub db: PathBuf,
    /// Jobs run at the same time.
    #[arg(long, env = "LRTUNE_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// When set, every /v1 request needs `Authorization: Bearer <token>`.
    #[arg(long, env = "LRTUNE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Seconds without a heartbeat after which a running job is queued again.
    #[arg(long, env = "LRTUNE_STALE_AFTER", default_value_t = 60.0)]
    pub stale_after: f64,
    /// Claims after which a job whose worker keeps dying is failed.
    #[arg(long, env = "LRTUNE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: i64,
    /// Seconds running jobs get to finish on SIGTERM before they are queued again.
    #[arg(long, env = "LRTUNE_GRACE", default_value_t = 30.0)]
    pub grace: f64,
    /// Queued jobs beyond which a submit is refused (429).
    #[arg(long, env = "LRTUNE_MAX_QUEUED", default_value_t = 100)]
    pub max_queued: i64,
    /// Largest JSON body in bytes (413 above).
    #[arg(long, env = "LRTUNE_MAX_JSON_BYTES", default_value_t = 1 << 20)]
    pub max_json_bytes: usize,
    /// Largest dataset upload in bytes (413 above).
    #[arg(long, env = "LRTUNE_MAX_UPLOAD_BYTES", default_value_t = 64 << 20)]
    pub max_upload_bytes: usize,
    /// Most rows (or characters) in an uploaded dataset.
    #[arg(long, env = "LRTUNE_MAX_DATASET_ROWS", default_value_t = 1_000_000)]
    pub max_dataset_rows: usize,
    /// Most columns in an uploaded CSV, counted from its header before any row is read.
    #[arg(long, env = "LRTUNE_MAX_DATASET_COLUMNS", default_value_t = 100_000)]
    pub max_dataset_columns: usize,
    /// Most steps of a schedule from POST /v1/schedules (and points for /v1/analyze).
    #[arg(long, env = "LRTUNE_MAX_SCHEDULE_STEPS", default_value_t = 100_000)]
    pub max_schedule_steps: usize,
    /// Most range-test steps of a job.
    #[arg(long, env = "LRTUNE_MAX_RANGE_STEPS", default_value_t = Limits::default().max_range_steps)]
    pub max_range_steps: usize,
    /// Most sweep epochs of a job (candidates x seeds x epochs).
    #[arg(long, env = "LRTUNE_MAX_SWEEP_EPOCHS", default_value_t = Limits::default().max_sweep_epochs)]
    pub max_sweep_epochs: usize,
    /// Most planned epochs of a job.
    #[arg(long, env = "LRTUNE_MAX_PLAN_EPOCHS", default_value_t = Limits::default().max_plan_epochs)]
    pub max_plan_epochs: usize,
    /// Most model parameters.
    #[arg(long, env = "LRTUNE_MAX_PARAMETERS", default_value_t = Limits::default().max_parameters)]
    pub max_parameters: usize,
    /// Most memory one job may need, as estimated before it runs (weights and optimizer
    /// state, the training step's buffers, the data): bytes or a size such as 2GiB. Default: a
    /// quarter of the machine's memory.
    #[arg(long, env = "LRTUNE_MAX_JOB_MEMORY", value_parser = admission::parse_bytes)]
    pub max_job_memory: Option<u64>,
    /// Most samples a generated builtin may have.
    #[arg(long, env = "LRTUNE_MAX_SAMPLES", default_value_t = Limits::default().max_samples)]
    pub max_samples: usize,
    /// A folder whose dashboard files replace the ones built into the binary (to edit the
    /// dashboard without rebuilding: `--static-dir static`).
    #[arg(long, env = "LRTUNE_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("--{flag}: not a duration: {value}"))
}

impl ServeArgs {
    fn settings(self) -> anyhow::Result<Settings> {
        if self.workers == 0 {
            anyhow::bail!("--workers must be at least 1");
        }
        if self.max_attempts < 1 {
            anyhow::bail!("--max-attempts must be at least 1");
        }
        Ok(Settings {
            addr: self.addr,
            db: self.db,
            workers: self.workers,
            api_token: self.api_token,
            limits: Limits {
                max_range_steps: self.max_range_steps,
                max_sweep_epochs: self.max_sweep_epochs,
                max_plan_epochs: self.max_plan_epochs,
                max_parameters: self.max_parameters,
                max_samples: self.max_samples,
                max_job_memory: self
                    .max_job_memory
                    .unwrap_or_else(admission::default_job_memory),
            },
            max_queued: self.max_queued,
            max_json_bytes: self.max_json_bytes,
            max_upload_bytes: self.max_upload_bytes,
            max_dataset_rows: self.max_dataset_rows,
            max_dataset_columns: self.max_dataset_columns,
            max_schedule_steps: self.max_schedule_steps,
            stale_after: seconds(self.stale_after, "stale-after")?,
            max_attempts: self.max_attempts,
            grace: seconds(self.grace, "grace")?,
            static_dir: self.static_dir.unwrap_or_default(),
        })
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<Outcome> {
    let settings = args.settings()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let app = Application::build(settings).await?;
        println!("lrtune listening on http://{}", app.address());
        std::io::stdout().flush().ok();
        app.run_until_stopped(shutdown_signal()).await
    })?;
    Ok(Outcome::Ok)
}
