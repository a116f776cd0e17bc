//! The convolution's native pass: im2col of the whole batch (one row per kernel tap), one
//! product with the weight, and col2im for the input's gradient; or the fused conv + ReLU +
//! pool node of `conv_block` when the layers after a 3x3 convolution allow it.

use rayon::prelude::*;

use super::conv_block::ConvBlock;
use super::Conv2d;
use crate::engine::kernels::gemm::{matmul, Operand};
use crate::engine::kernels::vector::row_sum;
use crate::engine::layers::activation::Activation;
use crate::engine::layers::native::{buffer_len, Input, Kernel, NodeBuild, NodeParts};
use crate::engine::layers::pooling::MaxPool2d;
use crate::engine::layers::Layer;
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;

/// A convolution's sizes: input `[channels, height, width]`, output `[outputs, out_h, out_w]`.
#[derive(Debug, Clone, Copy)]
struct Conv {
    channels: usize,
    height: usize,
    width: usize,
    outputs: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
}

impl Conv {
    fn pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Values per patch: `channels * kernel * kernel`, in (c, ky, kx) order, the order of
    /// PyTorch's `[out, c, k, k]` weight flattened.
    fn depth(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// The (c, ky, kx) of the patch value at `tap`.
    fn tap(&self, tap: usize) -> (usize, usize, usize) {
        let area = self.kernel * self.kernel;
        (
            tap / area,
            tap / self.kernel % self.kernel,
            tap % self.kernel,
        )
    }
}

/// Parameters `weight` (an index into the model's) and `weight + 1`.
struct ConvNode {
    weight: usize,
    conv: Conv,
    /// im2col of the batch, tap-major: `[depth, n * pixels]`, one row per (c, ky, kx).
    columns: Vec<f32>,
    /// The output (forward) or its gradient (backward) channel-major over the batch,
    /// `[out, n * pixels]`.
    rows: Vec<f32>,
    /// d(loss)/d(columns).
    column_grad: Vec<f32>,
}

/// `conv2d` 3x3 (stride 1, padding 1) + `relu` + `max_pool2d` 2, fused (parameters `weight`
/// and `weight + 1`).
struct BlockNode {
    weight: usize,
    block: ConvBlock,
}

/// Whether `conv` and the layers after it are a 3x3 convolution (stride 1, padding 1), a
/// ReLU and a 2x2 max pool, which run as one [`ConvBlock`].
fn fuses_relu_pool(conv: &Conv2d, following: &[Box<dyn Layer>]) -> bool {
    let [relu, pool, ..] = following else {
        return false;
    };
    conv.kernel == 3
        && conv.stride == 1
        && conv.padding == 1
        && relu
            .as_any()
            .downcast_ref::<Activation>()
            .is_some_and(Activation::is_relu)
        && pool
            .as_any()
            .downcast_ref::<MaxPool2d>()
            .is_some_and(|pool| pool.size == 2)
}

pub(super) fn node(
    layer: &Conv2d,
    input: &[usize],
    build: &mut NodeBuild<'_>,
    following: &[Box<dyn Layer>],
) -> candle_core::Result<NodeParts> {
    let rows = build.rows;
    if let (true, &[channels, height, width]) = (fuses_relu_pool(layer, following), input) {
        let outputs = layer.outputs;
        // The block's largest buffers: the patches and the activated output.
        buffer_len(&[rows, height, width, 9, channels])?;
        buffer_len(&[rows, height, width, outputs])?;
        let block = ConvBlock::new(channels, outputs, height, width, rows);
        let output = block.output_dims();
        let node = BlockNode {
            weight: build.parameters(2),
            block,
        };
        return Ok(NodeParts {
            fused: 2,
            ..NodeParts::new(node, output)
        });
    }
    let Conv2d {
        outputs,
        inputs: channels,
        kernel,
        stride,
        padding,
    } = *layer;
    let [_, height, width] = input[..] else {
        candle_core::bail!("native step: conv2d on {input:?}");
    };
    let side = |size: usize| {
        padding
            .checked_mul(2)
            .and_then(|p| p.checked_add(size))
            .and_then(|padded| padded.checked_sub(kernel))
            .map(|span| span / stride + 1)
    };
    let (Some(out_h), Some(out_w)) = (side(height), side(width)) else {
        candle_core::bail!("native step: conv2d's output on {input:?} does not fit");
    };
    let conv = Conv {
        channels,
        height,
        width,
        outputs,
        kernel,
        stride,
        padding,
        out_h,
        out_w,
    };
    // `Conv::pixels` and `Conv::depth` multiply unchecked: these cover them.
    let patches = buffer_len(&[rows, out_h, out_w, channels, kernel, kernel])?;
    let channel_rows = buffer_len(&[rows, out_h, out_w, outputs])?;
    let node = ConvNode {
        weight: build.parameters(2),
        conv,
        columns: vec![0.0; patches],
        rows: vec![0.0; channel_rows],
        column_grad: vec![0.0; patches],
    };
    Ok(NodeParts::new(node, vec![outputs, out_h, out_w]))
}

impl Kernel for ConvNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        n: usize,
        params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let conv = self.conv;
        let x = input.values();
        let batch_pixels = n * conv.pixels();
        self.columns
            .par_chunks_mut(batch_pixels)
            .enumerate()
            .for_each(|(tap, row)| im2col_tap(x, conv, tap, row));
        matmul(
            &mut self.rows,
            conv.outputs,
            batch_pixels,
            conv.depth(),
            Operand::plain(params[self.weight], conv.depth()),
            Operand::plain(&self.columns, batch_pixels),
        );
        let (bias, pixels) = (params[self.weight + 1], conv.pixels());
        let rows = &self.rows;
        out.par_chunks_exact_mut(conv.outputs * pixels)
            .enumerate()
            .for_each(|(image, sample)| channels_to_samples(rows, bias, image, pixels, sample));
        Ok(())
    }

    fn backward(
        &mut self,
        _input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        params: &[&[f32]],
        grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        let conv = self.conv;
        let rows = &mut self.rows;
        let batch_pixels = rows.len() / conv.outputs;
        let pixels = conv.pixels();
        rows.par_chunks_exact_mut(batch_pixels)
            .enumerate()
            .for_each(|(o, row)| samples_to_channels(grad_out, pixels, o, row));
        let (weight_grad, bias_grad) = grads[self.weight..].split_at_mut(1);
        for (sum, row) in bias_grad[0].iter_mut().zip(rows.chunks_exact(batch_pixels)) {
            *sum = row_sum(row);
        }
        matmul(
            &mut weight_grad[0],
            conv.outputs,
            conv.depth(),
            batch_pixels,
            Operand::plain(rows, batch_pixels),
            Operand::transposed(&self.columns, batch_pixels),
        );
        if let Some(grad_in) = grad_in {
            let column_grad = &mut self.column_grad;
            matmul(
                column_grad,
                conv.depth(),
                batch_pixels,
                conv.outputs,
                Operand::transposed(params[self.weight], conv.depth()),
                Operand::plain(rows, batch_pixels),
            );
            let per_image = conv.channels * conv.height * conv.width;
            let column_grad = &*column_grad;
            grad_in
                .par_chunks_mut(per_image)
                .enumerate()
                .for_each(|(image, grad)| col2im(column_grad, conv, image, batch_pixels, grad));
        }
    }

    fn has_parameters(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> usize {
        (self.columns.len() + self.rows.len() + self.column_grad.len()) * 4
    }
}

