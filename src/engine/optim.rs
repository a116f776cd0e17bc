//! SGD (momentum, nesterov, L2 weight decay), Adam and AdamW, and the learning-rate-free
//! Prodigy and schedule-free AdamW and SGD, over candle `Var`s, with the learning rate and
//! momentum / beta1 set before every step. Two forms with the same rounding: the native step's
//! (host gradients; each parameter updated in fused in-place passes of `update.rs`) and the
//! candle step's (stock tensor ops on the parameter's device, where the optimizer's state
//! stays too).
//!
//! Prodigy's step size `d` is global: each step first sums over every parameter, then
//! updates them. The schedule-free optimizers train the model at `y` and are evaluated at the
//! average `x`: [`Optimizer::eval`] moves the weights to x and [`Optimizer::train`] back, as
//! the library's `optimizer.eval()` and `optimizer.train()` do.

use std::cell::{Cell, RefCell};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;

use super::spec::OptimizerSpec;
use super::update::{
    adam_update, prodigy_accumulate, prodigy_apply, schedule_free_update, sgd_update, AdamStep,
    ProdigyAccumulate, ProdigyApply, ProdigySums, ScheduleFreeStep, SgdStep,
};

/// One state vector of one parameter: SGD's momentum buffer, Adam's first or second moment.
#[derive(Debug, Clone)]
enum Moment {
    /// Not written yet: zeros, allocated where the first step runs.
    Zeros,
    /// In host memory, for the native step.
    Host(Vec<f32>),
    /// On the parameter's device, for the candle step. Each step makes a new tensor instead of
    /// writing this one, so a cloned state stays a snapshot.
    Device(Tensor),
}

impl Moment {
    /// The values in host memory (moved there if the candle step left them on a device).
    fn host(&mut self, len: usize) -> candle_core::Result<&mut Vec<f32>> {
        match self {
            Moment::Zeros => *self = Moment::Host(vec![0.0; len]),
            Moment::Device(values) => *self = Moment::Host(values.flatten_all()?.to_vec1()?),
            Moment::Host(_) => {}
        }
        match self {
            Moment::Host(values) => Ok(values),
            _ => unreachable!("set above"),
        }
    }

    /// The values as a tensor shaped and placed like `param`.
    fn on_device(&self, param: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Moment::Zeros => param.zeros_like(),
            Moment::Host(values) => Tensor::from_slice(values, param.shape(), param.device()),
            Moment::Device(values) => Ok(values.clone()),
        }
    }

    /// The values, `None` for zeros not yet allocated.
    fn values(&self) -> candle_core::Result<Option<Vec<f32>>> {
        match self {
            Moment::Zeros => Ok(None),
            Moment::Host(values) => Ok(Some(values.clone())),
            Moment::Device(values) => Ok(Some(values.flatten_all()?.to_vec1()?)),
        }
    }
}

/// Equal values wherever they live (a tensor that cannot be read equals nothing).
impl PartialEq for Moment {
    fn eq(&self, other: &Self) -> bool {
        match (self.values(), other.values()) {
            (Ok(None), Ok(None)) => true,
            (Ok(None), Ok(Some(values))) | (Ok(Some(values)), Ok(None)) => {
                values.iter().all(|&v| v == 0.0)
            }
            (Ok(Some(a)), Ok(Some(b))) => a == b,
            _ => false,
        }
    }
}

/// Per-parameter state.
#[derive(Debug, Clone, PartialEq)]
enum ParamState {
    Sgd {
        buffer: Moment,
    },
    Adam {
        exp_avg: Moment,
        exp_avg_sq: Moment,
    },
    Prodigy {
        /// The weights at the parameter's first step (`None` before it).
        p0: Option<Moment>,
        s: Moment,
        exp_avg: Moment,
        exp_avg_sq: Moment,
    },
    ScheduleFree {
        /// The parameter's z sequence, starting at its weights at its first step (`None`
        /// before it).
        z: Option<Moment>,
        /// AdamW's second moment (never written by SGD).
        exp_avg_sq: Moment,
    },
}

/// The scalars an optimizer keeps over all parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
enum GlobalState {
    None,
    Prodigy {
        /// Steps taken (one whose sums were all 0 is not counted, as in the library).
        k: u64,
        d: f64,
        d_max: f64,
        d_numerator: f64,
    },
    ScheduleFree {
        k: u64,
        weight_sum: f64,
        /// -1 before the first step, as in the library.
        lr_max: f64,
        /// The beta1 / momentum of the last step: y is formed with it, so x is recovered
        /// with it (the library reads its group's value at `eval()`).
        momentum: f64,
    },
}

/// Everything needed to put an optimizer back where it was (the range test restores it).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    steps: u64,
    params: Vec<ParamState>,
    global: GlobalState,
}

/// One step's hyper-parameters, the same for every parameter.
enum StepRule {
    Sgd {
        hyper: SgdStep,
        /// The momentum buffer starts as this step's gradient (PyTorch's first step).
        first: bool,
    },
    Adam(AdamStep),
}

pub struct Optimizer {
    spec: OptimizerSpec,
    vars: Vec<Var>,
    state: OptimizerState,
    /// The schedule-free momentum the weights were moved to x with, while they are there.
    at_x: Option<f64>,
}

