//! The norms on candle, in stock candle ops so that they run on any device.

use candle_core::{Tensor, Var, D};

use super::{BATCH_NORM_MOMENTUM, NORM_EPS};

/// Layer norm over the last dimension (PyTorch's: biased variance, eps 1e-5), then
/// `* gain + shift`.
pub(crate) fn layer_norm(x: &Tensor, gain: &Var, shift: &Var) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(variance + NORM_EPS)?.sqrt()?)?
        .broadcast_mul(gain.as_tensor())?
        .broadcast_add(shift.as_tensor())
}

/// Batch norm over the batch (and the spatial positions of `[n, c, h, w]`): in training the
/// batch's statistics normalise and update the running ones (momentum 0.1, the variance
/// unbiased as PyTorch keeps it); in eval the running ones normalise.
pub(crate) fn batch_norm(
    x: &Tensor,
    [weight, bias, running_mean, running_var]: [&Var; 4],
    spatial: bool,
    training: bool,
) -> candle_core::Result<Tensor> {
    let features = weight.dim(0)?;
    // Per-feature values as `[features, values]`.
    let per_feature = if spatial {
        x.transpose(0, 1)?.contiguous()?.reshape((features, ()))?
    } else {
        x.t()?.contiguous()?
    };
    let broadcast_shape: Vec<usize> = if spatial {
        vec![1, features, 1, 1]
    } else {
        vec![1, features]
    };
    let shaped = |t: &Tensor| t.reshape(broadcast_shape.as_slice());
    let (mean, var) = if training {
        let count = per_feature.dim(1)?;
        let mean = per_feature.mean(1)?;
        let centered = per_feature.broadcast_sub(&mean.unsqueeze(1)?)?;
        let var = centered.sqr()?.mean(1)?;
        let unbiased = (var.detach() * (count as f64 / (count.max(2) - 1) as f64))?;
        let m = BATCH_NORM_MOMENTUM;
        running_mean.set(&((running_mean.as_tensor() * (1.0 - m))? + (mean.detach() * m)?)?)?;
        running_var.set(&((running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
        (mean, var)
    } else {
        (
            running_mean.as_tensor().detach(),
            running_var.as_tensor().detach(),
        )
    };
    let inverse_std = (var + NORM_EPS)?.sqrt()?.recip()?;
    x.broadcast_sub(&shaped(&mean)?)?
        .broadcast_mul(&shaped(&(inverse_std * weight.as_tensor())?)?)?
        .broadcast_add(&shaped(bias.as_tensor())?)
}
