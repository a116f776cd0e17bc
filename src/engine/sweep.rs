//! OneCycle trainings at candidate peak learning rates, each from the same initial weights and
//! data order, judged on validation loss. This is what checks the range
//! test's suggestions instead of trusting one rule. Candidates are judged at the horizon the
//! recommendation is for, the planned run, as far as the budget allows: a short run favours
//! high peaks that overfit over a long plan (`plan_search`, `Search::run`).

use serde::{Deserialize, Serialize};

pub use super::events::SweepRun;
use super::events::{Control, EngineError, Event, TrialInfo, TrialKind, TrialOutcome};
use super::optim::Optimizer;
use super::schedule::Schedule;
use super::spec::OptimizerSpec;
use super::suggest::Suggestions;
use super::trainer::Trainer;
use super::trial::{TrialData, TrialLoop};

/// A candidate's runs over all seeds, as the result reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepCandidate {
    pub peak_lr: f64,
    /// The horizon this candidate was trained to, in steps and in epochs.
    pub steps: usize,
    pub epochs: f64,
    /// Runs (seeds) it was judged on at this horizon.
    #[serde(default)]
    pub seeds: usize,
    /// Mean over seeds (infinite when any run diverged).
    pub val_loss: f64,
    pub val_loss_std: f64,
    pub val_accuracy: Option<f64>,
    pub diverged: bool,
    pub in_band: bool,
    pub best: bool,
    /// At or above the stability edge (see [`stability_edge`]): never the best nor in the
    /// band.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unstable: bool,
}

/// Candidates for `"auto"`: `count` values log-spaced from valley / 3 to edge, with the one
/// nearest to valley (in log space) replaced by valley itself.
pub fn auto_candidates(suggestions: &Suggestions, count: usize) -> Option<Vec<f64>> {
    let valley = suggestions.preferred()?;
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
/// budget allows (with room for second seeds of the best two). Else the best [`FINALISTS`]
/// run the whole plan with room for one more full run past them (a step further down or up,
/// or between two): chosen by a screening of every candidate at up to a third of the plan
/// (never under a tenth, nor under `min_steps`), or, when `anchored` (auto candidates around
/// the range test's valley) and the budget leaves no room to screen, the valley and the
/// candidate below it. Else, with room for the finalists alone, the screening without the
/// spare run; or a screening at a tenth of the plan when it leaves the finalists at least
/// 90 % of the plan (the valley can sit a decade under the best peak, and a screening finds
/// that out); or the valley and the candidate below it. Else the finalists run as long as the budget allows after a screening at a
/// tenth of the plan, or, when even that is too short, every candidate does; the result then
/// says the horizon is shorter than the plan.
pub fn plan_search(
    candidates: usize,
    seeds: usize,
    plan_steps: usize,
    fixed_steps: Option<usize>,
    available: usize,
    min_steps: usize,
    anchored: bool,
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
    let full_run = seeds * plan_steps;
    let screened = |full_runs: usize| {
        let left = available.checked_sub(full_runs * full_run)?;
        let screen = (left / runs).min(plan_steps / 3);
        (screen >= min_steps.max(plan_steps / 10)).then_some(SearchPlan {
            screen_steps: Some(screen),
            finalists,
            final_steps: plan_steps,
        })
    };
    let unscreened = |full_runs: usize| {
        (anchored && full_runs * full_run <= available).then_some(SearchPlan {
            screen_steps: None,
            finalists,
            final_steps: plan_steps,
        })
    };
    // Too little for two full runs: the screening at a tenth of the plan, and the finalists
    // as long as the rest allows, if that is at least three times the screening (a horizon
    // nearer the plan than every candidate could have).
    let shortened = || {
        let screen = min_steps.max(plan_steps / 10);
        let left = available.checked_sub(runs * screen)?;
        let final_steps = (left / (finalists * seeds)).min(plan_steps);
        (final_steps >= 3 * screen).then_some(SearchPlan {
            screen_steps: Some(screen),
            finalists,
            final_steps,
        })
    };
    // A screening whose finalists still run nearly the whole plan beats finalists placed
    // blind on the range test's valley, which can sit a decade under the best peak.
    let nearly_whole = || shortened().filter(|plan| plan.final_steps * 10 >= plan_steps * 9);
    screened(finalists + 1)
        .or_else(|| unscreened(finalists + 1))
        .or_else(|| screened(finalists))
        .or_else(nearly_whole)
        .or_else(|| unscreened(finalists))
        .or_else(shortened)
        .unwrap_or_else(|| every((available / runs).min(plan_steps)))
}

/// Which way a better peak may lie when the best final candidate sits at an end of the
/// range tried and the budget did not allow a step past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenEdge {
    Lower,
    Higher,
}

/// One sweep run to train: a OneCycle (or a race recipe's schedule) at `peak_lr` for
/// `steps` steps, from the initial weights and data order of seed index `seed_index` (seed
/// `job seed + seed_index`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateTrial {
    pub peak_lr: f64,
    pub seed_index: usize,
    pub steps: usize,
}

/// A finished candidate trial: its run, and the optimizer steps it took (fewer than its
/// length when it diverged), which the budget counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateResult {
    pub run: SweepRun,
    pub steps_run: usize,
}

/// Trains a batch of independent candidate trials and returns their results in the batch's
/// order (or why it could not).
pub type CandidateRunner<'r, E = EngineError> =
    dyn FnMut(&[CandidateTrial]) -> Result<Vec<CandidateResult>, E> + 'r;

/// What the planner needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Trials of the next batch whose results it does not have yet.
    Trials(Vec<CandidateTrial>),
    /// Every result it asked for is known: the sweep's outcome.
    Done(SearchOutcome),
}

/// The sweep's planner: which candidate trials to run, a batch at a time, decided from the
/// results of the trials before them alone (never from timing or completion order).
pub struct Search {
    pub seeds: usize,
    /// Whether the range may be extended past its ends (auto candidates; an explicit list
    /// is the user's).
    pub extend: bool,
    /// The range test's suggestion the auto candidates were placed around: the finalists
    /// when the budget leaves no room to screen.
    pub anchor: Option<f64>,
}

/// Validation sets with fewer rows give losses too noisy to separate candidates well: the
/// result warns. Seeding the best two whatever their gap was measured and did not pay (README,
/// Developer tools): the budget buys more as probes.
pub const SMALL_VALIDATION_ROWS: usize = 100;

/// Every run of a sweep, and what the search concluded.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOutcome {
    pub runs: Vec<SweepRun>,
    pub final_steps: usize,
    /// Set when the best final candidate is at an end of the range and no step past it was
    /// taken (an explicit list, or no budget left).
    pub open_edge: Option<OpenEdge>,
    /// Where the runs found instability beginning.
    pub edge: Option<StabilityEdge>,
}

/// Most steps past the ends of the range.
const MAX_EXTENSIONS: usize = 4;

/// Most seeds of a close finalist when the spec asks for one seed.
const MAX_SEEDS: usize = 3;

