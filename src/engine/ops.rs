//! Fused CPU kernels with their own backward passes for the operations candle composes from
//! many small tensor ops (GELU, softmax over the last dimension, layer normalisation). Each is
//! one pass over memory forward and one backward instead of five to ten temporaries. On other
//! devices the composed candle versions run instead.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};

/// sqrt(2 / pi), the constant of the tanh approximation of GELU (PyTorch's
/// `gelu(approximate="tanh")`, candle's `gelu`).
const GELU_SCALE: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;
/// PyTorch's LayerNorm default.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// The f32 values of a contiguous CPU tensor.
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op}: only f32 is supported");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&values[start..end])
}

fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1).max(1)
}

pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(PointwiseForward(Gelu))
}

pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(SoftmaxLastDim)
}

/// (x - mean) / sqrt(var + eps) over the last dimension, without the affine part.
pub fn normalize_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        return centred.broadcast_div(&(variance + LAYER_NORM_EPS as f64)?.sqrt()?);
    }
    x.contiguous()?.apply_op1(Normalize)
}

/// e^x for f32 without a libm call, so that loops over it vectorize: x = k ln2 + r with
/// |r| <= ln2 / 2, e^r by its Taylor series to r^6 (relative error below 3e-7, two to three
/// units in the last place), 2^k put straight into the exponent bits. Inputs are clamped to
/// [-87, 88], where e^x is a normal f32: below, the result is about 1.6e-38 instead of a
/// denormal or 0, which no softmax or GELU here can tell apart.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a high part with few enough bits that k * LN2_HIGH is exact, and the
    // rest, for an accurate reduction.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = (x - k * LN2_HIGH) - k * LN2_LOW;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // k itself sits in the low mantissa bits of `shifted`: integer arithmetic on the bits
    // gives 2^k without a float-to-int conversion (which would not vectorize).
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(k_bits.wrapping_add(127) << 23)
}

/// Independent accumulators for the reductions below. One running f32 sum (or max) is a
/// serial chain the compiler may not reorder; eight partial results let the loop vectorize.
const LANES: usize = 8;

/// The sum of `values`, summed in `LANES` interleaved partial sums.
#[inline(always)]
pub(crate) fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The dot product of two equally long slices, in `LANES` partial sums.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, x), y) in lanes.iter_mut().zip(a).zip(b) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The largest of `values` (negative infinity when empty; NaNs are skipped).
#[inline(always)]
pub(crate) fn max_value(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    lanes
        .into_iter()
        .fold(tail, |m, v| if v > m { v } else { m })
}

/// tanh with one `exp`: (e^2x - 1) / (e^2x + 1). Its absolute error (about 1e-7) is all
/// GELU's `1 + tanh` can see, and it costs a fraction of libm's `tanhf`, which dominated a
/// transformer's step. Past |x| = 9, tanh is 1 to f32 precision.
#[inline(always)]
fn fast_tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.clamp(-9.0, 9.0));
    (e - 1.0) / (e + 1.0)
}

#[inline(always)]
pub(crate) fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + gelu_tanh(x))
}

#[inline(always)]
pub(crate) fn gelu_derivative(x: f32) -> f32 {
    gelu_derivative_with(x, gelu_tanh(x))
}

/// The tanh inside GELU, tanh(sqrt(2 / pi) (x + 0.044715 x^3)): GELU(x) = x (1 + t) / 2.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    fast_tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x))
}

/// GELU's derivative at x given its inner tanh `t` (saved by a forward pass that kept it).
#[inline(always)]
pub(crate) fn gelu_derivative_with(x: f32, t: f32) -> f32 {
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
}

/// An element-wise activation whose gradient is `grad * derivative(input)`. The kernels
/// are generic over it, so each activation's functions inline into its own loops.
trait Pointwise: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    fn value(x: f32) -> f32;
    fn derivative(x: f32) -> f32;
}

#[derive(Clone, Copy)]
struct Gelu;

impl Pointwise for Gelu {
    const NAME: &'static str = "lrtune-gelu";
    fn value(x: f32) -> f32 {
        gelu_value(x)
    }
    fn derivative(x: f32) -> f32 {
        gelu_derivative(x)
    }
}

#[derive(Clone, Copy)]
struct Relu;

impl Pointwise for Relu {
    const NAME: &'static str = "lrtune-relu";
    fn value(x: f32) -> f32 {
        x.max(0.0)
    }
    fn derivative(x: f32) -> f32 {
        if x > 0.0 {
            1.0
        } else {
            0.0
        }
    }
}

