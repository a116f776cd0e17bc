//! How good is a recommendation? For a problem, a full grid search of the planned run
//! (peak learning rates a third of a decade apart, several seeds, every epoch of the plan)
//! finds the best peaks; a `tune` job and the single range-test rules are then scored on
//! whether they land among them, and on how much compute they spent relative to the grid.

use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use super::spec::{Candidates, JobKind, JobSpec, Limits};
use super::{load_local_data, run_job, EngineError, Event};

/// One problem of the evaluation: a tune spec and the grid to search for it.
#[derive(Debug, Clone)]
pub struct Problem {
    pub name: &'static str,
    pub spec: &'static str,
    /// The grid is 10^(k/3) for k in this range (inclusive).
    pub grid_thirds: (i32, i32),
}

/// The built-in problems: generated data and MNIST, SGD and Adam, classification and
/// regression, each with a planned run long enough that the peak matters.
pub fn problems() -> Vec<Problem> {
    vec![
        Problem {
            name: "spirals-mlp-sgd",
            spec: r#"{"data": {"builtin": "spirals", "samples": 2048}, "model": {"arch": "mlp", "hidden": [64, 64]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 32, "plan": {"epochs": 10}}"#,
            grid_thirds: (-9, 2),
        },
        Problem {
            name: "blobs-mlp-adam",
            spec: r#"{"data": {"builtin": "blobs", "samples": 4096}, "model": {"arch": "mlp", "hidden": [64]},
                      "optimizer": {"name": "adam"}, "batch_size": 64, "plan": {"epochs": 8}}"#,
            grid_thirds: (-13, -2),
        },
        Problem {
            name: "sine-mlp-sgd",
            spec: r#"{"data": {"builtin": "sine", "samples": 2048}, "model": {"arch": "mlp", "hidden": [64, 64], "activation": "tanh"},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 32, "plan": {"epochs": 10}}"#,
            grid_thirds: (-9, 1),
        },
        Problem {
            name: "mnist-mlp-sgd",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [128]},
                      "optimizer": {"name": "sgd", "momentum": 0.9}, "batch_size": 64, "plan": {"epochs": 5}}"#,
            grid_thirds: (-9, 1),
        },
        Problem {
            name: "mnist-linear-adamw",
            spec: r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "linear"},
                      "optimizer": {"name": "adamw"}, "batch_size": 128, "plan": {"epochs": 5}}"#,
            grid_thirds: (-13, -3),
        },
    ]
}

