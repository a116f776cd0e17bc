//! Short OneCycle trainings at candidate peak learning rates, each from the same initial
//! weights and data order, judged on validation loss (DESIGN section 3). This is what checks
//! the range test's suggestions instead of trusting one rule.

use serde::{Deserialize, Serialize};

use super::model::Model;
use super::optim::Optimizer;
use super::rng::Rng;
use super::schedule::Schedule;
use super::spec::OptimizerSpec;
use super::suggest::Suggestions;
use super::train::{evaluate, train_step, BatchOrder, DeviceData};
use super::{Control, EngineError, Event};

/// One training run at one candidate peak with one seed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SweepRun {
    pub peak_lr: f64,
    pub seed: u64,
    pub val_loss: f64,
    pub val_accuracy: Option<f64>,
    /// Mean training loss over the last tenth of the run.
    pub train_loss: f64,
    pub diverged: bool,
}

/// A candidate's runs over all seeds, as the result reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepCandidate {
    pub peak_lr: f64,
    /// Mean over seeds (infinite when any run diverged).
    pub val_loss: f64,
    pub val_loss_std: f64,
    pub val_accuracy: Option<f64>,
    pub diverged: bool,
    pub in_band: bool,
    pub best: bool,
}

/// Candidates for `"auto"`: `count` values log-spaced from valley / 3 to edge, with the one
/// nearest to valley (in log space) replaced by valley itself.
pub fn auto_candidates(suggestions: &Suggestions, count: usize) -> Option<Vec<f64>> {
    let valley = suggestions
        .valley
        .or(suggestions.minimum)
        .or(suggestions.steepest)?;
    let mut low = valley / 3.0;
    let mut high = suggestions.edge.unwrap_or(valley * 10.0);
    if high <= low * 1.5 {
        // The curve's minimum sits at or below the valley: centre a decade on the valley.
        low = valley / 3.0;
        high = valley * 3.0;
    }
    let count = count.max(2);
    let mut values: Vec<f64> = (0..count)
        .map(|i| low * (high / low).powf(i as f64 / (count - 1) as f64))
        .collect();
    let nearest = values
        .iter()
        .enumerate()
        .min_by(|a, b| {
            (a.1 / valley)
                .ln()
                .abs()
                .total_cmp(&(b.1 / valley).ln().abs())
        })
        .map(|(index, _)| index)?;
    values[nearest] = valley;
    values.sort_by(f64::total_cmp);
    values.dedup();
    Some(values)
}

pub struct SweepSetup<'a> {
    pub model: &'a Model,
    pub optimizer: &'a OptimizerSpec,
    pub train: &'a DeviceData,
    pub validation: &'a DeviceData,
    pub batch_size: usize,
    /// Data-order seed of this sweep's seed index.
    pub seed: u64,
    pub steps: usize,
}

/// Trains each candidate once from the model's current weights, which are put back after
/// every run.
pub fn sweep_one_seed(
    setup: &SweepSetup<'_>,
    candidates: &[f64],
    schedule_for: &dyn Fn(f64) -> Schedule,
    control: &mut Control<'_>,
) -> Result<Vec<SweepRun>, EngineError> {
    let initial = setup.model.snapshot()?;
    let mut runs = Vec::with_capacity(candidates.len());
    for &peak_lr in candidates {
        let outcome = train_candidate(setup, peak_lr, &schedule_for(peak_lr), control);
        setup.model.restore(&initial)?;
        let run = outcome?;
        control.emit(Event::SweepRun(run));
        runs.push(run);
    }
    Ok(runs)
}

fn train_candidate(
    setup: &SweepSetup<'_>,
    peak_lr: f64,
    schedule: &Schedule,
    control: &mut Control<'_>,
) -> Result<SweepRun, EngineError> {
    let mut optimizer = Optimizer::new(setup.optimizer, setup.model.vars());
    let mut order = BatchOrder::new(setup.train.rows, setup.batch_size, setup.seed);
    let mut dropout_rng = Rng::derive(setup.seed, 0xd50);
    let default_momentum = setup.optimizer.momentum();
    let tail_start = setup.steps - (setup.steps / 10).max(1);
    let (mut tail_sum, mut tail_count) = (0.0, 0usize);
    for step in 0..setup.steps {
        control.check_cancel()?;
        let lr = schedule.lr_at(step);
        let momentum = schedule.momentum_at(step).unwrap_or(default_momentum);
        let loss = train_step(
            setup.model,
            &mut optimizer,
            setup.train,
            order.next_batch(),
            lr,
            momentum,
            &mut dropout_rng,
        )?;
        control.step_done();
        if !loss.is_finite() {
            // The rest of this run is planned work that will not happen.
            control.skip_steps(setup.steps - step - 1);
            return Ok(SweepRun {
                peak_lr,
                seed: setup.seed,
                val_loss: f64::INFINITY,
                val_accuracy: None,
                train_loss: loss,
                diverged: true,
            });
        }
        if step >= tail_start {
            tail_sum += loss;
            tail_count += 1;
        }
    }
    let evaluation = evaluate(setup.model, setup.validation)?;
    let diverged = !evaluation.loss.is_finite();
    Ok(SweepRun {
        peak_lr,
        seed: setup.seed,
        val_loss: if diverged {
            f64::INFINITY
        } else {
            evaluation.loss
        },
        val_accuracy: evaluation.accuracy,
        train_loss: tail_sum / tail_count.max(1) as f64,
        diverged,
    })
}

