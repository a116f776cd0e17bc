//! The norms' native pass. Batch norm's statistics are summed in fixed lanes and added in
//! f64 in sample order, so that they do not depend on the SIMD level or the thread count;
//! the layer norm's row kernels are the transformer block's too.

use candle_core::{Tensor, Var};

use super::{BatchNorm, BATCH_NORM_MOMENTUM, NORM_EPS};
use crate::engine::kernels::math::{dot, row_stats, sum};
use crate::engine::layers::native::{batch_len, Input, Kernel, NodeBuild, NodeParts};
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;

/// Parameters `weight` (gain) and `weight + 1` (shift).
struct BatchNormNode {
    weight: usize,
    features: usize,
    /// Values per feature per sample (1 after `[features]`, h * w after `[c, h, w]`).
    plane: usize,
    running_mean: Var,
    running_var: Var,
    normalized: Vec<f32>,
    inv_std: Vec<f32>,
}

pub(super) fn batch_norm_node(
    norm: &BatchNorm,
    input: &[usize],
    build: &mut NodeBuild<'_>,
) -> candle_core::Result<NodeParts> {
    let features = input[0];
    let plane = if norm.spatial { input[1] * input[2] } else { 1 };
    let weight = build.parameters(2);
    let [running_mean, running_var] = build.buffers();
    let node = BatchNormNode {
        weight,
        features,
        plane,
        running_mean,
        running_var,
        normalized: vec![0.0; batch_len(build.rows, input)?],
        inv_std: vec![0.0; features],
    };
    Ok(NodeParts::new(node, input.to_vec()))
}

impl Kernel for BatchNormNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        n: usize,
        params: &[&[f32]],
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        let x = input.values();
        let (gain, shift) = (params[self.weight], params[self.weight + 1]);
        let (features, plane) = (self.features, self.plane);
        if train.is_some() {
            let (mean, var) = batch_statistics(x, features, plane);
            for (f, inv) in self.inv_std.iter_mut().enumerate() {
                *inv = (1.0 / (var[f] + NORM_EPS).sqrt()) as f32;
            }
            let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
            batch_norm_apply(
                x,
                &mean32,
                &self.inv_std,
                gain,
                shift,
                plane,
                &mut self.normalized,
                out,
            );
            update_running(
                &self.running_mean,
                &self.running_var,
                &mean,
                &var,
                n * plane,
            )?;
        } else {
            let mean = Tensor::to_vec1::<f32>(self.running_mean.as_tensor())?;
            let var = Tensor::to_vec1::<f32>(self.running_var.as_tensor())?;
            let inv: Vec<f32> = var
                .iter()
                .map(|&v| (1.0 / (f64::from(v) + NORM_EPS).sqrt()) as f32)
                .collect();
            // `normalized` is scratch here: eval mode has no backward pass.
            batch_norm_apply(
                x,
                &mean,
                &inv,
                gain,
                shift,
                plane,
                &mut self.normalized,
                out,
            );
        }
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
        let (features, plane) = (self.features, self.plane);
        let normalized = &self.normalized;
        let n = normalized.len() / (features * plane);
        let (weight_grad, bias_grad) = grads[self.weight..].split_at_mut(1);
        let (gain_grad, shift_grad) = (&mut weight_grad[0], &mut bias_grad[0]);
        let (dots, sums) = batch_norm_grad_sums(grad_out, normalized, features, plane);
        for f in 0..features {
            gain_grad[f] = dots[f] as f32;
            shift_grad[f] = sums[f] as f32;
        }
        if let Some(grad_in) = grad_in {
            // dx = gain * inv_std / m * (m dy - sum(dy) - x_hat sum(dy x_hat)), m values
            // per feature: as `a dy + b x_hat + c` per feature.
            let count = (n * plane) as f64;
            let gain = params[self.weight];
            let coefficients: Vec<[f32; 3]> = (0..features)
                .map(|f| {
                    let scale = f64::from(gain[f]) * f64::from(self.inv_std[f]) / count;
                    [
                        (scale * count) as f32,
                        (-scale * dots[f]) as f32,
                        (-scale * sums[f]) as f32,
                    ]
                })
                .collect();
            batch_norm_input_grad(grad_out, normalized, &coefficients, plane, grad_in);
        }
    }

    fn has_parameters(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> usize {
        (self.normalized.len() + self.inv_std.len()) * 4
    }
}

/// Parameters `weight` (gain) and `weight + 1` (shift).
struct LayerNormNode {
    weight: usize,
    normalized: Vec<f32>,
    inv_std: Vec<f32>,
}

pub(super) fn layer_norm_node(
    input: &[usize],
    build: &mut NodeBuild<'_>,
) -> candle_core::Result<NodeParts> {
    let size = *input.last().expect("planned");
    let total = batch_len(build.rows, input)?;
    let node = LayerNormNode {
        weight: build.parameters(2),
        normalized: vec![0.0; total],
        inv_std: vec![0.0; total / size],
    };
    Ok(NodeParts::new(node, input.to_vec()))
}

