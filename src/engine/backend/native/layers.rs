//! The native step of layer-list models (`"arch": "sequential"`): each PyTorch layer's
//! forward and backward pass written out over buffers kept from step to step, in PyTorch's
//! NCHW layout, with the same function as the candle model in `sequential.rs` (the tests hold
//! the two together, and both to PyTorch's golden gradients).
//!
//! Matrix products (linear, and convolutions as im2col + one product over the whole batch)
//! go through `gemm`; the rest are plain loops in fixed order, so a step's result does not
//! depend on the thread count.

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use super::attention::{
    self, norm_forward_rows, norm_input_grads, norm_parameter_grads, BLOCK_VARS,
};
use super::conv_block::ConvBlock;
use super::{
    classification_loss_and_hits, cross_entropy, mean_squared_error, sequence_loss_and_hits,
    squared_error_sum, HostValues,
};
use crate::engine::batch::DeviceData;
use crate::engine::data::Task;
use crate::engine::kernels::gemm::{dense_backward, dense_forward, matmul, Operand};
use crate::engine::kernels::math::{dot, exp, gelu_derivative, gelu_value, sum};
use crate::engine::model::layers::{
    element_count, GeluApproximation, Module, BATCH_NORM_MOMENTUM, NORM_EPS,
};
use crate::engine::model::Model;
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;

/// Values per parallel task of the element-wise passes.
const ELEMENTS_PER_TASK: usize = 1 << 14;

#[derive(Debug, Clone, Copy)]
enum Act {
    Relu,
    GeluErf,
    GeluTanh,
    Tanh,
    Sigmoid,
    Silu,
}

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

/// A pooling window's sizes on `[channels, height, width]`.
#[derive(Debug, Clone, Copy)]
struct Pool {
    channels: usize,
    height: usize,
    width: usize,
    size: usize,
}

impl Pool {
    fn out_h(&self) -> usize {
        self.height / self.size
    }

    fn out_w(&self) -> usize {
        self.width / self.size
    }
}

enum Kind {
    /// Parameters `weight` (index into the model's variables) and `weight + 1`.
    Linear {
        weight: usize,
        inputs: usize,
    },
    Conv2d {
        weight: usize,
        conv: Conv,
        /// im2col of the batch, tap-major: `[depth, n * pixels]`, one row per (c, ky, kx).
        columns: Vec<f32>,
        /// The output (forward) or its gradient (backward) channel-major over the batch,
        /// `[out, n * pixels]`.
        rows: Vec<f32>,
        /// d(loss)/d(columns).
        column_grad: Vec<f32>,
    },
    /// `conv2d` 3x3 (stride 1, padding 1) + `relu` + `max_pool2d` 2, fused (parameters
    /// `weight` and `weight + 1`).
    ConvBlock {
        weight: usize,
        block: ConvBlock,
    },
    MaxPool2d {
        pool: Pool,
        /// Per output value, the index of its window's first maximum in the sample's input.
        winner: Vec<u32>,
    },
    AvgPool2d(Pool),
    /// Values per channel plane, averaged to one.
    AdaptiveAvgPool2d(usize),
    BatchNorm {
        weight: usize,
        features: usize,
        /// Values per feature per sample (1 after `[features]`, h * w after `[c, h, w]`).
        plane: usize,
        running_mean: Var,
        running_var: Var,
        normalized: Vec<f32>,
        inv_std: Vec<f32>,
    },
    LayerNorm {
        weight: usize,
        normalized: Vec<f32>,
        inv_std: Vec<f32>,
    },
    Dropout {
        p: f64,
        mask: Vec<f32>,
        /// Whether the last forward pass dropped (training with p > 0).
        active: bool,
    },
    Flatten,
    Embedding {
        weight: usize,
        dim: usize,
    },
    /// Parameter `weight`, `[time, dim]`, added to every sample.
    PositionEmbedding {
        weight: usize,
    },
    /// Parameters `weight..weight + BLOCK_VARS`.
    TransformerBlock {
        weight: usize,
        block: Box<attention::Block>,
        scratch: Box<attention::Scratch>,
    },
    Activation(Act),
    Residual {
        chain: Chain,
        /// The inner layers' d(loss)/d(block input).
        input_grad: Vec<f32>,
    },
}

struct Node {
    kind: Kind,
    out: Vec<f32>,
    grad: Vec<f32>,
}

struct Chain {
    nodes: Vec<Node>,
}

/// What reaches a chain: values, or token ids for an embedding.
#[derive(Clone, Copy)]
enum Input<'a> {
    Values(&'a [f32]),
    Tokens(&'a [u32]),
}

impl<'a> Input<'a> {
    fn values(self) -> &'a [f32] {
        match self {
            Input::Values(values) => values,
            Input::Tokens(_) => unreachable!("the plan puts an embedding first on token ids"),
        }
    }
}

/// The buffers of one batch size.
pub(super) struct Buffers {
    rows: usize,
    task: Task,
    /// Per-sample input values (dense data) or ids per sequence (text).
    input: Vec<f32>,
    tokens: Vec<u32>,
    /// Values per sample at the input, and per sample at the output.
    input_len: usize,
    output_len: usize,
    chain: Chain,
    labels: Vec<u32>,
    targets: Vec<f32>,
    /// Output values per prediction (classes, regression dims, vocabulary).
    classes: usize,
    /// Predictions per sample (1, or the sequence length of a language model).
    per_sample: usize,
}

