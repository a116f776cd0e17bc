//! `lrtune check spec.json --lr X`: the CI pre-training hook. Runs the tune job (here, or on a
//! server with `--server`) and exits 0 when X is inside the recommended band, 1 when it is not
//! (saying which way, by how much, and what to use), 2 on any error.

use std::io::Write;

use anyhow::Context;
use clap::Args;

use super::client::Client;
use super::plot::{format_lr, write_result_plot};
use super::{read_input, report, run, submit, Outcome};
use crate::engine::JobResult;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The job spec (JSON), or - for standard input.
    pub spec: String,
    /// The peak learning rate the training run is configured with.
    #[arg(long, value_name = "LR", value_parser = positive_lr)]
    pub lr: f64,
    /// Run the job on this `lrtune serve` (e.g. http://127.0.0.1:8080) instead of here.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token, when the server was started with one.
    #[arg(long, env = "LRTUNE_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Write the full result (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub output: Option<String>,
    /// Draw the range-test curve, the suggestions and the band to this SVG file.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<String>,
    /// No progress bar and no summary: only the verdict.
    #[arg(long, short)]
    pub quiet: bool,
}

fn positive_lr(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(lr) if lr.is_finite() && lr > 0.0 => Ok(lr),
        Ok(lr) => Err(format!(
            "must be a positive, finite learning rate, got {lr}"
        )),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

pub fn run(args: CheckArgs) -> anyhow::Result<Outcome> {
    let (result, curve) = match &args.server {
        Some(server) => {
            let client = Client::new(server, args.token.clone())?;
            let spec = read_input(&args.spec)?;
            let kind = serde_json::from_str::<serde_json::Value>(&spec)
                .ok()
                .and_then(|value| value.get("kind").cloned());
            if kind == Some(serde_json::json!("compare")) {
                anyhow::bail!(
                    "invalid spec: kind: a compare job races recipes and has no band to check a learning rate against; submit it with `lrtune submit`, or check a tune spec"
                );
            }
            let (id, result) = submit::submit_and_wait(&client, &spec, args.quiet)?;
            let curve = match &args.plot {
                Some(_) => client.curve(&id)?,
                None => Vec::new(),
            };
            (result, curve)
        }
        None => {
            let output = run::run_spec_file(&args.spec, args.quiet)?;
            (output.result, output.curve)
        }
    };
    if let Some(path) = &args.output {
        let text = serde_json::to_string_pretty(&result)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {path}"))?;
    }
    if let Some(path) = &args.plot {
        let title = format!("lrtune check --lr {}", format_lr(args.lr));
        write_result_plot(path, &title, &result, &curve, Some(args.lr))?;
    }
    let rec = &result.recommendation;
    let verdict = Verdict::of(args.lr, rec.band);
    if let Ok(path) = std::env::var("GITHUB_OUTPUT") {
        if !path.is_empty() {
            append_github_output(&path, &result, verdict.in_band())?;
        }
    }
    if !args.quiet {
        print!("{}", report::summary(&result));
    }
    println!("{}", verdict.message(args.lr, rec.band, rec.peak_lr));
    Ok(if verdict.in_band() {
        Outcome::Ok
    } else {
        Outcome::CheckFailed
    })
}

/// Where the configured learning rate lies against the band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    InBand,
    /// Above the band's top by this factor.
    Above(f64),
    /// Below the band's bottom by this factor.
    Below(f64),
}

impl Verdict {
    pub fn of(lr: f64, [low, high]: [f64; 2]) -> Verdict {
        if lr > high {
            Verdict::Above(lr / high)
        } else if lr < low {
            Verdict::Below(low / lr)
        } else {
            Verdict::InBand
        }
    }

    pub fn in_band(self) -> bool {
        self == Verdict::InBand
    }

    pub fn message(self, lr: f64, band: [f64; 2], peak: f64) -> String {
        let band = format!("[{}, {}]", format_lr(band[0]), format_lr(band[1]));
        let peak = format_lr(peak);
        match self {
            Verdict::InBand => format!(
                "ok: {} is inside the band {band} (recommended peak {peak})",
                format_lr(lr)
            ),
            Verdict::Above(factor) => format!(
                "too high: {} is {} above the band {band}; use {peak} (the recommended peak)",
                format_lr(lr),
                format_factor(factor)
            ),
            Verdict::Below(factor) => format!(
                "too low: {} is {} below the band {band}; use {peak} (the recommended peak)",
                format_lr(lr),
                format_factor(factor)
            ),
        }
    }
}

fn format_factor(factor: f64) -> String {
    if factor < 100.0 {
        format!("{factor:.1}x")
    } else {
        format!("{factor:.0}x")
    }
}

/// GitHub Actions' step outputs: `key=value` lines appended to the file it names.
fn append_github_output(path: &str, result: &JobResult, in_band: bool) -> anyhow::Result<()> {
    let rec = &result.recommendation;
    let lines = format!(
        "peak_lr={}\nband_low={}\nband_high={}\nin_band={in_band}\n",
        rec.peak_lr, rec.band[0], rec.band[1]
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening $GITHUB_OUTPUT ({path})"))?;
    file.write_all(lines.as_bytes())
        .with_context(|| format!("writing to $GITHUB_OUTPUT ({path})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_factor_is_measured_from_the_nearer_end_of_the_band() {
        let band = [1.2e-3, 3.7e-2];
        assert_eq!(Verdict::of(1.2e-3, band), Verdict::InBand);
        assert_eq!(Verdict::of(3.7e-2, band), Verdict::InBand);
        assert_eq!(Verdict::of(0.3, band), Verdict::Above(0.3 / 3.7e-2));
        assert_eq!(Verdict::of(1e-5, band), Verdict::Below(1.2e-3 / 1e-5));
        assert_eq!(
            Verdict::of(0.3, band).message(0.3, band, 1.2e-2),
            "too high: 3e-1 is 8.1x above the band [1.2e-3, 3.7e-2]; use 1.2e-2 (the recommended peak)"
        );
        assert_eq!(
            Verdict::of(1e-5, band).message(1e-5, band, 1.2e-2),
            "too low: 1e-5 is 120x below the band [1.2e-3, 3.7e-2]; use 1.2e-2 (the recommended peak)"
        );
    }

    #[test]
    fn factors_and_learning_rates_parse_and_print() {
        assert_eq!(format_factor(8.108), "8.1x");
        assert_eq!(format_factor(1234.0), "1234x");
        assert_eq!(positive_lr("3e-3"), Ok(0.003));
        assert!(positive_lr("0").is_err());
        assert!(positive_lr("fast").is_err());
    }
}
