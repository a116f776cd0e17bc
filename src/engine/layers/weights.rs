//! The tensors a layer declares (name, shape, PyTorch's default initialisation), and a
//! layer's view of the model's tensors on candle, in the order it declared them.

use candle_core::Var;

use super::Layer;

/// How a tensor starts, drawn from the engine's seeded generator in declaration order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// U(-bound, bound): nn.Linear's and nn.Conv2d's weights and biases.
    Uniform {
        bound: f64,
    },
    /// N(0, std^2): nn.Embedding's weight.
    Normal {
        std: f64,
    },
    Ones,
    Zeros,
}

/// One tensor of a model's `state_dict()`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// The `state_dict()` name (`"2.0.weight"`).
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// A buffer (batch norm's running statistics): in the state, not trained.
    pub buffer: bool,
}

/// The tensors of a list of layers, named as `torch.nn.Sequential` names them.
#[derive(Debug, Default)]
pub struct Tensors {
    prefix: String,
    list: Vec<TensorSpec>,
}

impl Tensors {
    /// The tensors of `layers`, each layer's under its index, in declaration order.
    pub fn of(layers: &[Box<dyn Layer>]) -> Vec<TensorSpec> {
        let mut tensors = Tensors::default();
        tensors.layers(layers);
        tensors.list
    }

    /// Declares `layers` as a nested `nn.Sequential` would: each under its index.
    pub fn layers(&mut self, layers: &[Box<dyn Layer>]) {
        for (index, layer) in layers.iter().enumerate() {
            let outer = std::mem::take(&mut self.prefix);
            self.prefix = format!("{outer}{index}.");
            layer.tensors(self);
            self.prefix = outer;
        }
    }

    /// A trained parameter.
    pub fn parameter(&mut self, name: &str, shape: Vec<usize>, init: Init) {
        self.push(name, shape, init, false);
    }

    /// A buffer: part of the state, not trained.
    pub fn buffer(&mut self, name: &str, shape: Vec<usize>, init: Init) {
        self.push(name, shape, init, true);
    }

    fn push(&mut self, name: &str, shape: Vec<usize>, init: Init, buffer: bool) {
        self.list.push(TensorSpec {
            name: format!("{}{name}", self.prefix),
            shape,
            init,
            buffer,
        });
    }
}

/// The model's parameters and buffers as the layers of a forward pass take them, each layer
/// what it declared, in order.
pub struct Weights<'a> {
    parameters: &'a [Var],
    buffers: &'a [Var],
}

impl<'a> Weights<'a> {
    pub fn new(parameters: &'a [Var], buffers: &'a [Var]) -> Self {
        Self {
            parameters,
            buffers,
        }
    }

    /// The layer's next `N` parameters.
    pub fn parameters<const N: usize>(&mut self) -> [&'a Var; N] {
        take(&mut self.parameters)
    }

    /// The layer's next `N` buffers.
    pub fn buffers<const N: usize>(&mut self) -> [&'a Var; N] {
        take(&mut self.buffers)
    }
}

fn take<'a, const N: usize>(vars: &mut &'a [Var]) -> [&'a Var; N] {
    let (taken, rest) = vars.split_at(N);
    *vars = rest;
    std::array::from_fn(|index| &taken[index])
}
