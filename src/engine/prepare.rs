//! From a spec's `data` to the training and validation splits the job runs on: loading the
//! built-in sets and local files, reading uploaded bytes, resolving the task, splitting,
//! normalising, and checking that the batch size fits.

use std::path::Path;
use std::sync::Arc;

use super::data::{self, DataError, Dataset, DatasetInfo, Standardizer, Task};
use super::events::EngineError;
use super::spec::{Builtin, JobSpec, Normalize, SpecError};

/// Rows generated for a generator builtin when `samples` is not given.
pub const DEFAULT_SAMPLES: usize = 4096;

/// A job's data before splitting.
#[derive(Debug, Clone)]
pub struct LoadedData {
    pub train: Dataset,
    pub validation: Option<Dataset>,
    /// The safetensors bytes of uploaded initial weights (`init.weights.id`), fetched by the
    /// service before the job starts; the engine reads no store. `None` for a local file
    /// (`init.weights.path`, read when the model is built) and for random weights. Shared,
    /// since a race hands the same data to each of its tunes.
    pub initial_weights: Option<Arc<[u8]>>,
}

/// The file formats a dataset can come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Text,
}

/// Loads what a spec names without a server: a builtin, or local files for `lrtune run`.
/// Uploaded datasets (`dataset_id`) are the service's to load.
pub fn load_local_data(spec: &JobSpec) -> Result<LoadedData, EngineError> {
    let data = &spec.data;
    if let Some(builtin) = data.builtin {
        let samples = data.samples.unwrap_or(DEFAULT_SAMPLES);
        let train = match builtin {
            Builtin::Mnist10k => data::mnist10k(),
            Builtin::Spirals => data::spirals(samples, spec.seed),
            Builtin::Blobs => data::blobs(samples, spec.seed),
            Builtin::Sine => data::sine(samples, spec.seed),
        };
        return Ok(LoadedData {
            train,
            validation: None,
            initial_weights: None,
        });
    }
    if let Some(path) = &data.path {
        let train_bytes = read_file(path, "data.path")?;
        let format = format_of(path, "data.path")?;
        let validation_bytes = match &data.validation_path {
            Some(validation_path) => {
                if format_of(validation_path, "data.validation_path")? != format {
                    return Err(SpecError::new(
                        "data.validation_path",
                        format!("{validation_path} must have the same format as {path}"),
                    )
                    .into());
                }
                Some(read_file(validation_path, "data.validation_path")?)
            }
            None => None,
        };
        return read_pair(
            format,
            &train_bytes,
            validation_bytes.as_deref(),
            data.target.as_deref(),
            spec,
        )
        .map_err(|error| match error {
            EngineError::Data(data) => SpecError::new("data.path", data.to_string()).into(),
            other => other,
        });
    }
    Err(SpecError::new(
        "data.dataset_id",
        "uploaded datasets live on a server: use `lrtune submit`, or give data.path for a local file",
    )
    .into())
}

fn format_of(path: &str, field: &str) -> Result<Format, EngineError> {
    match Path::new(path).extension().and_then(|ext| ext.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("csv") => Ok(Format::Csv),
        Some(ext) if ext.eq_ignore_ascii_case("txt") || ext.eq_ignore_ascii_case("text") => {
            Ok(Format::Text)
        }
        _ => Err(SpecError::new(
            field,
            format!("{path}: give a .csv (tabular) or .txt (character language model) file"),
        )
        .into()),
    }
}

fn read_file(path: &str, field: &str) -> Result<Vec<u8>, EngineError> {
    std::fs::read(path)
        .map_err(|error| SpecError::new(field, format!("cannot read {path}: {error}")).into())
}

