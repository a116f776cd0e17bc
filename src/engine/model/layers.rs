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

use super::{apply_dropout, layer_norm, linear, normal_var, uniform_var};
use crate::engine::data::Task;
use crate::engine::rng::Rng;
pub use crate::engine::spec::layers::{validate, GeluApproximation, LayerSpec};
use crate::engine::spec::{InitSpec, SpecError, WeightsSource};

/// Batch norm's defaults, PyTorch's.
pub(crate) const BATCH_NORM_MOMENTUM: f64 = 0.1;
pub(crate) const NORM_EPS: f64 = 1e-5;

/// GPT-2's standard deviation for the position embedding's weight.
const POSITION_EMBEDDING_STD: f64 = 0.02;

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
    /// patches are counted when it is planned). `None` when the count overflows.
    fn kept_values(&self, output: u64) -> Option<u64> {
        let saved = match self {
            // Batch norm's per-feature 1/std is counted per sample: a small overcount.
            Planned::BatchNorm { features, .. } => output.checked_add(*features as u64)?,
            Planned::Dropout { .. } | Planned::MaxPool2d { .. } => output,
            Planned::LayerNorm { size } => output.checked_add(output / (*size as u64).max(1))?,
            Planned::Residual(_) => output,
            _ => 0,
        };
        output.checked_mul(2)?.checked_add(saved)
    }
}

/// The checked plan of a layer list: each layer's sizes and per-sample output shape, the
/// parameter count and the activation values per sample, convolution patches included (for
/// admission). Every size in it was computed with checked arithmetic: a layer list whose
/// sizes do not fit 64 bits has no plan.
#[derive(Debug, Clone)]
pub struct Plan {
    layers: Vec<Planned>,
    output: Vec<usize>,
    /// The per-sample output shape of each layer of the list (not of those inside a residual
    /// block).
    layer_outputs: Vec<Vec<usize>>,
    pub parameters: u64,
    /// The values per sample the native step keeps between steps (see `Planned::kept_values`).
    pub activations_per_sample: u64,
}

/// The values in a tensor of shape `dims`, if they can be counted in a `usize`.
pub(crate) fn element_count(dims: &[usize]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |count, &dim| count.checked_mul(dim))
}

/// Plans `layers` (checked by [`validate`] first) for samples of `input` (token ids of
/// length `input[0]` for a language model, whose vocabulary is `outputs`), and checks that
/// the last layer gives what the task needs: `[classes]`, `[outputs]` or `[time, vocab]`.
pub fn plan(
    layers: &[LayerSpec],
    input: &[usize],
    task: Task,
    outputs: usize,
) -> Result<Plan, SpecError> {
    // A spec's layers were validated when it was parsed; a plan never divides by a zero size
    // whoever calls it.
    validate(layers, "model.layers")?;
    if element_count(input).is_none() {
        return Err(SpecError::new(
            "data",
            format!("samples of shape {input:?} have more values than a 64-bit size holds"),
        ));
    }
    let sample = match task {
        Task::LanguageModel => Sample::Tokens {
            time: input.first().copied().unwrap_or(0),
            vocab: outputs,
        },
        _ => Sample::Values(input.to_vec()),
    };
    let mut counts = Counts::default();
    let mut layer_outputs = Vec::with_capacity(layers.len());
    let (planned, output) = plan_list(
        layers,
        sample,
        "model.layers",
        &mut counts,
        Some(&mut layer_outputs),
    )?;
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
        layer_outputs,
        parameters: counts.parameters,
        activations_per_sample: counts.activations,
    })
}

/// What a plan adds up layer by layer. Each sum is checked: a count past 64 bits is a spec
/// error naming the layer, never a wrapped (or saturated) number that looks small.
#[derive(Debug, Default)]
struct Counts {
    parameters: u64,
    /// The values per sample the native step keeps (see `Planned::kept_values`).
    activations: u64,
}

impl Counts {
    /// Adds a layer's parameters; `added` is `None` when the layer's own count overflowed.
    fn add_parameters(
        &mut self,
        added: Option<u64>,
        field: &str,
        name: &str,
        what: impl FnOnce() -> String,
    ) -> Result<(), SpecError> {
        Self::add(&mut self.parameters, added).map_err(|before| {
            SpecError::new(
                field,
                format!(
                    "{name}'s parameter count overflows: {}",
                    Self::detail(what(), before)
                ),
            )
        })
    }