impl Optimizer {
    /// The optimizer this steps, as the job spec named it.
    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    pub fn new(spec: &OptimizerSpec, vars: &[Var]) -> Self {
        let params =
            vars.iter()
                .map(|_| match spec {
                    OptimizerSpec::Sgd { .. } => ParamState::Sgd {
                        buffer: Moment::Zeros,
                    },
                    OptimizerSpec::Adam { .. } | OptimizerSpec::Adamw { .. } => ParamState::Adam {
                        exp_avg: Moment::Zeros,
                        exp_avg_sq: Moment::Zeros,
                    },
                    OptimizerSpec::Prodigy { .. } => ParamState::Prodigy {
                        p0: None,
                        s: Moment::Zeros,
                        exp_avg: Moment::Zeros,
                        exp_avg_sq: Moment::Zeros,
                    },
                    OptimizerSpec::ScheduleFreeAdamw { .. }
                    | OptimizerSpec::ScheduleFreeSgd { .. } => ParamState::ScheduleFree {
                        z: None,
                        exp_avg_sq: Moment::Zeros,
                    },
                })
                .collect();
        let global = match spec {
            OptimizerSpec::Prodigy { d0, .. } => GlobalState::Prodigy {
                k: 0,
                d: *d0,
                d_max: *d0,
                d_numerator: 0.0,
            },
            OptimizerSpec::ScheduleFreeAdamw { .. } | OptimizerSpec::ScheduleFreeSgd { .. } => {
                GlobalState::ScheduleFree {
                    k: 0,
                    weight_sum: 0.0,
                    lr_max: -1.0,
                    momentum: spec.momentum(),
                }
            }
            _ => GlobalState::None,
        };
        Self {
            spec: spec.clone(),
            vars: vars.to_vec(),
            state: OptimizerState {
                steps: 0,
                params,
                global,
            },
            at_x: None,
        }
    }

    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Puts the optimizer back to a saved state. The weights are the caller's to restore,
    /// with the optimizer in training mode (a state is always taken there).
    pub fn restore(&mut self, state: &OptimizerState) {
        debug_assert!(self.at_x.is_none(), "restored while evaluating at x");
        self.state = state.clone();
    }

    /// Prodigy's current step size `d` (`None` for the other optimizers).
    pub fn prodigy_d(&self) -> Option<f64> {
        match self.state.global {
            GlobalState::Prodigy { d, .. } => Some(d),
            _ => None,
        }
    }

    /// Whether the model is evaluated at other weights than it trains at (the schedule-free
    /// optimizers' x once they have stepped; before, x is y): callers then evaluate between
    /// [`Optimizer::eval`] and [`Optimizer::train`].
    pub fn evaluates_elsewhere(&self) -> bool {
        matches!(self.state.global, GlobalState::ScheduleFree { k, .. } if k > 0)
    }

    /// Moves the weights from y, where they train, to x, where a schedule-free optimizer is
    /// evaluated (`optimizer.eval()`): `y.lerp(z, 1 - 1/beta1)`. A parameter that has not
    /// stepped stays (its x is y). Nothing for the other optimizers, or when already at x.
    pub fn eval(&mut self) -> candle_core::Result<()> {
        let GlobalState::ScheduleFree { momentum, .. } = self.state.global else {
            return Ok(());
        };
        if self.at_x.is_some() {
            return Ok(());
        }
        self.lerp_toward_z(1.0 - 1.0 / momentum)?;
        self.at_x = Some(momentum);
        Ok(())
    }

    /// Moves the weights back from x to y (`optimizer.train()`): `x.lerp(z, 1 - beta1)`.
    pub fn train(&mut self) -> candle_core::Result<()> {
        let Some(momentum) = self.at_x else {
            return Ok(());
        };
        self.lerp_toward_z(1.0 - momentum)?;
        self.at_x = None;
        Ok(())
    }

    fn lerp_toward_z(&mut self, weight: f64) -> candle_core::Result<()> {
        for (var, state) in self.vars.iter().zip(&self.state.params) {
            if let ParamState::ScheduleFree { z: Some(z), .. } = state {
                let param = var.as_tensor().detach();
                let z = z.on_device(&param)?;
                var.set(&lerp_on_device(&param, &z, weight)?)?;
            }
        }
        Ok(())
    }

    /// SGD momentum or Adam beta1 as configured (used when no schedule cycles it).
    pub fn default_momentum(&self) -> f64 {
        self.spec.momentum()
    }

