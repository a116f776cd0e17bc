//! Learning-rate and momentum schedules with PyTorch's exact semantics (OneCycleLR, CyclicLR,
//! CosineAnnealingWarmRestarts, LinearLR then CosineAnnealingLR, CosineAnnealingLR, StepLR, and
//! ReduceLROnPlateau driven by a metric), so the sweep, the recipe race, `POST /v1/schedules` and
//! `lrtune schedule` all produce the numbers PyTorch would.

use serde::{Deserialize, Serialize};
use std::fmt;

mod cosine;
mod cyclic;
mod one_cycle;
mod plateau;
mod step;
#[cfg(test)]
mod tests;

pub use super::spec::recipes::{PlateauMode, ThresholdMode};
pub use super::spec::Anneal;
pub use cosine::{Cosine, CosineWarmRestarts, WarmupCosine};
pub use cyclic::{Cyclic, CyclicMode};
pub use one_cycle::{MomentumOf, OneCycle};
pub use plateau::{PlateauTracker, ReduceOnPlateau};
pub use step::StepLr;

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

pub(super) fn check_lr(field: &str, value: f64) -> Result<(), ScheduleError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ScheduleError::new(
            field,
            format!("must be a positive, finite learning rate, got {value:?}"),
        ))
    }
}

pub(super) fn check_positive(field: &str, value: f64) -> Result<(), ScheduleError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ScheduleError::new(
            field,
            format!("must be a positive, finite number, got {value:?}"),
        ))
    }
}

pub(super) fn check_step_count(
    field: &str,
    value: usize,
    max_steps: usize,
) -> Result<(), ScheduleError> {
    if (1..=max_steps).contains(&value) {
        Ok(())
    } else {
        Err(ScheduleError::new(
            field,
            format!("must be between 1 and {max_steps} steps, got {value}"),
        ))
    }
}

pub(super) fn check_momenta(base_momentum: f64, max_momentum: f64) -> Result<(), ScheduleError> {
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

pub(super) fn check_eta_min(
    eta_min: f64,
    peak_field: &str,
    peak: f64,
) -> Result<(), ScheduleError> {
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
pub(super) fn python_float(value: f64) -> String {
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

pub(super) fn python_bool(value: bool) -> &'static str {
    if value {
        "True"
    } else {
        "False"
    }
}
