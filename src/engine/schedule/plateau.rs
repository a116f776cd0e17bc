//! `ReduceLROnPlateau`, on a metric: its curve for given metrics, and the tracker a race
//! drives with live validation metrics.

use serde::{Deserialize, Serialize};

use super::{check_lr, check_step_count, python_float, ScheduleError};
use super::{PlateauMode, ThresholdMode};
use crate::engine::spec::defaults;

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
