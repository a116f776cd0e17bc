//! `OneCycleLR`.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

use super::Anneal;
use super::{
    check_lr, check_momenta, check_positive, check_step_count, python_bool, python_float,
    ScheduleError,
};
use crate::engine::spec::defaults;

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