impl Buffers {
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    pub(super) fn new(model: &Model, rows: usize) -> candle_core::Result<Buffers> {
        let sequential = model.layers();
        let shape = model.shape();
        let mut next_param = 0;
        let (chain, dims) = build_chain(
            sequential.modules(),
            shape.input.clone(),
            rows,
            &mut next_param,
        )?;
        let input_len = buffer_len(&shape.input)?;
        let output_len = buffer_len(&dims)?;
        let batch_inputs = buffer_len(&[rows, input_len])?;
        let per_sample = match shape.task {
            Task::LanguageModel => shape.input[0],
            _ => 1,
        };
        let tokens = shape.task == Task::LanguageModel;
        Ok(Buffers {
            rows,
            task: shape.task,
            input: vec![0.0; if tokens { 0 } else { batch_inputs }],
            tokens: vec![0; if tokens { batch_inputs } else { 0 }],
            input_len,
            output_len,
            chain,
            labels: vec![
                0;
                if shape.task == Task::Regression {
                    0
                } else {
                    buffer_len(&[rows, per_sample])?
                }
            ],
            targets: vec![
                0.0;
                if shape.task == Task::Regression {
                    buffer_len(&[rows, shape.output])?
                } else {
                    0
                }
            ],
            classes: shape.output,
            per_sample,
        })
    }

    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        fn chain_bytes(chain: &Chain) -> usize {
            chain
                .nodes
                .iter()
                .map(|node| {
                    let own = (node.out.len() + node.grad.len()) * 4;
                    own + match &node.kind {
                        Kind::Conv2d {
                            columns,
                            rows,
                            column_grad,
                            ..
                        } => (columns.len() + rows.len() + column_grad.len()) * 4,
                        Kind::MaxPool2d { winner, .. } => winner.len() * 4,
                        Kind::ConvBlock { block, .. } => block.allocated_bytes(),
                        Kind::BatchNorm {
                            normalized,
                            inv_std,
                            ..
                        }
                        | Kind::LayerNorm {
                            normalized,
                            inv_std,
                            ..
                        } => (normalized.len() + inv_std.len()) * 4,
                        Kind::Dropout { mask, .. } => mask.len() * 4,
                        Kind::Residual { chain, input_grad } => {
                            chain_bytes(chain) + input_grad.len() * 4
                        }
                        Kind::TransformerBlock { block, scratch, .. } => {
                            (block.floats() + scratch.floats()) * 4
                        }
                        _ => 0,
                    }
                })
                .sum()
        }
        chain_bytes(&self.chain) + (self.input.len() + self.targets.len()) * 4
    }
}

/// The length of a buffer of `factors` multiplied. The plan and admission refuse a model
/// whose sizes do not fit long before a workspace is built; this keeps a size that would wrap
/// from ever sizing (and then indexing) a buffer.
fn buffer_len(factors: &[usize]) -> candle_core::Result<usize> {
    element_count(factors).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "native step: a buffer of {factors:?} values is larger than memory can address"
        ))
    })
}

/// The values of `rows` samples of shape `dims`.
fn batch_len(rows: usize, dims: &[usize]) -> candle_core::Result<usize> {
    let per_sample = buffer_len(dims)?;
    buffer_len(&[rows, per_sample])
}

