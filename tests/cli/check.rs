//! `lrtune check` and `lrtune run --plot` with no server: the job runs in the process.

use crate::helpers::{assert_plot, github_outputs, path_string, read_json, write};
use crate::support::fixtures::tiny_spec;
use crate::support::run::lrtune;

/// Runs the tiny job once through `check` with a far too low rate: exit 1, and the result
/// written to `--output`, from which the other checks take the band.
fn result_of_a_low_check(dir: &std::path::Path) -> (String, serde_json::Value) {
    let spec = write(dir, "spec.json", &tiny_spec().to_string());
    let output = path_string(&dir.join("low.json"));
    let run = lrtune(
        &["check", &spec, "--lr", "1e-12", "--output", &output, "-q"],
        &[],
    );
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stdout.contains("too low: 1e-12 is "), "{run}");
    assert!(run.stdout.contains("below the band ["), "{run}");
    assert!(run.stdout.contains("(the recommended peak)"), "{run}");
    (spec, read_json(&output))
}

#[test]
fn check_exits_0_for_the_recommended_peak_and_writes_the_github_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, result) = result_of_a_low_check(dir.path());
    let recommendation = &result["recommendation"];
    let peak = recommendation["peak_lr"].as_f64().unwrap();
    let [low, high] = [0, 1].map(|i| recommendation["band"][i].as_f64().unwrap());
    assert!(low <= peak && peak <= high, "{recommendation}");
    assert_eq!(result["sweep"].as_array().unwrap().len(), 2);
    assert!(result["range_test"]["steps_run"].as_u64().unwrap() <= 30);

    let github = write(dir.path(), "github_output", "earlier=line\n");
    let output = path_string(&dir.path().join("result.json"));
    let run = lrtune(
        &[
            "check",
            &spec,
            "--lr",
            &peak.to_string(),
            "--output",
            &output,
        ],
        &[("GITHUB_OUTPUT", &github)],
    );
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout.contains("recommended peak lr:"),
        "the summary: {run}"
    );
    assert!(run.stdout.contains("ok: "), "{run}");
    assert!(run.stdout.contains("is inside the band"), "{run}");
    // The same job, the same seed: the same result, written whole.
    let written = read_json(&output);
    assert_eq!(written["recommendation"], result["recommendation"]);
    assert!(written["timing"]["total_steps"].as_u64().unwrap() > 30);
    assert_eq!(
        github_outputs(&github),
        vec![
            ("earlier".to_string(), "line".to_string()),
            ("peak_lr".to_string(), peak.to_string()),
            ("band_low".to_string(), low.to_string()),
            ("band_high".to_string(), high.to_string()),
            ("in_band".to_string(), "true".to_string()),
        ]
    );
}

#[test]
fn check_exits_1_far_above_the_band_saying_by_how_much_and_plots_the_curve() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, result) = result_of_a_low_check(dir.path());
    let recommendation = &result["recommendation"];
    let peak = recommendation["peak_lr"].as_f64().unwrap();
    let high = recommendation["band"][1].as_f64().unwrap();
    let lr = peak * 1000.0;

    let github = path_string(&dir.path().join("github_output"));
    let plot = path_string(&dir.path().join("check.svg"));
    let run = lrtune(
        &[
            "check",
            &spec,
            "--lr",
            &lr.to_string(),
            "--plot",
            &plot,
            "-q",
        ],
        &[("GITHUB_OUTPUT", &github)],
    );
    assert_eq!(run.code, 1, "{run}");
    let factor = lr / high;
    let expected = format!(
        "is {} above the band",
        if factor < 100.0 {
            format!("{factor:.1}x")
        } else {
            format!("{factor:.0}x")
        }
    );
    assert!(run.stdout.starts_with("too high: "), "{run}");
    assert!(
        run.stdout.contains(&expected),
        "expected {expected:?}: {run}"
    );
    assert!(run.stdout.contains("(the recommended peak)"), "{run}");
    assert!(
        !run.stdout.contains("recommended peak lr:"),
        "-q prints only the verdict: {run}"
    );
    let outputs = github_outputs(&github);
    assert!(
        outputs.contains(&("in_band".to_string(), "false".to_string())),
        "{outputs:?}"
    );
    assert!(
        outputs.contains(&("peak_lr".to_string(), peak.to_string())),
        "{outputs:?}"
    );
    assert_plot(
        &plot,
        &[
            "valley",
            "steepest",
            "edge",
            "peak",
            "recommended band",
            "--lr",
        ],
    );
}

