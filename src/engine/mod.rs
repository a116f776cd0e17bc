//! Pure compute: a job spec and its data in, a range-test curve, sweep results and a
//! recommendation out. No async, no database; progress goes out through a callback and a
//! cancel flag is checked every step and between the chunks of every evaluation. `lrtune run`
//! and the service's workers both call `run_job`.

pub mod admission;
pub mod backend;
pub mod batch;
pub mod compare;
pub mod data;
pub mod json;
pub mod model;

pub mod optim;
pub mod prepare;
pub mod quote;
pub mod range_test;
pub mod rng;
pub mod schedule;

pub mod simd;
pub mod spec;
pub mod suggest;
pub mod sweep;

pub mod tune;
pub mod update;

use std::sync::atomic::AtomicBool;

pub use prepare::{load_local_data, LoadedData};
pub use range_test::CurvePoint;
pub use spec::{JobSpec, Limits, SpecError, ValidSpec};
pub use sweep::SweepRun;
pub use tune::{run_job, JobOutput, JobResult, Recommendation};

/// What a running job reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new phase: `"range_test"` or `"sweep"`.
    Stage(&'static str),
    Point(CurvePoint),
    SweepRun(SweepRun),
    /// A validation point of one of a race's full runs (`compare` jobs).
    RacePoint(compare::RaceEvent),
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
    Data(#[from] data::DataError),
    #[error("canceled")]
    Canceled,
    #[error("compute error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<model::ModelError> for EngineError {
    fn from(error: model::ModelError) -> Self {
        match error {
            model::ModelError::Spec(spec) => EngineError::Spec(spec),
            model::ModelError::Candle(candle) => EngineError::Candle(candle),
        }
    }
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

    fn check_cancel(&self) -> Result<(), EngineError> {
        backend::check_canceled(self.cancel)
    }

    /// The flag itself, for the loops inside a step or an evaluation (run on other threads).
    fn cancel_flag(&self) -> &'a AtomicBool {
        self.cancel
    }

    fn emit(&mut self, event: Event) {
        (self.observer)(event);
    }

    fn plan(&mut self, total: usize) {
        self.total = total;
        self.emit_progress();
    }

    fn step_done(&mut self) {
        self.done += 1;
        self.emit_progress();
    }

    /// Planned steps that will not run (a diverged run stops early).
    fn skip_steps(&mut self, steps: usize) {
        self.total = self.total.saturating_sub(steps);
        self.emit_progress();
    }

    fn emit_progress(&mut self) {
        let (done, total) = (self.done, self.total.max(self.done));
        self.emit(Event::Progress { done, total });
    }

    /// Counts steps taken under another control (a race's tunes) as this one's.
    fn add_done(&mut self, steps: usize) {
        self.done += steps;
        self.emit_progress();
    }

    /// Optimizer steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.done
    }
}