/// The nodes for `modules` on samples of `dims` (token ids: `[time]`), numbering the
/// parameters in the model's order; returns the per-sample output dims.
fn build_chain(
    modules: &[Module],
    mut dims: Vec<usize>,
    rows: usize,
    next_param: &mut usize,
) -> candle_core::Result<(Chain, Vec<usize>)> {
    let mut nodes = Vec::with_capacity(modules.len());
    let mut fused = 0;
    for (index, module) in modules.iter().enumerate() {
        if fused > 0 {
            fused -= 1;
            continue;
        }
        if let (true, &[channels, height, width]) =
            (fuses_conv_relu_pool(&modules[index..]), &dims[..])
        {
            let Module::Conv2d { weight, .. } = module else {
                unreachable!("checked by fuses_conv_relu_pool");
            };
            let outputs = weight.dim(0)?;
            // The block's largest buffers: the patches and the activated output.
            buffer_len(&[rows, height, width, 9, channels])?;
            buffer_len(&[rows, height, width, outputs])?;
            let block = ConvBlock::new(channels, outputs, height, width, rows);
            let next = block.output_dims();
            let len = batch_len(rows, &next)?;
            nodes.push(Node {
                kind: Kind::ConvBlock {
                    weight: *next_param,
                    block,
                },
                out: vec![0.0; len],
                grad: vec![0.0; len],
            });
            *next_param += 2;
            dims = next;
            fused = 2;
            continue;
        }
        let mut param = |count: usize| {
            let index = *next_param;
            *next_param += count;
            index
        };
        let (kind, next): (Kind, Vec<usize>) = match module {
            Module::Linear { weight, .. } => {
                let (outputs, inputs) = weight.dims2()?;
                let mut next = dims.clone();
                *next.last_mut().expect("planned") = outputs;
                (
                    Kind::Linear {
                        weight: param(2),
                        inputs,
                    },
                    next,
                )
            }
            Module::Conv2d {
                weight,
                stride,
                padding,
                ..
            } => {
                let (outputs, channels, kernel, _) = weight.dims4()?;
                let [_, height, width] = dims[..] else {
                    candle_core::bail!("native step: conv2d on {dims:?}");
                };
                let side = |size: usize| {
                    padding
                        .checked_mul(2)
                        .and_then(|p| p.checked_add(size))
                        .and_then(|padded| padded.checked_sub(kernel))
                        .map(|span| span / stride + 1)
                };
                let (Some(out_h), Some(out_w)) = (side(height), side(width)) else {
                    candle_core::bail!("native step: conv2d's output on {dims:?} does not fit");
                };
                let conv = Conv {
                    channels,
                    height,
                    width,
                    outputs,
                    kernel,
                    stride: *stride,
                    padding: *padding,
                    out_h,
                    out_w,
                };
                // `Conv::pixels` and `Conv::depth` multiply unchecked: these cover them.
                let patches = buffer_len(&[rows, out_h, out_w, channels, kernel, kernel])?;
                let channel_rows = buffer_len(&[rows, out_h, out_w, outputs])?;
                (
                    Kind::Conv2d {
                        weight: param(2),
                        conv,
                        columns: vec![0.0; patches],
                        rows: vec![0.0; channel_rows],
                        column_grad: vec![0.0; patches],
                    },
                    vec![outputs, conv.out_h, conv.out_w],
                )
            }
            Module::MaxPool2d(size) | Module::AvgPool2d(size) => {
                let [channels, height, width] = dims[..] else {
                    candle_core::bail!("native step: pooling on {dims:?}");
                };
                let pool = Pool {
                    channels,
                    height,
                    width,
                    size: *size,
                };
                let next = vec![channels, pool.out_h(), pool.out_w()];
                let kind = match module {
                    Module::MaxPool2d(_) => Kind::MaxPool2d {
                        pool,
                        winner: vec![0; batch_len(rows, &next)?],
                    },
                    _ => Kind::AvgPool2d(pool),
                };
                (kind, next)
            }
            Module::AdaptiveAvgPool2d => {
                let [channels, height, width] = dims[..] else {
                    candle_core::bail!("native step: pooling on {dims:?}");
                };
                (
                    Kind::AdaptiveAvgPool2d(height * width),
                    vec![channels, 1, 1],
                )
            }
            Module::BatchNorm {
                running_mean,
                running_var,
                spatial,
                ..
            } => {
                let features = dims[0];
                let plane = if *spatial { dims[1] * dims[2] } else { 1 };
                (
                    Kind::BatchNorm {
                        weight: param(2),
                        features,
                        plane,
                        running_mean: running_mean.clone(),
                        running_var: running_var.clone(),
                        normalized: vec![0.0; batch_len(rows, &dims)?],
                        inv_std: vec![0.0; features],
                    },
                    dims.clone(),
                )
            }
            Module::LayerNorm { .. } => {
                let size = *dims.last().expect("planned");
                let total = batch_len(rows, &dims)?;
                (
                    Kind::LayerNorm {
                        weight: param(2),
                        normalized: vec![0.0; total],
                        inv_std: vec![0.0; total / size],
                    },
                    dims.clone(),
                )
            }
            Module::Dropout(p) => (
                Kind::Dropout {
                    p: *p,
                    mask: vec![0.0; batch_len(rows, &dims)?],
                    active: false,
                },
                dims.clone(),
            ),
            Module::Flatten => (Kind::Flatten, vec![batch_len(1, &dims)?]),
            Module::Embedding(weight) => {
                let dim = weight.dim(1)?;
                (
                    Kind::Embedding {
                        weight: param(1),
                        dim,
                    },
                    vec![dims[0], dim],
                )
            }
            Module::PositionEmbedding(_) => {
                (Kind::PositionEmbedding { weight: param(1) }, dims.clone())
            }
            Module::TransformerBlock(block) => {
                let [time, dim] = dims[..] else {
                    candle_core::bail!("native step: transformer_block on {dims:?}");
                };
                // The block's largest buffers: the MLP's `4 d` wide values and the attention
                // weights.
                buffer_len(&[rows, time, 4, dim])?;
                buffer_len(&[rows, block.heads, time, time])?;
                (
                    Kind::TransformerBlock {
                        weight: param(BLOCK_VARS),
                        block: Box::new(attention::Block::new(rows, time, dim, block.heads)),
                        scratch: Box::new(attention::Scratch::new(rows, time, dim, block.heads)),
                    },
                    dims.clone(),
                )
            }
            Module::Relu => (Kind::Activation(Act::Relu), dims.clone()),
            Module::Gelu(GeluApproximation::None) => (Kind::Activation(Act::GeluErf), dims.clone()),
            Module::Gelu(GeluApproximation::Tanh) => {
                (Kind::Activation(Act::GeluTanh), dims.clone())
            }
            Module::Tanh => (Kind::Activation(Act::Tanh), dims.clone()),
            Module::Sigmoid => (Kind::Activation(Act::Sigmoid), dims.clone()),
            Module::Silu => (Kind::Activation(Act::Silu), dims.clone()),
            Module::Residual(inner) => {
                let (chain, _) = build_chain(inner, dims.clone(), rows, next_param)?;
                let len = batch_len(rows, &dims)?;
                (
                    Kind::Residual {
                        chain,
                        input_grad: vec![0.0; len],
                    },
                    dims.clone(),
                )
            }
        };
        let len = batch_len(rows, &next)?;
        nodes.push(Node {
            kind,
            out: vec![0.0; len],
            grad: vec![0.0; len],
        });
        dims = next;
    }
    Ok((Chain { nodes }, dims))
}

impl Kind {
    /// Whether the layer (or a layer inside it) has parameters to train.
    fn has_parameters(&self) -> bool {
        match self {
            Kind::Residual { chain, .. } => {
                chain.nodes.iter().any(|node| node.kind.has_parameters())
            }
            Kind::MaxPool2d { .. }
            | Kind::AvgPool2d(_)
            | Kind::AdaptiveAvgPool2d(_)
            | Kind::Dropout { .. }
            | Kind::Flatten
            | Kind::Activation(_) => false,
            _ => true,
        }
    }
}

/// Whether `modules` open with a 3x3 convolution (stride 1, padding 1), a ReLU and a 2x2 max
/// pool, which run as one [`ConvBlock`].
fn fuses_conv_relu_pool(modules: &[Module]) -> bool {
    match modules {
        [Module::Conv2d {
            weight,
            stride: 1,
            padding: 1,
            ..
        }, Module::Relu, Module::MaxPool2d(2), ..] => weight.dims().get(2..) == Some(&[3, 3][..]),
        _ => false,
    }
}

