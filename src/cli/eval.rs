//! `lrtune eval`: scores the tune recommendation and the single range-test rules against a
//! full grid search of the planned run on the built-in problems (see engine/evaluate.rs).

use clap::Args;

use super::Outcome;
use crate::engine::evaluate::{problems, score, ProblemScore, SweepOverrides, GRID_SEEDS};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Seeds per problem for the tune (each scored against its own grid).
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Only the problems whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    /// Score the tune with this many sweep candidates instead of the default.
    #[arg(long)]
    pub sweep_count: Option<usize>,
    /// Score the tune with this many sweep epochs instead of the default.
    #[arg(long)]
    pub sweep_epochs: Option<usize>,
    /// Print every score as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<Outcome> {
    let mut scores: Vec<ProblemScore> = Vec::new();
    for problem in problems() {
        if args
            .only
            .as_ref()
            .is_some_and(|only| !problem.name.contains(only.as_str()))
        {
            continue;
        }
        for seed in 0..args.seeds {
            let started = std::time::Instant::now();
            let overrides = SweepOverrides {
                count: args.sweep_count,
                epochs: args.sweep_epochs,
            };
            let scored = score(&problem, seed, overrides, &mut |stage| {
                eprintln!("{stage} (seed {seed})")
            })?;
            eprintln!(
                "{} seed {seed}: grid best {:.3e}, tune {:.3e} ({}), valley {} steepest {} minimum {}, compute {:.1} % ({:.0} s)",
                scored.problem,
                scored.grid_best,
                scored.recommended,
                mark(scored.hit_tune),
                mark(scored.hit_valley),
                mark(scored.hit_steepest),
                mark(scored.hit_minimum),
                scored.compute_share * 100.0,
                started.elapsed().as_secs_f64()
            );
            scores.push(scored);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&scores)?);
        return Ok(Outcome::Ok);
    }
    let rate = |hit: fn(&ProblemScore) -> bool| {
        let hits = scores.iter().filter(|s| hit(s)).count();
        format!(
            "{hits}/{} ({:.0} %)",
            scores.len(),
            100.0 * hits as f64 / scores.len().max(1) as f64
        )
    };
    println!(
        "grid: peaks a third of a decade apart, {GRID_SEEDS} seeds, full planned run; a hit is a"
    );
    println!(
        "learning rate whose nearest grid peak is within 5 % of the best grid validation loss"
    );
    println!(
        "{:<20} {:>10} {:>10} {:>5} {:>10} {:>10} {:>10} {:>8}",
        "problem", "grid best", "tune", "hit", "valley", "steepest", "minimum", "compute"
    );
    for s in &scores {
        println!(
            "{:<20} {:>10.2e} {:>10.2e} {:>5} {:>10} {:>10} {:>10} {:>7.1}%",
            s.problem,
            s.grid_best,
            s.recommended,
            mark(s.hit_tune),
            rule(s.valley, s.hit_valley),
            rule(s.steepest, s.hit_steepest),
            rule(s.minimum, s.hit_minimum),
            s.compute_share * 100.0
        );
    }
    let mean_share =
        scores.iter().map(|s| s.compute_share).sum::<f64>() / scores.len().max(1) as f64;
    println!(
        "hit rate: tune {}, valley {}, steepest {}, minimum {}",
        rate(|s| s.hit_tune),
        rate(|s| s.hit_valley),
        rate(|s| s.hit_steepest),
        rate(|s| s.hit_minimum)
    );
    println!(
        "mean compute of a tune: {:.1} % of the grid",
        mean_share * 100.0
    );
    Ok(Outcome::Ok)
}

fn mark(hit: bool) -> &'static str {
    if hit {
        "yes"
    } else {
        "no"
    }
}

fn rule(lr: Option<f64>, hit: bool) -> String {
    match lr {
        Some(lr) => format!("{lr:.1e}{}", if hit { "+" } else { " " }),
        None => "-".to_string(),
    }
}
