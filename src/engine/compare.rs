//! The recipe race (`kind: "compare"`): each recipe's learning rate tuned the way a tune job
//! tunes (range test and sweep, on the same budget for every recipe, with the recipe's own
//! schedule), then full planned runs per seed validated at regular points; ranked, timed to a
//! target and summed up in one sentence.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::admission::{admit, DataShape};
use super::backend::{BatchOrder, DeviceData, Evaluation};
use super::data::DatasetInfo;
use super::events::{Control, EngineError, Event, TrialInfo, TrialKind, TrialOutcome};
pub use super::events::{RaceEvent, RacePoint};
use super::limits::Limits;
use super::model::load_initial_weights;
use super::model::ModelShape;
use super::optim::Optimizer;
use super::prepare::{prepare, LoadedData};
use super::schedule::{
    Cosine, CosineWarmRestarts, PlateauTracker, ReduceOnPlateau, Schedule, StepLr, WarmupCosine,
};
use super::spec::{JobKind, JobSpec, Recipe, RecipeSchedule, SpecError, ValidSpec};
use super::trainer::Trainer;
use super::trial::{TrialData, TrialLoop, Trials};
use super::tune::{build_job_trainer, one_cycle, select_device, tune_with};

/// Validation points per full run after the start (plus one at step 0).
pub const RACE_POINTS: usize = 25;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareResult {
    /// The validation loss of the first seed's initial weights, before any step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_val_loss: Option<f64>,
    pub recipes: Vec<RecipeResult>,
    pub target: Target,
    /// Recipe names, best first.
    pub ranking: Vec<String>,
    pub verdict: String,
    pub seeds: usize,
    pub timing: CompareTiming,
    pub data: DatasetInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeResult {
    pub name: String,
    /// The optimizer's name (`sgd`, `adam`, `adamw`, `prodigy`, `schedule_free_adamw`,
    /// `schedule_free_sgd`).
    pub optimizer: String,
    /// The schedule's kind (`one_cycle`, `constant`, `reduce_on_plateau`, ...).
    pub schedule: String,
    /// The learning rate raced: the tuned one (the schedule's peak, or its starting value),
    /// or an untuned recipe's fixed one.
    pub lr: f64,
    /// Whether `lr` was tuned; `false` for a challenger raced at its default.
    #[serde(default = "tuned_before_challengers")]
    pub tuned: bool,
    /// Optimizer steps spent tuning this recipe (range test and sweep); 0 when untuned.
    #[serde(default)]
    pub tune_steps: usize,
    /// Prodigy's final estimate `d` over seeds (its learning rate is `d * lr`); `None` for
    /// every other optimizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_d: Option<Stat>,
    pub final_val_loss: Stat,
    /// `None` for regression.
    pub final_val_accuracy: Option<Stat>,
    /// Mean over seeds of the first evaluation step at the target; `None` when a seed never
    /// reached it.
    pub steps_to_target: Option<usize>,
    pub seconds_to_target: Option<f64>,
    pub runs: Vec<RaceRun>,
}

impl RecipeResult {
    /// The final metric the race judges: accuracy for classification, else the loss.
    fn judged(&self, accuracy: bool) -> Stat {
        if accuracy {
            self.final_val_accuracy.unwrap_or(Stat {
                mean: None,
                std: None,
            })
        } else {
            self.final_val_loss
        }
    }
}

/// The wider of two recipes' seed spreads on the judged metric (0 where unknown).
fn seed_noise(a: &RecipeResult, b: &RecipeResult, accuracy: bool) -> f64 {
    let spread = |r: &RecipeResult| r.judged(accuracy).std.unwrap_or(0.0);
    spread(a).max(spread(b))
}

/// Races stored before untuned recipes existed tuned every recipe.
fn tuned_before_challengers() -> bool {
    true
}

/// Mean and sample standard deviation over seeds; `None` when a run diverged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: Option<f64>,
    pub std: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RaceRun {
    pub seed: u64,
    pub diverged: bool,
    pub points: Vec<RacePoint>,
}

/// What counts as reaching the target: `val_accuracy` at least `value`, or `val_loss` at
/// most `value` (regression).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub metric: String,
    pub value: Option<f64>,
    /// The fraction asked for, and the recipe whose final metric it is a fraction of.
    pub fraction: f64,
    pub of_recipe: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareTiming {
    pub seconds: f64,
    pub tune_seconds: f64,
    pub race_seconds: f64,
    /// Optimizer steps spent tuning all recipes, and racing them.
    pub tune_steps: usize,
    pub race_steps: usize,
    pub plan_steps: usize,
    pub steps_per_epoch: usize,
}

/// Runs a validated `compare` job on its loaded data, one trial at a time.
pub fn run_compare(
    spec: &ValidSpec,
    loaded: LoadedData,
    limits: &Limits,
    cancel: &AtomicBool,
    observer: &mut dyn FnMut(Event),
) -> Result<CompareResult, EngineError> {
    run_compare_with(spec, loaded, limits, Trials::serial(), cancel, observer)
}

/// [`run_compare`] with each tune's sweep batches and the race's runs run as `trials` says;
/// the result is the same whatever the number at a time.
pub fn run_compare_with(
    spec: &ValidSpec,
    loaded: LoadedData,
    limits: &Limits,
    trials: Trials,
    cancel: &AtomicBool,
    observer: &mut dyn FnMut(Event),
) -> Result<CompareResult, EngineError> {
    if spec.kind != JobKind::Compare {
        return Err(SpecError::new("kind", "run_compare runs compare jobs only").into());
    }
    let started = Instant::now();
    let (recipes, tune_specs): (Vec<Recipe>, Vec<ValidSpec>) =
        spec.recipe_tune_specs().into_iter().unzip();
    let seeds = spec.compare_seeds();
    let prepared = prepare(spec, loaded.clone())?;
    let shape_of_data = DataShape::of_splits(&prepared.train, &prepared.validation);
    let steps_per_epoch = BatchOrder::steps_per_epoch(prepared.train.rows(), spec.batch_size);
    let plan_steps = spec.plan.epochs * steps_per_epoch;

    // Everything is checked, and every step counted, before the first one is taken.
    for (index, (recipe, tune_spec)) in recipes.iter().zip(&tune_specs).enumerate() {
        admit(tune_spec, &shape_of_data, limits)?;
        recipe_schedule(spec, recipe, 1.0, plan_steps, steps_per_epoch)
            .validate(usize::MAX)
            .map_err(|error| {
                SpecError::new(
                    format!("recipes[{index}].schedule"),
                    format!(
                        "over the planned {plan_steps} steps: {error}; raise plan.epochs or change the schedule"
                    ),
                )
            })?;
    }
    let range_steps = spec.range_test.steps;
    let tune_budget = spec.budget.steps_for(plan_steps, range_steps);
    let tuned = recipes.iter().filter(|recipe| recipe.tune).count();
    let race_steps = recipes.len() * seeds * plan_steps;
    let total = tuned * tune_budget + race_steps;

    let mut outer = Control::new(cancel, observer);
    outer.plan(total);
    let tune_started = Instant::now();
    // The recipes' tunes are independent of each other: one batch. Side by side, each
    // tune's own sweep runs one trial at a time, on the tune's share of the threads.
    let tuned: Vec<usize> = (0..recipes.len())
        .filter(|&index| recipes[index].fixed_lr().is_none())
        .collect();
    let tune_trials = if trials.parallel() > 1 && tuned.len() > 1 {
        Trials::serial()
    } else {
        trials
    };
    let tune_one = |&index: &usize, control: &mut Control<'_>| {
        let recipe = &recipes[index];
        let schedule_for =
            |peak: f64, steps: usize| recipe_schedule(spec, recipe, peak, steps, steps_per_epoch);
        // The tune's steps count as the race's; its points, stages and plan stay its own.
        let cancel = control.cancel_flag();
        let counter = control.trial_counter();
        let mut counted = 0;
        // Its trials are the race's, named by their recipe.
        let mut forward = |event: Event| match event {
            Event::Progress { done, .. } => {
                control.add_done(done.saturating_sub(counted));
                counted = done;
            }
            Event::Trial(mut trial) => {
                trial.info.recipe = Some(recipe.name.clone());
                control.emit(Event::Trial(trial));
            }
            _ => {}
        };
        let mut inner = Control::with_trials(cancel, &mut forward, counter);
        let output = tune_with(
            &tune_specs[index],
            loaded.clone(),
            limits,
            &mut inner,
            tune_trials,
            &schedule_for,
        )?;
        Ok((output.result.recommendation.peak_lr, inner.steps_done()))
    };
    if !tuned.is_empty() {
        outer.emit(Event::Stage("tune"));
    }
    let mut tunes = trials.run_batch(&tuned, &tune_one, &mut outer)?.into_iter();
    // Each recipe's learning rate and the steps spent finding it (none when untuned).
    let lrs: Vec<(f64, usize)> = recipes
        .iter()
        .filter_map(|recipe| match recipe.fixed_lr() {
            Some(lr) => Some((lr, 0)),
            None => tunes.next(),
        })
        .collect();
    let tune_steps: usize = lrs.iter().map(|&(_, spent)| spent).sum();
    let tune_seconds = tune_started.elapsed().as_secs_f64();
    // The race's own steps are known exactly from here on.
    outer.plan(outer.steps_done() + race_steps);
    outer.emit(Event::Stage("race"));

    let race_started = Instant::now();
    let device = select_device(spec.device)?;
    let shape = ModelShape {
        input: prepared.train.sample_shape(),
        output: prepared.train.output_dim(),
        task: prepared.train.task(),
    };
    let train = DeviceData::new(&prepared.train, &device)?;
    let validation = DeviceData::new(&prepared.validation, &device)?;
    let weights = load_initial_weights(spec.init.as_ref(), loaded.initial_weights.as_deref())?;
    let build = |seed: u64| build_job_trainer(spec, &shape, seed, &device, weights.as_ref());
    let initial_val_loss = Some(build(spec.seed)?.evaluate(&validation, cancel)?.loss);
    // Every recipe x seed is one full run, independent of the others: one batch.
    let batch: Vec<RaceTrial> = lrs
        .iter()
        .enumerate()
        .flat_map(|(recipe, &(lr, _))| {
            (0..seeds).map(move |seed_index| RaceTrial {
                recipe,
                seed_index,
                lr,
            })
        })
        .collect();
    let setup = RunSetup {
        build_trainer: &build,
        recipes: &recipes,
        spec,
        data: TrialData {
            train: &train,
            validation: &validation,
            batch_size: spec.batch_size,
        },
        plan_steps,
        steps_per_epoch,
    };
    let run_one = |trial: &RaceTrial, control: &mut Control<'_>| {
        let info = TrialInfo {
            kind: TrialKind::Race,
            lr: Some(trial.lr),
            recipe: Some(recipes[trial.recipe].name.clone()),
            seed: spec.seed + trial.seed_index as u64,
            steps: plan_steps,
        };
        control.trial(
            info,
            |control| setup.run(trial, control),
            |run, seconds| {
                let last = run.points.last();
                TrialOutcome {
                    steps_run: last.map_or(0, |point| point.step),
                    seconds,
                    val_loss: last.and_then(|point| point.val_loss),
                    val_accuracy: last.and_then(|point| point.val_accuracy),
                    diverged_at: run.diverged.then(|| last.map_or(0, |point| point.step)),
                }
            },
        )
    };
    let runs = trials.run_batch(&batch, &run_one, &mut outer)?;
    for run in &runs {
        // A diverged run's remaining steps were planned work that will not happen.
        let steps_run = run.points.last().map_or(0, |point| point.step);
        outer.skip_steps(plan_steps.saturating_sub(steps_run));
    }
    let mut runs = runs.into_iter();
    let mut results = Vec::with_capacity(recipes.len());
    for (recipe, &(lr, spent)) in recipes.iter().zip(&lrs) {
        let recipe_runs: Vec<RaceRun> = runs.by_ref().take(seeds).collect();
        results.push(summarize_recipe(recipe, lr, spent, recipe_runs));
    }
    let race_seconds = race_started.elapsed().as_secs_f64();
    let (target, ranking, verdict) = judge(&mut results, spec.compare_target(), seeds);
    Ok(CompareResult {
        initial_val_loss,
        recipes: results,
        target,
        ranking,
        verdict,
        seeds,
        timing: CompareTiming {
            seconds: started.elapsed().as_secs_f64(),
            tune_seconds,
            race_seconds,
            tune_steps,
            race_steps: outer.steps_done() - tune_steps,
            plan_steps,
            steps_per_epoch,
        },
        data: prepared.info,
    })
}

