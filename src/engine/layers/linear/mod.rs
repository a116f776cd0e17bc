//! `nn.Linear(in, out)` on the last dimension: `x W^T + b`.

use std::any::Any;

use candle_core::Tensor;

use super::native::{NodeBuild, NodeParts};
use super::plan::{element_count, PlanStep, Planned, Sample};
use super::weights::{Init, Tensors, Weights};
use super::Layer;
use crate::engine::rng::Rng;
use crate::engine::spec::SpecError;

pub mod candle;
mod native;

#[derive(Debug)]
pub struct Linear {
    pub inputs: usize,
    pub outputs: usize,
}

/// `{"type": "linear", "out": ...}` on what reaches it.
pub fn plan(out: usize, step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let dims = step.values()?;
    let Some(&inputs) = dims.last() else {
        return Err(step.mismatch("at least one dimension"));
    };
    let mut next = dims.to_vec();
    *next.last_mut().expect("checked above") = out;
    if element_count(&next).is_none() {
        return Err(step.too_large(step.field("out"), &next, "its output is"));
    }
    step.add_parameters(
        (inputs as u64)
            .checked_add(1)
            .and_then(|fan_in| fan_in.checked_mul(out as u64)),
        &step.field("out"),
        || format!("its weight of {out} x {inputs} and bias of {out}"),
    )?;
    let linear = Linear {
        inputs,
        outputs: out,
    };
    Ok((Box::new(linear), Sample::Values(next)))
}

impl Layer for Linear {
    /// The output again, transposed: the forward product's own buffer (see
    /// `kernels::gemm::dense_forward_transposed`).
    fn saved_values(&self, output: u64) -> Option<u64> {
        Some(output)
    }

    fn tensors(&self, tensors: &mut Tensors) {
        // nn.Linear: weight and bias U(-1/sqrt(in), 1/sqrt(in)).
        let init = Init::Uniform {
            bound: 1.0 / (self.inputs as f64).sqrt(),
        };
        tensors.parameter("weight", vec![self.outputs, self.inputs], init);
        tensors.parameter("bias", vec![self.outputs], init);
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let [weight, bias] = weights.parameters();
        candle::linear(x, weight, bias)
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::node(self, input, build)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
