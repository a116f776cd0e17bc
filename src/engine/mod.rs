//! Pure compute: a job spec and its data in, a range-test curve, sweep results and a
//! recommendation out. No async, no database; progress goes out through a callback and a
//! cancel flag is checked every step and between the chunks of every evaluation. `lrtune run`
//! and the service's workers both call `run_job`.
//!
//! From the floor up, each module imports only modules below it (the crate's
//! `import_cycles` test keeps it so):
//! - `spec`: what a job asks for, its defaults and its checks; with the leaves `limits`,
//!   `json`, `quote`, `rng` and `simd`;
//! - `data` and `prepare` (datasets), `events` (what a job reports, and the errors that end it);
//! - `kernels` (the native CPU primitives), `layers` (one module per layer family), `model`
//!   (a checked plan and its weights);
//! - `backend` (`native` and `candle`, peers), `optim` and `update`, `trainer` (a model bound
//!   to its backend);
//! - `admission` (what a job costs, before anything runs), and the loops: `range_test`,
//!   `sweep`, `tune` and `compare`.

pub mod admission;
pub mod backend;
pub mod batch;
pub mod compare;
pub mod data;
pub mod events;
pub mod json;
pub mod kernels;
pub mod layers;
pub mod limits;
pub mod model;
pub mod optim;
pub mod prepare;
pub mod profile;
pub mod quote;
pub mod range_test;
pub mod rng;
pub mod schedule;
pub mod simd;
pub mod spec;
pub mod suggest;
pub mod sweep;
pub mod trainer;
pub mod trial;
pub mod tune;
pub mod update;

pub use events::{
    Control, CurvePoint, EngineError, Event, SweepRun, TrialEvent, TrialInfo, TrialKind,
    TrialOutcome, TrialState,
};
pub use limits::Limits;
pub use prepare::{load_local_data, LoadedData};
pub use spec::{JobSpec, SpecError, ValidSpec};
pub use trial::Trials;
pub use tune::{run_job, run_job_with, JobOutput, JobResult, Recommendation};
