use std::sync::atomic::{AtomicBool, Ordering};

use lrtune::engine::compare::{
    evaluation_steps, run_compare, run_compare_with, CompareResult, RACE_POINTS,
};
use lrtune::engine::{self, EngineError, Event, JobSpec, Limits, Trials, ValidSpec};

/// A small race on spirals: two default recipes and a custom plateau one, two seeds.
const SPIRALS_RACE: &str = r#"{
    "kind": "compare",
    "data": {"builtin": "spirals", "samples": 1024},
    "model": {"arch": "mlp", "hidden": [32, 32]},
    "batch_size": 32,
    "plan": {"epochs": 3},
    "range_test": {"start_lr": 1e-5, "end_lr": 10, "steps": 60},
    "sweep": {"count": 3, "epochs": 1},
    "recipes": ["sgd_one_cycle", "adam_constant",
        {"name": "adam_fast_plateau", "optimizer": {"name": "adam"},
         "schedule": {"kind": "reduce_on_plateau", "factor": 0.5, "patience": 0}}],
    "seeds": 2,
    "target": 0.9
}"#;

fn race(spec_json: &str, cancel: &AtomicBool) -> (Result<CompareResult, EngineError>, Vec<Event>) {
    let spec = ValidSpec::parse(spec_json, &Limits::default()).expect("a valid spec");
    let loaded = engine::load_local_data(&spec).expect("data loads");
    let mut events = Vec::new();
    let mut observer = |event: Event| {
        if let Event::Progress { done, .. } = event {
            if done == 300 {
                cancel.store(true, Ordering::Relaxed);
            }
        }
        events.push(event);
    };
    let result = run_compare(&spec, loaded, &Limits::default(), cancel, &mut observer);
    (result, events)
}