    /// Adds values the native step keeps per sample; `added` is `None` on an overflow.
    fn add_activations(
        &mut self,
        added: Option<u64>,
        field: &str,
        name: &str,
        what: impl FnOnce() -> String,
    ) -> Result<(), SpecError> {
        Self::add(&mut self.activations, added).map_err(|before| {
            SpecError::new(
                field,
                format!(
                    "{name}'s step memory overflows: {}",
                    Self::detail(what(), before)
                ),
            )
        })
    }

    /// `Err(None)`: the layer's own count overflowed; `Err(Some(total))`: the sum with the
    /// `total` of the layers before it did.
    fn add(total: &mut u64, added: Option<u64>) -> Result<(), Option<u64>> {
        let added = added.ok_or(None)?;
        *total = total.checked_add(added).ok_or(Some(*total))?;
        Ok(())
    }

    fn detail(what: String, before: Option<u64>) -> String {
        match before {
            None => format!("{what}, more than a 64-bit count holds"),
            Some(before) => format!(
                "{what} on top of the {before} of the layers before it is more than a 64-bit \
                 count holds"
            ),
        }
    }
}

/// Plans a list; `layer_outputs`, when given, receives each layer's per-sample output shape.
fn plan_list(
    layers: &[LayerSpec],
    mut sample: Sample,
    field: &str,
    counts: &mut Counts,
    mut layer_outputs: Option<&mut Vec<Vec<usize>>>,
) -> Result<(Vec<Planned>, Sample), SpecError> {
    let mut planned = Vec::with_capacity(layers.len());
    for (index, layer) in layers.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let (layer_plan, next) = plan_layer(layer, &sample, &at, counts)?;
        if let Sample::Values(dims) = &next {
            // Each layer checks the sizes it makes; this is the invariant they keep.
            let values = element_count(dims).ok_or_else(|| {
                SpecError::new(
                    at.as_str(),
                    format!(
                        "{}'s output size overflows: its output is {dims:?}, more values than a \
                         64-bit size holds",
                        layer.name()
                    ),
                )
            })?;
            counts.add_activations(
                layer_plan.kept_values(values as u64),
                &at,
                layer.name(),
                || format!("the values it keeps for its output {dims:?}"),
            )?;
            if let Some(outputs) = layer_outputs.as_deref_mut() {
                outputs.push(dims.clone());
            }
        }
        planned.push(layer_plan);
        sample = next;
    }
    Ok((planned, sample))
}

