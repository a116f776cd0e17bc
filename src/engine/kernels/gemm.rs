//! Matrix products through `gemm` with strides instead of transposed copies, and what a
//! dense layer does with them: `x W^T + b` and its gradients, bias rows and column sums. The
//! split between threads depends only on the shapes, so a result does not depend on the
//! thread count.

use gemm::Parallelism;

use crate::engine::profile;
use crate::engine::simd::simd_kernel;

/// Matrix products below this many multiply-adds run on one thread; above it gemm decides how
/// to split them. With `lrtune bench`, thresholds from 0 to 2^24 gave the same times within the
/// machine's noise (gemm does not split tiny products much anyway), so this is a guard against
/// waking the pool for a product that takes microseconds, not a tuned value.
const PARALLEL_MIN_MACS: usize = 1 << 21;
/// Inner dimensions from this long may be split in two (see `gemm_into`).
const SPLIT_K_MIN_DEPTH: usize = 4096;
/// Matrices with this many values or more have their column sums split in two.
const PARALLEL_SUM_MIN: usize = 1 << 16;

/// A row-major operand of a matrix product, possibly read transposed through its strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// `data` as stored: rows of `cols` values.
    pub(crate) fn plain(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Rows `row_stride` values apart, each read from its start: a block of columns of a
    /// wider row-major matrix.
    pub(crate) fn strided(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of `data`, stored as rows of `stored_cols` values.
    pub(crate) fn transposed(data: &'a [f32], stored_cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: stored_cols,
        }
    }

    /// This operand read transposed.
    pub(crate) fn t(self) -> Self {
        Self {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Columns `[0, at)` and `[at, ..)`.
    fn split_columns(self, at: usize) -> (Self, Self) {
        (
            self,
            Self {
                data: &self.data[at * self.col_stride..],
                ..self
            },
        )
    }

    /// Rows `[0, at)` and `[at, ..)`.
    fn split_rows(self, at: usize) -> (Self, Self) {
        (
            self,
            Self {
                data: &self.data[at * self.row_stride..],
                ..self
            },
        )
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst[m x n] = lhs[m x k] * rhs[k x n]`, row-major `dst`.
pub(crate) fn matmul(dst: &mut [f32], m: usize, n: usize, k: usize, lhs: Operand, rhs: Operand) {
    gemm_into(dst, n, false, m, n, k, lhs, rhs);
}

/// `matmul` on the calling thread alone and outside the profile: for a product inside a
/// parallel loop, one per task.
pub(crate) fn matmul_serial(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
) {
    product(dst, n, false, m, n, k, lhs, rhs, Parallelism::None);
}

/// `dst = lhs * rhs` (or `dst += lhs * rhs` when `accumulate`), where row `i` of the `m x n`
/// result starts at `dst[i * dst_stride]`. The one `unsafe` block in the crate: gemm takes
/// raw pointers and strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
) {
    let _span = profile::span(|| format!("product {m}x{n}x{k}"));
    let parallelism = match rayon::current_num_threads() {
        threads if threads > 1 && m * n * k >= PARALLEL_MIN_MACS => Parallelism::Rayon(threads),
        _ => Parallelism::None,
    };
    product(dst, dst_stride, accumulate, m, n, k, lhs, rhs, parallelism);
}

/// `gemm_into` without its profile span (the halves of a split product may run on another
/// thread).
#[allow(unsafe_code, clippy::too_many_arguments)]
fn product(
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    parallelism: Parallelism,
) {
    assert!(
        n <= dst_stride && (m == 0 || (m - 1) * dst_stride + n <= dst.len()),
        "matmul: destination too small"
    );
    assert!(
        lhs.covers(m, k) && rhs.covers(k, n),
        "matmul: operand too small"
    );
    if m == 0 || n == 0 || (k == 0 && accumulate) {
        return;
    }
    if k == 0 {
        for row in dst.chunks_mut(dst_stride).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    if k >= SPLIT_K_MIN_DEPTH && k >= 16 * m.max(n) && dst_stride == n {
        // A product with a long inner dimension and a small result (a weight gradient summed
        // over a large batch): gemm can only split the result between threads, so split
        // the inner dimension in halves instead and add them. The split depends only on the
        // shape, never on the thread count, so the sums do not either (a serial product
        // takes the halves one after the other).
        let half = k / 2;
        let mut upper = vec![0f32; m * n];
        let (lhs_lo, lhs_hi) = lhs.split_columns(half);
        let (rhs_lo, rhs_hi) = rhs.split_rows(half);
        let mut low = || product(dst, n, accumulate, m, n, half, lhs_lo, rhs_lo, parallelism);
        let mut high = || {
            product(
                &mut upper,
                n,
                false,
                m,
                n,
                k - half,
                lhs_hi,
                rhs_hi,
                parallelism,
            )
        };
        match parallelism {
            Parallelism::None => {
                low();
                high();
            }
            _ => {
                rayon::join(low, high);
            }
        }
        for (value, high) in dst[..m * n].iter_mut().zip(&upper) {
            *value += high;
        }
        return;
    }
    // SAFETY: the asserts above keep every index gemm forms, (rows - 1) * row stride +
    // (cols - 1) * column stride, inside its slice; `dst` does not alias the operands (it is
    // borrowed mutably while they are borrowed shared).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The f32 rate of this build's matrix product on a `size`^3 problem, in FLOP/s: the best of
/// repeated products over at least `seconds` (after one warm-up), on the current thread pool.
/// `lrtune bench` computes its floors from it.
pub fn matmul_flops(size: usize, seconds: f64) -> f64 {
    let lhs: Vec<f32> = (0..size * size)
        .map(|i| (i % 17) as f32 * 0.1 - 0.8)
        .collect();
    let rhs: Vec<f32> = (0..size * size)
        .map(|i| (i % 13) as f32 * 0.1 - 0.6)
        .collect();
    let mut out = vec![0f32; size * size];
    let mut product = || {
        let started = std::time::Instant::now();
        matmul(
            &mut out,
            size,
            size,
            size,
            Operand::plain(&lhs, size),
            Operand::plain(&rhs, size),
        );
        started.elapsed().as_secs_f64()
    };
    product();
    let (mut best, mut spent) = (f64::INFINITY, 0.0);
    while spent < seconds {
        let elapsed = product();
        best = best.min(elapsed);
        spent += elapsed;
    }
    2.0 * (size as f64).powi(3) / best
}

/// `out = x W^T + b` for a `[n, inputs]` x and a `[outputs, inputs]` weight, computed as
/// its transpose `W x^T` into `out_t` (`[outputs, n]`), then transposed into `out`.
///
/// Asked for `x W^T` with a row-major result, gemm packs the weight's rows, `inputs` values
/// apart, a panel at a time; at a power-of-two row length those reads fall into a few cache
/// sets and evict each other, and at any length the strided packing is slow. Asked for the
/// transpose, it reads the weight's rows as they lie. Measured on an AMD EPYC (family 25,
/// model 17) at 128 rows, the forward pass of a dense layer, in ms (alternating builds, three
/// or four runs each): 784 to 512, 0.87 strided, 0.65-0.89 multiplying by a transposed copy
/// of the weight, 0.57-0.76 this way; 512 to 512, 0.91, 0.40-0.54 and 0.47-0.53; 6272 to 128
/// (a CNN's), about 1.7, 1.66-1.89 and 1.25-1.27. The transpose back moves `n x outputs`
/// values, a fraction of the weight's. Below 64 rows or 64 outputs the weight is read
/// through strides.
pub(crate) fn dense_forward_transposed(
    out: &mut [f32],
    x: &[f32],
    n: usize,
    weight: &[f32],
    bias: &[f32],
    out_t: &mut [f32],
) {
    let (outputs, inputs) = (bias.len(), weight.len() / bias.len());
    if n < TRANSPOSED_MIN_ROWS || outputs < TRANSPOSED_MIN_OUTPUTS {
        dense_forward(out, x, n, weight, bias);
        return;
    }
    let out_t = &mut out_t[..n * outputs];
    matmul(
        out_t,
        outputs,
        n,
        inputs,
        Operand::plain(weight, inputs),
        Operand::transposed(x, inputs),
    );
    profile::timed(
        || format!("transpose the output {outputs}x{n}"),
        || transpose(out_t, outputs, n, &mut out[..n * outputs]),
    );
    profile::timed(|| "bias".to_string(), || bias_forward(out, bias));
}

/// Batches from this many rows take `dense_forward_transposed`'s way; smaller ones read the
/// weight through strides.
const TRANSPOSED_MIN_ROWS: usize = 64;
/// Layers with fewer outputs read the weight through strides too: the transposed product has
/// the outputs as its rows, and gemm runs a 10-row product slowly (the MLP's 512 to 10 layer
/// at 128 rows: 0.14 ms transposed, 0.03 ms strided).
const TRANSPOSED_MIN_OUTPUTS: usize = 64;

/// `dst` (`[cols, rows]`) = the transpose of the row-major `src` (`[rows, cols]`). A large
/// one is split between two threads by halves of `dst`.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(
        src.len() == rows * cols && dst.len() == rows * cols,
        "transpose: sizes"
    );
    if src.len() >= PARALLEL_SUM_MIN && cols >= 2 * TILE {
        let half = cols / 2 / TILE * TILE;
        let (top, bottom) = dst.split_at_mut(half * rows);
        rayon::join(
            || transpose_columns(src, rows, cols, 0, half, top),
            || transpose_columns(src, rows, cols, half, cols, bottom),
        );
    } else {
        transpose_columns(src, rows, cols, 0, cols, dst);
    }
}

/// `transpose` moves tiles of `TILE_ROWS` rows of `TILE` values (one 64-byte cache line of
/// each row): measured, 8 x 16 tiles took half the time of 8 x 8 ones on one thread.
const TILE: usize = 16;
const TILE_ROWS: usize = 8;

simd_kernel! {
    /// Columns `first..end` of the row-major `src` (`[rows, cols]`) as the rows of `dst`,
    /// through tiles held in registers.
    fn transpose_columns(
        src: &[f32],
        rows: usize,
        cols: usize,
        first: usize,
        end: usize,
        dst: &mut [f32],
    ) {
        let full_rows = rows / TILE_ROWS * TILE_ROWS;
        let mut col = first;
        while col + TILE <= end {
            for row in (0..full_rows).step_by(TILE_ROWS) {
                let mut tile = [[0f32; TILE]; TILE_ROWS];
                for (offset, line) in tile.iter_mut().enumerate() {
                    let start = (row + offset) * cols + col;
                    line.copy_from_slice(&src[start..start + TILE]);
                }
                for c in 0..TILE {
                    let start = (col - first + c) * rows + row;
                    for (value, line) in dst[start..start + TILE_ROWS].iter_mut().zip(&tile) {
                        *value = line[c];
                    }
                }
            }
            for row in full_rows..rows {
                for c in 0..TILE {
                    dst[(col - first + c) * rows + row] = src[row * cols + col + c];
                }
            }
            col += TILE;
        }
        for c in col..end {
            for row in 0..rows {
                dst[(c - first) * rows + row] = src[row * cols + c];
            }
        }
    }
}

/// `out = x W^T + b` for a `[n, inputs]` x and a `[outputs, inputs]` weight.
pub(crate) fn dense_forward(out: &mut [f32], x: &[f32], n: usize, weight: &[f32], bias: &[f32]) {
    let (outputs, inputs) = (bias.len(), weight.len() / bias.len());
    matmul(
        out,
        n,
        outputs,
        inputs,
        Operand::plain(x, inputs),
        Operand::transposed(weight, inputs),
    );
    profile::timed(|| "bias".to_string(), || bias_forward(out, bias));
}

/// The gradients of `dense_forward`: dW = dy^T x, db = column sums of dy, and, when there is
/// somewhere to put it, dx = dy W.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_backward(
    grad_out: &[f32],
    x: &[f32],
    n: usize,
    weight: &[f32],
    grad_weight: &mut [f32],
    grad_bias: &mut [f32],
    grad_x: Option<&mut [f32]>,
) {
    let (outputs, inputs) = (grad_bias.len(), weight.len() / grad_bias.len());
    matmul(
        grad_weight,
        outputs,
        inputs,
        n,
        Operand::transposed(grad_out, outputs),
        Operand::plain(x, inputs),
    );
    profile::timed(
        || "bias gradient (column sums)".to_string(),
        || column_sums(grad_out, grad_bias),
    );
    if let Some(grad_x) = grad_x {
        matmul(
            grad_x,
            n,
            inputs,
            outputs,
            Operand::plain(grad_out, outputs),
            Operand::plain(weight, inputs),
        );
    }
}

simd_kernel! {
    /// Adds the bias to every row of `z`.
    pub(crate) fn bias_forward(z: &mut [f32], bias: &[f32]) {
        for row in z.chunks_exact_mut(bias.len()) {
            for (value, b) in row.iter_mut().zip(bias) {
                *value += b;
            }
        }
    }
}

/// Column sums of a row-major `[rows, sums.len()]` matrix into `sums`. A large matrix is
/// summed as two halves of its rows on two threads, then added; the split depends only on
/// the size, so the sums do not depend on the thread count.
pub(crate) fn column_sums(values: &[f32], sums: &mut [f32]) {
    let cols = sums.len();
    let rows = values.len() / cols.max(1);
    if values.len() < PARALLEL_SUM_MIN || rows < 2 {
        column_sums_serial(values, sums);
        return;
    }
    let (top, bottom) = values.split_at(rows / 2 * cols);
    let mut lower = vec![0f32; cols];
    rayon::join(
        || column_sums(top, sums),
        || column_sums(bottom, &mut lower),
    );
    for (sum, low) in sums.iter_mut().zip(&lower) {
        *sum += low;
    }
}

simd_kernel! {
    fn column_sums_serial(values: &[f32], sums: &mut [f32]) {
        sums.fill(0.0);
        for row in values.chunks_exact(sums.len()) {
            for (sum, value) in sums.iter_mut().zip(row) {
                *sum += value;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_match_the_definition() {
        // Tiles and edges, on one thread (small) and split in two (large, odd halves).
        for (rows, cols) in [(1, 1), (3, 5), (8, 8), (13, 21), (130, 517), (517, 130)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} [{r}, {c}]"
                    );
                }
            }
        }
    }

    /// The transposed way gives the product the strided read gives, bit for bit, at a batch
    /// that takes it and one that does not.
    #[test]
    fn the_transposed_output_gives_the_strided_product() {
        let (inputs, outputs) = (37, TRANSPOSED_MIN_OUTPUTS + 3);
        let weight: Vec<f32> = (0..inputs * outputs)
            .map(|i| ((i * 29) % 23) as f32 / 23.0 - 0.5)
            .collect();
        let bias: Vec<f32> = (0..outputs).map(|i| i as f32 * 0.01).collect();
        for n in [TRANSPOSED_MIN_ROWS - 1, TRANSPOSED_MIN_ROWS + 5] {
            let x: Vec<f32> = (0..n * inputs)
                .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
                .collect();
            let mut strided = vec![0f32; n * outputs];
            dense_forward(&mut strided, &x, n, &weight, &bias);
            let mut transposed = vec![f32::NAN; n * outputs];
            let mut out_t = vec![f32::NAN; n * outputs];
            dense_forward_transposed(&mut transposed, &x, n, &weight, &bias, &mut out_t);
            assert_eq!(transposed, strided, "{n} rows");
        }
    }

    #[test]
    fn strided_matmul_matches_the_definition() {
        // lhs read transposed from a [k, m] store, rhs plain [k, n].
        let (m, n, k) = (3, 4, 5);
        let lhs_store: Vec<f32> = (0..k * m).map(|i| i as f32 * 0.5 - 3.0).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 2.0).collect();
        let mut dst = vec![f32::NAN; m * n];
        matmul(
            &mut dst,
            m,
            n,
            k,
            Operand::transposed(&lhs_store, m),
            Operand::plain(&rhs, n),
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| lhs_store[p * m + i] * rhs[p * n + j]).sum();
                assert_eq!(dst[i * n + j], want, "[{i}, {j}]");
            }
        }
    }

    /// A long inner dimension, accumulating, against an f64 reference: into a contiguous
    /// destination (the inner dimension is split in halves) and into a strided one (not split;
    /// the columns past `n` stay untouched).
    #[test]
    fn long_accumulating_matmuls_match_the_definition() {
        let (m, n, k) = (3, 2, 2 * SPLIT_K_MIN_DEPTH + 5);
        let lhs: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.5)
            .collect();
        let rhs_store: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53) % 13) as f32 / 13.0 - 0.5)
            .collect();
        for stride in [n, 5] {
            let mut dst = vec![1.0f32; m * stride];
            gemm_into(
                &mut dst,
                stride,
                true,
                m,
                n,
                k,
                Operand::plain(&lhs, k),
                Operand::transposed(&rhs_store, k),
            );
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = 1.0
                        + (0..k)
                            .map(|p| f64::from(lhs[i * k + p]) * f64::from(rhs_store[j * k + p]))
                            .sum::<f64>();
                    let got = f64::from(dst[i * stride + j]);
                    assert!(
                        (got - want).abs() < 1e-3,
                        "stride {stride} [{i}, {j}]: {got} vs {want}"
                    );
                }
                assert!(dst[i * stride + n..i * stride + stride]
                    .iter()
                    .all(|v| *v == 1.0));
            }
        }
    }
}
