use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use lrtune::engine::backend::DeviceData;
use lrtune::engine::model::{Model, ModelShape};
use lrtune::engine::optim::Optimizer;
use lrtune::engine::range_test::{run_range_test, RangeTestInputs};
use lrtune::engine::schedule::Schedule;
use lrtune::engine::spec::{OptimizerSpec, RangeTestSpec};
use lrtune::engine::sweep::EDGE_MARGIN;
use lrtune::engine::trainer::Trainer;
use lrtune::engine::{
    self, Control, Event, JobSpec, Limits, SpecError, SweepRun, TrialKind, TrialState, Trials,
    ValidSpec,
};

use super::{run, run_with, SPIRALS_TUNE};

#[test]
fn a_tune_on_mnist10k_recommends_its_best_sweep_candidate_with_a_band_around_it() {
    let (output, events) = run(r#"{
        "name": "mnist-e2e",
        "data": {"builtin": "mnist10k"},
        "model": {"arch": "mlp", "hidden": [64]},
        "batch_size": 64,
        "plan": {"epochs": 5},
        "range_test": {"start_lr": 1e-6, "end_lr": 10, "steps": 100},
        "sweep": {"count": 4, "epochs": 1}
    }"#);
    let result = &output.result;
    assert_eq!(result.data.rows, 8000, "80 % of 10,000 digits train");
    assert_eq!(result.data.classes, Some(10));
    let range = result.range_test.as_ref().expect("tune runs a range test");
    assert_eq!(output.curve.len(), range.steps_run);
    let suggestions = range.suggestions;
    let valley = suggestions.valley.expect("valley");
    assert!(valley > 1e-4 && valley < 1.0, "valley {valley}");
    assert!(suggestions.edge.unwrap() > valley);

    assert_eq!(result.sweep.len(), 4);
    assert!(
        result.sweep.iter().any(|c| c.peak_lr == valley),
        "valley is a candidate"
    );
    let best = result
        .sweep
        .iter()
        .find(|c| c.best)
        .expect("a best candidate");
    let rec = &result.recommendation;
    assert_eq!(rec.source, "sweep");
    // The peak is the best candidate's, or refined between its neighbours while staying
    // nearer to it (in log space) than to any other candidate.
    let distance = |lr: f64| (lr / rec.peak_lr).ln().abs();
    for candidate in &result.sweep {
        assert!(
            distance(best.peak_lr) <= distance(candidate.peak_lr) + 1e-9,
            "{} is nearer {} than the best {}",
            rec.peak_lr,
            candidate.peak_lr,
            best.peak_lr
        );
    }
    assert!(rec.band[0] <= rec.peak_lr && rec.peak_lr <= rec.band[1]);
    for candidate in &result.sweep {
        if !candidate.diverged {
            assert!(candidate.val_loss >= best.val_loss);
        }
    }
    assert!(best.val_accuracy.unwrap() > 0.85, "{best:?}");
    // The schedule is sized for the planned run: 5 epochs of 125 batches.
    let Schedule::OneCycle(schedule) = &rec.schedule else {
        panic!("one_cycle expected")
    };
    assert_eq!(schedule.total_steps, 5 * 125);
    assert_eq!(schedule.max_lr, rec.peak_lr);
    assert!(rec.pytorch.starts_with("OneCycleLR(optimizer, max_lr="));
    assert!(rec.fastai.starts_with("learn.fit_one_cycle(5, lr_max="));
    // Every step reported, and the last progress event is complete.
    let points = events
        .iter()
        .filter(|e| matches!(e, Event::Point(_)))
        .count();
    assert_eq!(points, range.steps_run);
    let Some(Event::Progress { done, total }) = events
        .iter()
        .rev()
        .find(|e| matches!(e, Event::Progress { .. }))
    else {
        panic!("no progress")
    };
    assert_eq!(done, total);
    assert_eq!(*done, result.timing.total_steps);
}

#[test]
fn the_same_spec_and_seed_give_the_same_result() {
    let (first, _) = run(SPIRALS_TUNE);
    let (second, _) = run(SPIRALS_TUNE);
    assert_eq!(first.curve, second.curve);
    assert_eq!(first.result.sweep, second.result.sweep);
    assert_eq!(first.result.recommendation, second.result.recommendation);
    let other_seed = SPIRALS_TUNE.replace("\"batch_size\": 32", "\"batch_size\": 32, \"seed\": 9");
    let (third, _) = run(&other_seed);
    assert_ne!(first.curve, third.curve);
}

