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
    }
}
