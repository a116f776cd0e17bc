//! The job spec: what a user asks for, with every default filled in, parsed so that an
//! unknown or invalid field is an error that names it, and checked against the limits before
//! any work starts. The floor of the engine: it imports no model, backend or admission, and
//! does no I/O.
//!
//! - this file: the type tree of a job spec;
//! - [`layers`]: the layer types of a layer list (`"arch": "sequential"`) and their checks;
//! - [`recipes`]: race recipes (`"kind": "compare"`);
//! - [`defaults`]: every default, the schedules' included;
//! - `validate`: the checks parsing cannot make, into a [`ValidSpec`];
//! - `error`: [`SpecError`], naming the field.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

pub mod defaults;
mod error;
pub mod layers;
pub mod recipes;
#[cfg(test)]
mod tests;
mod validate;

pub use error::{json_error, SpecError};
pub use layers::{GeluApproximation, LayerSpec};
use recipes::recipe_list;
pub use recipes::{
    PlateauMode, Recipe, RecipeSchedule, ThresholdMode, COMPARE_DEFAULT_SEEDS,
    COMPARE_DEFAULT_TARGET, MAX_COMPARE_SEEDS, MAX_RECIPES,
};
pub use validate::ValidSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    RangeTest,
    Sweep,
    #[default]
    Tune,
    /// A race of training recipes, each at its own tuned learning rate.
    Compare,
}

impl JobKind {
    pub const ALL: [JobKind; 4] = [
        JobKind::RangeTest,
        JobKind::Sweep,
        JobKind::Tune,
        JobKind::Compare,
    ];

    /// The kind's name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::RangeTest => "range_test",
            JobKind::Sweep => "sweep",
            JobKind::Tune => "tune",
            JobKind::Compare => "compare",
        }
    }

    /// The kind named `text` (its JSON name), if any.
    pub fn parse(text: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default)]
    pub kind: JobKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub data: DataSpec,
    #[serde(default)]
    pub task: TaskChoice,
    #[serde(default = "defaults::validation_fraction")]
    pub validation_fraction: f64,
    #[serde(default)]
    pub normalize: Normalize,
    #[serde(default)]
    pub plan: Plan,
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default, skip_serializing_if = "BackendChoice::is_auto")]
    pub backend: BackendChoice,
    #[serde(default)]
    pub range_test: RangeTestSpec,
    #[serde(default)]
    pub sweep: SweepSpec,
    #[serde(default, skip_serializing_if = "Budget::is_default")]
    pub budget: Budget,
    /// Initial weights instead of random ones (layer-list models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSpec>,
    /// `compare` only: the recipes raced (default: the five of [`Recipe::DEFAULTS`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "recipe_list"
    )]
    pub recipes: Option<Vec<Recipe>>,
    /// `compare` only: full runs per recipe, each with its own initial weights and data order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<usize>,
    /// `compare` only: the fraction of the best recipe's final accuracy (or, for regression,
    /// the best final loss divided by it) a recipe must reach to count as there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
}

/// Where a job's initial weights come from: `{"weights": {"path": "w.safetensors"}}` or
/// `{"weights": {"id": "weights_..."}}`, the `state_dict()` of the equivalent
/// `torch.nn.Sequential` saved with safetensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    pub weights: WeightsSource,
}

/// Exactly one of a file or an upload, so that no reader has to choose between the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "WeightsFields")]
pub enum WeightsSource {
    /// A safetensors file on this machine (`lrtune run` and `check`).
    Path(String),
    /// A file uploaded with `POST /v1/weights` (the server, which reads no local files).
    Id(String),
}

/// `init.weights` as written, before exactly one source is required of it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsFields {
    path: Option<String>,
    id: Option<String>,
}

impl TryFrom<WeightsFields> for WeightsSource {
    type Error = String;

