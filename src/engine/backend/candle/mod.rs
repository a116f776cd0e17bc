//! Stock candle ops and autograd, on the model's device: each layer's forward pass from its
//! family's `candle.rs`, the task's loss, and candle's backward pass. Nothing is kept between
//! steps (candle allocates every tensor afresh), so this backend's workspace is empty.

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Tensor, D};

use super::{Backend, DeviceData, Evaluation, EVAL_CHUNK};
use crate::engine::data::Task;
use crate::engine::events::{check_canceled, EngineError};
use crate::engine::layers::candle::forward_list;
use crate::engine::layers::weights::Weights;
use crate::engine::model::Model;
use crate::engine::optim::Optimizer;
use crate::engine::rng::Rng;

#[cfg(test)]
mod tests;

/// Stock candle ops and autograd, on the model's device.
#[derive(Debug, Default)]
pub struct Candle;

/// The output of one forward pass and its loss.
pub struct Forward {
    pub output: Tensor,
    pub loss: Tensor,
}

/// Predictions for a batch. `dropout_rng` is `Some` in training mode.
pub fn predict(
    model: &Model,
    x: &Tensor,
    dropout_rng: Option<&mut Rng>,
) -> candle_core::Result<Tensor> {
    let mut train = dropout_rng;
    let mut weights = Weights::new(model.vars(), model.buffers());
    forward_list(model.plan().layers(), x, &mut weights, &mut train)
}

/// Predictions and the mean loss of the batch for the model's task.
pub fn forward(
    model: &Model,
    x: &Tensor,
    y: &Tensor,
    dropout_rng: Option<&mut Rng>,
) -> candle_core::Result<Forward> {
    let output = predict(model, x, dropout_rng)?;
    let loss = task_loss(model.shape().task, &output, y)?;
    Ok(Forward { output, loss })
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

impl Backend for Candle {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn train_step(
        &mut self,
        model: &Model,
        optimizer: &mut Optimizer,
        data: &DeviceData,
        rows: &[usize],
        lr: f64,
        momentum: f64,
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<f64> {
        let (x, y) = data.batch(rows)?;
        let forward = forward(model, &x, &y, Some(dropout_rng))?;
        let loss = forward.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            return Ok(loss);
        }
        let grads = forward.loss.backward()?;
        optimizer.step(&grads, lr, momentum)?;
        Ok(loss)
    }

    fn forward_train(
        &mut self,
        model: &Model,
        data: &DeviceData,
        rows: &[usize],
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<()> {
        let (x, _) = data.batch(rows)?;
        predict(model, &x, Some(dropout_rng)).map(drop)
    }

    fn evaluate(
        &mut self,
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
            let forward = forward(model, &x, &y, None)?;
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
