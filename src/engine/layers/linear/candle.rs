//! The linear layer on candle.

use candle_core::{Tensor, Var};

/// `x W^T + b` on the last dimension: `[rows, inputs]`, or any rank flattened to one matmul.
pub(crate) fn linear(x: &Tensor, weight: &Var, bias: &Var) -> candle_core::Result<Tensor> {
    let weight_t = weight.as_tensor().t()?;
    let y = if x.rank() == 2 {
        x.matmul(&weight_t)?
    } else {
        let dims = x.dims();
        let (leading, inputs) = dims.split_at(dims.len() - 1);
        let mut out_shape = leading.to_vec();
        out_shape.push(weight_t.dim(1)?);
        x.reshape((leading.iter().product::<usize>(), inputs[0]))?
            .matmul(&weight_t)?
            .reshape(out_shape)?
    };
    y.broadcast_add(bias.as_tensor())
}
