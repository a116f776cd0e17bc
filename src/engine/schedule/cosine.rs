//! Cosine annealing: `CosineAnnealingWarmRestarts`, `LinearLR` then `CosineAnnealingLR`, and
//! `CosineAnnealingLR`.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

use super::{check_eta_min, check_lr, check_step_count, python_float, ScheduleError};
use crate::engine::spec::defaults;

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
