//! Pooling on candle.

use candle_core::{Tensor, D};

/// The non-overlapping `size x size` windows of `[n, c, h, w]` as `[n, c, h/size, w/size,
/// size * size]` (rows and columns past the last whole window dropped, as PyTorch does).
fn windows(x: &Tensor, size: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (out_h, out_w) = (h / size, w / size);
    x.narrow(2, 0, out_h * size)?
        .narrow(3, 0, out_w * size)?
        .reshape((n, c, out_h, size, out_w, size))?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((n, c, out_h, out_w, size * size))
}

/// Max pooling whose gradient goes whole to each window's first maximum, as PyTorch's does:
/// the window's values times a one-hot mask of its argmax (a constant), summed.
pub(super) fn max_pool(x: &Tensor, size: usize) -> candle_core::Result<Tensor> {
    let windows = windows(x, size)?;
    let first_max = windows.detach().argmax_keepdim(D::Minus1)?;
    let positions = Tensor::arange(0u32, (size * size) as u32, x.device())?;
    let mask = first_max
        .broadcast_eq(&positions.reshape((1, 1, 1, 1, size * size))?)?
        .to_dtype(x.dtype())?;
    (windows * mask)?.sum(D::Minus1)
}

pub(super) fn avg_pool(x: &Tensor, size: usize) -> candle_core::Result<Tensor> {
    windows(x, size)?.mean(D::Minus1)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Ties in a window (a ReLU's zeros, repeated values) send the whole gradient to the
    /// first maximum, as PyTorch's max_pool2d does.
    #[test]
    fn max_pool_gradient_goes_to_the_first_maximum() {
        let x = Var::from_tensor(
            &Tensor::from_vec(
                vec![
                    1f32, 3., 3., 0., 2., 2., 2., 2., 5., 1., 1., 5., 0., 0., 0., 0.,
                ],
                (1, 1, 4, 4),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
        let pooled = max_pool(x.as_tensor(), 2).unwrap();
        assert_eq!(values(&pooled), vec![3., 3., 5., 5.]);
        let grads = pooled.sum_all().unwrap().backward().unwrap();
        let grad = values(grads.get(x.as_tensor()).unwrap());
        // Windows: [1 3; 2 2] -> position (0,1); [3 0; 2 2] -> (0,2); [5 1; 0 0] -> (2,0);
        // [1 5; 0 0] -> (2,3).
        let mut want = vec![0f32; 16];
        for at in [1, 2, 8, 11] {
            want[at] = 1.0;
        }
        assert_eq!(grad, want);
    }
}
