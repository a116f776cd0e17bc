//! Admission: whether a job can run on its data and what it will cost (parameters and peak
//! memory), computed from the spec and the data's shape before anything is allocated. The
//! server runs it at submit, the worker again before it loads the data, and the engine once
//! more before it builds the model, so a job is refused with the same message at every stage.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::backend::EVAL_CHUNK;
use super::data::{self, Dataset, Task};
use super::limits::{bytes_label, Limits};
use super::model::{self, ModelShape};
use super::prepare::{check_batch_size, check_task, DEFAULT_SAMPLES};
use super::spec::{Builtin, DeviceChoice, JobKind, JobSpec, OptimizerSpec, SpecError, ValidSpec};

/// What a job's data looks like, known before it is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct DataShape {
    /// Rows the model trains on (after the validation split).
    pub train_rows: usize,
    pub validation_rows: usize,
    /// One row's input: `[features]`, `[channels, height, width]` or `[context]` (tokens).
    pub sample_shape: Vec<usize>,
    /// Classes, regression outputs or vocabulary size.
    pub output: usize,
    pub task: Task,
    /// Bytes of stored data the job parses when it loads (uploads); 0 for builtins.
    pub raw_bytes: u64,
}

/// MNIST subset shipped in the binary (`data::mnist10k`): the tests hold these to it.
const MNIST10K_ROWS: usize = 10_000;
const MNIST10K_CLASSES: usize = 10;

impl DataShape {
    /// The shape of a builtin, without generating or decoding it; `None` when the spec names
    /// no builtin.
    pub fn of_builtin(spec: &JobSpec) -> Option<Result<DataShape, SpecError>> {
        let builtin = spec.data.builtin?;
        let samples = spec.data.samples.unwrap_or(DEFAULT_SAMPLES);
        let (rows, sample_shape, output, task) = match builtin {
            Builtin::Mnist10k => (
                MNIST10K_ROWS,
                vec![1, 28, 28],
                MNIST10K_CLASSES,
                Task::Classification,
            ),
            Builtin::Spirals => (
                samples,
                vec![data::SPIRAL_FEATURES],
                data::SPIRAL_ARMS,
                Task::Classification,
            ),
            Builtin::Blobs => (
                samples,
                vec![data::BLOB_FEATURES],
                data::BLOB_CLUSTERS,
                Task::Classification,
            ),
            Builtin::Sine => (samples, vec![1], 1, Task::Regression),
        };
        Some(
            Self::split(rows, None, spec.validation_fraction, "data").map(
                |(train_rows, validation_rows)| DataShape {
                    train_rows,
                    validation_rows,
                    sample_shape,
                    output,
                    task,
                    raw_bytes: 0,
                },
            ),
        )
    }

    /// Training and validation rows: a separate validation set's rows, or the split of
    /// `rows` by the validation fraction (the split's own message when it cannot be made).
    pub fn split(
        rows: usize,
        validation_rows: Option<usize>,
        fraction: f64,
        field: &str,
    ) -> Result<(usize, usize), SpecError> {
        match validation_rows {
            Some(validation_rows) => Ok((rows, validation_rows)),
            None => data::split_sizes(rows, fraction)
                .map_err(|error| SpecError::new(field, error.to_string())),
        }
    }

    /// The shape of splits already loaded.
    pub fn of_splits(train: &Dataset, validation: &Dataset) -> DataShape {
        DataShape {
            train_rows: train.rows(),
            validation_rows: validation.rows(),
            sample_shape: train.sample_shape(),
            output: train.output_dim(),
            task: train.task(),
            raw_bytes: 0,
        }
    }

    fn model_shape(&self) -> ModelShape {
        ModelShape {
            input: self.sample_shape.clone(),
            output: self.output,
            task: self.task,
        }
    }

    /// Bytes of one row as the engine holds it: f32 features or u32 token ids, and the
    /// targets (a u32 class, f32 regression values, or u32 next-token ids). `None` when the
    /// count overflows 64 bits.
    fn row_bytes(&self) -> Option<u64> {
        let inputs = crate::engine::layers::plan::element_count(&self.sample_shape)? as u64;
        let targets = match self.task {
            Task::Classification => 1,
            Task::Regression => self.output as u64,
            Task::LanguageModel => inputs,
        };
        inputs.checked_add(targets)?.checked_mul(4)
    }

