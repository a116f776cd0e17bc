//! What a running job says and hears: the events it reports (curve points, sweep runs, race
//! points, trials as they start and end, progress), the cancel flag it checks, and the errors
//! that end it. A leaf the training loops import; it knows no loop, model or backend.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

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

/// What kind of training a trial is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialKind {
    /// The range test's ramp.
    RangeTest,
    /// One OneCycle run of the sweep at a candidate peak (a screening, final, extension,
    /// seed or probe run).
    Sweep,
    /// One full run of a race's recipe.
    Race,
}

impl TrialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TrialKind::RangeTest => "range_test",
            TrialKind::Sweep => "sweep",
            TrialKind::Race => "race",
        }
    }

    pub fn parse(text: &str) -> Option<TrialKind> {
        [TrialKind::RangeTest, TrialKind::Sweep, TrialKind::Race]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// What describes a trial: its kind, the learning rate it runs at (a sweep run's peak, a race
/// run's recipe rate), the recipe it belongs to (a compare job's), its seed and its length.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialInfo {
    pub kind: TrialKind,
    pub lr: Option<f64>,
    pub recipe: Option<String>,
    pub seed: u64,
    pub steps: usize,
}

/// How a finished trial went: the steps it took, its wall time (validation included), its
/// final validation, and the step its loss stopped being finite at, if it did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrialOutcome {
    pub steps_run: usize,
    pub seconds: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub diverged_at: Option<usize>,
}

/// Where a trial is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrialState {
    Running,
    Succeeded(TrialOutcome),
    /// It ended with an error (the job's), after `seconds`.
    Failed {
        seconds: f64,
    },
    Canceled {
        seconds: f64,
    },
}

/// A trial that started or ended. `index` is its place in the job, in the order trials
/// started (from 0); side by side, trials of one batch may start in any order.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialEvent {
    pub index: usize,
    pub info: TrialInfo,
    pub state: TrialState,
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
    /// A trial started or ended.
    Trial(TrialEvent),
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
    /// The job's trials started so far, shared with the controls of its nested work (a
    /// batch's slots, a race's tunes), so that every trial of the job has its own index.
    trials: Arc<AtomicUsize>,
}

impl<'a> Control<'a> {
    pub fn new(cancel: &'a AtomicBool, observer: &'a mut dyn FnMut(Event)) -> Self {
        Self::with_trials(cancel, observer, Arc::default())
    }

    /// The job's trial counter, for the controls of work nested in this one's job.
    pub(crate) fn trial_counter(&self) -> Arc<AtomicUsize> {
        self.trials.clone()
    }

    /// [`Control::new`] sharing a job's trial counter (a batch's slots, a race's tunes).
    pub(crate) fn with_trials(
        cancel: &'a AtomicBool,
        observer: &'a mut dyn FnMut(Event),
        trials: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            cancel,
            observer,
            done: 0,
            total: 0,
            trials,
        }
    }

    /// Runs one trial described by `info`, reporting it as it starts and as it ends (with
    /// what `outcome` reads from its result, or how it failed).
    pub(crate) fn trial<R>(
        &mut self,
        info: TrialInfo,
        run: impl FnOnce(&mut Control<'a>) -> Result<R, EngineError>,
        outcome: impl FnOnce(&R, f64) -> TrialOutcome,
    ) -> Result<R, EngineError> {
        let index = self.trials.fetch_add(1, Ordering::Relaxed);
        self.emit(Event::Trial(TrialEvent {
            index,
            info: info.clone(),
            state: TrialState::Running,
        }));
        let began = Instant::now();
        let result = run(self);
        let seconds = began.elapsed().as_secs_f64();
        let state = match &result {
            Ok(value) => TrialState::Succeeded(outcome(value, seconds)),
            Err(EngineError::Canceled) => TrialState::Canceled { seconds },
            Err(_) => TrialState::Failed { seconds },
        };
        self.emit(Event::Trial(TrialEvent { index, info, state }));
        result
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
