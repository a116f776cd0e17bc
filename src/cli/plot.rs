//! `--plot out.svg` on `run`, `check` and `analyze`: the range-test loss against the learning
//! rate on a log axis (raw and smoothed), the four suggestions marked and labelled, and the
//! recommended band shaded, as an SVG file a CI job can keep as an artifact.

use anyhow::{bail, Context};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::engine::suggest::Suggestions;
use crate::engine::{CurvePoint, JobResult};

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;

/// Everything one plot shows; non-finite losses are left out of the lines.
#[derive(Debug, Clone, Default)]
pub struct Plot {
    pub title: String,
    pub lrs: Vec<f64>,
    pub losses: Vec<f64>,
    pub smoothed: Vec<f64>,
    pub suggestions: Suggestions,
    /// The recommended band and peak, for a tune job's result.
    pub band: Option<[f64; 2]>,
    pub peak: Option<f64>,
    /// The learning rate `check` was asked about.
    pub checked: Option<f64>,
}

impl Plot {
    /// A finished job's curve with its suggestions and recommendation.
    pub fn of_result(title: &str, result: &JobResult, curve: &[CurvePoint]) -> Plot {
        Plot {
            title: title.to_string(),
            lrs: curve.iter().map(|point| point.lr).collect(),
            losses: curve.iter().map(|point| point.loss).collect(),
            smoothed: curve.iter().map(|point| point.smoothed).collect(),
            suggestions: result
                .range_test
                .as_ref()
                .map(|range| range.suggestions)
                .unwrap_or_default(),
            band: Some(result.recommendation.band),
            peak: Some(result.recommendation.peak_lr),
            checked: None,
        }
    }
}

/// Writes a job's plot (with the learning rate `check` was asked about, if any), or says on
/// stderr why there is none (a sweep job has no curve).
pub fn write_result_plot(
    path: &str,
    title: &str,
    result: &JobResult,
    curve: &[CurvePoint],
    checked: Option<f64>,
) -> anyhow::Result<()> {
    if curve.len() < 2 {
        eprintln!(
            "warning: no range-test curve to plot (a sweep job has none): {path} not written"
        );
        return Ok(());
    }
    let mut plot = Plot::of_result(title, result, curve);
    plot.checked = checked;
    write_svg(path, &plot)
}

pub fn write_svg(path: &str, plot: &Plot) -> anyhow::Result<()> {
    let svg = render_svg(plot)?;
    std::fs::write(path, svg).with_context(|| format!("writing the plot to {path}"))
}

/// The plot as SVG text.
pub fn render_svg(plot: &Plot) -> anyhow::Result<String> {
    let (x_min, x_max) = match (plot.lrs.first(), plot.lrs.last()) {
        (Some(&first), Some(&last)) if first > 0.0 && last > first => (first, last),
        _ => bail!("a plot needs at least two rising, positive learning rates"),
    };
    let (y_min, y_max) = loss_range(&plot.losses, &plot.smoothed)
        .context("a plot needs at least one finite loss")?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&plot.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d((x_min..x_max).log_scale(), y_min..y_max)
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_desc("learning rate (log scale)")
            .y_desc("loss")
            .x_label_formatter(&|lr| format_lr(*lr))
            .y_label_formatter(&|loss| format!("{loss:.3}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(draw_error)?;

        if let Some([low, high]) = plot.band {
            let (low, high) = (low.max(x_min), high.min(x_max));
            if low < high {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(low, y_min), (high, y_max)],
                        GREEN.mix(0.12).filled(),
                    )))
                    .map_err(draw_error)?
                    .label(format!(
                        "recommended band [{}, {}]",
                        format_lr(low),
                        format_lr(high)
                    ))
                    .legend(|(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 16, y + 5)], GREEN.mix(0.3).filled())
                    });
            }
        }

        let clamp = |loss: f64| loss.clamp(y_min, y_max);
        let raw_color = RGBColor(150, 170, 200);
        for (index, segment) in finite_segments(&plot.lrs, &plot.losses)
            .into_iter()
            .enumerate()
        {
            let series = chart
                .draw_series(LineSeries::new(
                    segment.into_iter().map(|(lr, loss)| (lr, clamp(loss))),
                    raw_color.stroke_width(1),
                ))
                .map_err(draw_error)?;
            if index == 0 {
                series.label("loss").legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], raw_color.stroke_width(1))
                });
            }
        }
        for (index, segment) in finite_segments(&plot.lrs, &plot.smoothed)
            .into_iter()
            .enumerate()
        {
            let series = chart
                .draw_series(LineSeries::new(
                    segment.into_iter().map(|(lr, loss)| (lr, clamp(loss))),
                    BLUE.stroke_width(2),
                ))
                .map_err(draw_error)?;
            if index == 0 {
                series.label("smoothed loss").legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2))
                });
            }
        }

        let s = &plot.suggestions;
        let markers = [
            ("valley", s.valley, RGBColor(200, 40, 40)),
            ("steepest", s.steepest, RGBColor(230, 130, 0)),
            ("minimum", s.minimum, RGBColor(130, 60, 170)),
            ("edge", s.edge, RGBColor(90, 90, 90)),
        ]
        .into_iter()
        .filter_map(|(name, value, color)| value.map(|value| (name.to_string(), value, color)))
        .chain(
            plot.peak
                .map(|peak| ("peak".to_string(), peak, RGBColor(0, 130, 60))),
        )
        .chain(plot.checked.map(|lr| ("--lr".to_string(), lr, BLACK)));
        let step = (y_max - y_min) * 0.055;
        for (row, (name, lr, color)) in markers.enumerate() {
            let label_y = y_max - step * (row as f64 + 0.6);
            let font = ("sans-serif", 14).into_font().color(&color);
            if !(x_min..=x_max).contains(&lr) {
                // Off the curve's range: say so at the nearer edge instead of drawing a line.
                let (x, text, anchor) = if lr > x_max {
                    (x_max, format!("{name} {} ->", format_lr(lr)), HPos::Right)
                } else {
                    (x_min, format!("<- {name} {}", format_lr(lr)), HPos::Left)
                };
                chart
                    .draw_series(std::iter::once(Text::new(
                        text,
                        (x, label_y),
                        font.pos(Pos::new(anchor, VPos::Top)),
                    )))
                    .map_err(draw_error)?;
                continue;
            }
            let width = if name == "peak" || name == "--lr" {
                2
            } else {
                1
            };
            chart
                .draw_series(DashedLineSeries::new(
                    [(lr, y_min), (lr, y_max)],
                    6,
                    4,
                    color.stroke_width(width),
                ))
                .map_err(draw_error)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {name} {}", format_lr(lr)),
                    (lr, label_y),
                    font,
                )))
                .map_err(draw_error)?;
        }

        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn draw_error<E: std::error::Error + Send + Sync + 'static>(
    error: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {error}")
}