/// The recipe's schedule at learning rate `lr` for a run of `steps`. ReduceLROnPlateau
/// starts constant (it only moves on validation metrics, which the sweep's short runs do
/// not take), so it is tuned, like `constant`, as a StepLR that never steps.
pub fn recipe_schedule(
    spec: &JobSpec,
    recipe: &Recipe,
    lr: f64,
    steps: usize,
    steps_per_epoch: usize,
) -> Schedule {
    let constant = Schedule::Step(StepLr {
        lr,
        step_size: steps.max(1),
        gamma: 1.0,
        steps,
    });
    match recipe.schedule {
        RecipeSchedule::OneCycle => one_cycle(spec, lr, steps),
        RecipeSchedule::Constant | RecipeSchedule::ReduceOnPlateau { .. } => constant,
        RecipeSchedule::CosineWarmRestarts {
            t_0_epochs,
            t_mult,
            eta_min,
        } => Schedule::CosineWarmRestarts(CosineWarmRestarts {
            base_lr: lr,
            t_0: (t_0_epochs * steps_per_epoch).max(1),
            t_mult,
            eta_min: eta_min.min(lr / 2.0),
            steps,
        }),
        RecipeSchedule::WarmupCosine { warmup_fraction } => {
            let warmup_steps = ((warmup_fraction * steps as f64).round() as usize)
                .clamp(1, steps.saturating_sub(1).max(1));
            Schedule::WarmupCosine(WarmupCosine {
                max_lr: lr,
                total_steps: steps,
                warmup_steps,
                start_factor: 1.0 / 3.0,
                eta_min: 0.0,
            })
        }
        RecipeSchedule::Cosine { eta_min } => Schedule::Cosine(Cosine {
            lr,
            t_max: steps,
            eta_min: eta_min.min(lr / 2.0),
            steps,
        }),
        RecipeSchedule::Step { step_epochs, gamma } => Schedule::Step(StepLr {
            lr,
            step_size: (step_epochs * steps_per_epoch).max(1),
            gamma,
            steps,
        }),
    }
}

