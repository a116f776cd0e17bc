//! The hand-written step of the character transformer: token + position embeddings, pre-norm
//! blocks (layer norm, causal multi-head attention, residual; layer norm, GELU MLP, residual),
//! a final layer norm and the vocabulary head, trained on next-token cross-entropy. It computes
//! the same function as `Model::predict` (the tests hold it to candle's gradients).
//!
//! The blocks themselves are `attention.rs`'s, shared with the layer-list `transformer_block`.

use super::attention::{Block, Norm, Scratch, BLOCK_VARS};
use super::{cross_entropy, dense_backward, dense_forward, sequence_loss_and_hits, HostValues};
use crate::engine::batch::DeviceData;
use crate::engine::model::{Layers, Model, ModelShape};
use crate::engine::spec::ModelSpec;

/// The buffers of one batch shape.
pub(super) struct Buffers {
    batch: usize,
    time: usize,
    d: usize,
    vocab: usize,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    /// The residual stream: the embeddings, then after each block.
    stream: Vec<Vec<f32>>,
    blocks: Vec<Block>,
    final_norm: Norm,
    logits: Vec<f32>,
    logits_grad: Vec<f32>,
    /// Backward: the residual gradient, and the blocks' shared intermediate gradients.
    grad_stream: Vec<f32>,
    scratch: Scratch,
}

impl Buffers {
    pub(super) fn new(model: &Model, batch: usize, time: usize) -> Self {
        let Layers::Transformer {
            token_embedding,
            blocks,
            heads,
            ..
        } = model.layers()
        else {
            unreachable!("built for transformers only");
        };
        let (vocab, d) = (token_embedding.dims()[0], token_embedding.dims()[1]);
        let n = batch * time;
        Self {
            batch,
            time,
            d,
            vocab,
            tokens: vec![0; n],
            targets: vec![0; n],
            stream: (0..=blocks.len()).map(|_| vec![0.0; n * d]).collect(),
            blocks: blocks
                .iter()
                .map(|_| Block::new(batch, time, d, *heads))
                .collect(),
            final_norm: Norm::new(n, d),
            logits: vec![0.0; n * vocab],
            logits_grad: vec![0.0; n * vocab],
            grad_stream: vec![0.0; n * d],
            scratch: Scratch::new(batch, time, d, *heads),
        }
    }

    pub(super) fn batch(&self) -> usize {
        self.batch
    }

    /// Whether these buffers fit a batch of `batch` sequences of `time` tokens.
    pub(super) fn fits(&self, batch: usize, time: usize) -> bool {
        self.batch == batch && self.time == time
    }
}

/// The bytes `Buffers::new` allocates for `batch` sequences of a transformer spec's context,
/// from the spec alone (admission checks it before anything is built). Saturating arithmetic.
pub(super) fn planned_bytes(spec: &ModelSpec, shape: &ModelShape, batch: u64) -> u64 {
    let ModelSpec::Transformer {
        d_model,
        heads,
        layers,
        context,
    } = spec
    else {
        return 0;
    };
    let mul = |a: u64, b: u64| a.saturating_mul(b);
    let (d, time, layers) = (*d_model as u64, *context as u64, *layers as u64);
    let n = mul(batch, time);
    let nd = mul(n, d);
    let attention = mul(mul(mul(batch, *heads as u64), time), time);
    // A norm: normalized and out ([n, d]) and inv_std ([n]).
    let norm = mul(2, nd).saturating_add(n);
    // Two norms, qkv (3), mixed and middle (1 each), expanded, activated and gelu_tanh (4
    // each), weights.
    let block = mul(2, norm)
        .saturating_add(mul(17, nd))
        .saturating_add(attention);
    let floats = mul(2, n) // tokens and targets (u32)
        .saturating_add(mul(layers.saturating_add(1), nd)) // the residual stream
        .saturating_add(mul(layers, block))
        .saturating_add(norm)
        .saturating_add(mul(2, mul(n, shape.output as u64))) // logits and their gradient
        .saturating_add(nd) // grad_stream
        .saturating_add(mul(9, nd)) // scratch: grad_norm, grad_qkv (3), grad_mixed, grad_expanded (4)
        .saturating_add(attention); // scratch: grad_weights
    mul(floats, 4)
}

