//! The job specs the tests share.

use serde_json::{json, Value};

/// A tune that runs in well under a second: a 30-step range test and two one-epoch sweep runs.
pub fn tiny_spec() -> Value {
    json!({
        "data": {"builtin": "spirals", "samples": 512},
        "model": {"arch": "mlp", "hidden": [16]},
        "batch_size": 32,
        "plan": {"epochs": 2},
        "range_test": {"steps": 30},
        "sweep": {"count": 2, "epochs": 1}
    })
}

/// The tiny spec with a name.
pub fn named(name: &str) -> Value {
    let mut spec = tiny_spec();
    spec["name"] = json!(name);
    spec
}

/// A job of a few tenths of a second.
pub fn small_job(name: &str) -> Value {
    json!({
        "name": name,
        "data": {"builtin": "spirals", "samples": 256},
        "model": {"arch": "mlp", "hidden": [8]},
        "batch_size": 32,
        "plan": {"epochs": 1},
        "range_test": {"steps": 20},
        "sweep": {"count": 2, "epochs": 1}
    })
}

/// A job of several seconds, to be killed or canceled in the middle of.
pub fn long_job(name: &str) -> Value {
    json!({
        "name": name,
        "data": {"builtin": "spirals", "samples": 2048},
        "model": {"arch": "mlp", "hidden": [64, 64]},
        "batch_size": 32,
        "plan": {"epochs": 1},
        "range_test": {"steps": 3000, "end_lr": 0.1},
        "sweep": {"count": 2, "epochs": 1}
    })
}
