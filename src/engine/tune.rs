//! A whole job: range test, sweep, or both (`tune`), and the recommendation built from them:
//! peak learning rate, band, a OneCycle schedule sized for the planned
//! run, ready-to-paste PyTorch and fastai lines, and the warnings.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::admission::{admit, check_device, DataShape};
use super::backend::{BatchOrder, DeviceData};
use super::data::DatasetInfo;
use super::events::{Control, EngineError, Event, TrialInfo, TrialKind, TrialOutcome};
use super::limits::Limits;
use super::model::load_initial_weights;
use super::model::{Model, ModelShape};
use super::optim::Optimizer;
use super::prepare::{prepare, LoadedData};
use super::range_test::{run_range_test, CurvePoint, RangeTestInputs};
use super::schedule::{OneCycle, Schedule};
use super::spec::{
    Budget, Candidates, DeviceChoice, JobKind, JobSpec, OptimizerSpec, SpecError, ValidSpec,
};
use super::suggest::{self, CurveEnd, Suggestions};
use super::sweep::{
    auto_candidates, band, final_candidates, judged_at, plan_search, refine_peak, train_candidate,
    CandidateSetup, CandidateTrial, OpenEdge, Search, SearchPlan, StabilityEdge, SweepCandidate,
    SweepRun, EDGE_MARGIN, SMALL_VALIDATION_ROWS,
};
use super::trainer::Trainer;
use super::trial::{TrialData, Trials};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The validation loss of the initial weights, before any step (dropout off, batch norm
    /// on its running statistics). Absent in results stored before it was reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_val_loss: Option<f64>,
    pub recommendation: Recommendation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range_test: Option<RangeTestSummary>,
    pub sweep: Vec<SweepCandidate>,
    pub timing: Timing,
    pub data: DatasetInfo,
    pub model: ModelSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub peak_lr: f64,
    pub band: [f64; 2],
    /// `"sweep"` when short trainings chose it, `"range_test"` when only the curve did.
    pub source: String,
    pub schedule: Schedule,
    pub pytorch: String,
    pub fastai: String,
    pub warnings: Vec<String>,
    /// The horizon the winning peak was judged at (the planned run's, unless the budget
    /// forced a shorter one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_at_steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_at_epochs: Option<f64>,
    /// The lowest peak at which a sweep run (at any horizon) diverged, spiked mid-run, or
    /// ended more than twice the loss of a lower peak: where instability begins. Absent
    /// when every run was stable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability_edge_lr: Option<f64>,
    /// What showed it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability_edge_reason: Option<super::sweep::Instability>,
    /// `stability_edge_lr / peak_lr`: how many times below the edge the peak is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_distance: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RangeTestSummary {
    pub suggestions: Suggestions,
    pub stopped_early: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    pub steps_run: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub seconds: f64,
    /// Optimizer steps taken by the whole job (range test and sweep).
    pub total_steps: usize,
    /// The most it was allowed (`budget`).
    pub budget_steps: usize,
    /// Steps of the planned run, and what the job spent as a multiple of them.
    pub plan_steps: usize,
    pub plan_multiple: f64,
    pub steps_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub arch: String,
    /// `"native"` or `"candle"` (absent in results stored before it was reported).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    pub parameters: usize,
    pub device: String,
    pub steps_per_epoch: usize,
    /// The peak memory admission estimated for the job (weights, step buffers, data).
    pub estimated_memory_bytes: u64,
}

/// A finished job: the result and the range-test curve (stored apart from the result).
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    pub result: JobResult,
    pub curve: Vec<CurvePoint>,
}

/// Picks the device a spec asks for. `auto` means CUDA when this build has it and a GPU is
/// there, else the CPU.
pub fn select_device(choice: DeviceChoice) -> Result<Device, EngineError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            check_device(choice)?;
            Ok(Device::new_cuda(0)?)
        }
        DeviceChoice::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
    }
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// Runs a validated range test, sweep or tune on its loaded data (a `compare` job runs with
/// [`super::compare::run_compare`]), one trial at a time.
pub fn run_job(
    spec: &ValidSpec,
    loaded: LoadedData,
    limits: &Limits,
    cancel: &AtomicBool,
    observer: &mut dyn FnMut(Event),
) -> Result<JobOutput, EngineError> {
    run_job_with(spec, loaded, limits, Trials::serial(), cancel, observer)
}

