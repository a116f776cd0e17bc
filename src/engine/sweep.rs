//! OneCycle trainings at candidate peak learning rates, each from the same initial weights and
//! data order, judged on validation loss (DESIGN section 3). This is what checks the range
//! test's suggestions instead of trusting one rule. Candidates are judged at the horizon the
//! recommendation is for, the planned run, as far as the budget allows: a short run favours
//! high peaks that overfit over a long plan (`plan_search`, `Search::run`).

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
    /// The run's length (its OneCycle's total steps): the horizon it was judged at.
    pub steps: usize,
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
    /// The horizon this candidate was trained to, in steps and in epochs.
    pub steps: usize,
    pub epochs: f64,
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

/// How a sweep spends its budget: every candidate at one horizon, or (successive halving)
/// every candidate at a short screening horizon and the best few again at the final one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchPlan {
    /// Steps of the screening runs, when there is a screening.
    pub screen_steps: Option<usize>,
    /// Candidates carried to the final horizon.
    pub finalists: usize,
    /// Steps of the runs the recommendation is judged on.
    pub final_steps: usize,
}

/// Candidates carried from the screening to the planned horizon: two, so that the final
/// judgement is a comparison, and the range can then be extended from the better one.
pub const FINALISTS: usize = 2;

/// Chooses the horizons for `candidates` x `seeds` runs within `available` steps. A horizon
/// fixed by the spec is kept. Otherwise every candidate runs the whole planned run when the
/// budget allows; else they are screened at up to a third of it (never under a tenth, nor
/// under `min_steps`) and the best [`FINALISTS`] run the whole plan; else, when not even that
/// fits, every candidate runs as long as the budget allows, and the result says so.
pub fn plan_search(
    candidates: usize,
    seeds: usize,
    plan_steps: usize,
    fixed_steps: Option<usize>,
    available: usize,
    min_steps: usize,
) -> SearchPlan {
    let every = |final_steps| SearchPlan {
        screen_steps: None,
        finalists: candidates,
        final_steps,
    };
    if let Some(steps) = fixed_steps {
        return every(steps);
    }
    let runs = (candidates * seeds).max(1);
    // Every candidate at full length only with room left for a second seed of the best two:
    // one seed of each is noisy on small data, and screening is the cheaper way to spend it.
    if runs * plan_steps + FINALISTS * seeds * plan_steps <= available
        || (candidates <= FINALISTS && runs * plan_steps <= available)
    {
        return every(plan_steps);
    }
    let finalists = FINALISTS.min(candidates);
    let final_cost = finalists * seeds * plan_steps;
    if final_cost < available {
        let screen = ((available - final_cost) / runs).min(plan_steps / 3);
        if screen >= min_steps.max(plan_steps / 10) {
            return SearchPlan {
                screen_steps: Some(screen),
                finalists,
                final_steps: plan_steps,
            };
        }
    }
    every((available / runs).min(plan_steps))
}

/// Which way a better peak may lie when the best final candidate sits at an end of the
/// range tried and the budget did not allow a step past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenEdge {
    Lower,
    Higher,
}

/// What a sweep needs to train candidates.
pub struct Search<'a> {
    /// The model at its initial weights (the range test's, restored): seed index 0.
    pub model: &'a Model,
    /// Builds the model of another seed (its own initialisation).
    pub build_model: &'a dyn Fn(u64) -> Result<Model, EngineError>,
    pub optimizer: &'a OptimizerSpec,
    pub train: &'a DeviceData,
    pub validation: &'a DeviceData,
    pub batch_size: usize,
    pub seed: u64,
    pub seeds: usize,
    /// The OneCycle schedule for a peak and a length.
    pub schedule_for: &'a dyn Fn(f64, usize) -> Schedule,
    /// Whether the range may be extended past its ends (auto candidates; an explicit list
    /// is the user's).
    pub extend: bool,
}

/// Every run of a sweep, and what the search concluded.
pub struct SearchOutcome {
    pub runs: Vec<SweepRun>,
    pub final_steps: usize,
    /// Set when the best final candidate is at an end of the range and no step past it was
    /// taken (an explicit list, or no budget left).
    pub open_edge: Option<OpenEdge>,
}