/// The loss axis: from the lowest finite loss to the highest smoothed loss before the
/// smoothed minimum (the whole fall), so the blow-up at the end does not squash the part
/// that matters. Raw losses above it are drawn at the top edge.
fn loss_range(losses: &[f64], smoothed: &[f64]) -> Option<(f64, f64)> {
    let finite =
        |values: &[f64]| -> Vec<f64> { values.iter().copied().filter(|v| v.is_finite()).collect() };
    let raw = finite(losses);
    let smooth = finite(smoothed);
    let reference = if smooth.is_empty() { &raw } else { &smooth };
    let lowest = raw.iter().chain(&smooth).copied().reduce(f64::min)?;
    let lowest_at = reference
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(index, _)| index)?;
    let mut top = reference[..=lowest_at]
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if top <= lowest {
        top = reference.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    }
    if top <= lowest {
        top = lowest + lowest.abs().max(1.0) * 0.1;
    }
    let pad = (top - lowest) * 0.08;
    Some((lowest - pad, top + pad))
}

/// Runs of consecutive finite points, so a gap is not drawn across.
fn finite_segments(lrs: &[f64], values: &[f64]) -> Vec<Vec<(f64, f64)>> {
    let mut segments = vec![Vec::new()];
    for (&lr, &value) in lrs.iter().zip(values) {
        if lr.is_finite() && lr > 0.0 && value.is_finite() {
            if let Some(last) = segments.last_mut() {
                last.push((lr, value));
            }
        } else if segments.last().is_some_and(|last| !last.is_empty()) {
            segments.push(Vec::new());
        }
    }
    segments.retain(|segment| segment.len() > 1);
    segments
}

/// A learning rate as people write it: two significant digits, no trailing zeros (`3e-1`,
/// `1.2e-3`).
pub fn format_lr(lr: f64) -> String {
    let text = format!("{lr:.1e}");
    match text.split_once('e') {
        Some((mantissa, exponent)) => {
            let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
            format!("{mantissa}e{exponent}")
        }
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rates_are_written_short() {
        assert_eq!(format_lr(0.3), "3e-1");
        assert_eq!(format_lr(0.00123), "1.2e-3");
        assert_eq!(format_lr(0.037), "3.7e-2");
        assert_eq!(format_lr(10.0), "1e1");
    }

    #[test]
    fn a_gap_in_the_curve_splits_the_line() {
        let lrs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let values = [1.0, 2.0, f64::NAN, 3.0, 4.0, f64::INFINITY];
        assert_eq!(
            finite_segments(&lrs, &values),
            vec![vec![(1.0, 1.0), (2.0, 2.0)], vec![(4.0, 3.0), (5.0, 4.0)]]
        );
    }

    #[test]
    fn the_loss_axis_stops_short_of_the_blow_up() {
        let (low, high) = loss_range(&[2.0, 2.4, 1.0, 100.0], &[2.0, 2.2, 1.5, 30.0]).unwrap();
        // From the lowest raw loss (1.0) to the highest smoothed loss before the smoothed
        // minimum (2.2), padded by 8 %.
        assert!((low - (1.0 - 0.096)).abs() < 1e-12, "{low}");
        assert!((high - (2.2 + 0.096)).abs() < 1e-12, "{high}");
    }
}
