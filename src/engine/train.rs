//! The training loop shared by the range test and the sweep: a dataset moved to the device
//! once, batches gathered by index in a seeded order, one forward/backward/update per step,
//! and evaluation on a held-out split.

use candle_core::DType;

pub use super::batch::{BatchOrder, DeviceData};
use super::data::Task;
use super::model::{correct_count, Model};
use super::native;
use super::optim::Optimizer;
use super::rng::Rng;

/// One optimizer step; returns the batch's loss before the update. A non-finite loss is
/// returned without stepping (a finite loss whose gradients overflow still steps, as in
/// PyTorch; the range test stops on the loss that follows).
pub fn train_step(
    model: &Model,
    optimizer: &mut Optimizer,
    data: &DeviceData,
    rows: &[usize],
    lr: f64,
    momentum: f64,
    dropout_rng: &mut Rng,
) -> candle_core::Result<f64> {
    if native::supports(model) {
        // On a pool thread, so that the caller's thread sleeps instead of competing with
        // the pool's threads for the cores between the step's parallel sections.
        return on_pool(|| {
            let mut state = model.backend_state();
            let workspace = native::workspace_slot(&mut state);
            let loss = native::forward_backward(model, workspace, data, rows, dropout_rng)?;
            if loss.is_finite() {
                let grads = &workspace.as_ref().expect("set by forward_backward").grads;
                optimizer.step_host(grads, lr, momentum)?;
            }
            Ok(loss)
        });
    }
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

/// Runs `f` on a thread of rayon's global pool (the caller blocks without spinning).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut result = None;
    rayon::scope(|_| result = Some(f()));
    result.expect("the scope ran the closure")
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

pub fn evaluate(model: &Model, data: &DeviceData) -> candle_core::Result<Evaluation> {
    if native::supports(model) {
        return on_pool(|| {
            let mut state = model.backend_state();
            let workspace = native::workspace_slot(&mut state);
            let (loss, accuracy) = native::evaluate(model, workspace, data, EVAL_CHUNK)?;
            Ok(Evaluation { loss, accuracy })
        });
    }
    evaluate_with_candle(model, data)
}

/// `evaluate` through candle's forward pass (other devices; the reference in tests).
pub fn evaluate_with_candle(model: &Model, data: &DeviceData) -> candle_core::Result<Evaluation> {
    let mut loss_sum = 0.0;
    let mut correct = 0usize;
    let mut counted = 0usize;
    let per_row_items = match data.task {
        Task::LanguageModel => data.y.dim(1)?,
        _ => 1,
    };
    let mut start = 0;
    while start < data.rows {
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
