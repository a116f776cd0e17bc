//! The training step of every model on the CPU, written out by hand instead of recorded on
//! candle's autograd tape: every layer type of a layer list (`layers`, with the attention
//! block in `attention`), and so every preset, which expands to one.
//!
//! candle's tape makes a fresh tensor for every intermediate and every gradient, and adds each
//! gradient into a freshly zeroed tensor of its own size; on an MLP that bookkeeping cost as
//! much as the matrix products. Here the forward pass writes into buffers kept from step to
//! step, the backward pass is the textbook chain rule over the same buffers (matrix products
//! through `gemm` with strides instead of transposed copies, fused bias + activation, pooling
//! and loss kernels), and the gradients go straight to the fused optimizer update. The weights
//! stay in the model's `Var`s, so evaluation, snapshots and the optimizer see one model.
//!
//! Non-CPU devices keep the autograd path. The tests hold this step to candle's gradients on
//! every layer kind.

use std::any::Any;
use std::sync::atomic::AtomicBool;

use candle_core::{CpuStorage, Storage, Tensor};

use super::{Evaluation, EVAL_CHUNK};
use crate::engine::batch::DeviceData;
use crate::engine::data::Task;
use crate::engine::events::{check_canceled, EngineError};
use crate::engine::kernels::math::{exp, max_value, sum};
use crate::engine::model::layers::{element_count, Plan};
use crate::engine::model::{Model, ModelShape};
use crate::engine::optim::Optimizer;
use crate::engine::rng::Rng;
use crate::engine::simd::simd_kernel;

mod attention;
mod conv_block;
mod layers;

simd_kernel! {
    /// Mean cross-entropy over rows of logits; leaves d(loss)/d(logits) in `grad`.
    pub(super) fn cross_entropy(
        logits: &[f32],
        labels: &[u32],
        classes: usize,
        grad: &mut [f32],
    ) -> f64 {
        let rows = labels.len();
        let scale = 1.0 / rows as f32;
        let mut total = 0.0f64;
        for ((row, grad_row), &label) in logits
            .chunks_exact(classes)
            .zip(grad.chunks_exact_mut(classes))
            .zip(labels)
        {
            let max = max_value(row);
            for (g, &value) in grad_row.iter_mut().zip(row) {
                *g = exp(value - max);
            }
            let sum = sum(grad_row);
            let label = label as usize;
            total += f64::from(sum.ln() - (row[label] - max));
            let inverse = scale / sum;
            for g in grad_row.iter_mut() {
                *g *= inverse;
            }
            grad_row[label] -= scale;
        }
        total / rows as f64
    }
}

simd_kernel! {
    /// Cross-entropy summed over rows of logits, and how many rows have their largest logit
    /// (the first, on ties) at the label.
    pub(super) fn classification_loss_and_hits(
        logits: &[f32],
        labels: &[u32],
        classes: usize,
    ) -> (f64, usize) {
        let (mut total, mut hits) = (0.0f64, 0usize);
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            let max = max_value(row);
            let sum: f32 = row.iter().map(|v| exp(v - max)).sum();
            let label = label as usize;
            total += f64::from(sum.ln() - (row[label] - max));
            let predicted =
                (0..classes).fold(0, |best, i| if row[i] > row[best] { i } else { best });
            hits += usize::from(predicted == label);
        }
        (total, hits)
    }
}

/// Next-token cross-entropy summed over sequences of `time` tokens (each sequence's loss the
/// mean over its tokens), and how many tokens are predicted right.
pub(super) fn sequence_loss_and_hits(
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    time: usize,
) -> (f64, usize) {
    let (loss, hits) = classification_loss_and_hits(logits, targets, vocab);
    (loss / time as f64, hits)
}

/// Each row's mean squared error over its `width` outputs, summed over the rows.
pub(super) fn squared_error_sum(outputs: &[f32], targets: &[f32], width: usize) -> f64 {
    let squared: f64 = outputs
        .iter()
        .zip(targets)
        .map(|(o, t)| f64::from((o - t) * (o - t)))
        .sum();
    squared / width as f64
}

