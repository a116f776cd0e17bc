//! The models a job can ask for (`linear`, `mlp`, `cnn`, `transformer`), built on candle with
//! weights drawn from the engine's own seeded generator so that a run is reproducible, and the
//! loss each task trains on.

use std::any::Any;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor, Var, D};

use crate::engine::data::Task;
use crate::engine::events::EngineError;

use crate::engine::rng::Rng;
pub mod layers;

use crate::engine::spec::{Activation, ModelSpec, SpecError};
use layers::{GeluApproximation, LayerSpec, Sequential};

/// What the model reads and predicts, taken from the training data.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Per-sample input shape: `[features]`, `[channels, height, width]` or `[context]`.
    pub input: Vec<usize>,
    /// Classes, regression outputs or vocabulary size.
    pub output: usize,
    pub task: Task,
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
        .broadcast_div(&(variance + layers::NORM_EPS)?.sqrt()?)?
        .broadcast_mul(gain.as_tensor())?
        .broadcast_add(shift.as_tensor())
}

pub struct Model {
    /// Every model is a layer list; a preset is built as the list it expands to.
    layers: Sequential,
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
        let layers = Sequential::build(&plan(spec, shape)?, &mut rng, device)?;
        let vars = layers.vars().cloned().collect();
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

    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|var| var.elem_count()).sum()
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn layers(&self) -> &Sequential {
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
        self.vars.iter().chain(self.layers.buffers())
    }

    /// Sets the weights from a PyTorch `state_dict()` of the equivalent `nn.Sequential`.
    pub fn load_state_dict(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<(), SpecError> {
        self.layers.load_state_dict(tensors)
    }

    /// Predictions for a batch. `dropout_rng` is `Some` in training mode.
    pub fn predict(
        &self,
        x: &Tensor,
        dropout_rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        self.layers.forward(x, dropout_rng)
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

impl From<ModelError> for EngineError {
    fn from(error: ModelError) -> Self {
        match error {
            ModelError::Spec(spec) => EngineError::Spec(spec),
            ModelError::Candle(candle) => EngineError::Candle(candle),
        }
    }
}

/// The checks of a preset against the data, before its layer list is planned: they name the
/// preset's own fields (`model.channels[2]`) where a shape error in the list it expands to
/// could not. A layer list is checked by its plan alone.
fn check_fits(spec: &ModelSpec, shape: &ModelShape) -> Result<(), SpecError> {
    let is_tokens = shape.task == Task::LanguageModel;
    if let ModelSpec::Sequential { .. } = spec {
        if shape.output == 0 {
            return Err(SpecError::new("data", "the data has no outputs to predict"));
        }
        return Ok(());
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

/// The layer list a model spec stands for: a preset as its `torch.nn.Sequential`
/// equivalent (the same layers, initialisation order and `state_dict()` names), a layer list
/// as given. [`plan`] runs a preset's own checks first: they give clearer messages than a
/// shape error in the list it expands to.
pub fn layer_list(spec: &ModelSpec, shape: &ModelShape) -> Vec<LayerSpec> {
    let activation = |activation: &Activation| match activation {
        Activation::Relu => LayerSpec::Relu,
        // The presets' GELU has always been the tanh form.
        Activation::Gelu => LayerSpec::Gelu {
            approximate: GeluApproximation::Tanh,
        },
        Activation::Tanh => LayerSpec::Tanh,
        Activation::Silu => LayerSpec::Silu,
    };
    let head = LayerSpec::Linear { out: shape.output };
    match spec {
        ModelSpec::Sequential { layers, .. } => layers.clone(),
        ModelSpec::Linear => vec![LayerSpec::Flatten, head],
        ModelSpec::Mlp {
            hidden,
            activation: act,
            dropout,
        } => {
            let mut layers = vec![LayerSpec::Flatten];
            for &out in hidden {
                layers.push(LayerSpec::Linear { out });
                layers.push(activation(act));
                if *dropout > 0.0 {
                    layers.push(LayerSpec::Dropout { p: *dropout });
                }
            }
            layers.push(head);
            layers
        }
        ModelSpec::Cnn { channels, hidden } => {
            let mut layers = Vec::new();
            for &out in channels {
                layers.extend([
                    LayerSpec::Conv2d {
                        out,
                        kernel: 3,
                        stride: 1,
                        padding: 1,
                    },
                    LayerSpec::Relu,
                    LayerSpec::MaxPool2d {
                        size: 2,
                        stride: None,
                    },
                ]);
            }
            layers.extend([
                LayerSpec::Flatten,
                LayerSpec::Linear { out: *hidden },
                LayerSpec::Relu,
                head,
            ]);
            layers
        }
        ModelSpec::Transformer {
            d_model,
            heads,
            layers: blocks,
            ..
        } => {
            let mut layers = vec![
                LayerSpec::Embedding {
                    dim: *d_model,
                    init_std: 0.02,
                },
                LayerSpec::PositionEmbedding,
            ];
            layers.extend((0..*blocks).map(|_| LayerSpec::TransformerBlock { heads: *heads }));
            layers.extend([LayerSpec::LayerNorm, head]);
            layers
        }
    }
}

/// The checked plan of the model a spec asks for on this data: every shape, the parameter
/// count and the step memory, without building anything (admission runs it at submit, and
/// `Model::build` builds from it; the same messages either way).
pub fn plan(spec: &ModelSpec, shape: &ModelShape) -> Result<layers::Plan, SpecError> {
    check_fits(spec, shape)?;
    layers::plan(
        &layer_list(spec, shape),
        &shape.input,
        shape.task,
        shape.output,
    )
    .map_err(|error| match spec {
        // A preset's spec has no `model.layers` to name: its own sizes are under `model`.
        ModelSpec::Sequential { .. } => error,
        _ if error.field.starts_with("model.layers") => SpecError::new("model", error.message),
        _ => error,
    })
}

impl Module for Model {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.predict(x, None)
    }
}