/// [`run_job`] with the sweep's independent trials run as `trials` says (side by side with
/// [`Trials::new`]); the result is the same whatever the number at a time.
pub fn run_job_with(
    spec: &ValidSpec,
    loaded: LoadedData,
    limits: &Limits,
    trials: Trials,
    cancel: &AtomicBool,
    observer: &mut dyn FnMut(Event),
) -> Result<JobOutput, EngineError> {
    if spec.kind == JobKind::Compare {
        return Err(SpecError::new(
            "kind",
            "a compare job gives a race, not a tune: run it with compare::run_compare",
        )
        .into());
    }
    let mut control = Control::new(cancel, observer);
    tune_with(
        spec,
        loaded,
        limits,
        &mut control,
        trials,
        &|peak_lr, steps| one_cycle(spec, peak_lr, steps),
    )
}

/// The tune's machinery with the sweep's candidates trained on `schedule_for(peak, steps)`
/// (OneCycle for a tune; a recipe's own schedule in a race), as a sequence of stages: set up
/// (data, model, plan and budget, all checked before a step is taken), the range test, the
/// sweep (the planner's batches of trials), and the recommendation read from both.
pub(crate) fn tune_with(
    spec: &ValidSpec,
    loaded: LoadedData,
    limits: &Limits,
    control: &mut Control<'_>,
    trials: Trials,
    schedule_for: &(dyn Fn(f64, usize) -> Schedule + Sync),
) -> Result<JobOutput, EngineError> {
    let started = Instant::now();
    let (setup, trainer) = TuneSetup::new(spec, loaded, limits, control)?;
    control.plan(setup.planned_steps());
    let range = range_stage(&setup, trainer, control)?;
    let sweep = sweep_stage(
        &setup,
        range.summary.as_ref(),
        trials,
        schedule_for,
        control,
    )?;
    let mut warnings = range.warnings;
    warnings.extend(sweep.warnings);
    let mut recommendation = recommend(
        spec,
        range.summary.as_ref(),
        &sweep.finals,
        Edges {
            open: sweep.open_edge,
            stability: sweep.stability_edge,
        },
        setup.plan_steps,
        warnings,
    )?;
    if recommendation.source == "sweep" {
        recommendation.judged_at_steps = sweep.horizon;
        recommendation.judged_at_epochs = sweep
            .horizon
            .map(|steps| steps as f64 / setup.steps_per_epoch.max(1) as f64);
    }
    let seconds = started.elapsed().as_secs_f64();
    let total_steps = control.steps_done();
    Ok(JobOutput {
        result: JobResult {
            initial_val_loss: Some(setup.initial_val_loss),
            recommendation,
            range_test: range.summary,
            sweep: sweep.judged,
            timing: Timing {
                seconds,
                total_steps,
                budget_steps: setup.budget,
                plan_steps: setup.plan_steps,
                plan_multiple: total_steps as f64 / setup.plan_steps.max(1) as f64,
                steps_per_second: if seconds > 0.0 {
                    total_steps as f64 / seconds
                } else {
                    0.0
                },
            },
            model: ModelSummary {
                arch: spec.model.arch().to_string(),
                backend: setup.backend.to_string(),
                parameters: setup.parameters,
                device: device_name(&setup.device),
                steps_per_epoch: setup.steps_per_epoch,
                estimated_memory_bytes: setup.memory_bytes,
            },
            data: setup.info,
        },
        curve: range.curve,
    })
}

/// What every stage of a tune works with, set up and checked before the first step: the
/// data on its device, how a trial's model is built, the plan's lengths and the budget.
struct TuneSetup<'s> {
    spec: &'s ValidSpec,
    info: DatasetInfo,
    classification: bool,
    device: Device,
    shape: ModelShape,
    weights: Option<std::collections::HashMap<String, candle_core::Tensor>>,
    train: DeviceData,
    validation: DeviceData,
    backend: &'static str,
    parameters: usize,
    memory_bytes: u64,
    initial_val_loss: f64,
    steps_per_epoch: usize,
    plan_steps: usize,
    /// The sweep's run length when the spec fixes it (`sweep.epochs`).
    fixed_steps: Option<usize>,
    range_steps: usize,
    candidate_count: usize,
    budget: usize,
    /// The shortest run a OneCycle of the spec's shape allows.
    min_steps: usize,
    /// Whether the sweep's candidates hang off the range test's suggestion.
    anchored: bool,
}

