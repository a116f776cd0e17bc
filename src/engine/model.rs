//! The models a job can ask for (`linear`, `mlp`, `cnn`, `transformer`), built on candle with
//! weights drawn from the engine's own seeded generator so that a run is reproducible, and the
//! loss each task trains on.

use std::any::Any;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor, Var, D};

use super::data::Task;
use super::ops;
use super::rng::Rng;
use super::sequential::{self, Sequential};
use super::spec::{Activation, ModelSpec, SpecError};

/// What the model reads and predicts, taken from the training data.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Per-sample input shape: `[features]`, `[channels, height, width]` or `[context]`.
    pub input: Vec<usize>,
    /// Classes, regression outputs or vocabulary size.
    pub output: usize,
    pub task: Task,
}

/// A fully connected layer `y = x W^T + b` with PyTorch's default initialisation.
pub(crate) struct Dense {
    weight: Var,
    bias: Var,
}

impl Dense {
    fn new(
        inputs: usize,
        outputs: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> candle_core::Result<Self> {
        // nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both weight and bias.
        let bound = 1.0 / (inputs as f64).sqrt();
        Ok(Self {
            weight: uniform_var(&[outputs, inputs], bound, rng, device)?,
            bias: uniform_var(&[outputs], bound, rng, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.weight, &self.bias)
    }

    fn vars(&self) -> [&Var; 2] {
        [&self.weight, &self.bias]
    }

    /// (inputs, outputs).
    pub(crate) fn sizes(&self) -> (usize, usize) {
        let dims = self.weight.dims();
        (dims[1], dims[0])
    }
}

/// `x W^T + b` on the last dimension: `[rows, inputs]`, or any rank flattened to one matmul.
pub(crate) fn linear(x: &Tensor, weight: &Var, bias: &Var) -> candle_core::Result<Tensor> {
    let weight_t = weight.as_tensor().t()?;
    let y = if x.rank() == 2 {
        x.matmul(&weight_t)?
    } else {
        let dims = x.dims();
        let (leading, inputs) = dims.split_at(dims.len() - 1);
        let mut out_shape = leading.to_vec();
        out_shape.push(weight_t.dim(1)?);
        x.reshape((leading.iter().product::<usize>(), inputs[0]))?
            .matmul(&weight_t)?
            .reshape(out_shape)?
    };
    y.broadcast_add(bias.as_tensor())
}

/// Layer norm over the last dimension (PyTorch's: biased variance, eps 1e-5), then
/// `* gain + shift`, in stock candle ops so that it runs on any device.
pub(crate) fn layer_norm(x: &Tensor, gain: &Var, shift: &Var) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(variance + f64::from(ops::LAYER_NORM_EPS))?.sqrt()?)?
        .broadcast_mul(gain.as_tensor())?
        .broadcast_add(shift.as_tensor())
}

pub(crate) struct Conv {
    weight: Var,
    bias: Var,
}

impl Conv {
    pub(crate) fn outputs(&self) -> usize {
        self.weight.dims()[0]
    }
}

pub(crate) struct LayerNorm {
    gain: Var,
    shift: Var,
}

impl LayerNorm {
    fn new(size: usize, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            gain: Var::ones(size, DType::F32, device)?,
            shift: Var::zeros(size, DType::F32, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(x, &self.gain, &self.shift)
    }
}

pub(crate) struct Block {
    norm_attention: LayerNorm,
    qkv: Dense,
    projection: Dense,
    norm_mlp: LayerNorm,
    expand: Dense,
    contract: Dense,
}

pub(crate) enum Layers {
    Linear(Dense),
    Mlp {
        layers: Vec<Dense>,
        activation: Activation,
        dropout: f64,
    },
    Cnn {
        convs: Vec<Conv>,
        hidden: Dense,
        head: Dense,
    },
    Transformer {
        token_embedding: Var,
        position_embedding: Var,
        blocks: Vec<Block>,
        final_norm: LayerNorm,
        head: Dense,
        heads: usize,
        causal_mask: Tensor,
    },
    Sequential(Sequential),
}

pub struct Model {
    layers: Layers,
    shape: ModelShape,
    vars: Vec<Var>,
    device: Device,
    /// Whether the hand-written CPU step runs this model (else candle's autograd).
    native: bool,
    /// What the training backend keeps between steps (the native step's buffers), typed by
    /// the backend: the model does not depend on any backend.
    backend_state: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The output of one forward pass and its loss.
pub struct Forward {
    pub output: Tensor,
    pub loss: Tensor,
}

impl Model {
    /// Builds the model a spec asks for, checking that it fits the data.
    pub fn build(
        spec: &ModelSpec,
        shape: &ModelShape,
        seed: u64,
        device: &Device,
    ) -> Result<Model, ModelError> {
        let mut rng = Rng::derive(seed, 0x1417);
        let layers = build_layers(spec, shape, &mut rng, device)?;
        let vars = collect_vars(&layers);
        let native = device.is_cpu();
        Ok(Model {
            layers,
            shape: shape.clone(),
            vars,
            native,
            device: device.clone(),
            backend_state: Mutex::new(None),
        })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Whether the hand-written CPU step trains and evaluates this model: the built-in
    /// architectures on the CPU, unless [`Model::use_candle`] was called.
    pub fn runs_native(&self) -> bool {
        self.native
    }

    /// Trains and evaluates through candle's autograd instead of the native step.
    pub fn use_candle(&mut self) {
        self.native = false;
    }

    /// `"native"` or `"candle"`.
    pub fn backend_name(&self) -> &'static str {
        if self.native {
            "native"
        } else {
            "candle"
        }
    }

    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|var| var.elem_count()).sum()
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn layers(&self) -> &Layers {
        &self.layers
    }

