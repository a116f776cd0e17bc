//! `lrtune analyze` on curves whose answers are known: computed here by hand, and the numbers
//! `engine::suggest::analyze` (the code behind POST /v1/analyze) gives.

use lrtune::engine::suggest;

use crate::helpers::{assert_plot, path_string, write};
use crate::support::run::lrtune;

/// 100 learning rates from 1e-6 to 1, evenly spaced on a log scale.
fn lrs() -> Vec<f64> {
    (0..100)
        .map(|i| 1e-6 * 1e6f64.powf(i as f64 / 99.0))
        .collect()
}

/// A range-test-like curve: a sigmoid fall centred on point 45, a wiggle, and a blow-up.
fn measured_losses() -> Vec<f64> {
    (0..100)
        .map(|i| {
            let i = i as f64;
            2.3 - 1.5 / (1.0 + (-(i - 45.0) / 6.0).exp())
                + 0.03 * (1.3 * i).sin()
                + ((i - 88.0) / 3.0).exp()
        })
        .collect()
}

fn csv(lrs: &[f64], losses: &[f64]) -> String {
    let mut text = String::from("step,lr,loss,note\n");
    for (step, (lr, loss)) in lrs.iter().zip(losses).enumerate() {
        text += &format!("{step},{lr},{loss},x\n");
    }
    text
}

#[test]
fn analyze_finds_the_minimum_of_a_parabola_without_smoothing() {
    let dir = tempfile::tempdir().unwrap();
    let lrs = lrs();
    let losses: Vec<f64> = (0..100)
        .map(|i| 1.0 + ((i as f64) - 70.0).powi(2) / 1000.0)
        .collect();
    let path = write(dir.path(), "parabola.csv", &csv(&lrs, &losses));
    let run = lrtune(&["analyze", &path, "--json", "--smoothing", "0"], &[]);
    assert_eq!(run.code, 0, "{run}");
    let analysis: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    // The lowest loss is at point 70: `edge` is its rate and `minimum` a tenth of it.
    assert_eq!(analysis["suggestions"]["edge"].as_f64().unwrap(), lrs[70]);
    let minimum = analysis["suggestions"]["minimum"].as_f64().unwrap();
    assert!((minimum - lrs[70] / 10.0).abs() < 1e-15, "{minimum}");
    // Without smoothing the smoothed curve is the curve.
    let smoothed: Vec<f64> = analysis["smoothed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(smoothed, losses);
}

#[test]
fn analyze_gives_the_engines_suggestions_and_warnings_for_csv_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let lrs = lrs();
    let mut losses = measured_losses();
    // A diverged test ends in a non-finite loss.
    losses[99] = f64::INFINITY;
    let expected = suggest::analyze(&lrs, &losses, 0.98).unwrap();
    assert!(expected.diverged);
    assert!(expected.suggestions.valley.is_some());

    let csv_path = write(dir.path(), "curve.csv", &csv(&lrs, &losses));
    let json_losses: Vec<serde_json::Value> = losses
        .iter()
        .map(|loss| {
            if loss.is_finite() {
                (*loss).into()
            } else {
                serde_json::Value::Null
            }
        })
        .collect();
    let json_path = write(
        dir.path(),
        "curve.json",
        &serde_json::json!({"lr": lrs, "loss": json_losses}).to_string(),
    );
    for path in [&csv_path, &json_path] {
        let run = lrtune(&["analyze", path, "--json"], &[]);
        assert_eq!(run.code, 0, "{run}");
        let analysis: suggest::Analysis = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(analysis, expected, "{path}");
    }

    // A POST /v1/analyze body, smoothing included, reads the same from a file.
    let body = write(
        dir.path(),
        "body.json",
        &serde_json::json!({"lr": lrs, "loss": json_losses, "smoothing": 0.9}).to_string(),
    );
    let run = lrtune(&["analyze", &body, "--json"], &[]);
    assert_eq!(run.code, 0, "{run}");
    let analysis: suggest::Analysis = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(analysis, suggest::analyze(&lrs, &losses, 0.9).unwrap());

    let run = lrtune(&["analyze", &csv_path], &[]);
    assert_eq!(run.code, 0, "{run}");
    let s = expected.suggestions;
    let short = |lr: Option<f64>| {
        let text = format!("{:.1e}", lr.unwrap());
        let (mantissa, exponent) = text.split_once('e').unwrap();
        format!(
            "{}e{exponent}",
            mantissa.trim_end_matches('0').trim_end_matches('.')
        )
    };
    let line = format!(
        "suggestions: valley {}  steepest {}  minimum {}  edge {}",
        short(s.valley),
        short(s.steepest),
        short(s.minimum),
        short(s.edge)
    );
    assert!(run.stdout.contains(&line), "expected {line:?}: {run}");
    assert!(run.stdout.contains("100 points"), "{run}");
    for warning in &expected.warnings {
        assert!(run.stdout.contains(&format!("warning: {warning}")), "{run}");
    }
}

#[test]
fn analyze_plot_draws_the_curve_and_labels_the_suggestions() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "curve.csv", &csv(&lrs(), &measured_losses()));
    let plot = path_string(&dir.path().join("analyze.svg"));
    let run = lrtune(&["analyze", &path, "--plot", &plot], &[]);
    assert_eq!(run.code, 0, "{run}");
    assert_plot(
        &plot,
        &["valley", "steepest", "minimum", "edge", "smoothed loss"],
    );
}

#[test]
fn analyze_exits_2_naming_the_row_and_column_of_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let lrs = lrs();
    let losses = measured_losses();
    let mut text = csv(&lrs, &losses);
    text = text.replacen(
        &format!("2,{},{},x", lrs[2], losses[2]),
        &format!("2,{},abc,x", lrs[2]),
        1,
    );
    let path = write(dir.path(), "bad.csv", &text);
    let run = lrtune(&["analyze", &path], &[]);
    assert_eq!(run.code, 2, "{run}");
    assert!(
        run.stderr
            .contains("row 3 (line 4), column loss: \"abc\" is not a number"),
        "{run}"
    );

    // Rates that fall: the engine's check, shown as a row.
    let mut falling = lrs.clone();
    falling[10] = falling[9];
    let path = write(dir.path(), "falling.csv", &csv(&falling, &losses));
    let run = lrtune(&["analyze", &path], &[]);
    assert_eq!(run.code, 2, "{run}");
    assert!(
        run.stderr
            .contains("row 11 (line 12), column lr: must be above"),
        "{run}"
    );

    let path = write(
        dir.path(),
        "short.json",
        r#"{"lr": [0.1, 0.2], "loss": [1, 2]}"#,
    );
    let run = lrtune(&["analyze", &path], &[]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("lr: has 2 points"), "{run}");

    let path = write(dir.path(), "nolr.csv", "rate,loss\n0.1,2\n");
    let run = lrtune(&["analyze", &path], &[]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("no `lr` column"), "{run}");
}
