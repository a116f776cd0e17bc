//! The job spec (DESIGN section 2): what a user asks for, with every default filled in,
//! parsed so that an unknown or invalid field is an error that names it, and checked against
//! the limits before any work starts.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::ops::Deref;

use super::data::Task;
use super::json::JsonError;
use super::limits::Limits;
use super::model::layers::LayerSpec;
use super::schedule::{Anneal, PlateauMode, ThresholdMode};

/// An invalid spec: which field, and what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

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

/// A training recipe: an optimizer and a schedule, raced at its own tuned learning rate. In a
/// spec it is the name of a default recipe or an object with all three fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    pub name: String,
    pub optimizer: OptimizerSpec,
    pub schedule: RecipeSchedule,
}

/// A schedule whose learning rate is the recipe's tuned one and whose length is the run's;
/// lengths are in epochs so that a recipe means the same on any data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RecipeSchedule {
    /// OneCycleLR with the shape in `sweep.schedule`, peaking at the tuned learning rate.
    OneCycle,
    Constant,
    /// ReduceLROnPlateau stepped on the validation loss (`min`) or accuracy (`max`) at each
    /// evaluation point of the run; `patience` and `cooldown` count evaluation points.
    ReduceOnPlateau {
        #[serde(default)]
        mode: PlateauMode,
        #[serde(default = "defaults::recipe_plateau_factor")]
        factor: f64,
        #[serde(default = "defaults::recipe_plateau_patience")]
        patience: usize,
        #[serde(default = "defaults::recipe_plateau_threshold")]
        threshold: f64,
        #[serde(default)]
        threshold_mode: ThresholdMode,
        #[serde(default)]
        cooldown: usize,
        #[serde(default)]
        min_lr: f64,
        #[serde(default = "defaults::recipe_plateau_eps")]
        eps: f64,
    },
    /// CosineAnnealingWarmRestarts with a first cycle of `T_0_epochs` epochs.
    CosineWarmRestarts {
        #[serde(rename = "T_0_epochs", default = "defaults::one")]
        t_0_epochs: usize,
        #[serde(rename = "T_mult", default = "defaults::two")]
        t_mult: usize,
        #[serde(default)]
        eta_min: f64,
    },
    /// LinearLR warm-up over `warmup_fraction` of the run, then CosineAnnealingLR to its end.
    WarmupCosine {
        #[serde(default = "defaults::warmup_fraction")]
        warmup_fraction: f64,
    },
    /// CosineAnnealingLR over the whole run.
    Cosine {
        #[serde(default)]
        eta_min: f64,
    },
    /// StepLR every `step_epochs` epochs.
    Step {
        step_epochs: usize,
        #[serde(default = "defaults::recipe_step_gamma")]
        gamma: f64,
    },
}

impl Recipe {
    /// The default race: Adam as most teams use it, against SGD with OneCycle and three
    /// other common recipes.
    pub const DEFAULTS: [&'static str; 5] = [
        "sgd_one_cycle",
        "adam_constant",
        "adam_plateau",
        "sgd_warm_restarts",
        "adamw_warmup_cosine",
    ];

    /// A default recipe by name.
    pub fn named(name: &str) -> Option<Recipe> {
        let sgd = OptimizerSpec::default();
        let adam = OptimizerSpec::Adam {
            betas: defaults::betas(),
            eps: defaults::eps(),
            weight_decay: 0.0,
        };
        let (optimizer, schedule) = match name {
            "sgd_one_cycle" => (sgd, RecipeSchedule::OneCycle),
            "adam_constant" => (adam, RecipeSchedule::Constant),
            "adam_plateau" => (
                adam,
                RecipeSchedule::ReduceOnPlateau {
                    mode: PlateauMode::Min,
                    factor: defaults::recipe_plateau_factor(),
                    patience: defaults::recipe_plateau_patience(),
                    threshold: defaults::recipe_plateau_threshold(),
                    threshold_mode: ThresholdMode::Rel,
                    cooldown: 0,
                    min_lr: 0.0,
                    eps: defaults::recipe_plateau_eps(),
                },
            ),
            "sgd_warm_restarts" => (
                sgd,
                RecipeSchedule::CosineWarmRestarts {
                    t_0_epochs: 1,
                    t_mult: 2,
                    eta_min: 0.0,
                },
            ),
            "adamw_warmup_cosine" => (
                OptimizerSpec::Adamw {
                    betas: defaults::betas(),
                    eps: defaults::eps(),
                    weight_decay: defaults::adamw_weight_decay(),
                },
                RecipeSchedule::WarmupCosine {
                    warmup_fraction: defaults::warmup_fraction(),
                },
            ),
            _ => return None,
        };
        Some(Recipe {
            name: name.to_string(),
            optimizer,
            schedule,
        })
    }
}

/// A recipe in a spec: a default's name, or a whole recipe object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeObject {
    name: String,
    optimizer: OptimizerSpec,
    schedule: RecipeSchedule,
}

impl<'de> Deserialize<'de> for RecipeChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = RecipeChoice;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a recipe name ({}) or {{name, optimizer, schedule}}",
                    Recipe::DEFAULTS.join(", ")
                )
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<RecipeChoice, E> {
                Recipe::named(name).map(RecipeChoice).ok_or_else(|| {
                    E::custom(format!(
                        "unknown recipe `{name}`: the defaults are {}; give any other as {{name, optimizer, schedule}}",
                        Recipe::DEFAULTS.join(", ")
                    ))
                })
            }
            fn visit_map<M: de::MapAccess<'de>>(self, map: M) -> Result<RecipeChoice, M::Error> {
                let object = RecipeObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RecipeChoice(Recipe {
                    name: object.name,
                    optimizer: object.optimizer,
                    schedule: object.schedule,
                }))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// What a spec's `recipes` entry parses into.
struct RecipeChoice(Recipe);

