//! The activations on candle.

use candle_core::Tensor;

use super::Function;

pub(super) fn forward(function: Function, x: &Tensor) -> candle_core::Result<Tensor> {
    match function {
        Function::Relu => x.relu(),
        Function::GeluErf => x.gelu_erf(),
        Function::GeluTanh => x.gelu(),
        Function::Tanh => x.tanh(),
        Function::Sigmoid => candle_nn::ops::sigmoid(x),
        Function::Silu => x.silu(),
        // max(x, 0) - slope max(-x, 0), in ops candle differentiates: x or slope x exactly.
        Function::LeakyRelu(slope) => x.relu()? - (x.neg()?.relu()? * f64::from(slope))?,
    }
}
