//! The `lrtune` command line: one binary with a subcommand per way of using the tool.
//! Exit codes follow ripgrep: 0 ok, 1 check failed, 2 error.

mod analyze;
mod check;
mod client;
mod plot;
mod race;
mod report;
mod run;
mod schedule;
mod serve;
mod submit;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lrtune",
    version,
    about = "Finds the learning rate before you train"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole job locally, no server: range test, sweep, recommendation.
    Run(run::RunArgs),
    /// Queue a job on a running `lrtune serve`; with --wait, follow it and print the result.
    Submit(submit::SubmitArgs),
    /// CI hook: exit 0 when --lr is inside the recommended band, 1 when not, 2 on error.
    Check(check::CheckArgs),
    /// Suggestions and warnings for a range-test curve measured elsewhere (CSV or JSON).
    Analyze(analyze::AnalyzeArgs),
    /// Print a schedule's learning rate and momentum per step.
    Schedule(Box<schedule::ScheduleArgs>),
    /// Run the HTTP service: API, job queue and workers on a SQLite file or PostgreSQL.
    Serve(Box<serve::ServeArgs>),
    /// Run jobs from a database shared with `serve` replicas, with no HTTP API.
    Worker(Box<worker::WorkerArgs>),
}

/// What a command concluded, mapped to the process exit code.
pub enum Outcome {
    Ok,
    /// A check ran and did not pass (exit 1).
    CheckFailed,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let outcome = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Submit(args) => submit::run(args),
        Command::Check(args) => check::run(args),
        Command::Analyze(args) => analyze::run(args),
        Command::Schedule(args) => schedule::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Worker(args) => worker::run(*args),
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

/// Reads a file, or standard input for `-`.
pub(crate) fn read_input(path: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
    }
}
