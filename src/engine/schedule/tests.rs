//! The schedules against PyTorch's golden curves, and their checks.

use std::f64::consts::PI;

use super::*;
use serde_json::{json, Value};

const GOLDEN: &str = include_str!("../../../tests/golden/schedules.json");
const GOLDEN_EXTRA: &str = include_str!("../../../tests/golden/schedules_extra.json");
const GOLDEN_PLATEAU: &str = include_str!("../../../tests/golden/plateau.json");
const NO_STEP_LIMIT: usize = 1_000_000;

fn parse(value: Value) -> Result<Schedule, serde_json::Error> {
    serde_json::from_value(value)
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    let tolerance = 1e-9 * expected.abs().max(1e-12);
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: got {actual:e}, PyTorch gives {expected:e}"
    );
}

fn numbers(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|number| number.as_f64().expect("a number"))
        .collect()
}

/// Every schedule of a golden file (`{"schedules": [{kind, params, lr, momentum?}]}`)
/// matches PyTorch's learning rate (and momentum, where given; none where not) at every
/// step, through `lr_at` and through `curve`.
fn assert_golden_schedules(text: &str, count: usize) {
    let golden: Value = serde_json::from_str(text).expect("golden file parses");
    let cases = golden["schedules"].as_array().expect("a list of schedules");
    assert_eq!(cases.len(), count);
    for case in cases {
        let mut params = case["params"].clone();
        params["kind"] = case["kind"].clone();
        let schedule = parse(params.clone())
            .unwrap_or_else(|error| panic!("golden params {params} rejected: {error}"));
        schedule
            .validate(NO_STEP_LIMIT)
            .unwrap_or_else(|error| panic!("golden params {params} invalid: {error}"));
        let lr = numbers(&case["lr"]);
        assert_eq!(schedule.steps(), lr.len(), "{params}");
        let curve = schedule.curve();
        assert_eq!(curve.lr.len(), lr.len());
        for (step, &expected) in lr.iter().enumerate() {
            let what = format!("{params} lr at step {step}");
            assert_close(schedule.lr_at(step), expected, &what);
            assert_close(curve.lr[step], expected, &what);
        }
        match case.get("momentum") {
            Some(momentum) => {
                let curve_momentum = curve.momentum.as_ref().expect("momentum curve");
                for (step, expected) in numbers(momentum).into_iter().enumerate() {
                    let what = format!("{params} momentum at step {step}");
                    let actual = schedule.momentum_at(step).expect("momentum cycled");
                    assert_close(actual, expected, &what);
                    assert_close(curve_momentum[step], expected, &what);
                }
            }
            None => {
                assert_eq!(schedule.momentum_at(0), None);
                assert_eq!(curve.momentum, None);
            }
        }
    }
}

#[test]
fn every_golden_schedule_matches_pytorch_at_every_step() {
    assert_golden_schedules(GOLDEN, 9);
}

#[test]
fn an_unknown_field_is_rejected_for_every_kind() {
    let minimal = [
        json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100}),
        json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10}),
        json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 10, "steps": 10}),
        json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 100, "warmup_steps": 10}),
        json!({"kind": "cosine", "lr": 0.1, "T_max": 10, "steps": 10}),
        json!({"kind": "step", "lr": 0.1, "step_size": 10, "steps": 10}),
        json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": [1.0]}),
    ];
    for schedule in minimal {
        assert!(parse(schedule.clone()).is_ok(), "{schedule}");
        let mut with_typo = schedule.clone();
        with_typo["pct_strat"] = json!(0.3);
        let error = parse(with_typo)
            .expect_err("unknown field accepted")
            .to_string();
        assert!(error.contains("unknown field `pct_strat`"), "{error}");
    }
}