impl Kernel for LayerNormNode {
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        _n: usize,
        params: &[&[f32]],
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        norm_forward_rows(
            input.values(),
            params[self.weight],
            params[self.weight + 1],
            &mut self.normalized,
            out,
            &mut self.inv_std,
        );
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
        let (weight_grad, bias_grad) = grads[self.weight..].split_at_mut(1);
        norm_parameter_grads(
            grad_out,
            &self.normalized,
            &mut weight_grad[0],
            &mut bias_grad[0],
        );
        if let Some(grad_in) = grad_in {
            grad_in.fill(0.0);
            norm_input_grads(
                grad_out,
                &self.normalized,
                &self.inv_std,
                params[self.weight],
                grad_in,
            );
        }
    }

    fn has_parameters(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> usize {
        (self.normalized.len() + self.inv_std.len()) * 4
    }
}

simd_kernel! {
    /// Per feature, the batch mean and biased variance of `[n, features, plane]` values: each
    /// sample's plane summed in lanes, the planes added in f64 in sample order.
    fn batch_statistics(x: &[f32], features: usize, plane: usize) -> (Vec<f64>, Vec<f64>) {
        let count = (x.len() / features) as f64;
        let mut mean = vec![0f64; features];
        for sample in x.chunks_exact(features * plane) {
            for (m, values) in mean.iter_mut().zip(sample.chunks_exact(plane)) {
                *m += f64::from(sum(values));
            }
        }
        mean.iter_mut().for_each(|m| *m /= count);
        let mut var = vec![0f64; features];
        for sample in x.chunks_exact(features * plane) {
            for ((v, values), &m) in var.iter_mut().zip(sample.chunks_exact(plane)).zip(&mean) {
                let m = m as f32;
                let mut lanes = [0f32; 8];
                let chunks = values.chunks_exact(8);
                let tail: f32 = chunks.remainder().iter().map(|&x| (x - m) * (x - m)).sum();
                for chunk in chunks {
                    for (lane, &x) in lanes.iter_mut().zip(chunk) {
                        *lane += (x - m) * (x - m);
                    }
                }
                *v += f64::from(lanes.iter().sum::<f32>() + tail);
            }
        }
        var.iter_mut().for_each(|v| *v /= count);
        (mean, var)
    }
}

simd_kernel! {
    /// `normalized = (x - mean) * inv_std`, `out = normalized * gain + shift`, per feature of
    /// `[n, features, plane]` values.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_apply(
        x: &[f32],
        mean: &[f32],
        inv_std: &[f32],
        gain: &[f32],
        shift: &[f32],
        plane: usize,
        normalized: &mut [f32],
        out: &mut [f32],
    ) {
        let features = mean.len();
        for ((x, normalized), out) in x
            .chunks_exact(features * plane)
            .zip(normalized.chunks_exact_mut(features * plane))
            .zip(out.chunks_exact_mut(features * plane))
        {
            for (f, ((x, normalized), out)) in x
                .chunks_exact(plane)
                .zip(normalized.chunks_exact_mut(plane))
                .zip(out.chunks_exact_mut(plane))
                .enumerate()
            {
                let (m, inv, g, b) = (mean[f], inv_std[f], gain[f], shift[f]);
                for ((&x, n), o) in x.iter().zip(normalized.iter_mut()).zip(out.iter_mut()) {
                    *n = (x - m) * inv;
                    *o = *n * g + b;
                }
            }
        }
    }
}

simd_kernel! {
    /// Per feature, sum(dy * x_hat) and sum(dy), planes added in f64 in sample order.
    fn batch_norm_grad_sums(
        grad_out: &[f32],
        normalized: &[f32],
        features: usize,
        plane: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut dots, mut sums) = (vec![0f64; features], vec![0f64; features]);
        for (g, x) in grad_out
            .chunks_exact(features * plane)
            .zip(normalized.chunks_exact(features * plane))
        {
            for (f, (g, x)) in g.chunks_exact(plane).zip(x.chunks_exact(plane)).enumerate() {
                dots[f] += f64::from(dot(g, x));
                sums[f] += f64::from(sum(g));
            }
        }
        (dots, sums)
    }
}

simd_kernel! {
    /// `grad_in = a dy + b x_hat + c` with each feature's `[a, b, c]`.
    fn batch_norm_input_grad(
        grad_out: &[f32],
        normalized: &[f32],
        coefficients: &[[f32; 3]],
        plane: usize,
        grad_in: &mut [f32],
    ) {
        let features = coefficients.len();
        for ((g, x), d) in grad_out
            .chunks_exact(features * plane)
            .zip(normalized.chunks_exact(features * plane))
            .zip(grad_in.chunks_exact_mut(features * plane))
        {
            for (f, ((g, x), d)) in g
                .chunks_exact(plane)
                .zip(x.chunks_exact(plane))
                .zip(d.chunks_exact_mut(plane))
                .enumerate()
            {
                let [a, b, c] = coefficients[f];
                for ((&g, &x), d) in g.iter().zip(x).zip(d.iter_mut()) {
                    *d = a * g + b * x + c;
                }
            }
        }
    }
}