impl<'s> TuneSetup<'s> {
    /// Prepares the data, admits the job (nothing is built before its cost is known to fit
    /// the limits), builds the range test's model and works out the plan. Every check a spec
    /// can fail happens here, before a step is taken.
    fn new(
        spec: &'s ValidSpec,
        loaded: LoadedData,
        limits: &Limits,
        control: &Control<'_>,
    ) -> Result<(TuneSetup<'s>, Trainer), EngineError> {
        let fetched_weights = loaded.initial_weights.clone();
        let prepared = prepare(spec, loaded)?;
        let cost = admit(
            spec,
            &DataShape::of_splits(&prepared.train, &prepared.validation),
            limits,
        )?;
        let device = select_device(spec.device)?;
        let shape = ModelShape {
            input: prepared.train.sample_shape(),
            output: prepared.train.output_dim(),
            task: prepared.train.task(),
        };
        let weights = load_initial_weights(spec.init.as_ref(), fetched_weights.as_deref())?;
        let trainer = build_job_trainer(spec, &shape, spec.seed, &device, weights.as_ref())?;
        let train = DeviceData::new(&prepared.train, &device)?;
        let validation = DeviceData::new(&prepared.validation, &device)?;
        // Where training starts (and, for loaded weights, the check that they loaded right).
        let initial_val_loss = trainer.evaluate(&validation, control.cancel_flag())?.loss;
        let steps_per_epoch = BatchOrder::steps_per_epoch(train.rows, spec.batch_size);
        let plan_steps = spec.plan.epochs * steps_per_epoch;
        let fixed_steps = spec
            .sweep
            .epochs
            .map(|epochs| epochs.min(spec.plan.epochs) * steps_per_epoch);
        if let Some(steps) = fixed_steps {
            check_schedule_length(spec, steps, "sweep.epochs")?;
        }
        check_schedule_length(spec, plan_steps, "plan.epochs")?;
        let candidate_count = match &spec.sweep.candidates {
            Candidates::Auto => spec.sweep.count,
            Candidates::List(values) => values.len(),
        };
        let range_steps = if spec.kind == JobKind::Sweep {
            0
        } else {
            spec.range_test.steps
        };
        let budget = job_budget(spec, plan_steps, fixed_steps, candidate_count, range_steps)
            // The server's bound on sweep epochs caps a budget-driven sweep too.
            .min(
                range_steps.saturating_add(limits.max_sweep_epochs.saturating_mul(steps_per_epoch)),
            );
        let setup = TuneSetup {
            spec,
            info: prepared.info,
            classification: prepared.train.task() == super::spec::Task::Classification,
            backend: trainer.backend_name(),
            parameters: trainer.model().parameter_count(),
            memory_bytes: cost.memory_bytes,
            device,
            shape,
            weights,
            train,
            validation,
            initial_val_loss,
            steps_per_epoch,
            plan_steps,
            fixed_steps,
            range_steps,
            candidate_count,
            budget,
            min_steps: shortest_schedule(spec, plan_steps),
            anchored: spec.kind == JobKind::Tune
                && matches!(spec.sweep.candidates, Candidates::Auto),
        };
        Ok((setup, trainer))
    }

    /// A trial's model, from `seed`.
    fn build(&self, seed: u64) -> Result<Trainer, EngineError> {
        build_job_trainer(
            self.spec,
            &self.shape,
            seed,
            &self.device,
            self.weights.as_ref(),
        )
    }

    fn data(&self) -> TrialData<'_> {
        TrialData {
            train: &self.train,
            validation: &self.validation,
            batch_size: self.spec.batch_size,
        }
    }

    /// The sweep's plan for `available` steps.
    fn search_plan(&self, candidates: usize, available: usize) -> SearchPlan {
        plan_search(
            candidates,
            self.spec.sweep.seeds,
            self.plan_steps,
            self.fixed_steps,
            available,
            self.min_steps,
            self.anchored,
        )
    }

    /// The steps the job plans before it knows how its runs go: the range test's, then the
    /// sweep's screening and finalists at the budget's plan.
    fn planned_steps(&self) -> usize {
        if self.spec.kind == JobKind::RangeTest {
            return self.range_steps;
        }
        let seeds = self.spec.sweep.seeds;
        let plan = self.search_plan(
            self.candidate_count,
            self.budget.saturating_sub(self.range_steps),
        );
        self.range_steps
            + plan.screen_steps.unwrap_or(0) * self.candidate_count * seeds
            + plan.finalists * seeds * plan.final_steps
    }
}