    /// One update with this step's learning rate and momentum (SGD) or beta1 (Adam), as
    /// candle tensor ops on the parameters' device (the candle backend's step). A parameter
    /// without a gradient is left alone, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64, momentum: f64) -> candle_core::Result<()> {
        if !matches!(self.state.global, GlobalState::None) {
            return self.step_global(Gradients::Device(grads), lr, momentum);
        }
        let rule = self.begin_step(lr, momentum);
        let mut scalars = DeviceScalars::default();
        for (var, state) in self.vars.iter().zip(self.state.params.iter_mut()) {
            if let Some(grad) = grads.get(var.as_tensor()) {
                update_on_device(var, &grad.detach(), state, &rule, &mut scalars)?;
            }
        }
        Ok(())
    }

    /// The same update with gradients in host memory, one per variable in order (the native
    /// CPU step's output), fused in place on the parameters' storage.
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
        if !matches!(self.state.global, GlobalState::None) {
            return self.step_global(Gradients::Host(grads), lr, momentum);
        }
        let rule = self.begin_step(lr, momentum);
        let mut scalars = DeviceScalars::default();
        for (index, (var, state)) in self
            .vars
            .iter()
            .zip(self.state.params.iter_mut())
            .enumerate()
        {
            let grad = &grads[index];
            let len = var.elem_count();
            if grad.len() != len {
                candle_core::bail!(
                    "optimizer: gradient {index} has {} values for {len}",
                    grad.len(),
                );
            }
            if !var.device().is_cpu() {
                let grad = Tensor::from_slice(grad, var.shape(), var.device())?;
                update_on_device(var, &grad, state, &rule, &mut scalars)?;
                continue;
            }
            let update = match (&rule, state) {
                (StepRule::Sgd { hyper, first }, ParamState::Sgd { buffer }) => FusedUpdate::Sgd {
                    hyper,
                    first: *first,
                    buffer: RefCell::new(buffer.host(len)?),
                },
                (
                    StepRule::Adam(hyper),
                    ParamState::Adam {
                        exp_avg,
                        exp_avg_sq,
                    },
                ) => FusedUpdate::Adam {
                    hyper,
                    exp_avg: RefCell::new(exp_avg.host(len)?),
                    exp_avg_sq: RefCell::new(exp_avg_sq.host(len)?),
                },
                _ => unreachable!("state is created from the same spec"),
            };
            var.as_tensor().inplace_op1(&HostUpdate {
                update: &update,
                grad,
            })?;
        }
        Ok(())
    }

    /// Counts the step and sets its hyper-parameters.
    fn begin_step(&mut self, lr: f64, momentum: f64) -> StepRule {
        self.state.steps += 1;
        match &self.spec {
            OptimizerSpec::Sgd {
                nesterov,
                weight_decay,
                ..
            } => StepRule::Sgd {
                hyper: SgdStep {
                    lr,
                    momentum,
                    nesterov: *nesterov,
                    weight_decay: *weight_decay,
                },
                first: self.state.steps == 1,
            },
            OptimizerSpec::Adam {
                betas,
                eps,
                weight_decay,
            }
            | OptimizerSpec::Adamw {
                betas,
                eps,
                weight_decay,
            } => StepRule::Adam(AdamStep {
                lr,
                beta1: momentum,
                beta2: betas[1],
                eps: *eps,
                weight_decay: *weight_decay,
                decoupled: matches!(self.spec, OptimizerSpec::Adamw { .. }),
                step: self.state.steps,
            }),
            OptimizerSpec::Prodigy { .. }
            | OptimizerSpec::ScheduleFreeAdamw { .. }
            | OptimizerSpec::ScheduleFreeSgd { .. } => {
                unreachable!("stepped by step_global")
            }
        }
    }

    /// A step of Prodigy or a schedule-free optimizer, whose scalars span every parameter.
    fn step_global(
        &mut self,
        grads: Gradients<'_>,
        lr: f64,
        momentum: f64,
    ) -> candle_core::Result<()> {
        if self.at_x.is_some() {
            candle_core::bail!("optimizer: a step at x (evaluation weights); call train() first");
        }
        for (index, var) in self.vars.iter().enumerate() {
            if let Some(grad) = grads.host(index) {
                if grad.len() != var.elem_count() {
                    candle_core::bail!(
                        "optimizer: gradient {index} has {} values for {}",
                        grad.len(),
                        var.elem_count()
                    );
                }
            }
        }
        self.state.steps += 1;
        match self.spec.clone() {
            OptimizerSpec::Prodigy {
                betas,
                beta3,
                eps,
                weight_decay,
                decouple,
                d0,
                d_coef,
                growth_rate,
                use_bias_correction,
                safeguard_warmup,
            } => {
                let hyper = ProdigyHyper {
                    beta1: momentum,
                    beta2: betas[1],
                    beta3: beta3.unwrap_or(betas[1].sqrt()),
                    eps,
                    weight_decay,
                    decouple,
                    d0,
                    d_coef,
                    growth_rate: growth_rate.unwrap_or(f64::INFINITY),
                    use_bias_correction,
                    safeguard_warmup,
                };
                self.prodigy_step(&grads, lr, &hyper)
            }
            OptimizerSpec::ScheduleFreeAdamw {
                betas,
                eps,
                weight_decay,
                warmup_steps,
                r,
                weight_lr_power,
            } => self.schedule_free_step(
                &grads,
                lr,
                momentum,
                ScheduleFreeHyper {
                    adam: Some((betas[1], eps)),
                    weight_decay,
                    warmup_steps,
                    r,
                    weight_lr_power,
                },
            ),
            OptimizerSpec::ScheduleFreeSgd {
                weight_decay,
                warmup_steps,
                r,
                weight_lr_power,
                ..
            } => self.schedule_free_step(
                &grads,
                lr,
                momentum,
                ScheduleFreeHyper {
                    adam: None,
                    weight_decay,
                    warmup_steps,
                    r,
                    weight_lr_power,
                },
            ),
            OptimizerSpec::Sgd { .. }
            | OptimizerSpec::Adam { .. }
            | OptimizerSpec::Adamw { .. } => {
                unreachable!("no global state")
            }
        }
    }

    /// `prodigyopt.Prodigy.step` with `lr` as the group's learning rate: the sums over every
    /// parameter, the new `d`, then the update.
    fn prodigy_step(
        &mut self,
        grads: &Gradients<'_>,
        lr: f64,
        hyper: &ProdigyHyper,
    ) -> candle_core::Result<()> {
        let GlobalState::Prodigy {
            k,
            d,
            d_max,
            d_numerator,
        } = self.state.global
        else {
            unreachable!("state is created from the same spec")
        };
        let (beta1, beta2) = (hyper.beta1, hyper.beta2);
        let bias_correction = if hyper.use_bias_correction {
            (1.0 - beta2.powf(k as f64 + 1.0)).sqrt() / (1.0 - beta1.powf(k as f64 + 1.0))
        } else {
            1.0
        };
        let dlr = d * lr * bias_correction;
        let l2_decay = if hyper.decouple {
            0.0
        } else {
            hyper.weight_decay
        };
        let accumulate = ProdigyAccumulate {
            beta1,
            beta2,
            beta3: hyper.beta3,
            l2_decay,
            exp_avg_coefficient: d * (1.0 - beta1),
            exp_avg_sq_coefficient: d * d * (1.0 - beta2),
            s_coefficient: (d / hyper.d0) * if hyper.safeguard_warmup { d } else { dlr },
        };
        // The first pass; with a learning rate of 0 the library leaves the moments alone and
        // its sums stay 0, so the step ends before the update.
        let mut sums = ProdigySums::default();
        for (index, (var, state)) in self.vars.iter().zip(&mut self.state.params).enumerate() {
            let ParamState::Prodigy {
                p0,
                s,
                exp_avg,
                exp_avg_sq,
            } = state
            else {
                unreachable!("state is created from the same spec")
            };
            let Some(grad) = grads.tensor_or_host(index, var)? else {
                continue;
            };
            if p0.is_none() {
                *p0 = Some(Moment::Device(var.as_tensor().copy()?));
            }
            let p0 = p0.as_mut().expect("set above");
            if lr <= 0.0 {
                continue;
            }
            sums = sums
                + match grad {
                    Grad::Host(grad) if var.device().is_cpu() => {
                        let len = grad.len();
                        let update = FusedUpdate::ProdigyAccumulate {
                            hyper: &accumulate,
                            p0: RefCell::new(p0.host(len)?),
                            s: RefCell::new(s.host(len)?),
                            exp_avg: RefCell::new(exp_avg.host(len)?),
                            exp_avg_sq: RefCell::new(exp_avg_sq.host(len)?),
                            sums: Cell::new(ProdigySums::default()),
                        };
                        var.as_tensor().inplace_op1(&HostUpdate {
                            update: &update,
                            grad,
                        })?;
                        let FusedUpdate::ProdigyAccumulate { sums, .. } = update else {
                            unreachable!("made above")
                        };
                        sums.get()
                    }
                    grad => {
                        let grad = grad.tensor(var)?;
                        prodigy_accumulate_on_device(
                            &var.as_tensor().detach(),
                            &grad,
                            [p0, s, exp_avg, exp_avg_sq],
                            &accumulate,
                        )?
                    }
                };
        }
        let d_numerator = d_numerator * hyper.beta3 + sums.dot * ((d / hyper.d0) * dlr);
        if sums.s_l1 == 0.0 {
            // No progress (no gradient, or a learning rate of 0): the library returns here,
            // neither counting the step nor keeping the numerator's decay.
            return Ok(());
        }
        let (mut d_next, mut d_max_next) = (d, d_max);
        if lr > 0.0 {
            let d_hat = hyper.d_coef * d_numerator / sums.s_l1;
            if d == hyper.d0 {
                d_next = d.max(d_hat);
            }
            d_max_next = d_max.max(d_hat);
            d_next = d_max_next.min(d_next * hyper.growth_rate);
        }
        self.state.global = GlobalState::Prodigy {
            k: k + 1,
            d: d_next,
            d_max: d_max_next,
            d_numerator,
        };
        let momentum_steps = beta1 > 0.0;
        let apply = ProdigyApply {
            momentum: momentum_steps,
            l2_decay,
            d_eps: d_next * hyper.eps,
            decay_coefficient: if hyper.decouple {
                -hyper.weight_decay * dlr
            } else {
                0.0
            },
            step_value: if momentum_steps { -dlr } else { -dlr * d_next },
        };
        for (index, (var, state)) in self.vars.iter().zip(&mut self.state.params).enumerate() {
            let ParamState::Prodigy {
                exp_avg,
                exp_avg_sq,
                ..
            } = state
            else {
                unreachable!("state is created from the same spec")
            };
            let Some(grad) = grads.tensor_or_host(index, var)? else {
                continue;
            };
            match grad {
                Grad::Host(grad) if var.device().is_cpu() => {
                    let len = grad.len();
                    let update = FusedUpdate::ProdigyApply {
                        hyper: &apply,
                        exp_avg: RefCell::new(exp_avg.host(len)?),
                        exp_avg_sq: RefCell::new(exp_avg_sq.host(len)?),
                    };
                    var.as_tensor().inplace_op1(&HostUpdate {
                        update: &update,
                        grad,
                    })?;
                }
                grad => {
                    let grad = grad.tensor(var)?;
                    let param = var.as_tensor().detach();
                    let updated =
                        prodigy_apply_on_device(&param, &grad, [exp_avg, exp_avg_sq], &apply)?;
                    var.set(&updated)?;
                }
            }
        }
        Ok(())
    }

    /// `schedulefree`'s `AdamWScheduleFree.step` / `SGDScheduleFree.step` with `lr` as the
    /// group's learning rate and `momentum` as its beta1 / momentum.
    fn schedule_free_step(
        &mut self,
        grads: &Gradients<'_>,
        lr: f64,
        momentum: f64,
        hyper: ScheduleFreeHyper,
    ) -> candle_core::Result<()> {
        let GlobalState::ScheduleFree {
            k,
            weight_sum,
            lr_max,
            ..
        } = self.state.global
        else {
            unreachable!("state is created from the same spec")
        };
        let warmup = if (k as usize) < hyper.warmup_steps {
            (k as f64 + 1.0) / hyper.warmup_steps as f64
        } else {
            1.0
        };
        let lr = lr * warmup;
        let lr_max = lr.max(lr_max);
        let weight = (k as f64 + 1.0).powf(hyper.r) * lr_max.powf(hyper.weight_lr_power);
        let weight_sum = weight_sum + weight;
        let ckp1 = if weight_sum == 0.0 {
            0.0
        } else {
            weight / weight_sum
        };
        let step = ScheduleFreeStep {
            lr,
            ckp1,
            y_coefficient: lr * (momentum * (1.0 - ckp1) - 1.0),
            weight_decay: hyper.weight_decay,
            adam: hyper
                .adam
                .map(|(beta2, eps)| (beta2, eps, 1.0 - beta2.powf(k as f64 + 1.0))),
        };
        self.state.global = GlobalState::ScheduleFree {
            k: k + 1,
            weight_sum,
            lr_max,
            momentum,
        };
        for (index, (var, state)) in self.vars.iter().zip(&mut self.state.params).enumerate() {
            let ParamState::ScheduleFree { z, exp_avg_sq } = state else {
                unreachable!("state is created from the same spec")
            };
            let Some(grad) = grads.tensor_or_host(index, var)? else {
                continue;
            };
            if z.is_none() {
                *z = Some(Moment::Device(var.as_tensor().copy()?));
            }
            let z = z.as_mut().expect("set above");
            match grad {
                Grad::Host(grad) if var.device().is_cpu() => {
                    let len = grad.len();
                    let mut none = Vec::new();
                    let exp_avg_sq = match step.adam {
                        Some(_) => exp_avg_sq.host(len)?,
                        None => &mut none,
                    };
                    let update = FusedUpdate::ScheduleFree {
                        hyper: &step,
                        z: RefCell::new(z.host(len)?),
                        exp_avg_sq: RefCell::new(exp_avg_sq),
                    };
                    var.as_tensor().inplace_op1(&HostUpdate {
                        update: &update,
                        grad,
                    })?;
                }
                grad => {
                    let grad = grad.tensor(var)?;
                    let param = var.as_tensor().detach();
                    let updated = schedule_free_on_device(&param, &grad, z, exp_avg_sq, &step)?;
                    var.set(&updated)?;
                }
            }
        }
        Ok(())
    }
}

