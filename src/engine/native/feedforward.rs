//! The hand-written step of the dense and convolutional models (`linear`, `mlp`, `cnn`):
//! fully connected layers with their activation and dropout, and 3x3 convolutions (im2col +
//! one matrix product, NHWC) with ReLU and 2x2 max pooling.

use rayon::prelude::*;

use super::{
    activate, activation_backward, classification_loss_and_hits, column_sums, cross_entropy,
    dense_backward, dense_forward, matmul, mean_squared_error, squared_error_sum, HostValues,
    Operand,
};
use crate::engine::batch::DeviceData;
use crate::engine::data::Task;
use crate::engine::model::{Layers, Model, ModelShape};
use crate::engine::ops::for_each_3x3_tap;
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;
use crate::engine::spec::{Activation, ModelSpec};

/// A fully connected layer's buffers: pre-activation `z`, output `a` (after activation and
/// dropout; unused for the last layer) and the dropout mask.
struct DenseBuffers {
    inputs: usize,
    outputs: usize,
    z: Vec<f32>,
    a: Vec<f32>,
    mask: Vec<f32>,
    /// d(loss)/d(z).
    grad: Vec<f32>,
}

impl DenseBuffers {
    fn new(inputs: usize, outputs: usize, rows: usize, hidden: bool, dropout: bool) -> Self {
        Self {
            inputs,
            outputs,
            z: vec![0.0; rows * outputs],
            a: vec![0.0; if hidden { rows * outputs } else { 0 }],
            mask: vec![0.0; if dropout { rows * outputs } else { 0 }],
            grad: vec![0.0; rows * outputs],
        }
    }
}

/// A 3x3 convolution (padding 1) + ReLU + 2x2 max pool, in NHWC layout.
struct ConvBuffers {
    channels: usize,
    outputs: usize,
    height: usize,
    width: usize,
    /// im2col patches, `[rows * height * width, 9 * channels]`, columns in (ky, kx, c) order.
    columns: Vec<f32>,
    /// The weight as `[outputs, 9 * channels]` in the same column order.
    weight: Vec<f32>,
    /// ReLU output before pooling, `[rows, height, width, outputs]`; reused for its gradient.
    activated: Vec<f32>,
    /// Pooled output `[rows, height / 2, width / 2, outputs]` and which of the 4 won.
    pooled: Vec<f32>,
    winner: Vec<u8>,
    /// Gradient of the weight in (ky, kx, c) order and of the patches.
    weight_grad: Vec<f32>,
    column_grad: Vec<f32>,
}

impl ConvBuffers {
    /// The stage's input and output maps (the same size: padding 1).
    fn geometry(&self) -> (Geometry, Geometry) {
        let input = Geometry {
            height: self.height,
            width: self.width,
            channels: self.channels,
        };
        (
            input,
            Geometry {
                channels: self.outputs,
                ..input
            },
        )
    }

