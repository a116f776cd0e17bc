//! `lrtune analyze curve.csv|curve.json`: suggestions and warnings for a range-test curve
//! measured elsewhere (a PyTorch loop, another tool), with the same code as `POST /v1/analyze`.

use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use super::plot::{self, format_lr, Plot};
use super::{read_input, Outcome};
use crate::engine::suggest::{self, Analysis};

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The curve: CSV with a header and columns `lr` and `loss` (others are ignored), or JSON
    /// `{"lr": [...], "loss": [...]}`; - reads standard input (JSON or CSV, told apart by the
    /// first character).
    pub curve: String,
    /// Print the analysis as JSON (the same shape as POST /v1/analyze answers).
    #[arg(long)]
    pub json: bool,
    /// The smoothing factor of the loss's moving average [default: a JSON curve's
    /// `smoothing`, else fastai's 0.98].
    #[arg(long)]
    pub smoothing: Option<f64>,
    /// Also draw the curve and the suggestions to this SVG file.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<String>,
}

/// A measured curve: learning rates and their losses (NaN where a loss was not finite).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub lrs: Vec<f64>,
    pub losses: Vec<f64>,
    /// A JSON curve may carry it, as a `POST /v1/analyze` body does.
    pub smoothing: Option<f64>,
}

#[derive(Deserialize)]
struct JsonCurve {
    lr: Vec<f64>,
    loss: Vec<Option<f64>>,
    #[serde(default)]
    smoothing: Option<f64>,
}

pub fn run(args: AnalyzeArgs) -> anyhow::Result<Outcome> {
    let text = read_input(&args.curve)?;
    let is_csv = is_csv(&args.curve, &text);
    let curve = if is_csv {
        parse_csv(&text)
    } else {
        parse_json(&text)
    }
    .with_context(|| format!("reading the curve {}", args.curve))?;
    let smoothing = args.smoothing.or(curve.smoothing).unwrap_or(0.98);
    let analysis = suggest::analyze(&curve.lrs, &curve.losses, smoothing).map_err(|error| {
        let place = if error.field == "smoothing" && args.smoothing.is_some() {
            "--smoothing".to_string()
        } else if is_csv {
            csv_place(&error.field)
        } else {
            error.field.clone()
        };
        anyhow::anyhow!("{}: {place}: {}", args.curve, error.message)
    })?;
    if let Some(path) = &args.plot {
        // The smoothed curve stops where the losses stop being finite.
        let mut smoothed = analysis.smoothed.clone();
        smoothed.resize(curve.lrs.len(), f64::NAN);
        let title = format!("lrtune analyze {}", display_name(&args.curve));
        plot::write_svg(
            path,
            &Plot {
                title,
                lrs: curve.lrs.clone(),
                losses: curve.losses.clone(),
                smoothed,
                suggestions: analysis.suggestions,
                band: None,
                peak: None,
                checked: None,
            },
        )?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&analysis)?);
    } else {
        print!("{}", summary(&curve, &analysis));
    }
    Ok(Outcome::Ok)
}

