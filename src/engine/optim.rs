//! SGD (momentum, nesterov, L2 weight decay), Adam and AdamW over candle `Var`s, with the
//! learning rate and momentum / beta1 set before every step. Each parameter is updated in one
//! fused in-place pass (`update.rs`) instead of a chain of temporary tensors.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

use super::spec::OptimizerSpec;
use super::update::{adam_update, sgd_update, AdamStep, SgdStep};

/// Per-parameter state, kept in host memory.
#[derive(Debug, Clone, PartialEq)]
enum ParamState {
    Sgd {
        buffer: Vec<f32>,
    },
    Adam {
        exp_avg: Vec<f32>,
        exp_avg_sq: Vec<f32>,
    },
}

/// Everything needed to put an optimizer back where it was (the range test restores it).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    steps: u64,
    params: Vec<ParamState>,
}

pub struct Optimizer {
    spec: OptimizerSpec,
    vars: Vec<Var>,
    state: OptimizerState,
}

impl Optimizer {
    pub fn new(spec: &OptimizerSpec, vars: &[Var]) -> Self {
        let params = vars
            .iter()
            .map(|var| {
                let len = var.elem_count();
                match spec {
                    OptimizerSpec::Sgd { .. } => ParamState::Sgd {
                        buffer: vec![0.0; len],
                    },
                    OptimizerSpec::Adam { .. } | OptimizerSpec::Adamw { .. } => ParamState::Adam {
                        exp_avg: vec![0.0; len],
                        exp_avg_sq: vec![0.0; len],
                    },
                }
            })
            .collect();
        Self {
            spec: spec.clone(),
            vars: vars.to_vec(),
            state: OptimizerState { steps: 0, params },
        }
    }

    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    pub fn restore(&mut self, state: &OptimizerState) {
        self.state = state.clone();
    }

    /// SGD momentum or Adam beta1 as configured (used when no schedule cycles it).
    pub fn default_momentum(&self) -> f64 {
        self.spec.momentum()
    }

    /// One update with this step's learning rate and momentum (SGD) or beta1 (Adam).
    /// A parameter without a gradient is left alone, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64, momentum: f64) -> candle_core::Result<()> {
        self.step_each(lr, momentum, |_, var, update| {
            match grads.get(var.as_tensor()) {
                Some(grad) => apply(var, grad, update),
                None => Ok(()),
            }
        })
    }

    /// The same update with gradients in host memory, one per variable in order (the native
    /// CPU step's output).
    pub fn step_host(
        &mut self,
        grads: &[Vec<f32>],
        lr: f64,
        momentum: f64,
    ) -> candle_core::Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!(
                "optimizer: {} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            );
        }
        self.step_each(lr, momentum, |index, var, update| {
            let grad = &grads[index];
            if grad.len() != var.elem_count() {
                candle_core::bail!(
                    "optimizer: gradient {index} has {} values for {}",
                    grad.len(),
                    var.elem_count()
                );
            }
            if var.device().is_cpu() {
                var.as_tensor().inplace_op1(&HostUpdate { update, grad })
            } else {
                apply(
                    var,
                    &Tensor::from_slice(grad, var.shape(), var.device())?,
                    update,
                )
            }
        })
    }

    fn step_each(
        &mut self,
        lr: f64,
        momentum: f64,
        mut apply_one: impl FnMut(usize, &Var, &FusedUpdate) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        self.state.steps += 1;
        let first = self.state.steps == 1;
        let step_count = self.state.steps;
        for (index, (var, state)) in self
            .vars
            .iter()
            .zip(self.state.params.iter_mut())
            .enumerate()
        {
            let update = match (&self.spec, state) {
                (
                    OptimizerSpec::Sgd {
                        nesterov,
                        weight_decay,
                        ..
                    },
                    ParamState::Sgd { buffer },
                ) => FusedUpdate::Sgd {
                    hyper: SgdStep {
                        lr,
                        momentum,
                        nesterov: *nesterov,
                        weight_decay: *weight_decay,
                    },
                    first,
                    buffer: RefCell::new(buffer),
                },
                (
                    OptimizerSpec::Adam {
                        betas,
                        eps,
                        weight_decay,
                    }
                    | OptimizerSpec::Adamw {
                        betas,
                        eps,
                        weight_decay,
                    },
                    ParamState::Adam {
                        exp_avg,
                        exp_avg_sq,
                    },
                ) => FusedUpdate::Adam {
                    hyper: AdamStep {
                        lr,
                        beta1: momentum,
                        beta2: betas[1],
                        eps: *eps,
                        weight_decay: *weight_decay,
                        decoupled: matches!(self.spec, OptimizerSpec::Adamw { .. }),
                        step: step_count,
                    },
                    exp_avg: RefCell::new(exp_avg),
                    exp_avg_sq: RefCell::new(exp_avg_sq),
                },
                _ => unreachable!("state is created from the same spec"),
            };
            apply_one(index, var, &update)?;
        }
        Ok(())
    }
}