    fn new(channels: usize, outputs: usize, height: usize, width: usize, rows: usize) -> Self {
        let pixels = rows * height * width;
        let pooled = rows * (height / 2) * (width / 2) * outputs;
        Self {
            channels,
            outputs,
            height,
            width,
            columns: vec![0.0; pixels * 9 * channels],
            weight: vec![0.0; outputs * 9 * channels],
            activated: vec![0.0; pixels * outputs],
            pooled: vec![0.0; pooled],
            winner: vec![0; pooled],
            weight_grad: vec![0.0; outputs * 9 * channels],
            column_grad: vec![0.0; pixels * 9 * channels],
        }
    }
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

/// Image geometry of one convolution stage (NHWC, `channels` per pixel).
#[derive(Clone, Copy)]
struct Geometry {
    height: usize,
    width: usize,
    channels: usize,
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
        let c = geometry.channels;
        image.fill(0.0);
        for_each_3x3_tap(geometry.height, geometry.width, |pixel, tap, target| {
            let src = &columns[(pixel * 9 + tap) * c..][..c];
            for (value, g) in image[target * c..target * c + c].iter_mut().zip(src) {
                *value += g;
            }
        });
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

/// The buffers of one batch size.
pub(super) struct Buffers {
    rows: usize,
    /// The gathered batch: flattened features (dense models) or NHWC images (cnn).
    input: Vec<f32>,
    convs: Vec<ConvBuffers>,
    /// The last pooled map in NCHW order, flattened per row (the dense head's input) and its
    /// gradient.
    flat: Vec<f32>,
    flat_grad: Vec<f32>,
    dense: Vec<DenseBuffers>,
    labels: Vec<u32>,
    targets: Vec<f32>,
}

impl Buffers {
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    pub(super) fn new(model: &Model, rows: usize) -> Self {
        let shape = model.shape();
        let mut convs = Vec::new();
        let mut dense_sizes = Vec::new();
        let mut hidden_activation = false;
        let mut dropout = false;
        let features: usize = shape.input.iter().product();
        let input_len;
        match model.layers() {
            Layers::Linear(layer) => {
                dense_sizes.push(layer.sizes());
                input_len = rows * features;
            }
            Layers::Mlp {
                layers,
                dropout: rate,
                ..
            } => {
                dense_sizes.extend(layers.iter().map(|layer| layer.sizes()));
                hidden_activation = true;
                dropout = *rate > 0.0;
                input_len = rows * features;
            }
            Layers::Cnn {
                convs: conv_layers,
                hidden,
                head,
            } => {
                let (mut height, mut width) = (shape.input[1], shape.input[2]);
                let mut channels = shape.input[0];
                for conv in conv_layers {
                    let outputs = conv.outputs();
                    convs.push(ConvBuffers::new(channels, outputs, height, width, rows));
                    channels = outputs;
                    height /= 2;
                    width /= 2;
                }
                dense_sizes.push(hidden.sizes());
                dense_sizes.push(head.sizes());
                hidden_activation = true;
                input_len = rows * features;
            }
            Layers::Transformer { .. } => unreachable!("transformers have their own buffers"),
            Layers::Sequential(_) => unreachable!("layer lists run on candle"),
        }
        let last = dense_sizes.len() - 1;
        let dense = dense_sizes
            .iter()
            .enumerate()
            .map(|(index, &(inputs, outputs))| {
                let hidden = hidden_activation && index < last;
                DenseBuffers::new(inputs, outputs, rows, hidden, hidden && dropout)
            })
            .collect::<Vec<_>>();
        let flat = if convs.is_empty() {
            0
        } else {
            rows * dense[0].inputs
        };
        Self {
            rows,
            input: vec![0.0; input_len],
            convs,
            flat: vec![0.0; flat],
            flat_grad: vec![0.0; flat],
            dense,
            labels: vec![0; rows],
            targets: vec![0.0; rows * shape.output],
        }
    }
}

/// The bytes `Buffers::new` allocates for `rows` rows of a linear, MLP or CNN model, from the
/// spec alone (admission checks it before anything is built). Saturating arithmetic: a size
/// too large to count is `u64::MAX`.
pub(super) fn planned_bytes(spec: &ModelSpec, shape: &ModelShape, rows: u64) -> u64 {
    let mul = |a: u64, b: u64| a.saturating_mul(b);
    let features = shape
        .input
        .iter()
        .fold(1u64, |product, &size| mul(product, size as u64));
    let output = shape.output as u64;
    // (inputs, outputs) of the dense layers, whether hidden ones keep `a`, and dropout masks.
    let mut dense = Vec::new();
    let mut hidden_activation = false;
    let mut dropout = false;
    let mut floats = mul(rows, features);
    let mut bytes = 0u64;
    match spec {
        ModelSpec::Linear => dense.push(output),
        ModelSpec::Mlp {
            hidden,
            dropout: rate,
            ..
        } => {
            dense.extend(hidden.iter().map(|&size| size as u64));
            dense.push(output);
            hidden_activation = true;
            dropout = *rate > 0.0;
        }
        ModelSpec::Cnn { channels, hidden } => {
            let [mut inputs, mut height, mut width] = match shape.input[..] {
                [c, h, w] => [c as u64, h as u64, w as u64],
                _ => [features, 1, 1],
            };
            for &outputs in channels {
                let outputs = outputs as u64;
                let pixels = mul(mul(rows, height), width);
                let pooled = mul(mul(mul(rows, height / 2), width / 2), outputs);
                let weight = mul(mul(outputs, 9), inputs);
                // columns and column_grad; weight and weight_grad; activated; pooled.
                floats = floats
                    .saturating_add(mul(2, mul(mul(pixels, 9), inputs)))
                    .saturating_add(mul(2, weight))
                    .saturating_add(mul(pixels, outputs))
                    .saturating_add(pooled);
                bytes = bytes.saturating_add(pooled); // winner, one byte each
                inputs = outputs;
                height /= 2;
                width /= 2;
            }
            let flat = mul(mul(inputs, height), width);
            floats = floats.saturating_add(mul(2, mul(rows, flat)));
            dense.push(*hidden as u64);
            dense.push(output);
            hidden_activation = true;
        }
        ModelSpec::Transformer { .. } | ModelSpec::Sequential { .. } => return 0,
    }
    let last = dense.len() - 1;
    for (index, &outputs) in dense.iter().enumerate() {
        let hidden = hidden_activation && index < last;
        // z and grad, a for hidden layers, a mask when they drop out.
        let per_row = 2 + u64::from(hidden) + u64::from(hidden && dropout);
        floats = floats.saturating_add(mul(mul(rows, outputs), per_row));
    }
    // labels (u32) and targets.
    floats = floats
        .saturating_add(rows)
        .saturating_add(mul(rows, output));
    mul(floats, 4).saturating_add(bytes)
}

impl Buffers {
    /// Bytes held by these buffers (what `planned_bytes` predicts; tests compare the two).
    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        let floats = |v: &Vec<f32>| v.len() * 4;
        let mut total = floats(&self.input)
            + floats(&self.flat)
            + floats(&self.flat_grad)
            + self.labels.len() * 4
            + floats(&self.targets);
        for conv in &self.convs {
            total += floats(&conv.columns)
                + floats(&conv.weight)
                + floats(&conv.activated)
                + floats(&conv.pooled)
                + conv.winner.len()
                + floats(&conv.weight_grad)
                + floats(&conv.column_grad);
        }
        for layer in &self.dense {
            total +=
                floats(&layer.z) + floats(&layer.a) + floats(&layer.mask) + floats(&layer.grad);
        }
        total
    }
}

/// Copies the batch's rows into the workspace: features flattened (dense models) or as NHWC
/// images (cnn), and the targets.
fn gather(
    model: &Model,
    data: &DeviceData,
    rows: &[usize],
    ws: &mut Buffers,
) -> candle_core::Result<()> {
    let x = HostValues::of(&data.x)?;
    let x = x.f32()?;
    let features: usize = model.shape().input.iter().product();
    if ws.convs.is_empty() {
        for (dst, &row) in ws.input.chunks_exact_mut(features).zip(rows) {
            dst.copy_from_slice(&x[row * features..(row + 1) * features]);
        }
    } else {
        let &[channels, height, width] = &model.shape().input[..] else {
            candle_core::bail!("native step: a cnn needs [channels, height, width] inputs");
        };
        let plane = height * width;
        for (dst, &row) in ws.input.chunks_exact_mut(features).zip(rows) {
            let src = &x[row * features..(row + 1) * features];
            for_each_layout_index(channels, plane, |nhwc, nchw| dst[nhwc] = src[nchw]);
        }
    }
    let y = HostValues::of(&data.y)?;
    match model.shape().task {
        Task::Classification => {
            let labels = y.u32()?;
            let classes = model.shape().output;
            for (dst, &row) in ws.labels.iter_mut().zip(rows) {
                *dst = labels[row];
                if *dst as usize >= classes {
                    candle_core::bail!("row {row}: class {} is outside 0..{classes}", *dst);
                }
            }
        }
        Task::Regression => {
            let values = y.f32()?;
            let dims = model.shape().output;
            for (dst, &row) in ws.targets.chunks_exact_mut(dims).zip(rows) {
                dst.copy_from_slice(&values[row * dims..(row + 1) * dims]);
            }
        }
        Task::LanguageModel => candle_core::bail!("native step: language models are transformers"),
    }
    Ok(())
}

/// The forward pass over the `n` gathered rows, leaving the model's outputs in the last dense
/// layer's `z`. Dropout applies only in training, when its generator is given. Returns the
/// hidden layers' activation.
fn forward(
    model: &Model,
    buffers: &mut Buffers,
    params: &[&[f32]],
    n: usize,
    mut dropout_rng: Option<&mut Rng>,
) -> Activation {
    let (activation, dropout) = match model.layers() {
        Layers::Mlp {
            activation,
            dropout,
            ..
        } => (*activation, *dropout),
        _ => (Activation::Relu, 0.0),
    };
    let Buffers {
        input,
        convs,
        flat,
        dense,
        ..
    } = buffers;
    let (conv_params, dense_params) = params.split_at(2 * convs.len());
    for index in 0..convs.len() {
        let (before, rest) = convs.split_at_mut(index);
        let source: &[f32] = before
            .last()
            .map_or(&input[..], |previous| &previous.pooled);
        conv_forward(
            &mut rest[0],
            source,
            n,
            conv_params[2 * index],
            conv_params[2 * index + 1],
        );
    }
    if let Some(last) = convs.last() {
        flatten_nchw(last, n, flat);
    }
    let first_input: &[f32] = if convs.is_empty() { input } else { flat };
    let last = dense.len() - 1;
    for index in 0..dense.len() {
        let (before, rest) = dense.split_at_mut(index);
        let layer = &mut rest[0];
        let x = before
            .last()
            .map_or(first_input, |previous| &previous.a[..]);
        dense_forward(
            &mut layer.z,
            x,
            n,
            dense_params[2 * index],
            dense_params[2 * index + 1],
        );
        if index < last {
            activate(activation, &layer.z, &mut layer.a);
            if let (Some(rng), false) = (dropout_rng.as_deref_mut(), layer.mask.is_empty()) {
                let keep = 1.0 - dropout;
                let scale = (1.0 / keep) as f32;
                for (a, mask) in layer.a.iter_mut().zip(&mut layer.mask) {
                    *mask = if rng.next_f64() < keep { scale } else { 0.0 };
                    *a *= *mask;
                }
            }
        }
    }

    activation
}

/// The loss summed over the first `len` rows of the batch `rows` (the rest pad it to the
/// buffers' size) and how many of them are classified right (0 for regression).
pub(super) fn evaluate_batch(
    model: &Model,
    buffers: &mut Buffers,
    params: &[&[f32]],
    data: &DeviceData,
    rows: &[usize],
    len: usize,
) -> candle_core::Result<(f64, usize)> {
    gather(model, data, rows, buffers)?;
    forward(model, buffers, params, rows.len(), None);
    let output = buffers.dense.last().expect("a model has an output layer");
    let width = output.outputs;
    let outputs = &output.z[..len * width];
    Ok(match model.shape().task {
        Task::Classification => {
            classification_loss_and_hits(outputs, &buffers.labels[..len], width)
        }
        Task::Regression => (
            squared_error_sum(outputs, &buffers.targets[..len * width], width),
            0,
        ),
        Task::LanguageModel => candle_core::bail!("native step: language models are transformers"),
    })
}

/// Forward and backward pass of a linear, MLP or CNN model on the batch `rows`; see
/// `super::forward_backward`.
pub(super) fn forward_backward(
    model: &Model,
    buffers: &mut Buffers,
    params: &[&[f32]],
    grads: &mut [Vec<f32>],
    data: &DeviceData,
    rows: &[usize],
    dropout_rng: &mut Rng,
) -> candle_core::Result<f64> {
    gather(model, data, rows, buffers)?;
    let n = rows.len();
    let activation = forward(model, buffers, params, n, Some(dropout_rng));
    let Buffers {
        rows: _,
        input,
        convs,
        flat,
        flat_grad,
        dense,
        labels,
        targets,
    } = buffers;
    let dense_params = &params[2 * convs.len()..];
    let (conv_grads, dense_grads) = grads.split_at_mut(2 * convs.len());
    let first_input: &[f32] = if convs.is_empty() { input } else { flat };
    let last = dense.len() - 1;

    // The loss and its gradient with respect to the output.
    let output = &mut dense[last];
    let loss = match model.shape().task {
        Task::Classification => cross_entropy(&output.z, labels, output.outputs, &mut output.grad),
        Task::Regression => mean_squared_error(&output.z, targets, &mut output.grad),
        Task::LanguageModel => candle_core::bail!("native step: language models are transformers"),
    };
    if !loss.is_finite() {
        return Ok(loss);
    }

    // Backward through the dense layers, last first.
    for index in (0..dense.len()).rev() {
        let (before, rest) = dense.split_at_mut(index);
        let layer = &rest[0];
        let (weight_grad, bias_grad) = dense_grads[2 * index..].split_at_mut(1);
        let (weight_grad, bias_grad) = (&mut weight_grad[0], &mut bias_grad[0]);
        let weight = dense_params[2 * index];
        match before.last_mut() {
            Some(previous) => {
                dense_backward(
                    &layer.grad,
                    &previous.a,
                    n,
                    weight,
                    weight_grad,
                    bias_grad,
                    Some(&mut previous.grad),
                );
                if !previous.mask.is_empty() {
                    for (g, mask) in previous.grad.iter_mut().zip(&previous.mask) {
                        *g *= mask;
                    }
                }
                activation_backward(activation, &previous.z, &mut previous.grad);
            }
            None => {
                // Into the convolutions' output, if there are any; a plain input needs none.
                let grad_x = (!convs.is_empty()).then_some(&mut flat_grad[..]);
                dense_backward(
                    &layer.grad,
                    first_input,
                    n,
                    weight,
                    weight_grad,
                    bias_grad,
                    grad_x,
                );
            }
        }
    }

    // Backward through the convolutions, last first. Each stage's `pooled` buffer is done
    // with once the next stage has read it, so it holds that output's gradient.
    if let Some(last) = convs.last_mut() {
        unflatten_nchw(flat_grad, n, last);
    }
    for index in (0..convs.len()).rev() {
        let (before, rest) = convs.split_at_mut(index);
        let (weight_grad, bias_grad) = conv_grads[2 * index..].split_at_mut(1);
        conv_backward(
            &mut rest[0],
            before.last_mut(),
            n,
            &mut weight_grad[0],
            &mut bias_grad[0],
        );
    }
    Ok(loss)
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

fn conv_forward(conv: &mut ConvBuffers, source: &[f32], n: usize, weight: &[f32], bias: &[f32]) {
    let (channels, outputs, height, width) = (conv.channels, conv.outputs, conv.height, conv.width);
    let (input, output) = conv.geometry();
    for_each_weight_index(outputs, channels, |stored, column| {
        conv.weight[column] = weight[stored];
    });
    per_image(source, &mut conv.columns, n, |image, columns| {
        im2col_image(image, input, columns)
    });
    let pixels = n * height * width;
    matmul(
        &mut conv.activated,
        pixels,
        outputs,
        9 * channels,
        Operand::plain(&conv.columns, 9 * channels),
        Operand::transposed(&conv.weight, 9 * channels),
    );
    conv.activated
        .par_chunks_mut(outputs * width)
        .for_each(|values| bias_relu(values, bias));
    let pooled_len = conv.pooled.len() / n.max(1);
    conv.pooled
        .par_chunks_mut(pooled_len)
        .zip(conv.winner.par_chunks_mut(pooled_len))
        .zip(conv.activated.par_chunks(height * width * outputs))
        .for_each(|((pooled, winner), image)| max_pool_image(image, output, pooled, winner));
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

/// `conv.pooled` holds d(loss)/d(pooled output) on entry. Writes the weight and bias
/// gradients and, when there is an earlier stage, d(loss)/d(its pooled output).
fn conv_backward(
    conv: &mut ConvBuffers,
    previous: Option<&mut ConvBuffers>,
    n: usize,
    weight_grad: &mut [f32],
    bias_grad: &mut [f32],
) {
    let (channels, outputs, height, width) = (conv.channels, conv.outputs, conv.height, conv.width);
    let (input, output) = conv.geometry();
    let pooled_len = conv.pooled.len() / n.max(1);
    conv.activated
        .par_chunks_mut(height * width * outputs)
        .zip(conv.pooled.par_chunks(pooled_len))
        .zip(conv.winner.par_chunks(pooled_len))
        .for_each(|((activated, grad), winner)| {
            pool_relu_backward_image(grad, winner, output, activated)
        });
    let grad = &conv.activated;
    column_sums(grad, bias_grad);
    let pixels = n * height * width;
    matmul(
        &mut conv.weight_grad,
        outputs,
        9 * channels,
        pixels,
        Operand::transposed(grad, outputs),
        Operand::plain(&conv.columns, 9 * channels),
    );
    for_each_weight_index(outputs, channels, |stored, column| {
        weight_grad[stored] = conv.weight_grad[column];
    });
    if let Some(previous) = previous {
        matmul(
            &mut conv.column_grad,
            pixels,
            9 * channels,
            outputs,
            Operand::plain(grad, outputs),
            Operand::plain(&conv.weight, 9 * channels),
        );
        per_image(
            &conv.column_grad,
            &mut previous.pooled,
            n,
            |columns, image| col2im_image(columns, input, image),
        );
    }
}

/// The last pooled NHWC map as the dense head sees it: per row, NCHW order.
fn flatten_nchw(conv: &ConvBuffers, n: usize, flat: &mut [f32]) {
    let (channels, plane) = (conv.outputs, (conv.height / 2) * (conv.width / 2));
    for (src, dst) in conv.pooled[..n * plane * channels]
        .chunks_exact(plane * channels)
        .zip(flat.chunks_exact_mut(plane * channels))
    {
        for_each_layout_index(channels, plane, |nhwc, nchw| dst[nchw] = src[nhwc]);
    }
}

fn unflatten_nchw(flat: &[f32], n: usize, conv: &mut ConvBuffers) {
    let (channels, plane) = (conv.outputs, (conv.height / 2) * (conv.width / 2));
    for (src, dst) in flat[..n * plane * channels]
        .chunks_exact(plane * channels)
        .zip(conv.pooled.chunks_exact_mut(plane * channels))
    {
        for_each_layout_index(channels, plane, |nhwc, nchw| dst[nhwc] = src[nchw]);
    }
}

/// Calls `f(nhwc, nchw)` for every value of one sample of `channels` planes of `plane`
/// pixels: its index pixel-major (NHWC, the convolutions' layout) and channel-major (NCHW,
/// the data's and the dense head's).
fn for_each_layout_index(channels: usize, plane: usize, mut f: impl FnMut(usize, usize)) {
    for pixel in 0..plane {
        for c in 0..channels {
            f(pixel * channels + c, c * plane + pixel);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::engine::data::{Dataset, Features, Targets};
    use crate::engine::model::ModelShape;
    use crate::engine::spec::ModelSpec;

    fn dataset(sample_shape: &[usize], task: Task, outputs: usize, rows: usize) -> Dataset {
        let mut rng = Rng::new(7);
        let per_row: usize = sample_shape.iter().product();
        let targets = match task {
            Task::Classification => Targets::Classes {
                labels: (0..rows).map(|_| rng.below(outputs) as u32).collect(),
                classes: outputs,
            },
            _ => Targets::Values {
                values: (0..rows * outputs).map(|_| rng.normal() as f32).collect(),
                dims: outputs,
            },
        };
        Dataset {
            features: Features::Dense {
                values: (0..rows * per_row).map(|_| rng.normal() as f32).collect(),
                sample_shape: sample_shape.to_vec(),
            },
            targets,
        }
    }

    /// A model of this spec on random data, checked against autograd on one batch.
    fn assert_spec_matches_autograd(
        spec: ModelSpec,
        sample_shape: &[usize],
        task: Task,
        outputs: usize,
    ) {
        let device = Device::Cpu;
        let data = dataset(sample_shape, task, outputs, 40);
        let shape = ModelShape {
            input: sample_shape.to_vec(),
            output: outputs,
            task,
        };
        let model = Model::build(&spec, &shape, 3, &device).unwrap();
        assert!(super::super::supports(&model));
        let train = DeviceData::new(&data, &device).unwrap();
        let rows: Vec<usize> = (0..16).map(|i| (i * 7 + 3) % 40).collect();

        super::super::tests::assert_matches_autograd(&model, &train, &rows);
        super::super::tests::assert_evaluation_matches_candle(&model, &train);
    }

    fn mlp(activation: Activation, dropout: f64) -> ModelSpec {
        ModelSpec::Mlp {
            hidden: vec![12, 9],
            activation,
            dropout,
        }
    }

    #[test]
    fn linear_classifier_gradients_match_autograd() {
        assert_spec_matches_autograd(ModelSpec::Linear, &[6], Task::Classification, 4);
    }

    #[test]
    fn mlp_gradients_match_autograd_for_every_activation() {
        for activation in [
            Activation::Relu,
            Activation::Gelu,
            Activation::Tanh,
            Activation::Silu,
        ] {
            assert_spec_matches_autograd(mlp(activation, 0.0), &[5], Task::Classification, 3);
        }
    }

    #[test]
    fn mlp_regression_with_dropout_matches_autograd() {
        assert_spec_matches_autograd(mlp(Activation::Relu, 0.3), &[5], Task::Regression, 2);
    }

    fn small_cnn() -> ModelSpec {
        ModelSpec::Cnn {
            channels: vec![4, 6],
            hidden: 8,
        }
    }

    #[test]
    fn cnn_gradients_match_autograd_on_odd_sized_multichannel_images() {
        assert_spec_matches_autograd(small_cnn(), &[2, 7, 9], Task::Classification, 5);
    }

    /// One channel takes im2col's single-value branch, and 16 images of 16x17 pixels make
    /// the first weight gradient's inner dimension long enough to be split.
    #[test]
    fn cnn_gradients_match_autograd_on_grey_images_with_a_split_weight_gradient() {
        assert_spec_matches_autograd(small_cnn(), &[1, 16, 17], Task::Classification, 5);
    }

    #[test]
    fn non_finite_loss_stops_before_the_backward_pass() {
        let device = Device::Cpu;
        let mut data = dataset(&[3], Task::Regression, 1, 8);
        if let Features::Dense { values, .. } = &mut data.features {
            values[0] = f32::INFINITY;
        }
        let shape = ModelShape {
            input: vec![3],
            output: 1,
            task: Task::Regression,
        };
        let model = Model::build(&ModelSpec::Linear, &shape, 0, &device).unwrap();
        let train = DeviceData::new(&data, &device).unwrap();
        let mut workspace = None;
        let loss = super::super::forward_backward(
            &model,
            &mut workspace,
            &train,
            &[0, 1],
            &mut Rng::new(0),
        )
        .unwrap();
        assert!(!loss.is_finite());
        assert!(workspace.unwrap().grads.iter().flatten().all(|g| *g == 0.0));
    }
}
