//! A residual block: `x + block(x)` for a list of layers that keeps the shape, named as a
//! nested `nn.Sequential` (`"2.0.weight"`). Both passes walk the inner list as the model
//! walks its own.

use std::any::Any;

use candle_core::Tensor;

use super::candle::forward_list;
use super::native::{batch_len, Chain, Input, Kernel, NodeBuild, NodeParts};
use super::plan::{PlanStep, Planned, Sample};
use super::weights::{Tensors, Weights};
use super::Layer;
use crate::engine::kernels::vector::add_into;
use crate::engine::rng::Rng;
use crate::engine::spec::{LayerSpec, SpecError};

#[derive(Debug)]
pub struct Residual {
    pub layers: Vec<Box<dyn Layer>>,
}

/// `{"type": "residual", "layers": [...]}`: the inner list must give back what it takes.
pub fn plan(layers: &[LayerSpec], step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let same = Sample::Values(step.values()?.to_vec());
    let field = step.field("layers");
    let (inner, output) = step.plan_list(layers, same.clone(), &field)?;
    if output != same {
        return Err(SpecError::new(
            step.at,
            format!(
                "a residual block adds its output to its input, but it turns {} into {}",
                same.describe(),
                output.describe()
            ),
        ));
    }
    Ok((Box::new(Residual { layers: inner }), same))
}

impl Layer for Residual {
    fn tensors(&self, tensors: &mut Tensors) {
        tensors.layers(&self.layers);
    }

    /// The inner layers' gradient with respect to the block's input.
    fn saved_values(&self, output: u64) -> Option<u64> {
        Some(output)
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        x + forward_list(&self.layers, x, weights, train)?
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        let (chain, _) = Chain::build(&self.layers, input.to_vec(), build)?;
        let node = ResidualNode {
            chain,
            input_grad: vec![0.0; batch_len(build.rows, input)?],
        };
        Ok(NodeParts::new(node, input.to_vec()))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

struct ResidualNode {
    chain: Chain,
    /// The inner layers' d(loss)/d(block input).
    input_grad: Vec<f32>,
}

impl Kernel for ResidualNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        n: usize,
        params: &[&[f32]],
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let x = input.values();
        self.chain.forward(Input::Values(x), n, params, train)?;
        add_into(out, x, self.chain.output());
        Ok(())
    }

    fn backward(
        &mut self,
        input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        params: &[&[f32]],
        grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        self.chain.output_grad().copy_from_slice(grad_out);
        self.chain
            .backward(input, params, grads, Some(&mut self.input_grad));
        if let Some(grad_in) = grad_in {
            add_into(grad_in, grad_out, &self.input_grad);
        }
    }

    fn has_parameters(&self) -> bool {
        self.chain.has_parameters()
    }

    fn allocated_bytes(&self) -> usize {
        self.chain.allocated_bytes() + self.input_grad.len() * 4
    }
}