/// PyTorch's running statistics: momentum 0.1, the variance unbiased.
fn update_running(
    running_mean: &Var,
    running_var: &Var,
    mean: &[f64],
    var: &[f64],
    count: usize,
) -> candle_core::Result<()> {
    let m = BATCH_NORM_MOMENTUM;
    let correction = count as f64 / (count.max(2) - 1) as f64;
    let old_mean = running_mean.as_tensor().to_vec1::<f32>()?;
    let old_var = running_var.as_tensor().to_vec1::<f32>()?;
    let new_mean: Vec<f32> = old_mean
        .iter()
        .zip(mean)
        .map(|(&old, &batch)| ((1.0 - m) * f64::from(old) + m * batch) as f32)
        .collect();
    let new_var: Vec<f32> = old_var
        .iter()
        .zip(var)
        .map(|(&old, &batch)| ((1.0 - m) * f64::from(old) + m * batch * correction) as f32)
        .collect();
    let device = running_mean.device();
    running_mean.set(&Tensor::from_vec(new_mean, old_mean.len(), device)?)?;
    running_var.set(&Tensor::from_vec(new_var, old_var.len(), device)?)
}

simd_kernel! {
    /// Layer norm of rows of `gain.len()` values: `normalized` = (x - mean) / std, `out` =
    /// normalized * gain + shift, `inv_std` = 1 / std per row.
    pub(crate) fn norm_forward_rows(
        x: &[f32],
        gain: &[f32],
        shift: &[f32],
        normalized: &mut [f32],
        out: &mut [f32],
        inv_std: &mut [f32],
    ) {
        let d = gain.len();
        for (((row, normalized), out), inv_std) in x
            .chunks_exact(d)
            .zip(normalized.chunks_exact_mut(d))
            .zip(out.chunks_exact_mut(d))
            .zip(inv_std.iter_mut())
        {
            let (mean, inverse) = row_stats(row);
            *inv_std = inverse;
            for (((value, normalized), out), (g, s)) in row
                .iter()
                .zip(normalized.iter_mut())
                .zip(out.iter_mut())
                .zip(gain.iter().zip(shift))
            {
                *normalized = (value - mean) * inverse;
                *out = *normalized * g + s;
            }
        }
    }
}

simd_kernel! {
    /// A layer norm's gain and shift gradients: column sums of `grad_out * normalized` and of
    /// `grad_out`.
    pub(crate) fn norm_parameter_grads(
        grad_out: &[f32],
        normalized: &[f32],
        grad_gain: &mut [f32],
        grad_shift: &mut [f32],
    ) {
        let d = grad_gain.len();
        grad_gain.fill(0.0);
        grad_shift.fill(0.0);
        for (g_row, normalized) in grad_out.chunks_exact(d).zip(normalized.chunks_exact(d)) {
            for ((g, x), (dg, ds)) in g_row
                .iter()
                .zip(normalized)
                .zip(grad_gain.iter_mut().zip(grad_shift.iter_mut()))
            {
                *dg += g * x;
                *ds += g;
            }
        }
    }
}

simd_kernel! {
    /// Adds a layer norm's d(loss)/d(x) into `grad_x`, rows of `gain.len()` values.
    pub(crate) fn norm_input_grads(
        grad_out: &[f32],
        normalized: &[f32],
        inv_std: &[f32],
        gain: &[f32],
        grad_x: &mut [f32],
    ) {
        let d = gain.len();
        let width = d as f32;
        for (((dx, g), x), inv_std) in grad_x
            .chunks_exact_mut(d)
            .zip(grad_out.chunks_exact(d))
            .zip(normalized.chunks_exact(d))
            .zip(inv_std)
        {
            // With y = x_hat * gain: dx = inv_std * (dy_hat - mean(dy_hat)
            // - x_hat * mean(dy_hat * x_hat)), dy_hat = dy * gain.
            let (mut sum, mut dot) = (0.0f32, 0.0f32);
            for ((g, x), gain) in g.iter().zip(x).zip(gain) {
                let dy_hat = g * gain;
                sum += dy_hat;
                dot += dy_hat * x;
            }
            let (mean, mean_dot) = (sum / width, dot / width);
            for (((dx, g), x), gain) in dx.iter_mut().zip(g).zip(x).zip(gain) {
                *dx += inv_std * (g * gain - mean - x * mean_dot);
            }
        }
    }
}
