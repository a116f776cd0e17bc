//! Optimizer update kernels on plain slices with PyTorch's exact update rules: SGD (momentum,
//! nesterov, L2 weight decay), Adam and AdamW. Hyper-parameters are passed every step because a
//! schedule drives the learning rate and the momentum / beta1; each kernel is one fused pass.

use std::ops::{Add, Div, Mul, Sub};

use super::simd::dispatch;

/// The float types the kernels run on: f32 for training, f64 for checking against references.
pub trait Real:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn from_f64(value: f64) -> Self {
        value
    }
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// SGD's hyper-parameters for one step (dampening is always 0, PyTorch's default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

/// Adam's and AdamW's hyper-parameters for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: decay the weights directly instead of adding `weight_decay * param` to the gradient.
    pub decoupled: bool,
    /// 1-based count of steps taken including this one.
    pub step: u64,
}

/// PyTorch SGD with dampening 0: g = grad + wd * p; if momentum != 0 { buf = first ? g : momentum * buf + g;
/// g = nesterov ? g + momentum * buf : buf }; p -= lr * g.
/// `momentum_buffer` has the parameter's length; `first` is true on the first step (buffer not yet initialised).
/// Like PyTorch, a step with momentum 0 neither reads nor writes the buffer, so `first` stays true
/// until the first step that has momentum.
pub fn sgd_update<T: Real>(
    param: &mut [T],
    grad: &[T],
    momentum_buffer: &mut [T],
    first: bool,
    h: &SgdStep,
) {
    assert_eq!(
        param.len(),
        grad.len(),
        "gradient length differs from the parameter's"
    );
    let scalars = SgdScalars {
        lr: T::from_f64(h.lr),
        momentum: T::from_f64(h.momentum),
        weight_decay: T::from_f64(h.weight_decay),
    };
    // PyTorch skips the decay term entirely when it is 0, which matters only for non-finite weights,
    // but costs nothing here: every branch below is resolved at compile time inside the loop.
    let decay = h.weight_decay != 0.0;
    dispatch(SgdKernel {
        param,
        grad,
        momentum_buffer,
        first,
        h,
        scalars,
        decay,
    })
}

/// `sgd_update`'s loop, run compiled for the CPU's instruction set (`simd::dispatch`).
struct SgdKernel<'a, T> {
    param: &'a mut [T],
    grad: &'a [T],
    momentum_buffer: &'a mut [T],
    first: bool,
    h: &'a SgdStep,
    scalars: SgdScalars<T>,
    decay: bool,
}

impl<T: Real> pulp::WithSimd for SgdKernel<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let SgdKernel {
            param,
            grad,
            momentum_buffer,
            first,
            h,
            scalars,
            decay,
        } = self;
        sgd_dispatched(param, grad, momentum_buffer, first, h, scalars, decay);
    }
}

#[inline(always)]
fn sgd_dispatched<T: Real>(
    param: &mut [T],
    grad: &[T],
    momentum_buffer: &mut [T],
    first: bool,
    h: &SgdStep,
    scalars: SgdScalars<T>,
    decay: bool,
) {
    if h.momentum == 0.0 {
        match decay {
            true => sgd_plain_kernel::<T, true>(param, grad, scalars),
            false => sgd_plain_kernel::<T, false>(param, grad, scalars),
        }
        return;
    }
    assert_eq!(
        param.len(),
        momentum_buffer.len(),
        "momentum buffer length differs from the parameter's"
    );
    let buffer = momentum_buffer;
    match (decay, h.nesterov, first) {
        (false, false, false) => sgd_kernel::<T, false, false, false>(param, grad, buffer, scalars),
        (false, false, true) => sgd_kernel::<T, false, false, true>(param, grad, buffer, scalars),
        (false, true, false) => sgd_kernel::<T, false, true, false>(param, grad, buffer, scalars),
        (false, true, true) => sgd_kernel::<T, false, true, true>(param, grad, buffer, scalars),
        (true, false, false) => sgd_kernel::<T, true, false, false>(param, grad, buffer, scalars),
        (true, false, true) => sgd_kernel::<T, true, false, true>(param, grad, buffer, scalars),
        (true, true, false) => sgd_kernel::<T, true, true, false>(param, grad, buffer, scalars),
        (true, true, true) => sgd_kernel::<T, true, true, true>(param, grad, buffer, scalars),
    }
}