    /// The backend's state between steps (one training loop per model, so never contended).
    pub(crate) fn backend_state(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Any + Send>>> {
        self.backend_state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deep copies of every weight and running statistic (a `Var` clone would share storage
    /// with the live one).
    pub fn snapshot(&self) -> candle_core::Result<Vec<Tensor>> {
        self.state_vars()
            .map(|var| var.as_tensor().copy())
            .collect()
    }

    pub fn restore(&self, snapshot: &[Tensor]) -> candle_core::Result<()> {
        for (var, saved) in self.state_vars().zip(snapshot) {
            var.set(saved)?;
        }
        Ok(())
    }

    /// The parameters, then batch norm's running statistics: everything training changes.
    fn state_vars(&self) -> impl Iterator<Item = &Var> {
        let buffers = match &self.layers {
            Layers::Sequential(model) => Some(model.buffers()),
            _ => None,
        };
        self.vars.iter().chain(buffers.into_iter().flatten())
    }

    /// Sets the weights from a PyTorch `state_dict()` (layer-list models only).
    pub fn load_state_dict(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<(), SpecError> {
        match &self.layers {
            Layers::Sequential(model) => model.load_state_dict(tensors),
            // `JobSpec::validate` names the spec's arch; this is the same rule for a caller
            // that skipped it.
            _ => Err(SpecError::new(
                "init.weights",
                "initial weights need a layer-list model (arch \"sequential\")",
            )),
        }
    }

    /// Predictions for a batch. `dropout_rng` is `Some` in training mode.
    pub fn predict(
        &self,
        x: &Tensor,
        dropout_rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        match &self.layers {
            Layers::Linear(layer) => layer.forward(&x.flatten_from(1)?),
            Layers::Mlp {
                layers,
                activation,
                dropout,
            } => {
                let mut rng = dropout_rng;
                let mut h = x.flatten_from(1)?;
                for (index, layer) in layers.iter().enumerate() {
                    h = layer.forward(&h)?;
                    if index + 1 < layers.len() {
                        h = activate(&h, *activation)?;
                        if let (Some(rng), true) = (rng.as_deref_mut(), *dropout > 0.0) {
                            h = apply_dropout(&h, *dropout, rng)?;
                        }
                    }
                }
                Ok(h)
            }
            Layers::Cnn {
                convs,
                hidden,
                head,
            } => {
                let mut h = x.clone();
                for conv in convs {
                    h = ops::max_pool_2x2(&ops::relu(&convolve(&h, conv)?)?)?;
                }
                let h = ops::relu(&hidden.forward(&h.flatten_from(1)?)?)?;
                head.forward(&h)
            }
            Layers::Transformer {
                token_embedding,
                position_embedding,
                blocks,
                final_norm,
                head,
                heads,
                causal_mask,
            } => {
                let (batch, time) = x.dims2()?;
                let d_model = token_embedding.dim(1)?;
                let tokens = token_embedding
                    .as_tensor()
                    .index_select(&x.flatten_all()?, 0)?
                    .reshape((batch, time, d_model))?;
                let positions = position_embedding.as_tensor().narrow(0, 0, time)?;
                let mut h = tokens.broadcast_add(&positions)?;
                let mask = causal_mask.narrow(0, 0, time)?.narrow(1, 0, time)?;
                for block in blocks {
                    h = (&h
                        + attention(&block.norm_attention.forward(&h)?, block, *heads, &mask)?)?;
                    let expanded = ops::gelu(&block.expand.forward(&block.norm_mlp.forward(&h)?)?)?;
                    h = (&h + block.contract.forward(&expanded)?)?;
                }
                head.forward(&final_norm.forward(&h)?)
            }
            Layers::Sequential(model) => model.forward(x, dropout_rng),
        }
    }

    /// Predictions and the mean loss of the batch for this model's task.
    pub fn forward(
        &self,
        x: &Tensor,
        y: &Tensor,
        dropout_rng: Option<&mut Rng>,
    ) -> candle_core::Result<Forward> {
        let output = self.predict(x, dropout_rng)?;
        let loss = task_loss(self.shape.task, &output, y)?;
        Ok(Forward { output, loss })
    }
}

/// Mean cross-entropy for classification and language models, mean squared error for
/// regression.
pub fn task_loss(task: Task, output: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    match task {
        Task::Classification => candle_nn::loss::cross_entropy(output, y),
        Task::Regression => candle_nn::loss::mse(output, y),
        Task::LanguageModel => {
            let vocab = output.dim(D::Minus1)?;
            candle_nn::loss::cross_entropy(&output.reshape(((), vocab))?, &y.flatten_all()?)
        }
    }
}

/// The number of correct predictions in a batch (classification and language models).
pub fn correct_count(output: &Tensor, y: &Tensor) -> candle_core::Result<usize> {
    let predicted = output.argmax(D::Minus1)?;
    let hits = predicted.eq(y)?.to_dtype(DType::F32)?.sum_all()?;
    Ok(hits.to_scalar::<f32>()? as usize)
}

fn attention(
    x: &Tensor,
    block: &Block,
    heads: usize,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (batch, time, d_model) = x.dims3()?;
    let head_dim = d_model / heads;
    let qkv = block
        .qkv
        .forward(x)?
        .reshape((batch, time, 3, heads, head_dim))?;
    let split = |index: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(2, index, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()
    };
    let (query, key, value) = (split(0)?, split(1)?, split(2)?);
    let scores = (query.matmul(&key.t()?)? / (head_dim as f64).sqrt())?.broadcast_add(mask)?;
    let weights = ops::softmax_last_dim(&scores)?;
    let mixed = weights
        .matmul(&value)?
        .transpose(1, 2)?
        .reshape((batch, time, d_model))?;
    block.projection.forward(&mixed)
}

/// A 3x3 convolution, padding 1, plus bias. On the CPU it runs as im2col and one matmul
/// (see `ops::im2col_3x3`); elsewhere as candle's convolution.
fn convolve(x: &Tensor, conv: &Conv) -> candle_core::Result<Tensor> {
    let weight = conv.weight.as_tensor();
    if !x.device().is_cpu() {
        return x
            .conv2d(weight, 1, 1, 1, 1)?
            .broadcast_add(&conv.bias.as_tensor().reshape((1, (), 1, 1))?);
    }
    let (batch, channels, height, width) = x.dims4()?;
    let outputs = weight.dim(0)?;
    let columns = ops::im2col_3x3(x)?;
    let y = columns.matmul(&weight.reshape((outputs, channels * 9))?.t()?)?;
    ops::add_bias(&y, conv.bias.as_tensor())?
        .reshape((batch, height, width, outputs))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

fn activate(x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    match activation {
        Activation::Relu => ops::relu(x),
        Activation::Gelu => ops::gelu(x),
        Activation::Tanh => x.tanh(),
        Activation::Silu => x.silu(),
    }
}

/// Inverted dropout with a mask from the engine's seeded generator.
pub(crate) fn apply_dropout(x: &Tensor, rate: f64, rng: &mut Rng) -> candle_core::Result<Tensor> {
    let keep = 1.0 - rate;
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < keep { scale } else { 0.0 })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}

pub(crate) fn uniform_var(
    shape: &[usize],
    bound: f64,
    rng: &mut Rng,
    device: &Device,
) -> candle_core::Result<Var> {
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| rng.uniform(-bound, bound) as f32)
        .collect();
    Var::from_tensor(&Tensor::from_vec(values, shape, device)?)
}

pub(crate) fn normal_var(
    shape: &[usize],
    std: f64,
    rng: &mut Rng,
    device: &Device,
) -> candle_core::Result<Var> {
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count).map(|_| (rng.normal() * std) as f32).collect();
    Var::from_tensor(&Tensor::from_vec(values, shape, device)?)
}

/// Why a model cannot be built for the data: a spec problem (422) or a candle failure.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("building the model: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Checks that a model can be built for the data, without building it (also run at submit,
/// before anything is allocated): the same messages either way.
pub fn check_fits(spec: &ModelSpec, shape: &ModelShape) -> Result<(), SpecError> {
    let is_tokens = shape.task == Task::LanguageModel;
    if let ModelSpec::Sequential { layers, .. } = spec {
        if shape.output == 0 {
            return Err(SpecError::new("data", "the data has no outputs to predict"));
        }
        return sequential::plan(layers, &shape.input, shape.task, shape.output).map(|_| ());
    }
    if is_tokens && !matches!(spec, ModelSpec::Transformer { .. }) {
        return Err(SpecError::new(
            "model.arch",
            format!(
                "a character language model needs arch \"transformer\" or \"sequential\", got \"{}\"",
                spec.arch()
            ),
        ));
    }
    if shape.output == 0 {
        return Err(SpecError::new("data", "the data has no outputs to predict"));
    }
    match spec {
        ModelSpec::Cnn { channels, .. } => {
            let [_, mut height, mut width] = shape.input[..] else {
                return Err(SpecError::new(
                    "model.arch",
                    format!(
                        "a cnn needs image data (channels x height x width), but each sample here has shape {:?}: use \"mlp\" or \"linear\"",
                        shape.input
                    ),
                ));
            };
            for index in 0..channels.len() {
                if height < 2 || width < 2 {
                    return Err(SpecError::new(
                        format!("model.channels[{index}]"),
                        format!(
                            "too many convolutions for {}x{} images: each halves the size; use at most {index}",
                            shape.input[1], shape.input[2]
                        ),
                    ));
                }
                height /= 2;
                width /= 2;
            }
        }
        ModelSpec::Transformer { .. } if !is_tokens => {
            return Err(SpecError::new(
                "model.arch",
                "a transformer is a character language model: give it text data (an uploaded text dataset or a .txt path)",
            ));
        }
        _ => {}
    }
    Ok(())
}

/// The parameter count `Model::build` would give, computed from the spec alone. Arithmetic
/// saturates, so a model too large to count is `u64::MAX`, above any limit.
pub fn parameter_count(spec: &ModelSpec, shape: &ModelShape) -> u64 {
    let dense = |inputs: u64, outputs: u64| inputs.saturating_add(1).saturating_mul(outputs);
    let features = shape
        .input
        .iter()
        .fold(1u64, |product, &size| product.saturating_mul(size as u64));
    let output = shape.output as u64;
    match spec {
        ModelSpec::Linear => dense(features, output),
        ModelSpec::Mlp { hidden, .. } => {
            let mut total = 0u64;
            let mut inputs = features;
            for &size in hidden {
                total = total.saturating_add(dense(inputs, size as u64));
                inputs = size as u64;
            }
            total.saturating_add(dense(inputs, output))
        }
        ModelSpec::Cnn { channels, hidden } => {
            let (mut inputs, mut height, mut width) = match shape.input[..] {
                [channels, height, width] => (channels as u64, height as u64, width as u64),
                _ => (features, 1, 1),
            };
            let mut total = 0u64;
            for &outputs in channels {
                total = total.saturating_add(dense(inputs.saturating_mul(9), outputs as u64));
                inputs = outputs as u64;
                height /= 2;
                width /= 2;
            }
            let flat = inputs.saturating_mul(height).saturating_mul(width);
            total
                .saturating_add(dense(flat, *hidden as u64))
                .saturating_add(dense(*hidden as u64, output))
        }
        ModelSpec::Transformer {
            d_model,
            layers,
            context,
            ..
        } => {
            let d = *d_model as u64;
            // Two layer norms, then qkv, projection, expand and contract.
            let block = (4 * d)
                .saturating_add(dense(d, d.saturating_mul(3)))
                .saturating_add(dense(d, d))
                .saturating_add(dense(d, d.saturating_mul(4)))
                .saturating_add(dense(d.saturating_mul(4), d));
            output
                .saturating_mul(d)
                .saturating_add((*context as u64).saturating_mul(d))
                .saturating_add(block.saturating_mul(*layers as u64))
                .saturating_add(d.saturating_mul(2))
                .saturating_add(dense(d, output))
        }
        ModelSpec::Sequential { layers, .. } => {
            sequential::plan(layers, &shape.input, shape.task, shape.output)
                .map_or(u64::MAX, |plan| plan.parameters)
        }
    }
}

fn build_layers(
    spec: &ModelSpec,
    shape: &ModelShape,
    rng: &mut Rng,
    device: &Device,
) -> Result<Layers, ModelError> {
    check_fits(spec, shape)?;
    let features: usize = shape.input.iter().product();
    Ok(match spec {
        ModelSpec::Sequential { layers, .. } => {
            let plan = sequential::plan(layers, &shape.input, shape.task, shape.output)?;
            Layers::Sequential(Sequential::build(&plan, rng, device)?)
        }
        ModelSpec::Linear => Layers::Linear(Dense::new(features, shape.output, rng, device)?),
        ModelSpec::Mlp {
            hidden,
            activation,
            dropout,
        } => {
            let mut layers = Vec::with_capacity(hidden.len() + 1);
            let mut inputs = features;
            for &size in hidden {
                layers.push(Dense::new(inputs, size, rng, device)?);
                inputs = size;
            }
            layers.push(Dense::new(inputs, shape.output, rng, device)?);
            Layers::Mlp {
                layers,
                activation: *activation,
                dropout: *dropout,
            }
        }
        ModelSpec::Cnn { channels, hidden } => {
            let [in_channels, mut height, mut width] = shape.input[..] else {
                unreachable!("check_fits asks for image data");
            };
            let mut convs = Vec::with_capacity(channels.len());
            let mut inputs = in_channels;
            for &outputs in channels {
                // nn.Conv2d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * 3 * 3.
                let bound = 1.0 / ((inputs * 9) as f64).sqrt();
                convs.push(Conv {
                    weight: uniform_var(&[outputs, inputs, 3, 3], bound, rng, device)?,
                    bias: uniform_var(&[outputs], bound, rng, device)?,
                });
                inputs = outputs;
                height /= 2;
                width /= 2;
            }
            let flat = inputs * height * width;
            Layers::Cnn {
                convs,
                hidden: Dense::new(flat, *hidden, rng, device)?,
                head: Dense::new(*hidden, shape.output, rng, device)?,
            }
        }
        ModelSpec::Transformer {
            d_model,
            heads,
            layers,
            context,
        } => {
            let vocab = shape.output;
            let blocks = (0..*layers)
                .map(|_| -> candle_core::Result<Block> {
                    Ok(Block {
                        norm_attention: LayerNorm::new(*d_model, device)?,
                        qkv: Dense::new(*d_model, 3 * d_model, rng, device)?,
                        projection: Dense::new(*d_model, *d_model, rng, device)?,
                        norm_mlp: LayerNorm::new(*d_model, device)?,
                        expand: Dense::new(*d_model, 4 * d_model, rng, device)?,
                        contract: Dense::new(4 * d_model, *d_model, rng, device)?,
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let mask: Vec<f32> = (0..context * context)
                .map(|i| if i % context > i / context { -1e9 } else { 0.0 })
                .collect();
            Layers::Transformer {
                token_embedding: normal_var(&[vocab, *d_model], 0.02, rng, device)?,
                position_embedding: normal_var(&[*context, *d_model], 0.02, rng, device)?,
                blocks,
                final_norm: LayerNorm::new(*d_model, device)?,
                head: Dense::new(*d_model, vocab, rng, device)?,
                heads: *heads,
                causal_mask: Tensor::from_vec(mask, (*context, *context), device)?,
            }
        }
    })
}

fn collect_vars(layers: &Layers) -> Vec<Var> {
    let mut vars = Vec::new();
    match layers {
        Layers::Sequential(model) => vars.extend(model.vars().cloned()),
        Layers::Linear(layer) => vars.extend(layer.vars().into_iter().cloned()),
        Layers::Mlp { layers, .. } => {
            for layer in layers {
                vars.extend(layer.vars().into_iter().cloned());
            }
        }
        Layers::Cnn {
            convs,
            hidden,
            head,
        } => {
            for conv in convs {
                vars.push(conv.weight.clone());
                vars.push(conv.bias.clone());
            }
            vars.extend(hidden.vars().into_iter().cloned());
            vars.extend(head.vars().into_iter().cloned());
        }
        Layers::Transformer {
            token_embedding,
            position_embedding,
            blocks,
            final_norm,
            head,
            ..
        } => {
            vars.push(token_embedding.clone());
            vars.push(position_embedding.clone());
            for block in blocks {
                for norm in [&block.norm_attention, &block.norm_mlp] {
                    vars.push(norm.gain.clone());
                    vars.push(norm.shift.clone());
                }
                for layer in [
                    &block.qkv,
                    &block.projection,
                    &block.expand,
                    &block.contract,
                ] {
                    vars.extend(layer.vars().into_iter().cloned());
                }
            }
            vars.push(final_norm.gain.clone());
            vars.push(final_norm.shift.clone());
            vars.extend(head.vars().into_iter().cloned());
        }
    }
    vars
}

impl Module for Model {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.predict(x, None)
    }
}