#[test]
fn a_race_tunes_each_recipe_then_runs_every_seed_with_curves_targets_and_a_verdict() {
    let spec = ValidSpec::parse(SPIRALS_RACE, &Limits::default()).unwrap();
    let loaded = engine::load_local_data(&spec).unwrap();
    let cancel = AtomicBool::new(false);
    let mut progress = Vec::new();
    let mut observer = |event: Event| {
        if let Event::Progress { done, total } = event {
            progress.push((done, total));
        }
    };
    let result =
        run_compare(&spec, loaded, &Limits::default(), &cancel, &mut observer).expect("race runs");

    let names: Vec<&str> = result.recipes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["sgd_one_cycle", "adam_constant", "adam_fast_plateau"]
    );
    assert_eq!(result.recipes[0].optimizer, "sgd");
    assert_eq!(result.recipes[0].schedule, "one_cycle");
    assert_eq!(result.recipes[2].schedule, "reduce_on_plateau");
    let plan_steps = result.timing.plan_steps;
    assert_eq!(
        result.timing.steps_per_epoch, 25,
        "full batches of 32 in 80 % of 1024 rows"
    );
    assert_eq!(plan_steps, 3 * 25);
    assert_eq!(result.timing.race_steps, 3 * 2 * plan_steps);
    assert!(
        result.timing.tune_steps > 3 * 60,
        "every recipe ran a range test and a sweep"
    );
    let expected_steps: Vec<usize> = std::iter::once(0)
        .chain(evaluation_steps(plan_steps))
        .collect();
    assert_eq!(expected_steps.len(), RACE_POINTS + 1);
    for recipe in &result.recipes {
        assert!(recipe.lr.is_finite() && recipe.lr > 0.0, "{}", recipe.name);
        assert_eq!(recipe.runs.len(), 2);
        assert_eq!(recipe.runs[0].seed, 0);
        assert_eq!(recipe.runs[1].seed, 1);
        for run in &recipe.runs {
            assert!(!run.diverged, "{}", recipe.name);
            let steps: Vec<usize> = run.points.iter().map(|p| p.step).collect();
            assert_eq!(steps, expected_steps);
            assert!(run.points.windows(2).all(|w| w[0].seconds <= w[1].seconds));
            assert_eq!(run.points[0].seconds, 0.0);
            assert!(run
                .points
                .iter()
                .all(|p| p.val_loss.is_some() && p.val_accuracy.is_some()));
        }
        let finals: Vec<f64> = recipe
            .runs
            .iter()
            .map(|run| run.points.last().unwrap().val_accuracy.unwrap())
            .collect();
        let accuracy = recipe.final_val_accuracy.expect("classification");
        let mean = (finals[0] + finals[1]) / 2.0;
        assert!((accuracy.mean.unwrap() - mean).abs() < 1e-12);
        let std = ((finals[0] - mean).powi(2) + (finals[1] - mean).powi(2)).sqrt();
        assert!((accuracy.std.unwrap() - std).abs() < 1e-12);
    }
    // Each seed starts every recipe from the same weights (the validation chunks differ once
    // a model has trained, hence the summation-order tolerance).
    let start = |r: usize, s: usize| result.recipes[r].runs[s].points[0].val_loss.unwrap();
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-7 * a.abs();
    assert!(
        same(start(0, 0), start(1, 0)),
        "{} {}",
        start(0, 0),
        start(1, 0)
    );
    assert!(
        same(start(0, 1), start(2, 1)),
        "{} {}",
        start(0, 1),
        start(2, 1)
    );
    assert!(!same(start(0, 0), start(0, 1)), "seeds differ");

    // The plateau recipe's learning rate only ever halves, and only at evaluation points.
    let plateau = &result.recipes[2];
    for run in &plateau.runs {
        for pair in run.points.windows(2) {
            let ratio = pair[1].lr / pair[0].lr;
            assert!(ratio == 1.0 || (ratio - 0.5).abs() < 1e-12, "{ratio}");
        }
    }
    assert_eq!(plateau.runs[0].points[0].lr, plateau.lr);

    // Ranking by final accuracy; the target is a fraction of the best one's.
    let mean_of = |name: &str| {
        let recipe = result.recipes.iter().find(|r| r.name == name).unwrap();
        recipe.final_val_accuracy.unwrap().mean.unwrap()
    };
    assert_eq!(result.ranking.len(), 3);
    assert!(result
        .ranking
        .windows(2)
        .all(|w| mean_of(&w[0]) >= mean_of(&w[1])));
    assert_eq!(result.target.metric, "val_accuracy");
    assert_eq!(
        result.target.of_recipe.as_deref(),
        Some(result.ranking[0].as_str())
    );
    let value = result.target.value.unwrap();
    assert!((value - 0.9 * mean_of(&result.ranking[0])).abs() < 1e-12);
    for recipe in &result.recipes {
        let firsts: Option<Vec<(usize, f64)>> = recipe
            .runs
            .iter()
            .map(|run| {
                run.points
                    .iter()
                    .find(|p| p.val_accuracy.unwrap() >= value)
                    .map(|p| (p.step, p.seconds))
            })
            .collect();
        match firsts {
            Some(firsts) => {
                let steps = (firsts[0].0 + firsts[1].0) as f64 / 2.0;
                assert_eq!(recipe.steps_to_target, Some(steps.round() as usize));
                let seconds = (firsts[0].1 + firsts[1].1) / 2.0;
                assert!((recipe.seconds_to_target.unwrap() - seconds).abs() < 1e-12);
            }
            None => {
                assert_eq!(recipe.steps_to_target, None);
                assert_eq!(recipe.seconds_to_target, None);
            }
        }
    }
    assert!(
        result.verdict.contains(&result.ranking[0]),
        "{}",
        result.verdict
    );
    assert!(result.verdict.contains("90 %"), "{}", result.verdict);

    // Progress counts up to the race's last step and never past its total.
    let (done, total) = *progress.last().unwrap();
    assert_eq!(done, result.timing.tune_steps + result.timing.race_steps);
    assert_eq!(done, total);
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0));

    // The result round-trips through JSON, as the store keeps it.
    let json = serde_json::to_value(&result).unwrap();
    assert!(json["recipes"][0]["final_val_loss"]["mean"].is_f64());
    assert!(json["recipes"][0]["runs"][0]["points"][1]["val_accuracy"].is_f64());
    let back: CompareResult =
        serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(back, result);
}

