//! Layer-list models (`"arch": "sequential"`): a user's own network as a list of PyTorch
//! layers, with PyTorch's semantics, default initialisation and `state_dict()` names, trained
//! through candle's autograd.
//!
//! The list is checked against the data's per-sample shape before anything is built
//! ([`plan`]): every layer's input and output shape is known, and a layer that cannot take
//! its input is a spec error naming its index and both shapes. The same plan counts the
//! parameters and sizes the activations for admission, and builds the model.
//!
//! Weights can start from a PyTorch checkpoint: [`Sequential::load_state_dict`] takes the
//! tensors of `safetensors.torch.save_file(model.state_dict(), path)` for the equivalent
//! `torch.nn.Sequential`, by name (`"0.weight"`, `"1.running_mean"`, a residual block's
//! `"2.0.weight"`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::{apply_dropout, layer_norm, linear, normal_var, uniform_var};
use crate::engine::data::Task;
use crate::engine::rng::Rng;
use crate::engine::spec::{InitSpec, SpecError, WeightsSource};

/// Batch norm's defaults, PyTorch's.
pub(crate) const BATCH_NORM_MOMENTUM: f64 = 0.1;
pub(crate) const NORM_EPS: f64 = 1e-5;

/// One layer of a layer list, with PyTorch's parameter names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// `nn.Linear(in, out)` on the last dimension.
    Linear {
        out: usize,
    },
    /// `nn.Conv2d(in, out, kernel, stride, padding)`.
    Conv2d {
        out: usize,
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
    },
    /// `nn.MaxPool2d(size, stride)`; the stride defaults to the size.
    MaxPool2d {
        size: usize,
        #[serde(default)]
        stride: Option<usize>,
    },
    /// `nn.AvgPool2d(size, stride)`.
    AvgPool2d {
        size: usize,
        #[serde(default)]
        stride: Option<usize>,
    },
    /// `nn.AdaptiveAvgPool2d(1)`.
    AdaptiveAvgPool2d,
    /// `nn.BatchNorm1d` after `[features]`, `nn.BatchNorm2d` after `[channels, h, w]`.
    BatchNorm,
    /// `nn.LayerNorm` over the last dimension.
    LayerNorm,
    Dropout {
        p: f64,
    },
    /// `nn.Flatten()`: every per-sample dimension into one.
    Flatten,
    /// `nn.Embedding(vocab, dim)` on token ids (text data); the vocabulary is the data's. Its
    /// weight is drawn from N(0, init_std^2): nn.Embedding's N(0, 1) unless given.
    Embedding {
        dim: usize,
        #[serde(default = "unit_std", skip_serializing_if = "is_unit_std")]
        init_std: f64,
    },
    /// A learned absolute position embedding added to `[time, dim]` values: weight
    /// `[time, dim]` (the model's context), drawn from N(0, 0.02^2).
    PositionEmbedding,
    /// A pre-norm transformer block on `[time, dim]`: `x + projection(attention(norm(x)))`
    /// with causal multi-head attention over a fused `qkv` projection, then `x +
    /// contract(gelu_tanh(expand(norm(x))))` with a 4x wider MLP.
    TransformerBlock {
        heads: usize,
    },
    Relu,
    Gelu {
        #[serde(default)]
        approximate: GeluApproximation,
    },
    Tanh,
    Sigmoid,
    Silu,
    /// A block whose output is added to its input (`x + block(x)`); its layers are named as
    /// a nested `nn.Sequential`'s.
    Residual {
        layers: Vec<LayerSpec>,
    },
}

fn one() -> usize {
    1
}

fn unit_std() -> f64 {
    1.0
}

fn is_unit_std(std: &f64) -> bool {
    *std == 1.0
}

/// GPT-2's standard deviation for the position embedding's weight.
const POSITION_EMBEDDING_STD: f64 = 0.02;

/// `nn.GELU(approximate=...)`: the exact erf form (PyTorch's default) or the tanh form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeluApproximation {
    #[default]
    None,
    Tanh,
}

impl LayerSpec {
    fn name(&self) -> &'static str {
        match self {
            LayerSpec::Linear { .. } => "linear",
            LayerSpec::Conv2d { .. } => "conv2d",
            LayerSpec::MaxPool2d { .. } => "max_pool2d",
            LayerSpec::AvgPool2d { .. } => "avg_pool2d",
            LayerSpec::AdaptiveAvgPool2d => "adaptive_avg_pool2d",
            LayerSpec::BatchNorm => "batch_norm",
            LayerSpec::LayerNorm => "layer_norm",
            LayerSpec::Dropout { .. } => "dropout",
            LayerSpec::Flatten => "flatten",
            LayerSpec::Embedding { .. } => "embedding",
            LayerSpec::PositionEmbedding => "position_embedding",
            LayerSpec::TransformerBlock { .. } => "transformer_block",
            LayerSpec::Relu => "relu",
            LayerSpec::Gelu { .. } => "gelu",
            LayerSpec::Tanh => "tanh",
            LayerSpec::Sigmoid => "sigmoid",
            LayerSpec::Silu => "silu",
            LayerSpec::Residual { .. } => "residual",
        }
    }
}

/// Checks the layers' own settings (sizes, rates), shape-independent; `field` is the list's
/// path in the spec (`model.layers`).
pub fn validate(layers: &[LayerSpec], field: &str) -> Result<(), SpecError> {
    if layers.is_empty() {
        return Err(SpecError::new(field, "give at least one layer"));
    }
    for (index, layer) in layers.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let positive = |name: &str, value: usize| {
            if value == 0 {
                Err(SpecError::new(
                    format!("{at}.{name}"),
                    format!("{} needs {name} of at least 1", layer.name()),
                ))
            } else {
                Ok(())
            }
        };
        match layer {
            LayerSpec::Linear { out } => positive("out", *out)?,
            LayerSpec::Conv2d {
                out,
                kernel,
                stride,
                ..
            } => {
                positive("out", *out)?;
                positive("kernel", *kernel)?;
                positive("stride", *stride)?;
            }
            LayerSpec::MaxPool2d { size, stride } | LayerSpec::AvgPool2d { size, stride } => {
                positive("size", *size)?;
                if let Some(stride) = stride {
                    positive("stride", *stride)?;
                    if stride != size {
                        return Err(SpecError::new(
                            format!("{at}.stride"),
                            format!(
                                "{} with a stride other than its size ({stride} vs {size}) is \
                                 not supported; leave stride out",
                                layer.name()
                            ),
                        ));
                    }
                }
            }
            LayerSpec::Dropout { p } if !(0.0..1.0).contains(p) => {
                return Err(SpecError::new(
                    format!("{at}.p"),
                    format!("must be in [0, 1), got {p}"),
                ));
            }
            LayerSpec::Embedding { dim, init_std } => {
                positive("dim", *dim)?;
                if !(init_std.is_finite() && *init_std >= 0.0) {
                    return Err(SpecError::new(
                        format!("{at}.init_std"),
                        format!("must be a finite number of at least 0, got {init_std}"),
                    ));
                }
            }
            LayerSpec::TransformerBlock { heads } => positive("heads", *heads)?,
            LayerSpec::Residual { layers } => validate(layers, &format!("{at}.layers"))?,
            _ => {}
        }
    }
    Ok(())
}

/// What reaches a layer, per sample.
#[derive(Debug, Clone, PartialEq)]
enum Sample {
    /// Token ids, `time` of them, below `vocab`.
    Tokens {
        time: usize,
        vocab: usize,
    },
    Values(Vec<usize>),
}