    /// Bytes the job's data takes at its peak (see [`DATA_COPIES`]), with the stored bytes
    /// it parses; `None` when the count overflows 64 bits.
    fn held_bytes(&self) -> Option<u64> {
        let rows = (self.train_rows as u64).checked_add(self.validation_rows as u64)?;
        rows.checked_mul(self.row_bytes()?)?
            .checked_mul(DATA_COPIES)?
            .checked_add(self.raw_bytes)
    }
}

/// What a job will cost, as admitted (reported with the result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    pub parameters: u64,
    /// Estimated peak bytes: weights with their gradients, snapshots and optimizer state;
    /// the training step's buffers at the batch size; the data.
    pub memory_bytes: u64,
    pub weight_bytes: u64,
    pub activation_bytes: u64,
    pub data_bytes: u64,
}

/// Float copies of the weights a job holds at its peak: the live weights, their gradients and
/// one snapshot (the range test's, then the sweep's initial weights), plus the optimizer's
/// state and the copy the range test keeps of it.
fn weight_copies(optimizer: &OptimizerSpec) -> u64 {
    let state = match optimizer {
        OptimizerSpec::Sgd { .. } | OptimizerSpec::ScheduleFreeSgd { .. } => 1,
        OptimizerSpec::Adam { .. }
        | OptimizerSpec::Adamw { .. }
        | OptimizerSpec::ScheduleFreeAdamw { .. } => 2,
        // s, p0, exp_avg, exp_avg_sq.
        OptimizerSpec::Prodigy { .. } => 4,
    };
    3 + 2 * state
}

/// The data is held twice at its peak: loaded and split (while preparing), then the splits
/// and their copy on the training device.
const DATA_COPIES: u64 = 2;

/// Rows of the training step's buffers: the batch, or an evaluation chunk when validation
/// runs before the first step (`native::evaluate`), whichever is larger.
fn step_rows(spec: &JobSpec, data: &DataShape) -> usize {
    let chunk = EVAL_CHUNK.min(data.train_rows.max(data.validation_rows));
    spec.batch_size.max(chunk)
}

/// Admits a job of any kind: a race is admitted once per recipe (each recipe's optimizer
/// keeps its own copies of the weights), before any of its steps is taken.
pub fn admit_job(spec: &ValidSpec, data: &DataShape, limits: &Limits) -> Result<(), SpecError> {
    if spec.kind == JobKind::Compare {
        for (_, tune_spec) in spec.recipe_tune_specs() {
            admit(&tune_spec, data, limits)?;
        }
        Ok(())
    } else {
        admit(spec, data, limits).map(|_| ())
    }
}

/// Checks that a job can run on data of this shape within the limits, and returns its cost.
/// Every check names the field to change.
pub fn admit(spec: &JobSpec, data: &DataShape, limits: &Limits) -> Result<Cost, SpecError> {
    check_device(spec.device)?;
    check_task(spec, data.task)?;
    check_batch_size(spec, data.train_rows)?;
    let shape = data.model_shape();
    let plan = model::plan(&spec.model, &shape)?;
    let parameters = plan.parameters;
    if parameters > limits.max_parameters as u64 {
        return Err(SpecError::new(
            "model",
            format!(
                "{parameters} parameters is above the limit of {} (max_parameters): use a \
                 smaller model",
                limits.max_parameters
            ),
        ));
    }
    // Every part is counted exactly, or not at all (`None`: past 64 bits, so past any limit).
    let weight_bytes = parameters.checked_mul(4 * weight_copies(&spec.optimizer));
    let step_rows = step_rows(spec, data);
    let activation_bytes = plan.buffer_bytes(&shape, step_rows);
    let data_bytes = data.held_bytes();
    let memory_bytes = [weight_bytes, activation_bytes, data_bytes]
        .into_iter()
        .try_fold(0u64, |sum, part| sum.checked_add(part?));
    if let (Some(weight_bytes), Some(activation_bytes), Some(data_bytes), Some(memory_bytes)) =
        (weight_bytes, activation_bytes, data_bytes, memory_bytes)
    {
        if memory_bytes <= limits.max_job_memory {
            return Ok(Cost {
                parameters,
                memory_bytes,
                weight_bytes,
                activation_bytes,
                data_bytes,
            });
        }
    }
    // Name the part that dominates: that is the field to change.
    let size = |bytes: Option<u64>| bytes.map_or(u128::MAX, u128::from);
    let (weights, activations, held) =
        (size(weight_bytes), size(activation_bytes), size(data_bytes));
    let field = if activations >= weights && activations >= held {
        "batch_size"
    } else if weights >= held {
        "model"
    } else {
        "data"
    };
    let label =
        |bytes: Option<u64>| bytes.map_or_else(|| "more than 16 EiB".to_string(), bytes_label);
    Err(SpecError::new(
        field,
        format!(
            "the job needs about {} of memory (weights and optimizer state {}, the step's buffers at batch {} {}, data {}), above the limit of {} (max_job_memory): use a smaller model or batch",
            label(memory_bytes),
            label(weight_bytes),
            step_rows,
            label(activation_bytes),
            label(data_bytes),
            bytes_label(limits.max_job_memory),
        ),
    ))
}

