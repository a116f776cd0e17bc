//! The data layer: datasets held in memory as flat vectors, readers for CSV, IDX, NPY and
//! plain text, seeded generators, and the split / normalisation / shuffling that every range
//! test needs. Pure Rust: it parses byte slices it is given and never touches files or candle.

mod csv;
mod generate;
mod idx;
mod npy;
mod text;

pub use self::csv::{read_csv, CsvFile};
pub use self::generate::{
    blobs, friedman1, sine, spirals, BLOB_CLUSTERS, BLOB_FEATURES, FRIEDMAN_FEATURES, SPIRAL_ARMS,
    SPIRAL_FEATURES,
};
pub use self::idx::{mnist10k, read_idx};
pub use self::npy::read_npy;
pub use self::text::{read_text, read_text_with_vocab, text_vocabulary, text_windows};

use crate::engine::rng::Rng;
pub use crate::engine::spec::Task;

/// Stream names for `Rng::derive`, so a split and an epoch shuffle drawn from the same seed
/// never reuse each other's random numbers.
const SPLIT_STREAM: u64 = 0x5350_4c49_5400_0001;
const EPOCH_STREAM: u64 = 0x4550_4f43_4800_0002;

/// Auto-detection calls an integer target with more distinct values than this a regression
/// target: past it, "classes" are far more likely to be counts or years than categories.
const MAX_AUTO_CLASSES: usize = 50;

#[derive(Debug, Clone, PartialEq)]
pub enum Features {
    /// Row-major values, rows * product(sample_shape). Tabular: sample_shape [features];
    /// images: [channels, height, width].
    Dense {
        values: Vec<f32>,
        sample_shape: Vec<usize>,
    },
    /// Character language model: `context` token ids per row.
    Tokens { ids: Vec<u32>, context: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Class index per row, 0..classes.
    Classes { labels: Vec<u32>, classes: usize },
    /// `dims` regression values per row.
    Values { values: Vec<f32>, dims: usize },
    /// Next-token ids, `context` per row (row r's targets are its inputs shifted by one).
    Tokens { ids: Vec<u32>, vocab: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub features: Features,
    pub targets: Targets,
}

/// A summary of a dataset for reports and the API.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetInfo {
    pub rows: usize,
    pub features: usize,
    pub sample_shape: Vec<usize>,
    /// Set for classification only; a language model's vocabulary is `Dataset::output_dim`.
    pub classes: Option<usize>,
    pub task: Task,
}

/// Errors name what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A cell of a CSV file; `row` is the 1-based line number in the file (the header is
    /// row 1). `column` is empty when the whole row is at fault (a ragged row).
    #[error("row {row}{}: {message}", column_label(.column))]
    Csv {
        row: usize,
        column: String,
        message: String,
    },
    /// Anything else: `part` says which input ("images", "labels", "x", "y", "text", "csv",
    /// "samples", "split", ...).
    #[error("{part}: {message}")]
    Invalid { part: String, message: String },
}

fn column_label(column: &str) -> String {
    if column.is_empty() {
        String::new()
    } else {
        format!(", column {}", crate::engine::quote::quoted(column))
    }
}

impl DataError {
    pub(crate) fn invalid(part: &str, message: impl Into<String>) -> Self {
        DataError::Invalid {
            part: part.to_string(),
            message: message.into(),
        }
    }
}

impl Dataset {
    pub fn rows(&self) -> usize {
        match &self.features {
            Features::Dense { values, .. } => values.len() / self.feature_count().max(1),
            Features::Tokens { ids, context } => ids.len() / (*context).max(1),
        }
    }

    pub fn task(&self) -> Task {
        match self.targets {
            Targets::Classes { .. } => Task::Classification,
            Targets::Values { .. } => Task::Regression,
            Targets::Tokens { .. } => Task::LanguageModel,
        }
    }

    /// The shape of one row's input: `[features]`, `[channels, height, width]` or
    /// `[context]` for tokens.
    pub fn sample_shape(&self) -> Vec<usize> {
        match &self.features {
            Features::Dense { sample_shape, .. } => sample_shape.clone(),
            Features::Tokens { context, .. } => vec![*context],
        }
    }