fn plateau_of(recipe: &Recipe, lr: f64) -> Option<PlateauTracker> {
    let RecipeSchedule::ReduceOnPlateau {
        mode,
        factor,
        patience,
        threshold,
        threshold_mode,
        cooldown,
        min_lr,
        eps,
    } = recipe.schedule
    else {
        return None;
    };
    let rule = ReduceOnPlateau {
        lr,
        mode,
        factor,
        patience,
        threshold,
        threshold_mode,
        cooldown,
        min_lr,
        eps,
        metrics: Vec::new(),
    };
    Some(rule.tracker())
}

/// The steps after which a run of `steps` is validated: `RACE_POINTS` evenly spaced ones
/// ending at the last (every step of a shorter run).
pub fn evaluation_steps(steps: usize) -> Vec<usize> {
    let points = RACE_POINTS.min(steps);
    (1..=points)
        .map(|index| (index * steps).div_ceil(points))
        .collect()
}

/// One full run of a race: recipe `recipe` at its learning rate `lr`, from the initial
/// weights and data order of seed index `seed_index`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RaceTrial {
    recipe: usize,
    seed_index: usize,
    lr: f64,
}

/// What every run of a race shares.
struct RunSetup<'a> {
    build_trainer: &'a (dyn Fn(u64) -> Result<Trainer, EngineError> + Sync),
    recipes: &'a [Recipe],
    spec: &'a JobSpec,
    data: TrialData<'a>,
    plan_steps: usize,
    steps_per_epoch: usize,
}

