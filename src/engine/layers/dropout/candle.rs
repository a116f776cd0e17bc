//! Dropout on candle.

use candle_core::Tensor;

use crate::engine::rng::Rng;

/// Inverted dropout with a mask from the engine's seeded generator.
pub(crate) fn apply_dropout(x: &Tensor, rate: f64, rng: &mut Rng) -> candle_core::Result<Tensor> {
    let keep = 1.0 - rate;
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < keep { scale } else { 0.0 })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}