#[test]
fn an_unknown_kind_or_a_missing_required_parameter_is_rejected() {
    let error = parse(json!({"kind": "step_lr", "max_lr": 0.1})).unwrap_err();
    assert!(
        error.to_string().contains("unknown variant `step_lr`"),
        "{error}"
    );
    let error = parse(json!({"kind": "one_cycle", "max_lr": 0.1})).unwrap_err();
    assert!(
        error.to_string().contains("missing field `total_steps`"),
        "{error}"
    );
    let error = parse(json!({"max_lr": 0.1, "total_steps": 10})).unwrap_err();
    assert!(
        error.to_string().contains("missing field `kind`"),
        "{error}"
    );
    let error =
        parse(json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 10, "anneal": "cosine"}))
            .unwrap_err();
    assert!(
        error.to_string().contains("unknown variant `cosine`"),
        "{error}"
    );
}

#[test]
fn omitted_parameters_take_pytorchs_defaults() {
    let one_cycle = parse(json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100})).unwrap();
    assert_eq!(
        one_cycle,
        Schedule::OneCycle(OneCycle {
            max_lr: 0.1,
            total_steps: 100,
            pct_start: 0.3,
            anneal: Anneal::Cos,
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
            cycle_momentum: true,
            base_momentum: 0.85,
            max_momentum: 0.95,
            momentum_of: None,
        })
    );
    assert_eq!(one_cycle, Schedule::OneCycle(OneCycle::new(0.1, 100)));

    let cyclic =
        parse(json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10})).unwrap();
    assert_eq!(
        cyclic,
        Schedule::Cyclic(Cyclic {
            base_lr: 0.001,
            max_lr: 0.01,
            step_size_up: 2000,
            step_size_down: None,
            mode: CyclicMode::Triangular,
            gamma: 1.0,
            cycle_momentum: true,
            base_momentum: 0.8,
            max_momentum: 0.9,
            steps: 10,
        })
    );

    let cosine =
        parse(json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 7, "steps": 20}))
            .unwrap();
    assert_eq!(
        cosine,
        Schedule::CosineWarmRestarts(CosineWarmRestarts {
            base_lr: 0.1,
            t_0: 7,
            t_mult: 1,
            eta_min: 0.0,
            steps: 20,
        })
    );

    let warmup = parse(
        json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 100, "warmup_steps": 10}),
    )
    .unwrap();
    assert_eq!(
        warmup,
        Schedule::WarmupCosine(WarmupCosine {
            max_lr: 0.1,
            total_steps: 100,
            warmup_steps: 10,
            start_factor: 1.0 / 3.0,
            eta_min: 0.0,
        })
    );
}

#[test]
fn a_schedule_serialises_to_json_that_parses_back_to_itself() {
    let schedules = [
        json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100, "three_phase": true,
               "anneal": "linear", "momentum_of": "adam_beta1"}),
        json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10, "mode": "exp_range",
               "gamma": 0.99, "step_size_down": 3}),
        json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 7, "T_mult": 2, "steps": 20}),
        json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 100, "warmup_steps": 10}),
    ];
    for value in schedules {
        let schedule = parse(value).unwrap();
        let json = serde_json::to_value(&schedule).unwrap();
        assert_eq!(parse(json.clone()).unwrap(), schedule, "{json}");
    }
    let json = serde_json::to_value(Schedule::CosineWarmRestarts(CosineWarmRestarts {
        base_lr: 0.1,
        t_0: 7,
        t_mult: 2,
        eta_min: 0.0,
        steps: 20,
    }))
    .unwrap();
    assert_eq!(json["kind"], "cosine_warm_restarts");
    assert_eq!(json["T_0"], 7);
    assert_eq!(json["T_mult"], 2);
}

#[test]
fn a_cyclic_step_size_down_defaults_to_step_size_up() {
    let implicit = parse(
        json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 40,
                                "step_size_up": 6}),
    )
    .unwrap();
    let explicit = parse(
        json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 40,
                                "step_size_up": 6, "step_size_down": 6}),
    )
    .unwrap();
    assert_eq!(implicit.curve(), explicit.curve());
    assert_close(implicit.lr_at(6), 0.01, "peak of the first cycle");
    assert_close(implicit.lr_at(12), 0.001, "end of the first cycle");
}