impl RunSetup<'_> {
    /// One full run from the seed's initial weights and data order.
    fn run(&self, trial: &RaceTrial, control: &mut Control<'_>) -> Result<RaceRun, EngineError> {
        let recipe = &self.recipes[trial.recipe];
        let seed = self.spec.seed + trial.seed_index as u64;
        let trainer = (self.build_trainer)(seed)?;
        let schedule = recipe_schedule(
            self.spec,
            recipe,
            trial.lr,
            self.plan_steps,
            self.steps_per_epoch,
        );
        let lrs = schedule.curve().lr;
        let mut plateau = plateau_of(recipe, trial.lr);
        let mut optimizer = Optimizer::new(
            &recipe.optimizer_for(self.plan_steps),
            trainer.model().vars(),
        );
        let mut training = TrialLoop::new(&trainer, self.data, &mut optimizer, seed);
        let default_momentum = recipe.optimizer.momentum();
        // At the last point, the last step's learning rate.
        let lr_at = |step: usize, plateau: &Option<PlateauTracker>| match plateau {
            Some(tracker) => tracker.lr(),
            None => lrs[step.min(lrs.len() - 1)],
        };
        let record = |control: &mut Control<'_>, points: &mut Vec<RacePoint>, point| {
            control.emit(Event::RacePoint(RaceEvent {
                recipe: recipe.name.clone(),
                seed,
                point,
            }));
            points.push(point);
        };
        let start = training.evaluate(control)?;
        let mut points = Vec::with_capacity(RACE_POINTS + 1);
        let first = race_point(
            0,
            training.training_seconds(),
            start,
            lr_at(0, &plateau),
            training.optimizer().prodigy_d(),
        );
        record(control, &mut points, first);
        let mut step = 0;
        for until in evaluation_steps(self.plan_steps) {
            while step < until {
                let loss = training.step(
                    lr_at(step, &plateau),
                    schedule.momentum_at(step).unwrap_or(default_momentum),
                    control,
                )?;
                step += 1;
                if !loss.is_finite() {
                    let last = RacePoint {
                        step,
                        seconds: training.training_seconds(),
                        val_loss: None,
                        val_accuracy: None,
                        lr: lr_at(step - 1, &plateau),
                        d: training.optimizer().prodigy_d(),
                    };
                    record(control, &mut points, last);
                    return Ok(RaceRun {
                        seed,
                        diverged: true,
                        points,
                    });
                }
            }
            let evaluation = training.evaluate(control)?;
            if let Some(tracker) = plateau.as_mut() {
                let metric = match recipe.schedule {
                    RecipeSchedule::ReduceOnPlateau {
                        mode: super::schedule::PlateauMode::Max,
                        ..
                    } => evaluation.accuracy.unwrap_or(f64::NAN),
                    _ => evaluation.loss,
                };
                tracker.step(metric);
            }
            let measured = race_point(
                step,
                training.training_seconds(),
                evaluation,
                lr_at(step, &plateau),
                training.optimizer().prodigy_d(),
            );
            record(control, &mut points, measured);
        }
        let diverged = points.last().is_none_or(|p| p.val_loss.is_none());
        Ok(RaceRun {
            seed,
            diverged,
            points,
        })
    }
}

