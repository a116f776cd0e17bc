//! Element-wise activations, PyTorch's: `relu`, `gelu` (the erf form, or the tanh form),
//! `tanh`, `sigmoid`, `silu` and `leaky_relu`. One planned layer for all of them, told apart by its
//! [`Function`]; each function's value and derivative are written once for each backend.

use std::any::Any;

use candle_core::Tensor;

use super::native::{NodeBuild, NodeParts};
use super::plan::{PlanStep, Planned, Sample};
use super::weights::Weights;
use super::Layer;
use crate::engine::rng::Rng;
use crate::engine::spec::{GeluApproximation, SpecError};

mod candle;
mod native;

/// Which activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Function {
    Relu,
    /// `nn.GELU()`: x Phi(x) with the exact normal CDF.
    GeluErf,
    /// `nn.GELU(approximate="tanh")`.
    GeluTanh,
    Tanh,
    Sigmoid,
    Silu,
    /// `nn.LeakyReLU(negative_slope)`: x where x > 0, else `negative_slope` x (in f32, as
    /// PyTorch computes it on f32 values).
    LeakyRelu(f32),
}

impl Function {
    /// The GELU a spec's `approximate` asks for.
    pub fn gelu(approximate: GeluApproximation) -> Function {
        match approximate {
            GeluApproximation::None => Function::GeluErf,
            GeluApproximation::Tanh => Function::GeluTanh,
        }
    }
}

#[derive(Debug)]
pub struct Activation {
    pub function: Function,
}

impl Activation {
    pub fn is_relu(&self) -> bool {
        self.function == Function::Relu
    }
}

/// An activation on whatever values reach it.
pub fn plan(function: Function, step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let dims = step.values()?.to_vec();
    Ok((Box::new(Activation { function }), Sample::Values(dims)))
}

impl Layer for Activation {
    fn candle_forward(
        &self,
        x: &Tensor,
        _weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        candle::forward(self.function, x)
    }

    fn native_node(
        &self,
        input: &[usize],
        _build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        Ok(native::node(self.function, input))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
