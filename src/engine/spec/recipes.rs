//! Race recipes (`"kind": "compare"`): an optimizer and a schedule each, by a default's name
//! or in full, and their checks.

use serde::{de, Deserialize, Deserializer, Serialize};
use std::fmt;

use super::{defaults, JobKind, JobSpec, OptimizerSpec, SpecError, MAX_NAME_CHARS};
use crate::engine::limits::Limits;

/// ReduceLROnPlateau's `mode`: whether a lower (loss) or a higher (accuracy) metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlateauMode {
    #[default]
    Min,
    Max,
}

/// ReduceLROnPlateau's `threshold_mode`: an improvement relative to the best metric, or absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdMode {
    #[default]
    Rel,
    Abs,
}

/// A training recipe: an optimizer and a schedule, raced at its own tuned learning rate, or
/// untuned at a fixed one (the learning-rate-free challengers' claim). In a spec it is the
/// name of a default recipe or an object with `name`, `optimizer` and `schedule`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    pub name: String,
    pub optimizer: OptimizerSpec,
    pub schedule: RecipeSchedule,
    /// Tune the learning rate (range test and sweep, on the race's budget) before racing.
    /// Defaults to true, and to false for an optimizer with a default learning rate of its
    /// own (Prodigy, schedule-free AdamW and SGD).
    pub tune: bool,
    /// The learning rate of an untuned recipe (the schedule's peak or starting value);
    /// `None`: the optimizer's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// A schedule-free optimizer's warm-up as a fraction of each run, set as its
    /// `warmup_steps` when the run's length is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_fraction: Option<f64>,
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
    pub const DEFAULTS: [&'static str; 7] = [
        "sgd_one_cycle",
        "adam_constant",
        "adam_plateau",
        "sgd_warm_restarts",
        "adamw_warmup_cosine",
        "prodigy",
        "schedule_free_adamw",
    ];

    /// Every recipe that has a name: the defaults and `schedule_free_sgd`.
    pub const NAMED: [&'static str; 8] = [
        "sgd_one_cycle",
        "adam_constant",
        "adam_plateau",
        "sgd_warm_restarts",
        "adamw_warmup_cosine",
        "prodigy",
        "schedule_free_adamw",
        "schedule_free_sgd",
    ];

    /// The schedule-free recipes' warm-up: 5 % of the run.
    pub const SCHEDULE_FREE_WARMUP: f64 = 0.05;

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
            // The learning-rate-free challengers at their libraries' defaults, untuned: Prodigy
            // with the cosine its README advises, schedule-free with a 5 % warm-up.
            "prodigy" => (
                OptimizerSpec::library_default("prodigy"),
                RecipeSchedule::Cosine { eta_min: 0.0 },
            ),
            "schedule_free_adamw" | "schedule_free_sgd" => (
                OptimizerSpec::library_default(name),
                RecipeSchedule::Constant,
            ),
            _ => return None,
        };
        let tune = optimizer.default_lr().is_none();
        let warmup_fraction = optimizer
            .is_schedule_free()
            .then_some(Self::SCHEDULE_FREE_WARMUP);
        Some(Recipe {
            name: name.to_string(),
            optimizer,
            schedule,
            tune,
            lr: None,
            warmup_fraction,
        })
    }
}

impl Recipe {
    /// The learning rate an untuned recipe races at; `None` for a tuned one.
    pub fn fixed_lr(&self) -> Option<f64> {
        if self.tune {
            None
        } else {
            self.lr.or(self.optimizer.default_lr())
        }
    }

    /// The recipe's optimizer for a run of `steps`: a schedule-free warm-up given as a
    /// fraction becomes that many of the run's steps (at least 1).
    pub fn optimizer_for(&self, steps: usize) -> OptimizerSpec {
        let mut optimizer = self.optimizer.clone();
        if let Some(fraction) = self.warmup_fraction {
            let warmup = ((fraction * steps as f64).round() as usize).max(1);
            match &mut optimizer {
                OptimizerSpec::ScheduleFreeAdamw { warmup_steps, .. }
                | OptimizerSpec::ScheduleFreeSgd { warmup_steps, .. } => *warmup_steps = warmup,
                _ => {}
            }
        }
        optimizer
    }

