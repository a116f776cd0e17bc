//! Learning-rate and momentum schedules with PyTorch's exact semantics (OneCycleLR, CyclicLR,
//! CosineAnnealingWarmRestarts, LinearLR then CosineAnnealingLR, CosineAnnealingLR, StepLR, and
//! ReduceLROnPlateau driven by a metric), so the sweep, the recipe race, `POST /v1/schedules` and
//! `lrtune schedule` all produce the numbers PyTorch would.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::fmt;

use super::spec::defaults;
pub use super::spec::recipes::{PlateauMode, ThresholdMode};
pub use super::spec::Anneal;

/// A schedule as `POST /v1/schedules` and `lrtune schedule` take it: `kind` plus that kind's parameters
/// under exactly the names used in tests/golden/schedules.json, PyTorch's defaults where omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    OneCycle(OneCycle),
    Cyclic(Cyclic),
    CosineWarmRestarts(CosineWarmRestarts),
    WarmupCosine(WarmupCosine),
    Cosine(Cosine),
    Step(StepLr),
    ReduceOnPlateau(ReduceOnPlateau),
}

/// `torch.optim.lr_scheduler.OneCycleLR`, two- or three-phase, with momentum cycled inversely to the
/// learning rate (max -> base -> max).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneCycle {
    pub max_lr: f64,
    pub total_steps: usize,
    #[serde(default = "defaults::pct_start")]
    pub pct_start: f64,
    #[serde(default)]
    pub anneal: Anneal,
    #[serde(default = "defaults::div_factor")]
    pub div_factor: f64,
    #[serde(default = "defaults::final_div_factor")]
    pub final_div_factor: f64,
    #[serde(default)]
    pub three_phase: bool,
    #[serde(default = "defaults::enabled")]
    pub cycle_momentum: bool,
    #[serde(default = "defaults::one_cycle_base_momentum")]
    pub base_momentum: f64,
    #[serde(default = "defaults::one_cycle_max_momentum")]
    pub max_momentum: f64,
    /// Only a label for readers of the curve: the values are the same whichever it drives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum_of: Option<MomentumOf>,
}

/// What a cycled momentum drives in the optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentumOf {
    SgdMomentum,
    AdamBeta1,
}

/// `torch.optim.lr_scheduler.CyclicLR` with one of its built-in modes, output for `steps` steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cyclic {
    pub base_lr: f64,
    pub max_lr: f64,
    #[serde(default = "defaults::step_size_up")]
    pub step_size_up: usize,
    /// `None` means the same as `step_size_up`, as in PyTorch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_size_down: Option<usize>,
    #[serde(default)]
    pub mode: CyclicMode,
    #[serde(default = "defaults::gamma")]
    pub gamma: f64,
    #[serde(default = "defaults::enabled")]
    pub cycle_momentum: bool,
    #[serde(default = "defaults::cyclic_base_momentum")]
    pub base_momentum: f64,
    #[serde(default = "defaults::cyclic_max_momentum")]
    pub max_momentum: f64,
    pub steps: usize,
}

/// CyclicLR's `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CyclicMode {
    #[default]
    Triangular,
    Triangular2,
    ExpRange,
}

/// `torch.optim.lr_scheduler.CosineAnnealingWarmRestarts` stepped once per optimizer step, starting
/// from the optimizer's learning rate `base_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CosineWarmRestarts {
    pub base_lr: f64,
    #[serde(rename = "T_0")]
    pub t_0: usize,
    #[serde(rename = "T_mult", default = "defaults::t_mult")]
    pub t_mult: usize,
    #[serde(default)]
    pub eta_min: f64,
    pub steps: usize,
}

/// PyTorch's `SequentialLR` of `LinearLR(start_factor, end_factor=1, total_iters=warmup_steps)` then
/// `CosineAnnealingLR(T_max=total_steps - warmup_steps, eta_min)`, on an optimizer with lr `max_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupCosine {
    pub max_lr: f64,
    pub total_steps: usize,
    pub warmup_steps: usize,
    #[serde(default = "defaults::start_factor")]
    pub start_factor: f64,
    #[serde(default)]
    pub eta_min: f64,
}

/// `torch.optim.lr_scheduler.CosineAnnealingLR` on an optimizer with lr `lr`, stepped once per
/// optimizer step; past `T_max` it follows PyTorch's recursive form, which climbs back up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cosine {
    pub lr: f64,
    #[serde(rename = "T_max")]
    pub t_max: usize,
    #[serde(default)]
    pub eta_min: f64,
    pub steps: usize,
}

/// `torch.optim.lr_scheduler.StepLR`: the learning rate times `gamma` every `step_size` steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepLr {
    pub lr: f64,
    pub step_size: usize,
    #[serde(default = "defaults::step_gamma")]
    pub gamma: f64,
    pub steps: usize,
}

/// `torch.optim.lr_scheduler.ReduceLROnPlateau` on an optimizer with lr `lr`. It is stepped on a
/// metric, not on the step count: as a schedule it replays `metrics` (one `step(metric)` each) and
/// its curve is the learning rate after each of those steps. The race drives a [`PlateauTracker`]
/// with live validation metrics instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReduceOnPlateau {
    pub lr: f64,
    #[serde(default)]
    pub mode: PlateauMode,
    #[serde(default = "defaults::plateau_factor")]
    pub factor: f64,
    #[serde(default = "defaults::plateau_patience")]
    pub patience: usize,
    #[serde(default = "defaults::plateau_threshold")]
    pub threshold: f64,
    #[serde(default)]
    pub threshold_mode: ThresholdMode,
    #[serde(default)]
    pub cooldown: usize,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default = "defaults::plateau_eps")]
    pub eps: f64,
    /// The metric passed to each `step`; empty when the schedule is driven live.
    #[serde(default)]
    pub metrics: Vec<f64>,
}

/// ReduceLROnPlateau's state between steps: the best metric so far, the bad epochs since, the
/// cooldown left and the current learning rate.
#[derive(Debug, Clone, PartialEq)]
pub struct PlateauTracker {
    mode: PlateauMode,
    factor: f64,
    patience: usize,
    threshold: f64,
    threshold_mode: ThresholdMode,
    cooldown: usize,
    min_lr: f64,
    eps: f64,
    lr: f64,
    best: f64,
    num_bad_epochs: usize,
    cooldown_counter: usize,
}

impl PlateauTracker {
    /// The learning rate in force now.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// PyTorch's `scheduler.step(metric)`: returns the learning rate after it.
    pub fn step(&mut self, metric: f64) -> f64 {
        if self.is_better(metric) {
            self.best = metric;
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        if self.num_bad_epochs > self.patience {
            let new_lr = (self.lr * self.factor).max(self.min_lr);
            // PyTorch skips a reduction smaller than eps, but still starts the cooldown.
            if self.lr - new_lr > self.eps {
                self.lr = new_lr;
            }
            self.cooldown_counter = self.cooldown;
            self.num_bad_epochs = 0;
        }
        self.lr
    }

    /// PyTorch's `is_better`, in its operation order; a NaN metric is never better.
    fn is_better(&self, metric: f64) -> bool {
        match (self.mode, self.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => metric < self.best * (1.0 - self.threshold),
            (PlateauMode::Min, ThresholdMode::Abs) => metric < self.best - self.threshold,
            (PlateauMode::Max, ThresholdMode::Rel) => metric > self.best * (self.threshold + 1.0),
            (PlateauMode::Max, ThresholdMode::Abs) => metric > self.best + self.threshold,
        }
    }
}

/// One value per optimizer step: what `POST /v1/schedules` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleCurve {
    pub lr: Vec<f64>,
    pub momentum: Option<Vec<f64>>,
}

/// A parameter that makes the schedule meaningless, named as in the JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError {
    pub field: String,
    pub message: String,
}

impl ScheduleError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ScheduleError {}

impl Schedule {
    /// Rejects parameters PyTorch would refuse, divide by zero on, or that make no useful schedule;
    /// `max_steps` is the caller's limit on the curve's length.
    pub fn validate(&self, max_steps: usize) -> Result<(), ScheduleError> {
        match self {
            Schedule::OneCycle(s) => s.validate(max_steps),
            Schedule::Cyclic(s) => s.validate(max_steps),
            Schedule::CosineWarmRestarts(s) => s.validate(max_steps),
            Schedule::WarmupCosine(s) => s.validate(max_steps),
            Schedule::Cosine(s) => s.validate(max_steps),
            Schedule::Step(s) => s.validate(max_steps),
            Schedule::ReduceOnPlateau(s) => s.validate(max_steps),
        }
    }