#[derive(Clone, Copy)]
struct SgdScalars<T> {
    lr: T,
    momentum: T,
    weight_decay: T,
}

#[inline(always)]
fn sgd_plain_kernel<T: Real, const DECAY: bool>(param: &mut [T], grad: &[T], s: SgdScalars<T>) {
    for (p, &g) in param.iter_mut().zip(grad) {
        let g = if DECAY { g + s.weight_decay * *p } else { g };
        *p = *p - s.lr * g;
    }
}

#[inline(always)]
fn sgd_kernel<T: Real, const DECAY: bool, const NESTEROV: bool, const FIRST: bool>(
    param: &mut [T],
    grad: &[T],
    buffer: &mut [T],
    s: SgdScalars<T>,
) {
    for ((p, &g), b) in param.iter_mut().zip(grad).zip(buffer.iter_mut()) {
        let g = if DECAY { g + s.weight_decay * *p } else { g };
        *b = if FIRST { g } else { *b * s.momentum + g };
        let direction = if NESTEROV { g + s.momentum * *b } else { *b };
        *p = *p - s.lr * direction;
    }
}

/// A step's scalars as PyTorch computes them, in f64 before they meet the f32 tensors; shared
/// by the host kernel and the candle tensor-op update so that both round alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamCoefficients {
    /// `exp_avg.lerp_(grad, 1 - beta1)` is `from + lerp_coefficient * (grad - exp_avg)`, from
    /// `exp_avg` when true, else from `grad` (PyTorch's lerp starts from whichever end is
    /// nearer the weight, for accuracy).
    pub lerp_from_exp_avg: bool,
    pub lerp_coefficient: f64,
    pub one_minus_beta2: f64,
    pub bias_correction2_sqrt: f64,
    /// `lr / bias_correction1`.
    pub step_size: f64,
    /// AdamW's `1 - lr * weight_decay`.
    pub decay_factor: f64,
}

impl AdamStep {
    pub fn coefficients(&self) -> AdamCoefficients {
        assert!(self.step >= 1, "Adam's step count is 1-based");
        let step = self.step as f64;
        let bias_correction1 = 1.0 - self.beta1.powf(step);
        let bias_correction2 = 1.0 - self.beta2.powf(step);
        let lerp_weight = 1.0 - self.beta1;
        let lerp_from_exp_avg = lerp_weight.abs() < 0.5;
        AdamCoefficients {
            lerp_from_exp_avg,
            lerp_coefficient: if lerp_from_exp_avg {
                lerp_weight
            } else {
                lerp_weight - 1.0
            },
            one_minus_beta2: 1.0 - self.beta2,
            bias_correction2_sqrt: bias_correction2.sqrt(),
            step_size: self.lr / bias_correction1,
            decay_factor: 1.0 - self.lr * self.weight_decay,
        }
    }
}

/// PyTorch Adam (decoupled=false: g += wd * p) and AdamW (decoupled=true: p *= 1 - lr * wd first), bias-corrected
/// with the beta1 in force this step, like PyTorch. `exp_avg` and `exp_avg_sq` start as zeros.
pub fn adam_update<T: Real>(
    param: &mut [T],
    grad: &[T],
    exp_avg: &mut [T],
    exp_avg_sq: &mut [T],
    h: &AdamStep,
) {
    let len = param.len();
    assert!(
        grad.len() == len && exp_avg.len() == len && exp_avg_sq.len() == len,
        "gradient or moment length differs from the parameter's"
    );
    let c = h.coefficients();
    let scalars = AdamScalars {
        lerp_coefficient: T::from_f64(c.lerp_coefficient),
        lerp_from_exp_avg: c.lerp_from_exp_avg,
        beta2: T::from_f64(h.beta2),
        one_minus_beta2: T::from_f64(c.one_minus_beta2),
        bias_correction2_sqrt: T::from_f64(c.bias_correction2_sqrt),
        eps: T::from_f64(h.eps),
        step_size: T::from_f64(c.step_size),
        weight_decay: T::from_f64(h.weight_decay),
        decay_factor: T::from_f64(c.decay_factor),
    };
    dispatch(AdamKernel {
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        scalars,
        l2_decay: h.weight_decay != 0.0 && !h.decoupled,
        decoupled_decay: h.weight_decay != 0.0 && h.decoupled,
    })
}