#[test]
fn without_cycle_momentum_there_is_no_momentum_curve() {
    for schedule in [
        json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100, "cycle_momentum": false}),
        json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10, "cycle_momentum": false}),
    ] {
        let schedule = parse(schedule).unwrap();
        assert_eq!(schedule.momentum_at(3), None);
        let curve = schedule.curve();
        assert_eq!(curve.momentum, None);
        assert_eq!(curve.lr.len(), schedule.steps());
        assert_eq!(
            serde_json::to_value(&curve).unwrap()["momentum"],
            Value::Null
        );
    }
}

#[test]
fn warmup_cosine_matches_hand_computed_values() {
    let schedule = WarmupCosine {
        max_lr: 0.1,
        total_steps: 110,
        warmup_steps: 10,
        start_factor: 0.1,
        eta_min: 0.0,
    };
    schedule.validate(NO_STEP_LIMIT).unwrap();
    // LinearLR: 0.1 * (0.1 + 0.9 * t / 10).
    assert_close(schedule.lr_at(0), 0.01, "first step");
    assert_close(schedule.lr_at(5), 0.055, "middle of the warm-up");
    assert_close(schedule.lr_at(9), 0.091, "last warm-up step");
    // CosineAnnealingLR restarted at the milestone with T_max = 100.
    assert_close(schedule.lr_at(10), 0.1, "end of the warm-up is the peak");
    assert_close(schedule.lr_at(60), 0.05, "midpoint of the cosine");
    // 0.05 * (1 + cos(0.99 pi)) = 0.05 * (1 - 0.99950656036573...)
    assert_close(schedule.lr_at(109), 2.467198171342e-5, "last step");

    let with_floor = Schedule::WarmupCosine(WarmupCosine {
        eta_min: 0.01,
        ..schedule
    });
    assert_close(
        with_floor.lr_at(60),
        0.055,
        "midpoint between eta_min and max_lr",
    );
    assert_eq!(with_floor.momentum_at(0), None);
    assert_eq!(with_floor.curve().lr.len(), 110);
}

#[test]
fn warmup_cosine_starts_at_a_third_of_the_peak_by_default() {
    let schedule = parse(
        json!({"kind": "warmup_cosine", "max_lr": 0.3, "total_steps": 20, "warmup_steps": 4}),
    )
    .unwrap();
    assert_close(schedule.lr_at(0), 0.1, "start_factor 1/3");
    assert_close(schedule.lr_at(2), 0.2, "half-way through the warm-up");
    assert_close(schedule.lr_at(4), 0.3, "peak");
}

#[test]
fn cosine_warm_restarts_restart_after_each_cycle() {
    let schedule = CosineWarmRestarts {
        base_lr: 0.1,
        t_0: 3,
        t_mult: 2,
        eta_min: 0.0,
        steps: 30,
    };
    // Cycles of 3, 6, 12 steps: restarts at steps 3, 9 and 21.
    for restart in [0, 3, 9, 21] {
        assert_close(schedule.lr_at(restart), 0.1, "restart");
    }
    assert_close(schedule.lr_at(6), 0.05, "middle of the six-step cycle");
    assert_close(schedule.lr_at(15), 0.05, "middle of the twelve-step cycle");
}

#[test]
fn peak_lr_and_steps_are_read_from_the_parameters() {
    let cases = [
        (
            json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100}),
            0.1,
            100,
        ),
        (
            json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 10}),
            0.01,
            10,
        ),
        (
            json!({"kind": "cosine_warm_restarts", "base_lr": 0.2, "T_0": 7, "steps": 20}),
            0.2,
            20,
        ),
        (
            json!({"kind": "warmup_cosine", "max_lr": 0.3, "total_steps": 50, "warmup_steps": 10}),
            0.3,
            50,
        ),
    ];
    for (json, peak, steps) in cases {
        let schedule = parse(json).unwrap();
        assert_eq!(schedule.peak_lr(), peak);
        assert_eq!(schedule.steps(), steps);
    }
}