/// The range test's part of the result: its summary and curve (none for a `sweep` job), and
/// what it warns of.
struct RangeStage {
    summary: Option<RangeTestSummary>,
    curve: Vec<CurvePoint>,
    warnings: Vec<String>,
}

/// The range test, one trial on the job's first model (dropped once it has run: every sweep
/// trial builds its own).
fn range_stage(
    setup: &TuneSetup<'_>,
    trainer: Trainer,
    control: &mut Control<'_>,
) -> Result<RangeStage, EngineError> {
    let spec = setup.spec;
    if spec.kind == JobKind::Sweep {
        return Ok(RangeStage {
            summary: None,
            curve: Vec::new(),
            warnings: Vec::new(),
        });
    }
    control.emit(Event::Stage("range_test"));
    let mut optimizer = Optimizer::new(&spec.optimizer, trainer.model().vars());
    let info = TrialInfo {
        kind: TrialKind::RangeTest,
        lr: None,
        recipe: None,
        seed: spec.seed,
        steps: spec.range_test.steps,
    };
    let inputs = RangeTestInputs {
        trainer: &trainer,
        optimizer: &mut optimizer,
        train: &setup.train,
        validation: &setup.validation,
        batch_size: spec.batch_size,
        seed: spec.seed,
    };
    let outcome = control.trial(
        info,
        |control| run_range_test(inputs, &spec.range_test, control),
        |curve, seconds| TrialOutcome {
            steps_run: curve.points.len(),
            seconds,
            val_loss: None,
            val_accuracy: None,
            diverged_at: curve.stopped_early.then_some(curve.points.len()),
        },
    )?;
    control.skip_steps(spec.range_test.steps - outcome.points.len());
    let lrs: Vec<f64> = outcome.points.iter().map(|p| p.lr).collect();
    let smoothed: Vec<f64> = outcome.points.iter().map(|p| p.smoothed).collect();
    let suggestions = suggest::suggest(&lrs, &smoothed, spec.range_test.steps);
    let warnings = suggest::warnings(
        &lrs,
        &smoothed,
        &suggestions,
        CurveEnd {
            planned_steps: spec.range_test.steps,
            stopped_early: outcome.stopped_early,
        },
    );
    Ok(RangeStage {
        summary: Some(RangeTestSummary {
            suggestions,
            stopped_early: outcome.stopped_early,
            stop_reason: outcome.stop_reason,
            steps_run: outcome.points.len(),
        }),
        curve: outcome.points,
        warnings,
    })
}

/// The sweep's part of the result: every candidate as judged (the screening's, then the
/// finalists'), the finalists alone, the horizon they were judged at, the edges it found, and
/// what it warns of. Empty for a `range_test` job.
#[derive(Default)]
struct SweepStage {
    judged: Vec<SweepCandidate>,
    finals: Vec<SweepCandidate>,
    horizon: Option<usize>,
    open_edge: Option<OpenEdge>,
    stability_edge: Option<StabilityEdge>,
    warnings: Vec<String>,
}

