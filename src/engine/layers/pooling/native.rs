//! Pooling's native pass, one sample at a time in parallel over the batch.

use rayon::prelude::*;

use crate::engine::layers::native::{batch_len, Input, Kernel, NodeBuild, NodeParts};
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;

/// A pooling window's sizes on `[channels, height, width]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pool {
    channels: usize,
    height: usize,
    width: usize,
    size: usize,
}

impl Pool {
    fn of(size: usize, input: &[usize]) -> candle_core::Result<Pool> {
        let &[channels, height, width] = input else {
            candle_core::bail!("native step: pooling on {input:?}");
        };
        Ok(Pool {
            channels,
            height,
            width,
            size,
        })
    }

    fn out_h(&self) -> usize {
        self.height / self.size
    }

    fn out_w(&self) -> usize {
        self.width / self.size
    }

    fn output(&self) -> Vec<usize> {
        vec![self.channels, self.out_h(), self.out_w()]
    }

    fn per_in(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn per_out(&self) -> usize {
        self.channels * self.out_h() * self.out_w()
    }
}

struct MaxPoolNode {
    pool: Pool,
    /// Per output value, the index of its window's first maximum in the sample's input.
    winner: Vec<u32>,
}

pub(super) fn max_pool_node(
    size: usize,
    input: &[usize],
    build: &mut NodeBuild<'_>,
) -> candle_core::Result<NodeParts> {
    let pool = Pool::of(size, input)?;
    let output = pool.output();
    let node = MaxPoolNode {
        pool,
        winner: vec![0; batch_len(build.rows, &output)?],
    };
    Ok(NodeParts::new(node, output))
}

impl Kernel for MaxPoolNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        _params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let pool = self.pool;
        let (per_in, per_out) = (pool.per_in(), pool.per_out());
        input
            .values()
            .par_chunks_exact(per_in)
            .zip(out.par_chunks_exact_mut(per_out))
            .zip(self.winner.par_chunks_exact_mut(per_out))
            .for_each(|((x, out), winner)| max_pool(x, pool, out, winner));
        Ok(())
    }

    fn backward(
        &mut self,
        _input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        _params: &[&[f32]],
        _grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        if let Some(grad_in) = grad_in {
            let (per_in, per_out) = (self.pool.per_in(), self.pool.per_out());
            grad_in
                .par_chunks_exact_mut(per_in)
                .zip(grad_out.par_chunks_exact(per_out))
                .zip(self.winner.par_chunks_exact(per_out))
                .for_each(|((grad_in, grad_out), winner)| {
                    grad_in.fill(0.0);
                    for (&g, &at) in grad_out.iter().zip(winner) {
                        grad_in[at as usize] += g;
                    }
                });
        }
    }

    fn allocated_bytes(&self) -> usize {
        self.winner.len() * 4
    }
}

struct AvgPoolNode(Pool);

pub(super) fn avg_pool_node(size: usize, input: &[usize]) -> candle_core::Result<NodeParts> {
    let pool = Pool::of(size, input)?;
    let output = pool.output();
    Ok(NodeParts::new(AvgPoolNode(pool), output))
}

impl Kernel for AvgPoolNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        _params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let pool = self.0;
        input
            .values()
            .par_chunks_exact(pool.per_in())
            .zip(out.par_chunks_exact_mut(pool.per_out()))
            .for_each(|(x, out)| avg_pool(x, pool, out));
        Ok(())
    }

    fn backward(
        &mut self,
        _input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        _params: &[&[f32]],
        _grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        if let Some(grad_in) = grad_in {
            let pool = self.0;
            grad_in
                .par_chunks_exact_mut(pool.per_in())
                .zip(grad_out.par_chunks_exact(pool.per_out()))
                .for_each(|(grad_in, grad_out)| avg_pool_backward(grad_out, pool, grad_in));
        }
    }
}

/// Values per channel plane, averaged to one.
struct AdaptiveNode(usize);

pub(super) fn adaptive_node(input: &[usize]) -> candle_core::Result<NodeParts> {
    let &[channels, height, width] = input else {
        candle_core::bail!("native step: pooling on {input:?}");
    };
    Ok(NodeParts::new(
        AdaptiveNode(height * width),
        vec![channels, 1, 1],
    ))
}

impl Kernel for AdaptiveNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        _params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let plane = self.0;
        let scale = 1.0 / plane as f64;
        for (value, plane_values) in out.iter_mut().zip(input.values().chunks_exact(plane)) {
            let sum: f64 = plane_values.iter().map(|&v| f64::from(v)).sum();
            *value = (sum * scale) as f32;
        }
        Ok(())
    }

    fn backward(
        &mut self,
        _input: Input<'_>,
        _out: &[f32],
        grad_out: &[f32],
        _params: &[&[f32]],
        _grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    ) {
        if let Some(grad_in) = grad_in {
            let plane = self.0;
            let scale = 1.0 / plane as f32;
            for (values, &g) in grad_in.chunks_exact_mut(plane).zip(grad_out) {
                values.fill(g * scale);
            }
        }
    }
}

