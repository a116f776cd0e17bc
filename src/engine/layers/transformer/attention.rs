//! The transformer block's native kernels: pre-norm [x + projection(causal multi-head
//! attention(layer_norm(x))) ; x + contract(gelu_tanh(expand(layer_norm(x))))] over
//! `[time, d]` samples, forward and backward over buffers kept from step to step. The
//! layer-list `transformer_block` and the `transformer` preset both run it.
//!
//! Attention reads queries, keys and values straight out of the fused `qkv` projection through
//! strides, and writes each head's output into its columns of the mixed matrix, so there is no
//! split, transpose or concatenation copy in either direction.

use rayon::prelude::*;

use crate::engine::kernels::gemm::{dense_backward, dense_forward, gemm_into, matmul, Operand};
use crate::engine::kernels::math::{dot, exp, gelu_derivative_with, gelu_tanh, max_value, sum};
use crate::engine::layers::norm::native::{
    norm_forward_rows, norm_input_grads, norm_parameter_grads,
};
use crate::engine::simd::simd_kernel;

/// Variables per block, in the model's order: two layer norms (gain, shift), then the
/// weight and bias of qkv, projection, expand and contract.
pub(super) const BLOCK_VARS: usize = 12;

/// Rows per parallel task of the element-wise passes.
const ROWS_PER_TASK: usize = 64;

/// A layer norm's saved forward values.
pub(super) struct Norm {
    /// (x - mean) / std, `[n, d]`.
    normalized: Vec<f32>,
    /// 1 / std per row.
    inv_std: Vec<f32>,
    /// normalized * gain + shift, `[n, d]`.
    pub(super) out: Vec<f32>,
}

impl Norm {
    pub(super) fn new(n: usize, d: usize) -> Self {
        Self {
            normalized: vec![0.0; n * d],
            inv_std: vec![0.0; n],
            out: vec![0.0; n * d],
        }
    }

    /// Values held: `2 n d + n`.
    pub(super) fn floats(&self) -> usize {
        self.normalized.len() + self.inv_std.len() + self.out.len()
    }

    /// Normalizes rows of `gain.len()` values, in parallel over groups of rows.
    pub(super) fn forward(&mut self, x: &[f32], gain: &[f32], shift: &[f32]) {
        let d = gain.len();
        self.normalized
            .par_chunks_mut(ROWS_PER_TASK * d)
            .zip(self.out.par_chunks_mut(ROWS_PER_TASK * d))
            .zip(self.inv_std.par_chunks_mut(ROWS_PER_TASK))
            .zip(x.par_chunks(ROWS_PER_TASK * d))
            .for_each(|(((normalized, out), inv_std), x)| {
                norm_forward_rows(x, gain, shift, normalized, out, inv_std)
            });
    }

    /// Given d(loss)/d(out) in `grad_out`, writes the gain and shift gradients and adds
    /// d(loss)/d(x) into `grad_x`.
    pub(super) fn backward(
        &self,
        grad_out: &[f32],
        gain: &[f32],
        grad_gain: &mut [f32],
        grad_shift: &mut [f32],
        grad_x: &mut [f32],
    ) {
        let d = gain.len();
        norm_parameter_grads(grad_out, &self.normalized, grad_gain, grad_shift);
        grad_x
            .par_chunks_mut(ROWS_PER_TASK * d)
            .zip(grad_out.par_chunks(ROWS_PER_TASK * d))
            .zip(self.normalized.par_chunks(ROWS_PER_TASK * d))
            .zip(self.inv_std.par_chunks(ROWS_PER_TASK))
            .for_each(|(((grad_x, grad_out), normalized), inv_std)| {
                norm_input_grads(grad_out, normalized, inv_std, gain, grad_x)
            });
    }
}

simd_kernel! {
    /// Causal softmax, in place, of each row of a `[time, time]` block of attention scores
    /// times `scale`: row i keeps positions 0..=i and the rest get weight 0 (the -1e9 mask of
    /// the autograd path leaves them about 1.6e-38, exp's floor).
    fn causal_softmax(weights: &mut [f32], time: usize, scale: f32) {
        for (i, row) in weights.chunks_exact_mut(time).enumerate() {
            let (visible, hidden) = row.split_at_mut(i + 1);
            let max = max_value(visible) * scale;
            for s in visible.iter_mut() {
                *s = exp(*s * scale - max);
            }
            let inverse = 1.0 / sum(visible);
            visible.iter_mut().for_each(|s| *s *= inverse);
            hidden.fill(0.0);
        }
    }
}