    pub fn feature_count(&self) -> usize {
        match &self.features {
            Features::Dense { sample_shape, .. } => sample_shape.iter().product(),
            Features::Tokens { context, .. } => *context,
        }
    }

    /// The width of the model's output layer: classes, regression dims, or vocabulary size.
    pub fn output_dim(&self) -> usize {
        match self.targets {
            Targets::Classes { classes, .. } => classes,
            Targets::Values { dims, .. } => dims,
            Targets::Tokens { vocab, .. } => vocab,
        }
    }

    pub fn info(&self) -> DatasetInfo {
        DatasetInfo {
            rows: self.rows(),
            features: self.feature_count(),
            sample_shape: self.sample_shape(),
            classes: match self.targets {
                Targets::Classes { classes, .. } => Some(classes),
                _ => None,
            },
            task: self.task(),
        }
    }

    /// A new dataset holding the given rows in the given order (repeats allowed).
    /// Panics if a row index is out of range: callers pass indices they derived from `rows()`.
    pub fn select(&self, rows: &[usize]) -> Dataset {
        let features = match &self.features {
            Features::Dense {
                values,
                sample_shape,
            } => Features::Dense {
                values: gather(values, self.feature_count(), rows),
                sample_shape: sample_shape.clone(),
            },
            Features::Tokens { ids, context } => Features::Tokens {
                ids: gather(ids, *context, rows),
                context: *context,
            },
        };
        let targets = match &self.targets {
            Targets::Classes { labels, classes } => Targets::Classes {
                labels: gather(labels, 1, rows),
                classes: *classes,
            },
            Targets::Values { values, dims } => Targets::Values {
                values: gather(values, *dims, rows),
                dims: *dims,
            },
            Targets::Tokens { ids, vocab } => Targets::Tokens {
                ids: gather(ids, ids.len() / self.rows().max(1), rows),
                vocab: *vocab,
            },
        };
        Dataset { features, targets }
    }
}

fn gather<T: Copy>(values: &[T], width: usize, rows: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &row in rows {
        out.extend_from_slice(&values[row * width..(row + 1) * width]);
    }
    out
}

/// The (training, validation) row counts `train_validation_split` makes of `rows`, known
/// before the data is loaded (a job's cost is checked at submit from them).
pub fn split_sizes(rows: usize, fraction: f64) -> Result<(usize, usize), DataError> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(DataError::invalid(
            "split",
            format!("the validation fraction must be between 0 and 1 (exclusive), got {fraction}"),
        ));
    }
    if rows < 2 {
        return Err(DataError::invalid(
            "split",
            format!("{rows} rows cannot be split; at least 2 are needed"),
        ));
    }
    let validation_rows = ((fraction * rows as f64).round() as usize).max(1);
    if validation_rows >= rows {
        return Err(DataError::invalid(
            "split",
            format!("a validation fraction of {fraction} of {rows} rows leaves no training rows"),
        ));
    }
    Ok((rows - validation_rows, validation_rows))
}

/// Seeded split; validation gets round(fraction * rows) rows (at least 1), train the rest;
/// error if either side would be empty. Both sides keep the rows in their original order.
pub fn train_validation_split(
    data: &Dataset,
    fraction: f64,
    seed: u64,
) -> Result<(Dataset, Dataset), DataError> {
    let rows = data.rows();
    let (_, validation_rows) = split_sizes(rows, fraction)?;
    let order = Rng::derive(seed, SPLIT_STREAM).permutation(rows);
    let (validation, train) = order.split_at(validation_rows);
    let mut train = train.to_vec();
    let mut validation = validation.to_vec();
    train.sort_unstable();
    validation.sort_unstable();
    Ok((data.select(&train), data.select(&validation)))
}

/// The order of rows for one epoch: a seeded permutation, different per epoch, identical for
/// the same (rows, seed, epoch).
pub fn epoch_order(rows: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let epoch_seed = Rng::derive(seed, EPOCH_STREAM).next_u64();
    Rng::derive(epoch_seed, epoch).permutation(rows)
}

