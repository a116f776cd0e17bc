//! The registry of layer types: each `spec::LayerSpec` planned by its family. One line per
//! layer type; a new type adds its line here (see `engine::layers`).

use crate::engine::layers::plan::{PlanStep, Planned};
use crate::engine::layers::{
    activation, conv, dropout, linear, norm, pooling, reshape, residual, transformer,
};
use crate::engine::spec::{LayerSpec, SpecError};
use activation::Function;

/// Plans one layer of a list (see `engine::layers::plan`).
#[rustfmt::skip]
pub(crate) fn plan_layer(spec: &LayerSpec, step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    match spec {
        LayerSpec::Linear { out } => linear::plan(*out, step),
        LayerSpec::Conv2d { out, kernel, stride, padding } => conv::plan(*out, *kernel, *stride, *padding, step),
        LayerSpec::MaxPool2d { size, .. } => pooling::plan_max(*size, step),
        LayerSpec::AvgPool2d { size, .. } => pooling::plan_avg(*size, step),
        LayerSpec::AdaptiveAvgPool2d => pooling::plan_adaptive(step),
        LayerSpec::BatchNorm => norm::plan_batch(step),
        LayerSpec::LayerNorm => norm::plan_layer(step),
        LayerSpec::Dropout { p } => dropout::plan(*p, step),
        LayerSpec::Flatten => reshape::plan(step),
        LayerSpec::Embedding { dim, init_std } => transformer::plan_embedding(*dim, *init_std, step),
        LayerSpec::PositionEmbedding => transformer::plan_position(step),
        LayerSpec::TransformerBlock { heads } => transformer::plan_block(*heads, step),
        LayerSpec::Relu => activation::plan(Function::Relu, step),
        LayerSpec::Gelu { approximate } => activation::plan(Function::gelu(*approximate), step),
        LayerSpec::Tanh => activation::plan(Function::Tanh, step),
        LayerSpec::Sigmoid => activation::plan(Function::Sigmoid, step),
        LayerSpec::Silu => activation::plan(Function::Silu, step),
        LayerSpec::LeakyRelu { negative_slope } => activation::plan(Function::LeakyRelu(*negative_slope as f32), step),
        LayerSpec::Residual { layers } => residual::plan(layers, step),
    }
}
