//! The training step of every model on the CPU, written out by hand instead of recorded on
//! candle's autograd tape: the chain of each layer's native node (its family's `native.rs`
//! under `engine::layers`) over buffers kept between steps (`buffers`), the losses, and the
//! fused optimizer update.
//!
//! candle's tape makes a fresh tensor for every intermediate and every gradient, and adds each
//! gradient into a freshly zeroed tensor of its own size; on an MLP that bookkeeping cost as
//! much as the matrix products. Here the forward pass writes into buffers kept from step to
//! step, the backward pass is the textbook chain rule over the same buffers (matrix products
//! through `gemm` with strides instead of transposed copies, fused bias + activation, pooling
//! and loss kernels), and the gradients go straight to the fused optimizer update. The weights
//! stay in the model's `Var`s, so evaluation, snapshots and the optimizer see one model.
//!
//! Non-CPU devices keep the autograd path. The tests hold this step to candle's gradients on
//! every layer kind.

use std::sync::atomic::AtomicBool;

use candle_core::{CpuStorage, Storage, Tensor};

use super::{Backend, Evaluation, EVAL_CHUNK};
use crate::engine::batch::DeviceData;
use crate::engine::data::Task;
use crate::engine::events::{check_canceled, EngineError};
use crate::engine::kernels::math::{exp, max_value, sum};
use crate::engine::model::Model;
use crate::engine::optim::Optimizer;
use crate::engine::profile;
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;

mod buffers;

simd_kernel! {
    /// Mean cross-entropy over rows of logits; leaves d(loss)/d(logits) in `grad`.
    pub(super) fn cross_entropy(
        logits: &[f32],
        labels: &[u32],
        classes: usize,
        grad: &mut [f32],
    ) -> f64 {
        let rows = labels.len();
        let scale = 1.0 / rows as f32;
        let mut total = 0.0f64;
        for ((row, grad_row), &label) in logits
            .chunks_exact(classes)
            .zip(grad.chunks_exact_mut(classes))
            .zip(labels)
        {
            let max = max_value(row);
            for (g, &value) in grad_row.iter_mut().zip(row) {
                *g = exp(value - max);
            }
            let sum = sum(grad_row);
            let label = label as usize;
            total += f64::from(sum.ln() - (row[label] - max));
            let inverse = scale / sum;
            for g in grad_row.iter_mut() {
                *g *= inverse;
            }
            grad_row[label] -= scale;
        }
        total / rows as f64
    }
}

simd_kernel! {
    /// Cross-entropy summed over rows of logits, and how many rows have their largest logit
    /// (the first, on ties) at the label.
    pub(super) fn classification_loss_and_hits(
        logits: &[f32],
        labels: &[u32],
        classes: usize,
    ) -> (f64, usize) {
        let (mut total, mut hits) = (0.0f64, 0usize);
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            let max = max_value(row);
            let sum: f32 = row.iter().map(|v| exp(v - max)).sum();
            let label = label as usize;
            total += f64::from(sum.ln() - (row[label] - max));
            let predicted =
                (0..classes).fold(0, |best, i| if row[i] > row[best] { i } else { best });
            hits += usize::from(predicted == label);
        }
        (total, hits)
    }
}

/// Next-token cross-entropy summed over sequences of `time` tokens (each sequence's loss the
/// mean over its tokens), and how many tokens are predicted right.
pub(super) fn sequence_loss_and_hits(
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    time: usize,
) -> (f64, usize) {
    let (loss, hits) = classification_loss_and_hits(logits, targets, vocab);
    (loss / time as f64, hits)
}

/// Each row's mean squared error over its `width` outputs, summed over the rows.
pub(super) fn squared_error_sum(outputs: &[f32], targets: &[f32], width: usize) -> f64 {
    let squared: f64 = outputs
        .iter()
        .zip(targets)
        .map(|(o, t)| f64::from((o - t) * (o - t)))
        .sum();
    squared / width as f64
}