impl Sample {
    fn describe(&self) -> String {
        match self {
            Sample::Tokens { time, .. } => format!("[{time}] token ids"),
            Sample::Values(dims) => format!("{dims:?}"),
        }
    }
}

/// A layer with every size fixed by the shape that reaches it.
#[derive(Debug, Clone)]
enum Planned {
    Linear {
        inputs: usize,
        outputs: usize,
    },
    Conv2d {
        inputs: usize,
        outputs: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    MaxPool2d {
        size: usize,
    },
    AvgPool2d {
        size: usize,
    },
    AdaptiveAvgPool2d,
    /// `spatial`: over `[channels, h, w]` (BatchNorm2d), else over `[features]`.
    BatchNorm {
        features: usize,
        spatial: bool,
    },
    LayerNorm {
        size: usize,
    },
    Dropout {
        p: f64,
    },
    Flatten,
    Embedding {
        vocab: usize,
        dim: usize,
        init_std: f64,
    },
    PositionEmbedding {
        time: usize,
        dim: usize,
    },
    TransformerBlock {
        time: usize,
        dim: usize,
        heads: usize,
    },
    Relu,
    Gelu(GeluApproximation),
    Tanh,
    Sigmoid,
    Silu,
    Residual(Vec<Planned>),
}

impl Planned {
    /// The values per sample the native step keeps for this layer, given its output's: the
    /// output and its gradient, and what the backward pass needs saved (a convolution's
    /// patches are counted when it is planned).
    fn kept_values(&self, output: u64) -> u64 {
        let saved = match self {
            // Batch norm's per-feature 1/std is counted per sample: a small overcount.
            Planned::BatchNorm { features, .. } => output.saturating_add(*features as u64),
            Planned::Dropout { .. } | Planned::MaxPool2d { .. } => output,
            Planned::LayerNorm { size } => output.saturating_add(output / (*size as u64).max(1)),
            Planned::Residual(_) => output,
            _ => 0,
        };
        output.saturating_mul(2).saturating_add(saved)
    }
}

/// The checked plan of a layer list: each layer's sizes, the per-sample output shape, the
/// parameter count and the activation values per sample, convolution patches included (for
/// admission).
#[derive(Debug, Clone)]
pub struct Plan {
    layers: Vec<Planned>,
    output: Vec<usize>,
    pub parameters: u64,
    /// The values per sample the native step keeps between steps (see `Planned::kept_values`).
    pub activations_per_sample: u64,
}

/// Plans `layers` for samples of `input` (token ids of length `input[0]` for a language
/// model, whose vocabulary is `outputs`), and checks that the last layer gives what the task
/// needs: `[classes]`, `[outputs]` or `[time, vocab]`.
pub fn plan(
    layers: &[LayerSpec],
    input: &[usize],
    task: Task,
    outputs: usize,
) -> Result<Plan, SpecError> {
    let sample = match task {
        Task::LanguageModel => Sample::Tokens {
            time: input.first().copied().unwrap_or(0),
            vocab: outputs,
        },
        _ => Sample::Values(input.to_vec()),
    };
    let mut counts = (0u64, 0u64);
    let (planned, output) = plan_list(layers, sample, "model.layers", &mut counts)?;
    let Sample::Values(output) = output else {
        return Err(SpecError::new(
            "model.layers",
            "the layers never embed the token ids: start with an embedding layer",
        ));
    };
    let wanted = match task {
        Task::LanguageModel => vec![input.first().copied().unwrap_or(0), outputs],
        _ => vec![outputs],
    };
    if output != wanted {
        let what = match task {
            Task::Classification => format!("classification into {outputs} classes"),
            Task::Regression => format!("regression onto {outputs} values"),
            Task::LanguageModel => format!("next-token prediction over {outputs} symbols"),
        };
        return Err(SpecError::new(
            "model.layers",
            format!(
                "the last layer gives {output:?} per sample, but {what} needs {wanted:?}: end \
                 with a linear layer of out {outputs}"
            ),
        ));
    }
    Ok(Plan {
        layers: planned,
        output,
        parameters: counts.0,
        activations_per_sample: counts.1,
    })
}

fn plan_list(
    layers: &[LayerSpec],
    mut sample: Sample,
    field: &str,
    counts: &mut (u64, u64),
) -> Result<(Vec<Planned>, Sample), SpecError> {
    let mut planned = Vec::with_capacity(layers.len());
    for (index, layer) in layers.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let (layer, next) = plan_layer(layer, &sample, &at, counts)?;
        if let Sample::Values(dims) = &next {
            let values: u64 = dims.iter().map(|&d| d as u64).product();
            counts.1 = counts.1.saturating_add(layer.kept_values(values));
        }
        planned.push(layer);
        sample = next;
    }
    Ok((planned, sample))
}