/// Copies the batch's rows into the buffers: samples (or token ids) and targets.
fn gather(data: &DeviceData, rows: &[usize], buffers: &mut Buffers) -> candle_core::Result<()> {
    let width = buffers.input_len;
    let x = HostValues::of(&data.x)?;
    if buffers.task == Task::LanguageModel {
        let ids = x.u32()?;
        for (dst, &row) in buffers.tokens.chunks_exact_mut(width).zip(rows) {
            dst.copy_from_slice(&ids[row * width..(row + 1) * width]);
        }
    } else {
        let values = x.f32()?;
        for (dst, &row) in buffers.input.chunks_exact_mut(width).zip(rows) {
            dst.copy_from_slice(&values[row * width..(row + 1) * width]);
        }
    }
    let y = HostValues::of(&data.y)?;
    let classes = buffers.classes;
    match buffers.task {
        Task::Regression => {
            let values = y.f32()?;
            for (dst, &row) in buffers.targets.chunks_exact_mut(classes).zip(rows) {
                dst.copy_from_slice(&values[row * classes..(row + 1) * classes]);
            }
        }
        _ => {
            let labels = y.u32()?;
            let per = buffers.per_sample;
            for (dst, &row) in buffers.labels.chunks_exact_mut(per).zip(rows) {
                dst.copy_from_slice(&labels[row * per..(row + 1) * per]);
            }
            if let Some(bad) = buffers.labels.iter().find(|&&l| l as usize >= classes) {
                candle_core::bail!("class {bad} is outside 0..{classes}");
            }
        }
    }
    if let Some(bad) = buffers.tokens.iter().find(|&&id| id as usize >= classes) {
        candle_core::bail!("token id {bad} is outside the vocabulary of {classes}");
    }
    Ok(())
}

/// Forward through every node; `train` is the dropout generator in training mode.
fn forward_chain(
    chain: &mut Chain,
    input: Input<'_>,
    n: usize,
    params: &[&[f32]],
    train: &mut Option<&mut Rng>,
) -> candle_core::Result<()> {
    for index in 0..chain.nodes.len() {
        let (before, rest) = chain.nodes.split_at_mut(index);
        let node_input = before
            .last()
            .map_or(input, |previous| Input::Values(&previous.out));
        forward_node(&mut rest[0], node_input, n, params, train)?;
    }
    Ok(())
}

fn forward_node(
    node: &mut Node,
    input: Input<'_>,
    n: usize,
    params: &[&[f32]],
    train: &mut Option<&mut Rng>,
) -> candle_core::Result<()> {
    let Node { kind, out, .. } = node;
    match kind {
        Kind::Linear { weight, inputs } => {
            let x = input.values();
            dense_forward(
                out,
                x,
                x.len() / *inputs,
                params[*weight],
                params[*weight + 1],
            );
        }
        Kind::Conv2d {
            weight,
            conv,
            columns,
            rows,
            ..
        } => {
            let conv = *conv;
            let x = input.values();
            let batch_pixels = n * conv.pixels();
            columns
                .par_chunks_mut(batch_pixels)
                .enumerate()
                .for_each(|(tap, row)| im2col_tap(x, conv, tap, row));
            matmul(
                rows,
                conv.outputs,
                batch_pixels,
                conv.depth(),
                Operand::plain(params[*weight], conv.depth()),
                Operand::plain(columns, batch_pixels),
            );
            let (bias, pixels) = (params[*weight + 1], conv.pixels());
            out.par_chunks_exact_mut(conv.outputs * pixels)
                .enumerate()
                .for_each(|(image, sample)| channels_to_samples(rows, bias, image, pixels, sample));
        }
        Kind::ConvBlock { weight, block } => {
            block.forward(input.values(), n, params[*weight], params[*weight + 1], out);
        }
        Kind::MaxPool2d { pool, winner } => {
            let x = input.values();
            let per_in = pool.channels * pool.height * pool.width;
            let per_out = pool.channels * pool.out_h() * pool.out_w();
            let pool = *pool;
            x.par_chunks_exact(per_in)
                .zip(out.par_chunks_exact_mut(per_out))
                .zip(winner.par_chunks_exact_mut(per_out))
                .for_each(|((x, out), winner)| max_pool(x, pool, out, winner));
        }
        Kind::AvgPool2d(pool) => {
            let x = input.values();
            let per_in = pool.channels * pool.height * pool.width;
            let per_out = pool.channels * pool.out_h() * pool.out_w();
            let pool = *pool;
            x.par_chunks_exact(per_in)
                .zip(out.par_chunks_exact_mut(per_out))
                .for_each(|(x, out)| avg_pool(x, pool, out));
        }
        Kind::AdaptiveAvgPool2d(plane) => {
            let x = input.values();
            let scale = 1.0 / *plane as f64;
            for (value, plane_values) in out.iter_mut().zip(x.chunks_exact(*plane)) {
                let sum: f64 = plane_values.iter().map(|&v| f64::from(v)).sum();
                *value = (sum * scale) as f32;
            }
        }
        Kind::BatchNorm {
            weight,
            features,
            plane,
            running_mean,
            running_var,
            normalized,
            inv_std,
        } => {
            let x = input.values();
            let (gain, shift) = (params[*weight], params[*weight + 1]);
            if train.is_some() {
                let (mean, var) = batch_statistics(x, *features, *plane);
                for (f, inv) in inv_std.iter_mut().enumerate() {
                    *inv = (1.0 / (var[f] + NORM_EPS).sqrt()) as f32;
                }
                let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
                batch_norm_apply(x, &mean32, inv_std, gain, shift, *plane, normalized, out);
                update_running(running_mean, running_var, &mean, &var, n * *plane)?;
            } else {
                let mean = Tensor::to_vec1::<f32>(running_mean.as_tensor())?;
                let var = Tensor::to_vec1::<f32>(running_var.as_tensor())?;
                let inv: Vec<f32> = var
                    .iter()
                    .map(|&v| (1.0 / (f64::from(v) + NORM_EPS).sqrt()) as f32)
                    .collect();
                // `normalized` is scratch here: eval mode has no backward pass.
                batch_norm_apply(x, &mean, &inv, gain, shift, *plane, normalized, out);
            }
        }
        Kind::LayerNorm {
            weight,
            normalized,
            inv_std,
            ..
        } => norm_forward_rows(
            input.values(),
            params[*weight],
            params[*weight + 1],
            normalized,
            out,
            inv_std,
        ),
        Kind::Dropout { p, mask, active } => {
            let x = input.values();
            *active = false;
            if let Some(rng) = train.as_deref_mut() {
                if *p > 0.0 {
                    let keep = 1.0 - *p;
                    let scale = (1.0 / keep) as f32;
                    for m in mask.iter_mut() {
                        *m = if rng.next_f64() < keep { scale } else { 0.0 };
                    }
                    *active = true;
                }
            }
            if *active {
                for ((o, &v), &m) in out.iter_mut().zip(x).zip(mask.iter()) {
                    *o = v * m;
                }
            } else {
                out.copy_from_slice(x);
            }
        }
        Kind::Flatten => out.copy_from_slice(input.values()),
        Kind::Embedding { weight, dim } => {
            let Input::Tokens(ids) = input else {
                candle_core::bail!("native step: an embedding needs token ids");
            };
            let table = params[*weight];
            for (row, &id) in out.chunks_exact_mut(*dim).zip(ids) {
                row.copy_from_slice(&table[id as usize * *dim..][..*dim]);
            }
        }
        Kind::PositionEmbedding { weight } => {
            let table = params[*weight];
            for (sample, x) in out
                .chunks_exact_mut(table.len())
                .zip(input.values().chunks_exact(table.len()))
            {
                add_into(sample, x, table);
            }
        }
        Kind::TransformerBlock { weight, block, .. } => {
            block.forward(input.values(), &params[*weight..][..BLOCK_VARS], out);
        }
        Kind::Activation(act) => {
            let act = *act;
            input
                .values()
                .par_chunks(ELEMENTS_PER_TASK)
                .zip(out.par_chunks_mut(ELEMENTS_PER_TASK))
                .for_each(|(x, out)| activation_forward(act, x, out));
        }
        Kind::Residual { chain, .. } => {
            let x = input.values();
            forward_chain(chain, Input::Values(x), n, params, train)?;
            let inner = &chain.nodes.last().expect("a residual block has layers").out;
            add_into(out, x, inner);
        }
    }
    Ok(())
}