/// Groups runs by candidate, picks the best (lowest mean validation loss; a candidate with
/// any diverged run loses) and marks the band: every candidate within 5 % of the best loss,
/// or within one standard deviation of it when there are several seeds.
pub fn judge(candidates: &[f64], runs: &[SweepRun], seeds: usize) -> Vec<SweepCandidate> {
    let mut judged: Vec<SweepCandidate> = candidates
        .iter()
        .map(|&peak_lr| {
            let mine: Vec<&SweepRun> = runs.iter().filter(|run| run.peak_lr == peak_lr).collect();
            let diverged = mine.iter().any(|run| run.diverged);
            let count = mine.len().max(1) as f64;
            let mean = if diverged {
                f64::INFINITY
            } else {
                mine.iter().map(|run| run.val_loss).sum::<f64>() / count
            };
            let std = if diverged || mine.len() < 2 {
                0.0
            } else {
                (mine
                    .iter()
                    .map(|run| (run.val_loss - mean).powi(2))
                    .sum::<f64>()
                    / (count - 1.0))
                    .sqrt()
            };
            let accuracies: Vec<f64> = mine.iter().filter_map(|run| run.val_accuracy).collect();
            SweepCandidate {
                peak_lr,
                val_loss: mean,
                val_loss_std: std,
                val_accuracy: (!accuracies.is_empty() && !diverged)
                    .then(|| accuracies.iter().sum::<f64>() / accuracies.len() as f64),
                diverged,
                in_band: false,
                best: false,
            }
        })
        .collect();
    let best = judged
        .iter()
        .enumerate()
        .filter(|(_, candidate)| candidate.val_loss.is_finite())
        .min_by(|a, b| a.1.val_loss.total_cmp(&b.1.val_loss))
        .map(|(index, _)| index);
    if let Some(best) = best {
        let best_loss = judged[best].val_loss;
        let tolerance = if seeds > 1 {
            judged[best].val_loss_std
        } else {
            0.05 * best_loss.abs()
        };
        for candidate in &mut judged {
            candidate.in_band =
                candidate.val_loss.is_finite() && candidate.val_loss <= best_loss + tolerance;
        }
        judged[best].best = true;
        judged[best].in_band = true;
    }
    judged
}

/// The band's edges: from the lowest to the highest candidate in the band. When only the
/// best candidate is in it, the band reaches halfway (in log space) to its neighbours, so a
/// learning rate a little off the tested point is not reported as outside.
pub fn band(judged: &[SweepCandidate]) -> Option<[f64; 2]> {
    let mut sorted: Vec<&SweepCandidate> = judged.iter().collect();
    sorted.sort_by(|a, b| a.peak_lr.total_cmp(&b.peak_lr));
    let first = sorted.iter().position(|c| c.in_band)?;
    let last = sorted.iter().rposition(|c| c.in_band)?;
    let (mut low, mut high) = (sorted[first].peak_lr, sorted[last].peak_lr);
    if first == last {
        if first > 0 {
            low = (low * sorted[first - 1].peak_lr).sqrt();
        }
        if last + 1 < sorted.len() {
            high = (high * sorted[last + 1].peak_lr).sqrt();
        }
    }
    Some([low, high])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(peak_lr: f64, seed: u64, val_loss: f64) -> SweepRun {
        SweepRun {
            peak_lr,
            seed,
            val_loss,
            val_accuracy: None,
            train_loss: val_loss,
            diverged: !val_loss.is_finite(),
        }
    }

    #[test]
    fn auto_candidates_span_valley_over_three_to_edge_and_include_valley() {
        let suggestions = Suggestions {
            valley: Some(1e-3),
            steepest: Some(3e-3),
            minimum: Some(1e-2),
            edge: Some(1e-1),
        };
        let values = auto_candidates(&suggestions, 5).unwrap();
        assert_eq!(values.len(), 5);
        assert!((values[0] - 1e-3 / 3.0).abs() < 1e-15);
        assert!((values[4] - 1e-1).abs() < 1e-15);
        assert!(values.contains(&1e-3));
        assert!(values.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn the_best_candidate_has_the_lowest_loss_and_a_diverged_one_loses() {
        let candidates = [0.01, 0.1, 1.0];
        let runs = [
            run(0.01, 0, 0.50),
            run(0.1, 0, 0.30),
            run(1.0, 0, f64::INFINITY),
        ];
        let judged = judge(&candidates, &runs, 1);
        assert!(judged[1].best);
        assert!(judged[2].diverged && !judged[2].in_band);
        assert!(!judged[0].in_band, "0.50 is not within 5 % of 0.30");
        // Alone in the band: it reaches halfway (log) to each neighbour.
        let [low, high] = band(&judged).unwrap();
        assert!((low - (0.01f64 * 0.1).sqrt()).abs() < 1e-12);
        assert!((high - (0.1f64 * 1.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn candidates_within_five_percent_join_the_band() {
        let candidates = [0.01, 0.03, 0.1, 0.3];
        let runs = [
            run(0.01, 0, 0.40),
            run(0.03, 0, 0.31),
            run(0.1, 0, 0.30),
            run(0.3, 0, 0.314),
        ];
        let judged = judge(&candidates, &runs, 1);
        assert_eq!(judged.iter().filter(|c| c.in_band).count(), 3);
        assert_eq!(band(&judged), Some([0.03, 0.3]));
    }

    #[test]
    fn with_several_seeds_the_band_is_one_standard_deviation() {
        let candidates = [0.01, 0.1];
        let runs = [
            run(0.01, 0, 0.36),
            run(0.01, 1, 0.38),
            run(0.1, 0, 0.30),
            run(0.1, 1, 0.40),
        ];
        let judged = judge(&candidates, &runs, 2);
        // Means 0.37 and 0.35; std of the best = sqrt(0.005) = 0.0707: 0.37 is inside.
        assert!(judged[1].best);
        assert!(judged[0].in_band);
    }
}
