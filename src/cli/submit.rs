//! `lrtune submit spec.json --server URL`: queues a job on a running `lrtune serve`, and with
//! `--wait` follows it to the end with a progress bar and prints the recommendation (for a
//! `compare` job, the race's table and verdict).

use clap::Args;

use super::client::{finished_as, Client, JobUpdate, RemoteJob};
use super::{race, read_input, report, run, Outcome};
use crate::engine::compare::CompareResult;
use crate::engine::JobResult;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job spec (JSON), or - for standard input.
    pub spec: String,
    /// Base URL of a running `lrtune serve`, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// Bearer token, when the server was started with one.
    #[arg(long, env = "LRTUNE_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Follow the job until it finishes, then print the recommendation.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON: the job as queued, or with --wait the full result.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: SubmitArgs) -> anyhow::Result<Outcome> {
    let spec = read_input(&args.spec)?;
    let client = Client::new(&args.server, args.token)?;
    if !args.wait {
        let (job, body) = client.submit(&spec)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&body)?);
        } else {
            println!("{}", job.id);
        }
        return Ok(Outcome::Ok);
    }
    let finished = submit_and_follow(&client, &spec, args.quiet)?;
    if finished.kind == "compare" {
        let result: CompareResult = finished_as(&finished)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        } else {
            print!("{}", race::summary(&result));
        }
        return Ok(Outcome::Ok);
    }
    let result: JobResult = finished_as(&finished)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", report::summary(&result));
    }
    Ok(Outcome::Ok)
}

/// Submits a spec and follows the job to its end: the job's id and its result, or an error
/// saying why there is none (refused, failed, canceled, server gone).
pub fn submit_and_wait(
    client: &Client,
    spec: &str,
    quiet: bool,
) -> anyhow::Result<(String, JobResult)> {
    let finished = submit_and_follow(client, spec, quiet)?;
    let result = finished_as(&finished)?;
    Ok((finished.id, result))
}

/// Submits a spec and follows the job to its end, with a progress bar: the finished job.
fn submit_and_follow(client: &Client, spec: &str, quiet: bool) -> anyhow::Result<RemoteJob> {
    let (job, _) = client.submit(spec)?;
    if !quiet {
        eprintln!("submitted job {}", job.id);
    }
    let bar = run::progress_bar(quiet);
    let mut on_update = |update: JobUpdate| match update {
        JobUpdate::Progress { stage, done, total } => {
            if let Some(stage) = stage {
                bar.set_message(stage);
            }
            bar.set_length(total);
            bar.set_position(done);
        }
        JobUpdate::Status(status) => bar.set_message(status),
    };
    let finished = client.wait(&job.id, &mut on_update);
    bar.finish_and_clear();
    finished
}
