//! `lrtune-dev bench --profile` end to end: the tree of one step's spans for a small MLP and
//! the summary by kind. Times depend on the machine, so this checks the report's lines, their
//! nesting and that the parts add up to no more than the step, never a threshold.

// The workspace's runner (tests/support/run.rs), without the rest of lrtune's harness.
#[allow(dead_code)]
#[path = "../../tests/support/run.rs"]
mod run;

use run::lrtune_dev;

/// The milliseconds at the start of a report line.
fn ms(line: &str) -> f64 {
    line.split_whitespace()
        .next()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no time at the start of {line:?}"))
}

#[test]
fn the_profile_names_every_part_of_an_mlp_step() {
    let run = lrtune_dev(&[
        "bench",
        "--profile",
        "--case",
        "mlp-64-128-128-10-sgd",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--no-pytorch",
    ]);
    assert_eq!(run.code, 0, "{run}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    let find = |text: &str| -> &str {
        lines
            .iter()
            .find(|line| line.contains(text))
            .unwrap_or_else(|| panic!("no line with {text:?}: {run}"))
    };
    assert!(find("profile of mlp-64-128-128-10-sgd (128)").contains("over 3 steps"));
    let step = ms(find("step (wall time of train_step)"));
    // The layers in order, each pass with its products: 64 -> 128 -> 128 -> 10 at 128 rows.
    let spans: Vec<&str> = lines
        .iter()
        .filter(|line| line.contains("forward ") || line.contains("backward "))
        .map(|line| line.split('%').nth(1).unwrap().trim())
        .collect();
    assert_eq!(
        spans,
        [
            "forward Flatten",
            "forward Linear { inputs: 64, outputs: 128 }",
            "forward Activation { function: Relu }",
            "forward Linear { inputs: 128, outputs: 128 }",
            "forward Activation { function: Relu }",
            "forward Linear { inputs: 128, outputs: 10 }",
            "backward Linear { inputs: 128, outputs: 10 }",
            "backward Activation { function: Relu }",
            "backward Linear { inputs: 128, outputs: 128 }",
            "backward Activation { function: Relu }",
            "backward Linear { inputs: 64, outputs: 128 }",
            "backward Flatten",
        ],
        "{run}"
    );
    // The forward products are computed transposed (128 rows): the product with its rate,
    // then the transpose of its output, nested one level under the layer.
    let copy = find("transpose the output 128x128");
    let product = find("product 128x128x64");
    assert!(product.contains("GFLOP/s"), "{run}");
    let indent = |line: &str| {
        line.split('%').nth(1).unwrap().len() - line.split('%').nth(1).unwrap().trim_start().len()
    };
    assert_eq!(
        indent(copy),
        indent(find("forward Linear { inputs: 64")) + 2,
        "{run}"
    );
    // The first layer's input gradient is never computed: of the two products of that
    // shape (the weight gradient, 128 outputs x 64 inputs over 128 rows, and the input
    // gradient, 128 rows x 64 inputs over 128 outputs), only the first runs.
    let same_shape = lines
        .iter()
        .filter(|line| line.contains("product 128x64x128 "))
        .count();
    assert_eq!(same_shape, 1, "{run}");
    // The summary by kind: the lines after its heading, in this order.
    let by_kind = lines
        .iter()
        .position(|line| line.starts_with("by kind"))
        .unwrap_or_else(|| panic!("no summary: {run}"));
    let kinds: Vec<&str> = lines[by_kind + 1..]
        .iter()
        .map(|line| line.trim_start().split_once("  ").unwrap().1)
        .collect();
    assert_eq!(
        kinds,
        [
            "matrix products",
            "transposes around the products",
            "element-wise work in the layer passes (their time less their products and transposes)",
            "gather the batch",
            "loss",
            "optimizer",
            "outside every span (handing the step to the pool, the step's bookkeeping)",
        ],
        "{run}"
    );
    let summary: f64 = lines[by_kind + 1..].iter().map(|line| ms(line)).sum();
    assert!(ms(find("optimizer sgd")) > 0.0, "{run}");
    // Medians of parts need not add up exactly; they cannot exceed the step by much.
    assert!(
        summary <= 1.5 * step,
        "parts {summary} ms of a {step} ms step: {run}"
    );
}
