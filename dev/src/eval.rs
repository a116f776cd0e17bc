//! `lrtune-dev eval`: scores the tune recommendation and the single range-test rules against a
//! full grid search of the planned run on the evaluation problems (see evaluate.rs).

use clap::Args;

use crate::evaluate::{
    problems, score, summarize, ProblemScore, Summary, SweepOverrides, CHALLENGERS, GRID_PEAKS,
    GRID_SEEDS,
};
use crate::Outcome;

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
    /// Print every score and the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<Outcome> {
    let overrides = SweepOverrides {
        count: args.sweep_count,
        epochs: args.sweep_epochs,
    };
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
            let scored = score(&problem, seed, overrides, &mut |stage| {
                eprintln!("{stage} (seed {seed})")
            })?;
            eprintln!(
                "{} seed {seed}: grid best {:.3e}{}, tune {:.3e} ({}, |log10| {:.2}), valley {} steepest {} minimum {}, compute {:.1} % of the grid, {:.1} x the plan ({:.0} s)",
                scored.problem,
                scored.grid_best,
                if scored.grid_best_at_edge { " (at the grid's edge)" } else { "" },
                scored.recommended(),
                mark(scored.tune.hit),
                scored.tune.log10_error.unwrap_or(f64::INFINITY),
                mark(scored.valley.hit),
                mark(scored.steepest.hit),
                mark(scored.minimum.hit),
                scored.compute_share * 100.0,
                scored.plan_multiple,
                scored.seconds
            );
            scores.push(scored);
        }
    }
    let summary = summarize(&scores);
    if args.json {
        let report = serde_json::json!({ "scores": scores, "summary": summary });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(Outcome::Ok);
    }
    print!("{}", report(&scores, &summary));
    Ok(Outcome::Ok)
}

/// The table: one row per score, then hits and median errors per method, and the compute.
fn report(scores: &[ProblemScore], summary: &Summary) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "grid: {GRID_PEAKS} peaks a third of a decade apart x {GRID_SEEDS} seeds, each the full planned OneCycle\n\
         run, judged on final validation loss. A hit: the grid peak nearest the learning rate is\n\
         within 5 % of the best mean loss, or within one seed standard deviation of it if wider.\n\n"
    ));
    out.push_str(&format!(
        "{:<27} {:>4} {:>10} {:>10} {:>4} {:>7} {:>10} {:>10} {:>10} {:>8} {:>6} {:>6}\n",
        "problem",
        "seed",
        "grid best",
        "tune",
        "hit",
        "|log10|",
        "valley",
        "steepest",
        "minimum",
        "compute",
        "x plan",
        "time"
    ));
    for s in scores {
        out.push_str(&format!(
            "{:<27} {:>4} {:>9.2e}{} {:>10.2e} {:>4} {:>7.2} {:>10} {:>10} {:>10} {:>7.1}% {:>6.1} {:>5.0}s\n",
            s.problem,
            s.seed,
            s.grid_best,
            if s.grid_best_at_edge { "!" } else { " " },
            s.recommended(),
            mark(s.tune.hit),
            s.tune.log10_error.unwrap_or(f64::INFINITY),
            rule(s.valley.lr, s.valley.hit),
            rule(s.steepest.lr, s.steepest.hit),
            rule(s.minimum.lr, s.minimum.hit),
            s.compute_share * 100.0,
            s.plan_multiple,
            s.seconds
        ));
    }
    if scores.iter().any(|s| s.grid_best_at_edge) {
        out.push_str("! the grid's best peak is at the edge of its window: move lowest_third\n");
    }
    out.push_str("(a rule's learning rate ends in + when it is a hit)\n\n");
    out.push_str(&format!(
        "{:<10} {:>13}  median |log10(lr / grid best)|\n",
        "method", "hits"
    ));
    for method in &summary.methods {
        let hits = share(method.hits, summary.scores);
        out.push_str(&format!(
            "{:<10} {hits:>13}  {:.2}\n",
            method.method, method.median_log10_error
        ));
    }
    out.push_str(&challenger_report(scores, summary));
    out.push_str(&format!(
        "tune compute: {:.1} % of the grids' steps (all problems pooled); median {:.1} x the planned run\n",
        summary.compute_share * 100.0,
        summary.median_plan_multiple
    ));
    out.push_str(&format!("wall time: {:.0} s\n", summary.seconds));
    out
}

/// The learning-rate-free challengers: per score, each one's final loss over the grid's best
/// (`+` inside the good band), then hits, median and worst ratio and compute per challenger.
fn challenger_report(scores: &[ProblemScore], summary: &Summary) -> String {
    let mut out = format!(
        "\nchallengers at their defaults, untuned: one planned run each at a fresh seed, final val_loss / grid best\n{:<27} {:>4}",
        "problem", "seed"
    );
    for name in CHALLENGERS {
        out.push_str(&format!(" {name:>20}"));
    }
    out.push('\n');
    for s in scores {
        out.push_str(&format!("{:<27} {:>4}", s.problem, s.seed));
        for challenger in &s.challengers {
            let ratio = if challenger.loss_ratio.is_finite() {
                format!("{:.2}x", challenger.loss_ratio)
            } else {
                "diverged".to_string()
            };
            out.push_str(&format!(
                " {:>20}",
                format!("{ratio}{}", if challenger.hit { "+" } else { " " })
            ));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "{:<20} {:>13} {:>13} {:>13} {:>9}\n",
        "challenger", "hits", "median ratio", "worst ratio", "compute"
    ));
    for c in &summary.challengers {
        let hits = share(c.hits, summary.scores);
        out.push_str(&format!(
            "{:<20} {hits:>13} {:>12.2}x {:>12.2}x {:>8.1}%\n",
            c.recipe,
            c.median_loss_ratio,
            c.worst_loss_ratio,
            c.compute_share * 100.0
        ));
    }
    out.push('\n');
    out
}

/// `hits` of `of`, with its percentage: `15/48 (31 %)`.
fn share(hits: usize, of: usize) -> String {
    format!(
        "{hits}/{of} ({:.0} %)",
        100.0 * hits as f64 / of.max(1) as f64
    )
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
