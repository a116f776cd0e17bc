//! `conv2d` (kernel 3, stride 1, padding 1) + `relu` + `max_pool2d` (2) as one node: the
//! preset CNN's stage, and the most common opening of a user's image network.
//!
//! Inside the node the maps are pixel-major (NHWC): each pixel's 3x3 patch is one row of
//! `9 * channels` values with the channels contiguous, so im2col and col2im copy runs of
//! channels, the product has the batch's pixels as its long side (where gemm packs least),
//! and bias, ReLU and pooling run on whole rows of channels. The node reads and writes NCHW
//! like every other node; the layout changes cost one pass over the input and the (4x
//! smaller) pooled output. It computes what the three layers compute one by one (the tests
//! hold the whole layer path to candle and to PyTorch).

use rayon::prelude::*;

use crate::engine::kernels::gemm::{column_sums, matmul, matmul_serial, Operand};
use crate::engine::simd::simd_kernel;

/// One stage's buffers for a batch of `rows` images.
pub(super) struct ConvBlock {
    channels: usize,
    outputs: usize,
    height: usize,
    width: usize,
    /// The input (forward) or its gradient (backward), NHWC.
    pixels_in: Vec<f32>,
    /// im2col patches, `[rows * height * width, 9 * channels]`, columns in (ky, kx, c) order.
    columns: Vec<f32>,
    /// The weight as `[outputs, 9 * channels]` in the same column order.
    weight: Vec<f32>,
    /// ReLU output before pooling, `[rows, height, width, outputs]`; reused for its gradient.
    activated: Vec<f32>,
    /// Pooled output (or its gradient), NHWC, and which of the window's 4 positions won.
    pooled: Vec<f32>,
    winner: Vec<u8>,
    /// Gradient of the weight in (ky, kx, c) order, and of the patches.
    weight_grad: Vec<f32>,
    column_grad: Vec<f32>,
}

/// Image geometry of one stage (NHWC, `channels` per pixel).
#[derive(Clone, Copy)]
struct Geometry {
    height: usize,
    width: usize,
    channels: usize,
}

impl ConvBlock {
    pub(super) fn new(
        channels: usize,
        outputs: usize,
        height: usize,
        width: usize,
        rows: usize,
    ) -> Self {
        let pixels = rows * height * width;
        let pooled = rows * (height / 2) * (width / 2) * outputs;
        Self {
            channels,
            outputs,
            height,
            width,
            pixels_in: vec![0.0; pixels * channels],
            columns: vec![0.0; pixels * 9 * channels],
            weight: vec![0.0; outputs * 9 * channels],
            activated: vec![0.0; pixels * outputs],
            pooled: vec![0.0; pooled],
            winner: vec![0; pooled],
            weight_grad: vec![0.0; outputs * 9 * channels],
            column_grad: vec![0.0; pixels * 9 * channels],
        }
    }

    /// Per-sample output dims: `[outputs, height / 2, width / 2]`.
    pub(super) fn output_dims(&self) -> Vec<usize> {
        vec![self.outputs, self.height / 2, self.width / 2]
    }

    /// Values held (for the admission test).
    pub(super) fn allocated_bytes(&self) -> usize {
        4 * (self.pixels_in.len()
            + self.columns.len()
            + self.weight.len()
            + self.activated.len()
            + self.pooled.len()
            + self.weight_grad.len()
            + self.column_grad.len())
            + self.winner.len()
    }

    fn geometry(&self) -> (Geometry, Geometry) {
        let input = Geometry {
            height: self.height,
            width: self.width,
            channels: self.channels,
        };
        let output = Geometry {
            channels: self.outputs,
            ..input
        };
        (input, output)
    }