fn plan_layer(
    layer: &LayerSpec,
    sample: &Sample,
    at: &str,
    counts: &mut (u64, u64),
) -> Result<(Planned, Sample), SpecError> {
    let name = layer.name();
    let mismatch = |needs: &str| {
        SpecError::new(
            at,
            format!(
                "{name} needs {needs}, but its input is {}",
                sample.describe()
            ),
        )
    };
    let dims = match (layer, sample) {
        (LayerSpec::Embedding { dim, init_std }, Sample::Tokens { time, vocab }) => {
            counts.0 = counts
                .0
                .saturating_add((*vocab as u64).saturating_mul(*dim as u64));
            return Ok((
                Planned::Embedding {
                    vocab: *vocab,
                    dim: *dim,
                    init_std: *init_std,
                },
                Sample::Values(vec![*time, *dim]),
            ));
        }
        (LayerSpec::Embedding { .. }, Sample::Values(_)) => {
            return Err(mismatch("token ids (text data)"));
        }
        (_, Sample::Tokens { .. }) => {
            return Err(mismatch(
                "values: the token ids must go through an embedding first",
            ));
        }
        (_, Sample::Values(dims)) => dims.clone(),
    };
    let add_parameters = |counts: &mut (u64, u64), values: u64| {
        counts.0 = counts.0.saturating_add(values);
    };
    let same = Sample::Values(dims.clone());
    Ok(match layer {
        LayerSpec::Linear { out } => {
            let Some(&inputs) = dims.last() else {
                return Err(mismatch("at least one dimension"));
            };
            add_parameters(counts, (inputs as u64 + 1).saturating_mul(*out as u64));
            let mut next = dims.clone();
            *next.last_mut().expect("checked above") = *out;
            (
                Planned::Linear {
                    inputs,
                    outputs: *out,
                },
                Sample::Values(next),
            )
        }
        LayerSpec::Conv2d {
            out,
            kernel,
            stride,
            padding,
        } => {
            let &[channels, height, width] = &dims[..] else {
                return Err(mismatch("[channels, height, width]"));
            };
            let size = |side: usize| {
                (side + 2 * padding)
                    .checked_sub(*kernel)
                    .map(|s| s / stride + 1)
            };
            let (Some(out_h), Some(out_w)) = (size(height), size(width)) else {
                return Err(SpecError::new(
                    at,
                    format!(
                        "conv2d's kernel {kernel} with padding {padding} does not fit its input \
                         {dims:?}"
                    ),
                ));
            };
            let fan_in = (channels * kernel * kernel) as u64;
            add_parameters(counts, (fan_in + 1).saturating_mul(*out as u64));
            // The native step's patches, their gradient and the channel-major output.
            let pixels = (out_h * out_w) as u64;
            counts.1 = counts.1.saturating_add(
                pixels.saturating_mul(fan_in.saturating_mul(2).saturating_add(*out as u64)),
            );
            (
                Planned::Conv2d {
                    inputs: channels,
                    outputs: *out,
                    kernel: *kernel,
                    stride: *stride,
                    padding: *padding,
                },
                Sample::Values(vec![*out, out_h, out_w]),
            )
        }
        LayerSpec::MaxPool2d { size, .. } | LayerSpec::AvgPool2d { size, .. } => {
            let &[channels, height, width] = &dims[..] else {
                return Err(mismatch("[channels, height, width]"));
            };
            if height < *size || width < *size {
                return Err(SpecError::new(
                    at,
                    format!("{name} of size {size} does not fit its input {dims:?}"),
                ));
            }
            let planned = match layer {
                LayerSpec::MaxPool2d { .. } => Planned::MaxPool2d { size: *size },
                _ => Planned::AvgPool2d { size: *size },
            };
            (
                planned,
                Sample::Values(vec![channels, height / size, width / size]),
            )
        }
        LayerSpec::AdaptiveAvgPool2d => {
            let &[channels, _, _] = &dims[..] else {
                return Err(mismatch("[channels, height, width]"));
            };
            (
                Planned::AdaptiveAvgPool2d,
                Sample::Values(vec![channels, 1, 1]),
            )
        }
        LayerSpec::BatchNorm => {
            let (features, spatial) = match dims[..] {
                [features] => (features, false),
                [channels, _, _] => (channels, true),
                _ => return Err(mismatch("[features] or [channels, height, width]")),
            };
            add_parameters(counts, 2 * features as u64);
            (Planned::BatchNorm { features, spatial }, same)
        }
        LayerSpec::LayerNorm => {
            let Some(&size) = dims.last() else {
                return Err(mismatch("at least one dimension"));
            };
            add_parameters(counts, 2 * size as u64);
            (Planned::LayerNorm { size }, same)
        }
        LayerSpec::Dropout { p } => (Planned::Dropout { p: *p }, same),
        LayerSpec::Flatten => {
            let total = dims.iter().product();
            (Planned::Flatten, Sample::Values(vec![total]))
        }
        LayerSpec::PositionEmbedding => {
            let &[time, dim] = &dims[..] else {
                return Err(mismatch("[time, dim]"));
            };
            add_parameters(counts, (time as u64).saturating_mul(dim as u64));
            (Planned::PositionEmbedding { time, dim }, same)
        }
        LayerSpec::TransformerBlock { heads } => {
            let &[time, dim] = &dims[..] else {
                return Err(mismatch("[time, dim]"));
            };
            if dim % heads != 0 {
                return Err(SpecError::new(
                    format!("{at}.heads"),
                    format!(
                        "{name}'s {heads} heads do not divide the {dim} values per position of \
                         its input {dims:?}"
                    ),
                ));
            }
            let d = dim as u64;
            // Two layer norms; qkv, projection, expand and contract with their biases.
            let d_squared = d.saturating_mul(d);
            add_parameters(
                counts,
                d_squared
                    .saturating_mul(12)
                    .saturating_add(d.saturating_mul(13)),
            );
            // The native step's saved values and backward scratch beyond the output and its
            // gradient (see `native::attention`): 30 values per output value, the attention
            // weights and their gradient (`heads * time^2` each) and the norms' statistics.
            let (t, h) = (time as u64, *heads as u64);
            counts.1 = counts.1.saturating_add(
                t.saturating_mul(d)
                    .saturating_mul(30)
                    .saturating_add(t.saturating_mul(2))
                    .saturating_add(h.saturating_mul(t).saturating_mul(t).saturating_mul(2)),
            );
            (
                Planned::TransformerBlock {
                    time,
                    dim,
                    heads: *heads,
                },
                same,
            )
        }
        LayerSpec::Relu => (Planned::Relu, same),
        LayerSpec::Gelu { approximate } => (Planned::Gelu(*approximate), same),
        LayerSpec::Tanh => (Planned::Tanh, same),
        LayerSpec::Sigmoid => (Planned::Sigmoid, same),
        LayerSpec::Silu => (Planned::Silu, same),
        LayerSpec::Residual { layers } => {
            let (inner, output) = plan_list(layers, same.clone(), &format!("{at}.layers"), counts)?;
            if output != same {
                return Err(SpecError::new(
                    at,
                    format!(
                        "a residual block adds its output to its input, but it turns {} into {}",
                        same.describe(),
                        output.describe()
                    ),
                ));
            }
            (Planned::Residual(inner), same)
        }
        LayerSpec::Embedding { .. } => unreachable!("handled above"),
    })
}

/// A built layer (a PyTorch module). Parameters are `Var`s the optimizer steps; batch norm's running statistics
/// are `Var`s it does not (updated in place in training mode).
pub(crate) enum Module {
    Linear {
        weight: Var,
        bias: Var,
    },
    Conv2d {
        weight: Var,
        bias: Var,
        stride: usize,
        padding: usize,
    },
    MaxPool2d(usize),
    AvgPool2d(usize),
    AdaptiveAvgPool2d,
    BatchNorm {
        weight: Var,
        bias: Var,
        running_mean: Var,
        running_var: Var,
        spatial: bool,
    },
    LayerNorm {
        weight: Var,
        bias: Var,
    },
    Dropout(f64),
    Flatten,
    Embedding(Var),
    PositionEmbedding(Var),
    TransformerBlock(Box<TransformerBlock>),
    Relu,
    Gelu(GeluApproximation),
    Tanh,
    Sigmoid,
    Silu,
    Residual(Vec<Module>),
}

/// A pre-norm transformer block's parameters (PyTorch layouts), in the order of the `transformer`
/// preset's blocks (and of `named_parameters()` for a module that registers its submodules in
/// this order): `norm_attention`, `norm_mlp`, `qkv`, `projection`, `expand`, `contract`, each
/// `[weight, bias]`.
pub(crate) struct TransformerBlock {
    pub(crate) heads: usize,
    norm_attention: [Var; 2],
    norm_mlp: [Var; 2],
    qkv: [Var; 2],
    projection: [Var; 2],
    expand: [Var; 2],
    contract: [Var; 2],
    /// `[time, time]`: 0 where a position may attend, -inf above the diagonal.
    causal_mask: Tensor,
}

impl TransformerBlock {
    /// `[batch, time, dim]` to `[batch, time, dim]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [gain, shift] = &self.norm_attention;
        let h = (x + self.attention(&layer_norm(x, gain, shift)?)?)?;
        let [gain, shift] = &self.norm_mlp;
        let [weight, bias] = &self.expand;
        let expanded = linear(&layer_norm(&h, gain, shift)?, weight, bias)?.gelu()?;
        let [weight, bias] = &self.contract;
        &h + linear(&expanded, weight, bias)?
    }

    /// Causal multi-head self-attention, then the output projection.
    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, time, dim) = x.dims3()?;
        let head_dim = dim / self.heads;
        let [weight, bias] = &self.qkv;
        let qkv = linear(x, weight, bias)?.reshape((batch, time, 3, self.heads, head_dim))?;
        // `[batch, heads, time, head_dim]` each.
        let part = |index: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, index, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (query, key, value) = (part(0)?, part(1)?, part(2)?);
        let scores = (query.matmul(&key.t()?.contiguous()?)? / (head_dim as f64).sqrt())?
            .broadcast_add(&self.causal_mask)?;
        // candle_nn's `softmax_last_dim` has no backward pass; `softmax` is stock ops.
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let mixed = weights
            .matmul(&value)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, time, dim))?;
        let [weight, bias] = &self.projection;
        linear(&mixed, weight, bias)
    }
}