    /// How many optimizer steps the schedule covers (for `reduce_on_plateau`, how many metrics
    /// it is stepped on).
    pub fn steps(&self) -> usize {
        match self {
            Schedule::OneCycle(s) => s.total_steps,
            Schedule::Cyclic(s) => s.steps,
            Schedule::CosineWarmRestarts(s) => s.steps,
            Schedule::WarmupCosine(s) => s.total_steps,
            Schedule::Cosine(s) => s.steps,
            Schedule::Step(s) => s.steps,
            Schedule::ReduceOnPlateau(s) => s.metrics.len(),
        }
    }

    /// The learning rate in force during optimizer step `step` (0-based); for `reduce_on_plateau`,
    /// the learning rate after `step(metrics[step])`. Meaningful only for a schedule that passed
    /// `validate`; never panics otherwise. The recursive kinds (cosine, step, plateau) replay
    /// every step before this one: use [`Schedule::curve`] for a whole curve.
    pub fn lr_at(&self, step: usize) -> f64 {
        match self {
            Schedule::OneCycle(s) => s.lr_at(step),
            Schedule::Cyclic(s) => s.lr_at(step),
            Schedule::CosineWarmRestarts(s) => s.lr_at(step),
            Schedule::WarmupCosine(s) => s.lr_at(step),
            Schedule::Cosine(s) => s.lrs(step + 1)[step],
            Schedule::Step(s) => s.lr_at(step),
            Schedule::ReduceOnPlateau(s) => s.lrs().get(step).copied().unwrap_or(f64::NAN),
        }
    }

    fn lr_curve(&self) -> Vec<f64> {
        match self {
            Schedule::Cosine(s) => s.lrs(s.steps),
            Schedule::Step(s) => s.lrs(s.steps),
            Schedule::ReduceOnPlateau(s) => s.lrs(),
            _ => (0..self.steps()).map(|step| self.lr_at(step)).collect(),
        }
    }

    /// The SGD momentum or Adam beta1 in force during step `step`, where the schedule cycles one.
    pub fn momentum_at(&self, step: usize) -> Option<f64> {
        match self {
            Schedule::OneCycle(s) => s.momentum_at(step),
            Schedule::Cyclic(s) => s.momentum_at(step),
            Schedule::CosineWarmRestarts(_)
            | Schedule::WarmupCosine(_)
            | Schedule::Cosine(_)
            | Schedule::Step(_)
            | Schedule::ReduceOnPlateau(_) => None,
        }
    }

    fn cycles_momentum(&self) -> bool {
        match self {
            Schedule::OneCycle(s) => s.cycle_momentum,
            Schedule::Cyclic(s) => s.cycle_momentum,
            Schedule::CosineWarmRestarts(_)
            | Schedule::WarmupCosine(_)
            | Schedule::Cosine(_)
            | Schedule::Step(_)
            | Schedule::ReduceOnPlateau(_) => false,
        }
    }

    /// Every step's values, for plotting and for `POST /v1/schedules`.
    pub fn curve(&self) -> ScheduleCurve {
        let lr = self.lr_curve();
        let momentum = self.cycles_momentum().then(|| {
            (0..self.steps())
                .filter_map(|step| self.momentum_at(step))
                .collect()
        });
        ScheduleCurve { lr, momentum }
    }

    /// The peak learning rate the schedule is configured for (its `max_lr`, or the starting `base_lr`
    /// or `lr` of the kinds that start at their peak).
    pub fn peak_lr(&self) -> f64 {
        match self {
            Schedule::OneCycle(s) => s.max_lr,
            Schedule::Cyclic(s) => s.max_lr,
            Schedule::CosineWarmRestarts(s) => s.base_lr,
            Schedule::WarmupCosine(s) => s.max_lr,
            Schedule::Cosine(s) => s.lr,
            Schedule::Step(s) => s.lr,
            Schedule::ReduceOnPlateau(s) => s.lr,
        }
    }

    /// The same schedule as a line of PyTorch to paste after creating `optimizer`.
    pub fn pytorch(&self) -> String {
        match self {
            Schedule::OneCycle(s) => s.pytorch(),
            Schedule::Cyclic(s) => s.pytorch(),
            Schedule::CosineWarmRestarts(s) => s.pytorch(),
            Schedule::WarmupCosine(s) => s.pytorch(),
            Schedule::Cosine(s) => s.pytorch(),
            Schedule::Step(s) => s.pytorch(),
            Schedule::ReduceOnPlateau(s) => s.pytorch(),
        }
    }
}

/// One stretch of OneCycleLR: it ends at `end_step`, a float as in PyTorch (`pct_start * T - 1`
/// need not be whole), and starts where the previous one ended (0 for the first).
#[derive(Debug, Clone, Copy)]
struct Phase {
    end_step: f64,
    start_lr: f64,
    end_lr: f64,
    start_momentum: f64,
    end_momentum: f64,
}

impl Anneal {
    fn interpolate(self, start: f64, end: f64, pct: f64) -> f64 {
        // Same operations in the same order as PyTorch's _annealing_cos / _annealing_linear.
        match self {
            Anneal::Cos => end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0),
            Anneal::Linear => (end - start) * pct + start,
        }
    }

    fn python_name(self) -> &'static str {
        match self {
            Anneal::Cos => "cos",
            Anneal::Linear => "linear",
        }
    }
}

impl OneCycle {
    /// PyTorch's defaults for everything but the two required parameters.
    pub fn new(max_lr: f64, total_steps: usize) -> Self {
        Self {
            max_lr,
            total_steps,
            pct_start: defaults::pct_start(),
            anneal: Anneal::default(),
            div_factor: defaults::div_factor(),
            final_div_factor: defaults::final_div_factor(),
            three_phase: false,
            cycle_momentum: true,
            base_momentum: defaults::one_cycle_base_momentum(),
            max_momentum: defaults::one_cycle_max_momentum(),
            momentum_of: None,
        }
    }

    fn phases(&self) -> ([Phase; 3], usize) {
        let initial_lr = self.max_lr / self.div_factor;
        let min_lr = initial_lr / self.final_div_factor;
        let total = self.total_steps as f64;
        let last_step = total - 1.0;
        let warm_up_end = self.pct_start * total - 1.0;
        let (base, max) = (self.base_momentum, self.max_momentum);
        let phase = |end_step, start_lr, end_lr, start_momentum, end_momentum| Phase {
            end_step,
            start_lr,
            end_lr,
            start_momentum,
            end_momentum,
        };
        if self.three_phase {
            let ramp_down_end = 2.0 * self.pct_start * total - 2.0;
            let phases = [
                phase(warm_up_end, initial_lr, self.max_lr, max, base),
                phase(ramp_down_end, self.max_lr, initial_lr, base, max),
                phase(last_step, initial_lr, min_lr, max, max),
            ];
            (phases, 3)
        } else {
            let annealing = phase(last_step, self.max_lr, min_lr, base, max);
            (
                [
                    phase(warm_up_end, initial_lr, self.max_lr, max, base),
                    annealing,
                    annealing,
                ],
                2,
            )
        }
    }

    /// The phase `step` falls in and how far into it, exactly as PyTorch's `get_lr` walks them.
    fn locate(&self, step: usize) -> (Phase, f64) {
        let (phases, count) = self.phases();
        let step = step as f64;
        let last = count - 1;
        let mut start_step = 0.0;
        for phase in &phases[..last] {
            if step <= phase.end_step {
                return (*phase, (step - start_step) / (phase.end_step - start_step));
            }
            start_step = phase.end_step;
        }
        // Past the other phases' ends, the last phase runs on (PyTorch reaches step total_steps).
        let phase = phases[last];
        (phase, (step - start_step) / (phase.end_step - start_step))
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        let (phase, pct) = self.locate(step);
        self.anneal.interpolate(phase.start_lr, phase.end_lr, pct)
    }

    pub fn momentum_at(&self, step: usize) -> Option<f64> {
        if !self.cycle_momentum {
            return None;
        }
        let (phase, pct) = self.locate(step);
        Some(
            self.anneal
                .interpolate(phase.start_momentum, phase.end_momentum, pct),
        )
    }

    pub fn validate(&self, max_steps: usize) -> Result<(), ScheduleError> {
        check_lr("max_lr", self.max_lr)?;
        check_step_count("total_steps", self.total_steps, max_steps)?;
        if !(self.pct_start > 0.0 && self.pct_start < 1.0) {
            return Err(ScheduleError::new(
                "pct_start",
                format!(
                    "must be strictly between 0 and 1 (the fraction of steps spent warming up), got {:?}",
                    self.pct_start
                ),
            ));
        }
        check_positive("div_factor", self.div_factor)?;
        check_positive("final_div_factor", self.final_div_factor)?;
        self.check_phase_lengths()?;
        if self.cycle_momentum {
            check_momenta(self.base_momentum, self.max_momentum)?;
        }
        Ok(())
    }

