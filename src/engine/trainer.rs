//! A model bound to the backend that trains it: what the range test, the sweep, the tune and
//! the race step and evaluate. The model holds the weights and the plan; the backend (a peer
//! of `backend`) owns what it keeps between steps.

use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::backend::candle::Candle;
use super::backend::native::Native;
use super::backend::{Backend, DeviceData, Evaluation};
use super::events::EngineError;
use super::model::Model;
use super::optim::Optimizer;
use super::rng::Rng;
use super::spec::BackendChoice;

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

    fn backend(&self) -> MutexGuard<'_, Box<dyn Backend>> {
        self.backend.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