/// A layer-list model on candle.
pub struct Sequential {
    layers: Vec<Module>,
    /// Trainable parameters by `state_dict()` name, in `named_parameters()` order.
    parameters: Vec<(String, Var)>,
    /// Batch norm's running statistics by name.
    buffers: Vec<(String, Var)>,
}

impl Sequential {
    /// Builds the planned layers with PyTorch's default initialisation, drawn from `rng`.
    pub fn build(plan: &Plan, rng: &mut Rng, device: &Device) -> candle_core::Result<Sequential> {
        let mut parameters = Vec::new();
        let mut buffers = Vec::new();
        let layers = build_list(&plan.layers, "", rng, device, &mut parameters, &mut buffers)?;
        Ok(Sequential {
            layers,
            parameters,
            buffers,
        })
    }

    /// The built layers (the native step walks them in order).
    pub(crate) fn modules(&self) -> &[Module] {
        &self.layers
    }

    /// The parameters in `named_parameters()` order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parameters.iter().map(|(_, var)| var)
    }

    /// The running statistics' `state_dict()` names, in [`Sequential::buffers`] order.
    pub fn buffer_names(&self) -> impl Iterator<Item = &String> {
        self.buffers.iter().map(|(name, _)| name)
    }

    /// Batch norm's running statistics (part of a snapshot, not of the optimizer's state).
    pub fn buffers(&self) -> impl Iterator<Item = &Var> {
        self.buffers.iter().map(|(_, var)| var)
    }

    /// The forward pass; `train` is the dropout generator in training mode (`None`: eval
    /// mode, dropout off and batch norm on its running statistics).
    pub fn forward(&self, x: &Tensor, train: Option<&mut Rng>) -> candle_core::Result<Tensor> {
        let mut train = train;
        forward_list(&self.layers, x, &mut train)
    }

    /// Sets every parameter and running statistic from `tensors`, keyed by `state_dict()`
    /// names. A missing, extra or mis-shaped tensor is an error naming it; `num_batches_tracked`
    /// is accepted and ignored (no momentum of `None` here).
    pub fn load_state_dict(&self, tensors: &HashMap<String, Tensor>) -> Result<(), SpecError> {
        const FIELD: &str = "init.weights";
        let mut expected: Vec<&str> = Vec::new();
        for (name, var) in self.parameters.iter().chain(&self.buffers) {
            expected.push(name);
            let Some(tensor) = tensors.get(name) else {
                return Err(SpecError::new(
                    FIELD,
                    format!(
                        "the weights have no tensor \"{name}\" (shape {:?}); they must be the \
                         state_dict() of the equivalent torch.nn.Sequential",
                        var.dims()
                    ),
                ));
            };
            if tensor.dims() != var.dims() {
                return Err(SpecError::new(
                    FIELD,
                    format!(
                        "tensor \"{name}\" has shape {:?}, but the model's is {:?}",
                        tensor.dims(),
                        var.dims()
                    ),
                ));
            }
            let converted = tensor
                .to_dtype(DType::F32)
                .and_then(|t| t.to_device(var.device()))
                .and_then(|t| var.set(&t));
            if let Err(error) = converted {
                return Err(SpecError::new(
                    FIELD,
                    format!("tensor \"{name}\" could not be loaded: {error}"),
                ));
            }
        }
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|name| !expected.contains(&name.as_str()))
            .filter(|name| {
                // Batch norm's counter, wherever the model has a batch norm.
                !name
                    .strip_suffix("num_batches_tracked")
                    .is_some_and(|prefix| {
                        expected.contains(&format!("{prefix}running_mean").as_str())
                    })
            })
            .collect();
        extra.sort();
        if let Some(first) = extra.first() {
            return Err(SpecError::new(
                FIELD,
                format!(
                    "the weights have {} tensor(s) the model does not, first \"{first}\" (shape \
                     {:?}): is the layer list the same as the PyTorch model's?",
                    extra.len(),
                    tensors[*first].dims()
                ),
            ));
        }
        Ok(())
    }
}

/// The tensors of a spec's `init.weights`, if any: a local file is read here, uploaded
/// weights are the `fetched` bytes the service read from its store.
pub fn load_initial_weights(
    init: Option<&InitSpec>,
    fetched: Option<&[u8]>,
) -> Result<Option<HashMap<String, Tensor>>, SpecError> {
    let Some(init) = init else {
        return Ok(None);
    };
    match (&init.weights, fetched) {
        (WeightsSource::Path(path), _) => {
            let bytes = std::fs::read(path).map_err(|error| {
                SpecError::new("init.weights.path", format!("cannot read {path}: {error}"))
            })?;
            read_safetensors(&bytes).map(Some)
        }
        (WeightsSource::Id(_), Some(bytes)) => read_safetensors(bytes).map(Some),
        (WeightsSource::Id(id), None) => Err(SpecError::new(
            "init.weights.id",
            format!(
                "weights {id} are stored on a server: submit the job there, or give \
                 init.weights.path to run it here"
            ),
        )),
    }
}

/// Reads a safetensors file's tensors (any float dtype; converted when loaded).
pub fn read_safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>, SpecError> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|error| {
        SpecError::new(
            "init.weights",
            format!("not a readable safetensors file: {error}"),
        )
    })
}