    /// The stage on `n` NCHW images `x`; writes the pooled NCHW maps to `out`.
    pub(super) fn forward(
        &mut self,
        x: &[f32],
        n: usize,
        weight: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) {
        let (channels, outputs) = (self.channels, self.outputs);
        let (input, output) = self.geometry();
        let plane = self.height * self.width;
        for_each_weight_index(outputs, channels, |stored, column| {
            self.weight[column] = weight[stored];
        });
        // A few images at a time, each chunk on one thread from its input to its pooled
        // maps, so that its patches are still in cache when its product reads them (one
        // product over the whole batch read them back from memory: 107 GFLOP/s in the step
        // against 180 alone).
        let images = chunk_images(plane * 9 * channels);
        let pooled_len = self.pooled.len() / n.max(1);
        let weight = &self.weight;
        let (columns_len, activated_len) = (plane * 9 * channels, plane * outputs);
        x[..n * plane * channels]
            .par_chunks(images * plane * channels)
            .zip(self.pixels_in.par_chunks_mut(images * plane * channels))
            .zip(self.columns.par_chunks_mut(images * columns_len))
            .zip(self.activated.par_chunks_mut(images * activated_len))
            .zip(self.pooled.par_chunks_mut(images * pooled_len))
            .zip(self.winner.par_chunks_mut(images * pooled_len))
            .for_each(|(((((x, pixels), columns), activated), pooled), winner)| {
                let count = x.len() / (plane * channels);
                for ((image, pixels), columns) in x
                    .chunks(plane * channels)
                    .zip(pixels.chunks_mut(plane * channels))
                    .zip(columns.chunks_mut(columns_len))
                {
                    planes_to_pixels(image, plane, pixels);
                    im2col_image(pixels, input, columns);
                }
                matmul_serial(
                    activated,
                    count * plane,
                    outputs,
                    9 * channels,
                    Operand::plain(columns, 9 * channels),
                    Operand::transposed(weight, 9 * channels),
                );
                for values in activated.chunks_mut(outputs * self.width) {
                    bias_relu(values, bias);
                }
                for ((pooled, winner), image) in pooled
                    .chunks_mut(pooled_len)
                    .zip(winner.chunks_mut(pooled_len))
                    .zip(activated.chunks(activated_len))
                {
                    max_pool_image(image, output, pooled, winner);
                }
            });
        let pooled_plane = (self.height / 2) * (self.width / 2);
        per_image(&self.pooled, out, n, |pooled, sample| {
            pixels_to_planes(pooled, pooled_plane, sample)
        });
    }

    /// `grad_out` is d(loss)/d(pooled output), NCHW. Writes the weight and bias gradients
    /// and, when asked, d(loss)/d(input) in NCHW.
    pub(super) fn backward(
        &mut self,
        grad_out: &[f32],
        n: usize,
        weight_grad: &mut [f32],
        bias_grad: &mut [f32],
        grad_in: Option<&mut [f32]>,
    ) {
        let (channels, outputs) = (self.channels, self.outputs);
        let (input, output) = self.geometry();
        let plane = self.height * self.width;
        let pooled_plane = (self.height / 2) * (self.width / 2);
        per_image(grad_out, &mut self.pooled, n, |sample, pooled| {
            planes_to_pixels(sample, pooled_plane, pooled)
        });
        let pooled_len = self.pooled.len() / n.max(1);
        self.activated
            .par_chunks_mut(plane * outputs)
            .zip(self.pooled.par_chunks(pooled_len))
            .zip(self.winner.par_chunks(pooled_len))
            .for_each(|((activated, grad), winner)| {
                pool_relu_backward_image(grad, winner, output, activated)
            });
        let grad = &self.activated;
        column_sums(grad, bias_grad);
        matmul(
            &mut self.weight_grad,
            outputs,
            9 * channels,
            n * plane,
            Operand::transposed(grad, outputs),
            Operand::plain(&self.columns, 9 * channels),
        );
        for_each_weight_index(outputs, channels, |stored, column| {
            weight_grad[stored] = self.weight_grad[column];
        });
        if let Some(grad_in) = grad_in {
            matmul(
                &mut self.column_grad,
                n * plane,
                9 * channels,
                outputs,
                Operand::plain(grad, outputs),
                Operand::plain(&self.weight, 9 * channels),
            );
            per_image(
                &self.column_grad,
                &mut self.pixels_in,
                n,
                |columns, image| col2im_image(columns, input, image),
            );
            per_image(&self.pixels_in, grad_in, n, |pixels, sample| {
                pixels_to_planes(pixels, plane, sample)
            });
        }
    }
}

