//! Planning a layer list: the shape that reaches each layer, the checked sums of parameters
//! and step memory, and the errors that name a layer (`model.layers[2].out`) with both shapes.
//! Every size is computed with checked arithmetic: a list whose sizes do not fit 64 bits has
//! no plan.

use super::Layer;
use crate::engine::spec::{LayerSpec, SpecError};

/// What reaches a layer, per sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// Token ids, `time` of them, below `vocab`.
    Tokens {
        time: usize,
        vocab: usize,
    },
    Values(Vec<usize>),
}

impl Sample {
    pub fn describe(&self) -> String {
        match self {
            Sample::Tokens { time, .. } => format!("[{time}] token ids"),
            Sample::Values(dims) => format!("{dims:?}"),
        }
    }
}

/// The values in a tensor of shape `dims`, if they can be counted in a `usize`.
pub fn element_count(dims: &[usize]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |count, &dim| count.checked_mul(dim))
}

/// A layer planned for its input, and the sample it hands on.
pub type Planned = (Box<dyn Layer>, Sample);

/// Plans one layer type: the registry (`model::registry`) matches a spec to its family.
pub type Registry = fn(&LayerSpec, &mut PlanStep<'_>) -> Result<Planned, SpecError>;

/// What a plan adds up layer by layer. Each sum is checked: a count past 64 bits is a spec
/// error naming the layer, never a wrapped (or saturated) number that looks small.
#[derive(Debug, Default)]
pub struct Counts {
    pub parameters: u64,
    /// The values per sample the native step keeps (see [`Layer::saved_values`]).
    pub activations: u64,
}

impl Counts {
    /// Adds a layer's parameters; `added` is `None` when the layer's own count overflowed.
    fn add_parameters(
        &mut self,
        added: Option<u64>,
        field: &str,
        name: &str,
        what: impl FnOnce() -> String,
    ) -> Result<(), SpecError> {
        Self::add(&mut self.parameters, added).map_err(|before| {
            SpecError::new(
                field,
                format!(
                    "{name}'s parameter count overflows: {}",
                    Self::detail(what(), before)
                ),
            )
        })
    }

    /// Adds values the native step keeps per sample; `added` is `None` on an overflow.
    fn add_activations(
        &mut self,
        added: Option<u64>,
        field: &str,
        name: &str,
        what: impl FnOnce() -> String,
    ) -> Result<(), SpecError> {
        Self::add(&mut self.activations, added).map_err(|before| {
            SpecError::new(
                field,
                format!(
                    "{name}'s step memory overflows: {}",
                    Self::detail(what(), before)
                ),
            )
        })
    }

    /// `Err(None)`: the layer's own count overflowed; `Err(Some(total))`: the sum with the
    /// `total` of the layers before it did.
    fn add(total: &mut u64, added: Option<u64>) -> Result<(), Option<u64>> {
        let added = added.ok_or(None)?;
        *total = total.checked_add(added).ok_or(Some(*total))?;
        Ok(())
    }

    fn detail(what: String, before: Option<u64>) -> String {
        match before {
            None => format!("{what}, more than a 64-bit count holds"),
            Some(before) => format!(
                "{what} on top of the {before} of the layers before it is more than a 64-bit \
                 count holds"
            ),
        }
    }
}

/// One layer's planning: its name and field, the sample that reaches it, the plan's counts,
/// and the registry, for a layer that plans a list of its own (a residual block).
pub struct PlanStep<'a> {
    /// The layer's `type` (`"conv2d"`), for messages.
    pub name: &'static str,
    /// The layer's path in the spec (`model.layers[2]`).
    pub at: &'a str,
    pub input: &'a Sample,
    counts: &'a mut Counts,
    registry: Registry,
}

impl<'a> PlanStep<'a> {
    /// The path of one of the layer's settings (`model.layers[2].out`).
    pub fn field(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.at)
    }

    /// The layer cannot take what reaches it.
    pub fn mismatch(&self, needs: &str) -> SpecError {
        SpecError::new(
            self.at,
            format!(
                "{} needs {needs}, but its input is {}",
                self.name,
                self.input.describe()
            ),
        )
    }

    /// The layer's output has more values than a `usize` counts; `lead` says what makes it
    /// ("its output is" when nothing but the layer's own size).
    pub fn too_large(&self, field: String, output: &[usize], lead: &str) -> SpecError {
        SpecError::new(
            field,
            format!(
                "{}'s output size overflows: {lead} {output:?}, more values than a 64-bit size \
                 holds",
                self.name
            ),
        )
    }

    /// The per-sample shape of the values that reach the layer; token ids are refused (only
    /// an embedding reads them).
    pub fn values(&self) -> Result<&'a [usize], SpecError> {
        match self.input {
            Sample::Values(dims) => Ok(dims),
            Sample::Tokens { .. } => {
                Err(self.mismatch("values: the token ids must go through an embedding first"))
            }
        }
    }

    /// Adds the layer's parameters (`None`: its own count overflowed), an error naming
    /// `field` and `what` the parameters are if the sum overflows.
    pub fn add_parameters(
        &mut self,
        added: Option<u64>,
        field: &str,
        what: impl FnOnce() -> String,
    ) -> Result<(), SpecError> {
        self.counts.add_parameters(added, field, self.name, what)
    }

    /// Adds values per sample the native step keeps beyond those of
    /// [`Layer::saved_values`] (a convolution's patches), as [`PlanStep::add_parameters`].
    pub fn add_activations(
        &mut self,
        added: Option<u64>,
        field: &str,
        what: impl FnOnce() -> String,
    ) -> Result<(), SpecError> {
        self.counts.add_activations(added, field, self.name, what)
    }

    /// Plans a list inside the layer (`field`: its path), on `sample`.
    pub fn plan_list(
        &mut self,
        layers: &[LayerSpec],
        sample: Sample,
        field: &str,
    ) -> Result<(Vec<Box<dyn Layer>>, Sample), SpecError> {
        plan_list(layers, sample, field, self.counts, self.registry, None)
    }
}

/// Plans a list of layers on `sample`, each by `registry`, adding up `counts`;
/// `layer_outputs`, when given, receives each layer's per-sample output shape.
pub fn plan_list(
    layers: &[LayerSpec],
    mut sample: Sample,
    field: &str,
    counts: &mut Counts,
    registry: Registry,
    mut layer_outputs: Option<&mut Vec<Vec<usize>>>,
) -> Result<(Vec<Box<dyn Layer>>, Sample), SpecError> {
    let mut planned = Vec::with_capacity(layers.len());
    for (index, layer) in layers.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let name = layer.name();
        let (layer_plan, next) = registry(
            layer,
            &mut PlanStep {
                name,
                at: &at,
                input: &sample,
                counts,
                registry,
            },
        )?;
        if let Sample::Values(dims) = &next {
            // Each layer checks the sizes it makes; this is the invariant they keep.
            let values = element_count(dims).ok_or_else(|| {
                SpecError::new(
                    at.as_str(),
                    format!(
                        "{name}'s output size overflows: its output is {dims:?}, more values \
                         than a 64-bit size holds"
                    ),
                )
            })? as u64;
            let kept = values
                .checked_mul(2)
                .and_then(|both| both.checked_add(layer_plan.saved_values(values)?));
            counts.add_activations(kept, &at, name, || {
                format!("the values it keeps for its output {dims:?}")
            })?;
            if let Some(outputs) = layer_outputs.as_deref_mut() {
                outputs.push(dims.clone());
            }
        }
        planned.push(layer_plan);
        sample = next;
    }
    Ok((planned, sample))
}