/// Standard normalisation fitted on training data only. Tabular (sample_shape rank 1): per
/// feature. Images (rank 3): per channel over all pixels (per-pixel would blow up rare MNIST
/// border pixels). Other ranks: per position in the sample. A zero standard deviation is
/// treated as 1. Tokens (and data without rows): None.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    pub fn fit(train: &Dataset) -> Option<Standardizer> {
        let Features::Dense {
            values,
            sample_shape,
        } = &train.features
        else {
            return None;
        };
        let feature_count: usize = sample_shape.iter().product();
        let statistics = if sample_shape.len() == 3 {
            sample_shape[0]
        } else {
            feature_count
        };
        if feature_count == 0 || statistics == 0 || values.is_empty() {
            return None;
        }
        let block = feature_count / statistics;
        // Two passes in f64: one-pass sums of squares lose the variance of large-valued
        // features to cancellation.
        let mut sums = vec![0.0f64; statistics];
        for row in values.chunks_exact(feature_count) {
            for (position, &value) in row.iter().enumerate() {
                sums[position / block] += f64::from(value);
            }
        }
        let samples_per_statistic = (values.len() / statistics) as f64;
        let means: Vec<f64> = sums.iter().map(|s| s / samples_per_statistic).collect();
        let mut squares = vec![0.0f64; statistics];
        for row in values.chunks_exact(feature_count) {
            for (position, &value) in row.iter().enumerate() {
                let index = position / block;
                squares[index] += (f64::from(value) - means[index]).powi(2);
            }
        }
        let std = squares
            .iter()
            .zip(&means)
            .map(|(square, mean)| {
                let std = (square / samples_per_statistic).sqrt();
                // A constant feature leaves only rounding noise here; dividing by it would
                // turn that noise into values of size one.
                if std <= mean.abs() * 1e-9 || std == 0.0 || !std.is_finite() {
                    1.0
                } else {
                    std as f32
                }
            })
            .collect();
        Some(Standardizer {
            mean: means.iter().map(|&m| m as f32).collect(),
            std,
        })
    }

    /// Standardises `data` in place with the statistics fitted on the training rows.
    /// Token datasets are left alone. Panics if `data` has a different sample shape than the
    /// training data: that is a caller bug, not bad input.
    pub fn apply(&self, data: &mut Dataset) {
        let feature_count = data.feature_count();
        let Features::Dense { values, .. } = &mut data.features else {
            return;
        };
        let statistics = self.mean.len();
        assert!(
            statistics > 0 && feature_count.is_multiple_of(statistics),
            "standardizer with {statistics} statistics applied to samples of {feature_count} features"
        );
        let block = feature_count / statistics;
        for row in values.chunks_exact_mut(feature_count) {
            for (position, value) in row.iter_mut().enumerate() {
                let index = position / block;
                *value = (*value - self.mean[index]) / self.std[index];
            }
        }
    }
}

/// Turns raw target values into classes or regression values. `not_a_label` builds the error
/// for a row whose value is not an integer when classification was asked for.
pub(crate) fn targets_from_values(
    values: &[f64],
    task: Option<Task>,
    part: &str,
    not_a_label: impl Fn(usize) -> DataError,
) -> Result<Targets, DataError> {
    let task = match task {
        Some(Task::LanguageModel) => return Err(language_model_on_tabular(part)),
        Some(task) => task,
        None => {
            let integers = values.iter().all(|&v| is_label(v));
            if integers && distinct_sorted(values).len() <= MAX_AUTO_CLASSES {
                Task::Classification
            } else {
                Task::Regression
            }
        }
    };
    if task == Task::Regression {
        return Ok(Targets::Values {
            values: values.iter().map(|&v| v as f32).collect(),
            dims: 1,
        });
    }
    if let Some(row) = values.iter().position(|&v| !is_label(v)) {
        return Err(not_a_label(row));
    }
    let distinct = distinct_sorted(values);
    if distinct.len() < 2 {
        return Err(single_class(part));
    }
    let labels = values
        .iter()
        .map(|v| {
            distinct
                .binary_search_by(|probe| probe.total_cmp(v))
                .map(|index| index as u32)
                .unwrap_or_default()
        })
        .collect();
    Ok(Targets::Classes {
        labels,
        classes: distinct.len(),
    })
}