/// Prodigy's constructor arguments with the step's beta1.
struct ProdigyHyper {
    beta1: f64,
    beta2: f64,
    beta3: f64,
    eps: f64,
    weight_decay: f64,
    decouple: bool,
    d0: f64,
    d_coef: f64,
    growth_rate: f64,
    use_bias_correction: bool,
    safeguard_warmup: bool,
}

/// A schedule-free optimizer's constructor arguments.
struct ScheduleFreeHyper {
    /// AdamW's `(beta2, eps)`; `None` for SGD.
    adam: Option<(f64, f64)>,
    weight_decay: f64,
    warmup_steps: usize,
    r: f64,
    weight_lr_power: f64,
}

/// A step's gradients: candle's (the candle step) or host slices in variable order (the
/// native step).
enum Gradients<'a> {
    Device(&'a GradStore),
    Host(&'a [Vec<f32>]),
}

/// One parameter's gradient.
enum Grad<'a> {
    Device(Tensor),
    Host(&'a [f32]),
}

impl<'a> Gradients<'a> {
    fn host(&self, index: usize) -> Option<&'a [f32]> {
        match self {
            Gradients::Host(grads) => Some(&grads[index]),
            Gradients::Device(_) => None,
        }
    }

    /// The gradient of variable `index`; `None` when candle's has none for it (the library
    /// skips such a parameter).
    fn tensor_or_host(&self, index: usize, var: &Var) -> candle_core::Result<Option<Grad<'a>>> {
        Ok(match self {
            Gradients::Host(grads) => Some(Grad::Host(&grads[index])),
            Gradients::Device(store) => store
                .get(var.as_tensor())
                .map(|grad| Grad::Device(grad.detach())),
        })
    }
}