struct PointwiseForward<P>(P);

impl<P: Pointwise> CustomOp1 for PointwiseForward<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, P::NAME)?;
        let y = x.iter().map(|&v| P::value(v)).collect();
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &PointwiseBackward(self.0),
        )?))
    }
}

struct PointwiseBackward<P>(P);

impl<P: Pointwise> CustomOp2 for PointwiseBackward<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, P::NAME)?;
        let grad = contiguous_f32(grad, grad_layout, P::NAME)?;
        let dx = x
            .iter()
            .zip(grad)
            .map(|(&v, &g)| g * P::derivative(v))
            .collect();
        Ok((CpuStorage::F32(dx), x_layout.shape().clone()))
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "lrtune-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let width = last_dim(layout);
        let mut y = vec![0f32; x.len()];
        for (row, out) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
            let max = max_value(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = exp(v - max);
            }
            let inverse = 1.0 / sum(out);
            out.iter_mut().for_each(|o| *o *= inverse);
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SoftmaxBackward,
        )?))
    }
}

/// dx = y * (g - sum(g * y)) per row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "lrtune-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        y_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(y, y_layout, self.name())?;
        let grad = contiguous_f32(grad, grad_layout, self.name())?;
        let width = last_dim(y_layout);
        let mut dx = vec![0f32; y.len()];
        for ((y_row, g_row), out) in y
            .chunks_exact(width)
            .zip(grad.chunks_exact(width))
            .zip(dx.chunks_exact_mut(width))
        {
            let dot = dot(y_row, g_row);
            for ((o, &yv), &gv) in out.iter_mut().zip(y_row).zip(g_row) {
                *o = yv * (gv - dot);
            }
        }
        Ok((CpuStorage::F32(dx), y_layout.shape().clone()))
    }
}

struct Normalize;

/// Mean and 1 / standard deviation of a row.
#[inline(always)]
pub(crate) fn row_stats(row: &[f32]) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum(row) / n;
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += (v - mean) * (v - mean);
        }
    }
    let variance = (lanes.iter().sum::<f32>() + tail) / n;
    (mean, 1.0 / (variance + LAYER_NORM_EPS).sqrt())
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "lrtune-normalize"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let width = last_dim(layout);
        let mut y = vec![0f32; x.len()];
        for (row, out) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
            let (mean, inv_std) = row_stats(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = (v - mean) * inv_std;
            }
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &NormalizeBackward,
        )?))
    }
}

/// dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat)) per row.
struct NormalizeBackward;

impl CustomOp2 for NormalizeBackward {
    fn name(&self) -> &'static str {
        "lrtune-normalize-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let grad = contiguous_f32(grad, grad_layout, self.name())?;
        let width = last_dim(x_layout);
        let n = width as f32;
        let mut dx = vec![0f32; x.len()];
        for ((row, g_row), out) in x
            .chunks_exact(width)
            .zip(grad.chunks_exact(width))
            .zip(dx.chunks_exact_mut(width))
        {
            let (mean, inv_std) = row_stats(row);
            let mut g_sum = 0.0;
            let mut g_xhat_sum = 0.0;
            for (&v, &g) in row.iter().zip(g_row) {
                g_sum += g;
                g_xhat_sum += g * (v - mean) * inv_std;
            }
            let (g_mean, g_xhat_mean) = (g_sum / n, g_xhat_sum / n);
            for ((o, &v), &g) in out.iter_mut().zip(row).zip(g_row) {
                let x_hat = (v - mean) * inv_std;
                *o = inv_std * (g - g_mean - x_hat * g_xhat_mean);
            }
        }
        Ok((CpuStorage::F32(dx), x_layout.shape().clone()))
    }
}

/// `x + bias` with `bias` broadcast over every leading dimension of `x` (a dense layer's
/// bias). candle's broadcast backward reduces over the leading dimensions with a strided
/// loop; here the bias gradient is one contiguous pass of column sums.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.broadcast_add(bias);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "lrtune-add-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let bias = contiguous_f32(bias, bias_layout, self.name())?;
        let width = last_dim(x_layout);
        if bias.len() != width {
            candle_core::bail!(
                "{}: bias of {} for rows of {width}",
                self.name(),
                bias.len()
            );
        }
        let mut y = x.to_vec();
        for row in y.chunks_exact_mut(width) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let bias_grad = grad.apply_op1_no_bwd(&ColumnSums)?.reshape(bias.shape())?;
        Ok((Some(grad), Some(bias_grad)))
    }
}