/// What [`targets_from_values`] concludes (the task, the classes, the same errors in the same
/// order), counted one value at a time: a check that keeps no targets.
#[derive(Default)]
pub(crate) struct TargetTally {
    /// The first value that is not a class label, with the line it came from.
    first_non_label: Option<(usize, f64)>,
    /// The distinct labels, while every value so far is one: their bits, with -0 as 0 (equal
    /// values are one class, as `targets_from_values` dedups them).
    distinct: std::collections::HashSet<u64>,
}

impl TargetTally {
    pub(crate) fn add(&mut self, value: f64, line: usize) {
        if self.first_non_label.is_some() {
            return;
        }
        if is_label(value) {
            // -0 + 0 is +0.
            self.distinct.insert((value + 0.0).to_bits());
        } else {
            self.first_non_label = Some((line, value));
        }
    }

    /// The task and (for classification) the number of classes; `not_a_label` makes the error
    /// for a value on a line.
    pub(crate) fn finish(
        self,
        task: Option<Task>,
        part: &str,
        not_a_label: impl Fn(usize, f64) -> DataError,
    ) -> Result<(Task, Option<usize>), DataError> {
        let task = match task {
            Some(Task::LanguageModel) => return Err(language_model_on_tabular(part)),
            Some(task) => task,
            None if self.first_non_label.is_none() && self.distinct.len() <= MAX_AUTO_CLASSES => {
                Task::Classification
            }
            None => Task::Regression,
        };
        if task == Task::Regression {
            return Ok((Task::Regression, None));
        }
        if let Some((line, value)) = self.first_non_label {
            return Err(not_a_label(line, value));
        }
        if self.distinct.len() < 2 {
            return Err(single_class(part));
        }
        Ok((Task::Classification, Some(self.distinct.len())))
    }
}

fn is_label(value: f64) -> bool {
    value.fract() == 0.0 && value.abs() < 1e15
}

fn language_model_on_tabular(part: &str) -> DataError {
    DataError::invalid(
        part,
        "a language model needs a text corpus, not tabular data",
    )
}

fn single_class(part: &str) -> DataError {
    DataError::invalid(
        part,
        "the target has a single class; classification needs at least two",
    )
}

