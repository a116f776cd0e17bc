//! A list of layers as native nodes: each layer's [`Kernel`] with its output and the
//! output's gradient, in buffers sized once for a batch size and kept from step to step, and
//! the chain rule over them (forward in order, backward last first). The native backend runs
//! the model's chain; a residual block runs its own.

use candle_core::Var;

use super::plan::element_count;
use super::Layer;
use crate::engine::profile;
use crate::engine::rng::Rng;

/// What reaches a node: values, or token ids for an embedding.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    Values(&'a [f32]),
    Tokens(&'a [u32]),
}

impl<'a> Input<'a> {
    /// The values; a plan puts an embedding first on token ids, so no other node sees them.
    pub fn values(self) -> &'a [f32] {
        match self {
            Input::Values(values) => values,
            Input::Tokens(_) => unreachable!("the plan puts an embedding first on token ids"),
        }
    }
}

/// One layer's native forward and backward pass over its saved buffers. `params` holds the
/// values of every parameter of the model and `grads` their gradients, in the model's order;
/// a node knows the indices of its own (from [`NodeBuild::parameters`]).
pub trait Kernel: Send {
    /// Writes the node's output for the batch of `n` samples; `train` is the dropout
    /// generator in training mode.
    fn forward(
        &mut self,
        input: Input<'_>,
        out: &mut [f32],
        n: usize,
        params: &[&[f32]],
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()>;

    /// Given d(loss)/d(out) in `grad_out` (and the forward pass's `input` and `out`), writes
    /// the gradients of the node's parameters and, when the node before it needs it,
    /// d(loss)/d(input) into `grad_in`.
    fn backward(
        &mut self,
        input: Input<'_>,
        out: &[f32],
        grad_out: &[f32],
        params: &[&[f32]],
        grads: &mut [Vec<f32>],
        grad_in: Option<&mut [f32]>,
    );

    /// Whether the node (or a node inside it) has parameters to train: below the first that
    /// has, no gradient is needed.
    fn has_parameters(&self) -> bool {
        false
    }

    /// Bytes held by the node's own buffers (not its output or gradient).
    fn allocated_bytes(&self) -> usize {
        0
    }
}

/// What a layer builds for the native step.
pub struct NodeParts {
    pub kernel: Box<dyn Kernel>,
    /// The per-sample shape of the node's output.
    pub output: Vec<usize>,
    /// Layers after this one that the node computes too (a fused conv + ReLU + pool: 2).
    pub fused: usize,
}

impl NodeParts {
    /// A node of one layer.
    pub fn new(kernel: impl Kernel + 'static, output: Vec<usize>) -> Self {
        Self {
            kernel: Box::new(kernel),
            output,
            fused: 0,
        }
    }
}

/// What building the nodes of a model hands out in the model's order: parameter indices and
/// buffers (batch norm's running statistics, shared with the model's).
pub struct NodeBuild<'a> {
    /// Samples per batch.
    pub rows: usize,
    next_parameter: usize,
    buffers: &'a [Var],
}

impl<'a> NodeBuild<'a> {
    pub fn new(rows: usize, buffers: &'a [Var]) -> Self {
        Self {
            rows,
            next_parameter: 0,
            buffers,
        }
    }

    /// The index of the first of the layer's next `count` parameters.
    pub fn parameters(&mut self, count: usize) -> usize {
        let first = self.next_parameter;
        self.next_parameter += count;
        first
    }

    /// The layer's next `N` buffers.
    pub fn buffers<const N: usize>(&mut self) -> [Var; N] {
        let (taken, rest) = self.buffers.split_at(N);
        self.buffers = rest;
        std::array::from_fn(|index| taken[index].clone())
    }
}

/// A node: its kernel, its output and the output's gradient for the whole batch.
pub struct Node {
    kernel: Box<dyn Kernel>,
    /// The layers it computes, as a profile names them.
    label: String,
    pub out: Vec<f32>,
    pub grad: Vec<f32>,
}

/// The nodes of a list of layers.
pub struct Chain {
    pub nodes: Vec<Node>,
}

impl Chain {
    /// The nodes for `layers` on samples of `dims` (token ids: `[time]`); returns the
    /// per-sample output dims.
    pub fn build(
        layers: &[Box<dyn Layer>],
        mut dims: Vec<usize>,
        build: &mut NodeBuild<'_>,
    ) -> candle_core::Result<(Chain, Vec<usize>)> {
        let mut nodes = Vec::with_capacity(layers.len());
        let mut index = 0;
        while index < layers.len() {
            let parts = layers[index].native_node(&dims, build, &layers[index + 1..])?;
            let len = batch_len(build.rows, &parts.output)?;
            nodes.push(Node {
                kernel: parts.kernel,
                label: describe(&layers[index..=index + parts.fused]),
                out: vec![0.0; len],
                grad: vec![0.0; len],
            });
            dims = parts.output;
            index += 1 + parts.fused;
        }
        Ok((Chain { nodes }, dims))
    }

