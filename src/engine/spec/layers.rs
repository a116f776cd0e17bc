//! The layer types of a layer list (`"arch": "sequential"`), as a spec gives them: PyTorch's
//! layers with PyTorch's parameter names and defaults, and the checks of their own settings
//! that need no shapes. Their shapes are planned, their weights drawn and their passes run by
//! their family's module under `engine::layers`.

use serde::{Deserialize, Serialize};

use super::SpecError;

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
    /// `nn.LeakyReLU(negative_slope)`.
    LeakyRelu {
        #[serde(default = "leaky_relu_slope")]
        negative_slope: f64,
    },
    /// A block whose output is added to its input (`x + block(x)`); its layers are named as
    /// a nested `nn.Sequential`'s.
    Residual {
        layers: Vec<LayerSpec>,
    },
}

fn one() -> usize {
    1
}

/// PyTorch's default `negative_slope`.
fn leaky_relu_slope() -> f64 {
    0.01
}

fn unit_std() -> f64 {
    1.0
}

fn is_unit_std(std: &f64) -> bool {
    *std == 1.0
}

/// `nn.GELU(approximate=...)`: the exact erf form (PyTorch's default) or the tanh form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeluApproximation {
    #[default]
    None,
    Tanh,
}

impl LayerSpec {
    /// The layer's `type`, as in JSON.
    pub fn name(&self) -> &'static str {
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
            LayerSpec::LeakyRelu { .. } => "leaky_relu",
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