/// Each case breaks one rule and names the field that the error must point at.
#[test]
fn validation_rejects_each_broken_rule_naming_the_field() {
    let one_cycle = |changes: Value| {
        let mut base = json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100});
        merge(&mut base, changes);
        base
    };
    let cyclic = |changes: Value| {
        let mut base = json!({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "steps": 100});
        merge(&mut base, changes);
        base
    };
    let cosine = |changes: Value| {
        let mut base =
            json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 10, "steps": 100});
        merge(&mut base, changes);
        base
    };
    let warmup = |changes: Value| {
        let mut base =
            json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 100, "warmup_steps": 10});
        merge(&mut base, changes);
        base
    };
    let cases = [
        (one_cycle(json!({"max_lr": 0.0})), "max_lr"),
        (one_cycle(json!({"max_lr": -0.1})), "max_lr"),
        (cyclic(json!({"base_lr": 0.0})), "base_lr"),
        (cosine(json!({"base_lr": -1.0})), "base_lr"),
        (warmup(json!({"max_lr": 0.0})), "max_lr"),
        (cyclic(json!({"base_lr": 0.1, "max_lr": 0.01})), "base_lr"),
        (one_cycle(json!({"total_steps": 0})), "total_steps"),
        (one_cycle(json!({"total_steps": 1001})), "total_steps"),
        (warmup(json!({"total_steps": 2000})), "total_steps"),
        (cyclic(json!({"steps": 0})), "steps"),
        (cosine(json!({"steps": 1001})), "steps"),
        (one_cycle(json!({"pct_start": 0.0})), "pct_start"),
        (one_cycle(json!({"pct_start": 1.0})), "pct_start"),
        (one_cycle(json!({"pct_start": -0.2})), "pct_start"),
        // pct_start * total_steps == 1: the warm-up ends at step 0, where it starts.
        (
            one_cycle(json!({"total_steps": 10, "pct_start": 0.1})),
            "pct_start",
        ),
        (one_cycle(json!({"total_steps": 2})), "pct_start"),
        (
            one_cycle(json!({"total_steps": 10, "pct_start": 0.1, "three_phase": true})),
            "pct_start",
        ),
        // 2 * 0.55 * 10 - 2 == 9 == total_steps - 1: nothing left for the third phase.
        (
            one_cycle(json!({"total_steps": 10, "pct_start": 0.55, "three_phase": true})),
            "pct_start",
        ),
        (one_cycle(json!({"div_factor": 0.0})), "div_factor"),
        (
            one_cycle(json!({"final_div_factor": -1.0})),
            "final_div_factor",
        ),
        (one_cycle(json!({"base_momentum": -0.1})), "base_momentum"),
        (one_cycle(json!({"max_momentum": 1.0})), "max_momentum"),
        (one_cycle(json!({"base_momentum": 0.96})), "base_momentum"),
        (cyclic(json!({"base_momentum": 0.95})), "base_momentum"),
        (cyclic(json!({"max_momentum": 1.5})), "max_momentum"),
        (cyclic(json!({"step_size_up": 0})), "step_size_up"),
        (cyclic(json!({"step_size_down": 0})), "step_size_down"),
        (cyclic(json!({"gamma": 0.0})), "gamma"),
        (cyclic(json!({"gamma": -0.5, "mode": "exp_range"})), "gamma"),
        (cosine(json!({"T_0": 0})), "T_0"),
        (cosine(json!({"T_mult": 0})), "T_mult"),
        (cosine(json!({"eta_min": -0.001})), "eta_min"),
        (cosine(json!({"eta_min": 0.1})), "eta_min"),
        (warmup(json!({"warmup_steps": 100})), "warmup_steps"),
        (warmup(json!({"warmup_steps": 150})), "warmup_steps"),
        (warmup(json!({"warmup_steps": 0})), "warmup_steps"),
        (warmup(json!({"start_factor": 0.0})), "start_factor"),
        (warmup(json!({"start_factor": 1.5})), "start_factor"),
        (warmup(json!({"eta_min": 0.2})), "eta_min"),
        (warmup(json!({"eta_min": -0.2})), "eta_min"),
    ];
    for (json, field) in cases {
        let schedule = parse(json.clone()).unwrap_or_else(|error| panic!("{json}: {error}"));
        let error = schedule
            .validate(1000)
            .expect_err(&format!("{json} should be rejected"));
        assert_eq!(error.field, field, "{json}: {error}");
        assert!(!error.message.is_empty());
    }
}

