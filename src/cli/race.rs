//! `lrtune run` on a `compare` spec: the race in this process, a table of the recipes on stdout
//! and, with `--plot`, every recipe's validation accuracy (or loss) against steps as SVG.

use anyhow::Context;
use plotters::prelude::*;

use super::plot::format_lr;
use crate::engine::compare::{thousands, CompareResult};

/// The table `lrtune run` prints for a race.
pub fn summary(result: &CompareResult) -> String {
    let accuracy = result.target.metric == "val_accuracy";
    let mut text = format!(
        "race of {} recipes, {} seeds each, {} steps per run ({} s: tuning {:.1} s, racing {:.1} s)\n",
        result.recipes.len(),
        result.seeds,
        result.timing.plan_steps,
        format_seconds(result.timing.seconds),
        result.timing.tune_seconds,
        result.timing.race_seconds,
    );
    if let Some(value) = result.target.value {
        text += &format!(
            "target: {} {} {} ({} % of {}'s final)\n",
            result.target.metric,
            if accuracy { ">=" } else { "<=" },
            format_metric(value, accuracy),
            result.target.fraction * 100.0,
            result.target.of_recipe.as_deref().unwrap_or("-"),
        );
    }
    text += "\n| rank | recipe | optimizer | schedule | lr | tuning | final val_loss | final val_accuracy | steps to target | seconds to target |\n";
    text += "|---|---|---|---|---|---|---|---|---|---|\n";
    for (rank, name) in result.ranking.iter().enumerate() {
        let Some(recipe) = result.recipes.iter().find(|r| &r.name == name) else {
            continue;
        };
        let stat = |mean: Option<f64>, std: Option<f64>, accuracy: bool| match (mean, std) {
            (Some(mean), Some(std)) => format!(
                "{} ± {}",
                format_metric(mean, accuracy),
                format_metric(std, accuracy)
            ),
            _ => "diverged".to_string(),
        };
        // Prodigy's step size is d * lr: its lr is a multiplier, and d the rate it found.
        let lr = match recipe.final_d.and_then(|d| d.mean) {
            Some(d) => format!("{} (d {})", format_lr(recipe.lr), format_lr(d)),
            None => format_lr(recipe.lr),
        };
        let tuning = if recipe.tuned {
            format!("{} steps", thousands(recipe.tune_steps))
        } else {
            "untuned".to_string()
        };
        text += &format!(
            "| {} | {} | {} | {} | {lr} | {tuning} | {} | {} | {} | {} |\n",
            rank + 1,
            recipe.name,
            recipe.optimizer,
            recipe.schedule,
            stat(recipe.final_val_loss.mean, recipe.final_val_loss.std, false),
            recipe
                .final_val_accuracy
                .map(|s| stat(s.mean, s.std, true))
                .unwrap_or_else(|| "-".to_string()),
            recipe
                .steps_to_target
                .map_or_else(|| "never".to_string(), |steps| steps.to_string()),
            recipe
                .seconds_to_target
                .map_or_else(|| "never".to_string(), format_seconds),
        );
    }
    text += &format!("\n{}\n", result.verdict);
    text
}

fn format_metric(value: f64, accuracy: bool) -> String {
    if accuracy {
        format!("{:.2} %", value * 100.0)
    } else {
        format!("{value:.4}")
    }
}

