//! A model bound to the backend that trains it: what the range test, the sweep, the tune and
//! the race step and evaluate. The model holds the weights and the plan; the backend (a peer
//! of `backend`) owns what it keeps between steps.

use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::backend::candle::Candle;
use super::backend::native::Native;
use super::backend::{Backend, DeviceData, Evaluation};
use super::events::{check_canceled, EngineError};
use super::model::Model;
use super::optim::Optimizer;
use super::rng::Rng;
use super::spec::BackendChoice;

/// Batches of the job's batch size that batch norm's running statistics are recomputed over
/// at a schedule-free optimizer's x before each evaluation: the training split's rows in
/// their stored order from the first, wrapping round when the split is shorter (the
/// schedulefree README's 50 batches; with momentum 0.1 the reset statistics then hold
/// 1 - 0.9^50, over 99.4 %, of x's). The same batches at every evaluation, so that points
/// compare.
pub const STATISTICS_BATCHES: usize = 50;
const STATISTICS_SEED: u64 = 0x5f_b4;

pub struct Trainer {
    model: Model,
    /// One training loop per model, so never contended; a lock so that the loops can share
    /// the trainer as they share the model.
    backend: Mutex<Box<dyn Backend>>,
}

impl Trainer {
    /// The model on the backend `choice` asks for: the native step on the CPU unless candle
    /// is asked for, candle's autograd on any other device.
    pub fn new(model: Model, choice: BackendChoice) -> Trainer {
        let backend: Box<dyn Backend> =
            if model.device().is_cpu() && choice != BackendChoice::Candle {
                Box::new(Native::new())
            } else {
                Box::new(Candle)
            };
        Trainer::with_backend(model, backend)
    }

    pub fn with_backend(model: Model, backend: Box<dyn Backend>) -> Trainer {
        Trainer {
            model,
            backend: Mutex::new(backend),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// `"native"` or `"candle"`, as results report it.
    pub fn backend_name(&self) -> &'static str {
        self.backend().name()
    }

    /// [`Backend::train_step`] on the trainer's model.
    pub fn train_step(
        &self,
        optimizer: &mut Optimizer,
        data: &DeviceData,
        rows: &[usize],
        lr: f64,
        momentum: f64,
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<f64> {
        self.backend().train_step(
            &self.model,
            optimizer,
            data,
            rows,
            lr,
            momentum,
            dropout_rng,
        )
    }

    /// [`Backend::evaluate`] on the trainer's model.
    pub fn evaluate(
        &self,
        data: &DeviceData,
        cancel: &AtomicBool,
    ) -> Result<Evaluation, EngineError> {
        self.backend().evaluate(&self.model, data, cancel)
    }

    /// The evaluation a training loop reports, where `optimizer` says the model is
    /// evaluated: for the other optimizers exactly [`Trainer::evaluate`]; for a
    /// schedule-free one that has stepped, at x (`optimizer.eval()` ... `optimizer.train()`),
    /// with batch norm's running statistics first recomputed there as the schedulefree
    /// README prescribes (see [`STATISTICS_BATCHES`]) and put back afterwards, so that
    /// training carries on from y with its own statistics.
    pub fn evaluate_with(
        &self,
        optimizer: &mut Optimizer,
        data: &DeviceData,
        train: &DeviceData,
        batch_size: usize,
        cancel: &AtomicBool,
    ) -> Result<Evaluation, EngineError> {
        if !optimizer.evaluates_elsewhere() {
            return self.evaluate(data, cancel);
        }
        optimizer.eval()?;
        let evaluation = self.evaluate_at_x(data, train, batch_size, cancel);
        // Back to y whatever the evaluation's outcome (a canceled job's weights included).
        optimizer.train()?;
        evaluation
    }

    fn evaluate_at_x(
        &self,
        data: &DeviceData,
        train: &DeviceData,
        batch_size: usize,
        cancel: &AtomicBool,
    ) -> Result<Evaluation, EngineError> {
        let buffers = self.model.buffers();
        if buffers.is_empty() || train.rows == 0 {
            return self.evaluate(data, cancel);
        }
        let saved = buffers
            .iter()
            .map(|var| var.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let evaluation = self
            .recompute_statistics(train, batch_size, cancel)
            .and_then(|()| self.evaluate(data, cancel));
        for (var, saved) in buffers.iter().zip(&saved) {
            var.set(saved)?;
        }
        evaluation
    }

    /// Batch norm's running statistics reset (mean 0, variance 1) and recomputed by
    /// [`STATISTICS_BATCHES`] forward passes in training mode, with no step.
    fn recompute_statistics(
        &self,
        train: &DeviceData,
        batch_size: usize,
        cancel: &AtomicBool,
    ) -> Result<(), EngineError> {
        for (name, var) in self.model.buffer_names().zip(self.model.buffers()) {
            let reset = if name.ends_with("running_var") {
                var.as_tensor().ones_like()?
            } else {
                var.as_tensor().zeros_like()?
            };
            var.set(&reset)?;
        }
        let batch = batch_size.clamp(1, train.rows);
        // Dropout, where the model has it, draws the same masks at every evaluation.
        let mut dropout_rng = Rng::new(STATISTICS_SEED);
        let mut rows = Vec::with_capacity(batch);
        let mut next = 0;
        for _ in 0..STATISTICS_BATCHES {
            check_canceled(cancel)?;
            rows.clear();
            for _ in 0..batch {
                rows.push(next);
                next = (next + 1) % train.rows;
            }
            self.backend()
                .forward_train(&self.model, train, &rows, &mut dropout_rng)?;
        }
        Ok(())
    }

    fn backend(&self) -> MutexGuard<'_, Box<dyn Backend>> {
        self.backend.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