/// The sweep: the candidates (the spec's list, or placed around the range test's
/// suggestions), then the planner's batches of trials run as `trials` says, within what the
/// range test left of the budget.
fn sweep_stage(
    setup: &TuneSetup<'_>,
    range: Option<&RangeTestSummary>,
    trials: Trials,
    schedule_for: &(dyn Fn(f64, usize) -> Schedule + Sync),
    control: &mut Control<'_>,
) -> Result<SweepStage, EngineError> {
    let spec = setup.spec;
    if spec.kind == JobKind::RangeTest {
        return Ok(SweepStage::default());
    }
    let candidates = match &spec.sweep.candidates {
        Candidates::List(values) => {
            let mut values = values.clone();
            values.sort_by(f64::total_cmp);
            values.dedup();
            values
        }
        Candidates::Auto => {
            let suggestions = range.map(|r| r.suggestions).unwrap_or_default();
            auto_candidates(&suggestions, spec.sweep.count).ok_or_else(|| {
                SpecError::new(
                    "range_test",
                    "the range test gave no suggestion to place sweep candidates around (see its warnings): widen start_lr..end_lr or give sweep.candidates",
                )
            })?
        }
    };
    let (budget, plan_steps, steps_per_epoch) =
        (setup.budget, setup.plan_steps, setup.steps_per_epoch);
    let available = budget.saturating_sub(control.steps_done());
    let plan = setup.search_plan(candidates.len(), available);
    if setup.fixed_steps.is_none() && plan.final_steps < setup.min_steps {
        return Err(SpecError::new(
            "budget",
            format!(
                "{budget} steps leave {available} for the sweep after the range test: too few for {} candidates of at least {} steps; raise budget.plan_multiple or budget.steps",
                candidates.len() * spec.sweep.seeds,
                setup.min_steps
            ),
        )
        .into());
    }
    control.emit(Event::Stage("sweep"));
    let search = Search {
        seeds: spec.sweep.seeds,
        extend: matches!(spec.sweep.candidates, Candidates::Auto),
        anchor: range.and_then(|r| r.suggestions.preferred()),
    };
    let build = |seed: u64| setup.build(seed);
    let candidate_setup = CandidateSetup {
        build_trainer: &build,
        optimizer: &spec.optimizer,
        data: setup.data(),
        seed: spec.seed,
        schedule_for,
    };
    let train_one = |trial: &CandidateTrial, control: &mut Control<'_>| {
        train_candidate(&candidate_setup, trial, control)
    };
    let mut runner = |batch: &[CandidateTrial]| {
        let results = trials.run_batch(batch, &train_one, control)?;
        // A diverged run's remaining steps were planned work that will not happen.
        for (trial, result) in batch.iter().zip(&results) {
            control.skip_steps(trial.steps - result.steps_run);
        }
        Ok::<_, EngineError>(results)
    };
    let outcome = search.run(&candidates, plan, available, &mut runner)?;
    control.skip_steps(usize::MAX);

    let mut warnings = Vec::new();
    let finals = final_candidates(&outcome.runs, outcome.final_steps);
    if finals.iter().all(|candidate| candidate.diverged) {
        warnings
            .push("every sweep candidate diverged: lower the candidates or start_lr".to_string());
    }
    if outcome.final_steps < plan_steps {
        warnings.push(format!(
            "the candidates were judged after {} of the planned {} epochs, as the budget ({budget} steps) allows: a peak judged early tends to be too high for the whole run; raise budget.plan_multiple to judge at the plan",
            epochs_label(outcome.final_steps, steps_per_epoch),
            spec.plan.epochs
        ));
    }
    let screened: Vec<SweepRun> = outcome
        .runs
        .iter()
        .copied()
        .filter(|run| run.steps != outcome.final_steps)
        .collect();
    let mut screening = judged_at(
        &screened,
        plan.screen_steps.unwrap_or(0),
        outcome.edge.map(|edge| edge.lr),
    );
    for candidate in &mut screening {
        candidate.best = false;
        candidate.in_band = false;
    }
    if setup.validation.rows < SMALL_VALIDATION_ROWS {
        warnings.push(small_validation_warning(
            setup.validation.rows,
            &finals,
            setup.classification,
        ));
    }
    let mut judged: Vec<SweepCandidate> = screening.into_iter().chain(finals.clone()).collect();
    for candidate in &mut judged {
        candidate.epochs = candidate.steps as f64 / steps_per_epoch.max(1) as f64;
    }
    Ok(SweepStage {
        judged,
        finals,
        horizon: Some(outcome.final_steps),
        open_edge: outcome.open_edge,
        stability_edge: outcome.edge,
        warnings,
    })
}

/// A job's model: built for its spec with `seed`, from its initial weights if it has them,
/// on the backend it asks for.
pub(crate) fn build_job_trainer(
    spec: &JobSpec,
    shape: &ModelShape,
    seed: u64,
    device: &Device,
    weights: Option<&std::collections::HashMap<String, candle_core::Tensor>>,
) -> Result<Trainer, EngineError> {
    let model = Model::build(&spec.model, shape, seed, device)?;
    if let Some(weights) = weights {
        model.load_state_dict(weights)?;
    }
    Ok(Trainer::new(model, spec.backend))
}

/// A OneCycle schedule needs a few steps per phase; with too little data per epoch (or too
/// large a batch) it has none, and the error says what to raise.
fn check_schedule_length(spec: &JobSpec, steps: usize, field: &str) -> Result<(), EngineError> {
    if spec.kind == JobKind::RangeTest {
        return Ok(());
    }
    one_cycle(spec, 1.0, steps).validate(usize::MAX).map_err(|error| {
        SpecError::new(
            field,
            format!(
                "a OneCycle schedule of {steps} steps is too short ({}); raise {field} or lower batch_size",
                error.message
            ),
        )
        .into()
    })
}