impl Grad<'_> {
    /// The gradient as a tensor shaped and placed like `var`.
    fn tensor(self, var: &Var) -> candle_core::Result<Tensor> {
        match self {
            Grad::Device(grad) => Ok(grad),
            Grad::Host(grad) => Tensor::from_slice(grad, var.shape(), var.device()),
        }
    }
}

/// A scalar tensor of `value` on `like`'s device and dtype.
fn scalar_like(value: f64, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::new(value as f32, like.device())?.to_dtype(like.dtype())
}

/// `update::prodigy_accumulate` as tensor ops; the sums in f64 on the device.
fn prodigy_accumulate_on_device(
    param: &Tensor,
    grad: &Tensor,
    [p0, s, exp_avg, exp_avg_sq]: [&mut Moment; 4],
    hyper: &ProdigyAccumulate,
) -> candle_core::Result<ProdigySums> {
    let grad = if hyper.l2_decay != 0.0 {
        (grad + param.affine(hyper.l2_decay, 0.0)?)?
    } else {
        grad.clone()
    };
    let difference = (p0.on_device(param)? - param)?;
    let dot = (grad.to_dtype(DType::F64)? * difference.to_dtype(DType::F64)?)?
        .sum_all()?
        .to_scalar::<f64>()?;
    if hyper.beta1 > 0.0 {
        let next = (exp_avg.on_device(param)?.affine(hyper.beta1, 0.0)?
            + grad.affine(hyper.exp_avg_coefficient, 0.0)?)?;
        *exp_avg = Moment::Device(next);
    }
    let next_sq = (exp_avg_sq.on_device(param)?.affine(hyper.beta2, 0.0)?
        + grad.affine(hyper.exp_avg_sq_coefficient, 0.0)?.mul(&grad)?)?;
    *exp_avg_sq = Moment::Device(next_sq);
    let next_s =
        (s.on_device(param)?.affine(hyper.beta3, 0.0)? + grad.affine(hyper.s_coefficient, 0.0)?)?;
    let s_l1 = next_s
        .abs()?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    *s = Moment::Device(next_s);
    Ok(ProdigySums { dot, s_l1 })
}

/// `update::prodigy_apply` as tensor ops: the updated parameter.
fn prodigy_apply_on_device(
    param: &Tensor,
    grad: &Tensor,
    [exp_avg, exp_avg_sq]: [&mut Moment; 2],
    hyper: &ProdigyApply,
) -> candle_core::Result<Tensor> {
    let direction = if hyper.momentum {
        exp_avg.on_device(param)?
    } else if hyper.l2_decay != 0.0 {
        (grad + param.affine(hyper.l2_decay, 0.0)?)?
    } else {
        grad.clone()
    };
    let denominator = exp_avg_sq
        .on_device(param)?
        .sqrt()?
        .affine(1.0, hyper.d_eps)?;
    let param = if hyper.decay_coefficient != 0.0 {
        (param + param.affine(hyper.decay_coefficient, 0.0)?)?
    } else {
        param.clone()
    };
    &param + direction.affine(hyper.step_value, 0.0)?.div(&denominator)?
}

/// PyTorch's `lerp` with a scalar weight as tensor ops (`update::lerp`'s two forms).
fn lerp_on_device(from: &Tensor, to: &Tensor, weight: f64) -> candle_core::Result<Tensor> {
    let difference = (to - from)?;
    if weight.abs() < 0.5 {
        from + difference.affine(weight, 0.0)?
    } else {
        to - difference.affine(1.0 - weight, 0.0)?
    }
}

/// `update::schedule_free_update` as tensor ops: the updated y.
fn schedule_free_on_device(
    y: &Tensor,
    grad: &Tensor,
    z: &mut Moment,
    exp_avg_sq: &mut Moment,
    step: &ScheduleFreeStep,
) -> candle_core::Result<Tensor> {
    let grad = match step.adam {
        Some((beta2, eps, bias_correction2)) => {
            let next = (exp_avg_sq.on_device(y)?.affine(beta2, 0.0)?
                + grad.affine(1.0 - beta2, 0.0)?.mul(grad)?)?;
            // True divisions, as the host kernel (and the library) do.
            let denominator = next
                .broadcast_div(&scalar_like(bias_correction2, y)?)?
                .sqrt()?
                .affine(1.0, eps)?;
            *exp_avg_sq = Moment::Device(next);
            grad.div(&denominator)?
        }
        None => grad.clone(),
    };
    let grad = if step.weight_decay != 0.0 {
        (grad + y.affine(step.weight_decay, 0.0)?)?
    } else {
        grad
    };
    let z_now = z.on_device(y)?;
    let y_next = (lerp_on_device(y, &z_now, step.ckp1)? + grad.affine(step.y_coefficient, 0.0)?)?;
    *z = Moment::Device((z_now - grad.affine(step.lr, 0.0)?)?);
    Ok(y_next)
}

/// Scalars the device update divides by, made on the device once per step rather than once
/// per parameter.
#[derive(Default)]
struct DeviceScalars {
    bias_correction2_sqrt: Option<Tensor>,
}