fn race_point(
    step: usize,
    seconds: f64,
    evaluation: Evaluation,
    lr: f64,
    d: Option<f64>,
) -> RacePoint {
    let finite = evaluation.loss.is_finite();
    RacePoint {
        step,
        seconds,
        val_loss: finite.then_some(evaluation.loss),
        val_accuracy: evaluation.accuracy.filter(|_| finite),
        lr,
        d,
    }
}

fn stat(values: &[Option<f64>]) -> Stat {
    let Some(values) = values.iter().copied().collect::<Option<Vec<f64>>>() else {
        return Stat {
            mean: None,
            std: None,
        };
    };
    if values.is_empty() {
        return Stat {
            mean: None,
            std: None,
        };
    }
    let count = values.len() as f64;
    let mean = values.iter().sum::<f64>() / count;
    let std = if values.len() < 2 {
        0.0
    } else {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (count - 1.0)).sqrt()
    };
    Stat {
        mean: Some(mean),
        std: Some(std),
    }
}

fn summarize_recipe(
    recipe: &Recipe,
    lr: f64,
    tune_steps: usize,
    runs: Vec<RaceRun>,
) -> RecipeResult {
    let last = |run: &RaceRun| run.points.last().copied();
    let losses: Vec<Option<f64>> = runs
        .iter()
        .map(|run| last(run).and_then(|p| p.val_loss))
        .collect();
    let accuracies: Vec<Option<f64>> = runs
        .iter()
        .map(|run| last(run).and_then(|p| p.val_accuracy))
        .collect();
    let classification = runs
        .iter()
        .flat_map(|run| &run.points)
        .any(|p| p.val_accuracy.is_some());
    let final_d: Vec<Option<f64>> = runs.iter().map(|run| last(run).and_then(|p| p.d)).collect();
    RecipeResult {
        name: recipe.name.clone(),
        optimizer: recipe.optimizer.name().to_string(),
        schedule: recipe.schedule.kind().to_string(),
        lr,
        tuned: recipe.tune,
        tune_steps,
        final_d: final_d.iter().any(Option::is_some).then(|| stat(&final_d)),
        final_val_loss: stat(&losses),
        final_val_accuracy: classification.then(|| stat(&accuracies)),
        steps_to_target: None,
        seconds_to_target: None,
        runs,
    }
}

/// The first point of a run at the target.
fn reached(run: &RaceRun, metric_is_accuracy: bool, value: f64) -> Option<RacePoint> {
    run.points.iter().copied().find(|p| {
        if metric_is_accuracy {
            p.val_accuracy.is_some_and(|a| a >= value)
        } else {
            p.val_loss.is_some_and(|l| l <= value)
        }
    })
}

/// Sets the target and each recipe's time to it; returns the target, the ranking and the
/// verdict.
pub fn judge(
    results: &mut [RecipeResult],
    fraction: f64,
    seeds: usize,
) -> (Target, Vec<String>, String) {
    let accuracy = results.iter().any(|r| r.final_val_accuracy.is_some());
    // Higher is better: accuracy, or the negated loss; a diverged recipe ranks last.
    let score = |r: &RecipeResult| -> f64 {
        let value = if accuracy {
            r.final_val_accuracy.and_then(|s| s.mean)
        } else {
            r.final_val_loss.mean.map(|loss| -loss)
        };
        value.unwrap_or(f64::NEG_INFINITY)
    };
    let mut order: Vec<usize> = (0..results.len()).collect();
    order.sort_by(|&a, &b| {
        score(&results[b])
            .total_cmp(&score(&results[a]))
            .then_with(|| {
                let loss = |r: &RecipeResult| r.final_val_loss.mean.unwrap_or(f64::INFINITY);
                loss(&results[a]).total_cmp(&loss(&results[b]))
            })
    });
    let ranking: Vec<String> = order.iter().map(|&i| results[i].name.clone()).collect();
    let best = order.first().map(|&i| &results[i]);
    let value = best.and_then(|best| {
        if accuracy {
            best.final_val_accuracy
                .and_then(|s| s.mean)
                .map(|a| a * fraction)
        } else {
            best.final_val_loss.mean.map(|loss| loss / fraction)
        }
    });
    let target = Target {
        metric: if accuracy { "val_accuracy" } else { "val_loss" }.to_string(),
        value,
        fraction,
        of_recipe: best
            .filter(|_| value.is_some())
            .map(|best| best.name.clone()),
    };
    if let Some(value) = value {
        for result in results.iter_mut() {
            let hits: Option<Vec<RacePoint>> = result
                .runs
                .iter()
                .map(|run| reached(run, accuracy, value))
                .collect();
            if let Some(hits) = hits.filter(|hits| !hits.is_empty()) {
                let count = hits.len() as f64;
                let steps = hits.iter().map(|p| p.step as f64).sum::<f64>() / count;
                result.steps_to_target = Some(steps.round() as usize);
                result.seconds_to_target =
                    Some(hits.iter().map(|p| p.seconds).sum::<f64>() / count);
            }
        }
    }
    let speed_and_best = verdict(results, &order, &target, accuracy, seeds);
    let verdict = match what_tuning_bought(results, &order, accuracy, seeds) {
        Some(tuning) => format!("{speed_and_best}; {tuning}"),
        None => speed_and_best,
    };
    (target, ranking, verdict)
}

