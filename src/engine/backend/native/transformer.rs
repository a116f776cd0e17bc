//! The hand-written step of the character transformer: token + position embeddings, pre-norm
//! blocks (layer norm, causal multi-head attention, residual; layer norm, GELU MLP, residual),
//! a final layer norm and the vocabulary head, trained on next-token cross-entropy. It computes
//! the same function as `Model::predict` (the tests hold it to candle's gradients).
//!
//! Attention reads queries, keys and values straight out of the fused `qkv` projection through
//! strides, and writes each head's output into its columns of the mixed matrix, so there is no
//! split, transpose or concatenation copy in either direction.

use rayon::prelude::*;

use super::{
    cross_entropy, dense_backward, dense_forward, gemm_into, matmul, sequence_loss_and_hits,
    HostValues, Operand,
};
use crate::engine::batch::DeviceData;
use crate::engine::model::{Layers, Model, ModelShape};
use crate::engine::ops::{dot, exp, gelu_derivative_with, gelu_tanh, max_value, row_stats, sum};
use crate::engine::simd::simd_kernel;
use crate::engine::spec::ModelSpec;

/// Variables per block, in `Model::vars` order: two layer norms (gain, shift), then the
/// weight and bias of qkv, projection, expand and contract.
const BLOCK_VARS: usize = 12;

/// Rows per parallel task of the element-wise passes.
const ROWS_PER_TASK: usize = 64;

/// A layer norm's saved forward values.
struct Norm {
    /// (x - mean) / std, `[n, d]`.
    normalized: Vec<f32>,
    /// 1 / std per row.
    inv_std: Vec<f32>,
    /// normalized * gain + shift, `[n, d]`.
    out: Vec<f32>,
}

impl Norm {
    fn new(n: usize, d: usize) -> Self {
        Self {
            normalized: vec![0.0; n * d],
            inv_std: vec![0.0; n],
            out: vec![0.0; n * d],
        }
    }