impl Buffers {
    /// Bytes held by these buffers (what `planned_bytes` predicts; tests compare the two).
    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        let floats = self.tokens.len()
            + self.targets.len()
            + self.stream.iter().map(Vec::len).sum::<usize>()
            + self.blocks.iter().map(Block::floats).sum::<usize>()
            + self.final_norm.floats()
            + self.logits.len()
            + self.logits_grad.len()
            + self.grad_stream.len()
            + self.scratch.floats();
        floats * 4
    }
}

/// Copies the batch's token ids and next-token targets, checking them against the vocabulary.
fn gather(data: &DeviceData, rows: &[usize], buffers: &mut Buffers) -> candle_core::Result<()> {
    let time = buffers.time;
    for (source, destination) in [
        (&data.x, &mut buffers.tokens),
        (&data.y, &mut buffers.targets),
    ] {
        let values = HostValues::of(source)?;
        let values = values.u32()?;
        for (dst, &row) in destination.chunks_exact_mut(time).zip(rows) {
            dst.copy_from_slice(&values[row * time..(row + 1) * time]);
        }
        if let Some(bad) = destination.iter().find(|&&id| id as usize >= buffers.vocab) {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary of {}",
                buffers.vocab
            );
        }
    }
    Ok(())
}

/// The forward pass over the gathered batch of `n` tokens, leaving the logits in
/// `buffers.logits`.
fn forward(buffers: &mut Buffers, params: &[&[f32]], n: usize) {
    let Buffers {
        time,
        d,
        tokens,
        stream,
        blocks,
        final_norm,
        logits,
        ..
    } = buffers;
    let (time, d) = (*time, *d);
    let (token_embedding, position_embedding) = (params[0], params[1]);
    let tail = 2 + BLOCK_VARS * blocks.len();
    let (final_gain, final_shift, head_weight, head_bias) = (
        params[tail],
        params[tail + 1],
        params[tail + 2],
        params[tail + 3],
    );

    // Embeddings.
    for ((row, h), &token) in stream[0].chunks_exact_mut(d).enumerate().zip(tokens.iter()) {
        let token = &token_embedding[token as usize * d..][..d];
        let position = &position_embedding[(row % time) * d..][..d];
        for ((h, t), p) in h.iter_mut().zip(token).zip(position) {
            *h = t + p;
        }
    }

    for (index, block) in blocks.iter_mut().enumerate() {
        let p = &params[2 + BLOCK_VARS * index..][..BLOCK_VARS];
        let (before, after) = stream.split_at_mut(index + 1);
        block.forward(&before[index], p, &mut after[0]);
    }

    // Head.
    final_norm.forward(
        stream.last().expect("embeddings at least"),
        final_gain,
        final_shift,
    );
    dense_forward(logits, &final_norm.out, n, head_weight, head_bias);
}

/// Next-token cross-entropy summed over the first `len` sequences of the batch `rows` (the
/// rest pad it to the buffers' size), averaged over each sequence's tokens, and how many
/// tokens the model predicts.
pub(super) fn evaluate_batch(
    buffers: &mut Buffers,
    params: &[&[f32]],
    data: &DeviceData,
    rows: &[usize],
    len: usize,
) -> candle_core::Result<(f64, usize)> {
    gather(data, rows, buffers)?;
    let time = buffers.time;
    forward(buffers, params, rows.len() * time);
    let tokens = len * time;
    Ok(sequence_loss_and_hits(
        &buffers.logits[..tokens * buffers.vocab],
        &buffers.targets[..tokens],
        buffers.vocab,
        time,
    ))
}