simd_kernel! {
    /// Mean squared error over every output; leaves d(loss)/d(output) in `grad`.
    pub(super) fn mean_squared_error(output: &[f32], targets: &[f32], grad: &mut [f32]) -> f64 {
        let scale = 2.0 / output.len() as f32;
        let mut total = 0.0f64;
        for ((g, &o), &t) in grad.iter_mut().zip(output).zip(targets) {
            let error = o - t;
            total += f64::from(error * error);
            *g = scale * error;
        }
        total / output.len() as f64
    }
}

/// Read access to the f32 values of a contiguous CPU tensor for the length of a step.
pub(super) struct HostValues<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> HostValues<'a> {
    pub(super) fn of(tensor: &'a Tensor) -> candle_core::Result<Self> {
        let (guard, layout) = tensor.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("native step: tensor is not contiguous");
        };
        Ok(Self {
            guard,
            start,
            len: end - start,
        })
    }

    pub(super) fn f32(&self) -> candle_core::Result<&[f32]> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(values)) => Ok(&values[self.start..self.start + self.len]),
            _ => candle_core::bail!("native step: expected f32 values on the CPU"),
        }
    }

    pub(super) fn u32(&self) -> candle_core::Result<&[u32]> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::U32(values)) => Ok(&values[self.start..self.start + self.len]),
            _ => candle_core::bail!("native step: expected u32 values on the CPU"),
        }
    }
}

/// What the native step keeps between steps, sized for one batch size.
pub struct Workspace {
    buffers: Box<layers::Buffers>,
    /// One gradient per model variable, in `Model::vars` order.
    pub grads: Vec<Vec<f32>>,
}

/// The bytes a workspace for batches of `rows` rows takes (buffers, not the gradients), from
/// the model's plan: admission checks a job's memory with it before anything is built.
///
/// The plan counts what each layer keeps (see `layers::Plan::activations_per_sample`); the
/// batch's input and targets come on top. `None` when the count overflows 64 bits.
pub fn planned_buffer_bytes(plan: &Plan, shape: &ModelShape, rows: usize) -> Option<u64> {
    let input = element_count(&shape.input)? as u64;
    plan.activations_per_sample
        .checked_add(input)?
        .checked_add(shape.output as u64)?
        .checked_mul(rows as u64)?
        .checked_mul(4)
}

impl Workspace {
    /// Bytes held by the buffers (not the gradients).
    #[cfg(test)]
    pub(crate) fn allocated_buffer_bytes(&self) -> usize {
        self.buffers.allocated_bytes()
    }
}

/// The native workspace in a model's backend state (created empty on first use).
pub(crate) fn workspace_slot(state: &mut Option<Box<dyn Any + Send>>) -> &mut Option<Workspace> {
    state
        .get_or_insert_with(|| Box::new(None::<Workspace>))
        .downcast_mut::<Option<Workspace>>()
        .expect("a model's backend state is the native workspace")
}

/// The hand-written CPU step (see the module docs).
pub struct Native;

impl super::Backend for Native {
    fn name(&self) -> &'static str {
        "native"
    }

    fn train_step(
        &self,
        model: &Model,
        optimizer: &mut Optimizer,
        data: &DeviceData,
        rows: &[usize],
        lr: f64,
        momentum: f64,
        dropout_rng: &mut Rng,
    ) -> candle_core::Result<f64> {
        // On a pool thread, so that the caller's thread sleeps instead of competing with
        // the pool's threads for the cores between the step's parallel sections.
        on_pool(|| {
            let mut state = model.backend_state();
            let workspace = workspace_slot(&mut state);
            let loss = forward_backward(model, workspace, data, rows, dropout_rng)?;
            if loss.is_finite() {
                let grads = &workspace.as_ref().expect("set by forward_backward").grads;
                optimizer.step_host(grads, lr, momentum)?;
            }
            Ok(loss)
        })
    }

    fn evaluate(
        &self,
        model: &Model,
        data: &DeviceData,
        cancel: &AtomicBool,
    ) -> Result<Evaluation, EngineError> {
        on_pool(|| {
            let mut state = model.backend_state();
            let workspace = workspace_slot(&mut state);
            let (loss, accuracy) = evaluate(model, workspace, data, EVAL_CHUNK, cancel)?;
            Ok(Evaluation { loss, accuracy })
        })
    }
}