    /// The last node's output.
    pub fn output(&self) -> &[f32] {
        &self.nodes.last().expect("a layer list has layers").out
    }

    /// Whether a node of the chain has parameters.
    pub fn has_parameters(&self) -> bool {
        self.nodes.iter().any(|node| node.kernel.has_parameters())
    }

    /// Bytes held by the chain's buffers.
    pub fn allocated_bytes(&self) -> usize {
        self.nodes
            .iter()
            .map(|node| (node.out.len() + node.grad.len()) * 4 + node.kernel.allocated_bytes())
            .sum()
    }

    /// Forward through every node; `train` is the dropout generator in training mode.
    pub fn forward(
        &mut self,
        input: Input<'_>,
        n: usize,
        params: &[&[f32]],
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<()> {
        for index in 0..self.nodes.len() {
            let (before, rest) = self.nodes.split_at_mut(index);
            let node_input = before
                .last()
                .map_or(input, |previous| Input::Values(&previous.out));
            let Node {
                kernel, out, label, ..
            } = &mut rest[0];
            let _span = profile::span(|| format!("forward {label}"));
            kernel.forward(node_input, out, n, params, train)?;
        }
        Ok(())
    }

    /// Backward through every node, last first: each node's `grad` holds d(loss)/d(its
    /// output) when its turn comes (the caller fills the last one's). Writes every parameter's
    /// gradient and, when given, d(loss)/d(input).
    pub fn backward(
        &mut self,
        input: Input<'_>,
        params: &[&[f32]],
        grads: &mut [Vec<f32>],
        mut input_grad: Option<&mut [f32]>,
    ) {
        // Below the first layer with parameters (and without a caller asking for the input's
        // gradient) no gradient is needed: a flattened input's product with the first weight
        // is the most expensive one of an MLP's step.
        let first_trained = self
            .nodes
            .iter()
            .position(|node| node.kernel.has_parameters());
        let wanted_from = match (&input_grad, first_trained) {
            (Some(_), _) => 0,
            (None, Some(first)) => first + 1,
            (None, None) => usize::MAX,
        };
        for index in (0..self.nodes.len()).rev() {
            let (before, rest) = self.nodes.split_at_mut(index);
            let Node {
                kernel,
                out,
                grad,
                label,
            } = &mut rest[0];
            let _span = profile::span(|| format!("backward {label}"));
            match before.last_mut() {
                Some(previous) => {
                    let Node {
                        out: previous_out,
                        grad: previous_grad,
                        ..
                    } = previous;
                    let grad_in = (index >= wanted_from).then_some(&mut previous_grad[..]);
                    kernel.backward(
                        Input::Values(previous_out),
                        out,
                        grad,
                        params,
                        grads,
                        grad_in,
                    );
                }
                None => kernel.backward(input, out, grad, params, grads, input_grad.as_deref_mut()),
            }
        }
    }

    /// d(loss)/d(output) of the last node, for the caller to fill before [`Chain::backward`].
    pub fn output_grad(&mut self) -> &mut [f32] {
        &mut self.nodes.last_mut().expect("a layer list has layers").grad
    }

    /// The last node's output and its gradient, to compute a loss into.
    pub fn output_and_grad(&mut self) -> (&[f32], &mut [f32]) {
        let last = self.nodes.last_mut().expect("a layer list has layers");
        (&last.out, &mut last.grad)
    }
}

/// Layers as a profile names them: their planned values, without the padding of `{:?}`.
fn describe(layers: &[Box<dyn Layer>]) -> String {
    layers
        .iter()
        .map(|layer| {
            format!("{layer:?}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

/// The length of a buffer of `factors` multiplied. The plan and admission refuse a model
/// whose sizes do not fit long before a workspace is built; this keeps a size that would wrap
/// from ever sizing (and then indexing) a buffer.
pub fn buffer_len(factors: &[usize]) -> candle_core::Result<usize> {
    element_count(factors).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "native step: a buffer of {factors:?} values is larger than memory can address"
        ))
    })
}

/// The values of `rows` samples of shape `dims`.
pub fn batch_len(rows: usize, dims: &[usize]) -> candle_core::Result<usize> {
    let per_sample = buffer_len(dims)?;
    buffer_len(&[rows, per_sample])
}