fn display_name(path: &str) -> String {
    if path == "-" {
        return "(stdin)".to_string();
    }
    Path::new(path)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

/// CSV unless the file says `.json` or (for stdin or another name) starts with `{`.
fn is_csv(path: &str, text: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.ends_with(".json") {
        return false;
    }
    if lower.ends_with(".csv") {
        return true;
    }
    !text.trim_start().starts_with('{')
}

/// `lr[7]` (an index into the curve) as the CSV row a user can find: data rows count from 1,
/// the header being line 1.
fn csv_place(field: &str) -> String {
    let parsed = field
        .strip_suffix(']')
        .and_then(|rest| rest.split_once('['))
        .and_then(|(column, index)| Some((column, index.parse::<usize>().ok()?)));
    match parsed {
        Some((column, index)) => format!("row {} (line {}), column {column}", index + 1, index + 2),
        None => format!("column {field}"),
    }
}

pub fn parse_json(text: &str) -> anyhow::Result<Curve> {
    let curve: JsonCurve = serde_json::from_str(text)
        .context("expected a JSON object {\"lr\": [...], \"loss\": [...]}")?;
    Ok(Curve {
        lrs: curve.lr,
        losses: curve
            .loss
            .into_iter()
            .map(|loss| loss.unwrap_or(f64::NAN))
            .collect(),
        smoothing: curve.smoothing,
    })
}

/// CSV with a header naming `lr` and `loss`; other columns are ignored. An empty loss cell
/// (a non-finite loss, as `GET /v1/jobs/{id}/curve?format=csv` writes it) reads as NaN.
pub fn parse_csv(text: &str) -> anyhow::Result<Curve> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers().context("reading the CSV header")?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|header| header.eq_ignore_ascii_case(name))
            .with_context(|| {
                format!(
                    "the header has no `{name}` column (it has: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                )
            })
    };
    let (lr_column, loss_column) = (column("lr")?, column("loss")?);
    let mut curve = Curve {
        lrs: Vec::new(),
        losses: Vec::new(),
        smoothing: None,
    };
    for (index, record) in reader.records().enumerate() {
        let row = index + 1;
        let record = record.with_context(|| format!("row {row} (line {})", row + 1))?;
        let cell = |column: usize, name: &str, empty_is_nan: bool| -> anyhow::Result<f64> {
            let text = record.get(column).unwrap_or("");
            if text.is_empty() {
                if empty_is_nan {
                    return Ok(f64::NAN);
                }
                bail!(
                    "row {row} (line {}), column {name}: the cell is empty",
                    row + 1
                );
            }
            text.parse::<f64>().map_err(|_| {
                anyhow::anyhow!(
                    "row {row} (line {}), column {name}: {text:?} is not a number",
                    row + 1
                )
            })
        };
        curve.lrs.push(cell(lr_column, "lr", false)?);
        curve.losses.push(cell(loss_column, "loss", true)?);
    }
    Ok(curve)
}

fn summary(curve: &Curve, analysis: &Analysis) -> String {
    let mut out = String::new();
    let s = &analysis.suggestions;
    let show = |value: Option<f64>| value.map(format_lr).unwrap_or_else(|| "-".to_string());
    let _ = writeln!(
        out,
        "curve: {} points from {} to {}{}",
        curve.lrs.len(),
        curve
            .lrs
            .first()
            .map(|lr| format_lr(*lr))
            .unwrap_or_default(),
        curve
            .lrs
            .last()
            .map(|lr| format_lr(*lr))
            .unwrap_or_default(),
        if analysis.diverged {
            ", ends in a blow-up"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "suggestions: valley {}  steepest {}  minimum {}  edge {}",
        show(s.valley),
        show(s.steepest),
        show(s.minimum),
        show(s.edge)
    );
    for warning in &analysis.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_reads_lr_and_loss_among_other_columns_and_empty_losses_as_nan() {
        let curve = parse_csv("step,lr,loss,smoothed\n0,0.001,2.5,2.5\n1,0.01, ,\n").unwrap();
        assert_eq!(curve.lrs, vec![0.001, 0.01]);
        assert_eq!(curve.losses[0], 2.5);
        assert!(curve.losses[1].is_nan());
    }

    #[test]
    fn a_bad_csv_cell_names_its_row_and_column() {
        let error = parse_csv("lr,loss\n0.1,2\n0.2,abc\n").unwrap_err();
        assert_eq!(
            format!("{error:#}"),
            "row 2 (line 3), column loss: \"abc\" is not a number"
        );
        let error = parse_csv("learning_rate,loss\n0.1,2\n").unwrap_err();
        assert!(format!("{error:#}").contains("no `lr` column"), "{error:#}");
    }

    #[test]
    fn an_index_into_the_curve_is_shown_as_a_csv_row() {
        assert_eq!(csv_place("loss[4]"), "row 5 (line 6), column loss");
        assert_eq!(csv_place("smoothing"), "column smoothing");
    }

    #[test]
    fn json_reads_nulls_as_non_finite_losses() {
        let curve = parse_json(r#"{"lr": [0.1, 0.2], "loss": [1.5, null]}"#).unwrap();
        assert_eq!(curve.lrs, vec![0.1, 0.2]);
        assert!(curve.losses[1].is_nan());
    }
}