    fn try_from(fields: WeightsFields) -> Result<WeightsSource, String> {
        match (fields.path, fields.id) {
            (Some(path), None) => Ok(WeightsSource::Path(path)),
            (None, Some(id)) => Ok(WeightsSource::Id(id)),
            (Some(_), Some(_)) => Err("give either path or id, not both".to_string()),
            (None, None) => Err(
                "give path (a safetensors file) or id (weights uploaded with POST /v1/weights)"
                    .to_string(),
            ),
        }
    }
}

/// The most optimizer steps a whole job (range test and sweep) may spend. Either bound may
/// be given; the tighter one wins. Neither: the range test plus [`Budget::DEFAULT_MULTIPLE`]
/// times the planned run, at most [`Budget::DEFAULT_STEPS`] steps in all, but never under
/// [`Budget::FLOOR_MULTIPLE`] times the planned run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// A multiple of the planned run's optimizer steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_multiple: Option<f64>,
    /// Optimizer steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
}

impl Budget {
    /// A small plan affords several full-length runs in seconds (a screening, the best two
    /// and three more: steps past the range, seeds or probes between candidates)...
    pub const DEFAULT_MULTIPLE: f64 = 5.0;
    /// ...a long plan cannot: past this many steps the default stops growing...
    pub const DEFAULT_STEPS: usize = 2_500;
    /// ...though it always allows twice the planned run.
    pub const FLOOR_MULTIPLE: f64 = 2.0;

    fn is_default(&self) -> bool {
        *self == Budget::default()
    }

    /// The job's budget in optimizer steps, for a planned run of `plan_steps` after a range
    /// test of `range_steps`.
    pub fn steps_for(&self, plan_steps: usize, range_steps: usize) -> usize {
        let plan = plan_steps as f64;
        let given = [
            self.plan_multiple.map(|multiple| multiple * plan),
            self.steps.map(|steps| steps as f64),
        ];
        let bound = given.into_iter().flatten().fold(f64::INFINITY, f64::min);
        let steps = if bound.is_finite() {
            bound
        } else {
            (range_steps as f64 + Self::DEFAULT_MULTIPLE * plan)
                .min(Self::DEFAULT_STEPS as f64)
                .max(Self::FLOOR_MULTIPLE * plan)
        };
        steps.floor().min(usize::MAX as f64) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Classification,
    Regression,
    LanguageModel,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Classification, Task::Regression, Task::LanguageModel];

    /// The task's name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Regression => "regression",
            Task::LanguageModel => "language_model",
        }
    }

    /// The task named `text` (its JSON name), if any.
    pub fn parse(text: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|task| task.as_str() == text)
    }
}

/// Where the data comes from. One struct rather than an untagged enum so that a wrong
/// combination gets a message naming the field instead of "matched no variant".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<Builtin>,
    /// Rows to generate for the generator builtins (`spirals`, `blobs`, `sine`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_dataset_id: Option<String>,
    /// A local file (`lrtune run` only): `.csv` or `.txt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_path: Option<String>,
    /// CSV target column; the last column when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    Mnist10k,
    Spirals,
    Blobs,
    Sine,
}

