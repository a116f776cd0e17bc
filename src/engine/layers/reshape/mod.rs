//! `nn.Flatten()`: every per-sample dimension into one. The values do not move, so neither
//! pass computes anything: the native node copies.

use std::any::Any;

use candle_core::Tensor;

use super::native::{batch_len, Input, Kernel, NodeBuild, NodeParts};
use super::plan::{element_count, PlanStep, Planned, Sample};
use super::weights::Weights;
use super::Layer;
use crate::engine::rng::Rng;
use crate::engine::spec::SpecError;

#[derive(Debug)]
pub struct Flatten;

/// `{"type": "flatten"}`.
pub fn plan(step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let dims = step.values()?;
    let total = element_count(dims)
        .ok_or_else(|| step.too_large(step.at.to_string(), dims, "its input is"))?;
    Ok((Box::new(Flatten), Sample::Values(vec![total])))
}

impl Layer for Flatten {
    fn candle_forward(
        &self,
        x: &Tensor,
        _weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        x.flatten_from(1)
    }

    fn native_node(
        &self,
        input: &[usize],
        _build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        Ok(NodeParts::new(FlattenNode, vec![batch_len(1, input)?]))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The native flatten: its output is its input.
struct FlattenNode;

impl Kernel for FlattenNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        _params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        out.copy_from_slice(input.values());
        Ok(())
    }

    fn backward(
        &mut self,
        _input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        _params: &[&[f32]],
        _grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        if let Some(grad_in) = grad_in {
            grad_in.copy_from_slice(grad_out);
        }
    }
}
