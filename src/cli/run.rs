//! `lrtune run spec.json`: the whole job in this process, with a progress bar on stderr and
//! the recommendation on stdout.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::{plot, race, read_input, report, Outcome};
use crate::engine::compare::{run_compare_with, CompareResult};
use crate::engine::spec::JobKind;
use crate::engine::{self, Event, JobOutput, Limits, Trials, ValidSpec};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job spec (JSON), or - for standard input.
    pub spec: String,
    /// Print the full result as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Also write the range-test curve as CSV (`step,lr,loss,smoothed`) to this file.
    #[arg(long, value_name = "FILE")]
    pub curve: Option<String>,
    /// Also draw the range-test curve, the suggestions and the band to this SVG file (for a
    /// `compare` job, every recipe's validation curve and the target).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<String>,
    /// Trials run side by side: the sweep's runs of one stage (its screening, its
    /// finalists, ...) and a race's runs, each on its share of the cores. The result is the
    /// same for any number.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
}

pub fn run(args: RunArgs) -> anyhow::Result<Outcome> {
    let spec = read_spec(&args.spec)?;
    if spec.kind == JobKind::Compare {
        return run_race(&args, &spec);
    }
    let output = run_spec(&spec, args.quiet, Trials::new(args.parallel.into()))?;
    if let Some(path) = &args.curve {
        write_curve_csv(path, &output.curve)?;
    }
    if let Some(path) = &args.plot {
        plot::write_result_plot(path, "lrtune run", &output.result, &output.curve, None)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&output.result)?);
    } else {
        print!("{}", report::summary(&output.result));
    }
    Ok(Outcome::Ok)
}

fn run_race(args: &RunArgs, spec: &ValidSpec) -> anyhow::Result<Outcome> {
    if args.curve.is_some() {
        anyhow::bail!(
            "--curve writes a range-test curve; a compare job has one per recipe's tune and reports its race in --json and --plot"
        );
    }
    let result = run_compare_spec(spec, args.quiet, Trials::new(args.parallel.into()))?;
    if let Some(path) = &args.plot {
        race::write_svg(path, "lrtune run: recipe race", &result)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", race::summary(&result));
    }
    Ok(Outcome::Ok)
}

/// Reads a spec file (or - for standard input), parsed and checked against the default
/// limits.
pub fn read_spec(path: &str) -> anyhow::Result<ValidSpec> {
    let text = read_input(path)?;
    ValidSpec::parse(&text, &Limits::default())
        .map_err(|error| anyhow::anyhow!("invalid spec: {error}"))
}

/// Reads and runs a spec file locally (shared with `check`).
pub fn run_spec_file(path: &str, quiet: bool) -> anyhow::Result<JobOutput> {
    let spec = read_spec(path)?;
    if spec.kind == JobKind::Compare {
        anyhow::bail!(
            "invalid spec: kind: a compare job races recipes and has no band to check a learning rate against; run it with `lrtune run`, or check a tune spec"
        );
    }
    run_spec(&spec, quiet, Trials::serial())
}

/// Runs a `compare` spec locally, with a progress bar.
pub fn run_compare_spec(
    spec: &ValidSpec,
    quiet: bool,
    trials: Trials,
) -> anyhow::Result<CompareResult> {
    let limits = Limits::default();
    let loaded = engine::load_local_data(spec).map_err(engine_error)?;
    let cancel = AtomicBool::new(false);
    let bar = progress_bar(quiet);
    let mut observer = |event: Event| show_progress(&bar, event);
    let result = run_compare_with(spec, loaded, &limits, trials, &cancel, &mut observer)
        .map_err(engine_error);
    bar.finish_and_clear();
    result.context("running the race")
}

pub fn run_spec(spec: &ValidSpec, quiet: bool, trials: Trials) -> anyhow::Result<JobOutput> {
    let limits = Limits::default();
    let loaded = engine::load_local_data(spec).map_err(engine_error)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let bar = progress_bar(quiet);
    let mut observer = |event: Event| show_progress(&bar, event);
    let output = engine::run_job_with(spec, loaded, &limits, trials, &cancel, &mut observer)
        .map_err(engine_error);
    bar.finish_and_clear();
    output.context("running the job")
}

fn engine_error(error: engine::EngineError) -> anyhow::Error {
    match error {
        engine::EngineError::Spec(spec) => anyhow::anyhow!("invalid spec: {spec}"),
        other => anyhow::anyhow!(other),
    }
}

/// A job's stage and step count on the progress bar.
fn show_progress(bar: &ProgressBar, event: Event) {
    match event {
        Event::Stage(stage) => bar.set_message(stage),
        Event::Progress { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        Event::Point(_) | Event::SweepRun(_) | Event::RacePoint(_) | Event::Trial(_) => {}
    }
}

pub(super) fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} steps ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

pub fn write_curve_csv(path: &str, curve: &[engine::CurvePoint]) -> anyhow::Result<()> {
    let mut text = String::from("step,lr,loss,smoothed\n");
    for point in curve {
        text += &format!(
            "{},{},{},{}\n",
            point.step, point.lr, point.loss, point.smoothed
        );
    }
    std::fs::write(path, text).with_context(|| format!("writing {path}"))
}