/// Most steps past the ends of the range.
const MAX_EXTENSIONS: usize = 4;

impl Search<'_> {
    /// Runs the plan within `budget` steps: the screening, the finalists at the final
    /// horizon, then (auto candidates) steps past the end of the range while the best final
    /// candidate sits at it, then a second seed for the two best when they are within 5 %
    /// of each other. Each run starts from its seed's initial weights and data order.
    pub fn run(
        &self,
        candidates: &[f64],
        plan: SearchPlan,
        budget: usize,
        control: &mut Control<'_>,
    ) -> Result<SearchOutcome, EngineError> {
        let started = control.steps_done();
        let mut seeds = SeedModels::new(self);
        let mut runs: Vec<SweepRun> = Vec::new();
        let finalists = match plan.screen_steps {
            Some(screen_steps) => {
                for seed_index in 0..self.seeds {
                    for &peak_lr in candidates {
                        runs.push(seeds.train(peak_lr, seed_index, screen_steps, control)?);
                    }
                }
                finalists(&judge(candidates, &runs), plan.finalists)
            }
            None => candidates.to_vec(),
        };
        let final_steps = plan.final_steps;
        for seed_index in 0..self.seeds {
            for &peak_lr in &finalists {
                runs.push(seeds.train(peak_lr, seed_index, final_steps, control)?);
            }
        }
        let left = |control: &Control<'_>| budget.saturating_sub(control.steps_done() - started);
        let ratio = spacing(candidates);
        let highest_screened = candidates.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut open_edge = None;
        let mut extensions = 0;
        loop {
            let (best, lowest, highest, tried) = final_extremes(&runs, final_steps);
            let Some(best) = best else { break };
            open_edge = if tried < 2 && !self.extend {
                None
            } else if best == lowest {
                Some((OpenEdge::Lower, best / ratio))
            } else if best == highest && best >= highest_screened {
                // Higher peaks screened out at a shorter horizon, which favours high
                // peaks, would only do worse at the final one: no need to try them.
                Some((OpenEdge::Higher, best * ratio))
            } else {
                None
            };
            let Some((_, next)) = open_edge else { break };
            if !self.extend
                || extensions == MAX_EXTENSIONS
                || left(control) < self.seeds * final_steps
            {
                break;
            }
            for seed_index in 0..self.seeds {
                runs.push(seeds.train(next, seed_index, final_steps, control)?);
            }
            extensions += 1;
        }
        if self.seeds == 1 && left(control) >= 2 * final_steps {
            let mut at_final = final_candidates(&runs, final_steps);
            at_final.sort_by(|a, b| a.val_loss.total_cmp(&b.val_loss));
            if let [first, second, ..] = &at_final[..] {
                let close = second.val_loss.is_finite()
                    && second.val_loss - first.val_loss < 0.05 * first.val_loss.abs();
                if close {
                    for peak_lr in [first.peak_lr, second.peak_lr] {
                        runs.push(seeds.train(peak_lr, 1, final_steps, control)?);
                    }
                }
            }
        }
        Ok(SearchOutcome {
            runs,
            final_steps,
            open_edge: open_edge.map(|(edge, _)| edge),
        })
    }
}

/// The candidates carried from a screening to the final horizon: the best screened and the
/// ones just below it. A short run favours high peaks, so the best peak of the whole run lies
/// at or below the screening's best, never above it (all diverged: the lowest ones).
fn finalists(screened: &[SweepCandidate], count: usize) -> Vec<f64> {
    let mut peaks: Vec<&SweepCandidate> = screened.iter().collect();
    peaks.sort_by(|a, b| a.peak_lr.total_cmp(&b.peak_lr));
    let best = peaks.iter().position(|c| c.best).unwrap_or(0);
    let end = (best + 1).max(count.min(peaks.len()));
    let start = end.saturating_sub(count);
    peaks[start..end].iter().map(|c| c.peak_lr).collect()
}