    /// PyTorch divides by each phase's length, so a phase that ends where it starts (or earlier)
    /// gives a division by zero or a curve that skips its warm-up.
    fn check_phase_lengths(&self) -> Result<(), ScheduleError> {
        let (phases, count) = self.phases();
        let warm_up_steps = self.pct_start * self.total_steps as f64;
        let mut start_step = 0.0;
        for (index, phase) in phases[..count].iter().enumerate() {
            if phase.end_step - start_step <= 0.0 {
                let is_final = index == count - 1;
                let message = if !is_final {
                    format!(
                        "pct_start * total_steps is {warm_up_steps:?}, which leaves the warm-up without a step \
                         (PyTorch would divide by zero); raise pct_start or total_steps so that it is above 1"
                    )
                } else if self.three_phase {
                    format!(
                        "with three_phase, 2 * pct_start * total_steps ({:?}) must be below total_steps + 1 \
                         so that the final annihilation phase has a step (PyTorch would divide by zero); \
                         lower pct_start (below 0.5)",
                        2.0 * warm_up_steps
                    )
                } else {
                    format!(
                        "leaves the annealing phase without a step (PyTorch would divide by zero); lower \
                         pct_start, got {:?}",
                        self.pct_start
                    )
                };
                return Err(ScheduleError::new("pct_start", message));
            }
            start_step = phase.end_step;
        }
        Ok(())
    }

    pub fn pytorch(&self) -> String {
        format!(
            "OneCycleLR(optimizer, max_lr={}, total_steps={}, pct_start={}, anneal_strategy='{}', \
             div_factor={}, final_div_factor={}, three_phase={}, cycle_momentum={}, \
             base_momentum={}, max_momentum={})",
            python_float(self.max_lr),
            self.total_steps,
            python_float(self.pct_start),
            self.anneal.python_name(),
            python_float(self.div_factor),
            python_float(self.final_div_factor),
            python_bool(self.three_phase),
            python_bool(self.cycle_momentum),
            python_float(self.base_momentum),
            python_float(self.max_momentum),
        )
    }
}

impl CyclicMode {
    fn python_name(self) -> &'static str {
        match self {
            CyclicMode::Triangular => "triangular",
            CyclicMode::Triangular2 => "triangular2",
            CyclicMode::ExpRange => "exp_range",
        }
    }
}

impl Cyclic {
    fn step_size_down(&self) -> usize {
        self.step_size_down.unwrap_or(self.step_size_up)
    }

    /// PyTorch's `scale_factor` (position on the triangle, 0 at base, 1 at peak) and the mode's
    /// amplitude for this step, computed in PyTorch's order.
    fn triangle(&self, step: usize) -> (f64, f64) {
        let up = self.step_size_up as f64;
        let total_size = up + self.step_size_down() as f64;
        let step_ratio = up / total_size;
        let step = step as f64;
        let cycle = (1.0 + step / total_size).floor();
        let x = 1.0 + step / total_size - cycle;
        let scale_factor = if x <= step_ratio {
            x / step_ratio
        } else {
            (x - 1.0) / (step_ratio - 1.0)
        };
        let amplitude = match self.mode {
            CyclicMode::Triangular => 1.0,
            CyclicMode::Triangular2 => 1.0 / 2f64.powf(cycle - 1.0),
            CyclicMode::ExpRange => self.gamma.powf(step),
        };
        (scale_factor, amplitude)
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        let (scale_factor, amplitude) = self.triangle(step);
        self.base_lr + (self.max_lr - self.base_lr) * scale_factor * amplitude
    }

    pub fn momentum_at(&self, step: usize) -> Option<f64> {
        if !self.cycle_momentum {
            return None;
        }
        let (scale_factor, amplitude) = self.triangle(step);
        Some(
            self.max_momentum - (self.max_momentum - self.base_momentum) * scale_factor * amplitude,
        )
    }

    pub fn validate(&self, max_steps: usize) -> Result<(), ScheduleError> {
        check_lr("base_lr", self.base_lr)?;
        check_lr("max_lr", self.max_lr)?;
        if self.base_lr > self.max_lr {
            return Err(ScheduleError::new(
                "base_lr",
                format!(
                    "must not exceed max_lr ({:?}), got {:?}; swap them or lower base_lr",
                    self.max_lr, self.base_lr
                ),
            ));
        }
        check_step_count("steps", self.steps, max_steps)?;
        if self.step_size_up == 0 {
            return Err(ScheduleError::new(
                "step_size_up",
                "must be at least 1 step (PyTorch would divide by zero)",
            ));
        }
        if self.step_size_down == Some(0) {
            return Err(ScheduleError::new(
                "step_size_down",
                "must be at least 1 step (PyTorch would divide by zero); omit it to use step_size_up",
            ));
        }
        check_positive("gamma", self.gamma)?;
        if self.cycle_momentum {
            check_momenta(self.base_momentum, self.max_momentum)?;
        }
        Ok(())
    }

    pub fn pytorch(&self) -> String {
        format!(
            "CyclicLR(optimizer, base_lr={}, max_lr={}, step_size_up={}, step_size_down={}, mode='{}', \
             gamma={}, cycle_momentum={}, base_momentum={}, max_momentum={})",
            python_float(self.base_lr),
            python_float(self.max_lr),
            self.step_size_up,
            self.step_size_down(),
            self.mode.python_name(),
            python_float(self.gamma),
            python_bool(self.cycle_momentum),
            python_float(self.base_momentum),
            python_float(self.max_momentum),
        )
    }
}

impl CosineWarmRestarts {
    /// PyTorch's `(T_cur, T_i)` after `step` unit steps: the position within the current cycle and
    /// that cycle's length. `None` for the zero `T_0` or `T_mult` that validation rejects, which would
    /// otherwise loop forever.
    fn position(&self, step: usize) -> Option<(usize, usize)> {
        if self.t_0 == 0 || self.t_mult == 0 {
            return None;
        }
        if self.t_mult == 1 {
            return Some((step % self.t_0, self.t_0));
        }
        let (mut t_cur, mut t_i) = (step, self.t_0);
        while t_cur >= t_i {
            t_cur -= t_i;
            t_i = t_i.saturating_mul(self.t_mult);
        }
        Some((t_cur, t_i))
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        let Some((t_cur, t_i)) = self.position(step) else {
            return f64::NAN;
        };
        self.eta_min
            + (self.base_lr - self.eta_min) * (1.0 + (PI * t_cur as f64 / t_i as f64).cos()) / 2.0
    }

    pub fn validate(&self, max_steps: usize) -> Result<(), ScheduleError> {
        check_lr("base_lr", self.base_lr)?;
        if self.t_0 == 0 {
            return Err(ScheduleError::new(
                "T_0",
                "must be at least 1 step (the length of the first cycle)",
            ));
        }
        if self.t_mult == 0 {
            return Err(ScheduleError::new(
                "T_mult",
                "must be at least 1 (1 keeps every cycle T_0 steps long, 2 doubles each)",
            ));
        }
        check_eta_min(self.eta_min, "base_lr", self.base_lr)?;
        check_step_count("steps", self.steps, max_steps)
    }

    pub fn pytorch(&self) -> String {
        format!(
            "CosineAnnealingWarmRestarts(optimizer, T_0={}, T_mult={}, eta_min={})  \
             # optimizer created with lr={}",
            self.t_0,
            self.t_mult,
            python_float(self.eta_min),
            python_float(self.base_lr),
        )
    }
}

