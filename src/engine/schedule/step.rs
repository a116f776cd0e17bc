//! `StepLR`.

use super::{check_lr, check_positive, check_step_count, python_float, ScheduleError};
use crate::engine::spec::defaults;
use serde::{Deserialize, Serialize};

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
