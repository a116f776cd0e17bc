//! The model a job trains: its checked plan (a layer list; a preset is built as the list it
//! expands to) and its weights, drawn from the engine's own seeded generator so that a run is
//! reproducible, with PyTorch's default initialisation and `state_dict()` names.
//!
//! - `plan`: the checked plan of a layer list, planned layer by layer by the families of
//!   `engine::layers` through `registry`;
//! - `presets`: the presets as layer lists, with their own checks;
//! - `checkpoint`: PyTorch weights (safetensors) read, checked and loaded.
//!
//! A model knows no backend: `engine::backend` trains it, each backend with what it keeps
//! between steps, bound to it by `engine::trainer`.

use candle_core::{DType, Device, Tensor, Var};

use crate::engine::events::EngineError;
use crate::engine::layers::weights::Init;
use crate::engine::rng::Rng;
use crate::engine::spec::{ModelSpec, SpecError, Task};

pub mod checkpoint;
#[cfg(test)]
pub(crate) mod golden;
pub mod plan;
#[cfg(test)]
mod plan_fuzz;
pub mod presets;
mod registry;
#[cfg(test)]
mod tests;

pub use checkpoint::{
    check_state_dict, inspect_safetensors, load_initial_weights, read_safetensors,
};
pub use plan::{plan_layers, Plan};
pub use presets::{layer_list, plan};

/// What the model reads and predicts, taken from the training data.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Per-sample input shape: `[features]`, `[channels, height, width]` or `[context]`.
    pub input: Vec<usize>,
    /// Classes, regression outputs or vocabulary size.
    pub output: usize,
    pub task: Task,
}

pub struct Model {
    plan: Plan,
    shape: ModelShape,
    /// Trainable parameters by `state_dict()` name, in `named_parameters()` order.
    parameters: Vec<(String, Var)>,
    /// Batch norm's running statistics by name: in the state, not trained (updated in place
    /// in training mode).
    buffers: Vec<(String, Var)>,
    /// The parameters (what the optimizer steps).
    vars: Vec<Var>,
    buffer_vars: Vec<Var>,
    device: Device,
}

impl Model {
    /// Builds the model a spec asks for, checking that it fits the data.
    pub fn build(
        spec: &ModelSpec,
        shape: &ModelShape,
        seed: u64,
        device: &Device,
    ) -> Result<Model, ModelError> {
        let mut rng = Rng::derive(seed, 0x1417);
        let plan = plan(spec, shape)?;
        let mut parameters = Vec::new();
        let mut buffers = Vec::new();
        for tensor in plan.tensors() {
            let var = draw(&tensor.shape, tensor.init, &mut rng, device)?;
            let list = if tensor.buffer {
                &mut buffers
            } else {
                &mut parameters
            };
            list.push((tensor.name, var));
        }
        let vars = parameters.iter().map(|(_, var)| var.clone()).collect();
        let buffer_vars = buffers.iter().map(|(_, var)| var.clone()).collect();
        Ok(Model {
            plan,
            shape: shape.clone(),
            parameters,
            buffers,
            vars,
            buffer_vars,
            device: device.clone(),
        })
    }

    /// The parameters in `named_parameters()` order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The parameters' `state_dict()` names, in [`Model::vars`] order.
    pub fn parameter_names(&self) -> impl Iterator<Item = &String> {
        self.parameters.iter().map(|(name, _)| name)
    }

    /// Batch norm's running statistics (part of a snapshot, not of the optimizer's state).
    pub fn buffers(&self) -> &[Var] {
        &self.buffer_vars
    }

    /// The running statistics' `state_dict()` names, in [`Model::buffers`] order.
    pub fn buffer_names(&self) -> impl Iterator<Item = &String> {
        self.buffers.iter().map(|(name, _)| name)
    }

    /// The checked plan the model was built from.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|var| var.elem_count()).sum()
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Deep copies of every weight and running statistic (a `Var` clone would share storage
    /// with the live one).
    pub fn snapshot(&self) -> candle_core::Result<Vec<Tensor>> {
        self.state_vars()
            .map(|var| var.as_tensor().copy())
            .collect()
    }

    pub fn restore(&self, snapshot: &[Tensor]) -> candle_core::Result<()> {
        for (var, saved) in self.state_vars().zip(snapshot) {
            var.set(saved)?;
        }
        Ok(())
    }

    /// The parameters, then batch norm's running statistics: everything training changes.
    fn state_vars(&self) -> impl Iterator<Item = &Var> {
        self.vars.iter().chain(&self.buffer_vars)
    }

    /// Sets the weights from a PyTorch `state_dict()` of the equivalent `nn.Sequential`.
    pub fn load_state_dict(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<(), SpecError> {
        let named: Vec<&(String, Var)> = self.parameters.iter().chain(&self.buffers).collect();
        checkpoint::load(&named, tensors)
    }
}

/// A tensor of `shape` as `init` starts it, drawing from `rng` in order.
fn draw(shape: &[usize], init: Init, rng: &mut Rng, device: &Device) -> candle_core::Result<Var> {
    let count: usize = shape.iter().product();
    let values: Vec<f32> = match init {
        Init::Uniform { bound } => (0..count)
            .map(|_| rng.uniform(-bound, bound) as f32)
            .collect(),
        Init::Normal { std } => (0..count).map(|_| (rng.normal() * std) as f32).collect(),
        Init::Ones => return Var::ones(shape, DType::F32, device),
        Init::Zeros => return Var::zeros(shape, DType::F32, device),
    };
    Var::from_tensor(&Tensor::from_vec(values, shape, device)?)
}

/// Why a model cannot be built for the data: a spec problem (422) or a candle failure.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("building the model: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<ModelError> for EngineError {
    fn from(error: ModelError) -> Self {
        match error {
            ModelError::Spec(spec) => EngineError::Spec(spec),
            ModelError::Candle(candle) => EngineError::Candle(candle),
        }
    }
}
