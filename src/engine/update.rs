//! Optimizer update kernels on plain slices with PyTorch's exact update rules: SGD (momentum,
//! nesterov, L2 weight decay), Adam and AdamW; and those of the learning-rate-free libraries:
//! Prodigy (`prodigyopt`, two passes: the step's sums, then the update) and schedule-free
//! AdamW and SGD (`schedulefree`). Hyper-parameters are passed every step because a schedule
//! drives the learning rate and the momentum / beta1; each kernel is one fused pass.

use std::ops::{Add, Div, Mul, Sub};

use super::simd::{dispatch, simd_kernel};

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

/// Prodigy's scalars for one step's first pass, as `prodigyopt.Prodigy.step` forms them in
/// f64 before they meet the f32 tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProdigyAccumulate {
    /// 0 skips the first moment (the library keeps none then).
    pub beta1: f64,
    pub beta2: f64,
    pub beta3: f64,
    /// L2 weight decay added to the gradient (`decouple: false`), else 0.
    pub l2_decay: f64,
    /// `d * (1 - beta1)`.
    pub exp_avg_coefficient: f64,
    /// `d * d * (1 - beta2)`.
    pub exp_avg_sq_coefficient: f64,
    /// `(d / d0) * dlr`, or `(d / d0) * d` with `safeguard_warmup`.
    pub s_coefficient: f64,
}

/// The two sums Prodigy's estimate of `d` needs from one parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProdigySums {
    /// `dot(grad, p0 - p)`, in f64 (each f32 product is exact there).
    pub dot: f64,
    /// `sum |s|` after this step's update of `s`, in f64.
    pub s_l1: f64,
}

impl Add for ProdigySums {
    type Output = ProdigySums;
    fn add(self, other: ProdigySums) -> ProdigySums {
        ProdigySums {
            dot: self.dot + other.dot,
            s_l1: self.s_l1 + other.s_l1,
        }
    }
}

/// Prodigy's second-pass scalars: the step with the new `d`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProdigyApply {
    /// Whether the first moment steps (beta1 > 0); otherwise the gradient does.
    pub momentum: bool,
    /// As in the first pass (the gradient is decayed again, as the library's in-place one).
    pub l2_decay: f64,
    /// `d * eps`, with the new `d`.
    pub d_eps: f64,
    /// Decoupled decay: `-weight_decay * dlr` (0 for none).
    pub decay_coefficient: f64,
    /// `-dlr`, or `-dlr * d` when the gradient steps.
    pub step_value: f64,
}

simd_kernel! {
    /// Prodigy's first pass over one parameter: the (L2-decayed) gradient into `exp_avg`,
    /// `exp_avg_sq` and `s`, and the sums of `dot(grad, p0 - p)` and `|s|`.
    pub fn prodigy_accumulate(
        param: &[f32],
        grad: &[f32],
        p0: &[f32],
        exp_avg: &mut [f32],
        exp_avg_sq: &mut [f32],
        s: &mut [f32],
        h: &ProdigyAccumulate,
    ) -> ProdigySums {
        let len = param.len();
        assert!(
            grad.len() == len
                && p0.len() == len
                && exp_avg.len() == len
                && exp_avg_sq.len() == len
                && s.len() == len,
            "gradient or state length differs from the parameter's"
        );
        let (beta1, beta2, beta3) = (h.beta1 as f32, h.beta2 as f32, h.beta3 as f32);
        let l2 = h.l2_decay as f32;
        let (c1, c2, cs) = (
            h.exp_avg_coefficient as f32,
            h.exp_avg_sq_coefficient as f32,
            h.s_coefficient as f32,
        );
        let (decay, momentum) = (h.l2_decay != 0.0, h.beta1 > 0.0);
        let mut sums = ProdigySums::default();
        for index in 0..len {
            let p = param[index];
            let g = if decay { grad[index] + l2 * p } else { grad[index] };
            sums.dot += f64::from(g) * f64::from(p0[index] - p);
            if momentum {
                exp_avg[index] = exp_avg[index] * beta1 + c1 * g;
            }
            exp_avg_sq[index] = exp_avg_sq[index] * beta2 + c2 * g * g;
            let next = s[index] * beta3 + cs * g;
            s[index] = next;
            sums.s_l1 += f64::from(next.abs());
        }
        sums
    }
}