/// Runs `f` on a thread of rayon's global pool (the caller blocks without spinning).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut result = None;
    rayon::scope(|_| result = Some(f()));
    result.expect("the scope ran the closure")
}

/// The workspace for batches of `rows` rows, (re)built when the model has none or
/// one of another shape.
fn workspace_for<'w>(
    model: &Model,
    workspace: &'w mut Option<Workspace>,
    rows: usize,
) -> candle_core::Result<&'w mut Workspace> {
    if workspace.as_ref().is_none_or(|w| w.buffers.rows() != rows) {
        // Drop the old buffers first, so two sets never coexist (admission counts one).
        *workspace = None;
        let buffers = Box::new(layers::Buffers::new(model, rows)?);
        *workspace = Some(Workspace {
            buffers,
            grads: model
                .vars()
                .iter()
                .map(|var| vec![0.0; var.elem_count()])
                .collect(),
        });
    }
    Ok(workspace.as_mut().expect("set above"))
}

/// Read guards on every parameter's values, in `Model::vars` order.
fn parameter_guards(model: &Model) -> candle_core::Result<Vec<HostValues<'_>>> {
    model
        .vars()
        .iter()
        .map(|var| HostValues::of(var.as_tensor()))
        .collect()
}

/// Mean loss and accuracy (`None` for regression) on a whole split through the same forward
/// pass as training. It runs in batches of the training step's size, the last one padded
/// with its final row, so no second set of buffers is built; `default_rows` sizes the
/// batches when the model has not trained yet. `cancel` is checked before every batch.
pub fn evaluate(
    model: &Model,
    workspace: &mut Option<Workspace>,
    data: &DeviceData,
    default_rows: usize,
    cancel: &AtomicBool,
) -> Result<(f64, Option<f64>), EngineError> {
    if data.rows == 0 {
        return Ok((0.0, None));
    }
    let batch = workspace
        .as_ref()
        .map_or(default_rows.min(data.rows), |w| w.buffers.rows())
        .max(1);
    let workspace = workspace_for(model, workspace, batch)?;
    let guards = parameter_guards(model)?;
    let params = guards
        .iter()
        .map(HostValues::f32)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (mut loss_sum, mut hits) = (0.0f64, 0usize);
    let mut rows = Vec::with_capacity(batch);
    for start in (0..data.rows).step_by(batch) {
        check_canceled(cancel)?;
        let len = batch.min(data.rows - start);
        rows.clear();
        rows.extend(start..start + len);
        rows.resize(batch, start + len - 1);
        let (loss, correct) =
            layers::evaluate_batch(&mut workspace.buffers, &params, data, &rows, len)?;
        loss_sum += loss;
        hits += correct;
    }
    let items_per_row = match data.task {
        Task::LanguageModel => data.x.dim(1)?,
        _ => 1,
    };
    let accuracy =
        (data.task != Task::Regression).then(|| hits as f64 / (data.rows * items_per_row) as f64);
    Ok((loss_sum / data.rows as f64, accuracy))
}