#[test]
fn the_result_is_the_same_whatever_the_number_of_trials_run_side_by_side() {
    // The default budget: a screening, finalists at the plan, then seeds, probes or steps
    // past the range as the results call for, each stage one batch.
    let spec = r#"{
        "data": {"builtin": "spirals", "samples": 1024},
        "model": {"arch": "mlp", "hidden": [32, 32]},
        "batch_size": 32,
        "plan": {"epochs": 6},
        "range_test": {"start_lr": 1e-5, "end_lr": 10, "steps": 60},
        "sweep": {"count": 5}
    }"#;
    let (serial, serial_events) = run_with(spec, Trials::serial());
    let (side_by_side, side_events) = run_with(spec, Trials::new(3));
    assert_eq!(serial.curve, side_by_side.curve);
    assert_eq!(serial.result.sweep, side_by_side.result.sweep);
    assert_eq!(
        serial.result.recommendation,
        side_by_side.result.recommendation
    );
    assert_eq!(
        serial.result.timing.total_steps,
        side_by_side.result.timing.total_steps
    );
    // The same runs were reported, in the order they finished.
    let runs = |events: &[Event]| {
        let mut runs: Vec<SweepRun> = events
            .iter()
            .filter_map(|event| match event {
                Event::SweepRun(run) => Some(*run),
                _ => None,
            })
            .collect();
        runs.sort_by(|a, b| {
            (a.steps, a.seed)
                .cmp(&(b.steps, b.seed))
                .then(a.peak_lr.total_cmp(&b.peak_lr))
        });
        runs
    };
    let reported = runs(&serial_events);
    assert!(reported.len() > 5, "{} runs", reported.len());
    assert_eq!(reported, runs(&side_events));
    // Side by side, progress still counts every step once.
    let last_progress = side_events.iter().rev().find_map(|event| match event {
        Event::Progress { done, total } => Some((*done, *total)),
        _ => None,
    });
    let steps = side_by_side.result.timing.total_steps;
    assert_eq!(last_progress, Some((steps, steps)));
    // Every run is a trial that said it started and how it ended: each index once each way,
    // the range test first, the sweep's runs as reported, the steps adding up to the job's.
    let trials = |events: &[Event]| {
        let mut started = Vec::new();
        let mut ended = Vec::new();
        for event in events {
            if let Event::Trial(trial) = event {
                match trial.state {
                    TrialState::Running => started.push(trial.index),
                    TrialState::Succeeded(outcome) => ended.push((trial.clone(), outcome)),
                    other => panic!("trial {} ended {other:?}", trial.index),
                }
            }
        }
        started.sort_unstable();
        assert_eq!(started, (0..ended.len()).collect::<Vec<_>>());
        ended.sort_by_key(|(trial, _)| trial.index);
        ended
    };
    for (events, result) in [(&serial_events, &serial), (&side_events, &side_by_side)] {
        let ended = trials(events);
        assert_eq!(ended.len(), reported.len() + 1);
        assert_eq!(ended[0].0.info.kind, TrialKind::RangeTest);
        assert_eq!(ended[0].1.steps_run, result.curve.len());
        let mut runs: Vec<(f64, u64, usize, Option<f64>)> = ended[1..]
            .iter()
            .map(|(trial, outcome)| {
                assert_eq!(trial.info.kind, TrialKind::Sweep);
                assert!(outcome.seconds > 0.0);
                (
                    trial.info.lr.unwrap(),
                    trial.info.seed,
                    trial.info.steps,
                    outcome.val_loss,
                )
            })
            .collect();
        runs.sort_by(|a, b| (a.2, a.1).cmp(&(b.2, b.1)).then(a.0.total_cmp(&b.0)));
        let expected: Vec<(f64, u64, usize, Option<f64>)> = reported
            .iter()
            .map(|run| {
                let loss = Some(run.val_loss).filter(|loss| loss.is_finite());
                (run.peak_lr, run.seed, run.steps, loss)
            })
            .collect();
        assert_eq!(runs, expected);
        let steps: usize = ended.iter().map(|(_, outcome)| outcome.steps_run).sum();
        assert_eq!(steps, result.result.timing.total_steps);
    }
}

