//! Uploaded datasets: the validated description and the raw bytes (parsed again, with the
//! job's spec, when a job runs on them). The bytes live in the database, so that a worker on
//! any host can read them.

use super::StoreError;

/// What a dataset holds, as validated at upload.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRow {
    pub id: String,
    pub name: Option<String>,
    pub format: String,
    pub target: Option<String>,
    pub rows: i64,
    pub features: i64,
    pub sample_shape: Vec<i64>,
    pub classes: Option<i64>,
    /// Distinct characters of a text corpus.
    pub vocabulary: Option<i64>,
    pub task: String,
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
            id: record.id,
            name: record.name,
            format: record.format,
            target: record.target,
            rows: record.rows,
            features: record.features,
            classes: record.classes,
            vocabulary: record.vocabulary,
            task: record.task,
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

/// A dataset row with its place in the list, for paging.
#[derive(sqlx::FromRow)]
pub(crate) struct ListedRecord {
    pub(crate) seq: i64,
    #[sqlx(flatten)]
    pub(crate) record: DatasetRecord,
}
