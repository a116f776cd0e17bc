//! What runs a job's compute: the engine in production, through [`JobRunner`]; tests put in
//! runners that panic, hang or count to prove the worker survives them.

use std::sync::atomic::AtomicBool;

use crate::engine::compare::{run_compare, CompareResult};
use crate::engine::spec::JobKind;
use crate::engine::{self, EngineError, Event, JobOutput, Limits, LoadedData, ValidSpec};

/// What a job's compute gives: a range test, sweep or tune's output, or a race's result.
#[derive(Debug, Clone)]
pub enum RunOutput {
    Tune(Box<JobOutput>),
    Race(Box<CompareResult>),
}

impl From<JobOutput> for RunOutput {
    fn from(output: JobOutput) -> RunOutput {
        RunOutput::Tune(Box::new(output))
    }
}

impl From<CompareResult> for RunOutput {
    fn from(result: CompareResult) -> RunOutput {
        RunOutput::Race(Box::new(result))
    }
}

/// Runs one job's compute. The engine in production; tests swap in runners that panic or
/// block to prove the worker survives them.
pub trait JobRunner: Send + Sync + 'static {
    fn run(
        &self,
        spec: &ValidSpec,
        loaded: LoadedData,
        limits: &Limits,
        cancel: &AtomicBool,
        observer: &mut dyn FnMut(Event),
    ) -> Result<RunOutput, EngineError>;
}

pub struct EngineRunner;

impl JobRunner for EngineRunner {
    fn run(
        &self,
        spec: &ValidSpec,
        loaded: LoadedData,
        limits: &Limits,
        cancel: &AtomicBool,
        observer: &mut dyn FnMut(Event),
    ) -> Result<RunOutput, EngineError> {
        if spec.kind == JobKind::Compare {
            run_compare(spec, loaded, limits, cancel, observer).map(RunOutput::from)
        } else {
            engine::run_job(spec, loaded, limits, cancel, observer).map(RunOutput::from)
        }
    }
}
