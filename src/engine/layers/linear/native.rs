//! The linear layer's native pass: one product for the batch through gemm (computed
//! transposed into the node's own buffer, see `dense_forward_transposed`), the bias added in
//! place, and the textbook gradients.

use super::Linear;
use crate::engine::kernels::gemm::{dense_backward, dense_forward_transposed};
use crate::engine::layers::native::{batch_len, Input, Kernel, NodeBuild, NodeParts};
use crate::engine::rng::Rng;

/// Parameters `weight` (an index into the model's) and `weight + 1`.
struct Node {
    weight: usize,
    inputs: usize,
    /// The batch's output transposed, `[outputs, rows]`, rewritten by every forward pass.
    out_t: Vec<f32>,
}

pub(super) fn node(
    linear: &Linear,
    input: &[usize],
    build: &mut NodeBuild<'_>,
) -> candle_core::Result<NodeParts> {
    let mut output = input.to_vec();
    *output.last_mut().expect("planned") = linear.outputs;
    let node = Node {
        weight: build.parameters(2),
        inputs: linear.inputs,
        out_t: vec![0.0; batch_len(build.rows, &output)?],
    };
    Ok(NodeParts::new(node, output))
}

impl Kernel for Node {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let x = input.values();
        let weight = self.weight;
        dense_forward_transposed(
            out,
            x,
            x.len() / self.inputs,
            params[weight],
            params[weight + 1],
            &mut self.out_t,
        );
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
        let x = input.values();
        let (weight_grad, bias_grad) = grads[self.weight..].split_at_mut(1);
        dense_backward(
            grad_out,
            x,
            x.len() / self.inputs,
            params[self.weight],
            &mut weight_grad[0],
            &mut bias_grad[0],
            grad_in,
        );
    }

    fn has_parameters(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> usize {
        self.out_t.len() * 4
    }
}
