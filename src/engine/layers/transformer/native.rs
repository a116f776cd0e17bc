//! The native nodes of the embeddings and of the transformer block (whose kernels are in
//! `attention`).

use super::attention::{self, BLOCK_VARS};
use crate::engine::kernels::vector::{add_assign, add_into};
use crate::engine::layers::native::{buffer_len, Input, Kernel, NodeBuild, NodeParts};
use crate::engine::rng::Rng;

/// Parameter `weight`, `[vocab, dim]`: row `id` for each token id.
struct EmbeddingNode {
    weight: usize,
    dim: usize,
}

pub(super) fn embedding_node(dim: usize, input: &[usize], build: &mut NodeBuild<'_>) -> NodeParts {
    let node = EmbeddingNode {
        weight: build.parameters(1),
        dim,
    };
    NodeParts::new(node, vec![input[0], dim])
}

impl Kernel for EmbeddingNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let Input::Tokens(ids) = input else {
            candle_core::bail!("native step: an embedding needs token ids");
        };
        let (table, dim) = (params[self.weight], self.dim);
        for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
            row.copy_from_slice(&table[id as usize * dim..][..dim]);
        }
        Ok(())
    }

    fn backward(
        &mut self,
        input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        _params: &[&[f32]],
        grads: &mut [Vec<f32>],
        _grad_in: Option<&mut [f32]>,
    ) {
        let Input::Tokens(ids) = input else {
            unreachable!("an embedding reads token ids");
        };
        let dim = self.dim;
        let table_grad = &mut grads[self.weight];
        table_grad.fill(0.0);
        for (g, &id) in grad_out.chunks_exact(dim).zip(ids) {
            for (t, &v) in table_grad[id as usize * dim..][..dim].iter_mut().zip(g) {
                *t += v;
            }
        }
    }

    fn has_parameters(&self) -> bool {
        true
    }
}

/// Parameter `weight`, `[time, dim]`, added to every sample.
struct PositionNode {
    weight: usize,
}

pub(super) fn position_node(input: &[usize], build: &mut NodeBuild<'_>) -> NodeParts {
    let node = PositionNode {
        weight: build.parameters(1),
    };
    NodeParts::new(node, input.to_vec())
}

impl Kernel for PositionNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let table = params[self.weight];
        for (sample, x) in out
            .chunks_exact_mut(table.len())
            .zip(input.values().chunks_exact(table.len()))
        {
            add_into(sample, x, table);
        }
        Ok(())
    }

    fn backward(
        &mut self,
        _input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        _params: &[&[f32]],
        grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        let table_grad = &mut grads[self.weight];
        table_grad.fill(0.0);
        for sample in grad_out.chunks_exact(table_grad.len()) {
            add_assign(table_grad, sample);
        }
        if let Some(grad_in) = grad_in {
            grad_in.copy_from_slice(grad_out);
        }
    }

    fn has_parameters(&self) -> bool {
        true
    }
}

/// Parameters `weight..weight + BLOCK_VARS`.
struct BlockNode {
    weight: usize,
    block: Box<attention::Block>,
    scratch: Box<attention::Scratch>,
}

pub(super) fn block_node(
    heads: usize,
    input: &[usize],
    build: &mut NodeBuild<'_>,
) -> candle_core::Result<NodeParts> {
    let [time, dim] = input[..] else {
        candle_core::bail!("native step: transformer_block on {input:?}");
    };
    let rows = build.rows;
    // The block's largest buffers: the MLP's `4 d` wide values and the attention weights.
    buffer_len(&[rows, time, 4, dim])?;
    buffer_len(&[rows, heads, time, time])?;
    let node = BlockNode {
        weight: build.parameters(BLOCK_VARS),
        block: Box::new(attention::Block::new(rows, time, dim, heads)),
        scratch: Box::new(attention::Scratch::new(rows, time, dim, heads)),
    };
    Ok(NodeParts::new(node, input.to_vec()))
}

impl Kernel for BlockNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        self.block
            .forward(input.values(), &params[self.weight..][..BLOCK_VARS], out);
        Ok(())
    }

    fn backward(
        &mut self,
        _input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        params: &[&[f32]],
        grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        let p = &params[self.weight..][..BLOCK_VARS];
        let g = &mut grads[self.weight..][..BLOCK_VARS];
        // The block's backward pass turns d(loss)/d(output) into d(loss)/d(input) in place.
        match grad_in {
            Some(grad_in) => {
                grad_in.copy_from_slice(grad_out);
                self.block.backward(p, g, grad_in, &mut self.scratch);
            }
            None => self
                .block
                .backward(p, g, &mut grad_out.to_vec(), &mut self.scratch),
        }
    }

    fn has_parameters(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> usize {
        (self.block.floats() + self.scratch.floats()) * 4
    }
}