/// Checks uploaded initial weights, by the tensor names and shapes stored at upload, against
/// the model the spec builds on data of this shape: what loading them would refuse, refused
/// before the job is queued, with the same message.
pub fn check_initial_weights(
    spec: &JobSpec,
    data: &DataShape,
    tensors: &HashMap<String, Vec<u64>>,
) -> Result<(), SpecError> {
    let plan = model::plan(&spec.model, &data.model_shape())?;
    model::check_state_dict(&plan.state_dict(), tensors)
}

/// `cuda` needs a build with the `cuda` feature and a visible GPU.
pub fn check_device(choice: DeviceChoice) -> Result<(), SpecError> {
    if choice == DeviceChoice::Cuda && !candle_core::utils::cuda_is_available() {
        return Err(SpecError::new(
            "device",
            "this lrtune was built without CUDA (cargo feature `cuda`) or no GPU is visible: use \"cpu\" or \"auto\"",
        ));
    }
    Ok(())
}

/// What a loaded dataset takes in the engine's layout (for the tests against `row_bytes`).
#[cfg(test)]
fn held_bytes(data: &Dataset) -> u64 {
    use super::data::{Features, Targets};
    let features = match &data.features {
        Features::Dense { values, .. } => values.len() * 4,
        Features::Tokens { ids, .. } => ids.len() * 4,
    };
    let targets = match &data.targets {
        Targets::Classes { labels, .. } => labels.len() * 4,
        Targets::Values { values, .. } => values.len() * 4,
        Targets::Tokens { ids, .. } => ids.len() * 4,
    };
    (features + targets) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::native::Native;
    use crate::engine::backend::{Backend, BatchOrder, DeviceData};
    use crate::engine::model::Model;
    use crate::engine::prepare::{load_local_data, prepare, LoadedData};
    use crate::engine::rng::Rng;

    fn spec(text: &str) -> ValidSpec {
        ValidSpec::parse(text, &Limits::default()).expect("a valid spec")
    }

    fn refused(text: &str) -> SpecError {
        let spec = spec(text);
        let shape = DataShape::of_builtin(&spec).unwrap().unwrap();
        admit(&spec, &shape, &Limits::default()).expect_err("refused")
    }

    #[test]
    fn builtin_shapes_are_those_of_the_loaded_data() {
        for builtin in ["mnist10k", "spirals", "blobs", "sine"] {
            let spec = spec(&format!(r#"{{"data": {{"builtin": "{builtin}"}}}}"#));
            let planned = DataShape::of_builtin(&spec).unwrap().unwrap();
            let prepared = prepare(&spec, load_local_data(&spec).unwrap()).unwrap();
            let loaded = DataShape::of_splits(&prepared.train, &prepared.validation);
            assert_eq!(planned, loaded, "{builtin}");
            let held = held_bytes(&prepared.train) + held_bytes(&prepared.validation);
            let rows = (planned.train_rows + planned.validation_rows) as u64;
            assert_eq!(planned.row_bytes().unwrap() * rows, held, "{builtin}");
        }
    }

    /// The planned parameters are what building the model allocates, and the planned step
    /// buffers cover what a training step allocates without doubling it, for every preset.
    #[test]
    fn the_estimate_matches_what_a_training_step_allocates() {
        let text = "abcdefghij klmnopqrstuvwxyz. ".repeat(40);
        let cases = [
            (
                r#"{"data": {"builtin": "blobs", "samples": 600}, "model": {"arch": "linear"}, "batch_size": 32}"#,
                None,
            ),
            (
                r#"{"data": {"builtin": "blobs", "samples": 600}, "model": {"arch": "mlp", "hidden": [40, 24], "dropout": 0.1}, "batch_size": 300}"#,
                None,
            ),
            (
                r#"{"data": {"builtin": "sine", "samples": 600}, "model": {"arch": "mlp", "hidden": [16]}, "batch_size": 8}"#,
                None,
            ),
            (
                r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "cnn", "channels": [4, 6], "hidden": 20}, "batch_size": 16}"#,
                None,
            ),
            (
                r#"{"data": {"path": "corpus.txt"}, "model": {"arch": "transformer", "d_model": 16, "heads": 2, "layers": 2, "context": 12}, "batch_size": 4}"#,
                Some(text.as_bytes()),
            ),
        ];
        for (text, corpus) in cases {
            let spec = spec(text);
            let loaded = match corpus {
                Some(bytes) => crate::engine::prepare::read_pair(
                    crate::engine::prepare::Format::Text,
                    bytes,
                    None,
                    None,
                    &spec,
                )
                .unwrap(),
                None => load_local_data(&spec).unwrap(),
            };
            let (parameters, planned, allocated) = planned_and_allocated(&spec, loaded);
            assert_eq!(parameters.0, parameters.1, "{text}");
            assert!(
                planned >= allocated && planned <= 2 * allocated,
                "{text}: planned {planned}, allocated {allocated}"
            );
        }
    }

    /// For a spec and its data: the parameters admission counts and the model has, and the
    /// step buffers admission plans and the native step allocates, for a step at the planned
    /// size (the larger of the batch and an evaluation chunk).
    fn planned_and_allocated(spec: &JobSpec, loaded: LoadedData) -> ((u64, u64), u64, u64) {
        let prepared = prepare(spec, loaded).unwrap();
        let shape = DataShape::of_splits(&prepared.train, &prepared.validation);
        let cost = admit(spec, &shape, &Limits::default()).unwrap();
        let device = candle_core::Device::Cpu;
        let model = Model::build(&spec.model, &shape.model_shape(), 0, &device).unwrap();
        let rows = step_rows(spec, &shape);
        let train = DeviceData::new(&prepared.train, &device).unwrap();
        let mut optimizer = crate::engine::optim::Optimizer::new(&spec.optimizer, model.vars());
        let batch: Vec<usize> = BatchOrder::new(train.rows, rows, 0).next_batch().to_vec();
        let mut native = Native::new();
        native
            .train_step(
                &model,
                &mut optimizer,
                &train,
                &batch,
                0.01,
                0.9,
                &mut Rng::new(1),
            )
            .unwrap();
        let allocated = native.allocated_buffer_bytes() as u64;
        let model_shape = shape.model_shape();
        let plan = crate::engine::model::plan(&spec.model, &model_shape).unwrap();
        let planned = plan.buffer_bytes(&model_shape, rows).unwrap();
        (
            (cost.parameters, model.parameter_count() as u64),
            planned,
            allocated,
        )
    }

    /// A layer list's planned step memory covers what its native step allocates, without
    /// more than doubling it (convolution patches are counted with the activations).
    #[test]
    fn a_layer_lists_planned_buffers_cover_its_native_step() {
        for text in [
            r#"{"data": {"builtin": "mnist10k"}, "batch_size": 32, "model": {"arch": "sequential", "layers": [
                {"type": "conv2d", "out": 8, "kernel": 3, "padding": 1}, {"type": "batch_norm"},
                {"type": "relu"}, {"type": "max_pool2d", "size": 2}, {"type": "dropout", "p": 0.1},
                {"type": "flatten"}, {"type": "linear", "out": 32}, {"type": "layer_norm"},
                {"type": "linear", "out": 10}]}}"#,
            r#"{"data": {"builtin": "spirals", "samples": 512}, "batch_size": 64, "model": {"arch": "sequential", "layers": [
                {"type": "linear", "out": 32},
                {"type": "residual", "layers": [{"type": "layer_norm"}, {"type": "linear", "out": 32}, {"type": "gelu"}]},
                {"type": "linear", "out": 3}]}}"#,
        ] {
            let spec = spec(text);
            let (parameters, planned, allocated) =
                planned_and_allocated(&spec, load_local_data(&spec).unwrap());
            assert_eq!(parameters.0, parameters.1, "{text}");
            assert!(
                planned >= allocated && planned <= 2 * allocated,
                "{text}: planned {planned}, allocated {allocated}"
            );
        }

        // The transformer preset as a layer list, on text.
        let text = r#"{"data": {"path": "corpus.txt"}, "batch_size": 4, "model": {"arch": "sequential", "context": 12, "layers": [
            {"type": "embedding", "dim": 16, "init_std": 0.02}, {"type": "position_embedding"},
            {"type": "transformer_block", "heads": 2}, {"type": "transformer_block", "heads": 4},
            {"type": "layer_norm"}, {"type": "linear", "out": 28}]}}"#;
        let spec = spec(text);
        let corpus = "abcdefghij klmnopqrstuvwxyz. ".repeat(40);
        let loaded = crate::engine::prepare::read_pair(
            crate::engine::prepare::Format::Text,
            corpus.as_bytes(),
            None,
            None,
            &spec,
        )
        .unwrap();
        let (parameters, planned, allocated) = planned_and_allocated(&spec, loaded);
        assert_eq!(parameters.0, parameters.1);
        assert!(
            planned >= allocated && planned <= 2 * allocated,
            "planned {planned}, allocated {allocated}"
        );
    }

    #[test]
    fn a_model_too_large_to_count_is_refused_without_building_it() {
        let error = refused(
            r#"{"data": {"builtin": "spirals"}, "model": {"arch": "mlp", "hidden": [9223372036854775808]}}"#,
        );
        assert_eq!(error.field, "model");
        assert_eq!(
            error.message,
            "linear's parameter count overflows: its weight of 9223372036854775808 x 2 and \
             bias of 9223372036854775808, more than a 64-bit count holds"
        );
        let error = refused(
            r#"{"data": {"builtin": "spirals"}, "model": {"arch": "mlp", "hidden": [1000000, 1000000]}}"#,
        );
        assert_eq!(error.field, "model");
        assert!(
            error.message.starts_with(
                "1000007000003 parameters is above the limit of 20000000 (max_parameters)"
            ),
            "{}",
            error.message
        );
    }

    #[test]
    fn wide_convolutions_and_deep_transformers_are_refused_by_their_cost() {
        let error = refused(
            r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "cnn", "channels": [100000]}}"#,
        );
        assert_eq!(error.field, "model");
        // Few parameters, but a batch of 28x28x2000 activations and their im2col patches.
        let limits = Limits {
            max_job_memory: 1 << 30,
            ..Limits::default()
        };
        let spec = spec(
            r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "cnn", "channels": [2000], "hidden": 1}}"#,
        );
        let shape = DataShape::of_builtin(&spec).unwrap().unwrap();
        let error = admit(&spec, &shape, &limits).unwrap_err();
        assert_eq!(error.field, "batch_size");
        assert!(
            error
                .message
                .contains("above the limit of 1.0 GiB (max_job_memory)"),
            "{}",
            error.message
        );
    }

    #[test]
    fn data_and_spec_mismatches_are_found_from_the_shape() {
        let error = refused(r#"{"data": {"builtin": "mnist10k"}, "batch_size": 1000000000000}"#);
        assert_eq!(error.field, "batch_size");
        assert_eq!(
            error.message,
            "1000000000000 is more than the 8000 training rows: use at most 8000"
        );
        let error = refused(r#"{"data": {"builtin": "blobs"}, "model": {"arch": "cnn"}}"#);
        assert_eq!(error.field, "model.arch");
        let error =
            refused(r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "transformer"}}"#);
        assert_eq!(error.field, "model.arch");
        let error = refused(r#"{"data": {"builtin": "sine"}, "task": "classification"}"#);
        assert_eq!(error.field, "task");
        assert_eq!(
            error.message,
            "the data is a regression task, not classification: use \"auto\""
        );
    }

    #[test]
    fn cuda_is_refused_on_a_build_without_it() {
        let result = check_device(DeviceChoice::Cuda);
        assert_eq!(result.is_ok(), cfg!(feature = "cuda"));
        if let Err(error) = result {
            assert_eq!(error.field, "device");
        }
    }
}