fn build_list(
    planned: &[Planned],
    prefix: &str,
    rng: &mut Rng,
    device: &Device,
    parameters: &mut Vec<(String, Var)>,
    buffers: &mut Vec<(String, Var)>,
) -> candle_core::Result<Vec<Module>> {
    let mut layers = Vec::with_capacity(planned.len());
    for (index, layer) in planned.iter().enumerate() {
        let name = |suffix: &str| format!("{prefix}{index}.{suffix}");
        let mut parameter = |suffix: &str, var: Var| {
            parameters.push((name(suffix), var.clone()));
            var
        };
        layers.push(match layer {
            Planned::Linear { inputs, outputs } => {
                // nn.Linear: weight and bias U(-1/sqrt(in), 1/sqrt(in)).
                let bound = 1.0 / (*inputs as f64).sqrt();
                Module::Linear {
                    weight: parameter(
                        "weight",
                        uniform_var(&[*outputs, *inputs], bound, rng, device)?,
                    ),
                    bias: parameter("bias", uniform_var(&[*outputs], bound, rng, device)?),
                }
            }
            Planned::Conv2d {
                inputs,
                outputs,
                kernel,
                stride,
                padding,
            } => {
                // nn.Conv2d: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
                // for the weight, and the same bound for the bias.
                let bound = 1.0 / ((inputs * kernel * kernel) as f64).sqrt();
                let shape = [*outputs, *inputs, *kernel, *kernel];
                Module::Conv2d {
                    weight: parameter("weight", uniform_var(&shape, bound, rng, device)?),
                    bias: parameter("bias", uniform_var(&[*outputs], bound, rng, device)?),
                    stride: *stride,
                    padding: *padding,
                }
            }
            Planned::MaxPool2d { size } => Module::MaxPool2d(*size),
            Planned::AvgPool2d { size } => Module::AvgPool2d(*size),
            Planned::AdaptiveAvgPool2d => Module::AdaptiveAvgPool2d,
            Planned::BatchNorm { features, spatial } => {
                let weight = parameter("weight", Var::ones(*features, DType::F32, device)?);
                let bias = parameter("bias", Var::zeros(*features, DType::F32, device)?);
                let running_mean = Var::zeros(*features, DType::F32, device)?;
                let running_var = Var::ones(*features, DType::F32, device)?;
                buffers.push((name("running_mean"), running_mean.clone()));
                buffers.push((name("running_var"), running_var.clone()));
                Module::BatchNorm {
                    weight,
                    bias,
                    running_mean,
                    running_var,
                    spatial: *spatial,
                }
            }
            Planned::LayerNorm { size } => Module::LayerNorm {
                weight: parameter("weight", Var::ones(*size, DType::F32, device)?),
                bias: parameter("bias", Var::zeros(*size, DType::F32, device)?),
            },
            Planned::Dropout { p } => Module::Dropout(*p),
            Planned::Flatten => Module::Flatten,
            Planned::Embedding {
                vocab,
                dim,
                init_std,
            } => {
                // nn.Embedding: N(0, 1), unless the spec gives another deviation.
                let var = normal_var(&[*vocab, *dim], *init_std, rng, device)?;
                Module::Embedding(parameter("weight", var))
            }
            Planned::PositionEmbedding { time, dim } => {
                let var = normal_var(&[*time, *dim], POSITION_EMBEDDING_STD, rng, device)?;
                Module::PositionEmbedding(parameter("weight", var))
            }
            Planned::TransformerBlock { time, dim, heads } => {
                let d = *dim;
                let norm = |parameter: &mut dyn FnMut(&str, Var) -> Var,
                            prefix: &str|
                 -> candle_core::Result<[Var; 2]> {
                    Ok([
                        parameter(
                            &format!("{prefix}.weight"),
                            Var::ones(d, DType::F32, device)?,
                        ),
                        parameter(
                            &format!("{prefix}.bias"),
                            Var::zeros(d, DType::F32, device)?,
                        ),
                    ])
                };
                let norm_attention = norm(&mut parameter, "norm_attention")?;
                let norm_mlp = norm(&mut parameter, "norm_mlp")?;
                // nn.Linear's U(-1/sqrt(in), 1/sqrt(in)), drawn in the preset's order.
                let mut dense = |prefix: &str, inputs: usize, outputs: usize| {
                    let bound = 1.0 / (inputs as f64).sqrt();
                    let weight = uniform_var(&[outputs, inputs], bound, rng, device)?;
                    let bias = uniform_var(&[outputs], bound, rng, device)?;
                    candle_core::Result::Ok([
                        parameter(&format!("{prefix}.weight"), weight),
                        parameter(&format!("{prefix}.bias"), bias),
                    ])
                };
                let qkv = dense("qkv", d, 3 * d)?;
                let projection = dense("projection", d, d)?;
                let expand = dense("expand", d, 4 * d)?;
                let contract = dense("contract", 4 * d, d)?;
                let mask: Vec<f32> = (0..time * time)
                    .map(|i| {
                        if i % time > i / time {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                Module::TransformerBlock(Box::new(TransformerBlock {
                    heads: *heads,
                    norm_attention,
                    norm_mlp,
                    qkv,
                    projection,
                    expand,
                    contract,
                    causal_mask: Tensor::from_vec(mask, (*time, *time), device)?,
                }))
            }
            Planned::Relu => Module::Relu,
            Planned::Gelu(approximate) => Module::Gelu(*approximate),
            Planned::Tanh => Module::Tanh,
            Planned::Sigmoid => Module::Sigmoid,
            Planned::Silu => Module::Silu,
            Planned::Residual(inner) => Module::Residual(build_list(
                inner,
                &format!("{prefix}{index}."),
                rng,
                device,
                parameters,
                buffers,
            )?),
        });
    }
    Ok(layers)
}

fn forward_list(
    layers: &[Module],
    x: &Tensor,
    train: &mut Option<&mut Rng>,
) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for layer in layers {
        h = forward_layer(layer, &h, train)?;
    }
    Ok(h)
}

fn forward_layer(
    layer: &Module,
    x: &Tensor,
    train: &mut Option<&mut Rng>,
) -> candle_core::Result<Tensor> {
    match layer {
        Module::Linear { weight, bias } => linear(x, weight, bias),
        Module::Conv2d {
            weight,
            bias,
            stride,
            padding,
        } => even_remainders(x, weight.dim(2)?, *stride, *padding)?
            .conv2d(weight.as_tensor(), *padding, *stride, 1, 1)?
            .broadcast_add(&bias.as_tensor().reshape((1, (), 1, 1))?),
        Module::MaxPool2d(size) => max_pool(x, *size),
        Module::AvgPool2d(size) => windows(x, *size)?.mean(D::Minus1),
        Module::AdaptiveAvgPool2d => x.mean_keepdim(3)?.mean_keepdim(2),
        Module::BatchNorm {
            weight,
            bias,
            running_mean,
            running_var,
            spatial,
        } => batch_norm(
            x,
            [weight, bias, running_mean, running_var],
            *spatial,
            train.is_some(),
        ),
        Module::LayerNorm { weight, bias } => layer_norm(x, weight, bias),
        Module::Dropout(p) => match train.as_deref_mut() {
            Some(rng) if *p > 0.0 => apply_dropout(x, *p, rng),
            _ => Ok(x.clone()),
        },
        Module::Flatten => x.flatten_from(1),
        Module::Embedding(weight) => {
            let (batch, time) = x.dims2()?;
            let dim = weight.dim(1)?;
            weight
                .as_tensor()
                .index_select(&x.flatten_all()?, 0)?
                .reshape((batch, time, dim))
        }
        Module::PositionEmbedding(weight) => x.broadcast_add(weight.as_tensor()),
        Module::TransformerBlock(block) => block.forward(x),
        Module::Relu => x.relu(),
        Module::Gelu(GeluApproximation::None) => x.gelu_erf(),
        Module::Gelu(GeluApproximation::Tanh) => x.gelu(),
        Module::Tanh => x.tanh(),
        Module::Sigmoid => candle_nn::ops::sigmoid(x),
        Module::Silu => x.silu(),
        Module::Residual(inner) => x + forward_list(inner, x, train)?,
    }
}

/// A strided convolution's input, padded with zeros at the bottom or right so that height and
/// width leave the same remainder past the last window. candle 0.11's convolution backward
/// takes one output padding, from the height, for both sides, and fails on a width that
/// leaves another. The zeros sit where no window reads, so the output is unchanged.
fn even_remainders(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if stride == 1 {
        return Ok(x.clone());
    }
    let (_, _, height, width) = x.dims4()?;
    let remainder = |side: usize| (side + 2 * padding - kernel) % stride;
    let (r_h, r_w) = (remainder(height), remainder(width));
    match r_h.cmp(&r_w) {
        std::cmp::Ordering::Less => x.pad_with_zeros(2, 0, r_w - r_h),
        std::cmp::Ordering::Greater => x.pad_with_zeros(3, 0, r_h - r_w),
        std::cmp::Ordering::Equal => Ok(x.clone()),
    }
}

/// The non-overlapping `size x size` windows of `[n, c, h, w]` as `[n, c, h/size, w/size,
/// size * size]` (rows and columns past the last whole window dropped, as PyTorch does).
fn windows(x: &Tensor, size: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (out_h, out_w) = (h / size, w / size);
    x.narrow(2, 0, out_h * size)?
        .narrow(3, 0, out_w * size)?
        .reshape((n, c, out_h, size, out_w, size))?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((n, c, out_h, out_w, size * size))
}

/// Max pooling whose gradient goes whole to each window's first maximum, as PyTorch's does:
/// the window's values times a one-hot mask of its argmax (a constant), summed.
fn max_pool(x: &Tensor, size: usize) -> candle_core::Result<Tensor> {
    let windows = windows(x, size)?;
    let first_max = windows.detach().argmax_keepdim(D::Minus1)?;
    let positions = Tensor::arange(0u32, (size * size) as u32, x.device())?;
    let mask = first_max
        .broadcast_eq(&positions.reshape((1, 1, 1, 1, size * size))?)?
        .to_dtype(x.dtype())?;
    (windows * mask)?.sum(D::Minus1)
}

/// Batch norm over the batch (and the spatial positions of `[n, c, h, w]`): in training the
/// batch's statistics normalise and update the running ones (momentum 0.1, the variance
/// unbiased as PyTorch keeps it); in eval the running ones normalise.
fn batch_norm(
    x: &Tensor,
    [weight, bias, running_mean, running_var]: [&Var; 4],
    spatial: bool,
    training: bool,
) -> candle_core::Result<Tensor> {
    let features = weight.dim(0)?;
    // Per-feature values as `[features, values]`.
    let per_feature = if spatial {
        x.transpose(0, 1)?.contiguous()?.reshape((features, ()))?
    } else {
        x.t()?.contiguous()?
    };
    let broadcast_shape: Vec<usize> = if spatial {
        vec![1, features, 1, 1]
    } else {
        vec![1, features]
    };
    let shaped = |t: &Tensor| t.reshape(broadcast_shape.as_slice());
    let (mean, var) = if training {
        let count = per_feature.dim(1)?;
        let mean = per_feature.mean(1)?;
        let centered = per_feature.broadcast_sub(&mean.unsqueeze(1)?)?;
        let var = centered.sqr()?.mean(1)?;
        let unbiased = (var.detach() * (count as f64 / (count.max(2) - 1) as f64))?;
        let m = BATCH_NORM_MOMENTUM;
        running_mean.set(&((running_mean.as_tensor() * (1.0 - m))? + (mean.detach() * m)?)?)?;
        running_var.set(&((running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
        (mean, var)
    } else {
        (
            running_mean.as_tensor().detach(),
            running_var.as_tensor().detach(),
        )
    };
    let inverse_std = (var + NORM_EPS)?.sqrt()?.recip()?;
    x.broadcast_sub(&shaped(&mean)?)?
        .broadcast_mul(&shaped(&(inverse_std * weight.as_tensor())?)?)?
        .broadcast_add(&shaped(bias.as_tensor())?)
}

impl Plan {
    /// The per-sample output shape.
    pub fn output(&self) -> &[usize] {
        &self.output
    }
}

/// PyTorch's golden layer-list networks (`tests/golden/make_sequential.py`), for the tests of
/// both backends.
#[cfg(test)]
pub(crate) mod golden {
    use serde::Deserialize;

    use super::*;
    use crate::engine::batch::DeviceData;
    use crate::engine::model::{Model, ModelShape};
    use crate::engine::spec::ModelSpec;

    const GOLDEN: &str = include_str!("../../../tests/golden/sequential.json");

    #[derive(Deserialize)]
    struct Golden {
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    pub(crate) struct Case {
        pub(crate) name: String,
        pub(crate) input_shape: Vec<usize>,
        pub(crate) task: String,
        pub(crate) outputs: usize,
        pub(crate) layers: Vec<LayerSpec>,
        pub(crate) weights: String,
        pub(crate) x: Vec<f64>,
        pub(crate) y: Vec<f64>,
        pub(crate) eval_loss: f64,
        pub(crate) train_loss: f64,
        pub(crate) grads: HashMap<String, Vec<f64>>,
        pub(crate) running_after: HashMap<String, Vec<f64>>,
        pub(crate) param_order: Vec<String>,
    }

    impl Case {
        /// The batch as a split the native step reads.
        pub(crate) fn device_data(&self) -> DeviceData {
            let (x, y) = self.batch();
            let rows = x.dim(0).unwrap();
            DeviceData {
                x,
                y,
                rows,
                task: self.task(),
            }
        }

        pub(crate) fn task(&self) -> Task {
            match self.task.as_str() {
                "classification" => Task::Classification,
                "regression" => Task::Regression,
                _ => Task::LanguageModel,
            }
        }

        pub(crate) fn model(&self) -> Model {
            let spec = ModelSpec::Sequential {
                layers: self.layers.clone(),
                context: None,
            };
            let shape = ModelShape {
                input: self.input_shape.clone(),
                output: self.outputs,
                task: self.task(),
            };
            Model::build(&spec, &shape, 0, &Device::Cpu).unwrap()
        }

        pub(crate) fn weights(&self) -> HashMap<String, Tensor> {
            let path = format!(
                "{}/tests/golden/sequential/{}",
                env!("CARGO_MANIFEST_DIR"),
                self.weights
            );
            read_safetensors(&std::fs::read(path).unwrap()).unwrap()
        }

        /// The batch as the data pipeline hands it over: f32 samples or u32 token ids, u32
        /// labels or f32 targets.
        pub(crate) fn batch(&self) -> (Tensor, Tensor) {
            let rows = match self.task() {
                Task::LanguageModel => self.x.len() / self.input_shape[0],
                _ => self.x.len() / self.input_shape.iter().product::<usize>(),
            };
            let mut x_shape = vec![rows];
            x_shape.extend(&self.input_shape);
            let x = match self.task() {
                Task::LanguageModel => {
                    let ids: Vec<u32> = self.x.iter().map(|&v| v as u32).collect();
                    Tensor::from_vec(ids, x_shape, &Device::Cpu)
                }
                _ => {
                    let values: Vec<f32> = self.x.iter().map(|&v| v as f32).collect();
                    Tensor::from_vec(values, x_shape, &Device::Cpu)
                }
            }
            .unwrap();
            let y = match self.task() {
                Task::Regression => {
                    let values: Vec<f32> = self.y.iter().map(|&v| v as f32).collect();
                    Tensor::from_vec(values, (rows, self.outputs), &Device::Cpu)
                }
                Task::Classification => {
                    let labels: Vec<u32> = self.y.iter().map(|&v| v as u32).collect();
                    Tensor::from_vec(labels, rows, &Device::Cpu)
                }
                Task::LanguageModel => {
                    let ids: Vec<u32> = self.y.iter().map(|&v| v as u32).collect();
                    Tensor::from_vec(ids, (rows, self.input_shape[0]), &Device::Cpu)
                }
            }
            .unwrap();
            (x, y)
        }
    }

    pub(crate) fn cases() -> Vec<Case> {
        let golden: Golden = serde_json::from_str(GOLDEN).unwrap();
        assert_eq!(golden.cases.len(), 6);
        golden.cases
    }

    pub(crate) fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        // Relative to the largest value; a gradient that is zero in exact arithmetic (a bias
        // before batch norm) is float noise on both sides, held to 1e-6 absolute.
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-2);
        for (index, (&got, &want)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(got) - want).abs() <= 1e-4 * scale,
                "{what}[{index}]: {got} vs PyTorch's {want} (largest {scale})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::golden::{assert_close, cases as golden};
    use super::*;
    use crate::engine::model::Model;

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// PyTorch's own network with its saved weights: the eval-mode loss (lrtune's
    /// `initial_val_loss`), the train-mode loss, every parameter's gradient and batch norm's
    /// updated running statistics.
    #[test]
    fn layer_lists_match_pytorch_golden_losses_gradients_and_running_statistics() {
        for case in golden() {
            let model = case.model();
            model.load_state_dict(&case.weights()).unwrap();
            let Layers(sequential) = layers_of(&model);
            let names: Vec<&str> = sequential
                .parameters
                .iter()
                .map(|(name, _)| name.as_str())
                .collect();
            assert_eq!(names, case.param_order, "{}: parameter order", case.name);

            let (x, y) = case.batch();
            let eval = model.forward(&x, &y, None).unwrap();
            let eval_loss = f64::from(eval.loss.to_scalar::<f32>().unwrap());
            assert!(
                (eval_loss - case.eval_loss).abs() <= 1e-4 * case.eval_loss.abs(),
                "{}: eval loss {eval_loss} vs PyTorch's {}",
                case.name,
                case.eval_loss
            );

            let train = model.forward(&x, &y, Some(&mut Rng::new(1))).unwrap();
            let train_loss = f64::from(train.loss.to_scalar::<f32>().unwrap());
            assert!(
                (train_loss - case.train_loss).abs() <= 1e-4 * case.train_loss.abs(),
                "{}: train loss {train_loss} vs PyTorch's {}",
                case.name,
                case.train_loss
            );
            let grads = train.loss.backward().unwrap();
            for (name, var) in &sequential.parameters {
                let grad = grads.get(var.as_tensor()).unwrap();
                assert_close(
                    &values(grad),
                    &case.grads[name],
                    &format!("{} grad {name}", case.name),
                );
            }
            for (name, var) in &sequential.buffers {
                assert_close(
                    &values(var.as_tensor()),
                    &case.running_after[name],
                    &format!("{} {name} after a training step", case.name),
                );
            }
        }
    }

    fn layers(json: &str) -> Vec<LayerSpec> {
        serde_json::from_str(json).unwrap()
    }

    fn plan_error(json: &str, input: &[usize], task: Task, outputs: usize) -> SpecError {
        plan(&layers(json), input, task, outputs).unwrap_err()
    }

    #[test]
    fn a_shape_error_names_the_layer_and_both_shapes() {
        let error = plan_error(
            r#"[{"type": "linear", "out": 8}, {"type": "conv2d", "out": 4, "kernel": 3}]"#,
            &[6],
            Task::Classification,
            3,
        );
        assert_eq!(error.field, "model.layers[1]");
        assert_eq!(
            error.message,
            "conv2d needs [channels, height, width], but its input is [8]"
        );

        let error = plan_error(
            r#"[{"type": "linear", "out": 8},
                {"type": "residual", "layers": [{"type": "linear", "out": 5}]},
                {"type": "linear", "out": 3}]"#,
            &[6],
            Task::Classification,
            3,
        );
        assert_eq!(error.field, "model.layers[1]");
        assert_eq!(
            error.message,
            "a residual block adds its output to its input, but it turns [8] into [5]"
        );

        let error = plan_error(
            r#"[{"type": "conv2d", "out": 4, "kernel": 5}]"#,
            &[1, 3, 3],
            Task::Classification,
            3,
        );
        assert_eq!(error.field, "model.layers[0]");
        assert!(error.message.contains("[1, 3, 3]"), "{}", error.message);

        let error = plan_error(
            r#"[{"type": "flatten"}, {"type": "linear", "out": 7}]"#,
            &[1, 4, 4],
            Task::Classification,
            10,
        );
        assert_eq!(error.field, "model.layers");
        assert!(
            error.message.starts_with(
                "the last layer gives [7] per sample, but classification into 10 classes needs [10]"
            ),
            "{}",
            error.message
        );

        let error = plan_error(
            r#"[{"type": "linear", "out": 7}]"#,
            &[12],
            Task::LanguageModel,
            7,
        );
        assert_eq!(error.field, "model.layers[0]");
        assert!(
            error.message.contains("[12] token ids"),
            "{}",
            error.message
        );

        let error = validate(
            &layers(r#"[{"type": "residual", "layers": [{"type": "dropout", "p": 1.5}]}]"#),
            "model.layers",
        )
        .unwrap_err();
        assert_eq!(error.field, "model.layers[0].layers[0].p");
    }

    #[test]
    fn transformer_layers_name_their_field_and_shapes() {
        let error = plan_error(
            r#"[{"type": "embedding", "dim": 6}, {"type": "transformer_block", "heads": 4},
                {"type": "linear", "out": 7}]"#,
            &[5],
            Task::LanguageModel,
            7,
        );
        assert_eq!(error.field, "model.layers[1].heads");
        assert_eq!(
            error.message,
            "transformer_block's 4 heads do not divide the 6 values per position of its input \
             [5, 6]"
        );

        let error = plan_error(
            r#"[{"type": "transformer_block", "heads": 2}, {"type": "flatten"},
                {"type": "linear", "out": 3}]"#,
            &[3, 4, 4],
            Task::Classification,
            3,
        );
        assert_eq!(error.field, "model.layers[0]");
        assert_eq!(
            error.message,
            "transformer_block needs [time, dim], but its input is [3, 4, 4]"
        );

        let error = plan_error(
            r#"[{"type": "linear", "out": 4}, {"type": "position_embedding"}]"#,
            &[6],
            Task::Regression,
            4,
        );
        assert_eq!(error.field, "model.layers[1]");
        assert_eq!(
            error.message,
            "position_embedding needs [time, dim], but its input is [4]"
        );

        let error = plan_error(
            r#"[{"type": "position_embedding"}, {"type": "linear", "out": 7}]"#,
            &[5],
            Task::LanguageModel,
            7,
        );
        assert_eq!(error.field, "model.layers[0]");
        assert_eq!(
            error.message,
            "position_embedding needs values: the token ids must go through an embedding \
             first, but its input is [5] token ids"
        );

        let error = validate(
            &layers(r#"[{"type": "transformer_block", "heads": 0}]"#),
            "model.layers",
        )
        .unwrap_err();
        assert_eq!(error.field, "model.layers[0].heads");
        assert_eq!(error.message, "transformer_block needs heads of at least 1");

        let error = validate(
            &layers(r#"[{"type": "embedding", "dim": 4, "init_std": -0.5}]"#),
            "model.layers",
        )
        .unwrap_err();
        assert_eq!(error.field, "model.layers[0].init_std");
        assert_eq!(
            error.message,
            "must be a finite number of at least 0, got -0.5"
        );

        let error = serde_json::from_str::<Vec<LayerSpec>>(
            r#"[{"type": "transformer_block", "heads": 2, "dim": 8}]"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("unknown field `dim`"), "{error}");
    }

    /// Embedding, position embedding and two blocks: PyTorch's sizes (a block has 12 d^2 +
    /// 13 d parameters), and the `state_dict()` names of the block's submodules, which load
    /// back into a model built from another seed.
    #[test]
    fn a_transformer_layer_lists_state_dict_round_trips() {
        let layers = layers(
            r#"[{"type": "embedding", "dim": 8, "init_std": 0.02}, {"type": "position_embedding"},
                {"type": "transformer_block", "heads": 2},
                {"type": "residual", "layers": [{"type": "transformer_block", "heads": 4}]},
                {"type": "layer_norm"}, {"type": "linear", "out": 5}]"#,
        );
        let plan = plan(&layers, &[6], Task::LanguageModel, 5).unwrap();
        let block = 12 * 8 * 8 + 13 * 8;
        assert_eq!(plan.parameters, 5 * 8 + 6 * 8 + 2 * block + 16 + 9 * 5);
        let build = |seed| {
            let sequential = Sequential::build(&plan, &mut Rng::new(seed), &Device::Cpu).unwrap();
            let model = crate::engine::model::Model::build(
                &crate::engine::spec::ModelSpec::Sequential {
                    layers: layers.clone(),
                    context: Some(6),
                },
                &crate::engine::model::ModelShape {
                    input: vec![6],
                    output: 5,
                    task: Task::LanguageModel,
                },
                seed,
                &Device::Cpu,
            )
            .unwrap();
            (sequential, model)
        };
        let (source, _) = build(1);
        let names: Vec<&str> = source.parameters.iter().map(|(n, _)| n.as_str()).collect();
        let block_names = |prefix: &str| {
            [
                "norm_attention.weight",
                "norm_attention.bias",
                "norm_mlp.weight",
                "norm_mlp.bias",
                "qkv.weight",
                "qkv.bias",
                "projection.weight",
                "projection.bias",
                "expand.weight",
                "expand.bias",
                "contract.weight",
                "contract.bias",
            ]
            .map(|suffix| format!("{prefix}.{suffix}"))
        };
        let mut want = vec!["0.weight".to_string(), "1.weight".to_string()];
        want.extend(block_names("2"));
        want.extend(block_names("3.0"));
        want.extend(["4.weight", "4.bias", "5.weight", "5.bias"].map(String::from));
        assert_eq!(names, want);
        let shapes: Vec<Vec<usize>> = source
            .parameters
            .iter()
            .map(|(_, var)| var.dims().to_vec())
            .collect();
        assert_eq!(shapes[1], [6, 8]);
        assert_eq!(
            &shapes[2..14],
            &[
                vec![8],
                vec![8],
                vec![8],
                vec![8],
                vec![24, 8],
                vec![24],
                vec![8, 8],
                vec![8],
                vec![32, 8],
                vec![32],
                vec![8, 32],
                vec![8],
            ]
        );

        let state: HashMap<String, Tensor> = source
            .parameters
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().copy().unwrap()))
            .collect();
        let (_, target) = build(2);
        let Layers(loaded) = layers_of(&target);
        assert_ne!(
            values(loaded.parameters[6].1.as_tensor()),
            values(&state["2.qkv.weight"])
        );
        target.load_state_dict(&state).unwrap();
        for (name, var) in &loaded.parameters {
            assert_eq!(values(var.as_tensor()), values(&state[name]), "{name}");
        }
    }

    #[test]
    fn a_plan_counts_parameters_as_pytorch_does() {
        // conv 1->4 k3: 40; bn: 8; linear 4*4*4 -> 8: 520; layer_norm: 16; linear 8->4: 36.
        let plan = plan(
            &layers(
                r#"[{"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
                    {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool2d", "size": 2},
                    {"type": "flatten"}, {"type": "linear", "out": 8}, {"type": "layer_norm"},
                    {"type": "linear", "out": 4}]"#,
            ),
            &[1, 9, 9],
            Task::Classification,
            4,
        )
        .unwrap();
        assert_eq!(plan.parameters, 40 + 8 + 520 + 16 + 36);
        assert_eq!(plan.output(), &[4]);
    }

    #[test]
    fn missing_extra_and_misshaped_tensors_are_named() {
        let case = golden().into_iter().find(|c| c.name == "cnn_bn").unwrap();
        let model = case.model();
        let mut weights = case.weights();
        assert!(weights.contains_key("1.num_batches_tracked"));
        model.load_state_dict(&weights).unwrap();

        let mut missing = weights.clone();
        missing.remove("1.running_var");
        let error = model.load_state_dict(&missing).unwrap_err();
        assert_eq!(error.field, "init.weights");
        assert!(
            error.message.contains("no tensor \"1.running_var\""),
            "{}",
            error.message
        );

        let mut extra = weights.clone();
        extra.insert(
            "12.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let error = model.load_state_dict(&extra).unwrap_err();
        assert!(
            error.message.contains("first \"12.weight\""),
            "{}",
            error.message
        );

        weights.insert(
            "6.weight".into(),
            Tensor::zeros((8, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let error = model.load_state_dict(&weights).unwrap_err();
        assert!(
            error
                .message
                .contains("\"6.weight\" has shape [8, 3], but the model's is [8, 64]"),
            "{}",
            error.message
        );
    }

    #[test]
    fn initial_weights_come_from_the_path_or_the_fetched_bytes_of_an_id() {
        let case = golden().into_iter().find(|c| c.name == "cnn_bn").unwrap();
        let path = format!(
            "{}/tests/golden/sequential/{}",
            env!("CARGO_MANIFEST_DIR"),
            case.weights
        );
        let init = |weights: WeightsSource| InitSpec { weights };
        let from_path = load_initial_weights(Some(&init(WeightsSource::Path(path.clone()))), None)
            .unwrap()
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let uploaded = init(WeightsSource::Id("weights_1".into()));
        let from_bytes = load_initial_weights(Some(&uploaded), Some(&bytes))
            .unwrap()
            .unwrap();
        let mut names: Vec<_> = from_bytes.keys().collect();
        names.sort();
        let mut want: Vec<_> = from_path.keys().collect();
        want.sort();
        assert_eq!(names, want);
        case.model().load_state_dict(&from_bytes).unwrap();

        // An id without its bytes is the server's to fetch; `lrtune run` cannot.
        let error = load_initial_weights(Some(&uploaded), None).unwrap_err();
        assert_eq!(error.field, "init.weights.id");
        let error = load_initial_weights(Some(&uploaded), Some(b"garbage")).unwrap_err();
        assert_eq!(error.field, "init.weights");
        assert!(load_initial_weights(None, Some(&bytes)).unwrap().is_none());
    }

    /// Ties in a window (a ReLU's zeros, repeated values) send the whole gradient to the
    /// first maximum, as PyTorch's max_pool2d does.
    #[test]
    fn max_pool_gradient_goes_to_the_first_maximum() {
        let x = Var::from_tensor(
            &Tensor::from_vec(
                vec![
                    1f32, 3., 3., 0., 2., 2., 2., 2., 5., 1., 1., 5., 0., 0., 0., 0.,
                ],
                (1, 1, 4, 4),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
        let pooled = max_pool(x.as_tensor(), 2).unwrap();
        assert_eq!(values(&pooled), vec![3., 3., 5., 5.]);
        let grads = pooled.sum_all().unwrap().backward().unwrap();
        let grad = values(grads.get(x.as_tensor()).unwrap());
        // Windows: [1 3; 2 2] -> position (0,1); [3 0; 2 2] -> (0,2); [5 1; 0 0] -> (2,0);
        // [1 5; 0 0] -> (2,3).
        let mut want = vec![0f32; 16];
        for at in [1, 2, 8, 11] {
            want[at] = 1.0;
        }
        assert_eq!(grad, want);
    }

    struct Layers<'a>(&'a Sequential);

    fn layers_of(model: &Model) -> Layers<'_> {
        Layers(model.layers())
    }
}