/// Max pooling of one sample: each window's first maximum in row-major order (PyTorch's
/// choice on ties), its index in the sample recorded for the backward pass.
fn max_pool(x: &[f32], pool: Pool, out: &mut [f32], winner: &mut [u32]) {
    let (out_h, out_w, size) = (pool.out_h(), pool.out_w(), pool.size);
    let plane = pool.height * pool.width;
    if size == 2 {
        for c in 0..pool.channels {
            for oy in 0..out_h {
                let top = c * plane + 2 * oy * pool.width;
                let o = (c * out_h + oy) * out_w;
                max_pool_2x2_row(
                    x,
                    top,
                    pool.width,
                    &mut out[o..o + out_w],
                    &mut winner[o..o + out_w],
                );
            }
        }
        return;
    }
    for c in 0..pool.channels {
        for oy in 0..out_h {
            for ox in 0..out_w {
                let mut best_at = c * plane + oy * size * pool.width + ox * size;
                let mut best = x[best_at];
                for dy in 0..size {
                    for dx in 0..size {
                        let at = c * plane + (oy * size + dy) * pool.width + ox * size + dx;
                        if x[at] > best {
                            best = x[at];
                            best_at = at;
                        }
                    }
                }
                let o = (c * out_h + oy) * out_w + ox;
                out[o] = best;
                winner[o] = best_at as u32;
            }
        }
    }
}

simd_kernel! {
    /// One row of 2x2 windows whose top-left values start at `x[top]`, rows `width` apart:
    /// the same comparisons, in the same order, as the general loop of `max_pool`, written
    /// so that they vectorize.
    fn max_pool_2x2_row(
        x: &[f32],
        top: usize,
        width: usize,
        out: &mut [f32],
        winner: &mut [u32],
    ) {
        let (upper, lower) = (&x[top..top + width], &x[top + width..top + 2 * width]);
        for (ox, (value, at)) in out.iter_mut().zip(winner.iter_mut()).enumerate() {
            let left = 2 * ox;
            let mut best = upper[left];
            let mut offset = 0;
            if upper[left + 1] > best {
                best = upper[left + 1];
                offset = 1;
            }
            if lower[left] > best {
                best = lower[left];
                offset = width;
            }
            if lower[left + 1] > best {
                best = lower[left + 1];
                offset = width + 1;
            }
            *value = best;
            *at = (top + left + offset) as u32;
        }
    }
}

fn avg_pool(x: &[f32], pool: Pool, out: &mut [f32]) {
    let (out_h, out_w, size) = (pool.out_h(), pool.out_w(), pool.size);
    let plane = pool.height * pool.width;
    let scale = 1.0 / (size * size) as f32;
    for c in 0..pool.channels {
        for oy in 0..out_h {
            for ox in 0..out_w {
                let mut sum = 0f32;
                for dy in 0..size {
                    let row = c * plane + (oy * size + dy) * pool.width + ox * size;
                    sum += x[row..row + size].iter().sum::<f32>();
                }
                out[(c * out_h + oy) * out_w + ox] = sum * scale;
            }
        }
    }
}

/// Each window's gradient shared equally by its values; rows and columns past the last whole
/// window get zero.
fn avg_pool_backward(grad_out: &[f32], pool: Pool, grad_in: &mut [f32]) {
    grad_in.fill(0.0);
    let (out_h, out_w, size) = (pool.out_h(), pool.out_w(), pool.size);
    let plane = pool.height * pool.width;
    let scale = 1.0 / (size * size) as f32;
    for c in 0..pool.channels {
        for oy in 0..out_h {
            for ox in 0..out_w {
                let g = grad_out[(c * out_h + oy) * out_w + ox] * scale;
                for dy in 0..size {
                    let row = c * plane + (oy * size + dy) * pool.width + ox * size;
                    grad_in[row..row + size].fill(g);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2x2 row kernel picks what the window definition picks: the largest value, the
    /// first in row-major order on a tie, and never a NaN over a number before it; odd sizes
    /// leave the last row and column out.
    #[test]
    fn two_by_two_windows_pick_the_first_largest_value() {
        let pool = Pool::of(2, &[2, 5, 7]).unwrap();
        let values = [0.0, 1.0, 1.0, -1.0, f32::NAN, 2.0, 0.5];
        let x: Vec<f32> = (0..pool.per_in())
            .map(|i| values[(i * 5 + i / 3) % values.len()])
            .collect();
        let mut out = vec![f32::NAN; pool.per_out()];
        let mut winner = vec![u32::MAX; pool.per_out()];
        max_pool(&x, pool, &mut out, &mut winner);
        let plane = pool.height * pool.width;
        for c in 0..pool.channels {
            for oy in 0..pool.out_h() {
                for ox in 0..pool.out_w() {
                    let window: Vec<usize> = [(0, 0), (0, 1), (1, 0), (1, 1)]
                        .iter()
                        .map(|(dy, dx)| c * plane + (2 * oy + dy) * pool.width + 2 * ox + dx)
                        .collect();
                    let mut best = window[0];
                    for &at in &window[1..] {
                        if x[at] > x[best] {
                            best = at;
                        }
                    }
                    let o = (c * pool.out_h() + oy) * pool.out_w() + ox;
                    assert_eq!(winner[o] as usize, best, "window {c} {oy} {ox}");
                    assert_eq!(out[o].to_bits(), x[best].to_bits(), "window {c} {oy} {ox}");
                }
            }
        }
    }
}
