//! The presets (`linear`, `mlp`, `cnn`, `transformer`) as the layer lists they stand for,
//! with their own checks against the data first: they name the preset's fields.

use super::plan::{plan_layers, Plan};
use super::ModelShape;
use crate::engine::spec::{Activation, GeluApproximation, LayerSpec, ModelSpec, SpecError, Task};

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
pub fn plan(spec: &ModelSpec, shape: &ModelShape) -> Result<Plan, SpecError> {
    check_fits(spec, shape)?;
    plan_layers(
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