#[test]
fn a_race_stops_within_a_step_of_a_cancel() {
    let cancel = AtomicBool::new(false);
    let (result, events) = race(SPIRALS_RACE, &cancel);
    assert!(matches!(result, Err(EngineError::Canceled)), "{result:?}");
    let last_done = events
        .iter()
        .filter_map(|event| match event {
            Event::Progress { done, .. } => Some(*done),
            _ => None,
        })
        .max()
        .unwrap();
    assert_eq!(last_done, 300, "no step after the cancel");
}

#[test]
fn a_race_spec_names_each_bad_field() {
    let limits = Limits::default();
    // The spirals race with the edit's top-level fields replaced, parsed and checked.
    let parse = |edit: &str| {
        let base: serde_json::Value = serde_json::from_str(SPIRALS_RACE).unwrap();
        let mut base = base.as_object().unwrap().clone();
        let edit: serde_json::Value = serde_json::from_str(edit).unwrap();
        for (key, value) in edit.as_object().unwrap() {
            base.insert(key.clone(), value.clone());
        }
        ValidSpec::from_value(serde_json::Value::Object(base), &limits)
    };
    let with = |edit: &str| parse(edit).expect_err("rejected");
    let error = with(r#"{"recipes": ["sgd_one_cycle", "adam_onecycle"]}"#);
    assert_eq!(error.field, "recipes[1]");
    assert!(
        error.message.contains("unknown recipe `adam_onecycle`"),
        "{}",
        error.message
    );
    let error = with(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "adam"}, "schedule": {"kind": "reduce_on_plateau", "factor": 1.5}}]}"#,
    );
    assert_eq!(error.field, "recipes[0].schedule.factor");
    let error = with(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "adam"}, "schedule": {"kind": "step"}}]}"#,
    );
    assert!(error.field.starts_with("recipes[0].schedule"), "{error:?}");
    assert!(error.message.contains("step_epochs"), "{error:?}");
    let error = with(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "sgd", "momentum": 1.5}, "schedule": {"kind": "constant"}}]}"#,
    );
    assert!(error.field.starts_with("recipes[0].optimizer"), "{error:?}");
    let error = with(r#"{"recipes": ["adam_constant", "adam_constant"]}"#);
    assert_eq!(error.field, "recipes[1].name");
    let error = with(r#"{"recipes": []}"#);
    assert_eq!(error.field, "recipes");
    let error = with(r#"{"seeds": 0}"#);
    assert_eq!(error.field, "seeds");
    let error = with(r#"{"target": 1.5}"#);
    assert_eq!(error.field, "target");
    // 3 recipes x 10 seeds x 7 epochs = 210 epochs of full runs, above max_sweep_epochs (200).
    let error = with(r#"{"seeds": 10, "plan": {"epochs": 7}}"#);
    assert_eq!(error.field, "seeds");
    assert!(error.message.contains("210 epochs"), "{}", error.message);
    let error = with(r#"{"kind": "tune"}"#);
    assert_eq!(error.field, "recipes", "race fields are refused on a tune");

    // Tuned or not: a fixed lr only without tuning, and one there must be.
    let error = with(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "adam"}, "schedule": {"kind": "constant"}, "lr": 0.001}]}"#,
    );
    assert_eq!(error.field, "recipes[0].lr");
    assert!(error.message.contains("set tune to false"), "{error:?}");
    let error = with(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "sgd"}, "schedule": {"kind": "constant"}, "tune": false}]}"#,
    );
    assert_eq!(error.field, "recipes[0].lr");
    assert!(error.message.contains("sgd has no default"), "{error:?}");
    let error = with(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "adam"}, "schedule": {"kind": "constant"}, "tune": false, "lr": -1}]}"#,
    );
    assert_eq!(error.field, "recipes[0].lr");
    let error = with(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "adam"}, "schedule": {"kind": "constant"}, "warmup_fraction": 0.05}]}"#,
    );
    assert_eq!(error.field, "recipes[0].warmup_fraction");
    assert!(error.message.contains("adam has none"), "{error:?}");
    let error = with(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "schedule_free_sgd"}, "schedule": {"kind": "constant"}, "warmup_fraction": 1.0}]}"#,
    );
    assert_eq!(error.field, "recipes[0].warmup_fraction");
    // A challenger may be tuned like any other recipe.
    let spec = parse(
        r#"{"recipes": [{"name": "x", "optimizer": {"name": "prodigy"}, "schedule": {"kind": "cosine"}, "tune": true}]}"#,
    )
    .unwrap();
    let recipe = &spec.compare_recipes()[0];
    assert!(recipe.tune);
    assert_eq!(recipe.fixed_lr(), None);
}