/// A fused update whose gradient is a host slice rather than a tensor.
struct HostUpdate<'a, 'b> {
    update: &'a FusedUpdate<'b>,
    grad: &'a [f32],
}

impl InplaceOp1 for HostUpdate<'_, '_> {
    fn name(&self) -> &'static str {
        "lrtune-fused-update-host"
    }

    fn cpu_fwd(&self, param: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(param) = param else {
            candle_core::bail!("fused update: parameters must be f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused update: parameters must be contiguous");
        };
        self.update.run(&mut param[start..end], self.grad);
        Ok(())
    }
}

/// One parameter's update, run by candle on the parameter's own storage.
enum FusedUpdate<'a> {
    Sgd {
        hyper: SgdStep,
        first: bool,
        buffer: RefCell<&'a mut Vec<f32>>,
    },
    Adam {
        hyper: AdamStep,
        exp_avg: RefCell<&'a mut Vec<f32>>,
        exp_avg_sq: RefCell<&'a mut Vec<f32>>,
    },
}

/// Parameters of this many weights or more are updated in chunks of `UPDATE_CHUNK` on the
/// thread pool. The update is element by element, so the split changes no value.
const PARALLEL_UPDATE_MIN: usize = 1 << 16;
const UPDATE_CHUNK: usize = 1 << 14;

impl FusedUpdate<'_> {
    fn run(&self, param: &mut [f32], grad: &[f32]) {
        let chunk = if param.len() >= PARALLEL_UPDATE_MIN && rayon::current_num_threads() > 1 {
            UPDATE_CHUNK
        } else {
            param.len().max(1)
        };
        match self {
            FusedUpdate::Sgd {
                hyper,
                first,
                buffer,
            } => {
                let mut buffer = buffer.borrow_mut();
                if buffer.len() != param.len() {
                    // No momentum buffer to split (plain SGD never reads it).
                    return sgd_update(param, grad, &mut buffer[..], *first, hyper);
                }
                assert_eq!(
                    grad.len(),
                    param.len(),
                    "gradient length differs from the parameter's"
                );
                param
                    .par_chunks_mut(chunk)
                    .zip(grad.par_chunks(chunk))
                    .zip(buffer.par_chunks_mut(chunk))
                    .for_each(|((param, grad), buffer)| {
                        sgd_update(param, grad, buffer, *first, hyper)
                    });
            }
            FusedUpdate::Adam {
                hyper,
                exp_avg,
                exp_avg_sq,
            } => {
                let (mut exp_avg, mut exp_avg_sq) = (exp_avg.borrow_mut(), exp_avg_sq.borrow_mut());
                // Checked here too: the chunks below would end at the shortest slice.
                assert!(
                    grad.len() == param.len()
                        && exp_avg.len() == param.len()
                        && exp_avg_sq.len() == param.len(),
                    "gradient or moment length differs from the parameter's"
                );
                param
                    .par_chunks_mut(chunk)
                    .zip(grad.par_chunks(chunk))
                    .zip(exp_avg.par_chunks_mut(chunk))
                    .zip(exp_avg_sq.par_chunks_mut(chunk))
                    .for_each(|(((param, grad), exp_avg), exp_avg_sq)| {
                        adam_update(param, grad, exp_avg, exp_avg_sq, hyper)
                    });
            }
        }
    }
}