simd_kernel! {
    /// Through the softmax, in place: dS = P * (dP - rowsum(P * dP)) * scale, row by row.
    fn softmax_backward(p: &[f32], dp: &mut [f32], time: usize, scale: f32) {
        for (p_row, dp_row) in p.chunks_exact(time).zip(dp.chunks_exact_mut(time)) {
            let dot = dot(p_row, dp_row);
            for (g, p) in dp_row.iter_mut().zip(p_row) {
                *g = p * (*g - dot) * scale;
            }
        }
    }
}

simd_kernel! {
    /// GELU (tanh form) forward, keeping its inner tanh for the backward pass.
    fn gelu_forward(x: &[f32], activated: &mut [f32], tanh: &mut [f32]) {
        for ((a, t), &x) in activated.iter_mut().zip(tanh.iter_mut()).zip(x) {
            *t = gelu_tanh(x);
            *a = 0.5 * x * (1.0 + *t);
        }
    }
}

simd_kernel! {
    /// `grad *= GELU'(x)`, from the tanh the forward pass kept.
    fn gelu_backward(x: &[f32], tanh: &[f32], grad: &mut [f32]) {
        for ((g, &x), &t) in grad.iter_mut().zip(x).zip(tanh) {
            *g *= gelu_derivative_with(x, t);
        }
    }
}

/// One head's slice of the qkv matrix of one sequence: `part` 0, 1, 2 for queries, keys,
/// values; `[time, head_dim]` with row stride 3d.
fn head_part<'a>(
    qkv: &'a [f32],
    d: usize,
    head_dim: usize,
    part: usize,
    head: usize,
) -> Operand<'a> {
    Operand::strided(&qkv[part * d + head * head_dim..], 3 * d)
}

/// Causal softmax attention for every sequence and head: fills `weights` and writes each
/// head's output into its columns of `mixed`.
fn attention_forward(
    buffers_shape: (usize, usize, usize),
    qkv: &[f32],
    weights: &mut [f32],
    mixed: &mut [f32],
) {
    let (time, d, heads) = buffers_shape;
    let head_dim = d / heads;
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    mixed
        .par_chunks_mut(time * d)
        .zip(weights.par_chunks_mut(heads * time * time))
        .zip(qkv.par_chunks(time * 3 * d))
        .for_each(|((mixed, weights), qkv)| {
            for (head, weights) in weights.chunks_exact_mut(time * time).enumerate() {
                matmul(
                    weights,
                    time,
                    time,
                    head_dim,
                    head_part(qkv, d, head_dim, 0, head),
                    head_part(qkv, d, head_dim, 1, head).t(),
                );
                causal_softmax(weights, time, scale);
                gemm_into(
                    &mut mixed[head * head_dim..],
                    d,
                    false,
                    time,
                    head_dim,
                    time,
                    Operand::plain(weights, time),
                    head_part(qkv, d, head_dim, 2, head),
                );
            }
        });
}