#[test]
fn the_range_test_puts_weights_and_optimizer_state_back() {
    let spec = JobSpec::from_json(SPIRALS_TUNE).unwrap();
    let loaded = engine::load_local_data(&spec).unwrap();
    let device = candle_core::Device::Cpu;
    let train = DeviceData::new(&loaded.train, &device).unwrap();
    let shape = ModelShape {
        input: loaded.train.sample_shape(),
        output: loaded.train.output_dim(),
        task: loaded.train.task(),
    };
    let trainer = Trainer::new(
        Model::build(&spec.model, &shape, 0, &device).unwrap(),
        spec.backend,
    );
    let model = trainer.model();
    let adam = OptimizerSpec::Adam {
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut optimizer = Optimizer::new(&adam, model.vars());
    let before: Vec<Vec<f32>> = weights(model);
    let state_before = optimizer.state().clone();
    let cancel = AtomicBool::new(false);
    let mut sink = |_: Event| {};
    let mut control = Control::new(&cancel, &mut sink);
    let curve = run_range_test(
        RangeTestInputs {
            trainer: &trainer,
            optimizer: &mut optimizer,
            train: &train,
            validation: &train,
            batch_size: 32,
            seed: 0,
        },
        &RangeTestSpec::default(),
        &mut control,
    )
    .unwrap();
    assert!(curve.points.len() > 20, "the test trained");
    assert_eq!(weights(model), before, "weights restored bit for bit");
    assert_eq!(optimizer.state(), &state_before, "optimizer state restored");
}

fn weights(model: &Model) -> Vec<Vec<f32>> {
    model
        .vars()
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn a_tunes_sweep_equals_a_sweep_job_on_the_same_candidates() {
    // If the range test leaked any state into the sweep, these would differ.
    let (tune, _) = run(SPIRALS_TUNE);
    let candidates: Vec<f64> = tune.result.sweep.iter().map(|c| c.peak_lr).collect();
    let sweep_spec = SPIRALS_TUNE.replace(
        "\"sweep\": {\"count\": 3, \"epochs\": 1}",
        &format!(
            "\"kind\": \"sweep\", \"sweep\": {{\"candidates\": {}, \"epochs\": 1}}",
            serde_json::to_string(&candidates).unwrap()
        ),
    );
    let (sweep, _) = run(&sweep_spec);
    assert!(sweep.result.range_test.is_none());
    assert!(sweep.curve.is_empty());
    assert_eq!(tune.result.sweep, sweep.result.sweep);
}

#[test]
fn a_range_test_job_follows_the_exponential_schedule_and_stops_on_divergence() {
    let (output, _) = run(r#"{
        "kind": "range_test",
        "data": {"builtin": "blobs", "samples": 2048},
        "model": {"arch": "linear"},
        "optimizer": {"name": "sgd", "momentum": 0.0},
        "batch_size": 64,
        "range_test": {"start_lr": 1e-4, "end_lr": 1000, "steps": 80}
    }"#);
    let result = &output.result;
    assert!(result.sweep.is_empty());
    assert_eq!(result.recommendation.source, "range_test");
    let range = result.range_test.as_ref().unwrap();
    assert!(range.stopped_early, "{range:?}");
    assert!(range.stop_reason.is_some());
    for point in &output.curve {
        let want = 1e-4 * (1e7f64).powf(point.step as f64 / 79.0);
        assert!((point.lr / want - 1.0).abs() < 1e-12);
    }
    let last = output.curve.last().unwrap();
    let best = output
        .curve
        .iter()
        .map(|p| p.smoothed)
        .fold(f64::INFINITY, f64::min);
    assert!(!last.loss.is_finite() || last.smoothed > 4.0 * best);
}

#[test]
fn validation_loss_mode_records_the_validation_loss_after_each_step() {
    let (output, _) = run(r#"{
        "kind": "range_test",
        "data": {"builtin": "blobs", "samples": 1024},
        "model": {"arch": "mlp", "hidden": [16], "activation": "tanh"},
        "optimizer": {"name": "adam"},
        "batch_size": 32,
        "range_test": {"start_lr": 1e-5, "end_lr": 1, "steps": 40, "loss": "validation"}
    }"#);
    assert_eq!(output.curve.len(), 40);
    let first = output.curve.first().unwrap().loss;
    let lowest = output
        .curve
        .iter()
        .map(|p| p.loss)
        .fold(f64::INFINITY, f64::min);
    assert!(
        lowest < first * 0.5,
        "validation loss fell: {first} -> {lowest}"
    );
}

#[test]
fn a_character_transformer_tunes_on_a_text_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corpus.txt");
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(60);
    std::fs::write(&path, text).unwrap();
    let (output, _) = run(&format!(
        r#"{{
        "data": {{"path": {:?}}},
        "model": {{"arch": "transformer", "d_model": 32, "heads": 2, "layers": 1, "context": 16}},
        "optimizer": {{"name": "adamw"}},
        "batch_size": 16,
        "plan": {{"epochs": 2}},
        "range_test": {{"start_lr": 1e-5, "end_lr": 10, "steps": 40}},
        "sweep": {{"count": 2, "epochs": 1}}
    }}"#,
        path.to_str().unwrap()
    ));
    let result = &output.result;
    assert_eq!(result.data.task, lrtune::engine::data::Task::LanguageModel);
    assert_eq!(result.sweep.len(), 2);
    let best = result.sweep.iter().find(|c| c.best).unwrap();
    // 28 distinct characters: a trained model beats uniform guessing (ln 28 = 3.33).
    assert!(best.val_loss < 3.0, "{best:?}");
}

