//! A job's data: the builtins through the engine, uploaded datasets parsed from their stored
//! bytes with the engine's readers and the job's spec.

use std::sync::Arc;

use crate::engine::admission::DataShape;
use crate::engine::data::{self, Dataset, Task};
use crate::engine::prepare::{read_bytes, text_context, Format};
use crate::engine::{self, EngineError, JobSpec, LoadedData, SpecError};
use crate::store::{DataFormat, DatasetRow, StoredDataset};

/// The stored datasets a job names, fetched before the blocking part starts.
pub struct JobDatasets {
    pub train: StoredDataset,
    pub validation: Option<StoredDataset>,
}

/// The job's data, with the stored bytes of its uploaded initial weights (`init.weights.id`)
/// for the engine, which reads no store.
pub fn load(
    spec: &JobSpec,
    datasets: Option<JobDatasets>,
    initial_weights: Option<Vec<u8>>,
) -> Result<LoadedData, EngineError> {
    let initial_weights = initial_weights.map(Arc::from);
    let Some(datasets) = datasets else {
        return Ok(LoadedData {
            initial_weights,
            ..engine::load_local_data(spec)?
        });
    };
    let train = parse(&datasets.train, spec, "data.dataset_id")?;
    let validation = datasets
        .validation
        .as_ref()
        .map(|stored| parse(stored, spec, "data.validation_dataset_id"))
        .transpose()?;
    Ok(LoadedData {
        train,
        validation,
        initial_weights,
    })
}

/// The shape of a job's data before it is loaded: a builtin's, or that of the stored
/// datasets it names (their rows, sample shape and outputs as validated at upload).
pub fn planned_shape(
    spec: &JobSpec,
    train: Option<&DatasetRow>,
    validation: Option<&DatasetRow>,
) -> Result<Option<DataShape>, SpecError> {
    if let Some(shape) = DataShape::of_builtin(spec) {
        return shape.map(Some);
    }
    let Some(train) = train else {
        return Ok(None);
    };
    let (rows, sample_shape, output, task) = stored_rows(spec, train, "data.dataset_id")?;
    let validation_rows = validation
        .map(|row| stored_rows(spec, row, "data.validation_dataset_id").map(|(rows, ..)| rows))
        .transpose()?;
    let (train_rows, validation_rows) = DataShape::split(
        rows,
        validation_rows,
        spec.validation_fraction,
        "data.dataset_id",
    )?;
    let raw_bytes = [Some(train), validation]
        .into_iter()
        .flatten()
        .map(|row| row.bytes.max(0) as u64)
        .sum();
    Ok(Some(DataShape {
        train_rows,
        validation_rows,
        sample_shape,
        output,
        task,
        raw_bytes,
    }))
}

/// Rows, sample shape, outputs and task of a stored dataset as this spec reads it (a text
/// corpus becomes windows of the model's context).
fn stored_rows(
    spec: &JobSpec,
    row: &DatasetRow,
    field: &str,
) -> Result<(usize, Vec<usize>, usize, Task), SpecError> {
    let task = row.task;
    let size = |value: i64| usize::try_from(value).unwrap_or(0);
    if task == Task::LanguageModel {
        let context = text_context(spec)?;
        let windows = data::text_windows(size(row.rows), context)
            .map_err(|error| SpecError::new(field, format!("dataset {}: {error}", row.id)))?;
        let vocabulary = size(row.vocabulary.unwrap_or(0));
        return Ok((windows, vec![context], vocabulary, task));
    }
    let sample_shape = row.sample_shape.iter().map(|&dim| size(dim)).collect();
    let output = match task {
        Task::Classification => size(row.classes.unwrap_or(0)),
        // Regression outputs are not stored; the engine checks the exact count when loaded.
        _ => 1,
    };
    Ok((size(row.rows), sample_shape, output, task))
}

fn parse(stored: &StoredDataset, spec: &JobSpec, field: &str) -> Result<Dataset, EngineError> {
    let row = &stored.row;
    let task = Some(row.task);
    let missing_y = || SpecError::new(field, format!("dataset {} has no y part", row.id));
    let parsed = match row.format {
        DataFormat::Csv => {
            data::read_csv(&stored.x, row.target.as_deref(), task).map_err(EngineError::from)
        }
        DataFormat::Text => read_bytes(Format::Text, &stored.x, None, spec),
        DataFormat::Idx => {
            let labels = stored.y.as_deref().ok_or_else(missing_y)?;
            data::read_idx(&stored.x, labels).map_err(EngineError::from)
        }
        DataFormat::Npy => {
            let y = stored.y.as_deref().ok_or_else(missing_y)?;
            data::read_npy(&stored.x, y, task).map_err(EngineError::from)
        }
    };
    parsed.map_err(|error| match error {
        EngineError::Data(data) => {
            SpecError::new(field, format!("dataset {}: {data}", row.id)).into()
        }
        other => other,
    })
}