#[test]
fn check_exits_2_on_a_bad_spec_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (spec, field) in [
        (
            r#"{"data": {"builtin": "spirals"}, "range_test": {"start_lr": 1, "end_lr": 0.5}}"#,
            "range_test.start_lr",
        ),
        (r#"{"data": {"builtin": "spirals"}, "speed": 3}"#, "speed"),
        (r#"{"data": "#, "EOF while parsing"),
        // Issue 29: planned as 784 values (the size wrapped), it ran forever.
        (
            r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "sequential", "layers": [
                {"type": "conv2d", "out": 1, "kernel": 1, "padding": 4611686018427387904},
                {"type": "flatten"}, {"type": "linear", "out": 10}]}}"#,
            "invalid spec: model.layers[0].padding: conv2d's output size overflows: padding \
             4611686018427387904 makes its output [1, 9223372036854775836, \
             9223372036854775836], more values than a 64-bit size holds",
        ),
        (
            r#"{"kind": "range_test", "data": {"builtin": "spirals"}, "kind": "tune"}"#,
            "invalid spec: kind: the key \"kind\" is given twice in one object",
        ),
    ] {
        let path = write(dir.path(), "bad.json", spec);
        let run = lrtune(&["check", &path, "--lr", "0.01", "-q"], &[]);
        assert_eq!(run.code, 2, "{spec}: {run}");
        assert!(run.stderr.contains(field), "{spec}: {run}");
        assert!(run.stdout.is_empty(), "{spec}: {run}");
    }
    let missing = path_string(&dir.path().join("missing.json"));
    let run = lrtune(&["check", &missing, "--lr", "0.01"], &[]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("missing.json"), "{run}");
    let spec = write(dir.path(), "spec.json", &tiny_spec().to_string());
    let run = lrtune(&["check", &spec, "--lr", "-1"], &[]);
    assert_eq!(run.code, 2, "a negative --lr: {run}");
}

#[test]
fn run_plot_draws_the_curve_the_suggestions_and_the_band() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &tiny_spec().to_string());
    let plot = path_string(&dir.path().join("run.svg"));
    let curve = path_string(&dir.path().join("curve.csv"));
    let run = lrtune(
        &[
            "run", &spec, "-q", "--json", "--plot", &plot, "--curve", &curve,
        ],
        &[],
    );
    assert_eq!(run.code, 0, "{run}");
    let result: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(result["recommendation"]["peak_lr"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(&curve)
        .unwrap()
        .starts_with("step,lr,loss,smoothed\n"));
    assert_plot(
        &plot,
        &[
            "valley",
            "steepest",
            "minimum",
            "edge",
            "peak",
            "loss",
            "smoothed loss",
        ],
    );
}

#[test]
fn run_gives_the_same_result_with_trials_side_by_side_and_refuses_none() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &tiny_spec().to_string());
    let result = |parallel: &str| {
        let run = lrtune(&["run", &spec, "--json", "-q", "--parallel", parallel], &[]);
        assert_eq!(run.code, 0, "{run}");
        let mut result: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
        result.as_object_mut().unwrap().remove("timing");
        result
    };
    let serial = result("1");
    assert!(serial["sweep"].as_array().unwrap().len() >= 2, "{serial}");
    assert_eq!(result("3"), serial);

    let refused = [
        (vec!["run", spec.as_str(), "--parallel", "0"], "--parallel"),
        (
            vec!["worker", "--db", "unused.db", "--threads", "0"],
            "--threads",
        ),
    ];
    for (args, flag) in refused {
        let run = lrtune(&args, &[]);
        assert_eq!(run.code, 2, "{run}");
        assert!(run.stderr.contains(flag), "{run}");
    }
}