fn format_seconds(seconds: f64) -> String {
    format!("{seconds:.2}")
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;

/// Every recipe's seed-mean validation accuracy (loss for regression) against steps, with the
/// target as a dashed line.
pub fn render_svg(title: &str, result: &CompareResult) -> anyhow::Result<String> {
    let accuracy = result.target.metric == "val_accuracy";
    let x_max = result.timing.plan_steps.max(1) as f64;
    // The axis is zoomed to the curves from a quarter of the run on, where the recipes
    // differ; a curve's early points outside it are left out up to its first one inside.
    let settled = x_max / 4.0;
    let curves: Vec<(String, Vec<(f64, f64)>)> = result
        .recipes
        .iter()
        .map(|recipe| (recipe.name.clone(), mean_curve(recipe, accuracy)))
        .collect();
    let values = curves
        .iter()
        .flat_map(|(_, points)| points.iter().filter(|p| p.0 >= settled).map(|p| p.1));
    let (mut y_min, mut y_max) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !(y_min.is_finite() && y_max.is_finite()) {
        anyhow::bail!("no recipe has a finite validation point to plot");
    }
    if let Some(target) = result.target.value {
        y_min = y_min.min(target);
        y_max = y_max.max(target);
    }
    if y_max <= y_min {
        y_max = y_min + 1.0;
    }
    let margin = (y_max - y_min) * 0.05;
    let (y_min, y_max) = (y_min - margin, y_max + margin);
    let curves: Vec<(String, Vec<(f64, f64)>)> = curves
        .into_iter()
        .map(|(name, points)| {
            let inside = |p: &(f64, f64)| (y_min..=y_max).contains(&p.1);
            let first = points.iter().position(inside).unwrap_or(points.len());
            let points = points[first..]
                .iter()
                .map(|&(x, y)| (x, y.clamp(y_min, y_max)))
                .collect();
            (name, points)
        })
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, y_min..y_max)
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_desc("optimizer steps")
            .y_desc(if accuracy {
                "validation accuracy (mean over seeds)"
            } else {
                "validation loss (mean over seeds)"
            })
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(draw_error)?;
        if let Some(target) = result.target.value {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, target), (x_max, target)],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))
                .map_err(draw_error)?
                .label(format!("target {}", format_metric(target, accuracy)))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
        }
        for (index, (name, points)) in curves.into_iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(draw_error)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(if accuracy {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// The recipe's seed-mean metric at each evaluation step all its runs reached.
fn mean_curve(recipe: &crate::engine::compare::RecipeResult, accuracy: bool) -> Vec<(f64, f64)> {
    let Some(first) = recipe.runs.first() else {
        return Vec::new();
    };
    // Step 0 is the untrained model, far below every trained point: leaving it out lets the
    // axis zoom to where the recipes differ.
    first
        .points
        .iter()
        .enumerate()
        .skip_while(|(_, point)| point.step == 0)
        .map_while(|(index, point)| {
            let values: Option<Vec<f64>> = recipe
                .runs
                .iter()
                .map(|run| {
                    let p = run.points.get(index)?;
                    if accuracy {
                        p.val_accuracy
                    } else {
                        p.val_loss
                    }
                })
                .collect();
            let values = values?;
            Some((
                point.step as f64,
                values.iter().sum::<f64>() / values.len() as f64,
            ))
        })
        .collect()
}

pub fn write_svg(path: &str, title: &str, result: &CompareResult) -> anyhow::Result<()> {
    let svg = render_svg(title, result)?;
    std::fs::write(path, svg).with_context(|| format!("writing the plot to {path}"))
}

fn draw_error<E: std::error::Error + Send + Sync + 'static>(
    error: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {error}")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::engine::compare::run_compare;
    use crate::engine::{load_local_data, Limits, ValidSpec};

    /// A race of two untuned challengers (no tuning steps, so it takes a moment): the table
    /// says how each was tuned and shows Prodigy's d; the plot draws both.
    #[test]
    fn the_race_table_shows_the_tuning_and_prodigys_d_and_the_plot_both_recipes() {
        let spec = ValidSpec::parse(
            r#"{"kind": "compare", "data": {"builtin": "spirals", "samples": 512},
                "model": {"arch": "mlp", "hidden": [16]}, "batch_size": 32, "plan": {"epochs": 2},
                "recipes": ["prodigy", "schedule_free_adamw"], "seeds": 1}"#,
            &Limits::default(),
        )
        .unwrap();
        let loaded = load_local_data(&spec).unwrap();
        let result = run_compare(
            &spec,
            loaded,
            &Limits::default(),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
        let table = summary(&result);
        assert!(
            table.contains("| lr | tuning | final val_loss |"),
            "{table}"
        );
        let row = |name: &str| {
            table
                .lines()
                .find(|line| line.contains(&format!("| {name} |")))
                .unwrap_or_else(|| panic!("no row for {name}: {table}"))
                .to_string()
        };
        let d = result.recipes[0].final_d.unwrap().mean.unwrap();
        assert!(
            row("prodigy").contains(&format!("| 1e0 (d {}) | untuned |", format_lr(d))),
            "{table}"
        );
        assert!(
            row("schedule_free_adamw").contains("| 2.5e-3 | untuned |"),
            "{table}"
        );
        let svg = render_svg("race", &result).unwrap();
        assert!(svg.starts_with("<svg"));
        for name in ["prodigy", "schedule_free_adamw"] {
            assert!(svg.contains(name), "{name} is in the legend");
        }
    }
}
