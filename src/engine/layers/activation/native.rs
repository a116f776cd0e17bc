//! The activations' native pass: value and derivative element by element, in parallel over
//! chunks of the batch, with this crate's `exp` so that the loops vectorize.

use rayon::prelude::*;

use super::Function;
use crate::engine::kernels::math::{exp, gelu_derivative, gelu_value};
use crate::engine::layers::native::{Input, Kernel, NodeParts};
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;

/// Values per parallel task of the element-wise passes.
const ELEMENTS_PER_TASK: usize = 1 << 14;

struct Node(Function);

pub(super) fn node(function: Function, input: &[usize]) -> NodeParts {
    NodeParts::new(Node(function), input.to_vec())
}

impl Kernel for Node {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        _params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let function = self.0;
        input
            .values()
            .par_chunks(ELEMENTS_PER_TASK)
            .zip(out.par_chunks_mut(ELEMENTS_PER_TASK))
            .for_each(|(x, out)| activation_forward(function, x, out));
        Ok(())
    }

    fn backward(
        &mut self,
        input: Input<'_>,
        out: &[f32],
        grad_out: &[f32],
        _params: &[&[f32]],
        _grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        if let Some(grad_in) = grad_in {
            let function = self.0;
            input
                .values()
                .par_chunks(ELEMENTS_PER_TASK)
                .zip(out.par_chunks(ELEMENTS_PER_TASK))
                .zip(grad_out.par_chunks(ELEMENTS_PER_TASK))
                .zip(grad_in.par_chunks_mut(ELEMENTS_PER_TASK))
                .for_each(|(((x, out), grad_out), grad_in)| {
                    activation_backward(function, x, out, grad_out, grad_in)
                });
        }
    }
}

/// erf(x) to about 1.5e-7 (Abramowitz and Stegun 7.1.26), with this crate's `exp` so that
/// loops over it vectorize.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-x * x);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

simd_kernel! {
    fn activation_forward(function: Function, x: &[f32], out: &mut [f32]) {
        let pairs = x.iter().zip(out.iter_mut());
        match function {
            Function::Relu => pairs.for_each(|(&x, o)| *o = x.max(0.0)),
            Function::GeluErf => pairs.for_each(|(&x, o)| *o = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))),
            Function::GeluTanh => pairs.for_each(|(&x, o)| *o = gelu_value(x)),
            Function::Tanh => pairs.for_each(|(&x, o)| *o = x.tanh()),
            Function::Sigmoid => pairs.for_each(|(&x, o)| *o = 1.0 / (1.0 + exp(-x))),
            Function::Silu => pairs.for_each(|(&x, o)| *o = x / (1.0 + exp(-x))),
            Function::LeakyRelu(slope) => pairs.for_each(|(&x, o)| *o = if x > 0.0 { x } else { x * slope }),
        }
    }
}

simd_kernel! {
    /// `grad_in = grad_out * act'(x)`; `out` is the forward output.
    fn activation_backward(function: Function, x: &[f32], out: &[f32], grad_out: &[f32], grad_in: &mut [f32]) {
        let each = x.iter().zip(out).zip(grad_out).zip(grad_in.iter_mut());
        match function {
            Function::Relu => each.for_each(|(((&x, _), &g), d)| *d = if x > 0.0 { g } else { 0.0 }),
            Function::GeluErf => each.for_each(|(((&x, _), &g), d)| {
                let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
                *d = g * (cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x));
            }),
            Function::GeluTanh => each.for_each(|(((&x, _), &g), d)| *d = g * gelu_derivative(x)),
            Function::Tanh => each.for_each(|(((_, &t), &g), d)| *d = g * (1.0 - t * t)),
            Function::Sigmoid => each.for_each(|(((_, &s), &g), d)| *d = g * s * (1.0 - s)),
            Function::Silu => each.for_each(|(((&x, _), &g), d)| {
                let s = 1.0 / (1.0 + exp(-x));
                *d = g * s * (1.0 + x * (1.0 - s));
            }),
            Function::LeakyRelu(slope) => each.for_each(|(((&x, _), &g), d)| *d = if x > 0.0 { g } else { g * slope }),
        }
    }
}
