//! The settings of the service, each declared once, as a clap flag with its `LRTUNE_*`
//! environment variable and its `--help` text, and grouped by who reads it: the API, the job
//! queue (workers and the reaper), the limits of a job. `lrtune serve` and `lrtune worker`
//! flatten the groups they need; the API and the workers are handed the same structs.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::engine::limits::{self, Limits};
use crate::store::DatabaseUrl;

/// The database every process of a deployment shares.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// The job store: a SQLite file (created on first start), `sqlite://PATH`, or
    /// `postgres://USER:PASSWORD@HOST/DATABASE`, shared by API replicas and workers on many
    /// hosts.
    #[arg(long, env = "LRTUNE_DB", default_value = "lrtune.db", value_parser = DatabaseUrl::parse)]
    pub db: DatabaseUrl,
}

/// What the HTTP API is told.
#[derive(Debug, Clone, Args)]
pub struct ApiConfig {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "LRTUNE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// When set, every /v1 request needs `Authorization: Bearer <token>`.
    #[arg(long, env = "LRTUNE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// /metrics needs the API token too (a deployment whose port is reachable by others
    /// than its Prometheus). Needs --api-token.
    #[arg(long, env = "LRTUNE_METRICS_TOKEN_REQUIRED")]
    pub metrics_token_required: bool,
    /// Queued jobs beyond which a submit is refused (429).
    #[arg(long, env = "LRTUNE_MAX_QUEUED", default_value_t = 100)]
    pub max_queued: i64,
    /// Largest JSON body in bytes (413 above).
    #[arg(long, env = "LRTUNE_MAX_JSON_BYTES", default_value_t = 1 << 20)]
    pub max_json_bytes: usize,
    /// Largest dataset upload in bytes (413 above).
    #[arg(long, env = "LRTUNE_MAX_UPLOAD_BYTES", default_value_t = 64 << 20)]
    pub max_upload_bytes: usize,
    /// Uploads (datasets, weights) whose bodies are read at the same time; one more is
    /// answered 503 with Retry-After before its body is read. Each holds its body in memory.
    #[arg(long, env = "LRTUNE_MAX_CONCURRENT_UPLOADS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_uploads: u32,
    /// Most bytes all stored datasets and weights may hold together (507 above): bytes or a
    /// size such as 2GiB. DELETE /v1/datasets/{id} and /v1/weights/{id} make room.
    #[arg(long, env = "LRTUNE_MAX_STORED_BYTES", default_value = "4GiB",
          value_parser = limits::parse_bytes)]
    pub max_stored_bytes: u64,
    /// Most rows (or characters) in an uploaded dataset.
    #[arg(long, env = "LRTUNE_MAX_DATASET_ROWS", default_value_t = 1_000_000)]
    pub max_dataset_rows: usize,
    /// Most columns in an uploaded CSV, counted from its header before any row is read.
    #[arg(long, env = "LRTUNE_MAX_DATASET_COLUMNS", default_value_t = 100_000)]
    pub max_dataset_columns: usize,
    /// Most steps of a schedule from POST /v1/schedules (and points for /v1/analyze).
    #[arg(long, env = "LRTUNE_MAX_SCHEDULE_STEPS", default_value_t = 100_000)]
    pub max_schedule_steps: usize,
    /// A folder whose dashboard files replace the ones built into the binary (to edit the
    /// dashboard without rebuilding: `--static-dir static`).
    #[arg(long, env = "LRTUNE_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,
    #[command(flatten)]
    pub connections: ConnectionConfig,
}

/// How the server treats connections, so that slow or idle clients cannot use up its file
/// descriptors.
#[derive(Debug, Clone, Args)]
pub struct ConnectionConfig {
    /// Seconds a client has to send a request's headers, from the connection's start or the
    /// end of its previous request (an idle keep-alive connection is closed after it too).
    #[arg(long, env = "LRTUNE_HEADER_READ_TIMEOUT", default_value = "10", value_parser = positive_seconds)]
    pub header_read_timeout: Duration,
    /// Seconds a request body may go without sending data before the request fails (408).
    #[arg(long, env = "LRTUNE_BODY_READ_TIMEOUT", default_value = "30", value_parser = positive_seconds)]
    pub body_read_timeout: Duration,
    /// Open connections at most; beyond it a connection still waiting for its first request
    /// is closed for the new one, or the new one is closed at once. Lowered at start-up to
    /// stay below the file limit (which is raised to its hard maximum).
    #[arg(long, env = "LRTUNE_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

impl Default for ConnectionConfig {
    fn default() -> ConnectionConfig {
        ConnectionConfig {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            addr: "127.0.0.1:8080".into(),
            api_token: None,
            metrics_token_required: false,
            max_queued: 100,
            max_json_bytes: 1 << 20,
            max_upload_bytes: 64 << 20,
            max_concurrent_uploads: 4,
            max_stored_bytes: 4 << 30,
            max_dataset_rows: 1_000_000,
            max_dataset_columns: 100_000,
            max_schedule_steps: 100_000,
            static_dir: None,
            connections: ConnectionConfig::default(),
        }
    }
}

/// What the workers and the reaper of a process are told.
#[derive(Debug, Clone, Args)]
pub struct QueueConfig {
    /// Seconds a worker's lease on a running job lasts; its heartbeats renew it. A job whose
    /// lease has run out (its worker died) is queued again by any process.
    #[arg(long, env = "LRTUNE_STALE_AFTER", default_value = "60", value_parser = positive_seconds)]
    pub stale_after: Duration,
    /// Claims after which a job whose worker keeps dying is failed.
    #[arg(long, env = "LRTUNE_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub max_attempts: i64,
    /// Seconds from SIGTERM to exit, whatever the jobs or the database do (at least 1):
    /// running jobs get all of it but the last 3 s to finish, then they are stopped and queued
    /// again.
    #[arg(long, env = "LRTUNE_GRACE", default_value = "30", value_parser = seconds)]
    pub grace: Duration,
    /// Seconds a running job may go without finishing a step (or reporting anything) before
    /// the watchdog fails it as `stalled`. A stalled job is not retried: it would hang again.
    #[arg(long, env = "LRTUNE_STALL_AFTER", default_value = "600", value_parser = positive_seconds)]
    pub stall_after: Duration,
    /// Curve points, sweep runs and race points a worker keeps while the database cannot take
    /// them (an outage, a full disk). When that many wait, training pauses until they are
    /// written: nothing is dropped.
    #[arg(long, env = "LRTUNE_MAX_BUFFERED_ROWS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_buffered_rows: u64,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            stale_after: Duration::from_secs(60),
            max_attempts: 3,
            grace: Duration::from_secs(30),
            stall_after: Duration::from_secs(600),
            max_buffered_rows: 100_000,
        }
    }
}