fn recipe_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<Recipe>>, D::Error> {
    let choices: Vec<RecipeChoice> = Vec::deserialize(deserializer)?;
    Ok(Some(choices.into_iter().map(|choice| choice.0).collect()))
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
    /// The user's own network as a list of PyTorch layers (`sequential.rs`).
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
        }
    }

    /// SGD momentum or Adam's beta1: the value OneCycle cycles.
    pub fn momentum(&self) -> f64 {
        match self {
            OptimizerSpec::Sgd { momentum, .. } => *momentum,
            OptimizerSpec::Adam { betas, .. } | OptimizerSpec::Adamw { betas, .. } => betas[0],
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
    #[serde(default = "defaults::yes")]
    pub cycle_momentum: bool,
    #[serde(default = "defaults::base_momentum")]
    pub base_momentum: f64,
    #[serde(default = "defaults::max_momentum")]
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
            base_momentum: defaults::base_momentum(),
            max_momentum: defaults::max_momentum(),
        }
    }
}

pub(crate) mod defaults {
    pub fn validation_fraction() -> f64 {
        0.2
    }
    pub fn batch_size() -> usize {
        64
    }
    pub fn plan_epochs() -> usize {
        10
    }
    pub fn mlp_hidden() -> Vec<usize> {
        vec![128, 128]
    }
    pub fn cnn_channels() -> Vec<usize> {
        vec![16, 32]
    }
    pub fn cnn_hidden() -> usize {
        128
    }
    pub fn d_model() -> usize {
        64
    }
    pub fn heads() -> usize {
        4
    }
    pub fn layers() -> usize {
        2
    }
    pub fn context() -> usize {
        64
    }
    pub fn sgd_momentum() -> f64 {
        0.9
    }
    pub fn betas() -> [f64; 2] {
        [0.9, 0.999]
    }
    pub fn eps() -> f64 {
        1e-8
    }
    pub fn adamw_weight_decay() -> f64 {
        0.01
    }
    pub fn recipe_plateau_factor() -> f64 {
        0.1
    }
    /// Evaluation points (about 25 a run), not PyTorch's 10 epochs.
    pub fn recipe_plateau_patience() -> usize {
        2
    }
    pub fn recipe_plateau_threshold() -> f64 {
        1e-4
    }
    pub fn recipe_plateau_eps() -> f64 {
        1e-8
    }
    pub fn one() -> usize {
        1
    }
    pub fn two() -> usize {
        2
    }
    pub fn warmup_fraction() -> f64 {
        0.05
    }
    pub fn recipe_step_gamma() -> f64 {
        0.1
    }
    pub fn start_lr() -> f64 {
        1e-7
    }
    pub fn end_lr() -> f64 {
        10.0
    }
    pub fn range_steps() -> usize {
        100
    }
    pub fn smoothing() -> f64 {
        0.98
    }
    pub fn diverge_factor() -> f64 {
        4.0
    }
    pub fn sweep_count() -> usize {
        5
    }
    pub fn sweep_seeds() -> usize {
        1
    }
    pub fn pct_start() -> f64 {
        0.3
    }
    pub fn div_factor() -> f64 {
        25.0
    }
    pub fn final_div_factor() -> f64 {
        1e4
    }
    pub fn yes() -> bool {
        true
    }
    pub fn base_momentum() -> f64 {
        0.85
    }
    pub fn max_momentum() -> f64 {
        0.95
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

/// Most recipes in one race.
pub const MAX_RECIPES: usize = 10;
/// Most seeds per recipe in a race.
pub const MAX_COMPARE_SEEDS: usize = 10;
pub const COMPARE_DEFAULT_SEEDS: usize = 2;
pub const COMPARE_DEFAULT_TARGET: f64 = 0.98;

impl RecipeSchedule {
    /// The schedule's `kind`, as in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            RecipeSchedule::OneCycle => "one_cycle",
            RecipeSchedule::Constant => "constant",
            RecipeSchedule::ReduceOnPlateau { .. } => "reduce_on_plateau",
            RecipeSchedule::CosineWarmRestarts { .. } => "cosine_warm_restarts",
            RecipeSchedule::WarmupCosine { .. } => "warmup_cosine",
            RecipeSchedule::Cosine { .. } => "cosine",
            RecipeSchedule::Step { .. } => "step",
        }
    }

    /// The values that do not depend on the run's length; the rest is checked when the
    /// schedule is built for the run.
    fn validate(&self) -> Result<(), SpecError> {
        let fraction = |field: &str, value: f64, what: &str| {
            if value > 0.0 && value < 1.0 {
                Ok(())
            } else {
                Err(SpecError::new(
                    field,
                    format!("must be strictly between 0 and 1 ({what}), got {value}"),
                ))
            }
        };
        let non_negative = |field: &str, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(SpecError::new(
                    field,
                    format!("must be a finite number at least 0, got {value}"),
                ))
            }
        };
        match *self {
            RecipeSchedule::OneCycle | RecipeSchedule::Constant => Ok(()),
            RecipeSchedule::ReduceOnPlateau {
                factor,
                threshold,
                min_lr,
                eps,
                ..
            } => {
                fraction("factor", factor, "the learning rate is multiplied by it")?;
                non_negative("threshold", threshold)?;
                non_negative("min_lr", min_lr)?;
                non_negative("eps", eps)
            }
            RecipeSchedule::CosineWarmRestarts {
                t_0_epochs,
                t_mult,
                eta_min,
            } => {
                if t_0_epochs == 0 {
                    return Err(SpecError::new("T_0_epochs", "must be at least 1 epoch"));
                }
                if t_mult == 0 {
                    return Err(SpecError::new("T_mult", "must be at least 1"));
                }
                non_negative("eta_min", eta_min)
            }
            RecipeSchedule::WarmupCosine { warmup_fraction } => fraction(
                "warmup_fraction",
                warmup_fraction,
                "of the run spent warming up",
            ),
            RecipeSchedule::Cosine { eta_min } => non_negative("eta_min", eta_min),
            RecipeSchedule::Step { step_epochs, gamma } => {
                if step_epochs == 0 {
                    return Err(SpecError::new("step_epochs", "must be at least 1 epoch"));
                }
                fraction("gamma", gamma, "the learning rate is multiplied by it")
            }
        }
    }
}