simd_kernel! {
    /// Mean squared error over every output; leaves d(loss)/d(output) in `grad`.
    pub(super) fn mean_squared_error(output: &[f32], targets: &[f32], grad: &mut [f32]) -> f64 {
        let scale = 2.0 / output.len() as f32;
        let mut total = 0.0f64;
        for ((g, &o), &t) in grad.iter_mut().zip(output).zip(targets) {
            let error = o - t;
            total += f64::from(error * error);
            *g = scale * error;
        }
        total / output.len() as f64
    }
}

/// Read access to the f32 values of a contiguous CPU tensor for the length of a step.
pub(super) struct HostValues<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> HostValues<'a> {
    pub(super) fn of(tensor: &'a Tensor) -> candle_core::Result<Self> {
        let (guard, layout) = tensor.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("native step: tensor is not contiguous");
        };
        Ok(Self {
            guard,
            start,
            len: end - start,
        })
    }

    pub(super) fn f32(&self) -> candle_core::Result<&[f32]> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(values)) => Ok(&values[self.start..self.start + self.len]),
            _ => candle_core::bail!("native step: expected f32 values on the CPU"),
        }
    }

    pub(super) fn u32(&self) -> candle_core::Result<&[u32]> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::U32(values)) => Ok(&values[self.start..self.start + self.len]),
            _ => candle_core::bail!("native step: expected u32 values on the CPU"),
        }
    }
}

/// What the native step keeps between steps, sized for one batch size.
pub struct Workspace {
    buffers: Box<buffers::Buffers>,
    /// One gradient per model variable, in `Model::vars` order.
    pub grads: Vec<Vec<f32>>,
}

impl Workspace {
    /// Bytes held by the buffers (not the gradients).
    #[cfg(test)]
    fn allocated_buffer_bytes(&self) -> usize {
        self.buffers.allocated_bytes()
    }
}

/// The hand-written CPU step (see the module docs), with its workspace: the buffers of the
/// model it trains, kept from step to step.
#[derive(Default)]
pub struct Native {
    workspace: Option<Workspace>,
}

impl Native {
    pub fn new() -> Native {
        Native::default()
    }

    /// Bytes held by the workspace's buffers (not the gradients); 0 before the first step.
    #[cfg(test)]
    pub(crate) fn allocated_buffer_bytes(&self) -> usize {
        self.workspace
            .as_ref()
            .map_or(0, Workspace::allocated_buffer_bytes)
    }
}

impl Backend for Native {
    fn name(&self) -> &'static str {
        "native"
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
        let workspace = &mut self.workspace;
        // On a pool thread, so that the caller's thread sleeps instead of competing with
        // the pool's threads for the cores between the step's parallel sections.
        on_pool(|| {
            let loss = forward_backward(model, workspace, data, rows, dropout_rng)?;
            if loss.is_finite() {
                let grads = &workspace.as_ref().expect("set by forward_backward").grads;
                let _span = profile::span(|| format!("optimizer {}", optimizer.spec().name()));
                optimizer.step_host(grads, lr, momentum)?;
            }
            Ok(loss)
        })
    }

    fn forward_train(
        &mut self,
        model: &Model,
        data: &DeviceData,
        rows: &[usize],
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<()> {
        let workspace = &mut self.workspace;
        on_pool(|| forward_train(model, workspace, data, rows, dropout_rng))
    }

    fn evaluate(
        &mut self,
        model: &Model,
        data: &DeviceData,
        cancel: &AtomicBool,
    ) -> Result<Evaluation, EngineError> {
        let workspace = &mut self.workspace;
        on_pool(|| {
            let (loss, accuracy) = evaluate(model, workspace, data, EVAL_CHUNK, cancel)?;
            Ok(Evaluation { loss, accuracy })
        })
    }
}

/// Runs `f` on a thread of rayon's global pool (the caller blocks without spinning), with
/// the caller's profile recorder, if it has one.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut result = None;
    let mut recorder = profile::detach();
    rayon::scope(|_| {
        profile::attach(recorder.take());
        result = Some(f());
        recorder = profile::detach();
    });
    profile::attach(recorder);
    result.expect("the scope ran the closure")
}