/// The OneCycle schedule for a peak, with the sweep's shape and the optimizer's momentum.
pub fn one_cycle(spec: &JobSpec, peak_lr: f64, total_steps: usize) -> Schedule {
    let shape = &spec.sweep.schedule;
    Schedule::OneCycle(OneCycle {
        max_lr: peak_lr,
        total_steps,
        pct_start: shape.pct_start,
        anneal: shape.anneal,
        div_factor: shape.div_factor,
        final_div_factor: shape.final_div_factor,
        three_phase: shape.three_phase,
        cycle_momentum: shape.cycle_momentum,
        base_momentum: shape.base_momentum,
        max_momentum: shape.max_momentum,
        momentum_of: Some(match spec.optimizer {
            OptimizerSpec::Sgd { .. } | OptimizerSpec::ScheduleFreeSgd { .. } => {
                super::schedule::MomentumOf::SgdMomentum
            }
            _ => super::schedule::MomentumOf::AdamBeta1,
        }),
    })
}

/// What the sweep found at the ends of what it tried: an end it could not look past, and
/// where instability begins.
struct Edges {
    open: Option<OpenEdge>,
    stability: Option<StabilityEdge>,
}

fn recommend(
    spec: &JobSpec,
    range: Option<&RangeTestSummary>,
    judged: &[SweepCandidate],
    edges: Edges,
    planned_steps: usize,
    mut warnings: Vec<String>,
) -> Result<Recommendation, EngineError> {
    let open_edge = edges.open;
    let stability = edges.stability;
    // Auto candidates are the tune's own probes, so the peak may lie between them; an
    // explicit list asks which of its values is best.
    let refine = matches!(spec.sweep.candidates, Candidates::Auto);
    let from_sweep = judged.iter().find(|candidate| candidate.best).map(|best| {
        let band =
            band(judged, stability.map(|edge| edge.lr)).unwrap_or([best.peak_lr, best.peak_lr]);
        // A value no run used is given to three significant digits, inside the band.
        let refined = refine
            .then(|| refine_peak(judged))
            .flatten()
            .map(|peak| round_sig(peak).clamp(band[0], band[1]));
        (refined.unwrap_or(best.peak_lr), band)
    });
    let advice = match spec.sweep.candidates {
        Candidates::Auto => "raise the budget to let the sweep look further",
        Candidates::List(_) => "add such sweep.candidates",
    };
    match (from_sweep, open_edge) {
        (Some((peak, _)), Some(OpenEdge::Higher)) => warnings.push(format!(
            "the best sweep candidate is the highest one tried ({peak:.3e}): a higher peak may be better still; {advice}"
        )),
        (Some((peak, _)), Some(OpenEdge::Lower)) => warnings.push(format!(
            "the best sweep candidate is the lowest one tried ({peak:.3e}): a lower peak may be better still; {advice}"
        )),
        _ => {}
    }
    let (peak_lr, band, source) = match (from_sweep, range) {
        (Some((peak, band)), _) => (peak, band, "sweep"),
        (None, Some(range)) => {
            let suggestions = range.suggestions;
            let peak = suggestions.preferred().ok_or_else(|| {
                SpecError::new(
                    "range_test",
                    "the range test gave no suggestion (see its warnings): widen start_lr..end_lr or raise steps",
                )
            })?;
            let values: Vec<f64> = [
                suggestions.valley,
                suggestions.steepest,
                suggestions.minimum,
            ]
            .into_iter()
            .flatten()
            .collect();
            let low = values.iter().copied().fold(peak, f64::min);
            let high = values.iter().copied().fold(peak, f64::max);
            if spec.kind != JobKind::RangeTest {
                warnings.push("no sweep candidate trained without diverging: this recommendation comes from the range test alone".to_string());
            }
            (peak, [low, high], "range_test")
        }
        (None, None) => {
            return Err(SpecError::new(
                "sweep.candidates",
                "every candidate diverged: give lower peak learning rates",
            )
            .into())
        }
    };
    // The edge only speaks for a peak the sweep chose.
    let stability = stability.filter(|_| source == "sweep");
    if let Some(edge) = stability {
        warnings.extend(edge_warning(judged, peak_lr, edge));
    }
    let schedule = one_cycle(spec, peak_lr, planned_steps.max(2));
    let shape = &spec.sweep.schedule;
    let fastai = format!(
        "learn.fit_one_cycle({}, lr_max={}, div={:?}, div_final={:?}, pct_start={}, moms=({}, {}, {}))",
        spec.plan.epochs,
        round_sig(peak_lr),
        shape.div_factor,
        shape.final_div_factor,
        shape.pct_start,
        shape.max_momentum,
        shape.base_momentum,
        shape.max_momentum
    );
    Ok(Recommendation {
        peak_lr,
        band,
        source: source.to_string(),
        pytorch: schedule.pytorch(),
        schedule,
        fastai,
        warnings,
        judged_at_steps: None,
        judged_at_epochs: None,
        stability_edge_lr: stability.map(|edge| edge.lr),
        stability_edge_reason: stability.map(|edge| edge.reason),
        edge_distance: stability.map(|edge| edge.lr / peak_lr),
    })
}