impl JobSpec {
    /// Parses a spec from JSON; a syntax error, a key given twice, a wrong type or an
    /// unknown field is an error naming the field by its path (`range_test.start_lr`).
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let value = super::json::parse(text.as_bytes()).map_err(json_error)?;
        Self::from_value(value)
    }

    /// Like `from_json`, for a value already parsed (the HTTP body).
    pub fn from_value(value: serde_json::Value) -> Result<JobSpec, SpecError> {
        serde_path_to_error::deserialize(value).map_err(path_error)
    }

    /// Checks every value that parsing cannot: ranges, orderings and limits. What depends on
    /// the data (batch size against rows, model against input shape) is checked when the
    /// data is loaded. Only [`ValidSpec`]'s constructors call it, so that a spec is checked
    /// once, where it enters.
    fn validate(&self, limits: &Limits) -> Result<(), SpecError> {
        if let Some(name) = &self.name {
            check_name(name).map_err(|message| SpecError::new("name", message))?;
        }
        self.validate_data(limits)?;
        if self.backend == BackendChoice::Native && self.device == DeviceChoice::Cuda {
            return Err(SpecError::new(
                "backend",
                "the native backend runs on the CPU: use device \"cpu\" or backend \"candle\"",
            ));
        }
        if let Some(init) = &self.init {
            if !matches!(self.model, ModelSpec::Sequential { .. }) {
                return Err(SpecError::new(
                    "init.weights",
                    format!(
                        "initial weights need a layer-list model (arch \"sequential\"), not arch \"{}\"",
                        self.model.arch()
                    ),
                ));
            }
            let (field, value) = match &init.weights {
                WeightsSource::Path(path) => ("init.weights.path", path),
                WeightsSource::Id(id) => ("init.weights.id", id),
            };
            if value.trim().is_empty() {
                return Err(SpecError::new(field, "must not be empty"));
            }
        }
        let fraction = self.validation_fraction;
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(SpecError::new(
                "validation_fraction",
                format!("must be between 0 and 1 (exclusive), got {fraction}"),
            ));
        }
        if self.plan.epochs == 0 || self.plan.epochs > limits.max_plan_epochs {
            return Err(SpecError::new(
                "plan.epochs",
                format!(
                    "must be between 1 and {}, got {}",
                    limits.max_plan_epochs, self.plan.epochs
                ),
            ));
        }
        if self.batch_size == 0 {
            return Err(SpecError::new("batch_size", "must be at least 1"));
        }
        self.validate_model()?;
        self.validate_optimizer()?;
        self.validate_budget()?;
        if self.kind != JobKind::Sweep {
            self.validate_range_test(limits)?;
        }
        if self.kind != JobKind::RangeTest {
            self.validate_sweep(limits)?;
        }
        self.validate_compare(limits)
    }

    /// The recipes of a `compare` job, defaults filled in.
    pub fn compare_recipes(&self) -> Vec<Recipe> {
        match &self.recipes {
            Some(recipes) => recipes.clone(),
            None => Recipe::DEFAULTS
                .iter()
                .filter_map(|name| Recipe::named(name))
                .collect(),
        }
    }

    pub fn compare_seeds(&self) -> usize {
        self.seeds.unwrap_or(COMPARE_DEFAULT_SEEDS)
    }

    pub fn compare_target(&self) -> f64 {
        self.target.unwrap_or(COMPARE_DEFAULT_TARGET)
    }

    /// A race's tune for one recipe: this spec with the recipe's optimizer, as a `tune`.
    fn recipe_tune(&self, recipe: &Recipe) -> JobSpec {
        JobSpec {
            kind: JobKind::Tune,
            optimizer: recipe.optimizer.clone(),
            recipes: None,
            seeds: None,
            target: None,
            ..self.clone()
        }
    }

    fn validate_compare(&self, limits: &Limits) -> Result<(), SpecError> {
        if self.kind != JobKind::Compare {
            for (field, given) in [
                ("recipes", self.recipes.is_some()),
                ("seeds", self.seeds.is_some()),
                ("target", self.target.is_some()),
            ] {
                if given {
                    return Err(SpecError::new(
                        field,
                        "only applies to kind \"compare\" (for a tune's seeds, see sweep.seeds)",
                    ));
                }
            }
            return Ok(());
        }
        let recipes = self.compare_recipes();
        if recipes.is_empty() || recipes.len() > MAX_RECIPES {
            return Err(SpecError::new(
                "recipes",
                format!(
                    "must list between 1 and {MAX_RECIPES} recipes, got {}",
                    recipes.len()
                ),
            ));
        }
        for (index, recipe) in recipes.iter().enumerate() {
            let field = |name: &str| format!("recipes[{index}].{name}");
            let length = recipe.name.chars().count();
            if length == 0 || length > MAX_NAME_CHARS {
                return Err(SpecError::new(
                    field("name"),
                    format!("must be 1 to {MAX_NAME_CHARS} characters"),
                ));
            }
            if recipes[..index]
                .iter()
                .any(|other| other.name == recipe.name)
            {
                return Err(SpecError::new(
                    field("name"),
                    format!(
                        "`{}` is raced twice: give each recipe its own name",
                        recipe.name
                    ),
                ));
            }
            self.recipe_tune(recipe)
                .validate_optimizer()
                .map_err(|error| {
                    SpecError::new(format!("recipes[{index}].{}", error.field), error.message)
                })?;
            recipe.schedule.validate().map_err(|error| {
                SpecError::new(
                    format!("recipes[{index}].schedule.{}", error.field),
                    error.message,
                )
            })?;
        }
        let seeds = self.compare_seeds();
        if seeds == 0 || seeds > MAX_COMPARE_SEEDS {
            return Err(SpecError::new(
                "seeds",
                format!("must be between 1 and {MAX_COMPARE_SEEDS}, got {seeds}"),
            ));
        }
        let target = self.compare_target();
        if !(target > 0.0 && target <= 1.0) {
            return Err(SpecError::new(
                "target",
                format!(
                    "must be in (0, 1]: the fraction of the best recipe's final accuracy to reach, got {target}"
                ),
            ));
        }
        // The full runs are trainings like a sweep's: their epochs count against the same limit.
        let epochs = recipes.len() * seeds * self.plan.epochs;
        if epochs > limits.max_sweep_epochs {
            return Err(SpecError::new(
                "seeds",
                format!(
                    "{} recipes x {seeds} seeds x {} epochs is {epochs} epochs of full runs, above the limit of {} (max_sweep_epochs): race fewer recipes or seeds, or lower plan.epochs",
                    recipes.len(),
                    self.plan.epochs,
                    limits.max_sweep_epochs
                ),
            ));
        }
        Ok(())
    }

    fn validate_data(&self, limits: &Limits) -> Result<(), SpecError> {
        let data = &self.data;
        let sources = [
            data.builtin.is_some(),
            data.dataset_id.is_some(),
            data.path.is_some(),
        ];
        match sources.iter().filter(|given| **given).count() {
            0 => {
                return Err(SpecError::new(
                    "data",
                    "give one of builtin, dataset_id or path",
                ))
            }
            1 => {}
            _ => {
                return Err(SpecError::new(
                    "data",
                    "give only one of builtin, dataset_id or path",
                ))
            }
        }
        if data.validation_dataset_id.is_some() && data.dataset_id.is_none() {
            return Err(SpecError::new(
                "data.validation_dataset_id",
                "needs data.dataset_id for the training set",
            ));
        }
        if data.validation_path.is_some() && data.path.is_none() {
            return Err(SpecError::new(
                "data.validation_path",
                "needs data.path for the training set",
            ));
        }
        if data.target.is_some() && data.path.is_none() {
            return Err(SpecError::new(
                "data.target",
                "only applies to a CSV given by data.path (an uploaded dataset has its target set at upload)",
            ));
        }
        match (data.builtin, data.samples) {
            (Some(builtin), Some(samples))
                if builtin.is_generator() && (samples < 2 || samples > limits.max_samples) =>
            {
                return Err(SpecError::new(
                    "data.samples",
                    format!(
                        "must be between 2 and {}, got {samples}",
                        limits.max_samples
                    ),
                ));
            }
            (Some(builtin), Some(_)) if builtin.is_generator() => {}
            (_, Some(_)) => {
                return Err(SpecError::new(
                    "data.samples",
                    "only applies to the generators spirals, blobs and sine",
                ))
            }
            _ => {}
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), SpecError> {
        match &self.model {
            ModelSpec::Mlp {
                hidden, dropout, ..
            } => {
                if let Some(index) = hidden.iter().position(|size| *size == 0) {
                    return Err(SpecError::new(
                        format!("model.hidden[{index}]"),
                        "a hidden layer needs at least 1 unit",
                    ));
                }
                if !(0.0..1.0).contains(dropout) {
                    return Err(SpecError::new(
                        "model.dropout",
                        format!("must be in [0, 1), got {dropout}"),
                    ));
                }
            }
            ModelSpec::Cnn { channels, hidden } => {
                if channels.is_empty() {
                    return Err(SpecError::new(
                        "model.channels",
                        "give at least one convolution, e.g. [16, 32]",
                    ));
                }
                if let Some(index) = channels.iter().position(|size| *size == 0) {
                    return Err(SpecError::new(
                        format!("model.channels[{index}]"),
                        "a convolution needs at least 1 channel",
                    ));
                }
                if *hidden == 0 {
                    return Err(SpecError::new("model.hidden", "must be at least 1"));
                }
            }
            ModelSpec::Transformer {
                d_model,
                heads,
                layers,
                context,
            } => {
                if *d_model == 0 {
                    return Err(SpecError::new("model.d_model", "must be at least 1"));
                }
                if *heads == 0 || d_model % heads != 0 {
                    return Err(SpecError::new(
                        "model.heads",
                        format!("must divide d_model ({d_model}), got {heads}"),
                    ));
                }
                if *layers == 0 {
                    return Err(SpecError::new("model.layers", "must be at least 1"));
                }
                if *context < 2 {
                    return Err(SpecError::new("model.context", "must be at least 2"));
                }
            }
            ModelSpec::Linear => {}
            ModelSpec::Sequential { layers, context } => {
                super::model::layers::validate(layers, "model.layers")?;
                if context.is_some_and(|context| context < 2) {
                    return Err(SpecError::new("model.context", "must be at least 2"));
                }
            }
        }
        Ok(())
    }

    fn validate_budget(&self) -> Result<(), SpecError> {
        if let Some(multiple) = self.budget.plan_multiple {
            if !(multiple.is_finite() && multiple > 0.0) {
                return Err(SpecError::new(
                    "budget.plan_multiple",
                    format!("must be positive, got {multiple}"),
                ));
            }
        }
        if self.budget.steps == Some(0) {
            return Err(SpecError::new("budget.steps", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_optimizer(&self) -> Result<(), SpecError> {
        match &self.optimizer {
            OptimizerSpec::Sgd {
                momentum,
                weight_decay,
                nesterov,
            } => {
                if !(0.0..1.0).contains(momentum) {
                    return Err(SpecError::new(
                        "optimizer.momentum",
                        format!("must be in [0, 1), got {momentum}"),
                    ));
                }
                if *nesterov && *momentum == 0.0 {
                    return Err(SpecError::new(
                        "optimizer.nesterov",
                        "needs a momentum above 0",
                    ));
                }
                check_weight_decay(*weight_decay)
            }
            OptimizerSpec::Adam {
                betas,
                eps,
                weight_decay,
            }
            | OptimizerSpec::Adamw {
                betas,
                eps,
                weight_decay,
            } => {
                for (index, beta) in betas.iter().enumerate() {
                    if !(0.0..1.0).contains(beta) {
                        return Err(SpecError::new(
                            format!("optimizer.betas[{index}]"),
                            format!("must be in [0, 1), got {beta}"),
                        ));
                    }
                }
                if !(eps.is_finite() && *eps > 0.0) {
                    return Err(SpecError::new(
                        "optimizer.eps",
                        format!("must be positive, got {eps}"),
                    ));
                }
                check_weight_decay(*weight_decay)
            }
        }
    }

    fn validate_range_test(&self, limits: &Limits) -> Result<(), SpecError> {
        let range = &self.range_test;
        check_positive_lr("range_test.start_lr", range.start_lr)?;
        check_positive_lr("range_test.end_lr", range.end_lr)?;
        if range.start_lr >= range.end_lr {
            return Err(SpecError::new(
                "range_test.start_lr",
                format!(
                    "must be below end_lr ({}), got {}",
                    range.end_lr, range.start_lr
                ),
            ));
        }
        if range.steps < 20 || range.steps > limits.max_range_steps {
            return Err(SpecError::new(
                "range_test.steps",
                format!(
                    "must be between 20 and {} (the suggestions drop the first tenth and the last 5 points), got {}",
                    limits.max_range_steps, range.steps
                ),
            ));
        }
        if !(0.0..1.0).contains(&range.smoothing) {
            return Err(SpecError::new(
                "range_test.smoothing",
                format!("must be in [0, 1), got {}", range.smoothing),
            ));
        }
        if !(range.diverge_factor.is_finite() && range.diverge_factor > 1.0) {
            return Err(SpecError::new(
                "range_test.diverge_factor",
                format!("must be above 1, got {}", range.diverge_factor),
            ));
        }
        Ok(())
    }

    fn validate_sweep(&self, limits: &Limits) -> Result<(), SpecError> {
        let sweep = &self.sweep;
        let candidate_count = match &sweep.candidates {
            Candidates::Auto => {
                if self.kind == JobKind::Sweep {
                    return Err(SpecError::new(
                        "sweep.candidates",
                        "a sweep job has no range test to place candidates: give a list of peak learning rates, or use kind \"tune\"",
                    ));
                }
                if sweep.count < 2 {
                    return Err(SpecError::new(
                        "sweep.count",
                        format!("must be at least 2, got {}", sweep.count),
                    ));
                }
                sweep.count
            }
            Candidates::List(values) => {
                if values.is_empty() {
                    return Err(SpecError::new(
                        "sweep.candidates",
                        "give at least one peak learning rate, or \"auto\"",
                    ));
                }
                for (index, value) in values.iter().enumerate() {
                    check_positive_lr(&format!("sweep.candidates[{index}]"), *value)?;
                }
                values.len()
            }
        };
        if sweep.epochs == Some(0) {
            return Err(SpecError::new("sweep.epochs", "must be at least 1"));
        }
        if sweep.seeds == 0 {
            return Err(SpecError::new("sweep.seeds", "must be at least 1"));
        }
        // A horizon chosen from the budget is bounded by it; admission checks that budget
        // against this limit once the data's epoch length is known.
        let total = candidate_count
            .saturating_mul(sweep.seeds)
            .saturating_mul(sweep.epochs.unwrap_or(0).min(self.plan.epochs));
        if total > limits.max_sweep_epochs {
            return Err(SpecError::new(
                "sweep",
                format!(
                    "candidates x seeds x epochs is {total}, above the limit of {}: use fewer candidates, seeds or epochs",
                    limits.max_sweep_epochs
                ),
            ));
        }
        let shape = &sweep.schedule;
        if !(shape.pct_start > 0.0 && shape.pct_start < 1.0) {
            return Err(SpecError::new(
                "sweep.schedule.pct_start",
                format!("must be between 0 and 1, got {}", shape.pct_start),
            ));
        }
        if shape.three_phase && shape.pct_start >= 0.5 {
            return Err(SpecError::new(
                "sweep.schedule.pct_start",
                "must be below 0.5 with three_phase",
            ));
        }
        for (field, value) in [
            ("sweep.schedule.div_factor", shape.div_factor),
            ("sweep.schedule.final_div_factor", shape.final_div_factor),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(SpecError::new(
                    field,
                    format!("must be positive, got {value}"),
                ));
            }
        }
        if shape.cycle_momentum {
            if !(0.0..1.0).contains(&shape.base_momentum) {
                return Err(SpecError::new(
                    "sweep.schedule.base_momentum",
                    format!("must be in [0, 1), got {}", shape.base_momentum),
                ));
            }
            if !(0.0..1.0).contains(&shape.max_momentum) || shape.max_momentum < shape.base_momentum
            {
                return Err(SpecError::new(
                    "sweep.schedule.max_momentum",
                    format!("must be in [base_momentum, 1), got {}", shape.max_momentum),
                ));
            }
        }
        Ok(())
    }
}

/// A spec parsed and checked against the limits where it entered (the API, `lrtune run`):
/// the only kind of spec the engine runs. It is made by [`ValidSpec::parse`],
/// [`ValidSpec::from_value`] or [`ValidSpec::validate`], which check it, or by
/// [`ValidSpec::from_stored`] for the JSON a store kept of one; it reads as the [`JobSpec`]
/// it holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ValidSpec(JobSpec);

impl ValidSpec {
    /// Parses JSON text and checks it: an error names the field (`range_test.start_lr`).
    pub fn parse(text: &str, limits: &Limits) -> Result<ValidSpec, SpecError> {
        ValidSpec::validate(JobSpec::from_json(text)?, limits)
    }

    /// Like `parse`, for a value already parsed (the HTTP body, or a spec edited as JSON).
    pub fn from_value(value: serde_json::Value, limits: &Limits) -> Result<ValidSpec, SpecError> {
        ValidSpec::validate(JobSpec::from_value(value)?, limits)
    }

    /// Checks a spec built in code.
    pub fn validate(spec: JobSpec, limits: &Limits) -> Result<ValidSpec, SpecError> {
        spec.validate(limits)?;
        Ok(ValidSpec(spec))
    }

    /// Reads back the JSON of a `ValidSpec` that a store kept (its `Serialize` form), without
    /// checking it again: it was checked when it was submitted, against the limits of that
    /// time, and a job queued then still runs if a limit was lowered since. Only a field the
    /// spec no longer has or a value it can no longer hold is an error.
    pub fn from_stored(text: &str) -> Result<ValidSpec, SpecError> {
        JobSpec::from_json(text).map(ValidSpec)
    }

    /// The spec, every default filled in.
    pub fn spec(&self) -> &JobSpec {
        &self.0
    }

    /// The tune job that finds each recipe's learning rate in a race: the race's spec with
    /// the recipe's optimizer, in the order raced; empty unless the kind is `compare`. Each
    /// is valid because the race is: a compare spec's checks are a tune's, plus each recipe's
    /// optimizer checked as a tune's optimizer.
    pub fn recipe_tune_specs(&self) -> Vec<(Recipe, ValidSpec)> {
        if self.kind != JobKind::Compare {
            return Vec::new();
        }
        self.compare_recipes()
            .into_iter()
            .map(|recipe| {
                let tune = ValidSpec(self.recipe_tune(&recipe));
                (recipe, tune)
            })
            .collect()
    }
}

impl Deref for ValidSpec {
    type Target = JobSpec;

    fn deref(&self) -> &JobSpec {
        &self.0
    }
}

fn check_positive_lr(field: &str, value: f64) -> Result<(), SpecError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("a learning rate must be positive and finite, got {value}"),
        ))
    }
}