/// A number for an error message: plain when short, scientific when huge or tiny, so that
/// 1e300 does not print as three hundred digits.
pub(crate) fn number_label(value: f64) -> String {
    let magnitude = value.abs();
    if value != 0.0 && value.is_finite() && !(1e-4..1e16).contains(&magnitude) {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

fn distinct_sorted(values: &[f64]) -> Vec<f64> {
    let mut distinct = values.to_vec();
    distinct.sort_unstable_by(f64::total_cmp);
    distinct.dedup();
    distinct
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_round_trip_through_their_json_names() {
        for task in Task::ALL {
            assert_eq!(Task::parse(task.as_str()), Some(task));
            assert_eq!(serde_json::to_value(task).unwrap(), task.as_str());
        }
        assert_eq!(Task::parse("auto"), None);
    }

    fn tabular(rows: usize) -> Dataset {
        Dataset {
            features: Features::Dense {
                values: (0..rows * 2).map(|v| v as f32).collect(),
                sample_shape: vec![2],
            },
            targets: Targets::Classes {
                labels: (0..rows as u32).map(|r| r % 3).collect(),
                classes: 3,
            },
        }
    }

    #[test]
    fn dataset_accessors_describe_the_data() {
        let data = tabular(6);
        assert_eq!(data.rows(), 6);
        assert_eq!(data.task(), Task::Classification);
        assert_eq!(data.sample_shape(), vec![2]);
        assert_eq!(data.feature_count(), 2);
        assert_eq!(data.output_dim(), 3);
        assert_eq!(
            data.info(),
            DatasetInfo {
                rows: 6,
                features: 2,
                sample_shape: vec![2],
                classes: Some(3),
                task: Task::Classification,
            }
        );
        let json = serde_json::to_value(data.info()).expect("serialises");
        assert_eq!(json["task"], "classification");
    }

    #[test]
    fn select_gathers_rows_in_the_given_order() {
        let picked = tabular(4).select(&[3, 0, 3]);
        assert_eq!(
            picked.features,
            Features::Dense {
                values: vec![6.0, 7.0, 0.0, 1.0, 6.0, 7.0],
                sample_shape: vec![2],
            }
        );
        assert_eq!(
            picked.targets,
            Targets::Classes {
                labels: vec![0, 0, 0],
                classes: 3,
            }
        );
    }

    #[test]
    fn select_keeps_token_rows_and_their_shifted_targets_together() {
        let data = Dataset {
            features: Features::Tokens {
                ids: vec![0, 1, 2, 3],
                context: 2,
            },
            targets: Targets::Tokens {
                ids: vec![1, 2, 3, 4],
                vocab: 5,
            },
        };
        let picked = data.select(&[1]);
        assert_eq!(
            picked.features,
            Features::Tokens {
                ids: vec![2, 3],
                context: 2
            }
        );
        assert_eq!(
            picked.targets,
            Targets::Tokens {
                ids: vec![3, 4],
                vocab: 5
            }
        );
    }

    #[test]
    fn a_split_has_the_rounded_sizes_and_disjoint_rows() {
        let data = tabular(100);
        let (train, validation) = train_validation_split(&data, 0.2, 9).expect("splits");
        assert_eq!((train.rows(), validation.rows()), (80, 20));
        // Feature 0 of row r is 2r, so it identifies the row.
        let first_feature = |d: &Dataset| match &d.features {
            Features::Dense { values, .. } => values
                .iter()
                .step_by(2)
                .map(|v| *v as usize / 2)
                .collect::<Vec<_>>(),
            Features::Tokens { .. } => unreachable!(),
        };
        let mut all = first_feature(&train);
        all.extend(first_feature(&validation));
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());

        let again = train_validation_split(&data, 0.2, 9).expect("splits");
        assert_eq!(again.1, validation);
        let other_seed = train_validation_split(&data, 0.2, 10).expect("splits");
        assert_ne!(other_seed.1, validation);
    }

    #[test]
    fn a_split_gives_validation_at_least_one_row_and_rejects_empty_sides() {
        let (train, validation) = train_validation_split(&tabular(10), 0.01, 1).expect("splits");
        assert_eq!((train.rows(), validation.rows()), (9, 1));
        let error = train_validation_split(&tabular(2), 0.9, 1).unwrap_err();
        assert!(
            error.to_string().contains("leaves no training rows"),
            "{error}"
        );
        let error = train_validation_split(&tabular(1), 0.5, 1).unwrap_err();
        assert_eq!(
            error.to_string(),
            "split: 1 rows cannot be split; at least 2 are needed"
        );
        assert!(train_validation_split(&tabular(10), 0.0, 1).is_err());
        assert!(train_validation_split(&tabular(10), 1.0, 1).is_err());
        assert!(train_validation_split(&tabular(10), f64::NAN, 1).is_err());
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation_that_changes_per_epoch() {
        let first = epoch_order(500, 4, 0);
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..500).collect::<Vec<_>>());
        assert_eq!(first, epoch_order(500, 4, 0));
        assert_ne!(first, epoch_order(500, 4, 1));
        assert_ne!(first, epoch_order(500, 5, 0));
        assert!(epoch_order(0, 4, 0).is_empty());
    }

    fn mean_and_std(values: impl Iterator<Item = f32>) -> (f64, f64) {
        let values: Vec<f64> = values.map(f64::from).collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn standardizing_tabular_data_gives_each_training_feature_mean_0_and_std_1() {
        let mut train = Dataset {
            features: Features::Dense {
                // Feature 0 is large and varied, feature 1 constant, feature 2 small.
                values: (0..50)
                    .flat_map(|r| [1000.0 + r as f32 * 3.0, 7.0, (r % 5) as f32 * 0.01])
                    .collect(),
                sample_shape: vec![3],
            },
            targets: Targets::Values {
                values: vec![0.0; 50],
                dims: 1,
            },
        };
        let standardizer = Standardizer::fit(&train).expect("dense data");
        assert_eq!(standardizer.mean.len(), 3);
        assert!((standardizer.mean[0] - 1073.5).abs() < 1e-3);
        assert_eq!(standardizer.std[1], 1.0);
        standardizer.apply(&mut train);
        let Features::Dense { values, .. } = &train.features else {
            unreachable!()
        };
        for feature in [0, 2] {
            let (mean, std) = mean_and_std(values.iter().skip(feature).step_by(3).copied());
            assert!(mean.abs() < 1e-4, "feature {feature}: mean {mean}");
            assert!((std - 1.0).abs() < 1e-4, "feature {feature}: std {std}");
        }
        assert!(values.iter().skip(1).step_by(3).all(|v| *v == 0.0));
    }

    #[test]
    fn standardizing_images_uses_one_mean_and_std_per_channel() {
        // Two channels of 2x2 pixels; channel 1 is ten times channel 0 plus 5.
        let rows = 20;
        let values: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let channel0: Vec<f32> = (0..4).map(|p| (r * 4 + p) as f32 % 7.0).collect();
                let channel1: Vec<f32> = channel0.iter().map(|v| v * 10.0 + 5.0).collect();
                channel0.into_iter().chain(channel1)
            })
            .collect();
        let mut train = Dataset {
            features: Features::Dense {
                values,
                sample_shape: vec![2, 2, 2],
            },
            targets: Targets::Classes {
                labels: vec![0; rows],
                classes: 1,
            },
        };
        let standardizer = Standardizer::fit(&train).expect("dense data");
        assert_eq!(standardizer.mean.len(), 2);
        assert!((standardizer.mean[1] - (standardizer.mean[0] * 10.0 + 5.0)).abs() < 1e-3);
        assert!((standardizer.std[1] - standardizer.std[0] * 10.0).abs() < 1e-3);
        standardizer.apply(&mut train);
        let Features::Dense { values, .. } = &train.features else {
            unreachable!()
        };
        for channel in 0..2 {
            let pixels = values
                .chunks_exact(8)
                .flat_map(|row| row[channel * 4..(channel + 1) * 4].iter().copied());
            let (mean, std) = mean_and_std(pixels);
            assert!(mean.abs() < 1e-5, "channel {channel}: mean {mean}");
            assert!((std - 1.0).abs() < 1e-5, "channel {channel}: std {std}");
        }
    }

    #[test]
    fn token_datasets_have_no_standardizer() {
        let data = Dataset {
            features: Features::Tokens {
                ids: vec![0, 1],
                context: 1,
            },
            targets: Targets::Tokens {
                ids: vec![1, 0],
                vocab: 2,
            },
        };
        assert_eq!(Standardizer::fit(&data), None);
    }

    #[test]
    fn numbers_in_messages_stay_short() {
        assert_eq!(number_label(1.5), "1.5");
        assert_eq!(number_label(-1e300), "-1e300");
        assert_eq!(number_label(2.5e-7), "2.5e-7");
        assert_eq!(number_label(0.0), "0");
        assert_eq!(number_label(f64::NAN), "NaN");
    }

    #[test]
    fn the_error_display_names_the_row_and_column() {
        let cell = DataError::Csv {
            row: 5,
            column: "x3".into(),
            message: "\"abc\" is not a number".into(),
        };
        assert_eq!(
            cell.to_string(),
            "row 5, column \"x3\": \"abc\" is not a number"
        );
        let whole_row = DataError::Csv {
            row: 2,
            column: String::new(),
            message: "expected 3 cells, found 2".into(),
        };
        assert_eq!(whole_row.to_string(), "row 2: expected 3 cells, found 2");
        assert_eq!(
            DataError::invalid("images", "wrong magic").to_string(),
            "images: wrong magic"
        );
    }
}