/// Forward and backward pass on the batch `rows`: returns the batch's mean loss and leaves
/// the gradient of every variable in `workspace.grads`. On a non-finite loss it returns
/// before the backward pass (the caller does not step on it).
pub fn forward_backward(
    model: &Model,
    workspace: &mut Option<Workspace>,
    data: &DeviceData,
    rows: &[usize],
    dropout_rng: &mut Rng,
) -> candle_core::Result<f64> {
    let workspace = workspace_for(model, workspace, rows.len())?;
    let guards = parameter_guards(model)?;
    let params = guards
        .iter()
        .map(HostValues::f32)
        .collect::<candle_core::Result<Vec<_>>>()?;
    layers::forward_backward(
        &mut workspace.buffers,
        &params,
        &mut workspace.grads,
        data,
        rows,
        dropout_rng,
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::engine::simd::{with_level, Level};
    use crate::engine::spec::{Activation, ModelSpec};

    /// The native step's loss and gradients against candle's autograd on the same model,
    /// batch and dropout draws.
    pub(super) fn assert_matches_autograd(model: &Model, train: &DeviceData, rows: &[usize]) {
        let mut workspace = None;
        let native_loss =
            forward_backward(model, &mut workspace, train, rows, &mut Rng::new(11)).unwrap();
        let native_grads = workspace.unwrap().grads;

        let (x, y) = train.batch(rows).unwrap();
        let forward = model.forward(&x, &y, Some(&mut Rng::new(11))).unwrap();
        let loss = forward.loss.to_scalar::<f32>().unwrap() as f64;
        let grads = forward.loss.backward().unwrap();

        assert!(
            (native_loss - loss).abs() <= 1e-5 * loss.abs().max(1.0),
            "loss: native {native_loss}, autograd {loss}"
        );
        for (index, (var, native)) in model.vars().iter().zip(&native_grads).enumerate() {
            let want = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(native.len(), want.len(), "variable {index}");
            // Relative to the variable's largest gradient; one that is zero in exact arithmetic
            // (a bias before batch norm) is float noise on both sides, held to 1e-7.
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            for (position, (got, want)) in native.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-4 * scale,
                    "variable {index} [{position}]: native {got}, autograd {want} (largest {scale})"
                );
            }
        }
    }

    /// The native evaluation against candle's on a split whose size is not a multiple of
    /// the batch (the last batch is padded), after a training step sized the workspace.
    pub(super) fn assert_evaluation_matches_candle(model: &Model, train: &DeviceData) {
        let rows: Vec<usize> = (0..train.rows / 2 + 1).collect();
        let mut workspace = None;
        forward_backward(model, &mut workspace, train, &rows, &mut Rng::new(1)).unwrap();
        assert!(!train.rows.is_multiple_of(rows.len()));
        let (loss, accuracy) =
            evaluate(model, &mut workspace, train, 256, &AtomicBool::new(false)).unwrap();
        let want = crate::engine::backend::Backend::evaluate(
            &crate::engine::backend::Candle,
            model,
            train,
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(
            (loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0),
            "loss: native {loss}, candle {}",
            want.loss
        );
        assert_eq!(accuracy, want.accuracy);
    }

    /// Random data for a model of `shape`: dense features or token ids.
    fn random_data(shape: &ModelShape, rows: usize) -> DeviceData {
        use crate::engine::data::{Dataset, Features, Targets};
        let mut rng = Rng::new(21);
        let per_row: usize = shape.input.iter().product();
        let data = match shape.task {
            Task::LanguageModel => {
                let mut ids = || -> Vec<u32> {
                    (0..rows * per_row)
                        .map(|_| rng.below(shape.output) as u32)
                        .collect()
                };
                Dataset {
                    features: Features::Tokens {
                        ids: ids(),
                        context: per_row,
                    },
                    targets: Targets::Tokens {
                        ids: ids(),
                        vocab: shape.output,
                    },
                }
            }
            task => Dataset {
                features: Features::Dense {
                    values: (0..rows * per_row).map(|_| rng.normal() as f32).collect(),
                    sample_shape: shape.input.clone(),
                },
                targets: match task {
                    Task::Regression => Targets::Values {
                        values: (0..rows * shape.output)
                            .map(|_| rng.normal() as f32)
                            .collect(),
                        dims: shape.output,
                    },
                    _ => Targets::Classes {
                        labels: (0..rows).map(|_| rng.below(shape.output) as u32).collect(),
                        classes: shape.output,
                    },
                },
            },
        };
        DeviceData::new(&data, &candle_core::Device::Cpu).unwrap()
    }

    /// One training step's loss and gradients and the evaluation of a fresh model, with every
    /// kernel on every thread at `level` (gemm picks its own, the same at every level).
    fn step_at(level: Level, spec: &ModelSpec, shape: &ModelShape) -> (f64, Vec<Vec<f32>>, f64) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .start_handler(move |_| crate::engine::simd::set_thread_level(level))
            .build()
            .unwrap();
        pool.install(|| {
            with_level(level, || {
                let model = Model::build(spec, shape, 4, &candle_core::Device::Cpu).unwrap();
                let data = random_data(shape, 48);
                let rows: Vec<usize> = (0..32).map(|i| (i * 5 + 1) % 48).collect();
                let mut workspace = None;
                let loss = forward_backward(&model, &mut workspace, &data, &rows, &mut Rng::new(3))
                    .unwrap();
                let (eval_loss, _) =
                    evaluate(&model, &mut workspace, &data, 32, &AtomicBool::new(false)).unwrap();
                (loss, workspace.unwrap().grads, eval_loss)
            })
        })
    }

    /// The element-wise kernels compute the same IEEE operations at every instruction-set
    /// level (no fused multiply-adds, reductions in the same order), so a whole step at each
    /// level this machine supports equals the scalar step bit for bit.
    #[test]
    fn every_simd_level_gives_the_scalar_step_bit_for_bit() {
        let dense = |input: Vec<usize>, output, task| ModelShape {
            input,
            output,
            task,
        };
        let mlp = |activation, dropout| ModelSpec::Mlp {
            hidden: vec![67, 33],
            activation,
            dropout,
        };
        let cases = [
            (
                mlp(Activation::Relu, 0.2),
                dense(vec![29], 10, Task::Classification),
            ),
            (
                mlp(Activation::Gelu, 0.0),
                dense(vec![29], 10, Task::Classification),
            ),
            (
                mlp(Activation::Tanh, 0.0),
                dense(vec![29], 3, Task::Regression),
            ),
            (
                mlp(Activation::Silu, 0.0),
                dense(vec![29], 10, Task::Classification),
            ),
            (
                ModelSpec::Cnn {
                    channels: vec![8, 19],
                    hidden: 24,
                },
                dense(vec![3, 9, 11], 10, Task::Classification),
            ),
            (
                ModelSpec::Transformer {
                    d_model: 48,
                    heads: 4,
                    layers: 2,
                    context: 21,
                },
                dense(vec![21], 13, Task::LanguageModel),
            ),
            (
                ModelSpec::Sequential {
                    layers: serde_json::from_str(
                        r#"[{"type": "conv2d", "out": 6, "kernel": 3, "stride": 2, "padding": 1},
                            {"type": "batch_norm"}, {"type": "gelu"},
                            {"type": "max_pool2d", "size": 2}, {"type": "dropout", "p": 0.2},
                            {"type": "flatten"}, {"type": "linear", "out": 19},
                            {"type": "residual", "layers": [
                                {"type": "layer_norm"}, {"type": "linear", "out": 19},
                                {"type": "sigmoid"}]},
                            {"type": "linear", "out": 10}]"#,
                    )
                    .unwrap(),
                    context: None,
                },
                dense(vec![3, 13, 11], 10, Task::Classification),
            ),
            (
                ModelSpec::Sequential {
                    layers: serde_json::from_str(
                        r#"[{"type": "embedding", "dim": 48, "init_std": 0.02},
                            {"type": "position_embedding"},
                            {"type": "transformer_block", "heads": 4},
                            {"type": "layer_norm"}, {"type": "linear", "out": 13}]"#,
                    )
                    .unwrap(),
                    context: Some(21),
                },
                dense(vec![21], 13, Task::LanguageModel),
            ),
        ];
        let levels = Level::supported_levels();
        eprintln!("levels on this machine: {levels:?}");
        for (spec, shape) in &cases {
            let (loss, grads, eval) = step_at(Level::Scalar, spec, shape);
            assert!(loss.is_finite() && eval.is_finite(), "{spec:?}");
            for &level in &levels[1..] {
                let (level_loss, level_grads, level_eval) = step_at(level, spec, shape);
                assert_eq!(level_loss.to_bits(), loss.to_bits(), "{level:?} {spec:?}");
                assert_eq!(level_eval.to_bits(), eval.to_bits(), "{level:?} {spec:?}");
                for (index, (got, want)) in level_grads.iter().zip(&grads).enumerate() {
                    let same = got
                        .iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{level:?} {spec:?}: gradient {index} differs");
                }
            }
        }
    }
}