#[test]
fn a_race_over_the_memory_limit_is_refused_before_any_step() {
    let spec = ValidSpec::parse(SPIRALS_RACE, &Limits::default()).unwrap();
    let limits = Limits {
        max_job_memory: 1024,
        ..Limits::default()
    };
    let loaded = engine::load_local_data(&spec).unwrap();
    let mut steps = 0;
    let mut observer = |event: Event| {
        if let Event::Progress { done, .. } = event {
            steps = steps.max(done);
        }
    };
    let error = run_compare(
        &spec,
        loaded,
        &limits,
        &AtomicBool::new(false),
        &mut observer,
    )
    .expect_err("refused");
    assert!(matches!(error, EngineError::Spec(_)), "{error:?}");
    assert_eq!(steps, 0);
}

#[test]
fn the_default_race_has_the_seven_recipes_and_two_seeds() {
    let spec = ValidSpec::parse(
        r#"{"kind": "compare", "data": {"builtin": "mnist10k"}, "plan": {"epochs": 5}}"#,
        &Limits::default(),
    )
    .unwrap();
    let names: Vec<String> = spec.compare_recipes().into_iter().map(|r| r.name).collect();
    assert_eq!(
        names,
        [
            "sgd_one_cycle",
            "adam_constant",
            "adam_plateau",
            "sgd_warm_restarts",
            "adamw_warmup_cosine",
            "prodigy",
            "schedule_free_adamw"
        ]
    );
    // The classic recipes are tuned; the learning-rate-free ones race at their defaults.
    let tuned: Vec<bool> = spec.compare_recipes().iter().map(|r| r.tune).collect();
    assert_eq!(tuned, [true, true, true, true, true, false, false]);
    assert_eq!(spec.compare_seeds(), 2);
    assert_eq!(spec.compare_target(), 0.98);
    // The stored spec (recipes spelled out) parses back to the same race.
    let mut stored = spec.spec().clone();
    stored.recipes = Some(spec.compare_recipes());
    let text = serde_json::to_string(&stored).unwrap();
    assert_eq!(JobSpec::from_json(&text).unwrap(), stored);
}