impl WarmupCosine {
    /// Closed forms of LinearLR (`start_factor` -> 1 over `warmup_steps`) and, from the milestone on,
    /// of CosineAnnealingLR restarted at epoch 0, which is how SequentialLR hands over.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            let factor = self.start_factor
                + (1.0 - self.start_factor) * step as f64 / self.warmup_steps as f64;
            self.max_lr * factor
        } else {
            let t_max = self.total_steps.saturating_sub(self.warmup_steps) as f64;
            let epoch = (step - self.warmup_steps) as f64;
            self.eta_min + (self.max_lr - self.eta_min) * (1.0 + (PI * epoch / t_max).cos()) / 2.0
        }
    }

    pub fn validate(&self, max_steps: usize) -> Result<(), ScheduleError> {
        check_lr("max_lr", self.max_lr)?;
        check_step_count("total_steps", self.total_steps, max_steps)?;
        if self.warmup_steps == 0 {
            return Err(ScheduleError::new(
                "warmup_steps",
                "must be at least 1 (for no warm-up, use cosine_warm_restarts with T_0 = steps)",
            ));
        }
        if self.warmup_steps >= self.total_steps {
            return Err(ScheduleError::new(
                "warmup_steps",
                format!(
                    "must be below total_steps ({}) to leave steps for the cosine decay, got {}",
                    self.total_steps, self.warmup_steps
                ),
            ));
        }
        if !(self.start_factor > 0.0 && self.start_factor <= 1.0) {
            return Err(ScheduleError::new(
                "start_factor",
                format!(
                    "must be in (0, 1] (the warm-up starts at start_factor * max_lr), got {:?}",
                    self.start_factor
                ),
            ));
        }
        check_eta_min(self.eta_min, "max_lr", self.max_lr)
    }

    pub fn pytorch(&self) -> String {
        format!(
            "SequentialLR(optimizer, schedulers=[LinearLR(optimizer, start_factor={}, end_factor=1.0, \
             total_iters={}), CosineAnnealingLR(optimizer, T_max={}, eta_min={})], milestones=[{}])  \
             # optimizer created with lr={}",
            python_float(self.start_factor),
            self.warmup_steps,
            self.total_steps.saturating_sub(self.warmup_steps),
            python_float(self.eta_min),
            self.warmup_steps,
            python_float(self.max_lr),
        )
    }
}

impl Cosine {
    /// The first `count` learning rates, computed as PyTorch's `get_lr` does: from the previous
    /// value, so that the numbers (and their rounding) are PyTorch's, also past `T_max`.
    pub fn lrs(&self, count: usize) -> Vec<f64> {
        if self.t_max == 0 {
            return vec![f64::NAN; count];
        }
        let t_max = self.t_max as f64;
        let mut lrs: Vec<f64> = Vec::with_capacity(count);
        for epoch in 0..count {
            let lr = match lrs.last() {
                None => self.lr,
                Some(&previous) => {
                    let since_peak = epoch as i64 - 1 - self.t_max as i64;
                    if since_peak.rem_euclid(2 * self.t_max as i64) == 0 {
                        previous + (self.lr - self.eta_min) * (1.0 - (PI / t_max).cos()) / 2.0
                    } else {
                        (1.0 + (PI * epoch as f64 / t_max).cos())
                            / (1.0 + (PI * (epoch - 1) as f64 / t_max).cos())
                            * (previous - self.eta_min)
                            + self.eta_min
                    }
                }
            };
            lrs.push(lr);
        }
        lrs
    }

    pub fn validate(&self, max_steps: usize) -> Result<(), ScheduleError> {
        check_lr("lr", self.lr)?;
        if self.t_max == 0 {
            return Err(ScheduleError::new(
                "T_max",
                "must be at least 1 step (PyTorch would divide by zero)",
            ));
        }
        check_eta_min(self.eta_min, "lr", self.lr)?;
        check_step_count("steps", self.steps, max_steps)
    }

    pub fn pytorch(&self) -> String {
        format!(
            "CosineAnnealingLR(optimizer, T_max={}, eta_min={})  # optimizer created with lr={}",
            self.t_max,
            python_float(self.eta_min),
            python_float(self.lr),
        )
    }
}

impl StepLr {
    /// The first `count` learning rates: PyTorch multiplies the previous one by `gamma` at each
    /// multiple of `step_size`, so a power would round differently.
    pub fn lrs(&self, count: usize) -> Vec<f64> {
        let mut lr = self.lr;
        (0..count)
            .map(|epoch| {
                if epoch > 0 && self.step_size > 0 && epoch % self.step_size == 0 {
                    lr *= self.gamma;
                }
                lr
            })
            .collect()
    }

    /// The learning rate during step `step`: the same repeated products as [`StepLr::lrs`].
    pub fn lr_at(&self, step: usize) -> f64 {
        let mut lr = self.lr;
        for _ in 0..step.checked_div(self.step_size).unwrap_or(0) {
            lr *= self.gamma;
        }
        lr
    }

    pub fn validate(&self, max_steps: usize) -> Result<(), ScheduleError> {
        check_lr("lr", self.lr)?;
        if self.step_size == 0 {
            return Err(ScheduleError::new(
                "step_size",
                "must be at least 1 step (PyTorch would divide by zero)",
            ));
        }
        check_positive("gamma", self.gamma)?;
        check_step_count("steps", self.steps, max_steps)
    }

    pub fn pytorch(&self) -> String {
        format!(
            "StepLR(optimizer, step_size={}, gamma={})  # optimizer created with lr={}",
            self.step_size,
            python_float(self.gamma),
            python_float(self.lr),
        )
    }
}

impl PlateauMode {
    fn python_name(self) -> &'static str {
        match self {
            PlateauMode::Min => "min",
            PlateauMode::Max => "max",
        }
    }
}

impl ThresholdMode {
    fn python_name(self) -> &'static str {
        match self {
            ThresholdMode::Rel => "rel",
            ThresholdMode::Abs => "abs",
        }
    }
}

impl ReduceOnPlateau {
    /// PyTorch's defaults for everything but the learning rate and the mode, with no metrics yet.
    pub fn new(lr: f64, mode: PlateauMode) -> Self {
        Self {
            lr,
            mode,
            factor: defaults::plateau_factor(),
            patience: defaults::plateau_patience(),
            threshold: defaults::plateau_threshold(),
            threshold_mode: ThresholdMode::default(),
            cooldown: 0,
            min_lr: 0.0,
            eps: defaults::plateau_eps(),
            metrics: Vec::new(),
        }
    }

    /// A fresh scheduler, as just created on an optimizer with lr `lr`.
    pub fn tracker(&self) -> PlateauTracker {
        PlateauTracker {
            mode: self.mode,
            factor: self.factor,
            patience: self.patience,
            threshold: self.threshold,
            threshold_mode: self.threshold_mode,
            cooldown: self.cooldown,
            min_lr: self.min_lr,
            eps: self.eps,
            lr: self.lr,
            best: match self.mode {
                PlateauMode::Min => f64::INFINITY,
                PlateauMode::Max => f64::NEG_INFINITY,
            },
            num_bad_epochs: 0,
            cooldown_counter: 0,
        }
    }

    /// The learning rate after each `step(metric)` over `metrics`.
    pub fn lrs(&self) -> Vec<f64> {
        let mut tracker = self.tracker();
        self.metrics
            .iter()
            .map(|&metric| tracker.step(metric))
            .collect()
    }

    pub fn validate(&self, max_steps: usize) -> Result<(), ScheduleError> {
        check_lr("lr", self.lr)?;
        if !(self.factor > 0.0 && self.factor < 1.0) {
            return Err(ScheduleError::new(
                "factor",
                format!(
                    "must be strictly between 0 and 1 (the learning rate is multiplied by it), got {:?}",
                    self.factor
                ),
            ));
        }
        for (field, value) in [
            ("threshold", self.threshold),
            ("min_lr", self.min_lr),
            ("eps", self.eps),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ScheduleError::new(
                    field,
                    format!("must be a finite number at least 0, got {value:?}"),
                ));
            }
        }
        self.validate_metrics(max_steps)
    }

    /// The parameters without the metrics, for a scheduler driven live by the race.
    pub fn validate_rule(&self) -> Result<(), ScheduleError> {
        let mut rule = self.clone();
        rule.metrics = vec![0.0];
        rule.validate(1)
    }

    fn validate_metrics(&self, max_steps: usize) -> Result<(), ScheduleError> {
        check_step_count("metrics", self.metrics.len(), max_steps).map_err(|_| {
            ScheduleError::new(
                "metrics",
                format!(
                    "must hold between 1 and {max_steps} values (one per scheduler.step), got {}",
                    self.metrics.len()
                ),
            )
        })
    }

    pub fn pytorch(&self) -> String {
        format!(
            "ReduceLROnPlateau(optimizer, mode='{}', factor={}, patience={}, threshold={}, \
             threshold_mode='{}', cooldown={}, min_lr={}, eps={})  # optimizer created with lr={}; \
             call scheduler.step(metric) after each evaluation",
            self.mode.python_name(),
            python_float(self.factor),
            self.patience,
            python_float(self.threshold),
            self.threshold_mode.python_name(),
            self.cooldown,
            python_float(self.min_lr),
            python_float(self.eps),
            python_float(self.lr),
        )
    }
}