/// A peak at most this many times below the stability edge is close to it.
const CLOSE_TO_EDGE: f64 = 3.0;

/// What the user should know about the stability edge: that the peak had to stay below a
/// lower loss measured too near the edge, or that it is close to the edge; nothing when it
/// is far below.
fn edge_warning(judged: &[SweepCandidate], peak_lr: f64, edge: StabilityEdge) -> Option<String> {
    let distance = edge.lr / peak_lr;
    let what = format!(
        "the stability edge is {:.3e} ({} there, at {} steps)",
        edge.lr,
        edge.reason.describe(),
        edge.steps
    );
    if distance <= 1.0 {
        return Some(format!(
            "{what}, and no sweep candidate below it finished: the recommendation {peak_lr:.3e} is at or above it; lower the candidates or start_lr"
        ));
    }
    let lowest_loss = judged
        .iter()
        .filter(|c| c.val_loss.is_finite())
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss));
    let best = judged.iter().find(|c| c.best);
    match (lowest_loss, best) {
        (Some(lowest), Some(best)) if lowest.peak_lr > best.peak_lr => Some(format!(
            "{what}: the lowest validation loss ({:.4}) was at {:.3e}, too near the edge to be safe with other seeds, so the recommendation stays {distance:.1}x below the edge (it stays at least {EDGE_MARGIN}x below)",
            lowest.val_loss, lowest.peak_lr
        )),
        _ if distance < CLOSE_TO_EDGE => Some(format!(
            "{what}: the recommendation is only {distance:.1}x below it; do not round it up, and expect some seeds to diverge above it"
        )),
        _ => None,
    }
}

/// Warns that a validation set of `rows` rows is too small to separate candidates well, with
/// what the runs measured: the best candidate's spread over its seeds (and, for
/// classification, what one row is worth in accuracy).
fn small_validation_warning(
    rows: usize,
    finals: &[SweepCandidate],
    classification: bool,
) -> String {
    let mut detail = Vec::new();
    if classification && rows > 0 {
        detail.push(format!(
            "one row is {:.1} points of accuracy",
            100.0 / rows as f64
        ));
    }
    let best = finals.iter().find(|c| c.best);
    if let Some(best) = best.filter(|c| c.val_loss_std > 0.0) {
        detail.push(format!(
            "the best candidate's final validation loss varied by {:.0} % (one standard deviation) across its {} seeds, against the 5 % that separates the band from the rest",
            100.0 * best.val_loss_std / best.val_loss.abs().max(f64::MIN_POSITIVE),
            best.seeds
        ));
    }
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", detail.join("; "))
    };
    let seeds = best.map_or(1, |c| c.seeds);
    format!(
        "the validation split has {rows} rows, too few to separate candidates well{detail}: the best was judged on {seeds} {}; a validation set of {SMALL_VALIDATION_ROWS} rows or more (a larger validation_fraction, or more data) would separate them better, and a larger budget.plan_multiple lets the sweep place more peaks between them",
        if seeds == 1 { "seed" } else { "seeds" }
    )
}

/// The job's budget in steps: the spec's, or the default for this plan. A horizon fixed by
/// `sweep.epochs` with no budget given keeps the cost it asks for.
fn job_budget(
    spec: &JobSpec,
    plan_steps: usize,
    fixed_steps: Option<usize>,
    candidates: usize,
    range_steps: usize,
) -> usize {
    match fixed_steps {
        Some(steps) if spec.budget == Budget::default() => {
            range_steps + candidates * spec.sweep.seeds * steps
        }
        _ => spec.budget.steps_for(plan_steps, range_steps),
    }
}