#[test]
fn a_csv_pair_keeps_class_indices_consistent_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.csv");
    let validation = dir.path().join("val.csv");
    let mut train_text = String::from("a,b,label\n");
    for i in 0..90 {
        let class = [3, 7, 9][i % 3];
        train_text += &format!(
            "{},{},{class}\n",
            class as f64 + (i as f64 * 0.01),
            -(class as f64)
        );
    }
    // The validation file has only classes 7 and 9: read on its own they would become 0, 1.
    let validation_text = "a,b,label\n7.1,-7,7\n9.2,-9,9\n7.3,-7,7\n9.0,-9,9\n";
    std::fs::write(&train, train_text).unwrap();
    std::fs::write(&validation, validation_text).unwrap();
    let spec = JobSpec::from_json(&format!(
        r#"{{"data": {{"path": {:?}, "validation_path": {:?}}}}}"#,
        train.to_str().unwrap(),
        validation.to_str().unwrap()
    ))
    .unwrap();
    let loaded = engine::load_local_data(&spec).unwrap();
    let validation = loaded.validation.unwrap();
    let lrtune::engine::data::Targets::Classes { labels, classes } = &validation.targets else {
        panic!("classes expected")
    };
    assert_eq!(*classes, 3);
    assert_eq!(labels, &vec![1, 2, 1, 2]);
}

#[test]
fn a_spec_that_does_not_fit_the_data_names_the_field() {
    let cases = [
        (
            r#"{"data": {"builtin": "spirals", "samples": 100}, "batch_size": 500}"#,
            "batch_size",
        ),
        (
            r#"{"data": {"builtin": "spirals"}, "model": {"arch": "cnn"}}"#,
            "model.arch",
        ),
        (
            r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "cnn", "channels": [4, 4, 4, 4, 4, 4]}}"#,
            "model.channels[4]",
        ),
        (
            r#"{"data": {"builtin": "mnist10k"}, "task": "regression"}"#,
            "task",
        ),
        (
            r#"{"data": {"builtin": "spirals", "samples": 64}, "batch_size": 32, "sweep": {"epochs": 1}}"#,
            "sweep.epochs",
        ),
    ];
    for (spec_json, field) in cases {
        let spec = ValidSpec::parse(spec_json, &Limits::default()).unwrap();
        let loaded = engine::load_local_data(&spec).unwrap();
        let cancel = AtomicBool::new(false);
        let error = engine::run_job(&spec, loaded, &Limits::default(), &cancel, &mut |_| {})
            .err()
            .unwrap_or_else(|| panic!("{spec_json} should fail"));
        match error {
            engine::EngineError::Spec(SpecError {
                field: got,
                message,
            }) => {
                assert_eq!(got, field, "{spec_json}: {message}")
            }
            other => panic!("{spec_json}: {other}"),
        }
    }
}