impl DeviceScalars {
    fn bias_correction2_sqrt(&mut self, value: f64, like: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias_correction2_sqrt {
            Some(scalar) if scalar.device().same_device(like.device()) => Ok(scalar.clone()),
            _ => {
                let scalar = Tensor::new(value as f32, like.device())?.to_dtype(like.dtype())?;
                self.bias_correction2_sqrt = Some(scalar.clone());
                Ok(scalar)
            }
        }
    }
}

/// One parameter's update as stock candle ops on its device, its state kept there. The f32
/// operations are those of the host kernels (`update.rs`), in the same order, with the same
/// scalars: on the CPU both give the same bits.
fn update_on_device(
    var: &Var,
    grad: &Tensor,
    state: &mut ParamState,
    rule: &StepRule,
    scalars: &mut DeviceScalars,
) -> candle_core::Result<()> {
    let param = var.as_tensor().detach();
    let updated = match (rule, state) {
        (StepRule::Sgd { hyper, first }, ParamState::Sgd { buffer }) => {
            sgd_on_device(&param, grad, buffer, hyper, *first)?
        }
        (
            StepRule::Adam(hyper),
            ParamState::Adam {
                exp_avg,
                exp_avg_sq,
            },
        ) => adam_on_device(&param, grad, [exp_avg, exp_avg_sq], hyper, scalars)?,
        _ => unreachable!("state is created from the same spec"),
    };
    var.set(&updated)
}

/// `update::sgd_update` as tensor ops: the updated parameter.
fn sgd_on_device(
    param: &Tensor,
    grad: &Tensor,
    buffer: &mut Moment,
    hyper: &SgdStep,
    first: bool,
) -> candle_core::Result<Tensor> {
    let grad = if hyper.weight_decay != 0.0 {
        (grad + param.affine(hyper.weight_decay, 0.0)?)?
    } else {
        grad.clone()
    };
    let direction = if hyper.momentum == 0.0 {
        // Like PyTorch, a step without momentum neither reads nor writes the buffer.
        grad
    } else {
        let next = match &*buffer {
            Moment::Zeros => grad.clone(),
            _ if first => grad.clone(),
            previous => (previous.on_device(param)?.affine(hyper.momentum, 0.0)? + &grad)?,
        };
        *buffer = Moment::Device(next.clone());
        if hyper.nesterov {
            (&grad + next.affine(hyper.momentum, 0.0)?)?
        } else {
            next
        }
    };
    param - direction.affine(hyper.lr, 0.0)?
}

/// `update::adam_update` as tensor ops: the updated parameter.
fn adam_on_device(
    param: &Tensor,
    grad: &Tensor,
    [exp_avg, exp_avg_sq]: [&mut Moment; 2],
    hyper: &AdamStep,
    scalars: &mut DeviceScalars,
) -> candle_core::Result<Tensor> {
    let c = hyper.coefficients();
    let decay = hyper.weight_decay != 0.0;
    let param = if decay && hyper.decoupled {
        param.affine(c.decay_factor, 0.0)?
    } else {
        param.clone()
    };
    let grad = if decay && !hyper.decoupled {
        (grad + param.affine(hyper.weight_decay, 0.0)?)?
    } else {
        grad.clone()
    };
    let previous = exp_avg.on_device(&param)?;
    let lerp_from = if c.lerp_from_exp_avg {
        &previous
    } else {
        &grad
    };
    let first_moment = (lerp_from + (&grad - &previous)?.affine(c.lerp_coefficient, 0.0)?)?;
    let second_moment = (exp_avg_sq.on_device(&param)?.affine(hyper.beta2, 0.0)?
        + grad.affine(c.one_minus_beta2, 0.0)?.mul(&grad)?)?;
    // A true division, as the host kernel does (`affine` would multiply by the reciprocal).
    let denominator = second_moment
        .sqrt()?
        .broadcast_div(&scalars.bias_correction2_sqrt(c.bias_correction2_sqrt, &param)?)?
        .affine(1.0, hyper.eps)?;
    let updated = (&param - first_moment.affine(c.step_size, 0.0)?.div(&denominator)?)?;
    *exp_avg = Moment::Device(first_moment);
    *exp_avg_sq = Moment::Device(second_moment);
    Ok(updated)
}