/// Most runs between candidates, and the finest spacing they go down to (a ratio between
/// neighbours; the evaluation's grid is 10^(1/3) = 2.15 apart).
const MAX_PROBES: usize = 2;
const FINEST_SPACING: f64 = 1.4;

/// The runs so far and the steps they took, fed by batches through the runner.
struct Ledger<'l, 'r, E> {
    runner: &'l mut CandidateRunner<'r, E>,
    runs: Vec<SweepRun>,
    spent: usize,
}

impl<E> Ledger<'_, '_, E> {
    fn train(&mut self, batch: &[CandidateTrial]) -> Result<(), E> {
        if batch.is_empty() {
            return Ok(());
        }
        for result in (self.runner)(batch)? {
            self.spent += result.steps_run;
            self.runs.push(result.run);
        }
        Ok(())
    }
}

/// Every seed index below `seeds` at each of `peaks`, a seed's peaks together.
fn every_seed(peaks: &[f64], seeds: usize, steps: usize) -> Vec<CandidateTrial> {
    (0..seeds)
        .flat_map(|seed_index| {
            peaks.iter().map(move |&peak_lr| CandidateTrial {
                peak_lr,
                seed_index,
                steps,
            })
        })
        .collect()
}

impl Search {
    /// Runs the plan within `budget` steps: the screening, the finalists at the final
    /// horizon, then (auto candidates) steps past the end of the range while the best final
    /// candidate sits at it, then a second seed for the two best when they are within 5 % of
    /// each other, then probes between the best and a neighbour, then more seeds for the best
    /// while it borders the stability edge. Each stage's trials are one batch for `runner`
    /// (the screening's, the finalists', each extension's, each round of seeds, each probe's),
    /// and each trial starts from its seed's initial weights and data order.
    pub fn run<E>(
        &self,
        candidates: &[f64],
        plan: SearchPlan,
        budget: usize,
        runner: &mut CandidateRunner<'_, E>,
    ) -> Result<SearchOutcome, E> {
        let mut ledger = Ledger {
            runner,
            runs: Vec::new(),
            spent: 0,
        };
        let finalists = match plan.screen_steps {
            Some(screen_steps) => {
                ledger.train(&every_seed(candidates, self.seeds, screen_steps))?;
                let edge = stability_edge(&ledger.runs).map(|edge| edge.lr);
                finalists(&judge(candidates, &ledger.runs, edge), plan.finalists)
            }
            None if plan.finalists < candidates.len() => {
                anchored_finalists(candidates, self.anchor, plan.finalists)
            }
            None => candidates.to_vec(),
        };
        let final_steps = plan.final_steps;
        ledger.train(&every_seed(&finalists, self.seeds, final_steps))?;
        let left = |ledger: &Ledger<'_, '_, E>| budget.saturating_sub(ledger.spent);
        let ratio = spacing(candidates);
        // Without a screening, the candidates above the finalists were never run.
        let highest_screened = match plan.screen_steps {
            Some(_) => candidates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            None => f64::NEG_INFINITY,
        };
        let mut open_edge = None;
        let mut extensions = 0;
        loop {
            let runs = &ledger.runs;
            let (best, lowest, highest, tried) = final_extremes(runs, final_steps);
            let Some(best) = best else { break };
            let unsafe_from =
                stability_edge(runs).map_or(f64::INFINITY, |edge| edge.lr / EDGE_MARGIN);
            open_edge = if tried < 2 && !self.extend {
                None
            } else if best == lowest {
                Some((OpenEdge::Lower, best / ratio))
            } else if best == highest && best >= highest_screened && best * ratio <= unsafe_from {
                // Higher peaks screened out at a shorter horizon, which favours high
                // peaks, would only do worse at the final one, and peaks near the stability
                // edge are not recommended: no need to try them.
                Some((OpenEdge::Higher, best * ratio))
            } else {
                None
            };
            let Some((_, next)) = open_edge else { break };
            if !self.extend
                || extensions == MAX_EXTENSIONS
                || left(&ledger) < self.seeds * final_steps
            {
                break;
            }
            ledger.train(&every_seed(&[next], self.seeds, final_steps))?;
            extensions += 1;
        }
        // Seed noise: while the best two are within 5 % (or a seed's spread) of each other,
        // each gets another seed, up to [`MAX_SEEDS`], as far as the budget goes.
        if self.seeds == 1 {
            for seed_index in 1..MAX_SEEDS {
                let contenders = contenders(&ledger.runs, final_steps);
                let [first, second, ..] = &contenders[..] else {
                    break;
                };
                let noise = (0.05 * first.val_loss.abs())
                    .max(first.val_loss_std)
                    .max(second.val_loss_std);
                let close = second.val_loss.is_finite() && second.val_loss - first.val_loss < noise;
                let batch: Vec<CandidateTrial> = [first.peak_lr, second.peak_lr]
                    .into_iter()
                    .flat_map(|peak_lr| {
                        let have = seeds_at(&ledger.runs, peak_lr, final_steps);
                        (have..=seed_index).map(move |seed_index| CandidateTrial {
                            peak_lr,
                            seed_index,
                            steps: final_steps,
                        })
                    })
                    .collect();
                if !close || left(&ledger) < batch.len() * final_steps {
                    break;
                }
                ledger.train(&batch)?;
            }
        }
        // Resolution: the candidates are a factor of 2-3 apart, the good band can be narrower.
        // Runs halfway (in log space) between the best and a neighbour, the side never run
        // at this horizon first, then the side of the better neighbour.
        if self.extend {
            for _ in 0..MAX_PROBES {
                if left(&ledger) < self.seeds * final_steps {
                    break;
                }
                let Some(probe) = next_probe(&ledger.runs, final_steps) else {
                    break;
                };
                ledger.train(&every_seed(&[probe], self.seeds, final_steps))?;
            }
        }
        // Risk: while the best borders the stability edge, it gets more seeds (up to
        // [`MAX_SEEDS`]) before it is trusted: one seed that survived next to a cliff says
        // little about the next. A seed that fails moves the edge down, and the next best
        // is checked in turn. After the probes, which may find a new best and which the
        // budget serves first: a seed of the best bought at the cost of the probe that
        // would have found a better peak is a poor trade. One seed per batch, as each
        // decides whether the next is needed.
        if self.seeds < MAX_SEEDS {
            while let Some(peak_lr) = bordering_best(&ledger.runs, final_steps) {
                let have = seeds_at(&ledger.runs, peak_lr, final_steps);
                if have >= MAX_SEEDS || left(&ledger) < final_steps {
                    break;
                }
                ledger.train(&[CandidateTrial {
                    peak_lr,
                    seed_index: have,
                    steps: final_steps,
                }])?;
            }
        }
        let runs = ledger.runs;
        Ok(SearchOutcome {
            edge: stability_edge(&runs),
            runs,
            final_steps,
            open_edge: open_edge.map(|(edge, _)| edge),
        })
    }