/// `n` with a comma between thousands: 2,400.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// When tuned and untuned recipes race, what the tuning bought: the best tuned recipe against
/// the best untuned one, on the final metric (within seed noise or not) and on the way to the
/// target, with the steps the tuning cost. `None` when the race is all one or the other.
fn what_tuning_bought(
    results: &[RecipeResult],
    order: &[usize],
    accuracy: bool,
    seeds: usize,
) -> Option<String> {
    let best_where = |tuned: bool| {
        order
            .iter()
            .map(|&i| &results[i])
            .find(|r| r.tuned == tuned)
    };
    let (tuned, untuned) = (best_where(true)?, best_where(false)?);
    let tuned_words = format!(
        "{} (tuned: {} steps of tuning)",
        tuned.name,
        thousands(tuned.tune_steps)
    );
    let untuned_words = format!("{} (untuned)", untuned.name);
    let final_of = |r: &RecipeResult| r.judged(accuracy).mean;
    let ending = match (final_of(tuned), final_of(untuned)) {
        (None, None) => return Some(format!("{tuned_words} and {untuned_words} both diverged")),
        (Some(_), None) => format!("{tuned_words} trains where {untuned_words} diverges"),
        (None, Some(_)) => format!("{untuned_words} trains where {tuned_words} diverges"),
        (Some(t), Some(u)) => {
            let tuned_better = if accuracy { t >= u } else { t <= u };
            let (winner, loser, w, l) = if tuned_better {
                (&tuned_words, &untuned_words, t, u)
            } else {
                (&untuned_words, &tuned_words, u, t)
            };
            let margin = if accuracy {
                format!("{} points above", percent(w - l))
            } else {
                format!(
                    "with {} % lower loss than",
                    percent((l - w) / l.abs().max(f64::MIN_POSITIVE))
                )
            };
            let noise = seed_noise(tuned, untuned, accuracy);
            let paid = if seeds >= 2 && (w - l).abs() <= noise {
                "what tuning bought is within seed noise"
            } else if tuned_better {
                "tuning paid"
            } else {
                "tuning did not pay"
            };
            format!("{paid}: {winner} ends {margin} {loser}")
        }
    };
    let first = match (tuned.steps_to_target, untuned.steps_to_target) {
        (Some(t), Some(u)) if u < t => format!("; {} reaches the target first", untuned.name),
        (Some(t), Some(u)) if t < u => format!("; {} reaches the target first", tuned.name),
        (Some(_), Some(_)) => "; both reach the target at the same step".to_string(),
        (Some(_), None) => format!("; only {} reaches the target in every seed", tuned.name),
        (None, Some(_)) => format!("; only {} reaches the target in every seed", untuned.name),
        (None, None) => String::new(),
    };
    Some(format!("{ending}{first}"))
}

