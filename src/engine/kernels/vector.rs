//! Element-wise vector kernels shared by layers: sums of two vectors and row sums.

use super::math::sum;
use crate::engine::simd::simd_kernel;

simd_kernel! {
    /// `out = x + y`, element by element.
    pub(crate) fn add_into(out: &mut [f32], x: &[f32], y: &[f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
            *o = x + y;
        }
    }
}

simd_kernel! {
    /// `sum += values`, element by element.
    pub(crate) fn add_assign(sum: &mut [f32], values: &[f32]) {
        for (s, &v) in sum.iter_mut().zip(values) {
            *s += v;
        }
    }
}

simd_kernel! {
    pub(crate) fn row_sum(row: &[f32]) -> f32 {
        sum(row)
    }
}
