//! What a running job says and hears: the events it reports (curve points, sweep runs, race
//! points, progress), the cancel flag it checks, and the errors that end it. A leaf the
//! training loops import; it knows no loop, model or backend.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::data::DataError;
use super::spec::SpecError;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: usize,
    pub lr: f64,
    pub loss: f64,
    pub smoothed: f64,
}

/// One training run at one candidate peak with one seed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SweepRun {
    pub peak_lr: f64,
    pub seed: u64,
    /// The run's length (its OneCycle's total steps): the horizon it was judged at.
    pub steps: usize,
    pub val_loss: f64,
    pub val_accuracy: Option<f64>,
    /// Mean training loss over the last tenth of the run.
    pub train_loss: f64,
    pub diverged: bool,
    /// The training loss gave back more than half of what it had gained, mid-run (see
    /// `sweep::SpikeWatch`): a sign the peak is at the edge of stability even if the run
    /// recovered.
    #[serde(default)]
    pub spiked: bool,
}

/// One validation of a full run. `seconds` is the training time since the run's start
/// (validation time left out, so that it is the same cost for every recipe).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RacePoint {
    pub step: usize,
    pub seconds: f64,
    /// `None` once the run has diverged.
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// The learning rate in force for the steps after this point.
    pub lr: f64,
    /// Prodigy's estimate `d` at this point (its step size is `d * lr`); `None` for every
    /// other optimizer. Kept in the race's result; the live points (`race_point` rows and
    /// events) do not carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<f64>,
}

/// A race point as it is measured, for the job's live curve: which recipe and seed it
/// belongs to, and the point.
#[derive(Debug, Clone, PartialEq)]
pub struct RaceEvent {
    pub recipe: String,
    pub seed: u64,
    pub point: RacePoint,
}

/// What a running job reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new phase: `"range_test"` or `"sweep"`.
    Stage(&'static str),
    Point(CurvePoint),
    SweepRun(SweepRun),
    /// A validation point of one of a race's full runs (`compare` jobs).
    RacePoint(RaceEvent),
    /// Steps done out of the steps planned for the whole job.
    Progress {
        done: usize,
        total: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spec does not fit the data (batch too large, model for the wrong input, ...).
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("data: {0}")]
    Data(#[from] DataError),
    #[error("canceled")]
    Canceled,
    #[error("compute error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The job's link to its caller: progress out, cancellation in.
pub struct Control<'a> {
    cancel: &'a AtomicBool,
    observer: &'a mut dyn FnMut(Event),
    done: usize,
    total: usize,
}

impl<'a> Control<'a> {
    pub fn new(cancel: &'a AtomicBool, observer: &'a mut dyn FnMut(Event)) -> Self {
        Self {
            cancel,
            observer,
            done: 0,
            total: 0,
        }
    }

    pub(crate) fn check_cancel(&self) -> Result<(), EngineError> {
        check_canceled(self.cancel)
    }

    /// The flag itself, for the loops inside a step or an evaluation (run on other threads).
    pub(crate) fn cancel_flag(&self) -> &'a AtomicBool {
        self.cancel
    }

    pub(crate) fn emit(&mut self, event: Event) {
        (self.observer)(event);
    }

    pub(crate) fn plan(&mut self, total: usize) {
        self.total = total;
        self.emit_progress();
    }

    pub(crate) fn step_done(&mut self) {
        self.done += 1;
        self.emit_progress();
    }

    /// Planned steps that will not run (a diverged run stops early).
    pub(crate) fn skip_steps(&mut self, steps: usize) {
        self.total = self.total.saturating_sub(steps);
        self.emit_progress();
    }

    fn emit_progress(&mut self) {
        let (done, total) = (self.done, self.total.max(self.done));
        self.emit(Event::Progress { done, total });
    }

    /// Counts steps taken under another control (a race's tunes) as this one's.
    pub(crate) fn add_done(&mut self, steps: usize) {
        self.done += steps;
        self.emit_progress();
    }

    /// Optimizer steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.done
    }
}

/// [`EngineError::Canceled`] once `cancel` is raised: what a long loop checks between its
/// chunks, so that a cancel (or a shutdown) is heard within one chunk, not one job.
pub(crate) fn check_canceled(cancel: &AtomicBool) -> Result<(), EngineError> {
    if cancel.load(Ordering::Relaxed) {
        Err(EngineError::Canceled)
    } else {
        Ok(())
    }
}