/// The candidates judged at `steps`.
pub fn final_candidates(runs: &[SweepRun], steps: usize) -> Vec<SweepCandidate> {
    let at: Vec<SweepRun> = runs
        .iter()
        .copied()
        .filter(|run| run.steps == steps)
        .collect();
    let mut peaks: Vec<f64> = at.iter().map(|run| run.peak_lr).collect();
    peaks.sort_by(f64::total_cmp);
    peaks.dedup();
    judge(&peaks, &at)
}

/// The best, lowest and highest peak tried at `steps`, and how many were.
fn final_extremes(runs: &[SweepRun], steps: usize) -> (Option<f64>, f64, f64, usize) {
    let judged = final_candidates(runs, steps);
    let best = judged.iter().find(|c| c.best).map(|c| c.peak_lr);
    let lowest = judged.first().map_or(f64::NAN, |c| c.peak_lr);
    let highest = judged.last().map_or(f64::NAN, |c| c.peak_lr);
    (best, lowest, highest, judged.len())
}

/// The ratio between neighbouring candidates (at least 2): how far a step past the range goes.
fn spacing(candidates: &[f64]) -> f64 {
    let (low, high) = (candidates.first(), candidates.last());
    match (low, high) {
        (Some(&low), Some(&high)) if candidates.len() > 1 && low > 0.0 => (high / low)
            .powf(1.0 / (candidates.len() - 1) as f64)
            .max(2.0),
        _ => 3.0,
    }
}

/// The model of each seed, built when first needed, with its initial weights to put back
/// after every run.
struct SeedModels<'s, 'a> {
    search: &'s Search<'a>,
    initial: Vec<Vec<candle_core::Tensor>>,
    others: Vec<Model>,
}

impl<'s, 'a> SeedModels<'s, 'a> {
    fn new(search: &'s Search<'a>) -> Self {
        Self {
            search,
            initial: Vec::new(),
            others: Vec::new(),
        }
    }

    fn train(
        &mut self,
        peak_lr: f64,
        seed_index: usize,
        steps: usize,
        control: &mut Control<'_>,
    ) -> Result<SweepRun, EngineError> {
        while self.initial.len() <= seed_index {
            let index = self.initial.len();
            if index > 0 {
                let model = (self.search.build_model)(self.search.seed + index as u64)?;
                self.others.push(model);
            }
            let model = self.model(index);
            self.initial.push(model.snapshot()?);
        }
        let search = self.search;
        let model = self.model(seed_index);
        let setup = SweepSetup {
            model,
            optimizer: search.optimizer,
            train: search.train,
            validation: search.validation,
            batch_size: search.batch_size,
            seed: search.seed + seed_index as u64,
            steps,
        };
        let outcome = train_candidate(
            &setup,
            peak_lr,
            &(search.schedule_for)(peak_lr, steps),
            control,
        );
        model.restore(&self.initial[seed_index])?;
        let run = outcome?;
        control.emit(Event::SweepRun(run));
        Ok(run)
    }

    fn model(&self, seed_index: usize) -> &Model {
        if seed_index == 0 {
            self.search.model
        } else {
            &self.others[seed_index - 1]
        }
    }
}

struct SweepSetup<'a> {
    model: &'a Model,
    optimizer: &'a OptimizerSpec,
    train: &'a DeviceData,
    validation: &'a DeviceData,
    batch_size: usize,
    /// Data-order seed of this run's seed index.
    seed: u64,
    steps: usize,
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
                steps: setup.steps,
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
        steps: setup.steps,
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