/// Sums over every leading dimension: [..., width] -> [width].
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "lrtune-column-sums"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let width = last_dim(layout);
        let mut sums = vec![0f32; width];
        for row in x.chunks_exact(width) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
        Ok((CpuStorage::F32(sums), Shape::from(width)))
    }
}

/// The patches of a 3x3 convolution with padding 1 and stride 1 as rows of a matrix:
/// `[batch, channels, height, width]` -> `[batch * height * width, channels * 9]`, column
/// `c * 9 + ky * 3 + kx` as in a PyTorch `[out, in, 3, 3]` weight. The convolution is then
/// one matmul forward and two backward, instead of candle's direct convolution whose
/// backward dominates a CNN's step on the CPU.
pub fn im2col_3x3(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Im2Col)
}

#[derive(Clone, Copy)]
struct ImageDims {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl ImageDims {
    fn of(layout: &Layout) -> candle_core::Result<Self> {
        let &[batch, channels, height, width] = layout.dims() else {
            candle_core::bail!(
                "im2col: expected [batch, channels, height, width], got {:?}",
                layout.dims()
            );
        };
        Ok(Self {
            batch,
            channels,
            height,
            width,
        })
    }

    /// Calls `f(row, column, source)` for every patch entry that falls inside the image
    /// (padding entries are zero and skipped).
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let plane = self.height * self.width;
        for b in 0..self.batch {
            for c in 0..self.channels {
                let source_plane = (b * self.channels + c) * plane;
                for_each_3x3_tap(self.height, self.width, |pixel, tap, source| {
                    f(b * plane + pixel, c * 9 + tap, source_plane + source);
                });
            }
        }
    }
}

/// Calls `f(pixel, tap, source_pixel)` for the taps (0..9, row-major) of every pixel's 3x3
/// window, padding 1, that fall inside a `height x width` image; pixels are numbered
/// row-major. Used by the NCHW im2col/col2im here and the NHWC col2im of the native step.
#[inline(always)]
pub(crate) fn for_each_3x3_tap(
    height: usize,
    width: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    for y in 0..height {
        for x in 0..width {
            for ky in 0..3 {
                let sy = y + ky;
                if sy < 1 || sy > height {
                    continue;
                }
                for kx in 0..3 {
                    let sx = x + kx;
                    if sx >= 1 && sx <= width {
                        f(y * width + x, ky * 3 + kx, (sy - 1) * width + sx - 1);
                    }
                }
            }
        }
    }
}

struct Im2Col;

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "lrtune-im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let dims = ImageDims::of(layout)?;
        let columns = dims.channels * 9;
        let rows = dims.batch * dims.height * dims.width;
        let mut cols = vec![0f32; rows * columns];
        dims.for_each_tap(|row, column, source| cols[row * columns + column] = x[source]);
        Ok((CpuStorage::F32(cols), Shape::from((rows, columns))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (batch, channels, height, width) = arg.dims4()?;
        let dims = ImageDims {
            batch,
            channels,
            height,
            width,
        };
        Ok(Some(
            grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im(dims))?,
        ))
    }
}

/// The adjoint of `Im2Col`: every patch entry's gradient added back to its pixel.
struct Col2Im(ImageDims);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "lrtune-col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(storage, layout, self.name())?;
        let dims = self.0;
        let columns = dims.channels * 9;
        let mut x = vec![0f32; dims.batch * dims.channels * dims.height * dims.width];
        dims.for_each_tap(|row, column, source| x[source] += cols[row * columns + column]);
        Ok((
            CpuStorage::F32(x),
            Shape::from((dims.batch, dims.channels, dims.height, dims.width)),
        ))
    }
}

pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.relu();
    }
    x.contiguous()?.apply_op1(PointwiseForward(Relu))
}

/// 2x2 max pooling with stride 2 over `[batch, channels, height, width]` (odd edges are
/// dropped, as PyTorch does); the backward pass routes each gradient to its window's maximum.
pub fn max_pool_2x2(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.max_pool2d(2);
    }
    x.contiguous()?.apply_op1(MaxPool)
}

