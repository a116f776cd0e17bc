//! Uploaded initial weights: a safetensors file's description (its tensors' names and shapes,
//! as validated at upload) and its bytes, kept in the database so that a worker on any host
//! can start a job from them.

use serde::{Deserialize, Serialize};

use super::StoreError;

/// A stored weights file, as validated at upload.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsRow {
    pub id: String,
    pub name: Option<String>,
    pub bytes: i64,
    pub sha256: String,
    /// How many tensors the file holds (the length of `shapes`).
    pub tensors: i64,
    /// Every tensor's name and shape, sorted by name.
    pub shapes: Vec<TensorShape>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorShape {
    pub name: String,
    pub shape: Vec<i64>,
}

/// A weights file with its bytes, for a worker.
pub struct StoredWeights {
    pub row: WeightsRow,
    pub data: Vec<u8>,
}

pub struct NewWeights {
    pub row: WeightsRow,
    pub data: Vec<u8>,
}

/// A weights row as both backends return it (the shapes are JSON text, the time ISO 8601).
#[derive(sqlx::FromRow)]
pub(crate) struct WeightsRecord {
    id: String,
    name: Option<String>,
    bytes: i64,
    sha256: String,
    tensors: i64,
    shapes: String,
    created_at: String,
}

impl TryFrom<WeightsRecord> for WeightsRow {
    type Error = StoreError;

    fn try_from(record: WeightsRecord) -> Result<WeightsRow, StoreError> {
        Ok(WeightsRow {
            shapes: serde_json::from_str(&record.shapes)
                .map_err(|e| StoreError::Corrupt(format!("weights shapes: {e}")))?,
            id: record.id,
            name: record.name,
            bytes: record.bytes,
            sha256: record.sha256,
            tensors: record.tensors,
            created_at: record.created_at,
        })
    }
}

/// A weights row with its bytes, as both backends return it.
#[derive(sqlx::FromRow)]
pub(crate) struct StoredWeightsRecord {
    #[sqlx(flatten)]
    record: WeightsRecord,
    data: Vec<u8>,
}

impl TryFrom<StoredWeightsRecord> for StoredWeights {
    type Error = StoreError;

    fn try_from(stored: StoredWeightsRecord) -> Result<StoredWeights, StoreError> {
        Ok(StoredWeights {
            row: stored.record.try_into()?,
            data: stored.data,
        })
    }
}

/// The tensors' shapes as stored (JSON text on every backend).
pub(crate) fn shapes_json(shapes: &[TensorShape]) -> Result<String, StoreError> {
    serde_json::to_string(shapes).map_err(|e| StoreError::Corrupt(e.to_string()))
}