/// Groups runs (of one horizon) by candidate, picks the best (lowest mean validation loss; a
/// candidate with any diverged run loses) and marks the band: every candidate within 5 % of
/// the best loss, or within one standard deviation of it across seeds when that is wider.
pub fn judge(candidates: &[f64], runs: &[SweepRun]) -> Vec<SweepCandidate> {
    let mut judged: Vec<SweepCandidate> = candidates
        .iter()
        .map(|&peak_lr| {
            let mine: Vec<&SweepRun> = runs.iter().filter(|run| run.peak_lr == peak_lr).collect();
            let steps = mine.first().map_or(0, |run| run.steps);
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
                steps,
                epochs: 0.0,
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
        // Seed noise widens the band, never narrows it below 5 %.
        let tolerance = judged[best].val_loss_std.max(0.05 * best_loss.abs());
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
            steps: 100,
            val_loss,
            val_accuracy: None,
            train_loss: val_loss,
            diverged: !val_loss.is_finite(),
        }
    }

    #[test]
    fn the_search_judges_at_the_plan_when_the_budget_allows_and_screens_when_it_does_not() {
        // 5 candidates x 100 steps and a second seed of two fit 700: every one runs the plan.
        let plan = plan_search(5, 1, 100, None, 700, 10);
        assert_eq!(
            plan,
            SearchPlan {
                screen_steps: None,
                finalists: 5,
                final_steps: 100
            }
        );
        // 500 fits the five, but not the second seed: screening is the better use of it.
        let plan = plan_search(5, 1, 100, None, 500, 10);
        assert_eq!(plan.screen_steps, Some(33));
        // 400 steps: 2 finalists at the plan (200), the 5 screened at 33 (a third) = 365.
        let plan = plan_search(5, 1, 100, None, 400, 10);
        assert_eq!(
            plan,
            SearchPlan {
                screen_steps: Some(33),
                finalists: 2,
                final_steps: 100
            }
        );
        // 250 steps: screening would get 10 steps, a tenth of the plan: still allowed.
        let plan = plan_search(5, 1, 100, None, 250, 10);
        assert_eq!(plan.screen_steps, Some(10));
        // 220: no room to screen; every candidate runs 44 steps, shorter than the plan.
        let plan = plan_search(5, 1, 100, None, 220, 10);
        assert_eq!(
            plan,
            SearchPlan {
                screen_steps: None,
                finalists: 5,
                final_steps: 44
            }
        );
        // Two seeds double every run.
        let plan = plan_search(5, 2, 100, None, 1400, 10);
        assert_eq!(plan.final_steps, 100);
        assert_eq!(plan.screen_steps, None);
        // A horizon fixed by the spec is kept whatever the budget.
        let plan = plan_search(5, 1, 100, Some(20), 50, 10);
        assert_eq!(
            plan,
            SearchPlan {
                screen_steps: None,
                finalists: 5,
                final_steps: 20
            }
        );
    }

    #[test]
    fn the_finalists_are_the_best_screened_and_the_peaks_just_below_it() {
        let candidates = [0.001, 0.01, 0.1, 1.0];
        let screened = |losses: [f64; 4]| {
            let runs: Vec<SweepRun> = candidates
                .iter()
                .zip(losses)
                .map(|(&peak, loss)| run(peak, 0, loss))
                .collect();
            judge(&candidates, &runs)
        };
        assert_eq!(
            finalists(&screened([0.9, 0.5, 0.4, 0.6]), 2),
            vec![0.01, 0.1]
        );
        assert_eq!(
            finalists(&screened([0.9, 0.5, 0.6, 0.4]), 2),
            vec![0.1, 1.0]
        );
        // The best is the lowest: it goes on with the next one up.
        assert_eq!(
            finalists(&screened([0.3, 0.5, 0.6, 0.4]), 2),
            vec![0.001, 0.01]
        );
        let diverged = f64::INFINITY;
        assert_eq!(finalists(&screened([diverged; 4]), 2), vec![0.001, 0.01]);
    }

    #[test]
    fn candidate_spacing_is_their_geometric_step_and_at_least_two() {
        assert!((spacing(&[0.01, 0.1, 1.0]) - 10.0).abs() < 1e-12);
        assert_eq!(spacing(&[0.1, 0.12]), 2.0);
        assert_eq!(spacing(&[0.1]), 3.0);
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
        let judged = judge(&candidates, &runs);
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
        let judged = judge(&candidates, &runs);
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
        let judged = judge(&candidates, &runs);
        // Means 0.37 and 0.35; std of the best = sqrt(0.005) = 0.0707: 0.37 is inside.
        assert!(judged[1].best);
        assert!(judged[0].in_band);
    }
}