#[test]
fn validation_rejects_non_finite_values_built_in_code() {
    let mut schedule = OneCycle::new(f64::NAN, 100);
    assert_eq!(schedule.validate(1000).unwrap_err().field, "max_lr");
    schedule.max_lr = f64::INFINITY;
    assert_eq!(schedule.validate(1000).unwrap_err().field, "max_lr");
    schedule.max_lr = 0.1;
    schedule.pct_start = f64::NAN;
    assert_eq!(schedule.validate(1000).unwrap_err().field, "pct_start");
    schedule.pct_start = 0.3;
    schedule.div_factor = f64::INFINITY;
    assert_eq!(schedule.validate(1000).unwrap_err().field, "div_factor");
}

#[test]
fn validation_accepts_the_edges_of_each_rule() {
    let accepted = [
        json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 1000}),
        // Three-phase needs 2 * pct_start * total_steps < total_steps + 1: 10 < 11 here.
        json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 10, "pct_start": 0.5, "three_phase": true}),
        json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 4, "pct_start": 0.3}),
        // Momenta are not checked when they are not used.
        json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100, "cycle_momentum": false,
               "base_momentum": 0.99}),
        json!({"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.01, "steps": 1}),
        json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 1, "steps": 1}),
        json!({"kind": "warmup_cosine", "max_lr": 0.1, "total_steps": 2, "warmup_steps": 1,
               "start_factor": 1.0}),
    ];
    for json in accepted {
        let schedule = parse(json.clone()).unwrap();
        schedule
            .validate(1000)
            .unwrap_or_else(|error| panic!("{json} rejected: {error}"));
        assert!(
            schedule.curve().lr.iter().all(|lr| lr.is_finite()),
            "{json}"
        );
    }
}

#[test]
fn a_schedule_error_displays_as_field_then_message() {
    let error =
        parse(json!({"kind": "one_cycle", "max_lr": 0.1, "total_steps": 10, "pct_start": 0.1}))
            .unwrap()
            .validate(1000)
            .unwrap_err();
    let text = error.to_string();
    assert!(
        text.starts_with("pct_start: pct_start * total_steps is 1.0"),
        "{text}"
    );
    assert!(text.contains("raise pct_start or total_steps"), "{text}");
}

#[test]
fn pytorch_lines_are_ready_to_paste() {
    let one_cycle = Schedule::OneCycle(OneCycle::new(0.0123, 1000));
    assert_eq!(
        one_cycle.pytorch(),
        "OneCycleLR(optimizer, max_lr=0.0123, total_steps=1000, pct_start=0.3, anneal_strategy='cos', \
         div_factor=25.0, final_div_factor=10000.0, three_phase=False, cycle_momentum=True, \
         base_momentum=0.85, max_momentum=0.95)"
    );
    let cyclic = parse(
        json!({"kind": "cyclic", "base_lr": 1e-5, "max_lr": 0.01, "steps": 10,
                              "mode": "exp_range", "gamma": 0.99, "cycle_momentum": false}),
    )
    .unwrap();
    assert_eq!(
        cyclic.pytorch(),
        "CyclicLR(optimizer, base_lr=1e-5, max_lr=0.01, step_size_up=2000, step_size_down=2000, \
         mode='exp_range', gamma=0.99, cycle_momentum=False, base_momentum=0.8, max_momentum=0.9)"
    );
    let cosine = parse(
        json!({"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 10, "T_mult": 2,
                              "eta_min": 1e-4, "steps": 10}),
    )
    .unwrap();
    assert_eq!(
        cosine.pytorch(),
        "CosineAnnealingWarmRestarts(optimizer, T_0=10, T_mult=2, eta_min=0.0001)  \
         # optimizer created with lr=0.1"
    );
    let warmup = parse(
        json!({"kind": "warmup_cosine", "max_lr": 0.01, "total_steps": 1000,
                              "warmup_steps": 100}),
    )
    .unwrap();
    assert_eq!(
        warmup.pytorch(),
        "SequentialLR(optimizer, schedulers=[LinearLR(optimizer, start_factor=0.3333333333333333, \
         end_factor=1.0, total_iters=100), CosineAnnealingLR(optimizer, T_max=900, eta_min=0.0)], \
         milestones=[100])  # optimizer created with lr=0.01"
    );
}

