//! The layer families of a layer list, and what every layer type provides: [`Layer`].
//!
//! A layer type is planned from its spec ([`crate::engine::spec::LayerSpec`]) into a value
//! that knows every size the shape reaching it fixes; that value implements [`Layer`], the
//! one seam between a layer and everything else:
//! - its PyTorch tensors, with their `state_dict()` names and default initialisation
//!   ([`Layer::tensors`]), which the model draws and holds;
//! - its forward pass on candle ([`Layer::candle_forward`]), which candle's autograd
//!   differentiates (the candle backend, and the oracle the native step is tested against);
//! - its native node ([`Layer::native_node`]): the hand-written forward and backward pass
//!   over buffers kept between steps.
//!
//! Each family is a folder: `mod.rs` plans the spec into the layer and declares its tensors,
//! `candle.rs` holds the candle forward and `native.rs` the native kernels. The families:
//! [`linear`], [`conv`] (with the fused conv + ReLU + pool node), [`pooling`], [`norm`]
//! (batch and layer norm), [`transformer`] (embeddings and the attention block),
//! [`activation`], [`dropout`], [`residual`] and [`reshape`] (flatten).
//!
//! The rest of this folder is what the families share: [`plan`] (the shape that reaches a
//! layer, the checked counts, the errors that name a layer's field), [`weights`] (the tensors a
//! layer declares, and a layer's view of them on candle), [`candle`] and [`native`] (walking a
//! list of layers, which a residual block also does).
//!
//! Adding a layer type: its variant in `spec::LayerSpec` (what a user writes), its planned
//! value and its three parts in its family's folder (a new folder for a new family), and one
//! line in the registry, `model::registry`, that plans the variant.

use std::any::Any;
use std::fmt;

use candle_core::Tensor;

use crate::engine::rng::Rng;

pub mod candle;
pub mod native;
pub mod plan;
pub mod weights;

pub mod activation;
pub mod conv;
pub mod dropout;
pub mod linear;
pub mod norm;
pub mod pooling;
pub mod reshape;
pub mod residual;
pub mod transformer;

use native::{NodeBuild, NodeParts};
use weights::{Tensors, Weights};

/// A planned layer: every size fixed by the shape that reaches it (see the module docs).
pub trait Layer: fmt::Debug + Send + Sync + Any {
    /// Declares the layer's parameters and buffers in PyTorch's `named_parameters()` order,
    /// named as its `state_dict()` names them (relative to the layer), with their default
    /// initialisation. Most layers have none.
    fn tensors(&self, _tensors: &mut Tensors) {}

    /// The values per sample that the native step keeps for this layer besides its output
    /// and the output's gradient, given the output's values per sample: what its backward
    /// pass needs saved. `None` when the count overflows.
    fn saved_values(&self, _output: u64) -> Option<u64> {
        Some(0)
    }

    /// The forward pass on candle, taking the layer's tensors from `weights` in the order
    /// [`Layer::tensors`] declared them; `train` is the dropout generator in training mode
    /// (`None`: evaluation mode).
    fn candle_forward(
        &self,
        x: &Tensor,
        weights: &mut Weights<'_>,
        train: &mut Option<&mut Rng>,
    ) -> candle_core::Result<Tensor>;

    /// The native node for batches of `build.rows` samples of shape `input`. `following`
    /// are the layers after this one, for a node that fuses some of them into itself (it
    /// says how many in [`NodeParts::fused`]).
    fn native_node(
        &self,
        input: &[usize],
        build: &mut NodeBuild<'_>,
        following: &[Box<dyn Layer>],
    ) -> candle_core::Result<NodeParts>;

    /// The layer as `Any`, for a node that fuses the layers after it.
    fn as_any(&self) -> &dyn Any;
}
