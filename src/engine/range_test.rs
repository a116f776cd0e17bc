//! Leslie Smith's learning-rate range test: one step per point while the
//! learning rate grows, fastai's smoothing, a stop on divergence, and the model and optimizer
//! put back exactly as they were afterwards.

use super::backend::DeviceData;
pub use super::events::CurvePoint;
use super::events::{Control, EngineError, Event};
use super::optim::Optimizer;
use super::spec::{RangeLoss, RangeTestSpec};
use super::suggest::Smoother;
use super::trainer::Trainer;
use super::trial::{TrialData, TrialLoop};

#[derive(Debug, Clone, PartialEq)]
pub struct RangeTestCurve {
    pub points: Vec<CurvePoint>,
    pub stopped_early: bool,
    /// Why it stopped before the last step, in words.
    pub stop_reason: Option<String>,
}

pub struct RangeTestInputs<'a> {
    pub trainer: &'a Trainer,
    pub optimizer: &'a mut Optimizer,
    pub train: &'a DeviceData,
    pub validation: &'a DeviceData,
    pub batch_size: usize,
    pub seed: u64,
}

pub fn run_range_test(
    inputs: RangeTestInputs<'_>,
    spec: &RangeTestSpec,
    control: &mut Control<'_>,
) -> Result<RangeTestCurve, EngineError> {
    let RangeTestInputs {
        trainer,
        optimizer,
        train,
        validation,
        batch_size,
        seed,
    } = inputs;
    let saved_weights = trainer.model().snapshot()?;
    let saved_optimizer = optimizer.state().clone();
    let outcome = range_test_steps(
        trainer, optimizer, train, validation, batch_size, seed, spec, control,
    );
    // Put everything back whatever happened, so nothing leaks into the sweep.
    trainer.model().restore(&saved_weights)?;
    optimizer.restore(&saved_optimizer);
    outcome
}

#[allow(clippy::too_many_arguments)]
fn range_test_steps(
    trainer: &Trainer,
    optimizer: &mut Optimizer,
    train: &DeviceData,
    validation: &DeviceData,
    batch_size: usize,
    seed: u64,
    spec: &RangeTestSpec,
    control: &mut Control<'_>,
) -> Result<RangeTestCurve, EngineError> {
    let momentum = optimizer.default_momentum();
    let data = TrialData {
        train,
        validation,
        batch_size,
    };
    let mut trial = TrialLoop::new(trainer, data, optimizer, seed);
    let mut smoother = Smoother::new(spec.smoothing);
    let mut best_smoothed = f64::INFINITY;
    let mut points = Vec::with_capacity(spec.steps);
    let mut stop_reason = None;
    for step in 0..spec.steps {
        let lr = spec.lr_at(step);
        let batch_loss = trial.step(lr, momentum, control)?;
        let loss = match spec.loss {
            RangeLoss::Train => batch_loss,
            RangeLoss::Validation if batch_loss.is_finite() => trial.evaluate(control)?.loss,
            RangeLoss::Validation => batch_loss,
        };
        let smoothed = smoother.push(loss);
        let point = CurvePoint {
            step,
            lr,
            loss,
            smoothed,
        };
        points.push(point);
        control.emit(Event::Point(point));
        if !loss.is_finite() || !smoothed.is_finite() {
            stop_reason = Some(format!("loss became non-finite at lr {lr:.3e}"));
            break;
        }
        if smoothed > spec.diverge_factor * best_smoothed {
            stop_reason = Some(format!(
                "smoothed loss {smoothed:.4} passed {} x the best {best_smoothed:.4} at lr {lr:.3e}",
                spec.diverge_factor
            ));
            break;
        }
        best_smoothed = best_smoothed.min(smoothed);
    }
    Ok(RangeTestCurve {
        stopped_early: stop_reason.is_some(),
        stop_reason,
        points,
    })
}
