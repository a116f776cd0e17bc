//! `lrtune serve`: the HTTP service with its workers, on a SQLite file or a PostgreSQL
//! database; `--workers 0` for an API replica that leaves the jobs to `lrtune worker`
//! processes. Every flag can also be given as an `LRTUNE_*` environment variable.

use std::io::Write;

use anyhow::Context;
use clap::Args;

use super::Outcome;
use crate::config::{ApiConfig, DatabaseConfig, LimitsConfig, QueueConfig};
use crate::http::startup::{shutdown_signal, Application, Settings, SHUTDOWN_TIMEOUT};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// Jobs run at the same time in this process; 0 serves the API only (workers elsewhere
    /// run the jobs: `lrtune worker`).
    #[arg(long, env = "LRTUNE_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Threads of the compute pool the jobs train on (default: one per core): with
    /// `--threads 1`, several workers on one host each train on a core of their own.
    #[arg(long, env = "LRTUNE_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    #[command(flatten)]
    pub api: ApiConfig,
    #[command(flatten)]
    pub queue: QueueConfig,
    #[command(flatten)]
    pub limits: LimitsConfig,
}

pub fn run(args: ServeArgs) -> anyhow::Result<Outcome> {
    let settings = Settings {
        db: args.database.db,
        limits: args.limits.limits(),
        api: args.api,
        queue: args.queue,
        workers: args.workers,
        threads: args.threads.map(usize::from),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let app = Application::build(settings).await?;
        println!("lrtune listening on http://{}", app.address());
        std::io::stdout().flush().ok();
        app.run_until_stopped(shutdown_signal()).await
    });
    // Not the runtime's drop, which waits for every blocking task (an upload being parsed):
    // the shutdown already waited what it should.
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    served?;
    Ok(Outcome::Ok)
}