/// Backward through every node, last first: each node's `grad` holds d(loss)/d(its output)
/// when its turn comes. Writes every parameter's gradient and, when given, d(loss)/d(input).
fn backward_chain(
    chain: &mut Chain,
    input: Input<'_>,
    params: &[&[f32]],
    grads: &mut [Vec<f32>],
    mut input_grad: Option<&mut [f32]>,
) {
    // Below the first layer with parameters (and without a caller asking for the input's
    // gradient) no gradient is needed: a flattened input's product with the first weight is
    // the most expensive one of an MLP's step.
    let first_trained = chain
        .nodes
        .iter()
        .position(|node| node.kind.has_parameters());
    let wanted_from = match (&input_grad, first_trained) {
        (Some(_), _) => 0,
        (None, Some(first)) => first + 1,
        (None, None) => usize::MAX,
    };
    for index in (0..chain.nodes.len()).rev() {
        let (before, rest) = chain.nodes.split_at_mut(index);
        let node = &mut rest[0];
        match before.last_mut() {
            Some(previous) => {
                let Node { out, grad, .. } = previous;
                let grad_in = (index >= wanted_from).then_some(&mut grad[..]);
                backward_node(node, Input::Values(out), params, grads, grad_in);
            }
            None => backward_node(node, input, params, grads, input_grad.as_deref_mut()),
        }
    }
}