/// Whether a learning rate lands among the grid's best peaks: the grid point nearest to it
/// (in log space) is one of them.
fn lands_among(lr: Option<f64>, grid: &[GridPoint]) -> bool {
    let Some(lr) = lr else { return false };
    grid.iter()
        .min_by(|a, b| {
            (a.peak_lr / lr)
                .ln()
                .abs()
                .total_cmp(&(b.peak_lr / lr).ln().abs())
        })
        .is_some_and(|nearest| nearest.good)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridPoint {
    pub peak_lr: f64,
    pub val_loss: f64,
    /// Within 5 % of the best grid loss.
    pub good: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemScore {
    pub problem: String,
    pub grid: Vec<GridPoint>,
    pub grid_best: f64,
    pub grid_steps: usize,
    pub recommended: f64,
    pub tune_steps: usize,
    /// Tune steps as a share of the grid's steps.
    pub compute_share: f64,
    pub hit_tune: bool,
    pub hit_valley: bool,
    pub hit_steepest: bool,
    pub hit_minimum: bool,
    pub valley: Option<f64>,
    pub steepest: Option<f64>,
    pub minimum: Option<f64>,
}

/// Grid seeds: enough to average out most of one run's noise.
pub const GRID_SEEDS: usize = 2;

/// Overrides of the tune's sweep settings, to compare other defaults on the same grids.
#[derive(Debug, Clone, Copy, Default)]
pub struct SweepOverrides {
    pub count: Option<usize>,
    pub epochs: Option<usize>,
}

pub fn score(
    problem: &Problem,
    seed: u64,
    overrides: SweepOverrides,
    progress: &mut dyn FnMut(&str),
) -> Result<ProblemScore, EngineError> {
    let limits = Limits {
        max_sweep_epochs: 10_000,
        ..Limits::default()
    };
    let cancel = AtomicBool::new(false);
    let mut tune_spec = JobSpec::from_json(problem.spec)?;
    tune_spec.seed = seed;
    if let Some(count) = overrides.count {
        tune_spec.sweep.count = count;
    }
    if let Some(epochs) = overrides.epochs {
        tune_spec.sweep.epochs = epochs;
    }
    tune_spec.validate(&limits)?;

    progress(&format!("{}: tune", problem.name));
    let tune = run_job(
        &tune_spec,
        load_local_data(&tune_spec)?,
        &limits,
        &cancel,
        &mut |_: Event| {},
    )?;

    let grid_lrs: Vec<f64> = (problem.grid_thirds.0..=problem.grid_thirds.1)
        .map(|k| 10f64.powf(k as f64 / 3.0))
        .collect();
    let mut grid_spec = tune_spec.clone();
    grid_spec.kind = JobKind::Sweep;
    grid_spec.sweep.candidates = Candidates::List(grid_lrs);
    grid_spec.sweep.epochs = grid_spec.plan.epochs;
    grid_spec.sweep.seeds = GRID_SEEDS;
    // Grid seeds differ from the tune's seed, so the tune is scored on runs it never saw.
    grid_spec.seed = seed + 1000;
    progress(&format!("{}: grid", problem.name));
    let grid_run = run_job(
        &grid_spec,
        load_local_data(&grid_spec)?,
        &limits,
        &cancel,
        &mut |_: Event| {},
    )?;
    let best_loss = grid_run
        .result
        .sweep
        .iter()
        .map(|c| c.val_loss)
        .fold(f64::INFINITY, f64::min);
    let grid: Vec<GridPoint> = grid_run
        .result
        .sweep
        .iter()
        .map(|c| GridPoint {
            peak_lr: c.peak_lr,
            val_loss: c.val_loss,
            good: c.val_loss.is_finite() && c.val_loss <= best_loss * 1.05,
        })
        .collect();
    let grid_best = grid_run.result.recommendation.peak_lr;
    let suggestions = tune
        .result
        .range_test
        .as_ref()
        .map(|r| r.suggestions)
        .unwrap_or_default();
    let recommended = tune.result.recommendation.peak_lr;
    let grid_steps = grid_run.result.timing.total_steps;
    let tune_steps = tune.result.timing.total_steps;
    Ok(ProblemScore {
        problem: problem.name.to_string(),
        hit_tune: lands_among(Some(recommended), &grid),
        hit_valley: lands_among(suggestions.valley, &grid),
        hit_steepest: lands_among(suggestions.steepest, &grid),
        hit_minimum: lands_among(suggestions.minimum, &grid),
        grid,
        grid_best,
        grid_steps,
        recommended,
        tune_steps,
        compute_share: tune_steps as f64 / grid_steps.max(1) as f64,
        valley: suggestions.valley,
        steepest: suggestions.steepest,
        minimum: suggestions.minimum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(points: &[(f64, bool)]) -> Vec<GridPoint> {
        points
            .iter()
            .map(|&(peak_lr, good)| GridPoint {
                peak_lr,
                val_loss: 0.0,
                good,
            })
            .collect()
    }

    #[test]
    fn a_learning_rate_lands_among_the_best_when_its_nearest_grid_point_is_good() {
        let grid = grid(&[(0.001, false), (0.01, true), (0.1, false)]);
        assert!(lands_among(Some(0.012), &grid));
        assert!(
            lands_among(Some(0.025), &grid),
            "nearer 0.01 than 0.1 in log space"
        );
        assert!(!lands_among(Some(0.04), &grid));
        assert!(!lands_among(Some(0.002), &grid));
        assert!(!lands_among(None, &grid));
    }

    #[test]
    fn every_problem_spec_parses_and_validates() {
        for problem in problems() {
            let spec = JobSpec::from_json(problem.spec)
                .unwrap_or_else(|e| panic!("{}: {e}", problem.name));
            spec.validate(&Limits::default())
                .unwrap_or_else(|e| panic!("{}: {e}", problem.name));
        }
    }
}
