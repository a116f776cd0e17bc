//! `CyclicLR` with its built-in modes.

use super::{
    check_lr, check_momenta, check_positive, check_step_count, python_bool, python_float,
    ScheduleError,
};
use crate::engine::spec::defaults;
use serde::{Deserialize, Serialize};

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