    /// The planner as a pure function of the results known so far, given in any order: the
    /// trials of the first batch whose results are not all in `known` (those missing), or
    /// the outcome once every batch is. It replays [`Search::run`], so a sweep driven batch by
    /// batch through it (by workers finishing trials in any order) ends exactly as one run
    /// straight through.
    pub fn next(
        &self,
        candidates: &[f64],
        plan: SearchPlan,
        budget: usize,
        known: &[(CandidateTrial, CandidateResult)],
    ) -> Next {
        let result_of =
            |trial: &CandidateTrial| known.iter().find(|(k, _)| k == trial).map(|(_, r)| *r);
        let mut replay = |batch: &[CandidateTrial]| {
            let missing: Vec<CandidateTrial> = batch
                .iter()
                .filter(|trial| result_of(trial).is_none())
                .copied()
                .collect();
            if missing.is_empty() {
                Ok(batch.iter().filter_map(result_of).collect())
            } else {
                Err(missing)
            }
        };
        match self.run(candidates, plan, budget, &mut replay) {
            Ok(outcome) => Next::Done(outcome),
            Err(missing) => Next::Trials(missing),
        }
    }
}

/// Runs at `peak` and horizon `steps`.
fn seeds_at(runs: &[SweepRun], peak: f64, steps: usize) -> usize {
    runs.iter()
        .filter(|run| run.steps == steps && run.peak_lr == peak)
        .count()
}

/// The best candidate at `steps` when it borders the stability edge: the next peak tried
/// above it (at any horizon) is unstable or within [`EDGE_MARGIN`] of the edge.
fn bordering_best(runs: &[SweepRun], steps: usize) -> Option<f64> {
    let edge = stability_edge(runs)?;
    let best = final_candidates(runs, steps)
        .into_iter()
        .find(|c| c.best)?
        .peak_lr;
    let above = runs
        .iter()
        .map(|run| run.peak_lr)
        .filter(|&peak| peak > best)
        .reduce(f64::min)?;
    (above >= edge.lr / EDGE_MARGIN && best < edge.lr).then_some(best)
}

