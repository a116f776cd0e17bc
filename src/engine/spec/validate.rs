//! The checks of a spec that parsing cannot make: ranges, orderings and the limits. A spec
//! is checked once, where it enters, into a [`ValidSpec`].

use std::ops::Deref;

use serde::Serialize;

use super::error::{json_error, path_error};
use super::*;
use crate::engine::limits::Limits;

impl JobSpec {
    /// Parses a spec from JSON; a syntax error, a key given twice, a wrong type or an
    /// unknown field is an error naming the field by its path (`range_test.start_lr`).
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let value = crate::engine::json::parse(text.as_bytes()).map_err(json_error)?;
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
    pub(super) fn validate(&self, limits: &Limits) -> Result<(), SpecError> {
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
                layers::validate(layers, "model.layers")?;
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

    pub(super) fn validate_optimizer(&self) -> Result<(), SpecError> {
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
                check_betas(betas)?;
                check_eps(*eps)?;
                check_weight_decay(*weight_decay)
            }
            OptimizerSpec::Prodigy {
                betas,
                beta3,
                eps,
                weight_decay,
                decouple: _,
                d0,
                d_coef,
                growth_rate,
                use_bias_correction: _,
                safeguard_warmup: _,
            } => {
                check_betas(betas)?;
                if let Some(beta3) = beta3 {
                    if !(0.0..1.0).contains(beta3) {
                        return Err(SpecError::new(
                            "optimizer.beta3",
                            format!("must be in [0, 1), got {beta3}"),
                        ));
                    }
                }
                check_eps(*eps)?;
                check_weight_decay(*weight_decay)?;
                check_positive("optimizer.d0", *d0)?;
                check_positive("optimizer.d_coef", *d_coef)?;
                if let Some(growth_rate) = growth_rate {
                    // Below 1, d would shrink every step whatever the estimate says.
                    if !(growth_rate.is_finite() && *growth_rate >= 1.0) {
                        return Err(SpecError::new(
                            "optimizer.growth_rate",
                            format!("must be at least 1 (absent: unbounded), got {growth_rate}"),
                        ));
                    }
                }
                Ok(())
            }
            OptimizerSpec::ScheduleFreeAdamw {
                betas,
                eps,
                weight_decay,
                warmup_steps: _,
                r,
                weight_lr_power,
            } => {
                check_betas(betas)?;
                // Evaluation moves the weights to x by a lerp of weight 1 - 1/beta1.
                if betas[0] == 0.0 {
                    return Err(SpecError::new(
                        "optimizer.betas[0]",
                        "must be above 0 for a schedule-free optimizer, got 0",
                    ));
                }
                check_eps(*eps)?;
                check_weight_decay(*weight_decay)?;
                check_averaging(*r, *weight_lr_power)
            }
            OptimizerSpec::ScheduleFreeSgd {
                momentum,
                weight_decay,
                warmup_steps: _,
                r,
                weight_lr_power,
            } => {
                // The library's own check: evaluation divides by the momentum.
                if !(*momentum > 0.0 && *momentum < 1.0) {
                    return Err(SpecError::new(
                        "optimizer.momentum",
                        format!("must be in (0, 1), got {momentum}"),
                    ));
                }
                check_weight_decay(*weight_decay)?;
                check_averaging(*r, *weight_lr_power)
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

fn check_betas(betas: &[f64; 2]) -> Result<(), SpecError> {
    for (index, beta) in betas.iter().enumerate() {
        if !(0.0..1.0).contains(beta) {
            return Err(SpecError::new(
                format!("optimizer.betas[{index}]"),
                format!("must be in [0, 1), got {beta}"),
            ));
        }
    }
    Ok(())
}

fn check_eps(eps: f64) -> Result<(), SpecError> {
    check_positive("optimizer.eps", eps)
}

fn check_positive(field: &str, value: f64) -> Result<(), SpecError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("must be positive, got {value}"),
        ))
    }
}

/// The schedule-free average's weights, `(k + 1)^r * lr_max^weight_lr_power`.
fn check_averaging(r: f64, weight_lr_power: f64) -> Result<(), SpecError> {
    for (field, value) in [
        ("optimizer.r", r),
        ("optimizer.weight_lr_power", weight_lr_power),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(SpecError::new(
                field,
                format!("must be zero or positive, got {value}"),
            ));
        }
    }
    Ok(())
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
