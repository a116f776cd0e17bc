//! `nn.Dropout(p)`: inverted dropout in training mode, with its mask drawn from the engine's
//! seeded generator (both backends draw the same mask); the identity in evaluation mode.

use std::any::Any;

use candle_core::Tensor;

use super::native::{NodeBuild, NodeParts};
use super::plan::{PlanStep, Planned, Sample};
use super::weights::Weights;
use super::Layer;
use crate::engine::rng::Rng;
use crate::engine::spec::SpecError;

pub mod candle;
mod native;

#[derive(Debug)]
pub struct Dropout {
    pub p: f64,
}

/// `{"type": "dropout", "p": ...}` (`p` was checked with the spec).
pub fn plan(p: f64, step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let dims = step.values()?.to_vec();
    Ok((Box::new(Dropout { p }), Sample::Values(dims)))
}

impl Layer for Dropout {
    /// The mask.
    fn saved_values(&self, output: u64) -> Option<u64> {
        Some(output)
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        _weights: &mut Weights<'_>,
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        match train.as_deref_mut() {
            Some(rng) if self.p > 0.0 => candle::apply_dropout(x, self.p, rng),
            _ => Ok(x.clone()),
        }
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::node(self.p, input, build)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
