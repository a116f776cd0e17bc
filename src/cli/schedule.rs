//! `lrtune schedule FILE|-` (the same JSON object as `POST /v1/schedules`, `metrics` included for
//! reduce_on_plateau) or flags for people: prints `{"lr": [...], "momentum": [...]}`, or a CSV
//! with `--csv`.

use anyhow::Context;
use clap::Args;
use serde_json::{json, Map, Value};

use super::{read_input, Outcome};
use crate::engine::schedule::Schedule;

/// The most steps a printed schedule may have.
pub const MAX_SCHEDULE_STEPS: usize = 1_000_000;

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// A JSON schedule object, or - for standard input. Without it, the flags build one.
    pub file: Option<String>,
    /// one_cycle | cyclic | cosine_warm_restarts | warmup_cosine | cosine | step
    /// (reduce_on_plateau needs its metrics: give it as JSON)
    #[arg(long, default_value = "one_cycle")]
    pub kind: String,
    /// The optimizer's learning rate (cosine, step).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub max_lr: Option<f64>,
    #[arg(long)]
    pub base_lr: Option<f64>,
    #[arg(long)]
    pub total_steps: Option<usize>,
    /// Steps to print (cyclic, cosine_warm_restarts, cosine, step).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub pct_start: Option<f64>,
    /// cos | linear
    #[arg(long)]
    pub anneal: Option<String>,
    #[arg(long)]
    pub div_factor: Option<f64>,
    #[arg(long)]
    pub final_div_factor: Option<f64>,
    #[arg(long)]
    pub three_phase: bool,
    #[arg(long)]
    pub no_cycle_momentum: bool,
    #[arg(long)]
    pub base_momentum: Option<f64>,
    #[arg(long)]
    pub max_momentum: Option<f64>,
    #[arg(long)]
    pub step_size_up: Option<usize>,
    #[arg(long)]
    pub step_size_down: Option<usize>,
    /// triangular | triangular2 | exp_range
    #[arg(long)]
    pub mode: Option<String>,
    #[arg(long)]
    pub gamma: Option<f64>,
    #[arg(long = "t0")]
    pub t_0: Option<usize>,
    #[arg(long = "t-mult")]
    pub t_mult: Option<usize>,
    #[arg(long)]
    pub eta_min: Option<f64>,
    /// CosineAnnealingLR's T_max.
    #[arg(long = "t-max")]
    pub t_max: Option<usize>,
    /// StepLR's step_size.
    #[arg(long)]
    pub step_size: Option<usize>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub start_factor: Option<f64>,
    /// Print `step,lr,momentum` rows instead of JSON.
    #[arg(long)]
    pub csv: bool,
}

pub fn run(args: ScheduleArgs) -> anyhow::Result<Outcome> {
    let value: Value = match &args.file {
        Some(path) => {
            serde_json::from_str(&read_input(path)?).context("parsing the schedule JSON")?
        }
        None => flags_to_json(&args),
    };
    let schedule = parse_schedule(value)?;
    let curve = schedule.curve();
    if args.csv {
        println!("step,lr,momentum");
        for (step, lr) in curve.lr.iter().enumerate() {
            let momentum = curve
                .momentum
                .as_ref()
                .map(|m| m[step].to_string())
                .unwrap_or_default();
            println!("{step},{lr},{momentum}");
        }
    } else {
        println!("{}", serde_json::to_string(&curve)?);
    }
    Ok(Outcome::Ok)
}

/// Parses and validates a schedule object; errors name the parameter.
pub fn parse_schedule(value: Value) -> anyhow::Result<Schedule> {
    let schedule: Schedule = serde_path_to_error::deserialize(value).map_err(|error| {
        anyhow::anyhow!("invalid schedule: {}: {}", error.path(), error.inner())
    })?;
    schedule
        .validate(MAX_SCHEDULE_STEPS)
        .map_err(|error| anyhow::anyhow!("invalid schedule: {error}"))?;
    Ok(schedule)
}

fn flags_to_json(args: &ScheduleArgs) -> Value {
    let mut object = Map::new();
    object.insert("kind".into(), json!(args.kind));
    let mut put = |name: &str, value: Option<Value>| {
        if let Some(value) = value {
            object.insert(name.to_string(), value);
        }
    };
    put("lr", args.lr.map(|v| json!(v)));
    put("max_lr", args.max_lr.map(|v| json!(v)));
    put("base_lr", args.base_lr.map(|v| json!(v)));
    put("total_steps", args.total_steps.map(|v| json!(v)));
    put("steps", args.steps.map(|v| json!(v)));
    put("pct_start", args.pct_start.map(|v| json!(v)));
    put("anneal", args.anneal.as_ref().map(|v| json!(v)));
    put("div_factor", args.div_factor.map(|v| json!(v)));
    put("final_div_factor", args.final_div_factor.map(|v| json!(v)));
    put("three_phase", args.three_phase.then_some(json!(true)));
    put(
        "cycle_momentum",
        args.no_cycle_momentum.then_some(json!(false)),
    );
    put("base_momentum", args.base_momentum.map(|v| json!(v)));
    put("max_momentum", args.max_momentum.map(|v| json!(v)));
    put("step_size_up", args.step_size_up.map(|v| json!(v)));
    put("step_size_down", args.step_size_down.map(|v| json!(v)));
    put("mode", args.mode.as_ref().map(|v| json!(v)));
    put("gamma", args.gamma.map(|v| json!(v)));
    put("T_0", args.t_0.map(|v| json!(v)));
    put("T_mult", args.t_mult.map(|v| json!(v)));
    put("eta_min", args.eta_min.map(|v| json!(v)));
    put("T_max", args.t_max.map(|v| json!(v)));
    put("step_size", args.step_size.map(|v| json!(v)));
    put("warmup_steps", args.warmup_steps.map(|v| json!(v)));
    put("start_factor", args.start_factor.map(|v| json!(v)));
    Value::Object(object)
}