fn plan_layer(
    layer: &LayerSpec,
    sample: &Sample,
    at: &str,
    counts: &mut Counts,
) -> Result<(Planned, Sample), SpecError> {
    let name = layer.name();
    let field = |suffix: &str| format!("{at}.{suffix}");
    let mismatch = |needs: &str| {
        SpecError::new(
            at,
            format!(
                "{name} needs {needs}, but its input is {}",
                sample.describe()
            ),
        )
    };
    // `lead`: what makes the output, "its output is" when nothing but the layer's own size.
    let too_large = |field: String, output: &[usize], lead: &str| {
        SpecError::new(
            field,
            format!(
                "{name}'s output size overflows: {lead} {output:?}, more values than a 64-bit \
                 size holds"
            ),
        )
    };
    let dims = match (layer, sample) {
        (LayerSpec::Embedding { dim, init_std }, Sample::Tokens { time, vocab }) => {
            counts.add_parameters(
                (*vocab as u64).checked_mul(*dim as u64),
                &field("dim"),
                name,
                || format!("its weight of {vocab} x {dim}"),
            )?;
            let next = vec![*time, *dim];
            if element_count(&next).is_none() {
                return Err(too_large(field("dim"), &next, "its output is"));
            }
            return Ok((
                Planned::Embedding {
                    vocab: *vocab,
                    dim: *dim,
                    init_std: *init_std,
                },
                Sample::Values(next),
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
    let same = Sample::Values(dims.clone());
    Ok(match layer {
        LayerSpec::Linear { out } => {
            let Some(&inputs) = dims.last() else {
                return Err(mismatch("at least one dimension"));
            };
            let mut next = dims.clone();
            *next.last_mut().expect("checked above") = *out;
            if element_count(&next).is_none() {
                return Err(too_large(field("out"), &next, "its output is"));
            }
            counts.add_parameters(
                (inputs as u64)
                    .checked_add(1)
                    .and_then(|fan_in| fan_in.checked_mul(*out as u64)),
                &field("out"),
                name,
                || format!("its weight of {out} x {inputs} and bias of {out}"),
            )?;
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
            let padded = |side: usize| padding.checked_mul(2).and_then(|p| p.checked_add(side));
            let (Some(padded_h), Some(padded_w)) = (padded(height), padded(width)) else {
                return Err(SpecError::new(
                    field("padding"),
                    format!(
                        "conv2d's output size overflows: padding {padding} on both sides of its \
                         input {dims:?} is more than a 64-bit size holds"
                    ),
                ));
            };
            // `validate` checked stride >= 1; the quotient is at most the padded side.
            let size = |padded: usize| padded.checked_sub(*kernel).map(|s| s / stride + 1);
            let (Some(out_h), Some(out_w)) = (size(padded_h), size(padded_w)) else {
                return Err(SpecError::new(
                    at,
                    format!(
                        "conv2d's kernel {kernel} with padding {padding} does not fit its input \
                         {dims:?}"
                    ),
                ));
            };
            let next = vec![*out, out_h, out_w];
            let Some(pixels) = out_h.checked_mul(out_w) else {
                return Err(too_large(
                    field("padding"),
                    &next,
                    &format!("padding {padding} makes its output"),
                ));
            };
            if pixels.checked_mul(*out).is_none() {
                // Blame the padding when the output would fit without it.
                let unpadded =
                    |side: usize| side.checked_sub(*kernel).map_or(1, |s| s / stride + 1);
                let fits_unpadded = unpadded(height)
                    .checked_mul(unpadded(width))
                    .and_then(|p| p.checked_mul(*out))
                    .is_some();
                return Err(if *padding > 0 && fits_unpadded {
                    too_large(
                        field("padding"),
                        &next,
                        &format!("padding {padding} makes its output"),
                    )
                } else {
                    too_large(field("out"), &next, "its output is")
                });
            }
            let Some(fan_in) = element_count(&[channels, *kernel, *kernel]) else {
                return Err(SpecError::new(
                    field("kernel"),
                    format!(
                        "conv2d's parameter count overflows: a {kernel}x{kernel} kernel over \
                         {channels} channels is more than a 64-bit count holds"
                    ),
                ));
            };
            counts.add_parameters(
                (fan_in as u64)
                    .checked_add(1)
                    .and_then(|per_output| per_output.checked_mul(*out as u64)),
                &field("out"),
                name,
                || format!("{out} filters of {fan_in} weights and a bias"),
            )?;
            // The native step's patches, their gradient and the channel-major output.
            counts.add_activations(
                (fan_in as u64)
                    .checked_mul(2)
                    .and_then(|patches| patches.checked_add(*out as u64))
                    .and_then(|per_pixel| per_pixel.checked_mul(pixels as u64)),
                at,
                name,
                || format!("{pixels} patches of {fan_in} values"),
            )?;
            (
                Planned::Conv2d {
                    inputs: channels,
                    outputs: *out,
                    kernel: *kernel,
                    stride: *stride,
                    padding: *padding,
                },
                Sample::Values(next),
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
            counts.add_parameters((features as u64).checked_mul(2), at, name, || {
                format!("a weight and a bias of {features}")
            })?;
            (Planned::BatchNorm { features, spatial }, same)
        }
        LayerSpec::LayerNorm => {
            let Some(&size) = dims.last() else {
                return Err(mismatch("at least one dimension"));
            };
            counts.add_parameters((size as u64).checked_mul(2), at, name, || {
                format!("a weight and a bias of {size}")
            })?;
            (Planned::LayerNorm { size }, same)
        }
        LayerSpec::Dropout { p } => (Planned::Dropout { p: *p }, same),
        LayerSpec::Flatten => {
            let total = element_count(&dims)
                .ok_or_else(|| too_large(at.to_string(), &dims, "its input is"))?;
            (Planned::Flatten, Sample::Values(vec![total]))
        }
        LayerSpec::PositionEmbedding => {
            let &[time, dim] = &dims[..] else {
                return Err(mismatch("[time, dim]"));
            };
            counts.add_parameters((time as u64).checked_mul(dim as u64), at, name, || {
                format!("its weight of {time} x {dim}")
            })?;
            (Planned::PositionEmbedding { time, dim }, same)
        }
        LayerSpec::TransformerBlock { heads } => {
            let &[time, dim] = &dims[..] else {
                return Err(mismatch("[time, dim]"));
            };
            if dim % heads != 0 {
                return Err(SpecError::new(
                    field("heads"),
                    format!(
                        "{name}'s {heads} heads do not divide the {dim} values per position of \
                         its input {dims:?}"
                    ),
                ));
            }
            let d = dim as u64;
            // Two layer norms; qkv, projection, expand and contract with their biases.
            counts.add_parameters(
                d.checked_mul(d)
                    .and_then(|d_squared| d_squared.checked_mul(12))
                    .and_then(|weights| weights.checked_add(d.checked_mul(13)?)),
                at,
                name,
                || format!("12 x {dim}^2 + 13 x {dim} for values of {dim}"),
            )?;
            // The native step's saved values and backward scratch beyond the output and its
            // gradient (see `native::attention`): 30 values per output value, the attention
            // weights and their gradient (`heads * time^2` each) and the norms' statistics.
            let (t, h) = (time as u64, *heads as u64);
            let attention = || h.checked_mul(t)?.checked_mul(t)?.checked_mul(2);
            counts.add_activations(
                t.checked_mul(d)
                    .and_then(|values| values.checked_mul(30))
                    .and_then(|saved| saved.checked_add(t.checked_mul(2)?))
                    .and_then(|saved| saved.checked_add(attention()?)),
                at,
                name,
                || format!("{heads} heads over {time} positions of {dim} values"),
            )?;
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
            let (inner, output) = plan_list(layers, same.clone(), &field("layers"), counts, None)?;
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
    /// names. A missing, extra or mis-shaped tensor is an error naming it (the check
    /// [`check_state_dict`] makes at submit); `num_batches_tracked` is accepted and ignored (no
    /// momentum of `None` here).
    pub fn load_state_dict(&self, tensors: &HashMap<String, Tensor>) -> Result<(), SpecError> {
        let expected: Vec<(String, Vec<usize>)> = self
            .parameters
            .iter()
            .chain(&self.buffers)
            .map(|(name, var)| (name.clone(), var.dims().to_vec()))
            .collect();
        let given: HashMap<String, Vec<u64>> = tensors
            .iter()
            .map(|(name, tensor)| (name.clone(), dims_u64(tensor.dims())))
            .collect();
        check_state_dict(&expected, &given)?;
        for (name, var) in self.parameters.iter().chain(&self.buffers) {
            let converted = tensors[name]
                .to_dtype(DType::F32)
                .and_then(|t| t.to_device(var.device()))
                .and_then(|t| var.set(&t));
            if let Err(error) = converted {
                return Err(SpecError::new(
                    WEIGHTS_FIELD,
                    format!("tensor \"{name}\" could not be loaded: {error}"),
                ));
            }
        }
        Ok(())
    }
}

/// The field every initial-weights error names.
const WEIGHTS_FIELD: &str = "init.weights";

fn dims_u64(dims: &[usize]) -> Vec<u64> {
    dims.iter().map(|&dim| dim as u64).collect()
}

/// Checks tensors' names and shapes (`given`, as a safetensors file stores them) against the
/// `state_dict()` a model expects, in its order: a missing or mis-shaped tensor, or one the
/// model does not have, is an error naming it. Batch norm's `num_batches_tracked` is allowed
/// wherever the model has a batch norm. The server runs it at submit on the shapes stored at
/// upload; loading the weights runs it again.
pub fn check_state_dict(
    expected: &[(String, Vec<usize>)],
    given: &HashMap<String, Vec<u64>>,
) -> Result<(), SpecError> {
    for (name, dims) in expected {
        let Some(shape) = given.get(name) else {
            return Err(SpecError::new(
                WEIGHTS_FIELD,
                format!(
                    "the weights have no tensor \"{name}\" (shape {dims:?}); they must be the \
                     state_dict() of the equivalent torch.nn.Sequential"
                ),
            ));
        };
        if *shape != dims_u64(dims) {
            return Err(SpecError::new(
                WEIGHTS_FIELD,
                format!("tensor \"{name}\" has shape {shape:?}, but the model's is {dims:?}"),
            ));
        }
    }
    let expects = |name: &str| expected.iter().any(|(expected, _)| expected == name);
    let mut extra: Vec<&String> = given
        .keys()
        .filter(|name| !expects(name))
        .filter(|name| {
            // Batch norm's counter, wherever the model has a batch norm.
            !name
                .strip_suffix("num_batches_tracked")
                .is_some_and(|prefix| expects(&format!("{prefix}running_mean")))
        })
        .collect();
    extra.sort();
    if let Some(first) = extra.first() {
        return Err(SpecError::new(
            WEIGHTS_FIELD,
            format!(
                "the weights have {} tensor(s) the model does not, first \"{first}\" (shape \
                 {:?}): is the layer list the same as the PyTorch model's?",
                extra.len(),
                given[*first]
            ),
        ));
    }
    Ok(())
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

/// Reads a safetensors file's tensors (any float dtype; converted when loaded). A tensor
/// named twice in the header, or a float tensor holding NaN or an infinity (as the model's
/// 32-bit floats), is an error naming it: either would otherwise load as something else.
pub fn read_safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>, SpecError> {
    check_header_names(bytes)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|error| {
        SpecError::new(
            WEIGHTS_FIELD,
            format!("not a readable safetensors file: {error}"),
        )
    })?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let tensor = &tensors[name];
        let found = first_non_finite(tensor).map_err(|error| {
            SpecError::new(
                WEIGHTS_FIELD,
                format!("tensor \"{name}\" could not be read: {error}"),
            )
        })?;
        if let Some((index, value)) = found {
            return Err(SpecError::new(
                WEIGHTS_FIELD,
                format!(
                    "tensor \"{name}\" holds {value} at {}: weights must be finite 32-bit \
                     floats",
                    index_label(index, tensor.dims())
                ),
            ));
        }
    }
    Ok(tensors)
}

/// Refuses a safetensors header (`u64` length, then a JSON object of tensors) that names a
/// tensor twice: the reader keeps one of them silently. A header that cannot be read is
/// left to the reader's own errors.
fn check_header_names(bytes: &[u8]) -> Result<(), SpecError> {
    let Some((length, rest)) = bytes.split_first_chunk::<8>() else {
        return Ok(());
    };
    let header = usize::try_from(u64::from_le_bytes(*length))
        .ok()
        .and_then(|length| rest.get(..length));
    match header.map(crate::engine::json::parse) {
        Some(Err(crate::engine::json::JsonError::DuplicateKey { field, key })) => {
            Err(SpecError::new(
                WEIGHTS_FIELD,
                if field == key {
                    format!(
                        "the safetensors header names tensor \"{}\" twice",
                        key.escape_debug()
                    )
                } else {
                    format!(
                        "the safetensors header gives the key \"{}\" twice in \"{}\"",
                        key.escape_debug(),
                        field.strip_suffix(&format!(".{key}")).unwrap_or(&field)
                    )
                },
            ))
        }
        _ => Ok(()),
    }
}

/// The flat index and value of a float tensor's first value that is not finite as an f32.
fn first_non_finite(tensor: &Tensor) -> candle_core::Result<Option<(usize, f32)>> {
    if !tensor.dtype().is_float() {
        return Ok(None);
    }
    // A no-op for the f32 tensors PyTorch saves; wider floats are narrowed as the model will.
    let tensor = tensor.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)) = &*storage else {
        candle_core::bail!("expected f32 values on the CPU");
    };
    let values = &values[layout.start_offset()..][..tensor.elem_count()];
    Ok(values
        .iter()
        .position(|value| !value.is_finite())
        .map(|index| (index, values[index])))
}

/// `[1, 2]` for flat index 5 of shape `[2, 3]`: the index a PyTorch user would type.
fn index_label(flat: usize, dims: &[usize]) -> String {
    let mut remaining = flat;
    let mut parts = vec![0; dims.len()];
    for (part, &dim) in parts.iter_mut().zip(dims).rev() {
        *part = remaining % dim.max(1);
        remaining /= dim.max(1);
    }
    format!("{parts:?}")
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

    /// The per-sample output shape of each layer of the list, in order.
    pub fn layer_outputs(&self) -> &[Vec<usize>] {
        &self.layer_outputs
    }

    /// The names and shapes of the `state_dict()` the built model will have, without
    /// building it: its parameters in `named_parameters()` order, then batch norm's running
    /// statistics (the order [`Sequential::load_state_dict`] checks them in).
    pub fn state_dict(&self) -> Vec<(String, Vec<usize>)> {
        let mut parameters = Vec::new();
        let mut buffers = Vec::new();
        state_dict_of(&self.layers, "", &mut parameters, &mut buffers);
        parameters.extend(buffers);
        parameters
    }
}

/// What [`build_list`] names and allocates, layer by layer (a test holds the two together).
fn state_dict_of(
    planned: &[Planned],
    prefix: &str,
    parameters: &mut Vec<(String, Vec<usize>)>,
    buffers: &mut Vec<(String, Vec<usize>)>,
) {
    for (index, layer) in planned.iter().enumerate() {
        let name = |suffix: &str| format!("{prefix}{index}.{suffix}");
        let mut weight_and_bias = |weight: Vec<usize>, bias: usize| {
            parameters.push((name("weight"), weight));
            parameters.push((name("bias"), vec![bias]));
        };
        match layer {
            Planned::Linear { inputs, outputs } => {
                weight_and_bias(vec![*outputs, *inputs], *outputs);
            }
            Planned::Conv2d {
                inputs,
                outputs,
                kernel,
                ..
            } => weight_and_bias(vec![*outputs, *inputs, *kernel, *kernel], *outputs),
            Planned::BatchNorm { features, .. } => {
                weight_and_bias(vec![*features], *features);
                buffers.push((name("running_mean"), vec![*features]));
                buffers.push((name("running_var"), vec![*features]));
            }
            Planned::LayerNorm { size } => weight_and_bias(vec![*size], *size),
            Planned::Embedding { vocab, dim, .. } => {
                parameters.push((name("weight"), vec![*vocab, *dim]));
            }
            Planned::PositionEmbedding { time, dim } => {
                parameters.push((name("weight"), vec![*time, *dim]));
            }
            Planned::TransformerBlock { dim, .. } => {
                let d = *dim;
                for (part, weight, bias) in [
                    ("norm_attention", vec![d], d),
                    ("norm_mlp", vec![d], d),
                    ("qkv", vec![3 * d, d], 3 * d),
                    ("projection", vec![d, d], d),
                    ("expand", vec![4 * d, d], 4 * d),
                    ("contract", vec![d, 4 * d], d),
                ] {
                    parameters.push((name(&format!("{part}.weight")), weight));
                    parameters.push((name(&format!("{part}.bias")), vec![bias]));
                }
            }
            Planned::Residual(inner) => {
                state_dict_of(inner, &format!("{prefix}{index}."), parameters, buffers);
            }
            Planned::MaxPool2d { .. }
            | Planned::AvgPool2d { .. }
            | Planned::AdaptiveAvgPool2d
            | Planned::Dropout { .. }
            | Planned::Flatten
            | Planned::Relu
            | Planned::Gelu(_)
            | Planned::Tanh
            | Planned::Sigmoid
            | Planned::Silu => {}
        }
    }
}

#[cfg(test)]
mod plan_fuzz;

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

    /// Issue 29's specs: `side + 2 * padding` and `out_h * out_w` wrapped in release builds,
    /// so (2^63 + 28)^2 planned as 784 values and the job hung a worker. Each is refused,
    /// naming the layer's field, before anything is built.
    #[test]
    fn sizes_that_overflow_64_bits_are_refused_naming_the_layer_and_field() {
        let mnist = |first: &str, more: &str| {
            plan_error(
                &format!(
                    r#"[{first}, {more} {{"type": "flatten"}}, {{"type": "linear", "out": 10}}]"#
                ),
                &[1, 28, 28],
                Task::Classification,
                10,
            )
        };
        let conv = |padding: &str| {
            format!(r#"{{"type": "conv2d", "out": 1, "kernel": 1, "padding": {padding}}}"#)
        };
        let error = mnist(&conv("4611686018427387904"), "");
        assert_eq!(error.field, "model.layers[0].padding");
        assert_eq!(
            error.message,
            "conv2d's output size overflows: padding 4611686018427387904 makes its output [1, \
             9223372036854775836, 9223372036854775836], more values than a 64-bit size holds"
        );
        let error = mnist(
            &conv("4611686018427387904"),
            r#"{"type": "adaptive_avg_pool2d"},"#,
        );
        assert_eq!(error.field, "model.layers[0].padding");
        let error = mnist(&conv("9223372036854775808"), "");
        assert_eq!(error.field, "model.layers[0].padding");
        assert_eq!(
            error.message,
            "conv2d's output size overflows: padding 9223372036854775808 on both sides of its \
             input [1, 28, 28] is more than a 64-bit size holds"
        );
        // A padding that fits, with channels that do not.
        let error = mnist(
            r#"{"type": "conv2d", "out": 4611686018427387904, "kernel": 3, "padding": 1}"#,
            "",
        );
        assert_eq!(error.field, "model.layers[0].out");
        let error = mnist(
            r#"{"type": "conv2d", "out": 2, "kernel": 4294967296, "padding": 2147483648}"#,
            "",
        );
        assert_eq!(error.field, "model.layers[0].kernel");
        assert_eq!(
            error.message,
            "conv2d's parameter count overflows: a 4294967296x4294967296 kernel over 1 \
             channels is more than a 64-bit count holds"
        );
        let error = plan_error(
            r#"[{"type": "linear", "out": 8},
                {"type": "residual", "layers": [{"type": "linear", "out": 1152921504606846976},
                    {"type": "linear", "out": 8}]},
                {"type": "linear", "out": 3}]"#,
            &[6],
            Task::Classification,
            3,
        );
        assert_eq!(error.field, "model.layers[1].layers[1].out");
        assert_eq!(
            error.message,
            "linear's parameter count overflows: its weight of 8 x 1152921504606846976 and bias \
             of 8 on top of the 10376293541461622840 of the layers before it is more than a \
             64-bit count holds"
        );
        let error = plan_error(
            r#"[{"type": "embedding", "dim": 4294967296}, {"type": "transformer_block", "heads": 1},
                {"type": "linear", "out": 5}]"#,
            &[4],
            Task::LanguageModel,
            5,
        );
        assert_eq!(error.field, "model.layers[1]");
        assert!(
            error
                .message
                .starts_with("transformer_block's parameter count overflows"),
            "{}",
            error.message
        );
    }

    /// What the plan says the model's `state_dict()` is (checked at submit, before anything
    /// is built) is what building it makes, on every golden network and a transformer.
    #[test]
    fn the_planned_state_dict_is_the_built_models() {
        let mut cases: Vec<(Vec<LayerSpec>, Vec<usize>, Task, usize)> = golden()
            .into_iter()
            .map(|case| {
                let task = case.task();
                (case.layers, case.input_shape, task, case.outputs)
            })
            .collect();
        cases.push((
            layers(
                r#"[{"type": "embedding", "dim": 8}, {"type": "position_embedding"},
                    {"type": "residual", "layers": [{"type": "transformer_block", "heads": 2}]},
                    {"type": "layer_norm"}, {"type": "linear", "out": 5}]"#,
            ),
            vec![6],
            Task::LanguageModel,
            5,
        ));
        for (layers, input, task, outputs) in cases {
            let plan = plan(&layers, &input, task, outputs).unwrap();
            let built = Sequential::build(&plan, &mut Rng::new(0), &Device::Cpu).unwrap();
            let made: Vec<(String, Vec<usize>)> = built
                .parameters
                .iter()
                .chain(&built.buffers)
                .map(|(name, var)| (name.clone(), var.dims().to_vec()))
                .collect();
            assert_eq!(plan.state_dict(), made, "{layers:?}");
        }
    }

    /// Stored shapes are checked at submit with the messages loading gives.
    #[test]
    fn stored_tensor_shapes_are_checked_against_the_planned_model() {
        let plan = plan(
            &layers(r#"[{"type": "linear", "out": 4}, {"type": "batch_norm"}, {"type": "linear", "out": 2}]"#),
            &[3],
            Task::Classification,
            2,
        )
        .unwrap();
        let shapes = |entries: &[(&str, &[u64])]| -> HashMap<String, Vec<u64>> {
            entries
                .iter()
                .map(|(name, shape)| (name.to_string(), shape.to_vec()))
                .collect()
        };
        let mut good = shapes(&[
            ("0.weight", &[4, 3]),
            ("0.bias", &[4]),
            ("1.weight", &[4]),
            ("1.bias", &[4]),
            ("1.running_mean", &[4]),
            ("1.running_var", &[4]),
            ("1.num_batches_tracked", &[]),
            ("2.weight", &[2, 4]),
            ("2.bias", &[2]),
        ]);
        check_state_dict(&plan.state_dict(), &good).unwrap();

        good.insert("0.weight".into(), vec![4, 18446744073709551615]);
        let error = check_state_dict(&plan.state_dict(), &good).unwrap_err();
        assert_eq!(error.field, "init.weights");
        assert_eq!(
            error.message,
            "tensor \"0.weight\" has shape [4, 18446744073709551615], but the model's is [4, 3]"
        );
        good.insert("0.weight".into(), vec![4, 3]);
        good.remove("2.bias");
        let error = check_state_dict(&plan.state_dict(), &good).unwrap_err();
        assert_eq!(
            error.message,
            "the weights have no tensor \"2.bias\" (shape [2]); they must be the state_dict() \
             of the equivalent torch.nn.Sequential"
        );
        good.insert("2.bias".into(), vec![2]);
        good.insert("3.weight".into(), vec![7]);
        let error = check_state_dict(&plan.state_dict(), &good).unwrap_err();
        assert_eq!(
            error.message,
            "the weights have 1 tensor(s) the model does not, first \"3.weight\" (shape [7]): \
             is the layer list the same as the PyTorch model's?"
        );
    }

    /// A safetensors file written out by hand: the header's length, the header, the data.
    fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        bytes
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect()
    }

    #[test]
    fn non_finite_weights_and_tensors_named_twice_are_refused_naming_the_tensor() {
        let header = r#"{"0.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "0.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}"#;
        let file = |values: &[f32]| safetensors(header, &f32_bytes(values));
        let tensors = read_safetensors(&file(&[0.5, -1.0, 1.0, 2.0, 3.0, 4.0])).unwrap();
        assert_eq!(tensors["0.weight"].dims(), [2, 2]);

        let error = read_safetensors(&file(&[0.5, -1.0, 1.0, 2.0, 3.0, f32::NAN])).unwrap_err();
        assert_eq!(error.field, "init.weights");
        assert_eq!(
            error.message,
            "tensor \"0.weight\" holds NaN at [1, 1]: weights must be finite 32-bit floats"
        );
        let error =
            read_safetensors(&file(&[f32::NEG_INFINITY, -1.0, 1.0, 2.0, 3.0, 4.0])).unwrap_err();
        assert_eq!(
            error.message,
            "tensor \"0.bias\" holds -inf at [0]: weights must be finite 32-bit floats"
        );
        // A finite f64 that no f32 holds would load as an infinity.
        let wide = safetensors(
            r#"{"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}"#,
            &1e300f64.to_le_bytes(),
        );
        let error = read_safetensors(&wide).unwrap_err();
        assert_eq!(
            error.message,
            "tensor \"w\" holds inf at [0]: weights must be finite 32-bit floats"
        );

        let twice = safetensors(
            r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
            &f32_bytes(&[1.0]),
        );
        let error = read_safetensors(&twice).unwrap_err();
        assert_eq!(error.field, "init.weights");
        assert_eq!(
            error.message,
            "the safetensors header names tensor \"w\" twice"
        );
        let key_twice = safetensors(
            r#"{"w": {"dtype": "F32", "dtype": "F64", "shape": [1], "data_offsets": [0, 4]}}"#,
            &f32_bytes(&[1.0]),
        );
        assert_eq!(
            read_safetensors(&key_twice).unwrap_err().message,
            "the safetensors header gives the key \"dtype\" twice in \"w\""
        );
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