/// The fewest steps of a OneCycle schedule with the sweep's shape (a screening run is never
/// shorter), and never more than the plan.
fn shortest_schedule(spec: &JobSpec, plan_steps: usize) -> usize {
    (2..plan_steps)
        .find(|&steps| one_cycle(spec, 1.0, steps).validate(usize::MAX).is_ok())
        .unwrap_or(plan_steps)
        .max(10.min(plan_steps))
}

fn epochs_label(steps: usize, steps_per_epoch: usize) -> String {
    let epochs = steps as f64 / steps_per_epoch.max(1) as f64;
    if (epochs - epochs.round()).abs() < 0.05 {
        format!("{:.0}", epochs.round())
    } else {
        format!("{epochs:.1}")
    }
}

/// Three significant digits: a learning rate is never known better than that.
fn round_sig(value: f64) -> f64 {
    if value == 0.0 || !value.is_finite() {
        return value;
    }
    let magnitude = value.abs().log10().floor() as i32;
    let factor = 10f64.powi(2 - magnitude);
    (value * factor).round() / factor
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sweep::Instability;

    fn candidate(peak_lr: f64, val_loss: f64, best: bool) -> SweepCandidate {
        SweepCandidate {
            peak_lr,
            steps: 90,
            seeds: 1,
            epochs: 10.0,
            val_loss,
            val_loss_std: 0.0,
            val_accuracy: None,
            diverged: !val_loss.is_finite(),
            in_band: best,
            best,
            unstable: peak_lr >= 0.3,
        }
    }

    #[test]
    fn the_edge_warning_says_when_the_lowest_loss_was_too_near_the_edge_or_the_peak_is_close() {
        let edge = StabilityEdge {
            lr: 0.3,
            reason: Instability::Diverged,
            steps: 90,
        };
        // The lowest loss (0.28 at 0.2) is within 2x of the edge: the pick stayed at 0.1.
        let judged = [
            candidate(0.1, 0.30, true),
            candidate(0.2, 0.28, false),
            candidate(0.3, f64::INFINITY, false),
        ];
        let warning = edge_warning(&judged, 0.1, edge).expect("a warning");
        assert!(
            warning.starts_with(
                "the stability edge is 3.000e-1 (a run diverged there, at 90 steps): the lowest validation loss (0.2800) was at 2.000e-1"
            ) && warning.contains("stays 3.0x below the edge"),
            "{warning}"
        );
        // The best is the lowest loss, 2x below the edge: close.
        let judged = [
            candidate(0.15, 0.3, true),
            candidate(0.3, f64::INFINITY, false),
        ];
        let warning = edge_warning(&judged, 0.15, edge).expect("a warning");
        assert!(warning.contains("only 2.0x below it"), "{warning}");
        // Ten times below: nothing to say.
        assert_eq!(
            edge_warning(&[candidate(0.03, 0.3, true)], 0.03, edge),
            None
        );
        // Nothing below the edge finished: the peak is at it.
        let warning = edge_warning(&[candidate(0.3, 0.3, true)], 0.3, edge).expect("a warning");
        assert!(warning.contains("is at or above it"), "{warning}");
    }

    #[test]
    fn the_small_validation_warning_gives_a_row_in_accuracy_and_the_seed_spread() {
        let mut best = candidate(0.1, 0.5, true);
        best.val_loss_std = 0.06;
        best.seeds = 3;
        let warning = small_validation_warning(36, &[best], true);
        assert_eq!(
            warning,
            "the validation split has 36 rows, too few to separate candidates well (one row is 2.8 points of accuracy; the best candidate's final validation loss varied by 12 % (one standard deviation) across its 3 seeds, against the 5 % that separates the band from the rest): the best was judged on 3 seeds; a validation set of 100 rows or more (a larger validation_fraction, or more data) would separate them better, and a larger budget.plan_multiple lets the sweep place more peaks between them"
        );
        let warning = small_validation_warning(40, &[candidate(0.1, 0.5, true)], false);
        assert!(
            warning.starts_with("the validation split has 40 rows, too few to separate candidates well: the best was judged on 1 seed;"),
            "{warning}"
        );
    }
}