#[derive(Clone, Copy)]
struct AdamScalars<T> {
    lerp_coefficient: T,
    lerp_from_exp_avg: bool,
    beta2: T,
    one_minus_beta2: T,
    bias_correction2_sqrt: T,
    eps: T,
    step_size: T,
    weight_decay: T,
    decay_factor: T,
}

/// `adam_update`'s loop, run compiled for the CPU's instruction set (`simd::dispatch`).
struct AdamKernel<'a, T> {
    param: &'a mut [T],
    grad: &'a [T],
    exp_avg: &'a mut [T],
    exp_avg_sq: &'a mut [T],
    scalars: AdamScalars<T>,
    l2_decay: bool,
    decoupled_decay: bool,
}

impl<T: Real> pulp::WithSimd for AdamKernel<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let AdamKernel {
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            scalars,
            l2_decay,
            decoupled_decay,
        } = self;
        match (l2_decay, decoupled_decay) {
            (false, false) => {
                adam_kernel::<T, false, false>(param, grad, exp_avg, exp_avg_sq, scalars)
            }
            (true, _) => adam_kernel::<T, true, false>(param, grad, exp_avg, exp_avg_sq, scalars),
            (false, true) => {
                adam_kernel::<T, false, true>(param, grad, exp_avg, exp_avg_sq, scalars)
            }
        }
    }
}

