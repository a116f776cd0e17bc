//! Scalar and lane-wise f32 math the native kernels inline into their loops: `exp` and the
//! tanh form of GELU without libm calls (so that loops over them vectorize), and sums, dots
//! and maxima in fixed lanes (so that results do not depend on the SIMD level).

/// sqrt(2 / pi), the constant of the tanh approximation of GELU (PyTorch's
/// `gelu(approximate="tanh")`, candle's `gelu`).
const GELU_SCALE: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;
/// PyTorch's LayerNorm default.
pub(crate) const LAYER_NORM_EPS: f32 = 1e-5;

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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn fast_tanh_is_within_2e7_of_tanh_everywhere() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.001;
            assert!((fast_tanh(x) - x.tanh()).abs() < 2e-7, "{x}");
        }
        assert_eq!(fast_tanh(100.0), 1.0);
        assert_eq!(fast_tanh(-100.0), -1.0);
    }
}
