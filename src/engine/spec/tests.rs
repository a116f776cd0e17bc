//! The spec's parse and check tests.

use super::*;
use crate::engine::limits::Limits;

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
    let error = parse(r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "mlp", "width": 3}}"#)
        .unwrap_err();
    assert_eq!(error.field, "model.width");
}

#[test]
fn a_wrong_type_is_named_with_its_path() {
    let error =
        parse(r#"{"data": {"builtin": "mnist10k"}, "range_test": {"steps": "many"}}"#).unwrap_err();
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
    let error =
        parse(r#"{"data": {"builtin": "spirals"}, "sweep": {"candidates": "some"}}"#).unwrap_err();
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
    let error = invalid(r#"{"data": {"builtin": "mnist10k"}, "range_test": {"steps": 100000}}"#);
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
    let error = parse(r#"{"data": {"builtin": "mnist10k"}, "budget": {"hours": 1}}"#).unwrap_err();
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
    let error =
        ValidSpec::parse(r#"{"data": {"builtin": "spirals"}, "seed": "x"}"#, &limits).unwrap_err();
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

fn optimizer_spec(optimizer: &str) -> String {
    format!(r#"{{"data": {{"builtin": "spirals"}}, "optimizer": {optimizer}}}"#)
}

#[test]
fn the_learning_rate_free_optimizers_take_the_libraries_defaults() {
    let spec = parse(&optimizer_spec(r#"{"name": "prodigy"}"#)).unwrap();
    assert_eq!(
        spec.optimizer,
        OptimizerSpec::Prodigy {
            betas: [0.9, 0.999],
            beta3: None,
            eps: 1e-8,
            weight_decay: 0.0,
            decouple: true,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: None,
            use_bias_correction: false,
            safeguard_warmup: false,
        }
    );
    spec.validate(&Limits::default()).unwrap();
    assert_eq!(
        (spec.optimizer.name(), spec.optimizer.default_lr()),
        ("prodigy", Some(1.0))
    );
    let spec = parse(&optimizer_spec(r#"{"name": "schedule_free_adamw"}"#)).unwrap();
    assert_eq!(
        spec.optimizer,
        OptimizerSpec::ScheduleFreeAdamw {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
        }
    );
    spec.validate(&Limits::default()).unwrap();
    assert_eq!(spec.optimizer.default_lr(), Some(0.0025));
    assert_eq!(spec.optimizer.name(), "schedule_free_adamw");
    let spec = parse(&optimizer_spec(r#"{"name": "schedule_free_sgd"}"#)).unwrap();
    assert_eq!(
        spec.optimizer,
        OptimizerSpec::ScheduleFreeSgd {
            momentum: 0.9,
            weight_decay: 0.0,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
        }
    );
    spec.validate(&Limits::default()).unwrap();
    assert_eq!(spec.optimizer.default_lr(), Some(1.0));
    assert_eq!(spec.optimizer.momentum(), 0.9);
    assert_eq!(OptimizerSpec::default().default_lr(), None);
    // The names serialize back as they parse.
    let text = serde_json::to_string(&spec.optimizer).unwrap();
    assert!(text.contains(r#""name":"schedule_free_sgd""#), "{text}");
}

#[test]
fn a_learning_rate_free_optimizers_bad_values_name_their_field() {
    for (optimizer, field) in [
        (r#"{"name": "prodigy", "d0": -1e-6}"#, "optimizer.d0"),
        (r#"{"name": "prodigy", "d0": 0}"#, "optimizer.d0"),
        (r#"{"name": "prodigy", "d_coef": 0}"#, "optimizer.d_coef"),
        (
            r#"{"name": "prodigy", "betas": [0.9, 1.0]}"#,
            "optimizer.betas[1]",
        ),
        (r#"{"name": "prodigy", "beta3": 1.5}"#, "optimizer.beta3"),
        (
            r#"{"name": "prodigy", "growth_rate": 0.5}"#,
            "optimizer.growth_rate",
        ),
        (r#"{"name": "prodigy", "eps": 0}"#, "optimizer.eps"),
        (
            r#"{"name": "prodigy", "weight_decay": -0.1}"#,
            "optimizer.weight_decay",
        ),
        (
            r#"{"name": "schedule_free_adamw", "betas": [-0.1, 0.999]}"#,
            "optimizer.betas[0]",
        ),
        (
            r#"{"name": "schedule_free_adamw", "betas": [0, 0.999]}"#,
            "optimizer.betas[0]",
        ),
        (
            r#"{"name": "schedule_free_adamw", "weight_lr_power": -1}"#,
            "optimizer.weight_lr_power",
        ),
        (
            r#"{"name": "schedule_free_adamw", "r": -0.5}"#,
            "optimizer.r",
        ),
        (
            r#"{"name": "schedule_free_sgd", "momentum": 0}"#,
            "optimizer.momentum",
        ),
        (
            r#"{"name": "schedule_free_sgd", "momentum": 1}"#,
            "optimizer.momentum",
        ),
        (
            r#"{"name": "schedule_free_sgd", "weight_lr_power": -2}"#,
            "optimizer.weight_lr_power",
        ),
    ] {
        let error = invalid(&optimizer_spec(optimizer));
        assert_eq!(error.field, field, "{optimizer}: {error}");
    }
}

#[test]
fn a_learning_rate_free_optimizers_unparsable_values_name_their_field() {
    for (optimizer, field) in [
        (
            r#"{"name": "schedule_free_sgd", "warmup_steps": -5}"#,
            "optimizer.warmup_steps",
        ),
        (
            r#"{"name": "schedule_free_adamw", "warmup_steps": 1.5}"#,
            "optimizer.warmup_steps",
        ),
        (r#"{"name": "prodigy", "lr": 1.0}"#, "optimizer.lr"),
        (
            r#"{"name": "schedule_free_adamw", "momentum": 0.9}"#,
            "optimizer.momentum",
        ),
        (
            r#"{"name": "schedule_free_sgd", "betas": [0.9, 0.99]}"#,
            "optimizer.betas",
        ),
    ] {
        let error = parse(&optimizer_spec(optimizer)).unwrap_err();
        assert_eq!(error.field, field, "{optimizer}: {error}");
    }
}