/// The position of each window's maximum (first on ties) and the pooled size.
fn pool_windows(x: &[f32], dims: ImageDims, mut f: impl FnMut(usize, usize)) -> (usize, usize) {
    let (out_h, out_w) = (dims.height / 2, dims.width / 2);
    for plane in 0..dims.batch * dims.channels {
        let base = plane * dims.height * dims.width;
        for oy in 0..out_h {
            for ox in 0..out_w {
                let top_left = base + 2 * oy * dims.width + 2 * ox;
                let mut best = top_left;
                for candidate in [
                    top_left + 1,
                    top_left + dims.width,
                    top_left + dims.width + 1,
                ] {
                    if x[candidate] > x[best] {
                        best = candidate;
                    }
                }
                f((plane * out_h + oy) * out_w + ox, best);
            }
        }
    }
    (out_h, out_w)
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "lrtune-max-pool"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let dims = ImageDims::of(layout)?;
        let mut y = vec![0f32; dims.batch * dims.channels * (dims.height / 2) * (dims.width / 2)];
        let (out_h, out_w) = pool_windows(x, dims, |out, source| y[out] = x[source]);
        Ok((
            CpuStorage::F32(y),
            Shape::from((dims.batch, dims.channels, out_h, out_w)),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &MaxPoolBackward,
        )?))
    }
}