impl Kernel for BlockNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        n: usize,
        params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let weight = self.weight;
        self.block
            .forward(input.values(), n, params[weight], params[weight + 1], out);
        Ok(())
    }

    fn backward(
        &mut self,
        _input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        _params: &[&[f32]],
        grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        let n = grad_out.len() / self.block.output_dims().iter().product::<usize>();
        let (weight_grad, bias_grad) = grads[self.weight..].split_at_mut(1);
        self.block
            .backward(grad_out, n, &mut weight_grad[0], &mut bias_grad[0], grad_in);
    }

    fn has_parameters(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> usize {
        self.block.allocated_bytes()
    }
}

/// For output coordinate `o` along a side of `size` inputs, the input coordinate a tap at
/// kernel offset `k` reads, if inside the image.
#[inline(always)]
fn source(o: usize, k: usize, conv: &Conv, size: usize) -> Option<usize> {
    (o * conv.stride + k)
        .checked_sub(conv.padding)
        .filter(|&at| at < size)
}

/// The output columns `[first, last)` whose tap at offset `kx` reads inside the image.
fn inside_columns(kx: usize, conv: &Conv) -> (usize, usize) {
    let first = (0..conv.out_w)
        .find(|&ox| source(ox, kx, conv, conv.width).is_some())
        .unwrap_or(conv.out_w);
    let last = (first..conv.out_w)
        .find(|&ox| source(ox, kx, conv, conv.width).is_none())
        .unwrap_or(conv.out_w);
    (first, last)
}