simd_kernel! {
    /// Prodigy's second pass over one parameter: decoupled decay, then
    /// `p += step_value * exp_avg / (sqrt(exp_avg_sq) + d * eps)` (the gradient in place of
    /// `exp_avg` without momentum).
    pub fn prodigy_apply(
        param: &mut [f32],
        grad: &[f32],
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
        h: &ProdigyApply,
    ) {
        let len = param.len();
        assert!(
            grad.len() == len && exp_avg.len() == len && exp_avg_sq.len() == len,
            "gradient or state length differs from the parameter's"
        );
        let (l2, d_eps) = (h.l2_decay as f32, h.d_eps as f32);
        let (decay, step) = (h.decay_coefficient as f32, h.step_value as f32);
        let decoupled = h.decay_coefficient != 0.0;
        for index in 0..len {
            let mut p = param[index];
            let direction = if h.momentum {
                exp_avg[index]
            } else if h.l2_decay != 0.0 {
                grad[index] + l2 * p
            } else {
                grad[index]
            };
            let denom = exp_avg_sq[index].sqrt() + d_eps;
            if decoupled {
                p += decay * p;
            }
            param[index] = p + step * direction / denom;
        }
    }
}

/// PyTorch's `lerp` with a scalar weight: from whichever end is nearer the weight.
#[inline(always)]
fn lerp(from: f32, to: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        from + weight * (to - from)
    } else {
        to - (to - from) * (1.0 - weight)
    }
}

/// A schedule-free step's scalars, as `schedulefree` forms them in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleFreeStep {
    /// The warmed-up learning rate, `lr * min(1, (k + 1) / warmup_steps)`.
    pub lr: f64,
    /// `c_{k+1}`: how far y moves toward z (the average's new weight over their sum).
    pub ckp1: f64,
    /// `lr * (beta1 * (1 - ckp1) - 1)`: the gradient's coefficient in y's update.
    pub y_coefficient: f64,
    pub weight_decay: f64,
    /// AdamW's second moment: `Some((beta2, eps, 1 - beta2^(k+1)))`; `None` for SGD.
    pub adam: Option<(f64, f64, f64)>,
}

simd_kernel! {
    /// One schedule-free step of one parameter held at `y` (the model's weights), its `z` and,
    /// for AdamW, its second moment: the gradient normalised (AdamW), decayed at y,
    /// `y = lerp(y, z, ckp1) + y_coefficient * g`, `z -= lr * g`.
    pub fn schedule_free_update(
        y: &mut [f32],
        grad: &[f32],
        z: &mut [f32],
        exp_avg_sq: &mut [f32],
        h: &ScheduleFreeStep,
    ) {
        let len = y.len();
        assert!(
            grad.len() == len && z.len() == len,
            "gradient or state length differs from the parameter's"
        );
        let (lr, ckp1, y_coefficient) = (h.lr as f32, h.ckp1 as f32, h.y_coefficient as f32);
        let decay = h.weight_decay as f32;
        let decayed = h.weight_decay != 0.0;
        match h.adam {
            Some((beta2, eps, bias_correction2)) => {
                assert_eq!(exp_avg_sq.len(), len, "second moment length differs");
                let (beta2, one_minus_beta2) = (beta2 as f32, (1.0 - beta2) as f32);
                let (eps, bias_correction2) = (eps as f32, bias_correction2 as f32);
                for index in 0..len {
                    let g = grad[index];
                    let v = exp_avg_sq[index] * beta2 + one_minus_beta2 * g * g;
                    exp_avg_sq[index] = v;
                    let denom = (v / bias_correction2).sqrt() + eps;
                    let mut g = g / denom;
                    if decayed {
                        g += decay * y[index];
                    }
                    y[index] = lerp(y[index], z[index], ckp1) + y_coefficient * g;
                    z[index] -= lr * g;
                }
            }
            None => {
                for index in 0..len {
                    let g = if decayed {
                        grad[index] + decay * y[index]
                    } else {
                        grad[index]
                    };
                    y[index] = lerp(y[index], z[index], ckp1) + y_coefficient * g;
                    z[index] -= lr * g;
                }
            }
        }
    }
}