fn check_weight_decay(value: f64) -> Result<(), SpecError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(SpecError::new(
            "optimizer.weight_decay",
            format!("must be zero or positive, got {value}"),
        ))
    }
}

/// Turns serde's error into one that names the field by its full path. serde reports an
/// unknown field at the path of its parent, so the field's own name is appended.
/// A spec that is not JSON, or names a key twice, as an error naming the field.
pub fn json_error(error: JsonError) -> SpecError {
    let message = error.to_string();
    match error {
        JsonError::Syntax(error) => path_error(error),
        JsonError::DuplicateKey { field, .. } => SpecError::new(field, message),
    }
}

fn path_error<E: fmt::Display>(error: serde_path_to_error::Error<E>) -> SpecError {
    let message = error.inner().to_string();
    let mut field = error.path().to_string();
    if field == "." {
        field.clear();
    }
    if let Some(unknown) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        let already_named = field == unknown || field.ends_with(&format!(".{unknown}"));
        if !already_named {
            field = if field.is_empty() {
                unknown.to_string()
            } else {
                format!("{field}.{unknown}")
            };
        }
    }
    if field.is_empty() {
        field = "body".to_string();
    }
    // serde_json appends " at line 1 column 7"; the field name says more.
    let message = match message.find(" at line ") {
        Some(position) => &message[..position],
        None => &message,
    };
    // serde quotes the value it was given (`unknown variant `...``) whole.
    SpecError::new(
        crate::engine::quote::shortened(&field),
        crate::engine::quote::bounded(message),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<JobSpec, SpecError> {
        JobSpec::from_json(text)
    }

    fn invalid(text: &str) -> SpecError {
        let spec = parse(text).expect("parses");
        spec.validate(&Limits::default()).expect_err("invalid")
    }

    #[test]
    fn a_minimal_spec_gets_every_default() {
        let spec = parse(r#"{"data": {"builtin": "mnist10k"}}"#).unwrap();
        assert_eq!(spec.kind, JobKind::Tune);
        assert_eq!(spec.batch_size, 64);
        assert_eq!(spec.range_test.steps, 100);
        assert_eq!(spec.range_test.start_lr, 1e-7);
        assert_eq!(spec.sweep.count, 5);
        assert_eq!(spec.optimizer.momentum(), 0.9);
        assert_eq!(spec.model.arch(), "mlp");
        spec.validate(&Limits::default()).unwrap();
    }

    #[test]
    fn an_unknown_field_is_named_with_its_path() {
        let error =
            parse(r#"{"data": {"builtin": "mnist10k"}, "range_test": {"start": 1}}"#).unwrap_err();
        assert_eq!(error.field, "range_test.start");
        let error = parse(r#"{"data": {"builtin": "mnist10k"}, "colour": 1}"#).unwrap_err();
        assert_eq!(error.field, "colour");
        let error =
            parse(r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "width": 3}}"#)
                .unwrap_err();
        assert_eq!(error.field, "model.width");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_path() {
        let error = parse(r#"{"data": {"builtin": "mnist10k"}, "range_test": {"steps": "many"}}"#)
            .unwrap_err();
        assert_eq!(error.field, "range_test.steps");
        let error = parse(r#"{"data": {"builtin": "cifar"}}"#).unwrap_err();
        assert_eq!(error.field, "data.builtin");
        assert!(error.message.contains("mnist10k"), "{}", error.message);
    }

    #[test]
    fn candidates_take_auto_or_a_list() {
        let spec = parse(
            r#"{"kind": "sweep", "data": {"builtin": "spirals"}, "sweep": {"candidates": [0.1, 0.01]}}"#,
        )
        .unwrap();
        assert_eq!(spec.sweep.candidates, Candidates::List(vec![0.1, 0.01]));
        spec.validate(&Limits::default()).unwrap();
        let error = parse(r#"{"data": {"builtin": "spirals"}, "sweep": {"candidates": "some"}}"#)
            .unwrap_err();
        assert_eq!(error.field, "sweep.candidates");
    }

    #[test]
    fn a_range_test_with_start_lr_above_end_lr_is_rejected() {
        let error = invalid(
            r#"{"data": {"builtin": "mnist10k"}, "range_test": {"start_lr": 1, "end_lr": 0.1}}"#,
        );
        assert_eq!(error.field, "range_test.start_lr");
        assert!(error.message.contains("below end_lr"));
    }

    #[test]
    fn non_positive_learning_rates_are_rejected() {
        let error = invalid(r#"{"data": {"builtin": "mnist10k"}, "range_test": {"start_lr": 0}}"#);
        assert_eq!(error.field, "range_test.start_lr");
        let error = invalid(
            r#"{"kind": "sweep", "data": {"builtin": "mnist10k"}, "sweep": {"candidates": [0.1, -1]}}"#,
        );
        assert_eq!(error.field, "sweep.candidates[1]");
    }

    #[test]
    fn limits_and_zero_sizes_name_their_field() {
        let error = invalid(r#"{"data": {"builtin": "mnist10k"}, "batch_size": 0}"#);
        assert_eq!(error.field, "batch_size");
        let error =
            invalid(r#"{"data": {"builtin": "mnist10k"}, "range_test": {"steps": 100000}}"#);
        assert_eq!(error.field, "range_test.steps");
        assert!(error.message.contains("5000"));
        let error = invalid(
            r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "hidden": [64, 0]}}"#,
        );
        assert_eq!(error.field, "model.hidden[1]");
        let error =
            invalid(r#"{"data": {"builtin": "mnist10k"}, "sweep": {"count": 100, "epochs": 10}}"#);
        assert_eq!(error.field, "sweep");
        let error = invalid(r#"{"kind": "sweep", "data": {"builtin": "mnist10k"}}"#);
        assert_eq!(error.field, "sweep.candidates");
    }

    #[test]
    fn a_long_value_or_key_in_a_spec_is_quoted_cut_to_200_characters() {
        let long = "z".repeat(100_000);
        let error = JobSpec::from_json(&format!(r#"{{"data": {{"builtin": "{long}"}}}}"#))
            .expect_err("an unknown builtin");
        assert_eq!(error.field, "data.builtin");
        assert!(
            error.message.starts_with(&format!(
                "unknown variant `{}…` (100000 characters), expected",
                "z".repeat(200)
            )),
            "{}",
            &error.message[..300]
        );
        let error = JobSpec::from_json(&format!(r#"{{"data": {{"{long}": 1}}}}"#))
            .expect_err("an unknown field");
        assert_eq!(error.field, format!("data.{}…", "z".repeat(195)));
        assert!(error.message.len() < 2000, "{}", error.message.len());
    }

    #[test]
    fn a_name_with_a_control_character_is_rejected_naming_it() {
        let error = invalid(r#"{"data": {"builtin": "mnist10k"}, "name": "ab\u001b[31m"}"#);
        assert_eq!(error.field, "name");
        assert_eq!(
            error.message,
            "must not contain control characters, found U+001B at character 3"
        );
    }

    #[test]
    fn a_name_longer_than_200_characters_is_rejected() {
        let long = "n".repeat(201);
        let error = invalid(&format!(
            r#"{{"data": {{"builtin": "mnist10k"}}, "name": "{long}"}}"#
        ));
        assert_eq!(error.field, "name");
        assert_eq!(error.message, "must be at most 200 characters, got 201");
        let fits = "é".repeat(200);
        parse(&format!(
            r#"{{"data": {{"builtin": "mnist10k"}}, "name": "{fits}"}}"#
        ))
        .unwrap()
        .validate(&Limits::default())
        .unwrap();
    }

    #[test]
    fn the_default_budget_affords_several_small_plans_and_twice_a_large_one() {
        let budget = Budget::default();
        // A 100-step range test and 5x a small plan; capped at 2,500 steps; never under 2x
        // the plan. A plan of 15 steps (120 rows in batches of 32 for 5 epochs) still gets
        // its range test and three runs of its full length.
        assert_eq!(budget.steps_for(15, 100), 175);
        assert_eq!(budget.steps_for(140, 100), 800);
        assert_eq!(budget.steps_for(500, 100), 2500);
        assert_eq!(budget.steps_for(1250, 100), 2500);
        assert_eq!(budget.steps_for(5000, 100), 10_000);
        assert_eq!(budget.steps_for(140, 0), 700);
        let given = Budget {
            plan_multiple: Some(3.0),
            steps: Some(1000),
        };
        assert_eq!(given.steps_for(140, 100), 420);
        assert_eq!(given.steps_for(1000, 100), 1000);
        let error = invalid(r#"{"data": {"builtin": "mnist10k"}, "budget": {"plan_multiple": 0}}"#);
        assert_eq!(error.field, "budget.plan_multiple");
        let error =
            parse(r#"{"data": {"builtin": "mnist10k"}, "budget": {"hours": 1}}"#).unwrap_err();
        assert_eq!(error.field, "budget.hours");
    }

    #[test]
    fn data_sources_are_exclusive() {
        let error = invalid(r#"{"data": {}}"#);
        assert_eq!(error.field, "data");
        let error = invalid(r#"{"data": {"builtin": "mnist10k", "path": "x.csv"}}"#);
        assert_eq!(error.field, "data");
        let error = invalid(r#"{"data": {"builtin": "mnist10k", "samples": 100}}"#);
        assert_eq!(error.field, "data.samples");
    }

    #[test]
    fn initial_weights_come_from_exactly_one_of_a_path_and_an_id() {
        let with = |weights: &str| {
            parse(&format!(
                r#"{{"data": {{"builtin": "spirals"}},
                    "model": {{"arch": "sequential", "layers": [{{"type": "linear", "out": 3}}]}},
                    "init": {{"weights": {weights}}}}}"#
            ))
        };
        let spec = with(r#"{"id": "weights_1"}"#).unwrap();
        let weights = &spec.init.as_ref().unwrap().weights;
        assert_eq!(weights, &WeightsSource::Id("weights_1".into()));
        // The canonical spec the server stores reads back the same.
        let stored = serde_json::to_string(&spec).unwrap();
        assert!(
            stored.contains(r#""init":{"weights":{"id":"weights_1"}}"#),
            "{stored}"
        );
        assert_eq!(JobSpec::from_json(&stored).unwrap(), spec);
        let spec = with(r#"{"path": "w.safetensors"}"#).unwrap();
        assert_eq!(
            spec.init.unwrap().weights,
            WeightsSource::Path("w.safetensors".into())
        );

        for weights in [r#"{"path": "w.safetensors", "id": "weights_1"}"#, "{}"] {
            assert_eq!(
                with(weights).unwrap_err().field,
                "init.weights",
                "{weights}"
            );
        }
        assert_eq!(
            with(r#"{"url": "x"}"#).unwrap_err().field,
            "init.weights.url"
        );
        let error = with(r#"{"id": " "}"#)
            .unwrap()
            .validate(&Limits::default())
            .unwrap_err();
        assert_eq!(error.field, "init.weights.id");
    }

    #[test]
    fn a_stored_spec_reads_back_as_the_same_valid_spec() {
        let text = r#"{"kind": "compare", "name": "race", "data": {"builtin": "spirals", "samples": 512},
            "model": {"arch": "sequential", "layers": [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 3}]},
            "optimizer": {"name": "adamw", "betas": [0.8, 0.99]}, "backend": "native",
            "budget": {"plan_multiple": 3}, "recipes": ["sgd_one_cycle", "adam_constant"],
            "seeds": 1, "target": 0.9}"#;
        let spec = ValidSpec::parse(text, &Limits::default()).unwrap();
        let stored = serde_json::to_string(&spec).unwrap();
        // What the store keeps is the spec itself, every default filled in.
        assert_eq!(stored, serde_json::to_string(spec.spec()).unwrap());
        assert!(
            stored.contains(r#""range_test":{"start_lr":1e-7"#),
            "{stored}"
        );
        let read = ValidSpec::from_stored(&stored).unwrap();
        assert_eq!(read, spec);
        assert_eq!(read.kind, JobKind::Compare);
        assert_eq!(read.backend, BackendChoice::Native);
    }

    #[test]
    fn a_stored_spec_is_not_checked_again_but_a_submitted_one_is() {
        let text = r#"{"data": {"builtin": "spirals"}, "range_test": {"steps": 100}}"#;
        let stored =
            serde_json::to_string(&ValidSpec::parse(text, &Limits::default()).unwrap()).unwrap();
        let lowered = Limits {
            max_range_steps: 50,
            ..Limits::default()
        };
        let error = ValidSpec::parse(&stored, &lowered).unwrap_err();
        assert_eq!(error.field, "range_test.steps");
        let read = ValidSpec::from_stored(&stored).unwrap();
        assert_eq!(read.range_test.steps, 100);
        // Only what cannot be a spec at all is refused.
        let error =
            ValidSpec::from_stored(r#"{"data": {"builtin": "spirals"}, "colour": 1}"#).unwrap_err();
        assert_eq!(error.field, "colour");
    }

    #[test]
    fn a_parse_error_and_a_check_error_both_name_their_field() {
        let limits = Limits::default();
        let error = ValidSpec::parse(r#"{"data": {"builtin": "spirals"}, "seed": "x"}"#, &limits)
            .unwrap_err();
        assert_eq!(error.field, "seed");
        let value = serde_json::json!({"data": {"builtin": "spirals"}, "batch_size": 0});
        let error = ValidSpec::from_value(value, &limits).unwrap_err();
        assert_eq!(error, SpecError::new("batch_size", "must be at least 1"));
        let mut spec = parse(r#"{"data": {"builtin": "spirals"}}"#).unwrap();
        spec.validation_fraction = 1.5;
        let error = ValidSpec::validate(spec, &limits).unwrap_err();
        assert_eq!(error.field, "validation_fraction");
    }

    #[test]
    fn each_recipe_of_a_valid_race_is_a_valid_tune() {
        let limits = Limits::default();
        let race = ValidSpec::parse(
            r#"{"kind": "compare", "data": {"builtin": "spirals"}, "plan": {"epochs": 4},
                "recipes": ["adam_constant",
                    {"name": "slow_sgd", "optimizer": {"name": "sgd", "momentum": 0.5, "nesterov": true},
                     "schedule": {"kind": "step", "step_epochs": 2}}]}"#,
            &limits,
        )
        .unwrap();
        let tunes = race.recipe_tune_specs();
        let names: Vec<&str> = tunes
            .iter()
            .map(|(recipe, _)| recipe.name.as_str())
            .collect();
        assert_eq!(names, ["adam_constant", "slow_sgd"]);
        for (recipe, tune) in &tunes {
            assert_eq!(tune.kind, JobKind::Tune);
            assert_eq!(tune.optimizer, recipe.optimizer);
            assert_eq!(
                (&tune.recipes, tune.seeds, tune.target),
                (&None, None, None)
            );
            assert_eq!(tune.plan, race.plan);
            tune.validate(&limits)
                .unwrap_or_else(|error| panic!("{}: {error}", recipe.name));
        }
        let default_race = ValidSpec::parse(
            r#"{"kind": "compare", "data": {"builtin": "spirals"}, "plan": {"epochs": 4}}"#,
            &limits,
        )
        .unwrap();
        assert_eq!(
            default_race.recipe_tune_specs().len(),
            Recipe::DEFAULTS.len()
        );
        for (recipe, tune) in default_race.recipe_tune_specs() {
            tune.validate(&limits)
                .unwrap_or_else(|error| panic!("{}: {error}", recipe.name));
        }
        let tune = ValidSpec::parse(r#"{"data": {"builtin": "spirals"}}"#, &limits).unwrap();
        assert!(tune.recipe_tune_specs().is_empty());
    }

    #[test]
    fn kinds_round_trip_through_their_json_names() {
        for kind in JobKind::ALL {
            assert_eq!(JobKind::parse(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        assert_eq!(JobKind::parse("grid"), None);
    }

    #[test]
    fn exp_and_linear_range_test_learning_rates_follow_the_formula() {
        let mut range = RangeTestSpec {
            start_lr: 1e-4,
            end_lr: 1.0,
            steps: 5,
            ..RangeTestSpec::default()
        };
        let exp: Vec<f64> = (0..5).map(|i| range.lr_at(i)).collect();
        for (got, want) in exp.iter().zip([1e-4, 1e-3, 1e-2, 1e-1, 1.0]) {
            assert!((got / want - 1.0).abs() < 1e-12, "{got} vs {want}");
        }
        range.mode = LrMode::Linear;
        assert!((range.lr_at(2) - (1e-4 + (1.0 - 1e-4) * 0.5)).abs() < 1e-15);
    }
}
