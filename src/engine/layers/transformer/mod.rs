//! Embeddings and attention, a character language model's layers: `nn.Embedding(vocab,
//! dim)` on token ids, a learned absolute position embedding added to `[time, dim]` values,
//! and a pre-norm transformer block with causal multi-head attention (`x +
//! projection(attention(norm(x)))`, then `x + contract(gelu_tanh(expand(norm(x))))` with a 4x
//! wider MLP). The block's native pass is fused (`attention`): one node for the whole block.

use std::any::Any;

use candle_core::Tensor;

use super::native::{NodeBuild, NodeParts};
use super::plan::{element_count, PlanStep, Planned, Sample};
use super::weights::{Init, Tensors, Weights};
use super::Layer;
use crate::engine::rng::Rng;
use crate::engine::spec::SpecError;

mod attention;
mod candle;
mod native;

/// GPT-2's standard deviation for the position embedding's weight.
const POSITION_EMBEDDING_STD: f64 = 0.02;

/// Weight `[vocab, dim]`, drawn from N(0, init_std^2).
#[derive(Debug)]
pub struct Embedding {
    pub vocab: usize,
    pub dim: usize,
    pub init_std: f64,
}

/// Weight `[time, dim]` (the model's context), drawn from N(0, 0.02^2).
#[derive(Debug)]
pub struct PositionEmbedding {
    pub time: usize,
    pub dim: usize,
}

#[derive(Debug)]
pub struct TransformerBlock {
    pub time: usize,
    pub dim: usize,
    pub heads: usize,
}

/// `{"type": "embedding", "dim": ...}`: the only layer that reads token ids.
pub fn plan_embedding(
    dim: usize,
    init_std: f64,
    step: &mut PlanStep<'_>,
) -> Result<Planned, SpecError> {
    let &Sample::Tokens { time, vocab } = step.input else {
        return Err(step.mismatch("token ids (text data)"));
    };
    step.add_parameters(
        (vocab as u64).checked_mul(dim as u64),
        &step.field("dim"),
        || format!("its weight of {vocab} x {dim}"),
    )?;
    let next = vec![time, dim];
    if element_count(&next).is_none() {
        return Err(step.too_large(step.field("dim"), &next, "its output is"));
    }
    let embedding = Embedding {
        vocab,
        dim,
        init_std,
    };
    Ok((Box::new(embedding), Sample::Values(next)))
}

/// `{"type": "position_embedding"}` on `[time, dim]`.
pub fn plan_position(step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let dims = step.values()?;
    let &[time, dim] = dims else {
        return Err(step.mismatch("[time, dim]"));
    };
    let at = step.at;
    step.add_parameters((time as u64).checked_mul(dim as u64), at, || {
        format!("its weight of {time} x {dim}")
    })?;
    let position = PositionEmbedding { time, dim };
    Ok((Box::new(position), Sample::Values(dims.to_vec())))
}

/// `{"type": "transformer_block", "heads": ...}` on `[time, dim]`.
pub fn plan_block(heads: usize, step: &mut PlanStep<'_>) -> Result<Planned, SpecError> {
    let dims = step.values()?;
    let &[time, dim] = dims else {
        return Err(step.mismatch("[time, dim]"));
    };
    if dim % heads != 0 {
        return Err(SpecError::new(
            step.field("heads"),
            format!(
                "{}'s {heads} heads do not divide the {dim} values per position of its input \
                 {dims:?}",
                step.name
            ),
        ));
    }
    let at = step.at;
    let d = dim as u64;
    // Two layer norms; qkv, projection, expand and contract with their biases.
    step.add_parameters(
        d.checked_mul(d)
            .and_then(|d_squared| d_squared.checked_mul(12))
            .and_then(|weights| weights.checked_add(d.checked_mul(13)?)),
        at,
        || format!("12 x {dim}^2 + 13 x {dim} for values of {dim}"),
    )?;
    // The native step's saved values and backward scratch beyond the output and its
    // gradient (see `attention`): 30 values per output value, the attention weights and
    // their gradient (`heads * time^2` each) and the norms' statistics.
    let (t, h) = (time as u64, heads as u64);
    let attention = || h.checked_mul(t)?.checked_mul(t)?.checked_mul(2);
    step.add_activations(
        t.checked_mul(d)
            .and_then(|values| values.checked_mul(30))
            .and_then(|saved| saved.checked_add(t.checked_mul(2)?))
            .and_then(|saved| saved.checked_add(attention()?)),
        at,
        || format!("{heads} heads over {time} positions of {dim} values"),
    )?;
    let block = TransformerBlock { time, dim, heads };
    Ok((Box::new(block), Sample::Values(dims.to_vec())))
}

impl Layer for Embedding {
    fn tensors(&self, tensors: &mut Tensors) {
        // nn.Embedding: N(0, 1), unless the spec gives another deviation.
        let init = Init::Normal { std: self.init_std };
        tensors.parameter("weight", vec![self.vocab, self.dim], init);
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let [weight] = weights.parameters();
        candle::embedding(x, weight)
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        Ok(native::embedding_node(self.dim, input, build))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Layer for PositionEmbedding {
    fn tensors(&self, tensors: &mut Tensors) {
        let init = Init::Normal {
            std: POSITION_EMBEDDING_STD,
        };
        tensors.parameter("weight", vec![self.time, self.dim], init);
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let [weight] = weights.parameters();
        x.broadcast_add(weight.as_tensor())
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        Ok(native::position_node(input, build))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Layer for TransformerBlock {
    /// In the order of the `transformer` preset's blocks (and of `named_parameters()` for a
    /// module that registers its submodules in this order): `norm_attention`, `norm_mlp`,
    /// `qkv`, `projection`, `expand`, `contract`, each weight then bias.
    fn tensors(&self, tensors: &mut Tensors) {
        let d = self.dim;
        for norm in ["norm_attention", "norm_mlp"] {
            tensors.parameter(&format!("{norm}.weight"), vec![d], Init::Ones);
            tensors.parameter(&format!("{norm}.bias"), vec![d], Init::Zeros);
        }
        // nn.Linear's U(-1/sqrt(in), 1/sqrt(in)), drawn in the preset's order.
        for (name, inputs, outputs) in [
            ("qkv", d, 3 * d),
            ("projection", d, d),
            ("expand", d, 4 * d),
            ("contract", 4 * d, d),
        ] {
            let init = Init::Uniform {
                bound: 1.0 / (inputs as f64).sqrt(),
            };
            tensors.parameter(&format!("{name}.weight"), vec![outputs, inputs], init);
            tensors.parameter(&format!("{name}.bias"), vec![outputs], init);
        }
    }

    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        _train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        candle::block(x, self.heads, weights.parameters())
    }

    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        _following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts> {
        native::block_node(self.heads, input, build)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