#[inline(always)]
fn adam_kernel<T: Real, const L2_DECAY: bool, const DECOUPLED_DECAY: bool>(
    param: &mut [T],
    grad: &[T],
    exp_avg: &mut [T],
    exp_avg_sq: &mut [T],
    s: AdamScalars<T>,
) {
    let moments = exp_avg.iter_mut().zip(exp_avg_sq.iter_mut());
    for ((p, &g), (m, v)) in param.iter_mut().zip(grad).zip(moments) {
        if DECOUPLED_DECAY {
            *p = *p * s.decay_factor;
        }
        let g = if L2_DECAY { g + s.weight_decay * *p } else { g };
        let lerp_from = if s.lerp_from_exp_avg { *m } else { g };
        *m = lerp_from + s.lerp_coefficient * (g - *m);
        *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
        let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
        *p = *p - s.step_size * *m / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const GOLDEN: &str = include_str!("../../tests/golden/optimizers.json");
    /// The golden loss is sum_i c_i (w_i - target_i)^2.
    const LOSS_WEIGHTS: [f64; 4] = [1.0, 2.0, 3.0, 4.0];

    #[derive(Deserialize)]
    struct Golden {
        traces: Vec<Trace>,
    }

    #[derive(Deserialize)]
    struct Trace {
        optimizer: String,
        options: Options,
        lr: Vec<f64>,
        momentum_or_beta1: Option<Vec<f64>>,
        initial: Vec<f64>,
        target: Vec<f64>,
        params_after_each_step: Vec<Vec<f64>>,
    }

    /// PyTorch's constructor arguments; absent ones take PyTorch's defaults in `run_trace`.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Options {
        momentum: Option<f64>,
        nesterov: Option<bool>,
        weight_decay: Option<f64>,
        betas: Option<(f64, f64)>,
        eps: Option<f64>,
    }

    fn golden_traces() -> Vec<Trace> {
        let golden: Golden = serde_json::from_str(GOLDEN).expect("golden file parses");
        assert_eq!(golden.traces.len(), 8);
        golden.traces
    }

    /// Runs the trace's steps on the quadratic in `T`, returning the parameters after each step.
    fn run_trace<T: Real>(trace: &Trace) -> Vec<Vec<f64>> {
        let to_t = |values: &[f64]| values.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>();
        let mut param = to_t(&trace.initial);
        let target = to_t(&trace.target);
        let loss_weights = to_t(&LOSS_WEIGHTS);
        let mut first_state = vec![T::from_f64(0.0); param.len()];
        let mut second_state = vec![T::from_f64(0.0); param.len()];
        let options = &trace.options;
        let mut after_each_step = Vec::new();
        for (index, &lr) in trace.lr.iter().enumerate() {
            let scheduled = trace.momentum_or_beta1.as_ref().map(|values| values[index]);
            let grad: Vec<T> = param
                .iter()
                .zip(&target)
                .zip(&loss_weights)
                .map(|((&w, &t), &c)| T::from_f64(2.0) * c * (w - t))
                .collect();
            match trace.optimizer.as_str() {
                "sgd" => {
                    let step = SgdStep {
                        lr,
                        momentum: scheduled.or(options.momentum).unwrap_or(0.0),
                        nesterov: options.nesterov.unwrap_or(false),
                        weight_decay: options.weight_decay.unwrap_or(0.0),
                    };
                    sgd_update(&mut param, &grad, &mut first_state, index == 0, &step);
                }
                name @ ("adam" | "adamw") => {
                    let decoupled = name == "adamw";
                    let (beta1, beta2) = options.betas.unwrap_or((0.9, 0.999));
                    let default_decay = if decoupled { 0.01 } else { 0.0 };
                    let step = AdamStep {
                        lr,
                        beta1: scheduled.unwrap_or(beta1),
                        beta2,
                        eps: options.eps.unwrap_or(1e-8),
                        weight_decay: options.weight_decay.unwrap_or(default_decay),
                        decoupled,
                        step: index as u64 + 1,
                    };
                    adam_update(
                        &mut param,
                        &grad,
                        &mut first_state,
                        &mut second_state,
                        &step,
                    );
                }
                other => panic!("unknown optimizer {other} in the golden file"),
            }
            after_each_step.push(param.iter().map(|p| p.to_f64()).collect());
        }
        after_each_step
    }

    fn assert_trace_matches(trace: &Trace, actual: &[Vec<f64>], relative: f64, floor: f64) {
        let name = format!(
            "{} {:?}",
            trace.optimizer,
            trace.momentum_or_beta1.is_some()
        );
        assert_eq!(actual.len(), trace.params_after_each_step.len(), "{name}");
        for (step, (got, expected)) in actual.iter().zip(&trace.params_after_each_step).enumerate()
        {
            for (index, (&got, &expected)) in got.iter().zip(expected).enumerate() {
                let tolerance = relative * expected.abs().max(floor);
                assert!(
                    (got - expected).abs() <= tolerance,
                    "{name}: param {index} after step {step}: got {got:e}, PyTorch gives {expected:e}"
                );
            }
        }
    }

    #[test]
    fn every_golden_trace_matches_pytorch_in_f64() {
        for trace in golden_traces() {
            let actual = run_trace::<f64>(&trace);
            assert_trace_matches(&trace, &actual, 1e-6, 1e-12);
        }
    }

    #[test]
    fn every_golden_trace_matches_pytorch_in_f32() {
        // f32 keeps about 7 digits and six steps' rounding adds up (the worst seen is 1.5e-6), so
        // allow 1e-5 relative, and an absolute 1e-8 for parameters that pass near zero.
        for trace in golden_traces() {
            let actual = run_trace::<f32>(&trace);
            assert_trace_matches(&trace, &actual, 1e-5, 1e-3);
        }
    }

    #[test]
    fn sgd_without_momentum_leaves_the_buffer_alone() {
        let mut param = [1.0_f64, -2.0];
        let mut buffer = [7.0, 7.0];
        let step = SgdStep {
            lr: 0.5,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.1,
        };
        sgd_update(&mut param, &[0.2, 0.4], &mut buffer, true, &step);
        // p - lr * (g + wd * p)
        assert_eq!(
            param,
            [
                1.0 - 0.5 * (0.2 + 0.1 * 1.0),
                -2.0 - 0.5 * (0.4 + 0.1 * -2.0)
            ]
        );
        assert_eq!(buffer, [7.0, 7.0]);
    }

    #[test]
    fn sgd_momentum_buffer_starts_as_the_gradient_then_accumulates() {
        let mut param = [0.0_f64];
        let mut buffer = [123.0];
        let step = SgdStep {
            lr: 1.0,
            momentum: 0.5,
            nesterov: false,
            weight_decay: 0.0,
        };
        sgd_update(&mut param, &[2.0], &mut buffer, true, &step);
        assert_eq!((param, buffer), ([-2.0], [2.0]));
        sgd_update(&mut param, &[2.0], &mut buffer, false, &step);
        assert_eq!((param, buffer), ([-5.0], [3.0]));
        let nesterov = SgdStep {
            nesterov: true,
            ..step
        };
        // buf = 0.5 * 3 + 2 = 3.5; direction = 2 + 0.5 * 3.5 = 3.75
        sgd_update(&mut param, &[2.0], &mut buffer, false, &nesterov);
        assert_eq!((param, buffer), ([-8.75], [3.5]));
    }

    #[test]
    fn adam_first_step_moves_each_weight_by_about_lr() {
        // After one step m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps).
        let mut param = [1.0_f64, 1.0, 1.0];
        let grad = [0.5, -3.0, 1e3];
        let mut exp_avg = [0.0; 3];
        let mut exp_avg_sq = [0.0; 3];
        let step = AdamStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            step: 1,
        };
        adam_update(&mut param, &grad, &mut exp_avg, &mut exp_avg_sq, &step);
        for (p, g) in param.iter().zip(grad) {
            let expected = 1.0 - 0.01 * g.signum();
            assert!((p - expected).abs() < 1e-9, "{p} vs {expected}");
        }
    }

    #[test]
    fn adamw_decays_the_weight_before_the_adam_step() {
        // With a zero gradient the moments stay 0 and only the decoupled decay acts.
        let mut param = [2.0_f32];
        let step = AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
            decoupled: true,
            step: 1,
        };
        adam_update(&mut param, &[0.0], &mut [0.0], &mut [0.0], &step);
        assert_eq!(param, [2.0 * (1.0 - 0.1 * 0.5) as f32]);
        // Coupled (Adam) decay instead feeds wd * p = 1 into the gradient: a full lr-sized step.
        let mut param = [2.0_f64];
        let coupled = AdamStep {
            decoupled: false,
            ..step
        };
        adam_update(&mut param, &[0.0], &mut [0.0], &mut [0.0], &coupled);
        assert!((param[0] - 1.9).abs() < 1e-7, "{}", param[0]);
    }

    /// Three steps of every SGD and Adam variant on 1,003 f32 weights (a tail past every
    /// vector width) at each instruction-set level this machine supports: bit for bit the
    /// scalar result.
    #[test]
    fn every_simd_level_updates_exactly_as_scalar() {
        use crate::engine::simd::{with_level, Level};
        let len = 1003;
        let start: Vec<f32> = (0..len)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let grad_at = |step: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 13 + step * 7) % 29) as f32 / 9.0 - 1.5)
                .collect()
        };
        let run = |level: Level| -> Vec<Vec<f32>> {
            with_level(level, || {
                let mut finals = Vec::new();
                for (momentum, nesterov, weight_decay) in [
                    (0.0, false, 0.0),
                    (0.0, false, 0.1),
                    (0.9, false, 0.0),
                    (0.9, true, 0.01),
                ] {
                    let (mut param, mut buffer) = (start.clone(), vec![0f32; len]);
                    for step in 0..3 {
                        let h = SgdStep {
                            lr: 0.05,
                            momentum,
                            nesterov,
                            weight_decay,
                        };
                        sgd_update(&mut param, &grad_at(step), &mut buffer, step == 0, &h);
                    }
                    finals.extend([param, buffer]);
                }
                for (weight_decay, decoupled) in [(0.0, false), (0.01, false), (0.01, true)] {
                    let mut param = start.clone();
                    let (mut m, mut v) = (vec![0f32; len], vec![0f32; len]);
                    for step in 0..3 {
                        let h = AdamStep {
                            lr: 1e-3,
                            beta1: 0.9,
                            beta2: 0.999,
                            eps: 1e-8,
                            weight_decay,
                            decoupled,
                            step: step as u64 + 1,
                        };
                        adam_update(&mut param, &grad_at(step), &mut m, &mut v, &h);
                    }
                    finals.extend([param, m, v]);
                }
                finals
            })
        };
        let scalar = run(Level::Scalar);
        for level in Level::supported_levels() {
            let got = run(level);
            for (index, (got, want)) in got.iter().zip(&scalar).enumerate() {
                let same = got
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{level:?}: array {index} differs from the scalar update"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "gradient length differs")]
    fn a_gradient_of_the_wrong_length_is_a_bug_caught_at_once() {
        let step = SgdStep {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        sgd_update(&mut [0.0_f32; 3], &[0.0; 2], &mut [0.0; 3], true, &step);
    }
}
