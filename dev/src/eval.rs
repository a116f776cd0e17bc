//! `lrtune-dev eval`: scores the tune recommendation and the single range-test rules against a
//! full grid search of the planned run on the evaluation problems (see evaluate.rs), and the
//! tune's recommendation again on fresh seeds.

use clap::Args;

use crate::evaluate::{
    problems, score, summarize, ProblemScore, Summary, SweepOverrides, CHALLENGERS, FRESH_SEEDS,
    GRID_PEAKS, GRID_SEEDS,
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
    /// Leave out the problems whose name contains this (repeatable or comma-separated:
    /// `--skip holdout` scores everything but the held-out problems).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Score the tune with this many sweep candidates instead of the default.
    #[arg(long)]
    pub sweep_count: Option<usize>,
    /// Score the tune with this many sweep epochs instead of the default.
    #[arg(long)]
    pub sweep_epochs: Option<usize>,
    /// Give the tune this budget, in planned runs (`budget.plan_multiple`), instead of the
    /// default.
    #[arg(long)]
    pub plan_multiple: Option<f64>,
    /// Print every score and the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<Outcome> {
    let overrides = SweepOverrides {
        count: args.sweep_count,
        epochs: args.sweep_epochs,
        plan_multiple: args.plan_multiple,
    };
    let mut scores: Vec<ProblemScore> = Vec::new();
    for problem in problems() {
        if !selected(problem.name, args.only.as_deref(), &args.skip) {
            continue;
        }
        for seed in 0..args.seeds {
            let scored = score(&problem, seed, overrides, &mut |stage| {
                eprintln!("{stage} (seed {seed})")
            })?;
            eprintln!(
                "{} seed {seed}: grid best {:.3e}{}, tune {:.3e} ({}, |log10| {:.2}, fresh seeds {} {}, worst seed {}, over the grid's best at the same seeds {} {}), valley {} steepest {} minimum {}, compute {:.1} % of the grid, {:.1} x the plan ({:.0} s)",
                scored.problem,
                scored.grid_best,
                if scored.grid_best_at_edge { " (at the grid's edge)" } else { "" },
                scored.recommended(),
                mark(scored.tune.hit),
                scored.tune.log10_error.unwrap_or(f64::INFINITY),
                ratio(scored.fresh.loss_ratio),
                mark(scored.fresh.hit),
                ratio(scored.fresh.worst_seed_ratio),
                ratio(scored.fresh.paired_ratio()),
                mark(scored.fresh.paired_hit),
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

/// Whether `--only` and `--skip` leave a problem in.
fn selected(name: &str, only: Option<&str>, skip: &[String]) -> bool {
    only.is_none_or(|only| name.contains(only))
        && !skip.iter().any(|skip| name.contains(skip.as_str()))
}

/// The width of the problem column: the longest name, so that every row lines up.
fn name_width(scores: &[ProblemScore]) -> usize {
    scores
        .iter()
        .map(|s| s.problem.len())
        .chain(["problem".len()])
        .max()
        .unwrap_or_default()
}

/// The table: one row per score, then hits and median errors per method, the tune by the
/// nearest grid peak and by fresh seeds, and the compute.
fn report(scores: &[ProblemScore], summary: &Summary) -> String {
    let width = name_width(scores);
    let mut out = String::new();
    out.push_str(&format!(
        "grid: {GRID_PEAKS} peaks a third of a decade apart x {GRID_SEEDS} seeds, each the full planned OneCycle\n\
         run, judged on final validation loss. A hit: the grid peak nearest the learning rate is\n\
         within 5 % of the best mean loss, or within one seed standard deviation of it if wider.\n\
         fresh: the tune's peak trained as planned at {FRESH_SEEDS} fresh seeds, mean final validation loss\n\
         over the grid's best (a hit inside the same band); worst: its worst seed's. paired: the same\n\
         mean over the grid's best peak's at the same fresh seeds (a hit within the band's allowance);\n\
         ceiling: how often the grid's best peak itself lands in its band at the fresh seeds.\n\n"
    ));
    out.push_str(&format!(
        "{:<width$} {:>4} {:>10} {:>10} {:>4} {:>7} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8} {:>6} {:>6}\n",
        "problem",
        "seed",
        "grid best",
        "tune",
        "hit",
        "|log10|",
        "fresh",
        "worst",
        "paired",
        "valley",
        "steepest",
        "minimum",
        "compute",
        "x plan",
        "time"
    ));
    for s in scores {
        out.push_str(&format!(
            "{:<width$} {:>4} {:>9.2e}{} {:>10.2e} {:>4} {:>7.2} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>7.1}% {:>6.1} {:>5.0}s\n",
            s.problem,
            s.seed,
            s.grid_best,
            if s.grid_best_at_edge { "!" } else { " " },
            s.recommended(),
            mark(s.tune.hit),
            s.tune.log10_error.unwrap_or(f64::INFINITY),
            with_hit(ratio(s.fresh.loss_ratio), s.fresh.hit),
            ratio(s.fresh.worst_seed_ratio),
            with_hit(ratio(s.fresh.paired_ratio()), s.fresh.paired_hit),
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
    out.push_str("(a rule's learning rate and a fresh ratio end in + when they are a hit)\n\n");
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
    out.push_str(&format!(
        "\n{:<10} {:>13} {:>7} {:>13} {:>13} {:>13} {:>13} {:>13} {:>13}\n",
        "tune",
        "grid hits",
        "|log10|",
        "fresh hits",
        "median ratio",
        "worst ratio",
        "worst seed",
        "paired hits",
        "ceiling"
    ));
    for group in &summary.tune {
        out.push_str(&format!(
            "{:<10} {:>13} {:>7.2} {:>13} {:>13} {:>13} {:>13} {:>13} {:>13}\n",
            group.group,
            share(group.grid_hits, group.scores),
            group.median_log10_error,
            share(group.fresh_hits, group.scores),
            ratio(group.median_loss_ratio),
            ratio(group.worst_loss_ratio),
            ratio(group.worst_seed_ratio),
            share(group.paired_hits, group.scores),
            share(group.reference_hits, group.scores)
        ));
    }
    out.push_str(&challenger_report(scores, summary, width));
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
fn challenger_report(scores: &[ProblemScore], summary: &Summary, width: usize) -> String {
    let mut out = format!(
        "\nchallengers at their defaults, untuned: one planned run each at a fresh seed, final val_loss / grid best\n{:<width$} {:>4}",
        "problem", "seed"
    );
    for name in CHALLENGERS {
        out.push_str(&format!(" {name:>20}"));
    }
    out.push('\n');
    for s in scores {
        out.push_str(&format!("{:<width$} {:>4}", s.problem, s.seed));
        for challenger in &s.challengers {
            out.push_str(&format!(
                " {:>20}",
                with_hit(ratio(challenger.loss_ratio), challenger.hit)
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
            "{:<20} {hits:>13} {:>13} {:>13} {:>8.1}%\n",
            c.recipe,
            ratio(c.median_loss_ratio),
            ratio(c.worst_loss_ratio),
            c.compute_share * 100.0
        ));
    }
    out.push('\n');
    out
}

/// A loss over the grid's best, `1.23x`, or `diverged` when infinite.
fn ratio(loss_ratio: f64) -> String {
    if loss_ratio.is_finite() {
        format!("{loss_ratio:.2}x")
    } else {
        "diverged".to_string()
    }
}

/// A value with `+` after it on a hit, and a space otherwise so that the columns line up.
fn with_hit(value: String, hit: bool) -> String {
    format!("{value}{}", if hit { "+" } else { " " })
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
        Some(lr) => with_hit(format!("{lr:.1e}"), hit),
        None => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::summarize;
    use crate::evaluate::tests::scored;

    #[test]
    fn only_keeps_matching_names_and_skip_leaves_out_any_match() {
        let skip = vec!["holdout".to_string(), "m099".to_string()];
        assert!(selected("cliff-mnist180-mlp64-sgd", None, &skip));
        assert!(!selected(
            "holdout-cliff-friedman2048-tanh-mlp64-sgd",
            None,
            &skip
        ));
        assert!(!selected(
            "cliff-mnist2000-mlp256-sgd-m099",
            Some("cliff"),
            &skip
        ));
        assert!(selected("cliff-mnist180-mlp64-sgd", Some("cliff"), &[]));
        assert!(!selected("spirals-mlp-sgd", Some("cliff"), &[]));
    }

    #[test]
    fn skip_takes_comma_separated_and_repeated_values() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            eval: EvalArgs,
        }
        let cli = Cli::parse_from(["eval", "--skip", "holdout,m099", "--skip", "friedman"]);
        assert_eq!(cli.eval.skip, ["holdout", "m099", "friedman"]);
    }

    /// Names past 27 characters used to push their rows out of line with the header.
    #[test]
    fn the_table_lines_up_problem_names_longer_than_27_characters() {
        let mut long = scored(0.01, None, [true, false], 100, 100);
        long.problem = "holdout-cliff-spirals160-noisy-mlp128-sgd-m095".to_string();
        let short = scored(0.01, None, [true, false], 100, 100);
        let scores = vec![long, short];
        let table = report(&scores, &summarize(&scores));
        let lines: Vec<&str> = table.lines().collect();
        let header = lines
            .iter()
            .position(|line| line.starts_with("problem"))
            .expect("the header");
        // The seed column ends at the same place in the header and in both rows, in the
        // score table and in the challengers' table.
        let seed_end = |line: &str| line.find(" seed").map(|at| at + " seed".len());
        let end = seed_end(lines[header]).expect("a seed column");
        for row in &lines[header + 1..header + 3] {
            assert_eq!(&row[end - 2..end], " 0", "{row}");
        }
        let challengers = lines
            .iter()
            .rposition(|line| line.starts_with("problem"))
            .expect("the challengers' header");
        assert_eq!(seed_end(lines[challengers]), Some(end));
        for row in &lines[challengers + 1..challengers + 3] {
            assert_eq!(&row[end - 2..end], " 0", "{row}");
        }
    }
}