    fn forward(&mut self, x: &[f32], gain: &[f32], shift: &[f32]) {
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
    fn backward(
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
    /// Layer norm of rows of `gain.len()` values: `normalized` = (x - mean) / std, `out` =
    /// normalized * gain + shift, `inv_std` = 1 / std per row.
    pub(super) fn norm_forward_rows(
        x: &[f32],
        gain: &[f32],
        shift: &[f32],
        normalized: &mut [f32],
        out: &mut [f32],
        inv_std: &mut [f32],
    ) {
        let d = gain.len();
        for (((row, normalized), out), inv_std) in x
            .chunks_exact(d)
            .zip(normalized.chunks_exact_mut(d))
            .zip(out.chunks_exact_mut(d))
            .zip(inv_std.iter_mut())
        {
            let (mean, inverse) = row_stats(row);
            *inv_std = inverse;
            for (((value, normalized), out), (g, s)) in row
                .iter()
                .zip(normalized.iter_mut())
                .zip(out.iter_mut())
                .zip(gain.iter().zip(shift))
            {
                *normalized = (value - mean) * inverse;
                *out = *normalized * g + s;
            }
        }
    }
}

simd_kernel! {
    /// A layer norm's gain and shift gradients: column sums of `grad_out * normalized` and of
    /// `grad_out`.
    pub(super) fn norm_parameter_grads(
        grad_out: &[f32],
        normalized: &[f32],
        grad_gain: &mut [f32],
        grad_shift: &mut [f32],
    ) {
        let d = grad_gain.len();
        grad_gain.fill(0.0);
        grad_shift.fill(0.0);
        for (g_row, normalized) in grad_out.chunks_exact(d).zip(normalized.chunks_exact(d)) {
            for ((g, x), (dg, ds)) in g_row
                .iter()
                .zip(normalized)
                .zip(grad_gain.iter_mut().zip(grad_shift.iter_mut()))
            {
                *dg += g * x;
                *ds += g;
            }
        }
    }
}

simd_kernel! {
    /// Adds a layer norm's d(loss)/d(x) into `grad_x`, rows of `gain.len()` values.
    pub(super) fn norm_input_grads(
        grad_out: &[f32],
        normalized: &[f32],
        inv_std: &[f32],
        gain: &[f32],
        grad_x: &mut [f32],
    ) {
        let d = gain.len();
        let width = d as f32;
        for (((dx, g), x), inv_std) in grad_x
            .chunks_exact_mut(d)
            .zip(grad_out.chunks_exact(d))
            .zip(normalized.chunks_exact(d))
            .zip(inv_std)
        {
            // With y = x_hat * gain: dx = inv_std * (dy_hat - mean(dy_hat)
            // - x_hat * mean(dy_hat * x_hat)), dy_hat = dy * gain.
            let (mut sum, mut dot) = (0.0f32, 0.0f32);
            for ((g, x), gain) in g.iter().zip(x).zip(gain) {
                let dy_hat = g * gain;
                sum += dy_hat;
                dot += dy_hat * x;
            }
            let (mean, mean_dot) = (sum / width, dot / width);
            for (((dx, g), x), gain) in dx.iter_mut().zip(g).zip(x).zip(gain) {
                *dx += inv_std * (g * gain - mean - x * mean_dot);
            }
        }
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

struct Block {
    norm_attention: Norm,
    /// `[n, 3d]`: per row the queries, keys and values of every head.
    qkv: Vec<f32>,
    /// Attention weights `[batch, heads, time, time]` (zero above the diagonal).
    weights: Vec<f32>,
    /// The heads' outputs side by side, `[n, d]`.
    mixed: Vec<f32>,
    norm_mlp: Norm,
    /// Pre-GELU and post-GELU activations of the MLP and GELU's inner tanh (kept so the
    /// backward pass need not compute it again), `[n, 4d]`.
    expanded: Vec<f32>,
    activated: Vec<f32>,
    gelu_tanh: Vec<f32>,
}

/// The buffers of one batch shape.
pub(super) struct Buffers {
    batch: usize,
    time: usize,
    d: usize,
    heads: usize,
    vocab: usize,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    /// The residual stream: the embeddings, then after each block's attention and MLP.
    stream: Vec<Vec<f32>>,
    blocks: Vec<Block>,
    final_norm: Norm,
    logits: Vec<f32>,
    logits_grad: Vec<f32>,
    /// Backward scratch: the residual gradient, a norm output's gradient, the qkv and
    /// mixed gradients, the MLP's, and the attention weights' gradient.
    grad_stream: Vec<f32>,
    grad_norm: Vec<f32>,
    grad_qkv: Vec<f32>,
    grad_mixed: Vec<f32>,
    grad_expanded: Vec<f32>,
    grad_weights: Vec<f32>,
}

impl Buffers {
    pub(super) fn new(model: &Model, batch: usize, time: usize) -> Self {
        let Layers::Transformer {
            token_embedding,
            blocks,
            heads,
            ..
        } = model.layers()
        else {
            unreachable!("built for transformers only");
        };
        let (vocab, d) = (token_embedding.dims()[0], token_embedding.dims()[1]);
        let n = batch * time;
        let attention = batch * heads * time * time;
        Self {
            batch,
            time,
            d,
            heads: *heads,
            vocab,
            tokens: vec![0; n],
            targets: vec![0; n],
            stream: (0..=2 * blocks.len()).map(|_| vec![0.0; n * d]).collect(),
            blocks: blocks
                .iter()
                .map(|_| Block {
                    norm_attention: Norm::new(n, d),
                    qkv: vec![0.0; n * 3 * d],
                    weights: vec![0.0; attention],
                    mixed: vec![0.0; n * d],
                    norm_mlp: Norm::new(n, d),
                    expanded: vec![0.0; n * 4 * d],
                    activated: vec![0.0; n * 4 * d],
                    gelu_tanh: vec![0.0; n * 4 * d],
                })
                .collect(),
            final_norm: Norm::new(n, d),
            logits: vec![0.0; n * vocab],
            logits_grad: vec![0.0; n * vocab],
            grad_stream: vec![0.0; n * d],
            grad_norm: vec![0.0; n * d],
            grad_qkv: vec![0.0; n * 3 * d],
            grad_mixed: vec![0.0; n * d],
            grad_expanded: vec![0.0; n * 4 * d],
            grad_weights: vec![0.0; attention],
        }
    }

    pub(super) fn batch(&self) -> usize {
        self.batch
    }

    /// Whether these buffers fit a batch of `batch` sequences of `time` tokens.
    pub(super) fn fits(&self, batch: usize, time: usize) -> bool {
        self.batch == batch && self.time == time
    }
}

/// The bytes `Buffers::new` allocates for `batch` sequences of a transformer spec's context,
/// from the spec alone (admission checks it before anything is built). Saturating arithmetic.
pub(super) fn planned_bytes(spec: &ModelSpec, shape: &ModelShape, batch: u64) -> u64 {
    let ModelSpec::Transformer {
        d_model,
        heads,
        layers,
        context,
    } = spec
    else {
        return 0;
    };
    let mul = |a: u64, b: u64| a.saturating_mul(b);
    let (d, time, layers) = (*d_model as u64, *context as u64, *layers as u64);
    let n = mul(batch, time);
    let nd = mul(n, d);
    let attention = mul(mul(mul(batch, *heads as u64), time), time);
    // A norm: normalized and out ([n, d]) and inv_std ([n]).
    let norm = mul(2, nd).saturating_add(n);
    // Two norms, qkv (3), mixed (1), expanded, activated and gelu_tanh (4 each), weights.
    let block = mul(2, norm)
        .saturating_add(mul(16, nd))
        .saturating_add(attention);
    let floats = mul(2, n) // tokens and targets (u32)
        .saturating_add(mul(mul(2, layers).saturating_add(1), nd)) // the residual stream
        .saturating_add(mul(layers, block))
        .saturating_add(norm)
        .saturating_add(mul(2, mul(n, shape.output as u64))) // logits and their gradient
        .saturating_add(mul(10, nd)) // grad_stream, grad_norm, grad_qkv (3), grad_mixed, grad_expanded (4)
        .saturating_add(attention); // grad_weights
    mul(floats, 4)
}

impl Buffers {
    /// Bytes held by these buffers (what `planned_bytes` predicts; tests compare the two).
    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        let norm = |norm: &Norm| (norm.normalized.len() + norm.inv_std.len() + norm.out.len()) * 4;
        let mut floats = self.tokens.len()
            + self.targets.len()
            + self.stream.iter().map(Vec::len).sum::<usize>()
            + self.logits.len()
            + self.logits_grad.len()
            + self.grad_stream.len()
            + self.grad_norm.len()
            + self.grad_qkv.len()
            + self.grad_mixed.len()
            + self.grad_expanded.len()
            + self.grad_weights.len();
        for block in &self.blocks {
            floats += block.qkv.len()
                + block.weights.len()
                + block.mixed.len()
                + block.expanded.len()
                + block.activated.len()
                + block.gelu_tanh.len();
        }
        let norms: usize = self
            .blocks
            .iter()
            .map(|block| norm(&block.norm_attention) + norm(&block.norm_mlp))
            .sum();
        floats * 4 + norms + norm(&self.final_norm)
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
    Operand {
        data: &qkv[part * d + head * head_dim..],
        row_stride: 3 * d,
        col_stride: 1,
    }
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
                let grad_out = Operand {
                    data: &grad_mixed[head * head_dim..],
                    row_stride: d,
                    col_stride: 1,
                };
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

/// Copies the batch's token ids and next-token targets, checking them against the vocabulary.
fn gather(data: &DeviceData, rows: &[usize], buffers: &mut Buffers) -> candle_core::Result<()> {
    let time = buffers.time;
    for (source, destination) in [
        (&data.x, &mut buffers.tokens),
        (&data.y, &mut buffers.targets),
    ] {
        let values = HostValues::of(source)?;
        let values = values.u32()?;
        for (dst, &row) in destination.chunks_exact_mut(time).zip(rows) {
            dst.copy_from_slice(&values[row * time..(row + 1) * time]);
        }
        if let Some(bad) = destination.iter().find(|&&id| id as usize >= buffers.vocab) {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary of {}",
                buffers.vocab
            );
        }
    }
    Ok(())
}

/// The forward pass over the gathered batch of `n` tokens, leaving the logits in
/// `buffers.logits`.
fn forward(buffers: &mut Buffers, params: &[&[f32]], n: usize) {
    let Buffers {
        time,
        d,
        heads,
        tokens,
        stream,
        blocks,
        final_norm,
        logits,
        ..
    } = buffers;
    let (time, d, heads) = (*time, *d, *heads);
    let shape = (time, d, heads);
    let (token_embedding, position_embedding) = (params[0], params[1]);
    let tail = 2 + BLOCK_VARS * blocks.len();
    let (final_gain, final_shift, head_weight, head_bias) = (
        params[tail],
        params[tail + 1],
        params[tail + 2],
        params[tail + 3],
    );

    // Embeddings.
    for ((row, h), &token) in stream[0].chunks_exact_mut(d).enumerate().zip(tokens.iter()) {
        let token = &token_embedding[token as usize * d..][..d];
        let position = &position_embedding[(row % time) * d..][..d];
        for ((h, t), p) in h.iter_mut().zip(token).zip(position) {
            *h = t + p;
        }
    }

    // Blocks.
    for (index, block) in blocks.iter_mut().enumerate() {
        let p = &params[2 + BLOCK_VARS * index..][..BLOCK_VARS];
        let (before, after) = stream.split_at_mut(2 * index + 1);
        let input = &before[2 * index];
        let (middle, after) = after.split_at_mut(1);
        let (middle, output) = (&mut middle[0], &mut after[0]);

        block.norm_attention.forward(input, p[0], p[1]);
        dense_forward(&mut block.qkv, &block.norm_attention.out, n, p[4], p[5]);
        attention_forward(shape, &block.qkv, &mut block.weights, &mut block.mixed);
        dense_forward(middle, &block.mixed, n, p[6], p[7]);
        middle
            .iter_mut()
            .zip(input.iter())
            .for_each(|(m, x)| *m += x);

        block.norm_mlp.forward(middle, p[2], p[3]);
        dense_forward(&mut block.expanded, &block.norm_mlp.out, n, p[8], p[9]);
        let chunk = ROWS_PER_TASK * 4 * d;
        block
            .activated
            .par_chunks_mut(chunk)
            .zip(block.gelu_tanh.par_chunks_mut(chunk))
            .zip(block.expanded.par_chunks(chunk))
            .for_each(|((a, t), e)| gelu_forward(e, a, t));
        dense_forward(output, &block.activated, n, p[10], p[11]);
        output
            .iter_mut()
            .zip(middle.iter())
            .for_each(|(o, m)| *o += m);
    }

    // Head.
    final_norm.forward(
        stream.last().expect("embeddings at least"),
        final_gain,
        final_shift,
    );
    dense_forward(logits, &final_norm.out, n, head_weight, head_bias);
}

/// Next-token cross-entropy summed over the first `len` sequences of the batch `rows` (the
/// rest pad it to the buffers' size), averaged over each sequence's tokens, and how many
/// tokens the model predicts.
pub(super) fn evaluate_batch(
    buffers: &mut Buffers,
    params: &[&[f32]],
    data: &DeviceData,
    rows: &[usize],
    len: usize,
) -> candle_core::Result<(f64, usize)> {
    gather(data, rows, buffers)?;
    let time = buffers.time;
    forward(buffers, params, rows.len() * time);
    let tokens = len * time;
    Ok(sequence_loss_and_hits(
        &buffers.logits[..tokens * buffers.vocab],
        &buffers.targets[..tokens],
        buffers.vocab,
        time,
    ))
}

/// Forward and backward pass of the transformer on the batch `rows`; see
/// `super::forward_backward`.
pub(super) fn forward_backward(
    buffers: &mut Buffers,
    params: &[&[f32]],
    grads: &mut [Vec<f32>],
    data: &DeviceData,
    rows: &[usize],
) -> candle_core::Result<f64> {
    gather(data, rows, buffers)?;
    let n = rows.len() * buffers.time;
    let tail = 2 + BLOCK_VARS * buffers.blocks.len();
    let (final_gain, head_weight) = (params[tail], params[tail + 2]);
    forward(buffers, params, n);
    let Buffers {
        time,
        d,
        heads,
        vocab,
        tokens,
        targets,
        blocks,
        final_norm,
        logits,
        logits_grad,
        grad_stream,
        grad_norm,
        grad_qkv,
        grad_mixed,
        grad_expanded,
        grad_weights,
        ..
    } = buffers;
    let (time, d, heads, vocab) = (*time, *d, *heads, *vocab);
    let shape = (time, d, heads);
    let loss = cross_entropy(logits, targets, vocab, logits_grad);
    if !loss.is_finite() {
        return Ok(loss);
    }

    // Backward: head, final norm.
    {
        let (rest, head) = grads.split_at_mut(tail + 2);
        let (head_w, head_b) = head.split_at_mut(1);
        dense_backward(
            logits_grad,
            &final_norm.out,
            n,
            head_weight,
            &mut head_w[0],
            &mut head_b[0],
            Some(grad_norm),
        );
        let (gain, shift) = rest[tail..].split_at_mut(1);
        grad_stream.fill(0.0);
        final_norm.backward(
            grad_norm,
            final_gain,
            &mut gain[0],
            &mut shift[0],
            grad_stream,
        );
    }

    // Blocks, last first; `grad_stream` carries d(loss)/d(residual stream).
    for (index, block) in blocks.iter().enumerate().rev() {
        let p = &params[2 + BLOCK_VARS * index..][..BLOCK_VARS];
        let g = &mut grads[2 + BLOCK_VARS * index..][..BLOCK_VARS];
        let [g_norm1_gain, g_norm1_shift, g_norm2_gain, g_norm2_shift, g_qkv_w, g_qkv_b, g_proj_w, g_proj_b, g_expand_w, g_expand_b, g_contract_w, g_contract_b] =
            g
        else {
            unreachable!("BLOCK_VARS variables per block");
        };

        // MLP: output = middle + contract(gelu(expand(norm_mlp(middle)))).
        dense_backward(
            grad_stream,
            &block.activated,
            n,
            p[10],
            g_contract_w,
            g_contract_b,
            Some(grad_expanded),
        );
        let chunk = ROWS_PER_TASK * 4 * d;
        grad_expanded
            .par_chunks_mut(chunk)
            .zip(block.expanded.par_chunks(chunk))
            .zip(block.gelu_tanh.par_chunks(chunk))
            .for_each(|((g, e), t)| gelu_backward(e, t, g));
        dense_backward(
            grad_expanded,
            &block.norm_mlp.out,
            n,
            p[8],
            g_expand_w,
            g_expand_b,
            Some(grad_norm),
        );
        block
            .norm_mlp
            .backward(grad_norm, p[2], g_norm2_gain, g_norm2_shift, grad_stream);

        // Attention: middle = input + projection(attention(norm_attention(input))).
        dense_backward(
            grad_stream,
            &block.mixed,
            n,
            p[6],
            g_proj_w,
            g_proj_b,
            Some(grad_mixed),
        );
        attention_backward(
            shape,
            &block.qkv,
            &block.weights,
            grad_mixed,
            grad_weights,
            grad_qkv,
        );
        dense_backward(
            grad_qkv,
            &block.norm_attention.out,
            n,
            p[4],
            g_qkv_w,
            g_qkv_b,
            Some(grad_norm),
        );
        block
            .norm_attention
            .backward(grad_norm, p[0], g_norm1_gain, g_norm1_shift, grad_stream);
    }

    // Embeddings: scatter-add per token id and per position.
    let (token_grad, rest) = grads.split_at_mut(1);
    let (token_grad, position_grad) = (&mut token_grad[0], &mut rest[0]);
    token_grad.fill(0.0);
    position_grad.fill(0.0);
    for ((row, g), &token) in grad_stream.chunks_exact(d).enumerate().zip(tokens.iter()) {
        let token_row = &mut token_grad[token as usize * d..][..d];
        token_row.iter_mut().zip(g).for_each(|(t, g)| *t += g);
        let position_row = &mut position_grad[(row % time) * d..][..d];
        position_row.iter_mut().zip(g).for_each(|(p, g)| *p += g);
    }
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use crate::engine::batch::DeviceData;
    use crate::engine::data::{Dataset, Features, Targets, Task};
    use crate::engine::model::{Model, ModelShape};
    use crate::engine::rng::Rng;
    use crate::engine::spec::ModelSpec;

    #[test]
    fn transformer_gradients_match_autograd() {
        let (rows, time, vocab) = (12, 5, 7);
        let mut rng = Rng::new(5);
        let mut ids =
            || -> Vec<u32> { (0..rows * time).map(|_| rng.below(vocab) as u32).collect() };
        let data = Dataset {
            features: Features::Tokens {
                ids: ids(),
                context: time,
            },
            targets: Targets::Tokens { ids: ids(), vocab },
        };
        let shape = ModelShape {
            input: vec![time],
            output: vocab,
            task: Task::LanguageModel,
        };
        // A context longer than the sequences: the unused position rows get zero gradient.
        let spec = ModelSpec::Transformer {
            d_model: 8,
            heads: 2,
            layers: 2,
            context: 6,
        };
        let device = Device::Cpu;
        let model = Model::build(&spec, &shape, 9, &device).unwrap();
        let train = DeviceData::new(&data, &device).unwrap();
        super::super::tests::assert_matches_autograd(&model, &train, &[3, 0, 7, 11]);
        super::super::tests::assert_evaluation_matches_candle(&model, &train);
    }
}
