//! Dropout's native pass: the mask drawn into a buffer in the order candle draws it, kept
//! for the backward pass. The draws are filled in parallel chunks, each at its place in the
//! stream (`Rng::peek_f64`), so the mask is the one drawn in order.

use rayon::prelude::*;

use crate::engine::layers::native::{batch_len, Input, Kernel, NodeBuild, NodeParts};
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;

/// Values per parallel task.
const ELEMENTS_PER_TASK: usize = 1 << 14;

simd_kernel! {
    /// The mask of the `first`-th draw on from `rng`'s place (`scale` where the draw is below
    /// `keep`, else 0) into `mask`, and `x` times it into `out`.
    fn drop_chunk(
        rng: &Rng,
        first: u64,
        keep: f64,
        scale: f32,
        x: &[f32],
        mask: &mut [f32],
        out: &mut [f32],
    ) {
        for (offset, ((m, o), &v)) in mask.iter_mut().zip(out.iter_mut()).zip(x).enumerate() {
            *m = if rng.peek_f64(first + offset as u64) < keep { scale } else { 0.0 };
            *o = v * *m;
        }
    }
}

simd_kernel! {
    fn scale_by_mask(grad_out: &[f32], mask: &[f32], grad_in: &mut [f32]) {
        for ((d, &g), &m) in grad_in.iter_mut().zip(grad_out).zip(mask) {
            *d = g * m;
        }
    }
}

struct Node {
    p: f64,
    mask: Vec<f32>,
    /// Whether the last forward pass dropped (training with p > 0).
    active: bool,
}

pub(super) fn node(
    p: f64,
    input: &[usize],
    build: &mut NodeBuild<'_>,
) -> candle_core::Result<NodeParts> {
    let node = Node {
        p,
        mask: vec![0.0; batch_len(build.rows, input)?],
        active: false,
    };
    Ok(NodeParts::new(node, input.to_vec()))
}

impl Kernel for Node {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        _params: &[&[f32]],
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let x = input.values();
        self.active = false;
        if let Some(rng) = train.as_deref_mut() {
            if self.p > 0.0 {
                let keep = 1.0 - self.p;
                let scale = (1.0 / keep) as f32;
                let from: &Rng = rng;
                self.mask
                    .par_chunks_mut(ELEMENTS_PER_TASK)
                    .zip(out.par_chunks_mut(ELEMENTS_PER_TASK))
                    .zip(x.par_chunks(ELEMENTS_PER_TASK))
                    .enumerate()
                    .for_each(|(chunk, ((mask, out), x))| {
                        let first = (chunk * ELEMENTS_PER_TASK) as u64;
                        drop_chunk(from, first, keep, scale, x, mask, out);
                    });
                rng.skip(self.mask.len() as u64);
                self.active = true;
            }
        }
        if !self.active {
            out.copy_from_slice(x);
        }
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
            if self.active {
                grad_in
                    .par_chunks_mut(ELEMENTS_PER_TASK)
                    .zip(grad_out.par_chunks(ELEMENTS_PER_TASK))
                    .zip(self.mask.par_chunks(ELEMENTS_PER_TASK))
                    .for_each(|((grad_in, grad_out), mask)| scale_by_mask(grad_out, mask, grad_in));
            } else {
                grad_in.copy_from_slice(grad_out);
            }
        }
    }

    fn allocated_bytes(&self) -> usize {
        self.mask.len() * 4
    }
}