/// A fused update whose gradient is a host slice.
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
        hyper: &'a SgdStep,
        first: bool,
        buffer: RefCell<&'a mut Vec<f32>>,
    },
    Adam {
        hyper: &'a AdamStep,
        exp_avg: RefCell<&'a mut Vec<f32>>,
        exp_avg_sq: RefCell<&'a mut Vec<f32>>,
    },
    /// Prodigy's first pass (reads the parameter, leaves it as it is).
    ProdigyAccumulate {
        hyper: &'a ProdigyAccumulate,
        p0: RefCell<&'a mut Vec<f32>>,
        s: RefCell<&'a mut Vec<f32>>,
        exp_avg: RefCell<&'a mut Vec<f32>>,
        exp_avg_sq: RefCell<&'a mut Vec<f32>>,
        sums: Cell<ProdigySums>,
    },
    ProdigyApply {
        hyper: &'a ProdigyApply,
        exp_avg: RefCell<&'a mut Vec<f32>>,
        exp_avg_sq: RefCell<&'a mut Vec<f32>>,
    },
    ScheduleFree {
        hyper: &'a ScheduleFreeStep,
        z: RefCell<&'a mut Vec<f32>>,
        /// Empty for SGD.
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
            FusedUpdate::ProdigyAccumulate {
                hyper,
                p0,
                s,
                exp_avg,
                exp_avg_sq,
                sums,
            } => {
                let (p0, mut s) = (p0.borrow(), s.borrow_mut());
                let (mut exp_avg, mut exp_avg_sq) = (exp_avg.borrow_mut(), exp_avg_sq.borrow_mut());
                // Chunks of a fixed size whatever the pool, so that the sums round alike.
                let chunk = UPDATE_CHUNK;
                let partial: Vec<ProdigySums> = param
                    .par_chunks(chunk)
                    .zip(grad.par_chunks(chunk))
                    .zip(p0.par_chunks(chunk))
                    .zip(exp_avg.par_chunks_mut(chunk))
                    .zip(exp_avg_sq.par_chunks_mut(chunk))
                    .zip(s.par_chunks_mut(chunk))
                    .map(|(((((param, grad), p0), exp_avg), exp_avg_sq), s)| {
                        prodigy_accumulate(param, grad, p0, exp_avg, exp_avg_sq, s, hyper)
                    })
                    .collect();
                // Added in chunk order, so the split decides the sums' rounding, not the pool.
                sums.set(
                    partial
                        .into_iter()
                        .fold(ProdigySums::default(), |a, b| a + b),
                );
            }
            FusedUpdate::ProdigyApply {
                hyper,
                exp_avg,
                exp_avg_sq,
            } => {
                let (exp_avg, exp_avg_sq) = (exp_avg.borrow(), exp_avg_sq.borrow());
                param
                    .par_chunks_mut(chunk)
                    .zip(grad.par_chunks(chunk))
                    .zip(exp_avg.par_chunks(chunk))
                    .zip(exp_avg_sq.par_chunks(chunk))
                    .for_each(|(((param, grad), exp_avg), exp_avg_sq)| {
                        prodigy_apply(param, grad, exp_avg, exp_avg_sq, hyper)
                    });
            }
            FusedUpdate::ScheduleFree {
                hyper,
                z,
                exp_avg_sq,
            } => {
                let (mut z, mut exp_avg_sq) = (z.borrow_mut(), exp_avg_sq.borrow_mut());
                if exp_avg_sq.is_empty() {
                    // SGD: no second moment to split.
                    return param
                        .par_chunks_mut(chunk)
                        .zip(grad.par_chunks(chunk))
                        .zip(z.par_chunks_mut(chunk))
                        .for_each(|((param, grad), z)| {
                            schedule_free_update(param, grad, z, &mut [], hyper)
                        });
                }
                param
                    .par_chunks_mut(chunk)
                    .zip(grad.par_chunks(chunk))
                    .zip(z.par_chunks_mut(chunk))
                    .zip(exp_avg_sq.par_chunks_mut(chunk))
                    .for_each(|(((param, grad), z), exp_avg_sq)| {
                        schedule_free_update(param, grad, z, exp_avg_sq, hyper)
                    });
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod challengers;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rng::Rng;
    use candle_core::Device;

    /// The two steps under test: candle's (tensor ops, gradients from autograd) and the
    /// native backend's (gradients in host memory, fused in place).
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Path {
        Candle,
        Host,
    }

    pub(crate) fn step(
        optimizer: &mut Optimizer,
        path: Path,
        vars: &[Var],
        loss: &Tensor,
        lr: f64,
        momentum: f64,
    ) {
        let grads = loss.backward().unwrap();
        match path {
            Path::Candle => optimizer.step(&grads, lr, momentum).unwrap(),
            Path::Host => {
                let host: Vec<Vec<f32>> = vars
                    .iter()
                    .map(|var| {
                        let grad = grads.get(var.as_tensor()).unwrap();
                        grad.flatten_all().unwrap().to_vec1().unwrap()
                    })
                    .collect();
                optimizer.step_host(&host, lr, momentum).unwrap()
            }
        }
    }

    struct Trace {
        spec: OptimizerSpec,
        lrs: Vec<f64>,
        momenta: Option<Vec<f64>>,
        initial: Vec<f32>,
        target: Vec<f32>,
        /// PyTorch's float64 parameters after each step.
        after_each_step: Vec<Vec<f64>>,
    }

    /// tests/golden/optimizers.json (PyTorch's SGD, Adam and AdamW on the quadratic
    /// sum_i c_i (w_i - target_i)^2, c = [1, 2, 3, 4]), with absent options at PyTorch's
    /// defaults.
    fn golden_traces() -> Vec<Trace> {
        let text = include_str!("../../tests/golden/optimizers.json");
        let golden: serde_json::Value = serde_json::from_str(text).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let singles = |v: &serde_json::Value| floats(v).iter().map(|&x| x as f32).collect();
        let traces = golden["traces"].as_array().unwrap();
        assert_eq!(traces.len(), 8);
        traces
            .iter()
            .map(|trace| {
                let options = &trace["options"];
                let option = |name: &str, default: f64| options[name].as_f64().unwrap_or(default);
                let betas = options["betas"].as_array().map_or([0.9, 0.999], |b| {
                    [b[0].as_f64().unwrap(), b[1].as_f64().unwrap()]
                });
                let spec = match trace["optimizer"].as_str().unwrap() {
                    "sgd" => OptimizerSpec::Sgd {
                        momentum: option("momentum", 0.0),
                        nesterov: options["nesterov"].as_bool().unwrap_or(false),
                        weight_decay: option("weight_decay", 0.0),
                    },
                    "adam" => OptimizerSpec::Adam {
                        betas,
                        eps: option("eps", 1e-8),
                        weight_decay: option("weight_decay", 0.0),
                    },
                    "adamw" => OptimizerSpec::Adamw {
                        betas,
                        eps: option("eps", 1e-8),
                        weight_decay: option("weight_decay", 0.01),
                    },
                    other => panic!("unknown optimizer {other} in the golden file"),
                };
                Trace {
                    spec,
                    lrs: floats(&trace["lr"]),
                    momenta: trace["momentum_or_beta1"]
                        .as_array()
                        .map(|_| floats(&trace["momentum_or_beta1"])),
                    initial: singles(&trace["initial"]),
                    target: singles(&trace["target"]),
                    after_each_step: trace["params_after_each_step"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(floats)
                        .collect(),
                }
            })
            .collect()
    }

    /// The trace's steps in f32 through candle's autograd: the parameters after each step.
    fn run(trace: &Trace, path: Path) -> Vec<Vec<f32>> {
        let device = Device::Cpu;
        let w = Var::new(trace.initial.as_slice(), &device).unwrap();
        let target = Tensor::new(trace.target.as_slice(), &device).unwrap();
        let weights = Tensor::new(&[1.0f32, 2.0, 3.0, 4.0], &device).unwrap();
        let vars = [w.clone()];
        let mut optimizer = Optimizer::new(&trace.spec, &vars);
        let mut after_each_step = Vec::new();
        for (index, &lr) in trace.lrs.iter().enumerate() {
            let loss = (w.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .mul(&weights)
                .unwrap()
                .sum_all()
                .unwrap();
            let momentum = trace
                .momenta
                .as_ref()
                .map_or(trace.spec.momentum(), |m| m[index]);
            step(&mut optimizer, path, &vars, &loss, lr, momentum);
            after_each_step.push(w.as_tensor().to_vec1().unwrap());
        }
        after_each_step
    }

    #[test]
    fn both_steps_match_pytorch_on_every_golden_trace() {
        for (index, trace) in golden_traces().iter().enumerate() {
            for path in [Path::Candle, Path::Host] {
                let got = run(trace, path);
                for (step, (got, want)) in got.iter().zip(&trace.after_each_step).enumerate() {
                    for (g, w) in got.iter().zip(want) {
                        // f32 against PyTorch's f64, as update.rs's f32 test allows.
                        let error = (*g as f64 - w).abs() / w.abs().max(1e-3);
                        assert!(
                            error < 1e-5,
                            "trace {index} {path:?} step {step}: got {got:?}, PyTorch {want:?}"
                        );
                    }
                }
            }
        }
    }

    /// A two-layer network's weights and a batch of regression data.
    fn network(device: &Device) -> (Vec<Var>, Tensor, Tensor) {
        let mut rng = Rng::new(3);
        let mut var = |shape: &[usize]| {
            let count = shape.iter().product();
            let values: Vec<f32> = (0..count).map(|_| rng.normal() as f32 * 0.5).collect();
            Var::from_tensor(&Tensor::from_vec(values, shape, device).unwrap()).unwrap()
        };
        let vars = vec![var(&[16, 6]), var(&[16]), var(&[3, 16]), var(&[3])];
        let x = var(&[32, 6]).as_tensor().detach();
        let y = var(&[32, 3]).as_tensor().detach();
        (vars, x, y)
    }

    fn network_loss(vars: &[Var], x: &Tensor, y: &Tensor) -> Tensor {
        let hidden = x
            .matmul(&vars[0].as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(vars[1].as_tensor())
            .unwrap()
            .tanh()
            .unwrap();
        let output = hidden
            .matmul(&vars[2].as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(vars[3].as_tensor())
            .unwrap();
        (output - y).unwrap().sqr().unwrap().mean_all().unwrap()
    }

    fn train(spec: &OptimizerSpec, path: Path, device: &Device) -> Vec<Vec<f32>> {
        let (vars, x, y) = network(device);
        let mut optimizer = Optimizer::new(spec, &vars);
        // A schedule's changing learning rate and momentum / beta1.
        let schedule = [
            (0.05, 0.95),
            (0.1, 0.9),
            (0.2, 0.85),
            (0.1, 0.9),
            (0.02, 0.95),
        ];
        for (lr, momentum) in schedule {
            let loss = network_loss(&vars, &x, &y);
            step(&mut optimizer, path, &vars, &loss, lr, momentum);
        }
        vars.iter()
            .map(|var| var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    fn specs() -> [OptimizerSpec; 4] {
        [
            OptimizerSpec::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.01,
            },
            OptimizerSpec::Sgd {
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            },
            OptimizerSpec::Adam {
                betas: [0.9, 0.999],
                eps: 1e-8,
                weight_decay: 0.01,
            },
            OptimizerSpec::Adamw {
                betas: [0.9, 0.99],
                eps: 1e-6,
                weight_decay: 0.1,
            },
        ]
    }

    #[test]
    fn the_candle_step_trains_a_network_as_the_host_step_does() {
        // The same bits on the CPU (checked once); 1e-6 leaves room for a device whose kernels
        // fuse a multiply and an add.
        for spec in specs() {
            let candle = train(&spec, Path::Candle, &Device::Cpu);
            let host = train(&spec, Path::Host, &Device::Cpu);
            for (c, h) in candle.iter().flatten().zip(host.iter().flatten()) {
                assert!(
                    (c - h).abs() <= 1e-6 * h.abs().max(1e-3),
                    "{spec:?}: candle step {c}, host step {h}"
                );
            }
        }
    }

    #[test]
    fn the_candle_step_keeps_its_state_on_the_device() {
        // No weight decay: the moments then depend on the gradients alone, which the twin
        // below takes from the same loss after the parameters have moved.
        let spec = &OptimizerSpec::Adam {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let (vars, x, y) = network(&Device::Cpu);
        let mut optimizer = Optimizer::new(spec, &vars);
        let loss = network_loss(&vars, &x, &y);
        step(&mut optimizer, Path::Candle, &vars, &loss, 0.1, 0.9);
        for param in &optimizer.state().params {
            let ParamState::Adam {
                exp_avg,
                exp_avg_sq,
            } = param
            else {
                panic!("Adam's state");
            };
            assert!(matches!(exp_avg, Moment::Device(_)), "{exp_avg:?}");
            assert!(matches!(exp_avg_sq, Moment::Device(_)), "{exp_avg_sq:?}");
        }
        // The native step carries on from there, to the same bits as the candle step.
        let mut twin = Optimizer::new(spec, &vars);
        twin.restore(optimizer.state());
        let grads = network_loss(&vars, &x, &y).backward().unwrap();
        let host_grads: Vec<Vec<f32>> = vars
            .iter()
            .map(|var| {
                let grad = grads.get(var.as_tensor()).unwrap();
                grad.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect();
        optimizer.step(&grads, 0.1, 0.9).unwrap();
        twin.step_host(&host_grads, 0.1, 0.9).unwrap();
        assert_eq!(twin.state(), optimizer.state());
    }

    #[test]
    fn restoring_the_state_replays_the_same_steps() {
        for path in [Path::Candle, Path::Host] {
            let spec = &specs()[2];
            let (vars, x, y) = network(&Device::Cpu);
            let mut optimizer = Optimizer::new(spec, &vars);
            let loss = network_loss(&vars, &x, &y);
            step(&mut optimizer, path, &vars, &loss, 0.1, 0.9);
            let saved = optimizer.state().clone();
            let loss = network_loss(&vars, &x, &y);
            step(&mut optimizer, path, &vars, &loss, 0.1, 0.9);
            assert_ne!(optimizer.state(), &saved, "{path:?}");
            optimizer.restore(&saved);
            assert_eq!(optimizer.state(), &saved, "{path:?}");
        }
    }
}