/// The candidates at `steps` the best may be chosen from (under the stability edge's
/// margin), best first.
fn contenders(runs: &[SweepRun], steps: usize) -> Vec<SweepCandidate> {
    let edge = stability_edge(runs).map(|edge| edge.lr);
    let judged = judged_at(runs, steps, edge);
    let limit = eligible_limit(&judged, edge);
    let mut contenders: Vec<SweepCandidate> =
        judged.into_iter().filter(|c| c.peak_lr <= limit).collect();
    contenders.sort_by(|a, b| a.val_loss.total_cmp(&b.val_loss));
    contenders
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

/// Finalists without a screening: the candidate nearest `anchor` (in log space) and the
/// ones just below it, as a long run favours lower peaks (the middle ones without an anchor).
fn anchored_finalists(candidates: &[f64], anchor: Option<f64>, count: usize) -> Vec<f64> {
    let mut sorted = candidates.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = match anchor {
        Some(anchor) => sorted
            .iter()
            .enumerate()
            .min_by(|a, b| {
                (a.1 / anchor)
                    .ln()
                    .abs()
                    .total_cmp(&(b.1 / anchor).ln().abs())
            })
            .map_or(0, |(index, _)| index),
        None => sorted.len() / 2,
    };
    let end = (at + 1).max(count.min(sorted.len()));
    sorted[end.saturating_sub(count)..end].to_vec()
}

/// The highest peak the best may be: [`EDGE_MARGIN`] below the edge when a finished
/// candidate is there, else the highest finished one under the edge, else any.
fn eligible_limit(judged: &[SweepCandidate], edge: Option<f64>) -> f64 {
    let Some(edge) = edge else {
        return f64::INFINITY;
    };
    let finished = || judged.iter().filter(|c| c.val_loss.is_finite());
    if finished().any(|c| c.peak_lr <= edge / EDGE_MARGIN) {
        return edge / EDGE_MARGIN;
    }
    finished()
        .map(|c| c.peak_lr)
        .filter(|&peak| peak < edge)
        .reduce(f64::max)
        .unwrap_or(f64::INFINITY)
}

/// The candidates judged at `steps`, with the stability edge of all `runs`.
pub fn final_candidates(runs: &[SweepRun], steps: usize) -> Vec<SweepCandidate> {
    judged_at(runs, steps, stability_edge(runs).map(|edge| edge.lr))
}

/// The candidates judged at `steps`, with a stability edge found beforehand.
pub fn judged_at(runs: &[SweepRun], steps: usize, edge: Option<f64>) -> Vec<SweepCandidate> {
    let at: Vec<SweepRun> = runs
        .iter()
        .copied()
        .filter(|run| run.steps == steps)
        .collect();
    let mut peaks: Vec<f64> = at.iter().map(|run| run.peak_lr).collect();
    peaks.sort_by(f64::total_cmp);
    peaks.dedup();
    judge(&peaks, &at, edge)
}

/// The peak halfway (in log space) between the best candidate at `steps` and one of its
/// neighbours among all peaks tried at any horizon: a neighbour never run at `steps` first,
/// then the one with the lower loss; never to a peak within [`EDGE_MARGIN`] of the
/// stability edge. None when the best is unknown or both gaps are already finer than
/// [`FINEST_SPACING`].
fn next_probe(runs: &[SweepRun], steps: usize) -> Option<f64> {
    let edge = stability_edge(runs).map(|edge| edge.lr);
    let judged = judged_at(runs, steps, edge);
    let limit = eligible_limit(&judged, edge);
    let best = judged.iter().find(|c| c.best)?.peak_lr;
    let mut tried: Vec<f64> = runs.iter().map(|run| run.peak_lr).collect();
    tried.sort_by(f64::total_cmp);
    tried.dedup();
    let at = tried.iter().position(|&peak| peak == best)?;
    let neighbours = [
        at.checked_sub(1).map(|i| tried[i]),
        tried.get(at + 1).copied(),
    ];
    neighbours
        .into_iter()
        .flatten()
        .filter(|&peak| (peak / best).ln().abs() > FINEST_SPACING.ln() * 2.0)
        // Never to a peak too near the stability edge to be chosen.
        .filter(|&peak| (peak * best).sqrt() <= limit)
        .map(|peak| {
            let loss = judged
                .iter()
                .find(|c| c.peak_lr == peak)
                .map_or(f64::NEG_INFINITY, |c| c.val_loss);
            (peak, loss)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(peak, _)| (peak * best).sqrt())
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

/// What every candidate trial of a sweep shares.
pub struct CandidateSetup<'a> {
    /// Builds the model of a seed (its own initialisation), on its backend.
    pub build_trainer: &'a (dyn Fn(u64) -> Result<Trainer, EngineError> + Sync),
    pub optimizer: &'a OptimizerSpec,
    pub data: TrialData<'a>,
    /// The job's seed: seed index i trains with seed + i.
    pub seed: u64,
    /// The OneCycle schedule for a peak and a length (a race recipe's own schedule).
    pub schedule_for: &'a (dyn Fn(f64, usize) -> Schedule + Sync),
}

/// Trains one candidate trial from its seed's initial weights and data order, and reports it
/// as it starts and its run as it ends.
pub fn train_candidate(
    setup: &CandidateSetup<'_>,
    trial: &CandidateTrial,
    control: &mut Control<'_>,
) -> Result<CandidateResult, EngineError> {
    let info = TrialInfo {
        kind: TrialKind::Sweep,
        lr: Some(trial.peak_lr),
        recipe: None,
        seed: setup.seed + trial.seed_index as u64,
        steps: trial.steps,
    };
    control.trial(
        info,
        |control| train_candidate_steps(setup, trial, control),
        |result, seconds| TrialOutcome {
            steps_run: result.steps_run,
            seconds,
            val_loss: Some(result.run.val_loss).filter(|loss| loss.is_finite()),
            val_accuracy: result.run.val_accuracy,
            diverged_at: result.run.diverged.then_some(result.steps_run),
        },
    )
}

fn train_candidate_steps(
    setup: &CandidateSetup<'_>,
    trial: &CandidateTrial,
    control: &mut Control<'_>,
) -> Result<CandidateResult, EngineError> {
    let seed = setup.seed + trial.seed_index as u64;
    let trainer = (setup.build_trainer)(seed)?;
    let schedule = (setup.schedule_for)(trial.peak_lr, trial.steps);
    let mut optimizer = Optimizer::new(setup.optimizer, trainer.model().vars());
    let mut training = TrialLoop::new(&trainer, setup.data, &mut optimizer, seed);
    let default_momentum = setup.optimizer.momentum();
    let steps = trial.steps;
    let tail_start = steps - (steps / 10).max(1);
    let (mut tail_sum, mut tail_count) = (0.0, 0usize);
    let mut spikes = SpikeWatch::new(steps);
    let finished = |run: SweepRun, steps_run: usize, control: &mut Control<'_>| {
        control.emit(Event::SweepRun(run));
        CandidateResult { run, steps_run }
    };
    for step in 0..steps {
        let lr = schedule.lr_at(step);
        let momentum = schedule.momentum_at(step).unwrap_or(default_momentum);
        let loss = training.step(lr, momentum, control)?;
        if !loss.is_finite() {
            let run = SweepRun {
                peak_lr: trial.peak_lr,
                seed,
                steps,
                val_loss: f64::INFINITY,
                val_accuracy: None,
                train_loss: loss,
                diverged: true,
                spiked: spikes.spiked(),
            };
            return Ok(finished(run, step + 1, control));
        }
        spikes.push(loss);
        if step >= tail_start {
            tail_sum += loss;
            tail_count += 1;
        }
    }
    let evaluation = training.evaluate(control)?;
    let diverged = !evaluation.loss.is_finite();
    let run = SweepRun {
        peak_lr: trial.peak_lr,
        seed,
        steps,
        val_loss: if diverged {
            f64::INFINITY
        } else {
            evaluation.loss
        },
        val_accuracy: evaluation.accuracy,
        train_loss: tail_sum / tail_count.max(1) as f64,
        diverged,
        spiked: spikes.spiked(),
    };
    Ok(finished(run, steps, control))
}

/// Watches a run's training loss for a spike: averaged over windows of a 25th of the run (at
/// least [`SpikeWatch::MIN_WINDOW`] steps, so that one unlucky batch is not a spike), the loss
/// climbs back more than half way from its lowest window to its first one, after having come
/// down by at least a fifth. A run at a peak past the edge of stability often recovers by the
/// end of its OneCycle, as the learning rate anneals, and then looks fine on its final loss;
/// with another seed it may not recover.
struct SpikeWatch {
    window: usize,
    sum: f64,
    count: usize,
    first: Option<f64>,
    lowest: f64,
    spiked: bool,
}

impl SpikeWatch {
    const MIN_WINDOW: usize = 8;

    fn new(steps: usize) -> Self {
        Self {
            window: (steps / 25).max(Self::MIN_WINDOW),
            sum: 0.0,
            count: 0,
            first: None,
            lowest: f64::INFINITY,
            spiked: false,
        }
    }

    fn push(&mut self, loss: f64) {
        self.sum += loss;
        self.count += 1;
        if self.count < self.window {
            return;
        }
        let mean = self.sum / self.count as f64;
        (self.sum, self.count) = (0.0, 0);
        let Some(first) = self.first else {
            self.first = Some(mean);
            self.lowest = mean;
            return;
        };
        let gained = first - self.lowest;
        if gained >= 0.2 * first.abs() && mean > self.lowest + 0.5 * gained {
            self.spiked = true;
        }
        self.lowest = self.lowest.min(mean);
    }

    fn spiked(&self) -> bool {
        self.spiked
    }
}

/// How many times the best mean loss of the lower peaks (at the same horizon) a run may end
/// before it counts as unstable: a run that ends twice as bad as a lower peak did not
/// overfit a little, it lost its way.
pub const FAR_ABOVE: f64 = 2.0;

/// The recommendation stays at least this factor below the lowest unstable peak: the runs
/// show where some seeds blow up, not that every seed below that point is safe. 1.5 keeps a
/// probe halfway (in log space) to a peak a grid step (2.15x) or more above the best; 2 cost
/// hits on the evaluation where the best sat 2.4x under the edge (README, Developer tools).
pub const EDGE_MARGIN: f64 = 1.5;

/// Why a peak counts as unstable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Instability {
    /// A run's loss became non-finite.
    Diverged,
    /// A run's training loss spiked mid-run (see [`SpikeWatch`]).
    Spiked,
    /// A run ended more than [`FAR_ABOVE`] times the best mean loss of the lower peaks.
    FarAbove,
}

impl Instability {
    /// What happened, for a warning: "a run diverged".
    pub fn describe(self) -> &'static str {
        match self {
            Instability::Diverged => "a run diverged",
            Instability::Spiked => "a run's training loss spiked mid-run",
            Instability::FarAbove => "a run ended more than twice the loss of a lower peak",
        }
    }
}

/// The lowest peak at which instability begins, and what showed it there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StabilityEdge {
    pub lr: f64,
    pub reason: Instability,
    /// The horizon of the run that showed it.
    pub steps: usize,
}

/// The stability edge of a sweep's runs at every horizon: the lowest peak with a run that
/// diverged, spiked, or ended more than [`FAR_ABOVE`] times the best mean loss of the lower
/// peaks at its horizon. A run at a short horizon counts as much as one at the plan's: its
/// peak blew up once, and another seed may at any length. None when every run was stable.
pub fn stability_edge(runs: &[SweepRun]) -> Option<StabilityEdge> {
    runs.iter()
        .filter_map(|run| {
            let reason = if run.diverged {
                Instability::Diverged
            } else if run.spiked {
                Instability::Spiked
            } else {
                let lower = best_mean_below(runs, run.steps, run.peak_lr)?;
                if run.val_loss > FAR_ABOVE * lower {
                    Instability::FarAbove
                } else {
                    return None;
                }
            };
            Some(StabilityEdge {
                lr: run.peak_lr,
                reason,
                steps: run.steps,
            })
        })
        .min_by(|a, b| a.lr.total_cmp(&b.lr))
}

