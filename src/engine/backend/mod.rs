//! The training backends: what runs one optimizer step and evaluates a model. Two peers
//! implement [`Backend`], each owning what it keeps between steps:
//! - [`native`]: the hand-written CPU step over buffers kept between steps (every layer
//!   type), which owns its workspace;
//! - [`candle`]: candle's stock ops and autograd on any device, the path CUDA builds use and
//!   the oracle the native step is tested against.
//!
//! The model holds the weights and the plan and knows neither; `engine::trainer` binds a
//! model to the backend a job asks for, and the range test, the sweep, the tune and the race
//! are written once against it.

pub mod candle;
pub mod native;

use std::sync::atomic::AtomicBool;

pub use super::batch::{BatchOrder, DeviceData};
use super::events::EngineError;
use super::model::Model;
use super::optim::Optimizer;
use super::rng::Rng;

/// One way to train and evaluate a model. The model owns the weights (candle `Var`s, so
/// snapshots, restores and the optimizer see one model); the backend owns what it keeps
/// between steps, for the one model it trains.
pub trait Backend: Send {
    /// `"native"` or `"candle"`, as results report it.
    fn name(&self) -> &'static str;

    /// One optimizer step on the batch `rows`; returns the batch's loss before the update. A
    /// non-finite loss is returned without stepping (a finite loss whose gradients overflow
    /// still steps, as in PyTorch; the range test stops on the loss that follows).
    #[allow(clippy::too_many_arguments)]
    fn train_step(
        &mut self,
        model: &Model,
        optimizer: &mut Optimizer,
        data: &DeviceData,
        rows: &[usize],
        lr: f64,
        momentum: f64,
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<f64>;

    /// A forward pass in training mode on the batch `rows` and nothing else: batch norm's
    /// running statistics update (dropout draws from `dropout_rng`), no gradient, no step.
    fn forward_train(
        &mut self,
        model: &Model,
        data: &DeviceData,
        rows: &[usize],
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<()>;

    /// Loss (and accuracy where it means something) on a whole split, in evaluation mode.
    /// A split can take minutes: `cancel` is checked before every chunk of it, and a raised
    /// flag ends the evaluation with [`EngineError::Canceled`].
    fn evaluate(
        &mut self,
        model: &Model,
        data: &DeviceData,
        cancel: &AtomicBool,
    ) -> Result<Evaluation, EngineError>;
}

/// Loss (and accuracy where it means something) on a whole split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: Option<f64>,
}

/// Rows per evaluation chunk of the candle path (and per batch of the native one when the
/// model has not trained yet): large enough to keep the matmuls efficient, small enough to
/// bound memory on big validation sets. At 1024 a CNN's im2col patches (115 MB for the second
/// layer on mnist) were fresh pages on every chunk; 256 took the first validation pass of a
/// CNN tune on mnist10k from 1.2 s to 0.6 s.
pub(crate) const EVAL_CHUNK: usize = 256;