#[test]
fn a_canceled_job_stops_with_canceled() {
    let spec = ValidSpec::parse(SPIRALS_TUNE, &Limits::default()).unwrap();
    let loaded = engine::load_local_data(&spec).unwrap();
    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let mut observer = |event: Event| {
        if let Event::Point(_) = event {
            steps += 1;
            if steps == 10 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    let error = engine::run_job(&spec, loaded, &Limits::default(), &cancel, &mut observer);
    assert!(matches!(error, Err(engine::EngineError::Canceled)));
    assert_eq!(steps, 10, "stopped within a step");
}

/// Issue 29: the cancel flag was read only between steps, so a cancel (or a shutdown) was not
/// heard during an evaluation of a big validation set, which can take minutes. Raised in the
/// middle of one, it now stops the job within 2 s (the evaluation reads it between chunks),
/// on both backends. Here one evaluation takes several seconds: without the check the job
/// would run on to the end of it.
#[test]
fn a_cancel_raised_during_a_long_evaluation_stops_the_job_within_two_seconds() {
    for backend in ["native", "candle"] {
        let spec = ValidSpec::parse(
            &format!(
                r#"{{"kind": "range_test", "backend": "{backend}",
                    "data": {{"builtin": "blobs", "samples": 100000}}, "validation_fraction": 0.5,
                    "model": {{"arch": "mlp", "hidden": [1024, 1024]}}, "batch_size": 256,
                    "range_test": {{"steps": 20, "loss": "validation"}}}}"#
            ),
            &Limits::default(),
        )
        .unwrap();
        let loaded = engine::load_local_data(&spec).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let (events, points) = mpsc::channel();
        let job = {
            let cancel = Arc::clone(&cancel);
            std::thread::spawn(move || {
                let mut observer = |event: Event| {
                    // Sent when the first evaluation has ended; a step of 256 rows, then the
                    // next evaluation, follow at once.
                    if matches!(event, Event::Progress { done: 0, .. } | Event::Point(_)) {
                        events.send(Instant::now()).expect("the test waits");
                    }
                };
                engine::run_job(&spec, loaded, &Limits::default(), &cancel, &mut observer)
            })
        };
        let wait = Duration::from_secs(600);
        let evaluated = points
            .recv_timeout(wait)
            .expect("the first evaluation ends");
        let stepped = points.recv_timeout(wait).expect("the first step's point");
        // Well inside the next evaluation (one takes as long as the step and evaluation just
        // timed), then cancel.
        let one_evaluation = stepped - evaluated;
        std::thread::sleep((one_evaluation / 4).min(Duration::from_millis(500)));
        let raised = Instant::now();
        cancel.store(true, Ordering::Relaxed);
        while !job.is_finished() && raised.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stopped_after = raised.elapsed();
        let outcome = job.join().expect("the job thread does not panic");
        assert!(
            matches!(outcome, Err(engine::EngineError::Canceled)),
            "{backend}: {:?}",
            outcome.map(|_| "the job ran to its end")
        );
        assert!(
            stopped_after < Duration::from_secs(2),
            "{backend}: stopped {stopped_after:?} after the cancel, in an evaluation of \
             {one_evaluation:?}"
        );
    }
}

#[test]
fn a_best_candidate_at_the_top_of_the_sweep_is_flagged() {
    // Both peaks are far too low for spirals, so the higher one wins and the true optimum
    // lies above everything tried.
    let (output, _) = run(r#"{
        "kind": "sweep",
        "data": {"builtin": "spirals", "samples": 512},
        "model": {"arch": "mlp", "hidden": [16]},
        "batch_size": 32,
        "plan": {"epochs": 2},
        "sweep": {"candidates": [1e-5, 1e-4], "epochs": 1}
    }"#);
    let rec = &output.result.recommendation;
    assert_eq!(rec.peak_lr, 1e-4);
    assert!(
        rec.warnings.iter().any(|w| w.contains("highest one tried")),
        "{:?}",
        rec.warnings
    );
}