#[test]
fn python_floats_round_trip_and_stay_floats() {
    for value in [0.1, 25.0, 1e4, 1e-8, 1.0 / 3.0, 0.1 + 0.2, 1e20, 5e-324] {
        let text = python_float(value);
        assert!(
            text.contains('.') || text.contains('e'),
            "{text} would be an int in Python"
        );
        assert_eq!(text.parse::<f64>().unwrap(), value);
    }
    assert_eq!(python_float(f64::NAN), "float('nan')");
    assert_eq!(python_float(f64::NEG_INFINITY), "float('-inf')");
}

#[test]
fn invalid_schedules_do_not_panic_when_evaluated() {
    let cosine = CosineWarmRestarts {
        base_lr: 0.1,
        t_0: 0,
        t_mult: 0,
        eta_min: 0.0,
        steps: 5,
    };
    assert!(cosine.lr_at(3).is_nan());
    let warmup = WarmupCosine {
        max_lr: 0.1,
        total_steps: 5,
        warmup_steps: 8,
        start_factor: 0.5,
        eta_min: 0.0,
    };
    assert!(warmup.lr_at(9).is_nan());
    let one_cycle = OneCycle {
        pct_start: 0.1,
        ..OneCycle::new(0.1, 10)
    };
    assert!(one_cycle.lr_at(0).is_nan());
}

#[test]
fn golden_cosine_and_step_schedules_match_pytorch_at_every_step() {
    assert_golden_schedules(GOLDEN_EXTRA, 4);
}

#[test]
fn golden_reduce_on_plateau_cases_match_pytorch_after_every_step() {
    let golden: Value = serde_json::from_str(GOLDEN_PLATEAU).expect("golden file parses");
    let cases = golden["cases"].as_array().expect("a list of cases");
    assert_eq!(cases.len(), 7);
    for case in cases {
        let mut params = case["params"].clone();
        params["kind"] = case["kind"].clone();
        params["metrics"] = case["metrics"].clone();
        let schedule = parse(params.clone())
            .unwrap_or_else(|error| panic!("golden params {params} rejected: {error}"));
        schedule
            .validate(NO_STEP_LIMIT)
            .unwrap_or_else(|error| panic!("golden params {params} invalid: {error}"));
        let expected = numbers(&case["lr_after_step"]);
        let curve = schedule.curve();
        assert_eq!(curve.lr.len(), expected.len());
        assert_eq!(curve.momentum, None);
        for (step, &expected) in expected.iter().enumerate() {
            let what = format!("{} lr after step {step}", case["params"]);
            assert_close(curve.lr[step], expected, &what);
            assert_close(schedule.lr_at(step), expected, &what);
        }
    }
}

fn plateau(params: Value, metrics: &[f64]) -> Vec<f64> {
    let mut json = json!({"kind": "reduce_on_plateau", "lr": 1.0, "metrics": metrics});
    merge(&mut json, params);
    let schedule = parse(json.clone()).unwrap_or_else(|error| panic!("{json}: {error}"));
    schedule
        .validate(NO_STEP_LIMIT)
        .unwrap_or_else(|error| panic!("{json}: {error}"));
    schedule.curve().lr
}

#[test]
fn plateau_reduces_after_more_than_patience_bad_steps_in_min_mode() {
    // Best 1.0 at step 0; steps 1 and 2 are bad (num_bad_epochs 1, 2 > patience 1): cut at 2.
    let lr = plateau(
        json!({"factor": 0.5, "patience": 1}),
        &[1.0, 1.0, 1.0, 0.5, 0.6, 0.7],
    );
    assert_eq!(lr, vec![1.0, 1.0, 0.5, 0.5, 0.5, 0.25]);
}

