use std::process::Command;

use crate::support::run::{lrtune, lrtune_binary, lrtune_with_stdin, Output};

#[test]
fn run_prints_the_sweep_and_recommendation_and_exits_0() {
    let Output {
        code,
        stdout,
        stderr,
    } = lrtune_with_stdin(&["run", "-", "-q"], super::SPIRALS_TUNE, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("recommended peak lr:"), "{stdout}");
    assert!(stdout.contains("<- best"), "{stdout}");
    assert!(stdout.contains("pytorch: OneCycleLR(optimizer"), "{stdout}");
}

#[test]
fn run_json_prints_the_full_result() {
    let Output {
        code,
        stdout,
        stderr,
    } = lrtune_with_stdin(&["run", "-", "--json", "-q"], super::SPIRALS_TUNE, &[]);
    assert_eq!(code, 0, "{stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result["recommendation"]["source"], "sweep");
    assert_eq!(result["sweep"].as_array().unwrap().len(), 3);
    assert!(
        result["range_test"]["suggestions"]["valley"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(result["timing"]["total_steps"].as_u64().unwrap() > 60);
}

#[test]
fn bad_specs_exit_2_naming_the_field() {
    for (spec, field) in [
        (r#"{"data": {"builtin": "mnist10k"}, "speed": 3}"#, "speed"),
        (
            r#"{"data": {"builtin": "mnist10k"}, "range_test": {"start_lr": 1, "end_lr": 0.5}}"#,
            "range_test.start_lr",
        ),
        (
            r#"{"data": {"builtin": "mnist10k"}, "batch_size": 0}"#,
            "batch_size",
        ),
        (r#"{"data": {"builtin": "imagenet"}}"#, "data.builtin"),
        (
            r#"{"data": {"builtin": "mnist10k"}, "range_test": {"steps": 1000000}}"#,
            "range_test.steps",
        ),
        (
            r#"{"data": {"builtin": "spirals", "samples": 50}, "batch_size": 64}"#,
            "batch_size",
        ),
        (
            r#"{"data": {"path": "/nonexistent/train.csv"}}"#,
            "data.path",
        ),
        (r#"{"data": "#, "EOF while parsing"),
    ] {
        let Output {
            code,
            stdout,
            stderr,
        } = lrtune_with_stdin(&["run", "-", "-q"], spec, &[]);
        assert_eq!(code, 2, "{spec}: {stdout} {stderr}");
        assert!(stderr.contains(field), "{spec}: {stderr}");
        assert!(stdout.is_empty());
    }
}

#[test]
fn schedule_prints_pytorchs_one_cycle_from_flags_and_from_json() {
    let Output {
        code,
        stdout,
        stderr,
    } = lrtune(
        &["schedule", "--max-lr", "0.01", "--total-steps", "100"],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let curve: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let lr = curve["lr"].as_array().unwrap();
    assert_eq!(lr.len(), 100);
    // PyTorch's OneCycleLR(max_lr=0.01, total_steps=100): step 0 and the peak at step 29.
    assert!((lr[0].as_f64().unwrap() - 0.0004).abs() < 1e-15);
    assert_eq!(lr[29].as_f64().unwrap(), 0.01);
    assert_eq!(
        curve["momentum"].as_array().unwrap()[0].as_f64().unwrap(),
        0.95
    );

    let Output { code, stdout, .. } = lrtune_with_stdin(
        &["schedule", "-"],
        r#"{"kind": "cosine_warm_restarts", "base_lr": 0.1, "T_0": 10, "steps": 20}"#,
        &[],
    );
    assert_eq!(code, 0);
    let curve: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(curve["lr"][10].as_f64().unwrap(), 0.1, "restart at step 10");
    assert!(curve["momentum"].is_null());

    let Output { code, stderr, .. } = lrtune_with_stdin(
        &["schedule", "-"],
        r#"{"kind": "one_cycle", "max_lr": 0.1, "total_steps": 100, "pct_start": 1.5}"#,
        &[],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("pct_start"), "{stderr}");

    // ReduceLROnPlateau replays the metrics given; patience 0 cuts at every step without a best.
    let Output {
        code,
        stdout,
        stderr,
    } = lrtune_with_stdin(
        &["schedule", "-"],
        r#"{"kind": "reduce_on_plateau", "lr": 0.1, "patience": 0, "factor": 0.5, "metrics": [2.0, 1.0, 1.5]}"#,
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let curve: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(curve["lr"], serde_json::json!([0.1, 0.1, 0.05]));
    let Output { code, stderr, .. } = lrtune_with_stdin(
        &["schedule", "-"],
        r#"{"kind": "reduce_on_plateau", "lr": 0.1, "metrics": []}"#,
        &[],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("metrics"), "{stderr}");
    let Output {
        code,
        stdout,
        stderr,
    } = lrtune(
        &[
            "schedule",
            "--kind",
            "step",
            "--lr",
            "1",
            "--step-size",
            "2",
            "--gamma",
            "0.5",
            "--steps",
            "4",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let curve: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(curve["lr"], serde_json::json!([1.0, 1.0, 0.5, 0.5]));
    let Output {
        code,
        stdout,
        stderr,
    } = lrtune(
        &[
            "schedule", "--kind", "cosine", "--lr", "0.1", "--t-max", "10", "--steps", "11",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let curve: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(curve["lr"].as_array().unwrap().len(), 11);
    assert!(curve["lr"][10].as_f64().unwrap().abs() < 1e-15);
}

/// The result (everything but the timing) is bit for bit the same on one thread as on two:
/// no reduction's order depends on how the work is split between threads.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    const WIDE: &str = r#"{
        "data": {"builtin": "spirals", "samples": 1024},
        "model": {"arch": "mlp", "hidden": [512, 512]},
        "batch_size": 64,
        "plan": {"epochs": 2},
        "range_test": {"start_lr": 1e-5, "end_lr": 10, "steps": 40},
        "sweep": {"count": 2, "epochs": 1}
    }"#;
    let run_on = |threads: &str| -> serde_json::Value {
        use std::io::Write;
        let mut child = Command::new(lrtune_binary())
            .args(["run", "-", "--json", "-q"])
            .env("RAYON_NUM_THREADS", threads)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(WIDE.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        let mut result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        result.as_object_mut().unwrap().remove("timing");
        result
    };
    let one = run_on("1");
    assert!(
        one["range_test"]["steps_run"].as_u64().unwrap() > 10,
        "{one}"
    );
    assert_eq!(one["sweep"].as_array().unwrap().len(), 2, "{one}");
    assert_eq!(one, run_on("2"));
}

const SMALL_RACE: &str = r#"{"kind": "compare", "data": {"builtin": "spirals", "samples": 512},
    "model": {"arch": "mlp", "hidden": [16]}, "batch_size": 32, "plan": {"epochs": 2},
    "range_test": {"steps": 40}, "sweep": {"count": 3, "epochs": 1},
    "recipes": ["sgd_one_cycle", "adam_constant"], "seeds": 2}"#;

#[test]
fn run_races_a_compare_spec_with_a_table_a_plot_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("race.svg");
    let Output {
        code,
        stdout,
        stderr,
    } = lrtune_with_stdin(
        &["run", "-", "--quiet", "--plot", svg.to_str().unwrap()],
        SMALL_RACE,
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("race of 2 recipes, 2 seeds each, 24 steps per run"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| rank | recipe | optimizer | schedule | lr |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| sgd_one_cycle | sgd | one_cycle |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| adam_constant | adam | constant |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| 1 | ") && stdout.contains("| 2 | "),
        "{stdout}"
    );
    assert!(stdout.contains("98 % of"), "the verdict: {stdout}");
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"), "{picture}");
    assert!(picture.contains("sgd_one_cycle") && picture.contains("adam_constant"));
    assert!(picture.contains("target"));

    let Output {
        code,
        stdout,
        stderr,
    } = lrtune_with_stdin(&["run", "-", "--quiet", "--json"], SMALL_RACE, &[]);
    assert_eq!(code, 0, "{stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result["recipes"].as_array().unwrap().len(), 2);
    assert_eq!(result["ranking"].as_array().unwrap().len(), 2);
    assert_eq!(result["target"]["metric"], "val_accuracy");
    assert_eq!(
        result["recipes"][0]["runs"][1]["points"]
            .as_array()
            .unwrap()
            .len(),
        25
    );

    let csv = dir.path().join("curve.csv");
    let Output { code, stderr, .. } = lrtune_with_stdin(
        &["run", "-", "--curve", csv.to_str().unwrap()],
        SMALL_RACE,
        &[],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("--curve"), "{stderr}");
    assert!(!csv.exists());
}

#[test]
fn check_on_a_compare_spec_exits_2_saying_a_race_has_no_band() {
    for args in [
        vec!["check", "-", "--lr", "0.01"],
        vec![
            "check",
            "-",
            "--lr",
            "0.01",
            "--server",
            "http://127.0.0.1:9",
        ],
    ] {
        let Output {
            code,
            stdout,
            stderr,
        } = lrtune_with_stdin(&args, SMALL_RACE, &[]);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains("kind: a compare job races recipes and has no band"),
            "{stderr}"
        );
    }
}
