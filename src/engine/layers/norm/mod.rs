//! Normalisation layers with PyTorch's defaults (eps 1e-5, batch norm's momentum 0.1):
//! `nn.BatchNorm1d` after `[features]` and `nn.BatchNorm2d` after `[channels, h, w]` (one
//! `batch_norm`), with running statistics updated in training mode and used in evaluation
//! mode; `nn.LayerNorm` over the last dimension.

use std::any::Any;

use candle_core::Tensor;

use super::native::{NodeBuild, NodeParts};
use super::plan::{PlanStep, Planned, Sample};
use super::weights::{Init, Tensors, Weights};
use super::Layer;
use crate::engine::rng::Rng;
use crate::engine::spec::SpecError;

pub mod candle;
pub(crate) mod native;

/// Batch norm's running-statistics momentum, PyTorch's.
pub(crate) const BATCH_NORM_MOMENTUM: f64 = 0.1;
/// Both norms' epsilon, PyTorch's.
pub(crate) const NORM_EPS: f64 = 1e-5;

/// `spatial`: over `[channels, h, w]` (BatchNorm2d), else over `[features]`.
#[derive(Debug)]
pub struct BatchNorm {
    pub features: usize,
    pub spatial: bool,
}

#[derive(Debug)]
pub struct LayerNorm {
    pub size: usize,
}

/// `{"type": "batch_norm"}`.
pub fn plan_batch(step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let dims = step.values()?;
    let (features, spatial) = match dims[..] {
        [features] => (features, false),
        [channels, _, _] => (channels, true),
        _ => return Err(step.mismatch("[features] or [channels, height, width]")),
    };
    let at = step.at;
    step.add_parameters((features as u64).checked_mul(2), at, || {
        format!("a weight and a bias of {features}")
    })?;
    let norm = BatchNorm { features, spatial };
    Ok((Box::new(norm), Sample::Values(dims.to_vec())))
}

/// `{"type": "layer_norm"}`.
pub fn plan_layer(step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let dims = step.values()?;
    let Some(&size) = dims.last() else {
        return Err(step.mismatch("at least one dimension"));
    };
    let at = step.at;
    step.add_parameters((size as u64).checked_mul(2), at, || {
        format!("a weight and a bias of {size}")
    })?;
    Ok((Box::new(LayerNorm { size }), Sample::Values(dims.to_vec())))
}

impl Layer for BatchNorm {
    fn tensors(&self, tensors: &mut Tensors) {
        let features = vec![self.features];
        tensors.parameter("weight", features.clone(), Init::Ones);
        tensors.parameter("bias", features.clone(), Init::Zeros);
        tensors.buffer("running_mean", features.clone(), Init::Zeros);
        tensors.buffer("running_var", features, Init::Ones);
    }

    /// The normalized values, and 1/std per feature (counted per sample: a small overcount).
    fn saved_values(&self, output: u64) -> Option<u64> {
        output.checked_add(self.features as u64)
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let [weight, bias] = weights.parameters();
        let [running_mean, running_var] = weights.buffers();
        candle::batch_norm(
            x,
            [weight, bias, running_mean, running_var],
            self.spatial,
            train.is_some(),
        )
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::batch_norm_node(self, input, build)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Layer for LayerNorm {
    fn tensors(&self, tensors: &mut Tensors) {
        tensors.parameter("weight", vec![self.size], Init::Ones);
        tensors.parameter("bias", vec![self.size], Init::Zeros);
    }

    /// The normalized values, and 1/std per row.
    fn saved_values(&self, output: u64) -> Option<u64> {
        output.checked_add(output / (self.size as u64).max(1))
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let [weight, bias] = weights.parameters();
        candle::layer_norm(x, weight, bias)
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::layer_norm_node(input, build)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