fn percent(value: f64) -> String {
    let value = value * 100.0;
    if value.abs() >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn verdict(
    results: &[RecipeResult],
    order: &[usize],
    target: &Target,
    accuracy: bool,
    seeds: usize,
) -> String {
    let Some(&best_index) = order.first() else {
        return "no recipe was raced".to_string();
    };
    let best = &results[best_index];
    let metric = if accuracy { "accuracy" } else { "loss" };
    let final_of = |r: &RecipeResult| r.judged(accuracy).mean;
    if final_of(best).is_none() {
        return "every recipe diverged: lower plan or check the data".to_string();
    }
    let target_words = format!(
        "{} % of {}'s final {metric}",
        percent(target.fraction),
        best.name
    );
    // The fastest to the target, and the recipe it is measured against: Adam as most teams
    // run it when raced, else the best.
    let fastest = order
        .iter()
        .map(|&i| &results[i])
        .filter(|r| r.steps_to_target.is_some())
        .min_by_key(|r| r.steps_to_target);
    let reference = results
        .iter()
        .find(|r| r.name == "adam_constant")
        .unwrap_or(best);
    let speed = match fastest {
        None => format!("no recipe reaches {target_words} in every seed"),
        Some(fastest) if fastest.name == reference.name => format!(
            "{} reaches {target_words} first, in {} steps",
            fastest.name,
            fastest.steps_to_target.unwrap_or(0)
        ),
        Some(fastest) => match (fastest.steps_to_target, reference.steps_to_target) {
            (Some(fast), Some(slow)) if slow > 0 => format!(
                "{} reaches {target_words} in {} % of {}'s steps ({fast} vs {slow})",
                fastest.name,
                percent(fast as f64 / slow as f64),
                reference.name
            ),
            (Some(fast), _) => format!(
                "{} reaches {target_words} in {fast} steps; {} never does in every seed",
                fastest.name, reference.name
            ),
            (None, _) => format!("no recipe reaches {target_words} in every seed"),
        },
    };
    let Some(&second_index) = order.get(1) else {
        return format!("{speed}; {} is the only recipe raced", best.name);
    };
    let second = &results[second_index];
    let (Some(best_final), Some(second_final)) = (final_of(best), final_of(second)) else {
        return format!("{speed}; {} is best, {} diverged", best.name, second.name);
    };
    let gap = (best_final - second_final).abs();
    let noise = seed_noise(best, second, accuracy);
    let margin = if accuracy {
        format!("{} points of accuracy", percent(gap))
    } else {
        format!(
            "{} % lower loss",
            percent(gap / second_final.abs().max(f64::MIN_POSITIVE))
        )
    };
    if seeds < 2 {
        format!(
            "{speed}; {} is best by {margin} over {} (one seed: no noise estimate)",
            best.name, second.name
        )
    } else if gap <= noise {
        format!(
            "{speed}; {} and {} finish within seed noise ({margin} apart, seed std {})",
            best.name,
            second.name,
            if accuracy {
                percent(noise) + " points"
            } else {
                format!("{noise:.3}")
            }
        )
    } else {
        format!(
            "{speed}; {} is best by {margin} over {}",
            best.name, second.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(name: &str, finals: &[f64], hits: &[usize]) -> RecipeResult {
        // Each run: accuracy 0.5 at step 0, the final accuracy from `hits[i]` on, at step 100.
        let runs: Vec<RaceRun> = finals
            .iter()
            .zip(hits)
            .enumerate()
            .map(|(seed, (&accuracy, &hit))| RaceRun {
                seed: seed as u64,
                diverged: false,
                points: vec![
                    RacePoint {
                        step: 0,
                        seconds: 0.0,
                        val_loss: Some(2.0),
                        val_accuracy: Some(0.5),
                        lr: 0.1,
                        d: None,
                    },
                    RacePoint {
                        step: hit,
                        seconds: hit as f64 / 100.0,
                        val_loss: Some(1.0 - accuracy),
                        val_accuracy: Some(accuracy),
                        lr: 0.1,
                        d: None,
                    },
                    RacePoint {
                        step: 100,
                        seconds: 1.0,
                        val_loss: Some(1.0 - accuracy),
                        val_accuracy: Some(accuracy),
                        lr: 0.1,
                        d: None,
                    },
                ],
            })
            .collect();
        let recipe = Recipe::named("adam_constant").unwrap();
        let mut result = summarize_recipe(&recipe, 0.001, 1000, runs);
        result.name = name.to_string();
        result
    }

    #[test]
    fn evaluation_points_are_evenly_spread_and_end_at_the_last_step() {
        let steps = evaluation_steps(1000);
        assert_eq!(steps.len(), RACE_POINTS);
        assert_eq!(steps[0], 40);
        assert_eq!(*steps.last().unwrap(), 1000);
        assert_eq!(evaluation_steps(7), vec![1, 2, 3, 4, 5, 6, 7]);
        let uneven = evaluation_steps(626);
        assert_eq!(uneven.len(), RACE_POINTS);
        assert_eq!(*uneven.last().unwrap(), 626);
        assert!(uneven.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn the_verdict_compares_steps_to_target_against_adam_and_names_the_best() {
        let mut results = vec![
            recipe("sgd_one_cycle", &[0.97, 0.971], &[30, 32]),
            recipe("adam_constant", &[0.95, 0.951], &[100, 100]),
            recipe("adam_plateau", &[0.98, 0.981], &[60, 60]),
        ];
        let (target, ranking, verdict) = judge(&mut results, 0.98, 2);
        assert_eq!(ranking, ["adam_plateau", "sgd_one_cycle", "adam_constant"]);
        assert_eq!(target.metric, "val_accuracy");
        assert_eq!(target.of_recipe.as_deref(), Some("adam_plateau"));
        assert!((target.value.unwrap() - 0.98 * 0.9805).abs() < 1e-12);
        // 0.98 * 0.9805 = 0.9609: adam_constant's 0.95 never gets there.
        assert_eq!(results[0].steps_to_target, Some(31));
        assert_eq!(results[1].steps_to_target, None);
        assert_eq!(results[2].steps_to_target, Some(60));
        assert!((results[0].seconds_to_target.unwrap() - 0.31).abs() < 1e-12);
        assert_eq!(
            verdict,
            "sgd_one_cycle reaches 98 % of adam_plateau's final accuracy in 31 steps; \
             adam_constant never does in every seed; adam_plateau is best by 1.0 points of \
             accuracy over sgd_one_cycle"
        );
    }

    #[test]
    fn the_verdict_gives_the_share_of_adams_steps_and_says_when_it_is_seed_noise() {
        let mut results = vec![
            recipe("sgd_one_cycle", &[0.95, 0.99], &[30, 32]),
            recipe("adam_constant", &[0.96, 0.975], &[100, 100]),
        ];
        let (_, ranking, verdict) = judge(&mut results, 0.95, 2);
        assert_eq!(ranking, ["sgd_one_cycle", "adam_constant"]);
        assert_eq!(
            verdict,
            "sgd_one_cycle reaches 95 % of sgd_one_cycle's final accuracy in 31 % of \
             adam_constant's steps (31 vs 100); sgd_one_cycle and adam_constant finish within \
             seed noise (0.2 points of accuracy apart, seed std 2.8 points)"
        );
    }

    fn untuned(mut result: RecipeResult) -> RecipeResult {
        result.tuned = false;
        result.tune_steps = 0;
        result
    }

    #[test]
    fn the_verdict_says_what_tuning_bought_against_the_best_untuned_recipe() {
        // The tuned recipe ends 1.2 points above the challenger, beyond the seed spread; the
        // challenger gets to the target first.
        let mut results = vec![
            recipe("sgd_one_cycle", &[0.962, 0.962], &[80, 80]),
            untuned(recipe("schedule_free_adamw", &[0.95, 0.95], &[40, 40])),
            untuned(recipe("prodigy", &[0.90, 0.90], &[100, 100])),
        ];
        results[0].tune_steps = 2400;
        let (_, _, verdict) = judge(&mut results, 0.98, 2);
        assert!(
            verdict.ends_with(
                "; tuning paid: sgd_one_cycle (tuned: 2,400 steps of tuning) ends 1.2 points \
                 above schedule_free_adamw (untuned); schedule_free_adamw reaches the target first"
            ),
            "{verdict}"
        );

        // The challenger ends ahead.
        let mut results = vec![
            recipe("adam_constant", &[0.90, 0.90], &[90, 90]),
            untuned(recipe("prodigy", &[0.95, 0.95], &[40, 40])),
        ];
        let (_, _, verdict) = judge(&mut results, 0.98, 2);
        assert!(
            verdict.ends_with(
                "; tuning did not pay: prodigy (untuned) ends 5.0 points above adam_constant \
                 (tuned: 1,000 steps of tuning); only prodigy reaches the target in every seed"
            ),
            "{verdict}"
        );

        // Within the seeds' spread, neither side is claimed.
        let mut results = vec![
            recipe("adam_constant", &[0.95, 0.99], &[30, 32]),
            untuned(recipe("prodigy", &[0.96, 0.975], &[30, 32])),
        ];
        let (_, _, verdict) = judge(&mut results, 0.95, 2);
        assert!(
            verdict.ends_with(
                "; what tuning bought is within seed noise: adam_constant (tuned: 1,000 steps \
                 of tuning) ends 0.2 points above prodigy (untuned); both reach the target at \
                 the same step"
            ),
            "{verdict}"
        );

        // All tuned (or all untuned): nothing to say about tuning.
        let mut results = vec![recipe("adam_constant", &[0.95, 0.95], &[30, 32])];
        let (_, _, verdict) = judge(&mut results, 0.95, 2);
        assert!(!verdict.contains("tun"), "{verdict}");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn a_diverged_recipe_ranks_last_with_no_final_metric() {
        let mut diverged = recipe("adam_constant", &[0.9], &[50]);
        diverged.runs[0].points[2].val_loss = None;
        diverged.runs[0].points[2].val_accuracy = None;
        diverged.runs[0].diverged = true;
        let diverged = summarize_recipe(
            &Recipe::named("adam_constant").unwrap(),
            0.1,
            0,
            diverged.runs,
        );
        assert_eq!(diverged.final_val_loss.mean, None);
        let mut results = vec![diverged, recipe("sgd_one_cycle", &[0.9], &[50])];
        let (_, ranking, verdict) = judge(&mut results, 0.98, 1);
        assert_eq!(ranking, ["sgd_one_cycle", "adam_constant"]);
        assert!(
            verdict.ends_with("sgd_one_cycle is best, adam_constant diverged"),
            "{verdict}"
        );
    }
}
