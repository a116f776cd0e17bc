//! Uploaded datasets: the validated description and the raw bytes (parsed again, with the
//! job's spec, when a job runs on them).

use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::{now, Store, StoreError};

/// What a dataset holds, as validated at upload.
#[derive(Debug, Clone)]
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

macro_rules! columns {
    () => {
        "id, name, format, target, rows, features, sample_shape, classes, vocabulary, task, \
         sha256, bytes, created_at"
    };
}

impl DatasetRow {
    fn from_row(row: &SqliteRow) -> Result<DatasetRow, StoreError> {
        let shape: String = row.try_get("sample_shape")?;
        Ok(DatasetRow {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            format: row.try_get("format")?,
            target: row.try_get("target")?,
            rows: row.try_get("rows")?,
            features: row.try_get("features")?,
            sample_shape: serde_json::from_str(&shape)
                .map_err(|e| StoreError::Corrupt(format!("dataset sample_shape: {e}")))?,
            classes: row.try_get("classes")?,
            vocabulary: row.try_get("vocabulary")?,
            task: row.try_get("task")?,
            sha256: row.try_get("sha256")?,
            bytes: row.try_get("bytes")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

impl Store {
    pub async fn insert_dataset(&self, dataset: NewDataset) -> Result<DatasetRow, StoreError> {
        let row = dataset.row;
        let shape = serde_json::to_string(&row.sample_shape)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sql = concat!(
            "INSERT INTO dataset (id, name, format, target, rows, features, sample_shape,
                 classes, vocabulary, task, sha256, bytes, x, y, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ",
            now!(),
            ") RETURNING ",
            columns!()
        );
        let stored = sqlx::query(sql)
            .bind(&row.id)
            .bind(&row.name)
            .bind(&row.format)
            .bind(&row.target)
            .bind(row.rows)
            .bind(row.features)
            .bind(shape)
            .bind(row.classes)
            .bind(row.vocabulary)
            .bind(&row.task)
            .bind(&row.sha256)
            .bind(row.bytes)
            .bind(dataset.x)
            .bind(dataset.y)
            .fetch_one(&self.pool)
            .await?;
        DatasetRow::from_row(&stored)
    }

    pub async fn get_dataset(&self, id: &str) -> Result<Option<DatasetRow>, StoreError> {
        let sql = concat!("SELECT ", columns!(), " FROM dataset WHERE id = ?");
        let row = sqlx::query(sql).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(DatasetRow::from_row).transpose()
    }

    pub async fn load_dataset(&self, id: &str) -> Result<Option<StoredDataset>, StoreError> {
        let sql = concat!("SELECT ", columns!(), ", x, y FROM dataset WHERE id = ?");
        let row = sqlx::query(sql).bind(id).fetch_optional(&self.pool).await?;
        row.map(|row| {
            Ok(StoredDataset {
                row: DatasetRow::from_row(&row)?,
                x: row.try_get("x")?,
                y: row.try_get("y")?,
            })
        })
        .transpose()
    }

    /// Newest first.
    pub async fn list_datasets(
        &self,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<(i64, DatasetRow)>, StoreError> {
        let sql = concat!(
            "SELECT seq, ",
            columns!(),
            " FROM dataset WHERE (?1 IS NULL OR seq < ?1) ORDER BY seq DESC LIMIT ?2"
        );
        let rows = sqlx::query(sql)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("seq")?, DatasetRow::from_row(row)?)))
            .collect()
    }
}