/// The challengers raced untuned beside one tuned recipe: no tuning steps for them, Prodigy's
/// `d` reported, the warm-up set from the run's length, and a verdict on what tuning bought.
#[test]
fn untuned_challengers_race_at_their_defaults_and_the_verdict_says_what_tuning_bought() {
    let spec = ValidSpec::parse(
        r#"{
        "kind": "compare",
        "data": {"builtin": "spirals", "samples": 1024},
        "model": {"arch": "mlp", "hidden": [32, 32]},
        "batch_size": 32,
        "plan": {"epochs": 3},
        "range_test": {"start_lr": 1e-5, "end_lr": 10, "steps": 60},
        "sweep": {"count": 3, "epochs": 1},
        "recipes": ["adam_constant", "prodigy", "schedule_free_adamw", "schedule_free_sgd",
            {"name": "adam_1e-3", "optimizer": {"name": "adam"}, "schedule": {"kind": "constant"},
             "tune": false, "lr": 0.001}],
        "seeds": 2,
        "target": 0.9
    }"#,
        &Limits::default(),
    )
    .unwrap();
    let recipes = spec.compare_recipes();
    let warmups: Vec<Option<f64>> = recipes.iter().map(|r| r.warmup_fraction).collect();
    assert_eq!(warmups, [None, None, Some(0.05), Some(0.05), None]);
    let loaded = engine::load_local_data(&spec).unwrap();
    let mut progress = Vec::new();
    let mut observer = |event: Event| {
        if let Event::Progress { done, total } = event {
            progress.push((done, total));
        }
    };
    let result = run_compare(
        &spec,
        loaded,
        &Limits::default(),
        &AtomicBool::new(false),
        &mut observer,
    )
    .expect("race runs");
    let by_name = |name: &str| result.recipes.iter().find(|r| r.name == name).unwrap();
    let adam = by_name("adam_constant");
    assert!(adam.tuned);
    assert!(adam.tune_steps > 60, "a range test and a sweep");
    assert_eq!(result.timing.tune_steps, adam.tune_steps);
    for (name, lr) in [
        ("prodigy", 1.0),
        ("schedule_free_adamw", 0.0025),
        ("schedule_free_sgd", 1.0),
        ("adam_1e-3", 0.001),
    ] {
        let recipe = by_name(name);
        assert!(!recipe.tuned, "{name}");
        assert_eq!((recipe.tune_steps, recipe.lr), (0, lr), "{name}");
        assert_eq!(recipe.runs.len(), 2, "{name}");
    }
    assert_eq!(result.timing.race_steps, 5 * 2 * result.timing.plan_steps);
    // Progress was planned exactly: one recipe's tuning and every run.
    let (done, total) = *progress.last().unwrap();
    assert_eq!(done, adam.tune_steps + result.timing.race_steps);
    assert_eq!(done, total);

    // Prodigy reports its estimate at every point; it starts at d0 and grows.
    let prodigy = by_name("prodigy");
    for run in &prodigy.runs {
        assert_eq!(run.points[0].d, Some(1e-6));
        let last = run.points.last().unwrap().d.unwrap();
        assert!(last > 1e-6, "d grew: {last}");
    }
    let final_d = prodigy.final_d.expect("prodigy's d");
    let mean = prodigy
        .runs
        .iter()
        .map(|run| run.points.last().unwrap().d.unwrap())
        .sum::<f64>()
        / 2.0;
    assert!((final_d.mean.unwrap() - mean).abs() < 1e-12);
    assert!(by_name("schedule_free_adamw").final_d.is_none());
    assert!(by_name("schedule_free_adamw").runs[0].points[0].d.is_none());

    // The verdict compares the best tuned recipe with the best untuned one, with the cost.
    assert!(
        result.verdict.contains(&format!(
            "adam_constant (tuned: {} steps of tuning)",
            lrtune::engine::compare::thousands(adam.tune_steps)
        )),
        "{}",
        result.verdict
    );
    assert!(
        [
            "tuning paid: ",
            "tuning did not pay: ",
            "what tuning bought is within seed noise: "
        ]
        .iter()
        .any(|words| result.verdict.contains(words)),
        "{}",
        result.verdict
    );
    assert!(result.verdict.contains("(untuned)"), "{}", result.verdict);

    // Stored and read back, as the service keeps it.
    let json = serde_json::to_value(&result).unwrap();
    assert_eq!(json["recipes"][1]["tuned"], false);
    assert!(json["recipes"][1]["final_d"]["mean"].is_f64());
    let back: CompareResult = serde_json::from_value(json).unwrap();
    assert_eq!(back, result);
}

/// The race's result with every timing (seconds) left out.
fn without_timing(result: &CompareResult) -> serde_json::Value {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                map.retain(|key, _| key != "timing" && !key.contains("seconds"));
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(result).unwrap();
    strip(&mut value);
    value
}

#[test]
fn a_race_run_side_by_side_gives_the_same_result_and_counts_every_step_once() {
    let spec = ValidSpec::parse(SPIRALS_RACE, &Limits::default()).unwrap();
    let race_with = |trials: Trials| {
        let loaded = engine::load_local_data(&spec).unwrap();
        let cancel = AtomicBool::new(false);
        let mut last = None;
        let mut observer = |event: Event| {
            if let Event::Progress { done, total } = event {
                last = Some((done, total));
            }
        };
        let result = run_compare_with(
            &spec,
            loaded,
            &Limits::default(),
            trials,
            &cancel,
            &mut observer,
        )
        .expect("race runs");
        (result, last)
    };
    let (serial, serial_progress) = race_with(Trials::serial());
    let (side_by_side, progress) = race_with(Trials::new(3));
    assert_eq!(without_timing(&side_by_side), without_timing(&serial));
    let steps = serial.timing.tune_steps + serial.timing.race_steps;
    assert_eq!(serial_progress, Some((steps, steps)));
    assert_eq!(progress, Some((steps, steps)));
    assert_eq!(
        (
            side_by_side.timing.tune_steps,
            side_by_side.timing.race_steps
        ),
        (serial.timing.tune_steps, serial.timing.race_steps)
    );
}