/// Reads a training set and an optional separate validation set of the same format.
/// Classification labels are remapped to 0..k per file, so a CSV pair is also read as one
/// table (validation rows appended) to give both the same class indices.
pub fn read_pair(
    format: Format,
    train_bytes: &[u8],
    validation_bytes: Option<&[u8]>,
    target: Option<&str>,
    spec: &JobSpec,
) -> Result<LoadedData, EngineError> {
    let train = read_bytes(format, train_bytes, target, spec)?;
    let Some(validation_bytes) = validation_bytes else {
        return Ok(LoadedData {
            train,
            validation: None,
            initial_weights: None,
        });
    };
    if format == Format::Text {
        return Err(SpecError::new(
            "data.validation_path",
            "a text corpus is split into training and validation windows by validation_fraction; give one file",
        )
        .into());
    }
    // Parsed on its own first so that its errors name rows of the validation file.
    let validation = read_bytes(format, validation_bytes, target, spec)?;
    if train.task() != data::Task::Classification {
        return Ok(LoadedData {
            train,
            validation: Some(validation),
            initial_weights: None,
        });
    }
    let header = |bytes: &[u8]| -> Vec<u8> {
        let text = bytes
            .strip_prefix(b"\xef\xbb\xbf".as_slice())
            .unwrap_or(bytes);
        let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
        line.iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect()
    };
    if header(train_bytes) != header(validation_bytes) {
        return Err(DataError::Invalid {
            part: "validation".to_string(),
            message: "the validation CSV's header differs from the training CSV's".to_string(),
        }
        .into());
    }
    let mut combined = train_bytes.to_vec();
    if !combined.ends_with(b"\n") {
        combined.push(b'\n');
    }
    let validation_text = validation_bytes
        .strip_prefix(b"\xef\xbb\xbf".as_slice())
        .unwrap_or(validation_bytes);
    let body_start = validation_text
        .iter()
        .position(|b| *b == b'\n')
        .map_or(validation_text.len(), |newline| newline + 1);
    combined.extend_from_slice(&validation_text[body_start..]);
    let all = read_bytes(format, &combined, target, spec)?;
    let train_rows: Vec<usize> = (0..train.rows()).collect();
    let validation_rows: Vec<usize> = (train.rows()..all.rows()).collect();
    Ok(LoadedData {
        train: all.select(&train_rows),
        validation: Some(all.select(&validation_rows)),
        initial_weights: None,
    })
}

/// Parses a dataset's bytes the way the spec asks (target column, task, context).
pub fn read_bytes(
    format: Format,
    bytes: &[u8],
    target: Option<&str>,
    spec: &JobSpec,
) -> Result<Dataset, EngineError> {
    Ok(match format {
        Format::Csv => data::read_csv(bytes, target, spec.task.fixed())?,
        Format::Text => data::read_text(bytes, text_context(spec)?)?,
    })
}

/// The characters of context a spec reads text with: a transformer's, or a layer list's
/// `model.context`.
pub fn text_context(spec: &JobSpec) -> Result<usize, SpecError> {
    spec.model.context().ok_or_else(|| match spec.model {
        super::spec::ModelSpec::Sequential { .. } => SpecError::new(
            "model.context",
            "text data trains a character language model: give the layer list a context (the characters it reads), e.g. 64",
        ),
        _ => SpecError::new(
            "model.arch",
            "text data trains a character language model: use arch \"transformer\", or a layer list starting with an embedding and a model.context",
        ),
    })
}

/// The splits a job trains and validates on, normalised, with what they hold.
pub struct Prepared {
    pub train: Dataset,
    pub validation: Dataset,
    pub info: DatasetInfo,
}

pub fn prepare(spec: &JobSpec, loaded: LoadedData) -> Result<Prepared, EngineError> {
    check_task(spec, loaded.train.task())?;
    let (mut train, mut validation) = match loaded.validation {
        Some(validation) => {
            check_compatible(&loaded.train, &validation)?;
            (loaded.train, validation)
        }
        None => data::train_validation_split(&loaded.train, spec.validation_fraction, spec.seed)?,
    };
    check_batch_size(spec, train.rows())?;
    if spec.normalize == Normalize::Standard {
        if let Some(standardizer) = Standardizer::fit(&train) {
            standardizer.apply(&mut train);
            standardizer.apply(&mut validation);
        }
    }
    let info = train.info();
    Ok(Prepared {
        train,
        validation,
        info,
    })
}

/// The spec's `task`, when not `auto`, must be the data's.
pub fn check_task(spec: &JobSpec, task: Task) -> Result<(), SpecError> {
    match spec.task.fixed() {
        Some(wanted) if wanted != task => Err(SpecError::new(
            "task",
            format!(
                "the data is a {} task, not {}: use \"auto\"",
                task.as_str(),
                wanted.as_str()
            ),
        )),
        _ => Ok(()),
    }
}

/// Every step trains on a full batch, so a batch cannot be larger than the training split.
pub fn check_batch_size(spec: &JobSpec, train_rows: usize) -> Result<(), SpecError> {
    if spec.batch_size > train_rows {
        return Err(SpecError::new(
            "batch_size",
            format!(
                "{} is more than the {train_rows} training rows: use at most {train_rows}",
                spec.batch_size
            ),
        ));
    }
    Ok(())
}

fn check_compatible(train: &Dataset, validation: &Dataset) -> Result<(), EngineError> {
    if train.task() != validation.task()
        || train.sample_shape() != validation.sample_shape()
        || train.output_dim() < validation.output_dim()
    {
        return Err(DataError::Invalid {
            part: "validation".to_string(),
            message: format!(
                "the validation set ({:?}, shape {:?}, {} outputs) does not match the training set ({:?}, shape {:?}, {} outputs)",
                validation.task(),
                validation.sample_shape(),
                validation.output_dim(),
                train.task(),
                train.sample_shape(),
                train.output_dim()
            ),
        }
        .into());
    }
    Ok(())
}