fn check_lr(field: &str, value: f64) -> Result<(), ScheduleError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ScheduleError::new(
            field,
            format!("must be a positive, finite learning rate, got {value:?}"),
        ))
    }
}

fn check_positive(field: &str, value: f64) -> Result<(), ScheduleError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ScheduleError::new(
            field,
            format!("must be a positive, finite number, got {value:?}"),
        ))
    }
}

fn check_step_count(field: &str, value: usize, max_steps: usize) -> Result<(), ScheduleError> {
    if (1..=max_steps).contains(&value) {
        Ok(())
    } else {
        Err(ScheduleError::new(
            field,
            format!("must be between 1 and {max_steps} steps, got {value}"),
        ))
    }
}

fn check_momenta(base_momentum: f64, max_momentum: f64) -> Result<(), ScheduleError> {
    for (field, value) in [
        ("base_momentum", base_momentum),
        ("max_momentum", max_momentum),
    ] {
        if !(0.0..1.0).contains(&value) {
            return Err(ScheduleError::new(
                field,
                format!("must be in [0, 1) (or set cycle_momentum to false), got {value:?}"),
            ));
        }
    }
    if base_momentum > max_momentum {
        return Err(ScheduleError::new(
            "base_momentum",
            format!(
                "must not exceed max_momentum ({max_momentum:?}), got {base_momentum:?}; swap them"
            ),
        ));
    }
    Ok(())
}

fn check_eta_min(eta_min: f64, peak_field: &str, peak: f64) -> Result<(), ScheduleError> {
    if eta_min >= 0.0 && eta_min < peak {
        Ok(())
    } else {
        Err(ScheduleError::new(
            "eta_min",
            format!("must be at least 0 and below {peak_field} ({peak:?}), got {eta_min:?}"),
        ))
    }
}

/// A Python float literal that reads back as the same f64 (Rust's `{:?}` always keeps a `.0` or
/// an exponent, and round-trips).
fn python_float(value: f64) -> String {
    if value.is_finite() {
        format!("{value:?}")
    } else if value.is_nan() {
        "float('nan')".to_string()
    } else if value > 0.0 {
        "float('inf')".to_string()
    } else {
        "float('-inf')".to_string()
    }
}