/// The workspace for batches of `rows` rows, (re)built when the model has none or
/// one of another shape.
fn workspace_for<'w>(
    model: &Model,
    workspace: &'w mut Option<Workspace>,
    rows: usize,
) -> candle_core::Result<&'w mut Workspace> {
    if workspace.as_ref().is_none_or(|w| w.buffers.rows() != rows) {
        // Drop the old buffers first, so two sets never coexist (admission counts one).
        *workspace = None;
        let buffers = Box::new(buffers::Buffers::new(model, rows)?);
        *workspace = Some(Workspace {
            buffers,
            grads: model
                .vars()
                .iter()
                .map(|var| vec![0.0; var.elem_count()])
                .collect(),
        });
    }
    Ok(workspace.as_mut().expect("set above"))
}

/// Read guards on every parameter's values, in `Model::vars` order.
fn parameter_guards(model: &Model) -> candle_core::Result<Vec<HostValues<'_>>> {
    model
        .vars()
        .iter()
        .map(|var| HostValues::of(var.as_tensor()))
        .collect()
}

/// Mean loss and accuracy (`None` for regression) on a whole split through the same forward
/// pass as training. It runs in batches of the training step's size, the last one padded
/// with its final row, so no second set of buffers is built; `default_rows` sizes the
/// batches when the model has not trained yet. `cancel` is checked before every batch.
pub fn evaluate(
    model: &Model,
    workspace: &mut Option<Workspace>,
    data: &DeviceData,
    default_rows: usize,
    cancel: &AtomicBool,
) -> Result<(f64, Option<f64>), EngineError> {
    if data.rows == 0 {
        return Ok((0.0, None));
    }
    let batch = workspace
        .as_ref()
        .map_or(default_rows.min(data.rows), |w| w.buffers.rows())
        .max(1);
    let workspace = workspace_for(model, workspace, batch)?;
    let guards = parameter_guards(model)?;
    let params = guards
        .iter()
        .map(HostValues::f32)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (mut loss_sum, mut hits) = (0.0f64, 0usize);
    let mut rows = Vec::with_capacity(batch);
    for start in (0..data.rows).step_by(batch) {
        check_canceled(cancel)?;
        let len = batch.min(data.rows - start);
        rows.clear();
        rows.extend(start..start + len);
        rows.resize(batch, start + len - 1);
        let (loss, correct) =
            buffers::evaluate_batch(&mut workspace.buffers, &params, data, &rows, len)?;
        loss_sum += loss;
        hits += correct;
    }
    let items_per_row = match data.task {
        Task::LanguageModel => data.x.dim(1)?,
        _ => 1,
    };
    let accuracy =
        (data.task != Task::Regression).then(|| hits as f64 / (data.rows * items_per_row) as f64);
    Ok((loss_sum / data.rows as f64, accuracy))
}

/// The forward pass alone in training mode on the batch `rows`: batch norm's running
/// statistics update; no gradient is taken.
pub fn forward_train(
    model: &Model,
    workspace: &mut Option<Workspace>,
    data: &DeviceData,
    rows: &[usize],
    dropout_rng: &mut Rng,
) -> candle_core::Result<()> {
    let workspace = workspace_for(model, workspace, rows.len())?;
    let guards = parameter_guards(model)?;
    let params = guards
        .iter()
        .map(HostValues::f32)
        .collect::<candle_core::Result<Vec<_>>>()?;
    buffers::forward_train(&mut workspace.buffers, &params, data, rows, dropout_rng)
}

/// Forward and backward pass on the batch `rows`: returns the batch's mean loss and leaves
/// the gradient of every variable in `workspace.grads`. On a non-finite loss it returns
/// before the backward pass (the caller does not step on it).
pub fn forward_backward(
    model: &Model,
    workspace: &mut Option<Workspace>,
    data: &DeviceData,
    rows: &[usize],
    dropout_rng: &mut Rng,
) -> candle_core::Result<f64> {
    let workspace = workspace_for(model, workspace, rows.len())?;
    let guards = parameter_guards(model)?;
    let params = guards
        .iter()
        .map(HostValues::f32)
        .collect::<candle_core::Result<Vec<_>>>()?;
    buffers::forward_backward(
        &mut workspace.buffers,
        &params,
        &mut workspace.grads,
        data,
        rows,
        dropout_rng,
    )
}

#[cfg(test)]
mod tests;