/// Patch values a chunk of the forward pass holds at most (one image always): 384 KiB of
/// patches, which stay in a core's L2 cache until the chunk's product reads them.
const CHUNK_PATCH_VALUES: usize = 96 * 1024;

/// Images per chunk of the forward pass, for images of `patch_values` patch values each. It
/// depends only on the shapes, so the results do not depend on the thread count.
fn chunk_images(patch_values: usize) -> usize {
    (CHUNK_PATCH_VALUES / patch_values.max(1)).max(1)
}

/// Runs `kernel` on each image of a batch in parallel: `inputs` and `outputs` are split
/// into `n` equal chunks, one per image.
fn per_image<A: Sync, B: Send>(
    inputs: &[A],
    outputs: &mut [B],
    n: usize,
    kernel: impl Fn(&[A], &mut [B]) + Sync,
) {
    if n == 0 {
        return;
    }
    let (in_len, out_len) = (inputs.len() / n, outputs.len() / n);
    outputs[..out_len * n]
        .par_chunks_mut(out_len)
        .zip(inputs[..in_len * n].par_chunks(in_len))
        .for_each(|(output, input)| kernel(input, output));
}

/// Calls `f(stored, column)` for every weight of a convolution: its index in the stored
/// `[outputs, channels, 3, 3]` layout and in the `[outputs, (ky, kx, c)]` layout that matches
/// the patch columns.
fn for_each_weight_index(outputs: usize, channels: usize, mut f: impl FnMut(usize, usize)) {
    for o in 0..outputs {
        for c in 0..channels {
            for tap in 0..9 {
                f((o * channels + c) * 9 + tap, (o * 9 + tap) * channels + c);
            }
        }
    }
}

simd_kernel! {
    /// One sample's `[channels, plane]` as `[plane, channels]`.
    fn planes_to_pixels(planes: &[f32], plane: usize, pixels: &mut [f32]) {
        let channels = planes.len() / plane;
        if channels == 1 {
            pixels.copy_from_slice(planes);
            return;
        }
        for (p, values) in pixels.chunks_exact_mut(channels).enumerate() {
            for (c, value) in values.iter_mut().enumerate() {
                *value = planes[c * plane + p];
            }
        }
    }
}

simd_kernel! {
    /// One sample's `[plane, channels]` as `[channels, plane]`.
    fn pixels_to_planes(pixels: &[f32], plane: usize, planes: &mut [f32]) {
        let channels = pixels.len() / plane;
        if channels == 1 {
            planes.copy_from_slice(pixels);
            return;
        }
        for (c, values) in planes.chunks_exact_mut(plane).enumerate() {
            for (p, value) in values.iter_mut().enumerate() {
                *value = pixels[p * channels + c];
            }
        }
    }
}

simd_kernel! {
    /// im2col of one NHWC image for a 3x3 kernel with padding 1: `columns` is
    /// `[height * width, 9 * channels]`, columns in (ky, kx, c) order, padding taps zero.
    fn im2col_image(input: &[f32], geometry: Geometry, columns: &mut [f32]) {
        let Geometry {
            height,
            width,
            channels: c,
        } = geometry;
        for y in 0..height {
            for x in 0..width {
                let row = &mut columns[(y * width + x) * 9 * c..][..9 * c];
                for (tap, values) in row.chunks_exact_mut(c).enumerate() {
                    let (sy, sx) = (y + tap / 3, x + tap % 3);
                    if sy < 1 || sy > height || sx < 1 || sx > width {
                        values.fill(0.0);
                    } else if c == 1 {
                        // One channel (grey images): a plain store, not a 4-byte memcpy call.
                        values[0] = input[(sy - 1) * width + sx - 1];
                    } else {
                        let source = ((sy - 1) * width + sx - 1) * c;
                        values.copy_from_slice(&input[source..source + c]);
                    }
                }
            }
        }
    }
}

