//! Layer-list models end to end: PyTorch weights loaded through a job give PyTorch's
//! validation loss as `initial_val_loss`, a layer list trains on real data, and a list that
//! does not fit the data is refused before any work with the layer named.

use serde_json::Value;

use crate::run;
use crate::support::run::{lrtune_with_stdin, Output};

fn golden_case(name: &str) -> Value {
    let golden: Value =
        serde_json::from_str(include_str!("../golden/sequential.json")).expect("golden parses");
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| case["name"] == name)
        .unwrap()
        .clone()
}

/// PyTorch's `residual_mlp` (linear, residual blocks with layer norm and tanh-GELU, silu,
/// batch norm, sigmoid) with its saved weights: its 10 reference rows are the job's
/// validation file, so the job's `initial_val_loss` is PyTorch's eval-mode loss.
#[test]
fn pytorch_weights_give_pytorchs_validation_loss_before_any_step() {
    let case = golden_case("residual_mlp");
    let features = 6;
    let x: Vec<f64> = case["x"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let y: Vec<u64> = case["y"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let header = "a,b,c,d,e,f,label\n";
    let row = |values: &[f64], label: u64| {
        let cells: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        format!("{},{label}\n", cells.join(","))
    };
    let dir = tempfile::tempdir().unwrap();
    let mut validation = String::from(header);
    for (values, &label) in x.chunks(features).zip(&y) {
        validation.push_str(&row(values, label));
    }
    // Training rows of every class, so the classes keep their indices.
    let mut train = String::from(header);
    for index in 0..60u64 {
        let values: Vec<f64> = (0..features)
            .map(|f| ((index * 7 + f as u64 * 3) % 11) as f64 / 5.0 - 1.0)
            .collect();
        train.push_str(&row(&values, index % 3));
    }
    let (train_path, validation_path) = (dir.path().join("train.csv"), dir.path().join("val.csv"));
    std::fs::write(&train_path, train).unwrap();
    std::fs::write(&validation_path, validation).unwrap();
    let weights = format!(
        "{}/tests/golden/sequential/{}",
        env!("CARGO_MANIFEST_DIR"),
        case["weights"].as_str().unwrap()
    );
    let spec = serde_json::json!({
        "kind": "range_test",
        "data": {"path": train_path, "validation_path": validation_path},
        "normalize": "none",
        "model": {"arch": "sequential", "layers": case["layers"]},
        "init": {"weights": {"path": weights}},
        "batch_size": 10,
        "range_test": {"steps": 20}
    });
    let (output, _) = run(&spec.to_string());
    let initial = output.result.initial_val_loss.unwrap();
    let want = case["eval_loss"].as_f64().unwrap();
    assert!(
        (initial - want).abs() <= 1e-4 * want,
        "initial_val_loss {initial} vs PyTorch's {want}"
    );
    assert_eq!(output.result.model.arch, "sequential");
}

/// The issue's layer-list CNN (conv2d, batch norm, relu, max pool, dropout, flatten,
/// linear) on mnist: the range test runs, the loss falls, and the result reports where it
/// started.
#[test]
fn a_layer_list_cnn_range_test_runs_on_mnist() {
    let spec = r#"{
        "kind": "range_test",
        "data": {"builtin": "mnist10k"},
        "model": {"arch": "sequential", "layers": [
            {"type": "conv2d", "out": 4, "kernel": 3, "stride": 2, "padding": 1},
            {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool2d", "size": 2},
            {"type": "dropout", "p": 0.1}, {"type": "flatten"},
            {"type": "linear", "out": 16}, {"type": "gelu"}, {"type": "layer_norm"},
            {"type": "linear", "out": 10}]},
        "batch_size": 64,
        "range_test": {"start_lr": 1e-4, "end_lr": 1, "steps": 30}
    }"#;
    let (output, _) = run(spec);
    let initial = output.result.initial_val_loss.unwrap();
    // Ten classes from random weights: about ln 10.
    assert!((initial - 10f64.ln()).abs() < 0.5, "{initial}");
    let curve = &output.curve;
    assert!(curve.len() >= 20, "{}", curve.len());
    let first = curve[0].smoothed;
    let best = curve
        .iter()
        .map(|p| p.smoothed)
        .fold(f64::INFINITY, f64::min);
    assert!(best < first - 0.1, "the loss never fell: {first} -> {best}");
}

/// A layer list that does not fit the data: `lrtune check` exits 2 naming the layer and
/// both shapes, before loading anything heavy.
#[test]
fn check_refuses_a_layer_list_that_does_not_fit_the_data() {
    let spec = r#"{"data": {"builtin": "spirals", "samples": 256},
        "model": {"arch": "sequential", "layers": [
            {"type": "linear", "out": 8}, {"type": "max_pool2d", "size": 2},
            {"type": "linear", "out": 3}]}}"#;
    let Output { code, stderr, .. } = lrtune_with_stdin(&["check", "--lr", "0.01", "-"], spec, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("model.layers[1]")
            && stderr.contains("max_pool2d needs [channels, height, width], but its input is [8]"),
        "{stderr}"
    );
}

/// The same preset trained by the native step and by candle's autograd: the range test's
/// suggestions agree within 1.5x (the two compute the same function; their sums differ in the
/// last bits), and each result says which backend ran.
#[test]
fn native_and_candle_backends_agree_on_the_range_test() {
    for model in [
        r#"{"arch": "mlp", "hidden": [32, 32], "activation": "gelu"}"#,
        r#"{"arch": "cnn", "channels": [4], "hidden": 16}"#,
        // The issue's layer-list CNN and a residual MLP with layer norm and GELU.
        r#"{"arch": "sequential", "layers": [
            {"type": "conv2d", "out": 8, "kernel": 3, "padding": 1},
            {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool2d", "size": 2},
            {"type": "dropout", "p": 0.1}, {"type": "flatten"},
            {"type": "linear", "out": 32}, {"type": "relu"}, {"type": "linear", "out": 10}]}"#,
        r#"{"arch": "sequential", "layers": [
            {"type": "flatten"}, {"type": "linear", "out": 64},
            {"type": "residual", "layers": [
                {"type": "layer_norm"}, {"type": "linear", "out": 64}, {"type": "gelu"}]},
            {"type": "residual", "layers": [
                {"type": "layer_norm"}, {"type": "linear", "out": 64}, {"type": "gelu"}]},
            {"type": "layer_norm"}, {"type": "linear", "out": 10}]}"#,
    ] {
        let spec = |backend: &str| {
            format!(
                r#"{{"kind": "range_test", "data": {{"builtin": "mnist10k"}}, "model": {model},
                    "backend": "{backend}", "batch_size": 32,
                    "range_test": {{"start_lr": 1e-5, "end_lr": 10, "steps": 60}}}}"#
            )
        };
        let (native, _) = run(&spec("native"));
        let (candle, _) = run(&spec("candle"));
        assert_eq!(native.result.model.backend, "native");
        assert_eq!(candle.result.model.backend, "candle");
        let (a, b) = (
            native.result.range_test.unwrap().suggestions,
            candle.result.range_test.unwrap().suggestions,
        );
        for (name, x, y) in [
            ("valley", a.valley, b.valley),
            ("minimum", a.minimum, b.minimum),
            ("steepest", a.steepest, b.steepest),
        ] {
            let (x, y) = (x.unwrap(), y.unwrap());
            assert!(
                (x / y).max(y / x) <= 1.5,
                "{model}: {name} {x} (native) vs {y} (candle)"
            );
        }
        let (x, y) = (
            native.result.initial_val_loss.unwrap(),
            candle.result.initial_val_loss.unwrap(),
        );
        assert!(
            (x - y).abs() <= 1e-5 * x,
            "{model}: initial_val_loss {x} vs {y}"
        );
    }
}

