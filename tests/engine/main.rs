//! End-to-end tests of the engine and `lrtune run`: whole jobs on real data, determinism,
//! no state leaking from the range test into the sweep, and bad specs refused with the field
//! named and exit code 2.

mod cli;
mod compare;
mod jobs;
mod sequential;
#[path = "../support/mod.rs"]
mod support;

use std::sync::atomic::AtomicBool;

use lrtune::engine::{self, Event, JobOutput, Limits, Trials, ValidSpec};

/// Parses, validates, loads and runs a spec, collecting its events.
pub fn run(spec_json: &str) -> (JobOutput, Vec<Event>) {
    run_with(spec_json, Trials::serial())
}

/// [`run`] with the sweep's trials run as `trials` says.
pub fn run_with(spec_json: &str, trials: Trials) -> (JobOutput, Vec<Event>) {
    let spec = ValidSpec::parse(spec_json, &Limits::default()).expect("a valid spec");
    let loaded = engine::load_local_data(&spec).expect("data loads");
    let cancel = AtomicBool::new(false);
    let mut events = Vec::new();
    let mut observer = |event: Event| events.push(event);
    let output = engine::run_job_with(
        &spec,
        loaded,
        &Limits::default(),
        trials,
        &cancel,
        &mut observer,
    )
    .expect("job runs");
    (output, events)
}

/// A small, fast tune on spirals.
pub const SPIRALS_TUNE: &str = r#"{
    "data": {"builtin": "spirals", "samples": 1024},
    "model": {"arch": "mlp", "hidden": [32, 32]},
    "batch_size": 32,
    "plan": {"epochs": 4},
    "range_test": {"start_lr": 1e-5, "end_lr": 10, "steps": 60},
    "sweep": {"count": 3, "epochs": 1}
}"#;