#[test]
fn a_small_plan_is_judged_at_its_full_length_within_the_default_budget() {
    // 300 spirals, 20 epochs of 7 batches: 140 steps a run; the default budget is the
    // 60-step range test and 5x that.
    let (output, events) = run(r#"{
        "data": {"builtin": "spirals", "samples": 300},
        "model": {"arch": "mlp", "hidden": [64, 64]},
        "batch_size": 32,
        "plan": {"epochs": 20},
        "range_test": {"start_lr": 1e-5, "end_lr": 10, "steps": 60}
    }"#);
    let result = &output.result;
    assert_eq!(result.timing.plan_steps, 140);
    assert_eq!(result.timing.budget_steps, 60 + 5 * 140);
    assert!(result.timing.total_steps <= 760, "{:?}", result.timing);
    assert_eq!(
        result.timing.plan_multiple,
        result.timing.total_steps as f64 / 140.0
    );
    let rec = &result.recommendation;
    assert_eq!(rec.judged_at_steps, Some(140));
    assert_eq!(rec.judged_at_epochs, Some(20.0));
    let best = result.sweep.iter().find(|c| c.best).unwrap();
    assert_eq!((best.steps, best.epochs), (140, 20.0));
    assert!(rec.band[0] <= rec.peak_lr && rec.peak_lr <= rec.band[1]);
    assert!(!rec.warnings.iter().any(|w| w.contains("judged after")));
    // The five candidates and a second seed of the best two do not fit 700 steps at full
    // length: they are screened at a third of the plan (230 steps), and the best and the one
    // below it run the whole plan (280), with room for one more full run.
    let runs: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            Event::SweepRun(run) => Some(*run),
            _ => None,
        })
        .collect();
    assert!(
        runs.iter().all(|run| run.steps == 46 || run.steps == 140),
        "{runs:?}"
    );
    assert_eq!(runs.iter().filter(|run| run.steps == 46).count(), 5);
    let full = runs.iter().filter(|run| run.steps == 140).count();
    assert!((2..=3).contains(&full), "{runs:?}");
}

#[test]
fn a_budget_that_cannot_reach_the_plan_screens_then_judges_finalists_at_it() {
    // 5 candidates x 128 steps do not fit 4x the plan after the range test: the candidates
    // are screened short, and the best two run the whole plan.
    let (output, _) = run(r#"{
        "data": {"builtin": "blobs", "samples": 1024},
        "model": {"arch": "mlp", "hidden": [32]},
        "batch_size": 32,
        "plan": {"epochs": 5},
        "range_test": {"start_lr": 1e-5, "end_lr": 10, "steps": 60},
        "budget": {"plan_multiple": 4}
    }"#);
    let result = &output.result;
    let plan = result.timing.plan_steps;
    assert_eq!(plan, 5 * 25);
    assert!(result.timing.total_steps <= 4 * plan, "{:?}", result.timing);
    let finals: Vec<_> = result.sweep.iter().filter(|c| c.steps == plan).collect();
    let screened: Vec<_> = result.sweep.iter().filter(|c| c.steps < plan).collect();
    assert_eq!(screened.len(), 5, "{:?}", result.sweep);
    assert!(finals.len() >= 2, "{:?}", result.sweep);
    assert!(screened.iter().all(|c| !c.best && !c.in_band));
    assert_eq!(result.recommendation.judged_at_steps, Some(plan));
    assert!(finals.iter().any(|c| c.best));
}

