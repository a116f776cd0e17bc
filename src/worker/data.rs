//! A job's data: the builtins through the engine, uploaded datasets parsed from their stored
//! bytes with the engine's readers and the job's spec.

use crate::engine::data::{self, Dataset, Task};
use crate::engine::prepare::{read_bytes, Format};
use crate::engine::{self, EngineError, JobSpec, LoadedData, SpecError};
use crate::store::StoredDataset;

/// The stored datasets a job names, fetched before the blocking part starts.
pub struct JobDatasets {
    pub train: StoredDataset,
    pub validation: Option<StoredDataset>,
}

pub fn load(spec: &JobSpec, datasets: Option<JobDatasets>) -> Result<LoadedData, EngineError> {
    let Some(datasets) = datasets else {
        return engine::load_local_data(spec);
    };
    let train = parse(&datasets.train, spec, "data.dataset_id")?;
    let validation = datasets
        .validation
        .as_ref()
        .map(|stored| parse(stored, spec, "data.validation_dataset_id"))
        .transpose()?;
    Ok(LoadedData { train, validation })
}

pub fn parse_task(name: &str) -> Option<Task> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

fn parse(stored: &StoredDataset, spec: &JobSpec, field: &str) -> Result<Dataset, EngineError> {
    let row = &stored.row;
    let task = parse_task(&row.task);
    let missing_y = || SpecError::new(field, format!("dataset {} has no y part", row.id));
    let parsed = match row.format.as_str() {
        "csv" => data::read_csv(&stored.x, row.target.as_deref(), task).map_err(EngineError::from),
        "text" => read_bytes(Format::Text, &stored.x, None, spec),
        "idx" => {
            let labels = stored.y.as_deref().ok_or_else(missing_y)?;
            data::read_idx(&stored.x, labels).map_err(EngineError::from)
        }
        "npy" => {
            let y = stored.y.as_deref().ok_or_else(missing_y)?;
            data::read_npy(&stored.x, y, task).map_err(EngineError::from)
        }
        other => {
            return Err(SpecError::new(field, format!("unknown dataset format {other:?}")).into())
        }
    };
    parsed.map_err(|error| match error {
        EngineError::Data(data) => {
            SpecError::new(field, format!("dataset {}: {data}", row.id)).into()
        }
        other => other,
    })
}