simd_kernel! {
    /// The adjoint of `im2col_image`: sums patch gradients back onto the image.
    fn col2im_image(columns: &[f32], geometry: Geometry, image: &mut [f32]) {
        let Geometry {
            height,
            width,
            channels: c,
        } = geometry;
        image.fill(0.0);
        for y in 0..height {
            for x in 0..width {
                for ky in 0..3 {
                    let sy = y + ky;
                    if sy < 1 || sy > height {
                        continue;
                    }
                    for kx in 0..3 {
                        let sx = x + kx;
                        if sx < 1 || sx > width {
                            continue;
                        }
                        let src = &columns[((y * width + x) * 9 + ky * 3 + kx) * c..][..c];
                        let target = ((sy - 1) * width + sx - 1) * c;
                        for (value, g) in image[target..target + c].iter_mut().zip(src) {
                            *value += g;
                        }
                    }
                }
            }
        }
    }
}

simd_kernel! {
    /// `values = max(values + bias, 0)` on rows of `bias.len()` channels.
    fn bias_relu(values: &mut [f32], bias: &[f32]) {
        for row in values.chunks_exact_mut(bias.len()) {
            for (value, b) in row.iter_mut().zip(bias) {
                *value = (*value + b).max(0.0);
            }
        }
    }
}

simd_kernel! {
    /// 2x2 max pooling of one NHWC map (odd edges dropped, the first maximum wins ties, as in
    /// PyTorch); `winner` records which of the window's 4 positions won.
    fn max_pool_image(input: &[f32], geometry: Geometry, pooled: &mut [f32], winner: &mut [u8]) {
        let Geometry {
            height,
            width,
            channels: c,
        } = geometry;
        let out_w = width / 2;
        for oy in 0..height / 2 {
            for ox in 0..out_w {
                let at =
                    |dy: usize, dx: usize| &input[((2 * oy + dy) * width + 2 * ox + dx) * c..][..c];
                let (p0, p1, p2, p3) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                let out = (oy * out_w + ox) * c;
                let (pooled, winner) = (&mut pooled[out..out + c], &mut winner[out..out + c]);
                for i in 0..c {
                    let (mut best, mut won) = (p0[i], 0u8);
                    if p1[i] > best {
                        (best, won) = (p1[i], 1);
                    }
                    if p2[i] > best {
                        (best, won) = (p2[i], 2);
                    }
                    if p3[i] > best {
                        (best, won) = (p3[i], 3);
                    }
                    pooled[i] = best;
                    winner[i] = won;
                }
            }
        }
    }
}

simd_kernel! {
    /// The backward pass of ReLU + 2x2 max pool on one image: `activated` holds the ReLU output
    /// on entry and d(loss)/d(pre-activation) on exit. Each window's gradient goes to its
    /// winner if the ReLU let it through; every other position, including rows and columns
    /// an odd size left out of the pool, gets zero.
    fn pool_relu_backward_image(
        pooled_grad: &[f32],
        winner: &[u8],
        geometry: Geometry,
        activated: &mut [f32],
    ) {
        let Geometry {
            height,
            width,
            channels: c,
        } = geometry;
        let (out_h, out_w) = (height / 2, width / 2);
        for oy in 0..out_h {
            for ox in 0..out_w {
                let out = (oy * out_w + ox) * c;
                let (grad, winner) = (&pooled_grad[out..out + c], &winner[out..out + c]);
                for position in 0..4u8 {
                    let (dy, dx) = (usize::from(position / 2), usize::from(position % 2));
                    let at = ((2 * oy + dy) * width + 2 * ox + dx) * c;
                    for ((value, g), won) in activated[at..at + c].iter_mut().zip(grad).zip(winner)
                    {
                        // `&`, not `&&`: no branch, so the loop vectorizes.
                        let routed = (*won == position) & (*value > 0.0);
                        *value = if routed { *g } else { 0.0 };
                    }
                }
            }
        }
        if height % 2 == 1 {
            activated[(height - 1) * width * c..].fill(0.0);
        }
        if width % 2 == 1 {
            for y in 0..height {
                let at = (y * width + width - 1) * c;
                activated[at..at + c].fill(0.0);
            }
        }
    }
}