/// The lowest mean validation loss of the peaks below `peak` at horizon `steps` (a peak with a
/// diverged run has none); None without one.
fn best_mean_below(runs: &[SweepRun], steps: usize, peak: f64) -> Option<f64> {
    let mut peaks: Vec<f64> = runs
        .iter()
        .filter(|run| run.steps == steps && run.peak_lr < peak)
        .map(|run| run.peak_lr)
        .collect();
    peaks.sort_by(f64::total_cmp);
    peaks.dedup();
    peaks
        .into_iter()
        .filter_map(|lower| {
            let mine: Vec<&SweepRun> = runs
                .iter()
                .filter(|run| run.steps == steps && run.peak_lr == lower)
                .collect();
            let mean = mine.iter().map(|run| run.val_loss).sum::<f64>() / mine.len() as f64;
            mean.is_finite().then_some(mean)
        })
        .min_by(f64::total_cmp)
}

/// Groups runs (of one horizon) by candidate, picks the best (lowest mean validation loss; a
/// candidate with any diverged run loses) and marks the band: every candidate within 5 % of
/// the best loss, or within one standard deviation of it across seeds when that is wider.
/// With a stability edge, the candidates at or above it are unstable, and the best and the
/// band are chosen among those at least [`EDGE_MARGIN`] below it (among the others under
/// the edge when none is that far below; among all when none is under it, which the tune
/// then warns of).
pub fn judge(candidates: &[f64], runs: &[SweepRun], edge: Option<f64>) -> Vec<SweepCandidate> {
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
                seeds: mine.len(),
                epochs: 0.0,
                val_loss: mean,
                val_loss_std: std,
                val_accuracy: (!accuracies.is_empty() && !diverged)
                    .then(|| accuracies.iter().sum::<f64>() / accuracies.len() as f64),
                diverged,
                in_band: false,
                best: false,
                unstable: edge.is_some_and(|edge| peak_lr >= edge),
            }
        })
        .collect();
    let limit = eligible_limit(&judged, edge);
    let eligible = |candidate: &SweepCandidate| candidate.peak_lr <= limit;
    let best = judged
        .iter()
        .enumerate()
        .filter(|(_, candidate)| candidate.val_loss.is_finite() && eligible(candidate))
        .min_by(|a, b| a.1.val_loss.total_cmp(&b.1.val_loss))
        .map(|(index, _)| index);
    if let Some(best) = best {
        let best_loss = judged[best].val_loss;
        // Seed noise widens the band, never narrows it below 5 %.
        let tolerance = judged[best].val_loss_std.max(0.05 * best_loss.abs());
        for candidate in &mut judged {
            candidate.in_band = candidate.val_loss.is_finite()
                && eligible(candidate)
                && candidate.val_loss <= best_loss + tolerance;
        }
        judged[best].best = true;
        judged[best].in_band = true;
    }
    judged
}

/// The best peak between the tested ones: the vertex of the parabola (in log learning rate)
/// through the best final candidate and its two neighbours, kept nearer the best than
/// either neighbour (halfway in log space at most), so it only refines the choice the runs
/// made, and never above the best when the neighbour above is unstable. None when the best
/// sits at an end, a neighbour diverged, or the three points do not curve upwards.
pub fn refine_peak(judged: &[SweepCandidate]) -> Option<f64> {
    let mut sorted: Vec<&SweepCandidate> = judged.iter().collect();
    sorted.sort_by(|a, b| a.peak_lr.total_cmp(&b.peak_lr));
    let best = sorted.iter().position(|c| c.best)?;
    let (left, centre, right) = (
        sorted.get(best.checked_sub(1)?)?,
        sorted[best],
        sorted.get(best + 1)?,
    );
    let points = [left, centre, right].map(|c| (c.peak_lr.ln(), c.val_loss));
    if points.iter().any(|(x, y)| !x.is_finite() || !y.is_finite()) {
        return None;
    }
    let [(x0, y0), (x1, y1), (x2, y2)] = points;
    // Divided differences: the parabola's second-order coefficient and its vertex.
    let slope_left = (y1 - y0) / (x1 - x0);
    let slope_right = (y2 - y1) / (x2 - x1);
    let curvature = (slope_right - slope_left) / (x2 - x0);
    if curvature.is_nan() || curvature <= 0.0 {
        return None;
    }
    // p(x) = y0 + slope_left (x - x0) + curvature (x - x0)(x - x1); p'(vertex) = 0.
    let vertex = (x0 + x1) / 2.0 - slope_left / (2.0 * curvature);
    let highest = if right.unstable { x1 } else { (x1 + x2) / 2.0 };
    let vertex = vertex.clamp((x0 + x1) / 2.0, highest);
    Some(vertex.exp())
}