#[test]
fn the_native_backend_refuses_cuda() {
    let error = lrtune::engine::ValidSpec::parse(
        r#"{"data": {"builtin": "spirals"}, "backend": "native", "device": "cuda",
            "model": {"arch": "sequential", "layers": [{"type": "linear", "out": 3}]}}"#,
        &lrtune::engine::Limits::default(),
    )
    .unwrap_err();
    assert_eq!(error.field, "backend");
}

/// A character language model as a layer list: text data, `model.context`, an embedding
/// first. Without the context the spec is refused naming it.
#[test]
fn a_layer_list_language_model_trains_on_text() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(80);
    std::fs::write(&corpus, text).unwrap();
    let spec = |context: &str| {
        format!(
            r#"{{"kind": "range_test", "data": {{"path": {path:?}}},
                "model": {{"arch": "sequential", {context} "layers": [
                    {{"type": "embedding", "dim": 16}}, {{"type": "layer_norm"}},
                    {{"type": "residual", "layers": [
                        {{"type": "linear", "out": 16}}, {{"type": "gelu"}}]}},
                    {{"type": "linear", "out": 28}}]}},
                "batch_size": 16, "range_test": {{"start_lr": 1e-4, "end_lr": 1, "steps": 30}}}}"#,
            path = corpus.to_str().unwrap()
        )
    };
    let parsed = lrtune::engine::JobSpec::from_json(&spec("")).unwrap();
    let error = match lrtune::engine::load_local_data(&parsed) {
        Err(lrtune::engine::EngineError::Spec(error)) => error,
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("text without a context was accepted"),
    };
    assert_eq!(error.field, "model.context");

    let (output, _) = run(&spec(r#""context": 12,"#));
    assert_eq!(output.result.model.backend, "native");
    let initial = output.result.initial_val_loss.unwrap();
    assert!(initial.is_finite() && initial > 0.5, "{initial}");
    assert!(output.curve.len() >= 20);
}