/// The most a job may ask for, checked at submit and again by the worker that runs it.
#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
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
    #[arg(long, env = "LRTUNE_MAX_JOB_MEMORY", value_parser = limits::parse_bytes)]
    pub max_job_memory: Option<u64>,
    /// Most samples a generated builtin may have.
    #[arg(long, env = "LRTUNE_MAX_SAMPLES", default_value_t = Limits::default().max_samples)]
    pub max_samples: usize,
}

impl LimitsConfig {
    pub fn limits(&self) -> Limits {
        Limits {
            max_range_steps: self.max_range_steps,
            max_sweep_epochs: self.max_sweep_epochs,
            max_plan_epochs: self.max_plan_epochs,
            max_parameters: self.max_parameters,
            max_samples: self.max_samples,
            max_job_memory: self
                .max_job_memory
                .unwrap_or_else(limits::default_job_memory),
        }
    }
}

fn seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(value).map_err(|_| format!("{text:?} is not a duration"))
}

fn positive_seconds(text: &str) -> Result<Duration, String> {
    let duration = seconds(text)?;
    if duration < Duration::from_millis(100) {
        return Err(format!("{text:?}: at least 0.1 seconds"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        api: ApiConfig,
        #[command(flatten)]
        queue: QueueConfig,
    }

    #[test]
    fn the_defaults_in_code_are_the_flags_defaults() {
        let flags = Flags::try_parse_from(["lrtune"]).unwrap();
        let api = ApiConfig::default();
        assert_eq!(flags.api.addr, api.addr);
        assert_eq!(flags.api.max_queued, api.max_queued);
        assert_eq!(flags.api.max_json_bytes, api.max_json_bytes);
        assert_eq!(flags.api.max_upload_bytes, api.max_upload_bytes);
        assert_eq!(flags.api.max_dataset_rows, api.max_dataset_rows);
        assert_eq!(flags.api.max_dataset_columns, api.max_dataset_columns);
        assert_eq!(flags.api.max_schedule_steps, api.max_schedule_steps);
        assert_eq!(flags.api.metrics_token_required, api.metrics_token_required);
        assert_eq!(flags.api.max_concurrent_uploads, api.max_concurrent_uploads);
        assert_eq!(flags.api.max_stored_bytes, api.max_stored_bytes);
        let connections = ConnectionConfig::default();
        assert_eq!(
            flags.api.connections.header_read_timeout,
            connections.header_read_timeout
        );
        assert_eq!(
            flags.api.connections.body_read_timeout,
            connections.body_read_timeout
        );
        assert_eq!(
            flags.api.connections.max_connections,
            connections.max_connections
        );
        let queue = QueueConfig::default();
        assert_eq!(flags.queue.stale_after, queue.stale_after);
        assert_eq!(flags.queue.max_attempts, queue.max_attempts);
        assert_eq!(flags.queue.grace, queue.grace);
        assert_eq!(flags.queue.stall_after, queue.stall_after);
        assert_eq!(flags.queue.max_buffered_rows, queue.max_buffered_rows);
    }

    #[test]
    fn durations_and_attempts_are_checked_with_the_flag_named() {
        for (arg, flag) in [
            ("--stale-after=soon", "--stale-after"),
            ("--stale-after=0", "--stale-after"),
            ("--grace=-1", "--grace"),
            ("--max-attempts=0", "--max-attempts"),
            ("--max-concurrent-uploads=0", "--max-concurrent-uploads"),
            ("--max-stored-bytes=lots", "--max-stored-bytes"),
            ("--header-read-timeout=0", "--header-read-timeout"),
            ("--max-connections=0", "--max-connections"),
        ] {
            let error = Flags::try_parse_from(["lrtune", arg])
                .err()
                .expect("refused")
                .to_string();
            assert!(error.contains(&format!("'{flag} <")), "{error}");
        }
        let flags =
            Flags::try_parse_from(["lrtune", "--stale-after", "1.5", "--grace", "0"]).unwrap();
        assert_eq!(flags.queue.stale_after, Duration::from_millis(1500));
        assert_eq!(flags.queue.grace, Duration::ZERO);
        let flags = Flags::try_parse_from([
            "lrtune",
            "--max-stored-bytes",
            "2GiB",
            "--header-read-timeout",
            "0.5",
        ])
        .unwrap();
        assert_eq!(flags.api.max_stored_bytes, 2 << 30);
        assert_eq!(
            flags.api.connections.header_read_timeout,
            Duration::from_millis(500)
        );
    }
}