/// The band's edges: from the lowest to the highest candidate in the band. When only the
/// best candidate is in it, the band reaches halfway (in log space) to its neighbours, so a
/// learning rate a little off the tested point is not reported as outside; it never
/// reaches towards an unstable neighbour, and never past [`EDGE_MARGIN`] below the
/// stability edge `edge`.
pub fn band(judged: &[SweepCandidate], edge: Option<f64>) -> Option<[f64; 2]> {
    let mut sorted: Vec<&SweepCandidate> = judged.iter().collect();
    sorted.sort_by(|a, b| a.peak_lr.total_cmp(&b.peak_lr));
    let first = sorted.iter().position(|c| c.in_band)?;
    let last = sorted.iter().rposition(|c| c.in_band)?;
    let (mut low, mut high) = (sorted[first].peak_lr, sorted[last].peak_lr);
    if first == last {
        if first > 0 {
            low = (low * sorted[first - 1].peak_lr).sqrt();
        }
        if let Some(above) = sorted.get(last + 1).filter(|c| !c.unstable) {
            high = (high * above.peak_lr).sqrt();
        }
    }
    let limit = eligible_limit(judged, edge).max(sorted[last].peak_lr);
    Some([low, high.min(limit)])
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
            spiked: false,
        }
    }

    /// A trial as the planner asked for it: peak, seed index, steps.
    type Asked = (f64, usize, usize);

    /// A landscape with its best peak at `best` for the final horizon (100 steps) and a
    /// higher one for shorter runs, every run diverging from 1.0 on; each batch the planner
    /// asks for is recorded as (peak, seed index, steps).
    fn plan_on(
        search: &Search,
        candidates: &[f64],
        plan: SearchPlan,
        best: f64,
    ) -> (SearchOutcome, Vec<Vec<Asked>>) {
        let mut batches = Vec::new();
        let mut runner = |batch: &[CandidateTrial]| {
            batches.push(
                batch
                    .iter()
                    .map(|t| (t.peak_lr, t.seed_index, t.steps))
                    .collect(),
            );
            Ok::<_, EngineError>(batch.iter().map(|t| landscape(t, best)).collect())
        };
        let outcome = search
            .run(candidates, plan, 10_000, &mut runner)
            .expect("the fake runner never fails");
        (outcome, batches)
    }

    fn landscape(trial: &CandidateTrial, best: f64) -> CandidateResult {
        let centre = if trial.steps < 100 { 2.5 * best } else { best };
        let loss = 0.1 + (trial.peak_lr / centre).log10().powi(2);
        let val_loss = if trial.peak_lr >= 1.0 {
            f64::INFINITY
        } else {
            loss
        };
        let mut run = run(trial.peak_lr, 7 + trial.seed_index as u64, val_loss);
        run.steps = trial.steps;
        let steps_run = if run.diverged { 3 } else { trial.steps };
        CandidateResult { run, steps_run }
    }

    #[test]
    fn the_planner_fed_results_one_by_one_in_any_order_ends_as_one_run_straight_through() {
        for (seeds, candidates, screen_steps, best) in [
            (1, vec![0.01, 0.03, 0.1, 0.3, 1.0], Some(10), 0.2),
            (2, vec![0.001, 0.01], None, 0.1),
        ] {
            let search = Search {
                seeds,
                extend: true,
                anchor: None,
            };
            let plan = SearchPlan {
                screen_steps,
                finalists: 2,
                final_steps: 100,
            };
            let (straight, _) = plan_on(&search, &candidates, plan, best);
            // Each answer gives one missing trial, the batch's last first, and `known` keeps
            // the results newest first: neither order is the planner's.
            let mut known = Vec::new();
            let outcome = loop {
                match search.next(&candidates, plan, 10_000, &known) {
                    Next::Trials(missing) => {
                        let trial = *missing.last().expect("a missing trial");
                        known.insert(0, (trial, landscape(&trial, best)));
                    }
                    Next::Done(outcome) => break outcome,
                }
                assert!(known.len() < 100, "the planner asked for too many trials");
            };
            assert_eq!(outcome, straight);
            assert_eq!(known.len(), straight.runs.len());
        }
    }

    #[test]
    fn the_planner_asks_for_each_stage_as_one_batch_decided_from_the_results_before_it() {
        let search = Search {
            seeds: 1,
            extend: true,
            anchor: None,
        };
        let candidates = [0.01, 0.03, 0.1, 0.3, 1.0];
        let plan = SearchPlan {
            screen_steps: Some(10),
            finalists: 2,
            final_steps: 100,
        };
        let (outcome, batches) = plan_on(&search, &candidates, plan, 0.2);
        let probe_up = (0.3f64 * 1.0).sqrt();
        let probe_down = (0.3f64 * 0.1).sqrt();
        assert_eq!(
            batches,
            vec![
                // The screening: every candidate. 1.0 diverges: the edge, so 0.3 is the best
                // screened, and it and the one below go on to the plan.
                candidates.iter().map(|&peak| (peak, 0, 10)).collect(),
                vec![(0.1, 0, 100), (0.3, 0, 100)],
                // Probes: towards the neighbour never run at the plan first (1.0), then
                // towards 0.1, as the first probe ended too near the best to probe again.
                vec![(probe_up, 0, 100)],
                vec![(probe_down, 0, 100)],
            ]
        );
        assert_eq!(outcome.final_steps, 100);
        // The first probe ended far above 0.3's loss: the edge came down to it.
        let edge = outcome.edge.expect("an edge");
        assert_eq!((edge.lr, edge.reason), (probe_up, Instability::FarAbove));
        let best = final_candidates(&outcome.runs, 100)
            .into_iter()
            .find(|c| c.best)
            .map(|c| c.peak_lr);
        assert_eq!(best, Some(probe_down));
    }

    #[test]
    fn the_planner_steps_past_the_top_of_the_range_one_batch_of_seeds_at_a_time() {
        let search = Search {
            seeds: 2,
            extend: true,
            anchor: None,
        };
        let candidates = [0.001, 0.01];
        let plan = SearchPlan {
            screen_steps: None,
            finalists: 2,
            final_steps: 100,
        };
        let (outcome, batches) = plan_on(&search, &candidates, plan, 0.1);
        let seeds = |peak: f64| vec![(peak, 0, 100), (peak, 1, 100)];
        // Both seeds of both candidates, then 10x up (the candidates' spacing) while the best
        // is the highest tried: 0.1, then 1.0, which diverges and ends the steps.
        assert_eq!(
            batches[..3],
            [
                vec![
                    (0.001, 0, 100),
                    (0.01, 0, 100),
                    (0.001, 1, 100),
                    (0.01, 1, 100)
                ],
                seeds(0.1),
                seeds(1.0),
            ]
        );
        assert_eq!(outcome.open_edge, None);
        // Then probes below the best (the side of the better neighbour, never towards the
        // edge at 1.0), then, as the best borders the edge, a third seed of it alone.
        let first_probe = (0.01f64 * 0.1).sqrt();
        let second_probe = (first_probe * 0.1).sqrt();
        assert_eq!(
            batches[3..],
            [seeds(first_probe), seeds(second_probe), vec![(0.1, 2, 100)]]
        );
    }

    #[test]
    fn the_search_judges_at_the_plan_when_the_budget_allows_and_screens_when_it_does_not() {
        let plan_of = |screen_steps, finalists, final_steps| SearchPlan {
            screen_steps,
            finalists,
            final_steps,
        };
        // 5 candidates x 100 steps and a second seed of two fit 700: every one runs the plan.
        for anchored in [false, true] {
            assert_eq!(
                plan_search(5, 1, 100, None, 700, 10, anchored),
                plan_of(None, 5, 100)
            );
        }
        // 500 fits the five, but not the second seed: screening (at most a third of the
        // plan) and two finalists, with room for a third full run, is the better use of it.
        assert_eq!(
            plan_search(5, 1, 100, None, 500, 10, true),
            plan_of(Some(33), 2, 100)
        );
        // 400: three full runs leave 20 steps for each screening run.
        assert_eq!(
            plan_search(5, 1, 100, None, 400, 10, true),
            plan_of(Some(20), 2, 100)
        );
        // 320: three full runs leave 4 each, too short to screen. Anchored on the range test,
        // the valley and the candidate below it run the plan, with a spare run; an explicit
        // list screens at 24 steps for two finalists instead.
        assert_eq!(
            plan_search(5, 1, 100, None, 320, 10, true),
            plan_of(None, 2, 100)
        );
        assert_eq!(
            plan_search(5, 1, 100, None, 320, 10, false),
            plan_of(Some(24), 2, 100)
        );
        // 250: no spare run; the two finalists and a screening of 10 steps (a tenth) fit.
        assert_eq!(
            plan_search(5, 1, 100, None, 250, 10, true),
            plan_of(Some(10), 2, 100)
        );
        // 220: no room to screen. Anchored: the two finalists alone at the plan; otherwise
        // a screening at a tenth and the finalists at 85 steps, short of the plan.
        assert_eq!(
            plan_search(5, 1, 100, None, 220, 10, true),
            plan_of(None, 2, 100)
        );
        assert_eq!(
            plan_search(5, 1, 100, None, 220, 10, false),
            plan_of(Some(10), 2, 85)
        );
        // 150: not even two runs of the plan. A screening at a tenth of it, and the two
        // finalists at 50 steps, nearer the plan than every candidate at 30.
        for anchored in [false, true] {
            assert_eq!(
                plan_search(5, 1, 100, None, 150, 10, anchored),
                plan_of(Some(10), 2, 50)
            );
        }
        // The README's example: a plan of 1,250 steps, 2,400 left after the range test. The
        // finalists run 887 steps after a screening of 125.
        assert_eq!(
            plan_search(5, 1, 1250, None, 2400, 10, true),
            plan_of(Some(125), 2, 887)
        );
        // A plan of 1,000 steps and 2,400 left: no room to screen before two whole runs,
        // but a screening at a tenth leaves the finalists 950 steps, 95 % of the plan, and
        // it beats placing them blind on the valley.
        for anchored in [false, true] {
            assert_eq!(
                plan_search(5, 1, 1000, None, 2400, 10, anchored),
                plan_of(Some(100), 2, 950)
            );
        }
        // 100: the finalists would get 25, under three screenings: every candidate runs 20.
        assert_eq!(
            plan_search(5, 1, 100, None, 100, 10, true),
            plan_of(None, 5, 20)
        );
        // Two seeds double every run.
        let plan = plan_search(5, 2, 100, None, 1400, 10, true);
        assert_eq!(plan, plan_of(None, 5, 100));
        // A horizon fixed by the spec is kept whatever the budget.
        assert_eq!(
            plan_search(5, 1, 100, Some(20), 50, 10, true),
            plan_of(None, 5, 20)
        );
    }

    #[test]
    fn without_a_screening_the_finalists_are_the_valley_and_the_candidate_below_it() {
        let candidates = [0.001, 0.003, 0.01, 0.03, 0.1];
        assert_eq!(
            anchored_finalists(&candidates, Some(0.011), 2),
            vec![0.003, 0.01]
        );
        // The valley is the lowest candidate: it and the next one up.
        assert_eq!(
            anchored_finalists(&candidates, Some(0.0009), 2),
            vec![0.001, 0.003]
        );
        assert_eq!(anchored_finalists(&candidates, None, 2), vec![0.003, 0.01]);
    }

    #[test]
    fn the_peak_is_refined_between_the_best_and_its_neighbours_but_stays_nearest_the_best() {
        let judged = |losses: [f64; 3]| {
            let runs: Vec<SweepRun> = [0.01, 0.1, 1.0]
                .iter()
                .zip(losses)
                .map(|(&peak, loss)| run(peak, 0, loss))
                .collect();
            judge(&[0.01, 0.1, 1.0], &runs, None)
        };
        // Symmetric: the vertex is the best itself.
        let peak = refine_peak(&judged([2.0, 1.0, 2.0])).expect("a vertex");
        assert!((peak / 0.1 - 1.0).abs() < 1e-9, "{peak}");
        // y = (x - x*)^2 in decades with x* = -1.25 (0.0562): losses 0.5625, 0.0625, 1.5625.
        let peak = refine_peak(&judged([0.5625, 0.0625, 1.5625])).expect("a vertex");
        assert!((peak.log10() + 1.25).abs() < 1e-9, "{peak}");
        // Whatever the neighbours' losses, the refined peak stays nearer the best than
        // either neighbour (10^-1.5 .. 10^-0.5).
        for (low, high) in [(1.0001, 5.0), (5.0, 1.0001), (1.2, 1.3), (100.0, 1.0)] {
            let peak = refine_peak(&judged([low, 1.0, high])).expect("a vertex");
            assert!(
                (-1.5..=-0.5).contains(&peak.log10()),
                "{low} {high}: {peak}"
            );
        }
        // A diverged neighbour, or the best at an end: no refinement.
        assert_eq!(refine_peak(&judged([2.0, 1.0, f64::INFINITY])), None);
        assert_eq!(refine_peak(&judged([1.0, 2.0, 3.0])), None);
    }

    #[test]
    fn a_probe_goes_halfway_to_the_neighbour_never_run_at_the_horizon_then_to_the_better_one() {
        let at = |peak: f64, steps: usize, loss: f64| SweepRun {
            steps,
            ..run(peak, 0, loss)
        };
        // 0.1 and 0.01 at the plan (100 steps), 1.0 only screened (30 steps).
        let runs = vec![
            at(0.01, 30, 0.9),
            at(0.1, 30, 0.5),
            at(1.0, 30, 0.7),
            at(0.01, 100, 0.4),
            at(0.1, 100, 0.3),
        ];
        let probe = next_probe(&runs, 100).expect("a probe");
        assert!(
            (probe - 0.1f64.sqrt() * 1.0f64.sqrt()).abs() < 1e-12,
            "{probe}"
        );
        // Both neighbours at the plan: towards the better one.
        let mut both = runs.clone();
        both.push(at(1.0, 100, 0.45));
        let probe = next_probe(&both, 100).expect("a probe");
        assert!((probe - 0.001f64.sqrt()).abs() < 1e-12, "{probe}");
        // Neighbours closer than 1.4^2 apart get no probe.
        let close = vec![at(0.1, 100, 0.3), at(0.15, 100, 0.4), at(0.07, 100, 0.5)];
        assert_eq!(next_probe(&close, 100), None);
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
            judge(&candidates, &runs, None)
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
        let judged = judge(&candidates, &runs, None);
        assert!(judged[1].best);
        assert!(judged[2].diverged && !judged[2].in_band);
        assert!(!judged[0].in_band, "0.50 is not within 5 % of 0.30");
        // Alone in the band: it reaches halfway (log) to each neighbour.
        let [low, high] = band(&judged, None).unwrap();
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
        let judged = judge(&candidates, &runs, None);
        assert_eq!(judged.iter().filter(|c| c.in_band).count(), 3);
        assert_eq!(band(&judged, None), Some([0.03, 0.3]));
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
        let judged = judge(&candidates, &runs, None);
        // Means 0.37 and 0.35; std of the best = sqrt(0.005) = 0.0707: 0.37 is inside.
        assert!(judged[1].best);
        assert!(judged[0].in_band);
    }

    #[test]
    fn the_stability_edge_is_the_lowest_peak_with_a_diverged_spiked_or_far_worse_run() {
        let stable = [run(0.01, 0, 0.5), run(0.03, 0, 0.3), run(0.1, 0, 0.35)];
        assert_eq!(stability_edge(&stable), None, "0.35 is within 2x of 0.3");

        // One seed in two diverged at 0.3: the edge is there, whatever the other seed did.
        let mut runs = stable.to_vec();
        runs.extend([
            run(0.3, 0, 0.32),
            run(0.3, 1, f64::INFINITY),
            run(1.0, 0, f64::INFINITY),
        ]);
        let edge = stability_edge(&runs).expect("an edge");
        assert_eq!(
            (edge.lr, edge.reason, edge.steps),
            (0.3, Instability::Diverged, 100)
        );

        // Ending at more than twice the best loss below it is unstable too, at any horizon.
        let mut far = stable.to_vec();
        far.push(SweepRun {
            steps: 30,
            ..run(0.01, 0, 0.8)
        });
        far.push(SweepRun {
            steps: 30,
            ..run(0.1, 0, 1.7)
        });
        let edge = stability_edge(&far).expect("an edge");
        assert_eq!(
            (edge.lr, edge.reason, edge.steps),
            (0.1, Instability::FarAbove, 30)
        );

        // A spike counts though the run recovered; a low peak that learned little does not
        // (it has no lower peak to be far above).
        let mut spiked = vec![run(0.001, 0, 2.0), run(0.01, 0, 0.3)];
        spiked.push(SweepRun {
            spiked: true,
            ..run(0.03, 0, 0.29)
        });
        let edge = stability_edge(&spiked).expect("an edge");
        assert_eq!((edge.lr, edge.reason), (0.03, Instability::Spiked));
    }

    #[test]
    fn a_spike_is_the_smoothed_loss_giving_back_half_its_gain_mid_run() {
        let watch = |losses: &[f64]| {
            let mut watch = SpikeWatch::new(losses.len());
            for &loss in losses {
                watch.push(loss);
            }
            watch.spiked()
        };
        // Windows of 8 steps: 2.0, then 0.4, then back to 1.3 (> 0.4 + 0.8): a spike.
        let mut losses = vec![2.0; 8];
        losses.extend([0.4; 8]);
        losses.extend([1.3; 8]);
        losses.extend([0.3; 8]);
        assert!(watch(&losses));
        // Back to 1.1 only (< 1.2): noise, not a spike.
        losses[16..24].fill(1.1);
        assert!(!watch(&losses));
        // One bad batch among eight is averaged out.
        let mut one_bad = vec![2.0; 8];
        one_bad.extend([0.2; 24]);
        one_bad[20] = 6.0;
        assert!(!watch(&one_bad));
        // A run that barely learned (2.0 to 1.9) cannot give back half of nothing.
        let mut flat = vec![2.0; 8];
        flat.extend([1.9; 8]);
        flat.extend([1.99; 8]);
        assert!(!watch(&flat));
    }

    #[test]
    fn the_best_and_the_band_stay_a_margin_below_the_stability_edge() {
        let candidates = [0.01, 0.03, 0.1, 0.3];
        let runs = [
            run(0.01, 0, 0.50),
            run(0.03, 0, 0.31),
            run(0.1, 0, 0.30),
            run(0.3, 0, 0.29),
        ];
        // The edge at 0.3: 0.3 is unstable (and out of the band though its loss is lowest);
        // 0.1 is under 0.3 / 1.5 and is the best.
        let judged = judge(&candidates, &runs, Some(0.3));
        assert!(judged[3].unstable && !judged[3].in_band && !judged[3].best);
        assert!(judged[2].best);
        assert!(judged[1].in_band, "0.31 is within 5 % of 0.30");
        assert_eq!(band(&judged, Some(0.3)), Some([0.03, 0.1]));
        // The edge at 0.12: 0.1 is under it but within the margin (above 0.08); the best is
        // 0.03, alone in its band, which reaches halfway to each neighbour.
        let judged = judge(&candidates, &runs, Some(0.12));
        assert!(judged[1].best && !judged[2].unstable && !judged[2].in_band);
        let [low, high] = band(&judged, Some(0.12)).expect("a band");
        assert!((low - (0.01f64 * 0.03).sqrt()).abs() < 1e-12);
        assert!((high - (0.03f64 * 0.1).sqrt()).abs() < 1e-12, "{high}");
        // The edge at 1.0, the best at 0.6 alone in its band, and 0.9 stable but too near the
        // edge: halfway to 0.9 (0.73) is past 1.0 / EDGE_MARGIN, where the band stops.
        let near = [run(0.1, 0, 0.5), run(0.6, 0, 0.3), run(0.9, 0, 0.4)];
        let judged = judge(&[0.1, 0.6, 0.9], &near, Some(1.0));
        assert!(judged[1].best && !judged[2].unstable);
        let [_, high] = band(&judged, Some(1.0)).expect("a band");
        assert!((high - 1.0 / EDGE_MARGIN).abs() < 1e-12, "{high}");
        // Nothing finished a margin below the edge (0.1): the highest under it is chosen.
        let judged = judge(&candidates[2..], &runs[2..], Some(0.15));
        assert!(judged[0].best && judged[1].unstable);
    }

    #[test]
    fn the_refined_peak_and_the_probes_never_reach_towards_an_unstable_neighbour() {
        // A parabola whose vertex lies above the best (0.1), towards 1.0.
        let runs = [run(0.01, 0, 2.0), run(0.1, 0, 1.0), run(1.0, 0, 1.2)];
        let stable = judge(&[0.01, 0.1, 1.0], &runs, None);
        assert!(refine_peak(&stable).expect("a vertex") > 0.1);
        let edged = judge(&[0.01, 0.1, 1.0], &runs, Some(1.0));
        assert!(edged[2].unstable);
        let peak = refine_peak(&edged).expect("a vertex");
        assert!(peak <= 0.1 + 1e-15, "{peak}");

        // Probes: without instability the better neighbour (1.0) is probed; with a diverged
        // run at 1.0 the lower side is (a diverged peak is never the better side), and with
        // the only neighbour's halfway point within 2x of the edge, none is.
        let mut probed = runs.to_vec();
        assert!((next_probe(&probed, 100).expect("a probe") - 0.1f64.sqrt()).abs() < 1e-12);
        probed.push(run(1.0, 1, f64::INFINITY));
        let probe = next_probe(&probed, 100).expect("a probe");
        assert!((probe - 0.001f64.sqrt()).abs() < 1e-12, "{probe}");
        let cornered = [run(0.1, 0, 1.0), run(0.2, 0, f64::INFINITY)];
        assert_eq!(next_probe(&cornered, 100), None);
    }

    #[test]
    fn the_best_borders_the_edge_when_the_next_peak_up_is_unstable_or_too_near_it() {
        let runs = [
            run(0.01, 0, 0.5),
            run(0.03, 0, 0.3),
            run(0.1, 0, f64::INFINITY),
        ];
        assert_eq!(bordering_best(&runs, 100), Some(0.03));
        // A stable peak between the best and the edge, and far enough below it (0.1 is under
        // 0.3 / 1.5): the best (0.03) does not border the edge.
        let gap = [
            run(0.01, 0, 0.5),
            run(0.03, 0, 0.3),
            run(0.1, 0, 0.4),
            run(0.3, 0, f64::INFINITY),
        ];
        assert_eq!(bordering_best(&gap, 100), None);
        let stable = [run(0.01, 0, 0.5), run(0.03, 0, 0.3)];
        assert_eq!(bordering_best(&stable, 100), None);
    }
}