fn python_bool(value: bool) -> &'static str {
    if value {
        "True"
    } else {
        "False"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const GOLDEN: &str = include_str!("../../tests/golden/schedules.json");
    const GOLDEN_EXTRA: &str = include_str!("../../tests/golden/schedules_extra.json");
    const GOLDEN_PLATEAU: &str = include_str!("../../tests/golden/plateau.json");
    const NO_STEP_LIMIT: usize = 1_000_000;

    fn parse(value: Value) -> Result<Schedule, serde_json::Error> {
        serde_json::from_value(value)
    }

    fn assert_close(actual: f64, expected: f64, what: &str) {
        let tolerance = 1e-9 * expected.abs().max(1e-12);
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what}: got {actual:e}, PyTorch gives {expected:e}"
        );
    }

    fn numbers(value: &Value) -> Vec<f64> {
        value
            .as_array()
            .expect("an array")
            .iter()
            .map(|number| number.as_f64().expect("a number"))
            .collect()
    }

    /// Every schedule of a golden file (`{"schedules": [{kind, params, lr, momentum?}]}`)
    /// matches PyTorch's learning rate (and momentum, where given; none where not) at every
    /// step, through `lr_at` and through `curve`.
    fn assert_golden_schedules(text: &str, count: usize) {
        let golden: Value = serde_json::from_str(text).expect("golden file parses");
        let cases = golden["schedules"].as_array().expect("a list of schedules");
        assert_eq!(cases.len(), count);
        for case in cases {
            let mut params = case["params"].clone();
            params["kind"] = case["kind"].clone();
            let schedule = parse(params.clone())
                .unwrap_or_else(|error| panic!("golden params {params} rejected: {error}"));
            schedule
                .validate(NO_STEP_LIMIT)
                .unwrap_or_else(|error| panic!("golden params {params} invalid: {error}"));
            let lr = numbers(&case["lr"]);
            assert_eq!(schedule.steps(), lr.len(), "{params}");
            let curve = schedule.curve();
            assert_eq!(curve.lr.len(), lr.len());
            for (step, &expected) in lr.iter().enumerate() {
                let what = format!("{params} lr at step {step}");
                assert_close(schedule.lr_at(step), expected, &what);
                assert_close(curve.lr[step], expected, &what);
            }
            match case.get("momentum") {
                Some(momentum) => {
                    let curve_momentum = curve.momentum.as_ref().expect("momentum curve");
                    for (step, expected) in numbers(momentum).into_iter().enumerate() {
                        let what = format!("{params} momentum at step {step}");
                        let actual = schedule.momentum_at(step).expect("momentum cycled");
                        assert_close(actual, expected, &what);
                        assert_close(curve_momentum[step], expected, &what);
                    }
                }
                None => {
                    assert_eq!(schedule.momentum_at(0), None);
                    assert_eq!(curve.momentum, None);
                }
            }
        }
    }

    #[test]
    fn every_golden_schedule_matches_pytorch_at_every_step() {
        assert_golden_schedules(GOLDEN, 9);
    }

    #[test]
    fn an_unknown_field_is_rejected_for_every_kind() {
        let minimal = [
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100}),
            json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10}),
            json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 10, "steps": 10}),
            json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 100, "warmup_steps": 10}),
            json!({"kind": "cosine", "lr": 0.1, "T_max": 10, "steps": 10}),
            json!({"kind": "step", "lr": 0.1, "step_size": 10, "steps": 10}),
            json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": [1.0]}),
        ];
        for schedule in minimal {
            assert!(parse(schedule.clone()).is_ok(), "{schedule}");
            let mut with_typo = schedule.clone();
            with_typo["pct_strat"] = json!(0.3);
            let error = parse(with_typo)
                .expect_err("unknown field accepted")
                .to_string();
            assert!(error.contains("unknown field `pct_strat`"), "{error}");
        }
    }

    #[test]
    fn an_unknown_kind_or_a_missing_required_parameter_is_rejected() {
        let error = parse(json!({"kind": "step_lr", "max_lr": 0.1})).unwrap_err();
        assert!(
            error.to_string().contains("unknown variant `step_lr`"),
            "{error}"
        );
        let error = parse(json!({"kind": "one_cycle", "max_lr": 0.1})).unwrap_err();
        assert!(
            error.to_string().contains("missing field `total_steps`"),
            "{error}"
        );
        let error = parse(json!({"max_lr": 0.1, "total_steps": 10})).unwrap_err();
        assert!(
            error.to_string().contains("missing field `kind`"),
            "{error}"
        );
        let error = parse(
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 10, "anneal": "cosine"}),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("unknown variant `cosine`"),
            "{error}"
        );
    }

    #[test]
    fn omitted_parameters_take_pytorchs_defaults() {
        let one_cycle =
            parse(json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100})).unwrap();
        assert_eq!(
            one_cycle,
            Schedule::OneCycle(OneCycle {
                max_lr: 0.1,
                total_steps: 100,
                pct_start: 0.3,
                anneal: Anneal::Cos,
                div_factor: 25.0,
                final_div_factor: 1e4,
                three_phase: false,
                cycle_momentum: true,
                base_momentum: 0.85,
                max_momentum: 0.95,
                momentum_of: None,
            })
        );
        assert_eq!(one_cycle, Schedule::OneCycle(OneCycle::new(0.1, 100)));

        let cyclic =
            parse(json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10}))
                .unwrap();
        assert_eq!(
            cyclic,
            Schedule::Cyclic(Cyclic {
                base_lr: 0.001,
                max_lr: 0.01,
                step_size_up: 2000,
                step_size_down: None,
                mode: CyclicMode::Triangular,
                gamma: 1.0,
                cycle_momentum: true,
                base_momentum: 0.8,
                max_momentum: 0.9,
                steps: 10,
            })
        );

        let cosine =
            parse(json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 7, "steps": 20}))
                .unwrap();
        assert_eq!(
            cosine,
            Schedule::CosineWarmRestarts(CosineWarmRestarts {
                base_lr: 0.1,
                t_0: 7,
                t_mult: 1,
                eta_min: 0.0,
                steps: 20,
            })
        );

        let warmup = parse(
            json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 100, "warmup_steps": 10}),
        )
        .unwrap();
        assert_eq!(
            warmup,
            Schedule::WarmupCosine(WarmupCosine {
                max_lr: 0.1,
                total_steps: 100,
                warmup_steps: 10,
                start_factor: 1.0 / 3.0,
                eta_min: 0.0,
            })
        );
    }

    #[test]
    fn a_schedule_serialises_to_json_that_parses_back_to_itself() {
        let schedules = [
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100, "three_phase": true,
                   "anneal": "linear", "momentum_of": "adam_beta1"}),
            json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10, "mode": "exp_range",
                   "gamma": 0.99, "step_size_down": 3}),
            json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 7, "T_mult": 2, "steps": 20}),
            json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 100, "warmup_steps": 10}),
        ];
        for value in schedules {
            let schedule = parse(value).unwrap();
            let json = serde_json::to_value(&schedule).unwrap();
            assert_eq!(parse(json.clone()).unwrap(), schedule, "{json}");
        }
        let json = serde_json::to_value(Schedule::CosineWarmRestarts(CosineWarmRestarts {
            base_lr: 0.1,
            t_0: 7,
            t_mult: 2,
            eta_min: 0.0,
            steps: 20,
        }))
        .unwrap();
        assert_eq!(json["kind"], "cosine_warm_restarts");
        assert_eq!(json["T_0"], 7);
        assert_eq!(json["T_mult"], 2);
    }

    #[test]
    fn a_cyclic_step_size_down_defaults_to_step_size_up() {
        let implicit = parse(
            json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 40,
                                    "step_size_up": 6}),
        )
        .unwrap();
        let explicit = parse(
            json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 40,
                                    "step_size_up": 6, "step_size_down": 6}),
        )
        .unwrap();
        assert_eq!(implicit.curve(), explicit.curve());
        assert_close(implicit.lr_at(6), 0.01, "peak of the first cycle");
        assert_close(implicit.lr_at(12), 0.001, "end of the first cycle");
    }

    #[test]
    fn without_cycle_momentum_there_is_no_momentum_curve() {
        for schedule in [
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100, "cycle_momentum": false}),
            json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10, "cycle_momentum": false}),
        ] {
            let schedule = parse(schedule).unwrap();
            assert_eq!(schedule.momentum_at(3), None);
            let curve = schedule.curve();
            assert_eq!(curve.momentum, None);
            assert_eq!(curve.lr.len(), schedule.steps());
            assert_eq!(
                serde_json::to_value(&curve).unwrap()["momentum"],
                Value::Null
            );
        }
    }

    #[test]
    fn warmup_cosine_matches_hand_computed_values() {
        let schedule = WarmupCosine {
            max_lr: 0.1,
            total_steps: 110,
            warmup_steps: 10,
            start_factor: 0.1,
            eta_min: 0.0,
        };
        schedule.validate(NO_STEP_LIMIT).unwrap();
        // LinearLR: 0.1 * (0.1 + 0.9 * t / 10).
        assert_close(schedule.lr_at(0), 0.01, "first step");
        assert_close(schedule.lr_at(5), 0.055, "middle of the warm-up");
        assert_close(schedule.lr_at(9), 0.091, "last warm-up step");
        // CosineAnnealingLR restarted at the milestone with T_max = 100.
        assert_close(schedule.lr_at(10), 0.1, "end of the warm-up is the peak");
        assert_close(schedule.lr_at(60), 0.05, "midpoint of the cosine");
        // 0.05 * (1 + cos(0.99 pi)) = 0.05 * (1 - 0.99950656036573...)
        assert_close(schedule.lr_at(109), 2.467198171342e-5, "last step");

        let with_floor = Schedule::WarmupCosine(WarmupCosine {
            eta_min: 0.01,
            ..schedule
        });
        assert_close(
            with_floor.lr_at(60),
            0.055,
            "midpoint between eta_min and max_lr",
        );
        assert_eq!(with_floor.momentum_at(0), None);
        assert_eq!(with_floor.curve().lr.len(), 110);
    }

    #[test]
    fn warmup_cosine_starts_at_a_third_of_the_peak_by_default() {
        let schedule = parse(
            json!({"kind": "warmup_cosine", "max_lr": 0.3, "total_steps": 20, "warmup_steps": 4}),
        )
        .unwrap();
        assert_close(schedule.lr_at(0), 0.1, "start_factor 1/3");
        assert_close(schedule.lr_at(2), 0.2, "half-way through the warm-up");
        assert_close(schedule.lr_at(4), 0.3, "peak");
    }

    #[test]
    fn cosine_warm_restarts_restart_after_each_cycle() {
        let schedule = CosineWarmRestarts {
            base_lr: 0.1,
            t_0: 3,
            t_mult: 2,
            eta_min: 0.0,
            steps: 30,
        };
        // Cycles of 3, 6, 12 steps: restarts at steps 3, 9 and 21.
        for restart in [0, 3, 9, 21] {
            assert_close(schedule.lr_at(restart), 0.1, "restart");
        }
        assert_close(schedule.lr_at(6), 0.05, "middle of the six-step cycle");
        assert_close(schedule.lr_at(15), 0.05, "middle of the twelve-step cycle");
    }

    #[test]
    fn peak_lr_and_steps_are_read_from_the_parameters() {
        let cases = [
            (
                json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100}),
                0.1,
                100,
            ),
            (
                json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10}),
                0.01,
                10,
            ),
            (
                json!({"kind": "cosine_warm_restarts", "base_lr": 0.2, "T_0": 7, "steps": 20}),
                0.2,
                20,
            ),
            (
                json!({"kind": "warmup_cosine", "max_lr": 0.3, "total_steps": 50, "warmup_steps": 10}),
                0.3,
                50,
            ),
        ];
        for (json, peak, steps) in cases {
            let schedule = parse(json).unwrap();
            assert_eq!(schedule.peak_lr(), peak);
            assert_eq!(schedule.steps(), steps);
        }
    }

    /// Each case breaks one rule and names the field that the error must point at.
    #[test]
    fn validation_rejects_each_broken_rule_naming_the_field() {
        let one_cycle = |changes: Value| {
            let mut base = json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100});
            merge(&mut base, changes);
            base
        };
        let cyclic = |changes: Value| {
            let mut base =
                json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 100});
            merge(&mut base, changes);
            base
        };
        let cosine = |changes: Value| {
            let mut base =
                json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 10, "steps": 100});
            merge(&mut base, changes);
            base
        };
        let warmup = |changes: Value| {
            let mut base = json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 100, "warmup_steps": 10});
            merge(&mut base, changes);
            base
        };
        let cases = [
            (one_cycle(json!({"max_lr": 0.0})), "max_lr"),
            (one_cycle(json!({"max_lr": -0.1})), "max_lr"),
            (cyclic(json!({"base_lr": 0.0})), "base_lr"),
            (cosine(json!({"base_lr": -1.0})), "base_lr"),
            (warmup(json!({"max_lr": 0.0})), "max_lr"),
            (cyclic(json!({"base_lr": 0.1, "max_lr": 0.01})), "base_lr"),
            (one_cycle(json!({"total_steps": 0})), "total_steps"),
            (one_cycle(json!({"total_steps": 1001})), "total_steps"),
            (warmup(json!({"total_steps": 2000})), "total_steps"),
            (cyclic(json!({"steps": 0})), "steps"),
            (cosine(json!({"steps": 1001})), "steps"),
            (one_cycle(json!({"pct_start": 0.0})), "pct_start"),
            (one_cycle(json!({"pct_start": 1.0})), "pct_start"),
            (one_cycle(json!({"pct_start": -0.2})), "pct_start"),
            // pct_start * total_steps == 1: the warm-up ends at step 0, where it starts.
            (
                one_cycle(json!({"total_steps": 10, "pct_start": 0.1})),
                "pct_start",
            ),
            (one_cycle(json!({"total_steps": 2})), "pct_start"),
            (
                one_cycle(json!({"total_steps": 10, "pct_start": 0.1, "three_phase": true})),
                "pct_start",
            ),
            // 2 * 0.55 * 10 - 2 == 9 == total_steps - 1: nothing left for the third phase.
            (
                one_cycle(json!({"total_steps": 10, "pct_start": 0.55, "three_phase": true})),
                "pct_start",
            ),
            (one_cycle(json!({"div_factor": 0.0})), "div_factor"),
            (
                one_cycle(json!({"final_div_factor": -1.0})),
                "final_div_factor",
            ),
            (one_cycle(json!({"base_momentum": -0.1})), "base_momentum"),
            (one_cycle(json!({"max_momentum": 1.0})), "max_momentum"),
            (one_cycle(json!({"base_momentum": 0.96})), "base_momentum"),
            (cyclic(json!({"base_momentum": 0.95})), "base_momentum"),
            (cyclic(json!({"max_momentum": 1.5})), "max_momentum"),
            (cyclic(json!({"step_size_up": 0})), "step_size_up"),
            (cyclic(json!({"step_size_down": 0})), "step_size_down"),
            (cyclic(json!({"gamma": 0.0})), "gamma"),
            (cyclic(json!({"gamma": -0.5, "mode": "exp_range"})), "gamma"),
            (cosine(json!({"T_0": 0})), "T_0"),
            (cosine(json!({"T_mult": 0})), "T_mult"),
            (cosine(json!({"eta_min": -0.001})), "eta_min"),
            (cosine(json!({"eta_min": 0.1})), "eta_min"),
            (warmup(json!({"warmup_steps": 100})), "warmup_steps"),
            (warmup(json!({"warmup_steps": 150})), "warmup_steps"),
            (warmup(json!({"warmup_steps": 0})), "warmup_steps"),
            (warmup(json!({"start_factor": 0.0})), "start_factor"),
            (warmup(json!({"start_factor": 1.5})), "start_factor"),
            (warmup(json!({"eta_min": 0.2})), "eta_min"),
            (warmup(json!({"eta_min": -0.2})), "eta_min"),
        ];
        for (json, field) in cases {
            let schedule = parse(json.clone()).unwrap_or_else(|error| panic!("{json}: {error}"));
            let error = schedule
                .validate(1000)
                .expect_err(&format!("{json} should be rejected"));
            assert_eq!(error.field, field, "{json}: {error}");
            assert!(!error.message.is_empty());
        }
    }

    #[test]
    fn validation_rejects_non_finite_values_built_in_code() {
        let mut schedule = OneCycle::new(f64::NAN, 100);
        assert_eq!(schedule.validate(1000).unwrap_err().field, "max_lr");
        schedule.max_lr = f64::INFINITY;
        assert_eq!(schedule.validate(1000).unwrap_err().field, "max_lr");
        schedule.max_lr = 0.1;
        schedule.pct_start = f64::NAN;
        assert_eq!(schedule.validate(1000).unwrap_err().field, "pct_start");
        schedule.pct_start = 0.3;
        schedule.div_factor = f64::INFINITY;
        assert_eq!(schedule.validate(1000).unwrap_err().field, "div_factor");
    }

    #[test]
    fn validation_accepts_the_edges_of_each_rule() {
        let accepted = [
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 1000}),
            // Three-phase needs 2 * pct_start * total_steps < total_steps + 1: 10 < 11 here.
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 10, "pct_start": 0.5, "three_phase": true}),
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 4, "pct_start": 0.3}),
            // Momenta are not checked when they are not used.
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100, "cycle_momentum": false,
                   "base_momentum": 0.99}),
            json!({"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.01, "steps": 1}),
            json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 1, "steps": 1}),
            json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 2, "warmup_steps": 1,
                   "start_factor": 1.0}),
        ];
        for json in accepted {
            let schedule = parse(json.clone()).unwrap();
            schedule
                .validate(1000)
                .unwrap_or_else(|error| panic!("{json} rejected: {error}"));
            assert!(
                schedule.curve().lr.iter().all(|lr| lr.is_finite()),
                "{json}"
            );
        }
    }

    #[test]
    fn a_schedule_error_displays_as_field_then_message() {
        let error =
            parse(json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 10, "pct_start": 0.1}))
                .unwrap()
                .validate(1000)
                .unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("pct_start: pct_start * total_steps is 1.0"),
            "{text}"
        );
        assert!(text.contains("raise pct_start or total_steps"), "{text}");
    }

    #[test]
    fn pytorch_lines_are_ready_to_paste() {
        let one_cycle = Schedule::OneCycle(OneCycle::new(0.0123, 1000));
        assert_eq!(
            one_cycle.pytorch(),
            "OneCycleLR(optimizer, max_lr=0.0123, total_steps=1000, pct_start=0.3, anneal_strategy='cos', \
             div_factor=25.0, final_div_factor=10000.0, three_phase=False, cycle_momentum=True, \
             base_momentum=0.85, max_momentum=0.95)"
        );
        let cyclic = parse(
            json!({"kind": "cyclic", "base_lr": 1e-5, "max_lr": 0.01, "steps": 10,
                                  "mode": "exp_range", "gamma": 0.99, "cycle_momentum": false}),
        )
        .unwrap();
        assert_eq!(
            cyclic.pytorch(),
            "CyclicLR(optimizer, base_lr=1e-5, max_lr=0.01, step_size_up=2000, step_size_down=2000, \
             mode='exp_range', gamma=0.99, cycle_momentum=False, base_momentum=0.8, max_momentum=0.9)"
        );
        let cosine = parse(
            json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 10, "T_mult": 2,
                                  "eta_min": 1e-4, "steps": 10}),
        )
        .unwrap();
        assert_eq!(
            cosine.pytorch(),
            "CosineAnnealingWarmRestarts(optimizer, T_0=10, T_mult=2, eta_min=0.0001)  \
             # optimizer created with lr=0.1"
        );
        let warmup = parse(
            json!({"kind": "warmup_cosine", "max_lr": 0.01, "total_steps": 1000,
                                  "warmup_steps": 100}),
        )
        .unwrap();
        assert_eq!(
            warmup.pytorch(),
            "SequentialLR(optimizer, schedulers=[LinearLR(optimizer, start_factor=0.3333333333333333, \
             end_factor=1.0, total_iters=100), CosineAnnealingLR(optimizer, T_max=900, eta_min=0.0)], \
             milestones=[100])  # optimizer created with lr=0.01"
        );
    }

    #[test]
    fn python_floats_round_trip_and_stay_floats() {
        for value in [0.1, 25.0, 1e4, 1e-8, 1.0 / 3.0, 0.1 + 0.2, 1e20, 5e-324] {
            let text = python_float(value);
            assert!(
                text.contains('.') || text.contains('e'),
                "{text} would be an int in Python"
            );
            assert_eq!(text.parse::<f64>().unwrap(), value);
        }
        assert_eq!(python_float(f64::NAN), "float('nan')");
        assert_eq!(python_float(f64::NEG_INFINITY), "float('-inf')");
    }

    #[test]
    fn invalid_schedules_do_not_panic_when_evaluated() {
        let cosine = CosineWarmRestarts {
            base_lr: 0.1,
            t_0: 0,
            t_mult: 0,
            eta_min: 0.0,
            steps: 5,
        };
        assert!(cosine.lr_at(3).is_nan());
        let warmup = WarmupCosine {
            max_lr: 0.1,
            total_steps: 5,
            warmup_steps: 8,
            start_factor: 0.5,
            eta_min: 0.0,
        };
        assert!(warmup.lr_at(9).is_nan());
        let one_cycle = OneCycle {
            pct_start: 0.1,
            ..OneCycle::new(0.1, 10)
        };
        assert!(one_cycle.lr_at(0).is_nan());
    }

    #[test]
    fn golden_cosine_and_step_schedules_match_pytorch_at_every_step() {
        assert_golden_schedules(GOLDEN_EXTRA, 4);
    }

    #[test]
    fn golden_reduce_on_plateau_cases_match_pytorch_after_every_step() {
        let golden: Value = serde_json::from_str(GOLDEN_PLATEAU).expect("golden file parses");
        let cases = golden["cases"].as_array().expect("a list of cases");
        assert_eq!(cases.len(), 7);
        for case in cases {
            let mut params = case["params"].clone();
            params["kind"] = case["kind"].clone();
            params["metrics"] = case["metrics"].clone();
            let schedule = parse(params.clone())
                .unwrap_or_else(|error| panic!("golden params {params} rejected: {error}"));
            schedule
                .validate(NO_STEP_LIMIT)
                .unwrap_or_else(|error| panic!("golden params {params} invalid: {error}"));
            let expected = numbers(&case["lr_after_step"]);
            let curve = schedule.curve();
            assert_eq!(curve.lr.len(), expected.len());
            assert_eq!(curve.momentum, None);
            for (step, &expected) in expected.iter().enumerate() {
                let what = format!("{} lr after step {step}", case["params"]);
                assert_close(curve.lr[step], expected, &what);
                assert_close(schedule.lr_at(step), expected, &what);
            }
        }
    }

    fn plateau(params: Value, metrics: &[f64]) -> Vec<f64> {
        let mut json = json!({"kind": "reduce_on_plateau", "lr": 1.0, "metrics": metrics});
        merge(&mut json, params);
        let schedule = parse(json.clone()).unwrap_or_else(|error| panic!("{json}: {error}"));
        schedule
            .validate(NO_STEP_LIMIT)
            .unwrap_or_else(|error| panic!("{json}: {error}"));
        schedule.curve().lr
    }

    #[test]
    fn plateau_reduces_after_more_than_patience_bad_steps_in_min_mode() {
        // Best 1.0 at step 0; steps 1 and 2 are bad (num_bad_epochs 1, 2 > patience 1): cut at 2.
        let lr = plateau(
            json!({"factor": 0.5, "patience": 1}),
            &[1.0, 1.0, 1.0, 0.5, 0.6, 0.7],
        );
        assert_eq!(lr, vec![1.0, 1.0, 0.5, 0.5, 0.5, 0.25]);
    }

    #[test]
    fn plateau_rel_threshold_needs_a_relative_improvement() {
        // With threshold 0.1 (rel), 0.95 is not below 1.0 * 0.9: a bad step. 0.89 is a new best;
        // 0.85 and 0.81 are not below 0.89 * 0.9, so the second of them cuts.
        let lr = plateau(
            json!({"factor": 0.1, "patience": 1, "threshold": 0.1}),
            &[1.0, 0.95, 0.89, 0.85, 0.81],
        );
        assert_eq!(lr, vec![1.0, 1.0, 1.0, 1.0, 0.1]);
    }

    #[test]
    fn plateau_abs_threshold_in_max_mode_needs_best_plus_threshold() {
        // Accuracy: 0.5 is best; 0.505 is not above 0.5 + 0.01, 0.52 is; then two bad steps.
        let lr = plateau(
            json!({"mode": "max", "threshold_mode": "abs", "threshold": 0.01, "patience": 1,
                   "factor": 0.5}),
            &[0.5, 0.505, 0.52, 0.52, 0.51, 0.9],
        );
        assert_eq!(lr, vec![1.0, 1.0, 1.0, 1.0, 0.5, 0.5]);
    }

    #[test]
    fn plateau_cooldown_ignores_bad_steps_until_it_runs_out() {
        // Patience 0: every bad step cuts, except during the 2 steps of cooldown after a cut.
        let lr = plateau(
            json!({"factor": 0.5, "patience": 0, "cooldown": 2}),
            &[1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
        );
        assert_eq!(lr, vec![1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]);
    }

    #[test]
    fn plateau_stops_at_min_lr_and_skips_cuts_smaller_than_eps() {
        let lr = plateau(
            json!({"factor": 0.1, "patience": 0, "min_lr": 0.05}),
            &[1.0, 2.0, 2.0, 2.0],
        );
        assert_eq!(lr, vec![1.0, 0.1, 0.05, 0.05]);
        // A cut from 1.0 to 0.9 is 0.1, not above eps 0.2: the learning rate stays.
        let lr = plateau(
            json!({"factor": 0.9, "patience": 0, "eps": 0.2}),
            &[1.0, 2.0, 2.0],
        );
        assert_eq!(lr, vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_live_plateau_tracker_gives_the_same_rates_as_the_replayed_schedule() {
        let mut rule = ReduceOnPlateau::new(0.1, PlateauMode::Min);
        rule.patience = 2;
        rule.metrics = vec![3.0, 2.0, 2.5, 2.5, 2.5, 1.0, 1.5, 1.5, 1.5];
        let mut tracker = rule.tracker();
        assert_eq!(tracker.lr(), 0.1);
        let live: Vec<f64> = rule.metrics.iter().map(|&m| tracker.step(m)).collect();
        assert_eq!(live, rule.lrs());
        assert_eq!(tracker.lr(), *live.last().unwrap());
        rule.validate_rule().unwrap();
    }

    #[test]
    fn cosine_within_t_max_is_the_closed_form_and_reaches_eta_min() {
        let cosine = Cosine {
            lr: 0.2,
            t_max: 30,
            eta_min: 0.01,
            steps: 31,
        };
        let lrs = cosine.lrs(31);
        for (step, lr) in lrs.iter().enumerate() {
            let closed = 0.01 + (0.2 - 0.01) * (1.0 + (PI * step as f64 / 30.0).cos()) / 2.0;
            assert!((lr - closed).abs() < 1e-15, "step {step}: {lr} vs {closed}");
        }
        assert!((lrs[30] - 0.01).abs() < 1e-15);
        // Past T_max PyTorch's recursion climbs back to lr after another T_max steps.
        let long = cosine.lrs(61);
        assert!((long[60] - 0.2).abs() < 1e-12, "{}", long[60]);
    }

    #[test]
    fn step_lr_multiplies_by_gamma_at_each_multiple_of_step_size() {
        let step = StepLr {
            lr: 1.0,
            step_size: 3,
            gamma: 0.5,
            steps: 8,
        };
        assert_eq!(
            Schedule::Step(step).curve().lr,
            vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
        );
        let defaults =
            parse(json!({"kind": "step", "lr": 0.1, "step_size": 1, "steps": 2})).unwrap();
        assert_eq!(defaults.curve().lr, vec![0.1, 0.1 * 0.1]);
    }

    #[test]
    fn new_kinds_reject_each_broken_rule_naming_the_field() {
        let cases = [
            (
                json!({"kind": "cosine", "lr": 0.0, "T_max": 10, "steps": 10}),
                "lr",
            ),
            (
                json!({"kind": "cosine", "lr": 0.1, "T_max": 0, "steps": 10}),
                "T_max",
            ),
            (
                json!({"kind": "cosine", "lr": 0.1, "T_max": 10, "eta_min": 0.2, "steps": 10}),
                "eta_min",
            ),
            (
                json!({"kind": "cosine", "lr": 0.1, "T_max": 10, "steps": 0}),
                "steps",
            ),
            (
                json!({"kind": "step", "lr": 0.1, "step_size": 0, "steps": 10}),
                "step_size",
            ),
            (
                json!({"kind": "step", "lr": 0.1, "step_size": 2, "gamma": -1.0, "steps": 10}),
                "gamma",
            ),
            (
                json!({"kind": "step", "lr": 0.1, "step_size": 2, "steps": 2000}),
                "steps",
            ),
            (
                json!({"kind": "reduce_on_plateau", "lr": -0.1, "metrics": [1.0]}),
                "lr",
            ),
            (
                json!({"kind": "reduce_on_plateau", "lr": 0.1, "factor": 1.0, "metrics": [1.0]}),
                "factor",
            ),
            (
                json!({"kind": "reduce_on_plateau", "lr": 0.1, "threshold": -1.0, "metrics": [1.0]}),
                "threshold",
            ),
            (
                json!({"kind": "reduce_on_plateau", "lr": 0.1, "min_lr": -1.0, "metrics": [1.0]}),
                "min_lr",
            ),
            (
                json!({"kind": "reduce_on_plateau", "lr": 0.1, "eps": -1.0, "metrics": [1.0]}),
                "eps",
            ),
            (
                json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": []}),
                "metrics",
            ),
            (
                json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": vec![1.0; 1001]}),
                "metrics",
            ),
        ];
        for (json, field) in cases {
            let schedule = parse(json.clone()).unwrap_or_else(|error| panic!("{json}: {error}"));
            let error = schedule
                .validate(1000)
                .expect_err(&format!("{json} should be rejected"));
            assert_eq!(error.field, field, "{json}: {error}");
        }
        let error = parse(
            json!({"kind": "reduce_on_plateau", "lr": 0.1, "mode": "lowest", "metrics": [1.0]}),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("unknown variant `lowest`"),
            "{error}"
        );
    }

    #[test]
    fn new_kinds_print_their_pytorch_line() {
        let cosine = parse(json!({"kind": "cosine", "lr": 0.1, "T_max": 50, "steps": 50})).unwrap();
        assert_eq!(
            cosine.pytorch(),
            "CosineAnnealingLR(optimizer, T_max=50, eta_min=0.0)  # optimizer created with lr=0.1"
        );
        let step = parse(json!({"kind": "step", "lr": 0.1, "step_size": 7, "steps": 50})).unwrap();
        assert_eq!(
            step.pytorch(),
            "StepLR(optimizer, step_size=7, gamma=0.1)  # optimizer created with lr=0.1"
        );
        let plateau =
            parse(json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": [1.0]})).unwrap();
        assert_eq!(
            plateau.pytorch(),
            "ReduceLROnPlateau(optimizer, mode='min', factor=0.1, patience=10, threshold=0.0001, \
             threshold_mode='rel', cooldown=0, min_lr=0.0, eps=1e-8)  # optimizer created with \
             lr=0.1; call scheduler.step(metric) after each evaluation"
        );
    }

    fn merge(base: &mut Value, changes: Value) {
        if let (Some(base), Value::Object(changes)) = (base.as_object_mut(), changes) {
            base.extend(changes);
        }
    }
}
