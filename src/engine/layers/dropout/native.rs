//! Dropout's native pass: the mask drawn into a buffer in the order candle draws it, kept
//! for the backward pass.

use crate::engine::layers::native::{batch_len, Input, Kernel, NodeBuild, NodeParts};
use crate::engine::rng::Rng;

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
                for m in self.mask.iter_mut() {
                    *m = if rng.next_f64() < keep { scale } else { 0.0 };
                }
                self.active = true;
            }
        }
        if self.active {
            for ((o, &v), &m) in out.iter_mut().zip(x).zip(self.mask.iter()) {
                *o = v * m;
            }
        } else {
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
                for ((d, &g), &m) in grad_in.iter_mut().zip(grad_out).zip(self.mask.iter()) {
                    *d = g * m;
                }
            } else {
                grad_in.copy_from_slice(grad_out);
            }
        }
    }

    fn allocated_bytes(&self) -> usize {
        self.mask.len() * 4
    }
}
