//! The native step's buffers for one batch size: the batch's input and targets, gathered
//! row by row, and the model's chain of nodes; the loss at the end of the chain.

use super::{
    classification_loss_and_hits, cross_entropy, mean_squared_error, sequence_loss_and_hits,
    squared_error_sum, HostValues,
};
use crate::engine::batch::DeviceData;
use crate::engine::data::Task;
use crate::engine::layers::native::{buffer_len, Chain, Input, NodeBuild};
use crate::engine::model::Model;
use crate::engine::profile;
use crate::engine::rng::Rng;

/// The buffers of one batch size.
pub(super) struct Buffers {
    rows: usize,
    task: Task,
    /// Per-sample input values (dense data) or ids per sequence (text).
    input: Vec<f32>,
    tokens: Vec<u32>,
    /// Values per sample at the input, and per sample at the output.
    input_len: usize,
    output_len: usize,
    chain: Chain,
    labels: Vec<u32>,
    targets: Vec<f32>,
    /// Output values per prediction (classes, regression dims, vocabulary).
    classes: usize,
    /// Predictions per sample (1, or the sequence length of a language model).
    per_sample: usize,
}

impl Buffers {
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    pub(super) fn new(model: &Model, rows: usize) -> candle_core::Result<Buffers> {
        let shape = model.shape();
        let (chain, dims) = Chain::build(
            model.plan().layers(),
            shape.input.clone(),
            &mut NodeBuild::new(rows, model.buffers()),
        )?;
        let input_len = buffer_len(&shape.input)?;
        let output_len = buffer_len(&dims)?;
        let batch_inputs = buffer_len(&[rows, input_len])?;
        let per_sample = match shape.task {
            Task::LanguageModel => shape.input[0],
            _ => 1,
        };
        let tokens = shape.task == Task::LanguageModel;
        Ok(Buffers {
            rows,
            task: shape.task,
            input: vec![0.0; if tokens { 0 } else { batch_inputs }],
            tokens: vec![0; if tokens { batch_inputs } else { 0 }],
            input_len,
            output_len,
            chain,
            labels: vec![
                0;
                if shape.task == Task::Regression {
                    0
                } else {
                    buffer_len(&[rows, per_sample])?
                }
            ],
            targets: vec![
                0.0;
                if shape.task == Task::Regression {
                    buffer_len(&[rows, shape.output])?
                } else {
                    0
                }
            ],
            classes: shape.output,
            per_sample,
        })
    }

    /// Bytes held by the buffers (the chain's, the input's and the targets').
    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        self.chain.allocated_bytes() + (self.input.len() + self.targets.len()) * 4
    }
}

/// Copies the batch's rows into the buffers: samples (or token ids) and targets.
fn gather(data: &DeviceData, rows: &[usize], buffers: &mut Buffers) -> candle_core::Result<()> {
    let width = buffers.input_len;
    let x = HostValues::of(&data.x)?;
    if buffers.task == Task::LanguageModel {
        let ids = x.u32()?;
        for (dst, &row) in buffers.tokens.chunks_exact_mut(width).zip(rows) {
            dst.copy_from_slice(&ids[row * width..(row + 1) * width]);
        }
    } else {
        let values = x.f32()?;
        for (dst, &row) in buffers.input.chunks_exact_mut(width).zip(rows) {
            dst.copy_from_slice(&values[row * width..(row + 1) * width]);
        }
    }
    let y = HostValues::of(&data.y)?;
    let classes = buffers.classes;
    match buffers.task {
        Task::Regression => {
            let values = y.f32()?;
            for (dst, &row) in buffers.targets.chunks_exact_mut(classes).zip(rows) {
                dst.copy_from_slice(&values[row * classes..(row + 1) * classes]);
            }
        }
        _ => {
            let labels = y.u32()?;
            let per = buffers.per_sample;
            for (dst, &row) in buffers.labels.chunks_exact_mut(per).zip(rows) {
                dst.copy_from_slice(&labels[row * per..(row + 1) * per]);
            }
            if let Some(bad) = buffers.labels.iter().find(|&&l| l as usize >= classes) {
                candle_core::bail!("class {bad} is outside 0..{classes}");
            }
        }
    }
    if let Some(bad) = buffers.tokens.iter().find(|&&id| id as usize >= classes) {
        candle_core::bail!("token id {bad} is outside the vocabulary of {classes}");
    }
    Ok(())
}

/// The loss summed over the first `len` rows of the batch `rows` (the rest pad it) and the
/// right predictions among them, through the eval-mode forward pass.
pub(super) fn evaluate_batch(
    buffers: &mut Buffers,
    params: &[&[f32]],
    data: &DeviceData,
    rows: &[usize],
    len: usize,
) -> candle_core::Result<(f64, usize)> {
    gather(data, rows, buffers)?;
    let input = if buffers.task == Task::LanguageModel {
        Input::Tokens(&buffers.tokens)
    } else {
        Input::Values(&buffers.input)
    };
    buffers
        .chain
        .forward(input, rows.len(), params, &mut None)?;
    let output = buffers.chain.output();
    let outputs = &output[..len * buffers.output_len];
    Ok(match buffers.task {
        Task::Classification => {
            classification_loss_and_hits(outputs, &buffers.labels[..len], buffers.classes)
        }
        Task::LanguageModel => sequence_loss_and_hits(
            outputs,
            &buffers.labels[..len * buffers.per_sample],
            buffers.classes,
            buffers.per_sample,
        ),
        Task::Regression => {
            let width = buffers.classes;
            (
                squared_error_sum(outputs, &buffers.targets[..len * width], width),
                0,
            )
        }
    })
}

/// The forward pass alone in training mode on the batch `rows` (batch norm's running
/// statistics update, nothing else is kept); see `super::forward_train`.
pub(super) fn forward_train(
    buffers: &mut Buffers,
    params: &[&[f32]],
    data: &DeviceData,
    rows: &[usize],
    dropout_rng: &mut Rng,
) -> candle_core::Result<()> {
    gather(data, rows, buffers)?;
    let n = rows.len();
    let Buffers {
        task,
        input,
        tokens,
        chain,
        ..
    } = buffers;
    let chain_input = if *task == Task::LanguageModel {
        Input::Tokens(tokens)
    } else {
        Input::Values(input)
    };
    chain.forward(chain_input, n, params, &mut Some(dropout_rng))
}

/// Forward and backward pass on the batch `rows`; see `super::forward_backward`.
pub(super) fn forward_backward(
    buffers: &mut Buffers,
    params: &[&[f32]],
    grads: &mut [Vec<f32>],
    data: &DeviceData,
    rows: &[usize],
    dropout_rng: &mut Rng,
) -> candle_core::Result<f64> {
    profile::timed(
        || "gather the batch".to_string(),
        || gather(data, rows, buffers),
    )?;
    let n = rows.len();
    let Buffers {
        task,
        input,
        tokens,
        chain,
        labels,
        targets,
        classes,
        ..
    } = buffers;
    let chain_input = if *task == Task::LanguageModel {
        Input::Tokens(tokens)
    } else {
        Input::Values(input)
    };
    chain.forward(chain_input, n, params, &mut Some(dropout_rng))?;
    let (output, output_grad) = chain.output_and_grad();
    let loss_span = profile::span(|| "loss and its gradient".to_string());
    let loss = match task {
        Task::Regression => mean_squared_error(output, targets, output_grad),
        _ => cross_entropy(output, labels, *classes, output_grad),
    };
    drop(loss_span);
    if !loss.is_finite() {
        return Ok(loss);
    }
    chain.backward(chain_input, params, grads, None);
    Ok(loss)
}