#[test]
fn a_budget_below_two_plans_judges_the_best_two_short_and_says_so() {
    // A 250-step plan (25 batches of 32 for 10 epochs) within `steps` in all.
    let with_budget = |steps: usize| {
        run(&format!(
            r#"{{
                "data": {{"builtin": "blobs", "samples": 1024}},
                "model": {{"arch": "mlp", "hidden": [32]}},
                "batch_size": 32,
                "plan": {{"epochs": 10}},
                "range_test": {{"start_lr": 1e-5, "end_lr": 10, "steps": 60}},
                "budget": {{"steps": {steps}}}
            }}"#
        ))
    };
    // 400 steps: after the range test (60 steps at most; it stops when the loss explodes),
    // 5 screened at 25 (a tenth of the 250-step plan) and the best two at what is left,
    // (340 - 125) / 2 = 107 steps or a little more, 4.3 of the 10 epochs.
    let (output, _) = with_budget(400);
    let result = &output.result;
    assert!(result.timing.total_steps <= 400, "{:?}", result.timing);
    let range_steps = result.range_test.as_ref().expect("a range test").steps_run;
    let final_steps = (400 - range_steps - 5 * 25) / 2;
    assert!((107..=112).contains(&final_steps), "{range_steps}");
    assert_eq!(result.recommendation.judged_at_steps, Some(final_steps));
    let screened = result.sweep.iter().filter(|c| c.steps == 25).count();
    let finals = result
        .sweep
        .iter()
        .filter(|c| c.steps == final_steps)
        .count();
    assert_eq!((screened, finals), (5, 2), "{:?}", result.sweep);
    assert!(
        result
            .recommendation
            .warnings
            .iter()
            .any(|w| w.starts_with(&format!(
                "the candidates were judged after {:.1} of the planned 10 epochs",
                final_steps as f64 / 25.0
            ))),
        "{:?}",
        result.recommendation.warnings
    );

    // 310: the finalists would get 62 steps, under three screenings: every candidate runs
    // (310 - 60) / 5 = 50 steps, 2 of the planned 10 epochs.
    let (output, _) = with_budget(310);
    let result = &output.result;
    assert!(result.timing.total_steps <= 310, "{:?}", result.timing);
    let range_steps = result.range_test.as_ref().expect("a range test").steps_run;
    assert_eq!((310 - range_steps) / 5, 50, "{range_steps}");
    assert_eq!(result.recommendation.judged_at_steps, Some(50));
    assert!(result.sweep.iter().all(|c| c.steps == 50));
    assert!(
        result
            .recommendation
            .warnings
            .iter()
            .any(|w| w.starts_with("the candidates were judged after 2 of the planned 10 epochs")),
        "{:?}",
        result.recommendation.warnings
    );
}

/// A tune of `SPIRALS_TUNE`'s data with `optimizer` and a batch-norm network.
fn spirals_batch_norm_tune(optimizer: &str) -> String {
    SPIRALS_TUNE
        .replace(
            r#""model": {"arch": "mlp", "hidden": [32, 32]}"#,
            r#""model": {"arch": "sequential", "layers": [
                {"type": "linear", "out": 32}, {"type": "batch_norm"}, {"type": "relu"},
                {"type": "linear", "out": 3}]}"#,
        )
        .replace(
            r#""batch_size": 32,"#,
            &format!(r#""batch_size": 32, "optimizer": {optimizer},"#),
        )
}

#[test]
fn the_range_test_puts_a_learning_rate_free_optimizer_and_batch_norm_back() {
    // A validation-loss range test evaluates at every step: for a schedule-free optimizer at
    // x, batch norm's statistics recomputed there, then back to y with the training ones.
    for optimizer in [
        r#"{"name": "prodigy"}"#,
        r#"{"name": "schedule_free_adamw", "warmup_steps": 5}"#,
        r#"{"name": "schedule_free_sgd"}"#,
    ] {
        let spec = JobSpec::from_json(&spirals_batch_norm_tune(optimizer)).unwrap();
        let loaded = engine::load_local_data(&spec).unwrap();
        let device = candle_core::Device::Cpu;
        let train = DeviceData::new(&loaded.train, &device).unwrap();
        let shape = ModelShape {
            input: loaded.train.sample_shape(),
            output: loaded.train.output_dim(),
            task: loaded.train.task(),
        };
        let trainer = Trainer::new(
            Model::build(&spec.model, &shape, 0, &device).unwrap(),
            spec.backend,
        );
        let model = trainer.model();
        assert_eq!(model.buffers().len(), 2);
        let mut optimizer_state = Optimizer::new(&spec.optimizer, model.vars());
        let before = (weights(model), buffers(model));
        let state_before = optimizer_state.state().clone();
        let cancel = AtomicBool::new(false);
        let mut sink = |_: Event| {};
        let mut control = Control::new(&cancel, &mut sink);
        let range = RangeTestSpec {
            steps: 30,
            loss: lrtune::engine::spec::RangeLoss::Validation,
            ..RangeTestSpec::default()
        };
        let curve = run_range_test(
            RangeTestInputs {
                trainer: &trainer,
                optimizer: &mut optimizer_state,
                train: &train,
                validation: &train,
                batch_size: 32,
                seed: 0,
            },
            &range,
            &mut control,
        )
        .unwrap();
        assert!(curve.points.len() > 5, "{optimizer}: the test trained");
        assert!(curve.points[0].loss.is_finite(), "{optimizer}");
        assert_eq!((weights(model), buffers(model)), before, "{optimizer}");
        assert_eq!(optimizer_state.state(), &state_before, "{optimizer}");
    }
}

