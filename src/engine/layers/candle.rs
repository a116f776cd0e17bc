//! A list of layers on candle: each layer's forward pass in turn, on its own tensors.

use candle_core::Tensor;

use super::weights::Weights;
use super::Layer;
use crate::engine::rng::Rng;

/// `layers` one after the other on `x`; `train` is the dropout generator in training mode.
pub fn forward_list(
    layers: &[Box<dyn Layer>],
    x: &Tensor,
    weights: &mut Weights<'_>,
    train: &mut Option<&mut Rng>,
) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for layer in layers {
        h = layer.candle_forward(&h, weights, train)?;
    }
    Ok(h)
}
