//! `lrtune worker`: claims and runs jobs from a database shared with `lrtune serve` replicas
//! (PostgreSQL across hosts, or one SQLite file on one host), with no HTTP API. SIGTERM
//! drains it as it does `serve`.

use std::io::Write;

use anyhow::Context;
use clap::Args;

use super::Outcome;
use crate::config::{DatabaseConfig, LimitsConfig, QueueConfig};
use crate::http::startup::{
    shutdown_signal, WorkerProcess, WorkerProcessSettings, SHUTDOWN_TIMEOUT,
};
use crate::worker::worker_name;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// Jobs run at the same time.
    #[arg(long, env = "LRTUNE_WORKERS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,
    /// This worker's name; jobs show it as `NAME@HOST`. Default: `pid<PID>`.
    #[arg(long, env = "LRTUNE_WORKER_NAME")]
    pub name: Option<String>,
    /// Serve `/metrics` (Prometheus) and `/healthz` on this address (port 0 picks a free
    /// port; the bound address is printed).
    #[arg(long, env = "LRTUNE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Threads of the compute pool the jobs train on (default: one per core): with
    /// `--threads 1`, several workers on one host each train on a core of their own.
    #[arg(long, env = "LRTUNE_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    #[command(flatten)]
    pub queue: QueueConfig,
    #[command(flatten)]
    pub limits: LimitsConfig,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<Outcome> {
    if let Some(name) = &args.name {
        if name.is_empty() || name.contains('@') || name.chars().any(char::is_whitespace) {
            anyhow::bail!("--name {name:?}: a name without spaces or '@' (the host is added)");
        }
    }
    let settings = WorkerProcessSettings {
        db: args.database.db,
        queue: args.queue,
        limits: args.limits.limits(),
        workers: args.workers as usize,
        name: worker_name(args.name.as_deref()),
        metrics_addr: args.metrics_addr,
        threads: args.threads.map(usize::from),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let name = settings.name.clone();
        let process = WorkerProcess::build(settings).await?;
        match process.metrics_address() {
            Some(address) => println!("lrtune worker {name} metrics on http://{address}"),
            None => println!("lrtune worker {name} started"),
        }
        std::io::stdout().flush().ok();
        process.run_until_stopped(shutdown_signal()).await
    });
    // Not the runtime's drop, which waits for every blocking task (an upload being parsed):
    // the shutdown already waited what it should.
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    served?;
    Ok(Outcome::Ok)
}