/// The backward pass of `attention_forward`: from d(loss)/d(mixed) to d(loss)/d(qkv).
fn attention_backward(
    shape: (usize, usize, usize),
    qkv: &[f32],
    weights: &[f32],
    grad_mixed: &[f32],
    grad_weights: &mut [f32],
    grad_qkv: &mut [f32],
) {
    let (time, d, heads) = shape;
    let head_dim = d / heads;
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    grad_qkv
        .par_chunks_mut(time * 3 * d)
        .zip(grad_weights.par_chunks_mut(heads * time * time))
        .zip(weights.par_chunks(heads * time * time))
        .zip(qkv.par_chunks(time * 3 * d))
        .zip(grad_mixed.par_chunks(time * d))
        .for_each(|((((grad_qkv, grad_weights), weights), qkv), grad_mixed)| {
            for head in 0..heads {
                let p = &weights[head * time * time..][..time * time];
                let dp = &mut grad_weights[head * time * time..][..time * time];
                let grad_out = Operand::strided(&grad_mixed[head * head_dim..], d);
                // dP = dO V^T and dV = P^T dO.
                matmul(
                    dp,
                    time,
                    time,
                    head_dim,
                    grad_out,
                    head_part(qkv, d, head_dim, 2, head).t(),
                );
                gemm_into(
                    &mut grad_qkv[2 * d + head * head_dim..],
                    3 * d,
                    false,
                    time,
                    head_dim,
                    time,
                    Operand::transposed(p, time),
                    grad_out,
                );
                softmax_backward(p, dp, time, scale);
                let ds: &[f32] = dp;
                // dQ = dS K and dK = dS^T Q.
                gemm_into(
                    &mut grad_qkv[head * head_dim..],
                    3 * d,
                    false,
                    time,
                    head_dim,
                    time,
                    Operand::plain(ds, time),
                    head_part(qkv, d, head_dim, 1, head),
                );
                gemm_into(
                    &mut grad_qkv[d + head * head_dim..],
                    3 * d,
                    false,
                    time,
                    head_dim,
                    time,
                    Operand::transposed(ds, time),
                    head_part(qkv, d, head_dim, 0, head),
                );
            }
        });
}

/// One block's values saved by the forward pass for the backward pass, for a batch of
/// `n = batch * time` rows of `d` values.
pub(super) struct Block {
    time: usize,
    d: usize,
    heads: usize,
    norm_attention: Norm,
    /// `[n, 3d]`: per row the queries, keys and values of every head.
    qkv: Vec<f32>,
    /// Attention weights `[batch, heads, time, time]` (zero above the diagonal).
    weights: Vec<f32>,
    /// The heads' outputs side by side, `[n, d]`.
    mixed: Vec<f32>,
    /// The residual stream after attention: `x + projection(mixed)`, `[n, d]`.
    middle: Vec<f32>,
    norm_mlp: Norm,
    /// Pre-GELU and post-GELU activations of the MLP and GELU's inner tanh (kept so the
    /// backward pass need not compute it again), `[n, 4d]`.
    expanded: Vec<f32>,
    activated: Vec<f32>,
    gelu_tanh: Vec<f32>,
}

/// The backward pass's intermediate gradients, which blocks can share: a norm output's, the
/// qkv and mixed gradients, the MLP's, and the attention weights'.
pub(super) struct Scratch {
    pub(super) grad_norm: Vec<f32>,
    grad_qkv: Vec<f32>,
    grad_mixed: Vec<f32>,
    grad_expanded: Vec<f32>,
    grad_weights: Vec<f32>,
}

impl Scratch {
    pub(super) fn new(batch: usize, time: usize, d: usize, heads: usize) -> Self {
        let n = batch * time;
        Self {
            grad_norm: vec![0.0; n * d],
            grad_qkv: vec![0.0; n * 3 * d],
            grad_mixed: vec![0.0; n * d],
            grad_expanded: vec![0.0; n * 4 * d],
            grad_weights: vec![0.0; batch * heads * time * time],
        }
    }

    /// Values held: `9 n d + batch heads time^2` (what admission plans).
    pub(super) fn floats(&self) -> usize {
        self.grad_norm.len()
            + self.grad_qkv.len()
            + self.grad_mixed.len()
            + self.grad_expanded.len()
            + self.grad_weights.len()
    }
}

impl Block {
    pub(super) fn new(batch: usize, time: usize, d: usize, heads: usize) -> Self {
        let n = batch * time;
        Self {
            time,
            d,
            heads,
            norm_attention: Norm::new(n, d),
            qkv: vec![0.0; n * 3 * d],
            weights: vec![0.0; batch * heads * time * time],
            mixed: vec![0.0; n * d],
            middle: vec![0.0; n * d],
            norm_mlp: Norm::new(n, d),
            expanded: vec![0.0; n * 4 * d],
            activated: vec![0.0; n * 4 * d],
            gelu_tanh: vec![0.0; n * 4 * d],
        }
    }