fn buffers(model: &Model) -> Vec<Vec<f32>> {
    model
        .buffers()
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn a_tune_with_each_learning_rate_free_optimizer_runs_to_a_recommendation() {
    for optimizer in [
        r#"{"name": "prodigy", "weight_decay": 0.01}"#,
        r#"{"name": "schedule_free_adamw"}"#,
        r#"{"name": "schedule_free_sgd", "warmup_steps": 10}"#,
    ] {
        let (output, _) = run(&spirals_batch_norm_tune(optimizer));
        let sweep = &output.result.sweep;
        assert_eq!(sweep.len(), 3, "{optimizer}");
        assert!(
            sweep.iter().any(|candidate| candidate.val_loss.is_finite()),
            "{optimizer}: {sweep:?}"
        );
    }
}

#[test]
fn the_recommendation_stays_a_margin_below_the_stability_edge_and_reports_it() {
    // SGD with momentum 0.9 on 300 spirals: 10 and 100 blow up for certain; the edge is at 10
    // or below, where some run first diverged, spiked or ended twice as bad as a lower peak.
    let (output, events) = run(r#"{
        "kind": "sweep",
        "data": {"builtin": "spirals", "samples": 300},
        "model": {"arch": "mlp", "hidden": [64, 64]},
        "batch_size": 32,
        "plan": {"epochs": 10},
        "sweep": {"candidates": [0.001, 0.01, 0.1, 1.0, 10.0, 100.0], "epochs": 10}
    }"#);
    let rec = &output.result.recommendation;
    let edge = rec.stability_edge_lr.expect("an edge");
    assert!(edge <= 10.0, "{edge}");
    assert_eq!(rec.edge_distance, Some(edge / rec.peak_lr));
    assert!(
        rec.peak_lr <= edge / EDGE_MARGIN,
        "{} vs the edge {edge}",
        rec.peak_lr
    );
    assert!(
        rec.band[1] <= edge / EDGE_MARGIN,
        "{:?} vs the edge {edge}",
        rec.band
    );
    for candidate in &output.result.sweep {
        assert_eq!(
            candidate.unstable,
            candidate.peak_lr >= edge,
            "{candidate:?}"
        );
        assert!(!(candidate.unstable && (candidate.best || candidate.in_band)));
        assert!(candidate.seeds >= 1, "{candidate:?}");
    }
    // The reason is one of the runs': the run at the edge diverged, spiked or ended far above.
    let at_edge: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            Event::SweepRun(run) if run.peak_lr == edge => Some(*run),
            _ => None,
        })
        .collect();
    let reason = rec.stability_edge_reason.expect("a reason");
    let json = serde_json::to_value(rec).expect("serializes");
    assert_eq!(json["stability_edge_lr"], serde_json::json!(edge));
    match json["stability_edge_reason"].as_str() {
        Some("diverged") => assert!(at_edge.iter().any(|run| run.diverged)),
        Some("spiked") => assert!(at_edge.iter().any(|run| run.spiked)),
        Some("far_above") => assert!(at_edge.iter().all(|run| !run.diverged)),
        other => panic!("{other:?} for {reason:?}"),
    }
    // 60 validation rows: the warning names them and what a row is worth.
    assert!(
        rec.warnings
            .iter()
            .any(|w| w.starts_with("the validation split has 60 rows")
                && w.contains("one row is 1.7 points of accuracy")),
        "{:?}",
        rec.warnings
    );
}
