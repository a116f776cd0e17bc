//! Uploaded datasets: the validated description and the raw bytes (parsed again, with the
//! job's spec, when a job runs on them). The bytes live in the database, so that a worker on
//! any host can read them.

use serde::{Deserialize, Serialize};

use super::{parse_column, StoreError};
use crate::engine::data::Task;

// How a dataset's bytes are laid out: `csv` and `text` are one part (`x`), `idx` and `npy`
// two (`x` and `y`). It is the upload's `format` query parameter too, named `UploadFormat`
// (and without a description) in the OpenAPI document, as before the store held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = UploadFormat)]
pub enum DataFormat {
    Csv,
    Text,
    Idx,
    Npy,
}

impl DataFormat {
    pub const ALL: [DataFormat; 4] = [
        DataFormat::Csv,
        DataFormat::Text,
        DataFormat::Idx,
        DataFormat::Npy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Csv => "csv",
            DataFormat::Text => "text",
            DataFormat::Idx => "idx",
            DataFormat::Npy => "npy",
        }
    }

    pub fn parse(text: &str) -> Option<DataFormat> {
        DataFormat::ALL
            .into_iter()
            .find(|format| format.as_str() == text)
    }
}

/// What a dataset holds, as validated at upload.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRow {
    pub id: String,
    pub name: Option<String>,
    pub format: DataFormat,
    pub target: Option<String>,
    pub rows: i64,
    pub features: i64,
    pub sample_shape: Vec<i64>,
    pub classes: Option<i64>,
    /// Distinct characters of a text corpus.
    pub vocabulary: Option<i64>,
    pub task: Task,
    pub sha256: String,
    pub bytes: i64,
    pub created_at: String,
}

/// A dataset with its bytes, for a worker.
pub struct StoredDataset {
    pub row: DatasetRow,
    pub x: Vec<u8>,
    pub y: Option<Vec<u8>>,
}

pub struct NewDataset {
    pub row: DatasetRow,
    pub x: Vec<u8>,
    pub y: Option<Vec<u8>>,
}

/// A dataset row as both backends return it (the shape is JSON text, the time ISO 8601).
#[derive(sqlx::FromRow)]
pub(crate) struct DatasetRecord {
    id: String,
    name: Option<String>,
    format: String,
    target: Option<String>,
    rows: i64,
    features: i64,
    sample_shape: String,
    classes: Option<i64>,
    vocabulary: Option<i64>,
    task: String,
    sha256: String,
    bytes: i64,
    created_at: String,
}

impl TryFrom<DatasetRecord> for DatasetRow {
    type Error = StoreError;

    fn try_from(record: DatasetRecord) -> Result<DatasetRow, StoreError> {
        Ok(DatasetRow {
            sample_shape: serde_json::from_str(&record.sample_shape)
                .map_err(|e| StoreError::Corrupt(format!("dataset sample_shape: {e}")))?,
            format: parse_column("dataset.format", &record.format, DataFormat::parse)?,
            task: parse_column("dataset.task", &record.task, Task::parse)?,
            id: record.id,
            name: record.name,
            target: record.target,
            rows: record.rows,
            features: record.features,
            classes: record.classes,
            vocabulary: record.vocabulary,
            sha256: record.sha256,
            bytes: record.bytes,
            created_at: record.created_at,
        })
    }
}

/// A dataset with its bytes, as both backends return it.
#[derive(sqlx::FromRow)]
pub(crate) struct StoredRecord {
    #[sqlx(flatten)]
    record: DatasetRecord,
    x: Vec<u8>,
    y: Option<Vec<u8>>,
}

impl TryFrom<StoredRecord> for StoredDataset {
    type Error = StoreError;

    fn try_from(stored: StoredRecord) -> Result<StoredDataset, StoreError> {
        Ok(StoredDataset {
            row: stored.record.try_into()?,
            x: stored.x,
            y: stored.y,
        })
    }
}

/// The shape of a sample as stored (JSON text on every backend).
pub(crate) fn shape_json(shape: &[i64]) -> Result<String, StoreError> {
    serde_json::to_string(shape).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(format: &str, task: &str) -> DatasetRecord {
        DatasetRecord {
            id: "ds_1".into(),
            name: None,
            format: format.into(),
            target: None,
            rows: 4,
            features: 1,
            sample_shape: "[1]".into(),
            classes: None,
            vocabulary: None,
            task: task.into(),
            sha256: String::new(),
            bytes: 4,
            created_at: String::new(),
        }
    }

    #[test]
    fn a_stored_format_or_task_outside_its_enum_is_a_corrupt_row_naming_the_column() {
        for format in DataFormat::ALL {
            let row = DatasetRow::try_from(record(format.as_str(), "regression")).unwrap();
            assert_eq!((row.format, row.task), (format, Task::Regression));
        }
        let corrupt = |record| match DatasetRow::try_from(record) {
            Err(StoreError::Corrupt(message)) => message,
            other => panic!("expected a corrupt row, got {other:?}"),
        };
        assert_eq!(
            corrupt(record("parquet", "regression")),
            r#"dataset.format "parquet" is not a known value"#
        );
        assert_eq!(
            corrupt(record("csv", "ranking")),
            r#"dataset.task "ranking" is not a known value"#
        );
    }
}
