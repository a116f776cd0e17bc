//! The convolution on candle.

use candle_core::{Tensor, Var};

pub(super) fn conv2d(
    x: &Tensor,
    weight: &Var,
    bias: &Var,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    even_remainders(x, weight.dim(2)?, stride, padding)?
        .conv2d(weight.as_tensor(), padding, stride, 1, 1)?
        .broadcast_add(&bias.as_tensor().reshape((1, (), 1, 1))?)
}

/// A strided convolution's input, padded with zeros at the bottom or right so that height and
/// width leave the same remainder past the last window. candle 0.11's convolution backward
/// takes one output padding, from the height, for both sides, and fails on a width that
/// leaves another. The zeros sit where no window reads, so the output is unchanged.
fn even_remainders(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if stride == 1 {
        return Ok(x.clone());
    }
    let (_, _, height, width) = x.dims4()?;
    let remainder = |side: usize| (side + 2 * padding - kernel) % stride;
    let (r_h, r_w) = (remainder(height), remainder(width));
    match r_h.cmp(&r_w) {
        std::cmp::Ordering::Less => x.pad_with_zeros(2, 0, r_w - r_h),
        std::cmp::Ordering::Greater => x.pad_with_zeros(3, 0, r_h - r_w),
        std::cmp::Ordering::Equal => Ok(x.clone()),
    }
}