fn backward_node(
    node: &mut Node,
    input: Input<'_>,
    params: &[&[f32]],
    grads: &mut [Vec<f32>],
    grad_in: Option<&mut [f32]>,
) {
    let Node { kind, out, grad } = node;
    let grad_out: &[f32] = grad;
    match kind {
        Kind::Linear { weight, inputs } => {
            let x = input.values();
            let (weight_grad, bias_grad) = grads[*weight..].split_at_mut(1);
            dense_backward(
                grad_out,
                x,
                x.len() / *inputs,
                params[*weight],
                &mut weight_grad[0],
                &mut bias_grad[0],
                grad_in,
            );
        }
        Kind::Conv2d {
            weight,
            conv,
            columns,
            rows,
            column_grad,
        } => {
            let conv = *conv;
            let batch_pixels = rows.len() / conv.outputs;
            let pixels = conv.pixels();
            rows.par_chunks_exact_mut(batch_pixels)
                .enumerate()
                .for_each(|(o, row)| samples_to_channels(grad_out, pixels, o, row));
            let (weight_grad, bias_grad) = grads[*weight..].split_at_mut(1);
            for (sum, row) in bias_grad[0].iter_mut().zip(rows.chunks_exact(batch_pixels)) {
                *sum = row_sum(row);
            }
            matmul(
                &mut weight_grad[0],
                conv.outputs,
                conv.depth(),
                batch_pixels,
                Operand::plain(rows, batch_pixels),
                Operand::transposed(columns, batch_pixels),
            );
            if let Some(grad_in) = grad_in {
                matmul(
                    column_grad,
                    conv.depth(),
                    batch_pixels,
                    conv.outputs,
                    Operand::transposed(params[*weight], conv.depth()),
                    Operand::plain(rows, batch_pixels),
                );
                let per_image = conv.channels * conv.height * conv.width;
                grad_in
                    .par_chunks_mut(per_image)
                    .enumerate()
                    .for_each(|(image, grad)| col2im(column_grad, conv, image, batch_pixels, grad));
            }
        }
        Kind::ConvBlock { weight, block } => {
            let n = grad_out.len() / block.output_dims().iter().product::<usize>();
            let (weight_grad, bias_grad) = grads[*weight..].split_at_mut(1);
            block.backward(grad_out, n, &mut weight_grad[0], &mut bias_grad[0], grad_in);
        }
        Kind::MaxPool2d { pool, winner } => {
            if let Some(grad_in) = grad_in {
                let per_in = pool.channels * pool.height * pool.width;
                let per_out = pool.channels * pool.out_h() * pool.out_w();
                grad_in
                    .par_chunks_exact_mut(per_in)
                    .zip(grad_out.par_chunks_exact(per_out))
                    .zip(winner.par_chunks_exact(per_out))
                    .for_each(|((grad_in, grad_out), winner)| {
                        grad_in.fill(0.0);
                        for (&g, &at) in grad_out.iter().zip(winner) {
                            grad_in[at as usize] += g;
                        }
                    });
            }
        }
        Kind::AvgPool2d(pool) => {
            if let Some(grad_in) = grad_in {
                let per_in = pool.channels * pool.height * pool.width;
                let per_out = pool.channels * pool.out_h() * pool.out_w();
                let pool = *pool;
                grad_in
                    .par_chunks_exact_mut(per_in)
                    .zip(grad_out.par_chunks_exact(per_out))
                    .for_each(|(grad_in, grad_out)| avg_pool_backward(grad_out, pool, grad_in));
            }
        }
        Kind::AdaptiveAvgPool2d(plane) => {
            if let Some(grad_in) = grad_in {
                let scale = 1.0 / *plane as f32;
                for (values, &g) in grad_in.chunks_exact_mut(*plane).zip(grad_out) {
                    values.fill(g * scale);
                }
            }
        }
        Kind::BatchNorm {
            weight,
            features,
            plane,
            normalized,
            inv_std,
            ..
        } => {
            let (features, plane) = (*features, *plane);
            let n = normalized.len() / (features * plane);
            let (weight_grad, bias_grad) = grads[*weight..].split_at_mut(1);
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
                let gain = params[*weight];
                let coefficients: Vec<[f32; 3]> = (0..features)
                    .map(|f| {
                        let scale = f64::from(gain[f]) * f64::from(inv_std[f]) / count;
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
        Kind::LayerNorm {
            weight,
            normalized,
            inv_std,
            ..
        } => {
            let (weight_grad, bias_grad) = grads[*weight..].split_at_mut(1);
            norm_parameter_grads(grad_out, normalized, &mut weight_grad[0], &mut bias_grad[0]);
            if let Some(grad_in) = grad_in {
                grad_in.fill(0.0);
                norm_input_grads(grad_out, normalized, inv_std, params[*weight], grad_in);
            }
        }
        Kind::Dropout { mask, active, .. } => {
            if let Some(grad_in) = grad_in {
                if *active {
                    for ((d, &g), &m) in grad_in.iter_mut().zip(grad_out).zip(mask.iter()) {
                        *d = g * m;
                    }
                } else {
                    grad_in.copy_from_slice(grad_out);
                }
            }
        }
        Kind::Flatten => {
            if let Some(grad_in) = grad_in {
                grad_in.copy_from_slice(grad_out);
            }
        }
        Kind::Embedding { weight, dim } => {
            let Input::Tokens(ids) = input else {
                unreachable!("an embedding reads token ids");
            };
            let table_grad = &mut grads[*weight];
            table_grad.fill(0.0);
            for (g, &id) in grad_out.chunks_exact(*dim).zip(ids) {
                for (t, &v) in table_grad[id as usize * *dim..][..*dim].iter_mut().zip(g) {
                    *t += v;
                }
            }
        }
        Kind::PositionEmbedding { weight } => {
            let table_grad = &mut grads[*weight];
            table_grad.fill(0.0);
            for sample in grad_out.chunks_exact(table_grad.len()) {
                add_assign(table_grad, sample);
            }
            if let Some(grad_in) = grad_in {
                grad_in.copy_from_slice(grad_out);
            }
        }
        Kind::TransformerBlock {
            weight,
            block,
            scratch,
        } => {
            let p = &params[*weight..][..BLOCK_VARS];
            let g = &mut grads[*weight..][..BLOCK_VARS];
            // The block's backward pass turns d(loss)/d(output) into d(loss)/d(input) in place.
            match grad_in {
                Some(grad_in) => {
                    grad_in.copy_from_slice(grad_out);
                    block.backward(p, g, grad_in, scratch);
                }
                None => block.backward(p, g, &mut grad_out.to_vec(), scratch),
            }
        }
        Kind::Activation(act) => {
            if let Some(grad_in) = grad_in {
                let act = *act;
                input
                    .values()
                    .par_chunks(ELEMENTS_PER_TASK)
                    .zip(out.par_chunks(ELEMENTS_PER_TASK))
                    .zip(grad_out.par_chunks(ELEMENTS_PER_TASK))
                    .zip(grad_in.par_chunks_mut(ELEMENTS_PER_TASK))
                    .for_each(|(((x, out), grad_out), grad_in)| {
                        activation_backward(act, x, out, grad_out, grad_in)
                    });
            }
        }
        Kind::Residual { chain, input_grad } => {
            let last = chain.nodes.last_mut().expect("a residual block has layers");
            last.grad.copy_from_slice(grad_out);
            backward_chain(chain, input, params, grads, Some(input_grad));
            if let Some(grad_in) = grad_in {
                add_into(grad_in, grad_out, input_grad);
            }
        }
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

simd_kernel! {
    /// `out = x + y`, element by element.
    fn add_into(out: &mut [f32], x: &[f32], y: &[f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
            *o = x + y;
        }
    }
}

simd_kernel! {
    /// `sum += values`, element by element.
    fn add_assign(sum: &mut [f32], values: &[f32]) {
        for (s, &v) in sum.iter_mut().zip(values) {
            *s += v;
        }
    }
}

simd_kernel! {
    fn row_sum(row: &[f32]) -> f32 {
        sum(row)
    }
}

/// Max pooling of one sample: each window's first maximum in row-major order (PyTorch's
/// choice on ties), its index in the sample recorded for the backward pass.
fn max_pool(x: &[f32], pool: Pool, out: &mut [f32], winner: &mut [u32]) {
    let (out_h, out_w, size) = (pool.out_h(), pool.out_w(), pool.size);
    let plane = pool.height * pool.width;
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

/// erf(x) to about 1.5e-7 (Abramowitz and Stegun 7.1.26), with this crate's `exp` so that
/// loops over it vectorize.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-x * x);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

simd_kernel! {
    fn activation_forward(act: Act, x: &[f32], out: &mut [f32]) {
        let pairs = x.iter().zip(out.iter_mut());
        match act {
            Act::Relu => pairs.for_each(|(&x, o)| *o = x.max(0.0)),
            Act::GeluErf => pairs.for_each(|(&x, o)| *o = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))),
            Act::GeluTanh => pairs.for_each(|(&x, o)| *o = gelu_value(x)),
            Act::Tanh => pairs.for_each(|(&x, o)| *o = x.tanh()),
            Act::Sigmoid => pairs.for_each(|(&x, o)| *o = 1.0 / (1.0 + exp(-x))),
            Act::Silu => pairs.for_each(|(&x, o)| *o = x / (1.0 + exp(-x))),
        }
    }
}

simd_kernel! {
    /// `grad_in = grad_out * act'(x)`; `out` is the forward output.
    fn activation_backward(act: Act, x: &[f32], out: &[f32], grad_out: &[f32], grad_in: &mut [f32]) {
        let each = x.iter().zip(out).zip(grad_out).zip(grad_in.iter_mut());
        match act {
            Act::Relu => each.for_each(|(((&x, _), &g), d)| *d = if x > 0.0 { g } else { 0.0 }),
            Act::GeluErf => each.for_each(|(((&x, _), &g), d)| {
                let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
                *d = g * (cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x));
            }),
            Act::GeluTanh => each.for_each(|(((&x, _), &g), d)| *d = g * gelu_derivative(x)),
            Act::Tanh => each.for_each(|(((_, &t), &g), d)| *d = g * (1.0 - t * t)),
            Act::Sigmoid => each.for_each(|(((_, &s), &g), d)| *d = g * s * (1.0 - s)),
            Act::Silu => each.for_each(|(((&x, _), &g), d)| {
                let s = 1.0 / (1.0 + exp(-x));
                *d = g * s * (1.0 + x * (1.0 - s));
            }),
        }
    }
}

/// The loss summed over the first `len` rows of the batch `rows` (the rest pad it) and the
/// right predictions among them, through the eval-mode forward pass.
pub(super) fn evaluate_batch(
    buffers: &mut Buffers,
    params: &[&[f32]],
    data: &DeviceData,
    rows: &[usize],
    len: usize,
) -> candle_core::Result<(f64, usize)> {
    gather(data, rows, buffers)?;
    let input = if buffers.task == Task::LanguageModel {
        Input::Tokens(&buffers.tokens)
    } else {
        Input::Values(&buffers.input)
    };
    forward_chain(&mut buffers.chain, input, rows.len(), params, &mut None)?;
    let output = &buffers.chain.nodes.last().expect("a model has layers").out;
    let outputs = &output[..len * buffers.output_len];
    Ok(match buffers.task {
        Task::Classification => {
            classification_loss_and_hits(outputs, &buffers.labels[..len], buffers.classes)
        }
        Task::LanguageModel => sequence_loss_and_hits(
            outputs,
            &buffers.labels[..len * buffers.per_sample],
            buffers.classes,
            buffers.per_sample,
        ),
        Task::Regression => {
            let width = buffers.classes;
            (
                squared_error_sum(outputs, &buffers.targets[..len * width], width),
                0,
            )
        }
    })
}

/// Forward and backward pass on the batch `rows`; see `super::forward_backward`.
pub(super) fn forward_backward(
    buffers: &mut Buffers,
    params: &[&[f32]],
    grads: &mut [Vec<f32>],
    data: &DeviceData,
    rows: &[usize],
    dropout_rng: &mut Rng,
) -> candle_core::Result<f64> {
    gather(data, rows, buffers)?;
    let n = rows.len();
    let Buffers {
        task,
        input,
        tokens,
        chain,
        labels,
        targets,
        classes,
        ..
    } = buffers;
    let chain_input = if *task == Task::LanguageModel {
        Input::Tokens(tokens)
    } else {
        Input::Values(input)
    };
    forward_chain(chain, chain_input, n, params, &mut Some(dropout_rng))?;
    let last = chain.nodes.last_mut().expect("a model has layers");
    let loss = match task {
        Task::Regression => mean_squared_error(&last.out, targets, &mut last.grad),
        _ => cross_entropy(&last.out, labels, *classes, &mut last.grad),
    };
    if !loss.is_finite() {
        return Ok(loss);
    }
    backward_chain(chain, chain_input, params, grads, None);
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use candle_core::Device;

    use super::*;
    use crate::engine::backend::native::tests::{
        assert_evaluation_matches_candle, assert_matches_autograd,
    };
    use crate::engine::backend::native::{evaluate, forward_backward};
    use crate::engine::model::layers::golden;
    use crate::engine::model::ModelShape;
    use crate::engine::spec::ModelSpec;

    /// The native step on PyTorch's six golden networks: the eval-mode loss of the saved
    /// weights, then the training loss, every gradient and batch norm's running statistics.
    #[test]
    fn the_native_step_matches_pytorch_on_the_golden_networks() {
        for case in golden::cases() {
            let model = case.model();
            model.load_state_dict(&case.weights()).unwrap();
            let data = case.device_data();
            let rows: Vec<usize> = (0..data.rows).collect();
            let mut workspace = None;
            let (eval_loss, _) = evaluate(
                &model,
                &mut workspace,
                &data,
                data.rows,
                &AtomicBool::new(false),
            )
            .unwrap();
            assert!(
                (eval_loss - case.eval_loss).abs() <= 1e-4 * case.eval_loss,
                "{}: eval loss {eval_loss} vs PyTorch's {}",
                case.name,
                case.eval_loss
            );
            let loss =
                forward_backward(&model, &mut workspace, &data, &rows, &mut Rng::new(1)).unwrap();
            assert!(
                (loss - case.train_loss).abs() <= 1e-4 * case.train_loss,
                "{}: train loss {loss} vs PyTorch's {}",
                case.name,
                case.train_loss
            );
            let grads = &workspace.as_ref().unwrap().grads;
            assert_eq!(grads.len(), case.param_order.len(), "{}", case.name);
            for (name, grad) in case.param_order.iter().zip(grads) {
                golden::assert_close(
                    grad,
                    &case.grads[name],
                    &format!("{} grad {name}", case.name),
                );
            }
            let sequential = model.layers();
            assert_eq!(
                case.running_after.len(),
                sequential.buffers().count(),
                "{}",
                case.name
            );
            for (name, var) in sequential.buffer_names().zip(sequential.buffers()) {
                let values = var.as_tensor().to_vec1::<f32>().unwrap();
                golden::assert_close(
                    &values,
                    &case.running_after[name],
                    &format!("{} {name}", case.name),
                );
            }
        }
    }

    fn random_data(shape: &ModelShape, rows: usize) -> DeviceData {
        let mut rng = Rng::new(17);
        let per_row: usize = shape.input.iter().product();
        let device = Device::Cpu;
        let mut dims = vec![rows];
        dims.extend(&shape.input);
        let (x, y) = match shape.task {
            Task::LanguageModel => {
                let mut ids = |count| -> Vec<u32> {
                    (0..count).map(|_| rng.below(shape.output) as u32).collect()
                };
                (
                    Tensor::from_vec(ids(rows * per_row), dims, &device),
                    Tensor::from_vec(ids(rows * per_row), (rows, per_row), &device),
                )
            }
            Task::Classification => (
                Tensor::from_vec(
                    (0..rows * per_row).map(|_| rng.normal() as f32).collect(),
                    dims,
                    &device,
                ),
                Tensor::from_vec(
                    (0..rows).map(|_| rng.below(shape.output) as u32).collect(),
                    rows,
                    &device,
                ),
            ),
            Task::Regression => (
                Tensor::from_vec(
                    (0..rows * per_row).map(|_| rng.normal() as f32).collect(),
                    dims,
                    &device,
                ),
                Tensor::from_vec(
                    (0..rows * shape.output)
                        .map(|_| rng.normal() as f32)
                        .collect(),
                    (rows, shape.output),
                    &device,
                ),
            ),
        };
        DeviceData {
            x: x.unwrap(),
            y: y.unwrap(),
            rows,
            task: shape.task,
        }
    }

    /// Layer lists with what the golden networks leave out (dropout, several channels into
    /// a strided and padded convolution, residual convolutions, every activation): the
    /// native step's loss, gradients and evaluation against candle's autograd.
    #[test]
    fn the_native_step_matches_candle_on_every_layer_type() {
        let cases = [
            (
                r#"[{"type": "conv2d", "out": 5, "kernel": 3, "stride": 2, "padding": 2},
                    {"type": "batch_norm"}, {"type": "silu"},
                    {"type": "residual", "layers": [
                        {"type": "conv2d", "out": 5, "kernel": 3, "padding": 1},
                        {"type": "tanh"}]},
                    {"type": "max_pool2d", "size": 2}, {"type": "dropout", "p": 0.3},
                    {"type": "avg_pool2d", "size": 2}, {"type": "flatten"},
                    {"type": "linear", "out": 9}, {"type": "sigmoid"},
                    {"type": "dropout", "p": 0.2}, {"type": "linear", "out": 4}]"#,
                vec![3, 11, 10],
                Task::Classification,
                4,
            ),
            (
                r#"[{"type": "linear", "out": 12}, {"type": "gelu"},
                    {"type": "residual", "layers": [
                        {"type": "layer_norm"}, {"type": "linear", "out": 12},
                        {"type": "gelu", "approximate": "tanh"}, {"type": "dropout", "p": 0.1}]},
                    {"type": "batch_norm"}, {"type": "relu"}, {"type": "linear", "out": 2}]"#,
                vec![7],
                Task::Regression,
                2,
            ),
            (
                r#"[{"type": "embedding", "dim": 6}, {"type": "layer_norm"},
                    {"type": "residual", "layers": [{"type": "linear", "out": 6}, {"type": "relu"}]},
                    {"type": "linear", "out": 5}]"#,
                vec![8],
                Task::LanguageModel,
                5,
            ),
            (
                r#"[{"type": "conv2d", "out": 4, "kernel": 2}, {"type": "adaptive_avg_pool2d"},
                    {"type": "flatten"}, {"type": "linear", "out": 3}]"#,
                vec![2, 5, 5],
                Task::Classification,
                3,
            ),
            (
                r#"[{"type": "embedding", "dim": 8, "init_std": 0.3}, {"type": "position_embedding"},
                    {"type": "transformer_block", "heads": 2}, {"type": "dropout", "p": 0.1},
                    {"type": "residual", "layers": [{"type": "transformer_block", "heads": 4}]},
                    {"type": "layer_norm"}, {"type": "linear", "out": 5}]"#,
                vec![7],
                Task::LanguageModel,
                5,
            ),
        ];
        for (layers, input, task, output) in cases {
            let spec = ModelSpec::Sequential {
                layers: serde_json::from_str(layers).unwrap(),
                context: None,
            };
            let shape = ModelShape {
                input,
                output,
                task,
            };
            let model = Model::build(&spec, &shape, 5, &Device::Cpu).unwrap();
            let train = random_data(&shape, 24);
            let rows: Vec<usize> = (0..12).map(|i| (i * 5 + 2) % 24).collect();
            assert_matches_autograd(&model, &train, &rows);
            assert_evaluation_matches_candle(&model, &train);
        }
    }
}
