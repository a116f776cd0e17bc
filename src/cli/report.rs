//! The human-readable summary of a result that `run`, `submit` and `check` print.

use std::fmt::Write;

use crate::engine::JobResult;

pub fn summary(result: &JobResult) -> String {
    let mut out = String::new();
    let data = &result.data;
    let model = &result.model;
    let _ = writeln!(
        out,
        "data: {} training rows, {:?} task; model: {} with {} parameters on {}",
        data.rows, data.task, model.arch, model.parameters, model.device
    );
    if let Some(range) = &result.range_test {
        let s = &range.suggestions;
        let _ = writeln!(
            out,
            "range test: {} steps{}",
            range.steps_run,
            range
                .stop_reason
                .as_ref()
                .map(|reason| format!(", stopped early: {reason}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  suggestions: valley {}  steepest {}  minimum {}  edge {}",
            lr(s.valley),
            lr(s.steepest),
            lr(s.minimum),
            lr(s.edge)
        );
    }
    if !result.sweep.is_empty() {
        let _ = writeln!(out, "sweep (OneCycle, validation loss per candidate peak):");
        let _ = writeln!(
            out,
            "  {:>10}  {:>7}  {:>10}  {:>9}  {:>5}",
            "peak_lr", "epochs", "val_loss", "accuracy", "seeds"
        );
        for candidate in &result.sweep {
            let loss = if candidate.diverged {
                "diverged".to_string()
            } else {
                format!("{:.4}", candidate.val_loss)
            };
            let accuracy = candidate
                .val_accuracy
                .map(|a| format!("{:.1}%", a * 100.0))
                .unwrap_or_else(|| "-".to_string());
            let mark = if candidate.best {
                "  <- best"
            } else if candidate.in_band {
                "  in band"
            } else if candidate.unstable {
                "  unstable"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {:>10.3e}  {:>7.1}  {:>10}  {:>9}  {:>5}{mark}",
                candidate.peak_lr, candidate.epochs, loss, accuracy, candidate.seeds
            );
        }
    }
    let rec = &result.recommendation;
    let _ = writeln!(
        out,
        "recommended peak lr: {:.3e}  band: [{:.3e}, {:.3e}]  (from the {})",
        rec.peak_lr,
        rec.band[0],
        rec.band[1],
        rec.source.replace('_', " ")
    );
    if let (Some(edge), Some(distance)) = (rec.stability_edge_lr, rec.edge_distance) {
        let _ = writeln!(
            out,
            "stability edge: {edge:.3e} (instability begins there); the peak is {distance:.1}x below it"
        );
    }
    let _ = writeln!(out, "pytorch: {}", rec.pytorch);
    let _ = writeln!(out, "fastai:  {}", rec.fastai);
    for warning in &rec.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    let timing = &result.timing;
    let _ = writeln!(
        out,
        "took {:.1} s for {} training steps ({:.0} steps/s): {:.2}x the planned run's {} steps, within a budget of {}",
        timing.seconds,
        timing.total_steps,
        timing.steps_per_second,
        timing.plan_multiple,
        timing.plan_steps,
        timing.budget_steps
    );
    out
}

fn lr(value: Option<f64>) -> String {
    value
        .map(|v| format!("{v:.3e}"))
        .unwrap_or_else(|| "-".to_string())
}
