//! The training backends: what runs one optimizer step and evaluates a model. The range
//! test, the sweep, the tune and the race are written once against [`Backend`]; two
//! implementations run it:
//! - [`native`]: the hand-written CPU step over buffers kept between steps (every layer type);
//! - [`Candle`]: candle's stock ops and autograd on any device, the path CUDA builds use and
//!   the oracle the native step is tested against.
//!
//! A model is built for one of them ([`Model::runs_native`]); [`of`] names it.

pub mod native;

use std::sync::atomic::AtomicBool;

use candle_core::DType;

pub use super::batch::{BatchOrder, DeviceData};
use super::data::Task;
use super::events::{check_canceled, EngineError};
use super::model::{correct_count, Model};
use super::optim::Optimizer;
use super::rng::Rng;

/// One way to train and evaluate a model. The model owns the weights (candle `Var`s, so
/// snapshots, restores and the optimizer see one model); a backend may keep buffers in the
/// model's backend state between steps.
pub trait Backend: Sync {
    /// `"native"` or `"candle"`, as results report it.
    fn name(&self) -> &'static str;

    /// One optimizer step on the batch `rows`; returns the batch's loss before the update. A
    /// non-finite loss is returned without stepping (a finite loss whose gradients overflow
    /// still steps, as in PyTorch; the range test stops on the loss that follows).
    #[allow(clippy::too_many_arguments)]
    fn train_step(
        &self,
        model: &Model,
        optimizer: &mut Optimizer,
        data: &DeviceData,
        rows: &[usize],
        lr: f64,
        momentum: f64,
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<f64>;

    /// Loss (and accuracy where it means something) on a whole split, in evaluation mode.
    /// A split can take minutes: `cancel` is checked before every chunk of it, and a raised
    /// flag ends the evaluation with [`EngineError::Canceled`].
    fn evaluate(
        &self,
        model: &Model,
        data: &DeviceData,
        cancel: &AtomicBool,
    ) -> Result<Evaluation, EngineError>;
}

/// The backend a model was built for.
pub fn of(model: &Model) -> &'static dyn Backend {
    if model.runs_native() {
        &native::Native
    } else {
        &Candle
    }
}

/// [`Backend::train_step`] on the model's backend.
pub fn train_step(
    model: &Model,
    optimizer: &mut Optimizer,
    data: &DeviceData,
    rows: &[usize],
    lr: f64,
    momentum: f64,
    dropout_rng: &mut Rng,
) -> candle_core::Result<f64> {
    of(model).train_step(model, optimizer, data, rows, lr, momentum, dropout_rng)
}

/// [`Backend::evaluate`] on the model's backend.
pub fn evaluate(
    model: &Model,
    data: &DeviceData,
    cancel: &AtomicBool,
) -> Result<Evaluation, EngineError> {
    of(model).evaluate(model, data, cancel)
}

/// Stock candle ops and autograd, on the model's device.
pub struct Candle;

impl Backend for Candle {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn train_step(
        &self,
        model: &Model,
        optimizer: &mut Optimizer,
        data: &DeviceData,
        rows: &[usize],
        lr: f64,
        momentum: f64,
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<f64> {
        let (x, y) = data.batch(rows)?;
        let forward = model.forward(&x, &y, Some(dropout_rng))?;
        let loss = forward.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            return Ok(loss);
        }
        let grads = forward.loss.backward()?;
        optimizer.step(&grads, lr, momentum)?;
        Ok(loss)
    }

    fn evaluate(
        &self,
        model: &Model,
        data: &DeviceData,
        cancel: &AtomicBool,
    ) -> Result<Evaluation, EngineError> {
        let mut loss_sum = 0.0;
        let mut correct = 0usize;
        let mut counted = 0usize;
        let per_row_items = match data.task {
            Task::LanguageModel => data.y.dim(1)?,
            _ => 1,
        };
        let mut start = 0;
        while start < data.rows {
            check_canceled(cancel)?;
            let len = EVAL_CHUNK.min(data.rows - start);
            let x = data.x.narrow(0, start, len)?;
            let y = data.y.narrow(0, start, len)?;
            let forward = model.forward(&x, &y, None)?;
            let loss = forward.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss_sum += loss * len as f64;
            if data.task != Task::Regression {
                correct += correct_count(&forward.output, &y)?;
                counted += len * per_row_items;
            }
            start += len;
        }
        Ok(Evaluation {
            loss: loss_sum / data.rows.max(1) as f64,
            accuracy: (counted > 0).then(|| correct as f64 / counted as f64),
        })
    }
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