simd_kernel! {
    /// One row of the batch's im2col: tap `tap` = (c, ky, kx) for every output pixel of
    /// every image, zero where the window overhangs the padding. With stride 1 each output row
    /// is a copy of an input row segment.
    fn im2col_tap(x: &[f32], conv: Conv, tap: usize, row: &mut [f32]) {
        let (c, ky, kx) = conv.tap(tap);
        let (first, last) = inside_columns(kx, &conv);
        let image_len = conv.channels * conv.height * conv.width;
        for (image, out) in row.chunks_exact_mut(conv.pixels()).enumerate() {
            let plane = &x[image * image_len + c * conv.height * conv.width..]
                [..conv.height * conv.width];
            for (oy, out) in out.chunks_exact_mut(conv.out_w).enumerate() {
                let Some(y) = source(oy, ky, &conv, conv.height) else {
                    out.fill(0.0);
                    continue;
                };
                out[..first].fill(0.0);
                out[last..].fill(0.0);
                if first == last {
                    continue;
                }
                let line = &plane[y * conv.width..][..conv.width];
                let start = first * conv.stride + kx - conv.padding;
                if conv.stride == 1 {
                    out[first..last].copy_from_slice(&line[start..start + last - first]);
                } else {
                    for (o, value) in out[first..last].iter_mut().enumerate() {
                        *value = line[start + o * conv.stride];
                    }
                }
            }
        }
    }
}

simd_kernel! {
    /// The adjoint of `im2col_tap` for one image: sums its patch gradients (its pixels'
    /// columns of every tap row of `columns`, `[depth, batch_pixels]`) back onto the image.
    fn col2im(columns: &[f32], conv: Conv, image: usize, batch_pixels: usize, grad: &mut [f32]) {
        grad.fill(0.0);
        for (tap, row) in columns.chunks_exact(batch_pixels).enumerate() {
            let (c, ky, kx) = conv.tap(tap);
            let (first, last) = inside_columns(kx, &conv);
            if first == last {
                continue;
            }
            let plane = &mut grad[c * conv.height * conv.width..][..conv.height * conv.width];
            let pixels = &row[image * conv.pixels()..][..conv.pixels()];
            for (oy, values) in pixels.chunks_exact(conv.out_w).enumerate() {
                let Some(y) = source(oy, ky, &conv, conv.height) else {
                    continue;
                };
                let line = &mut plane[y * conv.width..][..conv.width];
                let start = first * conv.stride + kx - conv.padding;
                if conv.stride == 1 {
                    for (g, &v) in line[start..start + last - first].iter_mut().zip(&values[first..last]) {
                        *g += v;
                    }
                } else {
                    for (o, &v) in values[first..last].iter().enumerate() {
                        line[start + o * conv.stride] += v;
                    }
                }
            }
        }
    }
}

simd_kernel! {
    /// Image `image` of `[out, n * pixels]` (channel-major over the batch) plus the bias, as
    /// its `[out, pixels]` sample.
    fn channels_to_samples(rows: &[f32], bias: &[f32], image: usize, pixels: usize, sample: &mut [f32]) {
        let batch_pixels = rows.len() / bias.len();
        for (o, plane) in sample.chunks_exact_mut(pixels).enumerate() {
            let from = &rows[o * batch_pixels + image * pixels..][..pixels];
            for (value, &v) in plane.iter_mut().zip(from) {
                *value = v + bias[o];
            }
        }
    }
}

simd_kernel! {
    /// Channel `o` of `[n, out, pixels]` as its row `[n * pixels]` of `[out, n * pixels]`.
    fn samples_to_channels(samples: &[f32], pixels: usize, o: usize, row: &mut [f32]) {
        let per_sample = samples.len() / (row.len() / pixels).max(1);
        for (image, to) in row.chunks_exact_mut(pixels).enumerate() {
            to.copy_from_slice(&samples[image * per_sample + o * pixels..][..pixels]);
        }
    }
}
