//! The checked plan of a layer list: each layer planned by its family for the shape that
//! reaches it, the parameter count and the values per sample the native step keeps (for
//! admission), and the `state_dict()` the built model will have.

use super::registry;
use super::ModelShape;
use crate::engine::layers::plan::{element_count, plan_list, Counts, Sample};
use crate::engine::layers::weights::{TensorSpec, Tensors};
use crate::engine::layers::Layer;
use crate::engine::spec::layers::validate;
use crate::engine::spec::{LayerSpec, SpecError, Task};

/// The checked plan of a layer list: each layer's sizes and per-sample output shape, the
/// parameter count and the activation values per sample, convolution patches included (for
/// admission). Every size in it was computed with checked arithmetic: a layer list whose
/// sizes do not fit 64 bits has no plan.
#[derive(Debug)]
pub struct Plan {
    layers: Vec<Box<dyn Layer>>,
    output: Vec<usize>,
    /// The per-sample output shape of each layer of the list (not of those inside a residual
    /// block).
    layer_outputs: Vec<Vec<usize>>,
    pub parameters: u64,
    /// The values per sample the native step keeps between steps (see
    /// `Layer::saved_values`).
    pub activations_per_sample: u64,
}

/// Plans `layers` (checked by [`validate`] first) for samples of `input` (token ids of
/// length `input[0]` for a language model, whose vocabulary is `outputs`), and checks that
/// the last layer gives what the task needs: `[classes]`, `[outputs]` or `[time, vocab]`.
pub fn plan_layers(
    layers: &[LayerSpec],
    input: &[usize],
    task: Task,
    outputs: usize,
) -> Result<Plan, SpecError> {
    // A spec's layers were validated when it was parsed; a plan never divides by a zero size
    // whoever calls it.
    validate(layers, "model.layers")?;
    if element_count(input).is_none() {
        return Err(SpecError::new(
            "data",
            format!("samples of shape {input:?} have more values than a 64-bit size holds"),
        ));
    }
    let sample = match task {
        Task::LanguageModel => Sample::Tokens {
            time: input.first().copied().unwrap_or(0),
            vocab: outputs,
        },
        _ => Sample::Values(input.to_vec()),
    };
    let mut counts = Counts::default();
    let mut layer_outputs = Vec::with_capacity(layers.len());
    let (planned, output) = plan_list(
        layers,
        sample,
        "model.layers",
        &mut counts,
        registry::plan_layer,
        Some(&mut layer_outputs),
    )?;
    let Sample::Values(output) = output else {
        return Err(SpecError::new(
            "model.layers",
            "the layers never embed the token ids: start with an embedding layer",
        ));
    };
    let wanted = match task {
        Task::LanguageModel => vec![input.first().copied().unwrap_or(0), outputs],
        _ => vec![outputs],
    };
    if output != wanted {
        let what = match task {
            Task::Classification => format!("classification into {outputs} classes"),
            Task::Regression => format!("regression onto {outputs} values"),
            Task::LanguageModel => format!("next-token prediction over {outputs} symbols"),
        };
        return Err(SpecError::new(
            "model.layers",
            format!(
                "the last layer gives {output:?} per sample, but {what} needs {wanted:?}: end \
                 with a linear layer of out {outputs}"
            ),
        ));
    }
    Ok(Plan {
        layers: planned,
        output,
        layer_outputs,
        parameters: counts.parameters,
        activations_per_sample: counts.activations,
    })
}

impl Plan {
    /// The planned layers, in order.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// The per-sample output shape.
    pub fn output(&self) -> &[usize] {
        &self.output
    }

    /// The per-sample output shape of each layer of the list, in order.
    pub fn layer_outputs(&self) -> &[Vec<usize>] {
        &self.layer_outputs
    }

    /// Every tensor the built model will have, in declaration order: what building draws.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        Tensors::of(&self.layers)
    }

    /// The names and shapes of the `state_dict()` the built model will have, without
    /// building it: its parameters in `named_parameters()` order, then batch norm's running
    /// statistics (the order `Model::load_state_dict` checks them in).
    pub fn state_dict(&self) -> Vec<(String, Vec<usize>)> {
        let (buffers, parameters): (Vec<TensorSpec>, Vec<TensorSpec>) =
            self.tensors().into_iter().partition(|tensor| tensor.buffer);
        parameters
            .into_iter()
            .chain(buffers)
            .map(|tensor| (tensor.name, tensor.shape))
            .collect()
    }

    /// The bytes the native step's buffers take for batches of `rows` rows (not the
    /// gradients): what [`Plan::activations_per_sample`] counts, plus the batch's input and
    /// targets. Admission checks a job's memory with it before anything is built. `None`
    /// when the count overflows 64 bits.
    pub fn buffer_bytes(&self, shape: &ModelShape, rows: usize) -> Option<u64> {
        let input = element_count(&shape.input)? as u64;
        self.activations_per_sample
            .checked_add(input)?
            .checked_add(shape.output as u64)?
            .checked_mul(rows as u64)?
            .checked_mul(4)
    }
}
