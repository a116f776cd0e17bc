//! `lrtune-dev`: the developers' tools, kept out of the product binary. `eval` scores the
//! recommendations against grid searches, `bench` times training steps against PyTorch, and
//! `bench-api` loads the HTTP API. Exit codes follow `lrtune`'s: 0 ok, 1 a check failed, 2 an
//! error.

mod bench;
mod bench_api;
mod eval;
mod evaluate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The same allocator as `lrtune`, so that the timings are the product's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "lrtune-dev",
    version,
    about = "lrtune's developer tools: evaluation and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Score recommendations against a full grid search on the built-in problems.
    Eval(eval::EvalArgs),
    /// Milliseconds per training step against PyTorch, tune wall time, peak memory.
    Bench(bench::BenchArgs),
    /// API latency under load: a fixed-rate request mix against a server of its own, idle and
    /// with a tune job training; exit 1 when a phase's p99 is over --max-p99-ms or a request
    /// failed.
    BenchApi(bench_api::BenchApiArgs),
}

/// What a command concluded, mapped to the process exit code.
pub enum Outcome {
    Ok,
    /// A check ran and did not pass (exit 1).
    CheckFailed,
}

fn main() -> ExitCode {
    // As in `lrtune`'s main: candle's element-wise thread pool costs more than it gains on
    // these problem sizes (see src/main.rs). Set CANDLE_NUM_THREADS to override.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Still single-threaded here: nothing else can be reading the environment.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    init_logging();
    let outcome = match cli.command {
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchApi(args) => bench_api::run(args),
    };
    match outcome {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::CheckFailed) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LRTUNE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