impl Builtin {
    pub fn is_generator(self) -> bool {
        !matches!(self, Builtin::Mnist10k)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskChoice {
    #[default]
    Auto,
    Classification,
    Regression,
    LanguageModel,
}

impl TaskChoice {
    pub fn fixed(self) -> Option<Task> {
        match self {
            TaskChoice::Auto => None,
            TaskChoice::Classification => Some(Task::Classification),
            TaskChoice::Regression => Some(Task::Regression),
            TaskChoice::LanguageModel => Some(Task::LanguageModel),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    #[default]
    Standard,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Epochs of the real training run the recommendation is for.
    #[serde(default = "defaults::plan_epochs")]
    pub epochs: usize,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            epochs: defaults::plan_epochs(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Relu,
    Gelu,
    Tanh,
    Silu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    Mlp {
        #[serde(default = "defaults::mlp_hidden")]
        hidden: Vec<usize>,
        #[serde(default)]
        activation: Activation,
        #[serde(default)]
        dropout: f64,
    },
    Cnn {
        #[serde(default = "defaults::cnn_channels")]
        channels: Vec<usize>,
        #[serde(default = "defaults::cnn_hidden")]
        hidden: usize,
    },
    Transformer {
        #[serde(default = "defaults::d_model")]
        d_model: usize,
        #[serde(default = "defaults::heads")]
        heads: usize,
        #[serde(default = "defaults::layers")]
        layers: usize,
        #[serde(default = "defaults::context")]
        context: usize,
    },
    Linear,
    /// The user's own network as a list of PyTorch layers ([`LayerSpec`]).
    Sequential {
        layers: Vec<LayerSpec>,
        /// The tokens a language model reads (text data only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<usize>,
    },
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec::Mlp {
            hidden: defaults::mlp_hidden(),
            activation: Activation::Relu,
            dropout: 0.0,
        }
    }
}

impl ModelSpec {
    pub fn arch(&self) -> &'static str {
        match self {
            ModelSpec::Mlp { .. } => "mlp",
            ModelSpec::Cnn { .. } => "cnn",
            ModelSpec::Transformer { .. } => "transformer",
            ModelSpec::Linear => "linear",
            ModelSpec::Sequential { .. } => "sequential",
        }
    }

    /// The characters of context a language model reads (text data is cut to this).
    pub fn context(&self) -> Option<usize> {
        match self {
            ModelSpec::Transformer { context, .. } => Some(*context),
            ModelSpec::Sequential { context, .. } => *context,
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    Sgd {
        #[serde(default = "defaults::sgd_momentum")]
        momentum: f64,
        #[serde(default)]
        nesterov: bool,
        #[serde(default)]
        weight_decay: f64,
    },
    Adam {
        #[serde(default = "defaults::betas")]
        betas: [f64; 2],
        #[serde(default = "defaults::eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
    Adamw {
        #[serde(default = "defaults::betas")]
        betas: [f64; 2],
        #[serde(default = "defaults::eps")]
        eps: f64,
        #[serde(default = "defaults::adamw_weight_decay")]
        weight_decay: f64,
    },
    /// Prodigy (`prodigyopt.Prodigy`): Adam whose step size `d` is estimated as it trains;
    /// the learning rate scales `d` (1.0 leaves it as estimated).
    Prodigy {
        #[serde(default = "defaults::betas")]
        betas: [f64; 2],
        /// `None`: the square root of beta2, as the library does.
        #[serde(default)]
        beta3: Option<f64>,
        #[serde(default = "defaults::eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
        /// AdamW-style weight decay (the library's default) rather than L2.
        #[serde(default = "defaults::enabled")]
        decouple: bool,
        #[serde(default = "defaults::prodigy_d0")]
        d0: f64,
        #[serde(default = "defaults::prodigy_d_coef")]
        d_coef: f64,
        /// The most `d` may grow in a step, as a factor; `None`: unbounded (the library's
        /// `inf`).
        #[serde(default)]
        growth_rate: Option<f64>,
        #[serde(default)]
        use_bias_correction: bool,
        #[serde(default)]
        safeguard_warmup: bool,
    },
    /// Schedule-free AdamW (`schedulefree.AdamWScheduleFree`): trains at `y`, evaluates at
    /// the average `x`.
    ScheduleFreeAdamw {
        #[serde(default = "defaults::betas")]
        betas: [f64; 2],
        #[serde(default = "defaults::eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, deserialize_with = "warmup_steps")]
        warmup_steps: usize,
        #[serde(default)]
        r: f64,
        #[serde(default = "defaults::weight_lr_power")]
        weight_lr_power: f64,
    },
    /// Schedule-free SGD (`schedulefree.SGDScheduleFree`): trains at `y`, evaluates at the
    /// average `x`.
    ScheduleFreeSgd {
        #[serde(default = "defaults::sgd_momentum")]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, deserialize_with = "warmup_steps")]
        warmup_steps: usize,
        #[serde(default)]
        r: f64,
        #[serde(default = "defaults::weight_lr_power")]
        weight_lr_power: f64,
    },
}

/// A schedule-free optimizer's `warmup_steps`. Inside the internally tagged `OptimizerSpec`
/// serde no longer knows the field's path, so its error names the field for `path_error`.
fn warmup_steps<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    usize::deserialize(deserializer).map_err(|cause| {
        de::Error::custom(format!("{}{cause}", error::field_prefix("warmup_steps")))
    })
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec::Sgd {
            momentum: defaults::sgd_momentum(),
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl OptimizerSpec {
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerSpec::Sgd { .. } => "sgd",
            OptimizerSpec::Adam { .. } => "adam",
            OptimizerSpec::Adamw { .. } => "adamw",
            OptimizerSpec::Prodigy { .. } => "prodigy",
            OptimizerSpec::ScheduleFreeAdamw { .. } => "schedule_free_adamw",
            OptimizerSpec::ScheduleFreeSgd { .. } => "schedule_free_sgd",
        }
    }

    /// SGD momentum or Adam's beta1: the value OneCycle cycles.
    pub fn momentum(&self) -> f64 {
        match self {
            OptimizerSpec::Sgd { momentum, .. }
            | OptimizerSpec::ScheduleFreeSgd { momentum, .. } => *momentum,
            OptimizerSpec::Adam { betas, .. }
            | OptimizerSpec::Adamw { betas, .. }
            | OptimizerSpec::Prodigy { betas, .. }
            | OptimizerSpec::ScheduleFreeAdamw { betas, .. } => betas[0],
        }
    }

    /// The reference library's default learning rate for the learning-rate-free optimizers
    /// (Prodigy 1.0, schedule-free AdamW 0.0025, schedule-free SGD 1.0); `None` for those
    /// whose learning rate is tuned.
    pub fn default_lr(&self) -> Option<f64> {
        match self {
            OptimizerSpec::Sgd { .. }
            | OptimizerSpec::Adam { .. }
            | OptimizerSpec::Adamw { .. } => None,
            OptimizerSpec::Prodigy { .. } => Some(1.0),
            OptimizerSpec::ScheduleFreeAdamw { .. } => Some(0.0025),
            OptimizerSpec::ScheduleFreeSgd { .. } => Some(1.0),
        }
    }
}

/// Which training step runs the model: the hand-written CPU step (`native`), candle's
/// autograd (`candle`: any device; the reference the native step is tested against), or
/// `auto`: native on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    #[default]
    Auto,
    Native,
    Candle,
}

impl BackendChoice {
    pub fn is_auto(&self) -> bool {
        *self == BackendChoice::Auto
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    #[default]
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrMode {
    #[default]
    Exp,
    Linear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RangeLoss {
    #[default]
    Train,
    Validation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeTestSpec {
    #[serde(default = "defaults::start_lr")]
    pub start_lr: f64,
    #[serde(default = "defaults::end_lr")]
    pub end_lr: f64,
    #[serde(default = "defaults::range_steps")]
    pub steps: usize,
    #[serde(default)]
    pub mode: LrMode,
    #[serde(default = "defaults::smoothing")]
    pub smoothing: f64,
    #[serde(default = "defaults::diverge_factor")]
    pub diverge_factor: f64,
    #[serde(default)]
    pub loss: RangeLoss,
}

impl Default for RangeTestSpec {
    fn default() -> Self {
        Self {
            start_lr: defaults::start_lr(),
            end_lr: defaults::end_lr(),
            steps: defaults::range_steps(),
            mode: LrMode::Exp,
            smoothing: defaults::smoothing(),
            diverge_factor: defaults::diverge_factor(),
            loss: RangeLoss::Train,
        }
    }
}

impl RangeTestSpec {
    /// The learning rate of point `step` (0-based) of the test.
    pub fn lr_at(&self, step: usize) -> f64 {
        if self.steps <= 1 {
            return self.start_lr;
        }
        let fraction = step as f64 / (self.steps - 1) as f64;
        match self.mode {
            LrMode::Exp => self.start_lr * (self.end_lr / self.start_lr).powf(fraction),
            LrMode::Linear => self.start_lr + (self.end_lr - self.start_lr) * fraction,
        }
    }
}

/// `"auto"` or an explicit list of peak learning rates.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Candidates {
    #[default]
    Auto,
    List(Vec<f64>),
}

impl Serialize for Candidates {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Candidates::Auto => serializer.serialize_str("auto"),
            Candidates::List(values) => values.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Candidates {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CandidatesVisitor;
        impl<'de> de::Visitor<'de> for CandidatesVisitor {
            type Value = Candidates;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a list of peak learning rates")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Candidates, E> {
                if value == "auto" {
                    Ok(Candidates::Auto)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(value), &self))
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Candidates, A::Error> {
                let mut values = Vec::new();
                while let Some(value) = seq.next_element::<f64>()? {
                    values.push(value);
                }
                Ok(Candidates::List(values))
            }
        }
        deserializer.deserialize_any(CandidatesVisitor)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    #[serde(default)]
    pub candidates: Candidates,
    #[serde(default = "defaults::sweep_count")]
    pub count: usize,
    /// The horizon every candidate is judged at, in epochs. Absent: chosen from the budget,
    /// up to the planned run itself (see `sweep::plan_search`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(default = "defaults::sweep_seeds")]
    pub seeds: usize,
    #[serde(default)]
    pub schedule: OneCycleShape,
}

impl Default for SweepSpec {
    fn default() -> Self {
        Self {
            candidates: Candidates::Auto,
            count: defaults::sweep_count(),
            epochs: None,
            seeds: defaults::sweep_seeds(),
            schedule: OneCycleShape::default(),
        }
    }
}

/// OneCycleLR's `anneal_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anneal {
    #[default]
    Cos,
    Linear,
}

/// The OneCycle parameters other than the peak and the length, shared by the sweep and
/// the recommended schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneCycleShape {
    #[serde(default = "defaults::pct_start")]
    pub pct_start: f64,
    #[serde(default)]
    pub anneal: Anneal,
    #[serde(default = "defaults::div_factor")]
    pub div_factor: f64,
    #[serde(default = "defaults::final_div_factor")]
    pub final_div_factor: f64,
    #[serde(default)]
    pub three_phase: bool,
    #[serde(default = "defaults::enabled")]
    pub cycle_momentum: bool,
    #[serde(default = "defaults::one_cycle_base_momentum")]
    pub base_momentum: f64,
    #[serde(default = "defaults::one_cycle_max_momentum")]
    pub max_momentum: f64,
}

impl Default for OneCycleShape {
    fn default() -> Self {
        Self {
            pct_start: defaults::pct_start(),
            anneal: Anneal::default(),
            div_factor: defaults::div_factor(),
            final_div_factor: defaults::final_div_factor(),
            three_phase: false,
            cycle_momentum: true,
            base_momentum: defaults::one_cycle_base_momentum(),
            max_momentum: defaults::one_cycle_max_momentum(),
        }
    }
}

/// The longest name of a job or an upload, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// The rules for a name a user gives a job, a dataset or weights: at most
/// [`MAX_NAME_CHARS`] characters and no control characters (a name is shown in logs, lists
/// and the dashboard). The error is the message, for the caller to attach to its field.
pub fn check_name(name: &str) -> Result<(), String> {
    let length = name.chars().count();
    if length > MAX_NAME_CHARS {
        return Err(format!(
            "must be at most {MAX_NAME_CHARS} characters, got {length}"
        ));
    }
    if let Some((position, control)) = name.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(format!(
            "must not contain control characters, found U+{:04X} at character {}",
            u32::from(control),
            position + 1
        ));
    }
    Ok(())
}
