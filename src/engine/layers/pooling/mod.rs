//! Pooling over `[channels, height, width]`: `nn.MaxPool2d(size)` and `nn.AvgPool2d(size)`
//! on non-overlapping windows (rows and columns past the last whole window dropped, as
//! PyTorch does), and `nn.AdaptiveAvgPool2d(1)`.

use std::any::Any;

use candle_core::Tensor;

use super::native::{NodeBuild, NodeParts};
use super::plan::{PlanStep, Planned, Sample};
use super::weights::Weights;
use super::Layer;
use crate::engine::rng::Rng;
use crate::engine::spec::SpecError;

mod candle;
mod native;

/// `nn.MaxPool2d(size)`: each window's first maximum, which also takes the whole gradient.
#[derive(Debug)]
pub struct MaxPool2d {
    pub size: usize,
}

/// `nn.AvgPool2d(size)`.
#[derive(Debug)]
pub struct AvgPool2d {
    pub size: usize,
}

/// `nn.AdaptiveAvgPool2d(1)`: each channel's mean.
#[derive(Debug)]
pub struct AdaptiveAvgPool2d;

/// `{"type": "max_pool2d", "size": ...}` (the stride, if given, was checked to be the size).
pub fn plan_max(size: usize, step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let output = windows(size, step)?;
    Ok((Box::new(MaxPool2d { size }), output))
}

/// `{"type": "avg_pool2d", "size": ...}`.
pub fn plan_avg(size: usize, step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let output = windows(size, step)?;
    Ok((Box::new(AvgPool2d { size }), output))
}

/// `{"type": "adaptive_avg_pool2d"}`.
pub fn plan_adaptive(step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let &[channels, _, _] = step.values()? else {
        return Err(step.mismatch("[channels, height, width]"));
    };
    Ok((
        Box::new(AdaptiveAvgPool2d),
        Sample::Values(vec![channels, 1, 1]),
    ))
}

/// The output of `size x size` windows over what reaches the layer.
fn windows(size: usize, step: &PlanStep<'_>) -> Result<Sample, SpecError> {
    let dims = step.values()?;
    let &[channels, height, width] = dims else {
        return Err(step.mismatch("[channels, height, width]"));
    };
    if height < size || width < size {
        return Err(SpecError::new(
            step.at,
            format!(
                "{} of size {size} does not fit its input {dims:?}",
                step.name
            ),
        ));
    }
    Ok(Sample::Values(vec![channels, height / size, width / size]))
}

impl Layer for MaxPool2d {
    /// Each output's window position.
    fn saved_values(&self, output: u64) -> Option<u64> {
        Some(output)
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        _weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        candle::max_pool(x, self.size)
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::max_pool_node(self.size, input, build)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Layer for AvgPool2d {
    fn candle_forward(
        &self,
        x: &Tensor,
        _weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        candle::avg_pool(x, self.size)
    }

    fn native_node(
        &self,
        input: &[usize],
        _build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::avg_pool_node(self.size, input)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Layer for AdaptiveAvgPool2d {
    fn candle_forward(
        &self,
        x: &Tensor,
        _weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        x.mean_keepdim(3)?.mean_keepdim(2)
    }

    fn native_node(
        &self,
        input: &[usize],
        _build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::adaptive_node(input)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