simd_kernel! {
    /// `param = lerp(param, z, weight)`: a schedule-free parameter from y to x (weight
    /// `1 - 1/beta1`) or back (weight `1 - beta1`).
    pub fn lerp_toward(param: &mut [f32], z: &[f32], weight: f64) {
        assert_eq!(param.len(), z.len(), "z's length differs from the parameter's");
        let weight = weight as f32;
        for (p, &z) in param.iter_mut().zip(z) {
            *p = lerp(*p, z, weight);
        }
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

    /// The same for the learning-rate-free kernels: three steps of Prodigy's two passes
    /// (their sums too) and of schedule-free AdamW and SGD.
    #[test]
    fn every_simd_level_runs_the_learning_rate_free_kernels_exactly_as_scalar() {
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
        let run = |level: Level| -> (Vec<Vec<f32>>, Vec<ProdigySums>) {
            with_level(level, || {
                let (mut finals, mut sums) = (Vec::new(), Vec::new());
                for (beta1, l2_decay, decay_coefficient) in
                    [(0.9, 0.0, 0.0), (0.9, 0.01, 0.0), (0.0, 0.0, -1e-3)]
                {
                    let mut param = start.clone();
                    let p0 = start.clone();
                    let (mut m, mut v, mut s) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
                    for step in 0..3 {
                        let grad = grad_at(step);
                        let d = 1e-3 * (step + 1) as f64;
                        let accumulate = ProdigyAccumulate {
                            beta1,
                            beta2: 0.999,
                            beta3: 0.999f64.sqrt(),
                            l2_decay,
                            exp_avg_coefficient: d * (1.0 - beta1),
                            exp_avg_sq_coefficient: d * d * 1e-3,
                            s_coefficient: d * 1e3 * d,
                        };
                        let step_sums = prodigy_accumulate(
                            &param,
                            &grad,
                            &p0,
                            &mut m,
                            &mut v,
                            &mut s,
                            &accumulate,
                        );
                        sums.push(step_sums);
                        let apply = ProdigyApply {
                            momentum: beta1 > 0.0,
                            l2_decay,
                            d_eps: d * 1e-8,
                            decay_coefficient,
                            step_value: if beta1 > 0.0 { -d } else { -d * d },
                        };
                        prodigy_apply(&mut param, &grad, &m, &v, &apply);
                    }
                    finals.extend([param, m, v, s]);
                }
                for (adam, weight_decay) in [(Some((0.999, 1e-8)), 0.0), (None, 0.01)] {
                    let (mut y, mut z) = (start.clone(), start.clone());
                    let mut v = vec![0f32; len];
                    for step in 0..3 {
                        let ckp1 = 1.0 / (step + 1) as f64;
                        let h = ScheduleFreeStep {
                            lr: 0.01,
                            ckp1,
                            y_coefficient: 0.01 * (0.9 * (1.0 - ckp1) - 1.0),
                            weight_decay,
                            adam: adam.map(|(beta2, eps)| {
                                (beta2, eps, 1.0 - f64::powi(beta2, step as i32 + 1))
                            }),
                        };
                        schedule_free_update(&mut y, &grad_at(step), &mut z, &mut v, &h);
                    }
                    finals.extend([y, z, v]);
                }
                (finals, sums)
            })
        };
        let (scalar, scalar_sums) = run(Level::Scalar);
        for level in Level::supported_levels() {
            let (got, sums) = run(level);
            assert_eq!(sums, scalar_sums, "{level:?}: Prodigy's sums");
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