#[test]
fn plateau_rel_threshold_needs_a_relative_improvement() {
    // With threshold 0.1 (rel), 0.95 is not below 1.0 * 0.9: a bad step. 0.89 is a new best;
    // 0.85 and 0.81 are not below 0.89 * 0.9, so the second of them cuts.
    let lr = plateau(
        json!({"factor": 0.1, "patience": 1, "threshold": 0.1}),
        &[1.0, 0.95, 0.89, 0.85, 0.81],
    );
    assert_eq!(lr, vec![1.0, 1.0, 1.0, 1.0, 0.1]);
}

#[test]
fn plateau_abs_threshold_in_max_mode_needs_best_plus_threshold() {
    // Accuracy: 0.5 is best; 0.505 is not above 0.5 + 0.01, 0.52 is; then two bad steps.
    let lr = plateau(
        json!({"mode": "max", "threshold_mode": "abs", "threshold": 0.01, "patience": 1,
               "factor": 0.5}),
        &[0.5, 0.505, 0.52, 0.52, 0.51, 0.9],
    );
    assert_eq!(lr, vec![1.0, 1.0, 1.0, 1.0, 0.5, 0.5]);
}

#[test]
fn plateau_cooldown_ignores_bad_steps_until_it_runs_out() {
    // Patience 0: every bad step cuts, except during the 2 steps of cooldown after a cut.
    let lr = plateau(
        json!({"factor": 0.5, "patience": 0, "cooldown": 2}),
        &[1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
    );
    assert_eq!(lr, vec![1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]);
}

#[test]
fn plateau_stops_at_min_lr_and_skips_cuts_smaller_than_eps() {
    let lr = plateau(
        json!({"factor": 0.1, "patience": 0, "min_lr": 0.05}),
        &[1.0, 2.0, 2.0, 2.0],
    );
    assert_eq!(lr, vec![1.0, 0.1, 0.05, 0.05]);
    // A cut from 1.0 to 0.9 is 0.1, not above eps 0.2: the learning rate stays.
    let lr = plateau(
        json!({"factor": 0.9, "patience": 0, "eps": 0.2}),
        &[1.0, 2.0, 2.0],
    );
    assert_eq!(lr, vec![1.0, 1.0, 1.0]);
}

#[test]
fn a_live_plateau_tracker_gives_the_same_rates_as_the_replayed_schedule() {
    let mut rule = ReduceOnPlateau::new(0.1, PlateauMode::Min);
    rule.patience = 2;
    rule.metrics = vec![3.0, 2.0, 2.5, 2.5, 2.5, 1.0, 1.5, 1.5, 1.5];
    let mut tracker = rule.tracker();
    assert_eq!(tracker.lr(), 0.1);
    let live: Vec<f64> = rule.metrics.iter().map(|&m| tracker.step(m)).collect();
    assert_eq!(live, rule.lrs());
    assert_eq!(tracker.lr(), *live.last().unwrap());
    rule.validate_rule().unwrap();
}

#[test]
fn cosine_within_t_max_is_the_closed_form_and_reaches_eta_min() {
    let cosine = Cosine {
        lr: 0.2,
        t_max: 30,
        eta_min: 0.01,
        steps: 31,
    };
    let lrs = cosine.lrs(31);
    for (step, lr) in lrs.iter().enumerate() {
        let closed = 0.01 + (0.2 - 0.01) * (1.0 + (PI * step as f64 / 30.0).cos()) / 2.0;
        assert!((lr - closed).abs() < 1e-15, "step {step}: {lr} vs {closed}");
    }
    assert!((lrs[30] - 0.01).abs() < 1e-15);
    // Past T_max PyTorch's recursion climbs back to lr after another T_max steps.
    let long = cosine.lrs(61);
    assert!((long[60] - 0.2).abs() < 1e-12, "{}", long[60]);
}

#[test]
fn step_lr_multiplies_by_gamma_at_each_multiple_of_step_size() {
    let step = StepLr {
        lr: 1.0,
        step_size: 3,
        gamma: 0.5,
        steps: 8,
    };
    assert_eq!(
        Schedule::Step(step).curve().lr,
        vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    );
    let defaults = parse(json!({"kind": "step", "lr": 0.1, "step_size": 1, "steps": 2})).unwrap();
    assert_eq!(defaults.curve().lr, vec![0.1, 0.1 * 0.1]);
}

#[test]
fn new_kinds_reject_each_broken_rule_naming_the_field() {
    let cases = [
        (
            json!({"kind": "cosine", "lr": 0.0, "T_max": 10, "steps": 10}),
            "lr",
        ),
        (
            json!({"kind": "cosine", "lr": 0.1, "T_max": 0, "steps": 10}),
            "T_max",
        ),
        (
            json!({"kind": "cosine", "lr": 0.1, "T_max": 10, "eta_min": 0.2, "steps": 10}),
            "eta_min",
        ),
        (
            json!({"kind": "cosine", "lr": 0.1, "T_max": 10, "steps": 0}),
            "steps",
        ),
        (
            json!({"kind": "step", "lr": 0.1, "step_size": 0, "steps": 10}),
            "step_size",
        ),
        (
            json!({"kind": "step", "lr": 0.1, "step_size": 2, "gamma": -1.0, "steps": 10}),
            "gamma",
        ),
        (
            json!({"kind": "step", "lr": 0.1, "step_size": 2, "steps": 2000}),
            "steps",
        ),
        (
            json!({"kind": "reduce_on_plateau", "lr": -0.1, "metrics": [1.0]}),
            "lr",
        ),
        (
            json!({"kind": "reduce_on_plateau", "lr": 0.1, "factor": 1.0, "metrics": [1.0]}),
            "factor",
        ),
        (
            json!({"kind": "reduce_on_plateau", "lr": 0.1, "threshold": -1.0, "metrics": [1.0]}),
            "threshold",
        ),
        (
            json!({"kind": "reduce_on_plateau", "lr": 0.1, "min_lr": -1.0, "metrics": [1.0]}),
            "min_lr",
        ),
        (
            json!({"kind": "reduce_on_plateau", "lr": 0.1, "eps": -1.0, "metrics": [1.0]}),
            "eps",
        ),
        (
            json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": []}),
            "metrics",
        ),
        (
            json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": vec![1.0; 1001]}),
            "metrics",
        ),
    ];
    for (json, field) in cases {
        let schedule = parse(json.clone()).unwrap_or_else(|error| panic!("{json}: {error}"));
        let error = schedule
            .validate(1000)
            .expect_err(&format!("{json} should be rejected"));
        assert_eq!(error.field, field, "{json}: {error}");
    }
    let error =
        parse(json!({"kind": "reduce_on_plateau", "lr": 0.1, "mode": "lowest", "metrics": [1.0]}))
            .unwrap_err();
    assert!(
        error.to_string().contains("unknown variant `lowest`"),
        "{error}"
    );
}

#[test]
fn new_kinds_print_their_pytorch_line() {
    let cosine = parse(json!({"kind": "cosine", "lr": 0.1, "T_max": 50, "steps": 50})).unwrap();
    assert_eq!(
        cosine.pytorch(),
        "CosineAnnealingLR(optimizer, T_max=50, eta_min=0.0)  # optimizer created with lr=0.1"
    );
    let step = parse(json!({"kind": "step", "lr": 0.1, "step_size": 7, "steps": 50})).unwrap();
    assert_eq!(
        step.pytorch(),
        "StepLR(optimizer, step_size=7, gamma=0.1)  # optimizer created with lr=0.1"
    );
    let plateau = parse(json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": [1.0]})).unwrap();
    assert_eq!(
        plateau.pytorch(),
        "ReduceLROnPlateau(optimizer, mode='min', factor=0.1, patience=10, threshold=0.0001, \
         threshold_mode='rel', cooldown=0, min_lr=0.0, eps=1e-8)  # optimizer created with \
         lr=0.1; call scheduler.step(metric) after each evaluation"
    );
}

fn merge(base: &mut Value, changes: Value) {
    if let (Some(base), Value::Object(changes)) = (base.as_object_mut(), changes) {
        base.extend(changes);
    }
}