impl InplaceOp2 for FusedUpdate<'_> {
    fn name(&self) -> &'static str {
        "lrtune-fused-update"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        param_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(param), CpuStorage::F32(grad)) = (param, grad) else {
            candle_core::bail!("fused update: parameters and gradients must be f32");
        };
        let (Some((p_start, p_end)), Some((g_start, g_end))) = (
            param_layout.contiguous_offsets(),
            grad_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("fused update: tensors must be contiguous");
        };
        self.run(&mut param[p_start..p_end], &grad[g_start..g_end]);
        Ok(())
    }
}

/// Applies an update in place on CPU; on other devices the parameter makes a round trip
/// through host memory (correct, not fast: the CPU is what this is tuned for).
fn apply(var: &Var, grad: &Tensor, update: &FusedUpdate) -> candle_core::Result<()> {
    let grad = grad.contiguous()?;
    if var.device().is_cpu() {
        return var.as_tensor().inplace_op2(&grad, update);
    }
    let shape = var.shape().clone();
    let mut param = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let grad_host = grad.flatten_all()?.to_vec1::<f32>()?;
    update.run(&mut param, &grad_host);
    var.set(&Tensor::from_vec(param, shape, var.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The same quadratic as tests/golden/optimizers.json, through candle's autograd and the
    /// fused in-place path, in f32.
    fn run(spec: OptimizerSpec, lrs: &[f64], momenta: Option<&[f64]>) -> Vec<f32> {
        let device = Device::Cpu;
        let w =
            Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5, 3.0], &device).unwrap()).unwrap();
        let target = Tensor::new(&[0.3f32, 0.1, -0.7, 2.0], &device).unwrap();
        let weights = Tensor::new(&[1.0f32, 2.0, 3.0, 4.0], &device).unwrap();
        let mut optimizer = Optimizer::new(&spec, std::slice::from_ref(&w));
        for (index, lr) in lrs.iter().enumerate() {
            let loss = (w.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .mul(&weights)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let momentum = momenta.map_or(spec.momentum(), |m| m[index]);
            optimizer.step(&grads, *lr, momentum).unwrap();
        }
        w.as_tensor().to_vec1().unwrap()
    }

    fn golden(index: usize) -> (Vec<f64>, Option<Vec<f64>>, Vec<f64>) {
        let text = include_str!("../../tests/golden/optimizers.json");
        let golden: serde_json::Value = serde_json::from_str(text).unwrap();
        let trace = &golden["traces"][index];
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let momenta = trace["momentum_or_beta1"]
            .as_array()
            .map(|_| floats(&trace["momentum_or_beta1"]));
        let steps = trace["params_after_each_step"].as_array().unwrap();
        (floats(&trace["lr"]), momenta, floats(steps.last().unwrap()))
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            let error = (*g as f64 - w).abs() / w.abs().max(1e-3);
            assert!(error < 1e-4, "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn fused_sgd_with_cycled_nesterov_momentum_matches_pytorch() {
        let (lrs, momenta, want) = golden(2);
        let spec = OptimizerSpec::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
        };
        assert_close(&run(spec, &lrs, momenta.as_deref()), &want);
    }

    #[test]
    fn fused_adamw_with_cycled_beta1_matches_pytorch() {
        let (lrs, momenta, want) = golden(7);
        let spec = OptimizerSpec::Adamw {
            betas: [0.9, 0.99],
            eps: 1e-6,
            weight_decay: 0.1,
        };
        assert_close(&run(spec, &lrs, momenta.as_deref()), &want);
    }

    #[test]
    fn restoring_the_state_replays_the_same_steps() {
        let spec = OptimizerSpec::Adam {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let device = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -1.0], &device).unwrap()).unwrap();
        let mut optimizer = Optimizer::new(&spec, std::slice::from_ref(&w));
        let saved = optimizer.state().clone();
        let grads = w
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        optimizer.step(&grads, 0.1, 0.9).unwrap();
        assert_ne!(optimizer.state(), &saved);
        optimizer.restore(&saved);
        assert_eq!(optimizer.state(), &saved);
    }
}