    /// The checks a recipe's own fields need beyond its optimizer's and schedule's; fields
    /// are named relative to the recipe.
    fn validate_tuning(&self) -> Result<(), SpecError> {
        if self.tune {
            if let Some(lr) = self.lr {
                return Err(SpecError::new(
                    "lr",
                    format!("is tuned (tune is true), so a fixed lr ({lr}) has no use: drop it, or set tune to false"),
                ));
            }
        } else {
            match self.fixed_lr() {
                None => {
                    return Err(SpecError::new(
                        "lr",
                        format!(
                            "an untuned recipe needs a learning rate: {} has no default, so give lr or set tune to true",
                            self.optimizer.name()
                        ),
                    ))
                }
                Some(lr) if !(lr.is_finite() && lr > 0.0) => {
                    return Err(SpecError::new(
                        "lr",
                        format!("must be a finite number above 0, got {lr}"),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(fraction) = self.warmup_fraction {
            if !self.optimizer.is_schedule_free() {
                return Err(SpecError::new(
                    "warmup_fraction",
                    format!(
                        "is a schedule-free optimizer's warm-up; {} has none (use the warmup_cosine schedule)",
                        self.optimizer.name()
                    ),
                ));
            }
            if !(fraction > 0.0 && fraction < 1.0) {
                return Err(SpecError::new(
                    "warmup_fraction",
                    format!("must be strictly between 0 and 1 (of each run), got {fraction}"),
                ));
            }
        }
        Ok(())
    }
}

impl OptimizerSpec {
    /// The optimizer `name` with every field at its default.
    fn library_default(name: &str) -> OptimizerSpec {
        serde_json::from_value(serde_json::json!({ "name": name }))
            .expect("every optimizer has a default for each of its fields")
    }

    /// Schedule-free AdamW or SGD: trained at y, evaluated at x.
    pub fn is_schedule_free(&self) -> bool {
        matches!(
            self,
            OptimizerSpec::ScheduleFreeAdamw { .. } | OptimizerSpec::ScheduleFreeSgd { .. }
        )
    }
}

/// A recipe in a spec: a default's name, or a whole recipe object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeObject {
    name: String,
    optimizer: OptimizerSpec,
    schedule: RecipeSchedule,
    #[serde(default)]
    tune: Option<bool>,
    #[serde(default)]
    lr: Option<f64>,
    #[serde(default)]
    warmup_fraction: Option<f64>,
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
                    Recipe::NAMED.join(", ")
                )
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<RecipeChoice, E> {
                Recipe::named(name).map(RecipeChoice).ok_or_else(|| {
                    E::custom(format!(
                        "unknown recipe `{name}`: the named recipes are {}; give any other as {{name, optimizer, schedule}}",
                        Recipe::NAMED.join(", ")
                    ))
                })
            }
            fn visit_map<M: de::MapAccess<'de>>(self, map: M) -> Result<RecipeChoice, M::Error> {
                let object = RecipeObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let tune = object
                    .tune
                    .unwrap_or_else(|| object.optimizer.default_lr().is_none());
                Ok(RecipeChoice(Recipe {
                    name: object.name,
                    optimizer: object.optimizer,
                    schedule: object.schedule,
                    tune,
                    lr: object.lr,
                    warmup_fraction: object.warmup_fraction,
                }))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// What a spec's `recipes` entry parses into.
struct RecipeChoice(Recipe);

pub(super) fn recipe_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<Recipe>>, D::Error> {
    let choices: Vec<RecipeChoice> = Vec::deserialize(deserializer)?;
    Ok(Some(choices.into_iter().map(|choice| choice.0).collect()))
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
    pub(super) fn recipe_tune(&self, recipe: &Recipe) -> JobSpec {
        JobSpec {
            kind: JobKind::Tune,
            optimizer: recipe.optimizer.clone(),
            recipes: None,
            seeds: None,
            target: None,
            ..self.clone()
        }
    }

    pub(super) fn validate_compare(&self, limits: &Limits) -> Result<(), SpecError> {
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
            recipe.validate_tuning().map_err(|error| {
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
}