    /// Values held: `2 (2 n d + n) + 17 n d + batch heads time^2` (what admission plans).
    pub(super) fn floats(&self) -> usize {
        self.norm_attention.floats()
            + self.norm_mlp.floats()
            + self.qkv.len()
            + self.weights.len()
            + self.mixed.len()
            + self.middle.len()
            + self.expanded.len()
            + self.activated.len()
            + self.gelu_tanh.len()
    }

    /// `out = middle + contract(gelu(expand(norm_mlp(middle))))` with `middle = x +
    /// projection(attention(norm_attention(x)))`, over the whole batch; `p` holds the block's
    /// [`BLOCK_VARS`] parameters.
    pub(super) fn forward(&mut self, x: &[f32], p: &[&[f32]], out: &mut [f32]) {
        let (d, n) = (self.d, x.len() / self.d);
        self.norm_attention.forward(x, p[0], p[1]);
        dense_forward(&mut self.qkv, &self.norm_attention.out, n, p[4], p[5]);
        attention_forward(
            (self.time, d, self.heads),
            &self.qkv,
            &mut self.weights,
            &mut self.mixed,
        );
        dense_forward(&mut self.middle, &self.mixed, n, p[6], p[7]);
        self.middle.iter_mut().zip(x).for_each(|(m, x)| *m += x);

        self.norm_mlp.forward(&self.middle, p[2], p[3]);
        dense_forward(&mut self.expanded, &self.norm_mlp.out, n, p[8], p[9]);
        let chunk = ROWS_PER_TASK * 4 * d;
        self.activated
            .par_chunks_mut(chunk)
            .zip(self.gelu_tanh.par_chunks_mut(chunk))
            .zip(self.expanded.par_chunks(chunk))
            .for_each(|((a, t), e)| gelu_forward(e, a, t));
        dense_forward(out, &self.activated, n, p[10], p[11]);
        out.iter_mut().zip(&self.middle).for_each(|(o, m)| *o += m);
    }

    /// The backward pass of [`Block::forward`], in place: `grad` holds d(loss)/d(out) on
    /// entry and d(loss)/d(x) on exit. Writes the block's parameter gradients into `g`.
    pub(super) fn backward(
        &self,
        p: &[&[f32]],
        g: &mut [Vec<f32>],
        grad: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let [g_norm1_gain, g_norm1_shift, g_norm2_gain, g_norm2_shift, g_qkv_w, g_qkv_b, g_proj_w, g_proj_b, g_expand_w, g_expand_b, g_contract_w, g_contract_b] =
            g
        else {
            unreachable!("BLOCK_VARS variables per block");
        };
        let Scratch {
            grad_norm,
            grad_qkv,
            grad_mixed,
            grad_expanded,
            grad_weights,
        } = scratch;
        let (d, n) = (self.d, grad.len() / self.d);

        // MLP: out = middle + contract(gelu(expand(norm_mlp(middle)))).
        dense_backward(
            grad,
            &self.activated,
            n,
            p[10],
            g_contract_w,
            g_contract_b,
            Some(grad_expanded),
        );
        let chunk = ROWS_PER_TASK * 4 * d;
        grad_expanded
            .par_chunks_mut(chunk)
            .zip(self.expanded.par_chunks(chunk))
            .zip(self.gelu_tanh.par_chunks(chunk))
            .for_each(|((g, e), t)| gelu_backward(e, t, g));
        dense_backward(
            grad_expanded,
            &self.norm_mlp.out,
            n,
            p[8],
            g_expand_w,
            g_expand_b,
            Some(grad_norm),
        );
        self.norm_mlp
            .backward(grad_norm, p[2], g_norm2_gain, g_norm2_shift, grad);

        // Attention: middle = x + projection(attention(norm_attention(x))).
        dense_backward(
            grad,
            &self.mixed,
            n,
            p[6],
            g_proj_w,
            g_proj_b,
            Some(grad_mixed),
        );
        attention_backward(
            (self.time, d, self.heads),
            &self.qkv,
            &self.weights,
            grad_mixed,
            grad_weights,
            grad_qkv,
        );
        dense_backward(
            grad_qkv,
            &self.norm_attention.out,
            n,
            p[4],
            g_qkv_w,
            g_qkv_b,
            Some(grad_norm),
        );
        self.norm_attention
            .backward(grad_norm, p[0], g_norm1_gain, g_norm1_shift, grad);
    }
}