/// Forward and backward pass of the transformer on the batch `rows`; see
/// `super::forward_backward`.
pub(super) fn forward_backward(
    buffers: &mut Buffers,
    params: &[&[f32]],
    grads: &mut [Vec<f32>],
    data: &DeviceData,
    rows: &[usize],
) -> candle_core::Result<f64> {
    gather(data, rows, buffers)?;
    let n = rows.len() * buffers.time;
    let tail = 2 + BLOCK_VARS * buffers.blocks.len();
    let (final_gain, head_weight) = (params[tail], params[tail + 2]);
    forward(buffers, params, n);
    let Buffers {
        time,
        d,
        vocab,
        tokens,
        targets,
        blocks,
        final_norm,
        logits,
        logits_grad,
        grad_stream,
        scratch,
        ..
    } = buffers;
    let (time, d, vocab) = (*time, *d, *vocab);
    let loss = cross_entropy(logits, targets, vocab, logits_grad);
    if !loss.is_finite() {
        return Ok(loss);
    }

    // Backward: head, final norm.
    {
        let (rest, head) = grads.split_at_mut(tail + 2);
        let (head_w, head_b) = head.split_at_mut(1);
        let grad_norm = &mut scratch.grad_norm;
        dense_backward(
            logits_grad,
            &final_norm.out,
            n,
            head_weight,
            &mut head_w[0],
            &mut head_b[0],
            Some(grad_norm),
        );
        let (gain, shift) = rest[tail..].split_at_mut(1);
        grad_stream.fill(0.0);
        final_norm.backward(
            grad_norm,
            final_gain,
            &mut gain[0],
            &mut shift[0],
            grad_stream,
        );
    }

    // Blocks, last first; `grad_stream` carries d(loss)/d(residual stream).
    for (index, block) in blocks.iter().enumerate().rev() {
        let p = &params[2 + BLOCK_VARS * index..][..BLOCK_VARS];
        let g = &mut grads[2 + BLOCK_VARS * index..][..BLOCK_VARS];
        block.backward(p, g, grad_stream, scratch);
    }

    // Embeddings: scatter-add per token id and per position.
    let (token_grad, rest) = grads.split_at_mut(1);
    let (token_grad, position_grad) = (&mut token_grad[0], &mut rest[0]);
    token_grad.fill(0.0);
    position_grad.fill(0.0);
    for ((row, g), &token) in grad_stream.chunks_exact(d).enumerate().zip(tokens.iter()) {
        let token_row = &mut token_grad[token as usize * d..][..d];
        token_row.iter_mut().zip(g).for_each(|(t, g)| *t += g);
        let position_row = &mut position_grad[(row % time) * d..][..d];
        position_row.iter_mut().zip(g).for_each(|(p, g)| *p += g);
    }
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use crate::engine::batch::DeviceData;
    use crate::engine::data::{Dataset, Features, Targets, Task};
    use crate::engine::model::{Model, ModelShape};
    use crate::engine::rng::Rng;
    use crate::engine::spec::ModelSpec;

    #[test]
    fn transformer_gradients_match_autograd() {
        let (rows, time, vocab) = (12, 5, 7);
        let mut rng = Rng::new(5);
        let mut ids =
            || -> Vec<u32> { (0..rows * time).map(|_| rng.below(vocab) as u32).collect() };
        let data = Dataset {
            features: Features::Tokens {
                ids: ids(),
                context: time,
            },
            targets: Targets::Tokens { ids: ids(), vocab },
        };
        let shape = ModelShape {
            input: vec![time],
            output: vocab,
            task: Task::LanguageModel,
        };
        // A context longer than the sequences: the unused position rows get zero gradient.
        let spec = ModelSpec::Transformer {
            d_model: 8,
            heads: 2,
            layers: 2,
            context: 6,
        };
        let device = Device::Cpu;
        let model = Model::build(&spec, &shape, 9, &device).unwrap();
        let train = DeviceData::new(&data, &device).unwrap();
        super::super::tests::assert_matches_autograd(&model, &train, &[3, 0, 7, 11]);
        super::super::tests::assert_evaluation_matches_candle(&model, &train);
    }
}