struct MaxPoolBackward;

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "lrtune-max-pool-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let grad = contiguous_f32(grad, grad_layout, self.name())?;
        let dims = ImageDims::of(x_layout)?;
        let mut dx = vec![0f32; x.len()];
        pool_windows(x, dims, |out, source| dx[source] += grad[out]);
        Ok((CpuStorage::F32(dx), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn lane_reductions_match_the_plain_ones_at_every_length() {
        for len in [0, 1, 7, 8, 9, 16, 23] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain_sum: f32 = a.iter().sum();
            let plain_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let plain_max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!((sum(&a) - plain_sum).abs() < 1e-5, "sum, len {len}");
            assert!((dot(&a, &b) - plain_dot).abs() < 1e-5, "dot, len {len}");
            assert_eq!(max_value(&a), plain_max, "max, len {len}");
        }
    }

    #[test]
    fn exp_is_within_three_units_in_the_last_place_over_the_normal_range() {
        let mut worst = 0f64;
        for i in 0..350_000 {
            let x = -87.0 + i as f32 * 0.000_5;
            let want = f64::from(x).exp();
            let error = (f64::from(exp(x)) - want).abs() / want;
            worst = worst.max(error);
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        // Clamped below: tiny and positive, never NaN, a denormal or an infinity.
        assert!(exp(-1e9) > 0.0 && exp(-1e9) < 2e-38);
        assert!(exp(f32::NEG_INFINITY) > 0.0);
        assert!(exp(100.0).is_finite());
    }

    /// The fused op and candle's composed reference agree, forward and backward, on a
    /// random (3, 5, 7) tensor with a random upstream gradient.
    fn check(
        fused: fn(&Tensor) -> candle_core::Result<Tensor>,
        reference: fn(&Tensor) -> candle_core::Result<Tensor>,
    ) {
        let device = Device::Cpu;
        let mut rng = crate::engine::rng::Rng::new(5);
        let values: Vec<f32> = (0..105).map(|_| (rng.normal() * 2.0) as f32).collect();
        let weights: Vec<f32> = (0..105).map(|_| rng.normal() as f32).collect();
        let weights = Tensor::from_vec(weights, (3, 5, 7), &device).unwrap();
        let x = Var::from_tensor(&Tensor::from_vec(values, (3, 5, 7), &device).unwrap()).unwrap();
        let run = |f: fn(&Tensor) -> candle_core::Result<Tensor>| {
            let y = f(x.as_tensor()).unwrap();
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), dx)
        };
        let (y_fused, dx_fused) = run(fused);
        let (y_ref, dx_ref) = run(reference);
        for (a, b) in y_fused
            .iter()
            .zip(&y_ref)
            .chain(dx_fused.iter().zip(&dx_ref))
        {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn fused_bias_add_matches_candles_broadcast_add_forward_and_backward() {
        let device = Device::Cpu;
        let bias = Var::from_tensor(
            &Tensor::new(&[0.5f32, -1.0, 2.0, 0.25, 3.0, -0.5, 1.5], &device).unwrap(),
        )
        .unwrap();
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 105.0, &device)
                .unwrap()
                .reshape((3, 5, 7))
                .unwrap(),
        )
        .unwrap();
        let upstream = Tensor::arange(0f32, 105.0, &device)
            .unwrap()
            .reshape((3, 5, 7))
            .unwrap()
            .sin()
            .unwrap();
        let run = |fused: bool| {
            let y = if fused {
                add_bias(x.as_tensor(), bias.as_tensor()).unwrap()
            } else {
                x.as_tensor().broadcast_add(bias.as_tensor()).unwrap()
            };
            let grads = (&y * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                flat(&y),
                flat(grads.get(x.as_tensor()).unwrap()),
                flat(grads.get(bias.as_tensor()).unwrap()),
            )
        };
        let (fused, reference) = (run(true), run(false));
        assert_eq!(fused.0, reference.0);
        assert_eq!(fused.1, reference.1);
        for (a, b) in fused.2.iter().zip(&reference.2) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn a_convolution_as_im2col_and_matmul_matches_candles_conv2d_forward_and_backward() {
        let device = Device::Cpu;
        let mut rng = crate::engine::rng::Rng::new(11);
        let mut random = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            Var::from_tensor(&Tensor::from_vec(values, shape, &device).unwrap()).unwrap()
        };
        let x = random(&[2, 3, 5, 4]);
        let weight = random(&[6, 3, 3, 3]);
        let upstream = random(&[2, 6, 5, 4]);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let run = |fused: bool| {
            let y = if fused {
                let cols = im2col_3x3(x.as_tensor()).unwrap();
                let w = weight.as_tensor().reshape((6, 27)).unwrap();
                cols.matmul(&w.t().unwrap())
                    .unwrap()
                    .reshape((2, 5, 4, 6))
                    .unwrap()
                    .permute((0, 3, 1, 2))
                    .unwrap()
            } else {
                x.as_tensor()
                    .conv2d(weight.as_tensor(), 1, 1, 1, 1)
                    .unwrap()
            };
            let grads = (&y * upstream.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (
                flat(&y),
                flat(grads.get(x.as_tensor()).unwrap()),
                flat(grads.get(weight.as_tensor()).unwrap()),
            )
        };
        let (fused, reference) = (run(true), run(false));
        for (a, b) in fused
            .0
            .iter()
            .zip(&reference.0)
            .chain(fused.1.iter().zip(&reference.1))
            .chain(fused.2.iter().zip(&reference.2))
        {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn fast_tanh_is_within_2e7_of_tanh_everywhere() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.001;
            assert!((fast_tanh(x) - x.tanh()).abs() < 2e-7, "{x}");
        }
        assert_eq!(fast_tanh(100.0), 1.0);
        assert_eq!(fast_tanh(-100.0), -1.0);
    }

    #[test]
    fn fused_relu_matches_candles_relu_forward_and_backward() {
        check(relu, |x| x.relu());
    }

    /// PyTorch's semantics: each window's gradient goes whole to its maximum, and an odd
    /// last column is dropped. (candle 0.11's own max_pool2d backward scales it by 1/4 and
    /// misplaces it on odd sizes, so it is no reference here.)
    #[test]
    fn max_pool_routes_each_gradient_whole_to_its_windows_maximum() {
        let device = Device::Cpu;
        // Windows [1 5 / 3 4] and [2 0 / 7 1]; the fifth column has no window.
        let x = Var::from_tensor(
            &Tensor::new(&[[[[1f32, 5., 2., 0., 9.], [3., 4., 7., 1., 9.]]]], &device).unwrap(),
        )
        .unwrap();
        let y = max_pool_2x2(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[1, 1, 1, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![5., 7.]
        );
        let upstream = Tensor::new(&[[[[0.5f32, -2.0]]]], &device).unwrap();
        let grads = (&y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(dx, vec![0., 0.5, 0., 0., 0., 0., 0., -2., 0., 0.]);
    }

    #[test]
    fn fused_gelu_matches_candles_gelu_forward_and_backward() {
        check(gelu, |x| x.gelu());
    }

    #[test]
    fn fused_softmax_matches_candles_softmax_forward_and_backward() {
        check(softmax_last_dim, |x| candle_nn::ops::softmax(x, D::Minus1));
    }

    #[test]
    fn fused_normalize_matches_the_composed_layer_norm_forward_and_backward() {
        check(normalize_last_dim, |x| {
            let mean = x.mean_keepdim(D::Minus1)?;
            let centred = x.broadcast_sub(&mean)?;
            let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
            centred.broadcast_div(&(variance + LAYER_NORM_EPS as f64)?.sqrt()?)
        });
    }
}
