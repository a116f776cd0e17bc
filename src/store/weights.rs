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
    /// Unsigned, as safetensors stores dimensions (a dimension past `i64::MAX` is valid in a
    /// tensor with a zero elsewhere in its shape).
    #[serde(deserialize_with = "unsigned_dims")]
    pub shape: Vec<u64>,
}

/// Dimensions as stored: unsigned, or as rows written before they were, with each `u64`
/// stored as the `i64` of the same bits (so `-1` is `u64::MAX`, which it was).
fn unsigned_dims<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Unsigned(u64),
        Signed(i64),
    }
    let dims = Vec::<Stored>::deserialize(deserializer)?;
    Ok(dims
        .into_iter()
        .map(|dim| match dim {
            Stored::Unsigned(dim) => dim,
            Stored::Signed(dim) => dim as u64,
        })
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows written before shapes were unsigned stored `dim as i64`: `u64::MAX` as `-1`.
    #[test]
    fn shapes_read_back_unsigned_from_old_rows_and_new_ones() {
        let old: Vec<TensorShape> =
            serde_json::from_str(r#"[{"name": "w", "shape": [0, -1, 3]}]"#).unwrap();
        assert_eq!(old[0].shape, [0, u64::MAX, 3]);
        let text = shapes_json(&old).unwrap();
        assert_eq!(text, r#"[{"name":"w","shape":[0,18446744073709551615,3]}]"#);
        let new: Vec<TensorShape> = serde_json::from_str(&text).unwrap();
        assert_eq!(new, old);
    }
}
