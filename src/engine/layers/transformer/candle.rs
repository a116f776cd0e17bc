//! Embeddings and the transformer block on candle.

use candle_core::{Tensor, Var, D};

use crate::engine::layers::linear::candle::linear;
use crate::engine::layers::norm::candle::layer_norm;

/// `[batch, time]` token ids to `[batch, time, dim]` rows of the weight.
pub(super) fn embedding(x: &Tensor, weight: &Var) -> candle_core::Result<Tensor> {
    let (batch, time) = x.dims2()?;
    let dim = weight.dim(1)?;
    weight
        .as_tensor()
        .index_select(&x.flatten_all()?, 0)?
        .reshape((batch, time, dim))
}

/// The block's forward pass, `[batch, time, dim]` to `[batch, time, dim]`; `p` holds its
/// parameters in declaration order (see `TransformerBlock::tensors`).
pub(super) fn block(x: &Tensor, heads: usize, p: [&Var; 12]) -> candle_core::Result<Tensor> {
    let [norm_attention_gain, norm_attention_shift, norm_mlp_gain, norm_mlp_shift, qkv_weight, qkv_bias, projection_weight, projection_bias, expand_weight, expand_bias, contract_weight, contract_bias] =
        p;
    let normed = layer_norm(x, norm_attention_gain, norm_attention_shift)?;
    let attended = attention(&normed, heads, [qkv_weight, qkv_bias])?;
    let h = (x + linear(&attended, projection_weight, projection_bias)?)?;
    let expanded = linear(
        &layer_norm(&h, norm_mlp_gain, norm_mlp_shift)?,
        expand_weight,
        expand_bias,
    )?
    .gelu()?;
    &h + linear(&expanded, contract_weight, contract_bias)?
}

/// Causal multi-head self-attention over the fused `qkv` projection (before the output
/// projection).
fn attention(x: &Tensor, heads: usize, [weight, bias]: [&Var; 2]) -> candle_core::Result<Tensor> {
    let (batch, time, dim) = x.dims3()?;
    let head_dim = dim / heads;
    let qkv = linear(x, weight, bias)?.reshape((batch, time, 3, heads, head_dim))?;
    // `[batch, heads, time, head_dim]` each.
    let part = |index: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(2, index, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()
    };
    let (query, key, value) = (part(0)?, part(1)?, part(2)?);
    let scores = (query.matmul(&key.t()?.contiguous()?)? / (head_dim as f64).sqrt())?
        .broadcast_add(&causal_mask(time, x.device())?)?;
    // candle_nn's `softmax_last_dim` has no backward pass; `softmax` is stock ops.
    let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
    weights
        .matmul(&value)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch, time, dim))
}

/// `[time, time]`: 0 where a position may attend, -inf above the diagonal.
fn causal_mask(time: usize, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..time * time)
        .map(|i| {
            if i % time > i / time {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (time, time), device)
}
